"""``parallel.dp_mode=co2`` through ``plait train``: a worker killed mid-round is restored from memory exactly.

The snapshot holds the outer state (round start, previous start, momentum, this rank's contribution to the
parameter all-reduce in flight); the restored ranks start that all-reduce again, so the run continues bitwise
as if nothing happened. Real processes, a real ``kill -9`` (the fault injector's kill-worker).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from test_snapshot_faults import _same
from test_snapshot_recovery import _run

# Rounds of 4 steps end at 4, 8, 12; snapshots every 2 steps: step 6's is in the middle of round 1, with round
# 0's all-reduce still in flight.
CO2_JOB = """
model: {kind: moe, layers: 2, dim: 64, heads: 4, ffn_dim: 128, vocab: 256, seq_len: 64, experts: 4, top_k: 2}
train: {steps: 12, global_batch: 6, micro_batch: 3, lr: 3.0e-3, warmup_steps: 3, seed: 11, eval_every: 6, eval_batches: 1}
data: {max_bytes: 2000000}
metrics: {enabled: false}
snapshot: {every: 2}
parallel: {dp_mode: co2, co2: {tau: 4, clip: 0.01}}
"""


def test_a_worker_killed_mid_round_is_restored_exactly(tmp_path: Path):
    config = tmp_path / "co2.yaml"
    config.write_text(CO2_JOB)
    # the reference and the faulted run side by side (the fault is placed by step, not by time)
    with ThreadPoolExecutor(2) as pool:
        base = pool.submit(_run, config, tmp_path / "base", "--nproc", "2")
        faulted = pool.submit(_run, config, tmp_path / "run", "--nproc", "2", "--fault", "kill-worker:rank=1:step=7")
        (baseline, _), (summary, output) = base.result(), faulted.result()
    assert baseline["recoveries"] == []
    _same(summary, baseline)
    (rec,) = summary["recoveries"]
    assert rec["source"] == "memory" and rec["step"] in (4, 6), rec
