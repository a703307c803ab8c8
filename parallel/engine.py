"""One training step of a model split over every dimension, equal to one process's step.

:class:`ParallelEngine` takes a plain model (built the same way, with the same seed, on
every rank) and splits it in a fixed order:

    apply_tp → apply_cp → apply_ep → split into pipeline stages → data-parallel optimizer

Each step gets the *whole* global batch (every rank loads the same rows; it is a few
kilobytes of token ids) and takes its share:

* the step runs ``A = global_batch / (micro_batch · dp)`` micro-steps; micro-step ``i``
  covers global rows ``[i·micro·dp, (i+1)·micro·dp)`` and the dp rank ``d`` takes
  ``micro`` of them, rows ``i·micro·dp + d·micro …``. So "micro-batch ``i``" is the same
  set of sequences for every layout with the same ``micro·dp``;
* cp rank ``c`` takes the zig-zag chunks ``c`` and ``2cp−1−c`` of each sequence;
* tp rank ``t`` takes the ``t``-th contiguous part of that (sequence parallelism).

Each rank's loss is its share of the global loss: the sum of its tokens' cross-entropy
divided by the number of tokens in the global batch, plus ``aux_coef / B`` times its
share of the MoE balancing loss of its micro-batch block, with ``B = A·dp =
global_batch / micro_batch`` blocks per step. A block is ``micro_batch`` consecutive
sequences, the same in every layout, and its balancing statistics span only the ranks
that split it (cp and tp, see :mod:`plait.parallel.ep`), so the loss does not depend on
the layout: one process with micro-steps of ``micro_batch`` sequences computes it too. Gradients are then *summed* over each parameter's reduction
group (:mod:`plait.parallel.dp`), which gives the single-process gradient.
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from plait.parallel import comm
from plait.parallel.cp import apply_cp, zigzag_positions
from plait.scheduler.dims import MeshAxis, ParallelDims
from plait.parallel.dp import AdamWSettings, ShardedAdamW
from plait.parallel.mesh import ParallelMeshes
from plait.parallel.pp import apply_pp, schedule
from plait.parallel.tp import apply_tp


@dataclass(kw_only=True)
class EngineConfig:
    micro_batch: int
    global_batch: int
    seq_len: int
    aux_loss_coef: float = 0.0
    grad_clip: float = 1.0
    adamw: AdamWSettings = field(default_factory=AdamWSettings)
    dtype: Literal["float32", "bfloat16"] = "float32"
    pp_schedule: Literal["1f1b", "interleaved"] = "1f1b"
    vpp: int = 1
    pp_layers: list[int] | None = None
    capacity_factor: float = 0.0
    hybrid_dp: bool = False  # steps of whole documents placed by the balance scheduler (train_documents)
    hdp_budget: int = 0  # tokens one rank may hold per step
    hdp_schedule: Literal["balance", "static"] = "balance"
    max_len: int = 0  # longest document
    lsh: Any = None  # a plait.parallel.config.LSHConfig: the expert all-to-all sends bucket centroids (ep_lsh)
    lsh_auto: bool = False  # ep_compress=auto: the first step decides per layer (plait.scheduler.lsh_cost)
    precision: Any = None  # a plait.parallel.precision.PrecisionConfig that quantizes (plait.parallel.lowp), or None
    # The control plane's word rides on the step's closing all-reduce (8 more bytes): rank 0 puts the command the
    # coordinator gave it into control_word, and after the step every rank reads the same control_agreed
    control: bool = False
    grad_overlap: bool = True  # reduce-scatter each gradient piece as soon as it is ready, during the backward pass
    bucket_mb: float = 25.0  # size of a gradient piece (fp32 MiB): the unit of that overlap
    ep_overlap: bool = False  # the expert all-to-alls of one chunk of a layer's tokens during another's experts
    co2: Any = None  # a plait.parallel.config.CO2Config: dp replicas take local steps, averaged by CO2's outer update
    tp_overlap: bool = False  # TP regions' all-gather / reduce-scatter as rings overlapping their GEMMs
    zero: bool = True  # ZeRO-1 optimizer state sharded over each bucket's group; false: replicated, gradients all-reduced


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean cross-entropy over the global batch
    aux_loss: float  # balancing loss (summed over MoE layers), mean over the step's micro-batch blocks (documents
    # under hybrid DP)
    grad_norm: float
    tokens: int | None = None  # tokens of a step of documents
    balance: dict[str, Any] | None = None  # hybrid DP: the plan's predicted and the measured imbalance
    # parallel.ep_compress=lsh, per model layer (None where the layer is dense): centroids sent / copies, and the
    # mean cosine of compressed to exact expert outputs on a probe step (None on other steps)
    lsh_ratio: list[float | None] | None = None
    lsh_fidelity: list[float | None] | None = None
    # precision recipes that quantize, on steps that sample statistics (precision.stats_every): per linear module,
    # its recipe and the step's amax / overflow / underflow
    precision: dict[str, dict[str, Any]] | None = None


def _is_moe(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("router", "experts", "route", "permute", "combine"))


class ParallelEngine:
    """Forward, backward and optimizer step of this rank's part of ``model``."""

    def __init__(self, model: nn.Module, meshes: ParallelMeshes, config: EngineConfig, device: torch.device):
        self.dims: ParallelDims = meshes.dims
        self.meshes = meshes
        self.config = config
        self.device = device
        self.coords = meshes.coordinates()
        self.accumulation = max(1, config.global_batch // (config.micro_batch * self.dims.dp))
        self.is_moe = any(_is_moe(m) for m in model.modules())
        # Every MoE layer of the whole model, numbered before the pipeline splits it: the step's closing all-reduce
        # sums each layer's statistics over the ranks (tokens_per_expert)
        self.moe_layers = 0
        for m in model.modules():
            if _is_moe(m):
                m._plait_moe_index = self.moe_layers
                self.moe_layers += 1
        self.experts = getattr(model.cfg, "experts", 0)
        self.expert_stats: torch.Tensor | None = None  # float64 [MoE layers, E + 2] of the last step, summed
        self.dim = model.cfg.dim
        self.hybrid = None
        linears = None
        if config.precision is not None:
            from plait.parallel.lowp import linear_names

            linears = linear_names(model)  # the whole model's, the same on every rank
        if config.hybrid_dp:
            from plait.parallel.hdp import HybridDP

            # Expert all-to-alls and pipeline schedules span ranks with different documents: every rank then
            # makes every round's call. Made before tensor parallelism splits the model: rank 0 times the whole
            # model for the cost.
            expert = self.is_moe and self.dims.ep * self.dims.etp > 1
            self.hybrid = HybridDP(model, self.dims, budget=config.hdp_budget, max_len=config.max_len,
                                   schedule=config.hdp_schedule, tp=meshes.group(MeshAxis.TP),
                                   lockstep=expert or self.dims.pp > 1 or config.vpp > 1,
                                   multiple=self.dims.pp if config.vpp > 1 else 1)
        if config.tp_overlap and config.precision is not None and self.dims.tp > 1:
            from plait.errors import ConfigError

            raise ConfigError("parallel.tp_overlap", True, "the overlapped projections multiply in the model's own "
                              "dtype, so a quantized precision recipe would not apply to them",
                              hint="set parallel.tp_overlap=false, or a precision recipe that does not quantize")
        apply_tp(model, meshes.group(MeshAxis.TP), overlap=config.tp_overlap)
        apply_cp(model, meshes.group(MeshAxis.CP), config.seq_len)
        # Under hybrid DP without expert parallelism experts stay whole on every rank: each rank makes its own
        # number of forward calls per step, so no collective may run inside one (the MoE statistics stay local).
        if self.is_moe and (self.hybrid is None or self.dims.ep * self.dims.etp > 1):
            from plait.parallel.ep import apply_ep

            apply_ep(model, meshes, capacity_factor=config.capacity_factor, lsh=config.lsh, overlap=config.ep_overlap)
        self.pipeline = None
        if self.dims.pp > 1 or config.vpp > 1:
            # hybrid DP builds each step's schedule for its own number of calls (see HybridDP.step)
            micros = self.dims.pp if self.hybrid is not None else self.accumulation
            self.pipeline = apply_pp(model, self.dims, meshes.rank, micros=micros, vpp=config.vpp, layers=config.pp_layers)
            self.chunks = self.pipeline.chunks
        else:
            self.chunks = [model]
        self.precision = None
        self.control_word = 0.0
        self.control_agreed = 0.0
        if linears is not None:
            from plait.parallel.lowp import apply_precision

            self.precision = apply_precision(self.chunks, config.precision, linears, layers=model.cfg.layers,
                                             base="bf16" if config.dtype == "bfloat16" else "fp32")
        named: dict[str, nn.Parameter] = {}
        for chunk in self.chunks:
            named.update(dict(chunk.named_parameters()))
        self.params = named
        groups = {label: meshes.group(label) for label in ("dp+cp", "dp+cp+tp", "edp")}
        replicas = None
        if config.co2 is not None:
            # CO2: gradients are reduced inside the replica only; the replicas meet in the outer update
            meshes.add_replica_groups()
            groups = {"dp+cp": meshes.group(MeshAxis.CP), "dp+cp+tp": meshes.group("cp+tp"), "edp": meshes.group("edp@dp")}
            replicas = (self.coords[MeshAxis.DP], self.dims.dp)
        # Gradients reduce-scatter piece by piece during the last backward pass of a step (train_step without a
        # pipeline); elsewhere every piece at the optimizer step.
        self.optimizer = ShardedAdamW(list(named.items()), groups, meshes.group("world"), config.adamw,
                                      piece=int(config.bucket_mb * 2**20) // 4, overlap=config.grad_overlap,
                                      replicas=replicas, zero=config.zero)
        self.co2 = None
        if config.co2 is not None:
            from plait.parallel.co2 import CO2

            self.co2 = CO2(self.optimizer.buckets, meshes.group(MeshAxis.DP), meshes.group("replica"), config.co2)
            self.optimizer.outer = self.co2
        self._autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.dtype == "bfloat16" else nullcontext()
        cp, tp = self.dims.cp, self.dims.tp
        T = config.seq_len
        if cp > 1:
            self.positions: torch.Tensor | None = zigzag_positions(T, cp, self.coords[MeshAxis.CP]).to(device)
        elif tp > 1:
            self.positions = torch.arange(T, device=device)
        else:
            self.positions = None
        self.act_shape = (config.micro_batch, T // (cp * tp), self.dim)
        self.compression = None
        if config.lsh is not None and self.is_moe:
            from plait.parallel.ep_lsh import Compression

            copies = config.micro_batch * T // (cp * tp) * getattr(model.cfg, "top_k", 1)
            self.compression = Compression(self.chunks, model.cfg.layers, config.lsh, auto=config.lsh_auto, meshes=meshes,
                                           copies=copies, dim=self.dim, device=device)
            if config.lsh_auto:
                self.compression.probe_link()

    # ------------------------------------------------------------------ batch sharding

    def local_rows(self, batch: torch.Tensor, micro: int, micro_batch: int | None = None) -> torch.Tensor:
        """This rank's [micro, T/(cp·tp)] share of micro-step ``micro`` of a global [G, T] batch."""
        m = micro_batch or self.config.micro_batch
        dp, d = self.dims.dp, self.coords[MeshAxis.DP]
        start = micro * m * dp + d * m
        rows = batch[start : start + m]
        if self.dims.cp > 1:
            rows = rows[:, self.positions.to(rows.device)]
        if self.dims.tp > 1:
            rows = rows.chunk(self.dims.tp, dim=1)[self.coords[MeshAxis.TP]]
        return rows.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ step

    def begin_step(self, step: int) -> None:
        """The 0-based index of the step about to run (the precision schedule's recipes depend on it)."""
        if self.precision is not None:
            self.precision.begin_step(step)

    def _precision_stats(self) -> dict[str, dict[str, Any]] | None:
        """The step's per-module quantization statistics over all ranks (two small all-reduces)."""
        if self.precision is None or not self.precision.sampling:
            return None
        from plait.parallel.lowp import summarize

        stats = self.precision.stats.to(self.device)
        amax, counts = stats[:, :3].contiguous(), stats[:, 3:].contiguous()
        world = self.meshes.group("world")
        comm.all_reduce(amax, world, op=torch.distributed.ReduceOp.MAX)
        comm.all_reduce(counts, world)
        return summarize(self.precision, amax.cpu(), counts.cpu())

    def _close_step(self, sums: torch.Tensor, lr: float) -> tuple[torch.Tensor, float]:
        """Reduce the gradients and update (the optimizer's step); returns (the sums over the world, grad norm).

        The step's closing world all-reduce rides on the optimizer's one for the squared gradient norm: ``sums``,
        then each MoE layer's statistics of this rank's last forward (``[copies per expert, tokens, dropped]``,
        zeros for layers on other pipeline stages), then the control word when the control plane is on. Only
        rank 0 sets a non-zero word, so the sum is its word on every rank (exact in float64). The layers'
        ``tokens_per_expert`` and ``dropped_tokens`` become the stage's sums.
        """
        parts = [sums]
        width = self.experts + 2
        if self.moe_layers:
            table = torch.zeros(self.moe_layers, width, dtype=torch.float64, device=sums.device)
            for m in self._moe_modules():
                if m.local_stats is not None:
                    table[m._plait_moe_index] = m.local_stats.to(torch.float64)
            parts.append(table.flatten())
        if self.config.control:
            parts.append(torch.tensor([self.control_word], dtype=torch.float64, device=sums.device))
        closing = torch.cat(parts) if len(parts) > 1 else sums
        grad_norm, closing = self.optimizer.step(lr, self.config.grad_clip, closing=closing)
        if self.config.control:
            self.control_agreed = float(closing[-1])
        if self.moe_layers:
            self.expert_stats = closing[sums.numel():sums.numel() + self.moe_layers * width].view(self.moe_layers, width)
            for m in self._moe_modules():
                row = self.expert_stats[m._plait_moe_index]
                m.tokens_per_expert = row[:self.experts].round().long()
                m.dropped_tokens = int(row[-1])
        return closing[:sums.numel()], grad_norm

    def _moe_modules(self) -> list[nn.Module]:
        return [m for c in self.chunks for m in c.modules() if _is_moe(m)]

    def _forward_chunk(self, chunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with self._autocast:
            return chunk(x, self.positions)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> StepStats:
        for chunk in self.chunks:
            chunk.train()
        if self.compression is not None:
            self.compression.begin_step()
        G, T = inputs.shape
        scale = 1.0 / (G * T)
        A = self.accumulation
        blocks = A * self.dims.dp  # micro-batch blocks per step: the balancing loss is their mean
        coef = self.config.aux_loss_coef
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.pipeline is None:
            model = self.chunks[0]
            for i in range(A):
                comm.LEDGER.phase = "forward"
                # the logits ([rows, T, vocab]) stay unnamed: the loss saves its own log-softmax, so they are freed
                # before the backward pass instead of living through it
                ce = F.cross_entropy(self._forward_chunk(model, self.local_rows(inputs, i)).float().flatten(0, 1),
                                     self.local_rows(targets, i).flatten(), reduction="sum")
                aux = model.aux_loss() if self.is_moe else None
                loss = ce * scale
                if aux is not None:
                    loss = loss + (coef / blocks) * aux
                    sums[1] += aux.detach().double() / blocks
                comm.LEDGER.phase = "backward"
                if i == A - 1:
                    self.optimizer.arm()
                loss.backward()
                sums[0] += ce.detach().double() * scale
                del ce, loss, aux  # the graph's ends: not alive through the next micro-batch or the optimizer step
        else:
            sums += self._pipeline(inputs, targets, scale=scale, aux_scale=coef / blocks)
        ratio = fidelity = None
        if self.compression is not None:  # the compression counters ride on the same all-reduce
            sums = torch.cat([sums, self.compression.sums()])
        sums, grad_norm = self._close_step(sums, lr)
        if self.compression is not None:
            ratio, fidelity = self.compression.end_step(sums[2:], ranks_per_layer=self.dims.world // self.dims.pp,
                                                        micro_steps=A)
        return StepStats(loss=float(sums[0]), aux_loss=float(sums[1]), grad_norm=grad_norm, lsh_ratio=ratio, lsh_fidelity=fidelity,
                         precision=self._precision_stats())

    def train_documents(self, lengths: list[int], fetch, lr: float) -> StepStats:
        """A hybrid data-parallel step of whole documents of ``lengths`` (``fetch(indices)`` loads some of them)."""
        for chunk in self.chunks:
            chunk.train()
        if self.compression is not None:
            self.compression.begin_step()
        with self._autocast:
            local, balance = self.hybrid.step(self.chunks, lengths, fetch, pipeline=self.pipeline,
                                              aux_coef=self.config.aux_loss_coef if self.is_moe else None)
        sums = torch.zeros(2 + self.dims.world, dtype=torch.float64, device=self.device)
        sums[0] = local[0] / sum(lengths)
        sums[1] = local[1]
        sums[2 + self.meshes.rank] = balance["compute_s"]
        ratio = fidelity = None
        if self.compression is not None:
            sums = torch.cat([sums, self.compression.sums()])
        sums, grad_norm = self._close_step(sums, lr)
        if self.compression is not None:  # every rank makes every round's call (lockstep): a call is a micro-step
            ratio, fidelity = self.compression.end_step(sums[2 + self.dims.world:], ranks_per_layer=self.dims.world // self.dims.pp,
                                                        micro_steps=max(1, balance["calls"]))
        seconds = sums[2:2 + self.dims.world].tolist()
        # a position of the dp space is a tensor-parallel group and a pipeline: the sum of its ranks' seconds
        spaces = self.dims.groups((MeshAxis.DP, MeshAxis.CP))
        by_position = [sum(seconds[space[i]] for space in spaces) for i in range(len(spaces[0]))]
        mean = statistics.fmean(by_position)
        balance.update(compute_s=seconds, measured=max(by_position) / mean if mean > 0 else 1.0)
        self.hybrid.observe(by_position)  # a position's seconds summed: its whole model's work, as calibrated
        return StepStats(loss=float(sums[0]), aux_loss=float(sums[1]), grad_norm=grad_norm, tokens=sum(lengths), balance=balance,
                         lsh_ratio=ratio, lsh_fidelity=fidelity, precision=self._precision_stats())

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean cross-entropy over ``batches`` (each a whole [G, T] global batch).

        The model is evaluated as it is, without ``ep_compress``: compression is a way to train it.
        """
        for chunk in self.chunks:
            chunk.eval()
        if self.compression is not None:
            with self.compression.exact():
                return self._evaluate(batches)
        return self._evaluate(batches)

    def _evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for inputs, targets in batches:
            G, T = inputs.shape
            micro = max(1, G // (self.dims.dp * self.accumulation))
            steps = G // (micro * self.dims.dp)
            if self.pipeline is None:
                for i in range(steps):
                    logits = self._forward_chunk(self.chunks[0], self.local_rows(inputs, i, micro))
                    totals[0] += F.cross_entropy(logits.float().flatten(0, 1), self.local_rows(targets, i, micro).flatten(), reduction="sum").double()
                    del logits  # not alive beside the next micro-batch's
            else:
                totals[0] += self._pipeline(inputs, targets, scale=1.0, micro_batch=micro, micros=steps)[0]
            totals[1] += G * T
        loss_sum = totals[0:1].clone()
        comm.all_reduce(loss_sum, self.meshes.group("world"))
        return float(loss_sum[0] / totals[1])

    def _pipeline(
        self, inputs: torch.Tensor, targets: torch.Tensor, *, scale: float, aux_scale: float | None = None,
        micro_batch: int | None = None, micros: int | None = None,
    ) -> torch.Tensor:
        """Run this rank's pipeline schedule; returns [loss sum × scale, aux sum / (A·dp)] of this rank's share.

        With ``aux_scale`` None it is a forward-only pass (evaluation) over ``micros`` micro-steps.
        """
        train = aux_scale is not None
        mb = micro_batch or self.config.micro_batch
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)

        def forward(j: int, x: torch.Tensor | None, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            if x is None:
                x = self.local_rows(inputs, i, mb)
            chunk = self.chunks[j]
            out = self._forward_chunk(chunk, x)
            extra = None
            if train and self.is_moe:
                aux = chunk.aux_loss()
                sums[1] += aux.detach().double() / (self.accumulation * self.dims.dp)
                extra = aux * aux_scale
            return out, extra

        def loss(i: int, out: torch.Tensor) -> torch.Tensor:
            ce = F.cross_entropy(out.float().flatten(0, 1), self.local_rows(targets, i, mb).flatten(), reduction="sum")
            return ce * scale

        p = self.pipeline
        actions = None if train else schedule(p.pp, p.vpp, micros, p.pp_rank, forward_only=True)
        act_shape = (mb, *self.act_shape[1:])
        losses = p.run(actions, act_shape=act_shape, act_dtype=torch.float32, forward=forward, loss=loss, device=self.device)
        for value in losses:
            sums[0] += value.double()
        return sums

    def tokens_per_expert(self) -> torch.Tensor | None:
        """Token copies per expert, int64 [MoE layers of the model, E]: each layer's last forward of the last step,
        summed over the ranks of its stage (None before the first step, or without MoE layers)."""
        if self.expert_stats is None:
            return None
        return self.expert_stats[:, :self.experts].round().long()

    # ------------------------------------------------------------------ state in the single-process layout

    def _gather_full(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        param = self.params[name]
        for axis, dim in getattr(param, "_plait_shards", ()):
            tensor = comm.all_gather(tensor.contiguous(), self.meshes.group(axis), dim)
        return tensor

    def _slice_local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        param = self.params[name]
        out = full
        for axis, dim in getattr(param, "_plait_shards", ()):
            g = self.meshes.group(axis)
            out = out.chunk(g.size, dim)[g.rank]
        if out.shape != param.shape:
            raise ValueError(f"state for {name} has shape {tuple(full.shape)}, which does not split into {tuple(param.shape)}")
        return out

    def full_state_dict(self) -> dict[str, Any] | None:
        """Model and optimizer state in the single-process layout, on global rank 0 (None elsewhere).

        A collective: every rank must call it.
        """
        was = comm.LEDGER.enabled
        comm.LEDGER.enabled = False
        try:
            opt = self.optimizer.local_state()
            model: dict[str, torch.Tensor] = {}
            exp_avg: dict[str, torch.Tensor] = {}
            exp_avg_sq: dict[str, torch.Tensor] = {}
            for name in sorted(self.params):
                model[name] = self._gather_full(name, self.params[name].detach()).cpu()
                exp_avg[name] = self._gather_full(name, opt["exp_avg"][name]).cpu()
                exp_avg_sq[name] = self._gather_full(name, opt["exp_avg_sq"][name]).cpu()
            # One rank per pipeline stage holds a complete copy of the stage after the gathers.
            lead = all(self.coords[a] == 0 for a in (MeshAxis.DP, MeshAxis.CP, MeshAxis.TP))
            part = {"model": model, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq} if lead else None
            parts = comm.gather_objects(part, self.meshes.group("world"))
            if parts is None:
                return None
            state: dict[str, Any] = {"model": {}, "optimizer": {"step": opt["step"], "exp_avg": {}, "exp_avg_sq": {}}}
            for p in parts:
                if p is None:
                    continue
                state["model"].update(p["model"])
                state["optimizer"]["exp_avg"].update(p["exp_avg"])
                state["optimizer"]["exp_avg_sq"].update(p["exp_avg_sq"])
            state["model"] = dict(sorted(state["model"].items()))
            return state
        finally:
            comm.LEDGER.enabled = was

    def full_gradients(self) -> dict[str, torch.Tensor] | None:
        """The last step's reduced gradients in the single-process layout, on rank 0 (needs ``optimizer.keep_grads``)."""
        was = comm.LEDGER.enabled
        comm.LEDGER.enabled = False
        try:
            local = self.optimizer.local_grads()
            grads = {name: self._gather_full(name, local[name]).cpu() for name in sorted(self.params)}
            lead = all(self.coords[a] == 0 for a in (MeshAxis.DP, MeshAxis.CP, MeshAxis.TP))
            parts = comm.gather_objects(grads if lead else None, self.meshes.group("world"))
            if parts is None:
                return None
            out: dict[str, torch.Tensor] = {}
            for p in parts:
                out.update(p or {})
            return dict(sorted(out.items()))
        finally:
            comm.LEDGER.enabled = was

    # ------------------------------------------------------------------ state in this rank's own layout

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's parameters and optimizer state as they live in memory: no copies, no collectives.

        For snapshots (read while training goes on, see ``ShardedAdamW.before_update``);
        loadable only by the same layout, with :meth:`load_local_tensors`.
        """
        out = {f"param.{name}": p.detach() for name, p in sorted(self.params.items())}
        out.update({f"optim.{key}": value for key, value in self.optimizer.raw_state().items()})
        if self.co2 is not None:
            out.update({f"outer.{key}": value for key, value in self.co2.state().items()})
        return out

    def drain(self) -> None:
        """Wait for communication still in flight after the last step (CO2's parameter all-reduce)."""
        if self.co2 is not None:
            self.co2.drain()

    def layout_key(self) -> dict[str, Any]:
        """What must match for :meth:`load_local_tensors` to accept another rank's tensors."""
        key = {
            "dims": [self.dims.pp, self.dims.dp, self.dims.cp, self.dims.tp, self.dims.edp, self.dims.ep, self.dims.etp],
            "rank": self.meshes.rank,
            "params": [[n, list(p.shape)] for n, p in sorted(self.params.items())],
        }
        if self.co2 is not None:  # its optimizer shards are cut inside a replica, and it has outer state
            key["dp_mode"] = "co2"
        if not self.config.zero:  # whole buckets' moments on every rank, not a group's share
            key["zero"] = False
        return key

    def load_local_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`local_tensors` (same layout and rank)."""
        missing = sorted(set(self.params) - {k[len("param."):] for k in tensors if k.startswith("param.")})
        if missing:
            raise KeyError(f"snapshot lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(tensors[f"param.{name}"])
        self.optimizer.load_raw_state({k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")})
        if self.co2 is not None:
            outer = {k[len("outer."):]: v for k, v in tensors.items() if k.startswith("outer.")}
            if outer:
                self.co2.load_state(outer)
            else:  # a resharding checkpoint holds replica 0's model and moments, no outer state: a new first round
                self.co2.reset()

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        """Take this rank's shards of a single-process-layout state (from :meth:`full_state_dict`)."""
        missing = sorted(set(self.params) - set(state["model"]))
        if missing:
            raise KeyError(f"state lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self._slice_local(name, state["model"][name]))
        opt = state["optimizer"]
        local = {
            "step": opt["step"],
            "exp_avg": {n: self._slice_local(n, opt["exp_avg"][n]) for n in self.params},
            "exp_avg_sq": {n: self._slice_local(n, opt["exp_avg_sq"][n]) for n in self.params},
        }
        self.optimizer.load_local_state(local)
        if self.co2 is not None:  # the single-process layout has one model (replica 0's): a new first round from it
            self.co2.reset()
