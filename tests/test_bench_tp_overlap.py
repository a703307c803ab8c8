"""`plait bench tp_overlap --quick`: two tp ranks in network namespaces across a shaped link (needs root, as
CI has); the record holds the four times, the same math, and the rings' bytes as the ledger counts them."""

from __future__ import annotations

import json
import math
import os

import pytest

from plait.bench.runner import run_benchmark

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root (CI runs as root)")


@needs_root
def test_quick_run_measures_the_four_times_in_one_run(tmp_path):
    record = run_benchmark("tp_overlap", out_dir=tmp_path, quick=True)
    result = record["result"]
    assert json.loads((tmp_path / "tp_overlap.json").read_text())["benchmark"] == "tp_overlap"
    rounds = result["settings"]["rounds"]
    for name in ("off", "on", "comm", "compute", "comm_plain"):
        assert len(result["times_s"][name]) == rounds and all(t > 0 for t in result["times_s"][name])
    t = {k: result[f"t_{k}_s"] for k in ("off", "on", "comm", "compute")}
    hideable = min(t["comm"], t["compute"])
    want = (t["off"] - t["on"]) / hideable
    # the times are rounded to 0.1 ms (each off by ≤ 5e-5 s) and the ratio to 1e-3
    assert math.isclose(result["achieved_overlap"], want, abs_tol=(2 + abs(want)) * 5e-5 / hideable + 5e-4)
    assert result["target"] == 0.60
    # overlap on computes what overlap off does (float32, fp32 reassociation of two partial sums)
    assert result["same_math_max_abs"] < 1e-5
    # per rank, four rings of one chunk each (tp = 2), sent in pieces: the bytes the link was sized for
    from plait.parallel.tp_overlap import pieces_of

    calls = 4 * pieces_of(result["settings"]["seq"] // 2)
    assert result["ring_ledger"] == {"tp": {"send": {"bytes": result["wire_bytes_per_rank"], "calls": calls}}}
