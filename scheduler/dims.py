"""Parallel sizes, validated once, and the rank layout of both foldings.

MoE Parallel Folding (Liu et al. 2025, "MoE Parallel Folding"): within each pipeline
stage the same ranks are factored twice. Attention (dense) layers see them as
``dp × cp × tp``; MoE layers see them as ``edp × ep × etp``. Ranks are numbered with the
last axis fastest in both foldings, so ``tp`` and ``etp`` groups are neighbouring ranks
(the fastest links on a node), and expert parallelism is not tied to a sub-group of
data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from plait.errors import ConfigError
from plait.scheduler.spec import ModelSpec


class MeshAxis(StrEnum):
    """Mesh axis names. An axis is a mesh dimension; never a tensor dimension."""

    PP = "pp"
    DP = "dp"
    CP = "cp"
    TP = "tp"
    EDP = "edp"
    EP = "ep"
    ETP = "etp"


DENSE_AXES = (MeshAxis.PP, MeshAxis.DP, MeshAxis.CP, MeshAxis.TP)  # outermost first
EXPERT_AXES = (MeshAxis.PP, MeshAxis.EDP, MeshAxis.EP, MeshAxis.ETP)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Resolved sizes: ``pp·dp·cp·tp = pp·edp·ep·etp = world``. Build with :meth:`resolve`."""

    world: int
    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1
    edp: int = 1
    ep: int = 1
    etp: int = 1

    @classmethod
    def resolve(cls, world: int, *, pp: int = 1, dp: int = 0, cp: int = 1, tp: int = 1, ep: int = 1, etp: int = 1, edp: int = 0) -> ParallelDims:
        """Fill in ``dp`` and ``edp`` when 0 (derived from the world size), then validate."""
        given = {"pp": pp, "dp": dp, "cp": cp, "tp": tp, "ep": ep, "etp": etp, "edp": edp}
        for name, value in given.items():
            derivable = name in ("dp", "edp")
            if value < (0 if derivable else 1):
                accepted = "0 (derive) or a positive integer" if derivable else "a positive integer"
                raise ConfigError(f"parallel.{name}", value, f"accepted: {accepted}")
        if world < 1:
            raise ConfigError("launch.nproc", world, "accepted: a positive number of processes")
        dense = pp * cp * tp
        if world % dense:
            raise ConfigError(
                "parallel", f"pp={pp} × cp={cp} × tp={tp} = {dense}",
                f"must divide the world size {world}; sizes whose product divides it: {_divisors(world)}",
            )
        expert = pp * ep * etp
        if world % expert:
            raise ConfigError(
                "parallel", f"pp={pp} × ep={ep} × etp={etp} = {expert}",
                f"must divide the world size {world}; sizes whose product divides it: {_divisors(world)}",
            )
        dims = cls(world=world, pp=pp, dp=dp or world // dense, cp=cp, tp=tp, ep=ep, etp=etp, edp=edp or world // expert)
        dims.validate()
        return dims

    def validate(self) -> None:
        dense = self.pp * self.dp * self.cp * self.tp
        if dense != self.world:
            raise ConfigError(
                "parallel.dp", self.dp,
                f"pp·dp·cp·tp = {self.pp}·{self.dp}·{self.cp}·{self.tp} = {dense} must equal the world size {self.world}",
                hint=f"set parallel.dp=0 to derive it ({self.world // (self.pp * self.cp * self.tp)})",
            )
        expert = self.pp * self.edp * self.ep * self.etp
        if expert != self.world:
            raise ConfigError(
                "parallel.edp", self.edp,
                f"pp·edp·ep·etp = {self.pp}·{self.edp}·{self.ep}·{self.etp} = {expert} must equal "
                f"pp·dp·cp·tp = world size {self.world}",
                hint=f"set parallel.edp=0 to derive it ({self.world // (self.pp * self.ep * self.etp)})",
            )

    def check_model(self, spec: ModelSpec, *, global_batch: int, micro_batch: int, vpp: int = 1) -> None:
        """The model and batch divide where these sizes split them."""
        rules = [
            ("parallel.tp", self.tp, spec.heads, "model.heads", "attention heads are split across tp ranks"),
            ("parallel.tp", self.tp, spec.ffn_dim, "model.ffn_dim", "the MLP's hidden size is split across tp ranks"),
        ]
        if self.cp > 1:
            rules.append(("parallel.cp", 2 * self.cp * self.tp, spec.seq_len, "model.seq_len",
                          f"each cp rank holds 2 of 2·cp sequence chunks (zig-zag), split again over tp={self.tp} (sequence parallel)"))
        elif self.tp > 1:
            rules.append(("parallel.tp", self.tp, spec.seq_len, "model.seq_len", "sequence parallelism splits each sequence across tp ranks"))
        if spec.is_moe:
            rules += [
                ("parallel.ep", self.ep, spec.experts, "model.experts", "experts are split across ep ranks"),
                ("parallel.etp", self.etp, spec.ffn_dim, "model.ffn_dim", "each expert's hidden size is split across etp ranks"),
            ]
        for key, size, total, total_key, why in rules:
            if size > 1 and total % size:
                raise ConfigError(key, size if key != "parallel.cp" else self.cp,
                                  f"{total_key}={total} must be divisible by {size} ({why})")
        stages = self.pp * vpp
        if spec.layers < stages:
            raise ConfigError("parallel.pp", self.pp, f"pp × vpp = {stages} stages need at least that many layers, model.layers={spec.layers}")
        if global_batch % (micro_batch * self.dp):
            raise ConfigError("train.global_batch", global_batch,
                              f"must be a multiple of train.micro_batch × dp = {micro_batch} × {self.dp} = {micro_batch * self.dp}")

    def shape(self, axes: tuple[MeshAxis, ...]) -> tuple[int, ...]:
        return tuple(getattr(self, axis.value) for axis in axes)

    def coordinates(self, rank: int, axes: tuple[MeshAxis, ...] = DENSE_AXES) -> dict[MeshAxis, int]:
        """Where ``rank`` sits in the folding named by ``axes`` (last axis fastest)."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside world size {self.world}")
        coords = {}
        for axis, size in zip(reversed(axes), reversed(self.shape(axes))):
            rank, coords[axis] = divmod(rank, size)
        return {axis: coords[axis] for axis in axes}

    def rank_of(self, coords: dict[MeshAxis, int], axes: tuple[MeshAxis, ...] = DENSE_AXES) -> int:
        rank = 0
        for axis, size in zip(axes, self.shape(axes)):
            rank = rank * size + coords[axis]
        return rank

    def groups(self, axis: MeshAxis | tuple[MeshAxis, ...]) -> list[list[int]]:
        """The rank groups that communicate along ``axis`` (or several axes of one folding together).

        Each group is in group-rank order: the given axes' coordinates in mesh order, last fastest.
        """
        axes_given = (axis,) if isinstance(axis, MeshAxis) else tuple(axis)
        expert = [a for a in axes_given if a in (MeshAxis.EDP, MeshAxis.EP, MeshAxis.ETP)]
        dense = [a for a in axes_given if a in (MeshAxis.DP, MeshAxis.CP, MeshAxis.TP)]
        if expert and dense:
            raise ValueError(f"axes {axes_given} mix the two foldings")
        axes = EXPERT_AXES if expert else DENSE_AXES
        found: dict[tuple, list[int]] = {}
        for rank in range(self.world):
            coords = self.coordinates(rank, axes)
            key = tuple(v for a, v in coords.items() if a not in axes_given)
            found.setdefault(key, []).append(rank)
        return list(found.values())

    def describe(self) -> str:
        """A table of every rank's coordinates in both foldings."""
        dense = " ".join(f"{a.value:>3}" for a in DENSE_AXES)
        expert = " ".join(f"{a.value:>3}" for a in EXPERT_AXES)
        lines = [
            f"attention folding pp={self.pp} dp={self.dp} cp={self.cp} tp={self.tp}; "
            f"expert folding pp={self.pp} edp={self.edp} ep={self.ep} etp={self.etp}",
            f"rank | {dense} | {expert}",
        ]
        width = len(str(self.world - 1))
        for rank in range(self.world):
            d = " ".join(f"{v:>3}" for v in self.coordinates(rank, DENSE_AXES).values())
            e = " ".join(f"{v:>3}" for v in self.coordinates(rank, EXPERT_AXES).values())
            lines.append(f"{rank:>{max(4, width)}} | {d} | {e}")
        return "\n".join(lines)

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage (both foldings cover exactly these)."""
        return self.world // self.pp

