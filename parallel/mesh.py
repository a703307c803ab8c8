"""The DeviceMeshes of both foldings and the process groups of every axis, built once per process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from plait.parallel.comm import Group
from plait.scheduler.dims import DENSE_AXES, EXPERT_AXES, MeshAxis, ParallelDims

# Groups over several axes at once, by ledger label: data-parallel gradient reduction of
# dense weights (dp+cp) and of weights replicated over a whole stage (dp+cp+tp).
COMBINED = {
    "dp+cp": (MeshAxis.DP, MeshAxis.CP),
    "dp+cp+tp": (MeshAxis.DP, MeshAxis.CP, MeshAxis.TP),
}


class ParallelMeshes:
    """The attention mesh ``(pp, dp, cp, tp)`` and the expert mesh ``(pp, edp, ep, etp)`` over the same ranks.

    Construction creates process groups, a collective: every rank must build it, in
    the same order. ``meshes[MeshAxis.EP]`` is the 1-D mesh of this rank's ep group;
    ``meshes.group("ep")`` / ``meshes.group("dp+cp")`` the :class:`Group` that
    :mod:`plait.parallel.comm` takes, ``meshes.group("world")`` all ranks.
    """

    def __init__(self, dims: ParallelDims, device_type: str = "cpu"):
        self.dims = dims
        ranks = torch.arange(dims.world)
        self.dense = DeviceMesh(device_type, ranks.reshape(dims.shape(DENSE_AXES)), mesh_dim_names=tuple(a.value for a in DENSE_AXES))
        self.expert = DeviceMesh(device_type, ranks.reshape(dims.shape(EXPERT_AXES)), mesh_dim_names=tuple(a.value for a in EXPERT_AXES))
        self.rank = dist.get_rank()
        self._groups: dict[str, Group] = {}
        for axis in MeshAxis:
            mesh = self[axis]
            members = tuple(int(r) for r in mesh.mesh.tolist())
            pg = mesh.get_group() if len(members) > 1 else None
            self._groups[axis.value] = Group(axis=axis.value, ranks=members, rank=members.index(self.rank), pg=pg)
        for label, axes in COMBINED.items():
            self._groups[label] = self._new_group(label, dims.groups(axes))
        world = tuple(range(dims.world))
        self._groups["world"] = Group(axis="world", ranks=world, rank=self.rank, pg=dist.group.WORLD if dims.world > 1 else None)

    def _new_group(self, label: str, partition: list[list[int]]) -> Group:
        mine: Group | None = None
        for members in partition:
            # Every rank takes part in creating every group, in the same order.
            pg = dist.new_group(members) if len(members) > 1 else None
            if self.rank in members:
                mine = Group(axis=label, ranks=tuple(members), rank=members.index(self.rank), pg=pg)
        assert mine is not None
        return mine

    def add_replica_groups(self) -> None:
        """The groups of local steps inside one data-parallel replica (``parallel.dp_mode=co2``); a collective.

        ``cp``/``cp+tp`` reduce what ``dp+cp``/``dp+cp+tp`` reduce, but inside the replica; ``edp@dp`` the
        expert weights' replicas inside it (ranks with the same dp, ep and etp coordinates: needs every expert
        group inside one replica, ep·etp dividing cp·tp); ``replica`` is every rank of the replica (all stages).
        """
        if "replica" in self._groups:
            return
        dims = self.dims
        self._groups["cp+tp"] = self._new_group("cp+tp", dims.groups((MeshAxis.CP, MeshAxis.TP)))
        by_key: dict[tuple[int, ...], list[int]] = {}
        for rank in range(dims.world):
            dense = dims.coordinates(rank, DENSE_AXES)
            expert = dims.coordinates(rank, EXPERT_AXES)
            key = (dense[MeshAxis.PP], dense[MeshAxis.DP], expert[MeshAxis.EP], expert[MeshAxis.ETP])
            by_key.setdefault(key, []).append(rank)
        self._groups["edp@dp"] = self._new_group("edp@dp", list(by_key.values()))
        self._groups["replica"] = self._new_group("replica", dims.groups((MeshAxis.PP, MeshAxis.CP, MeshAxis.TP)))

    def __getitem__(self, axis: MeshAxis) -> DeviceMesh:
        mesh = self.expert if axis in (MeshAxis.EDP, MeshAxis.EP, MeshAxis.ETP) else self.dense
        return mesh[axis.value]

    def group(self, label: str | MeshAxis) -> Group:
        return self._groups[str(label.value if isinstance(label, MeshAxis) else label)]

    def coordinates(self) -> dict[MeshAxis, int]:
        """This rank's coordinates in both foldings (pp appears once)."""
        coords = dict(self.dims.coordinates(self.rank, DENSE_AXES))
        coords.update(self.dims.coordinates(self.rank, EXPERT_AXES))
        return coords
