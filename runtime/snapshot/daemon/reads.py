"""Reading shards: the committed data and complete parity a Get (gRPC or bulk) may return.

Part of :class:`~plait.runtime.snapshot.daemon.store.SnapshotStore` (a base class of it,
sharing its locks and maps), so both transports refuse a read alike.
"""

from __future__ import annotations

from plait.runtime.snapshot.daemon.shards import DataShard, ParityShard
from plait.runtime.snapshot.errors import SnapshotNotFound, SnapshotRangeError, SnapshotRequestError, SnapshotVersionError
from plait.runtime.snapshot.records import ShardRange

__all__ = ["ShardReads"]


class ShardReads:
    """``data_shard``, ``parity_shard`` and ``read_range`` of the store."""

    def data_shard(self, version: int, local_rank: int) -> DataShard:
        """The committed data shard (v, r), for reading; raises if absent or not committed."""
        self._check_rank(local_rank)
        with self._lock:
            ver = self._versions.get(version)
            shard = ver.data.get(local_rank) if ver else None
            if shard is None:
                raise SnapshotNotFound(
                    f"no data shard for version {version}, local rank {local_rank} on node {self.node}"
                    + ("" if ver else f" ({self._no_version(version)})")
                )
            if not shard.committed:
                raise SnapshotVersionError(
                    f"data shard version {version}, local rank {local_rank} on node {self.node} is not committed yet; "
                    "read it after its worker's Commit succeeded"
                )
            return shard

    def parity_shard(self, version: int, local_rank: int, stripe: int, index: int) -> ParityShard:
        """The complete parity shard (v, r, s, j), for reading; raises if absent or incomplete."""
        self._check_rank(local_rank)
        self._check_parity_key(stripe, index)
        with self._lock:
            ver = self._versions.get(version)
            shard = ver.parity.get((local_rank, stripe, index)) if ver else None
            if shard is None:
                raise SnapshotNotFound(
                    f"no parity shard for version {version}, local rank {local_rank}, stripe {stripe}, j {index} "
                    f"on node {self.node}" + ("" if ver else f" ({self._no_version(version)})")
                )
            if not shard.complete:
                raise SnapshotVersionError(
                    f"parity shard version {version}, local rank {local_rank}, stripe {stripe}, j {index} on node "
                    f"{self.node} is incomplete: {len(shard.members)} of {self.k} members arrived "
                    f"(members {sorted(shard.members)})"
                )
            return shard

    def read_range(self, kind: str, version: int, local_rank: int, *, stripe: int = 0, index: int = 0,
                   offset: int = 0, length: int | None = None) -> ShardRange:
        """Resolve a Get: bytes [offset, offset + length) of a committed data shard or complete parity shard.

        ``kind`` is "data" or "parity"; ``length`` None means to the end. One place for the
        rules and their messages, so gRPC Get and the bulk plane refuse alike.
        """
        if kind == "data":
            shard: DataShard | ParityShard = self.data_shard(version, local_rank)
        elif kind == "parity":
            shard = self.parity_shard(version, local_rank, stripe, index)
        else:
            raise SnapshotRequestError(f"Get: kind must be data or parity, got {kind!r}")
        tensor, size, stored = shard.tensor, shard.size, shard.checksum or 0  # one consistent snapshot of the shard
        if length is None:
            length = size - offset
        if offset < 0 or length < 0:
            raise SnapshotRequestError(f"Get: offset {offset} and length {length} must be >= 0")
        if offset + length > size:
            raise SnapshotRangeError(f"Get: bytes [{offset}, {offset + length}) reach past the end of the "
                                     f"{size}-byte shard {shard.path.name}; ask for at most {max(0, size - offset)} "
                                     f"bytes from offset {offset}")
        return ShardRange(tensor[offset:offset + length], size, stored, offset, length)
