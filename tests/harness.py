"""Run a test body on N real gloo ranks, each its own process, with a timeout.

    from harness import run_distributed

    def body(rank: int, world: int, scale: float) -> float:   # module level, in a test file
        t = torch.tensor([rank * scale]); dist.all_reduce(t); return float(t)

    def test_sum():
        assert run_distributed(body, world=4, args=(2.0,)) == [12.0] * 4

Each rank is a fresh interpreter (``python harness.py ...``) that joins a process group
through a TCPStore the parent holds, imports the body's file by path, calls
``body(rank, world, *args)`` and sends back its pickled return value. A rank that raises
fails the test with that rank's traceback; a run past ``timeout`` is killed (SIGKILL, all
ranks) and fails with what each rank printed.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


class DistributedTestError(AssertionError):
    pass


def run_distributed(
    body: Callable[..., Any],
    world: int,
    *,
    args: tuple = (),
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    threads: int = 1,
) -> list[Any]:
    """Run ``body(rank, world, *args)`` on ``world`` gloo ranks; return each rank's result."""
    import torch.distributed as dist

    source = Path(sys.modules[body.__module__].__file__).resolve()
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory(prefix="plait-dist-") as tmp:
        work = Path(tmp)
        (work / "args.pkl").write_bytes(pickle.dumps(args))
        child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
        procs = []
        for rank in range(world):
            out = open(work / f"rank{rank}.log", "wb")
            cmd = [sys.executable, str(HERE), str(source), body.__qualname__, str(rank), str(world), str(store.port), str(work), str(timeout)]
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env, start_new_session=True), out))
        deadline = time.monotonic() + timeout
        failed: list[int] = []
        try:
            while True:
                codes = [p.poll() for p, _ in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed or all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    raise DistributedTestError(f"timed out after {timeout:.0f} s\n" + _logs(work, world))
                time.sleep(0.05)
            if failed:
                # Give the others a moment to report their own error, then stop them.
                time.sleep(0.5)
                raise DistributedTestError(f"rank(s) {failed} failed\n" + _logs(work, world))
            return [pickle.loads((work / f"result{rank}.pkl").read_bytes()) for rank in range(world)]
        finally:
            for proc, out in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                out.close()
            del store


def _logs(work: Path, world: int) -> str:
    parts = []
    for rank in range(world):
        text = (work / f"rank{rank}.log").read_text(errors="replace")
        parts.append(f"--- rank {rank} ---\n{text[-4000:]}")
    return "\n".join(parts)


def _child(source: str, qualname: str, rank: int, world: int, port: int, work: Path, timeout: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=timedelta(seconds=timeout))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    spec = importlib.util.spec_from_file_location(f"_plait_dist_{Path(source).stem}", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    body = module
    for part in qualname.split("."):
        body = getattr(body, part)
    args = pickle.loads((work / "args.pkl").read_bytes())
    try:
        result = body(rank, world, *args)
        (work / f"result{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from plait.parallel.teardown import run_and_exit

    src, name, r, w, p, wd, to = sys.argv[1:8]
    run_and_exit(_child, src, name, int(r), int(w), int(p), Path(wd), float(to))
