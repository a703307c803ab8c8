"""The daemon's account of shared memory: bytes its shards hold, under a cap, plus a pool of spare segments.

Why a pool: a new version of a blob is about the size of the last one, and reusing a
dropped segment's pages spares the kernel zeroing fresh tmpfs pages (~0.5 ms per MiB)
on every snapshot. Pooled bytes are not counted as used; they are the first to go when
the cap needs room.

The budget's lock is a leaf: nothing else is locked while it is held.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from plait.runtime.snapshot import shm
from plait.runtime.snapshot.errors import SnapshotMemoryError

__all__ = ["MemoryBudget"]


class MemoryBudget:
    """Bytes in use by one daemon's shards, the cap on them, and the pooled segments."""

    def __init__(self, cap: int, *, node: int, pool_dir: Path, pool_prefix: str, pool_limit: int):
        self.cap = cap
        self.node = node
        self._pool_dir = pool_dir
        self._pool_prefix = pool_prefix
        self._pool_limit = pool_limit
        self._lock = threading.Lock()
        self._used = 0
        self._pool: list[tuple[Path, int]] = []
        self._pooled = 0
        self._seq = 0

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def reserve(self, nbytes: int, what: str) -> None:
        """Account ``nbytes`` more, or raise :class:`SnapshotMemoryError` naming ``what`` and the fix."""
        with self._lock:
            while self._used + self._pooled + nbytes > self.cap and self._pool:
                path, size = self._pool.pop(0)
                shm.unlink(path)
                self._pooled -= size
            if self._used + nbytes > self.cap:
                raise SnapshotMemoryError(
                    f"snapshot memory cap reached on node {self.node}: {what} needs {nbytes} bytes, {self._used} "
                    f"bytes are in use and the cap is {self.cap} bytes; raise snapshot.max_memory (daemon flag "
                    f"--max-memory) to at least {self._used + nbytes} bytes, or snapshot less often"
                )
            self._used += nbytes

    def add(self, nbytes: int) -> None:
        """Account bytes that already exist (adopted segments), even past the cap."""
        with self._lock:
            self._used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes

    def take_pooled(self, size: int) -> tuple[Path, int] | None:
        """The pooled segment closest in size to ``size`` (within 2×), removed from the pool."""
        if size == 0:
            return None
        with self._lock:
            fits = [(abs(s - size), i) for i, (_, s) in enumerate(self._pool) if size // 2 <= s <= 2 * size and s > 0]
            if not fits:
                return None
            _, i = min(fits)
            path, pooled = self._pool.pop(i)
            self._pooled -= pooled
            return path, pooled

    def recycle(self, path: Path, size: int) -> None:
        """Release a dropped data segment's bytes and keep the file for reuse, or unlink it when the pool is full."""
        with self._lock:
            self._used -= size
            if size > 0 and len(self._pool) < self._pool_limit:
                self._seq += 1
                pooled = self._pool_dir / f"{self._pool_prefix}pool.{self._seq}"
                try:
                    os.rename(path, pooled)
                except OSError:
                    shm.unlink(path)
                    return
                self._pool.append((pooled, size))
                self._pooled += size
                return
        shm.unlink(path)

    def clear_pool(self) -> None:
        with self._lock:
            for path, _ in self._pool:
                shm.unlink(path)
            self._pool.clear()
            self._pooled = 0
