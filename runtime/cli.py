"""The ``plait`` command line: ``plait train``, ``plait plan``, ``plait export``, ``plait daemon``, ``plait cluster``
and ``plait bench``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from plait.errors import CLIError, ConfigError, LaunchError, PlaitError


def build_parser() -> argparse.ArgumentParser:
    from plait import __version__

    parser = argparse.ArgumentParser(
        prog="plait",
        description="plait: distributed training for transformer and mixture-of-experts models.",
    )
    parser.add_argument("--version", action="version", version=f"plait {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="train a model from a YAML config",
        description="Train a model: launches --nproc local workers through torchrun's elastic agent "
        "(gloo on CPU, NCCL on GPU) and writes config.yaml, run.json and summary.json to the run directory.",
    )
    train.add_argument("--config", type=Path, required=True, metavar="FILE", help="YAML config (see configs/)")
    train.add_argument("--nproc", type=int, metavar="N", help="worker processes (sets launch.nproc)")
    train.add_argument("--nnodes", type=int, metavar="N", help="nodes to emulate on this machine, each with its own "
                       "snapshot daemon and shared memory (sets launch.nnodes); workers = N × --nproc-per-node")
    train.add_argument("--nproc-per-node", type=int, metavar="P", help="worker processes per node (with --nnodes)")
    train.add_argument("--node-rank", type=int, metavar="R", help="this node's number, 0 .. N-1 (with --rdzv): run one "
                       "node of a multi-node job, started once on every node")
    train.add_argument("--rdzv", metavar="HOST:PORT", help="the job's rendezvous endpoint (with --nnodes and "
                       "--node-rank): the node that owns HOST hosts the store, the others join it")
    train.add_argument("--cluster", type=Path, metavar="FILE", help="rehearse the cluster FILE describes on this "
                       "machine: a network namespace and shaped link per node, each node its own agent (needs root)")
    train.add_argument("--node-addr", metavar="ADDR", help="this node's address as its peers reach it (default: the "
                       "address this machine reaches the --rdzv host from)")
    train.add_argument("--fault", dest="faults", action="append", default=[], metavar="SPEC",
                       help="inject a fault, repeatable: kill-worker:rank=R:step=S, kill-node:node=N:step=S, "
                       "kill-daemon:node=N:step=S, corrupt-shard:node=N:step=S, corrupt-parity:node=N:step=S, "
                       "hang-daemon:node=N:step=S[:seconds=D], slow-rank:rank=R:factor=F[:step=S]; kill-* also at "
                       "restore=N (during the N-th restart's restore); with --cluster also link-down:node=N:step=S[:seconds=T], slow-link:node=N:factor=F[:step=S]")
    train.add_argument("--run-dir", type=Path, metavar="DIR", help="where config.yaml, summary.json and logs go "
                       "(default: runs/<config name>-<time>)")
    train.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override a config key, dotted (train.steps=50); repeatable")
    train.add_argument("--ab", metavar="RECIPE", help="train a reference model in precision recipe RECIPE (e.g. fp32) "
                       "alongside, on the same data and seed, and report the loss gap per step (sets precision.ab)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config, batch arithmetic, "
                       "parameter count and memory estimate, then exit")
    train.add_argument("--resume", metavar="DIR|latest", help="start from a disk checkpoint, in any layout: a run "
                       "directory (its newest complete checkpoint), a checkpoint's step directory, or latest (the "
                       "most recently started run with one, under snapshot.dir and beside --run-dir)")

    from plait.runtime.plan_cli import add_plan_parser

    add_plan_parser(commands)

    export = commands.add_parser(
        "export", help="write a run's disk checkpoint as one single-process state dict",
        description="Write the model of a run's disk checkpoint as one state dict in the single-process layout "
        "({name: tensor}, loadable by model.load_state_dict): torch.save, or safetensors when --out ends in "
        ".safetensors (needs the safetensors package).",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (or a checkpoint's step directory)")
    export.add_argument("--step", type=int, metavar="S", help="the step to export (default: the newest complete one)")
    export.add_argument("--out", type=Path, required=True, metavar="FILE", help="output file: .safetensors, else torch.save")

    from plait.runtime.snapshot.daemon.main import add_daemon_parser

    add_daemon_parser(commands)

    from plait.runtime.rehearsal.cli import add_cluster_parser

    add_cluster_parser(commands)

    bench = commands.add_parser("bench", help="run a benchmark from bench/",
                                description="Run a benchmark; results go to bench/results/NAME.json.")
    bench.add_argument("name", nargs="?", metavar="NAME", help="benchmark name; omit to list them")
    bench.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    bench.add_argument("--out", type=Path, metavar="DIR", help="results directory (default: bench/results)")
    bench.add_argument("--quick", action="store_true", help="a short run for smoke tests, not for reporting")
    bench.add_argument("--cluster", type=Path, metavar="FILE", help="cluster file of a benchmark that takes one (links)")
    from plait.runtime.control.cli import add_commands

    add_commands(commands)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from plait.runtime.config import dump_config
    from plait.runtime.dryrun import dry_run_report
    from plait.runtime.launch import launch_workers

    from plait.runtime.faults import check_faults, parse_fault

    spec = None
    if args.cluster is not None:
        from plait.scheduler.cluster import load_cluster

        if args.rdzv is not None or args.node_rank is not None or args.nnodes is not None or args.nproc is not None \
                or args.nproc_per_node is not None:
            raise CLIError("--cluster: the cluster file gives the nodes and workers per node; drop --nnodes, "
                           "--node-rank, --rdzv, --nproc and --nproc-per-node")
        spec = load_cluster(args.cluster)
    if args.nproc is not None and args.nproc < 1:
        raise CLIError(f"--nproc: got {args.nproc}; accepted: a positive number of processes")
    nproc = args.nproc
    for flag, value in (("--nnodes", args.nnodes), ("--nproc-per-node", args.nproc_per_node)):
        if value is not None and value < 1:
            raise CLIError(f"{flag}: got {value}; accepted: a positive number")
    if args.nproc_per_node is not None:
        if args.nproc is not None:
            raise CLIError("--nproc and --nproc-per-node: give one; --nproc counts all workers, --nproc-per-node those of one node")
        nproc = args.nproc_per_node * (args.nnodes or 1)
    elif args.nnodes is not None and args.nproc is None and args.rdzv is None:
        raise CLIError(f"--nnodes {args.nnodes}: also give --nproc-per-node (workers per node)")
    if spec is not None:
        args.nnodes, nproc = spec.nnodes, spec.world
    multinode = args.rdzv is not None or args.node_rank is not None
    if multinode:
        if args.rdzv is None or args.node_rank is None or args.nnodes is None:
            raise CLIError("a node of a multi-node job needs all of --nnodes N --node-rank R --rdzv HOST:PORT "
                           "(and --nproc-per-node P, or launch.nproc in the config counting every node's workers)")
        if args.faults:
            raise CLIError("--fault: faults are injected into jobs whose nodes all run on this machine: rehearse the "
                           "cluster (--cluster FILE), or emulate its nodes (--nnodes without --rdzv)")
    config = _load_train_config(args, nproc)
    if config.parallel.auto:
        config = _auto_plan(args, config, spec, nproc, multinode)
    faults = [parse_fault(f) for f in args.faults]
    check_faults(faults, world=config.launch.nproc, nnodes=config.launch.nnodes, steps=config.train.steps,
                 snapshots=config.snapshot.enabled,
                 parity=config.snapshot.code(config.launch.nnodes)[1] if config.snapshot.enabled else 0,
                 rehearsal=spec is not None)
    rehearsal = None
    if spec is not None:
        from plait.runtime.rehearsal.run import prepare

        rehearsal = prepare(spec)
    if args.dry_run:
        print(dry_run_report(config))
        if rehearsal is not None:
            from plait.scheduler.cluster import node_table
            from plait.runtime.rehearsal.net import Network

            net = Network(rehearsal.plan)
            print(node_table(spec, rehearsal.scale, [net.address(n) for n in range(spec.nnodes)]))
        return 0
    if multinode:
        return _train_node(args, config)
    if rehearsal is not None:
        return _train_cluster(args, config, rehearsal, faults)
    run_dir = args.run_dir or Path("runs") / f"{args.config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "summary.json").exists():
        raise CLIError(f"--run-dir: {run_dir} already holds a finished run (summary.json); choose another directory")
    resume = None
    if args.resume is not None:
        from plait.runtime.snapshot.checkpoint.export import check_resume

        resume = check_resume(args.resume, config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    from plait.runtime.snapshot.checkpoint.paths import new_run

    new_run(run_dir, resume.path if resume is not None else None)
    if resume is not None:
        print(f"plait: resuming from step {resume.step} of run {resume.run_id} ({resume.path})", flush=True)
    env = _peak_env(config, config.launch.nproc)
    nodes = f" on {config.launch.nnodes} nodes" if config.launch.nnodes > 1 else ""
    print(f"plait: training {config.model.kind} on {config.launch.nproc} worker(s){nodes}; run directory {run_dir}", flush=True)
    if config.parallel.ep_compress == "lsh":
        h = config.parallel.lsh
        probe = f"a fidelity probe every {h.probe_every} steps" if h.probe_every else "no fidelity probe"
        print(f"plait: the expert all-to-all sends LSH bucket centroids ({h.hashes} hashes of {2 * h.resolved_dim(config.model.dim)} codes, seed "
              f"{h.seed}, residual compensation {'on' if h.compensate else 'off'}, {probe})", flush=True)
    daemons = None
    secret_file = None
    local = [f for f in faults if f.kind in ("slow-rank", "hang")]  # carried out by the workers themselves
    faults = [f for f in faults if f not in local]
    if local:
        env["PLAIT_RANK_FAULTS"] = json.dumps([str(f) for f in local])
    if faults:
        env["PLAIT_FAULTS"] = json.dumps([str(f) for f in faults])
    if config.snapshot.enabled:
        from plait.runtime.snapshot.trainer.hook import job_name
        from plait.runtime.snapshot.trainer.lifecycle import published_record
        from plait.runtime.snapshot.launcher.spawn import job_secret_file
        from plait.runtime.snapshot.launcher.supervisor import DaemonSet

        job = job_name(run_dir)
        published_record(run_dir).unlink(missing_ok=True)  # of an earlier job in this directory
        secret_file = job_secret_file(run_dir)
        daemons = DaemonSet(config.snapshot, job=job, nnodes=config.launch.nnodes,
                            nproc_per_node=config.launch.nproc_per_node, run_dir=run_dir, secret_file=secret_file)
        daemons.start()
        env.update(PLAIT_SNAPSHOT_DAEMONS=",".join(daemons.addresses), PLAIT_JOB=job,
                   PLAIT_SNAPSHOT_SECRET_FILE=str(secret_file.resolve()))
        snap = config.snapshot
        print(f"plait: snapshots every {snap.every} steps to {config.launch.nnodes} node daemon(s) "
              f"({', '.join(daemons.addresses)})" + (", erasure-coded k={} m={}".format(*daemons.code) if daemons.code[1] else ", no parity")
              + (f", disk every {snap.disk_every} snapshots" if snap.disk_every else ""), flush=True)
    from plait.runtime.control.cli import launch_coordinator

    coordinator, secret_file = launch_coordinator(config.control, run_dir, world=config.launch.nproc,
                                                  snapshots=config.snapshot.enabled,
                                                  daemons=daemons.addresses if daemons else [],
                                                  secret_file=secret_file, env=env)
    executor = None
    if faults:
        from plait.runtime.faults.executor import FaultExecutor

        # In this process, which no fault kills; the workers only ask for their faults.
        executor = FaultExecutor(faults, run_dir=run_dir, world=config.launch.nproc,
                                 per_node=config.launch.nproc_per_node, daemons=daemons, secret_file=secret_file,
                                 placement=config.parallel.placement_of(config.launch.nproc, config.launch.nnodes))
        executor.start()
    try:
        launch_workers(config.launch, run_dir, env=env, max_restarts=config.launch.restarts(config.snapshot.enabled))
    except LaunchError as err:
        if (run_dir / "summary.json").exists():
            raise LaunchError(f"{err}; the steps done so far are in {run_dir / 'summary.json'}") from None
        raise
    finally:
        if executor is not None:
            executor.stop()  # before the daemons: it wakes a daemon it hung
        if daemons is not None:
            daemons.stop()
        if coordinator is not None:
            coordinator.stop()
            (run_dir / "control.json").unlink(missing_ok=True)
    _report(run_dir)
    return 0


def _load_train_config(args: argparse.Namespace, nproc: int | None):
    """The job config; under ``parallel.auto`` a micro-batch that only the default layout cannot divide is left to
    the planner, which chooses it too."""
    from plait.runtime.config import load_config

    if getattr(args, "ab", None):
        args.overrides = [*args.overrides, f"precision.ab={args.ab}"]
    try:
        return load_config(args.config, args.overrides, nproc=nproc, nnodes=args.nnodes)
    except ConfigError as err:
        if err.key != "train.global_batch":
            raise
        try:
            config = load_config(args.config, [*args.overrides, "train.micro_batch=1"], nproc=nproc, nnodes=args.nnodes)
        except ConfigError:
            raise err from None
        if not config.parallel.auto:
            raise err from None
        return config


def _auto_plan(args: argparse.Namespace, config, spec, nproc: int | None, multinode: bool):
    """``parallel.auto``: plan on the rehearsed cluster's file, or on this machine, and train the best plan."""
    from plait.runtime.config import load_config
    from plait.runtime.plan_cli import apply_auto

    if multinode:
        raise CLIError("parallel.auto on a node of a multi-node job: every node would plan on its own; plan once with "
                       "plait plan --config F --cluster CLUSTER.yaml --emit plait and pass those --set overrides to "
                       "every node")
    result = apply_auto(config, spec)
    best = result.best
    where = f"--cluster {args.cluster}" if spec is not None else f"--nproc {config.launch.nproc}"
    print(f"plait: parallel.auto: {best.name()}, placement {best.placed.strategy}, predicted "
          f"{best.time.total * 1e3:.3g} ms/step, {best.peak_bytes / 2**20:,.1f} MiB per device "
          f"(of {result.searched} layouts; plait plan --config {args.config} {where} shows why)", flush=True)
    # parallel.auto=false: the run directory's config.yaml then holds the chosen layout and loads again as it is.
    return load_config(args.config, [*args.overrides, *best.sets(), "parallel.auto=false"], nproc=nproc,
                       nnodes=args.nnodes)


def _peak_env(config, local_workers: int) -> dict[str, str]:
    if config.metrics.peak_flops:
        return {}
    import torch

    from plait.runtime.peak import cpu_peak_flops, cuda_peak_flops

    peak = cuda_peak_flops() if torch.cuda.is_available() else cpu_peak_flops(local_workers)
    return {"PLAIT_PEAK_FLOPS": repr(peak)}


def _train_node(args: argparse.Namespace, config) -> int:
    from plait.runtime.agent.node import NodeArgs, train_node
    from plait.runtime.agent.rendezvous import Endpoint

    node = NodeArgs(nnodes=args.nnodes, node_rank=args.node_rank, endpoint=Endpoint.parse(args.rdzv),
                    address=args.node_addr, machine_nodes=int(os.environ.get("PLAIT_MACHINE_NODES", "1")))
    node.check()
    resume = None
    if args.resume is not None:
        from plait.runtime.snapshot.checkpoint.export import check_resume

        resume = check_resume(args.resume, config, args.run_dir or Path("runs"))
    default = Path("runs") / f"{args.config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = train_node(config, node, run_dir=args.run_dir, default_run_dir=default,
                         env=_peak_env(config, config.launch.nproc_per_node),
                         resume_path=resume.path if resume is not None else None)
    if "PLAIT_REHEARSAL" not in os.environ:  # a rehearsal's own process reports once for all nodes
        _report(run_dir, node=args.node_rank)
    return 0


def _train_cluster(args: argparse.Namespace, config, rehearsal, faults) -> int:
    from plait.runtime.rehearsal.run import train_cluster

    run_dir = args.run_dir or Path("runs") / f"{args.config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "summary.json").exists():
        raise CLIError(f"--run-dir: {run_dir} already holds a finished run (summary.json); choose another directory")
    extra = ["--resume", args.resume] if args.resume is not None else []
    spec = rehearsal.spec
    print(f"plait: rehearsing cluster {spec.name} ({spec.nnodes} nodes × {spec.workers_per_node} workers) on this "
          f"machine; links scaled by {rehearsal.scale.value:.3g} ({rehearsal.scale.source}); run directory {run_dir}",
          flush=True)
    train_cluster(config, rehearsal, run_dir=run_dir, faults=faults, extra=extra)
    _report(run_dir)
    return 0


def _report(run_dir: Path, node: int | None = None) -> None:
    path = run_dir / "summary.json"
    if not path.exists():
        print(f"plait: node {node}: its workers finished; rank 0's summary is on the node that ran it", flush=True)
        return
    summary = json.loads(path.read_text())
    if summary["status"] == "stopped":
        print(f"plait: {summary['error']}: {summary['steps']} steps; summary at {path}", flush=True)
        return
    if summary["status"] != "completed":  # the workers stopped the job: no restart could have helped
        raise LaunchError(f"{summary['error']}; the steps done so far are in {path}")
    eval_text = f"{summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "n/a"
    print(
        f"plait: done: {summary['steps']} steps, final loss {summary['losses'][-1]:.4f}, eval loss {eval_text}, "
        f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['wall_s']:.1f} s; summary at {path}",
        flush=True,
    )


def cmd_export(args: argparse.Namespace) -> int:
    from plait.runtime.snapshot.checkpoint.export import export

    if args.step is not None and args.step < 1:
        raise CLIError(f"--step: got {args.step}; accepted: a step number of the run (1 or more)")
    checkpoint, count = export(args.run_dir, step=args.step, out=args.out)
    print(f"plait: exported step {checkpoint.step} of run {checkpoint.run_id} ({count} tensors) to {args.out}", flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from plait.bench.runner import list_benchmarks, run_benchmark

    if not args.name:
        for name, doc in list_benchmarks().items():
            print(f"{name:12s} {doc}")
        return 0
    options = {"cluster": args.cluster} if args.cluster is not None else {}
    result = run_benchmark(args.name, out_dir=args.out, quick=args.quick, options=options)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "plan":
            from plait.runtime.plan_cli import cmd_plan

            return cmd_plan(args)
        if args.command == "daemon":
            from plait.runtime.snapshot.daemon.main import cmd_daemon

            return cmd_daemon(args)
        if args.command == "coordinator":
            from plait.runtime.control.cli import cmd_coordinator

            return cmd_coordinator(args)
        if args.command in ("status", "stop", "snapshot"):
            from plait.runtime.control.cli import cmd_control

            return cmd_control(args)
        if args.command == "cluster":
            from plait.runtime.rehearsal.cli import cmd_cluster

            return cmd_cluster(args)
        return cmd_bench(args)
    except PlaitError as err:
        print(f"plait: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("plait: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
