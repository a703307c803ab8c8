"""The emulated cluster's network: one network namespace per node, joined through bridges in a hub namespace.

Node R lives in namespace ``plait-<tag>-n<R>`` with interface ``plait0`` and address 198.18.0.0 + R + 1
(RFC 2544's benchmarking range, a /15, so nothing here can collide with a real network). Its veth peer
``n<R>`` sits in ``plait-<tag>-hub`` on bridge ``br<G>`` of the node's group; an uplink joins two groups'
bridges with a veth pair ``u<A>x<B>``/``u<B>x<A>``. Both ends of every link are shaped, so each direction
is limited on its sender's side. Everything but the namespaces themselves is made inside them: the root
namespace gains no interface and no route, and no namespace has a default route, so nothing leaves.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import subprocess
from dataclasses import dataclass

from plait.errors import ConfigError
from plait.runtime.rehearsal import namespaces, owners
from plait.runtime.rehearsal.namespaces import NetworkError, ip, tc

_TAG = re.compile(r"[a-z0-9]{1,12}")
_BASE = ipaddress.IPv4Address("198.18.0.0")
_PREFIX = 15
# Queueing time each shaper allows before it drops: enough for TCP to keep the link full (a veth's round
# trip is microseconds), short enough that a collective's latency is not dominated by the queue.
_QUEUE_S = 0.05
# A millisecond at the link's rate, at least two full frames. Measured with one TCP stream: 95.3-95.6 %
# of the rate (TCP's payload share) from 10 Mbit/s to 1 Gbit/s. A fixed 64 KiB burst is half a second at
# 1 Mbit/s: an idle link then sends that much at once, and a 1.5 s measurement overshot by 24 %.
_BURST_S = 1e-3
_MIN_BURST = 2 * 1514
# At least 16 frames of queue (0.2 s at 1 Mbit/s): on a slow link, 50 ms is only a few frames.
_MIN_QUEUE = 16
_MAX_GROUPS = 100_000


@dataclass(frozen=True)
class NodeLink:
    node: int
    rate_bit_s: float
    group: int = 0
    latency_s: float | None = None  # one-way delay added to each direction of the node's link


@dataclass(frozen=True)
class UplinkLink:
    a: int  # groups, each a bridge of the nodes with that group
    b: int
    rate_bit_s: float


@dataclass(frozen=True)
class NetPlan:
    tag: str
    nodes: tuple[NodeLink, ...]
    uplinks: tuple[UplinkLink, ...] = ()

    def __post_init__(self):
        if not _TAG.fullmatch(self.tag):
            raise ConfigError("net.tag", self.tag, "accepted: 1 to 12 of a-z and 0-9")
        seen = set()
        for link in self.nodes:
            if link.node < 0 or link.node in seen or link.node >= 2 ** (32 - _PREFIX) - 2:
                raise ConfigError("net.nodes.node", link.node, "accepted: distinct ranks from 0 to 131069")
            seen.add(link.node)
            _check_rate("net.nodes.rate_bit_s", link.rate_bit_s)
            # Groups name interfaces (br<G>, u<A>x<B>), and Linux allows 15 characters.
            if not 0 <= link.group < _MAX_GROUPS:
                raise ConfigError("net.nodes.group", link.group, f"accepted: 0 to {_MAX_GROUPS - 1}")
            if link.latency_s is not None and link.latency_s < 0:
                raise ConfigError("net.nodes.latency_s", link.latency_s, "accepted: seconds >= 0, or None")
        groups = {link.group for link in self.nodes}
        # Bridges joined in a loop would forward broadcasts forever (the bridges run no spanning tree).
        joined = {g: g for g in groups}

        def root(g: int) -> int:
            while joined[g] != g:
                g = joined[g]
            return g

        for uplink in self.uplinks:
            for end in (uplink.a, uplink.b):
                if end not in groups:
                    raise ConfigError("net.uplinks", end, f"accepted: a group some node is in, {sorted(groups)}")
            _check_rate("net.uplinks.rate_bit_s", uplink.rate_bit_s)
            if root(uplink.a) == root(uplink.b):
                raise ConfigError("net.uplinks", (uplink.a, uplink.b),
                                  "accepted: uplinks that join groups without a loop (a tree)")
            joined[root(uplink.a)] = root(uplink.b)


def _check_rate(key: str, rate_bit_s: float) -> None:
    if not rate_bit_s >= 8000:
        raise ConfigError(key, rate_bit_s, "accepted: bit/s, at least 8000")


def new_tag() -> str:
    return secrets.token_hex(4)


def _netem_exists(hub: str) -> bool:
    """Whether this kernel has netem: try it on the hub's loopback, which carries none of the network's traffic."""
    probe = subprocess.run(["tc", "-n", hub, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                           capture_output=True)
    if probe.returncode != 0:
        return False
    tc(hub, "qdisc", "del", "dev", "lo", "root")
    return True


def _shape(namespace: str, dev: str, rate_bit_s: float, latency_s: float | None, *, new: bool) -> None:
    """Limit ``dev``'s egress to ``rate_bit_s`` with one htb class (rate = ceil).

    htb, not tbf: tbf must cut a veth's GSO packets (up to 64 KiB) down to its burst, htb lets a packet
    larger than the burst through on credit and makes the class wait it off. The rate counts whole frames,
    headers included, like a NIC's line rate: TCP moves 1448 of every 1514 bytes, 95.6 % of the rate.
    ``new`` adds the root qdisc; htb cannot be changed in place, but its class and leaf can (set_rate).
    """
    rate = f"{int(rate_bit_s)}bit"
    burst = str(max(_MIN_BURST, int(rate_bit_s / 8 * _BURST_S)))
    if new:
        tc(namespace, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
    tc(namespace, "class", "replace", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate,
       "ceil", rate, "burst", burst, "cburst", burst, "quantum", "65536")
    # netem holds each packet for the delay before the queue drains, so its limit covers both.
    limit = str(max(_MIN_QUEUE, int(rate_bit_s / 8 * (_QUEUE_S + (latency_s or 0)) / 1514)))
    if latency_s:
        tc(namespace, "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
           "delay", f"{latency_s * 1e6:.0f}us", "limit", limit)
    else:
        tc(namespace, "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:", "pfifo", "limit", limit)


class Network:
    """One emulated cluster's network; ``with Network(plan):`` builds it and removes it again.

    ``latency_emulated`` is True once ``up()`` applied the plan's latencies, which needs netem in the
    kernel; without it a latency is only recorded in the plan. A ``persistent`` network is meant to outlive
    the process that builds it: no reaper removes it, only ``down()``.
    """

    ifname: str = "plait0"

    def __init__(self, plan: NetPlan, *, persistent: bool = False):
        self.plan = plan
        self.persistent = persistent
        self.hub = f"plait-{plan.tag}-hub"
        self._links = {link.node: link for link in plan.nodes}
        self.latency_emulated = False

    def namespace(self, node: int) -> str:
        self._link(node)
        return f"plait-{self.plan.tag}-n{node}"

    def address(self, node: int) -> str:
        self._link(node)
        return str(_BASE + node + 1)

    def namespaces(self) -> list[str]:
        return [self.hub] + [self.namespace(link.node) for link in self.plan.nodes]

    def up(self) -> None:
        """Build the network; on any failure remove what was made and raise :class:`NetworkError`."""
        namespaces.require_root()
        # The record first, naming every namespace to come: whatever dies midway, reap_stale finds it all.
        owners.claim(self.plan.tag, self.namespaces(), persistent=self.persistent)
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        hub = self.hub
        ip(None, "netns", "add", hub)
        ip(hub, "link", "set", "lo", "up")
        wants_latency = any(link.latency_s for link in self.plan.nodes)
        self.latency_emulated = wants_latency and _netem_exists(hub)
        for group in sorted({link.group for link in self.plan.nodes}):
            ip(hub, "link", "add", f"br{group}", "type", "bridge")
            ip(hub, "link", "set", f"br{group}", "up")
        for link in self.plan.nodes:
            node_ns = self.namespace(link.node)
            ip(None, "netns", "add", node_ns)
            ip(hub, "link", "add", f"n{link.node}", "type", "veth", "peer", "name", self.ifname, "netns", node_ns)
            ip(hub, "link", "set", f"n{link.node}", "master", f"br{link.group}", "up")
            ip(node_ns, "link", "set", "lo", "up")
            ip(node_ns, "addr", "add", f"{self.address(link.node)}/{_PREFIX}", "dev", self.ifname)
            ip(node_ns, "link", "set", self.ifname, "up")
            self._shape_node(link.node, link.rate_bit_s, new=True)
        for uplink in self.plan.uplinks:
            a_end, b_end = f"u{uplink.a}x{uplink.b}", f"u{uplink.b}x{uplink.a}"
            ip(hub, "link", "add", a_end, "type", "veth", "peer", "name", b_end)
            ip(hub, "link", "set", a_end, "master", f"br{uplink.a}", "up")
            ip(hub, "link", "set", b_end, "master", f"br{uplink.b}", "up")
            _shape(hub, a_end, uplink.rate_bit_s, None, new=True)
            _shape(hub, b_end, uplink.rate_bit_s, None, new=True)

    def down(self) -> None:
        """Kill every process in the network's namespaces, delete them and the record; safe to repeat."""
        namespaces.remove(self.namespaces())
        owners.remove_record(self.plan.tag)

    def __enter__(self) -> Network:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def exec_prefix(self, node: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(node)]

    def pids(self, node: int) -> list[int]:
        return namespaces.pids(self.namespace(node))

    def kill_all(self, node: int) -> list[int]:
        return namespaces.kill_all(self.namespace(node))

    def set_link(self, node: int, up: bool) -> None:
        """Take the node's link down (both ends: neither side sends) or bring it back up."""
        state = "up" if up else "down"
        ip(self.hub, "link", "set", f"n{node}", state)
        ip(self.namespace(node), "link", "set", self.ifname, state)

    def set_rate(self, node: int, rate_bit_s: float) -> None:
        """Shape the node's link to a new rate in both directions (a slow-link fault)."""
        _check_rate("rate_bit_s", rate_bit_s)
        self._shape_node(node, rate_bit_s, new=False)

    def _shape_node(self, node: int, rate_bit_s: float, *, new: bool) -> None:
        latency_s = self._link(node).latency_s if self.latency_emulated else None
        _shape(self.namespace(node), self.ifname, rate_bit_s, latency_s, new=new)
        _shape(self.hub, f"n{node}", rate_bit_s, latency_s, new=new)

    def _link(self, node: int) -> NodeLink:
        if node not in self._links:
            raise NetworkError(f"network {self.plan.tag} has no node {node} (nodes: {sorted(self._links)})")
        return self._links[node]
