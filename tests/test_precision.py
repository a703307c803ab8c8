"""Precision recipes, policy and schedule, and the quantized linear layer against plain PyTorch.

The reference of a quantized linear is written here from the definition: each GEMM's
operands quantized along its contraction dimension and dequantized
(:func:`plait.ops.quant.quantize` / ``dequantize``, tested bit-exact against NumPy in
test_ops_quant.py), then multiplied in float64 by torch.matmul. The layer's GEMMs
accumulate in FP32, so they must agree within FP32 accumulation error: |err| ≤ γ_K·(|a|·|b|ᵀ),
γ_K = K·u / (1 − K·u), u = 2⁻²⁴.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plait.errors import ConfigError
from plait.ops.quant import dequantize, quantize
from plait.parallel.lowp import PrecisionRuntime, _QuantGroupedLinear, _hadamard16, _rotate_tokens, apply_precision, linear_names, quant_linear
from plait.parallel.precision import RECIPES, PolicyRule, PrecisionConfig, ScheduleStage, formats, resolve
from plait.runtime.config import load_config
from plait.runtime.models import build_model

NAMES = ["layers.0.attn.wq", "layers.0.ffn.router", "layers.0.ffn.experts", "layers.1.attn.wq", "layers.1.ffn.experts",
         "output"]


def test_resolve_policy_first_match_and_edges():
    cfg = PrecisionConfig(recipe="nvfp4", policy=[PolicyRule(match="*.attn.*", recipe="fp8-block"),
                                                  PolicyRule(match="layers.0.*", recipe="mxfp8")])
    r = resolve(cfg, NAMES, step=0, layers=2, base="fp32")
    assert r["layers.0.attn.wq"] == "fp8-block"  # first match wins over layers.0.*
    assert r["layers.0.ffn.experts"] == "mxfp8"
    assert r["layers.0.ffn.router"] == "mxfp8"  # a user rule comes before the edge rules
    assert r["layers.1.ffn.experts"] == "fp32"  # the last block stays high
    assert r["layers.1.attn.wq"] == "fp8-block"  # ... unless a user rule says otherwise
    assert r["output"] == "fp32"
    bare = resolve(PrecisionConfig(recipe="nvfp4", keep_edges=False), NAMES, step=0, layers=2, base="bf16")
    assert set(bare.values()) == {"nvfp4"}


def test_schedule_stages_replace_recipe_and_policy():
    cfg = PrecisionConfig(recipe="fp32", keep_edges=False, policy=[PolicyRule(match="*.attn.*", recipe="fp8-row")],
                          schedule=[ScheduleStage(until=10, recipe="nvfp4"),
                                    ScheduleStage(until=20, recipe="mxfp8", policy=[]),
                                    ScheduleStage(recipe="bf16", policy=[])])
    cfg.validate()
    assert resolve(cfg, NAMES, step=9, layers=2, base="fp32")["layers.0.attn.wq"] == "fp8-row"
    assert resolve(cfg, NAMES, step=9, layers=2, base="fp32")["output"] == "nvfp4"
    assert set(resolve(cfg, NAMES, step=10, layers=2, base="fp32").values()) == {"mxfp8"}
    assert set(resolve(cfg, NAMES, step=500, layers=2, base="fp32").values()) == {"bf16"}
    assert cfg.boundaries() == [10, 20]


@pytest.mark.parametrize("override, key", [
    ("precision.recipe=fp8", "precision.recipe"),
    ("precision.ab=fp16", "precision.ab"),
    ("precision.policy=[{match: '*.attn.wqq', recipe: fp8-row}]", "precision.policy[0].match"),
    ("precision.policy=[{match: '*.attn.*', recipe: int8}]", "precision.policy[0].recipe"),
    ("precision.schedule=[{until: 0, recipe: nvfp4}, {recipe: fp32}]", "precision.schedule[0].until"),
    ("precision.schedule=[{until: 20, recipe: nvfp4}, {until: 10, recipe: fp32}]", "precision.schedule[1].until"),
    ("precision.mx_scale=ceil", "precision.mx_scale"),
])
def test_bad_precision_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert err.value.key == key


def test_ab_refuses_snapshots():
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", ["precision.ab=fp32", "snapshot.every=5"])
    assert err.value.key == "precision.ab"


def _qdq(t: torch.Tensor, op, seed: int | None = None) -> torch.Tensor:
    kw = {} if not op.stochastic else {"rounding": "stochastic", "seed": seed}
    return dequantize(quantize(t.contiguous(), op.fmt, elem=op.elem, mx_scale=op.mx_scale, block_rows=op.block_rows,
                               **kw)).double()


def _bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FP32 accumulation error bound of a @ bᵀ over K terms, elementwise, plus the output's own rounding."""
    k = a.shape[1]
    u = 2.0 ** -24
    gamma = k * u / (1 - k * u)
    mag = a.abs() @ b.abs().t()
    return gamma * mag + u * mag + 1e-30


@pytest.mark.parametrize("recipe,options", [(r, {}) for r in RECIPES if r not in ("fp32", "bf16", "nvfp4")]
                         + [("mxfp8", {"mx_scale": "floor"}), ("mxfp4", {"mx_scale": "floor"})])
def test_quantized_linear_matches_its_definition(recipe, options):
    """Forward, dgrad and wgrad: every operand quantized along the right dimension (transposes included)."""
    torch.manual_seed(0)
    M, K, N = 96, 256, 160  # partial 128-blocks in tokens and outputs
    x = (torch.randn(M, K) * torch.linspace(0.1, 4, K)).requires_grad_()
    w = (torch.randn(N, K) * 0.05).requires_grad_()
    gy = torch.randn(M, N) * 1e-3
    config = PrecisionConfig(recipe=recipe, keep_edges=False, **options)
    rt = PrecisionRuntime(config, ["m"], layers=1, base="fp32")
    rt.begin_step(0)
    y = quant_linear(rt, "m", x, w)
    dx, dw = torch.autograd.grad(y, (x, w), gy)
    f = config.formats(recipe)
    expected = options.get("mx_scale", "up" if recipe.startswith("mx") else "floor")  # "up" is the default
    assert all(op.mx_scale == expected for op in f.operands().values())
    xq, wq = _qdq(x.detach(), f.x), _qdq(w.detach(), f.w)
    assert ((y.double() - xq @ wq.t()).abs() <= _bound(xq, wq)).all()
    dyq, wtq = _qdq(gy, f.dy), _qdq(w.detach().t(), f.wt)
    assert ((dx.double() - dyq @ wtq.t()).abs() <= _bound(dyq, wtq)).all()
    dytq, xtq = _qdq(gy.t(), f.dyt), _qdq(x.detach().t(), f.xt)
    assert ((dw.double() - dytq @ xtq.t()).abs() <= _bound(dytq, xtq)).all()


@pytest.mark.parametrize("recipe", ["fp8-block", "mxfp8", "mxfp4", "nvfp4"])
def test_grouped_expert_linear_matches_its_definition(recipe):
    """Stacked experts: forward and dgrad as one grouped GEMM, wgrad per expert; an empty expert included."""
    torch.manual_seed(3)
    E, K, N, sizes = 3, 256, 160, [37, 0, 70]
    M = sum(sizes)
    bounds = [0, 37, 37, M]
    x = (torch.randn(M, K) * torch.linspace(0.1, 4, K)).requires_grad_()
    w = (torch.randn(E, N, K) * 0.05).requires_grad_()
    gy = torch.randn(M, N) * 1e-3
    cfg = PrecisionConfig(recipe=recipe, keep_edges=False, stochastic_grads=False, hadamard=False)
    rt = PrecisionRuntime(cfg, ["m"], layers=1, base="fp32")
    rt.begin_step(0)
    y = _QuantGroupedLinear.apply(x, w, torch.tensor(bounds), rt, "m", "w1")
    dx, dw = torch.autograd.grad(y, (x, w), gy)
    f = formats(recipe, stochastic_grads=False, hadamard=False)
    xq, dyq = _qdq(x.detach(), f.x), _qdq(gy, f.dy)  # quantized once over all experts' rows
    assert torch.equal(dw[1], torch.zeros(N, K))
    for e in (0, 2):
        rows = slice(bounds[e], bounds[e + 1])
        wq, wtq = _qdq(w.detach()[e], f.w), _qdq(w.detach()[e].t(), f.wt)
        assert ((y[rows].double() - xq[rows] @ wq.t()).abs() <= _bound(xq[rows], wq)).all()
        assert ((dx[rows].double() - dyq[rows] @ wtq.t()).abs() <= _bound(dyq[rows], wtq)).all()
        pad = (0, (bounds[e + 1] - bounds[e]) % 2 if recipe == "nvfp4" else 0)  # FP4 packs token pairs
        dytq, xtq = _qdq(F.pad(gy[rows].t(), pad), f.dyt), _qdq(F.pad(x.detach()[rows].t(), pad), f.xt)
        assert ((dw[e].double() - dytq @ xtq.t()).abs() <= _bound(dytq, xtq)).all()


def _experts_run(recipe: str, x: torch.Tensor, counts: list[int], seed: int = 4, **kw):
    from plait.runtime.models.moe import GroupedExperts

    torch.manual_seed(seed)
    experts = GroupedExperts(len(counts), x.shape[1], 96)
    rt = apply_precision([torch.nn.ModuleDict({"e": experts})], PrecisionConfig(recipe=recipe, keep_edges=False, **kw),
                         ["e"], layers=1, base="fp32")
    rt.begin_step(7)
    out = experts(x, counts)
    out.square().sum().backward()
    return rt, experts, out.detach(), experts.w1.grad.clone()


def _experts_loop(rt, experts, x, counts):
    """The experts one by one through the plain quantized linear (no grouped GEMM)."""
    outs = []
    for e, xs in enumerate(torch.split(x, counts)):
        h = F.silu(quant_linear(rt, "e", xs, experts.w1[e], ("w1", e))) * quant_linear(rt, "e", xs, experts.w3[e], ("w3", e))
        outs.append(quant_linear(rt, "e", h, experts.w2[e], ("w2", e)))
    return torch.cat(outs)


def test_experts_under_a_grouped_recipe_run_the_grouped_gemm():
    """The model's SwiGLU experts: one grouped GEMM per weight; equal to the expert-by-expert loop where the
    formats have no tensor-wide scale (fp8-block: x in 1×128 tiles), replayable under nvfp4."""
    torch.manual_seed(5)
    x, counts = torch.randn(50, 128), [20, 0, 13, 17]
    calls = []
    original = _QuantGroupedLinear.apply
    try:
        _QuantGroupedLinear.apply = lambda *a: calls.append(a[5]) or original(*a)
        rt, experts, out, g1 = _experts_run("fp8-block", x, counts)
        assert calls == ["w1", "w3", "w2"]
        experts.zero_grad()
        loop = _experts_loop(rt, experts, x, counts)
        loop.square().sum().backward()
        assert calls == ["w1", "w3", "w2"]
    finally:
        _QuantGroupedLinear.apply = original
    # the same quantized operands through the same tile kernel, group by group: the same bits
    assert torch.equal(out, loop.detach()) and torch.equal(g1, experts.w1.grad)
    a, b = _experts_run("nvfp4", x, counts), _experts_run("nvfp4", x, counts)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])  # same step: the same random rounding bits
    _, _, exact, g_exact = _experts_run("fp32", x, counts)
    assert float((a[2] - exact).norm() / exact.norm()) < 0.5  # FP4 in three chained GEMMs; a wiring error is ≈ 1.4


def test_nvfp4_stochastic_gradients_and_hadamard_wgrad():
    torch.manual_seed(1)
    M, K, N = 64, 128, 64
    x = torch.randn(M, K, requires_grad=True)
    w = (torch.randn(N, K) * 0.05).requires_grad_()
    gy = torch.randn(M, N)

    def grads(step: int, config: PrecisionConfig):
        rt = PrecisionRuntime(config, ["m"], layers=1, base="fp32")
        rt.begin_step(step)
        return torch.autograd.grad(quant_linear(rt, "m", x, w), (x, w), gy)

    cfg = PrecisionConfig(recipe="nvfp4", keep_edges=False)
    a, b, c = grads(3, cfg), grads(3, cfg), grads(4, cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # a replayed step rounds the same way
    assert not torch.equal(a[0], c[0])  # another step draws other random bits
    exact_dw = gy.t() @ x.detach()
    plain = grads(3, PrecisionConfig(recipe="nvfp4", keep_edges=False, hadamard=False, stochastic_grads=False))
    for dw in (a[1], plain[1]):
        assert float((dw - exact_dw).norm() / exact_dw.norm()) < 0.35


def test_nvfp4_weight_tiles_give_forward_and_dgrad_the_same_weights():
    torch.manual_seed(3)
    x = torch.randn(48, 96, requires_grad=True)
    w = (torch.randn(80, 96) * 0.05).requires_grad_()
    for tiles in (True, False):
        rt = PrecisionRuntime(PrecisionConfig(recipe="nvfp4", keep_edges=False, weight_tiles=tiles), ["m"], layers=1,
                              base="fp32")
        rt.begin_step(0)
        torch.autograd.grad(quant_linear(rt, "m", x, w), (x, w), torch.randn(48, 80))
        cached = {key[2]: q for key, (_, q) in rt._cache.items()}  # transpose flag -> the quantized W or Wᵀ
        forward, dgrad = dequantize(cached[False]), dequantize(cached[True])
        assert torch.equal(forward, dgrad.t()) == tiles, tiles


def test_hadamard_rotation_preserves_products():
    r = _hadamard16(5)
    torch.testing.assert_close(r.t() @ r, torch.eye(16), atol=1e-6, rtol=0)
    a, b = torch.randn(8, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    ra, rb = _rotate_tokens(a.float(), r).double(), _rotate_tokens(b.float(), r).double()
    torch.testing.assert_close(ra @ rb.t(), a @ b.t(), atol=1e-5, rtol=1e-5)


def test_weights_quantized_once_per_step():
    """Micro-batches of one step reuse the quantized weight; an optimizer update makes a new one."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(128, 128, bias=False)
    model = torch.nn.ModuleDict({"output": lin})
    rt = apply_precision([model], PrecisionConfig(recipe="fp8-block", keep_edges=False), ["output"], layers=1, base="fp32")
    rt.begin_step(0)
    for _ in range(3):
        lin(torch.randn(16, 128)).sum().backward()
    keys = [k for k in rt._cache if not k[2]]
    assert len(keys) == 1
    first = rt._cache[keys[0]][1]
    lin(torch.randn(16, 128)).sum().backward()
    assert rt._cache[keys[0]][1] is first  # same step, same parameter version: reused
    with torch.no_grad():
        lin.weight.add_(1.0)
    lin(torch.randn(16, 128))
    assert rt._cache[keys[0]][1] is not first
    assert torch.equal(rt._cache[keys[0]][1].data, quantize(lin.weight.detach(), "fp8-128x128").data)


def test_statistics_count_overflow_and_underflow():
    # one block of 32, amax 1.9: OCP's X = floor(log2 1.9) − 8 = −8, scale 2⁻⁸; 1.9 scales to 486.4, beyond 448 and
    # its rounding region (overflow); 1e-9 scales below half the smallest subnormal 2⁻⁹ (underflow). The default
    # scale rule (up) takes 2⁻⁷: 1.9 → 243.2, no overflow; 1e-9 still underflows
    x = torch.full((1, 32), 0.5)
    x[0, 0], x[0, 1], x[0, 2] = 1.9, 1.0, 1e-9
    w = torch.randn(4, 32)
    for options, overflows in (({"mx_scale": "floor"}, 1), ({}, 0)):
        rt = PrecisionRuntime(PrecisionConfig(recipe="mxfp8", keep_edges=False, **options), ["m"], layers=1, base="fp32")
        rt.begin_step(0)
        quant_linear(rt, "m", x, w)
        row = rt.stats[0]
        assert row[0] == pytest.approx(1.9) and row[5] == 32
        assert row[3] == overflows
        assert row[4] == 1  # 1e-9 became 0


def test_linear_names_cover_the_model():
    cfg = load_config("configs/demo.yaml", []).model
    with torch.device("meta"):
        names = linear_names(build_model(cfg))
    assert "output" in names and "layers.0.ffn.experts" in names and "layers.3.attn.wo" in names
    assert len(names) == cfg.layers * 6 + 1


def test_bf16_recipe_is_bf16_matmul():
    rt = PrecisionRuntime(PrecisionConfig(recipe="bf16", keep_edges=False), ["m"], layers=1, base="fp32")
    x, w = torch.randn(8, 64), torch.randn(32, 64)
    y = quant_linear(rt, "m", x, w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x.bfloat16(), w.bfloat16()).float())


def test_dry_run_lists_each_module_format_per_schedule_stage():
    from plait.runtime.dryrun import dry_run_report

    config = load_config("configs/demo.yaml", [
        "precision.recipe=nvfp4", "precision.policy=[{match: '*.attn.*', recipe: fp8-block}]",
        "precision.schedule=[{until: 240, recipe: nvfp4}, {recipe: bf16, policy: []}]"])
    report = dry_run_report(config)
    table = report.split("# precision")[1].split("# rank layout")[0]
    assert "steps 1–240:" in table and "steps 241–300:" in table
    first, second = table.split("steps 241–300:")
    assert "layers.0.attn.wq      fp8-block   x fp8-1x128/e4m3, w fp8-128x128/e4m3" in first
    assert "layers.0.ffn.experts  nvfp4       x nvfp4, w nvfp4 16×16, dy nvfp4 SR, wt nvfp4 16×16" in first  # the defaults
    assert "output                fp32" in first and "layers.3.ffn.experts  fp32" in first  # the edges
    assert "layers.3.attn.wq      fp8-block" in first  # a user rule comes first
    assert "layers.0.ffn.experts  bf16" in second and "nvfp4" not in second
    rows = dry_run_report(load_config("configs/demo.yaml", ["precision.recipe=nvfp4", "precision.weight_tiles=false"]))
    assert "layers.0.ffn.experts  nvfp4       x nvfp4, w nvfp4, dy nvfp4 SR" in rows and "16×16" not in rows
    up = dry_run_report(load_config("configs/demo.yaml", ["precision.recipe=mxfp8"]))
    assert "layers.0.ffn.experts  mxfp8       x mxfp8 scale-up, w mxfp8 scale-up" in up  # the default
    floor = dry_run_report(load_config("configs/demo.yaml", ["precision.recipe=mxfp8", "precision.mx_scale=floor"]))
    assert "layers.0.ffn.experts  mxfp8       x mxfp8, w mxfp8" in floor and "scale-up" not in floor


MODEL = dict(layers=2, dim=32, heads=4, ffn_dim=64, vocab=256, seq_len=16, experts=4, top_k=2)


def _engine_body(rank: int, world: int, sizes: dict) -> dict:
    from plait.parallel import comm
    from plait.parallel.engine import EngineConfig, ParallelEngine
    from plait.parallel.mesh import ParallelMeshes
    from plait.runtime.models import ModelConfig
    from plait.scheduler.dims import ParallelDims

    meshes = ParallelMeshes(ParallelDims.resolve(world, **sizes))
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="moe", **MODEL))
    engine = ParallelEngine(model, meshes, EngineConfig(micro_batch=2, global_batch=8, seq_len=16, aux_loss_coef=0.01,
                                                        precision=PrecisionConfig(recipe="mxfp8")), torch.device("cpu"))
    tokens = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(5))
    comm.LEDGER.reset()
    engine.begin_step(0)
    stats = engine.train_step(tokens[:, :-1], tokens[:, 1:], 1e-3)
    return {"ledger": comm.LEDGER.snapshot(), "precision": stats.precision}


@pytest.mark.parametrize("world, sizes", [(2, dict(ep=2)), pytest.param(4, dict(tp=2, pp=2), marks=pytest.mark.slow)],
                         ids=["ep2", "tp2-pp2"])
def test_engine_step_statistics_span_all_ranks_and_the_ledger_counts_them(world: int, sizes: dict) -> None:
    from harness import run_distributed

    from plait.parallel import comm
    from plait.runtime.config import model_spec
    from plait.runtime.models import ModelConfig
    from plait.scheduler.comm_volume import Layout, step_volume
    from plait.scheduler.dims import ParallelDims

    ranks = run_distributed(_engine_body, world=world, args=(sizes,), timeout=120)
    dims = ParallelDims.resolve(world, **sizes)
    layout = Layout(world=world, pp=dims.pp, dp=dims.dp, cp=dims.cp, tp=dims.tp, edp=dims.edp, ep=dims.ep, etp=dims.etp)
    cfg = ModelConfig(kind="moe", **MODEL)
    with torch.device("meta"):
        modules = len(linear_names(build_model(cfg)))
    expected = step_volume(model_spec(cfg), layout, global_batch=8, micro_batch=2, precision_modules=modules)
    measured = {axis: {op: v["bytes"] for op, v in ops.items()}
                for axis, ops in comm.merge_snapshots([r["ledger"] for r in ranks]).items()}
    assert measured == expected
    stats = ranks[0]["precision"]
    assert all(r["precision"] == stats for r in ranks)  # reduced over the world: every rank reports the same
    assert stats["output"] == {"recipe": "fp32"} and stats["layers.1.attn.wq"] == {"recipe": "fp32"}  # the edges
    for name in ("layers.0.attn.wq", "layers.0.attn.wo", "layers.0.ffn.experts"):
        s = stats[name]
        assert s["recipe"] == "mxfp8" and s["amax_x"] > 0 and s["amax_w"] > 0 and s["amax_dy"] > 0, (name, s)
