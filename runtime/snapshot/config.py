"""The ``snapshot.*`` section of the job config."""

from __future__ import annotations

import re
from dataclasses import dataclass

from plait.errors import ConfigError
from plait.ops.rs_matrix import MAX_K, MAX_M

__all__ = ["SnapshotConfig", "parse_size"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_size(value: int | str, key: str = "snapshot.max_memory") -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"4GiB"``, ``"2e9"``; ConfigError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(key, value, "accepted: 0 (no limit) or a positive number of bytes")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(key, value, "accepted: bytes as an integer or with a unit: 512MiB, 4GiB, 2GB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(kw_only=True)
class SnapshotConfig:
    """In-memory, erasure-coded snapshots (see README, "Snapshots and recovery")."""

    every: int = 0  # steps between snapshots; 0: no snapshots (and no daemons)
    ec_k: int = 2  # data nodes of an erasure-coding group
    ec_m: int = 1  # parity nodes of a group: losing up to ec_m of its nodes loses nothing
    disk_every: int = 0  # snapshots between durable disk checkpoints; 0: no disk tier
    dir: str = ""  # disk tier directory; "": <run dir>/checkpoints
    max_memory: int | str = 0  # cap on each daemon's shared memory (bytes, or "4GiB"); 0: none
    keep_disk: int = 2  # complete disk checkpoints kept
    complete_timeout: float = 120.0  # seconds to wait for a snapshot's parity before giving up on that version

    def validate(self) -> None:
        for name in ("every", "disk_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"snapshot.{name}", getattr(self, name), "accepted: 0 (off) or a positive number")
        if not 1 <= self.ec_k <= MAX_K:
            raise ConfigError("snapshot.ec_k", self.ec_k, f"accepted: 1 to {MAX_K} data nodes per erasure-coding group")
        if not 0 <= self.ec_m <= MAX_M:
            raise ConfigError("snapshot.ec_m", self.ec_m, f"accepted: 0 to {MAX_M} parity nodes per erasure-coding group")
        if self.keep_disk < 1:
            raise ConfigError("snapshot.keep_disk", self.keep_disk, "accepted: a positive number of checkpoints")
        if not self.complete_timeout > 0:
            raise ConfigError("snapshot.complete_timeout", self.complete_timeout, "accepted: a positive number of seconds")
        parse_size(self.max_memory)

    @property
    def enabled(self) -> bool:
        return self.every > 0

    @property
    def max_memory_bytes(self) -> int:
        return parse_size(self.max_memory)

    def check_nodes(self, nnodes: int) -> None:
        """The group must fit the nodes: nnodes a multiple of ec_k + ec_m (when there is parity)."""
        if not self.enabled or self.ec_m == 0:
            return
        n = self.ec_k + self.ec_m
        if nnodes % n:
            fits = [f"snapshot.ec_k={k} snapshot.ec_m={self.ec_m}" for k in range(1, MAX_K + 1) if nnodes % (k + self.ec_m) == 0 and k <= nnodes - self.ec_m]
            hint = f"with {nnodes} node(s): " + (fits[-1] if fits else "snapshot.ec_m=0 (no parity: survives worker and daemon crashes, not a node loss)")
            raise ConfigError(
                "snapshot.ec_k", self.ec_k,
                f"an erasure-coding group is ec_k + ec_m = {n} nodes and the job's {nnodes} node(s) must split into whole groups",
                hint=hint,
            )
