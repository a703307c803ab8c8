"""The coordinator: a gRPC service over :class:`~.state.JobState`, and where it is found.

``plait train`` starts it on node 0 (threads of the launcher's process, beside the elastic agent),
bound to loopback unless ``control.host`` widens it, and writes its address to
``<run dir>/control.json``; workers find it through ``PLAIT_CONTROL``. Every call must
carry the job secret's token (the snapshot daemons' scheme, :mod:`plait.runtime.snapshot.auth`):
a caller without the secret is refused UNAUTHENTICATED before its request is parsed.

A bad request (any field out of range, an unknown or replaced worker, a step moving
backwards, a message over :data:`MAX_MESSAGE` bytes) is refused with a typed status and
changes nothing; an unexpected exception is INTERNAL and logged, and never stops the
service. Its own work is tiny (a lock and a dict per heartbeat), so a slow caller cannot
starve the others.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from plait.errors import CLIError
from plait.runtime.control import control_pb2 as pb
from plait.runtime.control import control_pb2_grpc as pb_grpc
from plait.runtime.control.state import ControlError, JobState
from plait.runtime.snapshot.auth import JobSecret, TokenVerifier
from plait.runtime.snapshot.daemon.refusals import RefusalLog
from plait.runtime.snapshot.daemon.service import AuthInterceptor

__all__ = ["MAX_MESSAGE", "CONTROL_FILE", "CONTROL_ENV", "Coordinator", "start_coordinator", "read_control_file"]

log = logging.getLogger("plait.control")

MAX_MESSAGE = 64 * 1024  # every request fits in a few hundred bytes
CONTROL_FILE = "control.json"
CONTROL_ENV = "PLAIT_CONTROL"  # host:port of the coordinator, for the workers


def _rpc(method):
    """Typed errors become their gRPC status with the same message; anything else INTERNAL (logged)."""

    @functools.wraps(method)
    def wrapper(self: _Servicer, request, context):
        try:
            return method(self, request, context)
        except ControlError as err:
            with self.state._lock:
                self.state.refused += 1
            context.abort(getattr(grpc.StatusCode, err.code), str(err))
        except Exception as err:  # noqa: BLE001 - a request must never take the coordinator down
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {type(err).__name__}: {err}")

    return wrapper


class _Servicer(pb_grpc.CoordinatorServicer):
    def __init__(self, state: JobState, daemons: list[str], secret: JobSecret):
        self.state = state
        self.daemons = daemons
        self.secret = secret

    @_rpc
    def Register(self, request, context):
        member_id = self.state.register(rank=request.rank, world=request.world, node=request.node, pid=request.pid,
                                        host=request.host, attempt=request.attempt, restore=request.restore)
        return pb.RegisterReply(job=self.state.job, member_id=member_id)

    @_rpc
    def Heartbeat(self, request, context):
        reply = self.state.heartbeat(
            rank=request.rank, member_id=request.member_id, step=request.step, phase=request.phase,
            collective=request.collective, in_collective_s=request.in_collective_s, step_s=request.step_s,
            comm_s=request.comm_s, compute_s=request.compute_s, command_done=request.command_done,
            command_note=request.command_note,
            earlier=[(e.step, e.step_s, e.comm_s, e.compute_s) for e in request.earlier])
        c = reply.command
        return pb.HeartbeatReply(command_id=c.id if c else 0, command=c.command if c else "",
                                 snapshot=bool(c and c.snapshot), dump_stacks=reply.dump_stacks, exit=reply.exit)

    @_rpc
    def Status(self, request, context):
        status = self.state.status()
        status["daemons"] = self._daemons()
        return pb.StatusReply(json=json.dumps(status))

    @_rpc
    def Command(self, request, context):
        command = self.state.command(request.command, request.snapshot)
        return pb.CommandReply(command_id=command.id, state=command.state)

    def _daemons(self) -> list[dict[str, Any]]:
        """Each snapshot daemon's versions and memory, asked now (a daemon that does not answer says so)."""
        from plait.runtime.snapshot.records import version_text
        from plait.runtime.snapshot.transport.client import DaemonClient

        out = []
        for node, address in enumerate(self.daemons):
            try:
                with DaemonClient(address, timeout=2.0, transport="grpc", secret=self.secret) as client:
                    s = client.status()
                out.append({"node": node, "address": address, "pid": s.pid, "memory_used": s.memory_used,
                            "memory_cap": s.memory_cap, "published": s.published,
                            "versions": [{"version": v.version, "name": version_text(v.version),
                                          "complete": v.complete, "published": v.published} for v in s.versions]})
            except Exception as err:  # noqa: BLE001 - a down daemon is part of the status
                out.append({"node": node, "address": address, "error": f"{type(err).__name__}: {err}"[:300]})
        return out


class Coordinator:
    """A running coordinator: its address, its state, and :meth:`stop`.

    A watcher thread logs each rank the straggler test names (and when it stops being
    one), so that a slow rank is in the job's log with its node and cause.
    """

    def __init__(self, server: grpc.Server, state: JobState, address: str, refusals: RefusalLog,
                 watch_s: float = 2.0, hang: HangPolicy | None = None):
        self.server = server
        self.state = state
        self.address = address
        self.refusals = refusals
        self.hang = hang
        self.hangs: list[dict[str, Any]] = []
        self.metrics = None  # its MetricsServer, when it serves /metrics
        self.named: dict[int, str] = {}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(watch_s,), name="plait-stragglers", daemon=True)
        self._watcher.start()

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if self.hang is not None:
                    self._check_hang(self.hang)
                found = {s["rank"]: s for s in self.state.stragglers()["stragglers"]}
            except Exception:  # noqa: BLE001 - the watcher must outlive any bad state
                log.exception("the coordinator's checks failed")
                continue
            for rank, s in found.items():
                if rank not in self.named:
                    log.warning("plait: rank %d on node %d is a straggler: its %s is %.3g s slower than the median "
                                "rank's per step (threshold %.3g s from the measured spread, %d of %d steps)",
                                rank, s["node"], s["cause"], s["excess_s"], s["threshold_s"], s["slow_steps"],
                                self.state.window)
                    self.named[rank] = s["cause"]
            for rank in [r for r in self.named if r not in found]:
                log.warning("plait: rank %d is no longer a straggler", rank)
                del self.named[rank]

    def _check_hang(self, policy: HangPolicy) -> None:
        """A hang of the current attempt, handled once: stacks, one line, a record, and the restart."""
        found = self.state.hang(factor=policy.factor, min_s=policy.min_s, first_s=policy.first_s,
                                silent_s=3 * policy.heartbeat_s + 2.0)
        if found is None or any(h["attempt"] == found["attempt"] for h in self.hangs):
            return
        here = socket.gethostname()[:255]
        pids = found.pop("pids")
        silent = {s["rank"] for s in found["silent"]}
        stacks = policy.run_dir / "stacks"
        victims = [s["rank"] for s in found["stuck"]] or sorted(silent) or sorted(pids)
        # Ranks that still report get their instructions in their next reply, on whatever node they run;
        # silent ones on this machine get signals (faulthandler dumps on SIGUSR1).
        self.state.instruct(sorted(set(pids) - silent), dump_stacks=True)
        for r in silent:
            if pids[r][0] == here:
                _signal(pids[r][1], signal.SIGUSR1)
        time.sleep(2 * policy.heartbeat_s + 1.0)  # every reporting rank's next reply, and its dump
        killed = []
        if policy.restart:
            self.state.instruct([r for r in victims if r not in silent], exit=True)
            killed = [r for r in victims if r not in silent or (pids[r][0] == here and _signal(pids[r][1], signal.SIGKILL))]
        found.update(stacks=str(stacks), killed=killed, line=hang_line(found, stacks, killed))
        self.hangs.append(found)
        print(f"plait: {found['line']}", flush=True)
        with (policy.run_dir / "hangs.jsonl").open("a") as f:
            f.write(json.dumps(found) + "\n")

    def serve_metrics(self, host: str, port: int) -> str:
        """Serve every rank's numbers at ``http://host:port/metrics``; return the URL."""
        from plait.runtime.control.metrics import CoordinatorMetrics
        from plait.runtime.metrics import MetricsServer

        try:
            self.metrics = MetricsServer(CoordinatorMetrics(self.state, lambda: len(self.hangs)), host, port).start()
        except OSError as err:
            raise CLIError(f"control.metrics_port: cannot listen on {host}:{port} ({err}); choose a free port, 0 for "
                           "any, or -1 for none") from None
        return self.metrics.url

    def stop(self, grace: float = 1.0) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        self._stop.set()
        self.server.stop(grace).wait(grace + 1.0)


@dataclass(frozen=True)
class HangPolicy:
    """When the coordinator calls the job hung (``control.hang_*``) and what it does about it."""

    run_dir: Path  # stacks/ and hangs.jsonl go there
    factor: float = 10.0
    min_s: float = 30.0
    first_s: float = 600.0
    restart: bool = True
    heartbeat_s: float = 1.0  # the workers' report interval: three missed reports and more make a rank silent


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def hang_line(found: dict[str, Any], stacks: Path, killed: list[int]) -> str:
    """The one line that says who is stuck where."""
    parts = []
    if found["stuck"]:
        parts.append("stuck outside any collective: " + ", ".join(f"rank {s['rank']} (node {s['node']}, {s['phase']})"
                                                                  for s in found["stuck"]))
    for w in found["waiting"]:
        ranks = ",".join(map(str, w["ranks"]))
        parts.append(f"rank{'s' if len(w['ranks']) > 1 else ''} {ranks} waiting in {w['collective']} for {w['for_s']:.1f} s")
    if found["silent"]:
        parts.append("silent: " + ", ".join(f"rank {s['rank']} (no report for {s['seen_s_ago']:.0f} s)"
                                            for s in found["silent"]))
    action = f"; killed rank{'s' if len(killed) > 1 else ''} {', '.join(map(str, killed))} for a restart from the " \
             "newest snapshot" if killed else ""
    return (f"hang: no step finished for {found['since_s']:.1f} s after step {found['step']} (timeout "
            f"{found['timeout_s']:.1f} s): {'; '.join(parts) or 'no rank reports where it is'}; stacks in {stacks}{action}")


def start_coordinator(*, job: str, world: int, secret: JobSecret, host: str = "127.0.0.1", port: int = 0,
                      daemons: list[str] | None = None, window: int = 20, min_excess: float = 0.05,
                      snapshots: bool = True, hang: HangPolicy | None = None) -> Coordinator:
    """Serve a coordinator for ``job`` on ``host:port`` (0: any free port) in this process's threads."""
    state = JobState(job, world, window=window, min_excess=min_excess, snapshots=snapshots)
    refusals = RefusalLog()
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", 16 * 1024 * 1024),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(ThreadPoolExecutor(max_workers=8, thread_name_prefix="plait-control"),
                         interceptors=[AuthInterceptor(TokenVerifier(secret), refusals)], options=options,
                         maximum_concurrent_rpcs=256)
    pb_grpc.add_CoordinatorServicer_to_server(_Servicer(state, list(daemons or []), secret), server)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(bind)
    except RuntimeError as err:
        raise CLIError(f"control.port: cannot listen on {bind} ({err}); choose a free port, or 0 for any") from None
    if not bound:
        raise CLIError(f"control.port: cannot listen on {bind} (address in use?); choose a free port, or 0 for any")
    server.start()
    address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    return Coordinator(server, state, address, refusals, hang=hang)


def write_control_file(run_dir: Path, address: str, metrics: str | None = None) -> None:
    """``<run dir>/control.json``: where ``plait status``/``stop``/``snapshot`` find the coordinator."""
    tmp = run_dir / f"{CONTROL_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), "metrics": metrics}) + "\n")
    os.replace(tmp, run_dir / CONTROL_FILE)


def read_control_file(run_dir: Path) -> str:
    path = Path(run_dir) / CONTROL_FILE
    try:
        record = json.loads(path.read_text())
        return str(record["address"])
    except FileNotFoundError:
        raise CLIError(f"RUN_DIR: {run_dir} has no {CONTROL_FILE}: no job with a coordinator runs there (give the "
                       "run directory plait train printed, or the coordinator's HOST:PORT)") from None
    except (ValueError, KeyError, TypeError):
        raise CLIError(f"RUN_DIR: {path} is not a coordinator record; give the coordinator's HOST:PORT") from None

