"""The peer of ``plait bench overhead``: a plain, hand-written PyTorch DDP training loop.

Same model, batch, optimizer, clipping and threads as ``plait train`` with the given
config, none of plait's loop, hooks, metrics or loader. Run under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node N bench/ddp_baseline.py CONFIG STEPS OUT [--zero]

``--zero``: the optimizer is torch's ``ZeroRedundancyOptimizer`` over AdamW (ZeRO-1: each
rank updates its share of the parameters, then they are broadcast), the like-for-like peer
of plait's sharded AdamW; the gradients are still DDP's all-reduce.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from plait.runtime.config import load_config
from plait.runtime.data import load_corpus
from plait.runtime.models import build_model


def main() -> None:
    config_path, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    zero = "--zero" in sys.argv[4:]
    cfg = load_config(config_path)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True) if world > 1 else model
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if zero and world > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW, lr=cfg.train.lr,
                                      betas=(cfg.train.beta1, cfg.train.beta2), weight_decay=cfg.train.weight_decay,
                                      fused=True)
        opt.add_param_group(groups[1])
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=True)
    tokens = load_corpus(cfg.data).train
    seq, local = cfg.model.seq_len, cfg.train.global_batch // world
    micro = cfg.train.micro_batch
    coef = cfg.model.aux_loss_coef if cfg.model.kind == "moe" else 0.0
    gen = torch.Generator().manual_seed(cfg.train.seed + rank)
    ends = []
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq - 1, (local,), generator=gen)
        rows = torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()]).long()
        chunks = local // micro
        for i in range(chunks):
            x, y = rows[i * micro : (i + 1) * micro, :-1], rows[i * micro : (i + 1) * micro, 1:]
            ctx = ddp.no_sync() if world > 1 and i < chunks - 1 else torch.enable_grad()
            with ctx:
                loss = F.cross_entropy(ddp(x).float().flatten(0, 1), y.flatten()) + coef * model.aux_loss()
                (loss / chunks).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        ends.append(time.perf_counter())
    if rank == 0:
        result = {"step_times": [b - a for a, b in zip(ends, ends[1:])], "tokens_per_step": cfg.train.global_batch * seq, "last_loss": loss_value}
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    from plait.parallel.teardown import run_and_exit

    run_and_exit(main)
