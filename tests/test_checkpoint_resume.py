"""Disk checkpoints of real runs (`plait train`, gloo on CPU): scoped to a run, last step kept, resumable, exported.

One tp2 run ("A") writes to a shared ``snapshot.dir``; a one-process run ("B") resumes
from A's step 2 into the same directory. Same layout continues bitwise; another layout
continues within rounding (see ``test_another_layout_resumes_within_rounding``).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from plait.errors import CheckpointCorrupt, CheckpointMismatch, IncompleteCheckpoint, NoCheckpoint
from plait.runtime.config import load_config
from plait.runtime.snapshot.checkpoint import paths
from plait.runtime.snapshot.checkpoint.export import check_resume, export, model_state

# A dense model: the layouts are compared within rounding, and a dense model has no routing near-ties to flip.
CONFIG = """
model: {kind: gpt, layers: 2, dim: 32, heads: 4, ffn_dim: 64, vocab: 256, seq_len: 32}
train: {steps: 4, global_batch: 4, micro_batch: 2, lr: 3.0e-3, warmup_steps: 1, seed: 7, eval_every: 0, eval_batches: 1}
data: {max_bytes: 200000}
metrics: {enabled: false}
parallel: {tp: 2}
snapshot: {every: 2, disk_every: 1, keep_disk: 2, dir: SHARED}
"""


def plait(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "plait.runtime.cli", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    shared = root / "shared"
    config = root / "dense.yaml"
    config.write_text(CONFIG.replace("SHARED", str(shared)))
    run_a = root / "runs" / "a"
    plait("train", "--config", str(config), "--nproc", "2", "--run-dir", str(run_a))
    return {"root": root, "shared": shared, "config": config, "a": run_a,
            "a_id": paths.read_run(run_a).run_id, "a_summary": json.loads((run_a / "summary.json").read_text())}


def test_a_finished_run_keeps_its_last_step_on_disk(setup):
    """Defect: a 4-step run with snapshot.every=2 disk_every=1 kept only step 2 (no snapshot at the last step)."""
    steps = [c.step for c in paths.complete_checkpoints(setup["shared"], setup["a_id"])]
    assert steps == [2, 4]
    manifest = paths.read_manifest(paths.step_dir(setup["shared"], setup["a_id"], 4))
    assert manifest["run_id"] == setup["a_id"] and manifest["world"] == 2 and manifest["layout"][3] == 2  # tp 2


@pytest.fixture(scope="module")
def run_b(setup) -> dict:
    """One process, resumed from A's step 2 into A's shared snapshot.dir, keeping only 1 checkpoint."""
    step2 = paths.step_dir(setup["shared"], setup["a_id"], 2)
    run = setup["root"] / "runs" / "b"
    done = plait("train", "--config", str(setup["config"]), "--nproc", "1", "--run-dir", str(run), "--resume", str(step2),
                 "--set", "parallel.tp=1", "snapshot.keep_disk=1")
    assert "resuming from step 2" in done.stdout and "from the checkpoint given to --resume" in done.stdout
    return {"dir": run, "id": paths.read_run(run).run_id, "summary": json.loads((run / "summary.json").read_text())}


def test_runs_sharing_a_snapshot_dir_never_prune_or_list_each_others_checkpoints(setup, run_b):
    """Defect: every run wrote step-<S> straight into snapshot.dir: B's step 4 overwrote A's, B's pruning deleted A's."""
    assert run_b["id"] != setup["a_id"]
    assert [c.step for c in paths.complete_checkpoints(setup["shared"], run_b["id"])] == [4]  # keep_disk=1: its own pruned
    assert [c.step for c in paths.complete_checkpoints(setup["shared"], setup["a_id"])] == [2, 4]  # A's untouched
    for run_id in (setup["a_id"], run_b["id"]):
        manifest = paths.read_manifest(paths.step_dir(setup["shared"], run_id, 4))
        assert manifest["run_id"] == run_id
        for r in range(manifest["world"]):
            marker = json.loads((paths.step_dir(setup["shared"], run_id, 4) / f"rank-{r}.json").read_text())
            assert marker["run_id"] == run_id
    # latest: the most recently started run with a complete checkpoint (B), its newest step
    latest = paths.resolve("latest", flag="--resume", search=[setup["shared"]])
    assert latest.run_id == run_b["id"] and latest.step == 4
    # a run directory: its own newest checkpoint, although B's is newer in the same snapshot.dir
    assert paths.resolve(str(setup["a"]), flag="--resume", search=[]).run_id == setup["a_id"]


def test_another_layout_resumes_within_rounding(setup, run_b):
    """tp2 checkpoint, one process resumed: steps 1-2 are A's history (exact); 3-4 are recomputed in another layout.

    The resumed state is a copy (exact), so the two layouts' step 3 differs only by the
    order of the tp reductions in one forward and backward: the parity tolerance of one
    step (RTOL = 1e-5, tests/parity_checks.py). Step 4 adds one AdamW update of that
    difference, which divides by sqrt(v) and can amplify it: 100× the bound.
    """
    a, b = setup["a_summary"]["losses"], run_b["summary"]["losses"]
    assert run_b["summary"]["status"] == "completed" and len(b) == 4
    assert b[:2] == a[:2]
    assert math.isclose(b[2], a[2], rel_tol=1e-5), (b[2], a[2])
    assert math.isclose(b[3], a[3], rel_tol=1e-3), (b[3], a[3])
    assert b[2] != b[3]


def test_the_same_layout_resumes_bitwise_from_a_copied_step_directory(setup, tmp_path):
    """Resume from a copy of A's step 2 with A's layout: every loss and grad norm bitwise A's."""
    step2 = tmp_path / "copied-step-2"
    shutil.copytree(paths.step_dir(setup["shared"], setup["a_id"], 2), step2)  # a copied step dir still works
    run = tmp_path / "c"
    plait("train", "--config", str(setup["config"]), "--nproc", "2", "--run-dir", str(run), "--resume", str(step2),
          "--set", f"snapshot.dir={tmp_path / 'own'}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["losses"] == setup["a_summary"]["losses"]
    assert summary["grad_norms"] == setup["a_summary"]["grad_norms"]
    assert paths.read_run(run).resume_from == str(step2.resolve())


def test_resume_errors_name_the_flag_and_the_fix(setup, tmp_path):
    config = load_config(setup["config"], nproc=2)
    step2 = paths.step_dir(setup["shared"], setup["a_id"], 2)
    # no checkpoint there: a plain directory, and a run that wrote none
    done = plait("train", "--config", str(setup["config"]), "--nproc", "2", "--run-dir", str(tmp_path / "x"), "--resume",
                 str(tmp_path), check=False)
    assert done.returncode == 2 and "--resume" in done.stderr and "not a run directory" in done.stderr
    assert not (tmp_path / "x").exists()
    with pytest.raises(NoCheckpoint, match="no such directory"):
        check_resume(str(tmp_path / "missing"), config, tmp_path / "y")
    # incomplete: a step directory without its manifest
    partial = tmp_path / "partial" / "step-00000002"
    shutil.copytree(step2, partial)
    (partial / "checkpoint.json").unlink()
    with pytest.raises(IncompleteCheckpoint, match=r"--resume .* incomplete .*rank-0.json, rank-1.json"):
        check_resume(str(partial), config, tmp_path / "y")
    # another model: the parameter is named
    wider = load_config(setup["config"], ["model.ffn_dim=128"], nproc=2)
    with pytest.raises(CheckpointMismatch, match=r"parameter layers\.0\.ffn\.w1\.weight has shape \[64, 32\] in the "
                                                 r"checkpoint and \[128, 32\]"):
        check_resume(str(step2), wider, tmp_path / "y")
    # a damaged file fails its checksum before any worker starts
    damaged = tmp_path / "damaged" / "step-00000002"
    shutil.copytree(step2, damaged)
    data = damaged / "rank-1" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupt, match=r"--resume .* file rank-1/__0_0.distcp does not match the checksum"):
        check_resume(str(damaged), config, tmp_path / "y")


def test_export_writes_the_single_process_state_dict(setup, tmp_path):
    from plait.runtime.models import build_model

    out = tmp_path / "model.pt"
    done = plait("export", str(setup["a"]), "--step", "2", "--out", str(out))
    assert "exported step 2" in done.stdout
    model = build_model(load_config(setup["config"], nproc=2).model)
    model.load_state_dict(torch.load(out))  # strict: exactly the plain model's keys
    reference = model_state(paths.complete_checkpoints(setup["shared"], setup["a_id"])[0])
    for name, t in model.state_dict().items():
        assert torch.equal(t, reference[name]), name
    newest, count = export(setup["a"], step=None, out=tmp_path / "newest.pt")
    assert newest.step == 4 and count == len(model.state_dict())
    with pytest.raises(NoCheckpoint, match="--step 3: .* complete steps: 2, 4"):
        export(setup["a"], step=3, out=tmp_path / "x.pt")
    try:
        import safetensors  # noqa: F401
    except ImportError:
        with pytest.raises(Exception, match="needs the safetensors package .* or give a .pt file"):
            export(setup["a"], step=None, out=tmp_path / "m.safetensors")
    else:
        from safetensors.torch import load_file

        export(setup["a"], step=None, out=tmp_path / "m.safetensors")
        assert sorted(load_file(str(tmp_path / "m.safetensors"))) == sorted(model.state_dict())
