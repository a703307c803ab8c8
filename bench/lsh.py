"""LSH-compressed expert all-to-all: the ops against their references, quality over a demo run, and step time on a rehearsed cluster.

**Ops** (one process). Exactness first: on random tokens the kernels' keys, centroids,
counts and indices equal the pure-PyTorch references' exactly. Then speed, each against
its reference (the same arithmetic as whole-tensor PyTorch ops, the like-for-like peer),
at the demo's shape (hidden 128, 6 hashes over 4 coordinates, 2,048 copies in 4 expert
segments) and a large one (hidden 1024, 32,768 tokens): ``lsh_hash`` tokens/s at one
thread (per core) and at all threads, ``bucket_reduce`` rows/s and GB/s (x read and
centroids written). Best of several runs.

**Quality** (4 processes, loopback). ``plait train`` of the demo config with experts over 4
ranks (``parallel.ep=4``), ``parallel.ep_compress`` ``none`` then ``lsh`` (defaults: 6 hashes
of 128 codes (dim 64), centred, no residual compensation), 300 steps (``--quick``: 20),
held-out loss every 50 steps: the curve, the final held-out loss of both (target: within
1 %), the compression ratio per layer (centroids / copies, mean over steps; target ≤ 25 %)
and the fidelity probe's cosine (every 50 steps). Then the trade-off: ``lsh`` with coarse
codes (dim 4: 8 per hash), which compresses more and loses more.

**Speed** (needs root: ``plait train --cluster``). Two nodes of two workers, experts over
all four ranks, so every ep group crosses the link between the nodes. Both nodes on one
NIC class, shaped at a fixed scale of 0.01: *slow* is 25 Gbit/s Ethernet (250 Mbit/s
shaped), where the uncompressed all-to-all is about half the step, as LSH-MoE measured on
common clusters; *fast* is 400 Gbit/s InfiniBand (4 Gbit/s shaped), where it is a small
part. Each of ``none``, ``lsh`` and ``auto`` runs 14 steps (``--quick``: 8) on each,
interleaved over 2 rounds (``--quick``: 1); ``step_s`` is the median step time after the
first 4 (auto measures and decides on step 1). Targets: on slow, ``none / lsh ≥ 1.3``; on
fast, ``auto`` within 5 % of the better of the two.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

NAME = "lsh"
REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"
SCALE = 0.01
CLUSTERS = {"slow": ("eth25", 25), "fast": ("ib400", 400)}
WARMUP = 4
RUN_TIMEOUT_S = 1800


def _best_s(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ----------------------------------------------------------------------------- ops


def _ops_case(width: int, rows: int, hashes: int, dim: int, segments: int, repeats: int, reference_rows: int) -> dict:
    import torch

    from plait.ops import bucket_reduce, bucket_reduce_reference, lsh_hash, lsh_hash_reference, lsh_signs

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen)
    # tokens that cluster, as hidden states do: a few hundred directions plus noise
    x = torch.randn(256, width, generator=gen)[torch.randint(0, 256, (rows,), generator=gen)] + 0.3 * x
    signs = lsh_signs(hashes, width, seed=0)
    seg = torch.full((segments,), rows // segments, dtype=torch.long)
    keys = lsh_hash(x, signs, dim)
    got, want = bucket_reduce(x, keys, seg), bucket_reduce_reference(x, lsh_hash_reference(x, signs, dim), seg)
    exact = bool(torch.equal(keys, lsh_hash_reference(x, signs, dim)) and all(torch.equal(a, b) for a, b in zip(got, want)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    head = x[:reference_rows]
    hash_one = _best_s(lambda: lsh_hash(x, signs, dim), repeats)
    hash_ref_one = _best_s(lambda: lsh_hash_reference(head, signs, dim), max(1, repeats // 2)) * rows / reference_rows
    reduce_one = _best_s(lambda: bucket_reduce(x, keys, seg), repeats)
    reduce_ref_one = _best_s(lambda: bucket_reduce_reference(x, keys, seg), max(1, repeats // 2))
    torch.set_num_threads(threads)
    hash_all = _best_s(lambda: lsh_hash(x, signs, dim), repeats)
    reduce_all = _best_s(lambda: bucket_reduce(x, keys, seg), repeats)
    moved = (rows + got.centroids.shape[0]) * width * 4
    out = {
        "width": width, "rows": rows, "hashes": hashes, "dim": dim, "segments": segments, "exact": exact,
        "centroids": got.centroids.shape[0], "threads": threads,
        "hash_tokens_per_s": {"kernel_1_thread": rows / hash_one, "reference_1_thread": rows / hash_ref_one,
                              f"kernel_{threads}_threads": rows / hash_all},
        "hash_vs_reference_1_thread": hash_ref_one / hash_one,
        "reduce_rows_per_s": {"kernel_1_thread": rows / reduce_one, "reference_1_thread": rows / reduce_ref_one,
                              f"kernel_{threads}_threads": rows / reduce_all},
        "reduce_vs_reference_1_thread": reduce_ref_one / reduce_one,
        "reduce_gbps_1_thread": moved / reduce_one / 1e9,
    }
    print(f"lsh ops: d={width} rows={rows}: exact={exact}; hash {rows / hash_one:,.0f} tokens/s per core "
          f"({out['hash_vs_reference_1_thread']:.1f}× reference); reduce {rows / reduce_one:,.0f} rows/s per core "
          f"({out['reduce_vs_reference_1_thread']:.1f}× reference, {out['reduce_gbps_1_thread']:.2f} GB/s)", flush=True)
    return out


def ops(quick: bool) -> list[dict]:
    return [_ops_case(128, 2048, 6, 4, 4, 3 if quick else 10, 2048),
            _ops_case(1024, 4096 if quick else 32768, 6, 4, 64, 2 if quick else 5, 1024)]


# ----------------------------------------------------------------------------- training runs


def train(work: Path, label: str, sets: list[str], cluster: Path | None = None) -> dict:
    """``plait train`` of the demo config with ``--set sets``, on 4 local processes or the rehearsed ``cluster``;
    its summary. (The other rehearsal benchmarks run theirs through this too.)"""
    run_dir = work / label
    cmd = [sys.executable, "-m", "plait.runtime.cli", "train", "--config", str(DEMO), "--run-dir", str(run_dir)]
    cmd += ["--cluster", str(cluster)] if cluster is not None else ["--nproc", "4"]
    out = subprocess.run([*cmd, "--set", *sets], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"{label}: plait train exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def _layer_means(summary: dict) -> list[float]:
    rows = [e["ratio"] for e in summary["lsh"]]
    return [statistics.fmean(r[i] for r in rows) for i in range(len(rows[0]))]


def quality(work: Path, quick: bool) -> dict:
    steps = 20 if quick else 300
    every = 10 if quick else 50
    base = [f"train.steps={steps}", f"train.eval_every={every}", "parallel.ep=4", f"parallel.lsh.probe_every={every}"]
    runs = {mode: train(work, f"quality-{mode}", [*base, f"parallel.ep_compress={mode}"]) for mode in ("none", "lsh")}
    # the trade-off: coarser codes (8 per hash instead of 128) compress more and lose more
    coarse = train(work, "quality-lsh-dim4", [*base, "parallel.ep_compress=lsh", "parallel.lsh.dim=4"])
    none, lsh = runs["none"], runs["lsh"]
    gap = (lsh["eval_loss"] - none["eval_loss"]) / none["eval_loss"]
    ratio = _layer_means(lsh)
    out = {
        "steps": steps, "eval_loss": {"none": none["eval_loss"], "lsh": lsh["eval_loss"]}, "eval_gap": gap,
        "curve": {"none": none["eval_losses"], "lsh": lsh["eval_losses"]},
        "train_loss_last10": {m: statistics.fmean(r["losses"][-10:]) for m, r in runs.items()},
        "ratio_per_layer": ratio, "ratio_overall": statistics.fmean(ratio),
        "ratio_first_last_step": [lsh["lsh"][0]["ratio"], lsh["lsh"][-1]["ratio"]],
        "fidelity": [e for e in lsh["lsh"] if e["fidelity"] is not None],
        "bytes_ep": {m: r["ledger"]["total"]["ep"]["all_to_all"]["bytes"] if "total" in r["ledger"] else None
                     for m, r in runs.items()},
        "coarse_dim4": {"eval_loss": coarse["eval_loss"], "eval_gap": (coarse["eval_loss"] - none["eval_loss"]) / none["eval_loss"],
                        "curve": coarse["eval_losses"], "ratio_per_layer": _layer_means(coarse),
                        "ratio_overall": statistics.fmean(_layer_means(coarse))},
    }
    print(f"lsh quality: {steps} steps, held-out loss none {none['eval_loss']:.4f}, lsh {lsh['eval_loss']:.4f} "
          f"({100 * gap:+.2f} %); ratio per layer {', '.join(f'{r:.3f}' for r in ratio)}; dim 4: "
          f"{coarse['eval_loss']:.4f} ({100 * out['coarse_dim4']['eval_gap']:+.2f} %), ratio "
          f"{out['coarse_dim4']['ratio_overall']:.3f}", flush=True)
    return out


def cluster_file(work: Path, name: str, nic: str, gbit: float, scale: float) -> Path:
    """A cluster file of two nodes of two workers on one NIC class of ``gbit`` Gbit/s, shaped at ``scale``."""
    data = {"name": name, "workers_per_node": 2,
            "devices": {"h100": {"peak_tflops": 989, "memory_gib": 80, "link_gbit": 3600}},
            "nics": {nic: {"gbit": gbit}}, "nodes": [{"name": "a0", "nic": nic}, {"name": "a1", "nic": nic}],
            "emulate": {"scale": scale}}
    path = work / f"cluster-{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _cluster_file(work: Path, name: str) -> Path:
    nic, gbit = CLUSTERS[name]
    return cluster_file(work, f"lsh-{name}", nic, gbit, SCALE)


def speed(work: Path, quick: bool) -> dict:
    from plait.runtime.rehearsal.namespaces import require_root

    require_root()
    steps, rounds = (8, 1) if quick else (14, 2)
    files = {name: _cluster_file(work, name) for name in CLUSTERS}
    times: dict[str, dict[str, list[float]]] = {c: {m: [] for m in ("none", "lsh", "auto")} for c in CLUSTERS}
    decisions: dict[str, Any] = {}
    for r in range(rounds):
        for cluster in CLUSTERS:
            for mode in ("none", "lsh", "auto"):
                summary = train(work, f"speed-{cluster}-{mode}-{r}", [f"train.steps={steps}", "train.eval_every=0",
                                 "train.eval_batches=1", "parallel.ep=4", f"parallel.ep_compress={mode}",
                                 "parallel.lsh.probe_every=0"], cluster=files[cluster])
                times[cluster][mode] += summary["step_times"][WARMUP:]
                if mode == "auto":
                    decisions[cluster] = summary["lsh_auto"]
                print(f"lsh speed: {cluster} {mode} round {r + 1}: median "
                      f"{statistics.median(summary['step_times'][WARMUP:]):.3f} s/step", flush=True)
    out: dict[str, Any] = {"scale": SCALE, "steps": steps, "rounds": rounds, "clusters": {}}
    for cluster, (nic, gbit) in CLUSTERS.items():
        step = {m: statistics.median(v) for m, v in times[cluster].items()}
        best = min(step["none"], step["lsh"])
        out["clusters"][cluster] = {
            "nic": nic, "described_gbit": gbit, "shaped_mbit": gbit * SCALE * 1e3, "step_s": step,
            "lsh_speedup": step["none"] / step["lsh"], "auto_vs_best": step["auto"] / best,
            "auto_decision": decisions[cluster],
        }
        print(f"lsh speed: {cluster} ({gbit * SCALE * 1e3:.0f} Mbit/s): none {step['none']:.3f} s, lsh {step['lsh']:.3f} s "
              f"({step['none'] / step['lsh']:.2f}×), auto {step['auto']:.3f} s ({step['auto'] / best:.3f} of the better)",
              flush=True)
    slow = out["clusters"]["slow"]["step_s"]
    fast = out["clusters"]["fast"]["step_s"]
    out["all_to_all_share_slow_none"] = (slow["none"] - fast["none"]) / slow["none"]
    return out


def run(quick: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"ops": ops(quick)}
    with tempfile.TemporaryDirectory(prefix="plait-bench-lsh-") as tmp:
        work = Path(tmp)
        result["quality"] = quality(work, quick)
        if os.geteuid() == 0:
            result["speed"] = speed(work, quick)
        else:
            result["speed"] = {"skipped": "needs root (network namespaces and tc)"}
    q, s = result["quality"], result["speed"]
    result["targets"] = {
        "ops_exact": all(c["exact"] for c in result["ops"]),
        "eval_within_1pct": abs(q["eval_gap"]) <= 0.01,
        "ratio_le_25pct": q["ratio_overall"] <= 0.25,
        "slow_lsh_speedup_ge_1.3": s["clusters"]["slow"]["lsh_speedup"] >= 1.3 if "clusters" in s else None,
        "fast_auto_within_5pct": s["clusters"]["fast"]["auto_vs_best"] <= 1.05 if "clusters" in s else None,
    }
    print(f"lsh: targets {result['targets']}", flush=True)
    return result
