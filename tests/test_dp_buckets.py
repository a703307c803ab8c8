"""One data-parallel bucket per distinct reduction group, on real gloo ranks.

Labels whose groups hold the same ranks share a bucket (one reduce-scatter and one all-gather per step, not one
per label and weight-decay class); weight decay still reaches the matrices only. The reference is plain PyTorch:
``torch.optim.AdamW`` with a decay group and a no-decay group, stepping on the gradient summed over the ranks.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from torch import nn

STEPS = 3
LR, WD = 0.05, 0.5  # decay large enough to move the matrices well past the tolerance if it went astray


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)  # weight: matrix (decay); bias: vector (no decay)
        self.gain = nn.Parameter(torch.ones(5) + 0.1 * torch.randn(5))  # a norm-like vector
        self.expert = nn.Parameter(torch.randn(5, 4) * 0.3)  # tagged as an expert weight (edp)
        self.dense = nn.Parameter(torch.randn(4, 3) * 0.3)  # tagged as split over tp (dp+cp)
        self.expert._plait_reduce = "edp"
        self.dense._plait_reduce = "dp+cp"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x) * self.gain) @ self.expert @ self.dense


def _batches(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(8, 6, generator=gen) for _ in range(STEPS)]


def sharded_run(rank: int, world: int, tp: int) -> dict:
    from plait.parallel import comm
    from plait.parallel.dp import AdamWSettings, ShardedAdamW
    from plait.parallel.mesh import ParallelMeshes
    from plait.scheduler.dims import ParallelDims

    meshes = ParallelMeshes(ParallelDims.resolve(world, tp=tp))
    torch.manual_seed(0)
    net = Net()
    groups = {label: meshes.group(label) for label in ("dp+cp", "dp+cp+tp", "edp")}
    opt = ShardedAdamW(list(net.named_parameters()), groups, meshes.group("world"),
                       AdamWSettings(lr=LR, weight_decay=WD))
    comm.LEDGER.reset()
    for x in _batches(rank):
        net(x).pow(2).sum().backward()
        opt.step(LR, 0.0)
    return {"buckets": [(b.label, sorted(b.names), b.group.size) for b in opt.buckets],
            "decay_runs": [b.decay_runs for b in opt.buckets],
            "params": {n: p.detach().clone() for n, p in net.named_parameters()},
            "ledger": comm.LEDGER.snapshot()}


def plain_reference(world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = Net()
    matrices = [p for p in net.parameters() if p.ndim >= 2]
    vectors = [p for p in net.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": WD}, {"params": vectors, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    per_rank = [_batches(r) for r in range(world)]
    for step in range(STEPS):
        for r in range(world):  # the sum over ranks of each rank's loss
            net(per_rank[r][step]).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


@pytest.fixture(scope="module")
def dp2() -> list[dict]:
    return run_distributed(sharded_run, 2, args=(1,), timeout=120)


def test_labels_sharing_one_group_share_one_bucket_named_by_the_widest(dp2):
    for got in dp2:
        names = sorted(n for n, _ in Net().named_parameters())
        assert got["buckets"] == [("dp+cp+tp", names, 2)]
        ledger = got["ledger"]["dp+cp+tp"]
        assert ledger["reduce_scatter"]["calls"] == STEPS and ledger["all_gather"]["calls"] == STEPS
        assert set(got["ledger"]) == {"dp+cp+tp", "world"}


def test_decay_runs_cover_exactly_the_owned_matrix_elements(dp2):
    torch.manual_seed(0)
    total = sum(p.numel() for p in Net().parameters())
    matrix = sum(p.numel() for p in Net().parameters() if p.ndim >= 2)
    covered = sum(b - a for got in dp2 for a, b in got["decay_runs"][0])
    assert covered == matrix < total
    for got in dp2:
        runs = got["decay_runs"][0]
        assert all(a < b for a, b in runs) and all(b1 < a2 for (_, b1), (a2, _) in zip(runs, runs[1:]))


def test_the_update_is_plain_adamw_with_decay_on_the_matrices_only(dp2):
    want = plain_reference(2)
    for got in dp2:
        for name, value in want.items():
            # two-rank sums and AdamW's own arithmetic in another order: a few fp32 roundings per step
            torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(0)
    start = dict(Net().named_parameters())
    assert (want["a.weight"] - start["a.weight"]).abs().max() > 1e-2  # the run moved the weights


def test_distinct_groups_keep_distinct_buckets():
    """tp 2 on 2 ranks: dp+cp is one rank per group, dp+cp+tp both; edp (ep·etp = 1) shares dp+cp+tp's."""
    for got in run_distributed(sharded_run, 2, args=(2,), timeout=120):
        labels = [(label, size) for label, _, size in got["buckets"]]
        assert labels == [("dp+cp+tp", 2), ("dp+cp", 1)]
        assert "expert" in got["buckets"][0][1] and got["buckets"][1][1] == ["dense"]
        assert got["ledger"]["dp+cp+tp"]["reduce_scatter"]["calls"] == STEPS and "dp+cp" not in got["ledger"]
