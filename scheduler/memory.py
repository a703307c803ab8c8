"""Memory per rank of a layout: what plait's runtime keeps alive, term by term.

The terms follow the runtime (:mod:`plait.parallel.dp`, :mod:`plait.parallel.pp`):

* **parameters** and their **gradients**, fp32, as each rank holds them (split over tp for
  attention and dense MLPs, over ep and etp for experts; the embedding on the first
  pipeline stage, the head on the last);
* **optimizer**: per data-parallel bucket, the owned fp32 slice of the parameters,
  AdamW's two moments and the reduce-scattered gradient of that slice, ``4 · ⌈b/g⌉``
  elements (ZeRO-1: state sharded over the bucket's group g); with replicated state
  (``parallel.zero: false``) the two moments of every parameter, ``2 · b``: the parameters
  are views of the flat copy AdamW updates, and the all-reduced gradient is the flat buffer;
* **accumulated**: the parameters' own ``.grad`` tensors, alive beside the flat gradient
  buffers from a step's first backward pass until its gradients are copied into them, so
  at the fullest moment only when an earlier micro-batch's backward pass came before it
  (more micro-batches than the rank keeps in flight); none with replicated state, whose
  ``.grad`` tensors are views of the flat buffers;
* **activations**: what autograd saves for backward, per token and layer, times the
  micro-batches a rank keeps in flight under its pipeline schedule (1 without a
  pipeline; ``pp − r`` on pp rank r under 1F1B; the interleaved schedule's warm-up + 1
  chunks), and on the last stage the loss's first backward step, the gradients of the
  log-softmax and of the logits (``2·V`` fp32 per token); on the other stages of a
  pipeline, each in-flight micro-batch's output and the gradient received for one;
* **buffers**: during the optimizer step, the larger of the ``.grad`` tensors (alive until
  every piece is filled) plus the reduce-scatter's ring chunks, and the largest bucket's
  all-gathered parameters on the way back (replicated: only the ring chunks; the all-reduce is
  in place and the ``.grad`` tensors are the flat buffers).

Activations per token and layer, in elements, were read off autograd's saved tensors of
plait's own blocks (``tests/test_plan_memory.py`` holds the formula to them exactly on one
rank); :func:`layer_activation_elements` writes them out. On more ranks the sequence-parallel chunk ``n = micro·T/(cp·tp)`` holds the norms; the
column-parallel inputs are gathered over tp (``tp·n`` tokens); K and V are gathered over
cp; expert rows are gathered over etp.

The peak is the larger of "backward of the fullest pipeline moment" (static + activations
+ accumulated) and "optimizer step" (static + buffers), where static is parameters,
gradient buffers and optimizer. Allocator slack and
autograd's short-lived temporaries are not counted: the planner keeps a headroom
(``PlanRequest.headroom``) for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.scheduler.comm_volume import Layout, buckets_of, rank_layers, uniform_stage_layers
from plait.scheduler.spec import ModelSpec

FP32 = 4


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one pipeline rank (every rank of a stage holds the same)."""

    pp_rank: int
    params: int
    grads: int
    optimizer: int
    activations: int  # all micro-batches in flight at the fullest moment
    buffers: int  # optimizer-step transients
    in_flight: float  # micro-batches (whole stages' worth) of activations alive at once
    accumulated: int = 0  # the parameters' .grad tensors, when alive at the fullest backward moment

    @property
    def peak(self) -> int:
        static = self.params + self.grads + self.optimizer
        return static + max(self.activations + self.accumulated, self.buffers)

    def as_dict(self) -> dict[str, int | float]:
        return {"pp_rank": self.pp_rank, "params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "accumulated": self.accumulated, "buffers": self.buffers,
                "in_flight": self.in_flight, "peak": self.peak}


def layer_activation_elements(spec: ModelSpec, lay: Layout, n: int) -> float:
    """Elements autograd saves for one layer and one micro-batch on one rank (n = micro·T/(cp·tp) tokens).

    One rank, plain model: dense ``11·d + 4·F + H + 2`` per token, MoE ``11·d + H + E + k·(4·F + 3·d + 5) + 3`` and ``E`` more
    per layer (the tokens each expert receives).
    The attention half is ``8·d + H + 1``: the norm's input, normalised value and scale
    (``2·d + 1``, on the sequence-parallel chunk), its output as the q/k/v input (``d``,
    gathered over tp), and q, k, v, rotated q and k, the attention output and its
    reshape (``5·d`` split over tp heads, ``H`` log-sum-exp values). The dense MLP half is
    ``3·d + 4·F + 1``: norm (``2·d + 1``), the gathered input (``d``) and the four
    F-wide tensors of SwiGLU split over tp. The MoE half keeps the norm and its output on
    the chunk (``3·d + 1``), the router's logits (``E``) and per routed copy
    ``4·F + 3·d + 5`` (gathered over etp, F split over etp), and one more per token.
    """
    d, F, H = spec.dim, spec.ffn_dim, spec.heads
    tp, cp, etp = lay.tp, lay.cp, lay.etp
    attention = (2 * d + 1) * n + d * tp * n + (5 * d + H) * n
    if cp > 1:  # K and V of the whole sequence kept for backward (this rank's heads)
        attention += 2 * d * n * (cp - 1)
    if spec.is_moe:
        k, E = spec.top_k, spec.experts
        ffn = (3 * d + 2) * n + E * n + k * n * (4 * F + 3 * d * etp + 5) + E
    else:
        ffn = (2 * d + 1) * n + d * tp * n + 4 * F * n
    return attention + ffn


def head_activation_elements(spec: ModelSpec, n: int) -> float:
    """The rest of a rank's saved tensors for one micro-batch, read off autograd like the layers:
    ``(V + 3·d + 2)`` per token (the final norm, the head's input, the log-softmax of the
    logits, the token ids of the embedding and the loss) and the rotary tables ``T·d/H + 1``,
    which every layer shares."""
    return (spec.vocab + 3 * spec.dim + 2) * n + spec.seq_len * spec.dim // spec.heads + 1


def in_flight(pp: int, vpp: int, micros: int, pp_rank: int) -> float:
    """Most micro-batches of activations pp rank ``pp_rank`` holds at once, in whole stages (vpp chunks = 1)."""
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp - pp_rank, micros))
    total = micros * vpp
    warm = min(2 * (pp - pp_rank - 1) + (vpp - 1) * pp, total)
    return min(warm + 1, total) / vpp


def rank_memory(spec: ModelSpec, lay: Layout, *, global_batch: int, micro_batch: int,
                stage_layers: list[int] | None = None, act_bytes: int = FP32, peak_only: bool = False,
                zero: bool = True) -> list[RankMemory]:
    """:class:`RankMemory` of every pp rank; ``peak_only``: only ranks that could hold the peak; ``zero``:
    ``parallel.zero`` (false: replicated optimizer state).

    A rank's memory depends on its layer count, whether it holds the embedding or the head, and
    its micro-batches in flight, which never grow with the pp rank: of ranks alike in the first
    three, the first holds the most, so ``peak_only`` keeps the first rank of each kind.
    """
    stages = lay.pp * lay.vpp
    counts = stage_layers or uniform_stage_layers(spec.layers, stages)
    micros = global_batch // (micro_batch * lay.dp)
    n = micro_batch * spec.seq_len // (lay.cp * lay.tp)
    per_layer = layer_activation_elements(spec, lay, n)
    head = head_activation_elements(spec, n)
    last = (stages - 1) % lay.pp
    seen: set[tuple[int, bool, bool]] = set()
    out = []
    for p, layers in enumerate(rank_layers(lay, counts)):
        kind = (layers, p == 0, p == last)
        if peak_only and kind in seen:
            continue
        seen.add(kind)
        buckets = buckets_of(spec, lay, layers, p == 0, p == last)
        params = sum(size for _, size, _ in buckets)
        shards = sum(-(-size // g) for _, size, g in buckets)
        largest = max((-(-size // g) * g for _, size, g in buckets), default=0)
        stage_elems = per_layer * layers + (head if p == last else 0)
        flight = in_flight(lay.pp, lay.vpp, micros, p)
        # the loss's backward starts with every activation saved: the log-softmax's gradient and the logits', fp32
        loss_grads = 2 * n * spec.vocab * FP32 if p == last else 0
        # a stage before the last keeps each in-flight micro-batch's output (d per token: no op of its own saves
        # it) to run the backward pass from, and at that backward pass holds the gradient received for it
        outputs = int((flight + 1) * n * spec.dim * act_bytes) if lay.pp > 1 and p != last else 0
        out.append(RankMemory(
            pp_rank=p,
            params=params * FP32,
            grads=params * FP32,
            optimizer=(4 * shards if zero else 2 * params) * FP32,
            activations=int(stage_elems * flight * act_bytes) + loss_grads + outputs,
            # replicated: the .grad tensors are views of the flat buffers, so neither term holds them
            accumulated=params * FP32 if micros > flight and zero else 0,
            buffers=(max(params + 2 * -(-largest // max(1, lay.world)), largest) if zero
                     else 2 * -(-largest // max(1, lay.world))) * FP32,
            in_flight=flight,
        ))
    return out
