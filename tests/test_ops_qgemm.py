"""plait::block_scaled_mm and plait::block_scaled_grouped_mm (plait.ops.qgemm) against
the float64 product of the decoded operands, every supported pair, partial tiles and
blocks, grouped experts with empty groups, NaN blocks, argument errors, fake kernels;
the CUDA kernel against the CPU one where a GPU is present.

The error bound. The CPU kernel decodes each operand value to float32 (q * s: one
rounding, none for MX) and sums the K products in float32. With u = 2^-24 and
gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical Algorithms, 2nd
ed., section 3.1, eq. 3.5: an inner product of K terms in floating point is within
gamma_K sum |x_k y_k|), each term sees at most K - 1 additions, one product and two
decode roundings, so |out - exact| <= gamma_{K+2} * sum_k |a_k b_k|, per output, computed
from |A| @ |B|^T in float64. The CUDA kernel rounds once more per term and block (scale
product, scaled partial, the global scales), and a tensor core may truncate instead of
round its float32 additions (an error up to 2u each): 2 gamma_{K+5} covers it.
"""

from __future__ import annotations

import pytest
import torch

from plait.ops import qmm, qmm_grouped, qmm_grouped_reference, qmm_reference
from plait.ops.quant import QTensor, dequantize, quantize

U = 2.0**-24

# (a format, a element, b format, b element): every pair the op takes.
PAIRS = [
    ("fp8-1x128", "e4m3", "fp8-128x128", "e4m3"),
    ("fp8-1x128", "e5m2", "fp8-128x128", "e4m3"),
    ("fp8-1x128", "e4m3", "fp8-128x128", "e5m2"),
    ("fp8-1x128", "e4m3", "fp8-1x128", "e4m3"),
    ("fp8-1x128", "e4m3", "fp8-1x128", "e5m2"),
    ("mxfp8", "e4m3", "mxfp8", "e4m3"),
    ("mxfp4", "e4m3", "mxfp4", "e4m3"),
    ("nvfp4", "e4m3", "nvfp4", "e4m3"),
]
PAIR_IDS = [f"{a}:{ea}x{b}:{eb}" for a, ea, b, eb in PAIRS]
# Not multiples of the 6 x 16 register tile, the 96 x 128 cache blocks, the 128-row
# weight blocks or the 256-wide K chunks; K = 2 and 30 are partial scale blocks.
SHAPES = [(1, 1, 2), (7, 5, 30), (37, 150, 300), (130, 17, 514), (100, 260, 64)]


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def bound(a: QTensor, b: QTensor, extra: int = 2) -> torch.Tensor:
    """gamma_{K+extra} * (|A| @ |B|^T), per output, float64."""
    magnitudes = dequantize(a, torch.float64).abs() @ dequantize(b, torch.float64).abs().T
    return gamma(a.shape[1] + extra) * magnitudes


def operands(fa, ea, fb, eb, m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # rows of different magnitudes, so scales differ from block to block
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, m)[:, None]
    w = torch.randn(n, k, generator=gen) * torch.logspace(2, -2, n)[:, None]
    return quantize(x, fa, elem=ea), quantize(w, fb, elem=eb)


def assert_within(out: torch.Tensor, ref: torch.Tensor, limit: torch.Tensor) -> None:
    err = (out.double() - ref).abs()
    worst = (err - limit).argmax()
    assert bool((err <= limit).all()), (
        f"error {err.flatten()[worst].item():.3e} > bound {limit.flatten()[worst].item():.3e} "
        f"at flat index {worst.item()}"
    )


# ------------------------------------------------------------------------- the formats


def test_fp4_packs_low_nibble_first_and_decodes_per_spec():
    # codes 1 (0.5) then 2 (1.0) in byte 0x21; 0xF = -6, 0x8 = -0
    data = torch.tensor([[0x21, 0x8F]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    scale = torch.tensor([[128]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2^1
    q = QTensor(data, scale, "mxfp4", (1, 4))
    assert dequantize(q).tolist() == [[1.0, 2.0, -12.0, -0.0]]
    nv = QTensor(data, torch.tensor([[1.5]]).to(torch.float8_e4m3fn), "nvfp4", (1, 4), torch.tensor(0.25))
    assert dequantize(nv).tolist() == [[0.5 * 1.5 * 0.25, 1.5 * 0.25, -6 * 1.5 * 0.25, -0.0]]


@pytest.mark.parametrize("fmt", ["fp8-1x128", "fp8-128x128", "mxfp8", "mxfp4", "nvfp4"])
def test_quantize_round_trip_is_close(fmt):
    x = torch.randn(70, 200, generator=torch.Generator().manual_seed(1))
    rel = ((dequantize(quantize(x, fmt)) - x).norm() / x.norm()).item()
    assert rel < (0.15 if fmt.endswith("fp4") else 0.04), rel


# -------------------------------------------------------------------- op vs reference


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("fa,ea,fb,eb", PAIRS, ids=PAIR_IDS)
def test_matches_float64_reference_within_bound(fa, ea, fb, eb, m, n, k):
    a, b = operands(fa, ea, fb, eb, m, n, k, seed=m + n + k)
    out = qmm(a, b)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert_within(out, qmm_reference(a, b), bound(a, b))


def test_bfloat16_output_and_threads_agree():
    a, b = operands("fp8-1x128", "e4m3", "fp8-128x128", "e4m3", 40, 70, 260)
    full = qmm(a, b)
    assert torch.equal(qmm(a, b, out_dtype=torch.bfloat16), full.to(torch.bfloat16))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(qmm(a, b), full)  # the same sums whatever the split
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cpu_rowwise", [True, False], ids=["torch-scaled-mm", "float32-fallback"])
@pytest.mark.parametrize("fa,fb", [("fp8-tensor", "fp8-tensor"), ("fp8-row", "fp8-row"), ("fp8-row", "fp8-tensor"), ("fp8-tensor", "fp8-row")])
def test_tensor_and_row_scales_go_through_scaled_mm(fa, fb, cpu_rowwise, monkeypatch):
    # A torch whose CPU _scaled_mm refuses row-wise scales (2.11) takes the float32 fallback: forced here on
    # any torch, it must meet the same bound.
    import plait.ops.qgemm as qgemm

    if not cpu_rowwise:
        monkeypatch.setattr(qgemm, "_cpu_rowwise_scaled_mm", lambda: False)
    elif not qgemm._cpu_rowwise_scaled_mm() and "fp8-row" in (fa, fb):
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only (the fallback case covers it)")
    a, b = operands(fa, "e4m3", fb, "e5m2", 33, 20, 100)
    ref = qmm_reference(a, b)
    assert_within(qmm(a, b), ref, bound(a, b))
    # bfloat16 output: one more rounding of each output (relative 2^-9)
    assert_within(qmm(a, b, out_dtype=torch.bfloat16), ref, bound(a, b) + ref.abs() * 2.0**-8)


def test_empty_shapes():
    for m, n in ((0, 5), (4, 0)):
        a, b = operands("mxfp8", "e4m3", "mxfp8", "e4m3", m, n, 64)
        assert qmm(a, b).shape == (m, n)


def test_nan_block_spreads_to_its_row_only():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(8, 96, generator=gen), torch.randn(5, 96, generator=gen)
    x[3, 40] = float("nan")
    for fmt in ("fp8-1x128", "mxfp8", "mxfp4"):
        out = qmm(quantize(x, fmt), quantize(w, "fp8-128x128" if fmt == "fp8-1x128" else fmt))
        assert bool(out[3].isnan().all()), fmt
        assert bool(torch.cat([out[:3], out[4:]]).isfinite().all()), fmt


# ---------------------------------------------------------------------------- grouped


@pytest.mark.parametrize("fa,ea,fb,eb", PAIRS, ids=PAIR_IDS)
def test_grouped_matches_reference_and_per_expert_qmm(fa, ea, fb, eb):
    gen = torch.Generator().manual_seed(5)
    offsets = [0, 0, 9, 9, 40, 41, 41]  # empty groups first, in the middle and last
    m, n, k = offsets[-1], 45, 160
    a = quantize(torch.randn(m, k, generator=gen), fa, elem=ea)
    experts = [quantize(torch.randn(n, k, generator=gen) * (e + 1), fb, elem=eb) for e in range(len(offsets) - 1)]
    out = qmm_grouped(a, experts, torch.tensor(offsets))
    ref = qmm_grouped_reference(a, experts, offsets)
    limit = torch.zeros(m, n, dtype=torch.float64)
    for e, expert in enumerate(experts):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            rows = QTensor(a.data[lo:hi], a.scale[lo:hi], a.fmt, (hi - lo, k), a.global_scale)
            limit[lo:hi] = bound(rows, expert)
            assert torch.equal(out[lo:hi], qmm(rows, expert)), e
    assert_within(out, ref, limit)


def test_grouped_without_rows():
    a, b = operands("mxfp8", "e4m3", "mxfp8", "e4m3", 0, 6, 64)
    assert qmm_grouped(a, [b, b], [0, 0, 0]).shape == (0, 6)


# ----------------------------------------------------------------------------- errors


def _op(a, b, a_fmt=None, b_fmt=None, a_global=None, b_global=None):
    return torch.ops.plait.block_scaled_mm(
        a.data, a.scale, b.data, b.scale, a_fmt or a.fmt, b_fmt or b.fmt, a_global, b_global
    )


def test_bad_arguments_raise_named_errors():
    a, b = operands("fp8-1x128", "e4m3", "fp8-128x128", "e4m3", 4, 6, 64)
    mx_a, mx_b = operands("mxfp8", "e4m3", "mxfp8", "e4m3", 4, 6, 64)
    nv_a, nv_b = operands("nvfp4", "e4m3", "nvfp4", "e4m3", 4, 6, 64)
    with pytest.raises(RuntimeError, match="a_fmt 'fp8-1x64' is not a block-scaled format; accepted"):
        _op(a, b, a_fmt="fp8-1x64")
    with pytest.raises(RuntimeError, match="fp8-row go through torch._scaled_mm"):
        _op(a, b, b_fmt="fp8-row")
    with pytest.raises(RuntimeError, match="a_fmt fp8-128x128 is accepted for b only"):
        _op(b, b, a_fmt="fp8-128x128")
    with pytest.raises(RuntimeError, match="the pair a_fmt mxfp8 x b_fmt fp8-1x128 is not supported"):
        _op(mx_a, a)
    with pytest.raises(RuntimeError, match="a in fp8-1x128 must be float8_e4m3fn or float8_e5m2, got Float"):
        _op(QTensor(a.data.float(), a.scale, a.fmt, a.shape), b)
    with pytest.raises(RuntimeError, match=r"a in mxfp4 must be float4_e2m1fn_x2 \(two E2M1 codes per byte, so K is even\)"):
        torch.ops.plait.block_scaled_mm(nv_a.data.view(torch.uint8), mx_a.scale, nv_b.data, mx_b.scale, "mxfp4", "mxfp4", None, None)
    with pytest.raises(RuntimeError, match=r"b_scale in fp8-128x128 must have shape \[1, 1\]"):
        _op(a, QTensor(b.data, b.scale.expand(6, 1).contiguous(), b.fmt, b.shape))
    with pytest.raises(RuntimeError, match="a_scale in mxfp8 must be Float8_e8m0fnu, got Float"):
        _op(QTensor(mx_a.data, mx_a.scale.float(), "mxfp8", mx_a.shape), mx_b)
    short = quantize(torch.randn(6, 32), "fp8-128x128")
    with pytest.raises(RuntimeError, match=r"K mismatch: a has K = 64 .* but b has K = 32"):
        _op(a, short)
    with pytest.raises(RuntimeError, match="a must be contiguous"):
        _op(QTensor(a.data.t().contiguous().t(), a.scale, a.fmt, a.shape), b)
    with pytest.raises(RuntimeError, match="b_global is required for nvfp4"):
        _op(nv_a, nv_b, a_global=nv_a.global_scale)
    with pytest.raises(RuntimeError, match="a_global is only for nvfp4"):
        _op(mx_a, mx_b, a_global=torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="a_global must be float32 0-d"):
        _op(nv_a, nv_b, a_global=torch.ones(1), b_global=nv_b.global_scale)
    with pytest.raises(ValueError, match="K mismatch"):
        qmm(a, short)
    with pytest.raises(ValueError, match="fp8-tensor and fp8-row pair only with each other"):
        qmm(quantize(torch.randn(4, 64), "fp8-row"), b)
    with pytest.raises(RuntimeError, match="x must have an even number of columns K"):
        quantize(torch.randn(4, 33), "nvfp4")


def test_bad_offsets_raise_named_errors():
    a, b = operands("mxfp8", "e4m3", "mxfp8", "e4m3", 10, 6, 64)
    with pytest.raises(RuntimeError, match=r"offsets must be int64 \[E \+ 1\] = \[3\]"):
        qmm_grouped(a, [b, b], torch.tensor([0, 10]))
    with pytest.raises(RuntimeError, match="offsets must start at 0 and end at M = 10"):
        qmm_grouped(a, [b, b], [0, 4, 9])
    with pytest.raises(RuntimeError, match=r"offsets must be non-decreasing, got offsets\[0\] = 0 > offsets\[1\] = -1|start at 0"):
        qmm_grouped(a, [b, b], [0, -1, 10])
    with pytest.raises(RuntimeError, match=r"b_global must be float32 \[E\]"):
        nv_a, nv_b = operands("nvfp4", "e4m3", "nvfp4", "e4m3", 10, 6, 64)
        stacked = QTensor(nv_b.data[None], nv_b.scale[None], "nvfp4", nv_b.shape, nv_b.global_scale)
        qmm_grouped(nv_a, stacked, [0, 10])


# ----------------------------------------------------------------------- fake kernels


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, b = operands("nvfp4", "e4m3", "nvfp4", "e4m3", 9, 6, 64)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = _op(a, b, a_global=a.global_scale, b_global=b.global_scale)
        grouped = torch.ops.plait.block_scaled_grouped_mm(
            a.data, a.scale, b.data[None], b.scale[None], torch.tensor([0, 9]), "nvfp4", "nvfp4",
            a.global_scale, b.global_scale[None],
        )
    assert out.shape == (9, 6) and out.dtype == torch.float32
    assert grouped.shape == (9, 6)


# test_schema is left out: it compares inputs with ops that have no float8 / float4 kernels.
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("fmt", ["fp8-1x128", "nvfp4"])
def test_opcheck(fmt):
    a, b = operands(fmt, "e4m3", fmt, "e4m3", 9, 6, 64)
    torch.library.opcheck(
        torch.ops.plait.block_scaled_mm.default,
        (a.data, a.scale, b.data, b.scale, fmt, fmt, a.global_scale, b.global_scale),
        test_utils=OPCHECK_UTILS,
    )
    gb = None if b.global_scale is None else b.global_scale[None].expand(2).contiguous()
    torch.library.opcheck(
        torch.ops.plait.block_scaled_grouped_mm.default,
        (a.data, a.scale, torch.stack([b.data] * 2), torch.stack([b.scale] * 2), torch.tensor([0, 4, 9]),
         fmt, fmt, a.global_scale, gb),
        test_utils=OPCHECK_UTILS,
    )


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fa,ea,fb,eb", PAIRS, ids=PAIR_IDS)
def test_cuda_matches_cpu(fa, ea, fb, eb):
    def to_cuda(q: QTensor) -> QTensor:
        g = None if q.global_scale is None else q.global_scale.cuda()
        return QTensor(q.data.cuda(), q.scale.cuda(), q.fmt, q.shape, g)

    for m, n, k in SHAPES:
        a, b = operands(fa, ea, fb, eb, m, n, k, seed=k)
        ref, limit = qmm_reference(a, b), 2 * bound(a, b, extra=5)
        got = qmm(to_cuda(a), to_cuda(b)).cpu()
        assert_within(got, ref, limit)
        assert_within(got, qmm(a, b).double(), 2 * limit)
    a = quantize(torch.randn(41, 96), fa, elem=ea)
    experts = [quantize(torch.randn(30, 96), fb, elem=eb) for _ in range(3)]
    offsets = [0, 20, 20, 41]
    got = qmm_grouped(to_cuda(a), [to_cuda(e) for e in experts], torch.tensor(offsets).cuda()).cpu()
    limit = torch.cat([
        2 * bound(QTensor(a.data[lo:hi], a.scale[lo:hi], a.fmt, (hi - lo, 96), a.global_scale), e, extra=5)
        for e, lo, hi in zip(experts, offsets[:-1], offsets[1:])
    ])
    assert_within(got, qmm_grouped_reference(a, experts, offsets), limit)
