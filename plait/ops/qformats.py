"""The low-precision formats of the block-scaled GEMMs, in plain PyTorch.

:class:`QTensor` is the contract of the quantized formats (the same dataclass as the
quantize ops' ``plait.ops.quant``); :func:`quantize` and :func:`dequantize` here are a
small whole-tensor implementation of the format rules, enough to feed and check the GEMMs
(the tests, the benchmark). Everything is quantized along the last dimension of a
row-major ``x [M, K]``; scales are decode scales (``x ~ q * s``):

============== ============================ ========== ================= ========================
fmt            data                         shape      scale             scale shape
============== ============================ ========== ================= ========================
fp8-tensor     float8_e4m3fn / float8_e5m2  [M, K]     float32           [] (0-d)
fp8-row        same                         [M, K]     float32           [M, 1]
fp8-1x128      same                         [M, K]     float32           [M, ceil(K/128)]
fp8-128x128    same                         [M, K]     float32           [ceil(M/128), ceil(K/128)]
mxfp8          float8_e4m3fn                [M, K]     float8_e8m0fnu    [M, ceil(K/32)]
mxfp4          float4_e2m1fn_x2             [M, K/2]   float8_e8m0fnu    [M, ceil(K/32)]
nvfp4          float4_e2m1fn_x2             [M, K/2]   float8_e4m3fn     [M, ceil(K/16)] + global
============== ============================ ========== ================= ========================

FP4: element 2j in the low nibble of byte j, 2j+1 in the high one; E2M1 values
+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}. FP8 scale: ``amax / fmax`` (1 for an all-zero block). MX
(OCP MX v1.0 section 6.3): E8M0 code ``floor(log2 amax) - emax_elem + 127`` (emax 8 for
E4M3, 2 for E2M1), 0 for an all-zero block; decode ``2^(code - 127)``. NVFP4: global
``g = amax / (448 * 6)``, block scale ``sb = e4m3(amax_block / 6 / g)``, decode
``q * float(sb) * g``. Rounding to nearest even, saturating. A block holding NaN or
infinity decodes to NaN everywhere (NaN scale, E8M0 code 0xFF, E4M3 NaN code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FORMATS", "QTensor", "dequantize", "quantize", "storage_bytes"]

FORMATS = ("fp8-tensor", "fp8-row", "fp8-1x128", "fp8-128x128", "mxfp8", "mxfp4", "nvfp4")
_FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Midpoints between neighbouring E2M1 magnitudes, and whether a tie there rounds up (to
# the even code).
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


@dataclass(frozen=True)
class QTensor:
    data: torch.Tensor  # as in the table
    scale: torch.Tensor  # as in the table
    fmt: str  # one of FORMATS
    shape: tuple[int, int]  # logical [M, K]
    global_scale: torch.Tensor | None = None  # nvfp4 only: float32 0-d


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")


def _blocks(x: torch.Tensor, length: int) -> torch.Tensor:
    """x [M, K] zero-padded to whole blocks along K: [M, nblocks, length]."""
    m, k = x.shape
    nblocks = -(-k // length)
    return torch.nn.functional.pad(x, (0, nblocks * length - k)).reshape(m, nblocks, length)


def _unblock(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2])[:, :k]


def _amax(blocks: torch.Tensor) -> torch.Tensor:
    # NaN anywhere makes the block's amax NaN (torch.amax propagates it); inf stays inf.
    return blocks.abs().amax(dim=-1)


def _to_e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (ties to even, saturating) of float32 v, as uint8 nibbles."""
    mag = v.abs().clamp(max=6.0)
    code = torch.zeros(v.shape, dtype=torch.uint8)
    for mid, tie_up in _E2M1_MIDPOINTS:
        code += (mag >= mid if tie_up else mag > mid).to(torch.uint8)
    return code | ((v < 0) & (code > 0)).to(torch.uint8) << 3


def _pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous().view(torch.float4_e2m1fn_x2)


def _unpack_e2m1(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    packed = data.view(torch.uint8)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], 2 * packed.shape[1])
    signs = torch.where(codes >= 8, -1.0, 1.0).to(dtype)
    return _E2M1_VALUES.to(dtype)[(codes & 7).long()] * signs


def _e8m0_decode(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    c = code.view(torch.uint8).to(torch.int32)
    value = torch.ldexp(torch.ones(c.shape, dtype=torch.float64), c - 127).to(dtype)
    return torch.where(c == 255, torch.tensor(float("nan"), dtype=dtype), value)


def _to_fp8(v: torch.Tensor, dtype: torch.dtype, fmax: float) -> torch.Tensor:
    return v.clamp(-fmax, fmax).to(dtype)  # NaN stays NaN


def quantize(x: torch.Tensor, fmt: str, *, elem: str = "e4m3") -> QTensor:
    """Round-to-nearest quantization of ``x`` [M, K] (float32 or bfloat16) into ``fmt``."""
    _check_fmt(fmt)
    if x.dim() != 2:
        raise ValueError(f"quantize: x must be 2-D [M, K], got shape {list(x.shape)}")
    if elem not in _FP8:
        raise ValueError(f"quantize: elem must be 'e4m3' or 'e5m2', got {elem!r}")
    x = x.float().contiguous()
    m, k = x.shape
    if fmt in ("mxfp4", "nvfp4") and k % 2:
        raise ValueError(f"quantize: {fmt} packs two values per byte, so K must be even; got K = {k}")
    if fmt.startswith("fp8"):
        dtype, fmax = _FP8[elem]
        if fmt == "fp8-tensor":
            amax = x.abs().amax() if x.numel() else torch.tensor(0.0)
            scale = torch.where(amax == 0, 1.0, amax / fmax)
            return QTensor(_to_fp8(x / scale, dtype, fmax), scale, fmt, (m, k))
        if fmt == "fp8-row":
            amax = x.abs().amax(dim=1, keepdim=True) if k else torch.zeros(m, 1)
            scale = torch.where(amax == 0, 1.0, amax / fmax)
            return QTensor(_to_fp8(x / scale, dtype, fmax), scale, fmt, (m, k))
        if fmt == "fp8-1x128":
            blocks = _blocks(x, 128)
            amax = _amax(blocks)
            scale = torch.where(amax == 0, 1.0, amax / fmax)
            q = _to_fp8(_unblock(blocks / scale[..., None], k), dtype, fmax)
            return QTensor(q.contiguous(), scale.contiguous(), fmt, (m, k))
        rows = -(-m // 128) * 128
        padded = torch.nn.functional.pad(x, (0, -(-k // 128) * 128 - k, 0, rows - m))
        tiles = padded.reshape(rows // 128, 128, padded.shape[1] // 128, 128)
        amax = tiles.abs().amax(dim=(1, 3))
        scale = torch.where(amax == 0, 1.0, amax / fmax)
        q = (tiles / scale[:, None, :, None]).reshape(rows, padded.shape[1])[:m, :k]
        return QTensor(_to_fp8(q, dtype, fmax).contiguous(), scale.contiguous(), fmt, (m, k))
    if fmt in ("mxfp8", "mxfp4"):
        emax = 8 if fmt == "mxfp8" else 2
        blocks = _blocks(x, 32)
        amax = _amax(blocks)
        _, exponent = torch.frexp(amax)  # amax = f * 2^e, f in [0.5, 1): floor(log2) = e - 1
        shared = (exponent - 1 - emax).clamp(-127, 127)
        shared = torch.where(amax == 0, -127, shared)
        code = (shared + 127).to(torch.uint8)
        code = torch.where(torch.isfinite(amax), code, 255).to(torch.uint8)
        v = _unblock(torch.ldexp(blocks, -shared[..., None].to(torch.int32)), k)
        if fmt == "mxfp8":
            data = _to_fp8(v, torch.float8_e4m3fn, 448.0).contiguous()
        else:
            data = _pack_e2m1(_to_e2m1_codes(v))
        return QTensor(data, code.contiguous().view(torch.float8_e8m0fnu), fmt, (m, k))
    amax_t = x.abs().amax() if x.numel() else torch.tensor(0.0)
    g = torch.where(amax_t == 0, 1.0, amax_t / (448.0 * 6.0)).float()
    blocks = _blocks(x, 16)
    sb = _to_fp8(_amax(blocks) / 6.0 / g, torch.float8_e4m3fn, 448.0)
    d = sb.float() * g
    v = torch.where(d[..., None] == 0, 0.0, blocks / d[..., None])
    data = _pack_e2m1(_to_e2m1_codes(_unblock(v, k)))
    return QTensor(data, sb.contiguous(), fmt, (m, k), g)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q`` decoded to ``dtype`` [M, K]: in float32 as the spec rounds it (``q * s``;
    nvfp4 ``(q * float(sb)) * g``), or exactly in float64 when ``dtype`` is float64."""
    _check_fmt(q.fmt)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    m, k = q.shape
    if q.fmt in ("mxfp4", "nvfp4"):
        values = _unpack_e2m1(q.data, work)
    else:
        values = q.data.to(work)
    if q.fmt in ("fp8-tensor", "fp8-row"):
        out = values * q.scale.to(work)
    elif q.fmt == "fp8-128x128":
        scale = q.scale.to(work).repeat_interleave(128, 0)[:m].repeat_interleave(128, 1)[:, :k]
        out = values * scale
    elif q.fmt in ("mxfp8", "mxfp4"):
        out = values * _e8m0_decode(q.scale, work).repeat_interleave(32, 1)[:, :k]
    elif q.fmt == "nvfp4":
        sb = q.scale.to(work).repeat_interleave(16, 1)[:, :k]
        out = values * sb * q.global_scale.to(work)
    else:
        out = values * q.scale.to(work).repeat_interleave(128, 1)[:, :k]
    return out.to(dtype)


def storage_bytes(q: QTensor) -> int:
    """Bytes of data, scales and global scale."""
    total = q.data.numel() * q.data.element_size() + q.scale.numel() * q.scale.element_size()
    if q.global_scale is not None:
        total += q.global_scale.numel() * q.global_scale.element_size()
    return total

