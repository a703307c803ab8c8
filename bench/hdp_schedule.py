"""The hybrid data-parallel balance scheduler: its time per step and the balance it predicts against a static mesh.

Two kinds of step: 1,000 sequences from a Pareto distribution (shape 1.2, 128 tokens up,
capped at 32,768), and 1,000 documents of the corpus's own lengths (the standard
library's files cut at 32,768 tokens), each on 8 and 64 ranks. For each, the scheduler's
CPU time (median of 20 steps, each with fresh lengths; target ≤ 10 ms) and the predicted
work of the busiest rank over the mean, for hybrid DP and for a static dp × cp mesh whose
cp is the smallest that holds the longest sequence of the run (the usual choice; documents
packed in batch order into windows of that length, dealt to the replicas in turn), side by
side with their ratio. Work per sequence is ``a·L + b·L²``, fitted to the demo model's
forward and backward on one CPU thread at 256 to 4,096 tokens (and per call ``e``), plus the context-parallel
exchange of K and V at loopback rate when split. This is the schedule's prediction; the
measured step times of both are ``plait bench hdp``'s.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

NAME = "hdp_schedule"
SEQUENCES = 1000
MAX_LEN = 32768
TARGET_MS = 10.0


def _pareto(rng: random.Random) -> list[int]:
    return [min(MAX_LEN, int(128 * rng.paretovariate(1.2))) for _ in range(SEQUENCES)]


CALIBRATION_LENGTHS = [256, 512, 1024, 2048, 4096]


def calibrate(quick: bool):
    """Fit ``e + a·L + b·L²`` to the demo model's forward + backward on one CPU thread (median of 3 per row: single
    sequences and two packed rows, which tell a call's overhead ``e`` from a token's); ``c``:
    the K/V exchange per token of the runtime's own cost (:func:`plait.parallel.hdp.exchange_seconds_per_token`)."""
    import torch

    from plait.parallel.hdp import exchange_seconds_per_token, measure_cost
    from plait.runtime.config import load_config
    from plait.runtime.models import build_model
    from plait.scheduler.balance import fit_cost

    demo = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", [])
    cfg = demo.model
    cfg.seq_len = max(CALIBRATION_LENGTHS)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [[n] for n in CALIBRATION_LENGTHS] + [[256] * 4, [64] * 16]  # packed rows: a call's overhead
        samples = measure_cost(build_model(cfg), cfg.vocab, rows, repeats=1 if quick else 3)
    finally:
        torch.set_num_threads(threads)
    return fit_cost(samples, c=exchange_seconds_per_token(cfg)), samples


def run(quick: bool = False) -> dict[str, Any]:
    from plait.runtime.data import DataConfig, load_corpus
    from plait.runtime.documents import document_pieces, length_histogram
    from plait.scheduler.balance import balance, static_plan

    cost, samples = calibrate(quick)
    corpus = load_corpus(DataConfig())
    pieces = document_pieces(corpus.train_files, MAX_LEN)
    lengths_all = (pieces[:, 1] - 1).tolist()
    edges = [0, 64, 256, 1024, 4096, 16384]
    hist = length_histogram(pieces, edges)
    steps = 5 if quick else 20
    out: dict[str, Any] = {"sequences": SEQUENCES, "max_len": MAX_LEN, "steps": steps, "target_ms": TARGET_MS,
                           "cost": {"a": cost.a, "b": cost.b, "c": cost.c, "e": cost.e,
                                    "measured": [{"documents": L, "seconds": t} for L, t in samples]},
                           "corpus_lengths": {"documents": len(lengths_all), "edges": edges, "counts": hist,
                                              "median": statistics.median(lengths_all), "max": max(lengths_all)},
                           "runs": []}
    for source in ("pareto", "corpus"):
        for ranks in (8, 64):
            rng = random.Random(ranks)
            draws = [(_pareto(rng) if source == "pareto" else rng.sample(lengths_all, SEQUENCES))
                     for _ in range(steps)]
            budget = 2 * max(sum(d) for d in draws) // ranks + 1  # room for twice the mean tokens per rank
            longest = max(max(d) for d in draws)
            cp = 1
            while longest > cp * budget:
                cp *= 2
            times, hdp, static = [], [], []
            for lengths in draws:
                start = time.process_time()
                plan = balance(lengths, ranks, cost, budget=budget)
                times.append((time.process_time() - start) * 1e3)
                hdp.append(max(plan.load))
                static.append(max(static_plan(lengths, ranks, cp, cost, window=longest).load))
                mean = sum(cost.whole(x) for x in lengths) / ranks
                hdp[-1], static[-1] = hdp[-1] / mean, static[-1] / mean
            row = {"source": source, "ranks": ranks, "budget_tokens": budget, "static_cp": cp,
                   "schedule_ms": statistics.median(times), "schedule_ms_max": max(times),
                   "within_target": statistics.median(times) <= TARGET_MS,
                   "hdp_busiest_over_mean": statistics.median(hdp),
                   "static_busiest_over_mean": statistics.median(static),
                   "predicted_speedup": statistics.median(s / h for s, h in zip(static, hdp))}
            out["runs"].append(row)
            print(f"hdp_schedule: {source:6s} {ranks:3d} ranks: schedule {row['schedule_ms']:.2f} ms "
                  f"(target ≤ {TARGET_MS:g}); busiest/mean hybrid {row['hdp_busiest_over_mean']:.3f}, static cp"
                  f"{cp} {row['static_busiest_over_mean']:.3f}: predicted {row['predicted_speedup']:.2f}×",
                  flush=True)
    return out
