"""Decoder-only transformer (dense or mixture of experts)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from plait.runtime.models.config import ModelConfig
from plait.runtime.models.layers import Attention, RMSNorm, RotaryEmbedding, SwiGLU
from plait.runtime.models.moe import MoE


def _cuda_devices_in_use() -> list[int]:
    """The CUDA device parameters are created on by default ([] when that is not CUDA)."""
    device = torch.get_default_device()
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def packed_documents(documents: Sequence[Sequence[int]], t: int,
                     device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions (int64 [B, T], restarting at each document) and the block-diagonal causal mask
    (bool [B, 1, T, T]) of rows of packed documents.

    The model attends each document on its own (:meth:`Attention.forward`, work Σ L² rather than T²); the
    mask states the same rule as one tensor, for checks and for kernels that take a mask.
    """
    positions = torch.empty(len(documents), t, dtype=torch.long)
    ids = torch.empty(len(documents), t, dtype=torch.long)
    for row, lengths in enumerate(documents):
        if any(type(n) is not int or n < 1 for n in lengths) or sum(lengths) != t:
            raise ValueError(f"documents[{row}]: lengths {list(lengths)} must be positive and sum to the row's "
                             f"{t} tokens")
        at = 0
        for doc, n in enumerate(lengths):
            positions[row, at:at + n] = torch.arange(n)
            ids[row, at:at + n] = doc
            at += n
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = (ids[:, :, None] == ids[:, None, :]) & causal
    return positions.to(device), mask[:, None].to(device)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(attn_norm(x))`` then ``x + ffn(ffn_norm(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn: SwiGLU | MoE
        if cfg.kind == "moe":
            self.ffn = MoE(cfg.dim, cfg.ffn_dim, cfg.experts, cfg.top_k)
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.ffn_dim)

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.attn.reset_parameters(std, out_std)
        self.ffn_norm.reset_parameters()
        self.ffn.reset_parameters(std, out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, documents)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Token embedding, ``cfg.layers`` blocks, final RMSNorm and an untied output head.

    ``layers`` is an ``nn.ModuleDict`` keyed by the block's global index ("0", "1", ...):
    a pipeline stage can delete the blocks it does not own and the remaining parameter
    names (``layers.5.attn.wq.weight``) still match a full checkpoint. For the same reason
    ``embed``, ``norm`` and ``output`` may be set to None: without ``embed`` the input is
    taken to be hidden states [B, T, dim], without ``norm``/``output`` hidden states are returned.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # The submodules' own default initialisation draws random numbers; it runs on a
        # forked generator so that init_weights() starts from the caller's seed. Building
        # on the meta device, then to_empty() + manual_seed(s) + init_weights(), thus
        # gives the same parameters as manual_seed(s) + Transformer(cfg).
        with torch.random.fork_rng(devices=_cuda_devices_in_use()):
            self.embed: nn.Embedding | None = nn.Embedding(cfg.vocab, cfg.dim)
            self.rope = RotaryEmbedding(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
            self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.layers)})
            self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the rotary tables, in a fixed order.

        normal(0, init_std) for linears, embeddings and expert weights; the projections
        that write into the residual stream (attention ``wo``, MLP/expert ``w2``) use
        init_std / sqrt(2 * layers); norm weights are 1.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.layers)
        with torch.no_grad():
            if self.embed is not None:
                nn.init.normal_(self.embed.weight, mean=0.0, std=std)
            self.rope.reset_buffers()
            for block in self.layers.values():
                block.reset_parameters(std, out_std)
            if self.norm is not None:
                self.norm.reset_parameters()
            if self.output is not None:
                nn.init.normal_(self.output.weight, mean=0.0, std=std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                documents: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """tokens [B, T] (int64) -> logits [B, T, vocab].

        ``positions`` (int64 [T]) overrides the default rotary positions ``0 .. T-1``,
        e.g. for a chunk of a longer sequence. ``documents``: per row, the lengths of the
        documents packed into it (summing to T): attention stays inside each document and
        rotary positions restart at each, so every document is computed as if alone.
        """
        h = self.embed(tokens) if self.embed is not None else tokens
        if documents is not None:
            if positions is not None:
                raise ValueError("documents: positions follow from the document lengths; pass one or the other")
            # under sequence parallelism h holds this rank's 1/tp of the row (set by parallel.tp.apply_tp)
            positions, _ = packed_documents(documents, h.shape[1] * getattr(self, "_plait_sp", 1), h.device)
            cos, sin = self.rope.cos[positions], self.rope.sin[positions]
        else:
            cos, sin = self.rope(h.shape[1], positions)
        for block in self.layers.values():
            h = block(h, cos, sin, documents)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return h

    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.layers.values() if isinstance(block.ffn, MoE)]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' balancing losses from the last forward (unweighted).

        The caller adds ``cfg.aux_loss_coef * aux_loss()`` to the cross-entropy, right after the
        forward pass it belongs to. A zero scalar for "gpt" or before any forward pass.
        """
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if not losses:
            param = next(self.parameters(), None)
            return torch.zeros((), device=param.device if param is not None else None)
        return torch.stack(losses).sum()

    def tokens_per_expert(self) -> torch.Tensor | None:
        """int64 [MoE layers, E] token copies per expert from the last forward; None for "gpt"."""
        layers = self.moe_layers()
        if not layers:
            return None
        counts = [
            m.tokens_per_expert
            if m.tokens_per_expert is not None
            else torch.zeros(m.num_experts, dtype=torch.int64, device=m.router.weight.device)
            for m in layers
        ]
        return torch.stack(counts)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of ``model``.

    ``total``: every parameter; ``expert``: the stacked expert weights of MoE layers;
    ``embedding``: the token embedding table; ``active``: parameters used per token,
    i.e. the non-expert parameters plus top_k/experts of each MoE layer's expert weights
    (equal to ``total`` for a dense model).
    """
    total = sum(p.numel() for p in model.parameters())
    expert = 0
    active_expert = 0.0
    for module in model.modules():
        if isinstance(module, MoE):
            n = sum(p.numel() for p in module.experts.parameters())
            expert += n
            active_expert += n * module.top_k / module.num_experts
    embed = getattr(model, "embed", None)
    embedding = embed.weight.numel() if isinstance(embed, nn.Embedding) else 0
    return {
        "total": total,
        "active": total - expert + round(active_expert),
        "expert": expert,
        "embedding": embedding,
    }
