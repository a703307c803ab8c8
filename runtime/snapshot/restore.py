"""Restore at worker start, in order: local daemon memory → rebuild from the group → disk tier → fresh.

A collective over all ranks. Global rank 0 asks every node's daemon what it holds and
picks the newest version every rank can get, each rank from its own node's memory
("local") or, when its node lost it, by decoding its chunks from the survivors' data
and parity ("rebuild"). Every rank then loads and checks checksums (the blob's, and for
a rebuild every piece's before decoding); a rank that fails reports it, rank 0 rules
that source out and plans again. Without a usable in-memory version, the newest
complete disk checkpoint is taken; without one, training starts fresh. Each outcome is
one line on rank 0's console and one record in ``<run dir>/recovery.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from plait.ops.checksum import checksum
from plait.ops.gf256 import gf256_matmul_
from plait.ops.rs_matrix import decode_matrix
from plait.runtime.snapshot.layout import GroupLayout, chunk_len, chunk_range
from plait.runtime.snapshot.state import read_blob

if TYPE_CHECKING:
    from plait.runtime.snapshot.client import DaemonClient, VersionInfo
    from plait.runtime.snapshot.disk import DiskTier
    from plait.runtime.trainer import Trainer

log = logging.getLogger("plait.snapshot.restore")

Listing = dict[int, dict[int, "VersionInfo"]]  # node -> version -> info


@dataclass
class Outcome:
    source: str  # memory | disk | fresh
    step: int
    seconds: float
    line: str  # the one line printed on rank 0
    per_rank: dict[int, str]  # rank -> local | rebuild | disk | fresh


class RestoreError(RuntimeError):
    pass


def _ranks_text(ranks: list[int]) -> str:
    ranks = sorted(ranks)
    if not ranks:
        return "none"
    parts, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)


class Planner:
    """Rank 0's view of what the daemons hold, and which version each rank can get how."""

    def __init__(self, listing: Listing, *, layout: GroupLayout, world: int, per_node: int):
        self.listing = listing
        self.layout = layout
        self.world = world
        self.per_node = per_node
        self.bad_data: set[tuple[int, int, int]] = set()  # (version, node, local rank) that failed a check
        self.bad_versions: set[int] = set()

    def data(self, v: int, node: int, r: int):
        info = self.listing.get(node, {}).get(v)
        if info is None or (v, node, r) in self.bad_data:
            return None
        return next((d for d in info.data if d.local_rank == r and d.committed), None)

    def parity(self, v: int, node: int, r: int, stripe: int, j: int):
        info = self.listing.get(node, {}).get(v)
        if info is None:
            return None
        return next((p for p in info.parity if p.local_rank == r and p.stripe == stripe and p.index == j and p.complete), None)

    def rebuild_pieces(self, v: int, node: int, r: int) -> list[tuple[int, list[tuple[int, int]]]] | None:
        """Per chunk c: (stripe, [(shard index, node)] of k survivors), or None when some chunk cannot be rebuilt."""
        L = self.layout
        if L.m == 0:
            return None
        g, pos = L.group_of(node), L.position(node)
        plan = []
        for c in range(L.k):
            s = L.stripe_of_chunk(pos, c)
            have = []
            for p in range(L.k):
                holder = L.node_at(g, L.data_position(s, p))
                if p != c and holder != node and self.data(v, holder, r) is not None:
                    have.append((p, holder))
            for j in range(L.m):
                holder = L.node_at(g, L.parity_position(s, j))
                if holder != node and self.parity(v, holder, r, s, j) is not None:
                    have.append((L.k + j, holder))
            if len(have) < L.k:
                return None
            plan.append((s, have[: L.k]))
        return plan

    def member_meta(self, v: int, node: int, r: int):
        """The blob metadata (size, checksum) of (node, r) at v, as replicated on its stripes' parity holders."""
        L = self.layout
        g, pos = L.group_of(node), L.position(node)
        for c in range(L.k):
            s = L.stripe_of_chunk(pos, c)
            for j in range(L.m):
                p = self.parity(v, L.node_at(g, L.parity_position(s, j)), r, s, j)
                if p is None:
                    continue
                for mem in p.members:
                    if mem.node == node:
                        return mem
        return None

    def choose(self) -> tuple[int, dict[int, str]] | None:
        versions = sorted({v for per in self.listing.values() for v in per} - self.bad_versions, reverse=True)
        for v in versions:
            sources: dict[int, str] = {}
            for rank in range(self.world):
                node, r = divmod(rank, self.per_node)
                if self.data(v, node, r) is not None:
                    sources[rank] = "local"
                elif self.rebuild_pieces(v, node, r) is not None and self.member_meta(v, node, r) is not None:
                    sources[rank] = "rebuild"
                else:
                    break
            else:
                return v, sources
        return None


def rebuild_blob(planner: Planner, v: int, node: int, r: int, clients: list[DaemonClient]) -> torch.Tensor:
    """Decode the blob of (node, local rank r) at version v from the survivors; checksums checked."""
    L = planner.layout
    meta = planner.member_meta(v, node, r)
    pieces_plan = planner.rebuild_pieces(v, node, r)
    if meta is None or pieces_plan is None:
        raise RestoreError(f"version {v} of node {node} local rank {r} can no longer be rebuilt")
    size = meta.size
    blob = torch.zeros(max(1, chunk_len(size, L.k) * L.k), dtype=torch.uint8)
    for c, (s, have) in enumerate(pieces_plan):
        lengths = []
        for idx, holder in have:
            if idx >= L.k:
                lengths.append(planner.parity(v, holder, r, s, idx - L.k).size)
        width = max(lengths) if lengths else chunk_len(size, L.k)
        pieces = []
        for idx, holder in have:
            buf = torch.zeros(width, dtype=torch.uint8)
            if idx < L.k:
                info = planner.data(v, holder, r)
                lo, hi = chunk_range(info.size, L.k, idx)
                if hi > lo:
                    client_get(clients[holder], buf[: hi - lo], version=v, kind="data", local_rank=r, offset=lo, length=hi - lo)
                want = _member_chunk_checksum(planner, v, holder, r, s)
                if want is not None and checksum(buf[: hi - lo].contiguous()) != want:
                    raise RestoreError(f"chunk {idx} of node {holder} (version {v}) failed its checksum")
            else:
                pinfo = planner.parity(v, holder, r, s, idx - L.k)
                client_get(clients[holder], buf[: pinfo.size], version=v, kind="parity", local_rank=r, stripe=s, index=idx - L.k)
                if checksum(buf[: pinfo.size].contiguous()) != pinfo.checksum:
                    raise RestoreError(f"parity {idx - L.k} of stripe {s} on node {holder} (version {v}) failed its checksum")
            pieces.append(buf)
        out = torch.empty(width, dtype=torch.uint8)
        gf256_matmul_([out], pieces, decode_matrix(L.k, L.m, [idx for idx, _ in have], [c]))
        lo, hi = chunk_range(size, L.k, c)
        blob[lo:hi] = out[: hi - lo]
    blob = blob[:size]
    if checksum(blob.contiguous()) != meta.checksum:
        raise RestoreError(f"rebuilt blob of node {node} local rank {r} (version {v}) failed its checksum")
    return blob


def client_get(client: DaemonClient, out: torch.Tensor, **kw: Any) -> None:
    got = client.get(out=out, **kw)
    if got.data_ptr() != out.data_ptr():
        out.copy_(got[: out.numel()])


def _member_chunk_checksum(planner: Planner, v: int, holder: int, r: int, stripe: int) -> int | None:
    L = planner.layout
    g = L.group_of(holder)
    for j in range(L.m):
        p = planner.parity(v, L.node_at(g, L.parity_position(stripe, j)), r, stripe, j)
        if p is None:
            continue
        for mem in p.members:
            if mem.node == holder:
                return mem.chunk_checksum
    return None


def _list_all(clients: list[DaemonClient]) -> Listing:
    listing: Listing = {}
    for node, client in enumerate(clients):
        try:
            client.wait_ready(timeout=30)
            listing[node] = {v.version: v for v in client.list()}
        except Exception as err:  # noqa: BLE001 - a missing daemon holds nothing
            log.warning("restore: daemon of node %d did not answer: %s", node, err)
            listing[node] = {}
    return listing


def restore(trainer: Trainer, *, rank: int, world: int, per_node: int, layout: GroupLayout | None,
            clients: list[DaemonClient] | None, disk: DiskTier | None, run_dir: Path, attempt: int) -> Outcome:
    """Bring ``trainer`` to the newest recoverable state (a collective over all ranks)."""
    start = time.perf_counter()
    node, local_rank = divmod(rank, per_node)
    planner: Planner | None = None
    if rank == 0 and clients is not None and layout is not None and attempt > 0:
        planner = Planner(_list_all(clients), layout=layout, world=world, per_node=per_node)
    bad_disk: set[int] = set()
    notes: list[str] = []
    for _ in range(8):
        decision: list[Any] = [None]
        if rank == 0:
            choice = planner.choose() if planner is not None else None
            if choice is not None:
                decision[0] = ("memory", choice[0], choice[1], planner.listing, planner.bad_data)
            else:
                from plait.runtime.snapshot.disk import complete_steps

                steps = [s for s in complete_steps(disk.root, world) if s not in bad_disk] if (disk is not None and attempt > 0) else []
                decision[0] = ("disk", steps[-1], None, None, None) if steps else ("fresh", 0, None, None, None)
        if world > 1:
            dist.broadcast_object_list(decision, src=0)
        kind, step, sources, listing, bad = decision[0]
        error = None
        how = kind
        try:
            if kind == "memory":
                how = sources[rank]
                if how == "local":
                    assert clients is not None
                    info = listing[node][step]
                    shard = next(d for d in info.data if d.local_rank == local_rank)
                    blob = clients[node].open_data(step, local_rank)
                    if blob.numel() != shard.size or checksum(blob) != shard.checksum:
                        raise RestoreError(f"local shard of version {step} failed its checksum")
                else:
                    assert clients is not None and layout is not None
                    p = Planner(listing, layout=layout, world=world, per_node=per_node)
                    p.bad_data = bad
                    blob = rebuild_blob(p, step, node, local_rank, clients)
                tensors, objects = read_blob(blob)
                trainer.load_snapshot(tensors, objects)
            elif kind == "disk":
                assert disk is not None
                tensors, objects = disk.load(step)
                trainer.load_snapshot(tensors, objects)
        except Exception as err:  # noqa: BLE001 - reported to rank 0, which plans around it
            error = f"{type(err).__name__}: {err}"
            log.warning("restore: rank %d could not use %s (step %d): %s", rank, how, step, error)
        reports: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(reports, (how, error))
        else:
            reports = [(how, error)]
        failed = {r: e for r, (_, e) in enumerate(reports) if e is not None}
        if not failed:
            per_rank = {r: h for r, (h, _) in enumerate(reports)}
            seconds = time.perf_counter() - start
            line = _line(kind, step, per_rank, per_node, notes, seconds)
            if rank == 0:
                _record(run_dir, attempt, kind, step, per_rank, seconds)
            return Outcome(source=kind, step=step, seconds=seconds, line=line, per_rank=per_rank)
        if rank == 0:
            for r, e in failed.items():
                n, lr = divmod(r, per_node)
                how_r = reports[r][0]
                notes.append(f"rank {r} {how_r} failed ({e})")
                if kind == "memory" and planner is not None:
                    if how_r == "local":
                        planner.bad_data.add((step, n, lr))
                    else:
                        planner.bad_versions.add(step)
                elif kind == "disk":
                    bad_disk.add(step)
    raise RestoreError("restore: no source passed its checks after 8 plans; see the workers' logs")


def _line(kind: str, step: int, per_rank: dict[int, str], per_node: int, notes: list[str], seconds: float) -> str:
    if kind == "fresh":
        text = "fresh start (no snapshot to restore)"
    elif kind == "disk":
        text = f"step {step} from the disk tier (no complete in-memory snapshot could be recovered)"
    else:
        local = [r for r, h in per_rank.items() if h == "local"]
        rebuilt = [r for r, h in per_rank.items() if h == "rebuild"]
        parts = []
        if local:
            parts.append(f"local daemon memory for ranks {_ranks_text(local)}")
        if rebuilt:
            nodes = sorted({r // per_node for r in rebuilt})
            parts.append(f"rebuilt from the group's data and parity for ranks {_ranks_text(rebuilt)} (node{'s' if len(nodes) > 1 else ''} "
                         f"{', '.join(map(str, nodes))})")
        text = f"step {step} from " + " and ".join(parts)
    if notes:
        text += "; after: " + "; ".join(notes)
    return f"plait: restore: {text}, {seconds:.2f} s, checksums verified" if kind != "fresh" else f"plait: restore: {text}"


def _record(run_dir: Path, attempt: int, kind: str, step: int, per_rank: dict[int, str], seconds: float) -> None:
    progress = 0
    for f in (run_dir / "progress").glob("rank*"):
        try:
            progress = max(progress, int(f.read_text()))
        except (OSError, ValueError):
            pass
    record = {"attempt": attempt, "source": kind, "step": step, "progress": progress,
              "replayed": max(0, progress - step) if attempt > 0 else 0, "seconds": round(seconds, 4),
              "ranks": {h: sorted(r for r, x in per_rank.items() if x == h) for h in set(per_rank.values())}}
    with open(run_dir / "recovery.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def recovery_totals(run_dir: Path) -> dict[str, Any]:
    """``steps_replayed`` and the list of recoveries, for summary.json."""
    path = run_dir / "recovery.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    recoveries = [r for r in records if r["attempt"] > 0]
    return {"steps_replayed": sum(r["replayed"] for r in recoveries), "recoveries": recoveries}
