"""Snapshots: training stall with snapshot.every=1 vs none, and save/restore time vs torch.distributed.checkpoint.

Two parts, each side by side in one run:

* **stall** — the demo model under ``plait train`` on 4 emulated nodes × 1 worker
  (erasure-coding group k=3, m=1), with ``snapshot.every=1`` and without snapshots.
  Reported: the median step time of each, and the median per-step stall of rank 0's
  training thread (the optimizer update's wait for the copy plus the snapshot hook's
  planning; allocation, commit and publishing run off the training thread). Goal:
  stall ≤ 5% of the step time, reported beside the step-time ratio.
* **save/restore** — one rank's state of S bytes (fp32 tensors shaped like a
  transformer's parameters and AdamW moments) saved and restored through real daemons
  **with parity**: two nodes, k = 1, m = 1, so the save is timed until the version is
  complete on both daemons (serialise, copy into shared memory, MAC, CRC-32C, commit,
  the chunk pushed to the other node and accumulated into its parity shard); restore:
  map, verify CRC-32C and MAC, copy into the live tensors. Against
  ``torch.distributed.checkpoint`` save / load of the same tensors to a local-disk
  directory (load into preallocated tensors), with its default ``sync_files=True``
  (fsync: durable) and with ``sync_files=False`` (page cache only), interleaved in the
  same repetitions. Goal: ≥ 10× faster both ways than DCP's default.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

NAME = "snapshot"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
# Where a save's time goes: plan + segment allocation (the daemon creates and pre-faults the shared memory),
# header + tensor copy + MAC, CRC-32C + the Commit RPC, and the parity push until both daemons hold the
# version complete (the sender's chunk CRC, the transfer, the receiver's CRC and GF(2^8) accumulation).
PHASES = ("alloc", "copy_and_mac", "checksum_and_commit", "parity")
POLL_S = 0.002  # how often the save's end is polled: a tighter poll takes measurable CPU from the daemons


def _train(work: Path, name: str, steps: int, sets: list[str]) -> dict[str, Any]:
    run_dir = work / name
    cmd = [sys.executable, "-m", "plait.runtime.cli", "train", "--config", str(REPO_CONFIG), "--run-dir", str(run_dir),
           "--nnodes", "4", "--nproc-per-node", "1",
           "--set", f"train.steps={steps}", "metrics.enabled=false", "train.eval_every=0", "snapshot.ec_k=3", "snapshot.ec_m=1", *sets]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    return json.loads((run_dir / "summary.json").read_text())


def stall(quick: bool) -> dict[str, Any]:
    steps = 8 if quick else 40
    rounds = 1 if quick else 2
    out: dict[str, Any] = {"steps": steps, "rounds": rounds, "nodes": 4, "ec": [3, 1], "runs": []}
    with tempfile.TemporaryDirectory(prefix="plait-bench-snap-") as tmp:
        work = Path(tmp)
        base_times, snap_times, stalls = [], [], []
        for r in range(rounds):
            base = _train(work, f"base{r}", steps, [])
            snap = _train(work, f"snap{r}", steps, ["snapshot.every=1"])
            assert base["losses"] == snap["losses"], "snapshots changed the losses"
            base_times += base["step_times"][2:]
            snap_times += snap["step_times"][2:]
            stalls += snap["snapshot"]["stall_s"][2:]
            out["runs"].append({"base_step_s": median(base["step_times"][2:]), "snap_step_s": median(snap["step_times"][2:]),
                                "stall_s": median(snap["snapshot"]["stall_s"][2:]), "taken": snap["snapshot"]["taken"],
                                "published": snap["snapshot"]["published"], "skipped": snap["snapshot"]["skipped"],
                                "bytes_per_rank": snap["snapshot"]["bytes_per_rank"]})
    step = median(base_times)
    out.update(
        base_step_s=step, snapshot_step_s=median(snap_times), stall_s=median(stalls),
        stall_fraction=median(stalls) / step, step_time_ratio=median(snap_times) / step,
        goal="stall <= 5% of the step time", goal_met=median(stalls) / step <= 0.05,
    )
    return out


def _state(total_bytes: int) -> dict[str, torch.Tensor]:
    """fp32 tensors like a transformer rank's: parameters, exp_avg, exp_avg_sq (1/3 each)."""
    per = total_bytes // 3 // 4
    dim = 1024
    rows = max(1, per // dim)
    g = torch.Generator().manual_seed(0)
    state = {}
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        left = rows
        i = 0
        while left:
            r = min(left, 4096)
            state[f"{kind}.{i}"] = torch.randn(r, dim, generator=g)
            left -= r
            i += 1
    return state


def save_restore(quick: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from plait.ops.checksum import checksum
    from plait.runtime.snapshot.auth import JobSecret
    from plait.runtime.snapshot.launcher.spawn import free_ports, start_daemon, stop_daemon, wait_daemon
    from plait.runtime.snapshot.records import version_id
    from plait.runtime.snapshot.trainer.blob import plan, read_blob
    from plait.runtime.snapshot.transport.client import DaemonClient

    sizes = [16 << 20] if quick else [64 << 20, 512 << 20]
    reps = 1 if quick else 3
    results = []
    with tempfile.TemporaryDirectory(prefix="plait-bench-snapsr-", dir=str(Path.cwd())) as tmp:
        work = Path(tmp)
        secret_file = work / "secret"
        secret = JobSecret.create(secret_file)
        ports = free_ports(2)
        peers = [f"127.0.0.1:{p}" for p in ports]
        procs = [start_daemon("benchsnap", n, nnodes=2, nproc_per_node=1, ec_k=1, ec_m=1, port=ports[n], peers=peers,
                              run_dir=work, cleanup=True, secret_file=secret_file, wait=False) for n in range(2)]
        for proc in procs:
            wait_daemon(proc)
        clients = [DaemonClient(peer, secret=secret) for peer in peers]
        try:
            for size in sizes:
                state = _state(size)
                nbytes = sum(t.numel() * 4 for t in state.values())
                live = {k: torch.empty_like(v) for k, v in state.items()}
                other = torch.zeros(64, dtype=torch.uint8)  # node 1's own (tiny) blob, so the version can complete
                times: dict[str, list[float]] = {k: [] for k in ("snap_save", "snap_restore", "dcp_save_fsync",
                                                               "dcp_load_fsync", "dcp_save_nosync", "dcp_load_nosync")}
                phases: dict[str, list[float]] = {k: [] for k in PHASES}
                for rep in range(reps):
                    version = version_id(1, len(results) * 100 + rep + 1)
                    clients[1].alloc(version, 0, other.numel()).copy_(other)
                    clients[1].commit(version, 0, size=other.numel(), checksum=checksum(other), step=rep)
                    t0 = time.perf_counter()
                    p = plan(state, {"step": version})
                    dst = clients[0].alloc(version, 0, p.size)
                    t1 = time.perf_counter()
                    p.write(dst, secret)
                    t2 = time.perf_counter()
                    clients[0].commit(version, 0, size=p.size, checksum=checksum(dst), step=rep)
                    t3 = time.perf_counter()
                    _wait_complete(clients, version)
                    t4 = time.perf_counter()
                    times["snap_save"].append(t4 - t0)
                    for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                        phases[phase].append(seconds)
                    info = next(v for v in clients[0].list() if v.version == version).data[0]
                    t0 = time.perf_counter()
                    blob = clients[0].open_data(version, 0)
                    if checksum(blob) != info.checksum:
                        raise AssertionError("snapshot checksum mismatch")
                    tensors, _ = read_blob(blob, secret)
                    for k, t in live.items():
                        t.copy_(tensors[k])
                    times["snap_restore"].append(time.perf_counter() - t0)
                    assert all(torch.equal(live[k], state[k]) for k in state)
                    for client in clients:
                        client.publish(version)
                    del blob, tensors, dst
                    for sync in ("fsync", "nosync"):
                        path = work / f"dcp-{rep}-{sync}"
                        t0 = time.perf_counter()
                        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), sync_files=sync == "fsync"),
                                 no_dist=True)
                        times[f"dcp_save_{sync}"].append(time.perf_counter() - t0)
                        for t in live.values():
                            t.zero_()
                        t0 = time.perf_counter()
                        dcp.load(live, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
                        times[f"dcp_load_{sync}"].append(time.perf_counter() - t0)
                        assert all(torch.equal(live[k], state[k]) for k in state)
                        shutil.rmtree(path)
                row: dict[str, Any] = {"bytes": nbytes, **{f"{k}_s": median(v) for k, v in times.items()}}
                row["snap_save_phases_s"] = {k: median(v) for k, v in phases.items()}
                row["save_speedup"] = row["dcp_save_fsync_s"] / row["snap_save_s"]
                row["restore_speedup"] = row["dcp_load_fsync_s"] / row["snap_restore_s"]
                row["save_speedup_vs_nosync"] = row["dcp_save_nosync_s"] / row["snap_save_s"]
                row["restore_speedup_vs_nosync"] = row["dcp_load_nosync_s"] / row["snap_restore_s"]
                row["snapshot_save_GBps"] = nbytes / row["snap_save_s"] / 1e9
                row["snapshot_restore_GBps"] = nbytes / row["snap_restore_s"] / 1e9
                row["goal_met"] = row["save_speedup"] >= 10 and row["restore_speedup"] >= 10
                results.append(row)
        finally:
            for client in clients:
                client.close()
            for proc in procs:
                stop_daemon(proc)
    return {"goal": ">= 10x faster than DCP (default sync_files=True) to local disk, save (parity included) and restore",
            "layout": "2 daemons, k=1 m=1: the save ends when node 1 holds the parity of node 0's blob",
            "sizes": results, "goal_met": all(r["goal_met"] for r in results)}


def _wait_complete(clients: list, version: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(any(v.version == version and v.complete for v in c.status().versions) for c in clients):
        if time.monotonic() > deadline:
            raise AssertionError(f"version {version} not complete after {timeout} s")
        time.sleep(POLL_S)


def run(quick: bool = False) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    return {"save_restore": save_restore(quick), "stall": stall(quick)}
