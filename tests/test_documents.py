"""Whole documents for hybrid data parallelism: pieces inside their files, steps a pure function of (seed, step)."""

from __future__ import annotations

import functools

import pytest
import torch

from plait.errors import ConfigError
from plait.runtime.data import DataConfig, load_corpus
from plait.runtime.documents import DocumentLoader, document_pieces, length_histogram


@functools.cache
def corpus():
    return load_corpus(DataConfig(max_bytes=3_000_000))


def test_pieces_cover_each_file_and_never_cross_into_the_next():
    c = corpus()
    pieces = document_pieces(c.train_files, 512)
    assert pieces.shape[0] > 1000
    assert int(pieces[:, 1].max()) <= 513 and int(pieces[:, 1].min()) >= 2
    files = c.train_files.tolist()
    by_file: dict[int, int] = {}
    f = 0
    for start, size in pieces.tolist():
        while not files[f][0] <= start < files[f][0] + files[f][1]:
            f += 1
        assert start + size <= files[f][0] + files[f][1]
        by_file[f] = by_file.get(f, 0) + size
        assert 0 not in c.train[start:start + size].tolist()  # the separator's byte 0 stays outside
    # every byte of a file is in a piece, but a last piece of one byte (which holds no token)
    for f, (start, length) in enumerate(files):
        assert length - by_file.get(f, 0) in (0, 1)


def test_a_step_is_a_pure_function_of_seed_and_step_and_resumes_exactly():
    c = corpus()
    pieces = document_pieces(c.train_files, 256)
    a = DocumentLoader(c.train, pieces, global_batch=16, seed=3, max_len=256)
    b = DocumentLoader(c.train, pieces, global_batch=16, seed=3, max_len=256)
    seen = []
    for step in range(4):
        assert a.step_lengths() == b.step_lengths(step) == [len(x) for x, _ in a.documents()]
        seen.append([x.tolist() for x, _ in a.documents()])
        a.advance()
    resumed = DocumentLoader(c.train, pieces, global_batch=16, seed=3, max_len=256)
    state = {"cursor": 2 * 16, "seed": 3, "max_len": 256}
    resumed.load_state_dict(state)
    assert [x.tolist() for x, _ in resumed.documents()] == seen[2]
    # targets are the inputs shifted by one byte, from the same piece
    x, y = a.documents([0])[0]
    assert torch.equal(x[1:], y[:-1])
    other = DocumentLoader(c.train, pieces, global_batch=16, seed=4, max_len=256)
    assert other.step_lengths(0) != b.step_lengths(0)


def test_a_new_epoch_reshuffles_and_every_document_is_seen_once_per_epoch():
    c = corpus()
    pieces = document_pieces(c.train_files, 4096)
    loader = DocumentLoader(c.train, pieces, global_batch=8, seed=0, max_len=4096)
    n = loader.documents_per_epoch
    order = [loader._piece(i) for i in range(n)]
    assert sorted(order) == list(range(n))
    assert [loader._piece(n + i) for i in range(n)] != order


def test_lengths_are_long_tailed_and_binned_exactly():
    c = corpus()
    pieces = document_pieces(c.train_files, 1 << 16)
    edges = [0, 256, 1024, 4096, 16384]
    hist = length_histogram(pieces, edges)
    assert sum(hist) == pieces.shape[0]
    tokens = (pieces[:, 1] - 1).float()
    assert tokens.max() > 8 * tokens.median()  # a long tail


def test_bad_inputs_are_named():
    c = corpus()
    with pytest.raises(ConfigError, match="data.max_len"):
        document_pieces(c.train_files, 0)
    pieces = document_pieces(c.train_files, 1 << 20)
    with pytest.raises(ConfigError, match="train.global_batch"):
        DocumentLoader(c.train, pieces, global_batch=pieces.shape[0] + 1, seed=0, max_len=1 << 20)
    loader = DocumentLoader(c.train, pieces, global_batch=4, seed=0, max_len=1 << 20)
    with pytest.raises(ValueError, match="seed=1"):
        loader.load_state_dict({"cursor": 0, "seed": 1, "max_len": 1 << 20})
    with pytest.raises(IndexError):
        loader.documents([4])
