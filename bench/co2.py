"""CO2 against synchronous data parallelism: held-out loss over the demo run, and throughput on a slow dp link.

**Quality** (4 processes, loopback). ``plait train`` of the demo config (a MoE model, dp = 4: each replica
trains on 8 of the step's 32 sequences), 300 steps (``--quick``: 20), held-out loss every 50 steps
(``--quick``: 10), with ``parallel.dp_mode`` ``sync``; ``co2`` at ``parallel.co2.tau`` = TAU with the other
CO2 settings at their defaults (outer lr 1, outer momentum 0.5, staleness gap penalty on); the same with a
plain outer step (momentum 0, no penalty), to show what those two do here; and co2 at τ = 1, where each
round is one step, to separate what local AdamW costs from what the rounds cost. Target: co2's final
held-out loss within 2 % of sync's; every curve reported.

**Speed** (needs root: ``plait train --cluster``). Two nodes of two workers (the same dp = 4 job: every dp
all-reduce crosses the link between the nodes), shaped at a fixed scale of 0.01 (the LSH benchmark's):
*tcp80* is the CO2 paper's 80 Gbit/s TCP/IP (800 Mbit/s shaped, a 1 Gbit/s-class link), *eth10* a
10 Gbit/s Ethernet (100 Mbit/s shaped). On each, sync and co2 run 16 steps (``--quick``: 8); and sync runs
on loopback, unshaped, the reference. Interleaved over 2 rounds (``--quick``: 1). Throughput is tokens
over the summed step times after the first 4 steps (whole rounds of TAU: a round's end pays what is left of
the all-reduce, so a median would hide it). Target: co2 on tcp80 ≥ 90 % of sync on unshaped links. That
ratio flatters co2 on these machines: its local steps skip the per-step gradient collectives, which cost CPU
here, so co2 also runs on loopback, and co2 on a link against co2 unshaped is the like-for-like measure of how
much of the link's cost the overlap hides.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from plait.bench.lsh import cluster_file, train as _train

NAME = "co2"
DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
TAU = 4
SCALE = 0.01
LINKS = {"tcp80": 80, "eth10": 10}  # described Gbit/s
WARMUP = 4


def _co2(tau: int) -> list[str]:
    return ["parallel.dp_mode=co2", f"parallel.co2.tau={tau}"]


def quality(work: Path, quick: bool) -> dict:
    steps, every = (20, 10) if quick else (300, 50)
    base = [f"train.steps={steps}", f"train.eval_every={every}"]
    plain = ["parallel.co2.outer_momentum=0", "parallel.co2.gap_penalty=false"]
    runs = {"sync": _train(work, "quality-sync", base),
            f"co2_tau{TAU}": _train(work, f"quality-co2-{TAU}", [*base, *_co2(TAU)]),
            f"co2_tau{TAU}_plain_outer_step": _train(work, f"quality-co2-{TAU}-plain", [*base, *_co2(TAU), *plain]),
            "co2_tau1": _train(work, "quality-co2-1", [*base, *_co2(1)])}
    sync = runs["sync"]["eval_loss"]
    out: dict[str, Any] = {"steps": steps, "tau": TAU, "eval_loss": {k: r["eval_loss"] for k, r in runs.items()},
                           "eval_gap": {k: (r["eval_loss"] - sync) / sync for k, r in runs.items() if k != "sync"},
                           "curve": {k: r["eval_losses"] for k, r in runs.items()},
                           "train_loss_last10": {k: sum(r["losses"][-10:]) / 10 for k, r in runs.items()}}
    print(f"co2 quality: {steps} steps, held-out loss " + ", ".join(
        f"{k} {v:.4f}" for k, v in out["eval_loss"].items()) + "; gaps " + ", ".join(
        f"{k} {100 * v:+.2f} %" for k, v in out["eval_gap"].items()), flush=True)
    return out


def _cluster_file(work: Path, name: str) -> Path:
    return cluster_file(work, f"co2-{name}", name, LINKS[name], SCALE)


def _throughput(summary: dict, tokens_per_step: int) -> float:
    times = summary["step_times"][WARMUP:]
    return tokens_per_step * len(times) / sum(times)


def speed(work: Path, quick: bool) -> dict:
    from plait.runtime.rehearsal.namespaces import require_root

    require_root()
    demo = yaml.safe_load(DEMO.read_text())
    tokens = demo["train"]["global_batch"] * demo["model"]["seq_len"]
    steps, rounds = (WARMUP + TAU, 1) if quick else (WARMUP + 3 * TAU, 2)
    files = {name: _cluster_file(work, name) for name in LINKS}
    base = [f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1"]
    cases = [("sync", "unshaped", None), ("co2", "unshaped", None)] + [(mode, link, files[link]) for link in LINKS
                                                                        for mode in ("sync", "co2")]
    rates: dict[str, list[float]] = {f"{mode}@{link}": [] for mode, link, _ in cases}
    for r in range(rounds):
        for mode, link, cluster in cases:
            sets = [*base, *(_co2(TAU) if mode == "co2" else [])]
            summary = _train(work, f"speed-{mode}-{link}-{r}", sets, cluster=cluster)
            rates[f"{mode}@{link}"].append(_throughput(summary, tokens))
            print(f"co2 speed: {mode} on {link} round {r + 1}: {rates[f'{mode}@{link}'][-1]:,.0f} tokens/s", flush=True)
    best = {k: max(v) for k, v in rates.items()}
    reference = best["sync@unshaped"]
    out: dict[str, Any] = {"scale": SCALE, "tau": TAU, "steps": steps, "rounds": rounds, "tokens_per_s_runs": rates,
                           "tokens_per_s": best, "links": {}}
    for link, gbit in LINKS.items():
        out["links"][link] = {
            "described_gbit": gbit, "shaped_mbit": gbit * SCALE * 1e3,
            "sync_vs_unshaped": best[f"sync@{link}"] / reference, "co2_vs_unshaped": best[f"co2@{link}"] / reference,
            "co2_vs_sync_same_link": best[f"co2@{link}"] / best[f"sync@{link}"],
            # like for like: co2 on this link against co2 unshaped (1 when the link's cost is all hidden)
            "co2_vs_co2_unshaped": best[f"co2@{link}"] / best["co2@unshaped"],
        }
        print(f"co2 speed: {link} ({gbit * SCALE * 1e3:.0f} Mbit/s): sync {100 * out['links'][link]['sync_vs_unshaped']:.0f} %, "
              f"co2 {100 * out['links'][link]['co2_vs_unshaped']:.0f} % of sync on unshaped links; co2 "
              f"{100 * out['links'][link]['co2_vs_co2_unshaped']:.0f} % of co2 unshaped", flush=True)
    return out


def run(quick: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="plait-bench-co2-") as tmp:
        work = Path(tmp)
        result["quality"] = quality(work, quick)
        if os.geteuid() == 0:
            result["speed"] = speed(work, quick)
        else:
            result["speed"] = {"skipped": "needs root (network namespaces and tc)"}
    q, s = result["quality"], result["speed"]
    result["targets"] = {
        "eval_within_2pct": abs(q["eval_gap"][f"co2_tau{TAU}"]) <= 0.02,
        "tcp80_co2_ge_90pct_of_unshaped_sync": s["links"]["tcp80"]["co2_vs_unshaped"] >= 0.9 if "links" in s else None,
    }
    print(f"co2: targets {result['targets']}", flush=True)
    return result
