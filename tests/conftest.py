"""Shared pytest setup: a job secret for every snapshot daemon and client the tests start,
and a summary of the CPU kernels the tests ran and of those this CPU lacks, so that a
kernel is never silently untested (the CI machines differ: some have AVX-512, GFNI and
VPCLMULQDQ, some only AVX2)."""

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


_NVCC_TEST = "test_cuda_compile.py::test_cuda_sources_compile_with_nvcc"


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: start nothing for a test that will not run
def pytest_collection_modifyitems(session, config, items):
    """The nvcc test goes last and its compile starts now, in the background at nice 19 (see tests/nvcc_build.py)."""
    nvcc_tests = [item for item in items if item.nodeid.endswith(_NVCC_TEST)]
    if not nvcc_tests:
        return
    for item in nvcc_tests:
        items.remove(item)
        items.append(item)
    import tempfile
    from pathlib import Path

    from nvcc_build import NVCC_COMPILE, BackgroundCompile, find_nvcc

    nvcc = find_nvcc()
    if nvcc is not None:
        config.stash[NVCC_COMPILE] = BackgroundCompile(nvcc, Path(tempfile.mkdtemp(prefix="plait-nvcc-")))


def pytest_sessionfinish(session, exitstatus):
    from nvcc_build import NVCC_COMPILE

    compile_ = session.config.stash.get(NVCC_COMPILE, None)
    if compile_ is not None:
        compile_.stop()  # an interrupted session leaves no nvcc running, and no objects behind


_KERNELS_RAN = pytest.StashKey[dict[str, set[str]]]()


@pytest.fixture
def kernel_ran(request):
    """``kernel_ran(family, name)``: note that this test ran kernel ``name`` of the op
    ``family`` (``gf256_matmul_``, ``crc32c``); also a junit property of the test."""
    ran = request.config.stash.setdefault(_KERNELS_RAN, {})

    def record(family: str, name: str) -> None:
        ran.setdefault(family, set()).add(name)
        request.node.user_properties.append(("kernel", f"{family}:{name}"))

    return record


_FAULT_TRIALS = pytest.StashKey[list[tuple[str, str, str]]]()


@pytest.fixture
def fault_trial(request):
    """``fault_trial(faults, outcome)``: note where a fault trial restored from (listed after the run)."""
    trials = request.config.stash.setdefault(_FAULT_TRIALS, [])

    def record(faults: str, outcome: str) -> None:
        trials.append((request.node.name, faults, outcome))
        request.node.user_properties.append(("restored_from", outcome))

    return record


def _fault_trials_summary(terminalreporter, config) -> None:
    trials = config.stash.get(_FAULT_TRIALS, None)
    if not trials:
        return
    from collections import Counter

    terminalreporter.section(f"fault trials: where {len(trials)} trial(s) restored from")
    for name, faults, outcome in trials:
        terminalreporter.write_line(f"{name}: {faults} -> {outcome}")
    # Per trial, the tier of its last restore (memory, disk), "lost" when it stopped, or "no restore".
    counts = Counter(outcome.rsplit(", ", 1)[-1].split("@")[0].split(":")[0] for _, _, outcome in trials)
    terminalreporter.write_line("totals: " + ", ".join(f"{n} {o}" for o, n in counts.most_common()))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _fault_trials_summary(terminalreporter, config)
    ran = config.stash.get(_KERNELS_RAN, None)
    if not ran:
        return
    import torch

    import plait  # noqa: F401  (registers torch.ops.plait.*)

    listing = {"gf256_matmul_": torch.ops.plait.gf256_matmul_kernels, "crc32c": torch.ops.plait.crc32c_kernels}
    terminalreporter.section("CPU kernels tested")
    for family, names in sorted(ran.items()):
        every, here = listing[family](True), listing[family](False)
        line = f"{family}: ran {', '.join(k for k in every if k in names) or 'none'}"
        lacking = [k for k in every if k not in here]
        if lacking:
            line += f"; not on this CPU: {', '.join(lacking)}"
        not_run = [k for k in here if k not in names]
        if not_run:
            line += f"; runnable here but not run by these tests: {', '.join(not_run)}"
        terminalreporter.write_line(line)
