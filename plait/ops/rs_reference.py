"""A slow, independent Reed–Solomon codec in NumPy: the oracle of the kernels' tests.

It implements the code of :mod:`plait.ops.rs_matrix` (systematic, ``k`` data and ``m``
parity shards over GF(2^8) with polynomial 0x11d, parity rows ``P[j][c] = 1 / ((k + j)
XOR c)``) from the definitions, and on purpose shares no code with it or with the
kernels: its own log/exp tables (built by stepping the generator 2 through the field
with shifts and XORs), its own Cauchy matrix, its own Gauss–Jordan elimination, and
byte-region products done by indexing a 256 x 256 product table. A mistake would have
to be made twice, the same way, to go unnoticed.

    parity = encode(data, m)                 # data: [k, L] uint8 -> parity: [m, L]
    rebuilt = decode({0: s0, 2: s2, ...}, wanted=[1, 5], k=k, m=m)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["POLY", "mul_table", "inverse", "generator", "encode", "decode"]

POLY = 0x11D


@functools.cache
def _log_exp() -> tuple[np.ndarray, np.ndarray]:
    """exp[i] = 2^i for i in [0, 510) (twice round the group, so log a + log b indexes it)
    and log[a] for a != 0 (log[0] is unused)."""
    exp = np.zeros(510, dtype=np.int64)
    value = 1
    for i in range(255):
        exp[i] = value
        value <<= 1  # times x
        if value & 0x100:
            value ^= POLY
    if value != 1 or len(set(exp[:255].tolist())) != 255:
        raise AssertionError("2 must generate the multiplicative group of GF(2^8)")
    exp[255:] = exp[:255]
    log = np.zeros(256, dtype=np.int64)
    log[exp[:255]] = np.arange(255)
    return exp, log


@functools.cache
def mul_table() -> np.ndarray:
    """The 256 x 256 product table, uint8: ``mul_table()[a, b] = a * b``."""
    exp, log = _log_exp()
    table = exp[log[:, None] + log[None, :]].astype(np.uint8)
    table[0, :] = 0
    table[:, 0] = 0
    return table


def inverse(a: int) -> int:
    """1 / a for a nonzero field element."""
    if not 1 <= a <= 255:
        raise ValueError(f"inverse: a must be in [1, 255], got {a}")
    exp, log = _log_exp()
    return int(exp[(255 - log[a]) % 255])


def generator(k: int, m: int) -> np.ndarray:
    """The [k + m, k] uint8 generator: the identity on top of the Cauchy parity rows."""
    if not (1 <= k and 0 <= m and k + m <= 256):
        raise ValueError(f"generator: need 1 <= k, 0 <= m, k + m <= 256, got k={k}, m={m}")
    g = np.zeros((k + m, k), dtype=np.uint8)
    g[np.arange(k), np.arange(k)] = 1
    for j in range(m):
        for c in range(k):
            g[k + j, c] = inverse((k + j) ^ c)  # x_j + y_c with x_j = k + j, y_c = c
    return g


def _matmul(coefs: np.ndarray, shards: np.ndarray) -> np.ndarray:
    """[r, k] coefficients times [k, L] shards -> [r, L]: XOR of table lookups."""
    table = mul_table()
    out = np.zeros((coefs.shape[0], shards.shape[1]), dtype=np.uint8)
    for r in range(coefs.shape[0]):
        for c in range(coefs.shape[1]):
            out[r] ^= table[coefs[r, c]][shards[c]]
    return out


def _invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a square uint8 matrix over GF(2^8), Gauss–Jordan on [A | I]."""
    table = mul_table()
    n = matrix.shape[0]
    a = np.concatenate([matrix.astype(np.uint8), np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        rows = np.nonzero(a[col:, col])[0]
        if rows.size == 0:
            raise ValueError("invert: singular matrix")
        pivot = col + int(rows[0])
        a[[col, pivot]] = a[[pivot, col]]
        a[col] = table[inverse(int(a[col, col]))][a[col]]
        for r in range(n):
            if r != col and a[r, col]:
                a[r] ^= table[a[r, col]][a[col]]
    return a[:, n:]


def encode(data: np.ndarray, m: int) -> np.ndarray:
    """The [m, L] parity of the [k, L] uint8 data."""
    data = np.asarray(data, dtype=np.uint8)
    k = data.shape[0]
    return _matmul(generator(k, m)[k:], data)


def decode(present: Mapping[int, np.ndarray], wanted: Sequence[int], k: int, m: int) -> dict[int, np.ndarray]:
    """Rebuild the shards ``wanted`` from any ``k`` of the ``present`` ones (index -> [L] uint8).

    Solves for the data (the inverse of the generator's rows of k present shards times
    those shards), then multiplies by the generator's rows of the wanted shards.
    """
    if len(present) < k:
        raise ValueError(f"decode: needs {k} shards, got {len(present)}")
    use = sorted(present)[:k]
    g = generator(k, m)
    data = _matmul(_invert(g[use]), np.stack([np.asarray(present[i], dtype=np.uint8) for i in use]))
    rebuilt = _matmul(g[list(wanted)], data)
    return {w: rebuilt[r] for r, w in enumerate(wanted)}
