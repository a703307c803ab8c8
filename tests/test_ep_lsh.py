"""The LSH-compressed expert all-to-all (parallel.ep_compress=lsh) against plain PyTorch and the exact layer.

* one bucket per copy (fine hashing of random tokens): the compressed layer is the
  uncompressed one bit for bit (a centroid of one row is that row); buckets of identical
  copies: the same outputs (up to the experts' matmul on fewer rows), at a ratio of exactly 1/2;
* coarse hashing (few, large buckets): the layer equals a plain-PyTorch recomputation of the
  scheme (:func:`_reference`: buckets from the reference hash, mean in float64, each expert's
  SwiGLU on the centroids), outputs and gradients, with and without the residual compensation;
* two real gloo ranks (ep = 2): each rank's output and gradient shares are those of the
  compressed layer run by one process on that rank's tokens (buckets never span ranks), and
  the ledger's ep bytes are the closed form with centroids in place of copies;
* the engine's ledger for a whole step matches ``step_volume(..., centroids=...)`` exactly.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed

from plait.errors import ConfigError
from plait.ops.lsh import lsh_hash_reference, lsh_signs
from plait.parallel import comm
from plait.parallel.comm import Group
from plait.parallel.config import LSHConfig
from plait.parallel.ep import apply_ep
from plait.parallel.mesh import ParallelMeshes
from plait.runtime.models.moe import MoE
from plait.scheduler.dims import MeshAxis, ParallelDims

DIM, FFN, E, K, N = 16, 32, 4, 2, 24
FINE = LSHConfig(hashes=6, dim=16, seed=3)  # 32^6 buckets: random tokens never share one
COARSE = LSHConfig(hashes=1, dim=2, seed=3)  # 4 buckets per expert segment
SINGLE = SimpleNamespace(group=Group.single)


def _layer(lsh: LSHConfig | None, meshes=SINGLE) -> MoE:
    torch.manual_seed(0)
    layer = MoE(DIM, FFN, E, K)
    layer.reset_parameters(0.3, 0.3)
    apply_ep(layer, meshes, lsh=lsh)
    return layer


def _data(n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g), torch.randn(n, DIM, generator=g)


def _run(layer: MoE, x: torch.Tensor, w: torch.Tensor) -> dict:
    xr = x.clone().requires_grad_(True)
    out = layer(xr)
    (out * w).sum().backward()
    return {"out": out.detach(), "x": xr.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}


def test_one_copy_per_bucket_is_the_exact_layer() -> None:
    x, w = _data()
    exact = _run(_layer(None), x, w)
    for compensate in (False, True):
        layer = _layer(LSHConfig(hashes=FINE.hashes, dim=FINE.dim, seed=FINE.seed, compensate=compensate))
        got = _run(layer, x, w)
        assert layer.lsh_rows == N * K and layer.lsh_centroids == N * K
        assert torch.equal(got["out"], exact["out"])
        for name, grad in exact.items():
            if compensate and name == "x":
                # (Jᵀg − g) + g instead of Jᵀg per copy (g = gate·w, |g| ≤ max|w|), k copies per token: a few
                # roundings of that size
                bound = 8 * K * torch.finfo(torch.float32).eps * (grad.abs().max() + w.abs().max())
                assert (got[name] - grad).abs().max() <= bound, name
            else:
                assert torch.equal(got[name], grad), name


def test_identical_copies_share_a_bucket() -> None:
    half, w = _data(N // 2)
    x = torch.cat([half, half])
    exact = _run(_layer(None), x, torch.cat([w, w]))
    layer = _layer(FINE)
    got = _run(layer, x, torch.cat([w, w]))
    assert layer.lsh_centroids * 2 == layer.lsh_rows == N * K
    # the same values, though each expert's matmul now has half the rows (another blocking: float32 rounding)
    torch.testing.assert_close(got["out"], exact["out"])


def _reference(layer: MoE, x: torch.Tensor, cfg: LSHConfig) -> torch.Tensor:
    """The scheme in plain PyTorch, per expert: buckets by reference key, float64 means, SwiGLU, combine."""
    routing = layer.route(x)
    signs = lsh_signs(cfg.hashes, DIM, cfg.seed)
    # keys of each copy's offset from the mean of all copies (lsh.center), the copies in the layer's order (by expert)
    copies = x.detach()[torch.argsort(routing.indices.reshape(-1), stable=True) // K]
    center = copies.mean(dim=0, keepdim=True) if cfg.center else 0.0
    out = torch.zeros_like(x)
    ex = layer.experts
    for e in range(E):
        token, slot = (routing.indices == e).nonzero(as_tuple=True)  # row-major: token order, as the layer sorts
        if token.numel() == 0:
            continue
        rows = x[token]
        keys = lsh_hash_reference(rows.detach() - center, signs, cfg.dim)
        _, bucket = torch.unique(keys, return_inverse=True)
        cent = torch.zeros(int(bucket.max()) + 1, DIM, dtype=torch.float64).index_add(0, bucket, rows.double())
        cent = (cent / torch.bincount(bucket).unsqueeze(1)).float()
        y = (F.silu(cent @ ex.w1[e].t()) * (cent @ ex.w3[e].t())) @ ex.w2[e].t()
        y = y[bucket]
        if cfg.compensate:
            y = y + (rows - cent[bucket])
        out = out.index_add(0, token, y * routing.weights[token, slot].unsqueeze(1))
    return out


@pytest.mark.parametrize("compensate", [False, True])
def test_coarse_buckets_match_plain_pytorch(compensate: bool) -> None:
    cfg = LSHConfig(hashes=COARSE.hashes, dim=COARSE.dim, seed=COARSE.seed, compensate=compensate)
    x, w = _data(64)
    layer = _layer(cfg)
    got = _run(layer, x, w)
    assert layer.lsh_centroids <= E * 2 * cfg.dim < layer.lsh_rows  # at most 4 buckets per expert: compressed
    torch.manual_seed(0)
    plain = MoE(DIM, FFN, E, K)
    plain.reset_parameters(0.3, 0.3)
    want = _run(_Wrapped(plain, cfg), x, w)
    torch.testing.assert_close(got["out"], want["out"], rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


class _Wrapped(torch.nn.Module):
    def __init__(self, layer: MoE, cfg: LSHConfig):
        super().__init__()
        self.layer, self.cfg = layer, cfg

    def forward(self, x):
        return _reference(self.layer, x, self.cfg)

    def named_parameters(self, *a, **k):
        return self.layer.named_parameters(*a, **k)


def test_probe_measures_fidelity_on_its_own_ledger_rows() -> None:
    x, w = _data()
    for cfg, exact in ((FINE, True), (COARSE, False)):
        layer = _layer(cfg)
        layer.probe = True
        _run(layer, x, w)
        total, count = layer.lsh_fidelity
        assert count == N * K and not layer.probe  # one probe, consumed
        if exact:
            assert abs(total / count - 1.0) < 1e-6
        else:
            assert 0.0 < total / count < 0.999


def test_settings_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"parallel\.lsh\.hashes"):
        LSHConfig(hashes=0).validate()
    with pytest.raises(ConfigError, match=r"parallel\.lsh\.hashes.*set parallel\.lsh\.hashes ≤ 8"):
        LSHConfig(hashes=20, dim=64).validate()
    with pytest.raises(ConfigError, match=r"parallel\.lsh\.dim.*1 … 16"):
        LSHConfig(dim=17).validate(hidden=DIM)
    with pytest.raises(ConfigError, match=r"parallel\.lsh\.probe_every"):
        LSHConfig(probe_every=-1).validate()


# ----------------------------------------------------------------------------- two ranks


def _ep_body(rank: int, world: int) -> dict:
    torch.use_deterministic_algorithms(True)
    meshes = ParallelMeshes(ParallelDims.resolve(world, ep=world))
    x, w = _data(world * N)
    mine = slice(rank * N, (rank + 1) * N)
    layer = _layer(COARSE, meshes)
    comm.LEDGER.reset()
    got = _run(layer, x[mine], w[mine])
    ledger = comm.LEDGER.snapshot()
    comm.all_reduce(got["router.weight"], meshes.group("dp+cp+tp"))
    return {"got": got, "ledger": ledger, "centroids": layer.lsh_centroids, "ep_rank": meshes.coordinates()[MeshAxis.EP]}


@functools.cache
def _two_ranks() -> list[dict]:
    return run_distributed(_ep_body, world=2, timeout=120)


def test_two_ranks_match_one_process_per_rank() -> None:
    results = _two_ranks()
    x, w = _data(2 * N)
    el = E // 2
    router = 0
    for rank, res in enumerate(results):
        mine = slice(rank * N, (rank + 1) * N)
        one = _layer(COARSE)
        want = _run(one, x[mine], w[mine])
        assert res["centroids"] == one.lsh_centroids
        torch.testing.assert_close(res["got"]["out"], want["out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["got"]["x"], want["x"], rtol=1e-5, atol=1e-6)
        router = router + want["router.weight"]
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["got"]["router.weight"], router, rtol=1e-5, atol=1e-5)
        # expert shards: the sum of both ranks' one-process gradients, restricted to this rank's experts
        for name in ("experts.w1", "experts.w2", "experts.w3"):
            full = 0
            for r in range(2):
                one = _layer(COARSE)
                full = full + _run(one, x[r * N:(r + 1) * N], w[r * N:(r + 1) * N])[name]
            shard = full.narrow(0, res["ep_rank"] * el, el)
            torch.testing.assert_close(res["got"][name], shard, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_ledger_counts_centroids() -> None:
    results = _two_ranks()
    sent = sum(r["centroids"] for r in results)
    ep_bytes = sum(r["ledger"]["ep"]["all_to_all"]["bytes"] for r in results)
    # per rank: E int64 counts, then dispatch and combine and their backward: 4 · Σ centroids rows of DIM float32
    assert ep_bytes == 2 * E * 8 + 4 * sent * DIM * 4
    assert sent < 2 * N * K


# ----------------------------------------------------------------------------- a whole step's ledger

MODEL = dict(layers=2, dim=32, heads=4, ffn_dim=64, vocab=256, seq_len=16, experts=4, top_k=2)


def _engine_body(rank: int, world: int, sizes: dict) -> dict:
    from plait.parallel.engine import EngineConfig, ParallelEngine
    from plait.runtime.models import ModelConfig, build_model

    meshes = ParallelMeshes(ParallelDims.resolve(world, **sizes))
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="moe", **MODEL))
    engine = ParallelEngine(model, meshes, EngineConfig(micro_batch=2, global_batch=8, seq_len=16, aux_loss_coef=0.01,
                                                        lsh=LSHConfig(hashes=2, dim=2, probe_every=0)), torch.device("cpu"))
    tokens = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(5))
    comm.LEDGER.reset()
    stats = engine.train_step(tokens[:, :-1], tokens[:, 1:], 1e-3)
    centroids = sum(m.lsh_centroids for _, m in engine.compression.modules)
    return {"ledger": comm.LEDGER.snapshot(), "centroids": centroids, "ratio": stats.lsh_ratio, "fidelity": stats.lsh_fidelity}


@pytest.mark.parametrize("world, sizes", [(2, dict(ep=2)), (4, dict(ep=2, etp=2))], ids=["ep2", "ep2-etp2"])
def test_step_ledger_is_the_closed_form_with_centroids(world: int, sizes: dict) -> None:
    from plait.runtime.config import model_spec
    from plait.runtime.models import ModelConfig
    from plait.scheduler.comm_volume import Layout, step_volume

    ranks = run_distributed(_engine_body, world=world, args=(sizes,), timeout=120)
    dims = ParallelDims.resolve(world, **sizes)
    layout = Layout(world=world, pp=dims.pp, dp=dims.dp, cp=dims.cp, tp=dims.tp, edp=dims.edp, ep=dims.ep, etp=dims.etp)
    centroids = sum(r["centroids"] for r in ranks)
    expected = step_volume(model_spec(ModelConfig(kind="moe", **MODEL)), layout, global_batch=8, micro_batch=2,
                           centroids=centroids)
    measured = {axis: {op: v["bytes"] for op, v in ops.items()} for axis, ops in comm.merge_snapshots([r["ledger"] for r in ranks]).items()}
    assert measured == expected
    copies = MODEL["layers"] * 8 * 16 * MODEL["top_k"]  # every layer sees every token's k copies once per step
    assert centroids < copies
    ratio = ranks[0]["ratio"]
    assert len(ratio) == MODEL["layers"] and all(0 < r < 1 for r in ratio)
    assert ranks[0]["fidelity"] == [None] * MODEL["layers"]  # probe_every = 0: no probe
    assert sum(ratio) * copies / MODEL["layers"] == pytest.approx(centroids, rel=1e-12)


@pytest.mark.parametrize("overrides, field, fix", [
    (["model.kind=gpt", "parallel.ep_compress=lsh"], "parallel.ep_compress", "model.kind=moe"),
    (["parallel.ep_compress=lsh", "parallel.lsh.dim=256"], "parallel.lsh.dim", "1 … 128"),
    (["parallel.ep_compress=lsh", "parallel.lsh.hashes=30"], "parallel.lsh.hashes", "parallel.lsh.hashes ≤ 8"),
    (["parallel.ep_compress=zip"], "parallel.ep_compress", "none | lsh"),
    (["parallel.ep_compress=auto", "parallel.lsh.auto_steps=0"], "parallel.lsh.auto_steps", "a positive number of steps"),
    (["parallel.ep_compress=lsh", "parallel.hybrid_dp=true", "data.packing=documents", "model.aux_loss_coef=0"],
     "parallel.ep_compress", "parallel.ep > 1"),
])
def test_job_config_errors(overrides: list[str], field: str, fix: str) -> None:
    from pathlib import Path

    from plait.runtime.config import load_config

    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(demo, overrides, nproc=4)
    assert err.value.key == field and fix in str(err.value), str(err.value)
    load_config(demo, ["parallel.ep_compress=lsh", "parallel.ep=4"], nproc=4)  # and the demo with it is valid


def test_centring_keeps_a_shared_direction_from_deciding_the_buckets() -> None:
    """Tokens = a large common vector + their own part (as hidden states): uncentred, the common part picks the codes."""
    g = torch.Generator().manual_seed(4)
    x = 20 * torch.randn(1, DIM, generator=g) + torch.randn(4 * N, DIM, generator=g)
    w = torch.randn(4 * N, DIM, generator=g)
    ratios = {}
    for center in (False, True):
        layer = _layer(LSHConfig(hashes=2, dim=4, center=center))
        _run(layer, x, w)
        ratios[center] = layer.lsh_centroids / layer.lsh_rows
    # 8 codes per hash: centred, random offsets spread over up to 64 buckets per expert; uncentred, nearly all
    # copies land on the common vector's code
    assert ratios[False] < 0.15 < 0.3 < ratios[True], ratios
