"""Snapshot bytes over the daemon's framed-TCP bulk plane against gRPC streaming, side by side.

Three paths, each timed over both transports in the same run, alternating which goes
first, median of the repetitions (256 MiB, 3 of them; ``--quick``: 32 MiB, 1):

* **get** — a client fetches a committed 256 MiB data shard into a preallocated
  tensor (DaemonClient.get, forced to one transport).
* **client_push** — a client pushes a 256 MiB chunk to its parity holder
  (DaemonClient.push_chunk): the transfer, the daemon's checksum of the received bytes
  and its GF(2^8) accumulation into a fresh parity shard, as a repair tool would.
* **daemon_push** — a worker commits a 256 MiB blob on one daemon; timed from the
  commit's return to the peer daemon's parity shard being complete (k=1, m=1), which
  is the sender's chunk checksum, the transfer, and the receiver's work. The gRPC side
  is a second pair of daemons started with ``--bulk-port -1``, so their pushes fall back
  to gRPC PushChunk exactly as against a daemon without a bulk plane.

The daemons are real subprocesses on loopback (``spawn.start_daemon``). Reported per
path: seconds and GB/s per transport, and ``tcp_over_grpc`` (the GB/s ratio).
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from statistics import median
from typing import Any

NAME = "transport"
MiB = 1 << 20
TRANSPORTS = ("tcp", "grpc")
PATHS = ("get", "client_push", "daemon_push")


def _wait_parity(client: Any, version: int, timeout: float = 120.0) -> None:
    """Poll until the daemon's only parity shard of ``version`` is complete."""
    deadline = time.perf_counter() + timeout
    while [p.complete for info in client.list(version) for p in info.parity] != [True]:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"parity of version {version} not complete after {timeout:.0f} s: "
                               f"{client.list(version)}")
        time.sleep(0.005)  # a tighter poll steals measurable CPU from the daemons on 2 cores


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from plait.ops.checksum import checksum
    from plait.runtime.snapshot import shm
    from plait.runtime.snapshot.auth import JobSecret
    from plait.runtime.snapshot.transport.channel import tune_malloc
    from plait.runtime.snapshot.transport.client import DaemonClient
    from plait.runtime.snapshot.launcher.spawn import free_ports, start_daemon, stop_daemon, wait_daemon

    size, reps = (32 * MiB, 1) if quick else (256 * MiB, 3)
    tune_malloc()  # what the daemons do at start; the gRPC client side benefits from it alike
    job = f"bench-transport-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    jobs = {"tcp": f"{job}-tcp", "grpc": f"{job}-grpc"}
    seconds: dict[str, dict[str, list[float]]] = {path: {t: [] for t in TRANSPORTS} for path in PATHS}
    procs = []
    clients: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="plait-bench-transport-") as tmp:
        try:
            # The benchmark's own job secret (as plait train makes one per job), daemons and clients alike.
            secret_file = Path(tmp) / "secret"
            secret = JobSecret.create(secret_file)
            # All four ports at once: picked pair by pair, the second pick could return a port of the first
            # pair whose daemon has not bound it yet.
            all_ports = free_ports(2 * len(TRANSPORTS))
            addresses: dict[str, list[str]] = {}
            for i, transport in enumerate(TRANSPORTS):  # two pairs of daemons: with the bulk plane, and without
                ports = all_ports[2 * i: 2 * i + 2]
                addresses[transport] = [f"127.0.0.1:{p}" for p in ports]
                procs += [start_daemon(jobs[transport], node, nnodes=2, nproc_per_node=1, ec_k=1, ec_m=1,
                                       port=ports[node], bulk_port=0 if transport == "tcp" else -1,
                                       peers=addresses[transport], max_memory=f"{8 * size // MiB}MiB",
                                       run_dir=Path(tmp), secret_file=secret_file, wait=False)
                          for node in range(2)]
            for proc in procs:
                wait_daemon(proc)
            # The client paths use the bulk-plane pair for both transports: same daemons, same state.
            a = {t: DaemonClient(addresses["tcp"][0], transport=t, secret=secret) for t in TRANSPORTS}
            b = {t: DaemonClient(addresses["tcp"][1], transport=t, secret=secret) for t in TRANSPORTS}
            pair = {t: [DaemonClient(address, transport="grpc", secret=secret) for address in addresses[t]]
                    for t in TRANSPORTS}
            clients += [*a.values(), *b.values(), *pair["tcp"], *pair["grpc"]]
            blob = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            ck = checksum(blob)
            out = torch.zeros(size, dtype=torch.uint8)  # touched once: page faults are not the transfer's
            version = 0
            for rep in range(reps):
                order = TRANSPORTS if rep % 2 == 0 else TRANSPORTS[::-1]
                for transport in order:
                    version += 1
                    writer, holder = pair[transport]
                    writer.alloc(version, 0, size).copy_(blob)
                    writer.commit(version, 0, size=size, checksum=ck, step=version)
                    start = time.perf_counter()
                    _wait_parity(holder, version)
                    seconds["daemon_push"][transport].append(time.perf_counter() - start)
                    holder.drop(version), writer.drop(version)
                for transport in order:
                    version += 1
                    pair["tcp"][0].alloc(version, 0, size).copy_(blob)
                    pair["tcp"][0].commit(version, 0, size=size, checksum=ck, step=version)
                    _wait_parity(pair["tcp"][1], version)  # the commit's background push must not overlap the Get
                    start = time.perf_counter()
                    a[transport].get(version, kind="data", local_rank=0, out=out)
                    seconds["get"][transport].append(time.perf_counter() - start)
                    if not torch.equal(out, blob):
                        raise AssertionError(f"get over {transport} returned other bytes")
                    for client in pair["tcp"]:
                        client.drop(version)
                for transport in order:
                    version += 1
                    start = time.perf_counter()
                    accepted = b[transport].push_chunk(version, 0, stripe=0, index=0, member=0, node=0,
                                                       blob_size=size, blob_checksum=ck, step=version, chunk=blob,
                                                       chunk_checksum=ck)
                    seconds["client_push"][transport].append(time.perf_counter() - start)
                    if not accepted:
                        raise AssertionError(f"push_chunk over {transport} was not accepted")
                    b["grpc"].drop(version)
            used = {t: dict(a[t].transfers + b[t].transfers) for t in TRANSPORTS}
            if any(key.endswith("/grpc") for key in used["tcp"]) or any(key.endswith("/tcp") for key in used["grpc"]):
                raise AssertionError(f"a forced transport was not used: {used}")
        finally:
            for client in clients:
                client.close()
            for proc in procs:
                stop_daemon(proc)
            for name in jobs.values():
                for node in range(2):
                    shm.remove_namespace(name, node)
    result: dict[str, Any] = {"bytes": size, "repetitions": reps, "paths": {}}
    for path in PATHS:
        row: dict[str, Any] = {}
        for transport in TRANSPORTS:
            t = median(seconds[path][transport])
            row[f"{transport}_s"] = t
            row[f"{transport}_gbps"] = size / t / 1e9
            row[f"{transport}_all_s"] = seconds[path][transport]
        row["tcp_over_grpc"] = row["tcp_gbps"] / row["grpc_gbps"]
        result["paths"][path] = row
        print(f"transport: {path:12s} tcp {row['tcp_gbps']:5.2f} GB/s   grpc {row['grpc_gbps']:5.2f} GB/s   "
              f"tcp/grpc {row['tcp_over_grpc']:4.2f}", flush=True)
    return result
