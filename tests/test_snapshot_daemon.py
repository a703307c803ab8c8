"""The snapshot daemon: the store's rules in-process, then real daemons on loopback ports.

Daemon tests start ``python -m plait.runtime.snapshot.daemon`` subprocesses (no mocks)
and talk to them through DaemonClient, acting as the workers. The parity check builds
its reference independently of the daemon: chunk boundaries from the layout's rule,
products with the slow pure-PyTorch gf256_mul_add_reference.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch

from plait.ops import gf256_mul_add_reference
from plait.ops.checksum import checksum
from plait.ops.rs_matrix import parity_matrix
from plait.errors import CLIError
from plait.runtime.snapshot import shm
from plait.runtime.snapshot.transport import wire
from plait.runtime.snapshot.transport import snapshot_pb2 as pb
from plait.runtime.snapshot.transport import snapshot_pb2_grpc as pb_grpc
from plait.runtime.snapshot.transport.channel import tune_malloc
from plait.runtime.snapshot.transport.client import DaemonClient
from plait.runtime.snapshot.daemon.config import DaemonConfig, add_daemon_parser, config_from_args, parse_bytes
from plait.runtime.snapshot.daemon.main import serve
from plait.runtime.snapshot.errors import (
    DaemonStartError,
    DaemonUnavailable,
    SnapshotChecksumError,
    SnapshotMemoryError,
    SnapshotNotFound,
    SnapshotRangeError,
    SnapshotRequestError,
    SnapshotVersionError,
)
from plait.runtime.snapshot.launcher.spawn import free_ports, start_daemon, stop_daemon, wait_daemon
from plait.runtime.snapshot.daemon.store import SnapshotStore
from plait.runtime.snapshot.records import ChunkHeader

MiB = 1 << 20


def _job(tag: str) -> str:
    return f"t{os.getpid()}-{tag}-{uuid.uuid4().hex[:6]}"


def _blob(size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _chunk(blob: torch.Tensor, k: int, c: int) -> torch.Tensor:
    """Chunk c of a blob cut in k, written out from the layout's rule (not its code)."""
    size = blob.numel()
    per = (size + k - 1) // k
    clen = (per + 63) // 64 * 64
    start = min(size, c * clen)
    return blob[start:min(size, start + clen)]


def _reference_parity(blobs: dict[int, torch.Tensor], k: int, m: int, stripe: int, j: int) -> torch.Tensor:
    """Parity j of ``stripe``: XOR over members c (position (stripe + c) mod n) of P[j][c] * chunk c."""
    n = k + m
    coef = parity_matrix(k, m)
    chunks = [_chunk(blobs[(stripe + c) % n], k, c) for c in range(k)]
    out = torch.zeros(max(ch.numel() for ch in chunks), dtype=torch.uint8)
    for c, ch in enumerate(chunks):
        gf256_mul_add_reference(out[: ch.numel()], ch, int(coef[j, c]))
    return out


# =========================================================================== generated code


def test_regenerating_the_proto_modules_is_byte_identical(tmp_path):
    pytest.importorskip("grpc_tools")
    from plait.runtime.snapshot.transport import gen_proto

    for path in gen_proto.generate(tmp_path):
        checked_in = Path(gen_proto.__file__).parent / path.name
        assert path.read_bytes() == checked_in.read_bytes(), f"{path.name} is stale: run python -m {gen_proto.__name__}"
    assert "from plait.runtime.snapshot.transport import snapshot_pb2" in (tmp_path / "snapshot_pb2_grpc.py").read_text()


def test_hand_encoded_messages_are_the_protos_wire_format():
    data = bytes(range(256)) * 3
    reply = pb.GetReply.FromString(wire.encode_get_reply(data, checksum=2**64 - 1, size=9000, offset=7, length=768))
    assert (reply.data, reply.checksum, reply.size, reply.offset, reply.length) == (data, 2**64 - 1, 9000, 7, 768)
    raw = wire.decode_get_reply(pb.GetReply(data=data, checksum=5, length=768).SerializeToString())
    assert (bytes(raw.data), raw.checksum, raw.size, raw.offset, raw.length) == (data, 5, 0, 0, 768)
    assert bytes(wire.decode_get_reply(b"").data) == b""
    assert pb.PushChunkRequest.FromString(wire.encode_data(torch.arange(10, dtype=torch.uint8).numpy())).data == bytes(range(10))
    decode = wire.frame_decoder(pb.PushChunkRequest)
    frame = decode(pb.PushChunkRequest(data=data).SerializeToString())
    assert frame.header is None and bytes(frame.data) == data
    frame = decode(pb.PushChunkRequest(header=pb.ChunkHeader(version=3, chunk_len=10)).SerializeToString())
    assert frame.data is None and (frame.header.version, frame.header.chunk_len) == (3, 10)
    assert bytes(decode(b"").data) == b""  # an empty data message serialises to nothing


# =========================================================================== shm


def test_shm_names_validation_and_namespace(tmp_path):
    for bad in ("a.b", "a/b", "", "x y", "../etc"):
        with pytest.raises(SnapshotRequestError, match="job name"):
            shm.validate_job(bad)
    job = _job("shm")
    name = shm.parity_name(job, 3, 17, 1, 2, 0)
    assert name == f"plait.{job}.n3.v17.parity.r1.s2.j0"
    parsed = shm.parse_name(name + ".meta")
    assert (parsed.job, parsed.node, parsed.version, parsed.kind, parsed.local_rank, parsed.stripe, parsed.index,
            parsed.sidecar) == (job, 3, 17, "parity", 1, 2, 0, True)
    assert shm.parse_name(shm.data_name(job, 3, 5, 0)).kind == "data"
    path, view = shm.create_segment(shm.data_name(job, 3, 5, 0), 1000, root=tmp_path)
    view.fill_(7)
    assert path.read_bytes() == b"\x07" * 1000  # the mapping is the file
    with pytest.raises(SnapshotVersionError, match="already exists"):
        shm.create_segment(shm.data_name(job, 3, 5, 0), 10, root=tmp_path)
    shm.create_segment(shm.data_name(job, 31, 5, 0), 10, root=tmp_path)  # n31 is another namespace than n3
    assert [p.name for p in shm.list_namespace(job, 3, root=tmp_path)] == [path.name]
    assert shm.remove_namespace(job, 3, root=tmp_path) == 1
    assert shm.list_namespace(job, 3, root=tmp_path) == [] and len(shm.list_namespace(job, 31, root=tmp_path)) == 1


# =========================================================================== the store, in-process


def _store(job: str, node: int = 0, **kw) -> SnapshotStore:
    args = dict(nnodes=1, nproc_per_node=2, ec_k=1, ec_m=0, max_memory=64 * MiB)
    args.update(kw)
    return SnapshotStore(job, node, **args)


@pytest.fixture
def store_job():
    job = _job("store")
    yield job
    for node in range(4):
        shm.remove_namespace(job, node)


def _write_commit(store: SnapshotStore, version: int, rank: int, blob: torch.Tensor, step: int | None = None) -> bool:
    shard = store.alloc(version, rank, blob.numel())
    shard.tensor.copy_(blob)
    return store.commit(version, rank, size=blob.numel(), checksum=checksum(blob), step=version if step is None else step)


def test_store_commit_verifies_size_and_checksum(store_job):
    store = _store(store_job)
    blob = _blob(1000, 0)
    shard = store.alloc(1, 0, 1000)
    shard.tensor.copy_(blob)
    with pytest.raises(SnapshotRequestError, match="allocated with 1000 bytes"):
        store.commit(1, 0, size=999, checksum=checksum(blob), step=1)
    with pytest.raises(SnapshotChecksumError, match="checksum mismatch") as err:
        store.commit(1, 0, size=1000, checksum=checksum(blob) ^ 1, step=1)
    assert str(shard.path) in str(err.value)
    assert not store.versions(1)[0].data[0].committed
    assert not shm.sidecar_path(shard.path).exists()
    assert store.commit(1, 0, size=1000, checksum=checksum(blob), step=1, meta=b"m") is False  # rank 1 missing
    assert store.commit(1, 0, size=1000, checksum=checksum(blob), step=1, meta=b"m") is False  # a retry is a no-op
    with pytest.raises(SnapshotVersionError, match="already committed"):
        store.commit(1, 0, size=1000, checksum=checksum(blob), step=2)
    with pytest.raises(SnapshotVersionError, match="immutable"):
        store.alloc(1, 0, 10)
    with pytest.raises(SnapshotRequestError, match="local_rank: got 2"):
        store.alloc(1, 2, 10)
    with pytest.raises(SnapshotNotFound):
        store.commit(1, 1, size=0, checksum=0, step=1)
    assert _write_commit(store, 1, 1, torch.empty(0, dtype=torch.uint8)) is True  # an empty blob is fine
    info = store.versions(1)[0]
    assert info.complete and info.step == 1 and info.data[0].meta == b"m"


def test_store_uncommitted_shard_is_replaced_by_a_new_alloc(store_job):
    store = _store(store_job)
    first = store.alloc(1, 0, 100)
    second = store.alloc(1, 0, 300)
    assert not first.path.exists() or first.path == second.path
    assert store.memory_used == 300


def test_store_memory_cap(store_job):
    store = _store(store_job, max_memory=10_000)
    _write_commit(store, 1, 0, _blob(6000, 1))
    with pytest.raises(SnapshotMemoryError) as err:
        store.alloc(1, 1, 5000)
    text = str(err.value)
    assert "needs 5000 bytes" in text and "6000 bytes are in use" in text and "cap is 10000 bytes" in text
    assert "snapshot.max_memory" in text and "11000" in text
    assert store.memory_used == 6000
    store.drop(1)
    assert store.memory_used == 0
    store.alloc(2, 1, 10_000)


def test_store_versions_publish_and_order(store_job):
    store = _store(store_job)
    for v in (10, 20):
        for r in range(2):
            _write_commit(store, v, r, _blob(100 + r, v))
    with pytest.raises(SnapshotNotFound):
        store.publish(25)
    assert store.publish(10) == []
    assert store.publish(10) == []  # idempotent
    _write_commit(store, 30, 0, _blob(50, 30))  # 20 and 30 in flight: MAX_IN_FLIGHT, nothing dropped
    with pytest.raises(SnapshotVersionError, match="not locally complete.*data r1"):
        store.publish(30)
    assert [v.version for v in store.versions()] == [10, 20, 30]  # the published one stays until a newer one
    assert store.publish(20) == [10]
    assert [(v.version, v.published, v.complete) for v in store.versions()] == [(20, True, True), (30, False, False)]
    with pytest.raises(SnapshotVersionError, match="already published"):
        store.publish(10)
    for v in (5, 20):
        with pytest.raises(SnapshotVersionError, match="step 20 is already published"):
            store.alloc(v, 1, 10)
    assert store.memory_used == 100 + 101 + 50
    assert store.drop(30) and not store.drop(30)
    assert store.memory_used == 201


def test_store_parity_accumulates_verifies_and_ignores_duplicates(store_job):
    """Node 2 of a k=2, m=1 group holds parity j=0 of stripe 0, whose members come from nodes 0 and 1."""
    k, m = 2, 1
    store = _store(store_job, node=2, nnodes=3, nproc_per_node=1, ec_k=k, ec_m=m, max_memory=10_000)
    blobs = {0: _blob(130, 1), 1: _blob(1000, 2), 2: _blob(0, 3)}  # member chunks: 128 bytes, then 488

    def header(c: int, node: int, **kw) -> ChunkHeader:
        ch = _chunk(blobs[node], k, c)
        base = dict(version=7, local_rank=0, stripe=0, index=0, member=c, node=node, blob_size=blobs[node].numel(),
                    blob_checksum=checksum(blobs[node]), chunk_len=ch.numel(), chunk_checksum=checksum(ch), step=7)
        base.update(kw)
        return ChunkHeader(**base)

    with pytest.raises(SnapshotRequestError, match="owned by node 1"):
        store.begin_chunk(header(1, 0))
    with pytest.raises(SnapshotRequestError, match="does not hold parity j=0 of stripe 1"):
        store.begin_chunk(header(0, 0, stripe=1))
    with pytest.raises(SnapshotRequestError, match="chunk_len: got 5"):
        store.begin_chunk(header(0, 0, chunk_len=5))
    with pytest.raises(SnapshotRequestError, match="parity index j: got 1"):
        store.begin_chunk(header(0, 0, index=1))

    h0 = header(0, 0)
    shard = store.begin_chunk(h0)
    assert shard.size == 128
    bad = _chunk(blobs[0], k, 0).clone()
    bad[3] ^= 1
    with pytest.raises(SnapshotChecksumError, match="chunk checksum mismatch"):
        store.add_chunk(h0, shard, bad)
    assert store.add_chunk(h0, shard, _chunk(blobs[0], k, 0).clone())
    assert store.begin_chunk(h0) is None  # duplicate: nothing to do
    assert not store.add_chunk(h0, shard, _chunk(blobs[0], k, 0).clone())
    assert not shard.complete and store.versions(7)[0].parity[0].checksum is None

    h1 = header(1, 1)
    assert store.begin_chunk(h1) is shard and shard.size == 488  # grown: the shorter chunk is zero-padded
    assert store.add_chunk(h1, shard, _chunk(blobs[1], k, 1).clone())
    assert shard.complete
    expected = _reference_parity(blobs, k, m, stripe=0, j=0)
    assert torch.equal(shard.tensor, expected)
    assert shard.checksum == checksum(expected)
    members = store.versions(7)[0].parity[0].members
    assert [(mb.position, mb.node, mb.size, mb.chunk_len, mb.step) for mb in members] == [(0, 0, 130, 128, 7),
                                                                                        (1, 1, 1000, 488, 7)]
    assert store.memory_used == 488
    assert not store.is_complete(7)  # its own data shard is missing
    _write_commit(store, 7, 0, blobs[2])
    assert store.is_complete(7)

    big = header(0, 0, version=8, blob_size=30_000, chunk_len=15_040)  # only the header's sizes matter here
    with pytest.raises(SnapshotMemoryError, match="needs 15040 bytes"):
        store.begin_chunk(big)
    store.publish(7)
    with pytest.raises(SnapshotVersionError, match="already published"):
        store.begin_chunk(header(0, 0, version=6))


def test_store_adopts_committed_and_complete_shards_only(store_job, caplog):
    k, m = 1, 1
    kw = dict(node=1, nnodes=2, nproc_per_node=2, ec_k=k, ec_m=m)
    store = _store(store_job, **kw)  # node 1 holds parity j=0 of stripe 0 (member: node 0's whole blob)
    blob0 = _blob(777, 5)
    for rank in range(2):
        h = ChunkHeader(3, rank, 0, 0, 0, 0, 777, checksum(blob0), 777, checksum(blob0), 3)
        store.add_chunk(h, store.begin_chunk(h), blob0.clone())
    _write_commit(store, 3, 0, _blob(100, 1))
    _write_commit(store, 3, 1, _blob(200, 2))
    _write_commit(store, 4, 0, _blob(300, 3))
    store.alloc(4, 1, 50)  # never committed
    h4 = ChunkHeader(4, 1, 0, 0, 0, 0, 777, 0, 777, checksum(blob0), 4)
    store.add_chunk(h4, store.begin_chunk(h4), blob0.clone())  # complete, but corrupted below
    store.publish(3)
    versions_before = store.versions()
    [parity4] = [p for p in versions_before[1].parity if p.local_rank == 1]
    Path(parity4.path).write_bytes(b"\x00" * 777)
    stale = shm.segment_root() / (shm.data_name(store_job, 1, 4, 0) + ".meta.tmp")
    stale.write_text("{")
    store.close()

    with caplog.at_level("INFO", logger="plait.runtime.snapshot"):
        again = _store(store_job, **kw)
        assert again.adopt() == [3, 4]
    after = {v.version: v for v in again.versions()}
    assert after[3] == versions_before[0] and after[3].published and after[3].complete
    assert [d.local_rank for d in after[4].data] == [0] and after[4].parity == []
    assert again.memory_used == 100 + 200 + 2 * 777 + 300
    assert not stale.exists()
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("adopt")]
    assert any(line.startswith("step 3: adopted 4 shard(s) (published)") for line in lines), lines
    assert any("step 4" in line and "data r1 (not committed)" in line and "checksum" in line for line in lines)
    with pytest.raises(SnapshotVersionError):
        again.alloc(3, 0, 1)  # the published version survived the restart


# =========================================================================== CLI validation


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_daemon_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["daemon", "--job", "j", *argv])


@pytest.mark.parametrize("argv, match", [
    (["--node", "0", "--nnodes", "3", "--nproc-per-node", "1", "--ec-k", "33"], "--ec-k: got 33"),
    (["--node", "0", "--nnodes", "3", "--nproc-per-node", "1", "--ec-m", "9"], "--ec-m: got 9"),
    (["--node", "0", "--nnodes", "4", "--nproc-per-node", "1", "--ec-k", "2", "--ec-m", "1"],
     "--ec-k: got 2; an erasure-coding group is --ec-k \\+ --ec-m = 3 nodes.*4 node.*try --ec-k=3 --ec-m=1"),
    (["--node", "3", "--nnodes", "3", "--nproc-per-node", "1"], "--node: got 3; accepted: 0 to 2"),
    (["--node", "0", "--nnodes", "3", "--nproc-per-node", "1", "--ec-k", "2", "--ec-m", "1"], "--peers: missing"),
    (["--node", "0", "--nnodes", "3", "--nproc-per-node", "1", "--ec-k", "2", "--ec-m", "1", "--peers", "h:1,h:2"],
     "--peers: got 2 address"),
    (["--node", "0", "--nnodes", "1", "--nproc-per-node", "1", "--peers", "nohost"], "--peers: entry 0"),
    (["--node", "0", "--nnodes", "1", "--nproc-per-node", "0"], "--nproc-per-node: got 0"),
    (["--node", "0", "--nnodes", "1", "--nproc-per-node", "1", "--max-memory", "12XB"], "--max-memory: got '12XB'"),
    (["--node", "0", "--nnodes", "1", "--nproc-per-node", "1", "--bulk-port", "-2"], "--bulk-port: got -2"),
    (["--node", "0", "--nnodes", "1", "--nproc-per-node", "1", "--port", "7100", "--bulk-port", "7100"],
     "--bulk-port: got 7100, the same as --port"),
])
def test_daemon_flags_are_validated(argv, match):
    with pytest.raises(CLIError, match=match):
        config_from_args(_args(*argv))


def test_daemon_flags_parse():
    assert parse_bytes("8GiB") == 8 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("4096") == 4096
    config = config_from_args(_args("--node", "2", "--nnodes", "3", "--nproc-per-node", "2", "--ec-k", "2", "--ec-m",
                                    "1", "--peers", "a:1,b:2,c:3", "--max-memory", "1KiB"))
    assert config.peers == ["a:1", "b:2", "c:3"] and config.max_memory == 1024 and config.host == "127.0.0.1"
    assert config.bulk_port == 0  # any free port, reported in Status and the ready file
    assert config_from_args(_args("--node", "0", "--nnodes", "1", "--nproc-per-node", "1", "--bulk-port",
                                  "-1")).bulk_port == -1


# =========================================================================== one daemon (m = 0)


def _stop_all(procs) -> list[int]:
    """SIGTERM every daemon first, then wait for each: they stop in parallel."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(15))
        except subprocess.TimeoutExpired:
            codes.append(stop_daemon(proc, kill=True))
    return codes


def test_publish_rules_then_sigterm_cleanup_and_start_failures(tmp_path):
    """One daemon for the version rules and the clean stop (a daemon start costs seconds of CPU)."""
    job, other = _job("ver"), _job("taken")
    try:
        proc = start_daemon(job, 0, nnodes=1, nproc_per_node=2, run_dir=tmp_path, cleanup=True, wait=False)
        bad = start_daemon(job, 1, nnodes=2, nproc_per_node=1, ec_k=40, run_dir=tmp_path, wait=False)
        port = wait_daemon(proc)
        with pytest.raises(DaemonStartError, match=r"exited with code 2(.|\n)*--ec-k: got 40; accepted: 1 to 32"):
            wait_daemon(bad)
        taken = DaemonConfig(job=other, node=0, nnodes=1, nproc_per_node=1, port=port, max_memory=MiB)
        with pytest.raises(CLIError, match=r"--port: cannot listen on 127.0.0.1:%d" % port):
            serve(taken)  # in-process: a second daemon never shares a port (no SO_REUSEPORT)
        twin = DaemonConfig(job=job, node=0, nnodes=1, nproc_per_node=1, max_memory=MiB)
        with pytest.raises(CLIError, match=r"--job/--node: another snapshot daemon \(pid %d\) already serves" % proc.pid):
            serve(twin)  # the same namespace: refused before it could adopt (and delete) anything

        with DaemonClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_ready(5)
            for v in (10, 20, 30):
                for r in range(2 if v < 30 else 1):
                    blob = _blob(1000 + v + r, v)
                    client.alloc(v, r, blob.numel()).copy_(blob)
                    client.commit(v, r, size=blob.numel(), checksum=checksum(blob), step=v)
                if v == 10:
                    assert client.publish(10) == []  # before 30 starts: at most two unpublished versions are held
            with pytest.raises(SnapshotVersionError, match="cannot allocate step 10: step 10 is already published"):
                client.alloc(10, 0, 1)
            with pytest.raises(SnapshotVersionError, match="already published"):
                client.alloc(7, 0, 1)
            with pytest.raises(SnapshotVersionError, match="not locally complete"):
                client.publish(30)
            assert [v.version for v in client.list()] == [10, 20, 30]  # the published one stays until a newer one
            assert client.publish(20) == [10]
            infos = client.list()
            assert [(v.version, v.complete, v.published) for v in infos] == [(20, True, True), (30, False, False)]
            assert client.status().published == 20
            with pytest.raises(SnapshotVersionError, match="versions only move forward"):
                client.publish(10)
            with pytest.raises(SnapshotNotFound):
                client.publish(40)

        assert _stop_all([proc]) == [0]  # SIGTERM is a clean stop
        # --cleanup removed the segments (without it they stay: see below); the lock file is never unlinked
        assert [p.name for p in shm.list_namespace(job, 0)] == [shm.lock_name(job, 0)]
        with pytest.raises(DaemonUnavailable, match=f"127.0.0.1:{port}: UNAVAILABLE"):
            DaemonClient(f"127.0.0.1:{port}", timeout=3).status()
        with pytest.raises(DaemonUnavailable, match="did not accept a connection"):
            DaemonClient(f"127.0.0.1:{port}").wait_ready(0.5)
    finally:
        for name in (job, other):
            shm.remove_namespace(name, 0)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One single-node daemon (m = 0, 2 local ranks, 64 MiB cap) for shard I/O."""
    run_dir = tmp_path_factory.mktemp("single")
    job = _job("io")
    proc = start_daemon(job, 0, nnodes=1, nproc_per_node=2, max_memory="64MiB", run_dir=run_dir)
    try:
        with DaemonClient(f"127.0.0.1:{proc.port}", timeout=10) as client:
            yield client
    finally:
        _stop_all([proc])
        shm.remove_namespace(job, 0)


def test_alloc_write_commit_get_round_trip_is_zero_copy(single):
    client = single
    size = 5 * MiB + 37  # two Get messages, not a multiple of 64
    view = client.alloc(1, 0, size)
    blob = _blob(size, 11)
    view.copy_(blob)  # the worker writes into the daemon's pages: no RPC carries these bytes
    assert client.commit(1, 0, size=size, checksum=checksum(blob), step=1, meta=b"rng") is False
    got, stored = client.get_with_checksum(1, kind="data", local_rank=0)
    assert torch.equal(got, blob) and stored == checksum(blob)
    assert torch.equal(client.get(1, kind="data", local_rank=0, offset=4 * MiB + 3, length=MiB),
                       blob[4 * MiB + 3:5 * MiB + 3])
    out = torch.zeros(100, dtype=torch.uint8)
    assert torch.equal(client.get(1, kind="data", local_rank=0, offset=size - 10, out=out), blob[-10:])
    assert client.get(1, kind="data", local_rank=0, offset=size).numel() == 0
    mapped = client.open_data(1, 0)
    assert torch.equal(mapped, blob)
    view[0] ^= 0xFF  # same pages: what the alloc view writes, the daemon serves
    assert int(client.get(1, kind="data", local_rank=0, length=1)[0]) == int(blob[0]) ^ 0xFF
    assert int(mapped[0]) == int(blob[0]) ^ 0xFF
    view[0] ^= 0xFF
    stub = pb_grpc.SnapshotDaemonStub(client._channel)  # the generated classes read the hand-encoded replies
    replies = list(stub.Get(pb.GetRequest(version=1, kind=pb.SHARD_KIND_DATA, local_rank=0, offset=10, length=5 * MiB),
                            timeout=10))
    assert [len(r.data) for r in replies] == [4 * MiB, MiB] and replies[0].checksum == checksum(blob)
    assert (replies[0].size, replies[0].offset, replies[0].length) == (size, 10, 5 * MiB)
    assert b"".join(r.data for r in replies) == blob[10:10 + 5 * MiB].numpy().tobytes()
    [info] = client.list(1)
    [shard] = info.data
    assert (shard.local_rank, shard.size, shard.checksum, shard.step, shard.committed, shard.meta) == (
        0, size, checksum(blob), 1, True, b"rng")
    assert shard.path == str(shm.segment_root() / shm.data_name(client.status().job, 0, 1, 0))

    streamed = _blob(9 * MiB + 1, 12)  # the non-zero-copy Put: three data messages
    client.put(1, 1, streamed)
    assert client.commit(1, 1, size=streamed.numel(), checksum=checksum(streamed), step=1) is True
    assert torch.equal(client.get(1, kind="data", local_rank=1), streamed)
    status = client.status()
    assert status.memory_used == size + streamed.numel() and status.memory_cap == 64 * MiB
    assert status.versions[0].complete and status.pid > 0 and status.uptime_s > 0
    client.drop(1)
    assert client.status().memory_used == 0


def test_checksum_mismatch_is_data_loss_and_not_committed(single):
    client = single
    view = client.alloc(2, 0, 1000)
    view.copy_(_blob(1000, 3))
    with pytest.raises(SnapshotChecksumError, match="checksum mismatch for version 2, local rank 0") as err:
        client.commit(2, 0, size=1000, checksum=checksum(view) ^ 0xABC, step=2)
    assert err.value.grpc_code == "DATA_LOSS"
    assert not client.list(2)[0].data[0].committed
    with pytest.raises(SnapshotVersionError, match="not committed yet"):
        client.get(2, kind="data", local_rank=0)
    client.commit(2, 0, size=1000, checksum=checksum(view), step=2)  # rewrite-free retry with the right checksum
    assert client.list(2)[0].data[0].committed
    client.drop(2)


def test_bad_requests_get_precise_statuses(single):
    client = single
    view = client.alloc(3, 0, 4096)
    with pytest.raises(SnapshotRequestError, match="commit size: got 4000 bytes.*allocated with 4096") as err:
        client.commit(3, 0, size=4000, checksum=checksum(view), step=3)
    assert err.value.grpc_code == "INVALID_ARGUMENT"
    client.commit(3, 0, size=4096, checksum=checksum(view), step=3)
    with pytest.raises(SnapshotRequestError, match="local_rank: got 5; accepted: 0 to 1"):
        client.alloc(3, 5, 10)
    with pytest.raises(SnapshotRequestError, match="size: got -1"):
        client.alloc(3, 1, -1)
    with pytest.raises(SnapshotRangeError, match=r"bytes \[4000, 4200\) reach past the end"):
        client.get(3, kind="data", local_rank=0, offset=4000, length=200)
    with pytest.raises(SnapshotNotFound, match="holds no version 99"):
        client.get(99, kind="data", local_rank=0)
    with pytest.raises(SnapshotRequestError, match="no parity"):
        client.get(3, kind="parity", local_rank=0, stripe=0, index=0)
    with pytest.raises(SnapshotRequestError, match="meta: got 70000 bytes"):
        client.commit(3, 0, size=4096, checksum=checksum(view), step=3, meta=b"x" * 70000)
    stub = pb_grpc.SnapshotDaemonStub(client._channel)
    with pytest.raises(grpc.RpcError) as raw:  # a streamed Put shorter than its header says
        stub.Put(iter([pb.PutRequest(header=pb.PutHeader(version=3, local_rank=1, size=10)),
                       pb.PutRequest(data=b"12345")]), timeout=10)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "got 5 bytes" in raw.value.details()
    assert [d.local_rank for d in client.list(3)[0].data] == [0]  # the failed Put left nothing behind
    with pytest.raises(grpc.RpcError) as raw:
        stub.Put(iter([pb.PutRequest(data=b"1")]), timeout=10)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first message must be the header" in raw.value.details()
    client.drop(3)


def test_memory_cap_error_names_the_bytes(single):
    client = single
    client.alloc(4, 0, 40 * MiB)
    with pytest.raises(SnapshotMemoryError) as err:
        client.alloc(4, 1, 30 * MiB)
    text = str(err.value)
    assert f"needs {30 * MiB} bytes" in text and f"{40 * MiB} bytes are in use" in text
    assert f"cap is {64 * MiB} bytes" in text and "snapshot.max_memory" in text
    assert err.value.grpc_code == "RESOURCE_EXHAUSTED"
    client.drop(4)


# =========================================================================== a group of three daemons (k=2, m=1)


class Cluster:
    """``nnodes`` daemons of one job on loopback, with fixed ports (gRPC and bulk) so a node restarts where it was.

    Nodes in ``no_bulk`` run without a bulk plane (``--bulk-port -1``): bytes to them go over gRPC.
    """

    def __init__(self, run_dir: Path, *, nnodes: int = 3, nproc: int = 2, k: int = 2, m: int = 1,
                 max_memory: str = "256MiB", no_bulk: tuple[int, ...] = ()):
        self.job = _job("ec")
        self.run_dir, self.nnodes, self.nproc, self.k, self.m, self.max_memory = run_dir, nnodes, nproc, k, m, max_memory
        ports = free_ports(2 * nnodes)
        self.ports = ports[:nnodes]
        self.bulk_ports = [-1 if node in no_bulk else port for node, port in enumerate(ports[nnodes:])]
        self.peers = [f"127.0.0.1:{p}" for p in self.ports]
        self.procs = [self._start(n) for n in range(nnodes)]
        for proc in self.procs:
            wait_daemon(proc)
        self.clients = [DaemonClient(peer, timeout=20) for peer in self.peers]

    def _start(self, node: int):
        return start_daemon(self.job, node, nnodes=self.nnodes, nproc_per_node=self.nproc, ec_k=self.k, ec_m=self.m,
                            port=self.ports[node], bulk_port=self.bulk_ports[node], peers=self.peers,
                            max_memory=self.max_memory, run_dir=self.run_dir, wait=False)

    def kill(self, node: int) -> None:
        stop_daemon(self.procs[node], kill=True)

    def restart(self, node: int) -> None:
        self.procs[node] = self._start(node)
        wait_daemon(self.procs[node])

    def write(self, node: int, version: int, rank: int, blob: torch.Tensor) -> None:
        client = self.clients[node]
        client.alloc(version, rank, blob.numel()).copy_(blob)
        client.commit(version, rank, size=blob.numel(), checksum=checksum(blob), step=version, meta=b"n%d" % node)

    def wait_complete(self, version: int, nodes=None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes if nodes is not None else range(self.nnodes):
            while True:
                states = {v.version: v.complete for v in self.clients[node].status().versions}
                if states.get(version):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"version {version} not complete on node {node}: "
                                         f"{self.clients[node].list(version)}\n{self.procs[node].log_file.read_text()[-3000:]}")
                time.sleep(0.05)

    def log(self, node: int) -> str:
        return self.procs[node].log_file.read_text()

    def close(self) -> None:
        for client in self.clients:
            client.close()
        _stop_all(self.procs)
        for node in range(self.nnodes):
            shm.remove_namespace(self.job, node)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.close()


@pytest.fixture
def healthy(cluster):
    """The cluster, with any daemon a previous test left dead started again."""
    for node, proc in enumerate(cluster.procs):
        if proc.poll() is not None:
            cluster.restart(node)
    return cluster


# (node, local rank) -> blob size: not multiples of 64, an empty blob, a blob whose 2nd chunk is empty,
# and chunks over 4 MiB (several messages per push)
SIZES = {(0, 0): 1000, (0, 1): 64, (1, 0): 333_333, (1, 1): 0, (2, 0): 9 * MiB + 17, (2, 1): 130}


def _check_parity(cluster: Cluster, version: int, blobs: dict[tuple[int, int], torch.Tensor]) -> None:
    k, m, n = cluster.k, cluster.m, cluster.k + cluster.m
    for node in range(cluster.nnodes):
        [info] = cluster.clients[node].list(version)
        assert info.complete
        assert sorted(d.local_rank for d in info.data if d.committed) == list(range(cluster.nproc))
        assert len(info.parity) == m * cluster.nproc
        for p in info.parity:
            assert (p.stripe + k + p.index) % n == node % n, "parity shard on the wrong node"
            per_pos = {q: blobs[(q, p.local_rank)] for q in range(n)}
            expected = _reference_parity(per_pos, k, m, p.stripe, p.index)
            got, stored = cluster.clients[node].get_with_checksum(version, kind="parity", local_rank=p.local_rank,
                                                                  stripe=p.stripe, index=p.index)
            assert torch.equal(got, expected), (node, p.local_rank, p.stripe)
            assert p.complete and p.size == expected.numel() and stored == p.checksum == checksum(expected)
            assert [mb.position for mb in p.members] == list(range(k))
            for mb in p.members:
                owner = (p.stripe + mb.position) % n
                blob = blobs[(owner, p.local_rank)]
                ch = _chunk(blob, k, mb.position)
                assert (mb.node, mb.size, mb.checksum, mb.chunk_len, mb.chunk_checksum, mb.step) == (
                    owner, blob.numel(), checksum(blob), ch.numel(), checksum(ch), version)


def test_parity_of_three_daemons_matches_the_reference(healthy):
    cluster = healthy
    version = 100
    blobs = {key: _blob(size, 1000 + 10 * key[0] + key[1]) for key, size in SIZES.items()}
    threads = [threading.Thread(target=cluster.write, args=(node, version, rank, blob))
               for (node, rank), blob in blobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cluster.wait_complete(version)
    _check_parity(cluster, version, blobs)
    for node in range(3):
        status = cluster.clients[node].status()
        assert status.pushes_failed == 0 and status.pushes_pending == 0
        assert cluster.clients[node].list(version)[0].data[0].meta == b"n%d" % node
    for client in cluster.clients:
        assert client.publish(version) == []


def test_a_killed_daemon_readopts_committed_shards_and_discards_the_rest(healthy):
    cluster = healthy
    version = 200
    blobs = {key: _blob(size, 2000 + 10 * key[0] + key[1]) for key, size in SIZES.items() if key[0] != 2}
    blobs[(2, 0)], blobs[(2, 1)] = _blob(5000, 2020), _blob(3, 2021)
    for (node, rank), blob in blobs.items():
        cluster.write(node, rank=rank, version=version, blob=blob)
    cluster.wait_complete(version)
    before = cluster.clients[0].list(version)
    cluster.clients[0].alloc(version + 1, 0, 4096).fill_(1)  # never committed
    cluster.write(0, version + 1, 1, _blob(640, 1))  # committed, then corrupted in place below
    corrupt = cluster.clients[0].open_data(version + 1, 1)
    corrupt[100] ^= 0x5A
    cluster.kill(0)  # SIGKILL: no chance to clean up or flush anything
    assert (shm.segment_root() / shm.data_name(cluster.job, 0, version + 1, 0)).exists()
    cluster.restart(0)
    assert cluster.clients[0].list(version) == before  # every shard re-adopted, checksums re-verified
    assert not (shm.segment_root() / shm.data_name(cluster.job, 0, version + 1, 0)).exists()
    held = {v.version: v for v in cluster.clients[0].list()}
    assert version + 1 not in held or held[version + 1].data == []
    log = cluster.log(0)
    assert f"step {version}: adopted 4 shard(s) (locally complete)" in log
    assert f"step {version + 1}: adopted 0 shard(s), discarded data r0 (not committed), data r1 (checksum" in log
    got = cluster.clients[0].get(version, kind="data", local_rank=0)
    assert torch.equal(got, blobs[(0, 0)])
    for client in cluster.clients:
        client.drop(version + 1)


def test_pushes_to_a_restarting_peer_are_retried_until_parity_completes(healthy):
    cluster = healthy
    version = 300
    blobs = {key: _blob(size, 3000 + 10 * key[0] + key[1]) for key, size in SIZES.items()}
    held = cluster.clients[2].list()
    assert _stop_all([cluster.procs[2]]) == [0]  # SIGTERM: a clean stop that keeps the shared memory
    for (node, rank), blob in blobs.items():
        if node != 2:
            cluster.write(node, version, rank, blob)
    time.sleep(0.5)  # the pushes to node 2 fail and back off meanwhile
    assert cluster.clients[0].status().pushes_pending > 0
    cluster.restart(2)
    assert [v for v in cluster.clients[2].list() if v.version < version] == held  # all re-adopted
    for rank in range(2):
        cluster.write(2, version, rank, blobs[(2, rank)])
    cluster.wait_complete(version)
    _check_parity(cluster, version, blobs)
    assert "retrying" in cluster.log(0) and "succeeded after" in cluster.log(0)
    for node in range(2):
        assert cluster.clients[node].status().pushes_failed == 0


def test_a_version_older_than_the_published_one_is_refused_everywhere(healthy):
    cluster = healthy
    blobs = {key: _blob(size, 4000 + 10 * key[0] + key[1]) for key, size in SIZES.items() if size < MiB}
    blobs[(2, 0)] = _blob(100, 4)
    for (node, rank), blob in blobs.items():
        cluster.write(node, 400, rank, blob)
    cluster.wait_complete(400)
    for client in cluster.clients:
        dropped = client.publish(400)
        assert all(v < 400 for v in dropped)
        assert [v.version for v in client.list()] == [400]
    with pytest.raises(SnapshotVersionError, match="already published"):
        cluster.clients[1].alloc(350, 0, 10)
    with pytest.raises(SnapshotVersionError, match="cannot accept chunks for step 390"):
        ch = blobs[(0, 0)][:512]
        cluster.clients[2].push_chunk(390, 0, stripe=0, index=0, member=0, node=0, blob_size=1000,
                                      blob_checksum=0, step=390, chunk=ch)
    with pytest.raises(SnapshotChecksumError, match="chunk checksum mismatch"):
        ch = blobs[(0, 0)][:512]
        cluster.clients[2].push_chunk(401, 0, stripe=0, index=0, member=0, node=0, blob_size=1000,
                                      blob_checksum=0, step=401, chunk=ch, chunk_checksum=checksum(ch) ^ 1)
    cluster.clients[2].drop(401)


# =========================================================================== throughput (opt-in)


@pytest.mark.skipif(not os.environ.get("PLAIT_SNAPSHOT_BENCH"), reason="set PLAIT_SNAPSHOT_BENCH=1 to measure")
def test_loopback_throughput(tmp_path, capsys):
    """Get and PushChunk of 256 MiB over loopback on the default transport (the bulk plane), and a bare framed
    TCP socket for comparison (median of 3); `plait bench transport` compares the bulk plane with gRPC."""
    size, reps = 256 * MiB, 3
    tune_malloc()  # what the daemons do at start (see its docstring); affects the TCP baseline alike
    cluster = Cluster(tmp_path, nnodes=2, nproc=1, k=1, m=1, max_memory="2GiB")
    timings: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        timings.setdefault(name, []).append(time.perf_counter() - t0)

    try:
        blob = _blob(size, 9)
        ck = checksum(blob)
        a, b = cluster.clients
        out = torch.zeros(size, dtype=torch.uint8)  # touched: page faults are not the transfer's
        for rep in range(reps):
            v = 1 + rep
            view = a.alloc(v, 0, size)
            timed("copy into the alloc view", lambda: view.copy_(blob))
            timed("commit (daemon re-checksums)", lambda: a.commit(v, 0, size=size, checksum=ck, step=v))
            t0 = time.perf_counter()
            while [p.complete for info in b.list(v) for p in info.parity] != [True]:
                assert time.perf_counter() - t0 < 120, b.list(v)
                time.sleep(0.005)
            timings.setdefault("commit -> parity complete on the peer (push)", []).append(time.perf_counter() - t0)
            timed("Get data", lambda: a.get(v, kind="data", local_rank=0, out=out))
            assert torch.equal(out, blob)
            timed("PushChunk (client -> daemon, verify + accumulate)", lambda: b.push_chunk(
                100 + v, 0, stripe=0, index=0, member=0, node=0, blob_size=size, blob_checksum=ck, step=v, chunk=blob,
                chunk_checksum=ck))
            timed("Get parity", lambda: b.get(100 + v, kind="parity", local_rank=0, stripe=0, index=0, out=out))
            assert torch.equal(out, blob)  # k = 1: the parity is the chunk itself (P = [[1]])
            for client in (a, b):
                client.drop(v), client.drop(100 + v)
            timed("checksum alone", lambda: checksum(blob))
            timed("framed TCP socket (4 MiB frames, Python sockets)", lambda: _tcp_throughput(blob))
    finally:
        cluster.close()
    with capsys.disabled():
        print(f"\n256 MiB, median of {reps}:")
        for name, values in timings.items():
            t = sorted(values)[len(values) // 2]
            print(f"  {name:52s} {t:6.3f} s  {size / t / 1e9:5.2f} GB/s")


def _tcp_throughput(blob: torch.Tensor, frame: int = 4 * MiB) -> float:
    """Seconds to send ``blob`` over a loopback TCP socket in length-prefixed frames into a preallocated buffer."""
    size = blob.numel()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    out = bytearray(size)
    received = threading.Event()

    def receive() -> None:
        conn, _ = server.accept()
        with conn:
            view, pos = memoryview(out), 0
            header = bytearray(8)
            while pos < size:
                conn.recv_into(header, 8, socket.MSG_WAITALL)
                (n,) = struct.unpack("<Q", header)
                got = 0
                while got < n:
                    got += conn.recv_into(view[pos + got:pos + n], n - got)
                pos += n
        received.set()

    thread = threading.Thread(target=receive)
    thread.start()
    arr = memoryview(blob.numpy())
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for pos in range(0, size, frame):
            piece = arr[pos:pos + frame]
            sock.sendall(struct.pack("<Q", len(piece)))
            sock.sendall(piece)
        received.wait()
    elapsed = time.perf_counter() - t0
    thread.join()
    server.close()
    assert bytes(out[:1000]) == blob[:1000].numpy().tobytes()
    return elapsed
