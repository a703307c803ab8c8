"""A lower bound on a layout's step time that no placement and no stage split can beat.

The planner costs layouts in order of this bound and stops once enough plans are faster
than the next bound (:func:`plait.scheduler.planner.plan`), which keeps a 10,000-device
search to seconds. The bound is the step-time model of :mod:`plait.scheduler.timing` on
ideal clusters of the same shape: one node group (no uplink), the fastest device
everywhere, and every node on the fastest NIC (its lowest latency), or every node on the
slowest. The model only grows as a link or a device slows down, so:

* **pipeline**: per micro-batch a rank with ``l`` layers works ``l·(compute + in-layer
  collectives) + head + sends`` at least. When every device is alike the runtime splits
  layers uniformly, so each rank's count is known and the model's makespan
  ``A·max_p + (pp−1)·Σ_p / (pp·vpp)`` follows on the fast cluster; and since every node
  runs some stage, at least ``k = ⌈slow nodes · workers / stage⌉`` stages sit on the
  slowest NIC, so the busiest rank is at least the k-th least loaded rank costed on the
  slow cluster. When devices differ, a split by speed may move layers anywhere, and only
  the mean survives: the busiest rank holds at least ``Σ_p / pp``.
* **data parallel**: the model's maximum over ranks is at least every rank's buckets on the
  fast cluster, and at least the k-th cheapest rank's on the slow one (uniform split); with
  a speed split, a rank with ⌈layers/pp⌉ layers on the fast cluster and one with a layer
  per chunk on the slow one.

On an ideal cluster a collective's time is linear in its bytes (no uplink to take the
maximum with), so each (cluster, stage size, operation, group) is costed twice and then
read off a line.
"""

from __future__ import annotations

from plait.scheduler.comm_volume import Layout, bucket_ops, buckets_of, layer_ops, rank_layers, uniform_stage_layers
from plait.scheduler.timing import FP32, OPS_PER_LAYER, DeviceRate, NodeView, Topology, _Costs, forward_flops

_PROBE = float(2**30)  # bytes of the second costing that fixes a line's slope


class Bounds:
    """``Bounds(request, rates).of(layout, micro_batch)``: seconds no placement of that plan can beat."""

    def __init__(self, req, rates: dict[str, DeviceRate]):
        self.req = req
        self.spec = req.spec
        nodes = req.cluster.nodes
        links = [n.device.link_gbit for n in nodes]
        link = None if any(v is None for v in links) else max(links) * 1e9
        self.per_node = req.cluster.workers_per_node

        def ideal(gbit: float) -> Topology:
            latency = min((n.nic.latency_us or 0.0) for n in nodes if n.nic.gbit == gbit) * 1e-6
            view = NodeView(nic_bit_s=gbit * 1e9, nic_latency_s=latency, link_bit_s=link, device="ideal", group=0)
            return Topology(nodes=(view,) * req.cluster.nnodes, per_node=self.per_node, uplink_bit_s={})

        fastest, slowest = max(n.nic.gbit for n in nodes), min(n.nic.gbit for n in nodes)
        self.clusters = [ideal(fastest)] if fastest == slowest else [ideal(fastest), ideal(slowest)]
        self.slow_nodes = sum(n.nic.gbit == slowest for n in nodes)
        self.uniform = len({rates[n.device.name].flops for n in nodes}) == 1
        self.flops = max(r.flops for r in rates.values())
        self.overhead = min(r.op_overhead_s for r in rates.values())
        self.pooled = any(r.pooled for r in rates.values())
        self._lines: dict[tuple, tuple[float, float]] = {}
        self._layers: dict[tuple, float] = {}
        self._ops: dict[tuple, list] = {}
        self._dp: dict[Layout, float] = {}
        self._bucket_seconds: dict[tuple, float] = {}
        self.zero = getattr(req, "zero", True)  # parallel.zero: the buckets' collectives the runtime will issue
        self._ranks: dict[tuple[int, int], list[tuple[int, bool, bool, int]]] = {}

    @property
    def slow(self) -> int:
        """Index of the slowest-NIC cluster (0 when every NIC is alike)."""
        return len(self.clusters) - 1

    def _op(self, which: int, stage: int, lay: Layout, size: int, stride: int, op: str, nbytes: float) -> float:
        key = (which, stage, op, size, stride)
        line = self._lines.get(key)
        if line is None:
            costs = _Costs(self.clusters[which], lay, self.req.transport)
            zero = costs.group_op(0, op, size, stride, 0.0)
            line = self._lines[key] = (zero, (costs.group_op(0, op, size, stride, _PROBE) - zero) / _PROBE)
        return line[0] + line[1] * nbytes

    def _layer(self, which: int, lay: Layout, n: int) -> float:
        """One layer's collectives for one micro-batch of ``n`` tokens on ideal cluster ``which``: every operation's
        bytes are a constant or proportional to n, so the sum is a line in n."""
        stage = lay.world // lay.pp
        key = (which, stage, lay.tp, lay.cp, lay.ep, lay.etp)
        line = self._layers.get(key)
        if line is None:
            shape = key[1:]
            ops = self._ops.get(shape)
            if ops is None:  # the same operations on either cluster: at n = 0 and n = 1
                ops = self._ops[shape] = [(a, b) for a, b in zip(layer_ops(self.spec, lay, 0), layer_ops(self.spec, lay, 1))
                                          if a.size > 1]
            zero = one = 0.0
            for a, b in ops:
                zero += self._op(which, stage, lay, a.size, a.stride, a.op, a.nbytes) * a.calls
                one += self._op(which, stage, lay, b.size, b.stride, b.op, b.nbytes) * b.calls
            line = self._layers[key] = (zero, one - zero)
        return line[0] + line[1] * n

    def _send(self, which: int, lay: Layout, n: int) -> float:
        """The cheapest boundary transfer (forward and backward) between neighbouring pp ranks."""
        if lay.pp == 1:
            return 0.0
        stage = lay.world // lay.pp
        key = (which, stage, "send", n)
        found = self._layers.get(key)
        if found is None:
            costs = _Costs(self.clusters[which], lay, self.req.transport)
            found = self._layers[key] = min(costs.boundary(p, p + 1, n * self.spec.dim * FP32, 2)
                                            for p in range(min(lay.pp - 1, 2 * self.per_node)))
        return found

    def _buckets(self, which: int, lay: Layout, buckets: tuple) -> float:
        stage = lay.world // lay.pp
        key = (which, stage, lay.tp, lay.ep * lay.etp, buckets)
        found = self._bucket_seconds.get(key)
        if found is None:
            found = self._bucket_seconds[key] = sum(
                self._op(which, stage, lay, op.size, op.stride, op.op, op.nbytes) * op.calls
                for op in bucket_ops(lay, list(buckets), self.zero))
        return found

    def _held(self, pp: int, vpp: int) -> list[tuple[int, bool, bool, int]]:
        """The uniform split's pp ranks by kind: (layers held, holds the head, holds the embedding, how many)."""
        found = self._ranks.get((pp, vpp))
        if found is None:
            lay = Layout(world=pp, pp=pp, vpp=vpp)
            held = rank_layers(lay, uniform_stage_layers(self.spec.layers, pp * vpp))
            last = (pp * vpp - 1) % pp
            kinds: dict[tuple[int, bool, bool], int] = {}
            for p, layers in enumerate(held):
                key = (layers, p == last, p == 0)
                kinds[key] = kinds.get(key, 0) + 1
            found = self._ranks[(pp, vpp)] = [(*key, count) for key, count in kinds.items()]
        return found

    def _slow_stages(self, lay: Layout) -> int:
        """Stages that must include a node on the slowest NIC."""
        return min(lay.pp, -(-self.slow_nodes * self.per_node // (lay.world // lay.pp)))

    def _data_parallel(self, lay: Layout) -> float:
        found = self._dp.get(lay)
        if found is None:
            spec = self.spec
            if self.uniform:
                kinds = [(tuple(buckets_of(spec, lay, layers, first, head)), count)
                         for layers, head, first, count in self._held(lay.pp, lay.vpp)]
                found = max(self._buckets(0, lay, b) for b, _ in kinds)
                if self.slow:
                    found = max(found, _kth([(self._buckets(self.slow, lay, b), c) for b, c in kinds],
                                            self._slow_stages(lay)))
            else:
                whole = lay.pp == 1
                most = -(-spec.layers // lay.pp)
                found = max(self._buckets(0, lay, tuple(buckets_of(spec, lay, most, whole, whole))),
                            self._buckets(self.slow, lay, tuple(buckets_of(spec, lay, lay.vpp, whole, whole))))
            self._dp[lay] = found
        return found

    def of(self, lay: Layout, mb: int) -> float:
        spec, pp, vpp = self.spec, lay.pp, lay.vpp
        stages = pp * vpp
        A = self.req.global_batch // (mb * lay.dp)
        n = mb * spec.seq_len // (lay.cp * lay.tp)
        layer_f, head_f = forward_flops(spec, lay, n)
        compute = 3 * layer_f / self.flops + 3 * OPS_PER_LAYER * self.overhead
        head = 3 * head_f / self.flops
        layer, send = compute + self._layer(0, lay, n), self._send(0, lay, n)
        if self.uniform:
            kinds = self._held(pp, vpp)
            work = [(layers * layer + (vpp - last) * send + (head if last else 0.0), count)
                    for layers, last, _, count in kinds]
            slowest, busy = max(w for w, _ in work), sum(w * c for w, c in work)
            if self.slow and lay.world // pp >= self.per_node:
                layer_slow, send_slow = compute + self._layer(self.slow, lay, n), self._send(self.slow, lay, n)
                slow = [(layers * layer_slow + (vpp - last) * send_slow + (head if last else 0.0), count)
                        for layers, last, _, count in kinds]
                slowest = max(slowest, _kth(slow, self._slow_stages(lay)))
        else:
            busy = spec.layers * layer + head + (stages - 1) * send
            slowest = busy / pp
        if self.pooled:  # work-conserving: no fill and drain, only the mean rank's work
            return A * busy / pp + self._data_parallel(lay)
        return A * slowest + (pp - 1) * busy / stages + self._data_parallel(lay)


def _kth(values: list[tuple[float, int]], k: int) -> float:
    """The k-th smallest (1-based) of values given as (value, times it occurs)."""
    for value, count in sorted(values):
        k -= count
        if k <= 0:
            return value
    raise ValueError("k exceeds the number of values")
