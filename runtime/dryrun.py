"""``plait train --dry-run``: what would run, and what it would need."""

from __future__ import annotations

from plait.runtime.config import JobConfig, dump_config, model_spec
from plait.scheduler.comm_volume import Layout
from plait.scheduler.estimate import param_count, train_flops_per_token
from plait.scheduler.memory import rank_memory


def _gib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def dry_run_report(config: JobConfig) -> str:
    spec = model_spec(config.model)
    world = config.launch.nproc
    dims = config.parallel.dims(world)
    dp = dims.dp
    p = config.parallel
    t = config.train
    params = param_count(spec)
    layout = Layout(world=world, pp=dims.pp, dp=dims.dp, cp=dims.cp, tp=dims.tp, edp=dims.edp, ep=dims.ep,
                    etp=dims.etp, vpp=p.vpp)
    per_pp = rank_memory(spec, layout, global_batch=t.global_batch, micro_batch=t.micro_batch,
                         stage_layers=p.pp_layers, act_bytes=2 if t.dtype == "bfloat16" else 4, zero=p.zero)
    memory = max(per_pp, key=lambda m: m.peak)
    tokens = t.global_batch * spec.seq_len
    lines = [
        "# resolved config",
        dump_config(config).rstrip(),
        "",
        "# plan",
        f"world size:       {world}: attention pp={dims.pp} × dp={dims.dp} × cp={dims.cp} × tp={dims.tp}; "
        f"experts pp={dims.pp} × edp={dims.edp} × ep={dims.ep} × etp={dims.etp}",
        f"pipeline:         {p.pp_schedule}" + (f", {p.vpp} virtual stages per rank" if p.vpp > 1 else "")
        + (f", layers per stage {p.pp_layers}" if p.pp_layers else ""),
        f"batch:            global {t.global_batch} = micro {t.micro_batch} × accumulation {config.accumulation()} × dp {dp}"
        f" sequences of {spec.seq_len} tokens ({tokens:,} tokens/step, {tokens * t.steps:,} in {t.steps} steps)",
        f"parameters:       {params.total:,} total, {params.active:,} active per token"
        + (f" ({params.experts:,} in experts)" if spec.is_moe else ""),
        f"train FLOPs:      {train_flops_per_token(spec):,.0f} per token",
        f"memory per rank:  {_gib(memory.peak)} at most (pp rank {memory.pp_rank}: params {_gib(memory.params)}, "
        f"grads {_gib(memory.grads)}, AdamW {'shard' if p.zero else 'state (replicated)'} "
        f"{_gib(memory.optimizer)}, activations {_gib(memory.activations)} "
        f"for {memory.in_flight:g} micro-batch(es) in flight, accumulated grads {_gib(memory.accumulated)}, "
        f"step buffers {_gib(memory.buffers)}); "
        f"tensors only: allocator slack not counted",
    ]
    if len(per_pp) > 1:
        lines.append("                  per pp rank: " + ", ".join(f"{m.pp_rank}: {_gib(m.peak)}" for m in per_pp))
    snap = config.snapshot
    if snap.enabled:
        nnodes, per_node = config.launch.nnodes, config.launch.nproc_per_node
        # A rank's blob: its parameters (split by pp and tp; whole on every dp rank) plus its
        # 1/dp share of AdamW's two moments (ZeRO-1; all of them with parallel.zero=false), fp32. Experts split by
        # ep are ignored: an upper bound.
        local = params.total // (dims.pp * dims.tp)
        blob = 4 * local + 8 * local // (dims.dp if p.zero else 1)
        node_bytes = blob * per_node
        k, m = snap.code(nnodes)
        coded = m > 0
        parity = node_bytes * m // k if coded else 0
        lines.append(
            f"snapshots:        every {snap.every} steps to {nnodes} node daemon(s); per node ≈ {_gib(node_bytes)} of state"
            + (f" + {_gib(parity)} parity (EC k={k}, m={m}: survives {m} lost node(s) per group of "
               f"{k + m}); sends ≈ {_gib(node_bytes * m)} to parity holders per snapshot" if coded
               else " (no parity: survives worker and daemon crashes, not a node loss)")
            + "; up to 3 versions held (the published one and 2 in flight)" + (f"; disk every {snap.disk_every} snapshots" if snap.disk_every else "")
        )
    if config.precision.quantizes():
        lines += ["", "# precision (module → recipe; forward x·W, dgrad dy·Wᵀ, wgrad dyᵀ·x formats)", precision_table(config)]
    lines += ["", "# rank layout (global rank → coordinates in both foldings)", dims.describe()]
    return "\n".join(lines)


def precision_table(config: JobConfig) -> str:
    """Which module computes in which format, for each stage of the precision schedule."""
    import torch

    from plait.parallel.lowp import linear_names
    from plait.parallel.precision import resolve
    from plait.runtime.models import build_model

    with torch.device("meta"):
        names = linear_names(build_model(config.model))
    pc = config.precision
    base = "bf16" if config.train.dtype == "bfloat16" else "fp32"
    starts = [0, *pc.boundaries()]
    lines = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else config.train.steps
        if start >= config.train.steps:
            break
        recipes = resolve(pc, names, step=start, layers=config.model.layers, base=base)
        lines.append(f"steps {start + 1}–{end}:")
        width = max(len(n) for n in names)
        for name in names:
            r = recipes[name]
            f = pc.formats(r)
            detail = "" if f is None else "  " + ", ".join(
                f"{k} {op.fmt}" + (f"/{op.elem}" if op.fmt.startswith("fp8-") else "") + (" SR" if op.stochastic else "")
                + (" 16×16" if op.block_rows > 1 else "") + (" scale-up" if op.mx_scale == "up" else "")
                for k, op in f.operands().items()) + (" · Hadamard wgrad" if f.hadamard else "")
            lines.append(f"  {name:<{width}}  {r:<10}{detail}".rstrip())
    return "\n".join(lines)
