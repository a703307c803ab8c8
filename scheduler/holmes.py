"""Placement on heterogeneous NICs (after Holmes): which node runs which block of ranks.

plait numbers ranks with pp outermost and tp fastest, so with ``P`` workers per node the
heaviest axes (tp, then cp, etp, ep) already fall inside a node when they fit in ``P``
ranks, and each pipeline stage is a run of consecutive blocks of ``P`` ranks. What a
placement decides is the order of the nodes: which nodes make up each stage. Holmes'
rule: keep the data-parallel groups of a stage inside one NIC class and one node group,
and let the pipeline, whose traffic is light, cross the slow links and the uplinks
between node groups. Here that is a sort of the nodes by (node group, NIC speed, device
speed); ``auto`` costs the file's order and the sorted orders with the step-time model
and keeps the fastest, so a placement is never predicted slower than the default.

When the stages then run on devices of different speeds, layers are split in proportion
to each stage's speed (the self-adapting partition), with the head counted on the last.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.scheduler.cluster import ClusterSpec
from plait.scheduler.comm_volume import Layout
from plait.scheduler.spec import ModelSpec
from plait.scheduler.timing import OPS_PER_LAYER, DeviceRate, NodeView, Topology, forward_flops


@dataclass(frozen=True)
class Placed:
    """A node order, the rank→node list it gives, and the stage split that goes with it."""

    order: tuple[int, ...]  # order[i]: the cluster node that runs rank block i
    topology: Topology
    stage_layers: list[int] | None  # None: the runtime's uniform split
    strategy: str
    per_node: int

    @property
    def nodes(self) -> tuple[int, ...]:
        """``nodes[r]``: the cluster node of layout rank r (``parallel.placement``)."""
        return tuple(self.order[r // self.per_node] for r in range(len(self.order) * self.per_node))

    @property
    def is_default(self) -> bool:
        return self.order == tuple(range(len(self.order)))

    @classmethod
    def default(cls, cluster: ClusterSpec, lay: Layout) -> Placed:
        return _placed(cluster, tuple(range(cluster.nnodes)), None, "default")

    def describe(self, cluster: ClusterSpec) -> str:
        P = cluster.workers_per_node
        blocks = [f"{cluster.nodes[n].name}({cluster.nodes[n].nic.name})={i * P}-{i * P + P - 1}"
                  for i, n in enumerate(self.order)]
        if len(blocks) > 8:
            blocks = blocks[:4] + [f"… {len(blocks) - 6} more …"] + blocks[-2:]
        return ("default rank order" if self.is_default else "ranks " + ", ".join(blocks))


_TOPOLOGIES: dict[tuple[int, tuple[int, ...]], tuple[ClusterSpec, Topology]] = {}


def topology(cluster: ClusterSpec, order: tuple[int, ...]) -> Topology:
    """The cost model's view of ``cluster`` with its nodes in ``order`` (kept: a search asks for few orders often)."""
    key = (id(cluster), order)
    found = _TOPOLOGIES.get(key)
    if found is not None and found[0] is cluster:
        return found[1]
    if len(_TOPOLOGIES) > 64:
        _TOPOLOGIES.clear()
    topo = _topology(cluster, order)
    _TOPOLOGIES[key] = (cluster, topo)
    return topo


def _topology(cluster: ClusterSpec, order: tuple[int, ...]) -> Topology:
    groups = {name: i for i, name in enumerate(cluster.groups)}
    views = []
    for n in order:
        node = cluster.nodes[n]
        views.append(NodeView(nic_bit_s=node.nic.gbit * 1e9, nic_latency_s=(node.nic.latency_us or 0.0) * 1e-6,
                              link_bit_s=node.device.link_gbit * 1e9 if node.device.link_gbit else None,
                              device=node.device.name, group=cluster.group_index(n)))
    uplinks = {}
    latency = 0.0
    for up in cluster.uplinks:
        a, b = groups[up.groups[0]], groups[up.groups[1]]
        uplinks[(min(a, b), max(a, b))] = up.gbit * 1e9
        latency = max(latency, (up.latency_us or 0.0) * 1e-6)
    return Topology(nodes=tuple(views), per_node=cluster.workers_per_node, uplink_bit_s=uplinks,
                    uplink_latency_s=latency)


def _placed(cluster: ClusterSpec, order: tuple[int, ...], layers: list[int] | None, strategy: str) -> Placed:
    return Placed(order=order, topology=topology(cluster, order), stage_layers=layers, strategy=strategy,
                  per_node=cluster.workers_per_node)


def speed_split(spec: ModelSpec, lay: Layout, stage_rates: list[DeviceRate], n: int = 1) -> list[int] | None:
    """Layers per virtual stage in proportion to the speed of the pp rank running it; None when all are alike.

    A layer's time on a rank is its FLOPs (on ``n`` tokens) over the rank's rate plus its
    operations' fixed cost; the head counts on the last stage. Layers go one at a time to
    the virtual stage whose rank would finish soonest with it.
    """
    if lay.pp == 1 or len(set(stage_rates)) == 1:
        return None
    stages = lay.pp * lay.vpp
    layer_f, head_f = forward_flops(spec, lay, n)

    def layer_time(v: int) -> float:
        rate = stage_rates[v % lay.pp]
        return layer_f / rate.flops + OPS_PER_LAYER * rate.op_overhead_s

    counts = [1] * stages
    per_rank = [0.0] * lay.pp
    for v in range(stages):
        per_rank[v % lay.pp] += layer_time(v)
    per_rank[(stages - 1) % lay.pp] += head_f / stage_rates[(stages - 1) % lay.pp].flops
    for _ in range(spec.layers - stages):
        v = min(range(stages), key=lambda s: per_rank[s % lay.pp] + layer_time(s))
        counts[v] += 1
        per_rank[v % lay.pp] += layer_time(v)
    return counts


_ORDERS: dict[int, tuple[ClusterSpec, dict[str, tuple[int, ...]]]] = {}


def candidate_orders(cluster: ClusterSpec) -> dict[str, tuple[int, ...]]:
    """The node orders a placement considers: the file's, and sorts by node group / NIC / device speed."""
    found = _ORDERS.get(id(cluster))
    if found is not None and found[0] is cluster:
        return found[1]
    if len(_ORDERS) > 16:
        _ORDERS.clear()
    orders = _candidate_orders(cluster)
    _ORDERS[id(cluster)] = (cluster, orders)
    return orders


def _candidate_orders(cluster: ClusterSpec) -> dict[str, tuple[int, ...]]:
    nodes = cluster.nodes

    def key_group_first(n: int):
        return (cluster.group_index(n), -nodes[n].nic.gbit, -nodes[n].device.peak_tflops, n)

    def key_nic_first(n: int):
        return (-nodes[n].nic.gbit, cluster.group_index(n), -nodes[n].device.peak_tflops, n)

    orders = {"default": tuple(range(cluster.nnodes)),
              "holmes": tuple(sorted(range(cluster.nnodes), key=key_group_first)),
              "holmes-nic": tuple(sorted(range(cluster.nnodes), key=key_nic_first))}
    unique: dict[tuple[int, ...], str] = {}
    for name, order in orders.items():
        unique.setdefault(order, name)
    return {name: order for order, name in unique.items()}


def place(cluster: ClusterSpec, lay: Layout, spec: ModelSpec, rates: dict[str, DeviceRate], *,
          strategy: str = "auto", global_batch: int | None = None, micro_batch: int | None = None,
          transport=None) -> Placed:
    """The placement ``strategy`` names: ``default``, ``holmes``, or ``auto`` (the fastest of the orders)."""
    from plait.scheduler.timing import step_time

    orders = candidate_orders(cluster)
    if strategy != "auto":
        names = [strategy if strategy in orders else "default"]
    else:
        names = list(orders)
    best, best_time = None, None
    for name in names:
        order = orders[name]
        topo = topology(cluster, order)
        stage = lay.world // lay.pp
        stage_rates = [min((rates[name] for name in topo.stage(stage, p).devices), key=lambda r: r.flops)
                       for p in range(lay.pp)]
        mb = micro_batch or 1
        gb = global_batch or lay.dp * mb
        split = speed_split(spec, lay, stage_rates, mb * spec.seq_len // (lay.cp * lay.tp))
        t = None
        if split is not None:  # kept only where it beats the uniform split (more layers also mean more gradients)
            t = step_time(spec, lay, topo, rates, global_batch=gb, micro_batch=mb, stage_layers=split, transport=transport).total
            uniform = step_time(spec, lay, topo, rates, global_batch=gb, micro_batch=mb, transport=transport).total
            if uniform <= t:
                split, t = None, uniform
        placed = _placed(cluster, order, split, name)
        if len(names) == 1:
            return placed
        if t is None:
            t = step_time(spec, lay, topo, rates, global_batch=gb, micro_batch=mb, transport=transport).total
        if best_time is None or t < best_time * 0.999:
            best, best_time = placed, t
    return best
