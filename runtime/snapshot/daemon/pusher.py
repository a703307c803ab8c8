"""Sending the chunks of committed blobs to their parity holders (the daemon's background pushes)."""

from __future__ import annotations

import dataclasses
import heapq
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from plait.ops.checksum import checksum as compute_checksum
from plait.runtime.snapshot.auth import JobSecret
from plait.runtime.snapshot.daemon.config import PUSH_GIVE_UP_S
from plait.runtime.snapshot.daemon.store import SnapshotStore
from plait.runtime.snapshot.errors import DaemonUnavailable, SnapshotError
from plait.runtime.snapshot.records import ChunkHeader, ChunkPush
from plait.runtime.snapshot.transport.client import DaemonClient

__all__ = ["ChunkPusher"]

log = logging.getLogger(__name__)

PUSH_RPC_TIMEOUT_S = 10.0  # one push call; a hung peer (SIGSTOP) costs this, then the push backs off and retries



@dataclass(eq=False)
class _PushJob:
    """One chunk on its way to one parity holder, with its retry state."""

    push: ChunkPush
    header: ChunkHeader
    view: torch.Tensor
    remaining: list[int]  # transfers still owed by the same committed shard (shared by its jobs)
    deadline: float
    attempt: int = 0
    delay: float = 0.05

    @property
    def what(self) -> str:
        h = self.header
        return (f"chunk {h.member} of version {h.version} local rank {h.local_rank} (stripe {h.stripe}, j {h.index}) "
                f"to node {self.push.target_node}")


class ChunkPusher:
    """Sends the chunks of committed blobs to their parity holders, in background threads.

    A transfer that finds its peer unreachable (UNAVAILABLE, DEADLINE_EXCEEDED: the peer
    may be restarting) is retried with exponential backoff up to ``give_up_s``; it waits
    on a timer, not in a worker thread, so pushes to a dead peer never hold up pushes to
    healthy ones. Any other refusal is final. Nothing here raises into the server: every
    failure ends as a log line and a ``failed`` count in Status.

    Chunks travel through a :class:`DaemonClient` per peer, so over the peer's bulk plane
    when it advertises one (re-learnt over gRPC when its bulk port fails: a restarted
    peer may have another) and over gRPC PushChunk when it does not.
    """

    def __init__(self, store: SnapshotStore, peers: list[str], *, secret: JobSecret, give_up_s: float = PUSH_GIVE_UP_S,
                 workers: int = 4):
        self.store = store
        self.secret = secret
        self.peers = peers
        self.give_up_s = give_up_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="plait-push")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients: dict[str, DaemonClient] = {}
        self._inflight: set[tuple[int, int]] = set()
        self._timers: list[tuple[float, int, _PushJob]] = []  # heap of (due, sequence, job)
        self._timer_wakeup = threading.Condition(self._lock)
        self._sequence = 0
        self._timer_thread = threading.Thread(target=self._run_timers, name="plait-push-retry", daemon=True)
        self._timer_thread.start()
        self.pending = 0
        self.done = 0
        self.failed = 0

    def submit(self, version: int, local_rank: int) -> int:
        """Queue every chunk transfer owed by committed shard (v, r); return how many were queued.

        A shard whose transfers are still under way is not queued again (a retried Commit);
        one whose transfers ended (even in failure) is, so committing again re-pushes.
        """
        with self._lock:
            if (version, local_rank) in self._inflight or self._stop.is_set():
                return 0
        pushes = self.store.chunk_pushes(version, local_rank)
        if not pushes:
            return 0
        by_chunk: dict[int, list[ChunkPush]] = {}
        for push in pushes:
            by_chunk.setdefault(push.header_base.member, []).append(push)
        with self._lock:
            self._inflight.add((version, local_rank))
            self.pending += len(pushes)
        remaining = [len(pushes)]
        for group in by_chunk.values():
            self._pool.submit(self._prepare, group, remaining)
        return len(pushes)

    def _prepare(self, group: list[ChunkPush], remaining: list[int]) -> None:
        """Checksum one chunk once, then send it to each of its m parity holders."""
        base = group[0].header_base
        try:
            shard = self.store.data_shard(base.version, base.local_rank)
            view = shard.tensor[group[0].start:group[0].end]
            chunk_checksum = compute_checksum(view)
        except Exception as err:  # noqa: BLE001 (the shard was dropped meanwhile, or worse: logged)
            dropped = isinstance(err, SnapshotError)
            if dropped:
                log.info("not pushing version %d local rank %d: %s", base.version, base.local_rank, err)
            else:
                log.exception("cannot prepare chunk %d of version %d local rank %d", base.member, base.version,
                              base.local_rank)
            for _ in group:
                self._finish(base, remaining, ok=dropped)
            return
        deadline = time.monotonic() + self.give_up_s
        for push in group:
            header = dataclasses.replace(push.header_base, chunk_checksum=chunk_checksum)
            self._attempt(_PushJob(push, header, view, remaining, deadline))

    def _attempt(self, job: _PushJob) -> None:
        if self._stop.is_set():
            self._finish(job.header, job.remaining, ok=False)
            return
        try:
            outcome = self._send_once(job)
        except Exception:  # noqa: BLE001
            log.exception("push of %s failed", job.what)
            outcome = "failed"
        if outcome == "retry":
            if time.monotonic() + job.delay <= job.deadline:
                self._later(job)
                return
            log.error("giving up the push of %s after %d attempts over %.0f s", job.what, job.attempt, self.give_up_s)
            outcome = "failed"
        self._finish(job.header, job.remaining, ok=outcome == "done")

    def _send_once(self, job: _PushJob) -> str:
        """One attempt: "done", "failed" (final) or "retry"."""
        job.attempt += 1
        h = job.header
        try:
            self.store.data_shard(h.version, h.local_rank)  # still held, not dropped by a newer publish?
        except SnapshotError:
            log.info("dropping the push of %s: the shard is gone", job.what)
            return "done"
        address = self.peers[job.push.target_node]
        try:
            accepted = self._client(address).push_chunk(
                h.version, h.local_rank, stripe=h.stripe, index=h.index, member=h.member, node=h.node,
                blob_size=h.blob_size, blob_checksum=h.blob_checksum, step=h.step, chunk=job.view,
                chunk_checksum=h.chunk_checksum)
        except DaemonUnavailable as err:  # the peer is down or restarting (either plane): try again later
            if job.attempt == 1:
                log.warning("push of %s at %s: %s; retrying for up to %.0f s", job.what, address, err, self.give_up_s)
            return "retry"
        except SnapshotError as err:
            log.error("push of %s at %s refused: %s: %s", job.what, address, getattr(err, "grpc_code", err.code), err)
            return "failed"
        if job.attempt > 1:
            log.info("push of %s succeeded after %d attempts", job.what, job.attempt)
        if not accepted:
            log.debug("push of %s: the member was already there", job.what)
        return "done"

    def _later(self, job: _PushJob) -> None:
        with self._timer_wakeup:
            self._sequence += 1
            heapq.heappush(self._timers, (time.monotonic() + job.delay, self._sequence, job))
            job.delay = min(job.delay * 2, 1.0)
            self._timer_wakeup.notify()

    def _run_timers(self) -> None:
        with self._timer_wakeup:
            while not self._stop.is_set():
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    job = heapq.heappop(self._timers)[2]
                    try:
                        self._pool.submit(self._attempt, job)
                    except RuntimeError:  # the pool is shut down: we are stopping
                        return
                timeout = self._timers[0][0] - now if self._timers else None
                self._timer_wakeup.wait(timeout)

    def _finish(self, header: ChunkHeader, remaining: list[int], *, ok: bool) -> None:
        with self._lock:
            self.pending -= 1
            if ok:
                self.done += 1
            else:
                self.failed += 1
            remaining[0] -= 1
            if remaining[0] == 0:
                self._inflight.discard((header.version, header.local_rank))

    def _client(self, address: str) -> DaemonClient:
        with self._lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = DaemonClient(address, timeout=PUSH_RPC_TIMEOUT_S, secret=self.secret)
            return client

    @property
    def over_grpc(self) -> int:
        """Chunks pushed over gRPC PushChunk rather than the peers' bulk planes (fallbacks)."""
        with self._lock:
            clients = list(self._clients.values())
        return sum(client.transfers["push_chunk/grpc"] for client in clients)

    def close(self) -> None:
        """Stop: transfers not yet done are abandoned (logged as failed); the segments stay."""
        with self._timer_wakeup:
            self._stop.set()
            self._timer_wakeup.notify()
        self._timer_thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

