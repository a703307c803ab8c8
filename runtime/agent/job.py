"""What every node of a multi-node job must agree on, set once by the node hosting the store.

The leader (the agent that hosts the rendezvous store) writes the run directory's
``config.yaml`` and ``run.json`` and publishes them with the job's name; every other
node checks that its own resolved config is the same (a node started from another file
or with other ``--set`` would train another model) and writes the same files into its
run directory. A node that joins later (a replacement after a node failure) adopts
them the same way.

The snapshot secret never crosses the store (anyone who reaches the rendezvous port could
read it): followers use ``$PLAIT_SNAPSHOT_SECRET_FILE`` or the leader's ``<run dir>/secret``
on a shared filesystem, and prove it is the same through a fingerprint.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from plait.errors import LaunchError
from plait.runtime.agent.rendezvous import wait_key

JOB_KEY = "plait/job"


@dataclass(frozen=True)
class JobRecord:
    config: str  # the resolved config.yaml
    run: dict  # run.json
    job: str  # the snapshot job name (daemons and shared memory)
    run_dir: str  # the leader's run directory's name (the default for the others)
    secret_fingerprint: str  # HMAC of a fixed message under the job secret, "" without snapshots

    def dumps(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def loads(cls, raw: bytes) -> JobRecord:
        return cls(**json.loads(raw))


def fingerprint(secret_file: Path) -> str:
    from plait.runtime.snapshot.auth import JobSecret

    secret = JobSecret.load(secret_file)
    return hmac.new(secret._key, b"plait job secret fingerprint", hashlib.sha256).hexdigest()[:32]


def publish(store, record: JobRecord) -> None:
    store.set(JOB_KEY, record.dumps())


def adopt(store, *, config_text: str, timeout: float) -> JobRecord:
    """The leader's record; raises LaunchError naming the first config line that differs from ours."""
    record = JobRecord.loads(wait_key(store, JOB_KEY, timeout=timeout, what="the node hosting the rendezvous store "
                                      "to publish the job"))
    if record.config != config_text:
        ours, theirs = config_text.splitlines(), record.config.splitlines()
        line = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        here = ours[line] if line < len(ours) else "(end)"
        there = theirs[line] if line < len(theirs) else "(end)"
        raise LaunchError(f"this node's resolved config differs from the leader's at line {line + 1}: "
                          f"here {here.strip()!r}, there {there.strip()!r}; start every node with the same --config, "
                          "--set and worker counts")
    return record


def follower_secret(run_dir: Path, leader_run_dir: str, want: str, *, timeout: float) -> Path:
    """The secret file a follower shares with the leader: ``$PLAIT_SNAPSHOT_SECRET_FILE``, else ``<run dir>/secret``
    once the leader's appears there (a shared filesystem). Checked against the leader's fingerprint."""
    from plait.runtime.snapshot.auth import SECRET_ENV

    given = os.environ.get(SECRET_ENV)
    path = Path(given) if given else run_dir / "secret"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if given or time.monotonic() > deadline:
            raise LaunchError(f"snapshots need the job's secret on every node: {path} does not exist here; copy the "
                              f"leader's {leader_run_dir}/secret to this node and set {SECRET_ENV} to it, or put "
                              "--run-dir on a filesystem every node shares")
        time.sleep(0.1)
    if fingerprint(path) != want:
        raise LaunchError(f"the job secret in {path} is not the leader's (fingerprints differ); give every node the "
                          f"same file through {SECRET_ENV}")
    return path
