"""The expert all-to-all overlapped with expert computation (``parallel.ep_overlap``) on a rehearsed slow link.

Needs root (``plait train --cluster``). Two nodes of two workers, the demo's MoE model with experts over all
four ranks (``parallel.ep=4``), so every ep exchange crosses the link between the nodes; both nodes on one NIC
class shaped at a fixed scale of 0.01 (the LSH benchmark's): *slow* is 25 Gbit/s Ethernet (250 Mbit/s shaped),
where the exchanges are about half the step, and *fast* 400 Gbit/s InfiniBand (4 Gbit/s shaped). On each,
``ep_overlap`` off and on run 14 steps (``--quick``: 8), interleaved over 3 rounds (``--quick``: 1); a run's
step time is the median after the first 4 steps, and each side's the median over rounds. Reported: the
speed-up off/on per link, and the share of the step the exchanges take (slow minus fast, off). Without root the
benchmark says so and measures nothing.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from plait.bench.lsh import CLUSTERS, SCALE, WARMUP, _cluster_file, train

NAME = "ep_overlap"


def run(quick: bool = False) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces and tc)"}
    from plait.runtime.rehearsal.namespaces import require_root

    require_root()
    steps, rounds = (8, 1) if quick else (14, 3)
    times: dict[str, dict[str, list[float]]] = {c: {"off": [], "on": []} for c in CLUSTERS}
    with tempfile.TemporaryDirectory(prefix="plait-bench-ep-overlap-") as tmp:
        work = Path(tmp)
        files = {name: _cluster_file(work, name) for name in CLUSTERS}
        for r in range(rounds):
            for cluster in CLUSTERS:
                for mode in ("off", "on"):
                    summary = train(work, f"{cluster}-{mode}-{r}", [f"train.steps={steps}", "train.eval_every=0",
                                     "train.eval_batches=1", "parallel.ep=4",
                                     f"parallel.ep_overlap={'true' if mode == 'on' else 'false'}"], cluster=files[cluster])
                    times[cluster][mode].append(statistics.median(summary["step_times"][WARMUP:]))
                    print(f"ep_overlap: {cluster} {mode} round {r + 1}: {times[cluster][mode][-1]:.3f} s/step", flush=True)
    out: dict[str, Any] = {"scale": SCALE, "steps": steps, "rounds": rounds, "step_s_runs": times, "clusters": {}}
    for cluster, (nic, gbit) in CLUSTERS.items():
        step = {m: statistics.median(v) for m, v in times[cluster].items()}
        out["clusters"][cluster] = {"nic": nic, "described_gbit": gbit, "shaped_mbit": gbit * SCALE * 1e3,
                                    "step_s": step, "speedup": step["off"] / step["on"]}
        print(f"ep_overlap: {cluster} ({gbit * SCALE * 1e3:.0f} Mbit/s): off {step['off']:.3f} s, on {step['on']:.3f} s "
              f"({step['off'] / step['on']:.3f}×)", flush=True)
    slow, fast = out["clusters"]["slow"]["step_s"], out["clusters"]["fast"]["step_s"]
    out["exchange_share_slow_off"] = (slow["off"] - fast["off"]) / slow["off"]
    return out
