"""A version another rank never wrote is withdrawn on rank 0 at once, through the job's store (real TCPStore, real daemon)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from plait.ops.checksum import checksum
from plait.runtime.snapshot import shm
from plait.runtime.snapshot.launcher.spawn import start_daemon, stop_daemon
from plait.runtime.snapshot.trainer.lifecycle import VersionLifecycle
from plait.runtime.snapshot.trainer.withdrawals import MAX_REASON, Withdrawals
from plait.runtime.snapshot.transport.client import DaemonClient


def _store(master: dist.TCPStore | None = None) -> dist.TCPStore:
    if master is None:
        return dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    return dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=timedelta(seconds=5))


def test_a_rank_tells_and_rank_0_is_told_in_plain_bounded_text():
    master = _store()
    other = Withdrawals(dist.PrefixStore("plait/attempt0", _store(master)))  # another rank's client
    rank0 = Withdrawals(dist.PrefixStore("plait/attempt0", master))
    assert rank0.told([7, 8]) == {}
    assert other.tell(7, 3, "the daemon did not allocate\x1b[2J\n" + "x" * 1000)
    told = rank0.told([7, 8])
    assert list(told) == [7]
    assert told[7].startswith("rank 3 skipped it: the daemon did not allocate?[2J?xx") and len(told[7]) == MAX_REASON
    # another attempt's prefix does not see it (a restarted job's versions are its own)
    assert Withdrawals(dist.PrefixStore("plait/attempt1", master)).told([7]) == {}
    assert Withdrawals(None).told([7]) == {} and Withdrawals(None).tell(7, 3, "x") is False


HOST = """
import sys
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
print(store.port, flush=True)
sys.stdin.read()
"""


def test_a_store_that_is_gone_is_logged_never_raised():
    """The store's host is killed (the worker hosting it died): telling fails with a log line, training goes on."""
    host = subprocess.Popen([sys.executable, "-c", HOST], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(host.stdout.readline())
        client = Withdrawals(dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5)))
        assert client.tell(9, 1, "x") and list(client.told([9])) == [9]
        host.kill()
        host.wait()
        start = time.monotonic()
        assert client.tell(10, 1, "x") in (True, False)  # a set may leave before the loss shows: it returns, never raises
        assert client.told([9, 10]) == {}  # the check that needs an answer finds the store gone
        assert time.monotonic() - start < 12  # bounded by the store's own timeout, not stuck
    finally:
        host.kill()


@pytest.fixture
def daemon(tmp_path):
    """One node's daemon for two local ranks (m = 0), and its client."""
    job = f"t{os.getpid()}-wd-{uuid.uuid4().hex[:6]}"
    proc = start_daemon(job, 0, nnodes=1, nproc_per_node=2, max_memory="16MiB", run_dir=tmp_path)
    try:
        with DaemonClient(f"127.0.0.1:{proc.port}", timeout=5) as client:
            yield client
    finally:
        stop_daemon(proc)
        shm.remove_namespace(job, 0)


def _write(client: DaemonClient, version: int, local_rank: int) -> None:
    blob = torch.arange(100, dtype=torch.uint8)
    client.alloc(version, local_rank, blob.numel()).copy_(blob)
    client.commit(version, local_rank, size=blob.numel(), checksum=checksum(blob), step=version)


def test_rank_0_abandons_a_version_another_rank_withdrew_instead_of_waiting_its_deadline(daemon):
    master = _store()
    lifecycle = VersionLifecycle([daemon], complete_timeout=60, withdrawals=Withdrawals(master))
    try:
        # version 1: both local ranks write it and it publishes
        lifecycle.submit(1)
        _write(daemon, 1, 0)
        _write(daemon, 1, 1)
        assert lifecycle.drain(timeout=10) and lifecycle.stats.published == 1
        # version 2: rank 0 writes its part, rank 1 never will; with no word it waits for its 60 s deadline
        lifecycle.submit(2)
        _write(daemon, 2, 0)
        assert not lifecycle.drain(timeout=1.0)
        # rank 1 says so through the store: rank 0's thread finds it at its next poll
        assert Withdrawals(_store(master)).tell(2, 1, "the previous snapshot is still waiting on the daemon")
        start = time.monotonic()
        assert lifecycle.drain(timeout=10)
        assert time.monotonic() - start < 5
        assert lifecycle.stats.abandoned == 1 and lifecycle.stats.last_published == 1
    finally:
        lifecycle.close()
