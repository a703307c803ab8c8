"""Prometheus metrics: rank 0 serves ``/metrics`` and ``/health`` on loopback."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from plait.errors import ConfigError
from plait.runtime.progress import Pace
from plait.runtime.trainer import BaseHook, StepResult, Trainer

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class MetricsConfig:
    """The ``metrics.*`` section."""

    enabled: bool = True
    host: str = "127.0.0.1"  # loopback by default; anything wider is an explicit choice
    port: int = 0  # 0: pick a free port (printed at start)
    log_every: int = 10  # steps between plain log lines when the console is not a terminal
    peak_flops: float = 0.0  # per-device peak for the MFU estimate; 0: measured GEMM rate (CPU) or the device's table value
    memory: bool = False  # measure each rank's peak tensor memory per step (plait.runtime.memtrack) into summary.json

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("metrics.port", self.port, "accepted: 0 (pick a free port) or 1..65535")
        if self.log_every < 1:
            raise ConfigError("metrics.log_every", self.log_every, "accepted: a positive number of steps")
        if self.peak_flops < 0:
            raise ConfigError("metrics.peak_flops", self.peak_flops, "accepted: 0 (auto) or FLOP/s per device")


class TrainingMetrics:
    """The gauges a training job exports, in their own registry."""

    def __init__(self, job: str):
        self.registry = CollectorRegistry()
        labels = ["job"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(job=job)

        self.step = gauge("plait_step", "Optimizer steps completed")
        self.steps_total = gauge("plait_steps_total", "Optimizer steps the job will run")
        self.loss = gauge("plait_loss", "Training loss of the last step (mean over the global batch, nats/token)")
        self.eval_loss = gauge("plait_eval_loss", "Last held-out loss (nats/token)")
        self.tokens_per_s = gauge("plait_tokens_per_second", "Training tokens per second, all ranks")
        self.step_seconds = gauge("plait_step_seconds", "Wall time of the last step")
        self.mfu = gauge("plait_mfu", "Model FLOP utilisation estimate (0..1)")
        self.eta_seconds = gauge("plait_eta_seconds", "Estimated seconds until the last step")
        self.grad_norm = gauge("plait_grad_norm", "Global gradient norm before clipping")
        self.lr = gauge("plait_learning_rate", "Learning rate of the last step")
        self.hdp_predicted = gauge("plait_hdp_imbalance_predicted",
                                   "Hybrid data parallelism: the last step's plan, busiest rank's work over the mean")
        self.hdp_measured = gauge("plait_hdp_imbalance_measured",
                                  "Hybrid data parallelism: the last step's busiest rank's forward+backward CPU "
                                  "seconds over the mean")
        self.tokens_per_expert = Gauge(
            "plait_moe_tokens_per_expert",
            "Token copies routed to each expert in the last micro-batch, all ranks of the first pipeline stage",
            ["job", "layer", "expert"], registry=self.registry,
        )
        self.lsh_ratio = Gauge(
            "plait_lsh_compression_ratio",
            "parallel.ep_compress=lsh: the last step's centroids sent / token copies (bytes sent / uncompressed) per layer",
            ["job", "layer"], registry=self.registry,
        )
        self.lsh_fidelity = Gauge(
            "plait_lsh_fidelity",
            "parallel.ep_compress=lsh: the last probe's mean cosine similarity of compressed to exact expert outputs",
            ["job", "layer"], registry=self.registry,
        )
        self.precision_amax = Gauge(
            "plait_precision_amax", "Quantized linears: the last step's largest |value| of x, w or dy, per module",
            ["job", "module", "tensor"], registry=self.registry)
        self.precision_overflow = Gauge(
            "plait_precision_overflow",
            "Quantized linears: the last step's fraction of x or dy elements beyond the format's largest value",
            ["job", "module", "tensor"], registry=self.registry)
        self.precision_underflow = Gauge(
            "plait_precision_underflow",
            "Quantized linears: the last step's fraction of non-zero x or dy elements quantized to zero",
            ["job", "module", "tensor"], registry=self.registry)
        self.job = job
        self._health = {"status": "starting", "step": 0}
        self._lock = threading.Lock()

    def set_health(self, **fields: object) -> None:
        with self._lock:
            self._health.update(fields)

    def health(self) -> dict[str, object]:
        with self._lock:
            return dict(self._health)


class MetricsServer:
    """A small HTTP server for ``/metrics`` (Prometheus text format) and ``/health`` (JSON)."""

    def __init__(self, metrics: TrainingMetrics, host: str, port: int):
        self.metrics = metrics
        handler = _make_handler(metrics)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="plait-metrics", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(metrics: TrainingMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
            elif path == "/health":
                self._reply(200, "application/json", json.dumps(metrics.health()).encode())
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics or /health\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("metrics: " + format, *args)

    return Handler


class MetricsHook(BaseHook):
    """Serves the training gauges while the job runs (rank 0)."""

    def __init__(self, config: MetricsConfig, *, job: str, flops_per_token: float, peak_flops_per_device: float, world: int):
        self.metrics = TrainingMetrics(job)
        self.server = MetricsServer(self.metrics, config.host, config.port)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops_per_device * world
        self.pace = Pace(1)

    def on_start(self, trainer: Trainer) -> None:
        self.pace = Pace(trainer.config.steps)
        self.server.start()
        self.metrics.steps_total.set(trainer.config.steps)
        self.metrics.set_health(status="training", step=trainer.step, steps=trainer.config.steps)
        print(f"plait: metrics at {self.server.url}/metrics (health: {self.server.url}/health)", flush=True)

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        self.pace.add(result)
        m = self.metrics
        m.step.set(result.step)
        m.loss.set(result.loss)
        m.step_seconds.set(result.seconds)
        m.tokens_per_s.set(self.pace.tokens_per_s or result.tokens / result.seconds)
        m.eta_seconds.set(self.pace.eta_seconds)
        m.grad_norm.set(result.grad_norm)
        m.lr.set(result.lr)
        if result.balance is not None:
            m.hdp_predicted.set(result.balance["predicted"])
            m.hdp_measured.set(result.balance["measured"])
        for gauge, values in ((m.lsh_ratio, result.lsh_ratio), (m.lsh_fidelity, result.lsh_fidelity)):
            for layer, value in enumerate(values or []):
                if value is not None:
                    gauge.labels(job=m.job, layer=str(layer)).set(value)
        for module, stats in (result.precision or {}).items():
            if "amax_x" not in stats:
                continue
            for tensor in ("x", "w", "dy"):
                m.precision_amax.labels(job=m.job, module=module, tensor=tensor).set(stats[f"amax_{tensor}"])
            for tensor in ("x", "dy"):
                m.precision_overflow.labels(job=m.job, module=module, tensor=tensor).set(stats[f"overflow_{tensor}"])
                m.precision_underflow.labels(job=m.job, module=module, tensor=tensor).set(stats[f"underflow_{tensor}"])
        counts = trainer.engine.tokens_per_expert()
        if counts is not None:
            for layer, row in enumerate(counts.tolist()):
                for expert, n in enumerate(row):
                    m.tokens_per_expert.labels(job=m.job, layer=str(layer), expert=str(expert)).set(n)
        if self.peak_flops > 0:
            m.mfu.set(self.pace.tokens_per_s * self.flops_per_token / self.peak_flops)
        self.metrics.set_health(step=result.step, loss=result.loss)

    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None:
        self.metrics.eval_loss.set(loss)

    def on_end(self, trainer: Trainer) -> None:
        self.metrics.set_health(status="finished", step=trainer.step)
        self.server.stop()
