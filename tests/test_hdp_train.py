"""Hybrid data parallelism in ``plait train``: the config's rules, and real runs against plain PyTorch.

The reference is a plain PyTorch loop on one process (every document alone, ``torch.optim.AdamW``),
nothing of plait's engine; the runs are ``plait train`` on 4 gloo processes with a token budget
small enough that most documents are split over blocks of ranks.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from plait.errors import ConfigError
from plait.runtime.config import load_config

CONFIG = """
model: {kind: gpt, layers: 2, dim: 32, heads: 4, ffn_dim: 64, vocab: 256, seq_len: 64}
train: {steps: 4, global_batch: 8, micro_batch: 1, lr: 3.0e-3, warmup_steps: 1, seed: 7, eval_every: 0, eval_batches: 1}
data: {max_bytes: 400000, packing: documents}
metrics: {enabled: false}
parallel: {hybrid_dp: true, hdp_budget: 16}
snapshot: {every: 2, disk_every: 1, keep_disk: 2, dir: SHARED}
"""
HYBRID = ["parallel.hybrid_dp=true", "data.packing=documents"]


def plait(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "plait.runtime.cli", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done


@pytest.mark.parametrize("sets,key,text", [
    (["data.packing=documents"], "data.packing", "parallel.hybrid_dp=true"),
    (["parallel.hybrid_dp=true"], "parallel.hybrid_dp", "data.packing=documents"),
    ([*HYBRID, "parallel.cp=2"], "parallel.cp", "parallel.cp=1"),
    ([*HYBRID, "parallel.tp=2", "model.seq_len=132"], "model.seq_len", "multiple of 8"),
    ([*HYBRID, "model.seq_len=36"], "model.seq_len", "multiple of 8"),
    ([*HYBRID, "data.max_len=256"], "data.max_len", "at most 128"),
    ([*HYBRID, "parallel.hdp_budget=16"], "parallel.hdp_budget", "at least 32"),
    ([*HYBRID, "train.global_batch=10"], "train.global_batch", "multiple of dp = 4"),
    ([*HYBRID, "parallel.hdp_budget=-1"], "parallel.hdp_budget", "positive number of tokens"),
    ([*HYBRID, "data.max_len=-3"], "data.max_len", "positive number of tokens"),
])
def test_bad_hybrid_configs_name_the_key_and_the_fix(sets, key, text):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.seq_len=128", "train.global_batch=8", *sets], nproc=4)
    assert err.value.key == key and text in str(err.value)


def test_a_world_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(ConfigError, match="power of two") as err:
        load_config(None, [*HYBRID, "train.global_batch=6"], nproc=3)
    assert err.value.key == "launch.nproc"


def test_documents_steps_need_no_micro_batch_multiple():
    config = load_config(None, [*HYBRID, "train.global_batch=4", "train.micro_batch=2"], nproc=4)  # 4 < 2 × dp
    assert config.max_len() == config.model.seq_len and config.hdp_budget() == 2 * config.model.seq_len


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hdp")
    shared = root / "shared"
    config = root / "hdp.yaml"
    config.write_text(CONFIG.replace("SHARED", str(shared)))
    a = root / "a"
    plait("train", "--config", str(config), "--nproc", "4", "--run-dir", str(a))
    return {"config": config, "a": a, "shared": shared, "summary": json.loads((a / "summary.json").read_text())}


def test_four_ranks_train_like_plain_pytorch_on_one_process(runs):
    from plait.bench.hdp import plain_losses

    summary = runs["summary"]
    assert summary["status"] == "completed" and summary["steps"] == 4
    plain = plain_losses(4, runs["config"])
    for got, want in zip(summary["losses"], plain, strict=True):
        # the same sums in another order over 4 ranks (and AdamW's fused vs single-tensor kernels): rounding only
        assert got == pytest.approx(want, rel=1e-5)
    # the budget of 16 tokens splits documents over blocks of 2 and 4 ranks every step
    assert all(b["split"] > 0 for b in summary["balance"]) and max(b["largest_block"] for b in summary["balance"]) == 4
    for b in summary["balance"]:
        assert b["predicted"] >= 1.0 and b["measured"] >= 1.0 and len(b["compute_s"]) == 4
    # tokens are the documents' own, not global_batch × seq_len
    from plait.runtime.data import load_corpus
    from plait.runtime.documents import DocumentLoader, document_pieces

    cfg = load_config(runs["config"], nproc=4)
    corpus = load_corpus(cfg.data)
    loader = DocumentLoader(corpus.train, document_pieces(corpus.train_files, cfg.max_len()), global_batch=8, seed=7,
                            max_len=cfg.max_len())
    assert summary["tokens"] == sum(sum(loader.step_lengths(s)) for s in range(4))


def test_a_run_of_documents_resumes_bitwise_from_its_checkpoint(runs, tmp_path):
    from plait.runtime.snapshot.checkpoint import paths

    run_id = paths.read_run(runs["a"]).run_id
    step2 = paths.step_dir(runs["shared"], run_id, 2)
    b = tmp_path / "b"
    done = plait("train", "--config", str(runs["config"]), "--nproc", "4", "--run-dir", str(b), "--resume", str(step2))
    assert "resuming from step 2" in done.stdout
    resumed = json.loads((b / "summary.json").read_text())
    assert resumed["losses"][2:] == runs["summary"]["losses"][2:]  # the loader's cursor and the model: exact
    # the cost as refitted after steps 1 and 2 travels with the checkpoint: 4 ranks' seconds per step
    from plait.runtime.snapshot.checkpoint.read import rank_objects

    objects = rank_objects(paths.in_run(runs["a"], step=2, flag="--resume"), 0, flag="--resume")
    balance = objects["balance"]
    from plait.parallel.hdp import calibration_rows

    assert len(balance["observed"]) == 2 * 4 and len(balance["anchors"]) == len(calibration_rows(64))
    assert min(balance["cost"]) >= 0
    assert all(sec > 0 for *_, sec in balance["observed"])


@pytest.mark.parametrize("model", [[], ["model.kind=moe", "model.aux_loss_coef=0.05"], ["parallel.tp_overlap=true"]],
                         ids=["gpt", "moe-aux", "gpt-tp-overlap"])
def test_tensor_parallelism_around_hybrid_dp_trains_like_plain_pytorch(runs, tmp_path, model):
    """tp 2 × a dp space of 2: every row (split or packed) padded to a multiple of tp and cut sequence-parallel; a
    document's expert counts are summed over tp (each tp rank routes its part of the row) and over its block."""
    from plait.bench.hdp import plain_run

    run = tmp_path / "tp2"
    plait("train", "--config", str(runs["config"]), "--nproc", "4", "--run-dir", str(run), "--set", "parallel.tp=2",
          "parallel.hdp_budget=32", "snapshot.every=0", "snapshot.disk_every=0", *model)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["parallel"]["tp"] == 2 and summary["parallel"]["dp"] == 2
    assert any(b["split"] for b in summary["balance"])
    plain = plain_run(4, runs["config"], model)
    for got, want in zip(summary["losses"], plain["losses"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    for got, want in zip(summary["aux_losses"], plain["aux_losses"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("sets", [
    # experts over ep 2 × edp 2 and pipeline stages: every rank makes every round's call; the balancing loss is
    # each document's own (its expert counts summed over the block that splits it)
    ["model.kind=moe", "model.aux_loss_coef=0.05", "parallel.ep=2", "parallel.pp=2", "parallel.hdp_budget=32"],
    # the interleaved schedule: calls padded to a multiple of pp micro-batches; replicated optimizer state
    ["model.layers=4", "parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved", "parallel.hdp_budget=32",
     "parallel.zero=false"],
], ids=["moe-ep2-pp2", "pp2-vpp2-replicated"])
def test_expert_and_pipeline_parallelism_around_hybrid_dp_train_like_plain_pytorch(runs, tmp_path, sets):
    """Padding calls themselves are checked in test_hdp (a plan that needs them, against plain PyTorch)."""
    from plait.bench.hdp import plain_run

    run = tmp_path / "run"
    plait("train", "--config", str(runs["config"]), "--nproc", "4", "--run-dir", str(run), "--set", *sets,
          "snapshot.every=0", "snapshot.disk_every=0")
    summary = json.loads((run / "summary.json").read_text())
    for key in ("ep", "pp", "tp"):
        want = next((int(s.split("=")[1]) for s in sets if s.startswith(f"parallel.{key}=")), 1)
        assert summary["parallel"][key] == want
    # every document of a step is split over the dp space of 2 (64 tokens, a budget of 32): one call each
    assert all(b["split"] == 8 and b["calls"] == 8 and b["padding_calls"] == 0 for b in summary["balance"])
    model = [s for s in sets if s.startswith("model.")]
    plain = plain_run(4, runs["config"], model)
    for got, want in zip(summary["losses"], plain["losses"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    for got, want in zip(summary["aux_losses"], plain["aux_losses"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)  # 0.0 for the dense model on both sides


def test_lsh_auto_under_hybrid_dp_measures_each_call(runs, tmp_path):
    """ep_compress=auto around hybrid DP: the timed step's measures are per forward call (a call is the micro-batch),
    not per step: a rank's call holds at most the budget's 32 tokens, so at most top_k × 32 copies per layer."""
    run = tmp_path / "lsh"
    plait("train", "--config", str(runs["config"]), "--nproc", "4", "--run-dir", str(run), "--set", "model.kind=moe",
          "model.aux_loss_coef=0", "parallel.ep=2", "parallel.hdp_budget=32", "parallel.ep_compress=auto",
          "parallel.lsh.probe_every=2", "parallel.lsh.auto_steps=1", "train.steps=3", "snapshot.every=0",
          "snapshot.disk_every=0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["balance"][0]["calls"] > 1
    layers = summary["lsh_auto"]["layers"]
    assert len(layers) == 2
    for d in layers:
        assert 0 < d["copies"] <= 2 * 32 and 0 < d["ratio"] <= 1 and d["compress"] == (d["saved_ms"] > d["cost_ms"])
    assert [e["step"] for e in summary["lsh"]] == [1, 2, 3]
    first, timed = summary["lsh"][:2]  # step 1 (a warm-up) and step 2 (timed) run every layer compressed
    assert all(0.5 < f <= 1 + 1e-9 for f in first["fidelity"]) and all(r < 1 for r in first["ratio"])
    # the decision's ratio is the timed step's (there as centroids / copies, here as their per-call means' ratio)
    assert timed["ratio"] == pytest.approx([d["ratio"] for d in layers], rel=1e-12)
    for e in summary["lsh"][2:]:  # then each layer as decided: a layer left uncompressed sends every copy
        assert all((0 < r <= 1) if d["compress"] else (r == 1.0) for r, d in zip(e["ratio"], layers))
