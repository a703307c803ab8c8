"""The files through which workers ask for faults and the launcher reports them done, under ``<run dir>/faults/``.

``request-a<attempt>-<point>-r<rank>.json``  a worker of elastic attempt A reached the point
                                             (``s7``, ``restore1``); ``{rank, pid}``
``executing``                                the launcher is carrying out the faults of a point
``<index>.json``                             fault ``index`` (its position among the --fault
                                             flags) is done: ``{fault, ok, attempt, effect}``,
                                             ``effect`` saying what was verified; or ``ok``
                                             false with the ``error`` that stopped it
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

REQUEST = re.compile(r"request-a(\d+)-(s\d+|restore\d+)-r(\d+)\.json")


def fault_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "faults"


def write_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def request_path(run_dir: Path, *, attempt: int, point: str, rank: int) -> Path:
    return fault_dir(run_dir) / f"request-a{attempt}-{point}-r{rank}.json"


def record_path(run_dir: Path, index: int) -> Path:
    return fault_dir(run_dir) / f"{index}.json"


def executing_path(run_dir: Path) -> Path:
    return fault_dir(run_dir) / "executing"


def read_record(run_dir: Path, index: int) -> dict | None:
    try:
        return json.loads(record_path(run_dir, index).read_text())
    except (FileNotFoundError, ValueError):
        return None


def fault_records(run_dir: Path) -> list[dict]:
    """Every fault recorded done, in the order the --fault flags gave them."""
    folder = fault_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.json"):
        if path.stem.isdigit():
            try:
                found.append((int(path.stem), json.loads(path.read_text())))
            except ValueError:
                continue
    return [record for _, record in sorted(found, key=lambda pair: pair[0])]


def fired_faults(run_dir: Path) -> list[str]:
    """The faults that took effect (verified by the launcher), for summary.json."""
    return [r["fault"] for r in fault_records(run_dir) if r.get("ok")]
