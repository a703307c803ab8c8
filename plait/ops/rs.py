"""Reed–Solomon encode and decode of snapshot stripes, on uint8 tensors, in place.

:class:`ReedSolomon` is the codec of :mod:`plait.ops.rs_matrix` (systematic, ``k`` data
and ``m`` parity shards, Cauchy parity rows, ISA-L's ``gf_gen_cauchy1_matrix``) run by
the fused kernel :func:`plait.ops.gf256.gf256_matmul_`: an encode is one call, each
data byte read once and each parity byte written once; a decode is one call per 8
rebuilt shards. Shards are tensors the caller owns (typically views of shared memory);
nothing is copied and nothing is allocated but the small coefficient matrices.

    rs = ReedSolomon(k=4, m=2)
    rs.encode(data, parity)                       # parity[j] written in place
    rs.decode({1: data[1], 2: data[2], 3: data[3], 4: parity[0]}, wanted={0: lost0})
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch

from plait.ops.gf256 import gf256_matmul_
from plait.ops.rs_matrix import MAX_M, check_km, decode_matrix, parity_matrix

__all__ = ["ReedSolomon"]

# The kernel writes at most this many outputs per call.
_MAX_OUTS_PER_CALL = 8
assert MAX_M <= _MAX_OUTS_PER_CALL


class ReedSolomon:
    """The ``(k, m)`` code: ``k`` data shards (indices ``0..k-1``) and ``m`` parity shards
    (indices ``k..k+m-1``), any ``k`` of which recover all the others.

    Shards are contiguous uint8 tensors of one common length, on one device (CPU or CUDA).
    """

    def __init__(self, k: int, m: int) -> None:
        check_km(k, m)
        self.k = k
        self.m = m
        self._parity = parity_matrix(k, m)

    def __repr__(self) -> str:
        return f"ReedSolomon(k={self.k}, m={self.m})"

    @property
    def n(self) -> int:
        """Shards per stripe, ``k + m``."""
        return self.k + self.m

    def encode(self, data: Sequence[torch.Tensor], parity: Sequence[torch.Tensor]) -> None:
        """Write the ``m`` parity shards of the ``k`` data shards into ``parity``, in place.

        ``parity[j]`` is overwritten with ``XOR_c P[j, c] * data[c]``; it must not share
        memory with any data shard or another parity shard. Raises ValueError for the wrong
        number of shards, RuntimeError (from the kernel) for bad tensors.
        """
        if len(data) != self.k:
            raise ValueError(f"{self!r}.encode: expected {self.k} data shards, got {len(data)}")
        if len(parity) != self.m:
            raise ValueError(f"{self!r}.encode: expected {self.m} parity shards, got {len(parity)}")
        if self.m:
            gf256_matmul_(parity, data, self._parity)

    def decode(self, shards: Mapping[int, torch.Tensor], wanted: Mapping[int, torch.Tensor]) -> None:
        """Rebuild the shards ``wanted`` (index -> output tensor) from the surviving ``shards``.

        ``shards`` maps at least ``k`` shard indices (data or parity) to their tensors; the
        ``k`` lowest indices are used (data shards first: their rows of the generator are
        unit vectors, so the decoding matrix is the cheapest to build). Each tensor of
        ``wanted`` is overwritten with the shard of its index, data or parity, and must not
        share memory with a shard read or another output. Raises ValueError when fewer than
        ``k`` shards are given or an index is outside ``[0, k + m)``.
        """
        n = self.n
        shards = {operator.index(i): t for i, t in shards.items()}
        wanted = {operator.index(i): t for i, t in wanted.items()}
        for what, indices in (("shards", shards), ("wanted", wanted)):
            bad = sorted(i for i in indices if not 0 <= i < n)
            if bad:
                raise ValueError(f"{self!r}.decode: {what} has shard indices {bad} outside [0, {n})")
        if not wanted:
            return
        if len(shards) < self.k:
            raise ValueError(
                f"{self!r}.decode: needs at least k={self.k} shards to rebuild any, got "
                f"{len(shards)} ({sorted(shards)}); more than m={self.m} shards are lost"
            )
        present = sorted(shards)[: self.k]
        ins = [shards[i] for i in present]
        targets = sorted(wanted)
        for start in range(0, len(targets), _MAX_OUTS_PER_CALL):
            group = targets[start : start + _MAX_OUTS_PER_CALL]
            coefs = decode_matrix(self.k, self.m, present, group)
            gf256_matmul_([wanted[i] for i in group], ins, coefs)
