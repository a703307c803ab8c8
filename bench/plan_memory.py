"""Predicted vs measured peak tensor memory per rank, for layouts of the demo model on the CPU.

Each layout is a real ``plait train`` run (4 processes, the demo config, a few steps)
with ``metrics.memory=true``: every rank's peak of live CPU tensor bytes over its steps
(c10's allocator, counted exactly; :mod:`plait.runtime.memtrack`). The prediction is the
planner's :func:`~plait.scheduler.memory.rank_memory` for the rank's pipeline stage. The
target is every rank within ±15 %; ``error`` is predicted / measured − 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

NAME = "plan_memory"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
TARGET = 0.15

LAYOUTS: list[tuple[str, list[str]]] = [
    ("dp4", []),
    ("tp2 dp2", ["parallel.tp=2"]),
    ("pp2 dp2 (1f1b)", ["parallel.pp=2"]),
    ("pp2 vpp2 dp2 (interleaved)", ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved"]),
    ("pp4 (1f1b)", ["parallel.pp=4", "train.micro_batch=4"]),
    ("cp2 dp2", ["parallel.cp=2"]),
    ("dp4 / ep4", ["parallel.ep=4"]),
    ("tp2 dp2 / ep4", ["parallel.tp=2", "parallel.ep=4"]),
    ("cp2 dp2 / ep2 etp2", ["parallel.cp=2", "parallel.ep=2", "parallel.etp=2"]),
    ("dp4 mb2", ["train.micro_batch=2"]),
]


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _predict(summary: dict[str, Any], sets: list[str]) -> list[dict[str, Any]]:
    from plait.runtime.config import load_config, model_spec
    from plait.scheduler.comm_volume import Layout
    from plait.scheduler.dims import DENSE_AXES, MeshAxis, ParallelDims
    from plait.scheduler.memory import rank_memory

    cfg = load_config(REPO_CONFIG, sets, nproc=summary["world_size"])
    p = summary["parallel"]
    lay = Layout(world=summary["world_size"], pp=p["pp"], dp=p["dp"], cp=p["cp"], tp=p["tp"], edp=p["edp"],
                 ep=p["ep"], etp=p["etp"], vpp=p["vpp"])
    per_pp = rank_memory(model_spec(cfg.model), lay, global_batch=cfg.train.global_batch,
                         micro_batch=cfg.train.micro_batch, stage_layers=cfg.parallel.pp_layers,
                         act_bytes=2 if cfg.train.dtype == "bfloat16" else 4)
    dims = ParallelDims(world=lay.world, pp=lay.pp, dp=lay.dp, cp=lay.cp, tp=lay.tp, edp=lay.edp, ep=lay.ep,
                        etp=lay.etp)
    return [per_pp[dims.coordinates(r, DENSE_AXES)[MeshAxis.PP]].as_dict() for r in range(lay.world)]


def run(quick: bool = False) -> dict[str, Any]:
    steps = 3
    layouts = LAYOUTS[:2] if quick else LAYOUTS
    rows = []
    with tempfile.TemporaryDirectory(prefix="plait-bench-plan-memory-") as tmp:
        for name, sets in layouts:
            run_dir = Path(tmp) / _slug(name)
            sets = [*sets, f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1",
                    "metrics.enabled=false", "metrics.memory=true"]
            cmd = [sys.executable, "-m", "plait.runtime.cli", "train", "--config", str(REPO_CONFIG), "--nproc", "4",
                   "--run-dir", str(run_dir), "--set", *sets]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            summary = json.loads((run_dir / "summary.json").read_text())
            measured = summary["memory"]["peak_bytes"]
            predicted = _predict(summary, sets)
            errors = [pred["peak"] / meas - 1 for pred, meas in zip(predicted, measured, strict=True)]
            worst = max(errors, key=abs)
            rows.append({"layout": name, "parallel": summary["parallel"], "measured_peak_bytes": measured,
                         "predicted_peak_bytes": [p["peak"] for p in predicted], "predicted_terms": predicted,
                         "error": [round(e, 4) for e in errors], "worst_error": round(worst, 4),
                         "within_target": all(abs(e) <= TARGET for e in errors)})
            print(f"plan_memory: {name:28s} measured " + " ".join(f"{m / 2**20:6.1f}" for m in measured)
                  + " MiB  predicted " + " ".join(f"{p['peak'] / 2**20:6.1f}" for p in predicted)
                  + f" MiB  worst {worst:+.1%}", flush=True)
    return {
        "config": str(REPO_CONFIG.name), "steps": steps, "target": TARGET, "rows": rows,
        "layouts_within_target": sum(r["within_target"] for r in rows), "layouts": len(rows),
        "mean_abs_error": round(sum(abs(e) for r in rows for e in r["error"]) / sum(len(r["error"]) for r in rows), 4),
    }
