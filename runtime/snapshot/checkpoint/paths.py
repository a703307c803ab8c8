"""Where disk checkpoints live, which run they belong to, and how a user's ``DIR|latest`` finds one.

Every run has an id, written by ``plait train`` to ``<run dir>/run.json``. A run's
checkpoints go to ``<base>/<run id>/step-<S>/``, where ``<base>`` is ``snapshot.dir`` or
``<run dir>/checkpoints``; so runs that share a ``snapshot.dir`` never see, prune or load
each other's steps. A step directory holds::

    .metadata            the global torch.distributed.checkpoint metadata (every chunk at its global offset)
    rank-<R>/            rank R's chunks (DCP files) and its Python state (state.bin)
    rank-<R>.json        rank R's marker: run id, step, world, layout, checksums of its files
    checkpoint.json      the manifest, written last: the step is complete once it exists

The manifest repeats the run id (a step directory copied elsewhere still says whose it
is), the global parameter shapes (checked before any rank reads) and every rank's
checksums.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.errors import IncompleteCheckpoint, NoCheckpoint

RUN_FILE = "run.json"
MANIFEST = "checkpoint.json"
STATE_FILE = "state.bin"
FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)$")


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    started: float  # time.time() when plait train started the run
    resume_from: str | None = None  # the step directory this run started from (--resume)


def new_run(run_dir: Path, resume_from: Path | None = None) -> RunInfo:
    """A fresh id for the run about to start in ``run_dir``, recorded in ``run.json``."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(run_dir).resolve().name)[:40]
    info = RunInfo(f"{name}-{uuid.uuid4().hex[:8]}", time.time(), str(Path(resume_from).resolve()) if resume_from else None)
    write_json(Path(run_dir) / RUN_FILE, {"run_id": info.run_id, "started": info.started, "resume_from": info.resume_from})
    return info


def read_run(run_dir: Path) -> RunInfo | None:
    try:
        raw = json.loads((Path(run_dir) / RUN_FILE).read_text())
        return RunInfo(str(raw["run_id"]), float(raw["started"]), raw.get("resume_from"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_of(run_dir: Path) -> RunInfo:
    """The run's record; workers started without ``plait train`` get an id derived from the run directory."""
    info = read_run(run_dir)
    if info is not None:
        return info
    from plait.runtime.snapshot.trainer.hook import job_name

    return RunInfo(job_name(Path(run_dir)), 0.0)


def checkpoint_base(snapshot_dir: str, run_dir: Path) -> Path:
    return Path(snapshot_dir) if snapshot_dir else Path(run_dir) / "checkpoints"


def step_dir(base: Path, run_id: str, step: int) -> Path:
    return Path(base) / run_id / f"step-{step:08d}"


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its step directory and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every step directory under one run's root, complete or not, ascending."""
    if not Path(root).is_dir():
        return []
    out = [(int(m.group(1)), d) for d in Path(root).iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir()]
    return sorted(out)


def complete_checkpoints(base: Path, run_id: str) -> list[Checkpoint]:
    """This run's complete checkpoints under ``base``, oldest step first; any other run's are never listed."""
    out = []
    for _, d in step_dirs(Path(base) / run_id):
        manifest = read_manifest(d)
        if manifest is not None and manifest.get("run_id") == run_id:
            out.append(Checkpoint(d, manifest))
    return out


def _incomplete(path: Path, flag: str) -> IncompleteCheckpoint:
    markers = sorted(p.name for p in path.glob("rank-*.json"))
    return IncompleteCheckpoint(
        f"{flag} {path}: this checkpoint is incomplete (no {MANIFEST}; rank markers present: "
        f"{', '.join(markers) or 'none'}): "
        "its run stopped while writing it. Give an older step directory, or the run directory to take its newest "
        "complete checkpoint")


def _config_snapshot_dir(run_dir: Path) -> str:
    import yaml

    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    return str((raw.get("snapshot") or {}).get("dir") or "")


def in_run(run_dir: Path, *, step: int | None, flag: str) -> Checkpoint:
    """The newest complete checkpoint of the run in ``run_dir`` (or its step ``step``)."""
    info = read_run(run_dir)
    if info is None:
        raise NoCheckpoint(f"{flag} {run_dir}: not a run directory (no {RUN_FILE}) nor a checkpoint step directory (no "
                           f"{MANIFEST}); give a directory that plait train wrote, or a step-<S> directory under its "
                           "checkpoints")
    base = checkpoint_base(_config_snapshot_dir(run_dir), run_dir)
    found = complete_checkpoints(base, info.run_id)
    if step is not None:
        found = [c for c in found if c.step == step]
        if not found:
            steps = [c.step for c in complete_checkpoints(base, info.run_id)]
            partial = step_dir(base, info.run_id, step)
            if partial.is_dir():
                raise _incomplete(partial, flag)
            raise NoCheckpoint(f"--step {step}: run {info.run_id} has no complete checkpoint of step {step}; its "
                               f"complete steps: {', '.join(map(str, steps)) or 'none'}")
    if not found:
        partial = [d for _, d in step_dirs(base / info.run_id)]
        if partial:
            raise _incomplete(partial[-1], flag)
        raise NoCheckpoint(f"{flag} {run_dir}: run {info.run_id} has no disk checkpoint under {base / info.run_id}; "
                           "disk checkpoints are written when snapshot.disk_every > 0 (e.g. --set snapshot.every=5 "
                           "snapshot.disk_every=1)")
    return found[-1]


def resolve(spec: str, *, flag: str, search: list[Path]) -> Checkpoint:
    """``spec`` is a run directory, a step directory, or ``latest``: the newest run under ``search`` with a checkpoint."""
    if spec == "latest":
        return latest(search, flag=flag)
    path = Path(spec)
    if not path.is_dir():
        raise NoCheckpoint(f"{flag} {spec}: no such directory; give a run directory, a checkpoint step directory, "
                           "or latest")
    manifest = read_manifest(path)
    if manifest is not None:
        return Checkpoint(path, manifest)
    if _STEP_DIR.match(path.name):
        raise _incomplete(path, flag)
    return in_run(path, step=None, flag=flag)


def latest(search: list[Path], *, flag: str) -> Checkpoint:
    """The newest complete checkpoint of the most recently started run found under the ``search`` bases."""
    best: Checkpoint | None = None
    for base in search:
        if not base.is_dir():
            continue
        for run_root in base.iterdir():
            if not run_root.is_dir():
                continue
            found = complete_checkpoints(base, run_root.name)
            if found and (best is None or (found[-1].manifest.get("run_started", 0), found[-1].step)
                          > (best.manifest.get("run_started", 0), best.step)):
                best = found[-1]
    if best is None:
        where = ", ".join(str(b) for b in search) or "nowhere"
        raise NoCheckpoint(f"{flag} latest: no complete disk checkpoint of any run under {where}; give a run or step "
                           "directory, or set snapshot.dir to where the runs wrote them")
    return best


def search_bases(snapshot_dir: str, runs_parent: Path) -> list[Path]:
    """Where ``latest`` looks: ``snapshot.dir`` if set, and every run's own checkpoints beside the new run."""
    bases = [Path(snapshot_dir)] if snapshot_dir else []
    if Path(runs_parent).is_dir():
        bases += sorted(d / "checkpoints" for d in Path(runs_parent).iterdir() if (d / "checkpoints").is_dir())
    return bases


def write_json(path: Path, value: Any) -> None:
    """Atomically (a unique temporary name, then rename): several ranks may write the same file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)



@contextmanager
def single_process() -> Iterator[None]:
    """DCP with ``no_dist`` on purpose (one rank's files, or one process reading): without its warning that it assumes so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=r"torch\.distributed is disabled, unavailable or uninitialized")
        yield
