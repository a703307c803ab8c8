"""Pure NumPy references of plait's FP8/FP4 formats, written from their specifications
and independent of the kernels' bit tricks and of torch's own float8 casts.

Code tables come from the format definitions: OCP 8-bit Floating Point (OFP8) v1.0 for
E4M3 (bias 7, no infinity, NaN = S.1111.111, max 448) and E5M2 (bias 15, IEEE-like
infinities and NaNs, max 57344); OCP Microscaling (MX) v1.0 for E2M1 (bias 1, no
infinity or NaN, max 6) and the E8M0 scale (2^(code - 127), 0xFF = NaN); NVFP4 as the
plait contract (E2M1 elements, an E4M3 scale per 16, a float32 global scale).

Encoding is an exhaustive nearest search over the sorted non-negative values of the
table in float64 (ties to the even code, values beyond max saturated), and stochastic
rounding takes the two table neighbours of |v| and the contract's hash literally. Scale
arithmetic is done in np.float32, one IEEE operation at a time, as the contract writes it.
Non-finite handling, and the two choices the contract leaves open, follow
:mod:`plait.ops.quant` (NaN elements encode to the NaN code, or 0 in E2M1; an FP8 scale or
NVFP4 global scale whose division underflows to 0 becomes 1, like amax == 0).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "decode_e8m0",
    "decode_table",
    "dequantize_fp8_reference",
    "dequantize_mx_reference",
    "dequantize_nvfp4_reference",
    "encode_reference",
    "quantize_fp8_reference",
    "quantize_mx_reference",
    "quantize_nvfp4_reference",
    "stochastic_bits",
]

# name -> (exponent bits, mantissa bits, bias, largest finite magnitude code, NaN code or None)
FORMATS = {
    "e4m3": (4, 3, 7, 0x7E, 0x7F),
    "e5m2": (5, 2, 15, 0x7B, 0x7F),
    "e2m1": (2, 1, 1, 0x7, None),
}
FP8_BLOCKS = {"row": (1, None), "1x128": (1, 128), "128x128": (128, 128)}
MX_EMAX = {"e4m3": 8, "e2m1": 2}


def decode_table(elem: str) -> np.ndarray:
    """float64 value of every code of the format (2^(1 + ebits + mbits) entries)."""
    ebits, mbits, bias, _, _ = FORMATS[elem]
    n = 1 << (ebits + mbits)
    values = np.empty(2 * n)
    for code in range(2 * n):
        sign = -1.0 if code >= n else 1.0
        exponent, mantissa = (code % n) >> mbits, code & ((1 << mbits) - 1)
        if elem == "e5m2" and exponent == (1 << ebits) - 1:
            value = np.inf if mantissa == 0 else np.nan
        elif elem == "e4m3" and code % n == n - 1:
            value = np.nan
        elif exponent == 0:
            value = mantissa * 2.0 ** (1 - bias - mbits)
        else:
            value = (1 + mantissa / 2**mbits) * 2.0 ** (exponent - bias)
        values[code] = sign * value
    return values


def decode_e8m0(codes: np.ndarray) -> np.ndarray:
    """float32 2^(code - 127); NaN for 0xFF."""
    codes = np.asarray(codes, dtype=np.int64)
    with np.errstate(over="ignore"):
        out = np.ldexp(np.float64(1.0), codes - 127).astype(np.float32)
    out[codes == 0xFF] = np.nan
    return out


def stochastic_bits(seed: int, index: np.ndarray) -> np.ndarray:
    """The contract's 24 random bits of each element index (uint64 arithmetic mod 2^64)."""
    z = (np.uint64(seed % 2**64) + (index.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z >> np.uint64(40)


def encode_reference(v: np.ndarray, elem: str, u: np.ndarray | None = None) -> np.ndarray:
    """uint8 codes of float32 values v: nearest (ties to the even code), or stochastic with
    the random bits u, then saturated to +-max; NaN to the NaN code (E2M1: 0)."""
    ebits, mbits, _, max_code, nan_code = FORMATS[elem]
    v = np.asarray(v, dtype=np.float32).astype(np.float64)
    magnitudes = decode_table(elem)[: max_code + 1]  # ascending: 0 .. max
    a = np.abs(v)
    finite_a = np.where(np.isnan(a), 0.0, np.minimum(a, magnitudes[-1]))
    lo = np.searchsorted(magnitudes, finite_a, side="right") - 1
    hi = np.minimum(lo + 1, max_code)
    below, above = finite_a - magnitudes[lo], magnitudes[hi] - finite_a
    if u is None:
        up = (above < below) | ((above == below) & (lo % 2 == 1))
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = below / (magnitudes[hi] - magnitudes[lo])
        up = (below > 0) & (np.asarray(u, dtype=np.float64) < frac * 2.0**24)
    code = np.where(up & (below > 0), hi, lo)
    code = np.where(a >= magnitudes[-1], max_code, code)
    code = code | (np.signbit(v).astype(np.int64) << (ebits + mbits))
    return np.where(np.isnan(v), nan_code or 0, code).astype(np.uint8)


def _rounding_bits(shape: tuple[int, int], stochastic: bool, seed: int) -> np.ndarray | None:
    if not stochastic:
        return None
    return stochastic_bits(seed, np.arange(shape[0] * shape[1], dtype=np.uint64)).reshape(shape)


def _block_amax(x: np.ndarray, block_rows: int, block_cols: int) -> np.ndarray:
    """float32 [ceil(M/br), ceil(K/bc)] amax of each block; NaN if it holds a NaN."""
    rows, cols = x.shape
    out = np.zeros((-(-rows // block_rows), -(-cols // block_cols)), dtype=np.float32)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = np.abs(x[i * block_rows : (i + 1) * block_rows, j * block_cols : (j + 1) * block_cols])
            out[i, j] = np.max(block) if block.size else 0.0
    return out


def _expand(per_block: np.ndarray, block_rows: int, block_cols: int, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(per_block, block_rows, axis=0), block_cols, axis=1)[: shape[0], : shape[1]]


def _fp8_blocks(granularity: str, shape: tuple[int, int]) -> tuple[int, int]:
    if granularity == "tensor":
        return max(shape[0], 1), max(shape[1], 1)
    block_rows, block_cols = FP8_BLOCKS[granularity]
    return block_rows, block_cols or max(shape[1], 1)


def _as_float32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def quantize_fp8_reference(x, granularity: str, elem: str = "e4m3", stochastic: bool = False, seed: int = 0):
    """(uint8 codes [M, K], float32 scale) of the fp8-<granularity> format."""
    x = _as_float32(x)
    block_rows, block_cols = _fp8_blocks(granularity, x.shape)
    fmax = np.float32(decode_table(elem)[FORMATS[elem][3]])
    amax = _block_amax(x, block_rows, block_cols)
    with np.errstate(over="ignore", under="ignore"):
        scale = (amax / fmax).astype(np.float32)
    scale[scale == 0] = 1.0
    scale[~np.isfinite(amax)] = np.nan
    with np.errstate(invalid="ignore", divide="ignore", over="ignore", under="ignore"):
        v = (x / _expand(scale, block_rows, block_cols, x.shape)).astype(np.float32)
    codes = encode_reference(v, elem, _rounding_bits(x.shape, stochastic, seed))
    return codes, (scale.reshape(()) if granularity == "tensor" else scale)


def dequantize_fp8_reference(codes, scale, granularity: str, elem: str = "e4m3") -> np.ndarray:
    codes = np.asarray(codes, dtype=np.uint8)
    block_rows, block_cols = _fp8_blocks(granularity, codes.shape)
    scale = np.asarray(scale, dtype=np.float32).reshape(-(-codes.shape[0] // block_rows), -1)
    q = decode_table(elem)[codes].astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return (q * _expand(scale, block_rows, block_cols, codes.shape)).astype(np.float32)


def _pack_fp4(codes: np.ndarray) -> np.ndarray:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _unpack_fp4(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.empty((packed.shape[0], 2 * packed.shape[1]), dtype=np.uint8)
    codes[:, 0::2], codes[:, 1::2] = packed & 0xF, packed >> 4
    return codes


def _mx_scale_codes(amax: np.ndarray, elem: str, up: bool = False) -> np.ndarray:
    """E8M0 codes: floor(log2(amax)) - emax_elem (up: ceil(log2(amax / elem max)), the
    smallest X with amax / 2^X <= the element's largest value), clamped to [-127, 127], + 127."""
    amax64 = amax.astype(np.float64)
    safe = np.where(np.isfinite(amax64) & (amax64 > 0), amax64, 1.0)
    if up:
        largest = float(decode_table(elem)[FORMATS[elem][3]])
        # ceil(log2(a / largest)) from frexp (exact): a / largest = m * 2^e with m in [0.5, 1)
        m, e = np.frexp(safe / largest)
        x = np.clip(np.where(m == 0.5, e - 1, e).astype(np.int64), -127, 127)
    else:
        _, exponent = np.frexp(safe)
        x = np.clip(exponent.astype(np.int64) - 1 - MX_EMAX[elem], -127, 127)
    codes = np.where(amax64 == 0, 0, x + 127)
    return np.where(np.isfinite(amax64), codes, 0xFF).astype(np.uint8)


def quantize_mx_reference(x, elem: str, stochastic: bool = False, seed: int = 0, scale_up: bool = False):
    """(uint8 codes [M, K] or packed FP4 bytes [M, K/2], uint8 E8M0 codes [M, ceil(K/32)])."""
    x = _as_float32(x)
    scale_codes = _mx_scale_codes(_block_amax(x, 1, 32), elem, scale_up)
    exponent = np.where(scale_codes == 0xFF, 0, 127 - scale_codes.astype(np.int64))
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        v = np.ldexp(x, _expand(exponent, 1, 32, x.shape)).astype(np.float32)
    v[_expand(scale_codes == 0xFF, 1, 32, x.shape)] = np.nan
    codes = encode_reference(v, elem, _rounding_bits(x.shape, stochastic, seed))
    return (_pack_fp4(codes) if elem == "e2m1" else codes), scale_codes


def dequantize_mx_reference(data, scale_codes, elem: str) -> np.ndarray:
    codes = _unpack_fp4(data) if elem == "e2m1" else np.asarray(data, dtype=np.uint8)
    q = decode_table(elem)[codes].astype(np.float32)
    with np.errstate(invalid="ignore"):
        return (q * _expand(decode_e8m0(scale_codes), 1, 32, codes.shape)).astype(np.float32)


def quantize_nvfp4_reference(x, stochastic: bool = False, seed: int = 0, block_rows: int = 1):
    """(packed FP4 bytes [M, K/2], uint8 E4M3 codes [M, ceil(K/16)], float32 global scale);
    block_rows 16: each scale is its 16x16 tile's, repeated in the tile's rows."""
    x = _as_float32(x)
    amax = np.repeat(_block_amax(x, block_rows, 16), block_rows, axis=0)[: x.shape[0]]
    amax_tensor = np.float32(np.max(amax)) if amax.size else np.float32(0)
    with np.errstate(under="ignore"):
        g = np.float32(amax_tensor / np.float32(448.0 * 6.0))
    g = np.float32(1.0) if g == 0 else g
    g = np.float32(np.nan) if not np.isfinite(amax_tensor) else g
    with np.errstate(invalid="ignore", under="ignore"):
        sb_value = ((amax / np.float32(6.0)).astype(np.float32) / g).astype(np.float32)
    sb = encode_reference(sb_value, "e4m3")
    sb[~np.isfinite(amax)] = FORMATS["e4m3"][4]
    d = (decode_table("e4m3")[sb].astype(np.float32) * g).astype(np.float32)
    d_full = _expand(d, 1, 16, x.shape)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore", under="ignore"):
        v = (x / d_full).astype(np.float32)
    codes = encode_reference(v, "e2m1", _rounding_bits(x.shape, stochastic, seed))
    codes[d_full == 0] = 0
    return _pack_fp4(codes), sb, np.float32(g)


def dequantize_nvfp4_reference(data, scale_codes, global_scale) -> np.ndarray:
    codes = _unpack_fp4(data)
    q = decode_table("e2m1")[codes].astype(np.float32)
    sb = _expand(decode_table("e4m3")[np.asarray(scale_codes, dtype=np.uint8)].astype(np.float32), 1, 16, codes.shape)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        return ((q * sb).astype(np.float32) * np.float32(global_scale)).astype(np.float32)
