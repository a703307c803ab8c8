"""The planner's memory model against what plait's model and optimizer really hold.

The activation law is held exactly to autograd's saved tensors of plait's own model on one
rank (every storage autograd keeps for backward that is not a parameter, counted once);
parameter and optimizer terms to the model's parameter count. The multi-rank prediction
against measured peak memory is ``plait bench plan_memory``'s (±15 %).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plait.runtime.config import model_spec
from plait.runtime.models import ModelConfig, build_model, count_parameters
from plait.scheduler.comm_volume import Layout, uniform_stage_layers
from plait.scheduler.memory import head_activation_elements, in_flight, layer_activation_elements, rank_memory
from plait.scheduler.pipeline import schedule, simulate


def saved_elements(cfg: ModelConfig, batch: int) -> int:
    """Elements of every distinct storage autograd saves for backward in one forward and loss (parameters aside)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    tokens = torch.randint(0, cfg.vocab, (batch, cfg.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
        F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="sum")
    return sum(seen.values())


SHAPES = [  # batch, dim, heads, ffn_dim, vocab, seq_len, layers, experts, top_k
    (1, 32, 8, 40, 61, 32, 1, 4, 2),
    (3, 64, 4, 48, 50, 24, 2, 4, 1),
    (2, 48, 2, 96, 70, 16, 3, 8, 2),
]


@pytest.mark.parametrize("kind", ["gpt", "moe"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-h{}-f{}-v{}-t{}-l{}-e{}-k{}".format(*s))
def test_activation_law_is_exact_on_one_rank(kind, shape):
    batch, dim, heads, ffn, vocab, seq, layers, experts, top_k = shape
    cfg = ModelConfig(kind=kind, layers=layers, dim=dim, heads=heads, ffn_dim=ffn, vocab=vocab, seq_len=seq,
                      experts=experts, top_k=top_k)
    spec = model_spec(cfg)
    n = batch * seq
    predicted = layers * layer_activation_elements(spec, Layout(world=1), n) + head_activation_elements(spec, n)
    assert predicted == saved_elements(cfg, batch)


def demo_spec(kind: str = "moe"):
    return model_spec(ModelConfig(kind=kind, layers=4, dim=64, heads=4, ffn_dim=96, vocab=128, seq_len=32,
                                  experts=4, top_k=2))


@pytest.mark.parametrize("kind", ["gpt", "moe"])
def test_one_rank_holds_every_parameter_its_gradient_and_adam_state(kind):
    spec = demo_spec(kind)
    total = count_parameters(build_model(ModelConfig(kind=kind, layers=4, dim=64, heads=4, ffn_dim=96, vocab=128,
                                                     seq_len=32, experts=4, top_k=2)))["total"]
    (mem,) = rank_memory(spec, Layout(world=1), global_batch=4, micro_batch=2)
    assert mem.params == mem.grads == 4 * total
    assert mem.optimizer == 4 * 4 * total  # master slice, two moments and its gradient, unsharded on one rank


@pytest.mark.parametrize("kind", ["gpt", "moe"])
def test_pipeline_stages_split_the_parameters_and_data_parallel_shards_the_optimizer(kind):
    spec = demo_spec(kind)
    (whole,) = rank_memory(spec, Layout(world=1), global_batch=8, micro_batch=1)
    stages = rank_memory(spec, Layout(world=2, pp=2), global_batch=8, micro_batch=1)
    assert sum(m.params for m in stages) == whole.params
    (sharded,) = rank_memory(spec, Layout(world=4, dp=4, edp=4), global_batch=8, micro_batch=1)
    assert sharded.params == whole.params
    # each bucket padded to a multiple of 4, then a quarter of it owned
    assert whole.optimizer / 4 <= sharded.optimizer <= whole.optimizer / 4 + 4 * 4 * 4 * 8
    # tensor parallelism halves the attention and MLP weights, not the embedding, head or router
    (tp2,) = rank_memory(spec, Layout(world=2, tp=2), global_batch=8, micro_batch=1)
    assert whole.params / 2 < tp2.params < whole.params


@pytest.mark.parametrize("pp, vpp, micros", [(2, 1, 4), (4, 1, 8), (4, 1, 2), (2, 2, 4), (4, 2, 8), (4, 2, 4),
                                             (8, 2, 16)])
def test_in_flight_micro_batches_follow_the_runtime_schedule(pp, vpp, micros):
    """The memory model's micro-batches in flight are the peak of the runtime's own schedule, executed."""
    walked = simulate([schedule(pp, vpp, micros, r) for r in range(pp)], pp, vpp).peak_in_flight
    assert [round(in_flight(pp, vpp, micros, r) * vpp) for r in range(pp)] == walked


def test_uniform_split_gives_the_first_stage_the_fewest_layers():
    assert uniform_stage_layers(6, 4) == [1, 1, 2, 2]
    assert sum(uniform_stage_layers(48, 40)) == 48
