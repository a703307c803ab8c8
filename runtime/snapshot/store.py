"""The snapshot daemon's state: versions, their data shards and parity shards, and the rules.

This module knows nothing about gRPC, so every rule is unit-testable in one process;
the server (``daemon.py``) only moves bytes and turns the typed errors raised here into
gRPC statuses.

What a node holds for version ``v``:

* one *data shard* per local rank r: the blob worker r wrote into shared memory. It is
  *committed* once the worker declared its size and checksum and the daemon re-read
  the bytes and found the same checksum;
* ``m`` *parity shards* per local rank (none when m = 0): for every (stripe s, j) of
  ``layout.parity_stripes(position)``, the sum over the k members of the stripe of
  ``P[j][c] * chunk c``. A member arrives as a chunk pushed by the node that owns it;
  the shard is *complete* when all k members arrived.

``v`` is *locally complete* when all P data shards are committed and all m * P parity
shards are complete. The coordinator publishes a version once every node reports it
locally complete; :meth:`SnapshotStore.publish` then drops everything older, so a node
holds the last published version (the one a restore would use) plus the versions in
progress after it, never older ones.

Locks: ``_alloc_lock`` serialises allocations (rare, P per version); every shard has its
own lock, held while its bytes or flags change (checksumming, parity accumulation); the
store's ``_lock`` guards the maps and the memory counter and is held only for
bookkeeping. Order: alloc lock, then a shard lock, then the store lock; never the other
way round. Heavy byte work (checksums, GF(2^8) accumulation) runs under a shard lock
only, so chunks of different shards are accumulated in parallel.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from plait.ops.checksum import checksum as compute_checksum
from plait.ops.gf256 import gf256_mul_add_
from plait.ops.rs_matrix import MAX_K, MAX_M, parity_matrix
from plait.runtime.snapshot import shm
from plait.runtime.snapshot.errors import (
    SnapshotChecksumError,
    SnapshotMemoryError,
    SnapshotNotFound,
    SnapshotRangeError,
    SnapshotRequestError,
    SnapshotVersionError,
)
from plait.runtime.snapshot.layout import GroupLayout, chunk_range

__all__ = [
    "MAX_META_BYTES",
    "MemberInfo",
    "DataShardInfo",
    "ParityShardInfo",
    "VersionInfo",
    "ChunkHeader",
    "ChunkPush",
    "ShardRange",
    "DataShard",
    "ParityShard",
    "SnapshotStore",
]

log = logging.getLogger(__name__)

MAX_META_BYTES = 64 * 1024  # the trainer's opaque per-shard metadata (step, RNG state, ...): small by design


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True)
class MemberInfo:
    """One data member of a parity shard's stripe, as its owner declared it when pushing.

    ``position`` is the member's index c in the stripe (0 <= c < k), i.e. which chunk of
    its blob it is; ``node`` is the node that owns the blob; ``size`` and ``checksum``
    describe the whole blob, ``chunk_len`` and ``chunk_checksum`` the chunk's actual bytes
    (``chunk_len`` may be below the layout's ``chunk_len`` for a blob's last chunks, even 0).
    """

    position: int
    node: int
    size: int
    checksum: int
    chunk_len: int
    chunk_checksum: int
    step: int


@dataclass(frozen=True)
class DataShardInfo:
    """A worker's blob on this node. ``checksum`` and ``step`` are None until committed."""

    local_rank: int
    size: int
    checksum: int | None
    step: int | None
    committed: bool
    path: str
    meta: bytes


@dataclass(frozen=True)
class ParityShardInfo:
    """Parity ``index`` (j) of ``stripe`` for local rank ``local_rank``.

    ``size`` is the longest member chunk that arrived so far (shorter chunks count as
    zero-padded); ``checksum`` is None until the shard is complete.
    """

    local_rank: int
    stripe: int
    index: int
    size: int
    checksum: int | None
    complete: bool
    path: str
    members: list[MemberInfo]


@dataclass(frozen=True)
class VersionInfo:
    """A version as this node holds it. ``step`` comes from the committed shards (None if none)."""

    version: int
    step: int | None
    complete: bool
    published: bool
    data: list[DataShardInfo]
    parity: list[ParityShardInfo]


@dataclass(frozen=True)
class ChunkHeader:
    """What a pushed chunk declares: where it goes, which member it is, and its owner's blob."""

    version: int
    local_rank: int
    stripe: int
    index: int  # parity j the receiver accumulates into
    member: int  # c: the member's position in the stripe (its chunk index in the blob)
    node: int  # the blob's owner
    blob_size: int
    blob_checksum: int
    chunk_len: int
    chunk_checksum: int
    step: int


@dataclass(frozen=True)
class ChunkPush:
    """One chunk to send after a commit: bytes [start, end) of the blob, to ``target_node``."""

    header_base: ChunkHeader  # chunk_checksum is filled in by the sender (0 here)
    start: int
    end: int
    target_node: int


@dataclass(frozen=True)
class ShardRange:
    """Bytes [offset, offset + length) of a readable shard, as both transports serve them.

    ``data`` is a view of the shard's mapping taken when the range was resolved: a drop
    or publish meanwhile unlinks the file but keeps this view valid, so a reader already
    streaming finishes with the bytes it asked for. ``checksum`` covers the whole shard.
    """

    data: torch.Tensor
    size: int
    checksum: int
    offset: int
    length: int


# --------------------------------------------------------------------------- shards


@dataclass(eq=False)
class _Shard:
    path: Path
    size: int
    tensor: torch.Tensor
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    dropped: bool = False


@dataclass(eq=False)
class DataShard(_Shard):
    version: int = 0
    local_rank: int = 0
    checksum: int | None = None
    step: int | None = None
    committed: bool = False
    meta: bytes = b""

    def info(self) -> DataShardInfo:
        return DataShardInfo(self.local_rank, self.size, self.checksum, self.step, self.committed, str(self.path),
                             self.meta)


@dataclass(eq=False)
class ParityShard(_Shard):
    version: int = 0
    local_rank: int = 0
    stripe: int = 0
    index: int = 0
    checksum: int | None = None
    complete: bool = False
    members: dict[int, MemberInfo] = field(default_factory=dict)

    def info(self) -> ParityShardInfo:
        arrived = dict(self.members)  # a copy: members may arrive meanwhile (under the shard's lock)
        members = [arrived[c] for c in sorted(arrived)]
        return ParityShardInfo(self.local_rank, self.stripe, self.index, self.size, self.checksum, self.complete,
                               str(self.path), members)


@dataclass(eq=False)
class _Version:
    version: int
    data: dict[int, DataShard] = field(default_factory=dict)
    parity: dict[tuple[int, int, int], ParityShard] = field(default_factory=dict)  # (local_rank, stripe, j)
    published: bool = False
    complete_logged: bool = False


# --------------------------------------------------------------------------- the store


class SnapshotStore:
    """Every version one node's daemon holds, in /dev/shm, with the rules that govern them."""

    def __init__(
        self,
        job: str,
        node: int,
        *,
        nnodes: int,
        nproc_per_node: int,
        ec_k: int,
        ec_m: int,
        max_memory: int,
        prefault: bool = True,
        root: Path = shm.SHM_DIR,
    ):
        shm.validate_job(job)
        if not 1 <= ec_k <= MAX_K:
            raise SnapshotRequestError(f"ec_k: got {ec_k}; accepted: 1 to {MAX_K} data shards per stripe")
        if not 0 <= ec_m <= MAX_M:
            raise SnapshotRequestError(f"ec_m: got {ec_m}; accepted: 0 to {MAX_M} parity shards per stripe")
        if nnodes < 1 or (ec_m > 0 and nnodes % (ec_k + ec_m)):
            raise SnapshotRequestError(
                f"nnodes: got {nnodes}; with ec_k={ec_k}, ec_m={ec_m} it must be a positive multiple of "
                f"k+m={ec_k + ec_m} (nodes form erasure-coding groups of k+m)"
            )
        if not 0 <= node < nnodes:
            raise SnapshotRequestError(f"node: got {node}; accepted: 0 to {nnodes - 1} (nnodes={nnodes})")
        if nproc_per_node < 1:
            raise SnapshotRequestError(f"nproc_per_node: got {nproc_per_node}; accepted: a positive number of ranks")
        if max_memory < 1:
            raise SnapshotRequestError(f"max_memory: got {max_memory}; accepted: a positive number of bytes")
        self.job = job
        self.node = node
        self.nnodes = nnodes
        self.nproc_per_node = nproc_per_node
        self.k = ec_k
        self.m = ec_m
        self.max_memory = max_memory
        self.prefault = prefault
        self.root = Path(root)
        self.layout = GroupLayout(ec_k, ec_m)
        self.position = self.layout.position(node) if ec_m else 0
        self.group = self.layout.group_of(node) if ec_m else node
        self._coef = parity_matrix(ec_k, ec_m).tolist() if ec_m else []
        self._held_parity = self.layout.parity_stripes(self.position) if ec_m else []  # [(stripe, j)]
        self._lock = threading.Lock()
        self._alloc_lock = threading.Lock()
        self._versions: dict[int, _Version] = {}
        self._used = 0
        self._published: int | None = None
        # Segments of dropped data shards, kept mapped-in-the-kernel for the next versions: a
        # new version of a blob is about the same size, and reusing its pages spares the
        # kernel zeroing fresh tmpfs pages (~0.5 ms per MiB) on every snapshot. Counted in
        # _pooled, not _used; released first when the cap needs room.
        self._pool: list[tuple[Path, int]] = []
        self._pooled = 0
        self._pool_limit = 2 * nproc_per_node
        self._pool_seq = 0

    # ----------------------------------------------------------------- queries

    @property
    def memory_used(self) -> int:
        with self._lock:
            return self._used

    @property
    def published(self) -> int | None:
        """The latest published version (None before the first publish)."""
        with self._lock:
            return self._published

    def is_complete(self, version: int) -> bool:
        with self._lock:
            ver = self._versions.get(version)
            return ver is not None and not self._missing(ver)

    def missing(self, version: int) -> list[str]:
        """What version ``version`` still lacks to be locally complete (empty when complete)."""
        with self._lock:
            ver = self._versions.get(version)
            if ver is None:
                raise SnapshotNotFound(self._no_version(version))
            return self._missing(ver)

    def versions(self, version: int | None = None) -> list[VersionInfo]:
        """Every version held (or just ``version``; empty if it is not held), oldest first."""
        with self._lock:
            vers = [self._versions[v] for v in sorted(self._versions) if version is None or v == version]
            out = []
            for ver in vers:
                data = [ver.data[r].info() for r in sorted(ver.data)]
                parity = [ver.parity[key].info() for key in sorted(ver.parity)]
                steps = [d.step for d in data if d.step is not None] + [mb.step for p in parity for mb in p.members]
                out.append(VersionInfo(ver.version, max(steps) if steps else None, not self._missing(ver),
                                       ver.published, data, parity))
            return out

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

    # ----------------------------------------------------------------- data shards

    def alloc(self, version: int, local_rank: int, size: int) -> DataShard:
        """Create the shared-memory segment for worker ``local_rank``'s blob of ``version``.

        An uncommitted shard already there is replaced (its worker restarted mid-write);
        a committed one is immutable and the request is refused.
        """
        self._check_rank(local_rank)
        if size < 0:
            raise SnapshotRequestError(f"size: got {size}; accepted: a blob size in bytes, >= 0")
        with self._alloc_lock:
            with self._lock:
                self._check_newer(version, "allocate")
                ver = self._versions.get(version)
                old = ver.data.get(local_rank) if ver else None
            if old is not None:
                with old.lock:
                    if old.committed:
                        raise SnapshotVersionError(
                            f"data shard version {version}, local rank {local_rank} is already committed "
                            f"({old.size} bytes, checksum {old.checksum:#x}); committed shards are immutable: "
                            "write the next version instead"
                        )
                    self._release_locked(old)
                with self._lock:
                    if ver.data.get(local_rank) is old:
                        del ver.data[local_rank]
                log.info("version %d local rank %d: replacing an uncommitted shard of %d bytes", version,
                         local_rank, old.size)
            name = shm.data_name(self.job, self.node, version, local_rank)
            recycled = self._take_from_pool(size)
            if recycled is not None:
                old_path, old_size = recycled
                with self._lock:
                    try:
                        self._reserve(size, f"the data shard of version {version}, local rank {local_rank}")
                    except BaseException:
                        shm.unlink(old_path)
                        raise
                try:
                    path = self.root / name
                    os.rename(old_path, path)
                    tensor = shm.resize_segment(path, size, prefault=self.prefault)
                except BaseException:
                    shm.unlink(old_path)
                    shm.unlink(self.root / name)
                    with self._lock:
                        self._used -= size
                    raise
            else:
                with self._lock:
                    self._reserve(size, f"the data shard of version {version}, local rank {local_rank}")
                try:
                    path, tensor = shm.create_segment(name, size, prefault=self.prefault, root=self.root)
                except BaseException:
                    with self._lock:
                        self._used -= size
                    raise
            shard = DataShard(path, size, tensor, version=version, local_rank=local_rank)
            with self._lock:
                try:
                    self._check_newer(version, "allocate")
                except SnapshotVersionError:
                    self._used -= size
                    shm.unlink(path)
                    raise
                self._versions.setdefault(version, _Version(version)).data[local_rank] = shard
            return shard

    def write(self, shard: DataShard, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into an uncommitted shard at ``offset`` (the streamed, non-zero-copy Put path)."""
        with shard.lock:
            self._check_live(shard)
            if shard.committed:
                raise SnapshotVersionError(
                    f"data shard version {shard.version}, local rank {shard.local_rank} is committed; it is immutable"
                )
            end = offset + len(data)
            if offset < 0 or end > shard.size:
                raise SnapshotRequestError(
                    f"Put for version {shard.version}, local rank {shard.local_rank}: bytes [{offset}, {end}) do not "
                    f"fit the {shard.size} bytes declared in the header; send exactly size bytes"
                )
            if end > offset:
                shard.tensor.numpy()[offset:end] = np.frombuffer(data, dtype=np.uint8)

    def discard(self, shard: DataShard) -> None:
        """Remove an uncommitted data shard (a Put that failed half-way); committed shards are kept."""
        with shard.lock:
            if shard.committed:
                return
            self._release_locked(shard)
        with self._lock:
            ver = self._versions.get(shard.version)
            if ver is not None and ver.data.get(shard.local_rank) is shard:
                del ver.data[shard.local_rank]

    def commit(self, version: int, local_rank: int, *, size: int, checksum: int, step: int, meta: bytes = b"") -> bool:
        """Verify and commit data shard (v, r); return whether v is now locally complete.

        The daemon re-reads the shared-memory bytes and recomputes the checksum: a worker
        that died mid-write, or wrote past its view, must not produce a shard that looks
        good. On a mismatch the shard stays uncommitted (the worker may rewrite and retry).
        Committing again with the same size, checksum, step and meta is a no-op, so a
        client may retry a Commit whose answer it lost.
        """
        self._check_rank(local_rank)
        if len(meta) > MAX_META_BYTES:
            raise SnapshotRequestError(
                f"meta: got {len(meta)} bytes; accepted: at most {MAX_META_BYTES} bytes (keep large state in the blob)"
            )
        with self._lock:
            ver = self._versions.get(version)
            shard = ver.data.get(local_rank) if ver else None
        if shard is None:
            raise SnapshotNotFound(
                f"no data shard for version {version}, local rank {local_rank} on node {self.node}; "
                "allocate it (Put) before committing"
            )
        with shard.lock:
            if shard.dropped:
                raise SnapshotNotFound(f"data shard version {version}, local rank {local_rank} was dropped meanwhile")
            if shard.committed:
                if (shard.size, shard.checksum, shard.step, shard.meta) == (size, checksum, step, meta):
                    return self.is_complete(version)
                raise SnapshotVersionError(
                    f"data shard version {version}, local rank {local_rank} is already committed with size "
                    f"{shard.size}, checksum {shard.checksum:#x}, step {shard.step}; committed shards are immutable"
                )
            if size != shard.size:
                raise SnapshotRequestError(
                    f"commit size: got {size} bytes but the shard of version {version}, local rank {local_rank} was "
                    f"allocated with {shard.size} bytes; commit the allocated size, or allocate again with the new size"
                )
            actual = compute_checksum(shard.tensor)
            if actual != checksum:
                raise SnapshotChecksumError(
                    f"checksum mismatch for version {version}, local rank {local_rank}: the worker declared "
                    f"{checksum:#x} but the {size} bytes in {shard.path} have {actual:#x}; the shard stays "
                    "uncommitted: rewrite it and commit again"
                )
            shard.checksum, shard.step, shard.meta = actual, step, bytes(meta)
            shm.write_json_atomic(shm.sidecar_path(shard.path), {
                "kind": "data", "version": version, "local_rank": local_rank, "size": size, "checksum": actual,
                "step": step, "meta": base64.b64encode(shard.meta).decode("ascii"),
            })
            shard.committed = True
        log.debug("committed version %d local rank %d: %d bytes, checksum %#x", version, local_rank, size, actual)
        return self._note_completion(version)

    def chunk_pushes(self, version: int, local_rank: int) -> list[ChunkPush]:
        """The k * m chunk transfers that committed shard (v, r) owes the parity holders of its group."""
        if not self.m:
            return []
        shard = self.data_shard(version, local_rank)
        pushes = []
        for c in range(self.k):
            start, end = chunk_range(shard.size, self.k, c)
            stripe = self.layout.stripe_of_chunk(self.position, c)
            for j in range(self.m):
                target = self.layout.node_at(self.group, self.layout.parity_position(stripe, j))
                header = ChunkHeader(version, local_rank, stripe, j, c, self.node, shard.size, shard.checksum or 0,
                                     end - start, 0, shard.step or 0)
                pushes.append(ChunkPush(header, start, end, target))
        return pushes

    # ----------------------------------------------------------------- parity shards

    def begin_chunk(self, header: ChunkHeader) -> ParityShard | None:
        """Validate a pushed chunk's header and make room for it; None if that member already arrived.

        The room is made before the bytes travel, so a memory cap is reported at once,
        not after a transfer of the whole chunk.
        """
        self._check_chunk_header(header)
        key = (header.local_rank, header.stripe, header.index)
        with self._lock:
            self._check_newer(header.version, "accept chunks for")
            ver = self._versions.setdefault(header.version, _Version(header.version))
            shard = ver.parity.get(key)
            if shard is None:
                name = shm.parity_name(self.job, self.node, header.version, *key)
                path, tensor = shm.create_segment(name, 0, prefault=False, root=self.root)
                shard = ParityShard(path, 0, tensor, version=header.version, local_rank=header.local_rank,
                                    stripe=header.stripe, index=header.index)
                ver.parity[key] = shard
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

    # ----------------------------------------------------------------- versions

    def publish(self, version: int) -> list[int]:
        """Mark ``version`` globally complete and drop every older version; return the dropped ones.

        Only a locally complete version can be published (a globally complete one is
        complete everywhere). Publishing the published version again is a no-op.
        """
        with self._lock:
            if self._published is not None and version < self._published:
                raise SnapshotVersionError(
                    f"cannot publish version {version}: version {self._published} is already published and "
                    "versions only move forward"
                )
            if self._published == version:
                return []
            ver = self._versions.get(version)
            if ver is None:
                raise SnapshotNotFound(self._no_version(version))
            missing = self._missing(ver)
            if missing:
                raise SnapshotVersionError(
                    f"cannot publish version {version}: it is not locally complete on node {self.node}; missing "
                    f"{', '.join(missing)}; publish a version only after every node reports it complete"
                )
            ver.published = True
            self._published = version
            older = [self._versions.pop(v) for v in sorted(self._versions) if v < version]
            shm.write_json_atomic(self.root / shm.published_name(self.job, self.node), {"version": version})
        for old in older:
            self._release_version(old)
        log.info("published version %d%s", version,
                 f"; dropped older version(s) {[o.version for o in older]}" if older else "")
        return [o.version for o in older]

    def drop(self, version: int) -> bool:
        """Remove ``version`` and its segments; False if it was not held (dropping is idempotent)."""
        with self._lock:
            ver = self._versions.pop(version, None)
        if ver is None:
            return False
        self._release_version(ver)
        log.info("dropped version %d", version)
        return True

    def close(self) -> None:
        """Forget every mapping (the segments stay in /dev/shm, to be adopted by the next daemon)."""
        with self._lock:
            for ver in self._versions.values():
                for shard in [*ver.data.values(), *ver.parity.values()]:
                    shard.tensor = torch.empty(0, dtype=torch.uint8)

    # ----------------------------------------------------------------- restart

    def adopt(self) -> list[int]:
        """Take over what a previous daemon of this job and node left in /dev/shm; return kept versions.

        A committed data shard or complete parity shard is kept if its sidecar parses,
        fits this daemon's configuration, and the bytes still have the recorded checksum;
        everything else (uncommitted or incomplete shards, corrupt bytes, versions older
        than the published one, leftovers) is deleted. One log line per version.
        """
        paths = shm.list_namespace(self.job, self.node, root=self.root)
        names = {p.name for p in paths}
        published_path = self.root / shm.published_name(self.job, self.node)
        published: int | None = None
        if published_path.name in names:
            try:
                published = int(shm.read_json(published_path)["version"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable %s", published_path)
                shm.unlink(published_path)
        kept: dict[int, list[str]] = {}
        dropped: dict[int, list[str]] = {}
        consumed = {published_path.name, shm.lock_name(self.job, self.node)}
        for path in paths:
            parsed = shm.parse_name(path.name)
            if parsed is None or parsed.sidecar:
                continue
            consumed |= {path.name, path.name + shm.SIDECAR_SUFFIX}
            label = (f"data r{parsed.local_rank}" if parsed.kind == "data"
                     else f"parity r{parsed.local_rank} s{parsed.stripe} j{parsed.index}")
            reason, shard = self._adopt_one(path, parsed, published)
            if shard is None:
                shm.unlink(path)
                shm.unlink(shm.sidecar_path(path))
                dropped.setdefault(parsed.version, []).append(f"{label} ({reason})")
                continue
            ver = self._versions.setdefault(parsed.version, _Version(parsed.version))
            if isinstance(shard, DataShard):
                ver.data[parsed.local_rank] = shard
            else:
                ver.parity[(parsed.local_rank, parsed.stripe, parsed.index)] = shard
            self._used += shard.size
            kept.setdefault(parsed.version, []).append(label)
        for path in paths:  # orphan sidecars, temporary files, anything unknown in the namespace
            if path.name not in consumed:
                shm.unlink(path)
        self._published = published
        if published is not None and published in self._versions:
            self._versions[published].published = True
        for v in sorted(set(kept) | set(dropped)):
            ver = self._versions.get(v)
            state = ""
            if ver is not None:
                state = "published" if ver.published else ("locally complete" if not self._missing(ver) else
                                                           "incomplete")
                ver.complete_logged = not self._missing(ver)
            if v in dropped:
                log.warning("version %d: adopted %d shard(s)%s, discarded %s", v, len(kept.get(v, [])),
                            f" ({state})" if state else "", ", ".join(dropped[v]))
            else:
                log.info("version %d: adopted %d shard(s) (%s)", v, len(kept[v]), state)
        return sorted(self._versions)

    def _adopt_one(self, path: Path, parsed: shm.SegmentName, published: int | None) -> tuple[str, _Shard | None]:
        if published is not None and parsed.version < published:
            return f"older than the published version {published}", None
        if parsed.local_rank >= self.nproc_per_node:
            return f"local rank outside nproc_per_node={self.nproc_per_node}", None
        if parsed.kind == "parity" and (parsed.stripe, parsed.index) not in self._held_parity:
            return f"this node holds no parity (stripe, j) = ({parsed.stripe}, {parsed.index}) with k={self.k}, m={self.m}", None
        side = shm.sidecar_path(path)
        if not side.exists():
            return "not committed" if parsed.kind == "data" else "incomplete", None
        try:
            meta = shm.read_json(side)
            size, expected = int(meta["size"]), int(meta["checksum"])
            if meta["kind"] != parsed.kind or int(meta["version"]) != parsed.version:
                return "sidecar does not match the file name", None
            actual_size = path.stat().st_size
            if actual_size != size:
                return f"size {actual_size} differs from the recorded {size}", None
            tensor = shm.map_segment(path, size)
            actual = compute_checksum(tensor)
            if actual != expected:
                return f"checksum {actual:#x} differs from the recorded {expected:#x}", None
            if parsed.kind == "data":
                return "", DataShard(path, size, tensor, version=parsed.version, local_rank=parsed.local_rank,
                                     checksum=expected, step=int(meta["step"]), committed=True,
                                     meta=base64.b64decode(meta["meta"]))
            members = {int(mb["position"]): MemberInfo(**{k: int(v) for k, v in mb.items()}) for mb in meta["members"]}
            if sorted(members) != list(range(self.k)):
                return f"members {sorted(members)} are not the k={self.k} of this code", None
            return "", ParityShard(path, size, tensor, version=parsed.version, local_rank=parsed.local_rank,
                                   stripe=parsed.stripe, index=parsed.index, checksum=expected, complete=True,
                                   members=members)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            return f"unreadable: {err}", None

    # ----------------------------------------------------------------- internals

    def _check_rank(self, local_rank: int) -> None:
        if not 0 <= local_rank < self.nproc_per_node:
            raise SnapshotRequestError(
                f"local_rank: got {local_rank}; accepted: 0 to {self.nproc_per_node - 1} "
                f"(nproc_per_node={self.nproc_per_node})"
            )

    def _check_parity_key(self, stripe: int, index: int) -> None:
        if not self.m:
            raise SnapshotRequestError(f"this job has no parity (ec_m=0), so there is no parity shard to address")
        if not 0 <= stripe < self.layout.n:
            raise SnapshotRequestError(f"stripe: got {stripe}; accepted: 0 to {self.layout.n - 1} (k+m={self.layout.n})")
        if not 0 <= index < self.m:
            raise SnapshotRequestError(f"parity index j: got {index}; accepted: 0 to {self.m - 1} (ec_m={self.m})")
        if (stripe, index) not in self._held_parity:
            raise SnapshotRequestError(
                f"node {self.node} (position {self.position} in its group) does not hold parity j={index} of stripe "
                f"{stripe}: that is on position {self.layout.parity_position(stripe, index)}; this node holds "
                f"(stripe, j) {self._held_parity}"
            )

    def _check_chunk_header(self, h: ChunkHeader) -> None:
        self._check_rank(h.local_rank)
        self._check_parity_key(h.stripe, h.index)
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

    def _check_newer(self, version: int, action: str) -> None:
        """Caller holds ``_lock``."""
        if version < 0:
            raise SnapshotRequestError(f"version: got {version}; accepted: a training step, >= 0")
        if self._published is not None and version <= self._published:
            raise SnapshotVersionError(
                f"cannot {action} version {version}: version {self._published} is already published on node "
                f"{self.node}; snapshots only move forward, use a version > {self._published}"
            )

    def _check_live(self, shard: _Shard) -> None:
        if shard.dropped:
            raise SnapshotNotFound(f"{shard.path.name} was dropped (its version was published past or dropped)")

    def _take_from_pool(self, size: int) -> tuple[Path, int] | None:
        """The pooled segment closest in size to ``size`` (within 2×), removed from the pool."""
        with self._lock:
            fits = [(abs(s - size), i) for i, (_, s) in enumerate(self._pool) if size // 2 <= s <= 2 * size and s > 0]
            if not fits or size == 0:
                return None
            _, i = min(fits)
            path, pooled = self._pool.pop(i)
            self._pooled -= pooled
            return path, pooled

    def _reserve(self, nbytes: int, what: str) -> None:
        """Account ``nbytes`` more, or raise the cap error. Caller holds ``_lock``."""
        while self._used + self._pooled + nbytes > self.max_memory and self._pool:
            path, size = self._pool.pop(0)  # pooled memory is the first to go
            shm.unlink(path)
            self._pooled -= size
        if self._used + nbytes > self.max_memory:
            raise SnapshotMemoryError(
                f"snapshot memory cap reached on node {self.node}: {what} needs {nbytes} bytes, {self._used} bytes "
                f"are in use and the cap is {self.max_memory} bytes; raise snapshot.max_memory (daemon flag "
                f"--max-memory) to at least {self._used + nbytes} bytes, or publish or drop older versions"
            )
        self._used += nbytes

    def _grow_locked(self, shard: ParityShard, size: int) -> None:
        """Grow a parity segment to ``size`` bytes (zero-filled). Caller holds ``shard.lock``."""
        delta = size - shard.size
        with self._lock:
            self._reserve(delta, f"parity shard version {shard.version}, local rank {shard.local_rank}, stripe "
                                 f"{shard.stripe}, j {shard.index} (growing to {size} bytes)")
        try:
            shard.tensor = shm.resize_segment(shard.path, size, prefault=self.prefault)
        except BaseException:
            with self._lock:
                self._used -= delta
            raise
        shard.size = size

    def _release_locked(self, shard: _Shard) -> None:
        """Unlink a shard and return its memory. Caller holds ``shard.lock``."""
        if shard.dropped:
            return
        shard.dropped = True
        shm.unlink(shm.sidecar_path(shard.path))
        with self._lock:
            if isinstance(shard, DataShard) and shard.size > 0 and len(self._pool) < self._pool_limit:
                self._pool_seq += 1
                pooled = self.root / f"{shm.namespace_prefix(self.job, self.node)}pool.{self._pool_seq}"
                self._used -= shard.size
                try:
                    os.rename(shard.path, pooled)
                    self._pool.append((pooled, shard.size))
                    self._pooled += shard.size
                except OSError:
                    shm.unlink(shard.path)
            else:
                self._used -= shard.size
                shm.unlink(shard.path)
        shard.tensor = torch.empty(0, dtype=torch.uint8)  # readers holding the old view keep it valid

    def _release_version(self, ver: _Version) -> None:
        for shard in [*ver.data.values(), *ver.parity.values()]:
            with shard.lock:
                self._release_locked(shard)

    def _missing(self, ver: _Version) -> list[str]:
        """Caller holds ``_lock``."""
        missing = []
        for r in range(self.nproc_per_node):
            shard = ver.data.get(r)
            if shard is None or not shard.committed:
                missing.append(f"data r{r} ({'not committed' if shard else 'not written'})")
        for r in range(self.nproc_per_node):
            for stripe, j in self._held_parity:
                shard = ver.parity.get((r, stripe, j))
                if shard is None or not shard.complete:
                    have = len(shard.members) if shard else 0
                    missing.append(f"parity r{r} s{stripe} j{j} ({have}/{self.k} members)")
        return missing

    def _note_completion(self, version: int) -> bool:
        with self._lock:
            ver = self._versions.get(version)
            if ver is None or self._missing(ver):
                return False
            first = not ver.complete_logged
            ver.complete_logged = True
        if first:
            log.info("version %d is locally complete on node %d", version, self.node)
        return True

    def _no_version(self, version: int) -> str:
        held = sorted(self._versions)
        return f"node {self.node} holds no version {version} (it holds {held or 'none'})"
