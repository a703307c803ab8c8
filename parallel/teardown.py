"""Ending a process that ran gloo collectives, without the abort at interpreter exit.

torch's gloo backend (2.11 to 2.13 at least) runs collectives on worker threads of the process group. A
worker thread drops its reference to a finished collective's tensors shortly *after* the caller's
``wait()`` returns. When that is the last reference to a tensor that had a Python object, the thread
takes the GIL to release it. If the main thread has meanwhile returned from ``main`` and the interpreter
is finalizing, taking the GIL ends the calling thread (``pthread_exit``), whose forced unwind crosses
``noexcept`` C++ frames: the process dies with SIGABRT, "terminate called without an active exception",
after all of its work is done (pytorch/pytorch#190489). ``dist.destroy_process_group()`` does not
prevent it: the C++ process group, and so its threads, live on while any Python object (a
:class:`~plait.parallel.comm.Group`, a model holding one) still refers to it.

Measured here: the two-rank ``tp_overlap`` bench worker, whose last call is a small all-reduce, aborted
that way in 1 run of 3 to 14. :func:`run_and_exit` closes the window: it runs the worker's body, destroys
the default process group, flushes what the process wrote, and leaves with ``os._exit`` so that no
interpreter finalization overlaps the gloo threads. The exit status is the body's: 0, the code of a
``SystemExit``, or 1 (with the traceback on stderr) for any other exception.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

__all__ = ["run_and_exit"]


def run_and_exit(body: Callable[..., object], *args: object) -> NoReturn:
    """``body(*args)``, then end the process at once with its exit status (see the module docstring)."""
    code = 0
    try:
        body(*args)
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:  # sys.exit("message"): Python prints it and exits 1
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  (any failure becomes exit 1 with its traceback, as Python's own)
        traceback.print_exc()
        code = 1
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (a failing teardown must not hide the body's status)
        traceback.print_exc()
        code = code or 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)
