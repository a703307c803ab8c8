"""The coordinator as a real gRPC server on loopback: authentication, and hundreds of bad requests.

Every malformed, oversized, unauthenticated or out-of-order request must get a typed
status (never crash the server, never change the job's state): after all of them the
status document is the same as before, apart from the refusal count and the clocks.
"""

from __future__ import annotations

import json
import math
import os
import random
import time

import grpc
import pytest

from plait.runtime.control import control_pb2 as pb
from plait.runtime.control.client import ControlAuthError, CoordinatorClient
from plait.runtime.control.service import MAX_MESSAGE, start_coordinator
from plait.runtime.control.state import ControlRequestError, ControlStateError
from plait.runtime.snapshot.auth import AUTH_METADATA, JobSecret

WORLD = 3


@pytest.fixture
def job(tmp_path):
    secret = JobSecret.create(tmp_path / "secret")
    coordinator = start_coordinator(job="fuzz", world=WORLD, secret=secret)
    client = CoordinatorClient(coordinator.address, secret, timeout=5.0)
    ids = {r: client.register(rank=r, world=WORLD, node=r, pid=os.getpid(), host="h", attempt=0) for r in range(WORLD)}
    for r in range(WORLD):
        client.heartbeat(rank=r, member_id=ids[r], step=10, phase="hooks", step_s=1.0, comm_s=0.25, compute_s=0.75)
    yield coordinator, client, ids, secret
    client.close()
    coordinator.stop()


def _stable(status: dict) -> dict:
    """The status without what moves by itself (clocks) or counts the refusals."""
    out = json.loads(json.dumps(status))
    for key in ("uptime_s", "refused_requests"):
        out.pop(key)
    for r in out["ranks"]:
        r.pop("seen_s_ago")
        r.pop("progress_s_ago")
    return out


def _bad_requests(rng: random.Random, ids: dict[int, int]) -> list[tuple[str, dict]]:
    """(method, fields) pairs that must each be refused."""
    weird = ["", "x" * 300, "a\x00b", "\n", "forward ", "FORWARD", "🙂", "idle\t", "x" * 65]
    cases: list[tuple[str, dict]] = []
    good_reg = dict(rank=0, world=WORLD, node=0, pid=123, host="h", attempt=0)
    for _ in range(60):
        f = dict(good_reg)
        key = rng.choice(["rank", "world", "node", "pid", "host", "attempt", "restore"])
        if key == "host":
            f["host"] = rng.choice(["", "x" * 257, "a\nb", "\x7f"])
        elif key == "restore":
            f["restore"] = rng.choice(["y" * 1025, "a\x01"])
        elif key == "world":
            f["world"] = rng.choice([0, -1, WORLD + 1, 2 ** 31 - 1])
        elif key == "rank":
            f["rank"] = rng.choice([-1, WORLD, 2 ** 31 - 1, -2 ** 31])
        elif key == "pid":
            f["pid"] = rng.choice([0, -5])
        elif key == "node":
            f["node"] = rng.choice([-1, -2 ** 31])
        else:
            f["attempt"] = rng.choice([-1, -2 ** 31])
        cases.append(("register", f))
    for _ in range(120):
        r = rng.randrange(WORLD)
        f = dict(rank=r, member_id=ids[r], step=11, phase="forward")
        key = rng.choice(["rank", "member_id", "step", "phase", "collective", "seconds", "command_done", "note"])
        if key == "rank":
            f["rank"] = rng.choice([-1, WORLD, 2 ** 31 - 1])
        elif key == "member_id":
            f["member_id"] = rng.choice([0, -1, ids[(r + 1) % WORLD], 2 ** 62])
        elif key == "step":
            f["step"] = rng.choice([9, 0, -1, -2 ** 62])  # backwards or negative
        elif key == "phase":
            f["phase"] = rng.choice(weird)
        elif key == "collective":
            f["collective"] = rng.choice(["c" * 65, "a\x02"])
        elif key == "seconds":
            f[rng.choice(["step_s", "comm_s", "compute_s", "in_collective_s"])] = rng.choice(
                [math.nan, math.inf, -math.inf, -1e-9, 1e8])
        elif key == "command_done":
            f["command_done"] = rng.choice([1, 5, -1, 2 ** 40])
        else:
            f["command_note"] = rng.choice(["n" * 257, "\x1b[2J"])
        cases.append(("heartbeat", f))
    for _ in range(30):
        cases.append(("command", rng.choice([dict(command=rng.choice(weird + ["STOP", "kill", "stop;", "reset"])),
                                             dict(command="snapshot", snapshot=True)])))
    return cases


def test_bad_requests_are_refused_typed_and_change_nothing(job):
    coordinator, client, ids, _ = job
    before = _stable(client.status())
    rng = random.Random(2026)
    cases = _bad_requests(rng, ids)
    assert len(cases) >= 200
    for method, fields in cases:
        with pytest.raises((ControlRequestError, ControlStateError)) as err:
            if method == "register":
                client.register(**fields)
            elif method == "heartbeat":
                client.heartbeat(**fields)
            else:
                client.command(**fields)
        assert str(err.value)  # says which field and why
    # heartbeats before registering: out of order
    fresh = start_coordinator(job="other", world=2, secret=job[3])
    try:
        with CoordinatorClient(fresh.address, job[3]) as other:
            with pytest.raises(ControlStateError, match="has not registered"):
                other.heartbeat(rank=1, member_id=1, step=1, phase="forward")
    finally:
        fresh.stop()
    after = client.status()
    assert after["refused_requests"] == len(cases)
    assert _stable(after) == before
    # and it still serves
    client.heartbeat(rank=0, member_id=ids[0], step=11, phase="forward")
    assert client.status()["ranks"][0]["step"] == 11


def test_garbage_bytes_and_oversized_messages_get_statuses(job):
    coordinator, client, ids, secret = job
    before = _stable(client.status())
    channel = grpc.insecure_channel(coordinator.address)
    rng = random.Random(7)
    try:
        for i in range(40):
            method = rng.choice(["Register", "Heartbeat", "Command", "Status"])
            call = channel.unary_unary(f"/plait.control.Coordinator/{method}", request_serializer=None,
                                       response_deserializer=None)
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            name = f"/plait.control.Coordinator/{method}"
            with pytest.raises(grpc.RpcError) as err:
                call(payload, timeout=5, metadata=[(AUTH_METADATA, secret.token(name))])
            assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT,
                                        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNKNOWN)
        big = pb.RegisterRequest(rank=0, world=WORLD, node=0, pid=1, host="h" * (MAX_MESSAGE + 10), attempt=0)
        call = channel.unary_unary("/plait.control.Coordinator/Register", request_serializer=None,
                                   response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(big.SerializeToString(), timeout=5,
                 metadata=[(AUTH_METADATA, secret.token("/plait.control.Coordinator/Register"))])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        channel.close()
    assert _stable(client.status()) == before


def test_callers_without_the_secret_are_refused_before_parsing(job, tmp_path):
    coordinator, client, ids, secret = job
    before = _stable(client.status())
    other = JobSecret.create(tmp_path / "other")
    with CoordinatorClient(coordinator.address, other) as stranger:
        with pytest.raises(ControlAuthError, match="not this job's"):
            stranger.command("stop")
        with pytest.raises(ControlAuthError):
            stranger.register(rank=0, world=WORLD, node=0, pid=1, host="h", attempt=5)
    channel = grpc.insecure_channel(coordinator.address)
    call = channel.unary_unary("/plait.control.Coordinator/Command", request_serializer=None,
                               response_deserializer=None)
    request = pb.CommandRequest(command="stop").SerializeToString()
    try:
        for metadata, why in (([], "no plait-auth"), ([(AUTH_METADATA, "1.2.3")], "wrong"),
                              ([(AUTH_METADATA, "garbage")], "malformed")):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=5, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in err.value.details()
        token = secret.token("/plait.control.Coordinator/Status")
        status = channel.unary_unary("/plait.control.Coordinator/Status", request_serializer=None,
                                     response_deserializer=None)
        status(b"", timeout=5, metadata=[(AUTH_METADATA, token)])
        with pytest.raises(grpc.RpcError) as err:  # the same token again: a replay
            status(b"", timeout=5, metadata=[(AUTH_METADATA, token)])
        assert "replayed" in err.value.details()
        stale = f"{int(time.time()) - 3600}.abcd.{secret._grpc_mac('/plait.control.Coordinator/Status', str(int(time.time()) - 3600), 'abcd')}"
        with pytest.raises(grpc.RpcError) as err:
            status(b"", timeout=5, metadata=[(AUTH_METADATA, stale)])
        assert "clocks must agree" in err.value.details()
    finally:
        channel.close()
    assert _stable(client.status()) == before  # no stop was queued
    assert coordinator.refusals.total == 7  # two of the stranger, three malformed, a replay, a stale token


def test_generated_modules_are_current(tmp_path):
    pytest.importorskip("grpc_tools")
    from plait.runtime.control import gen_proto

    for path in gen_proto.generate(tmp_path):
        checked_in = gen_proto.HERE / path.name
        assert path.read_bytes() == checked_in.read_bytes(), f"{path.name} is stale: run python -m {gen_proto.__name__}"
