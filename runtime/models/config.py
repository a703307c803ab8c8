"""Model hyper-parameters and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from plait.errors import ConfigError

_KINDS = ("gpt", "moe")


def _examples(values: list[int], limit: int = 6) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def _check_int(key: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, f"accepted: an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(key, value, f"accepted: an integer >= {minimum}")


def _check_float(key: str, value: object, *, positive: bool) -> None:
    bound = "> 0" if positive else ">= 0"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ConfigError(key, value, f"accepted: a finite number {bound}")


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of a decoder-only transformer; ``kind="moe"`` replaces every MLP by a mixture of experts."""

    kind: Literal["gpt", "moe"] = "gpt"
    layers: int = 4
    dim: int = 256
    heads: int = 4
    ffn_dim: int = 688
    vocab: int = 256
    seq_len: int = 256
    experts: int = 8  # moe only
    top_k: int = 2  # moe only
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss (moe)
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def validate(self) -> None:
        """Raise ConfigError (keys ``model.<field>``) for the first inconsistent value."""
        if self.kind not in _KINDS:
            raise ConfigError("model.kind", self.kind, "accepted: one of 'gpt', 'moe'")
        for name in ("layers", "dim", "heads", "ffn_dim", "vocab", "seq_len"):
            _check_int(f"model.{name}", getattr(self, name), 1)
        if self.dim % self.heads != 0:
            divisors = [h for h in range(1, self.dim + 1) if self.dim % h == 0]
            raise ConfigError(
                "model.heads",
                self.heads,
                f"accepted: a divisor of model.dim={self.dim} such as {_examples(divisors)}",
            )
        if self.head_dim % 2 != 0:
            good = [h for h in range(1, self.dim + 1) if self.dim % h == 0 and (self.dim // h) % 2 == 0]
            accepted = (
                f"accepted: a divisor of model.dim={self.dim} that leaves an even head dim, "
                f"such as {_examples(good)}"
                if good
                else "accepted: none for this model.dim; make model.dim even"
            )
            raise ConfigError(
                "model.heads",
                self.heads,
                accepted,
                hint=f"head dim model.dim/model.heads={self.head_dim} is odd; rotary embedding rotates pairs",
            )
        if self.kind == "moe":
            _check_int("model.experts", self.experts, 1)
            _check_int("model.top_k", self.top_k, 1)
            if self.top_k > self.experts:
                raise ConfigError(
                    "model.top_k",
                    self.top_k,
                    f"accepted: an integer from 1 to model.experts={self.experts}",
                )
        _check_float("model.rope_theta", self.rope_theta, positive=True)
        _check_float("model.norm_eps", self.norm_eps, positive=True)
        _check_float("model.aux_loss_coef", self.aux_loss_coef, positive=False)
        _check_float("model.init_std", self.init_std, positive=True)
