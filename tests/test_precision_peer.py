"""plait's FP8 recipes against torchao's float8 training, the independent peer for the recipes it has.

``fp8-tensor`` is the same recipe as torchao's ``tensorwise`` (E4M3 forward, E5M2 gradients,
one amax scale per tensor): the three GEMMs must agree up to FP32 accumulation order.
``fp8-row`` differs from torchao's ``rowwise`` on purpose (torchao rounds its row scales to
powers of two and plait does not), so there the check is on quality: plait's error against
the exact GEMMs is no larger than the peer's by more than a quarter.
"""

from __future__ import annotations

import copy

import torch
import torchao.float8 as torchao_float8  # the test extra (pip install -e '.[test]')

from plait.parallel.lowp import PrecisionRuntime, quant_linear
from plait.parallel.precision import PrecisionConfig


def _grads(recipe_ours: str, recipe_theirs: str):
    torch.manual_seed(0)
    M, K, N = 256, 256, 192
    x = (torch.randn(M, K) * torch.linspace(0.1, 4, K)).requires_grad_()
    lin = torch.nn.Linear(K, N, bias=False)
    gy = torch.randn(M, N) * 1e-3
    peer = torch.nn.Sequential(copy.deepcopy(lin))
    torchao_float8.convert_to_float8_training(peer, config=torchao_float8.Float8LinearConfig.from_recipe_name(recipe_theirs))
    y1 = peer(x)
    theirs = (y1, *torch.autograd.grad(y1, (x, peer[0].weight), gy))
    rt = PrecisionRuntime(PrecisionConfig(recipe=recipe_ours, keep_edges=False), ["m"], layers=1, base="fp32")
    rt.begin_step(0)
    y2 = quant_linear(rt, "m", x, lin.weight)
    ours = (y2, *torch.autograd.grad(y2, (x, lin.weight), gy))
    y0 = x @ lin.weight.t()
    exact = (y0, *torch.autograd.grad(y0, (x, lin.weight), gy))
    # magnitudes of each GEMM's terms, for the accumulation bound: |a|·|b|ᵀ over the contraction
    xa, wa, ga = x.detach().abs(), lin.weight.detach().abs(), gy.abs()
    mags = (xa @ wa.t(), ga @ wa, ga.t() @ xa)
    return [t.detach() for t in ours], [t.detach() for t in theirs], [t.detach() for t in exact], mags, (K, N, M)


def test_fp8_tensor_equals_torchao_tensorwise():
    ours, theirs, _, mags, ks = _grads("fp8-tensor", "tensorwise")
    u = 2.0 ** -24
    for a, b, mag, k in zip(ours, theirs, mags, ks):
        # the same quantized operands (each within 2⁻³ relative of its input for E5M2) summed in FP32 in two orders
        bound = 2 * (k * u / (1 - k * u)) * mag * (1 + 2 ** -3) ** 2 + 1e-30
        assert ((a - b).abs() <= bound).all(), float(((a - b).abs() / bound).max())


def test_fp8_row_error_no_larger_than_torchao_rowwise():
    ours, theirs, exact, _, _ = _grads("fp8-row", "rowwise")
    for a, b, e in zip(ours, theirs, exact):
        err_ours = float((a - e).norm() / e.norm())
        err_theirs = float((b - e).norm() / e.norm())
        assert err_ours <= 1.25 * err_theirs, (err_ours, err_theirs)
