"""``plait bench NAME``: run a benchmark module of ``plait.bench`` and keep its result.

A benchmark is a module in ``bench/`` with a docstring (its first line is the
description), ``NAME`` and ``run(quick: bool) -> dict``; a benchmark that takes a cluster
file also has a ``cluster`` keyword (``--cluster FILE``). The runner adds the machine
and versions and writes ``bench/results/NAME.json``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from plait.errors import CLIError, did_you_mean

BENCH_DIR = Path(__file__).resolve().parent
_NOT_BENCHMARKS = {"__init__", "runner", "rounds", "ddp_baseline", "hdp_worker", "tp_overlap_worker"}
# The CPU flags that decide which kernels run (see csrc/cpu/features.h), kept with results.
SIMD_FLAGS = ("sse4_2", "pclmulqdq", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "gfni", "vpclmulqdq", "vaes")


def list_benchmarks() -> dict[str, str]:
    found = {}
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.stem in _NOT_BENCHMARKS:
            continue
        module = importlib.import_module(f"plait.bench.{path.stem}")
        if hasattr(module, "run"):
            found[module.NAME] = (module.__doc__ or "").strip().splitlines()[0]
    return found


def machine_info() -> dict[str, Any]:
    import torch

    import plait

    model: str | None = None
    flags: list[str] | None = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and flags is None:
                flags = [f for f in line.split(":", 1)[1].split() if f in SIMD_FLAGS]
    except OSError:
        pass
    cpu = model or platform.processor()
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    # PLAIT_COMMIT names the commit of a tree copied without (or with a stale) .git, as on a machine it was shipped to.
    commit = os.environ.get("PLAIT_COMMIT") or None
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpu_flags": flags or [],
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "plait": plait.__version__,
        "commit": commit,
    }


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_benchmark(name: str, *, out_dir: Path | None = None, quick: bool = False,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run benchmark ``name`` and write its record; ``options`` (e.g. ``{"cluster": path}``) go to its ``run``
    as keywords, and one its ``run`` does not take is refused."""
    # A benchmark named exactly is imported alone (the others may need packages this machine lacks).
    if name in _NOT_BENCHMARKS or not (BENCH_DIR / f"{name}.py").is_file():
        available = list_benchmarks()
        hint = did_you_mean(name, available)
        raise CLIError(f"bench: no benchmark '{name}'; accepted: {', '.join(available)}" + (f" ({hint})" if hint else ""))
    module = importlib.import_module(f"plait.bench.{name}")
    options = options or {}
    unknown = sorted(set(options) - set(inspect.signature(module.run).parameters))
    if unknown:
        raise CLIError(f"bench {name}: it takes no --{unknown[0]}; accepted: --quick, --json, --out")
    started = time.time()
    load_before = _load()
    result = module.run(quick=quick, **options)
    record = {
        "benchmark": name,
        "quick": quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": machine_info(),
        # Other work on the machine while it ran: the 1-minute load average before and after. Ratios are
        # taken from interleaved runs, which shared the load alike; absolute times are only as good as this.
        "load_1min": {"before": load_before, "after": _load(), "cores": os.cpu_count()},
        "result": result,
    }
    out_dir = out_dir or BENCH_DIR / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"plait bench: wrote {path}")
    return record
