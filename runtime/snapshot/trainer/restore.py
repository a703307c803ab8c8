"""Restore at worker start, in order: local daemon memory → rebuild from the group → disk tier → fresh.

A collective over all ranks. Global rank 0 asks every node's daemon what it holds and
picks the newest version every rank can get, each rank from its own node's memory
("local") or, when its node lost it, by decoding its chunks from the survivors' data
and parity ("rebuild"). Every rank then loads and checks checksums (the blob's, and for
a rebuild every piece's before decoding); a rank that fails reports it, rank 0 rules
that source out and plans again. Without a usable in-memory version, the newest
complete disk checkpoint of this run is taken (never another run's, even in a shared
``snapshot.dir``); without one, training starts from the checkpoint the run was started
from (``plait train --resume``), else fresh, unless the job had published a snapshot
(``published.json``): then a snapshot was lost, and starting over would silently throw
away every step done, so every rank raises :class:`SnapshotLost` and the job stops with
a message that says what would have prevented it. Disk checkpoints load into any
layout (:mod:`plait.runtime.snapshot.checkpoint.read`). Each outcome is one line on
rank 0's console and one record in ``<run dir>/recovery.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from plait.errors import JobCannotContinue
from plait.ops.checksum import checksum
from plait.ops.gf256 import gf256_matmul_
from plait.ops.rs_matrix import decode_matrix
from plait.scheduler.placement import Placement
from plait.runtime.snapshot.errors import SnapshotError
from plait.runtime.snapshot.layout import GroupLayout, chunk_len, chunk_range
from plait.runtime.snapshot.records import VersionInfo, epoch_of, step_of, version_id, version_text
from plait.runtime.snapshot.trainer.blob import read_blob
from plait.runtime.snapshot.trainer.lifecycle import last_published

if TYPE_CHECKING:
    from collections.abc import Callable

    from plait.runtime.snapshot.auth import JobSecret
    from plait.runtime.snapshot.checkpoint.paths import Checkpoint
    from plait.runtime.snapshot.checkpoint.write import CheckpointWriter
    from plait.runtime.snapshot.trainer.lifecycle import VersionLifecycle
    from plait.runtime.snapshot.transport.client import DaemonClient
    from plait.runtime.trainer import Trainer

log = logging.getLogger("plait.snapshot.restore")

Listing = dict[int, dict[int, VersionInfo]]  # node -> version -> info


@dataclass
class Outcome:
    source: str  # memory | disk | resume | fresh (lost raises SnapshotLost)
    step: int
    seconds: float
    line: str  # the one line printed on rank 0
    per_rank: dict[int, str]  # rank -> local | rebuild | disk | resume | fresh
    epoch: int = 0  # the restore generation this run writes its versions in


class RestoreError(RuntimeError):
    pass


class SnapshotLost(RestoreError, JobCannotContinue):
    """The job published a snapshot, and neither it nor anything older (memory, disk) can be restored."""


class ResumeFailed(RestoreError, JobCannotContinue):
    """The checkpoint given to ``plait train --resume`` failed to load on some rank (its files changed since the check)."""


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

    def __init__(self, listing: Listing, *, layout: GroupLayout, world: int, per_node: int,
                 placement: Placement | None = None):
        self.listing = listing
        self.layout = layout
        self.world = world
        self.per_node = per_node
        self.placement = placement or Placement.contiguous(world, per_node)
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
            plan.append((s, have))  # every survivor: spares beyond k stand in for a piece that fails its check
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
                node, r = self.placement.node_of(rank), self.placement.local_of(rank)
                if self.data(v, node, r) is not None:
                    sources[rank] = "local"
                elif self.rebuild_pieces(v, node, r) is not None and self.member_meta(v, node, r) is not None:
                    sources[rank] = "rebuild"
                else:
                    break
            else:
                return v, sources
        return None


def rebuild_blob(planner: Planner, v: int, node: int, r: int, clients: list[DaemonClient],
                 notes: list[str] | None = None) -> torch.Tensor:
    """Decode the blob of (node, local rank r) at version v from the survivors; every piece's checksum checked.

    Per chunk, survivors are read in turn until k of them pass their checksums: a bad or
    unreachable piece is ruled out (and noted) and a spare one used instead (m >= 2), so
    one bad piece never discards the version while enough good ones exist.
    """
    L = planner.layout
    meta = planner.member_meta(v, node, r)
    pieces_plan = planner.rebuild_pieces(v, node, r)
    if meta is None or pieces_plan is None:
        raise RestoreError(f"{version_text(v)} of node {node} local rank {r} can no longer be rebuilt")
    size = meta.size
    blob = torch.zeros(max(1, chunk_len(size, L.k) * L.k), dtype=torch.uint8)
    for c, (s, candidates) in enumerate(pieces_plan):
        good: list[tuple[int, torch.Tensor]] = []
        for idx, holder in candidates:
            if len(good) == L.k:
                break
            try:
                good.append((idx, _fetch_piece(planner, v, holder, r, s, idx, clients)))
            except (RestoreError, SnapshotError) as err:
                if notes is not None:
                    notes.append(f"ruled out piece {idx} of stripe {s} on node {holder}: {err}")
                log.warning("restore: %s; trying a spare piece", err)
        if len(good) < L.k:
            raise RestoreError(f"chunk {c} of node {node} local rank {r} ({version_text(v)}): only {len(good)} of the "
                               f"{L.k} pieces needed passed their checks")
        width = max([buf.numel() for idx, buf in good if idx >= L.k] or [chunk_len(size, L.k)])
        pieces = []
        for _, buf in good:
            padded = torch.zeros(width, dtype=torch.uint8)
            padded[: buf.numel()] = buf
            pieces.append(padded)
        out = torch.empty(width, dtype=torch.uint8)
        gf256_matmul_([out], pieces, decode_matrix(L.k, L.m, [idx for idx, _ in good], [c]))
        lo, hi = chunk_range(size, L.k, c)
        blob[lo:hi] = out[: hi - lo]
    blob = blob[:size]
    if checksum(blob.contiguous()) != meta.checksum:
        raise RestoreError(f"rebuilt blob of node {node} local rank {r} ({version_text(v)}) failed its checksum")
    return blob


def _fetch_piece(planner: Planner, v: int, holder: int, r: int, s: int, idx: int,
                 clients: list[DaemonClient]) -> torch.Tensor:
    """Piece ``idx`` of stripe s (a data chunk, idx < k, or parity idx - k) from ``holder``, checksum checked."""
    L = planner.layout
    if idx < L.k:
        info = planner.data(v, holder, r)
        lo, hi = chunk_range(info.size, L.k, idx)
        buf = torch.empty(hi - lo, dtype=torch.uint8)
        if hi > lo:
            client_get(clients[holder], buf, version=v, kind="data", local_rank=r, offset=lo, length=hi - lo)
        want = _member_chunk_checksum(planner, v, holder, r, s)
        if want is not None and checksum(buf) != want:
            raise RestoreError(f"chunk {idx} of node {holder} ({version_text(v)}) failed its checksum")
        return buf
    pinfo = planner.parity(v, holder, r, s, idx - L.k)
    buf = torch.empty(pinfo.size, dtype=torch.uint8)
    client_get(clients[holder], buf, version=v, kind="parity", local_rank=r, stripe=s, index=idx - L.k)
    if checksum(buf) != pinfo.checksum:
        raise RestoreError(f"parity {idx - L.k} of stripe {s} on node {holder} ({version_text(v)}) failed its checksum")
    return buf


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


LIST_TIMEOUT_S = 10.0  # how long restore waits for one daemon's answer; a daemon that takes longer holds nothing


def _list_all(clients: list[DaemonClient], timeout: float = LIST_TIMEOUT_S) -> tuple[Listing, int]:
    """What every daemon holds, asked in parallel (each bounded by ``timeout``), and the next restore epoch.

    The next epoch is one more than any epoch a daemon holds a version of or was reset
    to: the versions the restored run writes are then newer than anything left behind.
    """
    def ask(client: DaemonClient) -> tuple[dict[int, VersionInfo], int]:
        client.wait_ready(timeout=timeout)
        return {v.version: v for v in client.list()}, client.status().floor

    listing: Listing = {}
    newest = -1
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(clients))), thread_name_prefix="plait-restore-list") as pool:
        futures = [pool.submit(ask, client) for client in clients]
        deadline = time.monotonic() + 2 * timeout
        for node, future in enumerate(futures):
            try:
                held, floor = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as err:  # noqa: BLE001 - a missing, restarting or hung daemon holds nothing
                log.warning("restore: daemon of node %d did not answer: %s", node, err or type(err).__name__)
                listing[node] = {}
                continue
            listing[node] = held
            newest = max([newest, epoch_of(floor), *(epoch_of(v) for v in held)])
    return listing, newest + 1


def restore(trainer: Trainer, *, rank: int, world: int, per_node: int, layout: GroupLayout,
            clients: list[DaemonClient] | None, disk: CheckpointWriter | None, run_dir: Path, attempt: int,
            secret: JobSecret | None, lifecycle: VersionLifecycle | None = None,
            resume: Checkpoint | None = None, on_plan: Callable[[str], None] | None = None,
            placement: Placement | None = None) -> Outcome:
    """Bring ``trainer`` to the newest recoverable state (a collective over all ranks).

    Global rank 0 decides, every rank loads and reports, rank 0 rules out what failed
    and decides again (at most 8 plans, every call bounded). Once every rank loaded, rank
    0's ``lifecycle`` resets every daemon to the new restore epoch (keeping only the
    version restored from), before any rank takes a snapshot again. Raises
    :class:`SnapshotLost` when a published snapshot cannot be restored and no disk
    checkpoint stands in for it. ``on_plan`` is called with the first plan's kind on every
    rank before any loads (fault injection fires faults "during restore" there).
    """
    start = time.perf_counter()
    placement = placement or Placement.contiguous(world, per_node)
    node, local_rank = placement.node_of(rank), placement.local_of(rank)
    planner: Planner | None = None
    epoch = 0
    if rank == 0 and clients is not None:
        listing, epoch = _list_all(clients)
        planner = Planner(listing, layout=layout, world=world, per_node=per_node, placement=placement)
    bad_disk: set[int] = set()
    notes: list[str] = []
    for plan in range(8):
        decision: list[Any] = [None]
        if rank == 0:
            choice = planner.choose() if planner is not None else None
            if choice is not None:
                decision[0] = ("memory", choice[0], choice[1], planner.listing, planner.bad_data, epoch)
            else:
                from plait.runtime.snapshot.checkpoint.paths import complete_checkpoints

                own = ([c for c in complete_checkpoints(disk.base, disk.run.run_id) if str(c.path) not in bad_disk]
                       if (disk is not None and attempt > 0) else [])
                published = last_published(run_dir) if attempt > 0 else None
                if own:
                    decision[0] = ("disk", own[-1].step, str(own[-1].path), None, None, epoch)
                elif published is not None:
                    decision[0] = ("lost", published["version"], None, None, None, epoch)
                elif resume is not None and str(resume.path) not in bad_disk:
                    decision[0] = ("resume", resume.step, str(resume.path), None, None, epoch)
                elif resume is not None:
                    decision[0] = ("unusable", resume.step, str(resume.path), "; ".join(notes), None, epoch)
                else:
                    decision[0] = ("fresh", 0, None, None, None, epoch)
        if world > 1:
            dist.broadcast_object_list(decision, src=0)
        kind, version, sources, listing, bad, epoch = decision[0]
        if plan == 0 and on_plan is not None:
            on_plan(kind)
        if kind == "unusable":
            raise ResumeFailed(f"--resume {sources}: the checkpoint could not be loaded ({listing}); give another "
                               "checkpoint (an older step directory)")
        if kind == "lost":
            if rank == 0:
                _record(run_dir, attempt, kind, step_of(version), {}, time.perf_counter() - start, epoch)
            raise SnapshotLost(_lost_message(version, layout, disk, notes))
        error = None
        how = kind
        rank_notes: list[str] = []
        try:
            if kind == "memory":
                how = sources[rank]
                if how == "local":
                    assert clients is not None
                    info = listing[node][version]
                    shard = next(d for d in info.data if d.local_rank == local_rank)
                    blob = clients[node].open_data(version, local_rank)
                    if blob.numel() != shard.size or checksum(blob) != shard.checksum:
                        raise RestoreError(f"local shard of {version_text(version)} failed its checksum")
                else:
                    assert clients is not None
                    p = Planner(listing, layout=layout, world=world, per_node=per_node, placement=placement)
                    p.bad_data = bad
                    blob = rebuild_blob(p, version, node, local_rank, clients, rank_notes)
                tensors, objects = read_blob(blob, secret)
                trainer.load_snapshot(tensors, objects)
            elif kind in ("disk", "resume"):
                from plait.runtime.snapshot.checkpoint.paths import Checkpoint, read_manifest
                from plait.runtime.snapshot.checkpoint.read import load_checkpoint

                manifest = read_manifest(Path(sources))
                if manifest is None:
                    raise RestoreError(f"disk checkpoint {sources} is gone or incomplete")
                load_checkpoint(trainer, Checkpoint(Path(sources), manifest), rank=rank)
        except Exception as err:  # noqa: BLE001 - reported to rank 0, which plans around it
            error = f"{type(err).__name__}: {err}"
            log.warning("restore: rank %d could not use %s (%s): %s", rank, how, _point(kind, version), error)
        reports: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(reports, (how, error, rank_notes))
        else:
            reports = [(how, error, rank_notes)]
        failed = {r: e for r, (_, e, _) in enumerate(reports) if e is not None}
        if rank == 0:
            notes.extend(f"rank {r}: {n}" for r, (_, _, ns) in enumerate(reports) for n in ns)
        if not failed:
            per_rank = {r: h for r, (h, _, _) in enumerate(reports)}
            if rank == 0 and lifecycle is not None:
                notes.extend(lifecycle.reset(version_id(epoch, 0), version if kind == "memory" else None))
            if world > 1:
                dist.barrier()  # nobody snapshots before every daemon is in the new epoch
            seconds = time.perf_counter() - start
            step = step_of(version) if kind == "memory" else version
            line = _line(kind, step, per_rank, placement, notes, seconds)
            if rank == 0:
                _record(run_dir, attempt, kind, step, per_rank, seconds, epoch)
            return Outcome(source=kind, step=step, seconds=seconds, line=line, per_rank=per_rank, epoch=epoch)
        if rank == 0:
            for r, e in failed.items():
                n, lr = placement.node_of(r), placement.local_of(r)
                how_r = reports[r][0]
                notes.append(f"rank {r} {how_r} failed ({e})")
                if kind == "memory" and planner is not None:
                    if how_r == "local":
                        planner.bad_data.add((version, n, lr))
                    else:
                        planner.bad_versions.add(version)
                elif kind in ("disk", "resume"):
                    bad_disk.add(sources)
    raise RestoreError("restore: no source passed its checks after 8 plans; see the workers' logs")


def _lost_message(version: int, layout: GroupLayout, disk: CheckpointWriter | None, notes: list[str]) -> str:
    no_disk = ("there is no disk tier (snapshot.disk_every is 0)" if disk is None else
               "no disk checkpoint is complete yet")
    seen = f" (restore tried: {'; '.join(notes)})" if notes else ""
    return (f"restore: the newest published snapshot, {version_text(version)}, cannot be recovered: more of its pieces "
            f"are gone (nodes lost, shards corrupt) than the erasure-coding group's ec_m={layout.m} parity covers, and "
            f"{no_disk}{seen}. Starting over from step 0 would silently lose every step done, so the job stops. To "
            "survive this, write disk checkpoints (snapshot.disk_every, e.g. --set snapshot.disk_every=5) or raise "
            "snapshot.ec_m")


def _point(kind: str, version: int) -> str:
    return version_text(version) if kind == "memory" else f"step {version}"


def _line(kind: str, step: int, per_rank: dict[int, str], placement: Placement, notes: list[str], seconds: float) -> str:
    if kind == "fresh":
        text = "fresh start (no snapshot to restore)"
    elif kind == "disk":
        text = f"step {step} from the disk tier (no complete in-memory snapshot could be recovered)"
    elif kind == "resume":
        text = f"step {step} from the checkpoint given to --resume"
    else:
        local = [r for r, h in per_rank.items() if h == "local"]
        rebuilt = [r for r, h in per_rank.items() if h == "rebuild"]
        parts = []
        if local:
            parts.append(f"local daemon memory for ranks {_ranks_text(local)}")
        if rebuilt:
            nodes = sorted({placement.node_of(r) for r in rebuilt})
            parts.append(f"rebuilt from the group's data and parity for ranks {_ranks_text(rebuilt)} (node{'s' if len(nodes) > 1 else ''} "
                         f"{', '.join(map(str, nodes))})")
        text = f"step {step} from " + " and ".join(parts)
    if notes:
        text += "; after: " + "; ".join(notes)
    return f"plait: restore: {text}, {seconds:.2f} s, checksums verified" if kind != "fresh" else f"plait: restore: {text}"


def _record(run_dir: Path, attempt: int, kind: str, step: int, per_rank: dict[int, str], seconds: float,
            epoch: int) -> None:
    progress = 0
    for f in (run_dir / "progress").glob("rank*"):
        try:
            progress = max(progress, int(f.read_text()))
        except (OSError, ValueError):
            pass
    record = {"attempt": attempt, "epoch": epoch, "source": kind, "step": step, "progress": progress,
              "replayed": max(0, progress - step) if attempt > 0 and kind != "lost" else 0, "seconds": round(seconds, 4),
              "ranks": {h: sorted(r for r, x in per_rank.items() if x == h) for h in set(per_rank.values())}}
    with open(run_dir / "recovery.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def recovery_totals(run_dir: Path) -> dict[str, Any]:
    """``steps_replayed`` and the list of recoveries, for summary.json."""
    path = run_dir / "recovery.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    recoveries = [r for r in records if r["attempt"] > 0]
    return {"steps_replayed": sum(r["replayed"] for r in recoveries), "recoveries": recoveries}
