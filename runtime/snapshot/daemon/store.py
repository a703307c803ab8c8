"""The snapshot daemon's state: versions, their data shards and parity shards, and the rules.

This module knows nothing about gRPC, so every rule is unit-testable in one process;
the service (``service.py``, ``bulk_server.py``) only moves bytes and turns the typed
errors raised here into statuses. Reads live in ``reads.py``, parity accumulation in
``parity.py``, the memory account in ``budget.py``, adoption in ``adopt.py``.

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
holds the last published version (the one a restore would use) plus at most
MAX_IN_FLIGHT versions in progress after it, never older ones. Versions are ordered by
restore epoch, then step (``records.py``); :meth:`SnapshotStore.reset` begins a new epoch
after a restore and refuses anything of an older one.

Locks: ``_alloc_lock`` serialises allocations (rare, P per version); every shard has its
own lock, held while its bytes or flags change (checksumming, parity accumulation); the
store's ``_lock`` guards the maps and is held only for bookkeeping; the budget's lock is
a leaf. Order: alloc lock, then a shard lock, then the store lock; never the other way
round. Heavy byte work (checksums, GF(2^8) accumulation) runs under a shard lock
only, so chunks of different shards are accumulated in parallel.
"""

from __future__ import annotations

import base64
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from plait.ops.checksum import checksum as compute_checksum
from plait.ops.rs_matrix import parity_matrix
from plait.runtime.snapshot import shm
from plait.runtime.snapshot.config import check_code
from plait.runtime.snapshot.daemon.budget import MemoryBudget
from plait.runtime.snapshot.daemon.parity import ParityAccumulation
from plait.runtime.snapshot.daemon.reads import ShardReads
from plait.runtime.snapshot.daemon.rules import NodeRules
from plait.runtime.snapshot.daemon.shards import DataShard, ParityShard, Shard, Version
from plait.runtime.snapshot.errors import (
    SnapshotChecksumError,
    SnapshotNotFound,
    SnapshotRequestError,
    SnapshotVersionError,
)
from plait.runtime.snapshot.records import MAX_META_BYTES, ChunkPush, VersionInfo, epoch_of, version_text

__all__ = ["MAX_IN_FLIGHT", "SnapshotStore"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the store


MAX_IN_FLIGHT = 2  # unpublished versions held at once; a new one drops the oldest beyond this (it never completed)


class SnapshotStore(ShardReads, ParityAccumulation):
    """Every version one node's daemon holds, in shared memory, with the rules that govern them."""

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
        root: Path | None = None,
    ):
        shm.validate_job(job)
        check_code(ec_k, ec_m, nnodes, error=SnapshotRequestError, names=("ec_k", "ec_m", "nnodes"))
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
        self.prefault = prefault
        self.root = shm.segment_root() if root is None else Path(root)
        self.rules = NodeRules(node=node, nproc_per_node=nproc_per_node, k=ec_k, m=ec_m)
        self.layout = self.rules.layout
        self._coef = parity_matrix(ec_k, ec_m).tolist() if ec_m else []
        self._held_parity = self.rules.held_parity  # [(stripe, j)]
        self._check_rank = self.rules.check_rank
        self._check_parity_key = self.rules.check_parity_key
        self._check_chunk_header = self.rules.check_chunk_header
        self._lock = threading.Lock()
        self._alloc_lock = threading.Lock()
        self._versions: dict[int, Version] = {}
        self._published: int | None = None
        self._floor = 0  # versions below are of an earlier restore generation: refused (see reset)
        self.budget = MemoryBudget(max_memory, node=node, pool_dir=self.root,
                                   pool_prefix=shm.namespace_prefix(job, node), pool_limit=2 * nproc_per_node)

    # ----------------------------------------------------------------- queries

    @property
    def memory_used(self) -> int:
        return self.budget.used

    @property
    def max_memory(self) -> int:
        return self.budget.cap

    @property
    def floor(self) -> int:
        """The oldest version this daemon accepts: the start of the current restore generation."""
        with self._lock:
            return self._floor

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
            what = f"the data shard of {version_text(version)}, local rank {local_rank}"
            self.budget.reserve(size, what)
            try:
                path, tensor = self._data_segment(version, local_rank, size)
            except BaseException:
                self.budget.release(size)
                raise
            shard = DataShard(path, size, tensor, version=version, local_rank=local_rank)
            with self._lock:
                try:
                    self._check_newer(version, "allocate")
                except SnapshotVersionError:
                    self.budget.release(size)
                    shm.unlink(path)
                    raise
                stale = self._version_locked(version)
                stale_versions = [v.version for v in stale]
                self._versions[version].data[local_rank] = shard
            self._release_versions(stale)
            if stale_versions:
                log.warning("dropped unpublished version(s) %s: never completed, and %d newer ones are in flight",
                            [version_text(v) for v in stale_versions], MAX_IN_FLIGHT)
            return shard

    def _data_segment(self, version: int, local_rank: int, size: int) -> tuple[Path, torch.Tensor]:
        """A segment of ``size`` bytes for data shard (v, r): a pooled one renamed and resized, else a new one."""
        name = shm.data_name(self.job, self.node, version, local_rank)
        recycled = self.budget.take_pooled(size)
        if recycled is None:
            return shm.create_segment(name, size, prefault=self.prefault, root=self.root)
        old_path, _ = recycled
        path = self.root / name
        try:
            shm.rename(old_path, path)
            return path, shm.resize_segment(path, size, prefault=self.prefault)
        except BaseException:
            shm.unlink(old_path)
            shm.unlink(path)
            raise

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
        return self.rules.chunk_pushes(version, local_rank, shard.size, shard.checksum or 0, shard.step or 0)

    # ----------------------------------------------------------------- versions

    def publish(self, version: int) -> list[int]:
        """Mark ``version`` globally complete and drop every older version; return the dropped ones.

        Only a locally complete version can be published (a globally complete one is
        complete everywhere). Publishing the published version again is a no-op.
        """
        with self._lock:
            if self._published is not None and version < self._published:
                raise SnapshotVersionError(
                    f"cannot publish {version_text(version)}: {version_text(self._published)} is already published "
                    "and versions only move forward"
                )
            if self._published == version:
                return []
            ver = self._versions.get(version)
            if ver is None:
                raise SnapshotNotFound(self._no_version(version))
            missing = self._missing(ver)
            if missing:
                raise SnapshotVersionError(
                    f"cannot publish {version_text(version)}: it is not locally complete on node {self.node}; "
                    f"missing {', '.join(missing)}; publish a version only after every node reports it complete"
                )
            ver.published = True
            self._published = version
            older = [self._versions.pop(v) for v in sorted(self._versions) if v < version]
            self._persist_locked()
        self._release_versions(older)
        log.info("published %s%s", version_text(version),
                 f"; dropped older version(s) {[version_text(o.version) for o in older]}" if older else "")
        return [o.version for o in older]

    def reset(self, floor: int, keep: int | None = None) -> list[int]:
        """Begin a restore generation: drop every version but ``keep``; refuse anything older than ``floor``.

        Called once per restore, right after the restore decision, by the one owner of
        the version lifecycle. ``keep`` is the version the job restored from (None after
        a restore from disk or a fresh start): it stays, published if it is locally
        complete, so a second failure before the next publish still finds it. Every other
        version goes, whichever generation wrote it: a version some ranks committed before
        the crash must never be completed by the replayed run. Resetting again to the
        same floor is a no-op apart from the drops (a retried call).
        """
        with self._lock:
            if floor < self._floor:
                raise SnapshotVersionError(
                    f"cannot reset to epoch {epoch_of(floor)}: node {self.node} is already at epoch "
                    f"{epoch_of(self._floor)}; restore generations only move forward"
                )
            if keep is not None and keep >= floor:
                raise SnapshotRequestError(f"reset: keep {version_text(keep)} must be older than the new epoch's "
                                           f"first version ({version_text(floor)})")
            dropped = [self._versions.pop(v) for v in sorted(self._versions) if v != keep]
            kept = self._versions.get(keep) if keep is not None else None
            self._floor = floor
            if kept is not None and not self._missing(kept):
                kept.published = True
                self._published = keep
            else:
                if kept is not None:
                    kept.published = False
                self._published = None
            self._persist_locked()
        self._release_versions(dropped)
        log.info("reset to epoch %d%s%s", epoch_of(floor),
                 f", keeping {version_text(keep)}" if kept is not None else "",
                 f"; dropped {[version_text(v.version) for v in dropped]}" if dropped else "")
        return [v.version for v in dropped]

    def drop(self, version: int) -> bool:
        """Remove ``version`` and its segments; False if it was not held (dropping is idempotent)."""
        with self._lock:
            ver = self._versions.pop(version, None)
            if ver is not None and self._published == version:
                self._published = None
                self._persist_locked()
        if ver is None:
            return False
        self._release_versions([ver])
        log.info("dropped %s", version_text(version))
        return True

    def close(self) -> None:
        """Forget every mapping (the segments stay in /dev/shm, to be adopted by the next daemon)."""
        with self._lock:
            for ver in self._versions.values():
                for shard in [*ver.data.values(), *ver.parity.values()]:
                    shard.tensor = torch.empty(0, dtype=torch.uint8)

    # ----------------------------------------------------------------- restart (see adopt.py)

    def adopt(self) -> list[int]:
        """Take over what a previous daemon of this job and node left in shared memory; return kept versions."""
        from plait.runtime.snapshot.daemon.adopt import adopt

        return adopt(self)

    def holds_parity(self, stripe: int, index: int) -> bool:
        return (stripe, index) in self._held_parity

    def install(self, version: int, shard: DataShard | ParityShard) -> None:
        """Hold an adopted, verified shard."""
        with self._lock:
            ver = self._versions.setdefault(version, Version(version))
            if isinstance(shard, DataShard):
                ver.data[shard.local_rank] = shard
            else:
                ver.parity[(shard.local_rank, shard.stripe, shard.index)] = shard
        self.budget.add(shard.size)

    def set_pointers(self, published: int | None, floor: int) -> dict[int, str]:
        """Take the adopted published version and floor; return each held version's state for the log."""
        with self._lock:
            self._floor = floor
            self._published = published if published in self._versions else None
            states = {}
            for v, ver in self._versions.items():
                ver.published = v == self._published
                ver.complete_logged = not self._missing(ver)
                states[v] = "published" if ver.published else ("locally complete" if ver.complete_logged else
                                                               "incomplete")
            return states

    def unpublished_committed(self) -> list[tuple[int, int]]:
        """(version, local rank) of every committed data shard newer than the published version (to push)."""
        with self._lock:
            return [(v, r) for v, ver in sorted(self._versions.items()) if not ver.published
                    for r, shard in sorted(ver.data.items()) if shard.committed]

    # ----------------------------------------------------------------- internals

    def _check_newer(self, version: int, action: str) -> None:
        """Caller holds ``_lock``."""
        if version < 0:
            raise SnapshotRequestError(f"version: got {version}; accepted: a version id, >= 0")
        if version < self._floor:
            raise SnapshotVersionError(
                f"cannot {action} {version_text(version)}: it belongs to restore generation {epoch_of(version)}, "
                f"and node {self.node} was reset to generation {epoch_of(self._floor)}; a writer of an earlier "
                "generation is stale (its job restored since)"
            )
        if self._published is not None and version <= self._published:
            raise SnapshotVersionError(
                f"cannot {action} {version_text(version)}: {version_text(self._published)} is already published on "
                f"node {self.node}; snapshots only move forward"
            )

    def _check_live(self, shard: Shard) -> None:
        if shard.dropped:
            raise SnapshotNotFound(f"{shard.path.name} was dropped (its version was published past or dropped)")

    def _version_locked(self, version: int) -> list[Version]:
        """Make sure ``version`` is held; when it is new, pop the unpublished versions it pushes past
        MAX_IN_FLIGHT (oldest first) for the caller to release. Caller holds ``_lock``."""
        if version in self._versions:
            return []
        self._versions[version] = Version(version)
        pending = [v for v in sorted(self._versions) if not self._versions[v].published and v < version]
        excess = len(pending) + 1 - MAX_IN_FLIGHT
        return [self._versions.pop(v) for v in pending[:max(0, excess)]]

    def _persist_locked(self) -> None:
        """Record the published version and the floor in the namespace, for a restarted daemon. Caller holds ``_lock``."""
        shm.write_json_atomic(self.root / shm.published_name(self.job, self.node),
                              {"version": self._published, "floor": self._floor})

    def _grow_locked(self, shard: ParityShard, size: int) -> None:
        """Grow a parity segment to ``size`` bytes (zero-filled). Caller holds ``shard.lock``."""
        delta = size - shard.size
        self.budget.reserve(delta, f"parity shard {version_text(shard.version)}, local rank {shard.local_rank}, "
                                   f"stripe {shard.stripe}, j {shard.index} (growing to {size} bytes)")
        try:
            shard.tensor = shm.resize_segment(shard.path, size, prefault=self.prefault)
        except BaseException:
            self.budget.release(delta)
            raise
        shard.size = size

    def _release_locked(self, shard: Shard) -> None:
        """Unlink a shard and return its memory. Caller holds ``shard.lock``."""
        if shard.dropped:
            return
        shard.dropped = True
        shm.unlink(shm.sidecar_path(shard.path))
        if isinstance(shard, DataShard):
            self.budget.recycle(shard.path, shard.size)
        else:
            self.budget.release(shard.size)
            shm.unlink(shard.path)
        shard.tensor = torch.empty(0, dtype=torch.uint8)  # readers holding the old view keep it valid

    def _release_versions(self, versions: list[Version]) -> None:
        for ver in versions:
            for shard in [*ver.data.values(), *ver.parity.values()]:
                with shard.lock:
                    self._release_locked(shard)

    def _missing(self, ver: Version) -> list[str]:
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
