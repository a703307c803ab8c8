"""Where every byte of a snapshot lives: data chunks, stripes and parity across an EC group.

Nodes are split into erasure-coding groups of ``n = k + m`` consecutive nodes; a node's
position in its group is ``q = node mod n``. Every local rank ``r`` of a node writes one
*blob* (its whole state) per snapshot version. Local ranks never mix: the ranks with the
same ``r`` on the n nodes of a group form their own independent code.

A blob of ``B`` bytes is cut into k chunks of ``C = chunk_len(B, k)`` bytes (the last ones
may be short or empty; missing bytes count as zeros). Chunk ``c`` of the node at
position ``q`` is member ``c`` of stripe ``s = (q − c) mod n``. Stripe ``s`` has its k data
members at positions ``s, s+1, …, s+k−1`` and its m parity shards at positions
``s+k, …, s+k+m−1`` (mod n): parity ``j`` is on position ``(s + k + j) mod n`` and equals

    XOR over p of  P[j][p] · chunk p of stripe s       (P = rs_matrix.parity_matrix(k, m))

padded to the stripe's longest chunk. Every node is a data member of k stripes and holds
one parity shard of m stripes, so it stores its own blob plus m parity chunks of about
B/k bytes: an extra m/k of its snapshot, and it sends each of its k chunks to the m
parity holders of that chunk's stripe: m·B bytes per snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GroupLayout", "chunk_len", "chunk_range"]

ALIGN = 64  # chunk lengths are multiples of a cache line


def chunk_len(size: int, k: int) -> int:
    """Bytes per chunk of a blob of ``size`` bytes cut in k: ceil(size / k) rounded up to 64."""
    per = -(-size // k)
    return -(-per // ALIGN) * ALIGN


def chunk_range(size: int, k: int, c: int) -> tuple[int, int]:
    """[start, end) of chunk c within the blob (end − start may be < chunk_len, even 0)."""
    n = chunk_len(size, k)
    start = min(size, c * n)
    return start, min(size, start + n)


@dataclass(frozen=True)
class GroupLayout:
    """The stripe geometry of one EC group: ``k`` data + ``m`` parity positions."""

    k: int
    m: int

    @property
    def n(self) -> int:
        return self.k + self.m

    def group_of(self, node: int) -> int:
        return node // self.n

    def position(self, node: int) -> int:
        return node % self.n

    def node_at(self, group: int, position: int) -> int:
        return group * self.n + position % self.n

    def stripe_of_chunk(self, position: int, c: int) -> int:
        """The stripe that chunk c of the node at ``position`` belongs to (as member c)."""
        return (position - c) % self.n

    def data_position(self, stripe: int, member: int) -> int:
        """Position of the node whose chunk ``member`` is member ``member`` of ``stripe``."""
        return (stripe + member) % self.n

    def parity_position(self, stripe: int, j: int) -> int:
        return (stripe + self.k + j) % self.n

    def parity_stripes(self, position: int) -> list[tuple[int, int]]:
        """(stripe, j) of every parity shard the node at ``position`` holds."""
        return [((position - self.k - j) % self.n, j) for j in range(self.m)]
