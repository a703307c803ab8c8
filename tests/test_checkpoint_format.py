"""The disk checkpoint is standard torch.distributed.checkpoint: global names, chunks at global offsets.

Ranks of a real layout (gloo, one process each) write their chunks with no collective; a
fresh interpreter that imports only torch and the plain model builder then fills a
single-process model's ``state_dict()`` with ``dcp.load``, and every value must be
bitwise the engine's own ``full_state_dict()`` (a copy, no arithmetic: nothing may differ).
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import run_distributed

from plait.parallel.slices import flat_range_boxes

MODEL = dict(kind="moe", layers=2, dim=16, heads=2, ffn_dim=32, vocab=64, seq_len=8, experts=4, top_k=2)


def test_a_flat_range_is_tiled_exactly_by_its_boxes():
    rng = random.Random(0)
    for _ in range(300):
        shape = tuple(rng.randint(1, 4) for _ in range(rng.randint(0, 4)))
        n = int(torch.tensor(shape).prod()) if shape else 1
        lo = rng.randint(0, n)
        hi = rng.randint(lo, n)
        seen = torch.zeros(shape, dtype=torch.int64)
        flat = torch.arange(n).reshape(shape)
        for offsets, sizes, start in flat_range_boxes(shape, lo, hi):
            box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            seen[box] += 1
            count = int(torch.tensor(sizes).prod()) if sizes else 1
            # each box is the contiguous flat elements [start, start + count)
            assert torch.equal(flat[box].reshape(-1), torch.arange(start, start + count))
        expect = torch.zeros(n, dtype=torch.int64)
        expect[lo:hi] = 1
        assert torch.equal(seen.reshape(-1), expect), (shape, lo, hi)
        assert len(flat_range_boxes(shape, lo, hi)) <= max(1, 2 * len(shape) - 1)


def _engine(rank: int, world: int, parallel: dict, base: str):
    import yaml

    from plait.runtime.build import build_engine
    from plait.runtime.config import load_config

    cfg = Path(base) / f"layout-{rank}.yaml"
    cfg.write_text(yaml.safe_dump({"model": MODEL, "parallel": parallel,
                                   "train": {"global_batch": 8, "micro_batch": 2, "seed": 3}}))
    return build_engine(load_config(cfg, nproc=world), world, torch.device("cpu"))


def _write_then_read(rank: int, world: int, parallel: dict, read_as: dict, base: str) -> tuple:
    """Train 2 steps in layout ``parallel``, write its checkpoint, read it into layout ``read_as``: both full states."""
    import torch.distributed as dist

    from plait.runtime.snapshot.checkpoint.paths import complete_checkpoints
    from plait.runtime.snapshot.checkpoint.read import read_local_tensors

    written = _write_layout(rank, world, parallel, base)
    dist.barrier()  # every rank's marker is there: the last one to write finished the step
    engine = _engine(rank, world, read_as, base)
    (checkpoint,) = complete_checkpoints(Path(base), "run-a")
    engine.load_local_tensors(read_local_tensors(engine, checkpoint))
    return written, engine.full_state_dict()


def _write_layout(rank: int, world: int, parallel: dict, base: str) -> dict | None:

    from plait.parallel.slices import global_shapes, local_slices
    from plait.runtime.snapshot.auth import JobSecret
    from plait.runtime.snapshot.checkpoint.paths import RunInfo
    from plait.runtime.snapshot.checkpoint.read import layout_of
    from plait.runtime.snapshot.checkpoint.write import CheckpointWriter
    from plait.runtime.snapshot.trainer.blob import plan

    engine = _engine(rank, world, parallel, base)
    g = torch.Generator().manual_seed(5)
    for step in range(2):
        batch = torch.randint(0, MODEL["vocab"], (8, MODEL["seq_len"] + 1), generator=g)
        engine.train_step(batch[:, :-1], batch[:, 1:], 1e-2)
    secret = JobSecret(b"k" * 32)
    blob_plan = plan(engine.local_tensors(), {"step": 2})
    blob = torch.empty(blob_plan.size, dtype=torch.uint8)
    blob_plan.write(blob, secret)
    writer = CheckpointWriter(Path(base), run=RunInfo("run-a", 1.0), rank=rank, world=world,
                              slices=local_slices(engine), layout=layout_of(engine), params=global_shapes(engine),
                              secret=secret)
    writer.save(2, blob)
    return engine.full_state_dict()


PLAIN_LOAD = """
import sys, torch
import torch.distributed.checkpoint as dcp
from plait.runtime.models import ModelConfig, build_model

model = build_model(ModelConfig(**eval(sys.argv[3])))
state = model.state_dict()
dcp.load(state, checkpoint_id=sys.argv[1])
moments = {f"optim.{m}.{n}": torch.empty_like(t) for n, t in state.items() for m in ("exp_avg", "exp_avg_sq")}
moments["optim.step"] = torch.empty(())
dcp.load(moments, checkpoint_id=sys.argv[1])
model.load_state_dict(state)  # strict: every key of the plain model, nothing else
loaded = sorted(m for m in sys.modules if m.startswith(("plait.parallel", "plait.runtime.snapshot")))
assert not loaded, loaded
torch.save({"model": state, "moments": moments}, sys.argv[2])
"""


PP_EP = {"pp": 2, "ep": 2}  # stages; experts split over ep; dense moments ZeRO-split over dp 2, across parameters
TP_ETP = {"tp": 2, "etp": 2}  # attention split over tp, experts' hidden size over etp; replicas written once


@pytest.mark.parametrize("world, parallel, read_as", [(4, PP_EP, TP_ETP), (4, TP_ETP, PP_EP)],
                         ids=["pp2-ep2-dp2", "tp2-etp2-edp2"])
def test_plain_dcp_load_fills_a_single_process_model_from_any_layout(tmp_path, world, parallel, read_as):
    """Also: the other layout reads it (each rank its own boxes, no collective) into the same full state, bitwise."""
    full, read_back = run_distributed(_write_then_read, world, args=(parallel, read_as, str(tmp_path)), timeout=180)[0]
    for part in ("model", "optimizer"):
        assert _same_tensors(read_back[part], full[part]), part
    step_dir = tmp_path / "run-a" / "step-00000002"
    assert (step_dir / "checkpoint.json").exists() and (step_dir / ".metadata").exists()
    out = tmp_path / "plain.pt"
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(step_dir), str(out), repr(MODEL)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = torch.load(out)
    assert sorted(plain["model"]) == sorted(full["model"])
    for name, t in full["model"].items():
        assert torch.equal(plain["model"][name], t), name
        assert torch.equal(plain["moments"][f"optim.exp_avg.{name}"], full["optimizer"]["exp_avg"][name]), name
        assert torch.equal(plain["moments"][f"optim.exp_avg_sq.{name}"], full["optimizer"]["exp_avg_sq"][name]), name
    assert float(plain["moments"]["optim.step"]) == full["optimizer"]["step"] == 2.0


def _same_tensors(a, b) -> bool:
    if isinstance(a, dict):
        return sorted(a) == sorted(b) and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b
