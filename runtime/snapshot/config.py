"""The ``snapshot.*`` section of the job config, and the two checks every part shares: sizes and the code (k, m)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from plait.errors import ConfigError, PlaitError
from plait.ops.rs_matrix import MAX_K, MAX_M

__all__ = ["SnapshotConfig", "parse_size", "check_code", "auto_code"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_size(value: int | str, key: str = "snapshot.max_memory", *, zero_ok: bool = True) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"4GiB"``, ``"2e9"``; ConfigError naming ``key`` otherwise.

    The one size parser of plait: the config (``snapshot.max_memory``) and the daemon's
    ``--max-memory`` both use it (the daemon turns the error into a CLIError).
    """
    floor = "0 (no limit) or " if zero_ok else ""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(key, value, f"accepted: {floor}a positive number of bytes")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(key, value, f"accepted: {floor}bytes as an integer or with a unit: 512MiB, 4GiB, 2GB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size == 0 and not zero_ok:
        raise ConfigError(key, value, "accepted: a positive number of bytes")
    return size


def check_code(k: int, m: int, nnodes: int, *, error: type[PlaitError] = ConfigError,
               names: tuple[str, str, str] = ("snapshot.ec_k", "snapshot.ec_m", "launch.nnodes")) -> None:
    """The one validation of an erasure code against a job: 1 <= k <= MAX_K, 0 <= m <= MAX_M, whole groups.

    ``names`` are how the caller's user spells the three values (config keys, daemon
    flags, RPC fields); ``error`` is the caller's error type (``ConfigError`` takes
    (key, value, message), the others a message).
    """
    def fail(which: int, value: int, message: str, hint: str | None = None) -> None:
        if error is ConfigError:
            raise ConfigError(names[which], value, message, hint=hint)
        raise error(f"{names[which]}: got {value}; {message}" + (f" ({hint})" if hint else ""))

    if not 1 <= k <= MAX_K:
        fail(0, k, f"accepted: 1 to {MAX_K} data nodes per erasure-coding group")
    if not 0 <= m <= MAX_M:
        fail(1, m, f"accepted: 0 to {MAX_M} parity nodes per erasure-coding group (0: no parity)")
    if nnodes < 1:
        fail(2, nnodes, "accepted: a positive number of nodes")
    if m and nnodes % (k + m):
        fits = [kk for kk in range(1, MAX_K + 1) if nnodes % (kk + m) == 0]
        hint = (f"with {nnodes} node(s) try {names[0]}={fits[-1]} {names[1]}={m}" if fits else
                f"with {nnodes} node(s) use {names[1]}=0 (no parity: survives worker and daemon crashes, not a node loss)")
        fail(0, k, f"an erasure-coding group is {names[0]} + {names[1]} = {k + m} nodes and the job's {nnodes} "
             "node(s) must split into whole groups", hint)


def auto_code(nnodes: int, k: int | None = None, m: int | None = None) -> tuple[int, int]:
    """The code for ``nnodes`` when k and/or m are left to plait (None).

    One node: no parity (memory snapshots survive worker and daemon crashes; a node
    loss needs the disk tier). More nodes: one parity node per group, and the largest
    group that splits the nodes evenly, so a snapshot costs the least extra memory
    (m/k of a blob) while any one node of a group may be lost.
    """
    if m is None:
        m = 0 if nnodes == 1 else 1
    if k is None:
        if m == 0:
            k = 1
        else:
            fits = [kk for kk in range(1, MAX_K + 1) if nnodes % (kk + m) == 0]
            k = fits[-1] if fits else 1
    return k, m


@dataclass(kw_only=True)
class SnapshotConfig:
    """In-memory, erasure-coded snapshots (see README, "Snapshots and recovery")."""

    every: int = 0  # steps between snapshots; 0: no snapshots (and no daemons)
    ec_k: int | Literal["auto"] = "auto"  # data nodes of an erasure-coding group; auto: see auto_code
    ec_m: int | Literal["auto"] = "auto"  # parity nodes of a group (losing up to ec_m of its nodes loses nothing); auto: 0 on one node, else 1
    disk_every: int = 0  # snapshots between durable disk checkpoints; 0: no disk tier (a finished run still writes its last step when > 0)
    dir: str = ""  # disk tier directory; "": <run dir>/checkpoints
    max_memory: int | str = 0  # cap on each daemon's shared memory (bytes, or "4GiB"); 0: a share of /dev/shm per daemon of this machine
    keep_disk: int = 2  # complete disk checkpoints kept
    complete_timeout: float = 120.0  # seconds to wait for a snapshot's parity before giving up on that version

    def validate(self) -> None:
        for name in ("every", "disk_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"snapshot.{name}", getattr(self, name), "accepted: 0 (off) or a positive number")
        if self.ec_k != "auto" and not 1 <= self.ec_k <= MAX_K:
            raise ConfigError("snapshot.ec_k", self.ec_k, f"accepted: auto, or 1 to {MAX_K} data nodes per group")
        if self.ec_m != "auto" and not 0 <= self.ec_m <= MAX_M:
            raise ConfigError("snapshot.ec_m", self.ec_m, f"accepted: auto, or 0 to {MAX_M} parity nodes per group")
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

    def code(self, nnodes: int) -> tuple[int, int]:
        """(k, m) for a job of ``nnodes`` nodes: the configured values, with "auto" resolved (see auto_code)."""
        k, m = auto_code(nnodes, None if self.ec_k == "auto" else self.ec_k, None if self.ec_m == "auto" else self.ec_m)
        return k, m

    def check_nodes(self, nnodes: int) -> None:
        """The group must fit the nodes: nnodes a multiple of ec_k + ec_m (when there is parity)."""
        if not self.enabled:
            return
        k, m = self.code(nnodes)
        check_code(k, m, nnodes)
