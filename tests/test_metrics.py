"""The Prometheus endpoint on a real loopback port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from plait.runtime.metrics import MetricsServer, TrainingMetrics


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


@pytest.fixture
def server():
    metrics = TrainingMetrics("unit")
    srv = MetricsServer(metrics, "127.0.0.1", 0).start()
    yield srv
    srv.stop()


def test_port_zero_picks_a_free_loopback_port(server):
    assert server.url.startswith("http://127.0.0.1:") and not server.url.endswith(":0")


def test_metrics_reflect_the_gauges(server):
    server.metrics.step.set(12)
    server.metrics.loss.set(2.5)
    status, ctype, body = get(server.url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert 'plait_step{job="unit"} 12.0' in body
    assert 'plait_loss{job="unit"} 2.5' in body


def test_health_is_json(server):
    server.metrics.set_health(status="training", step=3)
    status, ctype, body = get(server.url + "/health")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body) == {"status": "training", "step": 3}


def test_unknown_path_is_404(server):
    status, _, body = get(server.url + "/nope")
    assert status == 404 and "/metrics" in body


def test_a_hybrid_dp_step_sets_the_imbalance_gauges():
    from types import SimpleNamespace

    from plait.runtime.metrics import MetricsConfig, MetricsHook
    from plait.runtime.trainer import StepResult

    hook = MetricsHook(MetricsConfig(port=0), job="hdp", flops_per_token=1.0, peak_flops_per_device=0.0, world=4)
    hook.server.start()
    try:
        trainer = SimpleNamespace(engine=SimpleNamespace(tokens_per_expert=lambda: None), config=SimpleNamespace(steps=5))
        result = StepResult(step=1, loss=2.0, aux_loss=0.0, grad_norm=1.0, lr=1e-3, tokens=100, seconds=0.5, end=1.0,
                            balance={"predicted": 1.02, "measured": 1.07})
        hook.on_step(trainer, result)
        _, _, body = get(hook.server.url + "/metrics")
        assert 'plait_hdp_imbalance_predicted{job="hdp"} 1.02' in body
        assert 'plait_hdp_imbalance_measured{job="hdp"} 1.07' in body
    finally:
        hook.server.stop()


def test_an_lsh_step_sets_ratio_and_fidelity_per_layer():
    from types import SimpleNamespace

    from plait.runtime.metrics import MetricsConfig, MetricsHook
    from plait.runtime.trainer import StepResult

    hook = MetricsHook(MetricsConfig(port=0), job="lsh", flops_per_token=1.0, peak_flops_per_device=0.0, world=2)
    hook.server.start()
    try:
        trainer = SimpleNamespace(engine=SimpleNamespace(tokens_per_expert=lambda: None), config=SimpleNamespace(steps=5))
        result = StepResult(step=1, loss=2.0, aux_loss=0.0, grad_norm=1.0, lr=1e-3, tokens=100, seconds=0.5, end=1.0,
                            lsh_ratio=[0.25, None, 0.5], lsh_fidelity=[0.97, None, None])
        hook.on_step(trainer, result)
        _, _, body = get(hook.server.url + "/metrics")
        assert 'plait_lsh_compression_ratio{job="lsh",layer="0"} 0.25' in body
        assert 'plait_lsh_compression_ratio{job="lsh",layer="2"} 0.5' in body
        assert 'layer="1"' not in body  # a dense layer has no ratio
        assert 'plait_lsh_fidelity{job="lsh",layer="0"} 0.97' in body
    finally:
        hook.server.stop()


def test_a_quantized_step_sets_precision_gauges_per_module():
    from types import SimpleNamespace

    from plait.runtime.metrics import MetricsConfig, MetricsHook
    from plait.runtime.trainer import StepResult

    hook = MetricsHook(MetricsConfig(port=0), job="fp8", flops_per_token=1.0, peak_flops_per_device=0.0, world=2)
    hook.server.start()
    try:
        trainer = SimpleNamespace(engine=SimpleNamespace(tokens_per_expert=lambda: None), config=SimpleNamespace(steps=5))
        stats = {"recipe": "mxfp8", "amax_x": 3.5, "amax_w": 0.25, "amax_dy": 0.125, "overflow_x": 0.5,
                 "underflow_x": 0.0, "overflow_dy": 0.0, "underflow_dy": 0.75}
        result = StepResult(step=1, loss=2.0, aux_loss=0.0, grad_norm=1.0, lr=1e-3, tokens=100, seconds=0.5, end=1.0,
                            precision={"layers.0.attn.wq": stats, "output": {"recipe": "fp32"}})
        hook.on_step(trainer, result)
        _, _, body = get(hook.server.url + "/metrics")
        assert 'plait_precision_amax{job="fp8",module="layers.0.attn.wq",tensor="x"} 3.5' in body
        assert 'plait_precision_amax{job="fp8",module="layers.0.attn.wq",tensor="w"} 0.25' in body
        assert 'plait_precision_overflow{job="fp8",module="layers.0.attn.wq",tensor="x"} 0.5' in body
        assert 'plait_precision_underflow{job="fp8",module="layers.0.attn.wq",tensor="dy"} 0.75' in body
        assert 'module="output"' not in body  # a module in high precision has no statistics
    finally:
        hook.server.stop()
