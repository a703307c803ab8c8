"""``plait bench gpu``: its code paths, walked on the CPU at toy sizes (the numbers there mean
nothing; the GPU run is committed in bench/results/gpu.json), and its refusal without a GPU."""

from __future__ import annotations

import pytest
import torch

from plait.bench import gpu
from plait.errors import CLIError


def test_every_section_runs_and_checks_its_kernel_against_its_reference():
    result = gpu.run_on("cpu", gpu.SIZES["tiny"], rounds=1)
    failed = {name: v["failed"] for name, v in result.items() if isinstance(v, dict) and "failed" in v}
    assert not failed
    assert [row["fmt"] for row in result["quantize"]] == ["fp8-row", "fp8-1x128", "fp8-128x128", "mxfp8", "mxfp4", "nvfp4"]
    for row in result["quantize"]:
        # one rounding of a normal value costs at most 2^-4 (E4M3) or 2^-2 (E2M1) relative
        assert 0 < row["round_trip_rel_err"] < (0.25 if "fp4" in row["fmt"] else 0.0625), row
    for row in result["qgemm"]:
        # float32 accumulation of exactly representable products: far under bf16's 2^-8
        assert row["rel_err_vs_float64"] < 1e-5, row
        assert row["bf16_cublas_rel_err_vs_float64"] < 2**-7, row
    assert {row["fmt"] for row in result["qgemm_grouped"]} == {"fp8-1x128", "mxfp8", "nvfp4"}
    assert all(row["keys_equal_reference"] for row in result["lsh"]["hash"])
    assert result["lsh"]["reduce"]["same_buckets_as_reference"]
    assert result["gf256"]["parity_equals_cpu_kernel"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu():
    with pytest.raises(CLIError, match="needs a CUDA device"):
        gpu.run(quick=True)
