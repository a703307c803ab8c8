"""Owner records of emulated networks, so that a network whose owner died is found and removed.

``/run/plait/net/<tag>.json`` holds ``{tag, pid, start_time, namespaces, created, persistent}``: the owner's pid
and its start time (``/proc/<pid>/stat`` field 22, so a reused pid is not mistaken for the owner), and
every namespace the network will have, written before the first is made. A crash between making two
namespaces thus leaves nothing that no record names. A persistent network (``plait cluster up``) outlives
its owner on purpose: it stays until ``plait cluster down`` removes it, and :func:`reap_stale` leaves it.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import timedelta
from pathlib import Path

from plait.runtime.rehearsal import namespaces
from plait.runtime.rehearsal.namespaces import NetworkError

RECORDS = Path("/run/plait/net")
# A namespace without a record is only reaped once this old: the record is written before the namespace
# is made, so a younger one could belong to a network another process is setting up right now.
ORPHAN_AGE = timedelta(seconds=10)
_OWNED = re.compile(r"plait-([a-z0-9]{1,12})-(hub|n\d+)")


def record_path(tag: str) -> Path:
    return RECORDS / f"{tag}.json"


def start_time(pid: int) -> int | None:
    """The clock tick at which ``pid`` started, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Field 22; the command name (field 2) may contain spaces and parentheses, so split after it.
            return int(stat.read().rpartition(")")[2].split()[19])
    except (FileNotFoundError, ProcessLookupError):
        return None


def claim(tag: str, names: list[str], *, persistent: bool = False) -> None:
    """Write the record of a network about to be built, or raise :class:`NetworkError` if ``tag`` is taken.

    Written whole under a temporary name, then hard-linked into place: atomic like a rename, but it fails
    instead of replacing another owner's record, whose namespaces a failed build would then remove.
    """
    taken = set(names) & namespaces.existing()
    if taken:
        raise NetworkError(f"network {tag} exists already (namespaces {sorted(taken)}): choose another tag")
    RECORDS.mkdir(parents=True, exist_ok=True)
    record = {"tag": tag, "pid": os.getpid(), "start_time": start_time(os.getpid()),
              "namespaces": names, "created": time.time(), "persistent": persistent}
    path = record_path(tag)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise NetworkError(f"network {tag} exists already (record {path}): choose another tag") from None
    finally:
        tmp.unlink()


def remove_record(tag: str) -> None:
    record_path(tag).unlink(missing_ok=True)


def _records() -> list[dict]:
    return read_records(RECORDS)


def read_records(folder: Path) -> list[dict]:
    """Every JSON record in ``folder``; one removed or half-written meanwhile is skipped."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            continue
    return found


def owner_alive(record: dict) -> bool:
    return start_time(record["pid"]) == record["start_time"]


def list_networks() -> list[dict]:
    """Every recorded network (for ``plait cluster status``): tag, owner pid, alive, persistent, namespaces
    (those that exist), created."""
    present = namespaces.existing()
    return [{"tag": r["tag"], "pid": r["pid"], "alive": owner_alive(r), "persistent": r.get("persistent", False),
             "namespaces": [n for n in r["namespaces"] if n in present], "created": r["created"]}
            for r in _records()]


def reap_stale() -> list[str]:
    """Remove every network whose owner process is gone, and plait namespaces that no record names (older
    than ``ORPHAN_AGE``); never a network whose owner lives, nor a persistent one. Return the namespaces removed."""
    present = namespaces.existing()
    removed: list[str] = []
    recorded: set[str] = set()
    for record in _records():
        recorded.update(record["namespaces"])
        if owner_alive(record) or record.get("persistent", False):
            continue
        names = [n for n in record["namespaces"] if n in present]
        namespaces.remove(names)
        remove_record(record["tag"])
        removed += names
    now = time.time()
    for name in sorted(present - recorded):
        made = namespaces.created_at(name)
        if _OWNED.fullmatch(name) and made is not None and now - made > ORPHAN_AGE.total_seconds():
            namespaces.remove([name])
            removed.append(name)
    return removed
