"""Training data: byte-level tokens of real text that every machine has.

The corpus is the Python standard library's source files of the running interpreter.
Files are split into train and held-out sets by a hash of their relative path, so the
split does not depend on which other files exist. Training samples are non-overlapping
windows of ``seq_len + 1`` bytes, visited in an order shuffled by ``seed`` and epoch.
The loader's only state is a global sample cursor, independent of the number of ranks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from plait.errors import ConfigError

log = logging.getLogger(__name__)

SEPARATOR = b"\n\x00\n"  # between files; byte 0 never occurs in source text


@dataclass(kw_only=True)
class DataConfig:
    """The ``data.*`` section."""

    source: Literal["stdlib"] = "stdlib"
    eval_fraction: float = 0.05  # share of files held out for the eval loss
    max_bytes: int = 0  # 0: the whole corpus; otherwise the first max_bytes of each split's order
    # windows: rows of model.seq_len tokens cut from the stream; documents: whole files, cut at max_len tokens,
    # train.global_batch of them per step (needs parallel.hybrid_dp)
    packing: Literal["windows", "documents"] = "windows"
    max_len: int = 0  # documents: the longest piece in tokens; 0: model.seq_len

    def validate(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError("data.eval_fraction", self.eval_fraction, "accepted: a number strictly between 0 and 1")
        if self.max_bytes < 0:
            raise ConfigError("data.max_bytes", self.max_bytes, "accepted: 0 (whole corpus) or a positive byte count")
        if self.max_len < 0:
            raise ConfigError("data.max_len", self.max_len, "accepted: 0 (model.seq_len) or a positive number of tokens")


@dataclass(frozen=True)
class Corpus:
    """The train and eval byte streams (uint8 tensors) and where they came from."""

    train: torch.Tensor
    eval: torch.Tensor
    root: str
    files: int
    train_files: torch.Tensor | None = None  # int64 [n, 2]: (start, length) of each file in ``train``


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running interpreter's standard-library ``.py`` files, in a fixed order (sorted as paths).

    ``os.walk`` never enters ``site-packages`` or ``dist-packages`` (nor, like ``Path.rglob``, a linked
    directory): every worker of every run lists the tree, and ``rglob`` over it, third-party packages
    included, took 0.55 s a process.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    files.sort()
    return root, files


def _is_eval(relative: str, eval_fraction: float) -> bool:
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < eval_fraction


def load_corpus(config: DataConfig) -> Corpus:
    """Read the corpus and split it; every rank gets the same bytes."""
    root, files = stdlib_files()
    train_parts: list[bytes] = []
    eval_parts: list[bytes] = []
    for path in files:
        try:
            content = path.read_bytes()
        except OSError as err:  # an unreadable file is skipped on every rank alike
            log.warning("skipping %s: %s", path, err)
            continue
        rel = path.relative_to(root).as_posix()
        (eval_parts if _is_eval(rel, config.eval_fraction) else train_parts).append(content)
    train = SEPARATOR.join(train_parts)
    held_out = SEPARATOR.join(eval_parts)
    spans, at = [], 0
    for part in train_parts:
        spans.append((at, len(part)))
        at += len(part) + len(SEPARATOR)
    if config.max_bytes:
        train, held_out = train[: config.max_bytes], held_out[: config.max_bytes]
        spans = [(start, min(length, config.max_bytes - start)) for start, length in spans if start < config.max_bytes]
    if not train or not held_out:
        raise ConfigError("data.source", config.source, f"found no usable text under {root}")
    return Corpus(
        train=torch.frombuffer(bytearray(train), dtype=torch.uint8),
        eval=torch.frombuffer(bytearray(held_out), dtype=torch.uint8),
        root=str(root),
        files=len(files),
        train_files=torch.tensor(spans, dtype=torch.long).reshape(-1, 2),
    )


class SequenceLoader:
    """Deterministic, shuffled batches of token windows, sharded over data-parallel ranks.

    Step ``s`` takes global samples ``[s·G, (s+1)·G)`` of the epoch-wise permutation, where
    ``G`` is the global batch; rank ``r`` of ``dp`` gets the ``r``-th contiguous slice of
    ``G / dp`` of them. Changing ``dp`` does not change which samples form a global batch.
    """

    def __init__(self, tokens: torch.Tensor, *, seq_len: int, global_batch: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        if global_batch % dp_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by dp {dp_size}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.samples_per_epoch = (tokens.numel() - 1) // (seq_len + 1)
        if self.samples_per_epoch < global_batch:
            raise ConfigError(
                "train.global_batch", global_batch,
                f"the corpus holds only {self.samples_per_epoch} windows of model.seq_len + 1 = {seq_len + 1} bytes",
            )
        self.cursor = 0  # global samples consumed so far
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.samples_per_epoch, generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def _sample(self, global_index: int) -> torch.Tensor:
        epoch, within = divmod(global_index, self.samples_per_epoch)
        start = int(self._permutation(epoch)[within]) * (self.seq_len + 1)
        return self.tokens[start : start + self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch: ``(inputs, targets)``, int64 ``[G/dp, seq_len]``."""
        local = self.global_batch // self.dp_size
        first = self.cursor + self.dp_rank * local
        rows = torch.stack([self._sample(first + i) for i in range(local)]).long()
        self.cursor += self.global_batch
        return rows[:, :-1], rows[:, 1:]

    @property
    def epoch(self) -> float:
        return self.cursor / self.samples_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["seq_len"] != self.seq_len:
            raise ValueError(
                f"loader state was saved with seed={state['seed']}, seq_len={state['seq_len']}; "
                f"this run has seed={self.seed}, seq_len={self.seq_len}"
            )
        self.cursor = int(state["cursor"])


def eval_batches(tokens: torch.Tensor, *, seq_len: int, batch: int, batches: int, dp_rank: int, dp_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed held-out set: the first ``batches × batch`` windows, split over ranks.

    Each rank takes every ``dp_size``-th window, so the union over ranks is the same set
    for any ``dp_size`` dividing ``batch``.
    """
    windows = (tokens.numel() - 1) // (seq_len + 1)
    total = min(batches * batch, windows)
    mine = list(range(dp_rank, total, dp_size))
    out = []
    for i in range(0, len(mine), max(1, batch // dp_size)):
        idx = mine[i : i + max(1, batch // dp_size)]
        rows = torch.stack([tokens[j * (seq_len + 1) : (j + 1) * (seq_len + 1)] for j in idx]).long()
        out.append((rows[:, :-1], rows[:, 1:]))
    return out
