"""The ``parallel.*`` section of the job config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from plait.errors import ConfigError
from plait.scheduler.dims import ParallelDims
from plait.scheduler.placement import Placement


@dataclass(kw_only=True)
class LSHConfig:
    """``parallel.lsh.*``: how ``parallel.ep_compress=lsh`` hashes tokens (see :mod:`plait.parallel.ep_lsh`)."""

    hashes: int = 6  # cross-polytope hash functions whose codes form one bucket key (more: finer buckets)
    # rotated coordinates a code looks at: 2·dim codes per hash (more: finer buckets, better quality, less compression);
    # 0: min(64, model.dim padded to a power of two)
    dim: int = 0
    seed: int = 0  # of the random rotations; every rank uses the same
    center: bool = True  # hash each copy's offset from the mean of the rank's copies (see plait.parallel.ep_lsh)
    # true: each token gets E(centroid) + (token − centroid), the paper's residual compensation; false: E(centroid).
    # Off by default: expert outputs are far smaller than their normalised inputs, so the residual swamps them
    # (measured on the demo model: cosine to the exact outputs 0.16-0.91 with it, 0.97-0.98 without).
    compensate: bool = False
    probe_every: int = 50  # steps between fidelity probes (one micro-batch run exactly too); 0: never
    # ep_compress=auto: steps timed compressed, after a first step left out (first calls allocate and warm up), whose
    # per-layer median decides; more steps: a steadier decision, later
    auto_steps: int = 3

    def resolved_dim(self, hidden: int | None = None) -> int:
        """``dim``, or for 0 the default: 64, or fewer when the hidden size (padded) has fewer coordinates."""
        from plait.ops.lsh import padded_length

        if self.dim:
            return self.dim
        return min(64, padded_length(hidden)) if hidden is not None else 64

    def validate(self, hidden: int | None = None) -> None:
        """Raises ConfigError naming the ``parallel.lsh.*`` field (``hidden``: model.dim, when known)."""
        from plait.ops.lsh import MAX_KEY_BITS, code_bits, padded_length

        if self.auto_steps < 1:
            raise ConfigError("parallel.lsh.auto_steps", self.auto_steps,
                              "accepted: a positive number of steps to time before ep_compress=auto decides, e.g. 3")
        if self.hashes < 1:
            raise ConfigError("parallel.lsh.hashes", self.hashes, "accepted: a positive number of hash functions, e.g. 6")
        if self.dim < 0:
            raise ConfigError("parallel.lsh.dim", self.dim, "accepted: 0 (min(64, model.dim)) or a positive number of "
                              "coordinates, e.g. 64")
        if hidden is not None and self.dim > padded_length(hidden):
            raise ConfigError("parallel.lsh.dim", self.dim,
                              f"accepted: 1 … {padded_length(hidden)} (model.dim = {hidden} padded to a power of two)")
        dim = self.resolved_dim(hidden)
        bits = self.hashes * code_bits(dim)
        if bits > MAX_KEY_BITS:
            raise ConfigError("parallel.lsh.hashes", self.hashes,
                              f"{self.hashes} hashes of {code_bits(dim)} bits (parallel.lsh.dim = {dim}) need {bits} "
                              f"bits; a bucket key holds {MAX_KEY_BITS}",
                              hint=f"set parallel.lsh.hashes ≤ {MAX_KEY_BITS // code_bits(dim)}, or a smaller parallel.lsh.dim")
        if self.probe_every < 0:
            raise ConfigError("parallel.lsh.probe_every", self.probe_every, "accepted: 0 (never) or a positive number of steps")


@dataclass(kw_only=True)
class CO2Config:
    """``parallel.co2.*``: local steps and the outer update of ``parallel.dp_mode=co2`` (see :mod:`plait.parallel.co2`).

    Defaults are the CO2 paper's public ones (τ = 48, outer momentum 0.5, outer lr 1.0). A round's parameter
    all-reduce runs during the next round, so a short run, or one whose link moves the parameters in fewer
    steps, wants a smaller ``tau``.
    """

    tau: int = 48  # local AdamW steps per round
    outer_lr: float = 1.0  # α: x_next = x_start − α·m
    outer_momentum: float = 0.5  # β: m = β·m + Δ/Λ
    gap_penalty: bool = True  # Λ = 1 + ‖gap‖/‖Δ‖ (the staleness gap, in units of the update it corrects); false: Λ = 1
    clip: float = 0.0  # each element of the outer momentum is clamped to [−clip, clip]; 0: no clipping

    def validate(self) -> None:
        if not isinstance(self.tau, int) or isinstance(self.tau, bool) or self.tau < 1:
            raise ConfigError("parallel.co2.tau", self.tau, "accepted: a positive number of local steps per round, e.g. 48")
        for name, lo_open in (("outer_lr", True), ("outer_momentum", False), ("clip", False)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"parallel.co2.{name}", value, "accepted: a finite number")
            if value < 0 or (lo_open and value == 0):
                raise ConfigError(f"parallel.co2.{name}", value,
                                  "accepted: a positive number, e.g. 1.0" if lo_open else "accepted: 0 or a positive number")
        if self.outer_momentum >= 1:
            raise ConfigError("parallel.co2.outer_momentum", self.outer_momentum, "accepted: 0 ≤ β < 1, e.g. 0.5")
        if not isinstance(self.gap_penalty, bool):
            raise ConfigError("parallel.co2.gap_penalty", self.gap_penalty, "accepted: true or false")


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel sizes of both foldings (attention: pp·dp·cp·tp; experts: pp·edp·ep·etp) and the pipeline schedule."""

    tp: int = 1  # tensor (+ sequence) parallel size of attention and dense MLPs
    pp: int = 1  # pipeline stages
    cp: int = 1  # context parallel: each sequence split over cp ranks (zig-zag chunks)
    dp: int = 0  # data parallel; 0: derive as world / (pp·cp·tp)
    ep: int = 1  # expert parallel: experts split over ep ranks
    etp: int = 1  # expert tensor parallel: each expert's hidden size split over etp ranks
    edp: int = 0  # expert data parallel; 0: derive as world / (pp·ep·etp)
    pp_schedule: Literal["1f1b", "interleaved"] = "1f1b"
    vpp: int = 1  # virtual stages per pipeline rank (interleaved schedule)
    pp_layers: list[int] | None = None  # layers per (virtual) stage, e.g. [3, 1]; None: as even as possible
    capacity_factor: float = 0.0  # MoE token dropping: each expert takes ≤ factor·fair share per source rank; 0: dropless
    # The node of each rank, e.g. [0, 1, 0, 1]; None: ranks R·P … R·P+P-1 on node R (P workers per node).
    placement: list[int] | None = None
    auto: bool = False  # plait train plans the sizes, schedule, stage split and placement (plait plan's best)
    # Hybrid data parallelism (needs data.packing=documents): each step's documents run whole on one rank or
    # split over an aligned power-of-two block of the dp ranks, as the balance scheduler decides.
    hybrid_dp: bool = False
    hdp_budget: int = 0  # tokens one rank may hold in a step; 0: train.micro_batch × model.seq_len
    # balance: the scheduler's plan. static: the baseline it is measured against, a static dp × cp mesh whose cp
    # is the smallest power of two that holds data.max_len, every document split over its replica's cp ranks.
    hdp_schedule: Literal["balance", "static"] = "balance"
    # The expert all-to-all: none sends every token copy; lsh sends one centroid per bucket of similar copies
    # (LSH-MoE; parallel.lsh.* sets the hashing); auto measures the first step and keeps lsh on the layers where
    # the all-to-all time it saves exceeds its hashing time (plait.scheduler.lsh_cost).
    ep_compress: Literal["none", "lsh", "auto"] = "none"
    lsh: LSHConfig = field(default_factory=LSHConfig)
    # Data-parallel gradients are reduce-scattered in pieces of bucket_mb MiB (fp32), each as soon as the backward
    # pass has made all of its gradients (grad_overlap), while the rest of the backward pass runs.
    grad_overlap: bool = True
    bucket_mb: float = 25.0
    # MoE layers cut their tokens in two after routing: one half's expert all-to-alls run during the other's experts
    ep_overlap: bool = False
    # sync: every step's gradients are reduced over dp. co2: each dp replica takes parallel.co2.tau local steps,
    # then its parameters are averaged over dp while the next round runs, and an outer update with momentum uses
    # that average one round late (CO2); cp, tp, pp and ep stay synchronous inside a replica.
    dp_mode: Literal["sync", "co2"] = "sync"
    co2: CO2Config = field(default_factory=CO2Config)
    # Tensor parallelism: each sequence-parallel region's all-gather and reduce-scatter run as tp rings whose
    # transfers overlap the chunk-by-chunk GEMMs of its linears (plait.parallel.tp_overlap); same math.
    tp_overlap: bool = False
    # true (ZeRO-1): optimizer state sharded over each gradient bucket's group, gradients reduce-scattered and the
    # updated parameters all-gathered. false: every rank keeps the whole optimizer state (the model's AdamW moments,
    # 8 bytes per parameter), gradients are all-reduced during the backward pass and nothing is gathered after
    # the update: fewer synchronisations per step, for a model whose state fits (plait.parallel.dp).
    zero: bool = True

    def validate(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "etp", "vpp"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"parallel.{name}", value, "accepted: a positive integer")
        for name in ("dp", "edp"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"parallel.{name}", value, "accepted: 0 (derive from the world size) or a positive integer")
        if self.capacity_factor < 0:
            raise ConfigError("parallel.capacity_factor", self.capacity_factor, "accepted: 0 (dropless) or a positive number such as 1.25")
        self.lsh.validate()
        if self.dp_mode not in ("sync", "co2"):
            raise ConfigError("parallel.dp_mode", self.dp_mode, "accepted: sync or co2")
        self.co2.validate()
        if self.vpp > 1 and self.pp_schedule != "interleaved":
            raise ConfigError("parallel.vpp", self.vpp, "virtual stages need parallel.pp_schedule=interleaved",
                              hint="set parallel.pp_schedule=interleaved, or parallel.vpp=1")
        if not isinstance(self.bucket_mb, (int, float)) or isinstance(self.bucket_mb, bool) or not self.bucket_mb > 0 \
                or self.bucket_mb == float("inf"):
            raise ConfigError("parallel.bucket_mb", self.bucket_mb, "accepted: a positive number of MiB such as 1 or 0.5")
        if not isinstance(self.ep_overlap, bool):
            raise ConfigError("parallel.ep_overlap", self.ep_overlap, "accepted: true or false")
        if self.ep_overlap and self.capacity_factor > 0:
            raise ConfigError("parallel.ep_overlap", True, "chunks dropless exchanges only",
                              hint="set parallel.capacity_factor=0, or parallel.ep_overlap=false")
        if self.ep_overlap and self.ep_compress != "none":
            raise ConfigError("parallel.ep_overlap", True, f"does not chunk compressed exchanges (parallel.ep_compress="
                              f"{self.ep_compress})", hint="set parallel.ep_compress=none, or parallel.ep_overlap=false")
        if not isinstance(self.grad_overlap, bool):
            raise ConfigError("parallel.grad_overlap", self.grad_overlap, "accepted: true or false")
        if not isinstance(self.zero, bool):
            raise ConfigError("parallel.zero", self.zero, "accepted: true or false")
        if not self.zero and self.dp_mode == "co2":
            raise ConfigError("parallel.zero", False, "CO2's outer state lives on the optimizer's ZeRO shards",
                              hint="set parallel.zero=true with parallel.dp_mode=co2, or parallel.dp_mode=sync")
        if not isinstance(self.tp_overlap, bool):
            raise ConfigError("parallel.tp_overlap", self.tp_overlap, "accepted: true or false")
        if self.hdp_budget < 0:
            raise ConfigError("parallel.hdp_budget", self.hdp_budget,
                              "accepted: 0 (train.micro_batch × model.seq_len) or a positive number of tokens")
        if self.pp_layers is not None:
            stages = self.pp * self.vpp
            if len(self.pp_layers) != stages or any(not isinstance(n, int) or n < 1 for n in self.pp_layers):
                raise ConfigError("parallel.pp_layers", self.pp_layers,
                                  f"accepted: a list of pp × vpp = {stages} positive layer counts, e.g. {[1] * stages}")

    def placement_of(self, world: int, nnodes: int) -> Placement:
        """Which node each rank runs on (raises ConfigError naming what is wrong with ``parallel.placement``)."""
        return Placement.resolve(self.placement, world=world, nnodes=nnodes)

    def dims(self, world: int) -> ParallelDims:
        """The resolved sizes for ``world`` ranks (raises ConfigError naming the constraint)."""
        return ParallelDims.resolve(world, pp=self.pp, dp=self.dp, cp=self.cp, tp=self.tp, ep=self.ep, etp=self.etp, edp=self.edp)

    def resolved_dp(self, world: int) -> int:
        return self.dims(world).dp
