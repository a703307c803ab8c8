"""The quantizers' options: NVFP4 16x16 tiles (2-D weight scaling) and the round-up MX scale.

The kernels against the NumPy references (bit for bit), the properties each option is for
(tiles: quantizing Wᵀ gives the transpose of quantizing W; round-up: no block saturates),
and their argument checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.ops import quant_reference as ref
from plait.ops.quant import amax_stats, dequantize, quantize


def _random_blocks(shape, dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], 1, generator=gen) * 3)
    outliers = torch.rand(shape, generator=gen) < 0.01
    x[outliers] *= 1000.0
    return x.to(dtype)


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


# ---------------------------------------------------------------------- NVFP4 16x16 tiles


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 32), (35, 96), (1, 2), (130, 296)])
def test_nvfp4_tiles_match_reference(shape, dtype, stochastic):
    # 35 and 130 rows: a partial trailing row group; 296 columns: a partial 16-column block.
    x = _random_blocks(shape, dtype, seed=shape[0])
    q = quantize(x, "nvfp4", block_rows=16, rounding="stochastic" if stochastic else "nearest", seed=99)
    data, scale, g = ref.quantize_nvfp4_reference(x.float().numpy(), stochastic, 99, block_rows=16)
    np.testing.assert_array_equal(_bytes(q.data), data)
    np.testing.assert_array_equal(_bytes(q.scale), scale)
    assert q.global_scale.item() == np.float32(g)
    np.testing.assert_array_equal(dequantize(q).numpy(), ref.dequantize_nvfp4_reference(data, scale, np.float32(g)))


def test_nvfp4_tile_scales_are_shared_by_the_tiles_rows():
    x = _random_blocks((40, 64), torch.float32, seed=3)
    tiles = quantize(x, "nvfp4", block_rows=16).scale.view(torch.uint8)
    rows = quantize(x, "nvfp4").scale.view(torch.uint8)
    for r0 in range(0, 40, 16):
        group = tiles[r0 : r0 + 16]
        assert bool((group == group[0]).all()), r0
        # the tile's scale is its largest row's (E4M3 codes of positive values order like the values)
        assert torch.equal(group[0], rows[r0 : r0 + 16].max(dim=0).values), r0
    assert not torch.equal(tiles, rows)  # the option changes something on these data


def test_nvfp4_tiles_make_the_transpose_consistent():
    """The point of 2-D weight scaling: W (forward, along in) and Wᵀ (dgrad, along out) quantize to the same values."""
    w = _random_blocks((96, 160), torch.float32, seed=7)
    tiled = dequantize(quantize(w, "nvfp4", block_rows=16))
    tiled_t = dequantize(quantize(w.t().contiguous(), "nvfp4", block_rows=16))
    assert torch.equal(tiled, tiled_t.t())
    rows, rows_t = dequantize(quantize(w, "nvfp4")), dequantize(quantize(w.t().contiguous(), "nvfp4"))
    assert not torch.equal(rows, rows_t.t())  # with 1x16 blocks they differ


def test_nvfp4_tile_with_a_nan_follows_the_non_finite_policy():
    x = torch.randn(32, 64)
    x[20, 40] = float("nan")  # tile (row group 1, column block 2)
    q = quantize(x, "nvfp4", block_rows=16)
    # a NaN makes the tensor amax, so g, NaN: every block decodes to NaN, as with 1x16 blocks
    assert bool(dequantize(q).isnan().all())
    data, scale, g = ref.quantize_nvfp4_reference(x.numpy(), block_rows=16)
    np.testing.assert_array_equal(_bytes(q.data), data)
    np.testing.assert_array_equal(_bytes(q.scale), scale)
    assert np.isnan(g) and q.global_scale.isnan().item()


def test_nvfp4_block_rows_is_checked():
    with pytest.raises(RuntimeError, match=r"block_rows must be 1 \(1x16 blocks\) or 16 .* got 8"):
        torch.ops.plait.quantize_nvfp4(torch.randn(4, 32), False, 0, 8)
    with pytest.raises(ValueError, match="block_rows=16 applies to nvfp4"):
        quantize(torch.randn(4, 32), "mxfp4", block_rows=16)
    torch.library.opcheck(torch.ops.plait.quantize_nvfp4.default, (torch.randn(40, 64), False, 0, 16))


# ---------------------------------------------------------------------- MX round-up scale


def _block_maxima(elem: str) -> torch.Tensor:
    """Rows of 32 whose amax walks every E8M0 binade's critical range: amax * 2^-X_floor in [2^emax, 2^(emax+1)),
    straddling the element's largest value (448 or 6), at exponents from tiny to huge."""
    largest = 448.0 if elem == "e4m3" else 6.0
    emax = 8 if elem == "e4m3" else 2
    fractions = torch.tensor([1.0, 1.25, largest / 2**emax, np.nextafter(np.float32(largest / 2**emax), np.float32(2)), 1.8, 1.99])
    rows = []
    for exponent in (-130, -100, -20, -1, 0, 1, 7, 30, 100, 118):  # amax < 2^127: finite
        for f in fractions:
            amax = float(f) * 2.0 ** (emax + exponent)
            row = torch.linspace(-amax, amax, 32) * 0.9
            row[7] = amax
            rows.append(row)
    return torch.stack(rows).float()


@pytest.mark.parametrize("fmt,elem", [("mxfp8", "e4m3"), ("mxfp4", "e2m1")])
def test_mx_scale_up_matches_reference_and_saturates_nothing(fmt, elem):
    x = torch.cat([_block_maxima(elem), _random_blocks((64, 32), torch.float32, seed=11)])
    up = quantize(x, fmt, mx_scale="up")
    data, scale = ref.quantize_mx_reference(x.numpy(), elem, scale_up=True)
    np.testing.assert_array_equal(_bytes(up.data), data)
    np.testing.assert_array_equal(_bytes(up.scale), scale)
    floor = quantize(x, fmt)
    assert float(amax_stats(x, up).overflow) == 0.0
    assert float(amax_stats(x, floor).overflow) > 0.0  # the floor rule saturates the top of each binade
    # up is floor or floor + 1, and + 1 exactly where the block's amax / 2^X_floor exceeds the element's max
    delta = up.scale.view(torch.uint8).int() - floor.scale.view(torch.uint8).int()
    assert set(delta.unique().tolist()) <= {0, 1}
    largest = 448.0 if elem == "e4m3" else 6.0
    ratio = x.abs().reshape(x.shape[0], -1, 32).amax(-1) / floor.scale.float()
    assert torch.equal(delta.bool(), ratio > largest)


def test_mx_scale_up_keeps_zero_and_nan_blocks():
    x = torch.zeros(3, 64)
    x[1, 40] = float("nan")
    x[2, :32] = torch.randn(32)
    up, floor = quantize(x, "mxfp8", mx_scale="up"), quantize(x, "mxfp8")
    assert up.scale.view(torch.uint8)[0].tolist() == floor.scale.view(torch.uint8)[0].tolist() == [0, 0]
    assert up.scale.view(torch.uint8)[1, 1].item() == 0xFF
    assert torch.equal(dequantize(up)[0], torch.zeros(64))


def test_mx_scale_is_checked():
    with pytest.raises(ValueError, match="mx_scale must be one of 'floor', 'up', got 'ceil'"):
        quantize(torch.randn(4, 32), "mxfp8", mx_scale="ceil")
    with pytest.raises(ValueError, match="mx_scale='up' applies to mxfp8 and mxfp4, not nvfp4"):
        quantize(torch.randn(4, 32), "nvfp4", mx_scale="up")
    torch.library.opcheck(torch.ops.plait.quantize_mx.default, (torch.randn(8, 64), "e2m1", False, 0, True))


# ----------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_options_match_cpu():
    for shape in ((130, 296), (16, 32), (1, 2)):
        for dtype in (torch.float32, torch.bfloat16):
            x = _random_blocks(shape, dtype, seed=5)
            for fmt, kwargs in (("nvfp4", {"block_rows": 16}), ("mxfp8", {"mx_scale": "up"}), ("mxfp4", {"mx_scale": "up"})):
                cpu, gpu = quantize(x, fmt, **kwargs), quantize(x.cuda(), fmt, **kwargs)
                assert np.array_equal(_bytes(gpu.data.cpu()), _bytes(cpu.data)), (fmt, shape, dtype)
                assert np.array_equal(_bytes(gpu.scale.cpu()), _bytes(cpu.scale)), (fmt, shape, dtype)
