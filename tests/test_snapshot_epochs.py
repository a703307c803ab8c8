"""Versions carry their restore generation: a replayed run never completes, mixes or is refused by what a crashed one left.

One process, real stores on real shared memory (no daemon): the rules themselves.
"""

from __future__ import annotations

import pytest
from test_snapshot_daemon import _blob, _job, _store, _write_commit

from plait.ops.checksum import checksum
from plait.runtime.snapshot import shm
from plait.runtime.snapshot.daemon.store import MAX_IN_FLIGHT
from plait.runtime.snapshot.errors import SnapshotRequestError, SnapshotVersionError
from plait.runtime.snapshot.records import epoch_of, step_of, version_id, version_text


@pytest.fixture
def job():
    name = _job("epoch")
    yield name
    for node in range(3):
        shm.remove_namespace(name, node, lock_too=True)


def test_version_ids_order_by_epoch_then_step():
    assert version_id(0, 10**6) < version_id(1, 0) < version_id(1, 1) < version_id(2, 0)
    v = version_id(3, 1234)
    assert (epoch_of(v), step_of(v)) == (3, 1234) and version_text(v) == "step 1234 (epoch 3)"
    assert version_text(version_id(0, 8)) == "step 8"
    with pytest.raises(ValueError):
        version_id(-1, 0)
    with pytest.raises(ValueError):
        version_id(0, 1 << 40)


def test_a_half_committed_version_of_a_crashed_run_is_never_completed_by_the_replay(job):
    """Defect: versions keyed by step let a replayed run finish a version the crashed run had begun."""
    store = _store(job)  # one node, two ranks, no parity
    old = version_id(1, 8)
    _write_commit(store, version_id(1, 6), 0, _blob(100, 1))
    _write_commit(store, version_id(1, 6), 1, _blob(100, 2))
    store.publish(version_id(1, 6))
    _write_commit(store, old, 0, _blob(100, 3))  # rank 0 committed step 8, then the job crashed
    # The restore picked step 6 and began epoch 2: the half-written step 8 of epoch 1 is gone.
    assert store.reset(version_id(2, 0), keep=version_id(1, 6)) == [old]
    assert [(v.version, v.published) for v in store.versions()] == [(version_id(1, 6), True)]
    # The replayed step 8 is another version; a stale writer of epoch 1 is refused.
    with pytest.raises(SnapshotVersionError, match="restore generation 1.*reset to generation 2"):
        store.alloc(old, 1, 100)
    new = version_id(2, 8)
    _write_commit(store, new, 0, _blob(100, 4))
    assert _write_commit(store, new, 1, _blob(100, 5))  # complete with both ranks of the new generation only
    assert store.publish(new) == [version_id(1, 6)]


def test_after_a_fallback_to_an_older_point_new_versions_are_accepted(job):
    """Defect: after a restore from disk (or an older version), daemons refused every step up to the old published one."""
    store = _store(job)
    for rank in range(2):
        _write_commit(store, version_id(1, 20), rank, _blob(64, rank))
    store.publish(version_id(1, 20))
    store.reset(version_id(2, 0), keep=None)  # restored from disk at step 10
    assert store.versions() == [] and store.published is None and store.floor == version_id(2, 0)
    for rank in range(2):
        _write_commit(store, version_id(2, 12), rank, _blob(64, 10 + rank))  # step 12 < 20, a newer generation
    assert store.publish(version_id(2, 12)) == []
    with pytest.raises(SnapshotVersionError, match="generations only move forward"):
        store.reset(version_id(1, 0))
    with pytest.raises(SnapshotRequestError, match="must be older"):
        store.reset(version_id(3, 0), keep=version_id(3, 5))


def test_reset_keeps_the_restored_version_published_only_when_it_is_complete_here(job):
    store = _store(job)
    v = version_id(1, 4)
    _write_commit(store, v, 0, _blob(64, 0))  # rank 1's shard of v is not here: incomplete on this node
    store.reset(version_id(2, 0), keep=v)
    (info,) = store.versions()
    assert info.version == v and not info.published and store.published is None


def test_a_restarted_daemon_keeps_its_epoch_and_drops_stale_generations(job):
    store = _store(job)
    for rank in range(2):
        _write_commit(store, version_id(1, 2), rank, _blob(64, rank))
    store.publish(version_id(1, 2))
    _write_commit(store, version_id(1, 4), 0, _blob(64, 7))
    store.reset(version_id(2, 0), keep=version_id(1, 2))
    _write_commit(store, version_id(2, 4), 0, _blob(64, 8))
    store.close()
    again = _store(job)
    assert again.adopt() == [version_id(1, 2), version_id(2, 4)]
    assert again.floor == version_id(2, 0) and again.published == version_id(1, 2)
    with pytest.raises(SnapshotVersionError, match="restore generation 1"):
        again.alloc(version_id(1, 6), 0, 10)


def test_unpublished_versions_that_never_complete_do_not_pile_up(job):
    """A version some rank never committed must not hold memory forever: at most MAX_IN_FLIGHT unpublished ones."""
    store = _store(job, max_memory=10_000)
    for step in range(1, 8):
        _write_commit(store, version_id(1, step), 0, _blob(1000, step))  # rank 1 never commits: none completes
    held = [v.version for v in store.versions()]
    assert held == [version_id(1, s) for s in range(8 - MAX_IN_FLIGHT, 8)]
    assert store.memory_used == MAX_IN_FLIGHT * 1000


def test_a_full_shared_memory_filesystem_is_a_clear_refusal(job, tmp_path):
    """posix_fallocate's ENOSPC becomes SnapshotMemoryError naming the sizes, not a SIGBUS later."""
    import subprocess

    from plait.runtime.snapshot.errors import SnapshotMemoryError

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    assert mounted.returncode == 0, f"the tests run as root (CI does): {mounted.stderr!r}"
    try:
        store = _store(job, root=mnt, max_memory=64 << 20)
        with pytest.raises(SnapshotMemoryError, match="has no room for segment"):
            store.alloc(version_id(1, 1), 0, 4 << 20)
        assert store.memory_used == 0 and store.versions() == []
        shard = store.alloc(version_id(1, 2), 0, 1000)  # a smaller one still fits: the failure left nothing behind
        shard.tensor.copy_(_blob(1000, 1))
        store.commit(version_id(1, 2), 0, size=1000, checksum=checksum(_blob(1000, 1)), step=2)
        store.close()
        del shard, store
    finally:
        subprocess.run(["umount", "-l", str(mnt)])  # lazy: a mapping still held goes with its owner
