"""Tensor parallelism with sequence parallelism (Megatron-LM style), applied in place.

Inside each block the attention and the dense MLP are split across the ``tp`` ranks:
``wq``/``wk``/``wv`` and ``w1``/``w3`` are column-parallel (each rank keeps ``1/tp`` of
the output features: whole heads, a slice of the MLP's hidden size), ``wo`` and ``w2``
row-parallel (the matching ``1/tp`` of the input features). Everything else (norms,
residual adds, the MoE router, embedding, output head, loss) runs sequence-parallel:
each tp rank holds a contiguous ``1/tp`` of the sequence, so no activation outside the
two regions is duplicated.

Region boundaries, per block and micro-batch, with ``x`` the rank's [B, T/tp, dim]:

    attention: all-gather x over tp along the sequence  → column linears → attention
               → row linear → reduce-scatter over tp along the sequence
    dense MLP: the same (all-gather, then reduce-scatter)

The backward of an all-gather is a reduce-scatter and vice versa, so per region and
micro-batch each rank issues one all-gather and one reduce-scatter in the forward pass,
the same two in the backward pass. Ledger bytes per rank (fp32 activations of
``B·T/tp·dim`` elements, ``s = 4·B·T·dim/tp``): all_gather ``s`` and reduce_scatter
``tp·s`` in each direction.

Parameters that stay whole on every tp rank get partial gradients (each rank saw only
its part of the sequence); they are tagged to be summed over ``dp+cp+tp``. The split
ones are tagged ``dp+cp`` and carry ``_plait_shards`` so a full state can be gathered.
MoE layers are not touched here: their experts are split by expert parallelism
(:mod:`plait.parallel.ep`), and they take the sequence-parallel tokens as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.parallel import comm, tp_overlap
from plait.parallel.comm import Group

REPLICATED = "dp+cp+tp"  # gradient reduction group of weights every rank of a stage holds
TP_SHARDED = "dp+cp"  # ... of weights split over tp


def _shard_linear(linear: nn.Linear, group: Group, dim: int) -> None:
    weight = linear.weight
    if weight.shape[dim] % group.size:
        raise ValueError(f"cannot split {tuple(weight.shape)} along dim {dim} into {group.size}")
    part = weight.detach().chunk(group.size, dim)[group.rank].clone()
    linear.weight = nn.Parameter(part, requires_grad=weight.requires_grad)
    linear.weight._plait_shards = (("tp", dim),)
    linear.weight._plait_reduce = TP_SHARDED
    if dim == 0:
        linear.out_features = part.shape[0]
    else:
        linear.in_features = part.shape[1]


def _enter(group: Group):
    def hook(module, args):
        return (comm.gather_from(args[0], group, 1), *args[1:])

    return hook


def _leave(group: Group):
    def hook(module, args, output):
        return comm.scatter_to(output, group, 1)

    return hook


def sequence_parallel_region(module: nn.Module, group: Group) -> None:
    """Run ``module`` on the whole sequence of the tp group: gather its input, reduce-scatter its output."""
    module.register_forward_pre_hook(_enter(group))
    module.register_forward_hook(_leave(group))


def _is_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("wq", "wk", "wv", "wo"))


def _is_dense_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("w1", "w2", "w3"))


def apply_tp(model: nn.Module, group: Group, *, overlap: bool = False) -> None:
    """Split every block's attention and dense MLP over ``group`` (in place; no-op for size 1).

    The model's blocks are found by structure: a module with linears ``wq, wk, wv, wo``
    is attention, one with linears ``w1, w2, w3`` a SwiGLU MLP. Every parameter left
    whole is tagged for reduction over ``dp+cp+tp``. ``overlap`` (``parallel.tp_overlap``):
    each region's all-gather and reduce-scatter run as rings whose steps overlap the
    GEMMs (:mod:`plait.parallel.tp_overlap`), instead of the hooks below.
    """
    for param in model.parameters():
        if not hasattr(param, "_plait_reduce"):
            param._plait_reduce = REPLICATED
    if group.size == 1:
        return
    model._plait_sp = group.size  # the model's rows hold 1/tp of each sequence (packed documents need the whole)
    for module in list(model.modules()):
        if _is_attention(module):
            for name in ("wq", "wk", "wv"):
                _shard_linear(getattr(module, name), group, 0)
            _shard_linear(module.wo, group, 1)
            if overlap:
                tp_overlap.overlap_attention(module, group)
            else:
                sequence_parallel_region(module, group)
        elif _is_dense_mlp(module):
            for name in ("w1", "w3"):
                _shard_linear(getattr(module, name), group, 0)
            _shard_linear(module.w2, group, 1)
            if overlap:
                tp_overlap.overlap_mlp(module, group)
            else:
                sequence_parallel_region(module, group)


def reduce_group_of(param: torch.Tensor) -> str:
    """The group label over which this parameter's gradient is summed after backward."""
    return getattr(param, "_plait_reduce", REPLICATED)
