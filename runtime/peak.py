"""Peak FLOP/s per device, the denominator of the MFU estimate."""

from __future__ import annotations

import os
import time

import torch

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s).
_CUDA_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def cuda_peak_flops() -> float:
    name = torch.cuda.get_device_name()
    for key, peak in _CUDA_PEAKS.items():
        if key in name:
            return peak
    return 0.0


def cpu_peak_flops(local_workers: int, seconds: float = 0.2) -> float:
    """Measured fp32 GEMM rate of one thread × cores, shared among the local workers.

    Measured once by the launcher before the workers start, so they do not compete.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 256
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        rate = 2 * n**3 * count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return rate * (os.cpu_count() or 1) / max(1, local_workers)
