"""The ``parallel.*`` section of the job config."""

from __future__ import annotations

from dataclasses import dataclass

from plait.errors import ConfigError


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel sizes. Data parallel is the only dimension so far; the others follow."""

    dp: int = 0  # 0: derive from the world size

    def validate(self) -> None:
        if self.dp < 0:
            raise ConfigError("parallel.dp", self.dp, "accepted: 0 (derive from the world size) or a positive integer")

    def resolved_dp(self, world_size: int) -> int:
        return self.dp or world_size
