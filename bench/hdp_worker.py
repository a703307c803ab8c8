"""One rank of ``plait bench hdp``'s speed run: the same batches under hybrid DP and the static mesh, interleaved.

Run under torchrun (gloo, CPU):

    python -m torch.distributed.run --standalone --nproc-per-node 4 bench/hdp_worker.py SPEC.json OUT.json

SPEC holds the config overrides, the length source (``pareto`` or ``corpus``), the number of
steps and the per-step document count. Every rank draws the same lengths from a seeded
generator; a document's tokens are a slice of the corpus at an offset fixed by (step,
index), so both schedules train on the same bytes. Each batch runs twice on the real
engine (:meth:`ParallelEngine.train_documents`), once per schedule, in alternating order;
a step's time is the wall clock between barriers around it.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
PERIOD_US = 10_000  # a short period: a throttled rank waits at most a few ms before it runs again
CORPUS_MAX = 32768  # the corpus's documents are cut here before scaling


def draw_lengths(source: str, step: int, count: int, max_len: int, corpus_lengths: list[int], scale: int) -> list[int]:
    rng = random.Random(1000 + step)
    if source == "pareto":
        return [min(max_len, int(64 * rng.paretovariate(1.2))) for _ in range(count)]
    return [max(1, min(max_len, n // scale)) for n in rng.sample(corpus_lengths, count)]


def own_cpu_share(cores: float) -> Path | None:
    """Put this process in a cgroup of its own with ``cores`` of CPU bandwidth (CFS quota); None if not allowed.

    Each rank then computes at a fixed rate whatever the other ranks do, as a device of its own would: on a
    machine with fewer cores than ranks, an idle rank would otherwise lend its core to a busy one and hide
    exactly the imbalance being measured.
    """
    name = f"plait-bench-hdp-{os.getpid()}"
    quota = int(cores * PERIOD_US)
    for root in (CGROUP_V1, CGROUP_V2):  # the groups of killed runs (their process is gone)
        for stale in root.glob("plait-bench-hdp-*") if root.is_dir() else ():
            try:
                os.kill(int(stale.name.rsplit("-", 1)[1]), 0)
            except ProcessLookupError:
                try:
                    stale.rmdir()
                except OSError:
                    pass
            except (ValueError, OSError):
                pass
    for root, write in ((CGROUP_V1, lambda d: ((d / "cpu.cfs_period_us").write_text(str(PERIOD_US)),
                                               (d / "cpu.cfs_quota_us").write_text(str(quota)))),
                        (CGROUP_V2, lambda d: (d / "cpu.max").write_text(f"{quota} {PERIOD_US}"))):
        group = root / name
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            write(group)
            (group / "cgroup.procs").write_text(str(os.getpid()))
            return group
        except OSError:
            group.rmdir()
    return None


def leave(group: Path | None) -> None:
    if group is None:
        return
    try:
        (group.parent / "cgroup.procs").write_text(str(os.getpid()))
        group.rmdir()
    except OSError:
        pass


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    group = own_cpu_share(spec["cpu_share"]) if spec.get("cpu_share") else None
    try:
        train_both(spec, out, group)
    finally:
        leave(group)


def train_both(spec: dict, out: Path, group: Path | None) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from plait.runtime.build import build_engine
    from plait.runtime.config import load_config
    from plait.runtime.data import load_corpus
    from plait.runtime.documents import document_pieces

    cfg = load_config(REPO_CONFIG, spec["sets"], nproc=world)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    engine = build_engine(cfg, world, torch.device("cpu"))
    corpus = load_corpus(cfg.data)
    tokens = corpus.train
    corpus_lengths = (document_pieces(corpus.train_files, CORPUS_MAX)[:, 1] - 1).tolist()
    max_len = cfg.max_len()
    span = tokens.numel() - max_len - 2

    rows = []
    for step in range(spec["steps"]):
        lengths = draw_lengths(spec["source"], step, spec["documents"], max_len, corpus_lengths, spec["scale"])

        def fetch(indices: list[int], step: int = step, lengths: list[int] = lengths):
            docs = []
            for i in indices:
                at = (step * 7919 + i * 104729) % span
                row = tokens[at:at + lengths[i] + 1].long()
                docs.append((row[:-1], row[1:]))
            return docs

        order = ["static", "balance"] if step % 2 == 0 else ["balance", "static"]
        row = {"step": step, "tokens": sum(lengths), "longest": max(lengths)}
        for schedule in order:
            engine.hybrid.schedule = schedule
            dist.barrier()
            start = time.perf_counter()
            stats = engine.train_documents(lengths, fetch, cfg.train.lr)
            dist.barrier()
            row[schedule] = {"seconds": time.perf_counter() - start, "loss": stats.loss,
                             "measured": stats.balance["measured"], "predicted": stats.balance["predicted"],
                             "compute_s": stats.balance["compute_s"], "split": stats.balance["split"],
                             "largest_block": stats.balance["largest_block"],
                             "schedule_ms": stats.balance["schedule_ms"]}
        rows.append(row)
        if rank == 0:
            print(f"hdp_worker: {spec['source']} step {step}: static {row['static']['seconds']:.2f} s, hybrid "
                  f"{row['balance']['seconds']:.2f} s", flush=True)
    if rank == 0:
        h = engine.hybrid
        out.write_text(json.dumps({"rows": rows, "cpu_share": spec.get("cpu_share") if group else None,
                                   "static_cp": h.static_cp, "budget": h.budget, "max_len": max_len,
                                   "cost": {"a": h.cost.a, "b": h.cost.b, "c": h.cost.c, "e": h.cost.e,
                                            "measured": h.calibration}}))
    dist.destroy_process_group()


if __name__ == "__main__":
    from plait.parallel.teardown import run_and_exit

    run_and_exit(main)
