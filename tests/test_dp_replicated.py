"""Replicated optimizer state (``parallel.zero: false``) on real gloo ranks: what it holds, and what it saves.

The planner's memory model (:func:`plait.scheduler.memory.rank_memory`) says what each mode keeps alive between
steps: parameters, gradient buffers and optimizer state. Here the live storages of a real ``ShardedAdamW`` after a
step, counted once each (a view shares its base's storage), are held to it for both modes on 2 ranks of the demo
model's shape: ZeRO-1 keeps a shard, two moments and a reduce-scattered gradient per bucket (4·⌈b/g⌉), replicated
state keeps the two moments of everything (2·b), its parameters being views of the flat copy AdamW updates and
their ``.grad`` views of the flat gradient buffer. Only padding to a multiple of the group may add to the
model's figure.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

from plait.runtime.config import model_spec
from plait.runtime.models import ModelConfig
from plait.scheduler.comm_volume import Layout
from plait.scheduler.memory import rank_memory

MODEL = dict(kind="moe", layers=2, dim=32, heads=4, ffn_dim=48, vocab=64, seq_len=16, experts=4, top_k=2)


def live_bytes(rank: int, world: int, zero: bool) -> dict:
    from plait.parallel.dp import AdamWSettings, ShardedAdamW
    from plait.parallel.mesh import ParallelMeshes
    from plait.runtime.models import build_model
    from plait.scheduler.dims import ParallelDims

    meshes = ParallelMeshes(ParallelDims.resolve(world))
    torch.manual_seed(0)
    model = build_model(ModelConfig(**MODEL))
    groups = {label: meshes.group(label) for label in ("dp+cp", "dp+cp+tp", "edp")}
    opt = ShardedAdamW(list(model.named_parameters()), groups, meshes.group("world"), AdamWSettings(), zero=zero)
    tokens = torch.randint(0, MODEL["vocab"], (2, MODEL["seq_len"]), generator=torch.Generator().manual_seed(rank))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    opt.step(1e-3, 1.0)
    storages: dict[int, int] = {}
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    for b in opt.buckets:
        tensors += [b.shard, b.grad_flat, b.grad_shard]
        tensors += [v for v in opt.optimizer.state[b.shard].values() if v.numel() > 1]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    first = next(iter(opt.buckets[0].params))
    return {"bytes": sum(storages.values()), "buckets": len(opt.buckets), "params": [p.detach().clone() for p in model.parameters()],
            "view": first.untyped_storage().data_ptr() == opt.buckets[0].shard.untyped_storage().data_ptr()}


@pytest.mark.parametrize("zero", [True, False], ids=["zero1", "replicated"])
def test_live_state_is_what_the_memory_model_says(zero):
    world = 2
    ranks = run_distributed(live_bytes, world=world, args=(zero,), timeout=120)
    (mem,) = rank_memory(model_spec(ModelConfig(**MODEL)), Layout(world=world, dp=world, edp=world), global_batch=4,
                         micro_batch=2, zero=zero)
    static = mem.params + mem.grads + mem.optimizer
    for got in ranks:
        assert got["view"] is (not zero)  # replicated: the parameters live inside the optimizer's flat copy
        # padding: each bucket is padded to a multiple of the group (< g elements), held by the flat gradient, and
        # by the shard, its gradient and the moments (ZeRO-1: one element each) or by all four flat copies
        slack = 4 * got["buckets"] * (world - 1) * (1 if zero else 4)
        assert static <= got["bytes"] <= static + slack, (got["bytes"], static)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # the replicas agree to the bit after the update


# --------------------------------------------------------------------------- checkpoints of real runs

CONFIG = """
model: {kind: gpt, layers: 2, dim: 32, heads: 4, ffn_dim: 64, vocab: 256, seq_len: 32}
train: {steps: 4, global_batch: 4, micro_batch: 2, lr: 3.0e-3, warmup_steps: 1, seed: 7, eval_every: 0, eval_batches: 1}
data: {max_bytes: 200000}
metrics: {enabled: false}
parallel: {zero: false}
snapshot: {every: 2, disk_every: 1, keep_disk: 2, dir: SHARED}
"""


def plait(*args: str):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "plait.runtime.cli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done


def test_a_replicated_checkpoint_resumes_bitwise_and_into_zero1(tmp_path):
    """Replicated state is written once per group (its rank 0) and read back by either mode.

    The same mode continues bitwise. ZeRO-1 continues from the same parameters (step 3's loss is the same
    number) and the same moments: step 4 follows one update whose only difference is the norm's rounding
    (float32 against float64 sums, ~1e-7 relative; Adam divides most of it out), far inside 1e-5. Moments that
    were lost or written twice would make step 3's update a different one.
    """
    import json

    from plait.runtime.snapshot.checkpoint import paths

    config = tmp_path / "replicated.yaml"
    config.write_text(CONFIG.replace("SHARED", str(tmp_path / "shared")))
    plait("train", "--config", str(config), "--nproc", "2", "--run-dir", str(tmp_path / "r"))
    first = json.loads((tmp_path / "r" / "summary.json").read_text())
    step2 = paths.step_dir(tmp_path / "shared", paths.read_run(tmp_path / "r").run_id, 2)
    from concurrent.futures import ThreadPoolExecutor

    def resume(name: str, *sets: str) -> dict:
        plait("train", "--config", str(config), "--nproc", "2", "--run-dir", str(tmp_path / name), "--resume",
              str(step2), "--set", f"snapshot.dir={tmp_path / name / 'own'}", *sets)
        return json.loads((tmp_path / name / "summary.json").read_text())

    with ThreadPoolExecutor(2) as pool:  # both resumes side by side
        futures = {"same": pool.submit(resume, "same"), "zero1": pool.submit(resume, "zero1", "parallel.zero=true")}
        runs = {name: f.result() for name, f in futures.items()}
    assert runs["same"]["losses"] == first["losses"] and runs["same"]["grad_norms"] == first["grad_norms"]
    z = runs["zero1"]["losses"]
    assert z[:3] == first["losses"][:3]
    assert abs(z[3] - first["losses"][3]) <= 1e-5 * abs(first["losses"][3]), (z, first["losses"])
