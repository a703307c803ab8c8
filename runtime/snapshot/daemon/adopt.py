"""A restarted daemon takes over what its predecessor left in shared memory.

The segments outlive the daemon (they are files), so a daemon that crashed, was killed
or was restarted by its supervisor loses nothing it had verified: committed data shards
and complete parity shards whose sidecar parses, fits this daemon's configuration, and
whose bytes still have the recorded checksum. Everything else goes (uncommitted or
incomplete shards, corrupt bytes, versions older than the published one or of an
earlier restore generation, leftovers). One log line per version.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from plait.ops.checksum import checksum as compute_checksum
from plait.runtime.snapshot import shm
from plait.runtime.snapshot.daemon.shards import DataShard, ParityShard, Shard
from plait.runtime.snapshot.records import MemberInfo, version_text

if TYPE_CHECKING:
    from plait.runtime.snapshot.daemon.store import SnapshotStore

__all__ = ["adopt"]

log = logging.getLogger(__name__)


def _pointers(store: SnapshotStore, path: Path) -> tuple[int | None, int]:
    """(published version, floor) as the predecessor recorded them; (None, 0) when absent or unreadable."""
    if not path.exists():
        return None, 0
    try:
        record = shm.read_json(path)
        published = record.get("version")
        return (None if published is None else int(published)), int(record.get("floor", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("ignoring unreadable %s", path)
        shm.unlink(path)
        return None, 0


def adopt(store: SnapshotStore) -> list[int]:
    """Adopt ``store``'s namespace; return the versions kept."""
    paths = shm.list_namespace(store.job, store.node, root=store.root)
    pointers_path = store.root / shm.published_name(store.job, store.node)
    published, floor = _pointers(store, pointers_path)
    kept: dict[int, list[str]] = {}
    dropped: dict[int, list[str]] = {}
    consumed = {pointers_path.name, shm.lock_name(store.job, store.node)}
    for path in paths:
        parsed = shm.parse_name(path.name)
        if parsed is None or parsed.sidecar:
            continue
        consumed |= {path.name, path.name + shm.SIDECAR_SUFFIX}
        label = (f"data r{parsed.local_rank}" if parsed.kind == "data"
                 else f"parity r{parsed.local_rank} s{parsed.stripe} j{parsed.index}")
        reason, shard = _adopt_one(store, path, parsed, published, floor)
        if shard is None:
            shm.unlink(path)
            shm.unlink(shm.sidecar_path(path))
            dropped.setdefault(parsed.version, []).append(f"{label} ({reason})")
            continue
        store.install(parsed.version, shard)
        kept.setdefault(parsed.version, []).append(label)
    for path in paths:  # orphan sidecars, temporary files, anything unknown in the namespace
        if path.name not in consumed:
            shm.unlink(path)
    states = store.set_pointers(published, floor)
    for v in sorted(set(kept) | set(dropped)):
        state = states.get(v, "")
        if v in dropped:
            log.warning("%s: adopted %d shard(s)%s, discarded %s", version_text(v), len(kept.get(v, [])),
                        f" ({state})" if state else "", ", ".join(dropped[v]))
        else:
            log.info("%s: adopted %d shard(s) (%s)", version_text(v), len(kept[v]), state)
    return sorted(states)


def _adopt_one(store: SnapshotStore, path: Path, parsed: shm.SegmentName, published: int | None,
               floor: int) -> tuple[str, Shard | None]:
    if published is not None and parsed.version < published:
        return f"older than the published {version_text(published)}", None
    if parsed.version < floor and parsed.version != published:
        return "of an earlier restore generation", None
    if parsed.local_rank >= store.nproc_per_node:
        return f"local rank outside nproc_per_node={store.nproc_per_node}", None
    if parsed.kind == "parity" and not store.holds_parity(parsed.stripe, parsed.index):
        return (f"this node holds no parity (stripe, j) = ({parsed.stripe}, {parsed.index}) with k={store.k}, "
                f"m={store.m}"), None
    side = shm.sidecar_path(path)
    if not side.exists():
        return "not committed" if parsed.kind == "data" else "incomplete", None
    try:
        meta = shm.read_json(side)
        size, expected = int(meta["size"]), int(meta["checksum"])
        if meta["kind"] != parsed.kind or int(meta["version"]) != parsed.version:
            return "sidecar does not match the file name", None
        actual_size = path.stat().st_size
        if actual_size != size:
            return f"size {actual_size} differs from the recorded {size}", None
        tensor = shm.map_segment(path, size, root=store.root)
        actual = compute_checksum(tensor)
        if actual != expected:
            return f"checksum {actual:#x} differs from the recorded {expected:#x}", None
        if parsed.kind == "data":
            return "", DataShard(path, size, tensor, version=parsed.version, local_rank=parsed.local_rank,
                                 checksum=expected, step=int(meta["step"]), committed=True,
                                 meta=base64.b64decode(meta["meta"]))
        members = {int(mb["position"]): MemberInfo(**{k: int(v) for k, v in mb.items()}) for mb in meta["members"]}
        if sorted(members) != list(range(store.k)):
            return f"members {sorted(members)} are not the k={store.k} of this code", None
        return "", ParityShard(path, size, tensor, version=parsed.version, local_rank=parsed.local_rank,
                               stripe=parsed.stripe, index=parsed.index, checksum=expected, complete=True,
                               members=members)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        return f"unreadable: {err}", None
