"""The receiving side of parity: pushed chunks verified and accumulated into the parity shards a node holds.

Part of :class:`~plait.runtime.snapshot.daemon.store.SnapshotStore` (a base class of it,
sharing its locks and maps; see the store's docstring for the lock order).
"""

from __future__ import annotations

import dataclasses

import torch

from plait.ops.checksum import checksum as compute_checksum
from plait.ops.gf256 import gf256_mul_add_
from plait.runtime.snapshot import shm
from plait.runtime.snapshot.daemon.shards import ParityShard
from plait.runtime.snapshot.errors import SnapshotChecksumError, SnapshotRequestError
from plait.runtime.snapshot.records import ChunkHeader, MemberInfo

__all__ = ["ParityAccumulation"]


class ParityAccumulation:
    """``begin_chunk`` and ``add_chunk`` of the store."""


    def begin_chunk(self, header: ChunkHeader) -> ParityShard | None:
        """Validate a pushed chunk's header and make room for it; None if that member already arrived.

        The room is made before the bytes travel, so a memory cap is reported at once,
        not after a transfer of the whole chunk.
        """
        self._check_chunk_header(header)
        key = (header.local_rank, header.stripe, header.index)
        with self._lock:
            self._check_newer(header.version, "accept chunks for")
            stale = self._version_locked(header.version)
            ver = self._versions[header.version]
            shard = ver.parity.get(key)
            if shard is None:
                name = shm.parity_name(self.job, self.node, header.version, *key)
                path, tensor = shm.create_segment(name, 0, prefault=False, root=self.root)
                shard = ParityShard(path, 0, tensor, version=header.version, local_rank=header.local_rank,
                                    stripe=header.stripe, index=header.index)
                ver.parity[key] = shard
        self._release_versions(stale)
        with shard.lock:
            self._check_live(shard)
            if header.member in shard.members:
                return None
            if header.chunk_len > shard.size:
                self._grow_locked(shard, header.chunk_len)
        return shard

    def add_chunk(self, header: ChunkHeader, shard: ParityShard, data: torch.Tensor, *,
                  received_checksum: int | None = None) -> bool:
        """Verify a chunk's bytes and accumulate ``P[j][c] * chunk`` into the parity shard.

        Returns False (and changes nothing) when the member already arrived: pushes are
        retried after lost answers, and XOR-accumulating a member twice would cancel it.
        ``received_checksum`` is the checksum of ``data`` if the receiver computed it
        slice by slice as the bytes arrived (so it overlaps the transfer instead of
        following it); otherwise it is computed here.
        """
        if data.numel() != header.chunk_len:
            raise SnapshotRequestError(
                f"chunk for version {header.version}, stripe {header.stripe}, member {header.member}: got "
                f"{data.numel()} bytes but the header declared chunk_len {header.chunk_len}"
            )
        actual = compute_checksum(data) if received_checksum is None else received_checksum
        if actual != header.chunk_checksum:
            raise SnapshotChecksumError(
                f"chunk checksum mismatch for version {header.version}, local rank {header.local_rank}, stripe "
                f"{header.stripe}, member {header.member} from node {header.node}: declared "
                f"{header.chunk_checksum:#x}, received bytes have {actual:#x}; the sender should push it again"
            )
        with shard.lock:
            self._check_live(shard)
            if header.member in shard.members:
                return False
            if header.chunk_len > shard.size:
                self._grow_locked(shard, header.chunk_len)
            if header.chunk_len:
                coef = self._coef[header.index][header.member]
                gf256_mul_add_(shard.tensor[: header.chunk_len], data, coef)
            shard.members[header.member] = MemberInfo(header.member, header.node, header.blob_size,
                                                      header.blob_checksum, header.chunk_len, header.chunk_checksum,
                                                      header.step)
            if len(shard.members) == self.k:
                shard.checksum = compute_checksum(shard.tensor)
                shm.write_json_atomic(shm.sidecar_path(shard.path), {
                    "kind": "parity", "version": shard.version, "local_rank": shard.local_rank,
                    "stripe": shard.stripe, "index": shard.index, "size": shard.size, "checksum": shard.checksum,
                    "members": [dataclasses.asdict(mb) for _, mb in sorted(shard.members.items())],
                })
                shard.complete = True
        if shard.complete:
            self._note_completion(header.version)
        return True
