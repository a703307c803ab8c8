"""The CUDA kernels on a GPU: quantize, block-scaled GEMM, LSH hash and bucket reduce, GF(2^8) coding, against the device's ceilings and torch.

Needs a CUDA device (``plait bench gpu`` refuses to run without one). First the two
ceilings of the card, measured, not read off a datasheet: a device-to-device copy (bytes
read plus written per second) and cuBLAS's bf16 matrix product on random 8192-cubed
operands. Then each kernel, timed with CUDA events (median of the rounds, after warm-up,
on inputs several times the L2), interleaved round by round with its peer:

- ``quantize``: every format on x bf16 [16384, 8192], in GB/s of the fewest bytes it must
  move (x read once, codes and scales written once) and as a fraction of the copy ceiling.
  Peer for fp8-row, fp8-1x128 and mxfp8: the same arithmetic as eager torch ops (amax,
  scale, divide, cast), labelled ``torch_eager``: torch has no fused op of its own for
  these, and a compiled one is not what a user gets without compiling.
- ``qgemm``: ``block_scaled_mm`` (tensor-core WMMA on bf16-decoded tiles, scales applied
  in float32 per K block) for each block format at M = N = K = 4096 and 8192, in TFLOP/s;
  its error against the float64 product of the same quantized operands; peers: cuBLAS
  bf16 on the dequantized operands (``bf16_cublas``, the dense layer it replaces) and
  torch's own FP8 GEMM (``torch._scaled_mm``) row-wise, and block-wise where this torch
  and cuBLAS accept it (the like-for-like peer of fp8 1x128 x 128x128). The grouped form
  runs 8 experts with uneven token counts against ``torch._grouped_mm`` in bf16.
- ``lsh``: the hash of 16384 tokens of 4096 (6 hashes, dim 64), float32 and bf16, against
  :func:`plait.ops.lsh.lsh_hash_reference` on the GPU (same keys, checked); the bucket
  reduce over 64 segments against ``torch.unique`` + ``index_add_`` (same buckets, sums
  in float32: less work than the kernel's float64 sums).
- ``gf256``: Reed-Solomon (10, 4) parity of 64 MiB shards with ``gf256_matmul_``, in GB/s
  of data coded (no GPU peer: ISA-L, the usual one, is CPU code).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

NAME = "gpu"


def _events_ms(fn: Callable[[], object]) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _wall_ms(fn: Callable[[], object]) -> float:
    import time

    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, cuda: bool) -> dict[str, float]:
    """Median ms of each of ``fns``, run round by round in turn after one warm-up each."""
    timer = _events_ms if cuda else _wall_ms
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: round(statistics.median(v), 4) for name, v in times.items()}


def _attempt(fn: Callable[[], object]) -> tuple[object | None, str | None]:
    try:
        return fn(), None
    except Exception as exc:  # a peer this torch or card does not offer: recorded, not fatal
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def ceilings(device: str, size: dict, rounds: int) -> dict:
    import torch

    cuda = device == "cuda"
    n = size["copy_bytes"] // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    n_mm = size["mm"]
    a = torch.randn(n_mm, n_mm, device=device, dtype=torch.bfloat16)
    b = torch.randn(n_mm, n_mm, device=device, dtype=torch.bfloat16)
    ms = interleaved({"copy": lambda: dst.copy_(src), "bf16_mm": lambda: a @ b}, rounds, cuda)
    return {
        "copy_gbps": round(2 * src.numel() * 4 / ms["copy"] / 1e6, 1),
        "bf16_mm_tflops": round(2 * n_mm**3 / ms["bf16_mm"] / 1e9, 1),
        "copy_bytes": src.numel() * 4,
        "mm_n": n_mm,
        "ms": ms,
    }


def _eager_peers(x):
    """Eager-torch versions of three quantizers (same arithmetic as the kernels, not their rounding details)."""
    import torch

    fmax = 448.0

    def fp8_row():
        amax = x.abs().amax(dim=1, keepdim=True).float()
        scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
        return (x.float() / scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn), scale

    def fp8_1x128():
        m, k = x.shape
        blocks = x.view(m, k // 128, 128)
        amax = blocks.abs().amax(dim=2, keepdim=True).float()
        scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
        return (blocks.float() / scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn).view(m, k), scale.squeeze(2)

    def mxfp8():
        m, k = x.shape
        blocks = x.view(m, k // 32, 32)
        amax = blocks.abs().amax(dim=2, keepdim=True).float()
        exponent = torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - 8
        q = (blocks.float() * torch.exp2(-exponent)).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
        return q.view(m, k), (exponent + 127).clamp(0, 254).to(torch.uint8).squeeze(2)

    return {"fp8-row": fp8_row, "fp8-1x128": fp8_1x128, "mxfp8": mxfp8}


def quantize_rows(device: str, size: dict, rounds: int, copy_gbps: float) -> list[dict]:
    import torch

    from plait.ops.quant import dequantize, quantize, storage_bytes

    cuda = device == "cuda"
    m, k = size["quant"]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16) * 3
    peers = _eager_peers(x)
    rows = []
    for fmt in ("fp8-row", "fp8-1x128", "fp8-128x128", "mxfp8", "mxfp4", "nvfp4"):
        q = quantize(x, fmt)
        moved = x.numel() * x.element_size() + storage_bytes(q)
        fns = {"kernel": lambda fmt=fmt: quantize(x, fmt), "dequantize_bf16": lambda q=q: dequantize(q, torch.bfloat16)}
        if fmt in peers:
            fns["torch_eager"] = peers[fmt]
        ms = interleaved(fns, rounds, cuda)
        back = dequantize(q, torch.float32)
        row = {
            "fmt": fmt, "m": m, "k": k, "ms": ms,
            "gbps": round(moved / ms["kernel"] / 1e6, 1),
            "of_copy_ceiling": round(moved / ms["kernel"] / 1e6 / copy_gbps, 3),
            "dequantize_gbps": round(moved / ms["dequantize_bf16"] / 1e6, 1),
            "round_trip_rel_err": round(float((back - x.float()).norm() / x.float().norm()), 5),
        }
        if "torch_eager" in ms:
            row["speedup_vs_torch_eager"] = round(ms["torch_eager"] / ms["kernel"], 2)
        rows.append(row)
        print(f"gpu quantize {fmt} [{m}, {k}] bf16: {ms['kernel']:.3f} ms, {row['gbps']} GB/s "
              f"({row['of_copy_ceiling']:.0%} of copy)" + (f", {row['speedup_vs_torch_eager']}x torch eager" if "torch_eager" in ms else ""), flush=True)
    return rows


def _scaled_mm_blockwise(a, b):
    """torch's FP8 GEMM on the fp8 1x128 x 128x128 operands, trying the layouts torch versions ask for."""
    import torch

    tries = [
        ("_scaled_mm, 1x128 scales outer-dim-major", lambda: torch._scaled_mm(
            a.data, b.data.t(), scale_a=a.scale.t().contiguous().t(), scale_b=b.scale.t(), out_dtype=torch.bfloat16)),
        ("_scaled_mm, scales as stored", lambda: torch._scaled_mm(
            a.data, b.data.t(), scale_a=a.scale, scale_b=b.scale.t(), out_dtype=torch.bfloat16)),
    ]
    scaling = getattr(torch.nn.functional, "ScalingType", None)
    if scaling is not None:
        tries.append(("F.scaled_mm BlockWise1x128 x BlockWise128x128", lambda: torch.nn.functional.scaled_mm(
            a.data, b.data.t(), a.scale.t().contiguous().t(), scaling.BlockWise1x128, b.scale.t(),
            scaling.BlockWise128x128, output_dtype=torch.bfloat16)))
    errors = []
    for label, fn in tries:
        out, err = _attempt(fn)
        if err is None:
            return label, fn, errors
        errors.append(f"{label}: {err}")
    return None, None, errors


def _rel_err(out, ref) -> float:
    return round(float((out.double() - ref).norm() / ref.norm()), 7)


def qgemm_rows(device: str, size: dict, rounds: int) -> list[dict]:
    import torch

    from plait.ops import qmm
    from plait.ops.quant import dequantize, quantize

    cuda = device == "cuda"
    rows = []
    pairs = [("fp8 1x128 x 128x128", "fp8-1x128", "fp8-128x128"), ("mxfp8", "mxfp8", "mxfp8"),
             ("mxfp4", "mxfp4", "mxfp4"), ("nvfp4", "nvfp4", "nvfp4"), ("fp8 row (torch._scaled_mm)", "fp8-row", "fp8-row")]
    for n in size["gemm"]:
        gen = torch.Generator(device=device).manual_seed(n)
        x = torch.randn(n, n, device=device, generator=gen)
        w = torch.randn(n, n, device=device, generator=gen) * 0.05
        for label, fa, fb in pairs:
            a, b = quantize(x, fa), quantize(w, fb)
            da, db = dequantize(a, torch.bfloat16), dequantize(b, torch.bfloat16)
            fns = {"kernel": lambda a=a, b=b: qmm(a, b), "bf16_cublas": lambda: da @ db.T}
            peer_label, peer_errors = None, []
            if fa == "fp8-1x128":
                peer_label, peer_fn, peer_errors = _scaled_mm_blockwise(a, b)
                if peer_fn is not None:
                    fns["scaled_mm_blockwise"] = peer_fn
            ms = interleaved(fns, rounds, cuda)
            flops = 2 * n**3
            ref = dequantize(a, torch.float64) @ dequantize(b, torch.float64).T
            row = {
                "pair": label, "a_fmt": fa, "b_fmt": fb, "m": n, "n": n, "k": n, "ms": ms,
                "tflops": {key: round(flops / v / 1e9, 1) for key, v in ms.items()},
                "rel_err_vs_float64": _rel_err(qmm(a, b), ref),
                "bf16_cublas_rel_err_vs_float64": _rel_err(da @ db.T, ref),
                "speedup_vs_bf16_cublas": round(ms["bf16_cublas"] / ms["kernel"], 3),
            }
            if "scaled_mm_blockwise" in ms:
                row["scaled_mm_blockwise"] = {"call": peer_label, "rel_err_vs_float64": _rel_err(fns["scaled_mm_blockwise"](), ref),
                                              "speedup_vs_it": round(ms["scaled_mm_blockwise"] / ms["kernel"], 3)}
            elif peer_errors:
                row["scaled_mm_blockwise"] = {"unavailable": peer_errors}
            rows.append(row)
            print(f"gpu qgemm {label} {n}^3: {row['tflops']} TFLOP/s, rel err {row['rel_err_vs_float64']:.2e}", flush=True)
            del a, b, da, db, ref
    return rows


def grouped_row(device: str, size: dict, rounds: int) -> list[dict]:
    import torch

    from plait.ops import qmm_grouped
    from plait.ops.quant import dequantize, quantize

    cuda = device == "cuda"
    tokens, n, k, experts = size["grouped"]
    gen = torch.Generator(device=device).manual_seed(3)
    weights = torch.rand(experts, generator=torch.Generator().manual_seed(3)) + 0.5
    counts = (weights / weights.sum() * tokens).long()
    counts[-1] += tokens - int(counts.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    x = torch.randn(tokens, k, device=device, generator=gen)
    ws = [torch.randn(n, k, device=device, generator=gen) * 0.05 for _ in range(experts)]
    rows = []
    for fmt in ("fp8-1x128", "mxfp8", "nvfp4"):
        wfmt = "fp8-128x128" if fmt == "fp8-1x128" else fmt
        a, bs = quantize(x, fmt), [quantize(w, wfmt) for w in ws]
        dev_offsets = offsets.to(device)
        fns = {"kernel": lambda a=a, bs=bs: qmm_grouped(a, bs, dev_offsets)}
        da = dequantize(a, torch.bfloat16)
        db = torch.stack([dequantize(b, torch.bfloat16) for b in bs])
        ends = offsets[1:].to(device=device, dtype=torch.int32)
        out, err = _attempt(lambda: torch._grouped_mm(da, db.transpose(1, 2), offs=ends))
        if err is None:
            fns["grouped_mm_bf16"] = lambda: torch._grouped_mm(da, db.transpose(1, 2), offs=ends)
        fns["bf16_cublas_loop"] = lambda: [da[lo:hi] @ db[e].T for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))]
        ms = interleaved(fns, rounds, cuda)
        flops = 2 * tokens * n * k
        row = {"fmt": fmt, "tokens": tokens, "n": n, "k": k, "experts": experts, "counts": counts.tolist(), "ms": ms,
               "tflops": {key: round(flops / v / 1e9, 1) for key, v in ms.items()}}
        if err is not None:
            row["grouped_mm_bf16_unavailable"] = err
        rows.append(row)
        print(f"gpu qgemm grouped {fmt} {experts} experts {tokens}x{n}x{k}: {row['tflops']} TFLOP/s", flush=True)
    return rows


def lsh_rows(device: str, size: dict, rounds: int) -> dict:
    import torch

    from plait.ops.lsh import bucket_reduce, bucket_reduce_reference, lsh_hash, lsh_hash_reference, lsh_signs

    cuda = device == "cuda"
    tokens, d = size["lsh"]
    hashes, dim, segments = 6, 64, 64
    signs = lsh_signs(hashes, d, seed=0).to(device)
    gen = torch.Generator(device=device).manual_seed(5)
    # Tokens that cluster, as MoE activations do: 512 centres plus small noise.
    centres = torch.randn(512, d, device=device, generator=gen)
    x = centres[torch.randint(0, 512, (tokens,), device=device, generator=gen)] + 0.05 * torch.randn(tokens, d, device=device, generator=gen)
    out: dict = {"tokens": tokens, "d": d, "hashes": hashes, "dim": dim, "segments": segments, "hash": []}
    for dtype in (torch.float32, torch.bfloat16):
        xt = x.to(dtype)
        same = torch.equal(lsh_hash(xt, signs, dim), lsh_hash_reference(xt, signs, dim))
        ms = interleaved({"kernel": lambda xt=xt: lsh_hash(xt, signs, dim),
                          "torch_reference": lambda xt=xt: lsh_hash_reference(xt, signs, dim)}, rounds, cuda)
        row = {"dtype": str(dtype).replace("torch.", ""), "ms": ms, "keys_equal_reference": same,
               "mtokens_per_s": round(tokens / ms["kernel"] / 1e3, 2),
               "speedup_vs_torch_reference": round(ms["torch_reference"] / ms["kernel"], 2)}
        out["hash"].append(row)
        print(f"gpu lsh hash {tokens}x{d} {row['dtype']}: {ms['kernel']:.3f} ms, {row['speedup_vs_torch_reference']}x torch, keys equal {same}", flush=True)

    xb = x.to(torch.bfloat16)
    keys = lsh_hash(xb, signs, dim)
    seg = torch.full((segments,), tokens // segments, dtype=torch.long)
    seg[-1] += tokens - int(seg.sum())
    segment_of_row = torch.repeat_interleave(torch.arange(segments), seg).to(device)

    def composite():
        _, bucket, counts = torch.unique(torch.stack((segment_of_row, keys), 1), dim=0, return_inverse=True, return_counts=True)
        sums = torch.zeros(counts.numel(), d, device=device).index_add_(0, bucket, xb.float())
        return (sums / counts[:, None]).to(xb.dtype), counts, bucket

    got, ref = bucket_reduce(xb, keys, seg), bucket_reduce_reference(xb, keys, seg)
    same_buckets = torch.equal(got.index, ref.index) and torch.equal(got.counts, ref.counts)
    centroid_err = float((got.centroids.float() - ref.centroids.float()).abs().max())
    ms = interleaved({"kernel": lambda: bucket_reduce(xb, keys, seg), "torch_unique_index_add": composite}, rounds, cuda)
    moved = xb.numel() * 2 + got.centroids.numel() * 2 + keys.numel() * 16
    out["reduce"] = {
        "dtype": "bfloat16", "ms": ms, "centroids": int(got.counts.numel()),
        "compression": round(got.counts.numel() / tokens, 4), "same_buckets_as_reference": same_buckets,
        "max_centroid_diff_vs_reference": centroid_err, "gbps": round(moved / ms["kernel"] / 1e6, 1),
        "speedup_vs_torch_composite": round(ms["torch_unique_index_add"] / ms["kernel"], 2),
    }
    print(f"gpu lsh reduce {tokens}x{d} bf16 -> {got.counts.numel()} centroids: {ms['kernel']:.3f} ms, "
          f"{out['reduce']['speedup_vs_torch_composite']}x torch composite, same buckets {same_buckets}", flush=True)
    return out


def gf256_row(device: str, size: dict, rounds: int, copy_gbps: float) -> dict:
    import torch

    from plait.ops.gf256 import gf256_matmul_
    from plait.ops.rs_matrix import parity_matrix

    cuda = device == "cuda"
    k, m, shard = 10, 4, size["shard"]
    ins = [torch.randint(0, 256, (shard,), dtype=torch.uint8, device=device) for _ in range(k)]
    outs = [torch.empty(shard, dtype=torch.uint8, device=device) for _ in range(m)]
    coefs = parity_matrix(k, m)
    ms = interleaved({"encode": lambda: gf256_matmul_(outs, ins, coefs)}, rounds, cuda)
    expected = [torch.empty(4096, dtype=torch.uint8) for _ in range(m)]
    gf256_matmul_(expected, [t[:4096].cpu() for t in ins], coefs)
    equal = all(torch.equal(o[:4096].cpu(), e) for o, e in zip(outs, expected))
    moved = (k + m) * shard
    row = {"k": k, "m": m, "shard_bytes": shard, "ms": ms, "data_gbps": round(k * shard / ms["encode"] / 1e6, 1),
           "moved_gbps": round(moved / ms["encode"] / 1e6, 1), "of_copy_ceiling": round(moved / ms["encode"] / 1e6 / copy_gbps, 3),
           "parity_equals_cpu_kernel": equal}
    print(f"gpu gf256 RS({k},{m}) {shard >> 20} MiB shards: {ms['encode']:.3f} ms, {row['data_gbps']} GB/s of data "
          f"({row['of_copy_ceiling']:.0%} of copy), equal to CPU {equal}", flush=True)
    return row


SIZES = {
    "full": {"copy_bytes": 1 << 30, "mm": 8192, "quant": (16384, 8192), "gemm": (4096, 8192),
             "grouped": (16384, 4096, 2048, 8), "lsh": (16384, 4096), "shard": 64 << 20},
    "quick": {"copy_bytes": 1 << 28, "mm": 4096, "quant": (8192, 4096), "gemm": (4096,),
              "grouped": (8192, 2048, 2048, 8), "lsh": (8192, 4096), "shard": 16 << 20},
    # For the CPU test of this module's code paths only: no number from it means anything.
    "tiny": {"copy_bytes": 1 << 16, "mm": 64, "quant": (256, 256), "gemm": (256,),
             "grouped": (256, 128, 128, 4), "lsh": (256, 128), "shard": 1 << 14},
}


def run_on(device: str, size: dict, rounds: int) -> dict:
    """Every section on ``device``; the CPU is accepted so that tests can walk the code paths."""
    import torch

    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rounds": rounds}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result["sms"] = props.multi_processor_count
        result["memory_gib"] = round(props.total_memory / 2**30, 1)
        result["cuda"] = torch.version.cuda
    result["ceilings"] = ceilings(device, size, rounds)
    copy = result["ceilings"]["copy_gbps"]
    print(f"gpu ceilings: copy {copy} GB/s, bf16 matmul {result['ceilings']['bf16_mm_tflops']} TFLOP/s", flush=True)
    sections = {
        "quantize": lambda: quantize_rows(device, size, rounds, copy),
        "qgemm": lambda: qgemm_rows(device, size, rounds),
        "qgemm_grouped": lambda: grouped_row(device, size, rounds),
        "lsh": lambda: lsh_rows(device, size, rounds),
        "gf256": lambda: gf256_row(device, size, rounds, copy),
    }
    for name, fn in sections.items():
        value, err = _attempt(fn)
        result[name] = value if err is None else {"failed": err}
        if err is not None:
            print(f"gpu {name}: FAILED {err}", flush=True)
    return result


def run(quick: bool = False) -> dict:
    import torch

    from plait.errors import CLIError

    if not torch.cuda.is_available():
        raise CLIError("bench gpu: needs a CUDA device, and torch sees none (torch.cuda.is_available() is False); "
                       "run it on a GPU machine with a CUDA build of torch")
    return run_on("cuda", SIZES["quick" if quick else "full"], rounds=5 if quick else 20)
