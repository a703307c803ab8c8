"""The ``control.*`` section: the job's coordinator (see :mod:`plait.runtime.control.service`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from plait.errors import ConfigError


@dataclass(kw_only=True)
class ControlConfig:
    """``control.*``: where the coordinator listens, how often workers report, how stragglers are named."""

    enabled: bool = True  # a coordinator on node 0; plait status / stop / snapshot need it
    host: str = "127.0.0.1"  # its address; loopback unless the job spans machines (then the node's address)
    port: int = 0  # 0: any free port (written to <run dir>/control.json)
    metrics_port: int = 0  # the coordinator's /metrics (every rank's numbers) on host; 0: any free port; -1: none
    heartbeat_s: float = 1.0  # seconds between a worker's reports besides the one after each step
    straggler_window: int = 20  # steps the straggler test looks back over
    straggler_min_excess: float = 0.05  # ... and the least excess worth naming, as a fraction of the step time
    # A hang: no rank finished a step for max(hang_factor × the median step time, hang_min_s) seconds
    # (hang_first_s before any step was measured in the attempt): stacks, one line, and a restart
    hang_factor: float = 10.0
    hang_min_s: float = 120.0  # below gloo's and NCCL's usual collective timeouts (300 s, 600 s), above slow restores
    hang_first_s: float = 600.0
    hang_restart: bool = True  # kill the stuck workers so the elastic agent restarts them (from the newest snapshot)

    def validate(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError("control.host", self.host, "accepted: an IP address to listen on, e.g. 127.0.0.1 or "
                              "the node's address") from None
        if not 0 <= self.port <= 65535:
            raise ConfigError("control.port", self.port, "accepted: 0 (any free port) .. 65535")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError("control.metrics_port", self.metrics_port, "accepted: -1 (none), 0 (any free port) .. 65535")
        if not 0.05 <= self.heartbeat_s <= 600:
            raise ConfigError("control.heartbeat_s", self.heartbeat_s, "accepted: 0.05 .. 600 seconds")
        if not 5 <= self.straggler_window <= 256:
            raise ConfigError("control.straggler_window", self.straggler_window, "accepted: 5 .. 256 steps")
        if not 2 <= self.hang_factor <= 1e4:
            raise ConfigError("control.hang_factor", self.hang_factor, "accepted: 2 .. 10000 median step times")
        for key in ("hang_min_s", "hang_first_s"):
            if not 0.5 <= getattr(self, key) <= 86400:
                raise ConfigError(f"control.{key}", getattr(self, key), "accepted: 0.5 .. 86400 seconds")
        if not 0 <= self.straggler_min_excess < 10:
            raise ConfigError("control.straggler_min_excess", self.straggler_min_excess,
                              "accepted: a fraction of the step time in [0, 10), e.g. 0.05")
