"""Tests of plait.runtime.models: shapes, causality, rotary, MoE routing and losses, config checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from plait.errors import ConfigError
from plait.runtime.models import ModelConfig, Transformer, build_model, count_parameters
from plait.runtime.models.layers import RMSNorm, apply_rotary, rotary_tables
from plait.runtime.models.moe import MoE


def tiny(kind: str = "gpt", **overrides) -> ModelConfig:
    base = dict(kind=kind, layers=2, dim=32, heads=4, ffn_dim=64, vocab=61, seq_len=24, experts=4, top_k=2)
    base.update(overrides)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(seed)
    return build_model(cfg).to(dtype)


@pytest.mark.parametrize("kind", ["gpt", "moe"])
def test_shapes_and_counts(kind):
    cfg = tiny(kind)
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, cfg.vocab)
    assert logits.dtype == torch.float32
    aux = model.aux_loss()
    assert aux.shape == ()
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == cfg.vocab * cfg.dim
    tpe = model.tokens_per_expert()
    if kind == "gpt":
        assert tpe is None
        assert aux.item() == 0.0
        assert counts["active"] == counts["total"] and counts["expert"] == 0
    else:
        assert tpe.shape == (cfg.layers, cfg.experts) and tpe.dtype == torch.int64
        assert torch.all(tpe.sum(dim=1) == 3 * 17 * cfg.top_k)
        assert aux.item() > 0.0
        expert = cfg.layers * cfg.experts * 3 * cfg.dim * cfg.ffn_dim
        assert counts["expert"] == expert
        assert counts["active"] == counts["total"] - expert + expert * cfg.top_k // cfg.experts


def test_bfloat16_model_keeps_float32_rotary_tables():
    cfg = tiny("moe")
    model = build(cfg, dtype=torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32 and model.embed.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, cfg.vocab, (2, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["gpt", "moe"])
def test_autocast_bfloat16_forward_backward(kind):
    cfg = tiny(kind)
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + model.aux_loss()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_rotary_only_sees_relative_positions():
    cfg = tiny("gpt")
    model = build(cfg, dtype=torch.float64)
    tokens = torch.randint(0, cfg.vocab, (2, 10))
    shifted = model(tokens, positions=torch.arange(7, 17))
    torch.testing.assert_close(shifted, model(tokens), rtol=0, atol=1e-6)


def test_split_into_pipeline_stages_keeps_names_and_output():
    cfg = tiny("moe", layers=3)
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab, (2, 12))
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["2"]
    first.norm = first.output = None
    del last.layers["0"], last.layers["1"]
    last.embed = None
    assert "layers.2.attn.wq.weight" in last.state_dict()
    torch.testing.assert_close(last(first(tokens)), model(tokens), rtol=0, atol=0)


def test_sequence_longer_than_seq_len_is_rejected():
    model = build(tiny())
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("kind", ["gpt", "moe"])
def test_parameters_deterministic_under_seed(kind):
    a = build(tiny(kind), seed=3).state_dict()
    b = build(tiny(kind), seed=3).state_dict()
    c = build(tiny(kind), seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("wq.weight"))
    # rotary tables are derived, not saved
    assert not any("rope" in k for k in a)


def test_init_statistics():
    cfg = tiny("moe", layers=8, dim=64, ffn_dim=128)
    model = build(cfg)
    out_std = cfg.init_std / math.sqrt(2 * cfg.layers)
    block = model.layers["0"]
    assert torch.equal(block.attn_norm.weight, torch.ones(cfg.dim))
    assert torch.equal(model.norm.weight, torch.ones(cfg.dim))
    assert block.attn.wq.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert block.attn.wo.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert block.ffn.experts.w1.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert block.ffn.experts.w2.std().item() == pytest.approx(out_std, rel=0.1)
    assert model.embed.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)


def test_meta_device_then_init_weights_matches():
    cfg = tiny("moe")
    ref = build(cfg, seed=5)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(5)
    model.init_weights()
    tokens = torch.randint(0, cfg.vocab, (2, 9))
    torch.testing.assert_close(model(tokens), ref(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gpt", "moe"])
def test_causality(kind):
    cfg = tiny(kind)
    model = build(cfg, dtype=torch.float64)
    tokens = torch.randint(0, cfg.vocab, (2, 20))
    base = model(tokens)
    for t in (0, 7, 19):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, t], base[:, t])


def test_rotary_relative_position():
    head_dim, seq_len = 16, 64
    cos, sin = rotary_tables(head_dim, seq_len, 10000.0)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(head_dim, generator=gen, dtype=torch.float64)
    cos, sin = cos.double(), sin.double()
    # the same vectors placed at every position
    qs = apply_rotary(q.expand(seq_len, head_dim), cos, sin)
    ks = apply_rotary(k.expand(seq_len, head_dim), cos, sin)
    scores = qs @ ks.t()  # scores[m, n] = <R_m q, R_n k>
    for delta in (-5, 0, 3, 17):
        diag = torch.diagonal(scores, offset=-delta)  # entries with m - n = delta
        assert diag.numel() > 10
        torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=0, atol=1e-6)
    assert not torch.isclose(scores[10, 10], scores[10, 7])
    # rotation keeps the norm, and position 0 is the identity
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(seq_len), rtol=0, atol=1e-6)
    torch.testing.assert_close(qs[0], q, rtol=0, atol=0)


def test_rmsnorm_matches_definition_and_keeps_dtype():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def make_moe(dim=12, ffn=20, experts=5, top_k=2, seed=0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(dim, ffn, experts, top_k).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.5)
    return moe


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    w1, w3, w2 = moe.experts.w1, moe.experts.w3, moe.experts.w2
    for n in range(x.shape[0]):
        probs = torch.softmax(moe.router.weight @ x[n], dim=-1)
        top_p, top_i = torch.topk(probs, moe.top_k)
        gates = top_p / top_p.sum()
        for g, e in zip(gates, top_i.tolist()):
            h = F.silu(w1[e] @ x[n]) * (w3[e] @ x[n])
            out[n] += g * (w2[e] @ h)
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_matches_naive_reference(top_k):
    moe = make_moe(top_k=top_k, seed=top_k)
    x = torch.randn(4, 7, 12, dtype=torch.float64)
    y = moe(x)
    assert y.shape == x.shape
    expected = naive_moe(moe, x.reshape(-1, 12)).reshape(x.shape)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert moe.tokens_per_expert.sum().item() == 28 * top_k
    assert moe.tokens_per_expert.dtype == torch.int64
    assert not moe.tokens_per_expert.requires_grad


def test_moe_balancing_loss_formula():
    moe = make_moe()
    x = torch.randn(30, 12, dtype=torch.float64)
    moe(x)
    probs = torch.softmax(x @ moe.router.weight.t(), dim=-1)
    top_i = torch.topk(probs, moe.top_k, dim=-1).indices
    f = torch.stack([(top_i == e).sum() for e in range(moe.num_experts)]).double() / (30 * moe.top_k)
    expected = moe.num_experts * torch.sum(f * probs.mean(0))
    torch.testing.assert_close(moe.aux_loss, expected, rtol=1e-12, atol=1e-12)


def test_moe_balancing_loss_uniform_and_collapsed():
    experts, top_k, dim = 4, 2, 8
    moe = MoE(dim, 16, experts, top_k).double()
    with torch.no_grad():
        moe.router.weight.zero_()
        # input e_0 prefers experts {0, 1}, input e_1 prefers {2, 3}, equally strongly
        moe.router.weight[:, 0] = torch.tensor([3.0, 3.0, 0.0, 0.0])
        moe.router.weight[:, 1] = torch.tensor([0.0, 0.0, 3.0, 3.0])
    x = torch.zeros(10, dim, dtype=torch.float64)
    x[:5, 0] = 1.0
    x[5:, 1] = 1.0
    moe(x)
    # f_e = 1/E and P_e = 1/E for every e: E * sum_e (1/E)(1/E) = 1
    assert moe.tokens_per_expert.tolist() == [5, 5, 5, 5]
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-12)

    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor([8.0, 4.0, 0.0, 0.0])
    x = torch.zeros(10, dim, dtype=torch.float64)
    x[:, 0] = 1.0
    moe(x)
    # every token goes to experts 0 and 1: f = (1/2, 1/2, 0, 0), P = softmax([8, 4, 0, 0])
    p = torch.softmax(torch.tensor([8.0, 4.0, 0.0, 0.0], dtype=torch.float64), dim=0)
    expected = experts * (0.5 * p[0] + 0.5 * p[1])
    assert moe.tokens_per_expert.tolist() == [10, 10, 0, 0]
    assert moe.aux_loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert moe.aux_loss.item() > 1.9


def loss_of(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return ce + model.cfg.aux_loss_coef * model.aux_loss()


def test_gradients_reach_every_parameter_gpt():
    cfg = tiny("gpt")
    model = build(cfg)
    loss_of(model, torch.randint(0, cfg.vocab, (2, 16))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_reach_router_and_experts_moe():
    cfg = tiny("moe", aux_loss_coef=0.1)
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab, (4, 20))
    loss_of(model, tokens).backward()
    assert torch.all(model.tokens_per_expert() > 0)
    assert model.aux_loss().requires_grad
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    layer_losses = [block.ffn.aux_loss for block in model.layers.values()]
    torch.testing.assert_close(model.aux_loss(), sum(layer_losses))
    for i, block in model.layers.items():
        w1_grad = block.ffn.experts.w1.grad
        # every expert that received tokens gets its own gradient slice
        assert torch.all(w1_grad.flatten(1).abs().sum(1) > 0), i

    # the balancing loss alone trains the router
    model.zero_grad()
    model(tokens)
    model.aux_loss().backward()
    router = model.layers["0"].ffn.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(kind="dense"), "model.kind"),
        (dict(layers=0), "model.layers"),
        (dict(dim=-8), "model.dim"),
        (dict(heads=0), "model.heads"),
        (dict(ffn_dim=0), "model.ffn_dim"),
        (dict(vocab=0), "model.vocab"),
        (dict(seq_len=0), "model.seq_len"),
        (dict(layers=2.5), "model.layers"),
        (dict(heads=True), "model.heads"),
        (dict(dim=256, heads=3), "model.heads"),
        (dict(dim=24, heads=8), "model.heads"),  # head dim 3 is odd
        (dict(kind="moe", experts=0), "model.experts"),
        (dict(kind="moe", experts=4, top_k=5), "model.top_k"),
        (dict(kind="moe", top_k=0), "model.top_k"),
        (dict(rope_theta=0.0), "model.rope_theta"),
        (dict(norm_eps=-1e-5), "model.norm_eps"),
        (dict(aux_loss_coef=-0.01), "model.aux_loss_coef"),
        (dict(init_std=-0.02), "model.init_std"),
        (dict(init_std=float("nan")), "model.init_std"),
    ],
)
def test_validate_rejects(overrides, key):
    cfg = ModelConfig(**overrides)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.key == key
    assert key in str(info.value)
    assert "accepted" in str(info.value)
    with pytest.raises(ConfigError):
        build_model(cfg)


def test_validate_messages_say_what_is_accepted():
    with pytest.raises(ConfigError, match=r"a divisor of model.dim=256 such as 1, 2, 4, 8"):
        ModelConfig(dim=256, heads=3).validate()
    with pytest.raises(ConfigError, match=r"even head dim, such as 1, 2, 3, 4, 6, 12"):
        ModelConfig(dim=24, heads=8).validate()
    with pytest.raises(ConfigError, match=r"from 1 to model.experts=4"):
        ModelConfig(kind="moe", experts=4, top_k=5).validate()


def test_validate_accepts_defaults_and_ignores_moe_fields_for_gpt():
    ModelConfig().validate()
    ModelConfig(kind="moe").validate()
    ModelConfig(kind="gpt", experts=0, top_k=9).validate()
    assert ModelConfig(dim=256, heads=4).head_dim == 64


@pytest.fixture
def one_thread():
    # tiny ops: a second intra-op thread only adds synchronisation, and hurts on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_gpt_overfits_one_batch(one_thread):
    cfg = ModelConfig(kind="gpt", layers=2, dim=32, heads=2, ffn_dim=64, vocab=32, seq_len=33)
    model = build(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab, (4, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(100):
        loss = loss_of(model, tokens)
        if first is None:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = loss_of(model, tokens).item()
    assert first == pytest.approx(math.log(cfg.vocab), rel=0.05)
    assert final < 0.5 * first, (first, final)
