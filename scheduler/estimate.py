"""Closed-form parameter, FLOP and memory estimates for a :class:`ModelSpec`.

These are the planner's numbers; tests hold the parameter count to the real model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.scheduler.spec import ModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # used per token: dense parameters plus top_k of the experts
    embedding: int  # the token embedding (a lookup, no FLOPs)
    experts: int  # all expert weights


def param_count(spec: ModelSpec) -> ParamCount:
    """Exact parameter count of plait's transformer for ``spec``.

    Per layer: q, k, v, o projections (4·d², no biases), two RMSNorm weights (2·d), and
    either a SwiGLU MLP (3·d·f) or a router (d·E) plus E SwiGLU experts (3·E·d·f).
    Plus the embedding (V·d), the final norm (d) and the untied output head (d·V).
    """
    d, f, v = spec.dim, spec.ffn_dim, spec.vocab
    attention = 4 * d * d + 2 * d
    if spec.is_moe:
        experts_per_layer = 3 * spec.experts * d * f
        ffn_total = d * spec.experts + experts_per_layer
        ffn_active = d * spec.experts + 3 * spec.top_k * d * f
    else:
        experts_per_layer = 0
        ffn_total = ffn_active = 3 * d * f
    embedding = v * d
    shared = embedding + d + d * v
    return ParamCount(
        total=shared + spec.layers * (attention + ffn_total),
        active=shared + spec.layers * (attention + ffn_active),
        embedding=embedding,
        experts=spec.layers * experts_per_layer,
    )


def train_flops_per_token(spec: ModelSpec) -> float:
    """Training FLOPs per token: 6·N (active matmul parameters) + 12·L·d·T for attention.

    The attention term is PaLM's (Chowdhery et al. 2022, appendix B), which counts the
    full T×T score matrix; we use it unchanged so MFU is comparable with published numbers.
    """
    params = param_count(spec)
    matmul_params = params.active - params.embedding
    return 6.0 * matmul_params + 12.0 * spec.layers * spec.dim * spec.seq_len


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank for data-parallel training with AdamW."""

    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def memory_per_rank(spec: ModelSpec, *, micro_batch: int, dtype: str, param_bytes: int = 4) -> MemoryEstimate:
    """Memory per data-parallel rank holding a full replica (DDP), fp32 master weights.

    Activations are those saved for backward by one micro-batch, counted per token and
    layer: norms' inputs (2d), attention q, k, v, output and projection input (~6d), MLP
    input and the four ffn-wide tensors of SwiGLU (d + 4f), for MoE per routed copy
    (top_k·(2d + 4f)) plus router logits (E); and the logits with their gradient (2V).
    It is an estimate: allocator slack and temporaries are not counted.
    """
    params = param_count(spec).total
    act_bytes = DTYPE_BYTES[dtype]
    d, f = spec.dim, spec.ffn_dim
    if spec.is_moe:
        per_layer = 8 * d + spec.experts + spec.top_k * (2 * d + 4 * f)
    else:
        per_layer = 8 * d + d + 4 * f
    tokens = micro_batch * spec.seq_len
    activations = tokens * (spec.layers * per_layer * act_bytes + 2 * spec.vocab * 4)
    return MemoryEstimate(
        params=params * param_bytes,
        grads=params * param_bytes,
        optimizer=2 * params * 4,
        activations=activations,
    )
