"""Plain descriptions of what the planner plans for. No torch, no process groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The shape of a decoder-only transformer (dense or mixture-of-experts)."""

    kind: Literal["gpt", "moe"]
    layers: int
    dim: int
    heads: int
    ffn_dim: int
    vocab: int
    seq_len: int
    experts: int = 1
    top_k: int = 1

    @property
    def is_moe(self) -> bool:
        return self.kind == "moe"
