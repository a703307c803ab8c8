"""Step time and communication per layout of the demo model on the CPU, against data parallel only.

Each layout is a real ``plait train`` run (4 processes, the demo config) of a few steps.
From its ``summary.json`` the benchmark takes the median step time (steps 2..N) and the
ledger of the last step (bytes per mesh axis, summed over ranks), and compares the
ledger with the closed-form volumes of :mod:`plait.scheduler.comm_volume`: they must
agree exactly (``ledger_matches``). Step times on a 2-core machine measure the cost of
the extra collectives and of smaller per-rank matrices, not the speed-ups these
layouts give on GPUs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

import yaml

NAME = "parallel"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

LAYOUTS: list[tuple[str, int, list[str]]] = [
    ("dp4", 4, []),
    ("tp2 dp2", 4, ["parallel.tp=2"]),
    ("pp2 dp2 (1f1b)", 4, ["parallel.pp=2"]),
    ("pp2 vpp2 dp2 (interleaved)", 4, ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved"]),
    ("cp2 dp2", 4, ["parallel.cp=2"]),
    ("dp4 / ep4", 4, ["parallel.ep=4"]),
    ("tp2 dp2 / ep4", 4, ["parallel.tp=2", "parallel.ep=4"]),
    ("cp2 dp2 / ep2 etp2", 4, ["parallel.cp=2", "parallel.ep=2", "parallel.etp=2"]),
]
# --quick: one run whose ledger has tp and pp traffic (a smoke test of the whole path, not a measurement)
QUICK_LAYOUTS: list[tuple[str, int, list[str]]] = [("pp2 tp2", 4, ["parallel.pp=2", "parallel.tp=2"])]


def _run(work: Path, name: str, nproc: int, sets: list[str], steps: int) -> dict[str, Any]:
    run_dir = work / name.replace(" ", "_").replace("/", "").replace("(", "").replace(")", "")
    cmd = [sys.executable, "-m", "plait.runtime.cli", "train", "--config", str(REPO_CONFIG), "--nproc", str(nproc),
           "--run-dir", str(run_dir), "--set", f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1",
           "metrics.enabled=false", *sets]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads((run_dir / "summary.json").read_text())


def _expected(summary: dict[str, Any], config: dict[str, Any]) -> dict[str, dict[str, int]]:
    from plait.runtime.config import load_config, model_spec
    from plait.scheduler.comm_volume import Layout, step_volume

    p = summary["parallel"]
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in _flatten(config)], nproc=summary["world_size"])
    layout = Layout(world=summary["world_size"], pp=p["pp"], dp=p["dp"], cp=p["cp"], tp=p["tp"], edp=p["edp"],
                    ep=p["ep"], etp=p["etp"], vpp=p["vpp"])
    return step_volume(model_spec(cfg.model), layout, global_batch=cfg.train.global_batch,
                       micro_batch=cfg.train.micro_batch, stage_layers=cfg.parallel.pp_layers,
                       control=cfg.control.enabled, tp_overlap=cfg.parallel.tp_overlap)


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def run(quick: bool = False) -> dict[str, Any]:
    steps = 3 if quick else 6
    layouts = QUICK_LAYOUTS if quick else LAYOUTS
    rows = []
    with tempfile.TemporaryDirectory(prefix="plait-bench-parallel-") as tmp:
        work = Path(tmp)
        base_time = None
        for name, nproc, sets in layouts:
            summary = _run(work, name, nproc, sets, steps)
            config = yaml.safe_load((work / name.replace(" ", "_").replace("/", "").replace("(", "").replace(")", "") / "config.yaml").read_text())
            step_s = median(summary["step_times"][1:])
            base_time = base_time or step_s
            measured = {a: {op: v["bytes"] for op, v in ops.items()} for a, ops in summary["ledger"]["last_step"].items()}
            expected = _expected(summary, config)
            rows.append({
                "layout": name,
                "nproc": nproc,
                "parallel": summary["parallel"],
                "step_s": round(step_s, 4),
                "step_time_vs_dp": round(step_s / base_time, 3),
                "bytes_per_axis": {a: sum(ops.values()) for a, ops in measured.items()},
                "ledger": measured,
                "closed_form": expected,
                "ledger_matches": measured == expected,
                "final_loss": summary["losses"][-1],
            })
            print(f"parallel: {name:28s} {step_s * 1e3:8.1f} ms/step ({step_s / base_time:.2f}× dp)  "
                  f"ledger {'=' if measured == expected else '≠'} closed form  "
                  + " ".join(f"{a}={sum(ops.values()) / 2**20:.2f}MiB" for a, ops in measured.items()), flush=True)
    return {
        "config": yaml.safe_load(REPO_CONFIG.read_text()),
        "steps": steps,
        "rows": rows,
        "all_ledgers_match": all(r["ledger_matches"] for r in rows),
    }
