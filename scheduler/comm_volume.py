"""Closed-form communication volume of one training step, per mesh axis and operation.

The numbers are what :mod:`plait.parallel.comm`'s ledger records, summed over all ranks
of the job (bytes each rank hands to a collective; see that module for the convention),
for fp32 activations and weights. The planner uses them to cost a layout; a test and
``plait bench parallel`` check them against real runs, where they must agree exactly.

Notation: G global batch, T sequence length, d model width, F MLP/expert hidden size,
V vocabulary, E experts, k experts per token, A = G / (micro · dp) micro-steps,
n = micro · T / (cp · tp) tokens each rank holds per micro-step, W world size, and
S = W / pp ranks per pipeline stage.

* **tp** (sequence parallel): per region (attention; dense MLP) per micro-step, each
  rank all-gathers ``n·d`` and reduce-scatters ``tp·n·d`` elements, forward and
  backward alike: ``all_gather 2·n·d``, ``reduce_scatter 2·tp·n·d``. With ``tp_overlap``
  (:mod:`plait.parallel.tp_overlap`) the four collectives are rings, each ``tp − 1`` sends
  of ``n·d`` per rank: ``send 4·(tp − 1)·n·d``.
* **cp**: per attention layer per micro-step, K and V are all-gathered (``2·n·d``) and
  their gradients reduce-scattered (``2·cp·n·d``).
* **pp**: per micro-step, each rank of a sending stage sends its ``n·d`` activation
  forward and each rank of a receiving stage its gradient back, across each of the
  ``pp·vpp − 1`` boundaries between virtual stages.
* **ep / etp / dp+cp+tp for MoE**: see :func:`layer_ops` (dropless dispatch).
* **data parallel** (:mod:`plait.parallel.dp`): one bucket per distinct group (labels whose
  groups hold the same ranks share one); each bucket of ``b`` parameters, padded
  to a multiple of its group size g, is reduce-scattered (``⌈b/g⌉·g``) and all-gathered
  (``⌈b/g⌉``) on each of its g ranks (with ``parallel.zero: false`` all-reduced, ``⌈b/g⌉·g``, instead);
  the squared gradient norm (8 bytes; none when every bucket spans the world then), the step's
  loss sums (16 bytes) and, for MoE, every layer's routing statistics (float64 [E + 2]) are
  all-reduced over the world, in one call.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from plait.scheduler.spec import ModelSpec

FP32 = 4


@dataclass(frozen=True)
class Layout:
    """Parallel sizes (the scheduler's own copy, so it plans without any process group)."""

    world: int
    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1
    edp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = 1


def uniform_stage_layers(layers: int, stages: int) -> list[int]:
    """Layers per virtual stage when none are given: as even as possible, the last stages take the extra ones.

    (The first pipeline rank holds the most activations under 1F1B, so it gets the fewest layers.)
    """
    base, extra = divmod(layers, stages)
    return [base + (1 if s >= stages - extra else 0) for s in range(stages)]


def rank_layers(lay: Layout, stage_counts: list[int]) -> list[int]:
    """Layers each pp rank holds (virtual stage v lives on pp rank v % pp)."""
    out = [0] * lay.pp
    for v, count in enumerate(stage_counts):
        out[v % lay.pp] += count
    return out


# The rank spacing of each gradient-reduction group inside a pipeline stage.
BUCKET_STRIDES = {"dp+cp+tp": lambda lay: 1, "dp+cp": lambda lay: lay.tp, "edp": lambda lay: lay.ep * lay.etp}


def buckets_of(spec: ModelSpec, lay: Layout, layers: int, first: bool, last: bool) -> list[tuple[str, int, int]]:
    """(group label, parameters per rank, group size) of the buckets of a rank with ``layers`` layers, the
    embedding if ``first``, the final norm and head if ``last``."""
    d, F, V = spec.dim, spec.ffn_dim, spec.vocab
    sharded_tp = 0  # decay, split over tp
    replicated_decay = 0  # whole on every rank of the stage
    replicated_vec = 2 * d * layers  # norm weights (no decay)
    experts = 0
    attn = 4 * d * d
    mlp = 0 if spec.is_moe else 3 * d * F
    if lay.tp > 1:
        sharded_tp += layers * (attn + mlp) // lay.tp
    else:
        replicated_decay += layers * (attn + mlp)
    if spec.is_moe:
        replicated_decay += layers * d * spec.experts
        experts = layers * 3 * (spec.experts // lay.ep) * (F // lay.etp) * d
    if first:
        replicated_decay += V * d
    if last:
        replicated_decay += V * d
        replicated_vec += d
    stage_ranks = lay.world // lay.pp
    # Labels whose groups hold the same ranks share a bucket, named by the first of them in this order (as
    # plait.parallel.dp.LABELS). Each group is every stride-th rank of the stage, so equal strides are equal groups.
    merged: dict[int, list] = {}
    for label, size, group in (("dp+cp+tp", replicated_decay + replicated_vec, stage_ranks),
                               ("dp+cp", sharded_tp, lay.dp * lay.cp),
                               ("edp", experts, lay.edp)):
        if size:
            merged.setdefault(BUCKET_STRIDES[label](lay), [label, 0, group])[1] += size
    return [tuple(entry) for entry in merged.values()]


def rank_buckets(spec: ModelSpec, lay: Layout, stage_counts: list[int]) -> list[list[tuple[str, int, int]]]:
    """Per pp rank: (group label, parameters per rank, group size) of each data-parallel bucket a rank holds.

    Every rank of a pipeline stage holds the same buckets (sizes are per rank: split over tp, ep, etp).
    """
    last = (len(stage_counts) - 1) % lay.pp
    return [buckets_of(spec, lay, layers, p == 0, p == last) for p, layers in enumerate(rank_layers(lay, stage_counts))]


@dataclass(frozen=True)
class Op:
    """One kind of collective a rank joins: ``calls`` of ``op`` on ``nbytes`` (ledger convention) over groups of
    ``size`` ranks spaced ``stride`` apart in rank order."""

    axis: str
    op: str
    size: int
    stride: int
    nbytes: int
    calls: int = 1


def layer_ops(spec: ModelSpec, lay: Layout, n: int, *, tp_overlap: bool = False, ep_overlap: bool = False) -> list[Op]:
    """The collectives of one layer for one micro-step, forward and backward, per rank (``n`` tokens held;
    ``tp_overlap``: the sequence-parallel collectives run as rings of sends; ``ep_overlap``: MoE layers
    exchange their tokens in two chunks, each with its own counts).

    The single list both this module's totals and the planner's step time are built from.
    MoE token bytes are dropless and averaged over the ranks of a stage: a single rank's
    depend on the routing (how many copies its experts receive), but summed over a stage
    they do not, since every copy a rank sends is received by exactly one rank, so the
    ledger's sum over all ranks is exact while one rank's share is an average.
    """
    d = spec.dim
    ops = []
    regions = 1 if spec.is_moe else 2  # sequence-parallel regions: attention; the dense MLP
    # per region: two rings forward, two backward, tp − 1 chunks sent each (a chunk goes as a few pieces, each
    # its own ledger call: the bytes are the same)
    if lay.tp > 1 and tp_overlap:
        ops.append(Op("tp", "send", lay.tp, 1, n * d * FP32, 4 * (lay.tp - 1) * regions))
    elif lay.tp > 1:
        ops += [Op("tp", "all_gather", lay.tp, 1, n * d * FP32, 2 * regions),
                Op("tp", "reduce_scatter", lay.tp, 1, lay.tp * n * d * FP32, 2 * regions)]
    if lay.cp > 1:  # K and V gathered, their gradients reduce-scattered
        ops += [Op("cp", "all_gather", lay.cp, lay.tp, n * d * FP32, 2),
                Op("cp", "reduce_scatter", lay.cp, lay.tp, lay.cp * n * d * FP32, 2)]
    if spec.is_moe:
        E, k = spec.experts, spec.top_k
        stage = lay.world // lay.pp
        if lay.cp * lay.tp > 1:  # routing counts of each dp rank's micro-batch block (int64 [dp, E + 2])
            ops.append(Op("dp+cp+tp", "all_reduce", stage, 1, 8 * lay.dp * (E + 2)))
        chunks = 2 if ep_overlap and lay.ep > 1 else 1  # plait.parallel.ep_overlap.CHUNKS, each with its own counts
        if lay.ep > 1:
            # per-expert counts to each expert's rank (int64); dispatch sends n·k rows and combine sends back the
            # rows received (n·k on average), forward and backward
            ops += [Op("ep", "all_to_all", lay.ep, lay.etp, 8 * E, chunks),
                    Op("ep", "all_to_all", lay.ep, lay.etp, n * k * d * FP32 // chunks, 4 * chunks)]
        if lay.etp > 1:
            # received counts per local expert; rows gathered to every etp peer (etp copies of what each received)
            # and partial sums scattered back, forward and backward
            ops += [Op("etp", "all_gather", lay.etp, 1, 8 * (E // lay.ep), chunks),
                    Op("etp", "all_to_all", lay.etp, 1, lay.etp * n * k * d * FP32 // chunks, 4 * chunks)]
    return ops


def bucket_ops(lay: Layout, buckets: list[tuple[str, int, int]], zero: bool = True) -> list[Op]:
    """Each data-parallel bucket's reduce-scatter (padded to a multiple of its group) and all-gather, per rank;
    ``zero=False`` (replicated optimizer state): its all-reduce instead."""
    ops = []
    for label, size, g in buckets:
        if g > 1:
            padded = math.ceil(size / g) * g
            stride = BUCKET_STRIDES[label](lay)
            if zero:
                ops += [Op(label, "reduce_scatter", g, stride, padded * FP32),
                        Op(label, "all_gather", g, stride, padded // g * FP32)]
            else:
                ops.append(Op(label, "all_reduce", g, stride, padded * FP32))
    return ops


def norm_is_local(lay: Layout, buckets: list[list[tuple[str, int, int]]], zero: bool = True) -> bool:
    """Replicated optimizer state with every bucket's group the whole world: each rank holds the whole reduced
    gradient, so its norm needs no all-reduce (:class:`plait.parallel.dp.ShardedAdamW`)."""
    return not zero and all(g == lay.world for rank in buckets for _, _, g in rank)


def step_volume(
    spec: ModelSpec, lay: Layout, *, global_batch: int, micro_batch: int, stage_layers: list[int] | None = None,
    centroids: int | None = None, precision_modules: int = 0, control: bool = False, tp_overlap: bool = False,
    ep_overlap: bool = False, zero: bool = True,
) -> dict[str, dict[str, int]]:
    """``{axis: {op: bytes}}`` one training step records over all ranks (the ledger's ``last_step`` bytes).

    ``centroids``: the step runs with ``parallel.ep_compress=lsh`` and its MoE layers sent this many
    bucket centroids in all (every rank, layer and micro-step; dropless, the uncompressed step sends
    ``world/pp · layers · A · n·k`` copies). The four token exchanges then move centroids instead of
    copies, and the step's closing all-reduce carries 7 float64 counters per layer.

    ``precision_modules``: a quantized ``precision`` recipe is on, the step samples statistics
    (``precision.stats_every``) and the model has this many linear modules; the step closes with two
    all-reduces of their statistics (3 amax and 6 counts, float64).

    ``control``: the job's control plane is on (``control.enabled``, the default of ``plait train``): its
    word rides on the step's closing all-reduce, 8 bytes per rank.

    ``tp_overlap``, ``ep_overlap``: ``parallel.tp_overlap`` / ``parallel.ep_overlap`` are on (see :func:`layer_ops`).

    ``zero``: ``parallel.zero``; false: each bucket is all-reduced (``⌈b/g⌉·g``) instead, and when every bucket's
    group is the world the closing all-reduce carries no squared norm (:func:`norm_is_local`).
    """
    d = spec.dim
    T = spec.seq_len
    A = global_batch // (micro_batch * lay.dp)
    n = micro_batch * T // (lay.cp * lay.tp)
    stages = lay.pp * lay.vpp
    counts = stage_layers or uniform_stage_layers(spec.layers, stages)
    vol: dict[tuple[str, str], int] = defaultdict(int)
    S = lay.world // lay.pp
    for op in layer_ops(spec, lay, n, tp_overlap=tp_overlap, ep_overlap=ep_overlap):
        vol[(op.axis, op.op)] += S * spec.layers * A * op.nbytes * op.calls
    if stages > 1:
        vol[("pp", "send")] += 2 * (stages - 1) * S * A * n * d * FP32
    per_rank = rank_buckets(spec, lay, counts)
    for p, buckets in enumerate(per_rank):
        for op in bucket_ops(lay, buckets, zero):
            vol[(op.axis, op.op)] += S * op.nbytes * op.calls
    if centroids is not None and spec.is_moe:
        copies = S * spec.layers * A * n * spec.top_k
        if lay.ep > 1:
            vol[("ep", "all_to_all")] += 4 * (centroids - copies) * d * FP32
        if lay.etp > 1:
            vol[("etp", "all_to_all")] += 4 * lay.etp * (centroids - copies) * d * FP32
    if lay.world > 1:
        moe_stats = 8 * spec.layers * (spec.experts + 2) if spec.is_moe else 0
        norm = 0 if norm_is_local(lay, per_rank, zero) else 8
        vol[("world", "all_reduce")] += lay.world * (norm + 16 + (56 * spec.layers if centroids is not None else 0)
                                                     + 72 * precision_modules + (8 if control else 0) + moe_stats)
    out: dict[str, dict[str, int]] = {}
    for (axis, op), b in sorted(vol.items()):
        out.setdefault(axis, {})[op] = b
    return out
