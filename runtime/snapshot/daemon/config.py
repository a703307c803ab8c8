"""The daemon's command line and configuration: ``plait daemon`` / ``python -m plait.runtime.snapshot.daemon``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from plait.errors import CLIError, ConfigError
from plait.runtime.snapshot import shm
from plait.runtime.snapshot.auth import SECRET_ENV
from plait.runtime.snapshot.config import check_code, parse_size

__all__ = ["PUSH_GIVE_UP_S", "DaemonConfig", "parse_bytes", "config_from_args", "add_arguments", "add_daemon_parser",
           "default_cap", "DEFAULT_SHM_SHARE"]

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
    max_memory: int = 0  # 0: DEFAULT_SHM_SHARE of the shared-memory filesystem
    secret_file: Path | None = None  # the job's secret (see auth.py); None: $PLAIT_SNAPSHOT_SECRET_FILE
    parent_pid: int | None = None  # the launcher: when it is gone, the daemon removes its memory and exits
    ready_file: Path | None = None
    log_file: Path | None = None
    cleanup: bool = False
    push_give_up_s: float = PUSH_GIVE_UP_S


def parse_bytes(text: str, flag: str = "--max-memory") -> int:
    """``"1073741824"``, ``"512MiB"``, ``"8GiB"`` -> bytes; a CLIError naming ``flag`` otherwise."""
    try:
        return parse_size(text, flag, zero_ok=False)
    except ConfigError as err:
        raise CLIError(f"{flag}: got {text!r}; {err.accepted}") from None


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
    check_code(args.ec_k, args.ec_m, args.nnodes, error=CLIError, names=("--ec-k", "--ec-m", "--nnodes"))
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
    max_memory = parse_bytes(args.max_memory) if args.max_memory is not None else default_cap(1)
    secret_file = args.secret_file or (Path(os.environ[SECRET_ENV]) if os.environ.get(SECRET_ENV) else None)
    if secret_file is None:
        raise CLIError(f"--secret-file: missing; every call to a daemon proves the job's secret: give the file "
                       f"plait train wrote (<run dir>/secret), or set {SECRET_ENV}; make one with "
                       "`python -c \"import secrets; print(secrets.token_hex(32))\" > secret && chmod 600 secret`")
    if args.parent_pid is not None and args.parent_pid < 1:
        raise CLIError(f"--parent-pid: got {args.parent_pid}; accepted: the pid of the launcher process")
    return DaemonConfig(job=args.job, node=args.node, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                        ec_k=args.ec_k, ec_m=args.ec_m, port=args.port, bulk_port=args.bulk_port, host=args.host,
                        peers=peers,
                        max_memory=max_memory, ready_file=args.ready_file, log_file=args.log_file,
                        cleanup=args.cleanup, secret_file=secret_file, parent_pid=args.parent_pid)


DEFAULT_SHM_SHARE = 0.9  # of the shared-memory filesystem, split between the daemons of one machine


def default_cap(daemons_on_machine: int) -> int:
    """Each daemon's default memory cap: its share of the shared-memory filesystem, with 10% headroom for the rest."""
    st = os.statvfs(shm.SHM_DIR)
    return int(st.f_blocks * st.f_frsize * DEFAULT_SHM_SHARE) // max(1, daemons_on_machine)


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
                        "(default: 90%% of /dev/shm)")
    parser.add_argument("--secret-file", type=Path, metavar="FILE", help="the job's secret (0600 file of hex digits; "
                        f"default ${SECRET_ENV}): every call to the daemon proves it")
    parser.add_argument("--parent-pid", type=int, metavar="PID", help="exit, removing this node's snapshot memory, "
                        "when this process (the launcher) is gone")
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
    add_arguments(parser)
    return parser


