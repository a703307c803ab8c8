"""From a cluster file to the network that rehearses it: scaled rates, groups and uplinks.

The scale keeps the described cluster's ratio of compute to communication: a CPU worker
computes orders of magnitude slower than the device described, so every link is slowed
by the same factor, ``scale = worker FLOP/s ÷ device FLOP/s`` (``emulate.scale: auto``,
measured here), or the cluster file's number.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from plait.runtime.rehearsal.net import NetPlan, NodeLink, UplinkLink
from plait.scheduler.cluster import ClusterSpec, Scale, check_rates, resolve_scale, shaped_rate_bit_s


# A tag is at most 12 of [a-z0-9]: 8 from the cluster's name, so `ip netns` lists say whose network it
# is, and 4 random ones, so the same cluster can be up twice.
_NAME_CHARS = 8


def cluster_tag(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())[:_NAME_CHARS] + secrets.token_hex(2)


@dataclass(frozen=True)
class Rehearsal:
    spec: ClusterSpec
    scale: Scale
    plan: NetPlan

    def rate_bit_s(self, node: int) -> float:
        return next(link.rate_bit_s for link in self.plan.nodes if link.node == node)


def worker_flops(spec: ClusterSpec) -> float:
    """One rehearsal worker's measured compute rate: this machine's cores are shared by every emulated worker."""
    from plait.runtime.peak import cpu_peak_flops

    return cpu_peak_flops(spec.world)


def rehearse(spec: ClusterSpec, tag: str, *, measured_flops: float | None = None) -> Rehearsal:
    """The network plan of ``spec`` (its rates checked against what tc can shape here)."""
    if spec.scale is None and measured_flops is None:
        measured_flops = worker_flops(spec)
    scale = resolve_scale(spec, measured_flops if spec.scale is None else None)
    check_rates(spec, scale)
    groups = {name: i for i, name in enumerate(spec.groups)}
    nodes = tuple(
        NodeLink(node=n.rank, rate_bit_s=shaped_rate_bit_s(n.nic.gbit, scale.value), group=spec.group_index(n.rank),
                 latency_s=n.nic.latency_us * 1e-6 if n.nic.latency_us else None)
        for n in spec.nodes
    )
    uplinks = tuple(UplinkLink(a=groups[u.groups[0]], b=groups[u.groups[1]],
                               rate_bit_s=shaped_rate_bit_s(u.gbit, scale.value)) for u in spec.uplinks)
    return Rehearsal(spec, scale, NetPlan(tag=tag, nodes=nodes, uplinks=uplinks))
