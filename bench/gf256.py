"""GF(2^8) multiply-accumulate (`torch.ops.plait.gf256_mul_add_`) GB/s against memory-speed XOR.

64 MiB regions (larger than any cache here), coefficient 0x8e, best of several runs.
Paths: the AVX2 kernel at 1 thread and at all threads, the portable scalar kernel
(PLAIT_GF256_NO_SIMD=1, in a child process since the choice is read once), and as
memory references numpy's and torch's in-place XOR of the same bytes, which do the
same loads and stores with no multiply: the ceiling the kernel can approach.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

NAME = "gf256"
COEF = 0x8E


def _best_gbps(fn, nbytes: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def _measure(mib: int, repeats: int) -> dict[str, float]:
    import numpy as np
    import torch

    import plait  # noqa: F401

    n = mib << 20
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    dst = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    src_np, dst_np = src.numpy(), dst.numpy()
    op = torch.ops.plait.gf256_mul_add_
    threads = torch.get_num_threads()
    out = {}
    torch.set_num_threads(1)
    out["kernel_1_thread"] = _best_gbps(lambda: op(dst, src, COEF), n, repeats)
    out["torch_xor_1_thread"] = _best_gbps(lambda: dst.bitwise_xor_(src), n, repeats)
    out["numpy_xor"] = _best_gbps(lambda: np.bitwise_xor(dst_np, src_np, out=dst_np), n, repeats)
    torch.set_num_threads(threads)
    out[f"kernel_{threads}_threads"] = _best_gbps(lambda: op(dst, src, COEF), n, repeats)
    out[f"torch_xor_{threads}_threads"] = _best_gbps(lambda: dst.bitwise_xor_(src), n, repeats)
    return out


def run(quick: bool = False) -> dict[str, Any]:
    mib, repeats = (8, 3) if quick else (64, 10)
    simd = _measure(mib, repeats)
    code = f"import json, plait.bench.gf256 as b; print(json.dumps(b._measure({mib}, {repeats})))"
    env = {**os.environ, "PLAIT_GF256_NO_SIMD": "1"}
    scalar = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    result = {
        "bytes": mib << 20,
        "coef": COEF,
        "gbps": {**simd, "scalar_kernel_1_thread": scalar["kernel_1_thread"]},
    }
    result["kernel_vs_numpy_xor_1_thread"] = simd["kernel_1_thread"] / simd["numpy_xor"]
    for key, value in result["gbps"].items():
        print(f"gf256: {key:24s} {value:6.2f} GB/s", flush=True)
    return result
