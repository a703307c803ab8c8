"""``plait status``, ``plait stop`` and ``plait snapshot``; and the coordinator ``plait train`` starts.

    plait status RUN_DIR|HOST:PORT [--json] [--watch [SECONDS]]
    plait stop RUN_DIR|HOST:PORT [--snapshot] [--no-wait]
    plait snapshot RUN_DIR|HOST:PORT [--no-wait]
    plait coordinator --run-dir DIR --world N [--host H] [--port P] [--metrics-port P] [--snapshots]

A run directory gives the coordinator's address (``control.json``) and the job's secret
(``secret``); with HOST:PORT the secret comes from ``$PLAIT_SNAPSHOT_SECRET_FILE`` or
``--secret-file``. A finished run's directory answers from its ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from plait.errors import CLIError

__all__ = ["add_commands", "add_coordinator_command", "cmd_control", "cmd_coordinator", "launch_coordinator"]


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_coordinator_command(commands)
    target = dict(metavar="RUN_DIR|HOST:PORT", help="the job's run directory, or its coordinator's address")
    secret = dict(type=Path, metavar="FILE", help="the job's secret (default: RUN_DIR/secret, or "
                                                  "$PLAIT_SNAPSHOT_SECRET_FILE)")
    status = commands.add_parser("status", help="what a running job is doing: ranks, steps, stragglers, daemons",
                                 description="Ask a running job's coordinator: every rank's step, phase and "
                                             "collective, step time split into compute and communication, the "
                                             "slowest rank and why, the snapshot daemons, the last restore.")
    status.add_argument("target", **target)
    status.add_argument("--json", action="store_true", help="print the coordinator's whole document as JSON")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                        help="print again every SECONDS (default 2) until the job ends")
    status.add_argument("--secret-file", **secret)
    stop = commands.add_parser("stop", help="stop a running job cleanly at the next step boundary",
                               description="Every rank stops after the same step; the summary says stopped. With "
                                           "--snapshot a disk checkpoint of that step is written first, which "
                                           "plait train --resume continues from.")
    stop.add_argument("target", **target)
    stop.add_argument("--snapshot", action="store_true", help="write a checkpoint of the last step first")
    stop.add_argument("--no-wait", action="store_true", help="return once the coordinator has the command")
    stop.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it to be carried out")
    stop.add_argument("--secret-file", **secret)
    snap = commands.add_parser("snapshot", help="take a snapshot of a running job at the next step boundary",
                               description="Every rank snapshots the same step to its node's daemon, as "
                                           "snapshot.every would (the job must run with snapshots).")
    snap.add_argument("target", **target)
    snap.add_argument("--no-wait", action="store_true", help="return once the coordinator has the command")
    snap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it to be carried out")
    snap.add_argument("--secret-file", **secret)


def add_coordinator_command(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "coordinator", help="run a job's coordinator by hand (workers started by your own torchrun report to it)",
        description="Serve the control plane of a job whose workers you start yourself: give them "
                    "PLAIT_CONTROL=HOST:PORT and PLAIT_SNAPSHOT_SECRET_FILE (printed at start). plait status, stop "
                    "and snapshot then work with --run-dir or HOST:PORT. Runs until interrupted.")
    run.add_argument("--run-dir", type=Path, required=True, help="where control.json, the secret (made when missing), "
                                                                  "stacks/ and hangs.jsonl go")
    run.add_argument("--world", type=int, required=True, help="the job's number of workers")
    run.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; the workers must "
                                                         "reach it)")
    run.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    run.add_argument("--metrics-port", type=int, default=0, help="the /metrics port (0: any free port; -1: none)")
    run.add_argument("--snapshots", action="store_true", help="the job takes snapshots (plait snapshot and "
                                                              "stop --snapshot are accepted)")
    run.add_argument("--secret-file", type=Path, metavar="FILE", help="the job's secret (default: RUN_DIR/secret, "
                                                                      "or $PLAIT_SNAPSHOT_SECRET_FILE)")


def cmd_coordinator(args: argparse.Namespace) -> int:
    """``plait coordinator``: the control plane of a job launched by other means, until SIGINT or SIGTERM."""
    import signal
    import threading

    from plait.runtime.control.config import ControlConfig
    from plait.runtime.snapshot.auth import SECRET_ENV

    if args.world < 1:
        raise CLIError(f"--world: got {args.world}; accepted: the job's number of workers (1 or more)")
    control = ControlConfig(host=args.host, port=args.port, metrics_port=args.metrics_port)
    try:
        control.validate()
    except Exception as err:  # noqa: BLE001 - the config's words name control.*; here they are flags
        raise CLIError(str(err).replace("config key 'control.", "--").replace("_", "-")) from None

    args.run_dir.mkdir(parents=True, exist_ok=True)
    secret = args.secret_file or (Path(os.environ[SECRET_ENV]) if os.environ.get(SECRET_ENV) else None)
    env: dict[str, str] = {}
    coordinator, _ = launch_coordinator(control, args.run_dir, world=args.world, snapshots=args.snapshots, daemons=[],
                                        secret_file=secret, env=env)
    print(f"plait: give the workers: export PLAIT_CONTROL={env['PLAIT_CONTROL']} "
          f"{SECRET_ENV}={env[SECRET_ENV]}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        coordinator.stop()
        (args.run_dir / "control.json").unlink(missing_ok=True)
    print("plait: coordinator stopped", flush=True)
    return 0


def _client(args: argparse.Namespace):
    from plait.runtime.control.client import CoordinatorClient
    from plait.runtime.control.service import read_control_file
    from plait.runtime.snapshot.auth import SECRET_ENV, JobSecret
    from plait.runtime.snapshot.errors import SnapshotAuthError

    target = Path(args.target)
    if target.is_dir():
        address = read_control_file(target)
        secret_path = args.secret_file or (Path(os.environ[SECRET_ENV]) if os.environ.get(SECRET_ENV) else target / "secret")
    elif ":" in args.target:
        address = args.target
        secret_path = args.secret_file or (Path(os.environ[SECRET_ENV]) if os.environ.get(SECRET_ENV) else None)
        if secret_path is None:
            raise CLIError(f"{args.target}: a coordinator's address needs the job's secret: --secret-file FILE or "
                           f"{SECRET_ENV}")
    else:
        raise CLIError(f"RUN_DIR|HOST:PORT: {args.target} is neither a directory nor HOST:PORT")
    try:
        secret = JobSecret.load(secret_path)
    except SnapshotAuthError as err:
        raise CLIError(f"--secret-file: {err}") from None
    return CoordinatorClient(address, secret, timeout=10.0)


def _finished(args: argparse.Namespace) -> dict[str, Any] | None:
    """A finished run's summary (no coordinator answers for it any more)."""
    path = Path(args.target) / "summary.json"
    if Path(args.target).is_dir() and path.exists() and not (Path(args.target) / "control.json").exists():
        return json.loads(path.read_text())
    return None


def cmd_control(args: argparse.Namespace) -> int:
    done = _finished(args)
    if done is not None:
        if args.command != "status":
            raise CLIError(f"{args.target}: the job has finished ({done['status']}); nothing to {args.command}")
        print(json.dumps({"finished": True, "status": done["status"], "steps": done["steps"], "error": done["error"]})
              if args.json else f"finished: {done['status']} after {done['steps']} steps"
              + (f" ({done['error']})" if done.get("error") else "") + f"; summary at {Path(args.target) / 'summary.json'}")
        return 0
    with _client(args) as client:
        if args.command == "status":
            return _status(client, args)
        reply = client.command(args.command, snapshot=getattr(args, "snapshot", False))
        what = "stop" + (" after a checkpoint" if getattr(args, "snapshot", False) else "") if args.command == "stop" \
            else "snapshot"
        print(f"plait: {what} requested (command {reply.command_id}); it runs at the next step boundary", flush=True)
        if args.no_wait:
            return 0
        return _wait(client, reply.command_id, args.timeout, Path(args.target))


def _wait(client, command_id: int, timeout: float, target: Path) -> int:
    from plait.runtime.control.client import CoordinatorUnavailable

    deadline, sent = time.monotonic() + timeout, time.time()
    while time.monotonic() < deadline:
        try:
            status = client.status()
        except CoordinatorUnavailable:
            # The job ended between two polls (it carried the command out and finished): its summary, if written
            # since the command was sent (not an earlier run's), says how.
            summary = target / "summary.json"
            if target.is_dir() and summary.exists() and summary.stat().st_mtime >= sent - 1.0:
                done = json.loads(summary.read_text())
                how = f"stopped after step {done['steps']}" if done["status"] == "stopped" \
                    else f"{done['status']} after {done['steps']} steps"
                print(f"plait: the job has ended: {how}" + (f" ({done['error']})" if done.get("error") else "")
                      + f"; summary at {summary}", flush=True)
            else:
                print("plait: the job has ended (its coordinator is gone)", flush=True)
            return 0
        command = next((c for c in status["commands"] if c["id"] == command_id), None)
        if command is not None and command["state"] == "done":
            print(f"plait: done at step {command['step']}: {command['note']}", flush=True)
            return 0
        time.sleep(0.5)
    raise CLIError(f"--timeout: command {command_id} was not carried out within {timeout:g} s (is the job stuck? "
                   "plait status shows where every rank is)")


def _status(client, args: argparse.Namespace) -> int:
    from plait.runtime.control.client import CoordinatorUnavailable

    while True:
        try:
            status = client.status()
        except CoordinatorUnavailable:
            if args.watch is not None:
                print("plait: the job has ended (its coordinator is gone)", flush=True)
                return 0
            raise
        print(json.dumps(status, indent=2) if args.json else render(status), flush=True)
        if args.watch is None:
            return 0
        time.sleep(args.watch)


def render(status: dict[str, Any]) -> str:
    """The human-readable ``plait status``."""
    lines = [f"job {status['job']}: {status['registered']}/{status['world']} ranks on {len(status['nodes'])} node(s), "
             f"step {status['step'] if status['step'] is not None else '-'}, attempt {status['attempt']}, "
             f"up {status['uptime_s']:.0f} s"]
    if status.get("last_restore"):
        lines.append(f"last restore: {status['last_restore']}")
    lines.append(f"{'rank':>4} {'node':>4} {'step':>7} {'phase':10} {'step s':>8} {'compute':>8} {'comm':>8}  collective")
    for r in status["ranks"]:
        coll = f"{r['collective']} ({r['in_collective_s']:.1f} s)" if r["collective"] else ""
        stale = f"  silent {r['seen_s_ago']:.0f} s" if r["seen_s_ago"] > 10 else ""
        lines.append(f"{r['rank']:>4} {r['node']:>4} {r['step']:>7} {r['phase']:10} {r['step_s']:>8.3f} "
                     f"{r['compute_s']:>8.3f} {r['comm_s']:>8.3f}  {coll}{stale}")
    for s in status["stragglers"]:
        lines.append(f"straggler: rank {s['rank']} on node {s['node']}: {s['cause']} {s['excess_s']:.3g} s slower "
                     f"than the median per step (threshold {s['threshold_s']:.3g} s)")
    slowest = status.get("slowest")
    if slowest is not None and not status["stragglers"]:
        lines.append(f"slowest: rank {slowest['rank']} on node {slowest['node']}, compute "
                     f"{slowest['compute_excess_s']:+.3g} s vs the median, within the spread (threshold "
                     f"{slowest['threshold_s']:.3g} s): no straggler")
    for d in status.get("daemons", []):
        if "error" in d:
            lines.append(f"daemon node {d['node']} at {d['address']}: not answering ({d['error']})")
        else:
            versions = ", ".join(f"{v['name']}{'*' if v['published'] else ''}" for v in d["versions"]) or "none"
            lines.append(f"daemon node {d['node']} at {d['address']}: {d['memory_used'] / 2**20:,.1f} of "
                         f"{d['memory_cap'] / 2**20:,.0f} MiB, versions {versions} (* published)")
    for c in status["commands"]:
        lines.append(f"command {c['id']}: {c['command']}{' --snapshot' if c['snapshot'] else ''} {c['state']}"
                     + (f" at step {c['step']}: {c['note']}" if c["state"] == "done" else ""))
    return "\n".join(lines)


def launch_coordinator(c, run_dir: Path, *, world: int, snapshots: bool, daemons: list[str], secret_file: Path | None,
                       env: dict[str, str], host: str | None = None):
    """The coordinator of a job (``c``: its ``control.*``; None when disabled); sets the workers' environment.

    ``host``: where to listen instead of ``control.host`` (a node of a multi-node job: its address).
    Returns the coordinator and the secret file (made in the run directory when none was given).
    """
    if not c.enabled:
        return None, secret_file
    from plait.runtime.control.service import HangPolicy, start_coordinator, write_control_file
    from plait.runtime.snapshot.auth import JobSecret
    from plait.runtime.snapshot.launcher.spawn import job_secret_file

    secret_file = secret_file or job_secret_file(run_dir)
    host = host or c.host
    coordinator = start_coordinator(job=run_dir.name, world=world, secret=JobSecret.load(secret_file),
                                    host=host, port=c.port, daemons=daemons, window=c.straggler_window,
                                    min_excess=c.straggler_min_excess, snapshots=snapshots,
                                    hang=HangPolicy(run_dir, factor=c.hang_factor, min_s=c.hang_min_s,
                                                    first_s=c.hang_first_s, restart=c.hang_restart,
                                                    heartbeat_s=c.heartbeat_s))
    metrics = coordinator.serve_metrics(host, c.metrics_port) if c.metrics_port >= 0 else None
    write_control_file(run_dir, coordinator.address, f"{metrics}/metrics" if metrics else None)
    env.update(PLAIT_CONTROL=coordinator.address, PLAIT_SNAPSHOT_SECRET_FILE=str(Path(secret_file).resolve()))
    # not "metrics at URL": that is rank 0's exporter line, which scripts look for
    every = f"; every rank's numbers: {metrics}/metrics" if metrics else ""
    print(f"plait: coordinator at {coordinator.address} (plait status {run_dir}){every}", file=sys.stdout, flush=True)
    return coordinator, secret_file
