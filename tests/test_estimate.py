"""The planner's closed forms against the real model."""

from __future__ import annotations

import pytest

from plait.runtime.config import model_spec
from plait.runtime.models import ModelConfig, build_model, count_parameters
from plait.scheduler.estimate import memory_per_rank, param_count, train_flops_per_token


@pytest.mark.parametrize(
    "fields",
    [
        dict(kind="gpt", layers=2, dim=64, heads=4, ffn_dim=96, vocab=256, seq_len=32),
        dict(kind="gpt", layers=3, dim=32, heads=2, ffn_dim=64, vocab=300, seq_len=16),
        dict(kind="moe", layers=2, dim=64, heads=4, ffn_dim=96, vocab=256, seq_len=32, experts=4, top_k=2),
        dict(kind="moe", layers=1, dim=32, heads=1, ffn_dim=48, vocab=256, seq_len=8, experts=8, top_k=1),
    ],
)
def test_param_count_is_exact(fields):
    config = ModelConfig(**fields)
    counted = count_parameters(build_model(config))
    estimated = param_count(model_spec(config))
    assert estimated.total == counted["total"]
    assert estimated.active == counted["active"]
    assert estimated.embedding == counted["embedding"]
    assert estimated.experts == counted["expert"]


def test_flops_and_memory_scale_as_they_should():
    small = model_spec(ModelConfig(kind="gpt", layers=2, dim=64, heads=4, ffn_dim=96, seq_len=32))
    deep = model_spec(ModelConfig(kind="gpt", layers=4, dim=64, heads=4, ffn_dim=96, seq_len=32))
    shared = param_count(small).total - 2 * (param_count(deep).total - param_count(small).total) // 2
    assert shared == 256 * 64 * 2 + 64  # embedding, head, final norm
    assert train_flops_per_token(deep) > train_flops_per_token(small)
    one = memory_per_rank(small, micro_batch=1, dtype="float32")
    two = memory_per_rank(small, micro_batch=2, dtype="float32")
    half = memory_per_rank(small, micro_batch=2, dtype="bfloat16")
    assert two.activations == 2 * one.activations and two.params == one.params
    assert half.activations < two.activations
    assert one.optimizer == 2 * one.params
