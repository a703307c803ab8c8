"""nvcc over csrc/**/*.cu, for tests/test_cuda_compile.py: the command, and a compile that runs in the background.

Compiling the six .cu files against torch's headers costs about 90 s of CPU on a 2-core
machine, most of the suite's longest test. Nothing else in the suite needs the objects, so
``conftest.py`` starts the compile as soon as the tests are collected, at the lowest CPU
priority (nice 19: it gets only the cycles the other tests leave idle, which waiting on
peers, timeouts and shaped links leave plenty of), and runs the compile test last, where it
collects the results. Nothing is cached: every session compiles afresh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pytest

# conftest.py's BackgroundCompile, on the session's config, when the nvcc test was collected
NVCC_COMPILE = pytest.StashKey["BackgroundCompile"]()
ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
NICE = 19
# While the test waits: the most one file may still take once the test is collecting it. (In the background a
# file's wall time says nothing: it runs only when the other tests leave a core idle.)
NVCC_TIMEOUT_S = 400


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidate = Path(os.environ[var]) / "bin" / "nvcc"
            if candidate.is_file():
                return str(candidate)
    candidate = Path("/usr/local/cuda/bin/nvcc")
    return str(candidate) if candidate.is_file() else None


def nvcc_command(nvcc: str, source: Path, obj: Path) -> list[str]:
    import torch
    import torch.utils.cpp_extension as cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        nvcc,
        # SASS for sm_90a only, as the build's CMAKE_CUDA_ARCHITECTURES=90a does (-arch=sm_90a would also
        # run the front end a second time for compute_90 PTX)
        "-gencode=arch=compute_90a,code=sm_90a",
        # The CPU wheel ships c10/cuda headers but not the CMake-generated config one.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "--expt-relaxed-constexpr",
        f"-I{CSRC}",
    ]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += ["-c", str(source), "-o", str(obj)]
    return cmd


@dataclass
class Compiled:
    source: Path
    returncode: int | None  # None: it did not finish (timed out, or the session ended first)
    stderr: str
    cmd: list[str]


class BackgroundCompile:
    """Every .cu file compiled by nvcc at nice ``NICE``, two at a time, started on construction."""

    def __init__(self, nvcc: str, out_dir: Path, sources: list[Path] = CU_FILES, workers: int = 2):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._stopped = False
        self.sources = list(sources)
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources))), thread_name_prefix="nvcc")
        self.futures: list[Future[Compiled]] = [
            self._pool.submit(self._one, source, nvcc_command(nvcc, source, out_dir / f"{i}_{source.stem}.o"))
            for i, source in enumerate(sources)
        ]

    def _one(self, source: Path, cmd: list[str]) -> Compiled:
        with self._lock:
            if self._stopped:
                return Compiled(source, None, "not started: the session ended first", cmd)
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=lambda: os.nice(NICE))
            self._procs.add(proc)
        _, stderr = proc.communicate()
        with self._lock:
            self._procs.discard(proc)
        return Compiled(source, proc.returncode, stderr, cmd)

    def results(self, timeout_s: float = NVCC_TIMEOUT_S) -> list[Compiled]:
        """Wait for every file (``timeout_s`` from now at most: then what is left is killed and reported)."""
        start = time.monotonic()
        done, pending = wait(self.futures, timeout=timeout_s)
        if pending:
            self.stop()
        out = []
        for future, source in zip(self.futures, self.sources):
            if future in done:
                out.append(future.result())
            else:
                out.append(Compiled(source, None, f"timed out: not done {time.monotonic() - start:.0f} s after the "
                                                  "test began waiting", []))
        return out

    def stop(self) -> None:
        """Kill whatever still runs and start nothing more (the session is ending)."""
        with self._lock:
            self._stopped = True
            procs = list(self._procs)
        for proc in procs:
            proc.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)  # the killed ones return at once
        shutil.rmtree(self.out_dir, ignore_errors=True)
