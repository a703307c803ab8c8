"""The command-line side of disk checkpoints: check a ``--resume`` choice before launching, and ``plait export``.

Both work in one plain process, with no process group: a checkpoint's global
``.metadata`` is standard torch.distributed.checkpoint, so the model's tensors load
with ``dcp.load(..., no_dist=True)`` into tensors shaped from the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from plait.errors import CLIError
from plait.runtime.snapshot.checkpoint import paths
from plait.runtime.snapshot.checkpoint.paths import Checkpoint, single_process
from plait.runtime.snapshot.checkpoint.read import check_shapes, verify_files

if TYPE_CHECKING:
    from plait.runtime.config import JobConfig


def model_shapes(config: JobConfig) -> dict[str, list[int]]:
    """The configured model's ``state_dict()`` shapes, built on the meta device (no memory, no init)."""
    from plait.runtime.models import build_model

    with torch.device("meta"):
        model = build_model(config.model)
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def check_resume(spec: str, config: JobConfig, run_dir: Path) -> Checkpoint:
    """The checkpoint ``--resume spec`` names, checked whole: complete, same model shapes, every file's checksum."""
    search = paths.search_bases(config.snapshot.dir, Path(run_dir).parent)
    checkpoint = paths.resolve(spec, flag="--resume", search=search)
    check_shapes(checkpoint, model_shapes(config), flag="--resume", whole_model=True)
    verify_files(checkpoint, flag="--resume")
    return checkpoint


def model_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The model's tensors of a checkpoint in the single-process layout (plain DCP, no optimizer state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(checkpoint.path))
    metadata = reader.read_metadata()
    state = {
        name: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for name, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata) and name in checkpoint.manifest["params"]
    }
    with single_process():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def export(run_dir: Path, *, step: int | None, out: Path) -> tuple[Checkpoint, int]:
    """Write the model of ``run_dir``'s newest (or step ``step``) checkpoint to ``out``; returns it and the tensor count.

    ``.safetensors`` needs the ``safetensors`` package; anything else is ``torch.save`` of
    a plain ``{name: tensor}`` dict, which ``model.load_state_dict(torch.load(out))`` takes.
    """
    path = Path(run_dir)
    manifest = paths.read_manifest(path)
    if manifest is not None:
        checkpoint = Checkpoint(path, manifest)
        if step is not None and checkpoint.step != step:
            raise CLIError(f"--step {step}: {path} is the checkpoint of step {checkpoint.step}; give its run "
                           "directory to choose a step")
    else:
        checkpoint = paths.in_run(path, step=step, flag="RUN_DIR")
    if out.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CLIError(f"--out {out}: writing .safetensors needs the safetensors package (pip install safetensors); "
                           "or give a .pt file (torch.save)") from None
    verify_files(checkpoint, flag="RUN_DIR")
    state = model_state(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"step": str(checkpoint.step)})
    else:
        torch.save(state, out)
    return checkpoint, len(state)
