"""LSH-MoE ops on the CPU: lsh_hash tokens/s, bucket_reduce and bucket_scatter GB/s, against the references.

Tokens of hidden size 1024 in float32 (P = 1024), 4 hashes over all P coordinates (the
key uses 4 * 11 = 44 bits). The hash kernel runs at 1 thread and at all threads; its
pure-PyTorch reference (the same butterflies as whole-tensor ops) on a slice of the
tokens, for the speed-up. bucket_reduce gets 64 segments of equal size and keys drawn
so that buckets hold 4 rows on average; its bandwidth counts the bytes of x read and of
the centroids written. bucket_scatter (a plain index_select) counts the rows gathered and
written. Best of several runs each.
"""

from __future__ import annotations

import time
from typing import Any

NAME = "lsh"
WIDTH = 1024
HASHES = 4
SEGMENTS = 64
ROWS_PER_BUCKET = 4


def _best_s(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from plait.ops import bucket_reduce, bucket_scatter, lsh_hash, lsh_hash_reference, lsh_signs

    rows, reference_rows, repeats = (2048, 128, 2) if quick else (32768, 1024, 5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, WIDTH, generator=gen)
    signs = lsh_signs(HASHES, WIDTH, seed=0)
    threads = torch.get_num_threads()
    result: dict[str, Any] = {"rows": rows, "width": WIDTH, "hashes": HASHES, "dim": WIDTH, "threads": threads}

    torch.set_num_threads(1)
    one = _best_s(lambda: lsh_hash(x, signs, WIDTH), repeats)
    torch.set_num_threads(threads)
    many = _best_s(lambda: lsh_hash(x, signs, WIDTH), repeats)
    head = x[:reference_rows]
    reference = _best_s(lambda: lsh_hash_reference(head, signs, WIDTH), 1) * rows / reference_rows
    result["hash_tokens_per_s"] = {"kernel_1_thread": rows / one, f"kernel_{threads}_threads": rows / many,
                                   f"reference_{threads}_threads": rows / reference}
    result["hash_kernel_vs_reference"] = reference / many

    per_segment = rows // SEGMENTS
    keys = torch.randint(0, per_segment // ROWS_PER_BUCKET, (rows,), generator=gen)
    segments = torch.full((SEGMENTS,), per_segment, dtype=torch.long)
    buckets = bucket_reduce(x, keys, segments)
    moved = (rows + buckets.centroids.shape[0]) * WIDTH * x.element_size()
    reduce_s = _best_s(lambda: bucket_reduce(x, keys, segments), repeats)
    scatter_s = _best_s(lambda: bucket_scatter(buckets.centroids, buckets.index), repeats)
    result["centroids"] = buckets.centroids.shape[0]
    result["bucket_reduce_gbps"] = moved / reduce_s / 1e9
    result["bucket_scatter_gbps"] = 2 * rows * WIDTH * x.element_size() / scatter_s / 1e9

    for key, value in result["hash_tokens_per_s"].items():
        print(f"lsh: hash {key:24s} {value:12.0f} tokens/s", flush=True)
    print(f"lsh: bucket_reduce {result['bucket_reduce_gbps']:6.2f} GB/s, bucket_scatter "
          f"{result['bucket_scatter_gbps']:6.2f} GB/s ({rows} rows -> {result['centroids']} centroids)", flush=True)
    return result
