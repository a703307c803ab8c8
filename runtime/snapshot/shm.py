"""POSIX shared-memory segments of the snapshot daemon: files in /dev/shm mapped as uint8 tensors.

Why files in /dev/shm rather than anonymous memory: a segment has a name, so the
trainer process maps the very pages the daemon serves (zero-copy), and the bytes
outlive a crash or restart of either process; only a reboot or an explicit unlink
loses them. Every name lives in a per-(job, node) namespace,

    plait.<job>.n<node>.v<version>.data.r<local_rank>                  a worker's blob
    plait.<job>.n<node>.v<version>.parity.r<local_rank>.s<stripe>.j<j>  a parity shard
    <segment>.meta                                                     its sidecar (JSON)
    plait.<job>.n<node>.published                                      the published version
    plait.<job>.n<node>.lock                                           flock of the serving daemon

so a restarted daemon finds what it held, and :func:`remove_namespace` emulates the
loss of a whole node. Job names are restricted to ``[A-Za-z0-9_-]``: a dot would make
the names ambiguous and a slash would leave the directory.

Every name lives in ``/dev/shm/plait-<uid>/`` (:func:`segment_root`), a directory of
mode 0700 owned by the user, checked (not a link, right owner, right mode) every time
it is used: other users cannot list, read, plant or replace a segment. Files are
opened with ``O_NOFOLLOW``, so a link planted under a segment's name is refused rather
than followed, and a reader maps only paths inside that directory (a daemon cannot
point a worker at another file). The lock file of a namespace is never unlinked: a
daemon holding the lock on a file that someone unlinked would let a second daemon lock
a new file of the same name and serve the same namespace.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
import warnings

import torch

from plait.runtime.snapshot.errors import SnapshotMemoryError, SnapshotRequestError, SnapshotVersionError

__all__ = [
    "SHM_DIR",
    "segment_root",
    "check_inside",
    "rename",
    "SegmentName",
    "validate_job",
    "namespace_prefix",
    "data_name",
    "parity_name",
    "published_name",
    "lock_namespace",
    "sidecar_path",
    "parse_name",
    "create_segment",
    "map_segment",
    "resize_segment",
    "unlink",
    "list_namespace",
    "remove_namespace",
    "write_json_atomic",
    "read_json",
]

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")  # the tmpfs that holds every user's segment directory
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)  # Linux; Python < 3.10 lacks the constant
JOB_RE = re.compile(r"[A-Za-z0-9_-]+")
SIDECAR_SUFFIX = ".meta"
TMP_SUFFIX = ".tmp"

_NAME_RE = re.compile(
    r"plait\.(?P<job>[A-Za-z0-9_-]+)\.n(?P<node>\d+)\.v(?P<version>\d+)\."
    r"(?:(?P<data>data)\.r(?P<drank>\d+)|parity\.r(?P<prank>\d+)\.s(?P<stripe>\d+)\.j(?P<index>\d+))"
    r"(?P<sidecar>\.meta)?"
)


def segment_root(base: Path = SHM_DIR) -> Path:
    """This user's private segment directory under ``base`` (created 0700 on first use), after checking it.

    Refuses (SnapshotRequestError) a directory that is a link, belongs to another user or
    is open to others: it could be read or planted with segments by someone else.
    """
    root = Path(base) / f"plait-{os.geteuid()}"
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SnapshotRequestError(
            f"{root} must be a directory owned by uid {os.geteuid()} with mode 0700 (it holds snapshot segments); "
            f"it is {'a link or file' if not stat.S_ISDIR(st.st_mode) else f'owned by uid {st.st_uid}, mode {st.st_mode & 0o777:o}'}; "
            "remove it and start again"
        )
    return root


def _root(root: Path | None) -> Path:
    return segment_root() if root is None else Path(root)


def check_inside(path: Path, root: Path | None = None) -> Path:
    """``path`` if it names a file directly inside the segment directory, else SnapshotRequestError."""
    path = Path(path)
    where = _root(root)
    if path.parent != where or not path.name.startswith("plait.") or path.name in (".", ".."):
        raise SnapshotRequestError(f"refusing segment path {str(path)!r}: segments live directly in {where}")
    return path


def validate_job(job: str) -> str:
    """Return ``job`` if it is a valid namespace name, else raise naming the rule."""
    if not isinstance(job, str) or not JOB_RE.fullmatch(job):
        raise SnapshotRequestError(
            f"job name {job!r}: accepted: letters, digits, '_' and '-' only (it becomes part of "
            f"/dev/shm file names); e.g. {re.sub(r'[^A-Za-z0-9_-]', '-', str(job)) or 'job0'!r}"
        )
    return job


def namespace_prefix(job: str, node: int) -> str:
    """The file-name prefix of every segment of ``job`` on ``node`` (ends with a dot)."""
    return f"plait.{validate_job(job)}.n{int(node)}."


def data_name(job: str, node: int, version: int, local_rank: int) -> str:
    return f"{namespace_prefix(job, node)}v{int(version)}.data.r{int(local_rank)}"


def parity_name(job: str, node: int, version: int, local_rank: int, stripe: int, index: int) -> str:
    return f"{namespace_prefix(job, node)}v{int(version)}.parity.r{int(local_rank)}.s{int(stripe)}.j{int(index)}"


def published_name(job: str, node: int) -> str:
    return f"{namespace_prefix(job, node)}published"


def lock_name(job: str, node: int) -> str:
    return f"{namespace_prefix(job, node)}lock"


def lock_namespace(job: str, node: int, *, root: Path | None = None) -> int:
    """Take the namespace's exclusive lock for this process's lifetime; return its fd (close it to release).

    A daemon adopting a namespace deletes what it does not recognise as committed, so a
    second daemon of the same job and node would destroy the first one's work in
    progress. flock is released by the kernel when the holder dies, even by SIGKILL, so
    a restarted daemon always gets it.
    """
    path = _root(root) / lock_name(job, node)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SnapshotVersionError(
            f"another snapshot daemon (pid {holder}) already serves job {job} node {node} (it holds {path}); "
            "stop it first, or start this one with another --job or --node"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


@dataclass(frozen=True)
class SegmentName:
    """What a file name in a namespace says about the segment (or sidecar) it names."""

    job: str
    node: int
    version: int
    kind: Literal["data", "parity"]
    local_rank: int
    stripe: int | None
    index: int | None
    sidecar: bool


def parse_name(name: str) -> SegmentName | None:
    """Parse a segment or sidecar file name; None for anything else (published file, temp files)."""
    match = _NAME_RE.fullmatch(name)
    if match is None:
        return None
    if match["data"]:
        return SegmentName(match["job"], int(match["node"]), int(match["version"]), "data", int(match["drank"]),
                           None, None, bool(match["sidecar"]))
    return SegmentName(match["job"], int(match["node"]), int(match["version"]), "parity", int(match["prank"]),
                       int(match["stripe"]), int(match["index"]), bool(match["sidecar"]))


def create_segment(name: str, size: int, *, prefault: bool = True, root: Path | None = None) -> tuple[Path, torch.Tensor]:
    """Create ``root/name`` exclusively, size it and map it; return (path, uint8 tensor view).

    O_EXCL because two writers of one name would silently share pages: an existing file
    means another daemon serves this namespace, or a stale file was not cleaned up.
    ``prefault`` reserves the pages now with posix_fallocate: tmpfs allocates lazily, so
    without it a full /dev/shm shows up later as SIGBUS in whichever process first
    touches a missing page (the trainer); with it, it is an error here, naming the sizes.
    """
    if size < 0:
        raise SnapshotRequestError(f"segment {name}: size must be >= 0, got {size}")
    root = _root(root)
    path = root / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise SnapshotVersionError(
            f"shared-memory segment {path} already exists: another daemon may serve this job and node, "
            "or a stale segment was left behind; stop the other daemon or remove the file"
        ) from None
    try:
        _size_file(fd, size, prefault=prefault, root=root, what=f"segment {name}")
    except BaseException:
        os.close(fd)
        unlink(path)
        raise
    os.close(fd)
    return path, map_segment(path, size, root=root)


def map_segment(path: Path, size: int, *, root: Path | None = None) -> torch.Tensor:
    """Map the first ``size`` bytes of an existing segment as a writable uint8 tensor (no copy).

    The mapping is MAP_SHARED: writes through it are the segment's bytes, visible to every
    other process mapping the same file, and it stays valid after the file is unlinked.
    ``path`` must lie directly in the segment directory (``root``, default
    :func:`segment_root`): a path from anywhere else (as a hostile daemon might answer a
    Put or List) is refused, and a link is never followed.
    """
    path = check_inside(path, root)
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    # MAP_POPULATE maps every page now, in one call, instead of one fault per 4 KiB page on
    # first touch: a 64 MiB copy into a fresh mapping takes about half the time.
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < size:
            raise SnapshotRequestError(f"segment {path.name} holds {os.fstat(fd).st_size} bytes, fewer than the "
                                       f"{size} asked for")
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": it is writable
        return torch.frombuffer(mapping, dtype=torch.uint8)


def resize_segment(path: Path, size: int, *, prefault: bool = True) -> torch.Tensor:
    """Grow (or shrink) a segment in place and return a fresh mapping of its new size.

    Bytes past the old end read as zeros, which is exactly the zero padding parity needs.
    """
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _size_file(fd, size, prefault=prefault, root=path.parent, what=f"segment {path.name} (resized)")
    finally:
        os.close(fd)
    return map_segment(path, size, root=path.parent)


def rename(src: Path, dst: Path) -> None:
    """Rename a segment within its directory (a pooled segment taking a new shard's name)."""
    os.rename(src, dst)


def _size_file(fd: int, size: int, *, prefault: bool, root: Path, what: str) -> None:
    """Set the file's size; with ``prefault``, reserve its pages now (posix_fallocate).

    tmpfs allocates lazily, so without the reservation a full /dev/shm shows up later as
    SIGBUS in whichever process first touches a missing page; with it, it is an error
    here that names the sizes.
    """
    os.ftruncate(fd, size)
    if not (prefault and size):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.ENOMEM):
            raise SnapshotMemoryError(
                f"{root} has no room for {what}: needs {size} bytes, {_free_bytes(root)} bytes free; "
                f"enlarge {root} (mount -o remount,size=...) or lower snapshot.max_memory below its size"
            ) from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def unlink(path: Path) -> None:
    """Remove a file if it exists (mappings of it stay valid until dropped)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def list_namespace(job: str, node: int, *, root: Path | None = None) -> list[Path]:
    """Every file of ``job`` on ``node`` in ``root``, sorted by name."""
    prefix = namespace_prefix(job, node)
    root = _root(root)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(root / name for name in names if name.startswith(prefix))


def remove_namespace(job: str, node: int, *, root: Path | None = None, lock_too: bool = False) -> int:
    """Unlink every file of ``job`` on ``node`` but its lock; return how many. Emulates losing the node's memory.

    ``lock_too`` also removes the lock file: only for a namespace nobody serves any more
    (the launcher at the end of a job, once its daemons have exited).
    """
    root = _root(root)
    lock = lock_name(job, node)
    paths = [p for p in list_namespace(job, node, root=root) if lock_too or p.name != lock]
    for path in paths:
        unlink(path)
    if paths:
        log.debug("removed %d file(s) of job %s node %d from %s", len(paths), job, node, root)
    return len(paths)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, separators=(",", ":"), sort_keys=True)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd) as f:
        return json.load(f)


def _free_bytes(root: Path) -> int:
    try:
        st = os.statvfs(root)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize
