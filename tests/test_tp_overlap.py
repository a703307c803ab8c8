"""parallel.tp_overlap: the op plait::matmul_into against its reference, the tp rings against one process on
real gloo ranks (tp = 2 and 4), the engine with overlap on against overlap off, and the config checks.

The layouts' parity with plain PyTorch under overlap (tp2 and tp4 fast, every tp layout in the slow matrix)
and their ledger against the closed form are in test_parallel_parity.py.

Tolerances: a GEMM of inner size k rounds each output element by at most about ``k·eps·Σ|x_i w_i|``
(Higham's γ_k bound, evaluated with |x| @ |w|ᵀ), plus one rounding of the output's own dtype; the ring
tests run in float64, where a chunk in a wrong slice or a partial sum missed is off by O(1), not O(1e-15).
"""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

from plait.errors import ConfigError
from plait.ops.overlap import matmul_into, matmul_into_reference

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}
# ATen's CPU GEMM accumulates bfloat16 products in float32, then rounds once
ACCUMULATE_EPS = {torch.float32: EPS[torch.float32], torch.float64: EPS[torch.float64], torch.bfloat16: EPS[torch.float32]}


def _gemm_bound(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|error| of x @ wᵀ computed in ``dtype``: k·eps·(|x| @ |w|ᵀ) for the sums, eps_dtype·|·| for the output."""
    k = x.shape[-1]
    magnitude = x.double().abs() @ w.double().abs().t()
    return (k * ACCUMULATE_EPS[dtype] + EPS[dtype]) * magnitude


def _inputs(dtype: torch.dtype, B: int = 3, m: int = 5, k: int = 7, n: int = 6, M: int = 17, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    out = torch.randn(B, M, n, generator=gen).to(dtype)
    return x, w, out


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("row_offset", [0, 4, 12])
def test_matmul_into_writes_its_rows_and_nothing_else(dtype, accumulate, row_offset):
    x, w, out = _inputs(dtype)
    before = out.clone()
    matmul_into(x, w, out, row_offset, accumulate=accumulate)
    rows = slice(row_offset, row_offset + x.shape[1])
    # every other row keeps its bytes
    assert torch.equal(out[:, :row_offset], before[:, :row_offset])
    assert torch.equal(out[:, rows.stop:], before[:, rows.stop:])
    want = (before[:, rows].double() if accumulate else 0) + x.double() @ w.double().t()
    bound = _gemm_bound(x, w, dtype) + (EPS[dtype] * want.abs() if accumulate else 0)
    assert ((out[:, rows].double() - want).abs() <= bound).all()
    ref = matmul_into_reference(x, w, before.clone(), row_offset, accumulate=accumulate)
    assert ((out.double() - ref.double()).abs() <= 2 * bound.max()).all()


def test_matmul_into_takes_strided_operands_and_writes_through_a_view():
    """x a slice of a longer sequence, w a transposed weight, out a column block of a wider buffer (ldc > n)."""
    gen = torch.Generator().manual_seed(1)
    sequence = torch.randn(2, 12, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(8, 5, generator=gen, dtype=torch.float64)  # used as wᵀ: x @ weight
    wide = torch.zeros(2, 9, 11, dtype=torch.float64)
    out = wide[:, :, 3:8]
    x = sequence[:, 4:8]
    matmul_into(x, weight.t(), out, 2)
    assert out.data_ptr() == wide[:, :, 3:].data_ptr()
    torch.testing.assert_close(wide[:, 2:6, 3:8], x @ weight, rtol=0, atol=1e-12)
    assert wide[:, :, :3].abs().sum() == 0 and wide[:, :, 8:].abs().sum() == 0
    assert wide[:, :2].abs().sum() == 0 and wide[:, 6:].abs().sum() == 0


def test_matmul_into_stage_copies_alongside():
    x, w, out = _inputs(torch.float32)
    src = torch.randn(4, 3, 2)
    dst = torch.zeros(4, 3, 2)
    matmul_into(x, w, out, 1, stage=(src, dst))
    assert torch.equal(dst, src)
    want = matmul_into_reference(x, w, _inputs(torch.float32)[2], 1)
    assert ((out.double() - want.double()).abs() <= 2 * _gemm_bound(x, w, torch.float32).max()).all()


@pytest.mark.parametrize("case, match", [
    ("x2d", r"x must be \[B, m, k\]"),
    ("k", "has k = 7 but w"),
    ("n", r"has n = 5 but out \[B, M, n\] has n = 6"),
    ("batch", "batch rows"),
    ("rows", "do not fit"),
    ("dtype", "one dtype"),
    ("int", "float32, float64, bfloat16 or float16"),
    ("stride", "unit stride along n"),
    ("overlap", "single memory location"),
    ("stage_alone", "come together"),
    ("stage_shape", "must match in shape and dtype"),
    ("stage_overlap", "single memory location"),
])
def test_matmul_into_refuses_bad_arguments(case, match):
    x, w, out = _inputs(torch.float32)
    stage_src = stage_dst = None
    offset = 0
    if case == "x2d":
        x = x[0]
    elif case == "k":
        w = torch.randn(6, 8)
    elif case == "n":
        w = torch.randn(5, 7)
    elif case == "batch":
        x = x[:2]
    elif case == "rows":
        offset = 13
    elif case == "dtype":
        w = w.double()
    elif case == "int":
        x, w, out = x.long(), w.long(), out.long()
    elif case == "stride":
        out = torch.zeros(3, 6, 17).transpose(1, 2)
    elif case == "overlap":  # the GEMM would read what it writes
        x, w = out, torch.randn(6, 6)
    elif case == "stage_alone":
        stage_src = torch.zeros(2)
    elif case == "stage_shape":
        stage_src, stage_dst = torch.zeros(2), torch.zeros(3)
    elif case == "stage_overlap":
        stage_src, stage_dst = torch.zeros_like(out), out
    with pytest.raises(RuntimeError, match=match):
        torch.ops.plait.matmul_into(x, w, out, offset, False, stage_src, stage_dst)


def test_opcheck_matmul_into():
    for dtype in (torch.float32, torch.float64):
        x, w, out = _inputs(dtype)
        torch.library.opcheck(torch.ops.plait.matmul_into.default, (x, w, out, 3, False, None, None))
        torch.library.opcheck(torch.ops.plait.matmul_into.default,
                              (x, w.t().contiguous().t(), out, 0, True, torch.randn(4), torch.zeros(4)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_matches_cpu_and_orders_its_copy_stream():
    """The CUDA kernel: cuBLAS against the CPU GEMM within the γ_k bound, its rows only, and the stage copy
    (on the copy stream) done before work queued after the call reads it, here on a side stream too."""
    for dtype in (torch.float32, torch.bfloat16):
        x, w, out = _inputs(dtype, B=2, m=256, k=512, n=384, M=1024)
        want = out.clone()
        matmul_into(x, w, want, 512, accumulate=True)
        got = out.cuda()
        src = torch.randn(1 << 22, device="cuda")
        dst = torch.empty_like(src)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # got, src and dst were made on the default stream
        with torch.cuda.stream(stream):
            matmul_into(x.cuda(), w.cuda(), got, 512, accumulate=True, stage=(src, dst))
            copied = dst.clone()  # queued after the call on the same stream: must see the whole copy
        stream.synchronize()
        assert torch.equal(copied, src)
        bound = 2 * _gemm_bound(x, w, dtype) + EPS[dtype] * out[:, 512:768].double().abs()
        assert ((got[:, 512:768].cpu().double() - want[:, 512:768].double()).abs() <= bound).all()
        assert torch.equal(got[:, :512].cpu(), out[:, :512]) and torch.equal(got[:, 768:].cpu(), out[:, 768:])


# ----------------------------------------------------------------------------- the rings, tp = 2 and 4

B, DIM, HIDDEN = 2, 8, 6  # batch rows, model width, this rank's hidden width


def _full(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rings_body(rank: int, world: int, N: int) -> dict:
    """Both rings in float64 with every rank's operands known to every rank, against autograd on the whole."""
    from plait.parallel import comm
    from plait.parallel.tp_overlap import _GatheredProjections, _ScatteredProjection
    from plait.parallel.comm import Group
    import torch.distributed as dist

    group = Group(axis="tp", ranks=tuple(range(world)), rank=rank, pg=dist.group.WORLD)
    T = world * N
    rows = slice(rank * N, (rank + 1) * N)
    x_full = _full((B, T, DIM), 0)  # the sequence the ranks share, chunk r on rank r
    w_q = [_full((HIDDEN, DIM), 10 + r) for r in range(world)]  # each rank's column weight (its shard)
    w_k = [_full((HIDDEN + 1, DIM), 20 + r) for r in range(world)]
    w_o = [_full((DIM, HIDDEN), 30 + r) for r in range(world)]  # each rank's row weight
    dq = _full((B, T, HIDDEN), 40 + rank)  # upstream gradients on this rank
    dk = _full((B, T, HIDDEN + 1), 50 + rank)
    y_all = [_full((B, T, HIDDEN), 60 + r) for r in range(world)]  # each rank's row-linear input
    dz_all = [_full((B, N, DIM), 70 + r) for r in range(world)]

    comm.LEDGER.reset()
    x = x_full[:, rows].clone().requires_grad_()
    wq, wk = w_q[rank].clone().requires_grad_(), w_k[rank].clone().requires_grad_()
    q, k = _GatheredProjections.apply(x, group, wq, wk)
    torch.autograd.backward((q, k), (dq, dk))
    y, wo = y_all[rank].clone().requires_grad_(), w_o[rank].clone().requires_grad_()
    z = _ScatteredProjection.apply(y, wo, group)
    z.backward(dz_all[rank])
    ledger = comm.LEDGER.snapshot()

    # one process: the gather's input gradient is the sum over ranks of their Σ_j dY_j W_j, chunk r
    dq_all = [_full((B, T, HIDDEN), 40 + r) for r in range(world)]
    dk_all = [_full((B, T, HIDDEN + 1), 50 + r) for r in range(world)]
    dx_want = sum(dq_all[r] @ w_q[r] + dk_all[r] @ w_k[r] for r in range(world))[:, rows]
    z_want = sum(y_all[r] @ w_o[r].t() for r in range(world))[:, rows]
    dz_full = torch.cat(dz_all, dim=1)
    errors = {
        "q": (q - x_full @ w_q[rank].t()).abs().max(),
        "k": (k - x_full @ w_k[rank].t()).abs().max(),
        "dx": (x.grad - dx_want).abs().max(),
        "dwq": (wq.grad - dq.flatten(0, 1).t() @ x_full.flatten(0, 1)).abs().max(),
        "dwk": (wk.grad - dk.flatten(0, 1).t() @ x_full.flatten(0, 1)).abs().max(),
        "z": (z - z_want).abs().max(),
        "dy": (y.grad - dz_full @ w_o[rank]).abs().max(),
        "dwo": (wo.grad - dz_full.flatten(0, 1).t() @ y_all[rank].flatten(0, 1)).abs().max(),
    }
    return {"errors": {name: float(e) for name, e in errors.items()}, "ledger": ledger}


@pytest.mark.parametrize("tp, N", [(2, 4), (4, 4), (2, 3)])  # N positions per rank: in 2 pieces, or 1 (odd)
def test_rings_equal_one_process(tp, N):
    """Outputs, input and weight gradients of both rings; any piece in a wrong slice or a partial sum lost or
    added twice is off by O(1) where float64 rounding leaves < 1e-12."""
    from plait.parallel.tp_overlap import pieces_of

    results = run_distributed(rings_body, world=tp, args=(N,), timeout=120)
    for rank, result in enumerate(results):
        assert all(e < 1e-12 for e in result["errors"].values()), (rank, result["errors"])
        # four rings (two forward, two backward) of tp − 1 steps, each moving one [B, N, DIM] float64 chunk
        # in pieces_of(N) sends
        calls = 4 * (tp - 1) * pieces_of(N)
        assert result["ledger"] == {"tp": {"send": {"bytes": 4 * (tp - 1) * B * N * DIM * 8, "calls": calls}}}


# ----------------------------------------------------------------------------- the engine, overlap on and off


def engine_body(rank: int, world: int, overlap: bool) -> dict | None:
    from parity import train_layout

    run = train_layout(rank, world, "gpt", dict(tp=world), 2, 2, {"tp_overlap": overlap})
    return {"losses": run["losses"], "grads": run["grads"]} if rank == 0 else None


@pytest.mark.parametrize("tp", [2, 4])
def test_overlap_on_trains_like_overlap_off(tp):
    """Two steps: losses and every step's reduced gradients within the parity tolerance of
    test_parallel_parity (1e-5 relative, 1e-7 absolute where terms cancel)."""
    from parity_checks import ATOL_GRAD, RTOL

    off = run_distributed(engine_body, world=tp, args=(False,), timeout=300)[0]
    on = run_distributed(engine_body, world=tp, args=(True,), timeout=300)[0]
    for a, b in zip(off["losses"], on["losses"]):
        assert abs(a - b) <= RTOL * abs(a)
    for step_off, step_on in zip(off["grads"], on["grads"]):
        assert step_off.keys() == step_on.keys()
        for name in step_off:
            torch.testing.assert_close(step_on[name], step_off[name], rtol=RTOL, atol=ATOL_GRAD, msg=name)


# ----------------------------------------------------------------------------- config


def test_config_key_is_a_bool(tmp_path):
    from plait.runtime.config import load_config

    with pytest.raises(ConfigError, match="parallel.tp_overlap"):
        load_config(None, ["parallel.tp_overlap=sometimes"], nproc=2)
    assert load_config(None, ["parallel.tp_overlap=true", "parallel.tp=2"], nproc=2).parallel.tp_overlap is True


def test_config_refuses_overlap_with_a_quantized_recipe():
    from plait.runtime.config import load_config

    with pytest.raises(ConfigError, match="parallel.tp_overlap") as info:
        load_config(None, ["parallel.tp_overlap=true", "parallel.tp=2", "precision.recipe=fp8-row"], nproc=2)
    assert "set parallel.tp_overlap=false" in str(info.value)
    # tp = 1 has no regions to overlap: nothing to refuse
    load_config(None, ["parallel.tp_overlap=true", "precision.recipe=fp8-row"], nproc=2)
