"""Block-scaled GEMMs (FP8 block-wise, MXFP8, MXFP4, NVFP4): the kernel vs dequantize-then-matmul, and weight bytes.

For each shape and format pair, ``torch.ops.plait.block_scaled_mm`` (via ``plait.ops.qmm``)
and its like-for-like peer, ``dequantize(a) @ dequantize(b).T`` in float32 with
``torch.matmul`` (same quantized inputs, same float32 output), run interleaved, round by
round, on the same threads (one thread, then all of torch's); each gets its median and
best time of the rounds. For context, ``matmul_only`` is ``torch.matmul`` on operands
that are already float32 (no decoding at all: what a dense float32 layer costs). Shapes:
the demo model's expert layers (2,048 tokens, dim 128, ffn 256: K=128 -> N=256 and
K=256 -> N=128) and M = N = K = 1024. Every result is checked against the float64
reference within gamma_{K+2} sum |a_k b_k| (``within_bound``).

Weight storage: bytes of an N x K weight in each format (data + scales + global) against
bfloat16, for the same shapes.
"""

from __future__ import annotations

import statistics
import time

NAME = "qgemm"
SHAPES = [(2048, 256, 128), (2048, 128, 256), (1024, 1024, 1024)]
# (label, a format, b format): activations x weights.
PAIRS = [
    ("fp8 1x128 x 128x128", "fp8-1x128", "fp8-128x128"),
    ("mxfp8", "mxfp8", "mxfp8"),
    ("mxfp4", "mxfp4", "mxfp4"),
    ("nvfp4", "nvfp4", "nvfp4"),
]
U = 2.0**-24


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _case(m: int, n: int, k: int, a_fmt: str, b_fmt: str, rounds: int) -> dict:
    import torch

    from plait.ops import qmm, qmm_reference
    from plait.ops.quant import dequantize, quantize

    gen = torch.Generator().manual_seed(m + n + k)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * 0.05
    a, b = quantize(x, a_fmt), quantize(w, b_fmt)
    dense_a, dense_b = dequantize(a), dequantize(b)
    kernel = lambda: qmm(a, b)  # noqa: E731
    peer = lambda: torch.matmul(dequantize(a), dequantize(b).T)  # noqa: E731
    dense = lambda: torch.matmul(dense_a, dense_b.T)  # noqa: E731

    out = kernel()
    ref = qmm_reference(a, b)
    limit = (k + 2) * U / (1 - (k + 2) * U) * (dequantize(a, torch.float64).abs() @ dequantize(b, torch.float64).abs().T)
    err = (out.double() - ref).abs()
    peer_err = (peer().double() - ref).abs()
    times: dict[str, list[float]] = {"kernel": [], "dequantize_matmul": [], "matmul_only": []}
    for fn in (kernel, peer, dense):
        fn()  # warm-up
    for _ in range(rounds):
        times["kernel"].append(_seconds(kernel))
        times["dequantize_matmul"].append(_seconds(peer))
        times["matmul_only"].append(_seconds(dense))
    median = {key: statistics.median(v) for key, v in times.items()}
    best = {key: min(v) for key, v in times.items()}
    flops = 2 * m * n * k
    row = {
        "m": m, "n": n, "k": k, "a_fmt": a_fmt, "b_fmt": b_fmt,
        "within_bound": bool((err <= limit).all()),
        "max_err_over_bound": float((err / limit.clamp(min=1e-300)).max()),
        "peer_max_err_over_bound": float((peer_err / limit.clamp(min=1e-300)).max()),
        "median_ms": {key: round(v * 1e3, 3) for key, v in median.items()},
        "best_ms": {key: round(v * 1e3, 3) for key, v in best.items()},
        "kernel_gflops": round(flops / median["kernel"] / 1e9, 1),
        "speedup_vs_dequantize_matmul": round(median["dequantize_matmul"] / median["kernel"], 2),
        "speedup_vs_matmul_only": round(median["matmul_only"] / median["kernel"], 2),
    }
    print(f"qgemm {torch.get_num_threads()} threads {m}x{n}x{k} {a_fmt} x {b_fmt}: kernel {row['median_ms']['kernel']:.2f} ms "
          f"({row['kernel_gflops']} GFLOP/s), dequantize+matmul {row['median_ms']['dequantize_matmul']:.2f} ms "
          f"({row['speedup_vs_dequantize_matmul']}x), matmul only {row['median_ms']['matmul_only']:.2f} ms; "
          f"within bound {row['within_bound']}", flush=True)
    return row


def _storage(n: int, k: int) -> dict:
    import torch

    from plait.ops.quant import quantize, storage_bytes

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    bf16 = n * k * 2
    out = {"n": n, "k": k, "bf16_bytes": bf16}
    for fmt in ("fp8-128x128", "fp8-1x128", "mxfp8", "mxfp4", "nvfp4"):
        size = storage_bytes(quantize(w, fmt))
        out[fmt] = {"bytes": size, "vs_bf16": round(size / bf16, 4)}
    return out


def run(quick: bool = False) -> dict:
    import torch

    rounds = 3 if quick else 9
    threads = torch.get_num_threads()
    cases = []
    try:
        for count in sorted({1, threads}):
            torch.set_num_threads(count)
            for m, n, k in SHAPES:
                for _, fa, fb in PAIRS:
                    cases.append({"threads": count, **_case(m, n, k, fa, fb, rounds)})
    finally:
        torch.set_num_threads(threads)
    storage = [_storage(n, k) for _, n, k in SHAPES]
    for s in storage:
        print(f"qgemm storage {s['n']}x{s['k']}: " + ", ".join(
            f"{fmt} {s[fmt]['vs_bf16']:.3f}" for fmt in ("fp8-128x128", "mxfp8", "mxfp4", "nvfp4")) + " of bf16", flush=True)
    return {"threads": threads, "rounds": rounds, "cases": cases, "storage": storage}
