"""Expert parallelism (EP × ETP × EDP, MoE Parallel Folding), applied in place to MoE layers.

Folding. The ranks of one pipeline stage are ``dp × cp × tp`` for attention and
``edp × ep × etp`` for the experts (same ranks, see :mod:`plait.scheduler.dims`). Every
rank holds distinct tokens. Experts ``[ep_rank·E/ep, (ep_rank+1)·E/ep)`` live on an ep
rank; ``etp`` splits each expert's hidden size ``F`` (w1/w3 rows, w2 columns); ranks that
differ only in their ``edp`` coordinate hold the same expert shard and see different
tokens, so expert gradients are summed over ``edp`` (tag ``_plait_reduce = "edp"``).
The router stays whole on every rank (its gradient is summed over ``dp+cp+tp`` elsewhere).

Phases of one MoE layer's forward on a rank with N tokens, top-k of E experts, EL = E/ep:

1. route (local): gate weights, expert ids, router softmax.
2. statistics: the balancing loss is defined per block of ``micro_batch`` sequences, the
   same set of tokens in every layout: a block is split over its rank's ``cp`` and ``tp``
   peers only, so ``aux_loss = E·Σ_e f_e·(Σ_local p_te)/N_b`` with ``f_e = count_e/(N_b·k)``
   (``N_b`` the block's tokens), summed over the cp·tp ranks of a block, is exactly the
   single-process loss of that block, and so is the sum of their gradients. When cp·tp = 1
   the layer's own operations are used on its own counts, with no collective, so the loss is
   bit-identical to the plain model's on the block. Otherwise one detached all-reduce over
   ``dp+cp+tp`` of an int64 [dp, E + 2] table whose row ``d`` is ``[copies per expert (E), N,
   copies dropped]`` of the block dp rank ``d`` holds (zeros in the other rows) gives the
   block's counts. The engine averages the blocks (``aux_coef / (A·dp)`` per block).
   ``local_stats`` keeps this rank's row; the engine sums every layer's over the ranks on the
   step's closing all-reduce (``tokens_per_expert`` and ``dropped_tokens`` of the stage).
3. dispatch: permute (copies sorted by expert), exchange per-expert counts over ``ep``
   (all-to-all, E int64), all-to-all-v the T rows over ``ep``, regroup the M received rows
   expert-major (all sources of local expert 0, then expert 1, ...). If ``etp > 1``: all-gather
   the EL local counts over ``etp``, then a variable-size all-gather of the rows, done as an
   all-to-all-v that sends the whole M-row buffer to every etp peer (its backward sums the
   peers' gradient contributions); the G = Σ_etp M gathered rows are regrouped expert-major.
4. experts: each local expert's SwiGLU slice on its rows (partial sums over F when etp > 1).
5. combine, the reverse: un-regroup; if ``etp > 1`` a variable-size reduce-scatter (all-to-all-v
   of each peer's rows back to it, then the sum of the etp partials); un-regroup; all-to-all-v
   back over ``ep``; gate-weighted sum per token (the layer's own ``combine``, ``index_add``).

Capacity mode (``capacity_factor > 0``): each rank sends each expert at most
``C = ceil(capacity_factor·N·k/E)`` copies. Among one rank's copies for one expert, the C with
the largest (renormalised top-k) gate weight are kept; equal weights keep the lower position
``token·k + slot`` first. Dropped copies are not sent and contribute zero (the residual carries
the token). Statistics (aux loss, ``tokens_per_expert``) count routed copies, before dropping.

Ledger, per MoE layer and micro-batch, on one rank (``b`` bytes per activation element,
``d`` = dim; T = copies this rank sends (N·k dropless, kept copies otherwise); M = rows it
receives over ep = copies its ep group routed to its EL experts; G = Σ of M over its etp
group). A size-1 group records nothing.

================  ===============  ==========================================================
axis              op               bytes (calls)
================  ===============  ==========================================================
forward
``dp+cp+tp``      all_reduce       dp·(E + 2)·8 (1), only when cp·tp > 1
``ep``            all_to_all       E·8 counts + T·d·b dispatch + M·d·b combine (3)
``etp``           all_gather       EL·8 (1)
``etp``           all_to_all       etp·M·d·b gather + G·d·b reduce-scatter (2)
backward
``ep``            all_to_all       T·d·b (reverse of combine) + M·d·b (reverse of dispatch) (2)
``etp``           all_to_all       etp·M·d·b (reverse of reduce-scatter) + G·d·b (2)
================  ===============  ==========================================================

Per rank M is data dependent; summed over an ep group ΣM = ΣT, so the group's token
all-to-all bytes per layer and micro-batch are exactly ``4·ΣT·d·b`` (dropless: ``4·Σ N·k·d·b``:
N·k rows in each of the four exchanges), plus ``ep·E·8`` for the counts. Summed over an etp
group the row bytes are ``4·etp·ΣM·d·b``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from plait.errors import ConfigError
from plait.parallel import comm
from plait.parallel.comm import Group
from plait.parallel.mesh import ParallelMeshes
from plait.scheduler.dims import MeshAxis

EXPERT_REDUCE = "edp"  # gradient reduction group of expert weights
_SHARD_DIM = {"w1": 1, "w3": 1, "w2": 2}  # tensor dim of each stacked weight that etp splits


@dataclass(frozen=True, eq=False)
class _EPState:
    """What an expert-parallel layer's forward needs: its groups and the capacity rule."""

    ep: Group
    etp: Group
    stage: Group
    capacity_factor: float
    dp: int = 1  # micro-batch blocks a stage holds at once (one per dp rank)
    block: int = 0  # this rank's dp coordinate: the row of the statistics table it fills
    hasher: object | None = None  # parallel.ep_compress=lsh: an ep_lsh.Hasher (phases 3-5 move bucket centroids)
    overlap: bool = False  # parallel.ep_overlap: phases 3-5 chunk by chunk, exchanges overlapped (ep_overlap)


def _is_moe(m: nn.Module) -> bool:
    """Duck-typed MoE layer (plait.parallel must not import plait.runtime)."""
    names = ("router", "experts", "route", "permute", "combine", "num_experts", "top_k")
    return all(hasattr(m, n) for n in names) and all(hasattr(m.experts, w) for w in _SHARD_DIM)


def _shard_experts(moe: nn.Module, ep: Group, etp: Group) -> None:
    """Keep this rank's experts (ep) and hidden-size slice (etp) as new contiguous parameters."""
    ex = moe.experts
    experts, ffn = ex.w1.shape[0], ex.w1.shape[1]
    if experts % ep.size:
        raise ConfigError("parallel.ep", ep.size, f"model.experts={experts} must be divisible by {ep.size} (experts are split across ep ranks)")
    if ffn % etp.size:
        raise ConfigError("parallel.etp", etp.size, f"model.ffn_dim={ffn} must be divisible by {etp.size} (each expert's hidden size is split across etp ranks)")
    el, fl = experts // ep.size, ffn // etp.size
    for name, dim in _SHARD_DIM.items():
        full: nn.Parameter = getattr(ex, name)
        part = full.detach().narrow(0, ep.rank * el, el).narrow(dim, etp.rank * fl, fl).clone(memory_format=torch.contiguous_format)
        param = nn.Parameter(part, requires_grad=full.requires_grad)
        param._plait_shards = (("ep", 0), ("etp", dim))
        param._plait_reduce = EXPERT_REDUCE
        setattr(ex, name, param)


def _regroup_index(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """Row order that turns a source-major layout into an expert-major one.

    ``counts`` [S, L]: rows arrive as source 0's experts 0..L-1, then source 1's, ...;
    indexing with the result lists expert 0's rows from every source, then expert 1's, ...
    ``rows`` (= counts.sum(), known on the host) spares the device a synchronisation.
    """
    s, l = counts.shape
    seg = torch.repeat_interleave(torch.arange(s * l, device=counts.device), counts.reshape(-1), output_size=rows)
    return torch.argsort((seg % l) * s + seg // l, stable=True)


def _inverse(index: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(index)
    inv[index] = torch.arange(index.numel(), device=index.device)
    return inv


def _capacity_mask(gate: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor, cap: int) -> torch.Tensor:
    """Which sorted copies are kept: per expert the ``cap`` largest gates (ties: lower position).

    ``gate``/``expert`` are per sorted copy (sorted by expert, stably, so within an expert
    the copies are in position order and a stable sort by gate keeps that order on ties).
    """
    by_gate = torch.argsort(-gate, stable=True)
    grouped = by_gate[torch.argsort(expert[by_gate], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(grouped.numel(), device=gate.device) - starts[expert[grouped]]
    keep = torch.zeros_like(expert, dtype=torch.bool)
    keep[grouped] = rank_in_expert < cap
    return keep


@dataclass(frozen=True)
class _Plan:
    """Host-side sizes of one forward's exchanges (one device-to-host copy per layer)."""

    send: list[int]  # rows to each ep peer
    recv: list[int]  # rows from each ep peer
    peer_rows: list[int]  # rows each etp peer received over ep
    expert_counts: list[int]  # rows per local expert after both gathers
    dropped: int  # copies this rank dropped
    ep_index: torch.Tensor | None  # source-major -> expert-major after the ep exchange
    etp_index: torch.Tensor | None  # peer-major -> expert-major after the etp gather

    @property
    def rows(self) -> int:  # M: rows this rank received over ep
        return sum(self.recv)


def _global_stats(moe: nn.Module, routing, counts: torch.Tensor, sent: torch.Tensor, st: _EPState) -> torch.Tensor:
    """Phase 2: the balancing loss (``aux_loss``) and this rank's statistics ``[counts (E), N, dropped]``.

    The Switch loss of a block is ``E·Σ_e f_e·(Σ_local p_te)/N_b`` summed over the ranks that split the block.
    When the block lies on this rank alone (cp·tp = 1) the layer's own operations are used on its own counts,
    with no collective, so the result is bit-identical to the plain layer; otherwise one detached all-reduce over
    the stage of an int64 [dp, E + 2] table whose row ``d`` is the block of dp rank ``d`` gives the block's counts.
    Under whole-document training (``moe.documents`` set) the loss is per document instead
    (:class:`~plait.runtime.models.moe.DocumentBalance`). The statistics are this rank's (``local_stats``); the
    engine sums them over the ranks at the step's end.
    """
    e, k, probs = moe.num_experts, moe.top_k, routing.probs
    mine = torch.cat([counts, counts.new_tensor([routing.indices.shape[0]]), (counts - sent).sum().reshape(1)]).detach()
    moe.local_stats = mine
    moe.tokens_per_expert = counts.detach()
    if getattr(moe, "documents", None) is not None:  # whole documents (hybrid DP): the loss is per document
        moe.aux_loss = moe.documents.loss(routing, e)
    elif st.stage.size == st.dp:  # cp·tp = 1: the block is this rank's tokens
        f = counts.to(probs.dtype) / routing.indices.numel()
        p = probs.mean(dim=0)
        moe.aux_loss = e * torch.sum(f * p)
    else:
        table = mine.new_zeros(st.dp, e + 2)
        table[st.block] = mine
        comm.all_reduce(table, st.stage)
        row = table[st.block]
        n_block = row[e].to(probs.dtype)
        f = row[:e].to(probs.dtype) / (n_block * k)
        p = probs.sum(dim=0) / n_block
        moe.aux_loss = e * torch.sum(f * p)
    return mine


def _plan(sent: torch.Tensor, stats: torch.Tensor, st: _EPState) -> _Plan:
    """Phase 3a: exchange per-expert counts over ep (all-to-all) and etp (all-gather); one host copy."""
    ep, etp = st.ep, st.etp
    el = sent.numel() // ep.size
    recv = comm.all_to_all(sent, ep, [el] * ep.size, [el] * ep.size).view(ep.size, el)
    peers = comm.all_gather(recv.sum(0), etp).view(etp.size, el)
    host = torch.cat([sent.view(ep.size, el).sum(1), recv.sum(1), peers.sum(1), peers.sum(0), stats[-1:]]).tolist()
    a, b, c = ep.size, 2 * ep.size, 2 * ep.size + etp.size
    send, got, peer_rows, expert_counts = host[:a], host[a:b], host[b:c], host[c:-1]
    return _Plan(
        send=send, recv=got, peer_rows=peer_rows, expert_counts=expert_counts, dropped=int(host[-1]),
        ep_index=_regroup_index(recv, sum(got)) if ep.size > 1 else None,
        etp_index=_regroup_index(peers, sum(peer_rows)) if etp.size > 1 else None,
    )


def _after_ep(rows: torch.Tensor, plan: _Plan, st: _EPState) -> torch.Tensor:
    """Phase 3b after the ep exchange: the received rows regrouped by expert, then gathered over etp."""
    if plan.ep_index is not None:
        rows = rows[plan.ep_index]
    if plan.etp_index is not None:
        # Variable-size all-gather: the whole buffer to every etp peer; backward sums their gradients.
        rows = comm.all_to_all_v(rows.repeat(st.etp.size, 1), st.etp, [plan.rows] * st.etp.size, plan.peer_rows)
        rows = rows[plan.etp_index]
    return rows


def _before_ep(y: torch.Tensor, plan: _Plan, st: _EPState) -> torch.Tensor:
    """Phase 5a up to the ep exchange, the reverse of :func:`_after_ep`: sum etp partials, undo the regrouping."""
    if plan.etp_index is not None:
        y = y[_inverse(plan.etp_index)]
        # Variable-size reduce-scatter: each peer's rows back to it, then the sum of the etp partials.
        y = comm.all_to_all_v(y, st.etp, plan.peer_rows, [plan.rows] * st.etp.size)
        y = y.view(st.etp.size, plan.rows, y.shape[-1]).sum(0)
    if plan.ep_index is not None:
        y = y[_inverse(plan.ep_index)]
    return y


def _dispatch(xs: torch.Tensor, plan: _Plan, st: _EPState) -> torch.Tensor:
    """Phase 3b: rows to their experts' ep rank, regrouped by expert, then gathered over etp."""
    return _after_ep(comm.all_to_all_v(xs, st.ep, plan.send, plan.recv), plan, st)


def _combine_rows(y: torch.Tensor, plan: _Plan, st: _EPState) -> torch.Tensor:
    """Phase 5a, the reverse of :func:`_dispatch`: sum etp partials of our rows, send rows home over ep."""
    return comm.all_to_all_v(_before_ep(y, plan, st), st.ep, plan.recv, plan.send)


def _ep_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Expert-parallel MoE forward: route, global stats, dispatch, experts, combine (see module doc)."""
    st: _EPState = self._plait_ep
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    n, e, k = x2d.shape[0], self.num_experts, self.top_k

    # 1. route (the router is replicated); copies sorted by expert; capacity decision
    routing = self.route(x2d)
    xs, perm = self.permute(x2d, routing.indices)
    counts, sent, mask = perm.counts, perm.counts, None
    if st.capacity_factor > 0:
        cap = math.ceil(st.capacity_factor * n * k / e)
        order = perm.order
        mask = _capacity_mask(routing.weights.detach().reshape(-1)[order], routing.indices.reshape(-1)[order], counts, cap)
        sent = torch.clamp(counts, max=cap)
    # 2. global load-balancing statistics over the stage
    stats = _global_stats(self, routing, counts, sent, st)
    if st.hasher is not None and self.lsh_on:  # phases 3-5 on bucket centroids (plait.parallel.ep_lsh)
        from plait.parallel.ep_lsh import compressed_forward

        keep = None
        if mask is not None:
            keep = torch.argsort((~mask).to(torch.int8), stable=True)[: int(sent.sum())]
            xs = xs[keep]
        self.dropped_tokens = int(stats[-1])
        y = compressed_forward(self, xs, sent, stats, st)
        if keep is not None:
            y = y.new_zeros(n * k, y.shape[-1]).index_copy(0, keep, y)
        return self.combine(y, perm, routing.weights, n).reshape(shape)
    if st.overlap:  # dropless, uncompressed (the config sees to it)
        self.dropped_tokens = 0
        from plait.parallel.ep_overlap import overlapped_forward

        return overlapped_forward(self, x2d, routing, st).reshape(shape)
    # 3. dispatch
    plan = _plan(sent, stats, st)
    self.dropped_tokens = plan.dropped
    keep = None
    if mask is not None:  # ascending indices of the kept copies; the count comes from the host (no sync)
        keep = torch.argsort((~mask).to(torch.int8), stable=True)[: sum(plan.send)]
        xs = xs[keep]
    rows = _dispatch(xs, plan, st)
    # 4. experts: local experts on their rows (partial sums over the hidden size when etp > 1)
    y = self.experts(rows, plan.expert_counts)
    # 5. combine: rows home, dropped copies as zeros, gate-weighted sum per token
    y = _combine_rows(y, plan, st)
    if st.hasher is not None:  # compression switched off for this layer (ep_compress=auto): every copy is a row
        self.lsh_rows += sum(plan.send)
        self.lsh_centroids += sum(plan.send)
    if keep is not None:
        y = y.new_zeros(n * k, y.shape[-1]).index_copy(0, keep, y)
    return self.combine(y, perm, routing.weights, n).reshape(shape)


_EP_CLASSES: dict[type, type] = {}


def _ep_class(cls: type) -> type:
    """A subclass of the layer's class whose forward is expert parallel (isinstance still holds)."""
    if cls not in _EP_CLASSES:
        _EP_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (cls,), {"forward": _ep_forward, "__doc__": cls.__doc__})
    return _EP_CLASSES[cls]


def apply_ep(model: nn.Module, meshes: ParallelMeshes, *, capacity_factor: float = 0.0, lsh=None,
             overlap: bool = False) -> None:
    """Shard every MoE layer's experts over ``ep``/``etp`` and make its forward expert parallel (in place).

    Must run on every rank of the job, with the same full model (same seed), so that the
    shards are pieces of the same weights. Parameter names are unchanged; each layer's
    class becomes a run-time subclass (``ExpertParallelMoE``) whose forward runs the phases of
    the module docstring, so ``isinstance`` checks still hold. After each forward a layer holds
    ``aux_loss`` (this rank's share of its micro-batch block's loss), ``local_stats``,
    ``tokens_per_expert`` and ``dropped_tokens`` (this rank's; the engine replaces the last two by
    the stage's sums at the end of a step). ``lsh`` (an :class:`plait.parallel.ep_lsh.LSHSettings`) sends bucket centroids
    instead of token copies (:mod:`plait.parallel.ep_lsh`); ``overlap`` runs the exchanges of one chunk of the
    tokens during another's experts (:mod:`plait.parallel.ep_overlap`). Raises ConfigError
    (``parallel.ep`` / ``parallel.etp`` / ``parallel.lsh.*``) when experts or hidden size do not
    divide, or the hash settings do not fit the hidden size.
    """
    if capacity_factor < 0 or not math.isfinite(capacity_factor):
        raise ConfigError("parallel.capacity_factor", capacity_factor, "accepted: 0 (dropless) or a finite number > 0")
    dp = meshes.group(MeshAxis.DP)  # ranked by dp coordinate: which micro-batch block a rank holds
    if overlap and (capacity_factor > 0 or lsh is not None):
        raise ConfigError("parallel.ep_overlap", True, "chunks dropless, uncompressed exchanges",
                          hint="set parallel.capacity_factor=0 and parallel.ep_compress=none, or parallel.ep_overlap=false")
    state = _EPState(ep=meshes.group("ep"), etp=meshes.group("etp"), stage=meshes.group("dp+cp+tp"),
                     capacity_factor=float(capacity_factor), dp=dp.size, block=dp.rank,
                     overlap=overlap and meshes.group("ep").size > 1)
    for module in list(model.modules()):
        if not _is_moe(module):
            continue
        if lsh is not None and state.hasher is None:
            from plait.parallel.ep_lsh import Hasher, reset_counters

            state = dataclasses.replace(state, hasher=Hasher(lsh, module.router.in_features))
        if state.hasher is not None:
            reset_counters(module)
        if hasattr(module, "_plait_ep"):
            raise ValueError(f"apply_ep: {type(module).__name__} is already expert parallel")
        _shard_experts(module, state.ep, state.etp)
        module._plait_ep = state
        module.dropped_tokens = 0
        module.__class__ = _ep_class(type(module))
