"""From a job config to this rank's parallel engine: the one place the pieces meet."""

from __future__ import annotations

import torch

from plait.parallel.dp import AdamWSettings
from plait.parallel.engine import EngineConfig, ParallelEngine
from plait.parallel.mesh import ParallelMeshes
from plait.runtime.config import JobConfig
from plait.runtime.models import build_model


def engine_config(config: JobConfig) -> EngineConfig:
    t, p, m = config.train, config.parallel, config.model
    return EngineConfig(
        micro_batch=t.micro_batch,
        global_batch=t.global_batch,
        seq_len=m.seq_len,
        aux_loss_coef=m.aux_loss_coef if m.kind == "moe" else 0.0,
        grad_clip=t.grad_clip,
        adamw=AdamWSettings(lr=t.lr, beta1=t.beta1, beta2=t.beta2, weight_decay=t.weight_decay),
        dtype=t.dtype,
        pp_schedule=p.pp_schedule,
        vpp=p.vpp,
        pp_layers=p.pp_layers,
        capacity_factor=p.capacity_factor,
        lsh=p.lsh if p.ep_compress != "none" else None,
        lsh_auto=p.ep_compress == "auto",
        hybrid_dp=p.hybrid_dp,
        hdp_budget=config.hdp_budget(),
        hdp_schedule=p.hdp_schedule,
        max_len=config.max_len(),
        precision=config.precision if config.precision.quantizes() else None,
        control=config.control.enabled,
        grad_overlap=p.grad_overlap,
        bucket_mb=p.bucket_mb,
        co2=p.co2 if p.dp_mode == "co2" else None,
        ep_overlap=p.ep_overlap,
        tp_overlap=p.tp_overlap,
        zero=p.zero,
    )


def build_engine(config: JobConfig, world: int, device: torch.device) -> ParallelEngine:
    """Meshes (a collective), the full model from ``train.seed`` on every rank, then the split engine."""
    dims = config.parallel.dims(world)
    meshes = ParallelMeshes(dims, device_type=device.type)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model).to(device)
    return ParallelEngine(model, meshes, engine_config(config), device)
