"""``plait plan``: the ranked layouts of a model on a cluster, why the best wins, and how to run it.

Also the planning behind ``plait train --set parallel.auto=true`` and the memory figures
of ``plait train --dry-run``. Without ``--cluster`` the cluster is this machine: one
node of ``launch.nproc`` workers, each with its share of the memory, computing at the
measured rate (CPU) or its device's peak (GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from plait.errors import CLIError, ConfigError
from plait.scheduler.cluster import ClusterSpec, parse_cluster
from plait.scheduler.memory import rank_memory
from plait.scheduler.planner import Candidate, PlanRequest, PlanResult, ledger_bytes, mfu, plan, tokens_per_s

GiB = 2**30

# What the planner chooses, and the value each is reset to while the job config is read: the config file's own
# layout is replaced by the plan's, and a --set of one of them is refused (it would be ignored).
CHOSEN = {"parallel.tp": "1", "parallel.pp": "1", "parallel.cp": "1", "parallel.dp": "0", "parallel.ep": "1",
          "parallel.etp": "1", "parallel.edp": "0", "parallel.vpp": "1", "parallel.pp_schedule": "1f1b",
          "parallel.pp_layers": "null", "parallel.placement": "null", "parallel.auto": "false"}


def add_plan_parser(commands) -> None:
    p = commands.add_parser(
        "plan", help="rank the parallel layouts of a model on a cluster",
        description="Search every layout the runtime accepts (pp with vpp and stage split, dp, cp, tp; ep, etp, edp "
        "for MoE; micro-batch size), place ranks on nodes by NIC class and node group, and rank the plans by "
        "predicted step time among those that fit in memory.",
    )
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="job config (model and train sections)")
    p.add_argument("--cluster", type=Path, metavar="FILE", help="cluster file (default: this machine, --nproc workers)")
    p.add_argument("--nproc", type=int, metavar="N", help="workers on this machine when there is no --cluster")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted (train.global_batch=64)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="plans to list (default 10)")
    p.add_argument("--placement", choices=("auto", "default", "holmes"), default="auto",
                   help="auto: the faster of the file's node order and the NIC-aware orders (default)")
    p.add_argument("--efficiency", type=float, default=0.5, metavar="F",
                   help="share of a device's peak FLOP/s the model reaches (default 0.5)")
    p.add_argument("--json", action="store_true", help="print the ranked plans as JSON")
    p.add_argument("--emit", choices=("plait", "megatron"), help="print the best plan as plait --set overrides or "
                   "as Megatron-LM arguments")


def local_cluster(nproc: int) -> ClusterSpec:
    """This machine as a one-node cluster: its memory shared by the workers; a CPU's measured rate as its peak."""
    import torch

    if torch.cuda.is_available():
        from plait.runtime.peak import cuda_peak_flops

        peak = cuda_peak_flops() or 100e12
        memory = torch.cuda.get_device_properties(0).total_memory / GiB
        name = torch.cuda.get_device_name()
    else:
        from plait.runtime.peak import cpu_peak_flops

        peak = cpu_peak_flops(nproc)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB / nproc
        name = "cpu"
    # Workers of one machine talk through shared memory (NVLink on a GPU node); gloo over loopback moves
    # about 10 Gbit/s per direction here (plait bench links, loopback_vs_veth).
    link = 3600 if name != "cpu" else 10
    return parse_cluster({
        "name": "this-machine", "workers_per_node": nproc,
        "devices": {name: {"peak_tflops": peak / 1e12, "memory_gib": memory, "link_gbit": link}},
        "nics": {"none": {"gbit": 1}}, "nodes": [{"name": "local", "nic": "none"}],
    })


def request_for(config, cluster: ClusterSpec, *, efficiency: float = 0.5) -> PlanRequest:
    from plait.runtime.config import model_spec

    if not 0 < efficiency <= 1:
        raise CLIError(f"--efficiency: got {efficiency}; accepted: a share of the peak, 0 < F ≤ 1, e.g. 0.5")
    overhead = 5e-6 if cluster.name != "this-machine" or _has_cuda() else 20e-6
    return PlanRequest(spec=model_spec(config.model), cluster=cluster, global_batch=config.train.global_batch,
                       act_bytes=2 if config.train.dtype == "bfloat16" else 4, efficiency=efficiency,
                       op_overhead_s=overhead, zero=config.parallel.zero)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _link_text(cand: Candidate) -> str:
    return ", ".join(f"{k} {_size(v)}" for k, v in cand.time.link_bytes.items() if v) or "-"


def why(result: PlanResult) -> list[str]:
    """Why the best plan wins, and why the alternatives users reach for first lose."""
    req, best = result.request, result.best
    lines = [f"best: {best.name()} — {best.time.total * 1e3:.3g} ms/step; {_dominant(best)}"]
    P = req.cluster.workers_per_node
    alternatives = {"data parallel only": lambda lay, mb: lay.pp == lay.tp == lay.cp == lay.ep == lay.etp == 1}
    if P > 1:
        alternatives[f"tp={P} (a node)"] = lambda lay, mb: lay.tp == P and lay.pp == 1 and lay.cp == 1
    if req.cluster.nnodes > 1:
        alternatives["pipeline over every node"] = lambda lay, mb: (lay.pp == req.cluster.nnodes and lay.tp == 1
                                                                    and lay.cp == 1)
    if req.spec.is_moe and min(P, req.spec.experts) > 1:
        ep = min(P, req.spec.experts)
        alternatives[f"ep={ep}"] = lambda lay, mb: lay.ep == ep and lay.pp == lay.tp == lay.cp == 1
    for label, match in alternatives.items():
        if match(best.layout, best.micro_batch):  # the best is of that shape already
            continue
        alt = result.find(match)
        if alt is None:
            continue
        if not alt.fits:
            lines.append(f"{label} ({alt.name()}): out of memory, {_size(alt.peak_bytes)} per device "
                         f"> {_size(alt.memory_limit)} usable")
        else:
            lines.append(f"{label} ({alt.name()}): {alt.time.total / best.time.total:.2f}× slower; {_dominant(alt)}")
    if not best.placed.is_default:
        from plait.scheduler.planner import evaluate

        plain = evaluate(req, best.layout, best.micro_batch, placement="default")
        lines.append(f"same layout in the default rank order: {plain.time.total / best.time.total:.2f}× slower; "
                     f"{_dominant(plain)}")
    return lines


def _dominant(cand: Candidate) -> str:
    t = cand.time
    comm = sorted(t.by_axis.items(), key=lambda kv: -kv[1])
    parts = [f"compute {t.compute / t.total:.0%}"]
    if comm:
        axis, seconds = comm[0]
        parts.append(f"most communication on {axis} ({seconds / t.total:.0%}, busiest link {t.slowest_link})")
    if t.bubble > 0.01:
        parts.append(f"bubble {t.bubble:.0%}")
    return ", ".join(parts)


def table(result: PlanResult, top: int) -> str:
    req = result.request
    header = ("#", "layout", "placement", "mem/device", "step", "tokens/s", "MFU", "bubble", "bytes per link")
    rows = []
    for i, c in enumerate(result.ranked[:top], 1):
        rows.append((str(i), c.name(), c.placed.strategy, _size(c.peak_bytes), f"{c.time.total * 1e3:.3g} ms",
                     f"{tokens_per_s(req, c):,.0f}", f"{mfu(req, c):.1%}", f"{c.time.bubble:.0%}", _link_text(c)))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    return "\n".join(lines)


def megatron_args(result: PlanResult, config) -> str:
    """The Megatron-LM (Megatron-Core) arguments of the best plan, folding included."""
    req, best = result.request, result.best
    lay, spec, m = best.layout, req.spec, config.model
    args = [
        f"--num-layers {spec.layers}", f"--hidden-size {spec.dim}", f"--ffn-hidden-size {spec.ffn_dim}",
        f"--num-attention-heads {spec.heads}", f"--seq-length {spec.seq_len}", f"--max-position-embeddings {spec.seq_len}",
        "--swiglu", "--normalization RMSNorm", "--position-embedding-type rope", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights",
        f"--micro-batch-size {best.micro_batch}", f"--global-batch-size {req.global_batch}",
        f"--tensor-model-parallel-size {lay.tp}", f"--pipeline-model-parallel-size {lay.pp}",
        f"--context-parallel-size {lay.cp}",
    ]
    if req.zero:  # ZeRO-1's sharded optimizer state is Megatron's distributed optimizer
        args.append("--use-distributed-optimizer")
    if lay.tp > 1:
        args.append("--sequence-parallel")
    if lay.vpp > 1:
        args.append(f"--num-layers-per-virtual-pipeline-stage {spec.layers // (lay.pp * lay.vpp)}")
    if spec.is_moe:
        # MoE Parallel Folding: the expert folding's sizes are independent of tp and cp.
        args += [f"--num-experts {spec.experts}", f"--moe-router-topk {spec.top_k}",
                 f"--expert-model-parallel-size {lay.ep}", f"--expert-tensor-parallel-size {lay.etp}",
                 "--moe-token-dispatcher-type alltoall"]
    if config.train.dtype == "bfloat16":
        args.append("--bf16")
    notes = []
    counts = best.stage_layers
    if counts is not None:
        if lay.vpp == 1 and len(set(counts[1:-1])) <= 1:  # the middle stages (none when pp = 2) alike
            args += [f"--decoder-first-pipeline-num-layers {counts[0]}", f"--decoder-last-pipeline-num-layers {counts[-1]}"]
        else:
            notes.append(f"# the planner splits layers per stage as {counts}; Megatron-LM takes only first/last "
                         "stage counts, so this split needs a custom layout")
    if not best.placed.is_default:
        order = " ".join(req.cluster.nodes[n].name for n in best.placed.order)
        notes.append(f"# rank order: launch node ranks in this host order: {order}")
    return "\n".join(notes + [" \\\n  ".join(args)])


def plan_config(config, cluster: ClusterSpec, *, placement: str = "auto", efficiency: float = 0.5,
                top: int = 10) -> PlanResult:
    return plan(request_for(config, cluster, efficiency=efficiency), keep=top, placement=placement)


def counts_line(result: PlanResult) -> str:
    return (f"{result.searched:,} layouts searched: {result.costed:,} costed ({len(result.ranked):,} fit, "
            f"{len(result.rejected):,} out of memory), {len(result.pending):,} ruled out by a lower bound on step time")


def as_json(result: PlanResult, top: int) -> dict:
    req = result.request
    return {
        "cluster": req.cluster.name, "world": req.cluster.world, "searched": result.searched,
        "costed": result.costed, "feasible": len(result.ranked), "out_of_memory": len(result.rejected),
        "bounded_out": len(result.pending), "excluded_by_rule": result.invalid,
        "plans": [{
            "layout": c.name(), "parallel": vars(c.layout), "micro_batch": c.micro_batch, "schedule": c.schedule,
            "stage_layers": c.stage_layers, "placement": c.placed.strategy, "nodes": list(c.placed.nodes),
            "memory": [m.as_dict() for m in rank_memory(req.spec, c.layout, global_batch=req.global_batch,
                                                        micro_batch=c.micro_batch, stage_layers=c.stage_layers,
                                                        act_bytes=req.act_bytes, zero=req.zero)],
            "peak_bytes": c.peak_bytes,
            "step_s": c.time.total, "compute_s": c.time.compute, "data_parallel_s": c.time.data_parallel,
            "bubble": c.time.bubble, "by_axis_s": c.time.by_axis, "link_bytes": c.time.link_bytes,
            "tokens_per_s": tokens_per_s(req, c), "mfu": mfu(req, c), "ledger_bytes": ledger_bytes(req, c),
            "sets": c.sets(),
        } for c in result.ranked[:top]],
        "why": why(result),
    }


def cmd_plan(args: argparse.Namespace) -> int:
    from plait.scheduler.cluster import load_cluster

    if args.top < 1:
        raise CLIError(f"--top: got {args.top}; accepted: a positive number of plans")
    if args.cluster is not None and args.nproc is not None:
        raise CLIError("--nproc: the cluster file gives the workers; drop --nproc or --cluster")
    _refuse_chosen(args.overrides)
    cluster = load_cluster(args.cluster) if args.cluster is not None else None
    nproc = cluster.world if cluster is not None else args.nproc
    config = _config_for_planning(args.config, list(args.overrides), nproc, cluster)
    cluster = cluster or local_cluster(config.launch.nproc)
    result = plan_config(config, cluster, placement=args.placement, efficiency=args.efficiency, top=args.top)
    if args.json:
        print(json.dumps(as_json(result, args.top), indent=2))
        return 0
    if args.emit == "megatron":
        print(megatron_args(result, config))
        return 0
    if args.emit == "plait":
        print(" ".join(result.best.sets()))
        return 0
    print(f"plait plan: {config.model.kind} model on {cluster.name} ({cluster.nnodes} node(s) × "
          f"{cluster.workers_per_node} = {cluster.world} devices), global batch {config.train.global_batch}; "
          + counts_line(result))
    print(table(result, args.top))
    print()
    for line in why(result):
        print(line)
    print(f"\nrun it: {train_command(args, cluster, result)}")
    return 0


def _key(override: str) -> str:
    return override.partition("=")[0].strip()


def _refuse_chosen(overrides: list[str]) -> None:
    for item in overrides:
        key = _key(item)
        if key in CHOSEN and key != "parallel.auto":
            raise ConfigError(key, item.partition("=")[2], "plait plan chooses every parallel size, the schedule, "
                              "the stage split and the placement", hint=f"drop --set {key}")


def train_command(args: argparse.Namespace, cluster: ClusterSpec, result: PlanResult) -> str:
    """The ``plait train`` command line of the best plan: the planned world, the user's overrides, the plan's."""
    if args.cluster is not None:
        workers = ["--nnodes", str(cluster.nnodes), "--nproc-per-node", str(cluster.workers_per_node)]
    else:
        workers = ["--nproc", str(cluster.world)]
    kept = [item for item in args.overrides if _key(item) not in CHOSEN]
    return shlex.join(["plait", "train", "--config", str(args.config), *workers, "--set", *kept, *result.best.sets()])


def _config_for_planning(path: Path, overrides: list[str], nproc: int | None, cluster: ClusterSpec | None):
    """The job config with the parallel section reset: the planner chooses it."""
    from plait.runtime.config import load_config

    reset = [f"{key}={value}" for key, value in CHOSEN.items()]
    try:
        return load_config(path, overrides + reset, nproc=nproc, nnodes=cluster.nnodes if cluster else None)
    except ConfigError as err:
        if err.key == "train.global_batch":
            return load_config(path, overrides + reset + ["train.micro_batch=1"], nproc=nproc,
                               nnodes=cluster.nnodes if cluster else None)
        raise


def apply_auto(config, cluster: ClusterSpec | None):
    """``parallel.auto``: the best plan's sizes in place of the config's (which must be left at their defaults)."""
    p = config.parallel
    chosen = {k: getattr(p, k) for k in ("tp", "pp", "cp", "ep", "etp", "vpp") if getattr(p, k) != 1}
    chosen |= {k: getattr(p, k) for k in ("dp", "edp") if getattr(p, k) != 0}
    if p.pp_layers is not None:
        chosen["pp_layers"] = p.pp_layers
    if p.placement is not None:
        chosen["placement"] = p.placement
    if chosen:
        key, value = next(iter(chosen.items()))
        raise ConfigError(f"parallel.{key}", value, "parallel.auto chooses every parallel size and the placement",
                          hint=f"drop parallel.{key}, or set parallel.auto=false")
    cluster = cluster or local_cluster(config.launch.nproc)
    return plan_config(config, cluster)
