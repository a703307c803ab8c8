"""A process that removes a network when its owner dies, however it dies (SIGKILL included).

The owner keeps the only write end of a pipe; the watchdog blocks reading the other end. When the
owner exits, the kernel closes the write end and the read returns EOF: then the watchdog calls
``down()``. The watchdog is double-forked into its own session, so it is no child of the owner, and
neither a signal to the owner's process group nor the owner's death reaches it. On a clean exit the
owner calls ``down()`` itself and then :meth:`WatchdogHandle.close`; the watchdog's ``down()`` then
finds nothing left.

A child forked (not exec'd) by the owner after this inherits the write end and delays the watchdog
until it exits too; exec'd children do not (the pipe is close-on-exec).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from plait.runtime.rehearsal.net import Network


class WatchdogHandle:
    def __init__(self, pid: int, write_fd: int):
        self.pid = pid  # the watchdog's pid, not a child of this process
        self._write_fd: int | None = write_fd

    def close(self) -> None:
        """Let the watchdog go (call after ``down()``); safe to repeat."""
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None


def start_watchdog(network: Network, after: Callable[[], None] | None = None) -> WatchdogHandle:
    """``after`` runs in the watchdog once the network is down (e.g. removing what the killed processes left in
    shared memory)."""
    read_fd, write_fd = os.pipe()
    pid_read, pid_write = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.setsid()
            watchdog = os.fork()
            if watchdog == 0:
                _watch(network, read_fd, after)
            os.write(pid_write, str(watchdog).encode())
        finally:
            os._exit(0)
    os.close(read_fd)
    os.close(pid_write)
    os.waitpid(middle, 0)
    with os.fdopen(pid_read) as pid_pipe:
        pid = int(pid_pipe.read())
    return WatchdogHandle(pid, write_fd)


def _watch(network: Network, read_fd: int, after: Callable[[], None] | None) -> None:
    """Runs in the watchdog; never returns."""
    status = 1
    try:
        # Keep no descriptor of the owner's but the read end: a write end kept here (this network's, or
        # another watchdog's) would hold its pipe open forever, and a kept stdout would make whoever
        # reads the owner's output wait for this process too.
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, read_fd)
        os.closerange(read_fd + 1, os.sysconf("SC_OPEN_MAX"))
        while os.read(read_fd, 4096):
            pass
        network.down()
        if after is not None:
            after()
        status = 0
    finally:
        os._exit(status)
