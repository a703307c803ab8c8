"""Hybrid data parallelism on 4 CPU ranks: parity with one process, balance and step time against a static mesh.

**Parity.** ``plait train`` of the demo model on whole documents (``data.packing=documents``,
``parallel.hybrid_dp=true``, a token budget of 64 per rank so that most documents are
split over blocks of ranks) on 4 processes, on 1 process, and a plain PyTorch loop
(``build_model``, ``torch.optim.AdamW``, every document alone, the token mean over the
batch, and the demo's MoE balancing loss as the mean of each document's own; nothing of
plait's engine): 10 steps of the same global batches, losses and balancing losses compared
per step (target: within 1e-5 relative).

**Balance and speed.** The demo model (with its balancing loss, per document) on 4 ranks, each given its own share of the CPU (a cgroup with a CFS quota of cores/4, so
that an idle rank cannot lend its core to a busy one, as separate devices could not;
recorded as ``cpu_share``, null where cgroups are not writable). Documents up to 2,048
tokens, from two sources: a Pareto distribution (shape 1.2, from 64 tokens, 32 per step)
and the corpus's own document lengths (the standard library's files cut at 32,768 tokens)
scaled down 16× to fit a CPU (16 per step). Each batch is trained twice on the real
engine, interleaved in alternating order: by hybrid DP's balance plan and by a static
dp × cp mesh sized for the longest document (cp = 2,048 / budget; documents packed into
2,048-token windows in batch order and dealt to the dp replicas in turn, each window
split zig-zag over cp with per-document attention). Per step: wall time between barriers,
and each rank's CPU seconds of forward and backward, whose max/mean is the measured
imbalance (target ≤ 1.10 for hybrid; the static figure beside it). Two meshes: cp2 × dp2
(budget 1,024 tokens) and cp4 (budget 512). 17 Pareto and 9 corpus steps; step 0 is a
warm-up and left out; figures are medians over the remaining steps.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

NAME = "hdp"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
WORKER = Path(__file__).resolve().parent / "hdp_worker.py"
PARITY_SETS = ["parallel.hybrid_dp=true", "data.packing=documents", "train.eval_every=0", "train.eval_batches=1",
               "metrics.enabled=false"]  # the demo's MoE with its balancing loss (per document under hybrid DP)
PARITY_TARGET = 1e-5
BALANCE_TARGET = 1.10
SPEED_TARGET = 1.5


def _check_run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _train(work: Path, name: str, nproc: int, steps: int, budget: int) -> dict[str, list[float]]:
    run_dir = work / name
    cmd = [sys.executable, "-m", "plait.runtime.cli", "train", "--config", str(REPO_CONFIG), "--nproc", str(nproc),
           "--run-dir", str(run_dir), "--set", f"train.steps={steps}", f"parallel.hdp_budget={budget}", *PARITY_SETS]
    _check_run(cmd)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"losses": summary["losses"], "aux_losses": summary["aux_losses"]}


def plain_losses(steps: int, config: Path = REPO_CONFIG, sets: list[str] | None = None) -> list[float]:
    """A config trained on its documents by a plain PyTorch loop on one process (default: the demo's): the
    cross-entropy of each step."""
    return plain_run(steps, config, sets)["losses"]


def plain_run(steps: int, config: Path = REPO_CONFIG, sets: list[str] | None = None) -> dict[str, list[float]]:
    """:func:`plain_losses`, and the balancing loss of each step: for a mixture-of-experts model the mean over
    the step's documents of each document's own Switch loss (a forward over that document alone), added to the
    loss times ``model.aux_loss_coef``."""
    import torch
    import torch.nn.functional as F

    from plait.runtime.config import load_config
    from plait.runtime.data import load_corpus
    from plait.runtime.documents import DocumentLoader, document_pieces
    from plait.runtime.models import build_model

    # one process: the layout's keys back at their defaults (the budget only groups work, never changes the math)
    cfg = load_config(config, [*PARITY_SETS[:2], "parallel.hdp_budget=0", "parallel.tp=1", *(sets or [])], nproc=1)
    t = cfg.train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(t.seed)
        model = build_model(cfg.model)
        matrices = [p for p in model.parameters() if p.ndim >= 2]
        vectors = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": matrices, "weight_decay": t.weight_decay},
                                 {"params": vectors, "weight_decay": 0.0}],
                                lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, foreach=False, fused=False)
        corpus = load_corpus(cfg.data)
        loader = DocumentLoader(corpus.train, document_pieces(corpus.train_files, cfg.max_len()),
                                global_batch=t.global_batch, seed=t.seed, max_len=cfg.max_len())
        aux_coef = cfg.model.aux_loss_coef if cfg.model.kind == "moe" else None
        losses, balancing = [], []
        for step in range(steps):
            docs = loader.documents()
            loader.advance()
            total = sum(x.numel() for x, _ in docs)
            loss = aux = 0
            for x, y in docs:
                loss = loss + F.cross_entropy(model(x[None]).float().flatten(0, 1), y, reduction="sum")
                if aux_coef is not None:
                    aux = aux + model.aux_loss() / len(docs)
            (loss / total + (aux_coef or 0.0) * aux).backward()
            norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
            coef = min(1.0, t.grad_clip / (norm + 1e-6))
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
            for group in opt.param_groups:
                group["lr"] = t.lr_at(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item() / total)
            balancing.append(float(aux.detach()) if aux_coef is not None else 0.0)
        return {"losses": losses, "aux_losses": balancing}
    finally:
        torch.set_num_threads(threads)


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def parity(work: Path, steps: int) -> dict[str, Any]:
    four = _train(work, "hdp4", 4, steps, budget=64)
    one = _train(work, "hdp1", 1, steps, budget=128)
    plain = plain_run(steps)
    out = {"steps": steps, "budget_4_ranks": 64, "losses_4_ranks": four["losses"], "losses_1_process": one["losses"],
           "losses_plain_pytorch": plain["losses"], "aux_4_ranks": four["aux_losses"], "aux_1_process": one["aux_losses"],
           "aux_plain_pytorch": plain["aux_losses"],
           "max_rel_4_vs_1": max(_rel(four[k], one[k]) for k in four),
           "max_rel_4_vs_plain": max(_rel(four[k], plain[k]) for k in four), "target": PARITY_TARGET}
    out["pass"] = out["max_rel_4_vs_1"] <= PARITY_TARGET and out["max_rel_4_vs_plain"] <= PARITY_TARGET
    print(f"hdp: parity over {steps} steps (losses and balancing losses): 4 ranks vs 1 process "
          f"{out['max_rel_4_vs_1']:.1e}, vs plain PyTorch {out['max_rel_4_vs_plain']:.1e} (target ≤ {PARITY_TARGET:g})",
          flush=True)
    return out


def speed(work: Path, source: str, budget: int, steps: int) -> dict[str, Any]:
    documents = 32 if source == "pareto" else 16
    spec = {"sets": ["model.seq_len=2048", "data.max_len=2048", f"parallel.hdp_budget={budget}",
                     f"train.global_batch={documents}", *PARITY_SETS[:2]],
            "source": source, "steps": steps, "documents": documents, "scale": 16, "cpu_share": (os.cpu_count() or 4) / 4}
    spec_path = work / f"spec-{source}-{budget}.json"
    spec_path.write_text(json.dumps(spec))
    out = work / f"out-{source}-{budget}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(WORKER),
           str(spec_path), str(out)]
    _check_run(cmd)
    raw = json.loads(out.read_text())
    rows = raw["rows"][1:] if len(raw["rows"]) > 1 else raw["rows"]

    def med(schedule: str, key: str) -> float:
        return statistics.median(r[schedule][key] for r in rows)

    result = {
        "source": source, "budget_tokens": budget, "static_cp": raw["static_cp"], "static_dp": 4 // raw["static_cp"],
        "documents_per_step": documents, "steps_measured": len(rows), "cpu_share": raw["cpu_share"],
        "tokens_per_step": statistics.median(r["tokens"] for r in rows),
        "hybrid_step_s": med("balance", "seconds"), "static_step_s": med("static", "seconds"),
        "speedup": statistics.median(r["static"]["seconds"] / r["balance"]["seconds"] for r in rows),
        "hybrid_measured_imbalance": med("balance", "measured"), "static_measured_imbalance": med("static", "measured"),
        "hybrid_predicted_imbalance": med("balance", "predicted"),
        "static_predicted_imbalance": med("static", "predicted"),
        "hybrid_split_per_step": med("balance", "split"), "schedule_ms": med("balance", "schedule_ms"),
        "cost": raw["cost"], "steps": raw["rows"],
    }
    result["balance_pass"] = result["hybrid_measured_imbalance"] <= BALANCE_TARGET
    result["speed_pass"] = result["speedup"] >= SPEED_TARGET
    print(f"hdp: {source:6s} cp{raw['static_cp']}×dp{4 // raw['static_cp']} mesh: step hybrid "
          f"{result['hybrid_step_s']:.2f} s vs static {result['static_step_s']:.2f} s = {result['speedup']:.2f}× "
          f"(target ≥ {SPEED_TARGET}); busiest/mean hybrid {result['hybrid_measured_imbalance']:.3f} (predicted "
          f"{result['hybrid_predicted_imbalance']:.3f}), static {result['static_measured_imbalance']:.3f}", flush=True)
    return result


def run(quick: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="plait-bench-hdp-") as tmp:
        work = Path(tmp)
        out: dict[str, Any] = {"parity": parity(work, 3 if quick else 10), "runs": []}
        meshes = [1024] if quick else [1024, 512]
        for budget in meshes:
            for source in ("pareto", "corpus"):
                steps = 3 if quick else (17 if source == "pareto" else 9)  # ~1 s and ~5 s steps
                out["runs"].append(speed(work, source, budget, steps))
    return out
