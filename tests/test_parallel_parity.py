"""Every parallel layout trains like one process: per-step losses and step-1 gradients within 1e-5.

The fast subset runs in ``make test``; the whole matrix (``-m slow``) in ``make test-parallel``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from harness import run_distributed
from parity import train_layout

STEPS = 10
MICRO = 2  # sequences per micro-step per dp rank


@functools.cache
def reference(kind: str, micro: int) -> dict:
    return run_distributed(train_layout, world=1, args=(kind, {}, micro, STEPS), timeout=300)[0]


def check(kind: str, world: int, sizes: dict, micro: int = MICRO, extra: dict | None = None) -> None:
    dp = world // max(1, _dense(sizes))
    ref = reference(kind, micro * dp)
    got = run_distributed(train_layout, world=world, args=(kind, sizes, micro, STEPS, extra), timeout=600)[0]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["aux"]), torch.tensor(ref["aux"]), rtol=1e-5, atol=1e-7)
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
    # After 10 AdamW steps: Adam divides each element's update by its own gradient scale, so an
    # element whose gradient is nearly 0 turns rounding noise into an update of up to ~lr; the
    # weights are therefore bounded absolutely (lr = 1e-2 here), the losses and gradients relatively.
    for name, p in ref["state"]["model"].items():
        torch.testing.assert_close(got["state"]["model"][name], p, rtol=0, atol=1e-4, msg=name)
    assert got["eval"] == pytest.approx(ref["eval"], rel=1e-5)


def _dense(sizes: dict) -> int:
    return sizes.get("pp", 1) * sizes.get("cp", 1) * sizes.get("tp", 1) * max(1, sizes.get("dp", 0) and 1)


FAST = [
    ("gpt", 2, dict(tp=2)),
    ("gpt", 2, dict(cp=2)),
    ("gpt", 2, dict(dp=2)),
]


@pytest.mark.parametrize("kind, world, sizes", FAST, ids=[f"{k}-{'x'.join(f'{a}{v}' for a, v in s.items())}" for k, _, s in FAST])
def test_parity_fast(kind, world, sizes):
    check(kind, world, sizes)
