"""The rendezvous endpoint of a multi-node job: its store, and this node's address on the way to it.

Every node's ``plait train --rdzv HOST:PORT`` connects to one TCPStore at HOST:PORT. The
process that can bind HOST:PORT hosts it (as torchrun's c10d backend decides with
``is_host``), the others are clients; torch's elastic rendezvous then shares the same
server (a multi-tenant TCPStore), so plait's keys and the rendezvous live in one place and
the store lives as long as the hosting agent, as torchrun's does.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass
from datetime import timedelta

from plait.errors import CLIError, LaunchError

SIOCGIFADDR = 0x8915  # <linux/sockios.h>: an interface's IPv4 address


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, flag: str = "--rdzv") -> Endpoint:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CLIError(f"{flag}: got {text!r}; accepted: HOST:PORT, e.g. node0.cluster:29400 or 10.0.0.1:29400")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def owns(host: str) -> bool:
    """Whether one of this machine's interfaces holds ``host``'s address.

    A TCPStore server listens on every address of its port, so that it could bind says
    nothing of whether its clients will reach it there: in a network namespace of its own
    every node could bind the port, and each would host a store of one.
    """
    if host in (socket.gethostname(), socket.getfqdn()):
        return True  # a distribution may map its own name to 127.0.1.1, which no interface lists
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
    except socket.gaierror:
        return False
    return any(ipaddress.IPv4Address(info[4][0]).is_loopback or interface_of(info[4][0]) is not None for info in infos)


def connect_store(endpoint: Endpoint, *, timeout: timedelta, host_store: bool | None = None):
    """(store, hosts_it): host the store when this machine holds the endpoint's address and its port is free (the
    first of several nodes on one machine takes it), else join it as a client.

    ``host_store`` forces the choice. A client waits up to ``timeout`` for the host to come up.
    """
    from torch.distributed import TCPStore

    if host_store is None and not owns(endpoint.host):
        host_store = False
    if host_store is not False:
        try:
            return TCPStore(endpoint.host, endpoint.port, is_master=True, multi_tenant=True, wait_for_workers=False,
                            timeout=timeout), True
        except (RuntimeError, ValueError, OSError) as err:
            if host_store:
                raise LaunchError(f"--rdzv {endpoint}: cannot host the rendezvous store there ({err})") from None
    try:
        return TCPStore(endpoint.host, endpoint.port, is_master=False, timeout=timeout), False
    except (RuntimeError, ValueError, OSError, TimeoutError) as err:
        raise LaunchError(f"--rdzv {endpoint}: no rendezvous store answered within {timeout.total_seconds():.0f} s "
                          f"({err}); start the node that owns {endpoint.host} (it hosts the store), or check the "
                          "address and that the port is reachable") from None


def node_address(endpoint: Endpoint) -> str:
    """The address this machine reaches the endpoint from: the one its peers can reach it at.

    A UDP socket's connect() picks the route and source address without sending anything.
    """
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, socket.AF_INET, socket.SOCK_DGRAM)
    except socket.gaierror as err:
        raise CLIError(f"--rdzv {endpoint}: cannot resolve {endpoint.host} ({err})") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(infos[0][4])
        except OSError as err:
            raise LaunchError(f"--rdzv {endpoint}: no route to {endpoint.host} from this node ({err})") from None
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The network interface holding IPv4 ``address`` (gloo binds to it by name), None if none does."""
    want = ipaddress.IPv4Address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = array.array("B", struct.pack("256s", name.encode()[:15]))
            try:
                fcntl.ioctl(s.fileno(), SIOCGIFADDR, request, True)
            except OSError:  # no IPv4 address on it
                continue
            if ipaddress.IPv4Address(bytes(request[20:24])) == want:
                return name
    return None


def wait_key(store, key: str, *, timeout: float, what: str) -> bytes:
    """The value of ``key``, waiting up to ``timeout`` seconds for another node to set it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.wait([key], timedelta(seconds=max(0.1, min(5.0, deadline - time.monotonic()))))
            return store.get(key)
        except (RuntimeError, TimeoutError):
            if time.monotonic() >= deadline:
                raise LaunchError(f"waited {timeout:.0f} s for {what}; is every node of the job started?") from None
