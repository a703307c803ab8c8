"""From a cluster file to the network that rehearses it: the scale, each node's shaped link, the uplinks."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from plait.runtime.rehearsal.net import NetPlan, NodeLink, UplinkLink
from plait.scheduler.cluster import ClusterSpec, Scale, check_rates, resolve_scale, shaped_rate_bit_s

# A tag is at most 12 of [a-z0-9]: 8 from the cluster's name, so `ip netns` lists say whose network it
# is, and 4 random ones, so the same cluster can be up twice.
_NAME_CHARS = 8


@dataclass(frozen=True)
class Rehearsal:
    spec: ClusterSpec
    scale: Scale
    plan: NetPlan


def cluster_tag(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())[:_NAME_CHARS] + secrets.token_hex(2)


def rehearse(spec: ClusterSpec, tag: str) -> Rehearsal:
    """The network plan of ``spec``; with ``emulate.scale: auto`` this measures a worker's FLOP/s first.

    Raises :class:`~plait.scheduler.cluster.ClusterError` when a link would shape outside what tc does
    faithfully at that scale.
    """
    worker_flops = None
    if spec.scale is None:
        from plait.runtime.peak import cpu_peak_flops

        # Every node's workers run on this machine at once, so they share its cores.
        worker_flops = cpu_peak_flops(spec.world)
    scale = resolve_scale(spec, worker_flops)
    check_rates(spec, scale)
    nodes = tuple(
        NodeLink(node.rank, shaped_rate_bit_s(node.nic.gbit, scale.value), group=spec.group_index(node.rank),
                 latency_s=node.nic.latency_us * 1e-6 if node.nic.latency_us is not None else None)
        for node in spec.nodes)
    groups = list(spec.groups)
    uplinks = tuple(UplinkLink(groups.index(uplink.groups[0]), groups.index(uplink.groups[1]),
                               shaped_rate_bit_s(uplink.gbit, scale.value)) for uplink in spec.uplinks)
    return Rehearsal(spec, scale, NetPlan(tag, nodes, uplinks))
