"""What every MoE router decided, per training step and token, for the parity tests.

A top-k router is discontinuous: when a token's k-th and (k+1)-th expert probabilities are
within rounding of each other (a near-tie), two correct computations of the same step can
pick different experts, and from then on their weights differ by a discrete amount. The
parity checks therefore record each token's router probabilities and choices (keyed by the
token's global id ``row · seq_len + position`` in the step's global batch), so that

* two runs are compared free-running only up to their first different decision, and
* a reference that redoes a layout's step can *follow* the layout's decision where the two
  differ, after :func:`compare_routing` has shown that the difference is a near-tie.

:class:`RoutingLog` wraps each MoE layer's ``route`` (the first of its forward phases, see
:mod:`plait.runtime.models.moe`); it does not touch the model's code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from plait.runtime.models.moe import Routing


@dataclass(frozen=True)
class StepRouting:
    """One training step's decisions of one MoE layer, over the global batch's N tokens."""

    probs: torch.Tensor  # [N, E] router softmax
    indices: torch.Tensor  # [N, k] chosen experts, in the router's order


def _is_moe(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("router", "experts", "route", "top_k"))


def _same_choice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] True where two [N, k] decisions choose the same set of experts."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


class RoutingLog:
    """Records the router output of every MoE layer in ``modules`` during training forwards.

    ``token_ids(i)`` gives the global ids of the tokens (flattened like the layer's input)
    that micro-step ``i`` of the current step puts through this process's layers; a layer's
    ``i``-th training forward within a step is micro-step ``i`` (schedules run each layer's
    micro-steps in order). ``swap`` (a set of ``(step, layer, token)``) makes the router take
    the (k+1)-th expert instead of the k-th for those tokens (a routing decision injected by
    a test; recorded as the router's). ``follow`` (per step, layer → [N, k] decisions) makes
    the layer use those decisions wherever the router's own differ; the record keeps the
    router's own.
    """

    def __init__(self, modules: Iterable[tuple[str, nn.Module]], token_ids: Callable[[int], torch.Tensor],
                 *, swap: Iterable[tuple[int, int, int]] = ()):
        self.token_ids = token_ids
        self.swap = set(swap)
        self.step: int | None = None
        self.follow: dict[int, torch.Tensor] = {}
        self.followed: list[tuple[int, int, int]] = []  # (step, layer, token) where a decision was followed
        self.records: dict[int, dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = {}
        self._calls: dict[int, int] = {}
        for name, module in modules:
            if _is_moe(module):
                layer = int(name.split(".")[1])  # "layers.<i>.ffn"
                module.route = self._wrap(module, layer, module.route)

    def begin_step(self, step: int, follow: dict[int, torch.Tensor] | None = None) -> None:
        self.step = step
        self.follow = follow or {}
        self._calls = {}
        self.records[step] = {}

    def end_step(self) -> None:
        self.step = None

    def _wrap(self, module: nn.Module, layer: int, route: Callable[[torch.Tensor], Routing]):
        def logged_route(x: torch.Tensor) -> Routing:
            routing = route(x)
            if not module.training or self.step is None:
                return routing
            micro = self._calls.get(layer, 0)
            self._calls[layer] = micro + 1
            tokens = self.token_ids(micro).reshape(-1)
            if tokens.numel() != x.shape[0]:
                raise AssertionError(f"layer {layer} micro-step {micro}: {x.shape[0]} tokens, expected {tokens.numel()}")
            indices = routing.indices
            for j, t in enumerate(tokens.tolist()):
                if (self.step, layer, t) in self.swap:
                    runner_up = routing.probs[j].detach().topk(module.top_k + 1).indices[-1]
                    indices = indices.clone()
                    indices[j, -1] = runner_up
            self.records[self.step].setdefault(layer, []).append(
                (tokens.clone(), routing.probs.detach().clone(), indices.clone())
            )
            if layer in self.follow:
                want = self.follow[layer][tokens].to(indices.device)
                differ = ~_same_choice(indices, want)
                if differ.any():
                    indices = torch.where(differ.unsqueeze(-1), want, indices)
                    self.followed += [(self.step, layer, int(t)) for t in tokens[differ]]
            if indices is routing.indices:
                return routing
            top = routing.probs.gather(1, indices)
            return Routing(weights=top / top.sum(-1, keepdim=True), indices=indices, probs=routing.probs)

        return logged_route


def merge_routing(logs: Iterable[dict], tokens: int) -> dict[int, dict[int, StepRouting]]:
    """Join the records of every process (each saw some tokens of some layers) into per-step tables."""
    steps: dict[int, dict[int, StepRouting]] = {}
    for records in logs:
        for step, layers in records.items():
            for layer, parts in layers.items():
                for ids, probs, indices in parts:
                    table = steps.setdefault(step, {}).get(layer)
                    if table is None:
                        table = StepRouting(
                            probs=torch.full((tokens, probs.shape[1]), float("nan")),
                            indices=torch.full((tokens, indices.shape[1]), -1, dtype=torch.long),
                        )
                        steps[step][layer] = table
                    table.probs[ids] = probs.float()
                    table.indices[ids] = indices
    for step, layers in steps.items():
        for layer, table in layers.items():
            if (table.indices < 0).any():
                raise AssertionError(f"step {step} layer {layer}: no process recorded some tokens")
    return steps


def first_divergence(a: dict[int, dict[int, StepRouting]], b: dict[int, dict[int, StepRouting]]) -> int | None:
    """The first step at which two runs routed some token of some layer differently (None: never)."""
    for step in sorted(a):
        for layer in sorted(a[step]):
            if not bool(_same_choice(a[step][layer].indices, b[step][layer].indices).all()):
                return step
    return None


def top_k_margin(probs: torch.Tensor, k: int) -> torch.Tensor:
    """[N] gap between each token's k-th and (k+1)-th largest probability (how far from a tie)."""
    top = probs.topk(k + 1, dim=-1).values
    return top[:, k - 1] - top[:, k]


def compare_routing(step: int, got: dict[int, StepRouting], want: dict[int, StepRouting], rtol: float) -> list[str]:
    """Check one step's routing decisions of a layout (``got``) against a reference's from the same weights.

    The caller has checked the probabilities elementwise within ``rtol`` (relative). A token
    may then be routed differently only where that tolerance allows either order: for an
    expert ``a`` that the layout chose and the reference did not, and ``b`` the other way
    round, ``|p_a - p_b| <= rtol · (p_a + p_b)`` in the reference, i.e. the pair is within the
    stated rounding of a tie. Returns a description of each such near-tie (for the report);
    raises AssertionError otherwise.
    """
    ties = []
    for layer in sorted(want):
        g, w = got[layer], want[layer]
        for token in (~_same_choice(g.indices, w.indices)).nonzero().flatten().tolist():
            only_got = set(g.indices[token].tolist()) - set(w.indices[token].tolist())
            only_want = set(w.indices[token].tolist()) - set(g.indices[token].tolist())
            p = w.probs[token]
            for a in only_got:
                for b in only_want:
                    gap = float((p[b] - p[a]).abs())
                    if gap > rtol * float(p[a] + p[b]):
                        raise AssertionError(
                            f"step {step + 1} layer {layer}: token {token} was routed to expert {a} instead of {b}, "
                            f"but the reference's probabilities {float(p[a]):.9g} and {float(p[b]):.9g} are "
                            f"{gap:.3g} apart, not a near-tie within rtol {rtol:g}"
                        )
                    ties.append(f"step {step + 1} layer {layer} token {token}: experts {a}/{b}, "
                                f"p {float(p[a]):.9g}/{float(p[b]):.9g} (gap {gap:.2g})")
    return ties
