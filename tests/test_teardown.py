"""`run_and_exit`: a worker's exit status and output survive leaving through os._exit, and the default
process group is destroyed first (a real gloo group, in a real child process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROLOGUE = """
import sys
from plait.parallel.teardown import run_and_exit
"""


def _run(body: str) -> subprocess.CompletedProcess:
    code = PROLOGUE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_body_that_returns_exits_0_with_its_unflushed_output():
    proc = _run("""
        def body(word):
            print(word, end="")  # no newline, no flush: a block-buffered pipe holds it until the exit flush
            sys.stderr.write("to stderr")
        run_and_exit(body, "written")
        print("never reached")
    """)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "written", "to stderr")


@pytest.mark.parametrize(("raise_", "code", "stderr"), [
    ("raise SystemExit(3)", 3, ""),
    ("raise SystemExit(None)", 0, ""),
    ("sys.exit('bad config: parallel.tp')", 1, "bad config: parallel.tp\n"),
])
def test_system_exit_keeps_its_status(raise_, code, stderr):
    proc = _run(f"""
        def body():
            {raise_}
        run_and_exit(body)
    """)
    assert (proc.returncode, proc.stderr) == (code, stderr)


def test_an_exception_exits_1_with_its_traceback():
    proc = _run("""
        def body():
            raise ValueError("the cause")
        run_and_exit(body)
    """)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: the cause" in proc.stderr


def test_the_default_process_group_is_destroyed_before_the_exit(tmp_path):
    proc = _run(f"""
        import atexit
        import torch
        import torch.distributed as dist

        def body():
            store = dist.FileStore({str(tmp_path / "store")!r}, 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
            t = torch.ones(3)
            dist.all_reduce(t)
            print(int(t.sum()), flush=True)
            atexit.register(lambda: print("atexit ran"))  # os._exit skips interpreter finalization

        import plait.parallel.teardown as teardown
        real = teardown.os._exit

        def checked_exit(code):
            print("initialized at exit:", dist.is_initialized(), flush=True)
            real(code)

        teardown.os._exit = checked_exit
        run_and_exit(body)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["3", "initialized at exit: False"]
