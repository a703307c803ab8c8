"""The daemon's pool of shared-memory segments: a dropped version's memory serves the next version."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from plait.ops.checksum import checksum
from plait.runtime.snapshot import shm
from plait.runtime.snapshot.errors import SnapshotMemoryError
from plait.runtime.snapshot.daemon.store import SnapshotStore


@pytest.fixture
def job():
    name = f"pool-{uuid.uuid4().hex[:8]}"
    yield name
    shm.remove_namespace(name, 0)


def _put(store: SnapshotStore, version: int, size: int, fill: int) -> None:
    shard = store.alloc(version, 0, size)
    shard.tensor.fill_(fill)
    store.commit(version, 0, size=size, checksum=checksum(shard.tensor), step=version)


def test_a_published_past_version_lends_its_segment_to_the_next(job):
    store = SnapshotStore(job, 0, nnodes=1, nproc_per_node=1, ec_k=1, ec_m=0, max_memory=1 << 20)
    _put(store, 1, 4000, 1)
    inode = os.stat(store.data_shard(1, 0).path).st_ino
    _put(store, 2, 4000, 2)
    store.publish(2)  # drops version 1: its segment goes to the pool, not away
    assert store.memory_used == 4000
    assert any(".pool." in p.name for p in shm.list_namespace(job, 0))
    _put(store, 3, 4100, 3)  # about the same size: the pooled segment is reused, resized
    shard = store.data_shard(3, 0)
    assert os.stat(shard.path).st_ino == inode and shard.size == 4100 and os.path.getsize(shard.path) == 4100
    assert torch.all(shard.tensor == 3) and store.memory_used == 8100
    assert not any(".pool." in p.name for p in shm.list_namespace(job, 0))
    # the shard is what was written and committed, nothing of version 1 shows through
    assert store.versions(3)[0].data[0].checksum == checksum(torch.full((4100,), 3, dtype=torch.uint8))


def test_pooled_memory_gives_way_to_the_cap_and_sizes_far_apart_are_not_reused(job):
    store = SnapshotStore(job, 0, nnodes=1, nproc_per_node=1, ec_k=1, ec_m=0, max_memory=10_000)
    _put(store, 1, 4000, 1)
    _put(store, 2, 4000, 2)
    store.publish(2)
    _put(store, 3, 100, 3)  # 100 is far from 4000: a fresh segment, the pooled one stays
    assert any(".pool." in p.name for p in shm.list_namespace(job, 0))
    _put(store, 4, 5900, 4)  # 4000 + 100 + 5900 = 10,000: fits only once the pool is released
    assert store.memory_used == 10_000
    assert not any(".pool." in p.name for p in shm.list_namespace(job, 0))
    with pytest.raises(SnapshotMemoryError, match="needs 1 bytes"):
        store.alloc(5, 0, 1)
