"""The daemon's in-memory shards and versions: one shared-memory segment each, with its lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plait.runtime.snapshot.records import DataShardInfo, MemberInfo, ParityShardInfo

__all__ = ["Shard", "DataShard", "ParityShard", "Version"]


@dataclass(eq=False)
class Shard:
    path: Path
    size: int
    tensor: torch.Tensor
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    dropped: bool = False


@dataclass(eq=False)
class DataShard(Shard):
    version: int = 0
    local_rank: int = 0
    checksum: int | None = None
    step: int | None = None
    committed: bool = False
    meta: bytes = b""

    def info(self) -> DataShardInfo:
        return DataShardInfo(self.local_rank, self.size, self.checksum, self.step, self.committed, str(self.path),
                             self.meta)


@dataclass(eq=False)
class ParityShard(Shard):
    version: int = 0
    local_rank: int = 0
    stripe: int = 0
    index: int = 0
    checksum: int | None = None
    complete: bool = False
    members: dict[int, MemberInfo] = field(default_factory=dict)

    def info(self) -> ParityShardInfo:
        arrived = dict(self.members)  # a copy: members may arrive meanwhile (under the shard's lock)
        members = [arrived[c] for c in sorted(arrived)]
        return ParityShardInfo(self.local_rank, self.stripe, self.index, self.size, self.checksum, self.complete,
                               str(self.path), members)


@dataclass(eq=False)
class Version:
    version: int
    data: dict[int, DataShard] = field(default_factory=dict)
    parity: dict[tuple[int, int, int], ParityShard] = field(default_factory=dict)  # (local_rank, stripe, j)
    published: bool = False
    complete_logged: bool = False
