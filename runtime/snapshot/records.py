"""The vocabulary both sides of the snapshot system share: version ids and the records of shards.

A *version* names one snapshot of the whole job. It is an integer that orders first by
*epoch* (the restore generation: it grows by one each time the job restores, from
memory, disk or nothing) and then by training step::

    version = epoch << STEP_BITS | step

so two runs of the same steps (before and after a restore) never share a version, and
"newer" means "of a later generation, else of a later step": once a restore picked a
point, whatever the old generation left behind is older than anything the new one
writes, and a daemon never mixes their shards.

The record types are what the daemon reports (List) and what travels with a pushed
chunk. Neither the daemon nor the trainer side imports the other; both import this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "STEP_BITS",
    "MAX_EPOCH",
    "MAX_META_BYTES",
    "version_id",
    "epoch_of",
    "step_of",
    "version_text",
    "MemberInfo",
    "DataShardInfo",
    "ParityShardInfo",
    "VersionInfo",
    "ChunkHeader",
    "ChunkPush",
    "ShardRange",
]

STEP_BITS = 40  # steps below 2**40 (10**12); epochs in the 23 bits above, so a version fits a signed 64-bit integer
MAX_STEP = (1 << STEP_BITS) - 1
MAX_EPOCH = (1 << (63 - STEP_BITS)) - 1
MAX_META_BYTES = 64 * 1024  # the trainer's opaque per-shard metadata (step, RNG state, ...): small by design


def version_id(epoch: int, step: int) -> int:
    """The version of the snapshot taken at ``step`` in restore generation ``epoch``."""
    if not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch {epoch} outside [0, {MAX_EPOCH}]")
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step {step} outside [0, {MAX_STEP}]")
    return epoch << STEP_BITS | step


def epoch_of(version: int) -> int:
    return version >> STEP_BITS


def step_of(version: int) -> int:
    return version & MAX_STEP


def version_text(version: int) -> str:
    """``"step 8 (epoch 2)"``, or ``"step 8"`` in epoch 0: how logs and messages name a version."""
    epoch = epoch_of(version)
    return f"step {step_of(version)}" + (f" (epoch {epoch})" if epoch else "")



@dataclass(frozen=True)
class MemberInfo:
    """One data member of a parity shard's stripe, as its owner declared it when pushing.

    ``position`` is the member's index c in the stripe (0 <= c < k), i.e. which chunk of
    its blob it is; ``node`` is the node that owns the blob; ``size`` and ``checksum``
    describe the whole blob, ``chunk_len`` and ``chunk_checksum`` the chunk's actual bytes
    (``chunk_len`` may be below the layout's ``chunk_len`` for a blob's last chunks, even 0).
    """

    position: int
    node: int
    size: int
    checksum: int
    chunk_len: int
    chunk_checksum: int
    step: int


@dataclass(frozen=True)
class DataShardInfo:
    """A worker's blob on this node. ``checksum`` and ``step`` are None until committed."""

    local_rank: int
    size: int
    checksum: int | None
    step: int | None
    committed: bool
    path: str
    meta: bytes


@dataclass(frozen=True)
class ParityShardInfo:
    """Parity ``index`` (j) of ``stripe`` for local rank ``local_rank``.

    ``size`` is the longest member chunk that arrived so far (shorter chunks count as
    zero-padded); ``checksum`` is None until the shard is complete.
    """

    local_rank: int
    stripe: int
    index: int
    size: int
    checksum: int | None
    complete: bool
    path: str
    members: list[MemberInfo]


@dataclass(frozen=True)
class VersionInfo:
    """A version as this node holds it. ``step`` comes from the committed shards (None if none)."""

    version: int
    step: int | None
    complete: bool
    published: bool
    data: list[DataShardInfo]
    parity: list[ParityShardInfo]


@dataclass(frozen=True)
class ChunkHeader:
    """What a pushed chunk declares: where it goes, which member it is, and its owner's blob."""

    version: int
    local_rank: int
    stripe: int
    index: int  # parity j the receiver accumulates into
    member: int  # c: the member's position in the stripe (its chunk index in the blob)
    node: int  # the blob's owner
    blob_size: int
    blob_checksum: int
    chunk_len: int
    chunk_checksum: int
    step: int


@dataclass(frozen=True)
class ChunkPush:
    """One chunk to send after a commit: bytes [start, end) of the blob, to ``target_node``."""

    header_base: ChunkHeader  # chunk_checksum is filled in by the sender (0 here)
    start: int
    end: int
    target_node: int


@dataclass(frozen=True)
class ShardRange:
    """Bytes [offset, offset + length) of a readable shard, as both transports serve them.

    ``data`` is a view of the shard's mapping taken when the range was resolved: a drop
    or publish meanwhile unlinks the file but keeps this view valid, so a reader already
    streaming finishes with the bytes it asked for. ``checksum`` covers the whole shard.
    """

    data: torch.Tensor
    size: int
    checksum: int
    offset: int
    length: int

