"""The per-node snapshot daemon: a gRPC server over :class:`~plait.runtime.snapshot.daemon.store.SnapshotStore`.

    python -m plait.runtime.snapshot.daemon --job J --node 0 --nnodes 3 --nproc-per-node 2 \\
        --ec-k 2 --ec-m 1 --port 7100 --peers 127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102

(``plait daemon`` takes the same flags.) One daemon runs per node. Its workers put their
blobs into its shared memory and commit them; after each commit the daemon pushes the
blob's k chunks to the m parity holders of each chunk's stripe (its peers), in the
background, retrying while a peer is unreachable (it may be restarting), and giving up
with a log line after a bounded time rather than failing the commit: a missing parity
member only keeps the version from becoming complete, which the coordinator sees.

Two planes: gRPC for control (and as a fallback), and a framed-TCP bulk plane on its own
port (``--bulk-port``, :mod:`~plait.runtime.snapshot.transport.bulk`) for the bytes of pushes and
Gets, which measured faster than gRPC streaming on every path here (``plait bench transport``).

The daemon is a separate process, not a thread of a worker, so a crashing worker does
not take the snapshots with it; the segments are files in /dev/shm, so even a crashing
daemon does not: a restarted one re-adopts what it finds (``SnapshotStore.adopt``).
SIGTERM stops it cleanly and keeps the segments; ``--cleanup`` removes them on exit.
"""

from __future__ import annotations

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from plait.errors import CLIError, PlaitError
from plait.runtime.snapshot import shm
from plait.runtime.snapshot.daemon.bulk_server import BulkServer
from plait.runtime.snapshot.daemon.config import DaemonConfig, add_arguments, add_daemon_parser, config_from_args
from plait.runtime.snapshot.daemon.pusher import ChunkPusher
from plait.runtime.snapshot.auth import SECRET_ENV, JobSecret, TokenVerifier
from plait.runtime.snapshot.daemon.refusals import RefusalLog
from plait.runtime.snapshot.daemon.service import AuthInterceptor, SnapshotServicer, add_servicer
from plait.runtime.snapshot.daemon.store import SnapshotStore
from plait.runtime.snapshot.errors import SnapshotAuthError, SnapshotError
from plait.runtime.snapshot.transport.channel import channel_options, tune_malloc

__all__ = ["DaemonConfig", "add_daemon_parser", "config_from_args", "serve", "cmd_daemon", "main"]

log = logging.getLogger(__name__)



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
        secret = JobSecret.load(config.secret_file) if config.secret_file is not None else JobSecret.from_env()
    except SnapshotAuthError as err:
        raise CLIError(f"--secret-file: {err}") from None
    if secret is None:
        raise CLIError(f"--secret-file: missing; every call to a daemon proves the job's secret: give its file or set "
                       f"{SECRET_ENV}")
    try:
        lock_fd = shm.lock_namespace(config.job, config.node)
    except SnapshotError as err:
        raise CLIError(f"--job/--node: {err}") from None
    pusher: ChunkPusher | None = None
    bulk_server: BulkServer | None = None
    try:
        store = SnapshotStore(config.job, config.node, nnodes=config.nnodes, nproc_per_node=config.nproc_per_node,
                              ec_k=config.ec_k, ec_m=config.ec_m, max_memory=config.max_memory)
        refusals = RefusalLog()
        server = grpc.server(
            ThreadPoolExecutor(max_workers=16, thread_name_prefix="plait-rpc"),
            interceptors=[AuthInterceptor(TokenVerifier(secret), refusals)],
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
                bulk_server = BulkServer(store, config.host, config.bulk_port, secret=secret, refusals=refusals)
            except OSError as err:
                raise CLIError(f"--bulk-port: cannot listen on {config.host}:{config.bulk_port} ({err}); choose a "
                               "free port, 0 for any, or -1 for none") from None
        store.adopt()
        pusher = ChunkPusher(store, config.peers, secret=secret, give_up_s=config.push_give_up_s) if config.ec_m else None
        if pusher is not None:
            # What the predecessor had committed but maybe not pushed: pushes are idempotent at the
            # receiver (a member that arrived is skipped), so re-queue them all.
            requeued = sum(pusher.submit(v, r) for v, r in store.unpublished_committed())
            if requeued:
                log.info("re-queued %d chunk push(es) of adopted shards", requeued)
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
        orphaned = False
        while not stop.wait(0.2):
            if config.parent_pid is not None and os.getppid() != config.parent_pid:
                log.warning("the launcher (pid %d) is gone: removing this node's snapshot memory and exiting",
                            config.parent_pid)
                orphaned = True
                break
        log.info("stopping")
        if bulk_server is not None:
            bulk_server.close()
        server.stop(grace=2.0).wait()
        store.close()
        if config.cleanup or orphaned:
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
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_daemon(args)
    except PlaitError as err:
        print(f"plait daemon: error: {err}", file=sys.stderr)
        return err.exit_code
