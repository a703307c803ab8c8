"""Packaging rules: one distribution, mounted subpackages, no bare top-level imports, a frozen CLI."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import plait

REPO = Path(__file__).resolve().parent.parent
MOUNTED = ("runtime", "parallel", "scheduler", "bench")


def test_mounted_folders_import_as_plait_subpackages():
    for name in MOUNTED:
        module = importlib.import_module(f"plait.{name}")
        assert Path(module.__file__).resolve().parent == REPO / name


def test_no_bare_top_level_module_gets_imported():
    """Import every plait module in a fresh interpreter; none may appear as bare runtime/parallel/scheduler."""
    code = (
        "import importlib, pkgutil, sys, plait\n"
        "for sub in " + repr(MOUNTED) + ":\n"
        "    pkg = importlib.import_module('plait.' + sub)\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, 'plait.' + sub + '.'):\n"
        "        if info.name.endswith('ddp_baseline'): continue\n"
        "        importlib.import_module(info.name)\n"
        "bare = sorted(m for m in sys.modules if m.split('.')[0] in ('runtime', 'parallel', 'scheduler', 'bench'))\n"
        "print(bare)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_sources_import_plait_not_bare_names():
    pattern = re.compile(r"^\s*(from|import)\s+(runtime|parallel|scheduler|bench)(\.|\s|$)", re.M)
    offenders = []
    for folder in (*MOUNTED, "plait", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_scheduler_does_not_use_torch_distributed():
    """The planner must plan a 10,000-GPU job on a laptop: no process groups, no collectives."""
    for path in (REPO / "scheduler").rglob("*.py"):
        assert "torch.distributed" not in path.read_text(), path


def test_the_daemon_and_trainer_sides_of_snapshots_never_import_each_other():
    """They share records, errors, config, layout, shm, auth and transport; each side stays whole without the other."""
    snap = REPO / "runtime" / "snapshot"
    for side, other in (("daemon", "trainer"), ("trainer", "daemon"), ("transport", "daemon"), ("transport", "trainer"),
                        ("daemon", "checkpoint"), ("checkpoint", "daemon")):
        for path in (snap / side).rglob("*.py"):
            assert f"plait.runtime.snapshot.{other}" not in path.read_text(), (path, other)
    for path in snap.rglob("*.py"):
        if not path.name.endswith("_pb2.py") and not path.name.endswith("_pb2_grpc.py"):
            assert len(path.read_text().splitlines()) <= 600, path


def test_extension_is_loaded_as_plait_C():
    assert plait._C.__name__ == "plait._C"
    import torch

    assert hasattr(torch.ops.plait, "gf256_mul_add_")


def _surface(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags.add(f"{prefix}{name}")
                flags |= _surface(sub, f"{prefix}{name} ")
        elif action.option_strings:
            flags |= {f"{prefix}{o}" for o in action.option_strings}
        else:
            flags.add(f"{prefix}<{action.dest}>")
    return flags


def test_cli_surface_is_frozen():
    """A new flag is a decision: add it here and to the README together."""
    from plait.runtime.cli import build_parser

    assert _surface(build_parser()) == {
        "-h", "--help", "--version",
        "train", "train -h", "train --help", "train --config", "train --nproc", "train --run-dir",
        "train --set", "train --dry-run", "train --ab", "train --nnodes", "train --nproc-per-node", "train --fault", "train --resume",
        "train --node-rank", "train --rdzv", "train --node-addr", "train --cluster",
        "export", "export -h", "export --help", "export <run_dir>", "export --step", "export --out",
        "daemon", "daemon -h", "daemon --help", "daemon --job", "daemon --node", "daemon --nnodes", "daemon --nproc-per-node",
        "daemon --ec-k", "daemon --ec-m", "daemon --port", "daemon --bulk-port", "daemon --host", "daemon --peers",
        "daemon --max-memory", "daemon --secret-file", "daemon --parent-pid",
        "daemon --ready-file", "daemon --log-file", "daemon --cleanup",
        "cluster", "cluster -h", "cluster --help",
        "cluster up", "cluster up -h", "cluster up --help", "cluster up <file>",
        "cluster down", "cluster down -h", "cluster down --help", "cluster down <file>", "cluster down --all",
        "cluster status", "cluster status -h", "cluster status --help", "cluster status <file>",
        "bench", "bench -h", "bench --help", "bench <name>", "bench --json", "bench --out", "bench --quick",
        "bench --cluster",
        "plan", "plan -h", "plan --help", "plan --config", "plan --cluster", "plan --nproc", "plan --set", "plan --top",
        "plan --placement", "plan --efficiency", "plan --json", "plan --emit",
        "status", "status -h", "status --help", "status <target>", "status --json", "status --watch",
        "status --secret-file",
        "stop", "stop -h", "stop --help", "stop <target>", "stop --snapshot", "stop --no-wait", "stop --timeout",
        "stop --secret-file",
        "snapshot", "snapshot -h", "snapshot --help", "snapshot <target>", "snapshot --no-wait", "snapshot --timeout",
        "snapshot --secret-file",
        "coordinator", "coordinator -h", "coordinator --help", "coordinator --run-dir", "coordinator --world",
        "coordinator --host", "coordinator --port", "coordinator --metrics-port", "coordinator --snapshots",
        "coordinator --secret-file",
    }


def test_every_cli_flag_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for flag in ("--config", "--nproc", "--run-dir", "--set", "--dry-run", "--json", "--out", "--quick", "--nnodes",
                 "--nproc-per-node", "--fault", "--job", "--node", "--ec-k", "--ec-m", "--port", "--bulk-port", "--host",
                 "--peers",
                 "--max-memory", "--ready-file", "--log-file", "--cleanup", "--secret-file", "--parent-pid", "plait daemon",
                 "--resume", "plait export", "--step", "--node-rank", "--rdzv", "--node-addr",
                 "plait cluster up", "plait cluster down", "plait cluster status", "--all", "--cluster",
                 "plait plan", "--top", "--placement", "--efficiency", "--emit", "parallel.auto", "--ab",
                 "plait status", "plait stop", "plait snapshot", "--watch", "--no-wait", "--timeout", "slow-rank",
                 "plait coordinator", "--world", "--metrics-port", "--snapshots"):
        assert flag in readme, flag


def test_walk_finds_the_modules():
    names = {i.name for i in pkgutil.walk_packages(importlib.import_module("plait.runtime").__path__, "plait.runtime.")}
    assert {"plait.runtime.cli", "plait.runtime.trainer", "plait.runtime.worker"} <= names
