"""The Reed–Solomon code of plait's snapshots: its generator matrix and decoding matrices.

Systematic code over GF(2^8) (polynomial 0x11d) with ``k`` data and ``m`` parity shards,
``k + m <= 256``. Shard ``i < k`` is data shard ``i``; shard ``k + j`` is parity ``j``:

    parity[j] = XOR over c of  P[j][c] * data[c],      P[j][c] = 1 / ((k + j) XOR c)

``P`` is a Cauchy matrix (x_j = k + j and y_c = c are distinct field elements, and
x_j + y_c = x_j XOR y_c is never 0). Every square submatrix of a Cauchy matrix is
invertible, so every k x k submatrix of the generator ``[I; P]`` is invertible: any k
of the k + m shards recover the others. This is the matrix ISA-L's
``gf_gen_cauchy1_matrix`` builds, so parity is interchangeable with ISA-L's Cauchy mode.

Everything here is small-matrix arithmetic in plain Python (k <= 32: microseconds); the
byte-region work is done by the kernels in ``csrc/ec/``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from plait.ops.gf256 import gf256_mul

__all__ = ["MAX_K", "MAX_M", "check_km", "gf256_inv", "parity_matrix", "generator_matrix", "gf256_matrix_inverse", "decode_matrix"]

MAX_K = 32  # data shards per stripe
MAX_M = 8  # parity shards per stripe


def check_km(k: int, m: int) -> None:
    """Raise ValueError unless 1 <= k <= 32 and 0 <= m <= 8."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"Reed-Solomon k (data shards) must be in [1, {MAX_K}], got {k}")
    if not 0 <= m <= MAX_M:
        raise ValueError(f"Reed-Solomon m (parity shards) must be in [0, {MAX_M}], got {m}")


@functools.cache
def _tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    exp, x = [], 1
    for _ in range(255):
        exp.append(x)
        x = gf256_mul(x, 2)
    log = [0] * 256
    for i, v in enumerate(exp):
        log[v] = i
    return tuple(exp), tuple(log)


def _mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    exp, log = _tables()
    return exp[(log[a] + log[b]) % 255]


def gf256_inv(a: int) -> int:
    """The multiplicative inverse of a nonzero element of GF(2^8)."""
    if not 1 <= a <= 255:
        raise ValueError(f"gf256_inv: a must be in [1, 255], got {a}")
    exp, log = _tables()
    return exp[(255 - log[a]) % 255]


@functools.cache
def _parity_rows(k: int, m: int) -> tuple[tuple[int, ...], ...]:
    check_km(k, m)
    return tuple(tuple(gf256_inv((k + j) ^ c) for c in range(k)) for j in range(m))


def parity_matrix(k: int, m: int) -> torch.Tensor:
    """``P`` as a [m, k] uint8 tensor: ``parity[j] = XOR_c P[j, c] * data[c]``."""
    return torch.tensor(_parity_rows(k, m), dtype=torch.uint8).reshape(m, k)


def generator_matrix(k: int, m: int) -> torch.Tensor:
    """The systematic generator ``[I_k; P]``, [k + m, k] uint8: shard i = XOR_c G[i, c] * data[c]."""
    return torch.cat([torch.eye(k, dtype=torch.uint8), parity_matrix(k, m)])


def gf256_matrix_inverse(rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Inverse of a square matrix over GF(2^8) by Gauss–Jordan elimination; ValueError if singular."""
    n = len(rows)
    a = [list(r) + [int(i == j) for j in range(n)] for i, r in enumerate(rows)]
    if any(len(r) != 2 * n for r in a):
        raise ValueError("gf256_matrix_inverse: the matrix must be square")
    for col in range(n):
        pivot = next((r for r in range(col, n) if a[r][col]), None)
        if pivot is None:
            raise ValueError("gf256_matrix_inverse: the matrix is singular")
        a[col], a[pivot] = a[pivot], a[col]
        inv = gf256_inv(a[col][col])
        a[col] = [_mul(inv, v) for v in a[col]]
        for r in range(n):
            if r != col and a[r][col]:
                f = a[r][col]
                a[r] = [v ^ _mul(f, p) for v, p in zip(a[r], a[col])]
    return [r[n:] for r in a]


@functools.lru_cache(maxsize=4096)
def _decode_rows(k: int, m: int, present: tuple[int, ...], wanted: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    gen = [[int(i == c) for c in range(k)] for i in range(k)] + [list(r) for r in _parity_rows(k, m)]
    inv = gf256_matrix_inverse([gen[i] for i in present])  # data = inv · present shards
    out = []
    for w in wanted:
        # shard w = gen[w] · data = (gen[w] · inv) · present
        out.append(tuple(
            functools.reduce(lambda acc, c: acc ^ _mul(gen[w][c], inv[c][p]), range(k), 0) for p in range(k)
        ))
    return tuple(out)


def decode_matrix(k: int, m: int, present: Sequence[int], wanted: Sequence[int]) -> torch.Tensor:
    """Coefficients that rebuild shards ``wanted`` from the k shards ``present``.

    ``present`` lists k distinct shard indices in [0, k + m) (data 0..k-1, parity k..k+m-1)
    that survive; ``wanted`` lists the indices to rebuild (data or parity). Returns a
    [len(wanted), k] uint8 tensor D with ``shard[wanted[i]] = XOR_p D[i, p] * shard[present[p]]``.
    """
    check_km(k, m)
    present, wanted = tuple(int(p) for p in present), tuple(int(w) for w in wanted)
    n = k + m
    if len(present) != k or len(set(present)) != k:
        raise ValueError(f"decode_matrix: present must list k={k} distinct shards, got {list(present)}")
    for name, idx in (("present", present), ("wanted", wanted)):
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"decode_matrix: {name} has shard indices {bad} outside [0, {n})")
    rows = _decode_rows(k, m, present, wanted)
    return torch.tensor(rows, dtype=torch.uint8).reshape(len(wanted), k)
