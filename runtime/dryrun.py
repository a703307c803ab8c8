"""``plait train --dry-run``: what would run, and what it would need."""

from __future__ import annotations

from plait.runtime.config import JobConfig, dump_config, model_spec
from plait.scheduler.estimate import memory_per_rank, param_count, train_flops_per_token


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
    memory = memory_per_rank(spec, micro_batch=t.micro_batch, dtype=t.dtype)
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
        f"memory per rank:  {_gib(memory.total)} (params {_gib(memory.params)}, grads {_gib(memory.grads)}, "
        f"AdamW {_gib(memory.optimizer)}, activations {_gib(memory.activations)} per micro-batch)",
    ]
    lines += ["", "# rank layout (global rank → coordinates in both foldings)", dims.describe()]
    return "\n".join(lines)
