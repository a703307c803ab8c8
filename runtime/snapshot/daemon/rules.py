"""What one node's daemon may be asked: which local ranks, parity shards and chunks exist for it.

Pure functions of the node's place in its erasure-coding group (``layout.py``), so the
store, the gRPC service and the bulk plane refuse a bad request alike, with a message
that names the field and what would be right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.runtime.snapshot.errors import SnapshotRequestError
from plait.runtime.snapshot.layout import GroupLayout, chunk_range
from plait.runtime.snapshot.records import ChunkHeader, ChunkPush

__all__ = ["NodeRules"]


@dataclass(frozen=True)
class NodeRules:
    """The geometry of one node (its position in its group, the parity it holds) and the checks it implies."""

    node: int
    nproc_per_node: int
    k: int
    m: int
    layout: GroupLayout = field(init=False)
    position: int = field(init=False)
    group: int = field(init=False)
    held_parity: list[tuple[int, int]] = field(init=False)  # (stripe, j) of every parity shard this node holds

    def __post_init__(self) -> None:
        layout = GroupLayout(self.k, self.m)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "position", layout.position(self.node) if self.m else 0)
        object.__setattr__(self, "group", layout.group_of(self.node) if self.m else self.node)
        object.__setattr__(self, "held_parity", layout.parity_stripes(self.position) if self.m else [])

    def chunk_pushes(self, version: int, local_rank: int, size: int, checksum: int, step: int) -> list[ChunkPush]:
        """The k * m chunk transfers a committed blob of ``size`` bytes owes the parity holders of its group."""
        pushes = []
        for c in range(self.k):
            start, end = chunk_range(size, self.k, c)
            stripe = self.layout.stripe_of_chunk(self.position, c)
            for j in range(self.m):
                target = self.layout.node_at(self.group, self.layout.parity_position(stripe, j))
                header = ChunkHeader(version, local_rank, stripe, j, c, self.node, size, checksum, end - start, 0, step)
                pushes.append(ChunkPush(header, start, end, target))
        return pushes

    def check_rank(self, local_rank: int) -> None:
        if not 0 <= local_rank < self.nproc_per_node:
            raise SnapshotRequestError(
                f"local_rank: got {local_rank}; accepted: 0 to {self.nproc_per_node - 1} "
                f"(nproc_per_node={self.nproc_per_node})"
            )

    def check_parity_key(self, stripe: int, index: int) -> None:
        if not self.m:
            raise SnapshotRequestError("this job has no parity (ec_m=0), so there is no parity shard to address")
        if not 0 <= stripe < self.layout.n:
            raise SnapshotRequestError(f"stripe: got {stripe}; accepted: 0 to {self.layout.n - 1} (k+m={self.layout.n})")
        if not 0 <= index < self.m:
            raise SnapshotRequestError(f"parity index j: got {index}; accepted: 0 to {self.m - 1} (ec_m={self.m})")
        if (stripe, index) not in self.held_parity:
            raise SnapshotRequestError(
                f"node {self.node} (position {self.position} in its group) does not hold parity j={index} of stripe "
                f"{stripe}: that is on position {self.layout.parity_position(stripe, index)}; this node holds "
                f"(stripe, j) {self.held_parity}"
            )

    def check_chunk_header(self, h: ChunkHeader) -> None:
        self.check_rank(h.local_rank)
        self.check_parity_key(h.stripe, h.index)
        if not 0 <= h.member < self.k:
            raise SnapshotRequestError(f"member: got {h.member}; accepted: 0 to {self.k - 1} (ec_k={self.k})")
        owner = self.layout.node_at(self.group, self.layout.data_position(h.stripe, h.member))
        if h.node != owner:
            raise SnapshotRequestError(
                f"node: got {h.node}, but member {h.member} of stripe {h.stripe} in group {self.group} is owned "
                f"by node {owner}"
            )
        if h.blob_size < 0:
            raise SnapshotRequestError(f"blob_size: got {h.blob_size}; accepted: a size in bytes, >= 0")
        start, end = chunk_range(h.blob_size, self.k, h.member)
        if h.chunk_len != end - start:
            raise SnapshotRequestError(
                f"chunk_len: got {h.chunk_len}, but chunk {h.member} of a {h.blob_size}-byte blob cut in k={self.k} "
                f"is bytes [{start}, {end}): {end - start} bytes"
            )
