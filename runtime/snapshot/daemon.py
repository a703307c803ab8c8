"""The per-node snapshot daemon: a gRPC server over :class:`~plait.runtime.snapshot.store.SnapshotStore`.

    python -m plait.runtime.snapshot.daemon --job J --node 0 --nnodes 3 --nproc-per-node 2 \\
        --ec-k 2 --ec-m 1 --port 7100 --peers 127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102

(``plait daemon`` takes the same flags.) One daemon runs per node. Its workers put their
blobs into its shared memory and commit them; after each commit the daemon pushes the
blob's k chunks to the m parity holders of each chunk's stripe (its peers), in the
background, retrying while a peer is unreachable (it may be restarting), and giving up
with a log line after a bounded time rather than failing the commit: a missing parity
member only keeps the version from becoming complete, which the coordinator sees.

Two planes: gRPC for control (and as a fallback), and a framed-TCP bulk plane on its own
port (``--bulk-port``, :mod:`~plait.runtime.snapshot.bulk`) for the bytes of pushes and
Gets, which measured faster than gRPC streaming on every path here (``plait bench transport``).

The daemon is a separate process, not a thread of a worker, so a crashing worker does
not take the snapshots with it; the segments are files in /dev/shm, so even a crashing
daemon does not: a restarted one re-adopts what it finds (``SnapshotStore.adopt``).
SIGTERM stops it cleanly and keeps the segments; ``--cleanup`` removes them on exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import heapq
import inspect
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch

from plait.errors import CLIError, PlaitError
from plait.ops.checksum import checksum as compute_checksum
from plait.ops.rs_matrix import MAX_K, MAX_M
from plait.runtime.snapshot import bulk, shm
from plait.runtime.snapshot import snapshot_pb2 as pb
from plait.runtime.snapshot import snapshot_pb2_grpc as pb_grpc
from plait.runtime.snapshot import wire
from plait.runtime.snapshot.client import (
    MESSAGE_BYTES,
    SERVICE,
    DaemonClient,
    channel_options,
    tune_malloc,
)
from plait.runtime.snapshot.errors import DaemonUnavailable, SnapshotError, SnapshotRequestError
from plait.runtime.snapshot.store import ChunkHeader, ChunkPush, DataShardInfo, ParityShardInfo, SnapshotStore

__all__ = [
    "DaemonConfig",
    "ChunkPusher",
    "SnapshotServicer",
    "add_daemon_parser",
    "cmd_daemon",
    "parse_bytes",
    "main",
]

log = logging.getLogger(__name__)

PUSH_GIVE_UP_S = 120.0  # how long a push is retried while its peer is unreachable


# --------------------------------------------------------------------------- configuration


@dataclass(kw_only=True)
class DaemonConfig:
    """Everything one daemon needs; built from the command line by :func:`config_from_args`."""

    job: str
    node: int
    nnodes: int
    nproc_per_node: int
    ec_k: int = 1
    ec_m: int = 0
    port: int = 0  # 0: any free port (the ready file says which)
    bulk_port: int = 0  # the bulk plane's port; 0: any free port; -1: no bulk plane (bytes over gRPC only)
    host: str = "127.0.0.1"
    peers: list[str] = field(default_factory=list)  # every node's daemon address, index = node
    max_memory: int = 0  # 0: the size of /dev/shm
    ready_file: Path | None = None
    log_file: Path | None = None
    cleanup: bool = False
    push_give_up_s: float = PUSH_GIVE_UP_S


_SIZE_RE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|TiB)?")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def parse_bytes(text: str, flag: str = "--max-memory") -> int:
    """``"1073741824"``, ``"512MiB"``, ``"8GiB"`` -> bytes; a CLIError naming ``flag`` otherwise."""
    match = _SIZE_RE.fullmatch(str(text).strip())
    if match is None or int(match[1]) <= 0:
        raise CLIError(f"{flag}: got {text!r}; accepted: a positive number of bytes, optionally with a KiB, MiB, "
                       "GiB or TiB suffix (e.g. 8GiB)")
    return int(match[1]) * _UNITS[match[2]]


def _parse_address(text: str, index: int) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CLIError(f"--peers: entry {index} is {text!r}; accepted: HOST:PORT with a port in [1, 65535] "
                       "(e.g. 10.0.0.7:7100)")
    return f"{host}:{int(port)}"


def config_from_args(args: argparse.Namespace) -> DaemonConfig:
    """Check the flags (each error names its flag and the fix) and build the config."""
    if not isinstance(args.job, str) or not shm.JOB_RE.fullmatch(args.job):
        raise CLIError(f"--job: got {args.job!r}; accepted: letters, digits, '_' and '-' only (it names files in "
                       "/dev/shm)")
    if args.nnodes < 1:
        raise CLIError(f"--nnodes: got {args.nnodes}; accepted: a positive number of nodes")
    if not 0 <= args.node < args.nnodes:
        raise CLIError(f"--node: got {args.node}; accepted: 0 to {args.nnodes - 1} (--nnodes {args.nnodes})")
    if args.nproc_per_node < 1:
        raise CLIError(f"--nproc-per-node: got {args.nproc_per_node}; accepted: a positive number of worker ranks")
    if not 1 <= args.ec_k <= MAX_K:
        raise CLIError(f"--ec-k: got {args.ec_k}; accepted: 1 to {MAX_K} data shards per stripe")
    if not 0 <= args.ec_m <= MAX_M:
        raise CLIError(f"--ec-m: got {args.ec_m}; accepted: 0 to {MAX_M} parity shards per stripe (0: no parity)")
    n = args.ec_k + args.ec_m
    if args.ec_m and args.nnodes % n:
        lo = args.nnodes // n * n
        choices = ", ".join(str(v) for v in (lo, lo + n) if v > 0)
        raise CLIError(f"--nnodes: got {args.nnodes}; with --ec-k {args.ec_k} --ec-m {args.ec_m} it must be a multiple "
                       f"of k+m={n} (e.g. {choices}), or choose --ec-k/--ec-m with k+m dividing {args.nnodes}")
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port: got {args.port}; accepted: 0 (any free port) to 65535")
    if not -1 <= args.bulk_port <= 65535:
        raise CLIError(f"--bulk-port: got {args.bulk_port}; accepted: 0 (any free port) to 65535, or -1 (no bulk "
                       "plane: shard bytes go over gRPC)")
    if args.bulk_port > 0 and args.bulk_port == args.port:
        raise CLIError(f"--bulk-port: got {args.bulk_port}, the same as --port; the bulk plane needs a port of its "
                       "own (or 0 for any free one)")
    peers = [] if not args.peers else [_parse_address(p, i) for i, p in enumerate(args.peers.split(","))]
    if args.ec_m and not peers:
        raise CLIError(f"--peers: missing; with --ec-m {args.ec_m} the daemon pushes parity chunks to its peers: give "
                       f"all {args.nnodes} daemons' HOST:PORT, comma-separated, in node order")
    if peers and len(peers) != args.nnodes:
        raise CLIError(f"--peers: got {len(peers)} address(es); accepted: exactly --nnodes={args.nnodes}, one per node "
                       "in node order (this node's own address included)")
    max_memory = parse_bytes(args.max_memory) if args.max_memory is not None else _shm_size()
    return DaemonConfig(job=args.job, node=args.node, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                        ec_k=args.ec_k, ec_m=args.ec_m, port=args.port, bulk_port=args.bulk_port, host=args.host,
                        peers=peers,
                        max_memory=max_memory, ready_file=args.ready_file, log_file=args.log_file,
                        cleanup=args.cleanup)


def _shm_size() -> int:
    st = os.statvfs(shm.SHM_DIR)
    return st.f_blocks * st.f_frsize


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", required=True, help="job name: letters, digits, '_' and '-' (names the /dev/shm files)")
    parser.add_argument("--node", type=int, required=True, metavar="N", help="this node's index, 0 to nnodes-1")
    parser.add_argument("--nnodes", type=int, required=True, metavar="N", help="nodes in the job")
    parser.add_argument("--nproc-per-node", type=int, required=True, metavar="P", help="worker ranks per node")
    parser.add_argument("--ec-k", type=int, default=1, metavar="K", help="data chunks per stripe (default 1)")
    parser.add_argument("--ec-m", type=int, default=0, metavar="M", help="parity shards per stripe: up to M nodes of "
                        "each group of K+M may be lost (default 0: no parity)")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (default 0: any free port; see --ready-file)")
    parser.add_argument("--bulk-port", type=int, default=0, metavar="PORT", help="port of the framed-TCP bulk plane that "
                        "carries shard bytes (pushes, Gets), on --host (default 0: any free port, reported in Status "
                        "and the ready file; -1: none, bytes go over gRPC)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for peers "
                        "on other machines)")
    parser.add_argument("--peers", metavar="HOST:PORT,...", help="every node's daemon address in node order; "
                        "required when --ec-m > 0")
    parser.add_argument("--max-memory", metavar="BYTES", help="cap on data + parity held, e.g. 64GiB "
                        "(default: the size of /dev/shm)")
    parser.add_argument("--ready-file", type=Path, metavar="FILE", help="write {pid, port, bulk_port} as JSON here "
                        "once serving")
    parser.add_argument("--log-file", type=Path, metavar="FILE", help="append logs here (default: stderr)")
    parser.add_argument("--cleanup", action="store_true", help="remove this node's snapshot segments on exit "
                        "(by default they outlive the daemon, for a restarted one to adopt)")


def add_daemon_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``daemon`` to a ``plait`` subcommand table; dispatch it to :func:`cmd_daemon`."""
    parser = subparsers.add_parser(
        "daemon", help="run a node's snapshot daemon",
        description="Serve a node's in-memory snapshots over gRPC (control) and a framed-TCP bulk plane (shard "
        "bytes): workers write them into /dev/shm, the daemons of an erasure-coding group of K+M nodes keep parity "
        "so that losing M nodes loses nothing.",
    )
    _add_arguments(parser)
    return parser


# --------------------------------------------------------------------------- pushing chunks


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

    def __init__(self, store: SnapshotStore, peers: list[str], *, give_up_s: float = PUSH_GIVE_UP_S,
                 workers: int = 4):
        self.store = store
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
                client = self._clients[address] = DaemonClient(address, timeout=30.0)
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


# --------------------------------------------------------------------------- the service


def _status_of(err: SnapshotError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.UNKNOWN)


def _rpc(method: Callable) -> Callable:
    """Turn the typed errors of a handler into gRPC statuses with the same message.

    Unexpected exceptions become INTERNAL with the exception's text and a traceback in
    the log: a bad request must never take the daemon down.
    """
    name = method.__name__

    def abort(context: grpc.ServicerContext, err: BaseException) -> None:
        if not context.is_active():  # the caller went away (cancelled, timed out): nobody to answer
            log.info("%s abandoned by its caller: %s", name, err)
            return
        if isinstance(err, SnapshotError):
            log.info("%s refused: %s", name, err)
            context.abort(_status_of(err), str(err))
        log.exception("%s failed", name)
        context.abort(grpc.StatusCode.INTERNAL, f"{name}: {type(err).__name__}: {err}")

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as err:  # noqa: BLE001 (reported to the caller, logged)
                abort(context, err)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as err:  # noqa: BLE001
            abort(context, err)
    return unary


class SnapshotServicer(pb_grpc.SnapshotDaemonServicer):
    """The RPCs of snapshot.proto over one store; byte payloads in messages of <= 4 MiB."""

    def __init__(self, store: SnapshotStore, pusher: ChunkPusher | None, bulk_port: int = 0):
        self.store = store
        self.pusher = pusher
        self.bulk_port = bulk_port  # advertised in Status; 0: no bulk plane
        self.started = time.monotonic()

    @_rpc
    def Put(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.header is None:
            raise SnapshotRequestError("Put: the first message must be the header {version, local_rank, size, "
                                       "alloc_only}")
        h = first.header
        shard = self.store.alloc(h.version, h.local_rank, h.size)
        if h.alloc_only:
            return pb.PutReply(path=str(shard.path), size=shard.size)
        offset = 0
        try:
            for msg in request_iterator:
                if msg.header is not None:
                    raise SnapshotRequestError("Put: only the first message may be a header; the others carry data")
                self.store.write(shard, offset, msg.data)
                offset += len(msg.data)
            if offset != shard.size:
                raise SnapshotRequestError(f"Put for version {h.version}, local rank {h.local_rank}: got {offset} "
                                           f"bytes but the header declared size {shard.size}; send exactly size bytes")
        except BaseException:
            self.store.discard(shard)
            raise
        return pb.PutReply(path=str(shard.path), size=shard.size)

    @_rpc
    def Commit(self, request, context):
        complete = self.store.commit(request.version, request.local_rank, size=request.size,
                                     checksum=request.checksum, step=request.step, meta=request.meta)
        if self.pusher is not None:
            self.pusher.submit(request.version, request.local_rank)
        return pb.CommitReply(complete=complete)

    @_rpc
    def Get(self, request, context):
        kind = {pb.SHARD_KIND_DATA: "data", pb.SHARD_KIND_PARITY: "parity"}.get(request.kind)
        if kind is None:
            raise SnapshotRequestError(f"Get: kind must be SHARD_KIND_DATA or SHARD_KIND_PARITY, got {request.kind}")
        r = self.store.read_range(kind, request.version, request.local_rank, stripe=request.stripe,
                                  index=request.index, offset=request.offset,
                                  length=request.length if request.HasField("length") else None)
        arr = r.data.numpy()  # a drop meanwhile keeps this view valid
        yield wire.encode_get_reply(arr[:MESSAGE_BYTES], checksum=r.checksum, size=r.size, offset=r.offset,
                                    length=r.length)
        for pos in range(MESSAGE_BYTES, r.length, MESSAGE_BYTES):
            yield wire.encode_get_reply(arr[pos:pos + MESSAGE_BYTES])

    @_rpc
    def List(self, request, context):
        version = request.version if request.HasField("version") else None
        return pb.ListReply(versions=[
            pb.VersionInfo(version=v.version, step=v.step, complete=v.complete, published=v.published,
                           data=[_data_pb(d) for d in v.data], parity=[_parity_pb(p) for p in v.parity])
            for v in self.store.versions(version)
        ])

    @_rpc
    def Status(self, request, context):
        s = self.store
        pusher = self.pusher
        return pb.StatusReply(
            job=s.job, node=s.node, nnodes=s.nnodes, nproc_per_node=s.nproc_per_node, ec_k=s.k, ec_m=s.m,
            memory_used=s.memory_used, memory_cap=s.max_memory,
            versions=[pb.VersionState(version=v.version, complete=v.complete, published=v.published)
                      for v in s.versions()],
            uptime_s=time.monotonic() - self.started, pid=os.getpid(), published=s.published,
            pushes_pending=pusher.pending if pusher else 0, pushes_done=pusher.done if pusher else 0,
            pushes_failed=pusher.failed if pusher else 0, bulk_port=self.bulk_port,
            pushes_over_grpc=pusher.over_grpc if pusher else 0,
        )

    @_rpc
    def Drop(self, request, context):
        return pb.DropReply(dropped=self.store.drop(request.version))

    @_rpc
    def Publish(self, request, context):
        return pb.PublishReply(dropped=self.store.publish(request.version))

    @_rpc
    def PushChunk(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.header is None:
            raise SnapshotRequestError("PushChunk: the first message must be the chunk header")
        h = first.header
        header = ChunkHeader(version=h.version, local_rank=h.local_rank, stripe=h.stripe, index=h.index,
                             member=h.member, node=h.node, blob_size=h.blob_size, blob_checksum=h.blob_checksum,
                             chunk_len=h.chunk_len, chunk_checksum=h.chunk_checksum, step=h.step)
        shard = self.store.begin_chunk(header)
        if shard is None:
            return pb.PushChunkReply(accepted=False)
        buf = torch.empty(header.chunk_len, dtype=torch.uint8)
        arr = buf.numpy()
        pos = received = 0
        for msg in request_iterator:
            if msg.header is not None:
                raise SnapshotRequestError("PushChunk: only the first message may be a header")
            n = len(msg.data)
            if pos + n > header.chunk_len:
                raise SnapshotRequestError(f"PushChunk: more than the declared chunk_len {header.chunk_len} bytes "
                                           f"for stripe {header.stripe}, member {header.member}")
            arr[pos:pos + n] = np.frombuffer(msg.data, dtype=np.uint8)
            received = compute_checksum(buf[pos:pos + n], received)  # message by message, as on the bulk plane
            pos += n
        if pos != header.chunk_len:
            raise SnapshotRequestError(f"PushChunk: got {pos} bytes but the header declared chunk_len "
                                       f"{header.chunk_len} (stripe {header.stripe}, member {header.member})")
        return pb.PushChunkReply(accepted=self.store.add_chunk(header, shard, buf, received_checksum=received))


def _data_pb(d: DataShardInfo) -> pb.DataShardInfo:
    return pb.DataShardInfo(local_rank=d.local_rank, size=d.size, checksum=d.checksum, step=d.step,
                            committed=d.committed, path=d.path, meta=d.meta)


def _parity_pb(p: ParityShardInfo) -> pb.ParityShardInfo:
    return pb.ParityShardInfo(local_rank=p.local_rank, stripe=p.stripe, index=p.index, size=p.size,
                              checksum=p.checksum, complete=p.complete, path=p.path,
                              members=[pb.MemberInfo(**vars(mb)) for mb in p.members])


def add_servicer(servicer: SnapshotServicer, server: grpc.Server) -> None:
    """Register the RPCs like the generated ``add_SnapshotDaemonServicer_to_server``, except that the
    byte-carrying ones use the codec of :mod:`wire` (same wire format, fewer copies)."""
    unary = {
        "Commit": (pb.CommitRequest, pb.CommitReply), "List": (pb.ListRequest, pb.ListReply),
        "Status": (pb.StatusRequest, pb.StatusReply), "Drop": (pb.DropRequest, pb.DropReply),
        "Publish": (pb.PublishRequest, pb.PublishReply),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=req.FromString,
                                                  response_serializer=rep.SerializeToString)
        for name, (req, rep) in unary.items()
    }
    handlers["Put"] = grpc.stream_unary_rpc_method_handler(
        servicer.Put, request_deserializer=wire.frame_decoder(pb.PutRequest),
        response_serializer=pb.PutReply.SerializeToString)
    handlers["PushChunk"] = grpc.stream_unary_rpc_method_handler(
        servicer.PushChunk, request_deserializer=wire.frame_decoder(pb.PushChunkRequest),
        response_serializer=pb.PushChunkReply.SerializeToString)
    handlers["Get"] = grpc.unary_stream_rpc_method_handler(
        servicer.Get, request_deserializer=pb.GetRequest.FromString, response_serializer=None)  # already bytes
    declared = {m.name for m in pb.DESCRIPTOR.services_by_name["SnapshotDaemon"].methods}
    if declared != set(handlers):
        raise RuntimeError(f"snapshot.proto declares {sorted(declared)} but the server registers {sorted(handlers)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


# --------------------------------------------------------------------------- running


def _setup_logging(config: DaemonConfig) -> None:
    handler: logging.Handler
    if config.log_file is not None:
        config.log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(config.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s daemon[{config.job} n{config.node} pid {os.getpid()}] %(name)s: %(message)s"))
    logger = logging.getLogger("plait.runtime.snapshot")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def serve(config: DaemonConfig, stop: threading.Event | None = None) -> int:
    """Run a daemon until ``stop`` is set or SIGTERM/SIGINT arrives; return the exit code.

    Order matters: the namespace lock and the port come first, so a daemon started by
    mistake next to a running one fails before it touches the running one's segments.
    """
    tune_malloc()
    try:
        lock_fd = shm.lock_namespace(config.job, config.node)
    except SnapshotError as err:
        raise CLIError(f"--job/--node: {err}") from None
    pusher: ChunkPusher | None = None
    bulk_server: bulk.BulkServer | None = None
    try:
        store = SnapshotStore(config.job, config.node, nnodes=config.nnodes, nproc_per_node=config.nproc_per_node,
                              ec_k=config.ec_k, ec_m=config.ec_m, max_memory=config.max_memory)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=16, thread_name_prefix="plait-rpc"),
            options=[*channel_options(), ("grpc.so_reuseport", 0)],  # never share the port with another daemon
        )
        bind = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
        try:
            port = server.add_insecure_port(bind)
        except RuntimeError as err:
            port, detail = 0, str(err)
        else:
            detail = ""
        if not port:
            raise CLIError(f"--port: cannot listen on {bind} ({detail or 'address in use?'}); choose a free port, "
                           "or 0 for any")
        if config.bulk_port >= 0:
            try:
                bulk_server = bulk.BulkServer(store, config.host, config.bulk_port)
            except OSError as err:
                raise CLIError(f"--bulk-port: cannot listen on {config.host}:{config.bulk_port} ({err}); choose a "
                               "free port, 0 for any, or -1 for none") from None
        store.adopt()
        pusher = ChunkPusher(store, config.peers, give_up_s=config.push_give_up_s) if config.ec_m else None
        bulk_port = bulk_server.port if bulk_server is not None else 0
        add_servicer(SnapshotServicer(store, pusher, bulk_port), server)
        if bulk_server is not None:
            bulk_server.start()
        server.start()
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            def on_signal(signum: int, frame: object) -> None:
                if signum == signal.SIGTERM:
                    # Already stopping: a repeated SIGTERM (a supervisor's second try) must not kill
                    # the interpreter half-way through --cleanup; SIGKILL still forces.
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                stop.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, on_signal)
        if config.ready_file is not None:
            config.ready_file.parent.mkdir(parents=True, exist_ok=True)
            shm.write_json_atomic(config.ready_file, {"pid": os.getpid(), "port": port, "bulk_port": bulk_port,
                                                      "host": config.host, "job": config.job, "node": config.node})
        log.info("serving job %s node %d/%d on %s:%d, bulk plane %s (k=%d, m=%d, %d rank(s), cap %d bytes, %d bytes "
                 "adopted)", config.job, config.node, config.nnodes, config.host, port,
                 f"on port {bulk_port}" if bulk_port else "off", config.ec_k, config.ec_m, config.nproc_per_node,
                 config.max_memory, store.memory_used)
        while not stop.wait(0.5):
            pass
        log.info("stopping")
        if bulk_server is not None:
            bulk_server.close()
        server.stop(grace=2.0).wait()
        store.close()
        if config.cleanup:
            shm.remove_namespace(config.job, config.node)
        log.info("stopped")
        return 0
    finally:
        if pusher is not None:
            pusher.close()
        if bulk_server is not None:
            bulk_server.close()
        os.close(lock_fd)


def cmd_daemon(args: argparse.Namespace) -> int:
    """``plait daemon``: validate the flags, then serve until SIGTERM."""
    config = config_from_args(args)
    _setup_logging(config)
    return serve(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plait.runtime.snapshot.daemon",
                                     description="Run a node's snapshot daemon (the same as `plait daemon`).")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_daemon(args)
    except PlaitError as err:
        print(f"plait daemon: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    # Run the module under its package name, not as __main__: one copy of its classes,
    # and its logger is named like every other plait.runtime.snapshot logger.
    from plait.runtime.snapshot.daemon import main as _main

    sys.exit(_main())
