"""The ops of an LSH-compressed MoE all-to-all (LSH-MoE: Nie et al., "LSH-MoE:
Communication-efficient MoE Training via Locality-Sensitive Hashing", NeurIPS 2024).

Tokens bound for the same expert on the same rank are often near-duplicates. Before the
all-to-all, each token is hashed with cross-polytope LSH; tokens with equal keys within
one (destination rank, expert) segment form a bucket and are sent as one row, their mean
(the centroid). The expert's output on the centroid comes back, and each token gets
``E(centroid) + (token - centroid)`` (the residual stays local).

The hash (:func:`lsh_hash`, op ``torch.ops.plait.lsh_hash``). A token ``x`` in R^d is
zero-padded to P, the next power of two, and rotated pseudo-randomly by
``y = H D3 H D2 H D1 x``: H is the Walsh-Hadamard transform on P coordinates, each Di a
diagonal of random signs (:func:`lsh_signs`), so one rotation costs O(P log P) instead of
a dense P x P matrix. The cross-polytope code is the nearest vertex ``+-e_j`` of the
rotated token: ``j* = argmax_{j < dim} |y_j|`` (lowest j on ties) and
``code = 2 j* + [y_j* < 0]`` in ``[0, 2 dim)``; a zero vector gets code 0. The code is
invariant to scaling x by a positive constant, so neither x nor H is normalised (H's
``1/sqrt(P)`` scales every y_j alike). ``dim`` <= P limits the code to the first ``dim``
coordinates (fewer, larger buckets). ``hashes`` independent codes combine into one int64
key in mixed radix: ``key = sum_h code_h * (2 dim)^h``, exact while ``hashes *
ceil(log2(2 dim)) <= 62``. The transform uses additions, subtractions and sign flips only,
in float32 in a fixed order, so the kernels and :func:`lsh_hash_reference` give the same
keys bit for bit. Keys of rows holding NaN or infinity are unspecified.

The buckets (:func:`bucket_reduce`, op ``torch.ops.plait.lsh_bucket_reduce``). Rows come
segment after segment; within a segment, rows with equal keys form a bucket. Centroids are
ordered segment-major, then by the first row of their key. Each centroid is the mean of
its rows, summed in float64 in row order, divided by the count and rounded once to x's
dtype. :func:`bucket_scatter` is the way back: ``y[index]``.

Gradients: ``d centroids / d x`` is ``1/count`` for each row of the bucket, so
``grad_x[t] = grad_centroids[index[t]] / counts[index[t]]``; keys, counts, index and
segment_centroids have none, nor has the hash.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch

import plait  # noqa: F401  (loads plait._C, which defines torch.ops.plait.*)

__all__ = [
    "Buckets",
    "bucket_reduce",
    "bucket_reduce_reference",
    "bucket_scatter",
    "lsh_hash",
    "lsh_hash_reference",
    "lsh_signs",
]

#: A key holds at most this many bits (hashes * ceil(log2(2 dim))).
MAX_KEY_BITS = 62


class Buckets(NamedTuple):
    """What :func:`bucket_reduce` returns."""

    centroids: torch.Tensor  # [C, d], x's dtype: the mean of each bucket
    counts: torch.Tensor  # int64 [C]: rows per bucket
    index: torch.Tensor  # int64 [N]: each row's centroid
    segment_centroids: torch.Tensor  # int64 [S]: centroids per segment


def padded_length(d: int) -> int:
    """P, the smallest power of two >= d (d >= 1)."""
    return 1 << (d - 1).bit_length()


def code_bits(dim: int) -> int:
    """ceil(log2(2 dim)): the bits of one hash's code."""
    return (2 * dim - 1).bit_length()


def lsh_signs(hashes: int, d: int, seed: int) -> torch.Tensor:
    """The random sign diagonals of ``hashes`` rotations of R^d: int8 [hashes, 3, P] of +-1.

    Drawn on the CPU from a ``torch.Generator`` seeded with ``seed``, so every rank that
    uses the same seed hashes alike. Move the result to the tokens' device once.
    """
    hashes, d, seed = operator.index(hashes), operator.index(d), operator.index(seed)
    if hashes < 1:
        raise ValueError(f"lsh_signs: hashes must be >= 1, got {hashes}")
    if d < 1:
        raise ValueError(f"lsh_signs: d (the hidden size) must be >= 1, got {d}")
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (hashes, 3, padded_length(d)), generator=generator, dtype=torch.int8)
    return bits * 2 - 1


def lsh_hash(x: torch.Tensor, signs: torch.Tensor, dim: int) -> torch.Tensor:
    """int64 [N] cross-polytope keys of the rows of ``x`` [N, d] (float32 or bfloat16).

    ``signs`` is :func:`lsh_signs` (hashes, d, seed) on x's device; ``dim`` in [1, P] is the
    number of rotated coordinates a code looks at. Raises RuntimeError naming the bad
    argument (dtype, shape, dim out of range, or a key of more than 62 bits).
    """
    return torch.ops.plait.lsh_hash(x, signs, operator.index(dim))


def bucket_reduce(
    x: torch.Tensor, keys: torch.Tensor, segments: torch.Tensor | Sequence[int]
) -> Buckets:
    """The buckets of equal keys within each segment of rows and their means.

    ``x`` [N, d] (float32, bfloat16 or float64), ``keys`` int64 [N] from :func:`lsh_hash`,
    ``segments`` the row counts of the segments (int64 tensor on the CPU or x's device, or
    a sequence of ints), summing to N. Differentiable in ``x``. Raises RuntimeError naming
    the bad argument.
    """
    if not isinstance(segments, torch.Tensor):
        segments = torch.tensor([operator.index(s) for s in segments], dtype=torch.long)
    return Buckets(*torch.ops.plait.lsh_bucket_reduce(x, keys, segments))


def bucket_scatter(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``y[index]``: each token's row of the per-centroid ``y`` [C, d] (index: int64 [N]).

    Plain ``torch.index_select``: a gather is one memory-bound pass that torch already
    does in a single kernel on every device, and its backward is the index_add of the
    gradient onto the centroids, so a custom op would add nothing.
    """
    if index.dtype != torch.long or index.dim() != 1:
        raise ValueError(
            f"bucket_scatter: index must be a 1-D int64 tensor (Buckets.index), got {index.dtype} "
            f"of shape {list(index.shape)}"
        )
    if y.dim() != 2:
        raise ValueError(f"bucket_scatter: y must be 2-D [centroids, hidden], got shape {list(y.shape)}")
    return torch.index_select(y, 0, index)


# ------------------------------------------------------------------------- references


def _hadamard(y: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh-Hadamard transform of each row: butterflies (a, b) -> (a + b,
    a - b) on the pairs (i, i + half), half = 1, 2, 4, ..."""
    rows, length = y.shape
    half = 1
    while half < length:
        pairs = y.reshape(rows, length // (2 * half), 2, half)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).reshape(rows, length)
        half *= 2
    return y


def lsh_hash_reference(x: torch.Tensor, signs: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`lsh_hash` in plain PyTorch (for tests; the same keys, bit for bit)."""
    rows, width = x.shape
    hashes, _, length = signs.shape
    padded = torch.zeros(rows, length, dtype=torch.float32, device=x.device)
    padded[:, :width] = x.float()
    keys = torch.zeros(rows, dtype=torch.long, device=x.device)
    for h in range(hashes):
        y = padded
        for i in range(3):
            y = _hadamard(y * signs[h, i].float())
        # argmax returns the first maximal index: ties go to the lowest j.
        j = y[:, :dim].abs().argmax(dim=1)
        negative = y.gather(1, j[:, None]).squeeze(1) < 0
        keys += (2 * j + negative.long()) * (2 * dim) ** h
    return keys


def bucket_reduce_reference(
    x: torch.Tensor, keys: torch.Tensor, segments: torch.Tensor | Sequence[int]
) -> Buckets:
    """:func:`bucket_reduce` in plain PyTorch (for tests).

    Buckets come from ``torch.unique`` over (segment, key) pairs, ordered by their first
    row; each sum is taken in float64 in row order (one vectorised step per member rank
    in the bucket), then divided by the count and rounded through float32 to x's dtype.
    """
    segments = torch.as_tensor(segments, dtype=torch.long).cpu()
    device = x.device
    rows, width = x.shape
    nsegments = segments.numel()
    if rows == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return Buckets(x.new_empty(0, width), empty, empty.clone(), torch.zeros(nsegments, dtype=torch.long, device=device))
    segment_of_row = torch.repeat_interleave(torch.arange(nsegments), segments).to(device)
    pairs = torch.stack((segment_of_row, keys), dim=1)
    _, bucket = torch.unique(pairs, dim=0, return_inverse=True)
    nbuckets = int(bucket.max()) + 1
    row = torch.arange(rows, device=device)
    first_row = torch.full((nbuckets,), rows, dtype=torch.long, device=device)
    first_row.scatter_reduce_(0, bucket, row, reduce="amin")
    order = torch.argsort(first_row)  # segments are row ranges: segment-major follows
    rank = torch.empty_like(order)
    rank[order] = torch.arange(nbuckets, device=device)
    index = rank[bucket]
    counts = torch.bincount(index, minlength=nbuckets)
    segment_centroids = torch.bincount(segment_of_row[first_row[order]], minlength=nsegments)

    members = torch.argsort(index, stable=True)  # by centroid, rows ascending within one
    starts = torch.cumsum(counts, 0) - counts
    member_rank = row - starts[index[members]]
    sums = torch.zeros(nbuckets, width, dtype=torch.float64, device=device)
    for k in range(int(counts.max())):
        taken = members[member_rank == k]  # the k-th row of every bucket that has one
        sums[index[taken]] += x[taken].double()
    means = sums / counts[:, None].double()
    centroids = means if x.dtype == torch.float64 else means.float().to(x.dtype)
    return Buckets(centroids, counts, index, segment_centroids)


# --------------------------------------------------------------- fake kernels, autograd


@torch.library.register_fake("plait::lsh_hash")
def _lsh_hash_fake(x: torch.Tensor, signs: torch.Tensor, dim: int) -> torch.Tensor:
    # The shape and dtype checks of lsh_hash_check in csrc/lsh/lsh_cpu.cpp (sign values
    # need the data).
    torch._check(x.dim() == 2, lambda: f"lsh_hash: x must be 2-D [tokens, hidden], got shape {list(x.shape)}")
    torch._check(
        x.dtype in (torch.float32, torch.bfloat16),
        lambda: f"lsh_hash: x must be float32 or bfloat16, got {x.dtype}; convert it with x.float()",
    )
    # P depends on the hidden size, a static property of a model: specialise on it.
    length = padded_length(max(int(x.shape[1]), 1))
    torch._check(signs.dtype == torch.int8, lambda: f"lsh_hash: signs must be int8, got {signs.dtype}")
    torch._check(
        signs.dim() == 3 and signs.shape[1] == 3 and signs.shape[2] == length,
        lambda: f"lsh_hash: signs must have shape [hashes >= 1, 3, {length}], got {list(signs.shape)}",
    )
    torch._check(1 <= dim <= length, lambda: f"lsh_hash: dim must be in [1, P] = [1, {length}], got {dim}")
    torch._check(
        signs.shape[0] * code_bits(dim) <= MAX_KEY_BITS,
        lambda: f"lsh_hash: {signs.shape[0]} hashes of {code_bits(dim)} bits each need more than "
        f"{MAX_KEY_BITS} bits; use fewer hashes or a smaller dim",
    )
    return x.new_empty(x.shape[0], dtype=torch.long)


@torch.library.register_fake("plait::lsh_bucket_reduce")
def _lsh_bucket_reduce_fake(
    x: torch.Tensor, keys: torch.Tensor, segments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(x.dim() == 2, lambda: f"lsh_bucket_reduce: x must be 2-D, got shape {list(x.shape)}")
    torch._check(
        x.dtype in (torch.float32, torch.bfloat16, torch.float64),
        lambda: f"lsh_bucket_reduce: x must be float32, bfloat16 or float64, got {x.dtype}",
    )
    torch._check(
        keys.dtype == torch.long and keys.dim() == 1 and keys.shape[0] == x.shape[0],
        lambda: f"lsh_bucket_reduce: keys must be int64 [N] with N = {x.shape[0]}, got {keys.dtype} {list(keys.shape)}",
    )
    torch._check(
        segments.dtype == torch.long and segments.dim() == 1,
        lambda: f"lsh_bucket_reduce: segments must be a 1-D int64 tensor, got {segments.dtype} {list(segments.shape)}",
    )
    nbuckets = torch.library.get_ctx().new_dynamic_size()
    return (
        x.new_empty(nbuckets, x.shape[1]),
        x.new_empty(nbuckets, dtype=torch.long),
        x.new_empty(x.shape[0], dtype=torch.long),
        x.new_empty(segments.shape[0], dtype=torch.long),
    )


def _bucket_reduce_setup_context(ctx, inputs, output) -> None:
    _, counts, index, _ = output
    ctx.save_for_backward(counts, index)


def _bucket_reduce_backward(ctx, grad_centroids, _grad_counts, _grad_index, _grad_segment_centroids):
    counts, index = ctx.saved_tensors
    if grad_centroids is None:
        return None, None, None
    # Divide in at least float32: a bfloat16 count above 256 would be rounded.
    wide = torch.promote_types(grad_centroids.dtype, torch.float32)
    per_row = grad_centroids.to(wide) / counts[:, None].to(wide)
    return per_row.index_select(0, index).to(grad_centroids.dtype), None, None


torch.library.register_autograd(
    "plait::lsh_bucket_reduce", _bucket_reduce_backward, setup_context=_bucket_reduce_setup_context
)
