"""Dropless top-k mixture of experts with a load-balancing loss.

The forward pass is split into four steps so that an expert-parallel dispatcher can
put an all-to-all between ``permute`` and ``experts`` (and back before ``combine``):

    route   -> top-k expert ids and gate weights per token, plus the balancing loss
    permute -> copies of the tokens sorted by expert id, with per-expert counts
    experts -> each expert's SwiGLU on its contiguous slice (stacked weights)
    combine -> scale by gate weight and sum each token's k results (index_add)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """Result of ``MoE.route`` for N tokens."""

    weights: torch.Tensor  # [N, k] gate weights (float32, each row sums to 1)
    indices: torch.Tensor  # [N, k] expert ids (int64)
    probs: torch.Tensor  # [N, E] router softmax (float32)


@dataclass
class Permutation:
    """Result of ``MoE.permute``: how the sorted copies map back to tokens."""

    order: torch.Tensor  # [N*k] positions in the flattened [N, k] assignment list, sorted by expert
    token_ids: torch.Tensor  # [N*k] token of each sorted copy (order // k)
    counts: torch.Tensor  # [E] int64 copies per expert (sum N*k)


@dataclass
class DocumentBalance:
    """The balancing loss defined per document (whole-document training, hybrid data parallelism).

    A document's Switch loss is ``E·Σ_e f_de·P_de`` over its own tokens (DeepSeek-V3's sequence-wise
    balance loss): ``f_de`` the fraction of its N_d·k copies routed to expert e, ``P_de`` its tokens' mean
    router probability. A step's balancing loss is the mean over its documents. Neither depends on how
    documents are grouped into forward calls or split over ranks, so every layout computes the same loss.
    A layer's ``aux_loss`` is this rank's share: ``Σ_d weight·E·Σ_e f_de·(Σ_mine p_te)/N_d`` over the
    documents it holds tokens of, which summed over the ranks sharing a document is the document's loss.
    """

    document: torch.Tensor  # int64 [n]: each of this rank's tokens' document (0 … D−1); −1: padding
    tokens: torch.Tensor  # float64 [D]: each document's whole token count N_d (all ranks' shares)
    weight: float  # each document's weight (1 / documents of the step)
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # sums [D, E] counts over the ranks sharing them

    def loss(self, routing: "Routing", experts: int) -> torch.Tensor:
        """This rank's share of the weighted per-document losses (a scalar in the autograd graph)."""
        probs, k = routing.probs, routing.indices.shape[1]
        d = self.tokens.numel()
        mine = self.document >= 0
        doc = self.document[mine]
        counts = torch.zeros(d * experts, dtype=torch.long, device=probs.device)
        slots = (doc[:, None] * experts + routing.indices[mine]).flatten()
        counts.index_add_(0, slots, torch.ones_like(slots))
        counts = counts.view(d, experts)
        if self.reduce is not None:
            counts = self.reduce(counts)
        n = self.tokens.to(device=probs.device, dtype=probs.dtype)
        f = counts.to(probs.dtype) / (n[:, None] * k)
        p = probs.new_zeros(d, experts).index_add(0, doc, probs[mine]) / n[:, None]
        return experts * self.weight * torch.sum(f * p)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked parameters, sharded along dim 0 by expert parallelism.

    ``w1`` (gate) and ``w3`` (up) are [E, ffn_dim, dim], ``w2`` (down) is [E, dim, ffn_dim];
    each slice has the layout of an ``nn.Linear`` weight.
    """

    def __init__(self, experts: int, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(experts, ffn_dim, dim))
        self.w3 = nn.Parameter(torch.empty(experts, ffn_dim, dim))
        self.w2 = nn.Parameter(torch.empty(experts, dim, ffn_dim))
        self.reset_parameters(0.02, 0.02)

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, mean=0.0, std=std)
        nn.init.normal_(self.w3, mean=0.0, std=std)
        nn.init.normal_(self.w2, mean=0.0, std=out_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor | list[int]) -> torch.Tensor:
        """``x`` [M, dim] holds the tokens of expert 0, then expert 1, ... (``counts[e]`` rows each)."""
        sizes = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        if len(sizes) != self.num_experts:
            raise ValueError(f"got {len(sizes)} expert counts for {self.num_experts} experts")
        outs = []
        for e, xs in enumerate(torch.split(x, sizes, dim=0)):
            h = F.silu(xs @ self.w1[e].t()) * (xs @ self.w3[e].t())
            outs.append(h @ self.w2[e].t())
        return torch.cat(outs, dim=0)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts; every token is processed by all of its k experts (no capacity drop).

    After each forward pass ``self.aux_loss`` holds the (unweighted) load-balancing loss,
    a scalar in the autograd graph, and ``self.tokens_per_expert`` the detached int64 [E]
    count of token copies sent to each expert. With ``self.documents`` set (a
    :class:`DocumentBalance`, for one forward call), the loss is that call's share of the
    per-document losses instead.
    """

    def __init__(self, dim: int, ffn_dim: int, experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k={top_k} must be between 1 and experts={experts}")
        self.num_experts = experts
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = GroupedExperts(experts, dim, ffn_dim)
        self.reset_parameters(0.02, 0.02)
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None
        # int64 [E + 2] of the last forward on this rank: copies per expert, tokens, copies dropped (the engine sums
        # them over the ranks at the step's end, see ParallelEngine.tokens_per_expert)
        self.local_stats: torch.Tensor | None = None
        self.documents: DocumentBalance | None = None

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        self.experts.reset_parameters(std, out_std)

    def route(self, x: torch.Tensor) -> Routing:
        """x [N, dim] -> top-k gate weights (renormalised to sum to 1) and expert ids."""
        logits = self.router(x)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
        return Routing(weights=weights, indices=top_i, probs=probs)

    def balancing_loss(self, routing: Routing, counts: torch.Tensor) -> torch.Tensor:
        """Switch/GShard loss ``E * sum_e f_e * P_e`` (1.0 when routing is perfectly uniform).

        ``f_e`` is the fraction of the N*k token copies sent to expert e (no gradient),
        ``P_e`` the mean router probability of expert e over the N tokens.
        """
        f = counts.to(routing.probs.dtype) / routing.indices.numel()
        p = routing.probs.mean(dim=0)
        return self.num_experts * torch.sum(f * p)

    def permute(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, Permutation]:
        """Copy each token once per chosen expert and sort the copies by expert id (stable)."""
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_ids = torch.div(order, self.top_k, rounding_mode="floor")
        counts = torch.bincount(flat, minlength=self.num_experts)
        return x[token_ids], Permutation(order=order, token_ids=token_ids, counts=counts)

    def combine(
        self, y: torch.Tensor, perm: Permutation, weights: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        """Scale the sorted expert outputs y [N*k, dim] by their gate weights and sum per token."""
        gate = weights.reshape(-1)[perm.order].to(y.dtype)
        out = y.new_zeros(num_tokens, y.shape[-1])
        return out.index_add(0, perm.token_ids, y * gate.unsqueeze(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        routing = self.route(x2d)
        xs, perm = self.permute(x2d, routing.indices)
        ys = self.experts(xs, perm.counts)
        out = self.combine(ys, perm, routing.weights, x2d.shape[0])
        if self.documents is not None:
            self.aux_loss = self.documents.loss(routing, self.num_experts)
        else:
            self.aux_loss = self.balancing_loss(routing, perm.counts)
        self.tokens_per_expert = perm.counts.detach()
        self.local_stats = torch.cat([perm.counts, perm.counts.new_tensor([x2d.shape[0], 0])]).detach()
        return out.reshape(shape)
