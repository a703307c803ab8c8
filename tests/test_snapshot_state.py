"""Snapshot blobs, the snapshot config, fault specs and the disk tier: pure functions, one process."""

from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from plait.errors import CLIError, ConfigError
from plait.runtime.faults import KINDS, Fault, check_faults, lost_at_once, parse_fault, random_faults
from plait.runtime.snapshot.config import SnapshotConfig, parse_size
from plait.runtime.snapshot.layout import GroupLayout, chunk_len, chunk_range
from plait.runtime.snapshot.trainer.blob import BlobError, plan, read_blob
from plait.runtime.snapshot.trainer.hook import ALLOC_WAIT_MAX_S, SnapshotHook


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "param.w": torch.randn(5, 7, generator=g),
        "param.b": torch.randn(3, generator=g, dtype=torch.float64),
        "optim.0.step": torch.tensor(4.0),
        "optim.0.ids": torch.arange(11, dtype=torch.int32),
        "half": torch.randn(9, generator=g).to(torch.bfloat16),
        "empty": torch.empty(0, 4),
    }


def test_a_blob_round_trips_tensors_bitwise_and_objects(job_secret):
    tensors = _tensors()
    objects = {"step": 7, "rng": {"python": (3, (1, 2), None)}, "bytes": b"\x00\xff"}
    p = plan(tensors, objects)
    blob = torch.full((p.size,), 0xAB, dtype=torch.uint8)
    p.write(blob, job_secret)
    got, got_objects = read_blob(blob, job_secret)
    assert got_objects == objects
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    # tensors are views of the blob, 64-byte aligned: no copies on read
    for name, offset, nbytes in p.entries:
        assert offset % 64 == 0
        if nbytes:
            assert got[name].data_ptr() == blob.data_ptr() + offset


def test_the_header_is_fixed_when_planned_and_tensors_are_copied_later(job_secret):
    tensors = {"w": torch.zeros(4)}
    p = plan(tensors, {"step": 1})
    tensors["w"].add_(3)  # training goes on between plan and copy: the copy sees the values at copy time
    blob = torch.empty(p.size, dtype=torch.uint8)
    p.write(blob, job_secret)
    got, objects = read_blob(blob, job_secret)
    assert objects == {"step": 1} and torch.equal(got["w"], torch.full((4,), 3.0))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:8].fill_(0), "bad magic"),
    (lambda b: b[8:16].fill_(0xFF), "MAC does not match"),
    (lambda b: b[-1:].bitwise_xor_(1), "MAC does not match"),  # a tensor byte: caught before anything is parsed
])
def test_a_damaged_blob_is_refused(job_secret, mutate, message):
    p = plan({"w": torch.ones(3)}, {})
    blob = torch.empty(p.size, dtype=torch.uint8)
    p.write(blob, job_secret)
    mutate(blob)
    with pytest.raises(BlobError, match=message):
        read_blob(blob, job_secret)
    with pytest.raises(BlobError, match="shorter than its prefix"):
        read_blob(torch.zeros(4, dtype=torch.uint8), job_secret)


def test_a_blob_sealed_with_another_secret_is_refused_before_its_header_is_parsed(job_secret, tmp_path):
    """A stranger's bytes (planted in shared memory, or decoded from a pushed parity chunk) are never parsed."""
    from plait.runtime.snapshot.auth import JobSecret
    from plait.runtime.snapshot.trainer import blob as blob_format

    other = JobSecret.create(tmp_path / "other")
    p = plan({"w": torch.ones(3)}, {"step": 1})
    blob = torch.empty(p.size, dtype=torch.uint8)
    p.write(blob, other)
    with pytest.raises(BlobError, match="MAC does not match"):
        read_blob(blob, job_secret)
    # A header that would be refused if parsed is refused for its MAC first, and a correctly
    # sealed one with a crafted entry is refused by the bounds check, not trusted.
    evil = blob_format.BlobPlan(size=p.size, header=b'{"tensors":[["w","float32",[1000],0,4000]],"objects":{}}',
                                entries=[], tensors={})
    evil.write_header(blob)
    blob_format.seal(blob, job_secret)
    with pytest.raises(BlobError, match="runs past the end"):
        read_blob(blob, job_secret)


def test_copy_into_a_wrong_size_is_refused():
    p = plan({"w": torch.ones(3)}, {})
    with pytest.raises(BlobError, match="the blob needs"):
        p.copy_tensors(torch.empty(p.size + 1, dtype=torch.uint8))


def test_chunks_cover_the_blob_and_the_layout_places_every_stripe_on_distinct_nodes():
    for size in (0, 1, 63, 64, 65, 1000, 4097):
        for k in (1, 2, 3, 5):
            ranges = [chunk_range(size, k, c) for c in range(k)]
            assert ranges[0][0] == 0 and ranges[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(hi - lo <= chunk_len(size, k) for lo, hi in ranges) and chunk_len(size, k) % 64 == 0
    for k, m in ((2, 1), (4, 2), (3, 3), (1, 1)):
        L = GroupLayout(k, m)
        held = {q: 0 for q in range(L.n)}
        for s in range(L.n):
            members = [L.data_position(s, p) for p in range(k)] + [L.parity_position(s, j) for j in range(m)]
            assert sorted(members) == list(range(L.n))  # a stripe touches every node once
            for j in range(m):
                held[L.parity_position(s, j)] += 1
                assert (s, j) in L.parity_stripes(L.parity_position(s, j))
        assert set(held.values()) == {m}  # every node holds m parity chunks: m/k of its blob
        for q in range(L.n):
            assert sorted(L.stripe_of_chunk(q, c) for c in range(k)) == sorted({L.stripe_of_chunk(q, c) for c in range(k)})
            assert all(L.data_position(L.stripe_of_chunk(q, c), c) == q for c in range(k))


def test_snapshot_config_errors_name_the_key_and_a_fix():
    with pytest.raises(ConfigError, match="snapshot.ec_k.*split into whole groups.*ec_k=1 snapshot.ec_m=1"):
        SnapshotConfig(every=2, ec_k=2, ec_m=1).check_nodes(2)
    with pytest.raises(ConfigError, match="snapshot.ec_m=0"):
        SnapshotConfig(every=2, ec_k=2, ec_m=1).check_nodes(1)
    SnapshotConfig(every=2, ec_k=2, ec_m=1).check_nodes(6)
    # the defaults fit any number of nodes: no parity on one node, one parity node per group otherwise
    for nnodes, code in ((1, (1, 0)), (2, (1, 1)), (3, (2, 1)), (4, (3, 1)), (8, (7, 1)), (40, (19, 1))):
        SnapshotConfig(every=2).check_nodes(nnodes)
        assert SnapshotConfig(every=2).code(nnodes) == code, nnodes
    assert SnapshotConfig(every=2, ec_m=2).code(8) == (6, 2) and SnapshotConfig(every=2, ec_k=2).code(6) == (2, 1)
    SnapshotConfig(every=0, ec_k=2, ec_m=1).check_nodes(1)  # snapshots off: no group needed
    for kwargs, key in (({"ec_k": 0}, "snapshot.ec_k"), ({"ec_m": 9}, "snapshot.ec_m"), ({"every": -1}, "snapshot.every"),
                        ({"max_memory": "4 parsecs"}, "snapshot.max_memory")):
        with pytest.raises(ConfigError, match=key):
            SnapshotConfig(**kwargs).validate()
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size(1000) == 1000
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1.5k") == 1536


def test_faults_parse_and_refuse_what_cannot_happen():
    assert parse_fault("kill-worker:rank=1:step=5") == Fault("kill-worker", 1, 5)
    assert parse_fault("kill-node:node=2:step=7") == Fault("kill-node", 2, 7)
    assert str(parse_fault("corrupt-shard:step=3:node=0")) == "corrupt-shard:node=0:step=3"
    assert parse_fault("kill-worker:rank=2:restore=1") == Fault("kill-worker", 2, restore=1)
    assert parse_fault("hang-daemon:node=1:step=4:seconds=1.5") == Fault("hang-daemon", 1, 4, seconds=1.5)
    for text in ("corrupt-parity:node=1:step=6", "hang-daemon:node=0:step=3", "kill-daemon:node=2:restore=2",
                 "hang-daemon:node=0:step=3:seconds=0.5"):
        assert str(parse_fault(text)) == text
    for bad, message in (("explode:node=1:step=2", "unknown kind"), ("kill-node:rank=1:step=2", "expected kill-node:node=N"),
                         ("kill-worker:rank=x:step=2", "must be an integer"), ("kill-daemon:node=1", "missing step"),
                         ("kill-worker:rank=1:step=0", "step must be >= 1"),
                         ("corrupt-shard:node=1:restore=1", "expected corrupt-shard:node=N:step=S, got the part 'restore=1'"),
                         ("kill-node:node=1:step=2:restore=1", "step or restore, not both"),
                         ("kill-node:node=1:restore=0", "restore must be >= 1"),
                         ("kill-node:node=1:step=2:seconds=3", "got the part 'seconds=3'"),
                         ("hang-daemon:node=1:step=2:seconds=-1", "seconds must be > 0"),
                         ("hang-daemon:node=1:step=2:seconds=x", "must be a number of seconds"),
                         ("kill-node:node=1:node=2:step=2", "node is given twice")):
        with pytest.raises(CLIError, match=re.escape(message)):
            parse_fault(bad)
    with pytest.raises(CLIError, match="node 3 does not exist"):
        check_faults([Fault("kill-node", 3, 2)], world=3, nnodes=3, steps=10, snapshots=True)
    with pytest.raises(CLIError, match="not before the last step"):
        check_faults([Fault("kill-worker", 0, 10)], world=3, nnodes=3, steps=10, snapshots=True)
    with pytest.raises(CLIError, match="needs snapshots"):
        check_faults([Fault("kill-daemon", 0, 2)], world=3, nnodes=3, steps=10, snapshots=False)
    with pytest.raises(CLIError, match="set snapshot.ec_m >= 1"):
        check_faults([Fault("corrupt-parity", 0, 2)], world=3, nnodes=3, steps=10, snapshots=True, parity=0)
    with pytest.raises(CLIError, match="restore 1 never happens: only 0"):
        check_faults([Fault("kill-daemon", 0, 2), Fault("kill-worker", 1, restore=1)], world=3, nnodes=3, steps=10,
                     snapshots=True)
    with pytest.raises(CLIError, match="given twice"):
        check_faults([Fault("kill-worker", 1, 2), Fault("kill-worker", 1, 2)], world=3, nnodes=3, steps=10, snapshots=True)
    check_faults([Fault("kill-node", 0, 2), Fault("kill-worker", 1, restore=1), Fault("corrupt-parity", 2, 4)],
                 world=3, nnodes=3, steps=10, snapshots=True, parity=1)


def test_slow_rank_faults_parse_and_are_checked():
    assert parse_fault("slow-rank:rank=1:factor=3") == Fault("slow-rank", 1, factor=3.0)
    assert str(parse_fault("slow-rank:rank=0:factor=2.5:step=4")) == "slow-rank:rank=0:step=4:factor=2.5"
    for bad, message in (("slow-rank:rank=1", "missing factor"), ("slow-rank:node=1:factor=2", "got the part 'node=1'"),
                         ("slow-rank:rank=1:factor=1", "factor must be > 1 (the rank's compute time"),
                         ("slow-rank:rank=1:factor=2:seconds=3", "got the part 'seconds=3'")):
        with pytest.raises(CLIError, match=re.escape(message)):
            parse_fault(bad)
    check_faults([Fault("slow-rank", 2, factor=2.0)], world=3, nnodes=1, steps=10, snapshots=False)  # no snapshots needed
    with pytest.raises(CLIError, match="rank 3 does not exist"):
        check_faults([Fault("slow-rank", 3, factor=2.0)], world=3, nnodes=1, steps=10, snapshots=False)
    with pytest.raises(CLIError, match="given slow-rank twice"):
        check_faults([Fault("slow-rank", 1, factor=2.0), Fault("slow-rank", 1, 3, factor=3.0)], world=3, nnodes=1,
                     steps=10, snapshots=False)
    with pytest.raises(CLIError, match="slow-link"):
        check_faults([Fault("slow-rank", 1, factor=2.0)], world=3, nnodes=1, steps=10, snapshots=False, rehearsal=True)


def test_random_faults_cover_every_kind_and_shape_and_are_seeded():
    trials = [random_faults(seed, world=3, nnodes=3, steps=12, every=2) for seed in range(300)]
    assert trials[:20] == [random_faults(seed, world=3, nnodes=3, steps=12, every=2) for seed in range(20)]
    kinds = {f.kind for t in trials for f in t}
    assert kinds == set(KINDS)
    assert any(len(t) == 2 and t[0].step == t[1].step for t in trials)  # two at once
    assert any(len(t) == 2 and None not in (t[0].step, t[1].step) and t[0].step != t[1].step for t in trials)
    assert any(t[-1].restore == 1 for t in trials)  # a fault during restore
    assert any(lost_at_once(t, group=3, parity=1) for t in trials)
    for t in trials:
        check_faults(t, world=3, nnodes=3, steps=12, snapshots=True, parity=1)
        for f in t:
            if f.kind == "corrupt-parity" or len(t) == 2 and (f.restore or t[0].step == t[1].step):
                assert f.restore or f.step >= 7, t  # a disk checkpoint of step 4 may be needed, and is complete


def _two_rank_writers(base, run_id: str, secret, keep: int = 2):
    """Two ranks that each hold half the rows of a global [5, 7] weight "w" (rows 0-2 and 3-4) and a whole "b"."""
    from plait.parallel.slices import Slice
    from plait.runtime.snapshot.checkpoint.paths import RunInfo
    from plait.runtime.snapshot.checkpoint.write import CheckpointWriter

    run = RunInfo(run_id, 1.0)
    writers = []
    for rank, (rows, lo) in enumerate(((3, 0), (2, 3))):
        slices = [Slice("param.w", 0, "w", (5, 7), (lo, 0), (rows, 7), True),
                  Slice("param.b", 0, "b", (3,), (0,), (3,), rank == 0)]  # replicated: rank 0 writes it
        writers.append(CheckpointWriter(base, run=run, rank=rank, world=2, slices=slices, layout=[1, 1, 1, 2, 1, 1, 1],
                                        params={"w": [5, 7], "b": [3]}, secret=secret, keep=keep))
    return writers


def test_the_disk_tier_is_complete_only_with_every_rank_and_prunes_only_its_own_run(tmp_path, job_secret):
    import torch.distributed.checkpoint as dcp

    from plait.runtime.snapshot.checkpoint.paths import complete_checkpoints

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 7, generator=g), torch.randn(3, generator=g)

    def blob(rank: int) -> torch.Tensor:
        part = w[:3] if rank == 0 else w[3:]
        p = plan({"param.w": part.clone(), "param.b": b}, {"step": 4, "rank": rank})
        out = torch.empty(p.size, dtype=torch.uint8)
        p.write(out, job_secret)
        return out

    mine, other = _two_rank_writers(tmp_path, "run-1", job_secret), _two_rank_writers(tmp_path, "run-2", job_secret)
    mine[0].save(4, blob(0))
    assert complete_checkpoints(tmp_path, "run-1") == []  # rank 1 has not written step 4 yet
    mine[1].save(4, blob(1))
    (done,) = complete_checkpoints(tmp_path, "run-1")
    assert done.step == 4 and done.run_id == "run-1"
    state = {"w": torch.zeros(5, 7), "b": torch.zeros(3)}
    dcp.load(state, checkpoint_id=str(done.path), no_dist=True)  # the global tensors, from both ranks' chunks
    assert torch.equal(state["w"], w) and torch.equal(state["b"], b)
    # another run in the same directory: its steps are its own; pruning (keep 2) never touches run-1's
    for step in (8, 12, 16):
        for writer in other:
            writer.save_async(step, blob(writer.rank))
        for writer in other:
            writer.wait()
    assert [c.step for c in complete_checkpoints(tmp_path, "run-2")] == [12, 16]
    assert [c.step for c in complete_checkpoints(tmp_path, "run-1")] == [4]


class _HungDaemon:
    """A client whose daemon never answers an allocation (SIGSTOPped) until ``wake`` is set."""

    timeout = 30.0

    def __init__(self):
        self.wake = threading.Event()

    def alloc(self, version, local_rank, size):
        self.wake.wait(30)
        raise TimeoutError("deadline exceeded")


def test_a_daemon_that_hangs_between_snapshots_costs_one_bounded_wait(job_secret):
    """Defect: the update after a cancelled copy waited for that copy's allocation RPC, up to its 30 s timeout."""
    client = _HungDaemon()
    hook = SnapshotHook(SnapshotConfig(every=2), client=client, lifecycle=None, rank=0, local_rank=0, secret=job_secret)
    trainer = SimpleNamespace(engine=SimpleNamespace(local_tensors=_tensors), snapshot_objects=lambda: {"step": 2},
                              config=SimpleNamespace(steps=10))
    try:
        hook.on_step_end(trainer, 2)
        for _ in range(3):  # the next updates
            start = time.monotonic()
            hook._before_update()
            assert time.monotonic() - start < ALLOC_WAIT_MAX_S + 0.5
        assert hook.stats.skipped == 1
    finally:
        client.wake.set()
