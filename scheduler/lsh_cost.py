"""``parallel.ep_compress=auto``: per MoE layer, does sending bucket centroids pay on this job's links?

Compression trades the expert all-to-all's bytes for work on every rank (hash, bucket
reduce and the gathers back, forward and backward). Both sides are measured on the job
itself, so the decision holds on any cluster, described or not:

* **the link**: at start the engine times ``all_to_all`` over the ep group at two sizes (the
  layer's uncompressed rows and an eighth of them) and fits ``seconds = latency + bytes ×
  seconds_per_byte`` (:func:`fit_link`). This is the link the ep group actually crosses,
  with its transport, contention between the node's ranks and the slowest peer;
* **the layer**: the first step runs every layer compressed and records, per layer and rank,
  its copies, its centroids and the seconds of the hash, the reduce and the gather back.

A layer is compressed when ``saved > cost`` with

* ``saved = 4 × (a2a(copies × row) − a2a(centroids × row)) + 3 × (copies − centroids) × e``:
  dispatch, combine and both their backward exchanges shrink alike, and the experts run on
  centroids only (``e``, the experts' forward seconds per row measured on step 1; their
  backward is twice the forward's FLOPs);
* ``cost = 2 × measured forward seconds``: the backward of the reduce and of the gather are
  memory-bound passes of the same size as their forward (the hash has none), so twice the
  forward is the work compression adds per micro-step.

The first step's ratio stands in for later steps'; the summary's per-step ratios show how
far it drifts.
"""

from __future__ import annotations

from dataclasses import dataclass

EXCHANGES = 4  # dispatch, combine, and the backward of each
BACKWARD_FACTOR = 2.0  # forward + a backward of the same size
EXPERT_PASSES = 3.0  # an expert's forward and its backward (twice the forward's FLOPs)


@dataclass(frozen=True)
class LinkFit:
    """All-to-all seconds over the ep group as ``latency_s + nbytes × seconds_per_byte`` (per rank's send buffer)."""

    latency_s: float
    seconds_per_byte: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes * self.seconds_per_byte

    @property
    def gbit_s(self) -> float:
        """The fitted rate of a rank's send buffer (Gbit/s); inf when bytes cost nothing measurable."""
        return 8e-9 / self.seconds_per_byte if self.seconds_per_byte > 0 else float("inf")


def fit_link(small: tuple[int, float], large: tuple[int, float]) -> LinkFit:
    """The line through two (bytes, seconds) measurements, clamped to non-negative latency and slope."""
    (b0, s0), (b1, s1) = small, large
    if b1 <= b0:
        raise ValueError(f"fit_link: the large size ({b1} B) must exceed the small one ({b0} B)")
    slope = max(0.0, (s1 - s0) / (b1 - b0))
    latency = max(0.0, s0 - slope * b0)
    return LinkFit(latency_s=latency, seconds_per_byte=slope)


@dataclass(frozen=True)
class LayerMeasure:
    """One layer on one rank per micro-step, from the first (compressed) step."""

    copies: float  # token copies the rank sent uncompressed would have sent
    centroids: float  # centroids it sent
    compress_s: float  # forward seconds of hash + reduce + gather back
    expert_row_s: float = 0.0  # the experts' forward seconds per row


@dataclass(frozen=True)
class Decision:
    layer: int
    compress: bool
    ratio: float  # centroids / copies
    saved_s: float  # all-to-all and expert seconds saved per micro-step
    cost_s: float  # compression seconds added per micro-step
    saved_a2a_s: float = 0.0  # the all-to-all's share of saved_s
    copies: float = 0.0  # token copies one rank sends per micro-step, uncompressed

    def as_dict(self) -> dict:
        return {"layer": self.layer, "compress": self.compress, "ratio": self.ratio, "copies": self.copies,
                "saved_ms": self.saved_s * 1e3, "saved_a2a_ms": self.saved_a2a_s * 1e3, "cost_ms": self.cost_s * 1e3}


def decide(layers: dict[int, LayerMeasure], link: LinkFit, row_bytes: int) -> list[Decision]:
    """Per layer (model layer index → its measurement): compress where the all-to-all time saved exceeds the cost."""
    out = []
    for layer, m in sorted(layers.items()):
        a2a = EXCHANGES * (link.seconds(m.copies * row_bytes) - link.seconds(m.centroids * row_bytes))
        saved = a2a + EXPERT_PASSES * (m.copies - m.centroids) * m.expert_row_s
        cost = BACKWARD_FACTOR * m.compress_s
        ratio = m.centroids / m.copies if m.copies else 1.0
        out.append(Decision(layer=layer, compress=saved > cost, ratio=ratio, saved_s=saved, cost_s=cost, saved_a2a_s=a2a,
                            copies=m.copies))
    return out


def describe(decisions: list[Decision], link: LinkFit) -> str:
    """The lines ``plait train`` prints once the first step has decided."""
    lines = [f"plait: ep_compress=auto: the ep all-to-all measured {link.gbit_s:.3g} Gbit/s per rank, "
             f"{link.latency_s * 1e3:.2f} ms per call"]
    for d in decisions:
        verdict = "lsh " if d.compress else "none"
        lines.append(f"plait:   layer {d.layer}: {verdict} (ratio {d.ratio:.2f}: saves {d.saved_s * 1e3:.2f} ms per "
                     f"micro-batch, {d.saved_a2a_s * 1e3:.2f} of them all-to-all, the rest expert compute; costs "
                     f"{d.cost_s * 1e3:.2f} ms of hashing and reduce)")
    return "\n".join(lines)
