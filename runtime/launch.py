"""Starting the worker processes through torchrun's elastic agent."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from plait.errors import ConfigError, LaunchError

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LaunchConfig:
    """The ``launch.*`` section."""

    nproc: int = 1  # worker processes on this machine, all nodes together (--nproc, or --nnodes × --nproc-per-node)
    nnodes: int = 1  # nodes emulated on this machine, each with its own snapshot daemon (--nnodes)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    # Elastic agent restarts of the whole worker group on a failure. auto: 3 with snapshots
    # (a restart resumes from the newest snapshot), 0 without (it would begin from step 0).
    max_restarts: int | Literal["auto"] = "auto"
    monitor_interval: float = 0.1  # seconds between the agent's checks of its workers
    join_timeout: float = 600.0  # seconds a node waits for the others at the rendezvous (multi-node)

    @property
    def nproc_per_node(self) -> int:
        return self.nproc // self.nnodes

    def validate(self) -> None:
        if self.nproc < 1:
            raise ConfigError("launch.nproc", self.nproc, "accepted: a positive number of processes")
        if self.nnodes < 1:
            raise ConfigError("launch.nnodes", self.nnodes, "accepted: a positive number of nodes")
        if self.nproc % self.nnodes:
            raise ConfigError(
                "launch.nproc", self.nproc, f"must be a multiple of launch.nnodes={self.nnodes} (the same workers per node)",
                hint=f"--nnodes {self.nnodes} --nproc-per-node {max(1, self.nproc // self.nnodes)}",
            )
        if self.max_restarts != "auto" and self.max_restarts < 0:
            raise ConfigError("launch.max_restarts", self.max_restarts, "accepted: auto, 0 or a positive integer")
        for key in ("monitor_interval", "join_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"launch.{key}", getattr(self, key), "accepted: a positive number of seconds")

    def restarts(self, snapshots: bool) -> int:
        if self.max_restarts == "auto":
            return 3 if snapshots else 0
        return self.max_restarts


@dataclass(frozen=True)
class NodeLaunch:
    """This node's part of a multi-node job: its elastic agent joins the others at ``endpoint``."""

    nnodes: int
    node_rank: int
    endpoint: str  # HOST:PORT of the rendezvous store
    hosts_store: bool  # this process hosts it (torch's rendezvous then shares the server)
    local_addr: str  # this node's address, the one its peers reach it at
    run_id: str  # the same on every node
    terminal: int | None  # the local worker that keeps the terminal (the one running rank 0), None: all to logs


def _frame_method_name(depth: int = 2) -> str:
    """What torch's ``dynamic_rendezvous.get_method_name`` returns, the function ``depth`` frames up, read off
    the frame instead of ``inspect.stack()``."""
    try:
        return sys._getframe(depth).f_code.co_name
    except ValueError:
        return "no_method_name"


def _cheap_rendezvous_event_names() -> None:
    """torch's dynamic rendezvous names each event it records by ``inspect.stack()``, twice per event, which
    reads the source file of every frame: 0.76 s of the launcher's CPU per launch here, before any worker starts
    (measured with cProfile). The name is the same read off the frame."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    if callable(getattr(dynamic_rendezvous, "get_method_name", None)):
        dynamic_rendezvous.get_method_name = _frame_method_name


def launch_workers(config: LaunchConfig, run_dir: Path, env: dict[str, str] | None = None, max_restarts: int | None = None,
                   node: NodeLaunch | None = None) -> None:
    """Run ``plait.runtime.worker`` on this node's processes and wait for them.

    Without ``node``: ``config.nproc`` workers under one agent on loopback. With it, this
    node's ``config.nproc_per_node`` workers under an agent that rendezvouses with the
    other nodes' (elastic, min = max = ``node.nnodes``). Rank 0 keeps the terminal (so its
    progress line renders); the other workers' output goes to ``run_dir/logs``
    (``logs/node<R>`` on a node). A failed worker raises :class:`LaunchError` naming the
    rank, its exit code and its log.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig as ElasticLaunchConfig
    from torch.distributed.launcher.api import elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _cheap_rendezvous_event_names()
    log_dir = run_dir / "logs" / (f"node{node.node_rank}" if node else "")
    log_dir.mkdir(parents=True, exist_ok=True)
    local = config.nproc_per_node if node else config.nproc
    terminal = node.terminal if node else 0
    redirects = {r: (Std.NONE if r == terminal else Std.ALL) for r in range(local)}
    logs = DefaultLogsSpecs(log_dir=str(log_dir), redirects=redirects, tee={r: Std.NONE for r in range(local)})
    restarts = config.restarts(False) if max_restarts is None else max_restarts
    if node is None:
        elastic = ElasticLaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=local, logs_specs=logs, run_id=f"plait-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=restarts,
            monitor_interval=config.monitor_interval, start_method="spawn",
        )
    else:
        elastic = ElasticLaunchConfig(
            min_nodes=node.nnodes, max_nodes=node.nnodes, nproc_per_node=local, logs_specs=logs, run_id=node.run_id,
            rdzv_backend="c10d", rdzv_endpoint=node.endpoint, rdzv_configs={"is_host": node.hosts_store},
            local_addr=node.local_addr, max_restarts=restarts, monitor_interval=config.monitor_interval,
            start_method="spawn",
        )
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        elastic_launch(elastic, sys.executable)("-m", "plait.runtime.worker", "--run-dir", str(run_dir))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        logs_of = sorted(str(p) for p in log_dir.rglob(f"{failure.local_rank}/std*.log"))
        where = f"; its log: {', '.join(logs_of)}" if logs_of else ""
        who = f"local worker {failure.local_rank} of node {node.node_rank}" if node else f"worker rank {rank}"
        raise LaunchError(f"{who} failed with exit code {failure.exitcode}{where}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
