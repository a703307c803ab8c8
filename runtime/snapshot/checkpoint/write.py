"""Writing a resharding disk checkpoint: each rank its own chunks, no collective, then one global index.

Every ``snapshot.disk_every`` snapshots (and always at the last step of a run), each rank
writes, on a background thread and from the snapshot blob already copied out of the
training tensors:

1. its chunks (:func:`plait.parallel.slices.local_slices`, the boxes it is the one
   writer of) with ``torch.distributed.checkpoint.save(..., no_dist=True)`` into
   ``step-<S>/rank-<R>/``, and its Python state (step, loader, RNGs, histories) beside
   them; no collective, so training goes on;
2. its marker ``rank-<R>.json``: run id, step, world, layout, the global name, shape and
   offsets of each chunk, and the checksum of every file it wrote;
3. then, whichever rank finds every rank's marker present (at least the last one to
   finish does), composes the global DCP ``.metadata`` from the ranks' own: every chunk
   under its global name at its global offsets, its bytes where its rank wrote them. It
   checks that the chunks tile every tensor exactly, then writes the manifest
   (``checkpoint.json``, see :mod:`.paths`) — the step is complete — and prunes this
   run's older steps beyond ``snapshot.keep_disk``.

So ``torch.distributed.checkpoint.load(model.state_dict(), checkpoint_id=step_dir)``
fills a plain single-process model with no plait code. A failed write is logged and
retried (3 tries, backoff), never raised: the in-memory snapshots go on regardless.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from plait.ops.checksum import checksum
from plait.parallel.slices import Slice
from plait.runtime.snapshot.auth import JobSecret
from plait.runtime.snapshot.checkpoint import paths
from plait.runtime.snapshot.checkpoint.paths import FORMAT, MANIFEST, STATE_FILE, RunInfo, single_process
from plait.runtime.snapshot.trainer import objects as object_codec
from plait.runtime.snapshot.trainer.blob import read_blob

log = logging.getLogger("plait.snapshot.disk")


def file_checksum(path: Path) -> list[int]:
    """``[size, crc32c]`` of a file's bytes."""
    data = Path(path).read_bytes()
    return [len(data), checksum(torch.frombuffer(bytearray(data), dtype=torch.uint8)) if data else 0]


class CheckpointWriter:
    """One rank's writer of the disk tier (see the module docstring)."""

    def __init__(self, base: Path, *, run: RunInfo, rank: int, world: int, slices: list[Slice], layout: list[int],
                 params: dict[str, list[int]], secret: JobSecret, keep: int = 2, tries: int = 3, attempt: int = 0):
        self.base = Path(base)
        self.run = run
        self.rank = rank
        self.world = world
        self.chunks = [s for s in slices if s.writer]
        self.layout = layout
        self.params = params
        self.secret = secret
        self.keep = keep
        self.tries = tries
        self.attempt = attempt  # the elastic restart: markers left by an earlier attempt's workers never count
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.written: list[int] = []
        self.failures = 0

    @property
    def root(self) -> Path:
        """This run's checkpoints (another run sharing ``snapshot.dir`` has its own root)."""
        return self.base / self.run.run_id

    # ------------------------------------------------------------------ background

    def save_async(self, step: int, blob: torch.Tensor, blob_checksum: int = 0) -> None:
        """Write the blob's state as step ``step`` on a background thread (after the previous write)."""
        with self._lock:
            if self._thread is not None:
                self._thread.join()
            self._thread = threading.Thread(target=self._save, args=(step, blob), name=f"disk-{step}", daemon=True)
            self._thread.start()

    def wait(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._thread.join()
                self._thread = None

    def _save(self, step: int, blob: torch.Tensor) -> None:
        for attempt in range(1, self.tries + 1):
            try:
                self.save(step, blob)
                self.written.append(step)
                return
            except BaseException as err:  # noqa: BLE001 - the disk tier must never stop training (DCP raises BaseException)
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                self.failures += 1
                log.warning("disk checkpoint of step %d, rank %d: try %d of %d failed: %s", step, self.rank, attempt,
                            self.tries, err)
                time.sleep(0.5 * 2 ** (attempt - 1))
        log.error("disk checkpoint of step %d, rank %d: given up after %d tries; in-memory snapshots continue", step,
                  self.rank, self.tries)

    # ------------------------------------------------------------------ one step

    def save(self, step: int, blob: torch.Tensor) -> None:
        import torch.distributed.checkpoint as dcp

        tensors, objects = read_blob(blob, self.secret)
        step_dir = paths.step_dir(self.base, self.run.run_id, step)
        if paths.read_manifest(step_dir) is not None:
            return  # an earlier attempt of this run completed this step; training is deterministic: same bytes
        out = step_dir / f"rank-{self.rank}"
        (step_dir / f"rank-{self.rank}.json").unlink(missing_ok=True)  # an earlier attempt's, about to be stale
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        state = {f"chunk.{k}": s.view(tensors[s.key]) for k, s in enumerate(self.chunks)}
        with single_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(out)), no_dist=True)
        (out / STATE_FILE).write_bytes(object_codec.dumps(objects))
        marker = {
            "run_id": self.run.run_id, "step": step, "rank": self.rank, "world": self.world, "attempt": self.attempt,
            "layout": self.layout,
            "chunks": [[s.name, list(s.shape), list(s.offsets), list(s.sizes)] for s in self.chunks],
            "params": self.params,
            "files": {f.name: file_checksum(f) for f in sorted(out.iterdir()) if f.is_file()},
        }
        paths.write_json(step_dir / f"rank-{self.rank}.json", marker)
        if all(_marker_attempt(step_dir, r) == self.attempt for r in range(self.world)):
            finalize(step_dir, self.run, self.world)
            prune(self.root, self.run.run_id, self.keep)


def _marker_attempt(step_dir: Path, rank: int) -> int | None:
    try:
        return int(json.loads((step_dir / f"rank-{rank}.json").read_text())["attempt"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _markers(step_dir: Path, world: int) -> list[dict[str, Any]]:
    return [json.loads((step_dir / f"rank-{r}.json").read_text()) for r in range(world)]


def finalize(step_dir: Path, run: RunInfo, world: int) -> None:
    """Write the global ``.metadata`` and the manifest of a step whose ranks all wrote their markers."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata,
    )

    markers = _markers(step_dir, world)
    tensors: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, Any] = {}
    version = None
    for r, marker in enumerate(markers):
        if marker["run_id"] != run.run_id or marker["world"] != world or marker["attempt"] != markers[0]["attempt"]:
            raise ValueError(f"{step_dir}: rank {r}'s marker is of run {marker['run_id']} with world {marker['world']}")
        local = FileSystemReader(str(step_dir / f"rank-{r}")).read_metadata()
        version = local.version
        where = {index.fqn: info for index, info in local.storage_data.items()}
        for k, (name, shape, offsets, sizes) in enumerate(marker["chunks"]):
            key = f"chunk.{k}"
            entry = tensors.setdefault(name, TensorStorageMetadata(local.state_dict_metadata[key].properties,
                                                                   torch.Size(shape), []))
            entry.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            info = where[key]
            where_written = dataclasses.replace(info, relative_path=f"rank-{r}/{info.relative_path}")
            storage[MetadataIndex(name, torch.Size(offsets))] = where_written
    for name, entry in tensors.items():
        covered = sum(math.prod(c.sizes) for c in entry.chunks)
        if covered != math.prod(entry.size):
            raise ValueError(f"{step_dir}: the chunks of {name} cover {covered} of its {math.prod(entry.size)} elements")
    metadata = Metadata(state_dict_metadata=dict(sorted(tensors.items())), planner_data={n: (n,) for n in tensors},
                        storage_data=storage, version=version)
    tmp = step_dir / f".metadata.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(metadata, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / ".metadata")
    params: dict[str, list[int]] = {}
    for marker in markers:
        params.update(marker["params"])
    manifest = {
        "format": FORMAT, "run_id": run.run_id, "run_started": run.started, "step": markers[0]["step"], "world": world,
        "layout": markers[0]["layout"], "params": dict(sorted(params.items())),
        "files": {f"rank-{r}/{name}": crc for r, m in enumerate(markers) for name, crc in m["files"].items()},
        "written": time.time(),
    }
    paths.write_json(step_dir / MANIFEST, manifest)


def prune(root: Path, run_id: str, keep: int) -> None:
    """Keep this run's ``keep`` newest complete steps; delete its older step directories (complete or not)."""
    complete = paths.complete_checkpoints(root.parent, run_id)
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep].step
    for step, d in paths.step_dirs(root):
        if step < oldest_kept:
            shutil.rmtree(d, ignore_errors=True)
