"""Packed documents: each computed as if alone (against plain per-document forwards), for dense and MoE models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plait.runtime.models import ModelConfig, build_model
from plait.runtime.models.transformer import packed_documents


def model(kind: str):
    torch.manual_seed(0)
    # MoE without token dropping: routing is per token, so packing cannot move a token to another expert
    return build_model(ModelConfig(kind=kind, layers=2, dim=32, heads=4, ffn_dim=64, vocab=61, seq_len=32,
                                   experts=4, top_k=2))


@pytest.mark.parametrize("kind", ["gpt", "moe"])
def test_each_packed_document_is_computed_as_if_alone(kind):
    m = model(kind)
    torch.manual_seed(1)
    lengths = [[5, 11, 16], [32], [1, 30, 1]]
    tokens = torch.randint(0, 61, (3, 32))
    packed = m(tokens, documents=lengths)
    for row, docs in enumerate(lengths):
        at = 0
        for n in docs:
            alone = m(tokens[row:row + 1, at:at + n])
            # each document is attended by its own causal call: the same kernel on the same values, except that
            # the linear layers see a different row count (their float32 sums may be blocked differently)
            torch.testing.assert_close(packed[row:row + 1, at:at + n], alone, rtol=1e-5, atol=1e-5)
            at += n


def test_gradients_of_a_packed_row_are_the_sum_of_the_documents():
    m = model("gpt")
    torch.manual_seed(2)
    tokens = torch.randint(0, 61, (1, 24))
    targets = torch.randint(0, 61, (1, 24))
    lengths = [9, 15]
    loss = F.cross_entropy(m(tokens, documents=[lengths]).flatten(0, 1), targets.flatten(), reduction="sum")
    packed = torch.autograd.grad(loss, list(m.parameters()))
    total = 0
    at = 0
    for n in lengths:
        logits = m(tokens[:, at:at + n])
        total = total + F.cross_entropy(logits.flatten(0, 1), targets[:, at:at + n].flatten(), reduction="sum")
        at += n
    alone = torch.autograd.grad(total, list(m.parameters()))
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_positions_restart_and_attention_stays_inside_each_document():
    positions, mask = packed_documents([[2, 3]], 5)
    assert positions.tolist() == [[0, 1, 0, 1, 2]]
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                         [0, 0, 1, 1, 1]]


def test_bad_document_lengths_are_named():
    m = model("gpt")
    with pytest.raises(ValueError, match=r"documents\[0\]: lengths \[3, 3\] must be positive and sum to the row's 8"):
        m(torch.zeros(1, 8, dtype=torch.long), documents=[[3, 3]])
    with pytest.raises(ValueError, match="pass one or the other"):
        m(torch.zeros(1, 8, dtype=torch.long), positions=torch.arange(8), documents=[[8]])


def test_attending_each_document_alone_equals_the_block_diagonal_mask():
    from plait.runtime.models.layers import _attend_documents

    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    lengths = [4, 1, 7]
    _, mask = packed_documents([lengths], 12)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(_attend_documents(q, k, v, lengths), dense, rtol=1e-12, atol=1e-12)
