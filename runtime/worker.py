"""One training worker, started by the elastic agent: ``python -m plait.runtime.worker --run-dir DIR``.

It reads the resolved ``DIR/config.yaml`` that ``plait train`` wrote, so every worker
trains from exactly the same configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import plait
from plait.runtime.config import JobConfig, load_config, model_spec
from plait.runtime.data import SequenceLoader, eval_batches, load_corpus
from plait.runtime.metrics import MetricsHook
from plait.runtime.progress import ConsoleHook
from plait.runtime.summary import SummaryHook
from plait.runtime.build import build_engine
from plait.runtime.trainer import Hook, Trainer
from plait.scheduler.estimate import train_flops_per_token

log = logging.getLogger("plait.worker")


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _threads(config: JobConfig) -> int:
    if config.train.threads:
        return config.train.threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // local)


class Terminated(Exception):
    """The elastic agent stopped this worker (SIGTERM), usually because another one failed."""


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


def run(run_dir: Path) -> None:
    started = time.time()
    # An exception rather than an exit, so the summary of the steps done gets written.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    config = load_config(run_dir / "config.yaml")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(local_rank)
    backend = config.launch.backend if config.launch.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=5))
    try:
        torch.set_num_threads(_threads(config))
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        _seed_everything(config.train.seed)

        corpus = load_corpus(config.data)
        model_config = config.model
        engine = build_engine(config, world, device)
        # Every rank reads the whole global batch (token ids: kilobytes); the engine takes its share.
        loader = SequenceLoader(
            corpus.train, seq_len=model_config.seq_len, global_batch=config.train.global_batch, seed=config.train.seed,
        )
        eval_set = eval_batches(
            corpus.eval, seq_len=model_config.seq_len, batch=config.train.global_batch,
            batches=config.train.eval_batches, dp_rank=0, dp_size=1,
        )
        hooks: list[Hook] = []
        summary: SummaryHook | None = None
        if rank == 0:
            flops = train_flops_per_token(model_spec(config.model))
            peak = config.metrics.peak_flops or float(os.environ.get("PLAIT_PEAK_FLOPS", "0"))
            summary = SummaryHook(run_dir, config=config, corpus=corpus, started=started, world=world)
            if config.metrics.enabled:
                hooks.append(MetricsHook(config.metrics, job=run_dir.name, flops_per_token=flops, peak_flops_per_device=peak, world=world))
            hooks += [ConsoleHook(log_every=config.metrics.log_every), summary]
        trainer = Trainer(config=config.train, engine=engine, loader=loader, eval_set=eval_set, hooks=hooks)
        try:
            trainer.fit()
        except BaseException as err:
            if summary is not None:  # nothing lost: the steps done so far are on disk
                summary.write(trainer, status="failed", error=f"{type(err).__name__}: {err}")
            raise
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m plait.runtime.worker")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format=f"[rank{os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s")
    log.debug("plait %s worker starting", plait.__version__)
    run(args.run_dir)


if __name__ == "__main__":
    main()
