"""Calls to the coordinator, for workers (register, heartbeat) and for users (status, commands).

Every call carries the job secret's token and a deadline: a coordinator that hangs costs
a caller ``timeout`` seconds, never more. gRPC statuses come back as the coordinator's
typed errors (:class:`~.state.ControlRequestError`, :class:`~.state.ControlStateError`),
:class:`ControlAuthError` (UNAUTHENTICATED) or :class:`CoordinatorUnavailable`.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import grpc

from plait.runtime.control import control_pb2 as pb
from plait.runtime.control import control_pb2_grpc as pb_grpc
from plait.runtime.control.state import ControlError, ControlRequestError, ControlStateError
from plait.runtime.snapshot.auth import JobSecret
from plait.runtime.snapshot.transport.channel import authenticated_channel

__all__ = ["ControlAuthError", "CoordinatorUnavailable", "CoordinatorClient"]


class ControlAuthError(ControlError):
    """The coordinator refused the caller's token: not this job's secret (UNAUTHENTICATED)."""

    code = "UNAUTHENTICATED"


class CoordinatorUnavailable(ControlError):
    """The coordinator did not answer in time or is not running (UNAVAILABLE, DEADLINE_EXCEEDED)."""

    code = "UNAVAILABLE"


_BY_CODE = {grpc.StatusCode.INVALID_ARGUMENT: ControlRequestError, grpc.StatusCode.FAILED_PRECONDITION: ControlStateError,
            grpc.StatusCode.UNAUTHENTICATED: ControlAuthError, grpc.StatusCode.UNAVAILABLE: CoordinatorUnavailable,
            grpc.StatusCode.DEADLINE_EXCEEDED: CoordinatorUnavailable}


class CoordinatorClient:
    """One channel to the coordinator at ``address`` (HOST:PORT)."""

    def __init__(self, address: str, secret: JobSecret, timeout: float = 5.0):
        self.address = address
        self.timeout = timeout
        self._raw, channel = authenticated_channel(address, secret)
        self._stub = pb_grpc.CoordinatorStub(channel)

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise(self, err: grpc.RpcError) -> NoReturn:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        cls = _BY_CODE.get(code, ControlError)
        detail = err.details() if hasattr(err, "details") else str(err)
        if cls is CoordinatorUnavailable:
            detail = f"the coordinator at {self.address} did not answer ({code.name}: {detail})"
        raise cls(detail) from None

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            self._raise(err)

    def register(self, *, rank: int, world: int, node: int, pid: int, host: str, attempt: int,
                 restore: str = "") -> int:
        reply = self._call(self._stub.Register, pb.RegisterRequest(rank=rank, world=world, node=node, pid=pid, host=host,
                                                                   attempt=attempt, restore=restore))
        return reply.member_id

    def heartbeat(self, **fields: Any) -> pb.HeartbeatReply:
        return self._call(self._stub.Heartbeat, pb.HeartbeatRequest(**fields))

    def status(self) -> dict[str, Any]:
        return json.loads(self._call(self._stub.Status, pb.StatusRequest(), timeout=max(self.timeout, 10.0)).json)

    def command(self, command: str, snapshot: bool = False) -> pb.CommandReply:
        return self._call(self._stub.Command, pb.CommandRequest(command=command, snapshot=snapshot))
