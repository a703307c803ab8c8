"""`plait bench lsh_tokens`'s measurement, on a small untrained model (the benchmark's training run is not repeated here)."""

from __future__ import annotations

import torch

from plait.bench import lsh_tokens
from plait.runtime.models import ModelConfig, build_model

MODEL = ModelConfig(kind="moe", layers=2, dim=32, heads=4, ffn_dim=64, vocab=256, seq_len=16, experts=4, top_k=2)


def _model():
    torch.manual_seed(0)
    return build_model(MODEL).eval()


def test_repeating_a_micro_step_s_times_divides_the_ratio_by_s_and_keeps_fidelity():
    # s copies of the same sequences: every copy of a token has the same key as the others (the centring mean is
    # unchanged), so each bucket gains exactly s members, its centroid and so every cosine stay as they were
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 256, (4, 16), generator=gen)
    batches = {s: base.repeat(s, 1) for s in (1, 2, 4)}
    rows = lsh_tokens.measure(_model(), batches, {"default": {}})
    assert [r["tokens"] for r in rows] == [64, 128, 256]
    one = rows[0]["default"]
    for row, s in zip(rows, (1, 2, 4)):
        for layer, first in zip(row["default"]["layers"], one["layers"]):
            assert layer["copies"] == s * first["copies"] == s * 64 * MODEL.top_k
            assert layer["centroids"] == first["centroids"]
            assert abs(layer["fidelity"] - first["fidelity"]) < 1e-9  # the same buckets, each s times over
        assert abs(row["default"]["ratio"] - one["ratio"] / s) < 1e-12
    assert lsh_tokens.first_reaching(rows, "default", target=one["ratio"] / 4 + 1e-12)["tokens"] == 256
    assert lsh_tokens.first_reaching(rows, "default", target=one["ratio"] / 8) is None


def test_coarser_codes_merge_more_and_fidelity_is_a_cosine():
    gen = torch.Generator().manual_seed(2)
    rows = lsh_tokens.measure(_model(), {1: torch.randint(0, 256, (8, 16), generator=gen)},
                              {"default": {}, "coarse": {"dim": 2, "hashes": 1}})
    fine, coarse = rows[0]["default"], rows[0]["coarse"]
    assert 0 < coarse["ratio"] < fine["ratio"] <= 1
    for layer in fine["layers"] + coarse["layers"]:
        assert -1.0 <= layer["fidelity"] <= 1.0 + 1e-12
    # one hash over 2 coordinates has 4 codes: at most 4 centroids per expert segment
    assert all(layer["centroids"] <= 4 * MODEL.experts for layer in coarse["layers"])
