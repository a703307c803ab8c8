"""plait.runtime.memtrack: exact peak tensor memory, in one process and per rank of a real ``plait train``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from plait.runtime.config import load_config
from plait.runtime.memtrack import CPU_METHOD, CpuMemoryTracker, Measurement
from plait.runtime.models import build_model

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
MiB = 1 << 20


def test_a_window_peaks_at_its_live_bytes_plus_exactly_what_it_allocated():
    tracker = CpuMemoryTracker()
    held = torch.empty(MiB, dtype=torch.uint8)  # alive through the window: part of the absolute peak
    before = torch.empty(16 * MiB, dtype=torch.uint8)
    del before  # freed before the window: not counted
    live = tracker.live_bytes()
    with Measurement(tracker) as m:
        a = torch.empty(2 * MiB, dtype=torch.uint8)
        b = torch.empty(MiB, dtype=torch.uint8)  # 3 MiB alive
        del b  # 2 MiB
        c = torch.empty(2 * MiB, dtype=torch.uint8)  # 4 MiB: the peak
        del a, c
    assert m.window.start_bytes == live >= held.nbytes
    assert m.window.peak_bytes == live + 4 * MiB


def test_views_cost_nothing_and_a_shared_storage_counts_once():
    tracker = CpuMemoryTracker()
    with Measurement(tracker) as m:
        x = torch.empty(MiB // 4)  # 1 MiB of float32
        views = [x[1:], x.view(2, -1), x.unsqueeze(0)]
        del views, x
    assert m.window.peak_bytes - m.window.start_bytes == MiB


def test_a_backward_pass_counts_its_saved_activations_and_gradients():
    """y = relu(x @ w).sum(); y.backward(), with only w requiring a gradient (x: n×k, w: k×m, fp32).

    By hand: the forward holds h = x@w (4nm) while relu writes r (4nm), which it saves
    for its backward; h dies when relu returns and y (4 bytes) stays. The backward seeds
    a gradient of ones (4 bytes), expands it (a view), and threshold_backward writes G
    (4nm) while r is still saved; r is released once that node ran, then x.t() @ G
    (4km) becomes w.grad. So the peak is r + G + y + seed = 8nm + 8 bytes (k ≪ n keeps
    the last phase, 4nm + 4km + 8, below it).
    """
    n, k, m = 1024, 16, 256
    x = torch.randn(n, k)
    w = torch.randn(k, m, requires_grad=True)
    tracker = CpuMemoryTracker()
    with Measurement(tracker) as mt:
        y = (x @ w).relu().sum()
        y.backward()
    assert mt.window.peak_bytes - mt.window.start_bytes == 8 * n * m + 8
    assert w.grad is not None and w.grad.nbytes == 4 * k * m


def test_allocations_on_other_threads_are_counted():
    """The autograd engine, intra-op workers and gloo allocate on threads of their own."""
    import threading

    tracker = CpuMemoryTracker()
    kept: list[torch.Tensor] = []
    with Measurement(tracker) as m:
        worker = threading.Thread(target=lambda: kept.append(torch.empty(3 * MiB, dtype=torch.uint8)))
        worker.start()
        worker.join()
    assert m.window.peak_bytes - m.window.start_bytes == 3 * MiB


def test_fused_adamw_step_allocates_its_state_inside_the_window():
    p = torch.nn.Parameter(torch.randn(MiB // 4))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], fused=True)
    tracker = CpuMemoryTracker()
    with Measurement(tracker) as m:
        opt.step()  # the first step creates exp_avg and exp_avg_sq (1 MiB each) and a step counter
    grown = m.window.peak_bytes - m.window.start_bytes
    assert grown >= 2 * MiB  # at least its two moments; any temporaries of the fused kernel are counted on top


# ----------------------------------------------------------------------------- end to end


def plait(*args: str) -> list[str]:
    return [sys.executable, "-m", "plait.runtime.cli", *args]


def _train(run_dir: Path, *sets: str, steps: int) -> dict:
    args = ["train.steps=" + str(steps), "metrics.enabled=false", "train.eval_every=0", *sets]
    done = subprocess.run(plait("train", "--config", str(DEMO), "--nproc", "2", "--run-dir", str(run_dir), "--set", *args),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return _train(tmp_path_factory.mktemp("mem") / "on", "metrics.memory=true", steps=3)


class _OutputBytes(TorchDispatchMode):
    """Bytes of every storage an op creates (outputs that are not views of or in place on an input)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.total += t.untyped_storage().nbytes()
        return out


def _micro_batch_output_bytes(config) -> int:
    """Every byte one micro-batch's forward and backward create, as if none were ever freed (one process)."""
    torch.manual_seed(0)
    model = build_model(config.model)
    m, T = config.train.micro_batch, config.model.seq_len
    tokens = torch.randint(0, config.model.vocab, (m, T + 1))
    with _OutputBytes() as counted:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
        (loss + model.cfg.aux_loss_coef * model.aux_loss()).backward()
    return counted.total


def test_every_rank_reports_a_peak_between_its_state_and_everything_a_step_could_hold(measured):
    """Lower bound: at the optimizer step, the parameters (4P), their gradients (4P), the owned
    shards (4·P/2: dp = 2 and ep = 1 at two ranks, so every rank holds all P parameters and
    owns half of each bucket) and AdamW's two moments of them (8·P/2) are alive at once.

    Upper bound, never reached: that state plus the optimizer step's transients all alive
    at once — flat gradient buckets (4P), their reduce-scattered halves (2P), the float64
    copy and square for the norm (4P + 4P), the all-gathered buckets and gloo's flat receive
    buffer (4P + 4P) — plus every byte one micro-batch's forward and backward create, as if
    nothing were freed (micro-batches run one after the other, gradients accumulate in
    place), plus the step's global batch of token ids (inputs and targets, int64). Padding
    adds at most one element per bucket and tensor: 8 buckets of slack cover it.
    """
    memory = measured["memory"]
    config = load_config(DEMO, ["train.steps=3"], nproc=2)
    P = measured["params"]["total"]
    assert measured["parallel"]["dp"] == 2 and measured["parallel"]["ep"] == 1
    assert memory["method"] == CPU_METHOD and memory["steps"] == [2, 3]
    lower = 4 * P + 4 * P + 4 * (P // 2) + 8 * (P // 2)
    P_padded = P + 8
    state = 4 * P_padded + 4 * P_padded + 2 * P_padded + 4 * P_padded
    transients = 4 * P_padded + 2 * P_padded + 4 * P_padded + 4 * P_padded + 4 * P_padded + 4 * P_padded
    batch = 2 * config.train.global_batch * config.model.seq_len * 8
    upper = state + transients + batch + _micro_batch_output_bytes(config)
    assert len(memory["peak_bytes"]) == 2
    for rank, peak in enumerate(memory["peak_bytes"]):
        assert lower <= peak < upper, (rank, lower, peak, upper)

