"""Low-precision recipe options: NVFP4 16x16 weight tiles and the round-up MX scale, each against the recipe without it.

The demo model under ``plait train`` (4 processes, 300 steps; ``--quick``: 20), default
policy, held-out loss every 50 steps, as in ``plait bench precision``. Pairs, each run
with and without the option on the same data and seed:

- ``nvfp4`` with ``precision.weight_tiles`` (W and Wᵀ scaled per 16×16 tile, so the
  forward and the dgrad GEMMs see the same quantized weights: the NVFP4 paper's 2-D
  weight scaling) against 1×16 blocks. The tiled run is an ``--ab fp32`` run whose
  reference is the fp32 curve every run here is compared with (training is deterministic,
  so a separate fp32 run gives the same losses bit for bit);
- ``mxfp8`` and ``mxfp4`` with ``precision.mx_scale=up`` (Mishra et al. 2025: the
  smallest power-of-two scale that saturates nothing) against OCP's floor rule.

Reported per run: held-out loss and its gap to fp32, the curve, the peak overflow and
underflow fractions, and step time. The issue's nvfp4 target is a gap ≤ 3 %.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from plait.bench.precision import _overflow_peak, _train

NAME = "precision_options"
PAIRS = [
    ("nvfp4", "precision.weight_tiles", "true", "false"),
    ("mxfp8", "precision.mx_scale", "up", "floor"),
    ("mxfp4", "precision.mx_scale", "up", "floor"),
]


def _row(summary: dict, reference: float) -> dict:
    return {
        "eval_loss": summary["eval_loss"],
        "eval_gap": (summary["eval_loss"] - reference) / reference,
        "curve": summary["eval_losses"],
        "peak": _overflow_peak(summary),
        "step_s": summary["step_seconds"],
    }


def run(quick: bool = False) -> dict[str, Any]:
    steps, every = (20, 10) if quick else (300, 50)
    base = [f"train.steps={steps}", f"train.eval_every={every}"]
    with tempfile.TemporaryDirectory(prefix="plait-precision-options-") as tmp:
        work = Path(tmp)
        first = _train(work, "nvfp4-weight_tiles-true", [*base, "precision.recipe=nvfp4", "precision.weight_tiles=true"],
                       ["--ab", "fp32"])
        reference = {e["step"]: e["reference"] for e in first["ab"]["eval"]}[steps]
        result: dict[str, Any] = {"steps": steps, "reference": {"recipe": "fp32", "eval_loss": reference}, "pairs": []}
        for recipe, key, on, off in PAIRS:
            runs = {}
            for value in (on, off):
                label = f"{recipe}-{key.split('.')[-1]}-{value}"
                summary = first if label == "nvfp4-weight_tiles-true" else _train(
                    work, label, [*base, f"precision.recipe={recipe}", f"{key}={value}"])
                runs[value] = _row(summary, reference)
            pair = {"recipe": recipe, "option": key, "on": on, "off": off, "runs": runs,
                    "gap_change": runs[on]["eval_gap"] - runs[off]["eval_gap"]}
            result["pairs"].append(pair)
            print(f"precision_options: {recipe} {key}={on}: gap {runs[on]['eval_gap']:+.2%} against {off}: "
                  f"{runs[off]['eval_gap']:+.2%}", flush=True)
    return result
