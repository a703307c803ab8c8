"""The snapshot daemon's framed-TCP bulk plane, against real daemons on loopback.

Parity built over it equals the independent reference; Gets over it return the bytes;
every refusal is the same typed exception with the same message as over gRPC; a
parity holder SIGKILLed mid-push and restarted on its ports still ends complete; and
gRPC carries the bytes when a daemon has no bulk plane, when a client asks for gRPC,
or when the bulk port fails while gRPC answers. Helpers (the cluster, the reference
parity) are the ones of test_snapshot_daemon.py.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from plait.ops.checksum import checksum
from plait.ops.rs_matrix import parity_matrix
from plait.runtime.snapshot.transport import bulk
from plait.runtime.snapshot.transport.client import DaemonClient
from plait.runtime.snapshot.errors import (
    DaemonUnavailable,
    SnapshotChecksumError,
    SnapshotError,
    SnapshotMemoryError,
    SnapshotNotFound,
    SnapshotRangeError,
    SnapshotRequestError,
    SnapshotVersionError,
)
from plait.runtime.snapshot.launcher.spawn import free_ports
from test_snapshot_daemon import SIZES, Cluster, _blob, _check_parity, _chunk, _stop_all

MiB = 1 << 20


# =========================================================================== frames, no daemon


def test_frames_round_trip_and_garbage_is_refused_by_name():
    request = bulk.Request(bulk.OP_PUSH_CHUNK, version=2**40, local_rank=3, stripe=2, index=1, member=4, node=9,
                           kind=0, offset=-1, length=12345, blob_size=2**33, blob_checksum=2**64 - 1,
                           chunk_checksum=7, step=-5, flags=bulk.REQUEST_TO_END)
    raw = request.pack()
    assert len(raw) == 88 and raw[:4] == b"PLTB"
    assert bulk.Request.unpack(raw) == request
    with pytest.raises(SnapshotRequestError, match="not b'PLTB'"):
        bulk.Request.unpack(b"GET " + raw[4:])
    with pytest.raises(SnapshotRequestError, match="protocol 7 is not this daemon's protocol 2"):
        bulk.Request.unpack(bulk.Request(bulk.OP_GET, protocol=7).pack())
    with pytest.raises(SnapshotRequestError, match="does not fit its wire type"):
        bulk.Request(bulk.OP_GET, local_rank=2**31).pack()
    for cls in (SnapshotRequestError, SnapshotVersionError, SnapshotChecksumError, SnapshotMemoryError,
                SnapshotNotFound, SnapshotRangeError):
        err = bulk.Reply.refusal(cls(f"why {cls.__name__}")).error("h:1")
        assert type(err) is cls and str(err) == f"why {cls.__name__}" and err.grpc_code == cls.code
    internal = bulk.Reply(status=bulk.STATUS_NAMES.index("INTERNAL"), message="Get: boom").error("h:1")
    assert type(internal) is SnapshotError and internal.grpc_code == "INTERNAL"
    down = bulk.Reply(status=bulk.STATUS_NAMES.index("UNAVAILABLE"), message="x").error("h:1")
    assert isinstance(down, DaemonUnavailable) and str(down) == "snapshot daemon at h:1: UNAVAILABLE: x"


def test_a_client_refuses_an_unknown_transport():
    with pytest.raises(SnapshotRequestError, match="transport: got 'udp'"):
        DaemonClient("127.0.0.1:1", transport="udp")


# =========================================================================== a group of three daemons (k=2, m=1)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("bulk-group"))
    yield c
    c.close()


def _forced(cluster: Cluster, node: int) -> dict[str, DaemonClient]:
    return {t: DaemonClient(cluster.peers[node], timeout=20, transport=t) for t in ("tcp", "grpc")}


def test_parity_pushed_over_the_bulk_plane_matches_the_reference_and_gets_return_the_bytes(group):
    cluster = group
    version = 10
    blobs = {key: _blob(size, 100 + 10 * key[0] + key[1]) for key, size in SIZES.items()}
    threads = [threading.Thread(target=cluster.write, args=(node, version, rank, blob))
               for (node, rank), blob in blobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cluster.wait_complete(version)
    _check_parity(cluster, version, blobs)  # reads every parity shard back with get_with_checksum
    for node in range(3):
        status = cluster.clients[node].status()
        assert status.bulk_port == cluster.bulk_ports[node] == cluster.procs[node].bulk_port
        assert status.pushes_done == 2 * 2 * 1 and status.pushes_failed == 0 and status.pushes_pending == 0
        assert status.pushes_over_grpc == 0, "a push fell back to gRPC"
        transfers = cluster.clients[node].transfers
        assert transfers["get/tcp"] >= 2 and transfers["get/grpc"] == 0
        assert f"bulk plane on port {cluster.bulk_ports[(node + 1) % 3]}" in cluster.log(node)

    assert cluster.clients[1].get(version, kind="data", local_rank=1).numel() == 0  # the empty blob of (1, 1)
    blob = blobs[(2, 0)]  # 9 MiB + 17: more than one receive slice
    size = blob.numel()
    both = _forced(cluster, 2)
    try:
        for transport, client in both.items():
            got, stored = client.get_with_checksum(version, kind="data", local_rank=0)
            assert torch.equal(got, blob) and stored == checksum(blob), transport
            assert torch.equal(client.get(version, kind="data", local_rank=0, offset=MiB + 3, length=8 * MiB),
                               blob[MiB + 3:9 * MiB + 3])
            out = torch.full((size + 100,), 7, dtype=torch.uint8)
            filled = client.get(version, kind="data", local_rank=0, offset=size - 50, out=out)
            assert filled.data_ptr() == out.data_ptr() and torch.equal(filled, blob[-50:])
            assert torch.equal(out[50:], torch.full((size + 50,), 7, dtype=torch.uint8))  # nothing past the range
            assert client.get(version, kind="data", local_rank=0, offset=size).numel() == 0
            assert torch.equal(client.get(version, kind="data", local_rank=1), blobs[(2, 1)])
            with pytest.raises(SnapshotRequestError, match="out holds 10 bytes but the range has 100"):
                client.get(version, kind="data", local_rank=0, offset=size - 100, out=torch.empty(10, dtype=torch.uint8))
            assert torch.equal(client.get(version, kind="data", local_rank=0, length=5), blob[:5])  # still usable
        assert both["tcp"].transfers["get/tcp"] == 6 and not both["tcp"].transfers["get/grpc"]
        assert both["grpc"].transfers["get/grpc"] == 6 and not both["grpc"].transfers["get/tcp"]
    finally:
        for client in both.values():
            client.close()


def _refusals(cluster: Cluster, version: int) -> dict[str, tuple[type, object]]:
    """Requests each daemon refuses, keyed by name: (expected class, call(client_of_node) -> None)."""
    ch = _blob(640, 3)
    ck = checksum(ch)

    def push(client_node: int, **kw):
        args = dict(version=version, local_rank=0, stripe=0, index=0, member=0, node=0, blob_size=1280,
                    blob_checksum=0, step=version, chunk=ch, chunk_checksum=ck)
        args.update(kw)
        v = args.pop("version")
        r = args.pop("local_rank")
        return lambda clients: clients[client_node].push_chunk(v, r, **args)

    big = torch.empty(300 * MiB, dtype=torch.uint8)  # never touched: refused before a byte travels
    return {
        "range": (SnapshotRangeError, lambda c: c[0].get(version, kind="data", local_rank=0, offset=900, length=200)),
        "negative offset": (SnapshotRequestError, lambda c: c[0].get(version, kind="data", local_rank=0, offset=-1)),
        "no version": (SnapshotNotFound, lambda c: c[0].get(version + 50, kind="data", local_rank=0)),
        "not committed": (SnapshotVersionError, lambda c: c[0].get(version + 1, kind="data", local_rank=1)),
        "parity not held": (SnapshotRequestError, lambda c: c[2].get(version, kind="parity", local_rank=0, stripe=1,
                                                                     index=0)),
        "local rank": (SnapshotRequestError, lambda c: c[0].get(version, kind="data", local_rank=7)),
        "old version": (SnapshotVersionError, push(2, version=version - 5)),
        "checksum": (SnapshotChecksumError, push(2, version=version + 1, chunk_checksum=ck ^ 1)),
        "wrong owner": (SnapshotRequestError, push(2, version=version + 1, node=1)),
        "chunk_len": (SnapshotRequestError, push(2, version=version + 1, blob_size=5000)),
        "memory cap": (SnapshotMemoryError, push(2, version=version + 1, blob_size=600 * MiB, chunk=big)),
    }


def test_every_refusal_is_the_same_typed_error_over_tcp_as_over_grpc(group):
    cluster = group
    version = 40
    blobs = {key: _blob(min(size, 1000), 400 + 10 * key[0] + key[1]) for key, size in SIZES.items()}
    for (node, rank), blob in blobs.items():
        cluster.write(node, version, rank, blob)
    cluster.wait_complete(version)
    for client in cluster.clients:
        client.publish(version)
    cluster.clients[0].alloc(version + 1, 1, 64)  # allocated, never committed
    clients = {t: [DaemonClient(peer, timeout=20, transport=t) for peer in cluster.peers] for t in ("tcp", "grpc")}
    try:
        for name, (expected, call) in _refusals(cluster, version).items():
            caught = {}
            for transport in ("tcp", "grpc"):
                with pytest.raises(expected) as err:
                    call(clients[transport])
                caught[transport] = err.value
            tcp, grpc_ = caught["tcp"], caught["grpc"]
            assert type(tcp) is type(grpc_) is expected, name
            assert str(tcp) == str(grpc_) and tcp.grpc_code == grpc_.grpc_code == expected.code, name
        for transport in ("tcp", "grpc"):
            assert not [k for k in clients[transport][0].transfers if not k.endswith(transport)]
        ch = _chunk(blobs[(0, 0)], 2, 0)  # after all those refusals the connections still carry a good push
        assert clients["tcp"][2].push_chunk(version + 1, 0, stripe=0, index=0, member=0, node=0, blob_size=1000,
                                            blob_checksum=checksum(blobs[(0, 0)]), step=version + 1, chunk=ch)
        assert clients["tcp"][2].transfers["push_chunk/tcp"] == 1
    finally:
        for per_node in clients.values():
            for client in per_node:
                client.close()
        for client in cluster.clients:
            client.drop(version + 1)


def test_the_bulk_port_refuses_foreign_frames_and_unknown_ops(group, job_secret):
    cluster = group
    host, port = "127.0.0.1", cluster.bulk_ports[0]
    conn = bulk.BulkConnection(host, port, timeout=10, address=cluster.peers[0], secret=job_secret)
    with pytest.raises(SnapshotRequestError, match="protocol 9 is not this daemon's protocol 2"):
        conn.get(bulk.Request(bulk.OP_GET, kind=bulk.KIND_DATA, protocol=9), None)
    conn.close()
    conn = bulk.BulkConnection(host, port, timeout=10, address=cluster.peers[0], secret=job_secret)
    with pytest.raises(SnapshotRequestError, match="bulk: unknown op 77"):
        conn.get(bulk.Request(77), None)
    conn.close()
    with socket.create_connection((host, port), timeout=10) as raw:  # not a plait client at all
        assert raw.recv(4)[:4] == b"PLTC"  # the daemon speaks first: a challenge
        raw.sendall((b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 88)[:36])  # one answer's worth of garbage
        reply = b""
        while piece := raw.recv(4096):  # until the daemon hangs up on it
            reply += piece
        assert b"PLTR" in reply and b"did not prove the job's secret" in reply
    assert cluster.clients[0].status().pid == cluster.procs[0].pid  # unharmed


def test_every_plane_refuses_a_caller_without_the_jobs_secret(group, tmp_path):
    """gRPC (no token, a wrong one, a replayed one) and the bulk plane refuse with a typed error; logged once."""
    import grpc

    from plait.runtime.snapshot.auth import AUTH_METADATA, JobSecret
    from plait.runtime.snapshot.errors import SnapshotAuthError
    from plait.runtime.snapshot.transport import snapshot_pb2 as pb
    from plait.runtime.snapshot.transport import snapshot_pb2_grpc as pb_grpc

    cluster = group
    stranger = JobSecret.create(tmp_path / "stranger")
    for transport in ("grpc", "tcp"):
        with DaemonClient(cluster.peers[0], timeout=10, transport=transport, secret=stranger) as client:
            with pytest.raises(SnapshotAuthError, match="refused"):
                client.list() if transport == "grpc" else client.get(1, kind="data", local_rank=0)
            with pytest.raises(SnapshotAuthError):
                client.publish(10**6)
    with grpc.insecure_channel(cluster.peers[0]) as channel:
        stub = pb_grpc.SnapshotDaemonStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Drop(pb.DropRequest(version=1), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "no plait-auth token" in info.value.details()
        token = JobSecret.from_env().token("/plait.snapshot.v1.SnapshotDaemon/Status")
        stub.Status(pb.StatusRequest(), timeout=10, metadata=[(AUTH_METADATA, token)])  # a right token: served
        with pytest.raises(grpc.RpcError) as info:
            stub.Status(pb.StatusRequest(), timeout=10, metadata=[(AUTH_METADATA, token)])  # the same token again
        assert "replayed" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # a token for another method
            stub.Drop(pb.DropRequest(version=1), timeout=10, metadata=[(AUTH_METADATA, JobSecret.from_env().token(
                "/plait.snapshot.v1.SnapshotDaemon/Status"))])
        assert "wrong plait-auth token" in info.value.details()
    log = cluster.log(0)
    assert log.count("refused 127.0.0.1") == 1  # once per peer host, however many refusals
    assert cluster.clients[0].status().pid == cluster.procs[0].pid


# =========================================================================== a parity holder killed mid-push


def _big_blob(size: int, seed: int) -> torch.Tensor:
    """Random bytes, generated 8 at a time (a byte at a time takes seconds for tens of MiB)."""
    words = torch.randint(-2**63, 2**63 - 1, ((size + 7) // 8,), dtype=torch.int64,
                          generator=torch.Generator().manual_seed(seed))
    return words.view(torch.uint8)[:size]


def test_a_parity_holder_killed_mid_push_and_restarted_on_its_ports_ends_complete(tmp_path):
    cluster = Cluster(tmp_path, nnodes=2, nproc=2, k=1, m=1, max_memory="1GiB")  # node 1 holds node 0's parity
    assert parity_matrix(1, 1).tolist() == [[1]]  # so each parity shard is its member's blob, byte for byte
    try:
        version = 5
        blobs = {(0, 0): _big_blob(64 * MiB + 5, 50), (0, 1): _big_blob(64 * MiB + 70, 51),
                 (1, 0): _blob(1000, 52), (1, 1): _blob(64, 53)}
        ports = (cluster.ports[1], cluster.bulk_ports[1])
        for rank in range(2):
            cluster.write(0, version, rank, blobs[(0, rank)])
        deadline = time.monotonic() + 30
        while cluster.clients[1].status().memory_used == 0:  # the first chunk's header arrived: bytes are flowing
            assert time.monotonic() < deadline, cluster.log(0)[-3000:]
        cluster.kill(1)  # SIGKILL mid-transfer: no goodbye on either plane
        cluster.restart(1)
        assert (cluster.procs[1].port, cluster.procs[1].bulk_port) == ports
        for rank in range(2):
            cluster.write(1, version, rank, blobs[(1, rank)])
        cluster.wait_complete(version, timeout=60)
        for node in range(2):
            for p in cluster.clients[node].list(version)[0].parity:
                member = blobs[(1 - node, p.local_rank)]
                assert p.complete and p.checksum == checksum(member)
                got = cluster.clients[node].get(version, kind="parity", local_rank=p.local_rank, stripe=p.stripe,
                                                index=p.index)
                assert torch.equal(got, member), (node, p.local_rank)
        log = cluster.log(0)
        assert "retrying for up to" in log and "succeeded after" in log, log[-3000:]
        status = cluster.clients[0].status()
        assert status.pushes_failed == 0 and status.pushes_over_grpc == 0
        assert cluster.clients[1].transfers["get/tcp"] == 2
    finally:
        cluster.close()


# =========================================================================== gRPC fallbacks


def test_grpc_carries_the_bytes_without_a_bulk_plane_or_when_it_fails(tmp_path):
    """Node 1 runs without a bulk plane: pushes to it and Gets from it go over gRPC; then node 0 restarts,
    first on another bulk port (the client re-learns it), then with none (the client falls back)."""
    cluster = Cluster(tmp_path, nnodes=2, nproc=1, k=1, m=1, no_bulk=(1,))
    try:
        version = 7
        blobs = {(0, 0): _blob(5 * MiB + 1, 70), (1, 0): _blob(3 * MiB + 9, 71)}
        for (node, rank), blob in blobs.items():
            cluster.write(node, version, rank, blob)
        cluster.wait_complete(version)
        _check_parity(cluster, version, blobs)
        s0, s1 = cluster.clients[0].status(), cluster.clients[1].status()
        assert s0.pushes_done == s0.pushes_over_grpc == 1  # node 0 -> node 1 (no bulk plane): gRPC
        assert s1.pushes_done == 1 and s1.pushes_over_grpc == 0  # node 1 -> node 0: the bulk plane
        assert s1.bulk_port == 0 and cluster.procs[1].bulk_port == 0 and s0.bulk_port == cluster.bulk_ports[0]
        assert "no bulk plane; shard bytes go over gRPC" in cluster.log(0)
        assert cluster.clients[1].transfers["get/grpc"] == 1 and not cluster.clients[1].transfers["get/tcp"]
        with DaemonClient(cluster.peers[1], transport="tcp") as tcp_only:
            with pytest.raises(DaemonUnavailable, match="advertises no bulk port"):
                tcp_only.get(version, kind="data", local_rank=0)

        forced = DaemonClient(cluster.peers[0], timeout=20, transport="grpc")  # a client that never uses TCP
        assert torch.equal(forced.get(version, kind="data", local_rank=0), blobs[(0, 0)])
        ch = _blob(4096, 72)
        assert forced.push_chunk(version + 1, 0, stripe=1, index=0, member=0, node=1, blob_size=4096,
                                 blob_checksum=checksum(ch), step=version + 1, chunk=ch)
        assert dict(forced.transfers) == {"get/grpc": 1, "push_chunk/grpc": 1}
        forced.close()

        client = DaemonClient(cluster.peers[0], timeout=20)
        assert torch.equal(client.get(version, kind="data", local_rank=0), blobs[(0, 0)])
        assert client.transfers["get/tcp"] == 1
        cluster.bulk_ports[0] = free_ports(1)[0]  # restart node 0 on its gRPC port but another bulk port
        assert _stop_all([cluster.procs[0]]) == [0]
        cluster.restart(0)
        assert torch.equal(client.get(version, kind="data", local_rank=0), blobs[(0, 0)])
        assert client.transfers["get/tcp"] == 2 and not client.transfers["get/grpc"]  # re-learnt, still TCP

        cluster.bulk_ports[0] = -1  # now without a bulk plane: the cached port is refused, gRPC answers
        assert _stop_all([cluster.procs[0]]) == [0]
        cluster.restart(0)
        assert torch.equal(client.get(version, kind="data", local_rank=0), blobs[(0, 0)])
        assert client.transfers["get/tcp"] == 2 and client.transfers["get/grpc"] == 1
        client.close()
    finally:
        cluster.close()
