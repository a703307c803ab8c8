"""plait::quantize_* / dequantize_* (FP8, MXFP8, MXFP4, NVFP4) on CPU: bit-exact against
the NumPy references of plait.ops.quant_reference over every code, ties, saturation,
subnormals, zero and non-finite blocks, random blocks with outliers, partial blocks,
bfloat16 input and both roundings; round-trip error bounds, unbiased stochastic rounding,
argument errors and fake kernels; the CUDA kernels against the CPU ones where a GPU is
present."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from plait.ops import quant_reference as ref
from plait.ops.quant import FORMATS, QTensor, amax_stats, dequantize, quantize

FP8_ELEMENTS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FMAX = {"e4m3": 448.0, "e5m2": 57344.0, "e2m1": 6.0}
MAX_CODE = {"e4m3": 0x7E, "e5m2": 0x7B, "e2m1": 0x7}
MBITS_EMIN = {"e4m3": (3, -6), "e5m2": (2, -14), "e2m1": (1, 0)}
# (fmt, elem) pairs: every format, both FP8 elements for the fp8-* granularities.
CASES = [(f, e) for f in FORMATS if f.startswith("fp8-") for e in ("e4m3", "e5m2")] + [
    ("mxfp8", "e4m3"),
    ("mxfp4", "e2m1"),
    ("nvfp4", "e2m1"),
]


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()


def _kernel(x: torch.Tensor, fmt: str, elem: str, stochastic: bool = False, seed: int = 0) -> tuple:
    """(data bytes, scale as bytes or float32 bits, global scale bits or None)."""
    q = quantize(x, fmt, elem=elem if fmt.startswith("fp8-") else "e4m3",
                 rounding="stochastic" if stochastic else "nearest", seed=seed)
    scale = q.scale.numpy().view(np.uint32) if q.scale.dtype == torch.float32 else _bytes(q.scale)
    g = None if q.global_scale is None else q.global_scale.numpy().view(np.uint32)
    return _bytes(q.data), scale, g


def _reference(x: torch.Tensor, fmt: str, elem: str, stochastic: bool = False, seed: int = 0) -> tuple:
    xf = x.float().numpy()
    if fmt.startswith("fp8-"):
        data, scale = ref.quantize_fp8_reference(xf, fmt[4:], elem, stochastic, seed)
        return data, np.asarray(scale, dtype=np.float32).view(np.uint32), None
    if fmt == "nvfp4":
        data, scale, g = ref.quantize_nvfp4_reference(xf, stochastic, seed)
        return data, scale, np.asarray(g, dtype=np.float32).view(np.uint32)
    return (*ref.quantize_mx_reference(xf, elem, stochastic, seed), None)


def _reference_decode(data: np.ndarray, scale: np.ndarray, g, fmt: str, elem: str) -> np.ndarray:
    if fmt.startswith("fp8-"):
        return ref.dequantize_fp8_reference(data, scale.view(np.float32), fmt[4:], elem)
    if fmt == "nvfp4":
        return ref.dequantize_nvfp4_reference(data, scale, g.view(np.float32))
    return ref.dequantize_mx_reference(data, scale, elem)


def _assert_matches_reference(x: torch.Tensor, fmt: str, elem: str, stochastic=False, seed=0) -> None:
    got, want = _kernel(x, fmt, elem, stochastic, seed), _reference(x, fmt, elem, stochastic, seed)
    for name, a, b in zip(("data", "scale", "global_scale"), got, want):
        if b is None:
            assert a is None
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{fmt} {elem} {name}")
    q = quantize(x, fmt, elem=elem if fmt.startswith("fp8-") else "e4m3",
                 rounding="stochastic" if stochastic else "nearest", seed=seed)
    np.testing.assert_array_equal(dequantize(q).numpy(), _reference_decode(*want, fmt, elem))
    np.testing.assert_array_equal(
        dequantize(q, torch.bfloat16).float().numpy(), dequantize(q).to(torch.bfloat16).float().numpy()
    )


def _with_scale_one(values: np.ndarray, elem: str, fmt: str | None = None) -> torch.Tensor:
    """Rows [fmax, value]: each block's amax is fmax, so its scale is exactly 1 (FP8:
    fmax / fmax; MX: floor(log2 fmax) = emax_elem)."""
    values = np.asarray(values, dtype=np.float32)
    return torch.from_numpy(np.stack([np.full_like(values, FMAX[elem]), values], axis=1))


# ------------------------------------------------------------------------------ tables


def test_fp8_tables_match_torch_float8():
    for elem, dtype in FP8_ELEMENTS.items():
        torch_values = torch.arange(256, dtype=torch.uint8).view(dtype).double().numpy()
        np.testing.assert_array_equal(ref.decode_table(elem), torch_values)


def test_e2m1_and_e8m0_tables():
    values = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    np.testing.assert_array_equal(ref.decode_table("e2m1"), values + [-v for v in values])
    torch_e8m0 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e8m0fnu).float().numpy()
    np.testing.assert_array_equal(ref.decode_e8m0(np.arange(256)), torch_e8m0)


def test_reference_encode_matches_torch_casts():
    """The independent nearest search agrees with torch's own satfinite-free casts on
    values inside the range."""
    rng = np.random.default_rng(0)
    for elem, dtype in FP8_ELEMENTS.items():
        v = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-7, 5, 20000)).astype(np.float32)
        v = np.clip(v, -FMAX[elem], FMAX[elem])
        want = torch.from_numpy(v).to(dtype).view(torch.uint8).numpy()
        np.testing.assert_array_equal(ref.encode_reference(v, elem), want)


# ----------------------------------------------------------------------- every code


@pytest.mark.parametrize(
    ("fmt", "elem"), [("fp8-row", "e4m3"), ("fp8-row", "e5m2"), ("fp8-1x128", "e4m3"), ("fp8-1x128", "e5m2"), ("mxfp8", "e4m3")]
)
def test_every_fp8_code_decodes_and_reencodes(fmt, elem):
    table = ref.decode_table(elem)
    finite = np.flatnonzero(np.isfinite(table))
    # One row of every finite code with fmax in each block of 32: scale exactly 1.
    values = table[finite].astype(np.float32)
    pad = (-len(values)) % 31
    values = np.concatenate([values, np.zeros(pad, np.float32)]).reshape(-1, 31)
    x = np.concatenate([np.full((values.shape[0], 1), FMAX[elem], np.float32), values], axis=1)
    x = torch.from_numpy(x.reshape(1, -1))
    data, _, _ = _kernel(x, fmt, elem)
    expected = np.concatenate([np.full((values.shape[0], 1), MAX_CODE[elem]),
                               np.concatenate([finite, np.zeros(pad, int)]).reshape(-1, 31)], axis=1)
    np.testing.assert_array_equal(data.reshape(-1), expected.reshape(-1).astype(np.uint8))
    _assert_matches_reference(x, fmt, elem)
    # Decode of all 256 codes (NaN codes and E5M2 infinities too) at scale 1.
    codes = torch.arange(256, dtype=torch.uint8).reshape(1, 256).view(FP8_ELEMENTS[elem])
    if fmt == "mxfp8":
        q = QTensor(codes, torch.full((1, 8), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu), fmt, (1, 256))
    else:
        scale = torch.ones((), dtype=torch.float32) if fmt == "fp8-tensor" else torch.ones(1, 1 if fmt == "fp8-row" else 2)
        q = QTensor(codes, scale, fmt, (1, 256))
    np.testing.assert_array_equal(dequantize(q).double().numpy()[0], table)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_every_fp4_code_decodes_and_reencodes(fmt):
    table = ref.decode_table("e2m1").astype(np.float32)
    x = torch.from_numpy(np.tile(table, (3, 2)))  # rows of 32: 16 codes twice, amax 6
    data, scale, g = _kernel(x, fmt, "e2m1")
    packed = np.arange(16, dtype=np.uint8)
    np.testing.assert_array_equal(data, np.tile(packed[0::2] | (packed[1::2] << 4), (3, 2)))
    _assert_matches_reference(x, fmt, "e2m1")
    if fmt == "mxfp4":
        assert (scale == 127).all()
        all_bytes = torch.arange(256, dtype=torch.uint8).reshape(2, 128).view(torch.float4_e2m1fn_x2)
        e8m0 = torch.full((2, 8), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        got = dequantize(QTensor(all_bytes, e8m0, fmt, (2, 256))).numpy().reshape(-1, 2)
        byte = np.arange(256)
        np.testing.assert_array_equal(got, np.stack([table[byte & 0xF], table[byte >> 4]], axis=1))


def test_every_e8m0_scale_code():
    # Decode: data of ones, scale codes 0..255 (255 = NaN).
    ones = torch.full((256, 32), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)  # E4M3 1.0
    codes = torch.arange(256, dtype=torch.uint8).reshape(256, 1)
    got = dequantize(QTensor(ones, codes.view(torch.float8_e8m0fnu), "mxfp8", (256, 32))).numpy()
    want = ref.decode_e8m0(np.arange(256))
    np.testing.assert_array_equal(got, np.repeat(want[:, None], 32, axis=1))
    assert np.isnan(got[255]).all() and got[0, 0] == np.float32(2.0**-127)
    # Encode: block amax 2^k for every float32 binade (subnormals too); X clamped at -127.
    for elem, fmt, emax in (("e4m3", "mxfp8", 8), ("e2m1", "mxfp4", 2)):
        k = np.arange(-149, 128)
        x = torch.from_numpy(np.ldexp(np.float32(1), k).astype(np.float32)[:, None].repeat(32, axis=1))
        _, scale, _ = _kernel(x, fmt, elem)
        np.testing.assert_array_equal(scale[:, 0], np.clip(k - emax, -127, 127) + 127)
        _assert_matches_reference(x, fmt, elem)


# ------------------------------------------------------- ties, saturation, subnormals


@pytest.mark.parametrize("elem", ["e4m3", "e5m2", "e2m1"])
def test_midpoints_round_to_even(elem):
    table = ref.decode_table(elem)[: MAX_CODE[elem] + 1]
    lo, hi = table[:-1], table[1:]
    mid = ((lo + hi) / 2).astype(np.float32)
    assert np.array_equal(mid.astype(np.float64), (lo + hi) / 2)  # exact in float32
    even = np.where(np.arange(len(lo)) % 2 == 0, np.arange(len(lo)), np.arange(len(lo)) + 1)
    below, above = np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))
    fmt = {"e4m3": "fp8-row", "e5m2": "fp8-row", "e2m1": "mxfp4"}[elem]
    sign_bit = {"e4m3": 0x80, "e5m2": 0x80, "e2m1": 0x8}[elem]
    for values, want in ((mid, even), (below, np.arange(len(lo))), (above, np.arange(len(lo)) + 1)):
        for sign in (1, -1):
            x = _with_scale_one(sign * values, elem)
            data, _, _ = _kernel(x, fmt, elem)
            if elem == "e2m1":
                got = data[:, 0] >> 4
            else:
                got = data[:, 1]
            np.testing.assert_array_equal(got, want + (sign_bit if sign < 0 else 0))
            _assert_matches_reference(x, fmt, elem)


@pytest.mark.parametrize("stochastic", [False, True])
def test_values_beyond_max_saturate(stochastic):
    # MX: a block amax of 1.9 * 2^emax is above max (1.75 / 1.5 * 2^emax) at scale 1.
    for fmt, elem, top in (("mxfp8", "e4m3", 1.9 * 256), ("mxfp4", "e2m1", 7.9)):
        x = torch.tensor([[top, -top, FMAX[elem] * 1.01, 1.0] * 8])
        data, scale, _ = _kernel(x, fmt, elem, stochastic, seed=3)
        assert scale[0, 0] == 127
        q = dequantize(quantize(x, fmt, rounding="stochastic" if stochastic else "nearest", seed=3))
        np.testing.assert_array_equal(q.numpy()[0, :3], [FMAX[elem], -FMAX[elem], FMAX[elem]])
        _assert_matches_reference(x, fmt, elem, stochastic, seed=3)
    # FP8: x / (amax / fmax) may land a hair above fmax; it must saturate, never NaN/inf.
    rng = np.random.default_rng(1)
    amax = (rng.uniform(1, 2, 4000) * 2.0 ** rng.integers(-100, 100, 4000)).astype(np.float32)
    x = torch.from_numpy(np.stack([amax, -amax], axis=1))
    for elem in ("e4m3", "e5m2"):
        data, _, _ = _kernel(x, "fp8-row", elem, stochastic, seed=4)
        assert set(np.unique(data[:, 0])) <= {MAX_CODE[elem], MAX_CODE[elem] - 1}
        assert set(np.unique(data[:, 1] & 0x7F)) <= {MAX_CODE[elem], MAX_CODE[elem] - 1}
        _assert_matches_reference(x, "fp8-row", elem, stochastic, seed=4)


@pytest.mark.parametrize("elem", ["e4m3", "e5m2"])
def test_subnormals_and_signed_zero(elem):
    mbits, emin = MBITS_EMIN[elem]
    tiny = 2.0 ** (emin - mbits)  # smallest subnormal
    values = np.array([tiny, 2 * tiny, 3 * tiny, 0.5 * tiny, 0.50001 * tiny, 0.49 * tiny, 1.5 * tiny,
                       2.5 * tiny, 0.0, -0.0, -tiny, -0.25 * tiny], dtype=np.float32)
    x = _with_scale_one(values, elem)
    data, _, _ = _kernel(x, "fp8-row", elem)
    np.testing.assert_array_equal(data[:, 1], [1, 2, 3, 0, 1, 0, 2, 2, 0, 0x80, 0x81, 0x80])
    _assert_matches_reference(x, "fp8-row", elem)


@pytest.mark.parametrize(("fmt", "elem"), CASES)
def test_zero_blocks(fmt, elem):
    x = torch.zeros(3, 64)
    data, scale, g = _kernel(x, fmt, elem)
    assert (data == 0).all()
    if fmt.startswith("fp8-"):
        assert (scale.view(np.float32) == 1).all()
    else:
        assert (scale == 0).all()
    if g is not None:
        assert g.view(np.float32) == 1
    _assert_matches_reference(x, fmt, elem)


@pytest.mark.parametrize(("fmt", "elem"), CASES)
def test_scale_underflow_becomes_one(fmt, elem):
    """An amax so small that amax / fmax (or the NVFP4 global amax / 2688) is 0 in float32
    gets scale 1, like an all-zero block: the block quantizes to zeros, not NaN."""
    x = torch.zeros(2, 64)
    x[0, 5], x[1, 40] = 1e-44, -3e-45
    data, scale, g = _kernel(x, fmt, elem)
    if fmt.startswith("fp8-"):
        assert (scale.view(np.float32) == 1).all()
    if g is not None:
        assert g.view(np.float32) == 1
    np.testing.assert_array_equal(np.abs(dequantize(quantize(x, fmt, elem=elem if fmt.startswith("fp8-") else "e4m3")).numpy()), 0)
    _assert_matches_reference(x, fmt, elem)


@pytest.mark.parametrize(("fmt", "elem"), CASES)
def test_non_finite_blocks_decode_to_nan(fmt, elem):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    x[1, 3] = float("nan")
    x[2, 40] = float("inf")
    x[3, 0] = float("-inf")
    q = quantize(x, fmt, elem=elem if fmt.startswith("fp8-") else "e4m3")
    decoded = dequantize(q)
    bad = torch.zeros_like(x, dtype=torch.bool)
    for r, c in ((1, 3), (2, 40), (3, 0)):
        if fmt in ("fp8-tensor", "nvfp4"):
            bad[:] = True
        elif fmt == "fp8-128x128":
            bad[:, (c // 128) * 128 : (c // 128 + 1) * 128] = True
        elif fmt == "fp8-row":
            bad[r] = True
        else:
            width = {"fp8-1x128": 128, "mxfp8": 32, "mxfp4": 32}[fmt]
            bad[r, (c // width) * width : (c // width + 1) * width] = True
    assert torch.isnan(decoded[bad]).all() and torch.isfinite(decoded[~bad]).all()
    if fmt in ("mxfp8", "mxfp4"):
        assert _bytes(q.scale)[1, 0] == 0xFF and _bytes(q.scale)[2, 1] == 0xFF
    if fmt == "nvfp4":
        assert (_bytes(q.scale) == 0x7F).all() and torch.isnan(q.global_scale)
    # MX blocks whose amax mantissa exceeds the element's max mantissa also saturate.
    overflow, bad_fraction = float(amax_stats(x, q).overflow), bad.float().mean().item()
    if fmt.startswith("mx"):
        assert bad_fraction <= overflow < bad_fraction + 0.05
    else:
        assert overflow == pytest.approx(bad_fraction)
    _assert_matches_reference(x, fmt, elem)


# --------------------------------------------------------------- random blocks vs reference


def _random_blocks(shape, dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], 1, generator=gen) * 3)
    outliers = torch.rand(shape, generator=gen) < 0.01
    x[outliers] *= 1000.0
    x[:, -5:] *= 1e-6  # tiny values in the partial trailing block
    return x.to(dtype)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("fmt", "elem"), CASES)
def test_random_blocks_match_reference(fmt, elem, dtype, stochastic):
    # 130 x 296: partial 128-row and 128/32/16-column trailing blocks.
    x = _random_blocks((130, 296), dtype, seed=len(fmt) + len(elem))
    _assert_matches_reference(x, fmt, elem, stochastic, seed=-12345)


def test_stochastic_seed_changes_bits_deterministically():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    a = _kernel(x, "mxfp8", "e4m3", True, seed=1)[0]
    assert np.array_equal(a, _kernel(x, "mxfp8", "e4m3", True, seed=1)[0])
    assert not np.array_equal(a, _kernel(x, "mxfp8", "e4m3", True, seed=2)[0])
    np.testing.assert_array_equal(ref.stochastic_bits(2**63 + 5, np.arange(4)), ref.stochastic_bits(-(2**63) + 5, np.arange(4)))


# ------------------------------------------------------------------- error bounds


def _element_scale(q: QTensor, shape) -> np.ndarray:
    """Each element's decode scale s (x ~ q * s)."""
    rows, cols = shape
    if q.fmt == "nvfp4":
        sb = ref.decode_table("e4m3")[_bytes(q.scale)] * float(q.global_scale)
        return np.repeat(sb, 16, axis=1)[:, :cols]
    if q.fmt in ("mxfp8", "mxfp4"):
        return np.repeat(ref.decode_e8m0(_bytes(q.scale)), 32, axis=1)[:, :cols].astype(np.float64)
    s = q.scale.double().numpy().reshape(q.scale.shape or (1, 1))
    block_rows = {"fp8-tensor": rows, "fp8-row": 1, "fp8-1x128": 1, "fp8-128x128": 128}[q.fmt]
    block_cols = {"fp8-tensor": cols, "fp8-row": cols}.get(q.fmt, 128)
    return np.repeat(np.repeat(s, block_rows, axis=0), block_cols, axis=1)[:rows, :cols]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize(("fmt", "elem"), CASES)
def test_round_trip_error_within_half_an_ulp(fmt, elem, rounding):
    """|x - dequantize(quantize(x))| <= ulp(x / s) * s / 2 (a whole ulp when stochastic)
    for every element not saturated, plus float32 rounding of x / s and of q * s."""
    x = _random_blocks((130, 296), torch.float32, seed=7)
    q = quantize(x, fmt, elem=elem if fmt.startswith("fp8-") else "e4m3", rounding=rounding, seed=9)
    xs, decoded = x.double().numpy(), dequantize(q).double().numpy()
    s = _element_scale(q, x.shape)
    mbits, emin = MBITS_EMIN[elem]
    with np.errstate(divide="ignore", invalid="ignore"):  # s = 0: NVFP4 blocks of zeros
        scaled = np.abs(xs) / s
        exponent = np.maximum(np.floor(np.log2(np.where(scaled > 0, scaled, 1.0))), emin)
        ulp = 2.0 ** (exponent - mbits)
        bound = (0.5 if rounding == "nearest" else 1.0) * ulp * s * (1 + 2.0**-20) + 2.0**-140
    in_range = (scaled <= FMAX[elem]) & (s > 0)
    err = np.abs(xs - decoded)
    assert (err[in_range] <= bound[in_range]).all(), float((err - bound)[in_range].max())
    # saturated elements decode to +-max * s
    assert (np.abs(decoded[~in_range & (s > 0)]) <= FMAX[elem] * s[~in_range & (s > 0)] * (1 + 2.0**-20)).all()


@pytest.mark.parametrize(
    ("fmt", "elem", "value"),
    [("fp8-row", "e4m3", 1.3), ("fp8-row", "e5m2", -0.0123), ("fp8-row", "e4m3", 0.0031),
     ("mxfp4", "e2m1", 2.4), ("mxfp4", "e2m1", -0.1)],
)
def test_stochastic_rounding_is_unbiased(fmt, elem, value):
    """The mean of n stochastic roundings of v: ups ~ Binomial(n, p), p = (|v| - lo) /
    (hi - lo) (to 2^-24), so |mean - v| <= (hi - lo) (6 sqrt(p (1 - p) / n) + 2^-24)."""
    n = 1 << 16
    v = np.float32(value)
    x = torch.from_numpy(np.tile(np.array([FMAX[elem]] + [v] * 31, np.float32), n // 31 + 1)[None, : 32 * (n // 32)])
    q = quantize(x, fmt, elem=elem if fmt.startswith("fp8-") else "e4m3", rounding="stochastic", seed=11)
    decoded = dequantize(q).double().numpy()[0].reshape(-1, 32)[:, 1:].reshape(-1)
    table = ref.decode_table(elem)[: MAX_CODE[elem] + 1]
    a = abs(float(v))
    lo = table[np.searchsorted(table, a, side="right") - 1]
    hi = table[np.searchsorted(table, a, side="right")]
    p = (a - lo) / (hi - lo)
    assert set(np.unique(np.abs(decoded))) == {lo, hi}
    bound = (hi - lo) * (6 * math.sqrt(p * (1 - p) / decoded.size) + 2.0**-24)
    assert abs(decoded.mean() - float(v)) <= bound


def test_amax_stats_counts_saturation_and_underflow():
    x = torch.tensor([[1.9 * 256, 1.0, 1e-9, 0.0] * 8])
    stats = amax_stats(x, quantize(x, "mxfp8"))
    assert float(stats.overflow) == pytest.approx(8 / 32) and float(stats.underflow) == pytest.approx(8 / 32)
    y = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    stats = amax_stats(y, quantize(y, "fp8-row"))
    assert float(stats.overflow) == 0 and float(stats.underflow) == 0


# ---------------------------------------------------------------------- argument errors


def test_bad_arguments_name_the_argument():
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        torch.ops.plait.quantize_fp8(torch.randn(64), "row", "e4m3")
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        torch.ops.plait.quantize_mx(x.double(), "e4m3")
    with pytest.raises(RuntimeError, match="x must have at least one column"):
        torch.ops.plait.quantize_fp8(torch.randn(4, 0), "tensor", "e4m3")
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.plait.quantize_nvfp4(torch.randn(64, 4).t())
    with pytest.raises(RuntimeError, match="granularity must be one of"):
        torch.ops.plait.quantize_fp8(x, "1x64", "e4m3")
    with pytest.raises(RuntimeError, match="elem must be"):
        torch.ops.plait.quantize_fp8(x, "row", "e3m4")
    with pytest.raises(RuntimeError, match="even number of columns"):
        torch.ops.plait.quantize_nvfp4(torch.randn(4, 33))
    with pytest.raises(RuntimeError, match="even number of columns"):
        torch.ops.plait.quantize_mx(torch.randn(4, 33), "e2m1")
    q = quantize(x, "fp8-1x128")
    with pytest.raises(RuntimeError, match=r"scale must have shape \[4, 1\]"):
        torch.ops.plait.dequantize_fp8(q.data, torch.ones(4, 2), "1x128", torch.float32)
    with pytest.raises(RuntimeError, match="data must be torch.float8_e4m3fn or torch.float8_e5m2"):
        torch.ops.plait.dequantize_fp8(q.data.view(torch.uint8), q.scale, "1x128", torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be torch.float32 or torch.bfloat16"):
        torch.ops.plait.dequantize_fp8(q.data, q.scale, "1x128", torch.float16)
    mx = quantize(x, "mxfp4")
    with pytest.raises(RuntimeError, match="scale must be torch.float8_e8m0fnu"):
        torch.ops.plait.dequantize_mx(mx.data, mx.scale.view(torch.uint8), torch.float32)
    nv = quantize(x, "nvfp4")
    with pytest.raises(RuntimeError, match="global_scale must be a float32 0-d tensor"):
        torch.ops.plait.dequantize_nvfp4(nv.data, nv.scale, nv.global_scale.reshape(1), torch.float32)
    with pytest.raises(ValueError, match="did you mean 'mxfp4'"):
        quantize(x, "mxfp-4")
    with pytest.raises(ValueError, match="rounding must be one of"):
        quantize(x, "mxfp8", rounding="down")
    with pytest.raises(ValueError, match="seed must fit an int64"):
        quantize(x, "mxfp8", rounding="stochastic", seed=2**64)


# --------------------------------------------------------------------- fake kernels


def test_fake_kernels_match_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(130, 296)
    real = {fmt: quantize(x, fmt) for fmt in FORMATS}
    with FakeTensorMode() as mode:
        fake_x = mode.from_tensor(x)
        for fmt in FORMATS:
            fake = quantize(fake_x, fmt)
            for a, b in ((fake.data, real[fmt].data), (fake.scale, real[fmt].scale)):
                assert a.shape == b.shape and a.dtype == b.dtype, fmt
            assert dequantize(fake).shape == x.shape


def test_opcheck():
    """The dequantize ops get the fake-tensor check only: opcheck's schema check does
    arithmetic on the inputs, which torch's CPU float8 / float4 dtypes do not support."""
    x = torch.randn(5, 40)
    torch.library.opcheck(torch.ops.plait.quantize_fp8.default, (x, "1x128", "e5m2", True, 3))
    torch.library.opcheck(torch.ops.plait.quantize_mx.default, (x, "e2m1"))
    torch.library.opcheck(torch.ops.plait.quantize_nvfp4.default, (x.bfloat16(), True, 5))
    data, scale = torch.ops.plait.quantize_mx(x, "e4m3")
    fake_only = ("test_faketensor",)
    torch.library.opcheck(torch.ops.plait.dequantize_mx.default, (data, scale, torch.bfloat16), test_utils=fake_only)
    data, scale = torch.ops.plait.quantize_fp8(x, "tensor", "e4m3")
    torch.library.opcheck(
        torch.ops.plait.dequantize_fp8.default, (data, scale, "tensor", torch.float32), test_utils=fake_only
    )
    data, scale, g = torch.ops.plait.quantize_nvfp4(x)
    torch.library.opcheck(torch.ops.plait.dequantize_nvfp4.default, (data, scale, g, torch.float32), test_utils=fake_only)


# ------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("fmt", "elem"), CASES)
def test_cuda_kernels_match_cpu_kernels(fmt, elem):
    shapes = ((130, 296), (1, 2), (257, 4096 + 32 + 16 + 2), (0, 64))
    for shape, dtype, rounding in [(s, d, r) for s in shapes for d in (torch.float32, torch.bfloat16)
                                   for r in ("nearest", "stochastic")]:
        x = _random_blocks(shape, dtype, seed=1) if shape[0] else torch.zeros(shape, dtype=dtype)
        if shape[0] > 2:
            x[1, 3] = float("nan")
        kwargs = dict(elem=elem if fmt.startswith("fp8-") else "e4m3", rounding=rounding, seed=77)
        cpu, gpu = quantize(x, fmt, **kwargs), quantize(x.cuda(), fmt, **kwargs)
        assert torch.equal(_as_bytes(gpu.data.cpu()), _as_bytes(cpu.data)), (fmt, shape, dtype, rounding)
        assert torch.equal(_as_bytes(gpu.scale.cpu()), _as_bytes(cpu.scale)), (fmt, shape, dtype, rounding)
        if cpu.global_scale is not None:
            assert torch.equal(_as_bytes(gpu.global_scale.cpu()), _as_bytes(cpu.global_scale))
        for out in (torch.float32, torch.bfloat16):
            torch.testing.assert_close(dequantize(gpu, out).cpu(), dequantize(cpu, out), rtol=0, atol=0, equal_nan=True)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def test_quantize_under_deterministic_algorithms():
    """Workers run with torch.use_deterministic_algorithms(True), which fills new tensors first: the FP4 and E8M0
    outputs are allocated as bytes, so no fill kernel for those dtypes is needed."""
    x = torch.randn(8, 64)
    expected = {fmt: quantize(x, fmt) for fmt in ("mxfp4", "nvfp4", "mxfp8", "fp8-1x128")}
    torch.use_deterministic_algorithms(True)
    try:
        for fmt, ref in expected.items():
            q = quantize(x, fmt)
            assert torch.equal(q.data.view(torch.uint8), ref.data.view(torch.uint8)), fmt
            assert torch.equal(dequantize(q), dequantize(ref)), fmt
    finally:
        torch.use_deterministic_algorithms(False)
