"""The disk tier: every ``snapshot.disk_every`` snapshots, a durable torch.distributed.checkpoint.

Each rank writes its own state with DCP (``no_dist``: no collective, so the write runs on
a background thread while training goes on) from the snapshot blob already in shared
memory, into ``<dir>/step-<S>/rank-<R>/``, then a marker ``rank-<R>.json`` holding the
checksum of every tensor and of the Python state. A checkpoint is complete only when
all ranks' markers are there; restore takes the newest complete one and checks every
checksum. A failed write is logged and retried (3 tries, backoff), never raised: the
in-memory snapshots go on regardless. The ``snapshot.keep_disk`` newest complete
checkpoints are kept; older ones are deleted by global rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from plait.ops.checksum import checksum
from plait.runtime.snapshot.auth import JobSecret
from plait.runtime.snapshot.trainer import objects as object_codec
from plait.runtime.snapshot.trainer.blob import read_blob

log = logging.getLogger("plait.snapshot.disk")

_STEP_DIR = re.compile(r"step-(\d+)$")


def _crc(t: torch.Tensor) -> int:
    t = t.detach().contiguous()
    return checksum(t.reshape(-1).view(torch.uint8)) if t.numel() else 0


class DiskTier:
    """One rank's writer and reader of the disk tier."""

    def __init__(self, root: Path, *, rank: int, world: int, secret: JobSecret, keep: int = 2, tries: int = 3):
        self.root = Path(root)
        self.secret = secret
        self.rank = rank
        self.world = world
        self.keep = keep
        self.tries = tries
        self._thread: threading.Thread | None = None
        self.written: list[int] = []
        self.failures = 0

    # ------------------------------------------------------------------ write

    def save_async(self, step: int, blob: torch.Tensor, blob_checksum: int) -> None:
        """Write the blob's state as step ``step`` on a background thread (waits for the previous write first)."""
        self.wait()
        self._thread = threading.Thread(target=self._save, args=(step, blob), name=f"disk-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _save(self, step: int, blob: torch.Tensor) -> None:
        for attempt in range(1, self.tries + 1):
            try:
                self.save(step, blob)
                self.written.append(step)
                self._prune()  # every rank: whichever finishes a checkpoint last sees it complete
                return
            except BaseException as err:  # noqa: BLE001 - the disk tier must never stop training (DCP raises BaseException)
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                self.failures += 1
                log.warning("disk checkpoint of step %d, rank %d: try %d of %d failed: %s", step, self.rank, attempt, self.tries, err)
                time.sleep(0.5 * 2 ** (attempt - 1))
        log.error("disk checkpoint of step %d, rank %d: given up after %d tries; in-memory snapshots continue", step, self.rank, self.tries)

    def save(self, step: int, blob: torch.Tensor) -> None:
        import torch.distributed.checkpoint as dcp

        tensors, objects = read_blob(blob, self.secret)
        raw = object_codec.dumps(objects)
        obj_tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        state: dict[str, Any] = {"tensors": dict(tensors), "objects": obj_tensor}
        step_dir = self.root / f"step-{step:08d}"
        out = step_dir / f"rank-{self.rank}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(out)), no_dist=True)
        marker = {
            "step": step,
            "rank": self.rank,
            "world": self.world,
            "tensors": {name: [str(t.dtype).removeprefix("torch."), list(t.shape), _crc(t)] for name, t in tensors.items()},
            "objects": [obj_tensor.numel(), _crc(obj_tensor)],
        }
        tmp = step_dir / f"rank-{self.rank}.json.tmp"
        tmp.write_text(json.dumps(marker))
        os.replace(tmp, step_dir / f"rank-{self.rank}.json")

    def _prune(self) -> None:
        """Keep the ``keep`` newest complete checkpoints; delete anything older (complete or not)."""
        complete = complete_steps(self.root, self.world)
        if len(complete) <= self.keep:
            return
        oldest_kept = complete[-self.keep]
        for d in self.root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and int(m.group(1)) < oldest_kept:
                shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------ read

    def load(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's tensors and objects of checkpoint ``step``; ValueError on any checksum mismatch."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        step_dir = self.root / f"step-{step:08d}"
        marker = json.loads((step_dir / f"rank-{self.rank}.json").read_text())
        tensors = {name: torch.empty(shape, dtype=getattr(torch, dtype)) for name, (dtype, shape, _) in marker["tensors"].items()}
        state: dict[str, Any] = {"tensors": tensors, "objects": torch.empty(marker["objects"][0], dtype=torch.uint8)}
        try:
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(step_dir / f"rank-{self.rank}")), no_dist=True)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - damaged files: one clear error; the caller falls back
            raise ValueError(f"disk checkpoint step {step}, rank {self.rank}: unreadable ({type(err).__name__})") from err
        for name, (_, _, crc) in marker["tensors"].items():
            if _crc(state["tensors"][name]) != crc:
                raise ValueError(f"disk checkpoint step {step}, rank {self.rank}: checksum mismatch in {name}")
        if _crc(state["objects"]) != marker["objects"][1]:
            raise ValueError(f"disk checkpoint step {step}, rank {self.rank}: checksum mismatch in the Python state")
        objects = object_codec.loads(state["objects"].numpy())
        return state["tensors"], objects


def complete_steps(root: Path, world: int) -> list[int]:
    """Steps (ascending) whose checkpoint has every rank's marker."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and all((d / f"rank-{r}.json").exists() for r in range(world)):
            steps.append(int(m.group(1)))
    return sorted(steps)
