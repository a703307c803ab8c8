"""One training worker, started by the elastic agent: ``python -m plait.runtime.worker --run-dir DIR``.

It reads the resolved ``DIR/config.yaml`` that ``plait train`` wrote, so every worker
trains from exactly the same configuration. Started by the user's own torchrun, it takes
``--config FILE [--set KEY=VALUE ...] [--run-dir DIR]`` instead and resolves the config
itself, with the world and node counts torchrun gives.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import plait
from plait.errors import JobCannotContinue, LaunchError
from plait.runtime.config import JobConfig, load_config, model_spec
from plait.runtime.data import SequenceLoader, eval_batches, load_corpus
from plait.runtime.memtrack import MemoryHook, tracker_for
from plait.runtime.metrics import MetricsHook
from plait.runtime.progress import ConsoleHook
from plait.runtime.summary import SummaryHook
from plait.runtime.build import build_engine
from plait.parallel.engine import ParallelEngine
from plait.scheduler.placement import Placement
from plait.parallel.slices import global_shapes, local_slices
from plait.runtime.faults import FaultHook, parse_fault
from plait.runtime.snapshot.transport.client import DaemonClient
from plait.runtime.snapshot.checkpoint import paths as checkpoint_paths
from plait.runtime.snapshot.checkpoint.read import layout_of
from plait.runtime.snapshot.checkpoint.write import CheckpointWriter
from plait.runtime.snapshot.auth import SECRET_ENV, JobSecret
from plait.runtime.snapshot.trainer.hook import SnapshotHook
from plait.runtime.snapshot.trainer.lifecycle import VersionLifecycle, published_record
from plait.runtime.snapshot.trainer.withdrawals import Withdrawals
from plait.runtime.snapshot.layout import GroupLayout
from plait.runtime.snapshot.trainer.restore import restore
from plait.runtime.trainer import BaseHook, Hook, Trainer
from plait.scheduler.estimate import train_flops_per_token

log = logging.getLogger("plait.worker")

PARENT_POLL_S = 0.2


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


def _layout_rank(config: JobConfig, world: int) -> tuple[int, Placement]:
    """This worker's rank in the parallel layout, from its node and local index (``parallel.placement``).

    Under plait's per-node agents the node is the agent's ``--node-rank``; otherwise the
    elastic agent's numbering (``RANK = node·P + LOCAL_RANK``) names it.
    """
    if world != config.launch.nproc:
        raise LaunchError(f"the launcher started {world} workers, but the config's launch.nproc is "
                          f"{config.launch.nproc}: give plait (or torchrun) matching worker counts")
    placement = config.parallel.placement_of(world, config.launch.nnodes)
    if "PLAIT_NODE_RANK" in os.environ:
        node, local = int(os.environ["PLAIT_NODE_RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    else:
        node, local = divmod(int(os.environ.get("RANK", "0")), placement.per_node)
    return placement.rank_of(node, local), placement


def _init_process_group(backend: str, *, rank: int, world: int) -> int:
    """Join the job's process group as layout rank ``rank``; return the job's attempt (0, then 1 per restart).

    gloo finds its peers through keys in a store. Under one agent (``plait train`` on one
    machine, torchrun) that is the agent's store, which outlives a restart of the worker
    group: without a per-attempt prefix, the workers of a restart would read the dead
    workers' addresses and fail with "connection refused". Under plait's per-node agents
    each attempt's workers get a fresh store instead, hosted by the worker the elastic
    agent numbered 0 (torch's shared store breaks when a node is replaced: the new agent
    waits for an address the old ones never write again).

    The attempt is counted per rank in a store that lives as long as the job (the
    rendezvous store under per-node agents), rather than taken from the agent's restart
    count: a node that replaced a lost one starts counting at 0 while the others are at 1,
    yet every rank starts once per attempt. Each worker claims its rank first, so that two
    nodes started with the same ``--node-rank`` fail with that said, rather than hang.
    """
    global _JOB_STORE
    timeout = timedelta(minutes=5)
    if "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
        return 0
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    hosts = not shared and int(os.environ.get("RANK", "0")) == 0
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=hosts,
                         timeout=timeout, wait_for_workers=False)
    # The claim goes where each attempt starts afresh: the attempt's own store, or its prefix of the shared one
    # (where, under one agent, no rank can be claimed twice, and so the attempt count cannot be split by one).
    if shared:
        attempt = int(base.add(f"plait/starts/rank{rank}", 1)) - 1
        _claim(dist.PrefixStore(f"plait/attempt{attempt}", base), rank, world)
    else:
        _claim(base, rank, world)
        if os.environ.get("PLAIT_RDZV"):
            host, _, port = os.environ["PLAIT_RDZV"].rpartition(":")
            counter = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
            attempt = int(counter.add(f"plait/starts/rank{rank}", 1)) - 1
        else:
            attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = dist.PrefixStore(f"plait/attempt{attempt}", base)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    _JOB_STORE = store
    return attempt


# The attempt's store the process group was built on (None before, or without a launcher's MASTER_ADDR): the
# snapshot hooks' side channel to rank 0 (runtime/snapshot/trainer/withdrawals.py).
_JOB_STORE = None


def _claim(store, rank: int, world: int, timeout: float = 60.0) -> None:
    """Claim ``rank`` and wait until every rank is claimed; raise if any was claimed twice (by us or another).

    The wait matters: a worker that won its claim would otherwise wait in the process group for peers that
    will never come, long after the losers stopped.
    """
    me = f"{os.environ.get('PLAIT_NODE_RANK', '-')}:{os.environ.get('LOCAL_RANK', '0')}:{os.getpid()}"
    holder = store.compare_set(f"plait/claim/rank{rank}", "", me).decode()
    if holder != me:
        message = (f"rank {rank} is claimed twice (node:local:pid {holder} and {me}): every node needs its own "
                   "--node-rank")
        store.set("plait/claim/failed", message)
        raise LaunchError(message)
    store.add("plait/claim/count", 1)
    deadline = time.monotonic() + timeout
    while int(store.add("plait/claim/count", 0)) < world and time.monotonic() < deadline:
        if store.check(["plait/claim/failed"]):
            raise LaunchError(store.get("plait/claim/failed").decode())
        time.sleep(0.05)
    if store.check(["plait/claim/failed"]):
        raise LaunchError(store.get("plait/claim/failed").decode())


class Terminated(Exception):
    """The elastic agent stopped this worker (SIGTERM), usually because another one failed."""


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


class ProgressMarker(BaseHook):
    """Each rank writes its last finished step to ``<run dir>/progress/rank<R>``; a restart counts the steps it replays from the highest."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "progress" / f"rank{rank}"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(step))
        os.replace(tmp, self.path)


def _resume_point(run_dir: Path, run: checkpoint_paths.RunInfo) -> checkpoint_paths.Checkpoint | None:
    """The checkpoint ``plait train --resume`` chose (checked there), recorded in run.json."""
    if not run.resume_from:
        return None
    manifest = checkpoint_paths.read_manifest(Path(run.resume_from))
    if manifest is None:
        raise LaunchError(f"--resume {run.resume_from}: the checkpoint is gone or incomplete since plait train checked "
                          "it; give another checkpoint")
    return checkpoint_paths.Checkpoint(Path(run.resume_from), manifest)


def _snapshot_parts(config: JobConfig, run_dir: Path, engine: ParallelEngine, *, rank: int, world: int,
                    placement: Placement, attempt: int) -> tuple[SnapshotHook | None, dict]:
    """The snapshot hook of this rank (None without snapshots) and the arguments of :func:`restore`."""
    per_node = config.launch.nproc_per_node
    nnodes = config.launch.nnodes
    snap = config.snapshot
    layout = GroupLayout(*snap.code(nnodes))
    run = checkpoint_paths.run_of(run_dir)
    args: dict = {"rank": rank, "world": world, "per_node": per_node, "layout": layout, "clients": None, "disk": None,
                  "run_dir": run_dir, "attempt": attempt, "secret": None, "lifecycle": None,
                  "resume": _resume_point(run_dir, run), "placement": placement}
    if not snap.enabled:
        return None, args
    node, local_rank = placement.node_of(rank), placement.local_of(rank)
    if not os.environ.get("PLAIT_SNAPSHOT_DAEMONS"):
        raise LaunchError("snapshot.every is set, but nothing started this node's snapshot daemon (torchrun starts "
                          "only workers): start every node with plait train --nnodes N --node-rank R --rdzv HOST:PORT "
                          "--nproc-per-node P (it runs the daemon and torchrun's elastic agent), or train without "
                          "snapshots (--set snapshot.every=0)")
    secret = JobSecret.from_env()
    if secret is None:
        raise LaunchError(f"snapshots are on but {SECRET_ENV} is not set: start workers with plait train, or set it "
                          "to the job's secret file")
    addresses = os.environ["PLAIT_SNAPSHOT_DAEMONS"].split(",")
    clients = [DaemonClient(a, secret=secret) for a in addresses]
    # The disk tier's writer; without the tier, plait stop --snapshot still writes its checkpoint through one.
    writer = CheckpointWriter(checkpoint_paths.checkpoint_base(snap.dir, run_dir), run=run, rank=rank, world=world,
                              slices=local_slices(engine), layout=layout_of(engine), params=global_shapes(engine),
                              keep=snap.keep_disk, secret=secret, attempt=attempt)
    disk = writer if snap.disk_every else None
    withdrawals = Withdrawals(_JOB_STORE)
    lifecycle = (VersionLifecycle(clients, complete_timeout=snap.complete_timeout, record=published_record(run_dir),
                                  withdrawals=withdrawals) if rank == 0 else None)
    hook = SnapshotHook(snap, client=clients[node], lifecycle=lifecycle, rank=rank, local_rank=local_rank,
                        secret=secret, disk=disk, withdrawals=withdrawals)
    hook.stop_writer = writer
    args.update(clients=clients, disk=disk, secret=secret, lifecycle=lifecycle)
    return hook, args


def _control_hook(config: JobConfig, run_dir: Path, *, rank: int, world: int, node: int, attempt: int,
                  snapshots: SnapshotHook | None):
    """This worker's reports to the job's coordinator (``PLAIT_CONTROL``, set by plait train); None without one."""
    address = os.environ.get("PLAIT_CONTROL")
    if not config.control.enabled or not address:
        return None
    from plait.runtime.control.client import CoordinatorClient
    from plait.runtime.control.hook import ControlHook

    secret = JobSecret.from_env()
    if secret is None:
        raise LaunchError(f"PLAIT_CONTROL is set but {SECRET_ENV} is not: the coordinator needs the job's secret")
    # The reports run beside training, so a generous deadline costs nothing; a loaded machine needs it
    client = CoordinatorClient(address, secret, timeout=max(10.0, config.control.heartbeat_s))
    return ControlHook(client, rank=rank, world=world, node=node, attempt=attempt,
                       heartbeat_s=config.control.heartbeat_s, snapshots=snapshots,
                       stacks=run_dir / "stacks" / f"rank{rank}.txt")


def _die_with_parent() -> None:
    """Exit at once when the process that started this worker (the elastic agent) is gone.

    Without it, a ``kill -9`` of ``plait train`` (a scheduler's cancel, the OOM killer)
    leaves the workers training with nobody to answer to. Polled rather than
    PR_SET_PDEATHSIG, which fires when the *thread* that forked exits.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="plait-parent-watch", daemon=True).start()


def run(run_dir: Path, config: JobConfig | None = None) -> None:
    started = time.time()
    _die_with_parent()
    config = config or load_config(run_dir / "config.yaml")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rank, placement = _layout_rank(config, world)
    device = _device(local_rank)
    # Before anything is built, so that every tensor of the run is allocated through the tracker.
    memory = MemoryHook(tracker_for(device)) if config.metrics.memory else None
    backend = config.launch.backend if config.launch.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    attempt = _init_process_group(backend, rank=rank, world=world)
    # From here on SIGTERM raises, so that the summary of the steps done gets written. Not before: until the
    # process group is up there is nothing to write, and a Python handler cannot run while the process waits in
    # a store's C++ call (a peer that never came, a store host that died), so the agent's SIGTERM would go
    # unheard until its SIGKILL 30 s later.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    os.environ["PLAIT_ATTEMPT"] = str(attempt)  # the summary's restart count
    lifecycle = None
    try:
        torch.set_num_threads(_threads(config))
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        _seed_everything(config.train.seed)

        corpus = load_corpus(config.data)
        model_config = config.model
        engine = build_engine(config, world, device)
        # Every rank reads the whole global batch (token ids: kilobytes); the engine takes its share.
        if config.data.packing == "documents":
            from plait.runtime.documents import DocumentLoader, document_pieces

            loader = DocumentLoader(corpus.train, document_pieces(corpus.train_files, config.max_len()),
                                    global_batch=config.train.global_batch, seed=config.train.seed,
                                    max_len=config.max_len())
        else:
            loader = SequenceLoader(
                corpus.train, seq_len=model_config.seq_len, global_batch=config.train.global_batch,
                seed=config.train.seed,
            )
        eval_set = eval_batches(
            corpus.eval, seq_len=model_config.seq_len, batch=config.train.global_batch,
            batches=config.train.eval_batches, dp_rank=0, dp_size=1,
        )
        # First: its on_step closes the step's window before any other hook allocates.
        hooks: list[Hook] = [memory] if memory is not None else []
        summary: SummaryHook | None = None
        if rank == 0:
            flops = train_flops_per_token(model_spec(config.model))
            peak = config.metrics.peak_flops or float(os.environ.get("PLAIT_PEAK_FLOPS", "0"))
            summary = SummaryHook(run_dir, config=config, corpus=corpus, started=started, world=world)
            summary.memory = memory
            if config.metrics.enabled:
                hooks.append(MetricsHook(config.metrics, job=run_dir.name, flops_per_token=flops, peak_flops_per_device=peak, world=world))
            hooks += [ConsoleHook(log_every=config.metrics.log_every), summary]
        if config.precision.ab:
            from plait.runtime.ab import ABHook

            hooks.append(ABHook(config, world=world, device=device, summary=summary, loader=SequenceLoader(
                corpus.train, seq_len=model_config.seq_len, global_batch=config.train.global_batch, seed=config.train.seed)))
        snapshot_hook, restore_args = _snapshot_parts(config, run_dir, engine, rank=rank, world=world,
                                                      placement=placement, attempt=attempt)
        lifecycle = restore_args["lifecycle"]
        if snapshot_hook is not None:
            hooks.append(snapshot_hook)
        hooks.append(ProgressMarker(run_dir, rank))
        control = _control_hook(config, run_dir, rank=rank, world=world, node=placement.node_of(rank),
                                attempt=attempt, snapshots=snapshot_hook)
        if control is not None:
            hooks.append(control)
        mine = [f for f in map(parse_fault, json.loads(os.environ.get("PLAIT_RANK_FAULTS", "[]"))) if f.target == rank]
        from plait.runtime.faults.local import HangHook, SlowRankHook

        # after the control hook: the wait is inside the step the control plane times
        hooks += [SlowRankHook(f) for f in mine if f.kind == "slow-rank"]
        faults = [parse_fault(f) for f in json.loads(os.environ.get("PLAIT_FAULTS", "[]"))]
        fault_hook = None
        if faults:
            fault_hook = FaultHook(faults, run_dir=run_dir, rank=rank, attempt=restore_args["attempt"],
                                   drain=snapshot_hook.drain if snapshot_hook is not None else None)
            hooks.append(fault_hook)
        hooks += [HangHook(f) for f in mine if f.kind == "hang"]  # last: the step's snapshot and reports are done
        trainer = Trainer(config=config.train, engine=engine, loader=loader, eval_set=eval_set, hooks=hooks)
        if summary is not None:
            summary.snapshots = snapshot_hook
        try:
            if fault_hook is not None:
                fault_hook.settle()  # a restore sees every fault of a point, never some of them
            outcome = restore(trainer, **restore_args, on_plan=fault_hook.at_restore if fault_hook else None)
            if snapshot_hook is not None:
                snapshot_hook.epoch = outcome.epoch
            if rank == 0 and (outcome.source != "fresh" or restore_args["attempt"] > 0):
                print(outcome.line, flush=True)
                if control is not None:
                    control.restored(outcome.line)
            try:
                trainer.fit()
            except BaseException as err:
                if summary is not None:  # nothing lost: the steps done so far are on disk
                    summary.write(trainer, status="failed", error=f"{type(err).__name__}: {err}")
                raise
        except JobCannotContinue as err:
            # No restart can fix it: every rank returns normally, so that the elastic agent does not
            # restart the workers in vain, and plait train reports the summary's error.
            log.error("rank %d: the job cannot continue: %s", rank, err)
            if summary is not None:
                summary.stop(trainer, f"{type(err).__name__}: {err}")
    finally:
        if lifecycle is not None:
            lifecycle.close()
        dist.destroy_process_group()


def _quiet_known_warnings() -> None:
    import warnings

    # torch 2.13 renames the tensor collectives (*_single); 2.11, on the GPU machines, has only these names.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is deprecated\. Please use `torch\.distributed\.\w+_single`")
    # The disk tier calls DCP with no_dist on purpose (one rank's files, no collective).
    warnings.filterwarnings("ignore", category=UserWarning, message=r"torch\.distributed is disabled, unavailable or uninitialized")


def main() -> None:
    _quiet_known_warnings()
    parser = argparse.ArgumentParser(prog="python -m plait.runtime.worker")
    parser.add_argument("--run-dir", type=Path, help="the run directory (with plait train: holds config.yaml)")
    parser.add_argument("--config", type=Path, help="under your own torchrun: the YAML job config")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.config is None and args.run_dir is None:
        parser.error("give --run-dir DIR (started by plait train) or --config FILE (started by your own torchrun)")
    logging.basicConfig(level=logging.WARNING, format=f"[rank{os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s")
    log.debug("plait %s worker starting", plait.__version__)
    if args.config is None:
        run(args.run_dir)
        return
    config, run_dir = _torchrun_job(args.config, args.overrides, args.run_dir)
    run(run_dir, config)


def _torchrun_job(path: Path, overrides: list[str], run_dir: Path | None) -> tuple[JobConfig, Path]:
    """The config with torchrun's world (``WORLD_SIZE``) and nodes (``WORLD_SIZE / LOCAL_WORLD_SIZE``); the run
    directory (default ``runs/<config name>-<torchrun's run id>``, the same on every node) with config.yaml."""
    from plait.runtime.config import dump_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    config = load_config(path, overrides, nproc=world, nnodes=max(1, world // local))
    run_dir = run_dir or Path("runs") / f"{path.stem}-{os.environ.get('TORCHELASTIC_RUN_ID', 'torchrun')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        tmp = run_dir / f"config.yaml.{os.getpid()}.tmp"
        tmp.write_text(dump_config(config))
        os.replace(tmp, run_dir / "config.yaml")
    return config, run_dir


if __name__ == "__main__":
    from plait.parallel.teardown import run_and_exit

    run_and_exit(main)
