"""The planner's step times against measured runs on a rehearsed mixed-NIC cluster, and its placement against
plait's default rank order.

The cluster (after Holmes): four nodes of two workers, two on InfiniBand in one group and
two on RoCE in another, joined by a slower Ethernet uplink, listed interleaved (IB, RoCE,
IB, RoCE) as a scheduler that knows nothing of NICs might hand them out. Its twin is the
same four nodes all on InfiniBand in one group ("all fast"). Both are rehearsed on this
machine (`plait train --cluster`, needs root) at one fixed scale, chosen so the demo
model's step is a mix of compute and communication.

Each choice (a layout of the demo model and a placement: the file's order, or the
planner's NIC-aware one) is a real run of a few steps; ``measured_s`` is the median of its
step times after the first two. ``predicted_s`` is the planner's step time
(:func:`plait.scheduler.planner.evaluate`) for the rehearsed cluster: the shaped rates,
the transport measured on these links (:data:`plait.scheduler.timing.GLOO_TCP`), and one
CPU worker's rate calibrated once, on the first choice (data parallel on the all-fast
twin), which is left out of the accuracy figures.

Reported: Spearman's rank correlation of predicted vs measured over the mixed cluster's
choices (target ≥ 0.8), the mean absolute error (target ≤ 25 %), the planner's placement
against the default order for the same layout, measured side by side (target ≥ 1.3×), and
against the same layout on the all-fast twin (target within 10 %).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

NAME = "plan_accuracy"
REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"
SCALE = 5e-4  # shaped rate = described rate × this: IB 200 Gbit/s → 100 Mbit/s
STEPS = 6
WARMUP = 2  # steps left out of the median (allocation, first rendezvous of every group)
TARGETS = {"spearman": 0.8, "mae": 0.25, "placement_speedup": 1.3, "vs_all_fast": 0.10}
LINK_GBIT = 8.0  # between two workers of one rehearsed node: gloo over TCP loopback, all_reduce bus rate
VETH_LATENCY_US = 95.0  # one way between two rehearsed nodes: half gloo's measured round trip over the veths
RUN_TIMEOUT_S = 900


def cluster_data(kind: str) -> dict[str, Any]:
    if kind == "mixed":
        nodes = [{"name": "ib0", "nic": "ib200", "group": "ib"}, {"name": "roce0", "nic": "roce200", "group": "roce"},
                 {"name": "ib1", "nic": "ib200", "group": "ib"}, {"name": "roce1", "nic": "roce200", "group": "roce"}]
        uplinks = [{"between": ["ib", "roce"], "gbit": 100}]
    else:
        nodes = [{"name": f"ib{i}", "nic": "ib200", "group": "ib"} for i in range(4)]
        uplinks = []
    return {"name": f"holmes-{kind}", "workers_per_node": 2,
            "devices": {"h100": {"peak_tflops": 989, "memory_gib": 80}},
            "nics": {"ib200": {"gbit": 200}, "roce200": {"gbit": 200}},
            "nodes": nodes, "uplinks": uplinks, "emulate": {"scale": SCALE}}


# (label, cluster, --set overrides, placement): the layouts a user would try, in both node orders where it matters
CHOICES: list[tuple[str, str, list[str], str]] = [
    ("dp8 (calibration)", "fast", [], "default"),
    ("dp8", "mixed", [], "default"),
    ("dp8", "mixed", [], "holmes"),
    ("pp2 dp4", "mixed", ["parallel.pp=2"], "default"),
    ("pp2 dp4", "mixed", ["parallel.pp=2"], "holmes"),
    ("pp2 tp2 dp2", "mixed", ["parallel.pp=2", "parallel.tp=2"], "default"),
    ("pp2 tp2 dp2", "mixed", ["parallel.pp=2", "parallel.tp=2"], "holmes"),
    ("tp2 dp4", "mixed", ["parallel.tp=2"], "default"),
    ("pp4 dp2", "mixed", ["parallel.pp=4"], "default"),
    ("pp4 dp2", "mixed", ["parallel.pp=4"], "holmes"),
    ("dp8 / ep4", "mixed", ["parallel.ep=4"], "default"),
    ("pp2 dp4 / ep2", "mixed", ["parallel.pp=2", "parallel.ep=2"], "holmes"),
    ("pp2 dp4", "fast", ["parallel.pp=2"], "default"),
]
# The demo model with shorter sequences and a small batch, so the weights' traffic, which placement moves off the
# uplink, outweighs the activations' that a pipeline sends across it, as in a large model.
JOB = ["train.global_batch=8", "model.seq_len=64", "train.micro_batch=1"]


def _config(sets: list[str]):
    from plait.runtime.config import load_config

    return load_config(DEMO, [*JOB, *sets], nproc=8, nnodes=4)


def _request(kind: str, sets: list[str], flops: float, overhead_s: float):
    """The planner's request for the rehearsed cluster: shaped rates, gloo's transport, a CPU worker's rate."""
    from plait.runtime.config import model_spec
    from plait.scheduler.cluster import parse_cluster
    from plait.scheduler.planner import PlanRequest
    from plait.scheduler.timing import GLOO_TCP, DeviceRate

    data = cluster_data(kind)
    scaled = dict(data, emulate={"scale": 1.0},
                  nics={k: dict(v, gbit=v["gbit"] * SCALE, latency_us=VETH_LATENCY_US) for k, v in data["nics"].items()},
                  uplinks=[dict(u, gbit=u["gbit"] * SCALE) for u in data["uplinks"]],
                  devices={"h100": {"peak_tflops": flops / 1e12, "memory_gib": 80, "link_gbit": LINK_GBIT}})
    cluster = parse_cluster(scaled)
    config = _config(sets)
    return PlanRequest(spec=model_spec(config.model), cluster=cluster, global_batch=config.train.global_batch,
                       act_bytes=4, rates={"h100": DeviceRate(flops=flops, op_overhead_s=overhead_s, pooled=True)},
                       transport=GLOO_TCP), config


def predict(kind: str, sets: list[str], placement: str, flops: float, overhead_s: float):
    from plait.scheduler.comm_volume import Layout
    from plait.scheduler.planner import evaluate

    req, config = _request(kind, sets, flops, overhead_s)
    p = config.parallel
    dims = p.dims(config.launch.nproc)
    lay = Layout(world=8, pp=dims.pp, dp=dims.dp, cp=dims.cp, tp=dims.tp, edp=dims.edp, ep=dims.ep, etp=dims.etp,
                 vpp=p.vpp)
    return evaluate(req, lay, config.train.micro_batch, placement=placement)


def measure(kind: str, sets: list[str], workdir: Path, label: str) -> dict[str, Any]:
    cluster_file = workdir / f"cluster-{kind}.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster_data(kind), sort_keys=False))
    run_dir = workdir / label.replace(" ", "_").replace("/", "")
    cmd = [sys.executable, "-m", "plait.runtime.cli", "train", "--config", str(DEMO), "--cluster", str(cluster_file),
           "--run-dir", str(run_dir), "--set", f"train.steps={STEPS}", "train.eval_every=0", "train.eval_batches=1",
           *JOB, *sets]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"{label}: plait train exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    times = summary["step_times"][WARMUP:]
    return {"measured_s": statistics.median(times), "step_times": summary["step_times"]}


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else 0.0


def calibrate(measured_s: float, kind: str, sets: list[str], overhead_s: float) -> float:
    """The worker FLOP/s at which the model's step time for this run equals the measured one (bisection: the step
    time falls as the rate grows)."""
    lo, hi = 1e6, 1e13
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        if predict(kind, sets, "default", mid, overhead_s).time.total > measured_s:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def run(quick: bool = False) -> dict[str, Any]:
    from plait.runtime.rehearsal.namespaces import require_root
    from plait.scheduler.timing import GLOO_TCP

    require_root()
    overhead_s = GLOO_TCP_OP_OVERHEAD_S
    rows = []
    flops = None
    with tempfile.TemporaryDirectory(prefix="plait-plan-accuracy-") as tmp:
        workdir = Path(tmp)
        for i, (label, kind, sets, placement) in enumerate(CHOICES):
            run_sets = list(sets)
            if flops is not None and placement != "default":
                cand = predict(kind, sets, placement, flops, overhead_s)
                run_sets += [s for s in cand.sets() if s.startswith("parallel.placement=")]
            got = measure(kind, run_sets, workdir, f"{i:02d} {kind} {label} {placement}")
            if flops is None:
                flops = calibrate(got["measured_s"], kind, sets, overhead_s)
            cand = predict(kind, sets, placement, flops, overhead_s)
            row = {"choice": label, "cluster": kind, "placement": placement, "sets": run_sets,
                   "predicted_s": cand.time.total, "measured_s": got["measured_s"],
                   "error": cand.time.total / got["measured_s"] - 1, "step_times": got["step_times"],
                   "predicted": {"compute_s": cand.time.compute, "data_parallel_s": cand.time.data_parallel,
                                 "bubble": cand.time.bubble, "by_axis_s": cand.time.by_axis,
                                 "slowest_link": cand.time.slowest_link}}
            rows.append(row)
            print(f"plan_accuracy: {kind:5s} {label:20s} {placement:8s} predicted {row['predicted_s']:7.3f} s  "
                  f"measured {row['measured_s']:7.3f} s  error {row['error']:+.1%}", flush=True)
    scored = [r for r in rows if r["cluster"] == "mixed"]
    rho = spearman([r["predicted_s"] for r in scored], [r["measured_s"] for r in scored])
    mae = statistics.fmean(abs(r["error"]) for r in scored)

    def find(label: str, kind: str, placement: str) -> dict:
        return next(r for r in rows if (r["choice"], r["cluster"], r["placement"]) == (label, kind, placement))

    plan_vs_default = find("pp2 dp4", "mixed", "default")["measured_s"] / find("pp2 dp4", "mixed", "holmes")["measured_s"]
    vs_fast = find("pp2 dp4", "mixed", "holmes")["measured_s"] / find("pp2 dp4", "fast", "default")["measured_s"] - 1
    print(f"plan_accuracy: {len(scored)} choices on the mixed cluster: Spearman {rho:.3f} (target ≥ 0.8), mean "
          f"absolute error {mae:.1%} (≤ 25%); pp2 dp4: planner's placement {plan_vs_default:.2f}× the default order "
          f"(≥ 1.3×), {vs_fast:+.1%} vs all-fast (within 10%)", flush=True)
    return {
        "job": JOB, "scale": SCALE, "steps": STEPS, "warmup_steps_dropped": WARMUP, "calibrated_worker_flops": flops,
        "op_overhead_s": overhead_s, "transport": {"efficiency": GLOO_TCP.efficiency,
                                                    "intra_latency_s": GLOO_TCP.intra_latency_s},
        "clusters": {k: cluster_data(k) for k in ("mixed", "fast")},
        "choices": rows, "spearman": rho, "mae": mae,
        "placement_speedup": plan_vs_default, "placement_vs_all_fast": vs_fast, "targets": TARGETS,
        "within_targets": {"spearman": rho >= TARGETS["spearman"], "mae": mae <= TARGETS["mae"],
                           "placement_speedup": plan_vs_default >= TARGETS["placement_speedup"],
                           "vs_all_fast": abs(vs_fast) <= TARGETS["vs_all_fast"]},
    }


GLOO_TCP_OP_OVERHEAD_S = 20e-6  # Python dispatch of one operator on a busy CPU worker
