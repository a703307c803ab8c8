"""The DeviceMeshes of both foldings, built once per process and cached."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from plait.parallel.dims import DENSE_AXES, EXPERT_AXES, MeshAxis, ParallelDims


class ParallelMeshes:
    """The attention mesh ``(pp, dp, cp, tp)`` and the expert mesh ``(pp, edp, ep, etp)`` over the same ranks.

    Construction creates process groups, a collective: every rank must build it, in
    the same order. ``meshes[MeshAxis.EP]`` is the 1-D mesh of this rank's ep group.
    """

    def __init__(self, dims: ParallelDims, device_type: str = "cpu"):
        self.dims = dims
        ranks = torch.arange(dims.world)
        self.dense = DeviceMesh(device_type, ranks.reshape(dims.shape(DENSE_AXES)), mesh_dim_names=tuple(a.value for a in DENSE_AXES))
        self.expert = DeviceMesh(device_type, ranks.reshape(dims.shape(EXPERT_AXES)), mesh_dim_names=tuple(a.value for a in EXPERT_AXES))

    def __getitem__(self, axis: MeshAxis) -> DeviceMesh:
        mesh = self.expert if axis in (MeshAxis.EDP, MeshAxis.EP, MeshAxis.ETP) else self.dense
        return mesh[axis.value]
