"""Gradients reduce-scattered piece by piece during the backward pass (``parallel.grad_overlap``), on real gloo ranks.

A piece starts when every gradient in it is final, in one order on every rank; the step then starts what is
left and waits. The reduced gradients and the update must be those of one reduce-scatter per bucket after the
backward pass, bit for bit (two ranks: each element is one sum of two numbers either way), and the ledger must
record the same bytes.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from torch import nn

PIECE = 8  # elements: every bucket is cut into many pieces, and parameters straddle piece boundaries


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)
        self.early = nn.Parameter(torch.randn(3, 3) * 0.1)  # used by the first micro-step only
        self.never = nn.Parameter(torch.randn(6))  # no gradient at all

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x)))
        return y @ self.early if first else y


def overlap_step(rank: int, world: int, piece: int, overlap: bool, zero: bool = True) -> dict:
    from plait.parallel import comm
    from plait.parallel.dp import AdamWSettings, ShardedAdamW
    from plait.parallel.mesh import ParallelMeshes
    from plait.scheduler.dims import ParallelDims

    meshes = ParallelMeshes(ParallelDims.resolve(world))
    torch.manual_seed(0)
    net = Net()
    # The reference gradients come from a plain copy of the model: the engine's own .grad may be on the wire once
    # the last backward pass has started a piece (replicated state reduces them in place, as views of its buffer).
    ref = Net()
    groups = {label: meshes.group(label) for label in ("dp+cp", "dp+cp+tp", "edp")}
    opt = ShardedAdamW(list(net.named_parameters()), groups, meshes.group("world"), AdamWSettings(), piece=piece,
                       overlap=overlap, zero=zero)
    opt.keep_grads = True
    gen = torch.Generator().manual_seed(10 + rank)
    comm.LEDGER.reset()
    out = {"started": []}
    for step in range(2):
        ref.load_state_dict(net.state_dict())
        ref.zero_grad(set_to_none=True)
        for micro in range(2):
            if micro == 1:
                opt.arm()
            x = torch.randn(4, 5, generator=gen)
            net(x, first=micro == 0).pow(2).sum().backward()
            ref(x, first=micro == 0).pow(2).sum().backward()
        out["started"].append(opt._next)
        local = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in ref.named_parameters()}
        for g in local.values():
            torch.distributed.all_reduce(g)
        opt.step(1e-2, 0.5)
        out[f"summed{step}"] = local
        out[f"reduced{step}"] = opt.local_grads()
    out["params"] = {n: p.detach().clone() for n, p in net.named_parameters()}
    out["state"] = opt.local_state()
    out["ledger"] = comm.LEDGER.snapshot()
    out["pieces"] = len(opt.sequence)
    return out


@pytest.fixture(scope="module")
def runs() -> dict:
    return {"overlap": run_distributed(overlap_step, 2, args=(PIECE, True), timeout=120),
            "plain": run_distributed(overlap_step, 2, args=(0, False), timeout=120),
            "replicated": run_distributed(overlap_step, 2, args=(PIECE, True, False), timeout=120)}


def test_pieces_start_during_the_backward_pass_and_wait_for_late_gradients(runs):
    for got in runs["overlap"]:
        assert got["pieces"] > 6
        # some pieces were on the wire before the step; not the ones holding `early` (no gradient in the last
        # micro-step) and `never`, and not any after them in the order
        assert all(0 < n < got["pieces"] for n in got["started"]), got["started"]
    for got in runs["plain"]:
        # one bucket (matrices and vectors, every label: one group of two ranks), one piece, started at the step
        assert got["pieces"] == 1 and got["started"] == [0, 0]


def test_the_reduced_gradients_and_the_update_are_those_of_one_reduce_scatter(runs):
    for on, off in zip(runs["overlap"], runs["plain"]):
        for step in range(2):
            for name, want in on[f"summed{step}"].items():
                assert torch.equal(on[f"reduced{step}"][name], want), name  # the sum of the ranks' gradients
                assert torch.equal(off[f"reduced{step}"][name], want), name
        for name, p in on["params"].items():
            assert torch.equal(p, off["params"][name]), name
        assert on["params"]["never"].abs().sum() > 0  # weight decay off for vectors: unchanged, still there


def test_the_ledger_records_the_same_bytes_in_more_calls(runs):
    for on, off in zip(runs["overlap"], runs["plain"]):
        rs_on, rs_off = on["ledger"]["dp+cp+tp"]["reduce_scatter"], off["ledger"]["dp+cp+tp"]["reduce_scatter"]
        assert rs_on["bytes"] == rs_off["bytes"] and rs_on["calls"] == 2 * on["pieces"] > rs_off["calls"] == 2
        assert on["ledger"]["dp+cp+tp"]["all_gather"] == off["ledger"]["dp+cp+tp"]["all_gather"]


def test_replicated_state_all_reduces_each_piece_and_updates_like_zero(runs):
    """parallel.zero=false: pieces all-reduced during the backward pass, every rank updating its whole buckets.

    Two ranks: each reduced element is one sum of two numbers, so the first step's gradients equal ZeRO-1's bit
    for bit. The norm differs in rounding only: the replicated one sums the n squares of the whole buffer in
    float32 (relative error ≤ (n − 1)·2⁻²⁴, the worst case of any summation order), ZeRO-1 its shards' in
    float64. So clipping scales the gradients by factors that far apart, each term of a moment follows within
    twice that (v is squared; where a moment's two terms cancel, measured against the larger) and the
    parameters within that share of lr per step, plus float32 rounding.
    """
    lr = 1e-2
    first, second = runs["replicated"]
    numel = sum(p.numel() for p in first["params"].values())
    norm_err = (numel - 1) * 2.0 ** -24
    for got, zero in zip(runs["replicated"], runs["plain"]):
        assert got["pieces"] > 6 and all(0 < n < got["pieces"] for n in got["started"]), got["started"]
        for name, want in got["summed0"].items():
            assert torch.equal(got["reduced0"][name], want), name
            assert torch.equal(zero["reduced0"][name], want), name
        for step in range(2):
            for name, want in got[f"summed{step}"].items():
                assert torch.equal(got[f"reduced{step}"][name], want), name  # its own ranks' sum, exactly
        for key in ("exp_avg", "exp_avg_sq"):
            for name, m in got["state"][key].items():
                # each of the two terms of the moment is that close; where they cancel, relative to the larger
                ref = zero["state"][key][name]
                bound = (2 * norm_err + 2.0 ** -22) * float(ref.abs().max()) * 2
                torch.testing.assert_close(m, ref, rtol=0, atol=bound)
        for name, p in got["params"].items():
            torch.testing.assert_close(p, zero["params"][name], rtol=0, atol=2 * lr * (norm_err + 2.0 ** -21))
        ledger = got["ledger"]["dp+cp+tp"]
        assert set(ledger) == {"all_reduce"} and ledger["all_reduce"]["calls"] == 2 * got["pieces"]
        assert ledger["all_reduce"]["bytes"] == zero["ledger"]["dp+cp+tp"]["reduce_scatter"]["bytes"]
    for name, p in first["params"].items():  # replicas stay identical: the same bits on both ranks
        assert torch.equal(p, second["params"][name]), name
