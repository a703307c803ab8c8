"""How a parallel layout's training run is compared with its references, and why each bound is what it is.

Two references, two kinds of comparison:

**Step by step against plain PyTorch** (:func:`compare_replay`). The reference redoes every
step ``s`` of the layout from the layout's own state before it (:func:`parity.replay`), so
both computations start from identical weights and optimizer state and differ only by the
rounding of one step. Nothing accumulates, so the bounds do not depend on how chaotic ten
steps of training are, nor on the CPU:

* router probabilities, losses, balancing losses and reduced gradients elementwise within
  the stated parity tolerance ``RTOL`` (plus ``ATOL_GRAD`` for gradients whose terms cancel);
* routing decisions equal, except near-ties that ``RTOL`` allows either way
  (:func:`routing_log.compare_routing`); there the reference follows the layout's decision, so
  the rest of the step stays comparable;
* the optimizer: the layout's state after step ``s`` against ``torch.optim.AdamW`` applied to
  the layout's state before it and the layout's own gradient, within bounds derived from
  float32 rounding (:func:`update_bounds`): both sides evaluate the same formula on the
  same inputs, so only a few roundings per element can differ.

**Free-running against the engine at world size 1** (:func:`compare_free_running`): the
losses and balancing losses of the two trajectories, the step-1 gradients and the final
evaluation, as long as the two runs took the same routing decisions. Once a near-tie
falls differently (which one process on one CPU and another layout may well do, see
``test_parallel_parity``), the two runs are both right and no longer comparable; each of
their steps is still checked by the replay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from routing_log import compare_routing, first_divergence, merge_routing

from plait.runtime.trainer import TrainConfig

RTOL = 1e-5  # losses, router probabilities, gradients: relative, ~84 float32 epsilons
ATOL_GRAD = 1e-7  # gradients: absolute floor for elements whose terms cancel to ~0
ATOL_AUX = 1e-7
RTOL_AUX_LATER = 1e-4  # free-running balancing loss after step 1 (discrete routing fractions × drifted weights)
EPS32 = torch.finfo(torch.float32).eps
ADAM_EPS = 1e-8  # AdamWSettings.eps


@dataclass
class Report:
    """What a comparison saw: where the free-running runs parted, the near-ties, and the slack."""

    divergence: int | None = None  # first step (0-based) whose routing differs from the engine reference
    ties: list[str] = field(default_factory=list)  # near-ties the replay followed
    worst: dict[str, float] = field(default_factory=dict)  # max |got - want| / bound, per check (≤ 1 passes)

    def within(self, check: str, where: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
        """Require ``|got - want| <= bound`` elementwise; record the largest ratio under ``check``."""
        got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
        diff = (got - want).abs()
        ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / torch.as_tensor(bound, dtype=torch.float64))
        worst = float(ratio.max()) if ratio.numel() else 0.0
        self.worst[check] = max(self.worst.get(check, 0.0), worst)
        if worst > 1:
            i = int(ratio.flatten().argmax())
            index = tuple(torch.unravel_index(torch.tensor(i), ratio.shape)) if ratio.ndim else ()
            at = f"[{', '.join(str(int(x)) for x in index)}]" if index else ""
            raise AssertionError(
                f"{where}{at}: {float(got.flatten()[i]):.9g}, reference {float(want.flatten()[i]):.9g}, "
                f"difference {float(diff.flatten()[i]):.3g} is {worst:.3g}× the bound ({check})"
            )


def _grad_bound(want: torch.Tensor) -> torch.Tensor:
    return RTOL * want.abs() + ATOL_GRAD


def compare_free_running(got: dict, ref: dict, report: Report) -> None:
    """Layout and engine reference from the same start: up to their first different routing decision.

    ``got["routing"]`` and ``ref["routing"]`` are merged tables (:func:`routing_log.merge_routing`).
    """
    steps = len(ref["losses"])
    report.divergence = first_divergence(got["routing"], ref["routing"])
    upto = steps if report.divergence is None else report.divergence
    for s in range(upto):
        report.within("loss (free-running)", f"step {s + 1} loss", got["losses"][s], ref["losses"][s], RTOL * abs(ref["losses"][s]))
        rtol = RTOL if s == 0 else RTOL_AUX_LATER
        report.within("aux (free-running)", f"step {s + 1} balancing loss", got["aux"][s], ref["aux"][s],
                      rtol * abs(ref["aux"][s]) + ATOL_AUX)
    if upto > 0:
        assert set(got["grads"][0]) == set(ref["grads"][0])
        for name, g in ref["grads"][0].items():
            report.within("step-1 gradient (free-running)", f"step 1 gradient {name}", got["grads"][0][name], g, _grad_bound(g))
    if report.divergence is None:
        report.within("eval (free-running)", "evaluation loss", got["eval"], ref["eval"], RTOL * abs(ref["eval"]))


def update_bounds(before: dict, grad: dict[str, torch.Tensor], coef: float, after: dict, train: TrainConfig, step: int) -> dict:
    """Per element, how far two correct AdamW updates of the same state and gradient can differ.

    ``after`` is the reference's result of ``step`` (1-based). With ``ĝ = coef · g``:
    ``m' = β1·m + (1-β1)·ĝ``: each of the two products and the sum round once, and the
    implementations differ in how they form it (lerp vs two products) → ``4ε(|m| + |ĝ|)``
    (the terms may cancel, so the bound is on the inputs, not on ``m'``).
    ``v' = β2·v + (1-β2)·ĝ²``: all terms ≥ 0, three roundings, plus a clipping coefficient that
    may round to an adjacent float (two more on ``ĝ²``) → ``6ε·v'``.
    ``w' = w·(1 - lr·λ) - s·m'/d`` with ``s = lr/(1-β1^t)``, ``d = √v'/√(1-β2^t) + eps``: the
    decay rounds ≤ 2 times on ``w`` and the subtraction once (``4ε|w|``); the quotient's five
    operations plus ``v'``'s error under the root give ``8ε·|s·m'/d|``; and ``m'``'s own
    error reaches ``w'`` multiplied by ``s/d``.
    """
    b1, b2 = train.beta1, train.beta2
    s = train.lr_at(step - 1) / (1 - b1**step)
    c2 = math.sqrt(1 - b2**step)
    out: dict[str, dict[str, torch.Tensor]] = {"model": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, w in before["model"].items():
        g = grad[name].double() * coef
        m = before["optimizer"]["exp_avg"][name].double()
        m_new = after["optimizer"]["exp_avg"][name].double()
        v_new = after["optimizer"]["exp_avg_sq"][name].double()
        tol_m = 4 * EPS32 * (m.abs() + g.abs())
        d = v_new.sqrt() / c2 + ADAM_EPS
        out["exp_avg"][name] = tol_m
        out["exp_avg_sq"][name] = 6 * EPS32 * v_new
        out["model"][name] = 4 * EPS32 * w.double().abs() + 8 * EPS32 * s * m_new.abs() / d + s * tol_m / d
    return out


def compare_replay(layout: dict, replay: dict, train: TrainConfig, report: Report, tokens: int) -> None:
    """Each step of ``layout`` against plain PyTorch redoing it from the layout's state (see the module doc).

    ``layout["routing"]`` is a merged table; ``replay["routing"]`` the reference's raw records.
    """
    steps = len(layout["losses"])
    states = layout["states"]
    for name, w in replay["init"].items():
        if not torch.equal(states[0]["model"][name], w):
            raise AssertionError(f"initial {name} differs from the plain model built from the same seed")
    got_routing = layout["routing"]
    want_routing = merge_routing([replay["routing"]], tokens)
    for s in range(steps):
        r = replay["steps"][s]
        if s in want_routing:
            for layer, table in want_routing[s].items():
                report.within("router probability (replay)", f"step {s + 1} layer {layer} router probabilities",
                              got_routing[s][layer].probs, table.probs, RTOL * table.probs.abs())
            report.ties += compare_routing(s, got_routing[s], want_routing[s], RTOL)
        report.within("loss (replay)", f"step {s + 1} loss", layout["losses"][s], r["loss"], RTOL * abs(r["loss"]))
        report.within("aux (replay)", f"step {s + 1} balancing loss", layout["aux"][s], r["aux"], RTOL * abs(r["aux"]) + ATOL_AUX)
        grads = layout["grads"][s]
        assert set(grads) == set(r["grads"]), sorted(set(grads) ^ set(r["grads"]))
        for name, g in r["grads"].items():
            report.within("gradient (replay)", f"step {s + 1} gradient {name}", grads[name], g, _grad_bound(g))
        after = states[s + 1]
        if after["optimizer"]["step"] != s + 1:
            raise AssertionError(f"after step {s + 1} the optimizer counts {after['optimizer']['step']} steps")
        bounds = update_bounds(states[s], grads, r["coef"], r["after"], train, s + 1)
        for part in ("exp_avg", "exp_avg_sq"):
            for name, want in r["after"]["optimizer"][part].items():
                report.within(f"{part} (replay)", f"step {s + 1} {part} {name}", after["optimizer"][part][name], want, bounds[part][name])
        for name, want in r["after"]["model"].items():
            report.within("weights (replay)", f"step {s + 1} weights {name}", after["model"][name], want, bounds["model"][name])
    report.within("eval (replay)", "evaluation loss of the last state", layout["eval"], replay["eval"], RTOL * abs(replay["eval"]))
