"""``summary.json``: what a run did, written by rank 0 at the end (or when it fails).

Schema (version 1), every field always present:

| field | type | meaning |
|---|---|---|
| ``schema`` | int | 1 |
| ``status`` | str | ``completed``, ``failed``, or ``stopped`` (by ``plait stop``; ``error`` then says when and why) |
| ``error`` | str or null | the exception, when ``failed`` |
| ``version`` | str | plait version |
| ``steps`` | int | optimizer steps completed |
| ``losses`` | list[float] | training loss of each step (cross-entropy, mean over the global batch, nats/token) |
| ``aux_losses`` | list[float] | MoE load-balancing loss of each step (0.0 for dense models) |
| ``grad_norms`` | list[float] | global gradient norm of each step, before clipping |
| ``step_times`` | list[float] | wall seconds of each step, from the previous step's end (step 1: its own duration) |
| ``eval_loss`` | float or null | held-out loss at the last evaluation |
| ``eval_losses`` | list[{step, loss}] | every evaluation |
| ``tokens`` | int | training tokens processed |
| ``balance`` | list[dict] | hybrid data parallelism, per step: the plan's predicted busiest-rank / mean work (``predicted``), the measured one from each rank's CPU seconds of forward and backward (``measured``, ``compute_s``), the scheduler's milliseconds, split documents and the largest block; [] otherwise |
| ``tokens_per_s`` | float | training tokens/s, wall clock from the end of step 1 (warm-up) to the end of step N, hooks and evaluations included |
| ``step_seconds`` | float | mean wall time per step over the same span |
| ``world_size`` | int | worker processes |
| ``parallel`` | {pp, dp, cp, tp, edp, ep, etp, pp_schedule, vpp} | parallel sizes of both foldings |
| ``ledger`` | {steps, last_step, total} | collectives issued by the parallel code, summed over all ranks: ``{axis: {op: {bytes, calls}}}`` for the last training step and for all of them (evaluation excluded); see plait.parallel.comm |
| ``lsh`` | list[dict] | ``parallel.ep_compress=lsh``, per step: ``ratio`` per model layer (centroids sent / token copies over all ranks, the fraction of the expert all-to-all's row bytes sent; null for dense layers) and, on probe steps (``parallel.lsh.probe_every``), ``fidelity`` per layer (mean cosine similarity of the compressed expert outputs to the exact ones on one micro-batch), else null; [] otherwise |
| ``lsh_auto`` | dict or null | ``parallel.ep_compress=auto``: the ep all-to-all's measured rate (``link_gbit_s``, ``latency_ms``) and, per MoE layer, the first step's decision (``compress``, ``ratio``, ``copies`` one rank sends per micro-batch uncompressed, ``saved_ms`` of all-to-all and ``cost_ms`` of hashing per micro-batch; under hybrid DP a forward call is the micro-batch); null otherwise |
| ``precision`` | dict or null | when a precision recipe quantizes: ``step``, ``last`` (per linear module, the last sampled step's (``precision.stats_every``) ``recipe``, ``amax_x``/``amax_w``/``amax_dy``, ``overflow_x``/``underflow_x``/``overflow_dy``/``underflow_dy``: fractions of elements beyond the format's largest value / non-zero but quantized to zero) and ``peak`` (each module's largest value of each over the sampled steps); null otherwise |
| ``ab`` | dict or null | ``--ab RECIPE`` (``precision.ab``): ``recipe``, the reference model's ``losses`` and the ``gaps`` (job − reference) per step, and ``eval``: per evaluation ``{step, loss, reference, gap, relative}``; null otherwise |
| ``tokens_per_expert`` | list[list[int]] or null | token copies routed to each expert in the last step's last micro-batch (forward call, under hybrid DP), all ranks of the layer's pipeline stage together, per MoE layer of the model |
| ``restarts`` | int | elastic restarts before this attempt finished |
| ``steps_replayed`` | int | steps trained again after restores (each restore: last finished step − restored step) |
| ``recoveries`` | list[{attempt, source, step, progress, replayed, seconds, ranks}] | every restore after a restart: where the state came from (``memory``: ranks per ``local``/``rebuild``; ``disk``; ``fresh``; ``lost``: the published snapshot of ``step`` could not be restored and the job stopped) |
| ``faults`` | list[str] | faults injected with ``--fault`` that took effect (verified by plait train), e.g. ``kill-node:node=2:step=7`` |
| ``hangs`` | list[{attempt, step, since_s, timeout_s, stuck, waiting, silent, killed, stacks, line}] | every hang the coordinator found: who was stuck where, the stacks directory, the ranks it killed for a restart |
| ``fault_effects`` | list[{fault, ok, attempt, effect}] | every fault carried out, with what was verified (pids gone, memory removed, checksums no longer matching, a daemon in state T); ``ok`` false with ``error`` when it could not be |
| ``snapshot`` | {taken, skipped, skip_reasons, published, abandoned, bytes_per_rank, stall_s, copy_s, alloc_s, take_s, update_wait_s, publish_latency_s} or null | rank 0's snapshots in this attempt: per-step stall of the training thread, per-snapshot copy and allocation times; published/abandoned/publish_latency_s come from rank 0's publisher (every node's versions) |
| ``memory`` | {peak_bytes, steps, method} or null | with ``metrics.memory``: ``peak_bytes[r]`` is layout rank r's most tensor bytes alive at once during a training step (absolute, maximised over steps ``steps`` = [first, last], the attempt's first step left out as warm-up; null for a rank that measured no step), by ``method`` (see plait.runtime.memtrack); null when off or when the run stopped before the ranks' peaks were gathered at the end |
| ``wall_s`` | float | seconds from the worker's start to the summary |
| ``params`` | {total, active} | parameter counts |
| ``data`` | {root, files, train_bytes, eval_bytes} | the corpus |
| ``config_path`` | str | the resolved config beside this file |
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plait
from plait.runtime.progress import Pace
from plait.runtime.faults import fault_records, fired_faults
from plait.runtime.snapshot.trainer.restore import recovery_totals
from plait.runtime.trainer import BaseHook, StepResult

if TYPE_CHECKING:
    from plait.runtime.config import JobConfig
    from plait.runtime.data import Corpus
    from plait.runtime.trainer import Trainer

SCHEMA_VERSION = 1


def hangs_of(run_dir: Path) -> list[dict[str, Any]]:
    """The hangs the coordinator found (``<run dir>/hangs.jsonl``), oldest first."""
    path = Path(run_dir) / "hangs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class SummaryHook(BaseHook):
    """Collects per-step results and writes ``summary.json`` atomically."""

    def __init__(self, run_dir: Path, *, config: JobConfig, corpus: Corpus, started: float, world: int):
        self.path = run_dir / "summary.json"
        self.config = config
        self.corpus = corpus
        self.started = started
        self.world = world
        self.losses: list[float] = []
        self.aux_losses: list[float] = []
        self.grad_norms: list[float] = []
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self.balance: list[dict[str, Any]] = []  # hybrid DP: each step's plan, predicted vs measured
        self.lsh: list[dict[str, Any]] = []  # parallel.ep_compress=lsh: each step's ratio (and probe) per layer
        self.precision: dict[str, Any] | None = None  # quantized recipes: last step's per-module stats and peaks
        self.ab: dict[str, Any] | None = None  # precision.ab: the reference model's losses (set by ABHook)
        self._last_end: float | None = None
        self.evals: list[dict[str, float]] = []
        self.pace = Pace(config.train.steps)
        self.snapshots: Any = None  # the SnapshotHook of rank 0, when snapshots are on
        self.memory: Any = None  # the MemoryHook of rank 0, with metrics.memory

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        self.losses.append(result.loss)
        self.aux_losses.append(result.aux_loss)
        self.grad_norms.append(result.grad_norm)
        self.step_times.append(result.seconds if self._last_end is None else result.end - self._last_end)
        self._last_end = result.end
        self.step_tokens.append(result.tokens)
        if result.balance is not None:
            b = result.balance
            self.balance.append({"step": result.step, "predicted": b["predicted"], "measured": b["measured"],
                                 "schedule_ms": b["schedule_ms"], "split": b["split"],
                                 "largest_block": b["largest_block"], "calls": b.get("calls"),
                                 "padding_calls": b.get("padding_calls"), "compute_s": b["compute_s"]})
        if result.lsh_ratio is not None:
            self.lsh.append({"step": result.step, "ratio": result.lsh_ratio, "fidelity": result.lsh_fidelity
                             if any(f is not None for f in result.lsh_fidelity or []) else None})
        if result.precision is not None:
            self._precision(result)
        self.pace.add(result)

    def _precision(self, result: StepResult) -> None:
        """Keep the last step's statistics and each module's worst (largest) value of each over all steps."""
        prev = self.precision or {"last": {}, "peak": {}}
        peak = prev["peak"]
        for name, stats in result.precision.items():
            row = peak.setdefault(name, {})
            for key, value in stats.items():
                if key != "recipe":
                    row[key] = max(row.get(key, value), value)
        self.precision = {"step": result.step, "last": result.precision, "peak": peak}

    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None:
        self.evals.append({"step": step, "loss": loss})

    def state_dict(self) -> dict[str, Any]:
        """The history so far, kept in snapshots so that a restored run reports every step once."""
        return {"losses": list(self.losses), "aux_losses": list(self.aux_losses), "grad_norms": list(self.grad_norms),
                "step_times": list(self.step_times), "evals": list(self.evals), "step_tokens": list(self.step_tokens),
                "balance": list(self.balance), "lsh": list(self.lsh), "precision": self.precision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = list(state["losses"])
        self.aux_losses = list(state["aux_losses"])
        self.grad_norms = list(state["grad_norms"])
        self.step_times = list(state["step_times"])
        self.evals = list(state["evals"])
        self.step_tokens = list(state.get("step_tokens", []))
        self.balance = list(state.get("balance", []))
        self.lsh = list(state.get("lsh", []))
        self.precision = state.get("precision")

    def on_end(self, trainer: Trainer) -> None:
        if trainer.stop_reason is not None and trainer.step < trainer.config.steps:
            self.write(trainer, status="stopped", error=trainer.stop_reason)
        else:
            self.write(trainer, status="completed")

    def write(self, trainer: Trainer, *, status: str, error: str | None = None) -> dict[str, Any]:
        from plait.runtime.config import model_spec
        from plait.scheduler.estimate import param_count

        params = param_count(model_spec(self.config.model))
        dims = trainer.engine.dims
        summary = {
            "schema": SCHEMA_VERSION,
            "status": status,
            "error": error,
            "version": plait.__version__,
            "steps": trainer.step,
            "losses": self.losses,
            "aux_losses": self.aux_losses,
            "grad_norms": self.grad_norms,
            "step_times": self.step_times,
            "eval_loss": self.evals[-1]["loss"] if self.evals else None,
            "eval_losses": self.evals,
            "tokens": sum(self.step_tokens),
            "balance": self.balance,
            "lsh": self.lsh,
            "lsh_auto": compression.report() if (compression := getattr(trainer.engine, "compression", None)) else None,
            "precision": self.precision,
            "ab": self.ab,
            "tokens_per_s": self.pace.tokens_per_s,
            "step_seconds": self.pace.step_seconds,
            "world_size": self.world,
            "parallel": {
                "pp": dims.pp, "dp": dims.dp, "cp": dims.cp, "tp": dims.tp, "edp": dims.edp, "ep": dims.ep, "etp": dims.etp,
                "pp_schedule": self.config.parallel.pp_schedule, "vpp": self.config.parallel.vpp,
            },
            "ledger": trainer.ledger or {"steps": trainer.ledger_steps, "last_step": trainer.ledger_last, "total": trainer.ledger_total, "ranks": "rank 0 only"},
            "tokens_per_expert": tpe.tolist() if (tpe := trainer.engine.tokens_per_expert()) is not None else None,
            "restarts": int(os.environ.get("PLAIT_ATTEMPT", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))),
            **recovery_totals(self.path.parent),
            "faults": fired_faults(self.path.parent),
            "hangs": hangs_of(self.path.parent),
            "fault_effects": fault_records(self.path.parent),
            "snapshot": self.snapshots.summary() if self.snapshots is not None else None,
            "memory": self.memory.summary() if self.memory is not None else None,
            "wall_s": time.time() - self.started,
            "params": {"total": int(params.total), "active": int(params.active)},
            "data": {
                "root": self.corpus.root,
                "files": self.corpus.files,
                "train_bytes": self.corpus.train.numel(),
                "eval_bytes": self.corpus.eval.numel(),
            },
            "config_path": "config.yaml",
        }
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.path)
        return summary

    def stop(self, trainer: Trainer, error: str) -> None:
        """The job cannot continue (no restart would help): mark the summary failed, keeping the history it holds.

        A restarted attempt that stops before its first step has no history of its own;
        the previous attempt's summary (written when it was stopped) has it.
        """
        if not self.path.exists() or self.losses:
            self.write(trainer, status="failed", error=error)
            return
        summary = json.loads(self.path.read_text())
        summary.update(status="failed", error=error, restarts=int(os.environ.get("PLAIT_ATTEMPT", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))),
                       faults=fired_faults(self.path.parent), fault_effects=fault_records(self.path.parent),
                       **recovery_totals(self.path.parent))
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.path)
