"""The few operations on network namespaces that building, tearing down and reaping a network share.

Every command goes through :func:`ip` or :func:`tc`, so a failure always names the command and what it
printed; everything else here only reads ``/proc``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from datetime import timedelta

from plait.errors import PlaitError

PREFIX = "plait-"
# Long enough for a process to leave the kernel after SIGKILL even on a loaded machine; a process that
# stays longer is stuck in the kernel (D state) and waiting more would not help.
KILL_WAIT = timedelta(seconds=10)


class NetworkError(PlaitError):
    """A command that builds, changes or removes an emulated network failed; the message names it and its stderr."""

    exit_code = 1


class NeedsRoot(PlaitError):
    """Network namespaces and traffic shaping need root."""

    exit_code = 2


def require_root() -> None:
    if os.geteuid() != 0:
        raise NeedsRoot("rehearsing a cluster needs root (network namespaces and tc): run as root, or with "
                        "sudo, or in a container with CAP_SYS_ADMIN and CAP_NET_ADMIN")


def run(argv: list[str]) -> str:
    """Run one iproute2 command; return its stdout or raise :class:`NetworkError` naming it and its stderr."""
    if shutil.which(argv[0]) is None:
        raise NetworkError(f"'{argv[0]}' not found: install iproute2 to rehearse a cluster")
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetworkError(f"'{' '.join(argv)}' failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def ip(namespace: str | None, *args: str) -> str:
    return run(["ip", *(["-n", namespace] if namespace else []), *args])


def tc(namespace: str, *args: str) -> str:
    return run(["tc", "-n", namespace, *args])


def existing() -> set[str]:
    """The names of all network namespaces on this machine (``ip netns`` lists them from /run/netns)."""
    return {line.split()[0] for line in ip(None, "netns", "list").splitlines() if line.strip()}


def pids(namespace: str) -> list[int]:
    """The processes inside ``namespace``; none if the namespace does not exist."""
    if namespace not in existing():
        return []
    return sorted(int(word) for word in ip(None, "netns", "pids", namespace).split())


def _gone(pid: int) -> bool:
    """A zombie counts as gone: it holds no namespace, and only its parent (maybe not us) can reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def kill_all(namespace: str) -> list[int]:
    """SIGKILL every process in ``namespace`` until none is left (a dying process may still fork); return them."""
    killed: set[int] = set()
    deadline = time.monotonic() + KILL_WAIT.total_seconds()
    while (alive := [pid for pid in pids(namespace) if not _gone(pid)]):
        if time.monotonic() > deadline:
            raise NetworkError(f"processes {alive} in namespace {namespace} survived SIGKILL for "
                               f"{KILL_WAIT.total_seconds():.0f} s")
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            killed.add(pid)
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if not _gone(pid)]
            time.sleep(0.01)
    return sorted(killed)


def remove(namespaces: list[str]) -> None:
    """Kill what runs in each namespace and delete it; missing ones are fine. Tries every namespace, then
    raises the first failure, so one stuck namespace does not leave the others behind."""
    present = existing()
    failures = []
    for namespace in namespaces:
        if namespace not in present:
            continue
        try:
            kill_all(namespace)
            ip(None, "netns", "delete", namespace)
        except NetworkError as err:
            # The owner, its watchdog and reap_stale may remove the same network at once: gone is done.
            if namespace in existing():
                failures.append(err)
    if failures:
        raise failures[0]


def created_at(namespace: str) -> float | None:
    """When ``namespace`` was made (its bind mount's change time), or None if it does not exist."""
    try:
        return os.stat(f"/run/netns/{namespace}").st_ctime
    except FileNotFoundError:
        return None
