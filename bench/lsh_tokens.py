"""LSH compression against the number of tokens a rank sends: at which token count does it reach LSH-MoE's ≤ 25 %?

A bucket holds the copies of one expert segment whose keys are equal, so the ratio (centroids /
copies) falls as a rank sends more copies per expert: more of them land in a bucket that is
already occupied. The demo's micro-step is small (8 sequences of 128 tokens per rank, 2,048
copies over 4 experts), and `plait bench lsh` measured 51–66 % there. LSH-MoE's 20 % came from
far larger micro-batches. This benchmark measures the ratio at growing token counts on the
hidden states of a trained model, and what it costs in fidelity.

1. ``plait train`` of the demo config with experts over 4 ranks (``parallel.ep=4``,
   uncompressed), 300 steps (``--quick``: 20), whose last step goes to a disk checkpoint;
   ``plait export`` turns it into one state dict.
2. For each scale s, one rank's micro-step of 8·s training windows (drawn as training draws
   them; 1,024·s tokens) runs through the model in one process. At every MoE layer the copies
   are routed, sorted by expert and hashed exactly as the expert-parallel dispatcher does with
   ``parallel.ep_compress=lsh`` (:class:`plait.parallel.ep_lsh.Hasher`: centred, 6 hashes, dim
   64; with ep = 4 each of the 4 experts is one segment), and reduced to bucket centroids.
   Reported per layer: the ratio, and the fidelity, the mean cosine similarity of each copy's
   expert output computed on its centroid to its exact output (what the training run's probe
   measures). The same with coarse codes (``parallel.lsh.dim=4``).

The ratio is a property of the hashing and the hidden states, so one process measures it
exactly as the dispatcher would (no timing here). A held-out loss at the large scales would
need a training run at those micro-batch sizes; the fidelity is the proxy, and `plait bench
lsh` relates the two at the demo's scale (fidelity 0.995–0.999 kept the loss within 0.14 %).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

NAME = "lsh_tokens"
REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"
SCALES = (1, 2, 4, 8, 16, 32, 64)
QUICK_SCALES = (1, 4)
TARGET = 0.25
RUN_TIMEOUT_S = 3600


def _trained_model(work: Path, steps: int) -> Path:
    """Train the demo (ep = 4, uncompressed) and export its last step; returns the state dict's path."""
    run_dir, out = work / "train", work / "model.pt"
    cmd = [sys.executable, "-m", "plait.runtime.cli", "train", "--config", str(DEMO), "--run-dir", str(run_dir),
           "--nproc", "4", "--set", f"train.steps={steps}", "train.eval_every=0", "parallel.ep=4",
           f"snapshot.every={steps}", "snapshot.disk_every=1"]
    for step in (cmd, [sys.executable, "-m", "plait.runtime.cli", "export", str(run_dir), "--out", str(out)]):
        done = subprocess.run(step, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(step[2:5])} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return out


def layer_inputs(model, tokens) -> list:
    """The input of every MoE layer ([N, dim], flattened over the batch) for ``tokens`` [B, T]."""
    import torch

    from plait.runtime.models.moe import MoE

    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
             for m in model.modules() if isinstance(m, MoE)]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return captured


def compress(moe, x, hasher) -> dict[str, float]:
    """One rank's copies of the tokens ``x`` through ``moe``, hashed and reduced as the dispatcher does."""
    import torch
    import torch.nn.functional as F

    from plait.ops.lsh import bucket_reduce, bucket_scatter

    with torch.no_grad():
        routing = moe.route(x)
        xs, perm = moe.permute(x, routing.indices)
        buckets = bucket_reduce(xs, hasher.keys(xs), perm.counts)
        exact = moe.experts(xs, perm.counts)
        approx = bucket_scatter(moe.experts(buckets.centroids, buckets.segment_centroids), buckets.index)
        cos = F.cosine_similarity(approx.double(), exact.double(), dim=-1, eps=1e-12)
    return {"copies": xs.shape[0], "centroids": buckets.centroids.shape[0],
            "ratio": buckets.centroids.shape[0] / xs.shape[0], "fidelity": float(cos.mean())}


def measure(model, batches: dict[int, Any], settings: dict[str, Any]) -> list[dict]:
    """For each scale's tokens [B, T], every MoE layer's ratio and fidelity under each LSH setting."""
    from plait.parallel.config import LSHConfig
    from plait.parallel.ep_lsh import Hasher
    from plait.runtime.models.moe import MoE

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    hidden = moes[0].router.in_features
    hashers = {name: Hasher(LSHConfig(**kw), hidden) for name, kw in settings.items()}
    rows = []
    for scale, tokens in batches.items():
        inputs = layer_inputs(model, tokens)
        row: dict[str, Any] = {"scale": scale, "sequences": tokens.shape[0], "tokens": tokens.numel()}
        for name, hasher in hashers.items():
            layers = [compress(moe, x, hasher) for moe, x in zip(moes, inputs)]
            row[name] = {"layers": layers, "ratio": sum(r["centroids"] for r in layers) / sum(r["copies"] for r in layers),
                         "fidelity": statistics.fmean(r["fidelity"] for r in layers)}
        rows.append(row)
        parts = []
        for n in settings:
            per_layer = ", ".join(f"{r['ratio']:.2f}" for r in row[n]["layers"])
            parts.append(f"{n} ratio {row[n]['ratio']:.3f} (layers {per_layer}), fidelity {row[n]['fidelity']:.4f}")
        print(f"lsh_tokens: {row['tokens']:>6} tokens per rank: " + "; ".join(parts), flush=True)
    return rows


def first_reaching(rows: list[dict], name: str, target: float = TARGET) -> dict | None:
    for row in rows:
        if row[name]["ratio"] <= target:
            return {"tokens": row["tokens"], "ratio": row[name]["ratio"], "fidelity": row[name]["fidelity"]}
    return None


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from plait.runtime.config import load_config
    from plait.runtime.data import SequenceLoader, load_corpus
    from plait.runtime.models import build_model

    config = load_config(DEMO, [])
    steps = 20 if quick else 300
    scales = QUICK_SCALES if quick else SCALES
    per_rank = config.train.micro_batch  # sequences of one rank's micro-step (train.micro_batch is per rank)
    with tempfile.TemporaryDirectory(prefix="plait-bench-lsh-tokens-") as tmp:
        state = torch.load(_trained_model(Path(tmp), steps), weights_only=True)
    torch.manual_seed(0)
    model = build_model(config.model)
    model.load_state_dict(state)
    model.eval()
    corpus = load_corpus(config.data)
    batches = {}
    for scale in scales:
        loader = SequenceLoader(corpus.train, seq_len=config.model.seq_len, global_batch=per_rank * scale,
                                seed=config.train.seed + scale)
        batches[scale] = loader.next_batch()[0]
    settings = {"default": {}, "coarse_dim4": {"dim": 4}}
    rows = measure(model, batches, settings)
    reach = {name: first_reaching(rows, name) for name in settings}
    return {"steps": steps, "per_rank_sequences_at_scale_1": per_rank, "seq_len": config.model.seq_len,
            "ep": 4, "experts": config.model.experts, "top_k": config.model.top_k, "target_ratio": TARGET,
            "settings": settings, "scales": rows, "reaches_target": reach}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
