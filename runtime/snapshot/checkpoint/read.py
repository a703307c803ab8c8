"""Reading a resharding disk checkpoint into any layout.

Each rank asks for exactly the boxes its layout holds (:func:`plait.parallel.slices.local_slices`:
its parameters' parts and its owned ranges of the optimizer moments) and DCP's own
resharding (``create_read_items_for_chunk_list``) finds the stored chunks that overlap
them, whatever layout wrote them. Before reading, the files those chunks live in are
checked against the checksums their rank recorded; after, nothing is left unfilled
(the stored chunks tile every tensor, :func:`.write.finalize` checked it).

The Python state (step, loader position, RNGs, histories) is the rank's own when the
checkpoint was written by the same layout (a restart continues bitwise), and rank 0's
otherwise (every rank of a step holds the same step, loader position and RNG streams;
the per-rank communication ledger starts again from zero, since it counts another
layout's traffic).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from plait.errors import CheckpointCorrupt, CheckpointMismatch, IncompleteCheckpoint
from plait.parallel.slices import Slice, global_shapes, local_slices
from plait.runtime.snapshot.checkpoint.paths import STATE_FILE, Checkpoint, single_process
from plait.runtime.snapshot.checkpoint.write import file_checksum
from plait.runtime.snapshot.trainer import objects as object_codec

if TYPE_CHECKING:
    from plait.parallel.engine import ParallelEngine
    from plait.runtime.trainer import Trainer


def check_shapes(checkpoint: Checkpoint, shapes: dict[str, list[int]], *, flag: str, whole_model: bool = False) -> None:
    """Every parameter of ``shapes`` (global names) must be in the checkpoint with the same shape.

    With ``whole_model`` (``shapes`` is the whole model, not one pipeline stage's part) the
    checkpoint may hold no other parameter either.
    """
    stored = checkpoint.manifest["params"]
    for name, shape in sorted(shapes.items()):
        if name not in stored:
            raise CheckpointMismatch(f"{flag} {checkpoint.path}: the checkpoint has no parameter {name} (the configured "
                                     "model has it): it was written for another model; use the model config of the run "
                                     "that wrote it")
        if list(stored[name]) != list(shape):
            raise CheckpointMismatch(f"{flag} {checkpoint.path}: parameter {name} has shape {list(stored[name])} in the "
                                     f"checkpoint and {list(shape)} in the configured model; use the model config of the "
                                     "run that wrote it")
    extra = sorted(set(stored) - set(shapes))
    if extra and whole_model:
        raise CheckpointMismatch(f"{flag} {checkpoint.path}: the checkpoint has parameter {extra[0]}, which the "
                                 "configured model lacks; use the model config of the run that wrote it")


def verify_files(checkpoint: Checkpoint, names: list[str] | None = None, *, flag: str) -> None:
    """Compare files of the checkpoint (all, or ``names``, relative to its directory) with their recorded checksums."""
    files = checkpoint.manifest["files"]
    for name in sorted(files if names is None else names):
        path = checkpoint.path / name
        if not path.exists():
            raise IncompleteCheckpoint(f"{flag} {checkpoint.path}: file {name} is missing; give another checkpoint")
        if file_checksum(path) != list(files[name]):
            raise CheckpointCorrupt(f"{flag} {checkpoint.path}: file {name} does not match the checksum its rank "
                                    "recorded (damaged on disk or altered); give another checkpoint (an older step "
                                    "directory)")


def _boxes_plan(metadata: Any, wanted: list[tuple[Slice, torch.Tensor]], flag: str, where: Path) -> tuple[list[Any], dict]:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    items, dests = [], {}
    for s, dest in wanted:
        md = metadata.state_dict_metadata.get(s.name)
        if md is None:
            raise CheckpointMismatch(f"{flag} {where}: the checkpoint has no tensor {s.name}; it was written for another "
                                     "model")
        if list(md.size) != list(s.shape):
            raise CheckpointMismatch(f"{flag} {where}: {s.name} has shape {list(md.size)} in the checkpoint and "
                                     f"{list(s.shape)} here; use the model config of the run that wrote it")
        chunk = ChunkStorageMetadata(offsets=torch.Size(s.offsets), sizes=torch.Size(s.sizes))
        items += create_read_items_for_chunk_list(s.name, md, [chunk])
        dests[(s.name, tuple(s.offsets))] = dest
    return items, dests


def _planner(items: list[Any], dests: dict):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadPlan

    class BoxLoadPlanner(DefaultLoadPlanner):
        """Reads given boxes of global tensors into given tensors, instead of whole state-dict entries."""

        def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
            self.state_dict, self.metadata, self.is_coordinator = {}, metadata, is_coordinator

        def create_local_plan(self) -> LoadPlan:
            return LoadPlan(items)

        def resolve_tensor(self, read_item: Any) -> torch.Tensor:
            dest = dests[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
            for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                dest = dest.narrow(dim, offset, length)
            return dest

    return BoxLoadPlanner()


def read_boxes(checkpoint: Checkpoint, wanted: list[tuple[Slice, torch.Tensor]], *, flag: str) -> None:
    """Fill each destination tensor with its box of the checkpoint (files verified first)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    reader = dcp.FileSystemReader(str(checkpoint.path))
    metadata = reader.read_metadata()
    items, dests = _boxes_plan(metadata, wanted, flag, checkpoint.path)
    files = sorted({metadata.storage_data[item.storage_index].relative_path for item in items})
    verify_files(checkpoint, files, flag=flag)
    planner = _planner(items, dests)
    try:
        with single_process():
            dcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    except (CheckpointException, OSError, RuntimeError, EOFError) as err:  # a damaged file: one clear error
        raise CheckpointCorrupt(f"{flag} {checkpoint.path}: unreadable ({type(err).__name__}: {err}); give another "
                                "checkpoint") from err


def _local_templates(engine: ParallelEngine) -> dict[str, torch.Tensor]:
    """Empty tensors of this rank's layout, named as in ``engine.local_tensors()``."""
    out = {f"param.{n}": torch.empty_like(p.detach(), device="cpu") for n, p in engine.params.items()}
    for i, b in enumerate(engine.optimizer.buckets):
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"optim.{i}.{key}"] = torch.zeros(b.shard_size, dtype=torch.float32)
        out[f"optim.{i}.step"] = torch.zeros((), dtype=torch.float32)
    return out


def rank_objects(checkpoint: Checkpoint, rank: int, *, flag: str) -> dict[str, Any]:
    name = f"rank-{rank}/{STATE_FILE}"
    verify_files(checkpoint, [name], flag=flag)
    return object_codec.loads((checkpoint.path / name).read_bytes())


def same_layout(checkpoint: Checkpoint, engine: ParallelEngine) -> bool:
    return list(checkpoint.manifest["layout"]) == layout_of(engine) and checkpoint.manifest["world"] == engine.dims.world


def layout_of(engine: ParallelEngine) -> list[int]:
    d = engine.dims
    return [d.pp, d.dp, d.cp, d.tp, d.edp, d.ep, d.etp]


def read_local_tensors(engine: ParallelEngine, checkpoint: Checkpoint, *, flag: str = "--resume") -> dict[str, torch.Tensor]:
    """This rank's parameters and optimizer state from the checkpoint, as ``engine.local_tensors()`` names them.

    No collective: each rank reads its own boxes; ``engine.load_local_tensors`` takes the result.
    """
    check_shapes(checkpoint, global_shapes(engine), flag=flag)
    tensors = _local_templates(engine)
    read_boxes(checkpoint, [(s, s.view(tensors[s.key])) for s in local_slices(engine)], flag=flag)
    for i in range(1, len(engine.optimizer.buckets)):
        tensors[f"optim.{i}.step"].copy_(tensors["optim.0.step"])
    return tensors


def load_checkpoint(trainer: Trainer, checkpoint: Checkpoint, *, rank: int, flag: str = "--resume") -> None:
    """Bring this rank of ``trainer`` to the checkpoint's state, in this rank's layout (any layout wrote it)."""
    engine = trainer.engine
    tensors = read_local_tensors(engine, checkpoint, flag=flag)
    if same_layout(checkpoint, engine):
        objects = rank_objects(checkpoint, rank, flag=flag)
    else:
        objects = rank_objects(checkpoint, 0, flag=flag)
        objects["ledger"] = {"steps": 0, "total": {}, "last": {}}
    objects["layout"] = engine.layout_key()
    trainer.load_snapshot(tensors, objects)

