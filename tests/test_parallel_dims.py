"""ParallelDims: validation with messages that name the constraint, both foldings' layouts, real meshes."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from plait.errors import ConfigError
from plait.scheduler.dims import DENSE_AXES, EXPERT_AXES, MeshAxis, ParallelDims
from plait.scheduler.spec import ModelSpec

MOE = ModelSpec(kind="moe", layers=4, dim=64, heads=4, ffn_dim=128, vocab=256, seq_len=72, experts=4, top_k=2)


def test_dp_and_edp_are_derived():
    dims = ParallelDims.resolve(8, pp=2, tp=2, ep=4)
    assert (dims.dp, dims.edp) == (2, 1)
    assert dims.stage_size == 4


@pytest.mark.parametrize(
    "world, sizes, key, fragment",
    [
        (8, dict(tp=3), "'parallel'", "tp=3 = 3'; must divide the world size 8"),
        (8, dict(pp=2, ep=3), "'parallel'", "ep=3"),
        (8, dict(tp=2, dp=3), "'parallel.dp'", "pp·dp·cp·tp = 1·3·1·2 = 6 must equal the world size 8"),
        (8, dict(ep=2, edp=2), "'parallel.edp'", "pp·edp·ep·etp = 1·2·2·1 = 4"),
        (4, dict(tp=0), "'parallel.tp'", "positive integer"),
    ],
)
def test_bad_layouts_name_the_constraint(world, sizes, key, fragment):
    with pytest.raises(ConfigError) as info:
        ParallelDims.resolve(world, **sizes)
    assert key in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize(
    "sizes, key, fragment",
    [
        (dict(tp=8), "'parallel.tp'", "model.heads=4 must be divisible by 8"),
        (dict(ep=8), "'parallel.ep'", "model.experts=4 must be divisible by 8"),
        (dict(pp=8), "'parallel.pp'", "at least that many layers"),
        (dict(cp=8), "'parallel.cp'", "model.seq_len=72 must be divisible by 16"),
    ],
)
def test_model_must_divide_where_split(sizes, key, fragment):
    dims = ParallelDims.resolve(8, **sizes)
    with pytest.raises(ConfigError) as info:
        dims.check_model(MOE, global_batch=8, micro_batch=1)
    assert key in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize("world, sizes", [(8, dict(pp=2, tp=2, ep=4)), (8, dict(cp=2, ep=2, etp=2)), (4, dict(tp=2, ep=4)), (6, dict(tp=3, ep=2))])
def test_coordinates_round_trip_and_groups_partition_the_world(world, sizes):
    dims = ParallelDims.resolve(world, **sizes)
    for axes in (DENSE_AXES, EXPERT_AXES):
        seen = set()
        for rank in range(world):
            coords = dims.coordinates(rank, axes)
            assert dims.rank_of(coords, axes) == rank
            seen.add(tuple(coords.values()))
        assert len(seen) == world
    for axis in MeshAxis:
        groups = dims.groups(axis)
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(world))
        assert all(len(g) == getattr(dims, axis.value) for g in groups)


def test_folding_keeps_pipeline_stages_and_puts_tp_on_neighbours():
    dims = ParallelDims.resolve(8, pp=2, tp=2, cp=2, ep=4)
    assert dims.groups(MeshAxis.TP) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.groups(MeshAxis.EP) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # ep spans tp and cp of a stage
    assert dims.groups(MeshAxis.PP) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    table = dims.describe()
    assert "attention folding pp=2 dp=1 cp=2 tp=2; expert folding pp=2 edp=1 ep=4 etp=1" in table
    assert len(table.splitlines()) == 2 + 8


def _mesh_body(rank: int, world: int, sizes: dict) -> dict:
    from plait.parallel.mesh import ParallelMeshes

    dims = ParallelDims.resolve(world, **sizes)
    meshes = ParallelMeshes(dims)
    sums = {}
    for axis in MeshAxis:
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=meshes[axis].get_group())
        sums[axis.value] = float(t)
    return sums


@pytest.mark.parametrize("world, sizes", [(4, dict(tp=2, ep=4)), (8, dict(pp=2, tp=2, cp=2, ep=4))])
def test_real_meshes_group_the_ranks_the_layout_says(world, sizes):
    dims = ParallelDims.resolve(world, **sizes)
    results = run_distributed(_mesh_body, world=world, args=(sizes,), timeout=180)
    for rank, sums in enumerate(results):
        for axis in MeshAxis:
            group = next(g for g in dims.groups(axis) if rank in g)
            assert sums[axis.value] == float(sum(group)), (rank, axis)
