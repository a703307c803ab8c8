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

    def restarts(self, snapshots: bool) -> int:
        if self.max_restarts == "auto":
            return 3 if snapshots else 0
        return self.max_restarts
        if self.monitor_interval <= 0:
            raise ConfigError("launch.monitor_interval", self.monitor_interval, "accepted: a positive number of seconds")


def launch_workers(config: LaunchConfig, run_dir: Path, env: dict[str, str] | None = None, max_restarts: int | None = None) -> None:
    """Run ``plait.runtime.worker`` on ``config.nproc`` local processes and wait for them.

    Rank 0 keeps the terminal (so its progress line renders); the other ranks' output
    goes to ``run_dir/logs``. A failed worker raises :class:`LaunchError` naming the
    rank, its exit code and its log.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig as ElasticLaunchConfig
    from torch.distributed.launcher.api import elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.WARNING)
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    quiet_ranks = {rank: Std.ALL for rank in range(1, config.nproc)}
    logs = DefaultLogsSpecs(log_dir=str(log_dir), redirects={0: Std.NONE, **quiet_ranks}, tee={0: Std.NONE})
    elastic = ElasticLaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config.nproc,
        logs_specs=logs,
        run_id=f"plait-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=config.restarts(False) if max_restarts is None else max_restarts,
        monitor_interval=config.monitor_interval,
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
        raise LaunchError(f"worker rank {rank} failed with exit code {failure.exitcode}{where}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
