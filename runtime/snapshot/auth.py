"""The job's secret, and how every plane proves it (HMAC-SHA256 throughout).

A job has one secret of 32 random bytes. ``plait train`` makes it (a 0600 file in the
run directory, ``<run dir>/secret``); on a real cluster the user gives every node the
same file. Daemons and workers read it from ``--secret-file`` or the environment
variable ``PLAIT_SNAPSHOT_SECRET_FILE``, and refuse a file that others may read.

* **gRPC calls** carry metadata ``plait-auth: <time>.<nonce>.<mac>`` with
  ``mac = HMAC(secret, "grpc|<method>|<time>|<nonce>")``. The daemon refuses a missing or
  wrong token, one more than :data:`TOKEN_WINDOW_S` from its clock, and a nonce it has
  seen within the window (a replayed call).
* **Bulk connections** begin with a challenge: the daemon sends 32 random bytes, the
  client answers ``HMAC(secret, "bulk|" + challenge)``; a wrong answer is refused and the
  connection closed before any request is read.
* **Blobs** (a rank's snapshot) carry ``HMAC(secret, blob)`` that the restoring worker
  checks before it parses a byte of the blob, so no process without the secret (a
  local user, or a host that reaches a widened port) can make a worker load state it
  did not write; and nothing received is unpickled anyway.

A refusal is :class:`~plait.runtime.snapshot.errors.SnapshotAuthError` (gRPC status
UNAUTHENTICATED), logged once per peer by the daemon.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from pathlib import Path

from plait.runtime.snapshot.errors import SnapshotAuthError

__all__ = ["SECRET_ENV", "AUTH_METADATA", "CHALLENGE_BYTES", "MAC_BYTES", "TOKEN_WINDOW_S", "JobSecret", "TokenVerifier"]

SECRET_ENV = "PLAIT_SNAPSHOT_SECRET_FILE"
AUTH_METADATA = "plait-auth"
SECRET_BYTES = 32
CHALLENGE_BYTES = 32
MAC_BYTES = 32  # HMAC-SHA256
TOKEN_WINDOW_S = 300.0  # accepted clock difference between caller and daemon (and how long nonces are remembered)


class JobSecret:
    """The job's secret key; makes and checks the proofs of every plane."""

    def __init__(self, key: bytes, *, path: Path | None = None):
        if len(key) < 16:
            raise SnapshotAuthError(f"job secret{f' in {path}' if path else ''} has {len(key)} bytes; at least 16 needed")
        self._key = key
        self.path = path

    @classmethod
    def create(cls, path: Path) -> JobSecret:
        """Write a fresh secret to ``path`` (mode 0600, never over an existing file) and return it."""
        key = secrets.token_bytes(SECRET_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
        return cls(key, path=Path(path))

    @classmethod
    def load(cls, path: Path) -> JobSecret:
        """Read a secret file: a regular file of this user that nobody else may read, holding hex digits."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SnapshotAuthError(f"job secret file {path} does not exist; plait train writes <run dir>/secret, "
                                    "on a cluster copy that file to every node") from None
        except OSError as err:
            raise SnapshotAuthError(f"job secret file {path}: cannot open it ({err.strerror}); it must be a regular "
                                    "file, not a link") from None
        with os.fdopen(fd) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise SnapshotAuthError(
                    f"job secret file {path} must be a regular file owned by uid {os.geteuid()} that only its owner "
                    f"may read (mode 0600); it has mode {st.st_mode & 0o777:o}, owner {st.st_uid}: chmod 600 {path}"
                )
            text = f.read(4 * SECRET_BYTES + 2).strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise SnapshotAuthError(f"job secret file {path} does not hold hex digits") from None
        return cls(key, path=path)

    @classmethod
    def from_env(cls) -> JobSecret | None:
        """The secret named by ``PLAIT_SNAPSHOT_SECRET_FILE``, or None when the variable is unset."""
        name = os.environ.get(SECRET_ENV)
        return cls.load(Path(name)) if name else None

    # ------------------------------------------------------------------ proofs

    def token(self, method: str) -> str:
        """The ``plait-auth`` metadata value for one gRPC call of ``method``."""
        stamp, nonce = str(int(time.time())), secrets.token_hex(8)
        return f"{stamp}.{nonce}.{self._grpc_mac(method, stamp, nonce)}"

    def _grpc_mac(self, method: str, stamp: str, nonce: str) -> str:
        return hmac.new(self._key, f"grpc|{method}|{stamp}|{nonce}".encode(), hashlib.sha256).hexdigest()

    def bulk_proof(self, challenge: bytes) -> bytes:
        return hmac.new(self._key, b"bulk|" + challenge, hashlib.sha256).digest()

    def check_bulk_proof(self, challenge: bytes, proof: bytes) -> bool:
        return hmac.compare_digest(self.bulk_proof(challenge), proof)

    def mac(self, *buffers: object) -> bytes:
        """HMAC-SHA256 over the concatenation of ``buffers`` (bytes or anything with the buffer protocol)."""
        h = hmac.new(self._key, digestmod=hashlib.sha256)
        for buf in buffers:
            h.update(buf)  # type: ignore[arg-type]
        return h.digest()


class TokenVerifier:
    """The daemon's check of gRPC tokens, with the nonces of the last window remembered (no replays)."""

    def __init__(self, secret: JobSecret, window_s: float = TOKEN_WINDOW_S):
        self.secret = secret
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._next_purge = 0.0

    def check(self, method: str, token: str | None) -> str | None:
        """None if ``token`` proves the secret for ``method``; otherwise why not (for the refusal)."""
        if not token:
            return "no plait-auth token: the caller does not have the job's secret (PLAIT_SNAPSHOT_SECRET_FILE)"
        parts = token.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return "malformed plait-auth token"
        stamp, nonce, mac = parts
        if not hmac.compare_digest(self.secret._grpc_mac(method, stamp, nonce), mac):
            return "wrong plait-auth token: the caller's secret is not this job's"
        now = time.time()
        if abs(now - int(stamp)) > self.window_s:
            return f"plait-auth token from {int(now - int(stamp))} s away; clocks must agree within {self.window_s:.0f} s"
        with self._lock:
            if now > self._next_purge:
                self._seen = {n: t for n, t in self._seen.items() if t > now}
                self._next_purge = now + self.window_s / 10
            if nonce in self._seen:
                return "replayed plait-auth token"
            self._seen[nonce] = now + 2 * self.window_s
        return None
