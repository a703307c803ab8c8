"""Step time of a layout under a placement: compute, every collective over the link it crosses, the bubble.

**Compute.** Forward FLOPs per rank and micro-batch of each virtual stage (backward is
twice that), over the achieved rate of the stage's slowest device
(:class:`DeviceRate`: a peak times a measured efficiency), plus a fixed cost per
operation (a kernel launch on a GPU, Python dispatch on a CPU).

**Communication.** The bytes are :mod:`plait.scheduler.comm_volume`'s, per rank. Each
group of a mesh axis is placed by the rank→node map: inside one node it runs at the
device link (``devices.<kind>.link_gbit``); across nodes, all groups of the axis that
share a node share its NIC, and a ring's slowest member sets the pace; groups that span
two node groups (``uplinks``) share the uplink too: a ring's bytes cross it once per hop
between node groups in rank order (a placement that interleaves node groups pays for every
hop), an all_to_all's ``a·b·B/g`` each way, a pipeline send when the peer rank's node is in
the other group, and every stage's data-parallel traffic at once. Wire bytes per rank follow the ring
algorithms: all_gather ``(g−1)·shard``, reduce_scatter ``(g−1)/g·B``, all_reduce
``2·(g−1)/g·B``, all_to_all ``(g−1)/g·B``, send ``B``; a transport reaches a measured
fraction of that (:class:`Transport`), and every call pays the link's latency.

**What overlaps.** Nothing, as plait runs today: tp, cp and expert collectives block
inside their layer, pipeline receives block (sends do not), and the data-parallel
reduce-scatter / all-gather run after the last backward. The pipeline makespan is
``A·max_p C_p + (pp−1)·c̄`` for A micro-batches, C_p the work of pp rank p per
micro-batch and c̄ one virtual stage's: the 1F1B fill and drain, shortened by vpp under
the interleaved schedule (``tests/test_planner.py`` holds it to the runtime's schedules,
executed). On pooled devices (:attr:`DeviceRate.pooled`: CPU workers sharing one machine's
cores) compute is work-conserving instead: ``A·(mean_p compute_p + max_p comm_p)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from plait.scheduler.comm_volume import (Layout, Op, bucket_ops, buckets_of, layer_ops, norm_is_local, rank_buckets,
                                         rank_layers, uniform_stage_layers)
from plait.scheduler.spec import ModelSpec

FP32 = 4
OPS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send")


@dataclass(frozen=True)
class DeviceRate:
    """What one device achieves on this model: FLOP/s on its matrix products, and a fixed cost per operation."""

    flops: float
    op_overhead_s: float = 0.0
    # The devices share one pool of cores (CPU workers of a rehearsal on one machine): a rank that waits gives its
    # share to the busy ones, so compute is work-conserving and a pipeline's fill and drain cost no compute time.
    pooled: bool = False


@dataclass(frozen=True)
class Transport:
    """Achieved share of a link's rate per collective, and the latency of a call inside a node.

    Defaults describe a collective library near its bus bandwidth; the rehearsal's TCP
    transport is measured: :data:`GLOO_TCP`.
    """

    efficiency: dict[str, float] = field(default_factory=lambda: {op: 0.8 for op in OPS})
    intra_latency_s: float = 5e-6

    def eff(self, op: str) -> float:
        return self.efficiency.get(op, 0.8)


# gloo over TCP on the rehearsal's shaped links, measured (``plait bench links``, ``plait bench transport``):
# a send reaches 0.94 of the shaped rate; all_reduce 0.84–0.93 of a ring's; an exchange in both directions at
# once (all_to_all) about half, since both directions share one shaped queue. plait's reduce-scatters and
# all-gathers over gloo are its own rings of point-to-point sends (plait.parallel.rings), so each hop moves at a
# send's rate: 0.94. (gloo's own reduce_scatter costs about an all_reduce of the whole buffer, 1.19 / 1.92 buffers
# at 2 / 4 ranks against the ring's 0.5 / 0.75, and its all_gather 0.91 / 1.02 of the output buffer: 0.41 and 0.65
# in these terms, what this model used before the rings.) Two workers of one node talk over loopback TCP.
GLOO_TCP = Transport(efficiency={"send": 0.94, "all_reduce": 0.88, "all_to_all": 0.48, "reduce_scatter": 0.94,
                                 "all_gather": 0.94}, intra_latency_s=85e-6)


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
    _stages: dict = field(default_factory=dict, compare=False, repr=False)  # (stage size, p) → (_Stage, span)
    _kinds: dict = field(default_factory=dict, compare=False, repr=False)  # a kind's fields → its one _Stage
    _ops: dict = field(default_factory=dict, compare=False, repr=False)  # group_op's results, per kind of stage
    _groups: dict = field(default_factory=dict, compare=False, repr=False)  # step_time's pp ranks grouped by kind

    def uplink(self, a: int, b: int) -> float:
        return self.uplink_bit_s.get((min(a, b), max(a, b)), math.inf)

    def stage(self, size: int, p: int) -> _Stage:
        """What the cost model needs of the nodes that run pp rank ``p`` (ranks ``p·size … (p+1)·size − 1``).

        Stages on alike nodes share one :class:`_Stage` object, so costs are kept per kind of stage.
        """
        return self._stage(size, p)[0]

    def span(self, size: int, p: int) -> tuple[int, int]:
        """First and last node index of pp rank ``p``'s stage."""
        return self._stage(size, p)[1]

    def _stage(self, size: int, p: int) -> tuple[_Stage, tuple[int, int]]:
        key = (size, p)
        found = self._stages.get(key)
        if found is None:
            P = self.per_node
            first, last = p * size // P, ((p + 1) * size - 1) // P
            nodes = self.nodes[first:last + 1]
            nics = {n.nic_bit_s for n in nodes}
            groups = frozenset(n.group for n in nodes)
            # which node group each node is in, in rank order: where rings and sends cross the uplinks
            sequence = tuple(n.group for n in nodes) if len(groups) > 1 else ()
            fields = (len(nodes), nodes[0].link_bit_s, min(nics), max(n.nic_latency_s for n in nodes),
                      groups, frozenset(nics), frozenset(n.device for n in nodes), sequence)
            kind = self._kinds.get(fields)
            if kind is None:
                kind = self._kinds[fields] = _Stage(*fields)
            found = self._stages[key] = (kind, (first, last))
        return found


@dataclass(frozen=True, eq=False)
class _Stage:
    """The nodes of a stage as costs see them; one object per kind (compared by identity)."""

    count: int
    link: float | None
    nic: float  # the slowest NIC
    latency: float
    groups: frozenset[int]
    nics: frozenset[float]
    devices: frozenset[str]
    sequence: tuple[int, ...]  # node group of each node in rank order; () when all are in one group

    @property
    def ring_crossings(self) -> int:
        """Hops of a ring over the stage's nodes (in rank order) from one node group to another, in the busiest
        direction between two groups: the times each byte of the ring crosses that uplink."""
        if not self.sequence:
            return 0
        hops: dict[tuple[int, int], int] = {}
        seq = self.sequence
        for a, b in zip(seq, seq[1:] + seq[:1]):
            if a != b:
                hops[(a, b)] = hops.get((a, b), 0) + 1
        return max(hops.values())

    def group_of(self, k: int) -> int:
        """Node group of the stage's k-th node."""
        return self.sequence[k] if self.sequence else next(iter(self.groups))

    def label(self, other: _Stage | None = None) -> str:
        nics = self.nics | (other.nics if other else frozenset())
        return _nic_label(nics)


_LABELS: dict[frozenset[float], str] = {}


def _uplink_label(pair: tuple[int, int]) -> str:
    """A tally per uplink (node groups a < b), so traffic of several stages on one uplink adds up."""
    return f"uplink {pair[0]}-{pair[1]}"


def _nic_label(nics: frozenset[float]) -> str:
    found = _LABELS.get(nics)
    if found is None:
        found = _LABELS[nics] = "nic:" + "/".join(f"{n / 1e9:g}G" for n in sorted(nics))
    return found


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
    ledger: dict[str, int] = field(default_factory=dict)  # bytes per axis charged, all ranks (the ledger's convention)


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
        self.transport_key = (tuple(sorted(transport.efficiency.items())), transport.intra_latency_s)
        self.link_bytes: dict[str, float] = {}
        self.link_seconds: dict[str, float] = {}

    def stage_of(self, p: int) -> _Stage:
        return self.topo.stage(self.stage, p)

    def _count(self, link: str, nbytes: float, seconds: float, calls: float) -> None:
        self.link_bytes[link] = self.link_bytes.get(link, 0.0) + nbytes * calls
        self.link_seconds[link] = self.link_seconds.get(link, 0.0) + seconds * calls

    def group_op(self, p: int, op: str, size: int, stride: int, nbytes: float, calls: float = 1.0) -> float:
        """Seconds of ``calls`` collectives ``op`` of ``nbytes`` (per rank, ledger convention) over groups of ``size``.

        Kept per topology: a search asks for the same collective on the same kind of stage many times.
        """
        if size <= 1 or calls == 0:
            return 0.0
        st = self.stage_of(p)
        key = (st, self.stage, op, size, stride, nbytes, self.transport_key)
        found = self.topo._ops.get(key)
        if found is None:
            saved = self.link_bytes, self.link_seconds
            self.link_bytes, self.link_seconds = {}, {}
            seconds = self._group_op(st, op, size, stride, nbytes)
            found = (seconds, tuple((k, self.link_bytes[k], self.link_seconds[k]) for k in self.link_bytes))
            self.link_bytes, self.link_seconds = saved
            self.topo._ops[key] = found  # bounded by step_time, which empties it between layouts when large
        seconds, tallies = found
        for link, nb, sec in tallies:
            self.link_bytes[link] = self.link_bytes.get(link, 0.0) + nb * calls
            self.link_seconds[link] = self.link_seconds.get(link, 0.0) + sec * calls
        return seconds * calls

    def _group_op(self, st: _Stage, op: str, size: int, stride: int, nbytes: float) -> float:
        calls = 1.0
        P, eff = self.topo.per_node, self.transport.eff(op)
        wire = _wire(op, size, nbytes)
        m = _span(size, stride, P)
        if m == size:  # inside one node
            seconds = (wire * 8 / st.link / eff if st.link else 0.0) + self.transport.intra_latency_s
            self._count("intra-node", wire * self.stage, seconds, calls)
            return seconds * calls
        # Across nodes: the node's share of every group of this axis goes through its NIC; the slowest NIC
        # of the stage sets the pace of the rings that cross it.
        if op == "all_to_all":
            per_node_bytes = P * (size - m) / size * nbytes
        else:
            per_node_bytes = (P / m) * wire  # P/m groups meet on a node; each ring leaves it once
        seconds = per_node_bytes * 8 / st.nic / eff
        latency = st.latency
        if len(st.groups) > 1:
            # the axis' groups in this stage that span node groups share the uplink between them
            crossing = self._crossing(st, op, size, stride, nbytes, wire)
            up, pair = min((self.topo.uplink(a, b), (a, b)) for a in st.groups for b in st.groups if a < b)
            if up < math.inf and crossing:
                seconds = max(seconds, crossing * 8 / up / eff)
                latency += self.topo.uplink_latency_s
                self._count(_uplink_label(pair), crossing, crossing * 8 / up / eff, calls)
        seconds += latency
        self._count(st.label(), per_node_bytes * st.count, seconds, calls)
        return seconds * calls

    def _crossing(self, st: _Stage, op: str, size: int, stride: int, nbytes: float, wire: float) -> float:
        """Bytes the busiest direction between two node groups carries for one call, summed over the axis' groups
        in the stage: a ring's bytes cross once per hop from one node group to the other (its ranks in rank
        order); an all_to_all's, ``a·b·B/size`` each way for a group with a and b ranks on the two sides."""
        P = self.topo.per_node
        if self.stage > 4096:  # past this, as if each group were a ring over the whole stage
            return (self.stage / size) * (wire * st.ring_crossings if op != "all_to_all" else size / 4 * nbytes)
        ways: dict[tuple[int, int], float] = {}
        for block in range(0, self.stage, size * stride):
            for offset in range(stride):
                sides = [st.group_of((block + offset + j * stride) // P) for j in range(size)]
                if len(set(sides)) == 1:
                    continue
                if op == "all_to_all":
                    counts: dict[int, int] = {}
                    for g in sides:
                        counts[g] = counts.get(g, 0) + 1
                    for a, na in counts.items():
                        for b, nb in counts.items():
                            if a != b:
                                ways[(a, b)] = ways.get((a, b), 0.0) + na * nb * nbytes / size
                else:
                    for a, b in zip(sides, sides[1:] + sides[:1]):
                        if a != b:
                            ways[(a, b)] = ways.get((a, b), 0.0) + wire
        return max(ways.values(), default=0.0)

    def boundary(self, p: int, q: int, nbytes: float, calls: float) -> float:
        """Seconds of ``calls`` transfers of ``nbytes`` from every rank of pp rank p to its peer on pp rank q."""
        if calls == 0:
            return 0.0
        a, b = self.stage_of(p), self.stage_of(q)
        eff = self.transport.eff("send")
        if self.topo.span(self.stage, p) == self.topo.span(self.stage, q) and a.count == 1:
            seconds = (nbytes * 8 / a.link / eff if a.link else 0.0) + self.transport.intra_latency_s
            self._count("intra-node", nbytes * self.stage, seconds, calls)
            return seconds * calls
        per_rank = min(self.topo.per_node, self.stage)
        per_node = per_rank * nbytes
        seconds = per_node * 8 / min(a.nic, b.nic) / eff + max(a.latency, b.latency)
        if a.groups != b.groups or len(a.groups) > 1:
            # each rank sends to the rank in the same place of the next stage: count the nodes whose peer node is
            # in another node group
            crossing = sum(a.group_of(k) != b.group_of(k) for k in range(min(a.count, b.count))) * per_node
            up, pair = min(((self.topo.uplink(x, y), (min(x, y), max(x, y))) for x in a.groups for y in b.groups
                            if x != y), default=(math.inf, None))
            if up < math.inf and crossing:
                seconds = max(seconds, crossing * 8 / up / eff) + self.topo.uplink_latency_s
                self._count(_uplink_label(pair), crossing, crossing * 8 / up / eff, calls)
        self._count(a.label(b), self.stage * nbytes, seconds, calls)
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
              transport: Transport | None = None, zero: bool = True) -> StepTime:
    """Predicted :class:`StepTime` of one training step (``zero``: ``parallel.zero``; false: the buckets are
    all-reduced instead of reduce-scattered and all-gathered)."""
    transport = transport or Transport()
    costs = _Costs(topo, lay, transport)
    pp, stages = lay.pp, lay.pp * lay.vpp
    counts = stage_layers or uniform_stage_layers(spec.layers, stages)
    A = global_batch // (micro_batch * lay.dp)
    n = micro_batch * spec.seq_len // (lay.cp * lay.tp)
    layer_f, head_f = forward_flops(spec, lay, n)
    # Costs depend only on the kind of nodes a stage runs on: each kind (and pair, for boundaries) once, kept
    # with the topology for the next layout that asks.
    if len(topo._ops) > 200_000:
        topo._ops.clear()
    per_layer = topo._ops
    per_boundary = topo._ops
    per_dp = topo._ops
    tkey = costs.transport_key
    weights: dict[tuple[str, object], float] = {}  # (kind of cost, its key) → times it is paid per step

    def weigh(kind: str, key, times: float) -> None:
        weights[(kind, key)] = weights.get((kind, key), 0.0) + times

    def measured(run) -> tuple[float, dict[str, float], dict[str, float]]:
        costs.link_bytes, costs.link_seconds = {}, {}
        seconds = run()
        return seconds, costs.link_bytes, costs.link_seconds

    layers_of = rank_layers(lay, counts)
    chunks_of = [len(range(p, stages, pp)) for p in range(pp)]
    last_rank = (stages - 1) % pp
    # pp ranks alike in the nodes they run on (and send to), their layers, and first/last cost alike.
    grouping = (costs.stage, pp, tuple(counts))
    kinds = topo._groups.get(grouping)
    if kinds is None:
        kinds = {}
        for p in range(pp):
            q = (p + 1) % pp
            key = (costs.stage_of(p), costs.stage_of(q), topo.span(costs.stage, p) == topo.span(costs.stage, q),
                   layers_of[p], chunks_of[p], p == last_rank, p == 0)
            kinds.setdefault(key, []).append(p)
        if len(topo._groups) > 50_000:
            topo._groups.clear()
        topo._groups[grouping] = kinds
    slowest_rank, busy, max_compute, data_parallel = 0.0, 0.0, 0.0, 0.0
    shared: dict[str, float] = {}  # uplink → seconds of every stage's data-parallel traffic over it
    pooled, all_compute, max_comm = False, 0.0, 0.0
    for (st, nxt, same_node, layers, chunks, last, first), ranks in kinds.items():
        p, count = ranks[0], len(ranks)
        rate = min((rates[name] for name in st.devices), key=lambda r: r.flops)
        flops = layers * layer_f + (head_f if last else 0.0)
        compute = 3 * flops / rate.flops + 3 * OPS_PER_LAYER * layers * rate.op_overhead_s
        lkey = ("layer", st, spec, lay, n, tkey)
        if lkey not in per_layer:
            axes: dict[str, float] = {}
            seconds, lb, ls = measured(lambda: sum(layer_collectives(spec, lay, costs, p, n, axes).values()))
            per_layer[lkey] = (seconds, axes, lb, ls)
        seconds = layers * per_layer[lkey][0]
        weigh("layer", lkey, layers * count)
        sends = chunks - (1 if last else 0)  # one boundary per chunk, but after the last virtual stage
        if sends:
            pair = ("boundary", st, nxt, same_node, costs.stage, n * spec.dim, tkey)
            if pair not in per_boundary:
                q = (p + 1) % pp
                per_boundary[pair] = measured(lambda: costs.boundary(p, q, n * spec.dim * FP32, 2))
            seconds += sends * per_boundary[pair][0]
            weigh("boundary", pair, sends * count)
        slowest_rank = max(slowest_rank, compute + seconds)
        busy += count * (compute + seconds)
        max_compute = max(max_compute, compute)
        pooled = pooled or rate.pooled
        all_compute += count * compute
        max_comm = max(max_comm, seconds)
        # Data parallel: every bucket's reduce-scatter and all-gather, all pp ranks at once.
        buckets = tuple(buckets_of(spec, lay, layers, first, last))
        key = ("dp", st, buckets, costs.stage, lay.tp, lay.ep * lay.etp, tkey, zero)
        if key not in per_dp:
            per_dp[key] = measured(lambda p=p, buckets=buckets: dp_seconds(costs, p, buckets, zero))
        data_parallel = max(data_parallel, per_dp[key][0])
        for link, sec in per_dp[key][2].items():  # stages reduce at once: their uplink seconds add up
            if link.startswith("uplink"):
                shared[link] = shared.get(link, 0.0) + count * sec
        weigh("dp", key, count / A)
    data_parallel = max(data_parallel, max(shared.values(), default=0.0))
    if pooled:
        pipeline = A * (all_compute / pp + max_comm)
    else:
        pipeline = A * slowest_rank + (pp - 1) * busy / stages
    bubble = max(0.0, 1.0 - A * busy / (pp * pipeline)) if pipeline > 0 else 0.0
    if lay.world > 1:  # the gradient norm's all-reduce over the world, which the loss sums join
        data_parallel += topo.stage(lay.world, 0).latency if topo.per_node < lay.world else transport.intra_latency_s
    # Totals per axis (the critical rank's share is what the table shows) and per link class (all ranks).
    by_axis: dict[str, float] = {}
    link_bytes: dict[str, float] = {}
    link_seconds: dict[str, float] = {}
    # the closing all-reduce: the squared norm, the loss sums and each MoE layer's routing statistics (float64)
    norm = 0 if norm_is_local(lay, rank_buckets(spec, lay, counts), zero) else 8
    closing = 16 + norm + (8 * spec.layers * (spec.experts + 2) if spec.is_moe else 0)
    ledger: dict[str, int] = {"world": lay.world * closing} if lay.world > 1 else {}
    for (kind, key), times in weights.items():
        ranks = round(times * A) * costs.stage
        if kind == "layer":
            ops = layer_ops(spec, lay, key[4])
        elif kind == "boundary":
            ops = [Op("pp", "send", 2, 1, key[5] * FP32, 2)]
        else:
            ops = bucket_ops(lay, list(key[2]), key[7])
        for op in ops:
            ledger[op.axis] = ledger.get(op.axis, 0) + op.nbytes * op.calls * ranks
        if kind == "layer":
            _, axes, lb, ls = per_layer[key]
            for axis, sec in axes.items():
                by_axis[axis] = by_axis.get(axis, 0.0) + sec * times * A / pp
        elif kind == "boundary":
            sec, lb, ls = per_boundary[key]
            by_axis["pp"] = by_axis.get("pp", 0.0) + sec * times * A / pp
        else:
            _, lb, ls = per_dp[key]
        for link, value in lb.items():
            link = "uplink" if link.startswith("uplink") else link
            link_bytes[link] = link_bytes.get(link, 0.0) + value * times * A
        for link, value in ls.items():
            link = "uplink" if link.startswith("uplink") else link
            link_seconds[link] = link_seconds.get(link, 0.0) + value * times * A
    if data_parallel:
        by_axis["dp"] = data_parallel
    slowest = max(link_seconds, key=link_seconds.get, default="-")
    return StepTime(
        total=pipeline + data_parallel, compute=A * max_compute, pipeline=pipeline, bubble=bubble,
        data_parallel=data_parallel, by_axis={a: s for a, s in sorted(by_axis.items()) if s > 0},
        link_bytes={k: int(v) for k, v in sorted(link_bytes.items())}, slowest_link=slowest,
        ledger=dict(sorted(ledger.items())),
    )


def dp_seconds(costs: _Costs, p: int, buckets, zero: bool = True) -> float:
    """Seconds of pp rank ``p``'s data-parallel step: each bucket's reduce-scatter and all-gather (``zero``) or
    all-reduce."""
    return sum(costs.group_op(p, op.op, op.size, op.stride, op.nbytes, op.calls)
               for op in bucket_ops(costs.lay, buckets, zero))


def layer_collectives(spec: ModelSpec, lay: Layout, costs: _Costs, p: int, n: int,
                      out: dict[str, float]) -> dict[str, float]:
    """Seconds per axis of one layer's collectives for one micro-batch, forward and backward (comm_volume's ops)."""
    for op in layer_ops(spec, lay, n):
        seconds = costs.group_op(p, op.op, op.size, op.stride, op.nbytes, op.calls)
        if seconds:
            out[op.axis] = out.get(op.axis, 0.0) + seconds
    return out
