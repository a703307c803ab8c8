"""Step time of a layout under a placement: compute, every collective over the link it crosses, the bubble.

**Compute.** Forward FLOPs per rank and micro-batch of each virtual stage (backward is
twice that), over the achieved rate of the stage's slowest device
(:class:`DeviceRate`: a peak times a measured efficiency), plus a fixed cost per
operation (a kernel launch on a GPU, Python dispatch on a CPU).

**Communication.** The bytes are :mod:`plait.scheduler.comm_volume`'s, per rank. Each
group of a mesh axis is placed by the rank→node map: inside one node it runs at the
device link (``devices.<kind>.link_gbit``); across nodes, all groups of the axis that
share a node share its NIC, and a ring's slowest member sets the pace; groups that span
two node groups (``uplinks``) share the uplink too. Wire bytes per rank follow the ring
algorithms: all_gather ``(g−1)·shard``, reduce_scatter ``(g−1)/g·B``, all_reduce
``2·(g−1)/g·B``, all_to_all ``(g−1)/g·B``, send ``B``; a transport reaches a measured
fraction of that (:class:`Transport`), and every call pays the link's latency.

**What overlaps.** Nothing, as plait runs today: tp, cp and expert collectives block
inside their layer, pipeline receives block (sends do not), and the data-parallel
reduce-scatter / all-gather run after the last backward. The pipeline makespan is
``A·max_p C_p + (pp−1)·c̄`` for A micro-batches, C_p the work of pp rank p per
micro-batch and c̄ one virtual stage's: the 1F1B fill and drain, shortened by vpp under
the interleaved schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from plait.scheduler.comm_volume import Layout, rank_buckets, uniform_stage_layers
from plait.scheduler.spec import ModelSpec

FP32 = 4
OPS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send")


@dataclass(frozen=True)
class DeviceRate:
    """What one device achieves on this model: FLOP/s on its matrix products, and a fixed cost per operation."""

    flops: float
    op_overhead_s: float = 0.0


@dataclass(frozen=True)
class Transport:
    """Achieved share of a link's rate per collective, and the latency of a call inside a node.

    Defaults describe a collective library near its bus bandwidth; the rehearsal's TCP
    transport is measured (``plait bench plan-accuracy`` records its numbers).
    """

    efficiency: dict[str, float] = field(default_factory=lambda: {op: 0.8 for op in OPS})
    intra_latency_s: float = 5e-6

    def eff(self, op: str) -> float:
        return self.efficiency.get(op, 0.8)


@dataclass(frozen=True)
class NodeView:
    """One node as the cost model sees it: its NIC, device and node group."""

    nic_bit_s: float
    nic_latency_s: float
    link_bit_s: float | None  # between devices of the node; None: not described (free)
    device: str
    group: int


@dataclass(frozen=True)
class Topology:
    """Nodes in rank order: layout rank r runs on ``nodes[r // per_node]``; uplinks between node groups."""

    nodes: tuple[NodeView, ...]
    per_node: int
    uplink_bit_s: dict[tuple[int, int], float]  # (group a, group b), a < b
    uplink_latency_s: float = 0.0

    def uplink(self, a: int, b: int) -> float:
        return self.uplink_bit_s.get((min(a, b), max(a, b)), math.inf)


@dataclass
class StepTime:
    """Seconds of one step and where they go."""

    total: float
    compute: float  # the busiest pp rank's compute over all micro-batches
    pipeline: float  # makespan of forward/backward, with in-layer collectives and boundary transfers
    bubble: float  # idle share of the pipeline makespan
    data_parallel: float  # gradient reduce-scatter, parameter all-gather, norm all-reduce
    by_axis: dict[str, float]  # seconds of communication per axis on the critical rank
    link_bytes: dict[str, int]  # bytes per link class over the whole step, all ranks
    slowest_link: str  # the link class that carries the most seconds


def _span(size: int, stride: int, per_node: int) -> int:
    """Members of one group on one node: the group's ranks are ``stride`` apart."""
    if stride * size <= per_node:
        return size
    if stride >= per_node:
        return 1
    return per_node // stride


def _wire(op: str, g: int, nbytes: float) -> float:
    """Bytes one rank puts on the wire (ring algorithms); ``nbytes`` as the ledger records it."""
    if g <= 1:
        return 0.0
    if op == "all_gather":
        return (g - 1) * nbytes
    if op == "reduce_scatter":
        return (g - 1) / g * nbytes
    if op == "all_reduce":
        return 2 * (g - 1) / g * nbytes
    if op == "all_to_all":
        return (g - 1) / g * nbytes
    return nbytes


class _Costs:
    """Seconds of collectives for one layout on one topology, stage by stage."""

    def __init__(self, topo: Topology, lay: Layout, transport: Transport):
        self.topo, self.lay, self.transport = topo, lay, transport
        self.stage = lay.world // lay.pp
        self.link_bytes: dict[str, float] = {}
        self.link_seconds: dict[str, float] = {}

    def stage_nodes(self, p: int) -> list[NodeView]:
        P = self.topo.per_node
        first, last = p * self.stage // P, ((p + 1) * self.stage - 1) // P
        return list(self.topo.nodes[first:last + 1])

    def _count(self, link: str, nbytes: float, seconds: float, calls: float) -> None:
        self.link_bytes[link] = self.link_bytes.get(link, 0.0) + nbytes * calls
        self.link_seconds[link] = self.link_seconds.get(link, 0.0) + seconds * calls

    def group_op(self, p: int, op: str, size: int, stride: int, nbytes: float, calls: float = 1.0) -> float:
        """Seconds of ``calls`` collectives ``op`` of ``nbytes`` (per rank, ledger convention) over groups of ``size``."""
        if size <= 1 or calls == 0:
            return 0.0
        P, eff = self.topo.per_node, self.transport.eff(op)
        wire = _wire(op, size, nbytes)
        m = _span(size, stride, P)
        nodes = self.stage_nodes(p)
        if m == size:  # inside one node
            link = nodes[0].link_bit_s
            seconds = (wire * 8 / link / eff if link else 0.0) + self.transport.intra_latency_s
            self._count("intra-node", wire * self.stage, seconds, calls)
            return seconds * calls
        # Across nodes: the node's share of every group of this axis goes through its NIC.
        if op == "all_to_all":
            per_node_bytes = P * (size - m) / size * nbytes
        else:
            per_node_bytes = (P / m) * wire  # P/m groups meet on a node; each ring leaves it once
        seconds = max(per_node_bytes * 8 / node.nic_bit_s for node in nodes) / eff
        latency = max(node.nic_latency_s for node in nodes)
        groups = {node.group for node in nodes}
        label = "nic:" + "/".join(sorted({f"{node.nic_bit_s / 1e9:g}G" for node in nodes}))
        if len(groups) > 1:
            # every group of the axis in this stage crosses between node groups: they share the uplink
            crossing = (self.stage / size) * (wire if op != "all_to_all" else nbytes * (size // 2) / size * (size // 2))
            up = min(self.topo.uplink(a, b) for a in groups for b in groups if a < b)
            if up < math.inf:
                seconds = max(seconds, crossing * 8 / up / eff)
                latency += self.topo.uplink_latency_s
                self._count("uplink", crossing, crossing * 8 / up / eff, calls)
        seconds += latency
        self._count(label, per_node_bytes * len(nodes), seconds, calls)
        return seconds * calls

    def boundary(self, p: int, q: int, nbytes: float, calls: float) -> float:
        """Seconds of ``calls`` transfers of ``nbytes`` from every rank of pp rank p to its peer on pp rank q."""
        if calls == 0:
            return 0.0
        a, b = self.stage_nodes(p), self.stage_nodes(q)
        eff = self.transport.eff("send")
        if a == b and len(a) == 1:
            link = a[0].link_bit_s
            seconds = (nbytes * 8 / link / eff if link else 0.0) + self.transport.intra_latency_s
            self._count("intra-node", nbytes * self.stage, seconds, calls)
            return seconds * calls
        P = self.topo.per_node
        per_node = min(P, self.stage) * nbytes
        rate = min(n.nic_bit_s for n in a + b)
        seconds = per_node * 8 / rate / eff + max(n.nic_latency_s for n in a + b)
        ga, gb = {n.group for n in a}, {n.group for n in b}
        if ga != gb or len(ga) > 1:
            up = min((self.topo.uplink(x, y) for x in ga for y in gb if x != y), default=math.inf)
            if up < math.inf:
                seconds = max(seconds, self.stage * nbytes * 8 / up / eff) + self.topo.uplink_latency_s
                self._count("uplink", self.stage * nbytes, seconds, calls)
        self._count("nic:" + "/".join(sorted({f"{n.nic_bit_s / 1e9:g}G" for n in a + b})), self.stage * nbytes, seconds,
                    calls)
        return seconds * calls


def forward_flops(spec: ModelSpec, lay: Layout, n: int) -> tuple[float, float]:
    """(per layer, head) forward FLOPs of one rank on ``n`` tokens (its sequence-parallel chunk)."""
    d, F, T = spec.dim, spec.ffn_dim, spec.seq_len
    layer = 8 * d * d * n + 2 * T * d * n  # q, k, v, o projections; causal attention (half the T×T scores)
    if spec.is_moe:
        layer += 2 * d * spec.experts * n + 6 * d * F * spec.top_k * n
    else:
        layer += 6 * d * F * n
    return float(layer), float(2 * d * spec.vocab * n)


OPS_PER_LAYER = 40  # forward operations per block (norms, projections, rotary, attention, MLP, residuals)


def step_time(spec: ModelSpec, lay: Layout, topo: Topology, rates: dict[str, DeviceRate], *, global_batch: int,
              micro_batch: int, stage_layers: list[int] | None = None,
              transport: Transport | None = None) -> StepTime:
    """Predicted :class:`StepTime` of one training step."""
    transport = transport or Transport()
    costs = _Costs(topo, lay, transport)
    stages = lay.pp * lay.vpp
    counts = stage_layers or uniform_stage_layers(spec.layers, stages)
    A = global_batch // (micro_batch * lay.dp)
    n = micro_batch * spec.seq_len // (lay.cp * lay.tp)
    d = spec.dim
    layer_f, head_f = forward_flops(spec, lay, n)
    by_axis: dict[str, float] = {}

    def add(axis: str, seconds: float) -> float:
        by_axis[axis] = by_axis.get(axis, 0.0) + seconds
        return seconds

    # Per micro-batch and layer: the in-layer collectives, forward + backward (comm_volume's counts).
    chunk_time: list[float] = []
    compute_per_rank = [0.0] * lay.pp
    for v, layers in enumerate(counts):
        p = v % lay.pp
        rate = min((rates[node.device] for node in costs.stage_nodes(p)), key=lambda r: r.flops)
        flops = layers * layer_f + (head_f if v == stages - 1 else 0.0)
        compute = 3 * flops / rate.flops + 3 * OPS_PER_LAYER * layers * rate.op_overhead_s
        comm = 0.0
        regions = 1 if spec.is_moe else 2
        T_rank = costs.stage
        if lay.tp > 1:
            comm += add("tp", costs.group_op(p, "all_gather", lay.tp, 1, n * d * FP32, 2 * regions * layers))
            comm += add("tp", costs.group_op(p, "reduce_scatter", lay.tp, 1, lay.tp * n * d * FP32, 2 * regions * layers))
        if lay.cp > 1:
            comm += add("cp", costs.group_op(p, "all_gather", lay.cp, lay.tp, n * d * FP32, 2 * layers))
            comm += add("cp", costs.group_op(p, "reduce_scatter", lay.cp, lay.tp, lay.cp * n * d * FP32, 2 * layers))
        if spec.is_moe:
            k = spec.top_k
            if lay.ep > 1:
                # dispatch and combine, forward and backward: 4 exchanges of n·k rows, and the counts
                comm += add("ep", costs.group_op(p, "all_to_all", lay.ep, lay.etp, n * k * d * FP32, 4 * layers))
                comm += add("ep", costs.group_op(p, "all_to_all", lay.ep, lay.etp, 8 * spec.experts, layers))
            if lay.etp > 1:
                comm += add("etp", costs.group_op(p, "all_to_all", lay.etp, 1, lay.etp * n * k * d * FP32, 4 * layers))
            if T_rank > 1:
                comm += add("dp+cp+tp", costs.group_op(p, "all_reduce", T_rank, 1, 8 * (spec.experts + 2), layers))
        if v < stages - 1:
            comm += add("pp", costs.boundary(p, (v + 1) % lay.pp, n * d * FP32, 2))
        compute_per_rank[p] += compute
        chunk_time.append(compute + comm)
    per_rank = [sum(t for v, t in enumerate(chunk_time) if v % lay.pp == p) for p in range(lay.pp)]
    # Collectives above were counted once per micro-batch: scale by A.
    for axis in by_axis:
        by_axis[axis] *= A
    for key in costs.link_bytes:
        costs.link_bytes[key] *= A
        costs.link_seconds[key] *= A
    mean_chunk = sum(chunk_time) / len(chunk_time)
    pipeline = A * max(per_rank) + (lay.pp - 1) * mean_chunk
    busy = A * sum(per_rank)
    bubble = 1.0 - busy / (lay.pp * pipeline) if pipeline > 0 else 0.0
    # Data parallel: every bucket's reduce-scatter and all-gather, all pp ranks at once.
    dp_seconds = []
    strides = {"dp+cp": lay.tp, "dp+cp+tp": 1, "edp": lay.ep * lay.etp}
    for p, buckets in enumerate(rank_buckets(spec, lay, counts)):
        seconds = 0.0
        for label, size, g in buckets:
            if g > 1:
                padded = math.ceil(size / g) * g
                seconds += costs.group_op(p, "reduce_scatter", g, strides[label], padded * FP32)
                seconds += costs.group_op(p, "all_gather", g, strides[label], padded // g * FP32)
        if lay.world > 1:
            seconds += 2 * max(node.nic_latency_s for node in topo.nodes) if topo.per_node < lay.world else 0.0
        dp_seconds.append(seconds)
    data_parallel = max(dp_seconds)
    add("dp", data_parallel)
    slowest = max(costs.link_seconds, key=costs.link_seconds.get, default="-")
    return StepTime(
        total=pipeline + data_parallel, compute=A * max(compute_per_rank), pipeline=pipeline, bubble=bubble,
        data_parallel=data_parallel, by_axis={a: s for a, s in sorted(by_axis.items()) if s > 0},
        link_bytes={k: int(v) for k, v in sorted(costs.link_bytes.items())}, slowest_link=slowest,
    )
