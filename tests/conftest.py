"""Session-wide test setup: a job secret for every daemon and client the tests start."""

from __future__ import annotations

import os

import pytest

from plait.runtime.snapshot.auth import SECRET_ENV, JobSecret


@pytest.fixture(scope="session", autouse=True)
def job_secret(tmp_path_factory: pytest.TempPathFactory) -> JobSecret:
    """Daemons (``--secret-file``) and clients (``DaemonClient``) find it through PLAIT_SNAPSHOT_SECRET_FILE."""
    path = tmp_path_factory.mktemp("secret") / "secret"
    secret = JobSecret.create(path)
    saved = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = str(path)
    yield secret
    if saved is None:
        os.environ.pop(SECRET_ENV, None)
    else:
        os.environ[SECRET_ENV] = saved
