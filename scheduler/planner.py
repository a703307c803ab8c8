"""The planner: every valid layout of a model on a cluster, costed, placed, and ranked.

A candidate is a layout (pp with vpp and the stage split, dp, cp, tp; for MoE the folded
ep, etp, edp), a micro-batch size and a rank→node placement. Validity is decided by the
runtime's own rules (:class:`~plait.scheduler.dims.ParallelDims`, the interleaved
schedule's micro-batch rule in :mod:`plait.scheduler.pipeline`): the planner never
proposes what ``plait train`` would refuse. Memory comes from
:mod:`plait.scheduler.memory`, time from :mod:`plait.scheduler.timing`, placement from
:mod:`plait.scheduler.holmes`.

Pruning keeps a 10,000-device search to seconds: tp and etp stay within a node's workers
(past a node they cross the NIC on every layer, which no ranking would keep), cp and
micro-batch sizes are powers of two, vpp is 1 or 2, layouts are costed in order of a lower
bound on their step time no placement beats (:mod:`plait.scheduler.bounds`) until enough
plans are faster than the next bound, memory (cheap) is checked before time, and every
layout is first placed by the NIC-aware sort, the fastest :data:`REFINE` then by the best
of all candidate orders.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from plait.errors import ConfigError, PlaitError
from plait.scheduler.cluster import ClusterSpec
from plait.scheduler.comm_volume import Layout, step_volume, uniform_stage_layers
from plait.scheduler.dims import ParallelDims
from plait.scheduler.estimate import train_flops_per_token
from plait.scheduler.holmes import Placed, place
from plait.scheduler.memory import RankMemory, rank_memory
from plait.scheduler.spec import ModelSpec
from plait.scheduler.bounds import Bounds
from plait.scheduler.timing import DeviceRate, StepTime, Transport, step_time

GiB = 2**30
MAX_CP = 32  # context parallel sizes searched: powers of two up to this
REFINE = 24  # plans whose placement is chosen among every candidate order (the rest use the NIC-aware sort)


class NoPlanError(PlaitError):
    """No layout fits: the message names the shortfall and the nearest change that would fit."""

    exit_code = 2


@dataclass(frozen=True)
class PlanRequest:
    spec: ModelSpec
    cluster: ClusterSpec
    global_batch: int
    micro_batch: int | None = None  # None: search powers of two up to the per-replica batch
    act_bytes: int = 4  # 4 for float32 compute, 2 for bfloat16
    efficiency: float = 0.5  # achieved share of a device's peak FLOP/s, until calibrated
    op_overhead_s: float = 5e-6
    rates: dict[str, DeviceRate] | None = None  # per device kind; None: peak × efficiency
    transport: Transport = field(default_factory=Transport)
    headroom: float = 0.1  # memory kept free for allocator slack and temporaries
    max_vpp: int = 2
    zero: bool = True  # parallel.zero: ZeRO-1 optimizer state (false: replicated, gradients all-reduced)


@dataclass
class Candidate:
    layout: Layout
    micro_batch: int
    stage_layers: list[int] | None
    placed: Placed
    memory: list[RankMemory]
    time: StepTime | None
    fits: bool
    memory_limit: int

    @property
    def peak_bytes(self) -> int:
        return max(m.peak for m in self.memory)

    @property
    def schedule(self) -> str:
        return "interleaved" if self.layout.vpp > 1 else "1f1b"

    def name(self) -> str:
        lay = self.layout
        dense = " ".join(f"{a}{getattr(lay, a)}" for a in ("pp", "dp", "cp", "tp") if getattr(lay, a) > 1) or "dp1"
        expert = " ".join(f"{a}{getattr(lay, a)}" for a in ("ep", "etp") if getattr(lay, a) > 1)
        vpp = f" vpp{lay.vpp}" if lay.vpp > 1 else ""
        return f"{dense}{vpp}" + (f" / {expert}" if expert else "") + f" mb{self.micro_batch}"

    def sets(self) -> list[str]:
        """``--set`` overrides that make ``plait train`` run this plan."""
        lay = self.layout
        out = [f"parallel.{a}={getattr(lay, a)}" for a in ("pp", "dp", "cp", "tp", "ep", "etp", "edp", "vpp")]
        out.append(f"parallel.pp_schedule={self.schedule}")
        out.append(f"train.micro_batch={self.micro_batch}")
        if self.stage_layers is not None:
            out.append(f"parallel.pp_layers=[{','.join(map(str, self.stage_layers))}]")
        if not self.placed.is_default:
            out.append(f"parallel.placement=[{','.join(map(str, self.placed.nodes))}]")
        return out


@dataclass
class PlanResult:
    request: PlanRequest
    ranked: list[Candidate]  # feasible, fastest first
    rejected: list[Candidate]  # out of memory
    invalid: dict[str, int]  # rule → layouts it excluded
    searched: int
    pending: list[tuple[float, tuple[Layout, int]]] = field(default_factory=list)  # uncosted: (bound, layout)
    _rates: dict | None = None
    _limit: int = 0
    _placement: str = "holmes"
    _refined: bool = False  # the fastest were re-placed by every candidate order (placement auto)

    @property
    def costed(self) -> int:
        return len(self.ranked) + len(self.rejected)

    def find(self, match) -> Candidate | None:
        """The fastest plan ``match`` accepts (costing uncosted layouts as far as their bounds allow); when none
        fits, the one closest to fitting; None when no layout matches."""
        known = [c for c in self.ranked + self.rejected if match(c.layout, c.micro_batch)]
        fit = [c for c in known if c.fits]
        best = min(fit, key=lambda c: c.time.total, default=None)
        for bound, (lay, mb) in self.pending:
            if best is not None and bound >= best.time.total:
                break
            if not match(lay, mb):
                continue
            cand = _cost(self.request, lay, mb, self._rates, self._limit, self._placement)
            known.append(cand)
            if cand.fits and (best is None or cand.time.total < best.time.total):
                best = cand
        if best is not None:
            return _refine(self.request, best, self._rates, self._limit) if self._refined else best
        return min(known, key=lambda c: c.peak_bytes, default=None)

    @property
    def best(self) -> Candidate:
        return self.ranked[0]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def rates_for(req: PlanRequest) -> dict[str, DeviceRate]:
    if req.rates is not None:
        return req.rates
    return {name: DeviceRate(flops=kind.peak_tflops * 1e12 * req.efficiency, op_overhead_s=req.op_overhead_s)
            for name, kind in req.cluster.devices.items()}


def layouts(req: PlanRequest) -> tuple[list[tuple[Layout, int]], dict[str, int]]:
    """Every (layout, micro-batch) the runtime accepts for this model, batch and world, within the pruning."""
    spec, world, P = req.spec, req.cluster.world, req.cluster.workers_per_node
    invalid: dict[str, int] = {}
    out = []
    node_sizes = [d for d in _divisors(world) if d <= P]
    experts = _divisors(spec.experts) if spec.is_moe else [1]
    for pp in _divisors(world):
        if pp > spec.layers:
            break
        for tp in node_sizes:
            for cp in [c for c in _powers_of_two(MAX_CP) if (world // (pp * tp)) % c == 0]:
                dp = world // (pp * tp * cp)
                for ep in experts:
                    for etp in (node_sizes if spec.is_moe else [1]):
                        if (world // pp) % (ep * etp):
                            continue
                        try:
                            dims = ParallelDims.resolve(world, pp=pp, cp=cp, tp=tp, ep=ep, etp=etp)
                        except ConfigError:
                            invalid["sizes"] = invalid.get("sizes", 0) + 1
                            continue
                        per_replica = req.global_batch // dp if req.global_batch % dp == 0 else 0
                        if not per_replica:
                            invalid["train.global_batch"] = invalid.get("train.global_batch", 0) + 1
                            continue
                        micros = [req.micro_batch] if req.micro_batch else _powers_of_two(min(per_replica, 16))
                        for mb in micros:
                            for vpp in range(1, req.max_vpp + 1):
                                if vpp > 1 and (pp == 1 or (per_replica // mb) % pp):
                                    continue
                                try:
                                    dims.check_model(spec, global_batch=req.global_batch, micro_batch=mb, vpp=vpp)
                                except ConfigError as err:
                                    invalid[err.key] = invalid.get(err.key, 0) + 1
                                    continue
                                out.append((Layout(world=world, pp=pp, dp=dp, cp=cp, tp=tp, edp=dims.edp, ep=ep,
                                                   etp=etp, vpp=vpp), mb))
    return out, invalid


def memory_limit(req: PlanRequest) -> int:
    """Usable bytes per device: the smallest device's memory less the headroom."""
    return int(min(kind.memory_gib for kind in {node.device.name: node.device for node in req.cluster.nodes}.values())
               * GiB * (1 - req.headroom))


def evaluate(req: PlanRequest, lay: Layout, mb: int, *, placement: str = "auto",
             rates: dict[str, DeviceRate] | None = None, memory: list[RankMemory] | None = None,
             limit: int | None = None) -> Candidate:
    """Cost one layout: its memory, its placement and its time (``memory``: already known for the uniform split)."""
    rates = rates or rates_for(req)
    placed = place(req.cluster, lay, req.spec, rates, strategy=placement, global_batch=req.global_batch, micro_batch=mb,
                   transport=req.transport)
    counts = placed.stage_layers
    if memory is None or counts is not None:
        memory = rank_memory(req.spec, lay, global_batch=req.global_batch, micro_batch=mb, stage_layers=counts,
                             act_bytes=req.act_bytes, peak_only=True, zero=req.zero)
    limit = limit or memory_limit(req)
    fits = max(m.peak for m in memory) <= limit
    timing = step_time(req.spec, lay, placed.topology, rates, global_batch=req.global_batch, micro_batch=mb,
                       stage_layers=counts, transport=req.transport, zero=req.zero)
    return Candidate(layout=lay, micro_batch=mb, stage_layers=counts, placed=placed, memory=memory, time=timing,
                     fits=fits, memory_limit=int(limit))


def plan(req: PlanRequest, *, keep: int = REFINE, placement: str = "auto") -> PlanResult:
    """Search, cost and rank; raises :class:`NoPlanError` naming the shortfall when nothing fits.

    Branch and bound: every (layout, micro-batch) gets a :class:`~plait.scheduler.bounds.Bounds`, a step time no
    placement can beat, and they are costed in order of it; once ``keep`` plans (at least
    :data:`REFINE`) are faster than the next bound, the rest cannot enter the top ``keep``
    and stay uncosted in :attr:`PlanResult.pending`. ``placement``: ``auto`` places every
    layout by the NIC-aware sort, then the fastest :data:`REFINE` by the best of every
    candidate order; ``default`` or ``holmes`` use that one order throughout.
    """
    first = "holmes" if placement == "auto" else placement
    rates = rates_for(req)
    found, invalid = layouts(req)
    keep = max(keep, REFINE)
    bounds = Bounds(req, rates)
    order = sorted(((bounds.of(lay, mb), i) for i, (lay, mb) in enumerate(found)))
    ranked, rejected = [], []
    limit = memory_limit(req)
    too_big: dict[tuple[int, ...], int] = {}  # layout → a micro-batch out of memory: larger ones are too
    fastest: list[float] = []  # max-heap (negated) of the `keep` fastest step times so far
    stop = len(order)
    for at, (bound, i) in enumerate(order):
        if len(fastest) == keep and bound >= -fastest[0]:
            stop = at
            break
        lay, mb = found[i]
        cand = _cost(req, lay, mb, rates, limit, first, too_big)
        if cand is None:
            continue
        if not cand.fits:
            rejected.append(cand)
            continue
        ranked.append(cand)
        heapq.heappush(fastest, -cand.time.total)
        if len(fastest) > keep:
            heapq.heappop(fastest)
    pending = [(bound, found[i]) for bound, i in order[stop:]]
    if not ranked:
        raise NoPlanError(_shortfall(req, rejected, invalid))
    ranked.sort(key=lambda c: c.time.total)
    if placement != "auto":
        return PlanResult(request=req, ranked=ranked, rejected=rejected, invalid=invalid, searched=len(found),
                          pending=pending, _rates=rates, _limit=limit, _placement=first)
    # The fastest few: every candidate order (the file's too), so a placement is never worse than the default.
    refined = [_refine(req, c, rates, limit) for c in ranked[:REFINE]]
    ranked = sorted(refined, key=lambda c: c.time.total) + ranked[REFINE:]
    return PlanResult(request=req, ranked=ranked, rejected=rejected, invalid=invalid, searched=len(found),
                      pending=pending, _rates=rates, _limit=limit, _placement=first, _refined=True)


def _refine(req: PlanRequest, cand: Candidate, rates, limit: int) -> Candidate:
    """The plan placed by the best of every candidate order; the NIC-aware one kept if that one no longer fits."""
    better = evaluate(req, cand.layout, cand.micro_batch, rates=rates, placement="auto", limit=limit)
    return better if better.fits and better.time.total <= cand.time.total else cand


def _cost(req: PlanRequest, lay: Layout, mb: int, rates, limit: int, placement: str,
          too_big: dict | None = None) -> Candidate | None:
    """Memory (cheap, it rules most of a large search out), then placement and time; None: known too big."""
    family = (lay.pp, lay.dp, lay.cp, lay.tp, lay.ep, lay.etp, lay.vpp)
    if too_big is not None and too_big.get(family, mb + 1) <= mb:
        return None
    memory = rank_memory(req.spec, lay, global_batch=req.global_batch, micro_batch=mb, act_bytes=req.act_bytes,
                         peak_only=True, zero=req.zero)
    if max(m.peak for m in memory) > limit * 1.05:
        if too_big is not None:
            too_big[family] = min(mb, too_big.get(family, mb))
        return Candidate(layout=lay, micro_batch=mb, stage_layers=None, placed=Placed.default(req.cluster, lay),
                         memory=memory, time=None, fits=False, memory_limit=int(limit))
    return evaluate(req, lay, mb, rates=rates, placement=placement, memory=memory, limit=limit)


def _shortfall(req: PlanRequest, rejected: list[Candidate], invalid: dict[str, int]) -> str:
    if not rejected:
        rules = ", ".join(f"{k} ({v})" for k, v in sorted(invalid.items(), key=lambda kv: -kv[1])) or "none"
        return (f"no layout of {req.cluster.world} devices is valid for this model and batch; the rules that excluded "
                f"them: {rules}; try a train.global_batch that is a multiple of the device count")
    closest = min(rejected, key=lambda c: c.peak_bytes)
    need, have = closest.peak_bytes, closest.memory_limit
    worst = max(closest.memory, key=lambda m: m.peak)
    parts = max((("activations", worst.activations), ("optimizer state", worst.optimizer),
                 ("parameters + gradients", worst.params + worst.grads)), key=lambda kv: kv[1])
    P = req.cluster.workers_per_node
    nodes_needed = math.ceil(req.cluster.world * need / have / P)
    return (f"nothing fits: the smallest layout ({closest.name()}) needs {need / GiB:.2f} GiB per device, "
            f"{have / GiB:.2f} GiB is usable ({1 - req.headroom:.0%} of {have / (1 - req.headroom) / GiB:.0f} GiB); "
            f"most of it is {parts[0]} ({parts[1] / GiB:.2f} GiB); nearest change: about {nodes_needed} nodes of {P} "
            f"(if memory per device fell in proportion), "
            f"or devices with {need / (1 - req.headroom) / GiB:.0f} GiB, or a smaller train.global_batch / model")


def tokens_per_s(req: PlanRequest, cand: Candidate) -> float:
    return req.global_batch * req.spec.seq_len / cand.time.total


def mfu(req: PlanRequest, cand: Candidate) -> float:
    peak = sum(node.device.peak_tflops * 1e12 for node in req.cluster.nodes) * req.cluster.workers_per_node
    return train_flops_per_token(req.spec) * tokens_per_s(req, cand) / peak


def ledger_bytes(req: PlanRequest, cand: Candidate) -> dict[str, dict[str, int]]:
    """The ledger's expected bytes for this plan (the same closed form the parity tests hold to the ledger)."""
    return step_volume(req.spec, cand.layout, global_batch=req.global_batch, micro_batch=cand.micro_batch,
                       stage_layers=cand.stage_layers, zero=req.zero)


def default_stage_layers(spec: ModelSpec, lay: Layout) -> list[int]:
    return uniform_stage_layers(spec.layers, lay.pp * lay.vpp)
