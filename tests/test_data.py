"""The byte corpus and the deterministic, dp-invariant loader."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from plait.errors import ConfigError
from plait.runtime.data import SEPARATOR, DataConfig, SequenceLoader, eval_batches, load_corpus, stdlib_files


def tokens(n: int = 10_000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_corpus_is_the_stdlib_split_by_file():
    corpus = load_corpus(DataConfig(eval_fraction=0.05))
    root, files = stdlib_files()
    assert corpus.files == len(files) > 100
    assert corpus.train.dtype == torch.uint8 and corpus.train.numel() > 1_000_000
    total = sum(p.stat().st_size for p in files)
    separators = (corpus.files - 2) * len(SEPARATOR)
    assert corpus.train.numel() + corpus.eval.numel() == total + separators
    share = corpus.eval.numel() / (corpus.train.numel() + corpus.eval.numel())
    assert 0.01 < share < 0.15
    # Real text: mostly printable ASCII.
    sample = corpus.train[:100_000]
    assert ((sample >= 32) & (sample < 127)).float().mean() > 0.9
    again = load_corpus(DataConfig(eval_fraction=0.05))
    assert torch.equal(corpus.eval, again.eval)


def test_batches_are_deterministic_by_seed_and_targets_shift_by_one():
    data = tokens()
    a = SequenceLoader(data, seq_len=16, global_batch=8, seed=3)
    b = SequenceLoader(data, seq_len=16, global_batch=8, seed=3)
    c = SequenceLoader(data, seq_len=16, global_batch=8, seed=4)
    xa, ya = a.next_batch()
    xb, yb = b.next_batch()
    xc, _ = c.next_batch()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    assert xa.shape == (8, 16) and xa.dtype == torch.int64
    assert torch.equal(xa[:, 1:], ya[:, :-1])


@pytest.mark.parametrize("dp", [2, 4])
def test_global_batch_does_not_depend_on_dp(dp):
    data = tokens()
    single = SequenceLoader(data, seq_len=16, global_batch=8, seed=1)
    shards = [SequenceLoader(data, seq_len=16, global_batch=8, seed=1, dp_rank=r, dp_size=dp) for r in range(dp)]
    for _ in range(5):
        whole, _ = single.next_batch()
        parts = torch.cat([s.next_batch()[0] for s in shards])
        assert torch.equal(whole, parts)


def test_state_dict_resumes_exactly_across_epochs():
    data = tokens(2_000)  # 117 windows of 17: several epochs in 40 steps
    a = SequenceLoader(data, seq_len=16, global_batch=8, seed=5)
    for _ in range(17):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(23)]
    b = SequenceLoader(data, seq_len=16, global_batch=8, seed=5)
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next_batch()[0]) for e in expected)
    assert a.epoch > 2
    with pytest.raises(ValueError, match="seed"):
        SequenceLoader(data, seq_len=16, global_batch=8, seed=6).load_state_dict(state)


def test_each_epoch_visits_every_window_once():
    data = tokens(17 * 40 + 1)
    loader = SequenceLoader(data, seq_len=16, global_batch=8, seed=0)
    seen = torch.cat([loader.next_batch()[0] for _ in range(5)])
    assert len({tuple(row.tolist()) for row in seen}) == 40


def test_eval_set_is_the_same_for_any_dp():
    data = tokens()
    whole = torch.cat([x for x, _ in eval_batches(data, seq_len=16, batch=8, batches=3, dp_rank=0, dp_size=1)])
    for dp in (2, 4):
        rows = torch.cat([x for r in range(dp) for x, _ in eval_batches(data, seq_len=16, batch=8, batches=3, dp_rank=r, dp_size=dp)])
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, whole.tolist()))


def test_too_small_corpus_and_bad_config_are_typed_errors():
    with pytest.raises(ConfigError, match="train.global_batch"):
        SequenceLoader(tokens(100), seq_len=16, global_batch=8, seed=0)
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        DataConfig(eval_fraction=1.5).validate()


@settings(max_examples=25, deadline=None)
@given(
    seq_len=st.integers(1, 40),
    per_rank=st.integers(1, 4),
    dp=st.sampled_from([1, 2, 3, 4]),
    seed=st.integers(0, 2**31),
    steps=st.integers(1, 12),
)
def test_any_dp_sees_the_same_global_batches(seq_len, per_rank, dp, seed, steps):
    data = tokens(3_000, seed=seed % 7)
    global_batch = per_rank * dp
    if (data.numel() - 1) // (seq_len + 1) < global_batch:
        return
    single = SequenceLoader(data, seq_len=seq_len, global_batch=global_batch, seed=seed)
    shards = [SequenceLoader(data, seq_len=seq_len, global_batch=global_batch, seed=seed, dp_rank=r, dp_size=dp) for r in range(dp)]
    for _ in range(steps):
        whole, target = single.next_batch()
        assert torch.equal(whole, torch.cat([s.next_batch()[0] for s in shards]))
        assert torch.equal(whole[:, 1:], target[:, :-1])
