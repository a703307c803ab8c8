"""Tokens/s of the demo model under `plait train` vs a hand-written PyTorch DDP loop, 1/2/4 processes.

The goal's peer is plain DDP (replicated AdamW): its like-for-like in plait is
``parallel.zero=false`` (gradients all-reduced from the backward pass, AdamW on every rank), the
headline ``ratio``. plait's default, ZeRO-1 (``parallel.zero=true``), runs beside it against both DDP
(``ratio_zero1_vs_ddp``: different work, labelled so) and, at 2 and 4 processes, its own like-for-like
peer: the same DDP loop with torch's ``ZeroRedundancyOptimizer`` (each rank updates its share of the
parameters, then broadcasts): ``ratio_vs_ddp_zero1``.

Both sides run the same config (model, global batch, micro-batch, AdamW, clipping,
threads per worker) in the same invocation, alternating, for several rounds. A step's
time is the wall clock from the previous step's end to its own on both sides, so
plait's hooks, metrics server and loss all-reduce count against it. A run's throughput
is tokens per step over its median step time (steps 2..N; robust to the stalls a shared
2-core machine has), and each side's figure is the median over rounds. At 2 and 4 processes
plait (replicated) also runs with gradient pieces of 1 and 4 MiB and with the overlap off (rounds − 1 each).
"""

from __future__ import annotations

import json
from statistics import median
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

NAME = "overhead"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
GOAL_MAX_OVERHEAD = 0.10
PIECES_MB = (1, 4)  # gradient piece sizes measured beside the default (parallel.bucket_mb)
REPLICATED = ("parallel.zero=false",)


def _plait(config: Path, nproc: int, steps: int, work: Path, sets: tuple[str, ...] = ()) -> float:
    run_dir = work / f"plait-{nproc}-{len(list(work.iterdir()))}"
    cmd = [sys.executable, "-m", "plait.runtime.cli", "train", "--config", str(config), "--nproc", str(nproc),
           "--run-dir", str(run_dir), "--set", f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1",
           *sets]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["tokens"] / summary["steps"] / median(summary["step_times"][1:])


def _baseline(config: Path, nproc: int, steps: int, work: Path, zero: bool = False) -> float:
    out = work / f"baseline-{nproc}-{len(list(work.iterdir()))}.json"
    script = Path(__file__).resolve().parent / "ddp_baseline.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), str(config), str(steps), str(out), *(["--zero"] if zero else [])]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    return result["tokens_per_step"] / median(result["step_times"])


def run(quick: bool = False) -> dict[str, Any]:
    nprocs = (2,) if quick else (1, 2, 4)  # --quick: a smoke test of both peers and plait, not a measurement
    steps = 4 if quick else 30
    rounds = 1 if quick else 3
    rows = []
    with tempfile.TemporaryDirectory(prefix="plait-bench-") as tmp:
        work = Path(tmp)
        config = work / "demo.yaml"
        config.write_text(REPO_CONFIG.read_text())
        cfg = yaml.safe_load(config.read_text())
        for nproc in nprocs:
            plait_runs, zero1_runs, base_runs, zero_runs = [], [], [], []
            for _ in range(rounds):
                base_runs.append(_baseline(config, nproc, steps, work))
                if nproc > 1:
                    zero_runs.append(_baseline(config, nproc, steps, work, zero=True))
                plait_runs.append(_plait(config, nproc, steps, work, REPLICATED))
                if not quick:  # --quick: plait's default path is the one every other test runs
                    zero1_runs.append(_plait(config, nproc, steps, work))
            plait_tps = median(plait_runs)
            zero1_tps = median(zero1_runs) if zero1_runs else None
            ddp_tps = median(base_runs)
            ratio = plait_tps / ddp_tps
            rows.append({
                "nproc": nproc,
                "plait_tokens_per_s": round(plait_tps, 1),  # parallel.zero=false, like DDP
                "ddp_tokens_per_s": round(ddp_tps, 1),
                "ratio": round(ratio, 4),
                "overhead": round(1 - ratio, 4),
                "plait_rounds": [round(r, 1) for r in plait_runs],
                "ddp_rounds": [round(r, 1) for r in base_runs],
            })
            print(f"overhead: nproc={nproc} plait (zero=false) {plait_tps:,.0f} tok/s, DDP {ddp_tps:,.0f} tok/s, ratio "
                  f"{ratio:.3f}", flush=True)
            if zero1_tps is not None:
                rows[-1].update({"plait_zero1_tokens_per_s": round(zero1_tps, 1),  # the default, parallel.zero=true
                                 "ratio_zero1_vs_ddp": round(zero1_tps / ddp_tps, 4),
                                 "plait_zero1_rounds": [round(r, 1) for r in zero1_runs]})
                print(f"overhead: nproc={nproc} plait ZeRO-1 {zero1_tps:,.0f} tok/s ({zero1_tps / ddp_tps:.3f} of DDP)",
                      flush=True)
            if zero_runs:  # ZeRO-1's like-for-like peer: DDP's all-reduce with torch's ZeRO-1 AdamW
                zero_tps = median(zero_runs)
                rows[-1].update({"ddp_zero1_tokens_per_s": round(zero_tps, 1),
                                 "ddp_zero1_rounds": [round(r, 1) for r in zero_runs]})
                if zero1_tps is not None:
                    rows[-1]["ratio_vs_ddp_zero1"] = round(zero1_tps / zero_tps, 4)
                print(f"overhead: nproc={nproc} DDP + ZeroRedundancyOptimizer {zero_tps:,.0f} tok/s", flush=True)
            # The gradient pieces' size (parallel.bucket_mb; the rows above run the default, whole buckets of this
            # model): smaller pieces start earlier in the backward pass but each is a round of its own.
            if nproc > 1 and not quick:  # --quick: the peers only (the sweep is more plait runs of the same path)
                sweep = {}
                for mb in PIECES_MB:
                    sweep[str(mb)] = [round(_plait(config, nproc, steps, work, (*REPLICATED, f"parallel.bucket_mb={mb}")), 1)
                                      for _ in range(max(1, rounds - 1))]
                sweep["overlap_off"] = [round(_plait(config, nproc, steps, work, (*REPLICATED, "parallel.grad_overlap=false")),
                                              1) for _ in range(max(1, rounds - 1))]
                rows[-1]["bucket_mb_tokens_per_s"] = sweep
                print(f"overhead: nproc={nproc} plait tok/s by bucket_mb: " + ", ".join(
                    f"{k} {median(v):,.0f}" for k, v in sweep.items()), flush=True)
    worst = max(r["overhead"] for r in rows)
    return {
        "config": cfg,
        "steps": steps,
        "rounds": rounds,
        "rows": rows,
        "worst_overhead": worst,
        "goal_max_overhead": GOAL_MAX_OVERHEAD,
        "meets_goal": worst <= GOAL_MAX_OVERHEAD,
    }
