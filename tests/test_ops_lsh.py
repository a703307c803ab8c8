"""plait::lsh_hash and plait::lsh_bucket_reduce on CPU (LSH-MoE): kernels vs the
pure-PyTorch references, hash properties, bucket invariants, gradients, opcheck and
argument errors; the CUDA kernels against the CPU ones where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from plait.ops import (
    bucket_reduce,
    bucket_reduce_reference,
    bucket_scatter,
    lsh_hash,
    lsh_hash_reference,
    lsh_signs,
)
from plait.ops.lsh import code_bits, padded_length

DTYPES = (torch.float32, torch.bfloat16)


def _digits(keys: torch.Tensor, hashes: int, dim: int) -> torch.Tensor:
    """The per-hash codes [N, hashes] of mixed-radix keys."""
    radix = 2 * dim
    return torch.stack([(keys // radix**h) % radix for h in range(hashes)], dim=1)


# ------------------------------------------------------------------------------ signs


def test_signs_are_deterministic_plus_minus_one():
    signs = lsh_signs(4, 96, seed=7)
    assert signs.dtype == torch.int8 and signs.shape == (4, 3, 128)
    assert set(signs.unique().tolist()) == {-1, 1}
    assert torch.equal(signs, lsh_signs(4, 96, seed=7))
    assert not torch.equal(signs, lsh_signs(4, 96, seed=8))
    assert lsh_signs(1, 1, 0).shape == (1, 3, 1)
    with pytest.raises(ValueError, match="hashes must be >= 1"):
        lsh_signs(0, 8, 0)
    with pytest.raises(ValueError, match="d .* must be >= 1"):
        lsh_signs(1, 0, 0)


# ------------------------------------------------------------------- hash vs reference


def _dims(d: int, hashes: int) -> list[int]:
    """dim = 1, a non-power of two below P, P / 2 and P, those whose key fits."""
    length = padded_length(d)
    dims = sorted({1, max(1, (3 * length) // 4 - 1), max(1, length // 2), length})
    return [p for p in dims if hashes * code_bits(p) <= 62]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hashes", [1, 6])
@pytest.mark.parametrize("d", [1, 5, 96, 128, 200])
def test_hash_matches_reference(d, hashes, dtype):
    gen = torch.Generator().manual_seed(d * 10 + hashes)
    signs = lsh_signs(hashes, d, seed=d)
    x = torch.randn(61, d, generator=gen).to(dtype)
    x[7] = 0  # the zero vector: code 0 for every hash
    # Entries in {-1, 0, 1} make y integer-valued, so equal |y_j| (ties) are frequent.
    x[40:] = torch.randint(-1, 2, (21, d), generator=gen).to(dtype)
    for dim in _dims(d, hashes):
        keys = lsh_hash(x, signs, dim)
        assert keys.dtype == torch.long and keys.shape == (61,)
        assert torch.equal(keys, lsh_hash_reference(x, signs, dim)), dim
        assert int(keys[7]) == 0
        assert bool((keys >= 0).all()) and bool((keys < (2 * dim) ** hashes).all())


def test_hash_ties_go_to_the_lowest_coordinate():
    signs = lsh_signs(1, 8, seed=0)
    x = torch.randint(-1, 2, (200, 8), generator=torch.Generator().manual_seed(1)).float()
    keys = lsh_hash(x, signs, 8)
    # Small integers stay exact through a matrix product, so y is exact here too.
    y = x
    for i in range(3):
        y = (y * signs[0, i].float()) @ _hadamard_matrix(8).T
    magnitude = y.abs()
    tied = (magnitude == magnitude.amax(1, keepdim=True)).sum(1) > 1
    assert int(tied.sum()) > 20, "the inputs should produce ties"
    first = (magnitude == magnitude.amax(1, keepdim=True)).float().argmax(1)
    expected = 2 * first + (y.gather(1, first[:, None]).squeeze(1) < 0).long()
    assert torch.equal(keys, expected)


def _hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester's H_n, H[i, j] = (-1)^popcount(i & j): the butterflies' transform."""
    i = torch.arange(n)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity.float()


@pytest.mark.parametrize("dtype", DTYPES)
def test_hash_of_no_rows_and_one_row(dtype):
    signs = lsh_signs(3, 24, seed=1)
    empty = lsh_hash(torch.empty(0, 24, dtype=dtype), signs, 16)
    assert empty.shape == (0,) and empty.dtype == torch.long
    assert lsh_hash_reference(torch.empty(0, 24, dtype=dtype), signs, 16).shape == (0,)
    one = torch.randn(1, 24).to(dtype)
    assert torch.equal(lsh_hash(one, signs, 16), lsh_hash_reference(one, signs, 16))


# --------------------------------------------------------------------- hash properties


def test_identical_tokens_share_a_key_and_positive_scaling_keeps_it():
    signs = lsh_signs(6, 96, seed=3)
    x = torch.randn(50, 96, generator=torch.Generator().manual_seed(3))
    keys = lsh_hash(x, signs, 64)
    assert torch.equal(lsh_hash(x.repeat(3, 1), signs, 64), keys.repeat(3))
    # A power-of-two scale is exact through every addition and subtraction (no overflow
    # or underflow at these magnitudes), so y scales exactly and the key cannot change.
    for scale in (2.0**-6, 0.5, 2.0, 2.0**10):
        assert torch.equal(lsh_hash(x * scale, signs, 64), keys), scale
    # Any other positive scale rounds x and then each of the 3 log2 P = 21 additions of a
    # y_j: a relative change of at most ~22 * 2^-24 ~ 1.3e-6. A code changes only if the top
    # two |y_j| are that close: probability ~1.5 * 2.6e-6 per hash (the order-statistics
    # density of the near-duplicate test below), ~2e-5 per token over 6 hashes. Two
    # changed keys out of 50 is far beyond that.
    same = lsh_hash(x * 3.7, signs, 64) == keys
    assert int(same.sum()) >= 48


def test_negating_a_token_flips_the_parity_of_every_code():
    # Negation commutes exactly with IEEE addition and subtraction, so y(-x) = -y(x):
    # same j*, opposite sign, i.e. every code's lowest bit flips.
    hashes, dim = 6, 128
    signs = lsh_signs(hashes, 128, seed=4)
    x = torch.randn(100, 128, generator=torch.Generator().manual_seed(4))
    codes = _digits(lsh_hash(x, signs, dim), hashes, dim)
    flipped = _digits(lsh_hash(-x, signs, dim), hashes, dim)
    assert torch.equal(flipped, codes ^ 1)


def test_near_duplicates_collide_and_random_tokens_rarely_do():
    d = dim = 128
    gen = torch.Generator().manual_seed(5)
    signs = lsh_signs(1, d, seed=5)
    pairs = 2000
    x = torch.randn(2 * pairs, d, generator=gen)
    keys = lsh_hash(x, signs, dim)
    # Random tokens: with d = P, x ~ N(0, I) and the rotation R = H D3 H D2 H D1 / P^1.5 is
    # orthogonal, so y = R x ~ N(0, I) for any signs: its code is uniform on 2 dim values
    # and two independent tokens collide with probability 1 / (2 dim) = 1/256. Over 2000
    # disjoint pairs the mean is 7.8; Chernoff gives P(X >= 30) <= (e^d / (1+d)^(1+d))^mu
    # with 1 + d = 30 / 7.8: about 1e-8.
    collisions = int((keys[:pairs] == keys[pairs:]).sum())
    assert collisions < 30, collisions
    # Near-duplicates: noise of relative size eps = 1e-4 moves each y_j by about eps |y|;
    # the code changes only if the top two |y_j| (128 half-normal samples, density at the
    # top about 1.5 per unit sigma) are closer than ~7 eps sigma: probability ~1e-3. Allow
    # 5% of 500 tokens (25, against a mean of ~0.5).
    near = x[:500] + 1e-4 * torch.randn(500, d, generator=gen)
    kept = int((lsh_hash(near, signs, dim) == keys[:500]).sum())
    assert kept >= 475, kept


# ------------------------------------------------------------- bucket reduce vs reference


def _buckets_equal(got, expected) -> None:
    # Both sum in float64 from +0.0 in row order (bfloat16/float32 -> float64 is exact),
    # divide once by the integer count and round once to float32 (bfloat16: then from
    # float32). IEEE-754 addition and division are correctly rounded and there is no
    # multiplication to fuse, so the centroids agree bit for bit.
    for name, a, b in zip(("centroids", "counts", "index", "segment_centroids"), got, expected):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name


SEGMENTS = [[37], [0, 12, 0, 20, 1, 0], [5, 0, 0], [0, 0, 9], [1] * 8, [40, 3]]


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("segments", SEGMENTS)
def test_bucket_reduce_matches_reference(segments, dtype):
    gen = torch.Generator().manual_seed(sum(segments) + len(segments))
    n = sum(segments)
    x = torch.randn(n, 24, generator=gen).to(dtype)
    for keys in (torch.randint(0, 4, (n,), generator=gen), torch.randint(-(2**62), 2**62, (n,), generator=gen)):
        _buckets_equal(bucket_reduce(x, keys, segments), bucket_reduce_reference(x, keys, segments))
    keys = lsh_hash(x.float(), lsh_signs(2, 24, seed=0), 2)
    got = bucket_reduce(x, keys, torch.tensor(segments))
    _buckets_equal(got, bucket_reduce_reference(x, keys, segments))


def test_bucket_reduce_of_no_rows():
    for segments in ([], [0, 0, 0]):
        got = bucket_reduce(torch.empty(0, 5), torch.empty(0, dtype=torch.long), segments)
        assert got.centroids.shape == (0, 5) and got.counts.shape == (0,) and got.index.shape == (0,)
        assert torch.equal(got.segment_centroids, torch.zeros(len(segments), dtype=torch.long))
        _buckets_equal(got, bucket_reduce_reference(torch.empty(0, 5), torch.empty(0, dtype=torch.long), segments))


def test_bucket_invariants():
    gen = torch.Generator().manual_seed(9)
    segments = [30, 0, 45, 25]
    n = sum(segments)
    x = torch.randn(n, 16, dtype=torch.float64, generator=gen)
    keys = torch.randint(0, 6, (n,), generator=gen)
    centroids, counts, index, segment_centroids = bucket_reduce(x, keys, segments)
    segment_of_row = torch.repeat_interleave(torch.arange(4), torch.tensor(segments))
    segment_of_centroid = torch.repeat_interleave(torch.arange(4), segment_centroids)
    assert int(segment_centroids.sum()) == centroids.shape[0] == counts.shape[0]
    assert torch.equal(counts, torch.bincount(index, minlength=counts.numel()))
    # Every row maps to a centroid of its own segment holding its own key, and one
    # segment's centroids have distinct keys, ordered by their first row.
    assert torch.equal(segment_of_centroid[index], segment_of_row)
    first_row = torch.full((counts.numel(),), n).scatter_reduce(0, index, torch.arange(n), "amin")
    assert torch.equal(keys[first_row][index], keys)
    assert bool((first_row[1:] > first_row[:-1]).all())
    # centroid * count sums to the segment sums: each centroid is its sum divided and
    # rounded once (relative error 2^-53), times the count another 2^-53; the row sums
    # themselves carry at most n 2^-53 of sum |x|. 1e-12 of sum |x| bounds all of it.
    sums = torch.zeros(4, 16, dtype=torch.float64).index_add_(0, segment_of_centroid, centroids * counts[:, None])
    expected = torch.zeros(4, 16, dtype=torch.float64).index_add_(0, segment_of_row, x)
    assert torch.allclose(sums, expected, rtol=0, atol=1e-12 * float(x.abs().sum()))


# ------------------------------------------------------------------ scatter and gradients


def test_bucket_scatter_is_the_gather_and_its_gradient_the_index_add():
    index = torch.tensor([2, 0, 2, 1, 2])
    y = torch.randn(3, 4, requires_grad=True)
    out = bucket_scatter(y, index)
    assert torch.equal(out, y.detach()[index])
    grad = torch.randn(5, 4)
    out.backward(grad)
    assert torch.equal(y.grad, torch.zeros(3, 4).index_add_(0, index, grad))
    with pytest.raises(ValueError, match="index must be a 1-D int64"):
        bucket_scatter(y, index.int())


def test_centroid_gradient_float64_gradcheck():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(12, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    keys = torch.randint(0, 3, (12,), generator=gen)
    assert torch.autograd.gradcheck(lambda t: bucket_reduce(t, keys, [5, 0, 7]).centroids, (x,))


def test_only_the_centroids_carry_a_gradient():
    x = torch.randn(10, 16, requires_grad=True)
    keys = lsh_hash(x, lsh_signs(2, 16, seed=0), 16)
    assert not keys.requires_grad
    buckets = bucket_reduce(x, keys, [4, 6])
    assert buckets.centroids.requires_grad
    assert not any(t.requires_grad for t in buckets[1:])


def test_centroid_gradient_float32_matches_the_reference_autograd():
    # The kernel's backward divides in float32 (correctly rounded); the reference's
    # autograd divides in float64 and rounds to float32. Double rounding of a quotient is
    # innocuous when 53 >= 2 * 24 + 2, so the gradients agree exactly.
    gen = torch.Generator().manual_seed(12)
    segments = [20, 0, 30]
    x = torch.randn(50, 8, generator=gen, requires_grad=True)
    keys = torch.randint(0, 5, (50,), generator=gen)
    grad = torch.randn(x.shape[0], 8, generator=gen)
    got = bucket_reduce(x, keys, segments)
    (got.centroids * grad[: got.centroids.shape[0]]).sum().backward()
    kernel_grad = x.grad.clone()
    x.grad = None
    expected = bucket_reduce_reference(x, keys, segments)
    (expected.centroids * grad[: expected.centroids.shape[0]]).sum().backward()
    assert torch.equal(kernel_grad, x.grad)
    c = got.index
    assert torch.equal(kernel_grad, grad[c] / got.counts[c, None].float())


# ----------------------------------------------------------------------------- opcheck


def test_opcheck_lsh_hash():
    signs = lsh_signs(2, 40, seed=0)
    for dtype in DTYPES:
        x = torch.randn(9, 40).to(dtype)
        torch.library.opcheck(torch.ops.plait.lsh_hash.default, (x, signs, 33))


def test_opcheck_lsh_bucket_reduce():
    gen = torch.Generator().manual_seed(13)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(14, 6, generator=gen).to(dtype).requires_grad_()
        keys = torch.randint(0, 3, (14,), generator=gen)
        torch.library.opcheck(torch.ops.plait.lsh_bucket_reduce.default, (x, keys, torch.tensor([4, 0, 10])))


def test_ops_trace_with_symbolic_shapes():
    # The fake kernels under symbolic tracing: the number of centroids is data-dependent.
    from torch.fx.experimental.proxy_tensor import make_fx

    def compress(x, signs, segments):
        buckets = bucket_reduce(x, lsh_hash(x, signs, 33), segments)
        return bucket_scatter(buckets.centroids, buckets.index)

    x, signs, segments = torch.randn(9, 40), lsh_signs(2, 40, seed=0), torch.tensor([4, 5])
    graph = make_fx(compress, tracing_mode="symbolic")(x, signs, segments)
    assert torch.equal(graph(x, signs, segments), compress(x, signs, segments))


# ------------------------------------------------------------------------------ errors


def test_hash_argument_errors():
    x = torch.randn(4, 96)
    signs = lsh_signs(2, 96, seed=0)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Double"):
        lsh_hash(x.double(), signs, 8)
    with pytest.raises(RuntimeError, match="signs must be int8"):
        lsh_hash(x, signs.float(), 8)
    with pytest.raises(RuntimeError, match=r"signs must have shape \[hashes >= 1, 3, 128\]"):
        lsh_hash(x, lsh_signs(2, 200, seed=0), 8)
    with pytest.raises(RuntimeError, match="signs must hold only \\+1 and -1"):
        lsh_hash(x, signs * 2, 8)
    for dim in (0, 129):
        with pytest.raises(RuntimeError, match=r"dim must be in \[1, P\] = \[1, 128\]"):
            lsh_hash(x, signs, dim)
    with pytest.raises(RuntimeError, match="need 64 bits, but a key holds at most 62; use at most 7 hashes"):
        lsh_hash(x, lsh_signs(8, 96, seed=0), 128)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        lsh_hash(x[0], signs, 8)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        lsh_hash(torch.randn(96, 4).T, signs, 8)


def test_bucket_reduce_argument_errors():
    x = torch.randn(6, 3)
    keys = torch.zeros(6, dtype=torch.long)
    with pytest.raises(RuntimeError, match="segments must sum to N = 6 .*, got 5"):
        bucket_reduce(x, keys, [2, 3])
    with pytest.raises(RuntimeError, match=r"segments\[1\] = -1 is negative"):
        bucket_reduce(x, keys, [7, -1])
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float64, got Int"):
        bucket_reduce(x.int(), keys, [6])
    with pytest.raises(RuntimeError, match="keys must be int64 \\[N\\] with N = 6"):
        bucket_reduce(x, keys.int(), [6])
    with pytest.raises(RuntimeError, match="keys must be int64 \\[N\\] with N = 6"):
        bucket_reduce(x, keys[:5], [6])
    with pytest.raises(RuntimeError, match="segments must be a 1-D int64 tensor"):
        bucket_reduce(x, keys, torch.tensor([6], dtype=torch.int32))


# --------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_match_cpu_kernels():
    gen = torch.Generator().manual_seed(21)
    for d, hashes in ((1, 1), (96, 6), (128, 1), (1000, 4), (4096, 2)):
        signs = lsh_signs(hashes, d, seed=d)
        x = torch.randn(301, d, generator=gen)
        x[5] = 0
        x[200:] = torch.randint(-1, 2, (101, d), generator=gen).float()
        for dtype in DTYPES:
            for dim in _dims(d, hashes):
                expected = lsh_hash(x.to(dtype), signs, dim)
                got = lsh_hash(x.to(dtype).cuda(), signs.cuda(), dim)
                assert torch.equal(got.cpu(), expected), (d, hashes, dtype, dim)
    for segments in SEGMENTS + [[5000, 0, 3000, 1]]:
        n = sum(segments)
        for dtype in (*DTYPES, torch.float64):
            x = torch.randn(n, 40, generator=gen).to(dtype)
            keys = torch.randint(0, 7, (n,), generator=gen)
            expected = bucket_reduce(x, keys, segments)
            for seg in (torch.tensor(segments), torch.tensor(segments).cuda()):
                got = bucket_reduce(x.cuda(), keys.cuda(), seg)
                _buckets_equal([t.cpu() for t in got], expected)
