"""`plait bench`: the runner lists, refuses unknown names, and a quick overhead run writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from plait.bench.runner import list_benchmarks, run_benchmark
from plait.errors import CLIError


def test_lists_the_overhead_benchmark():
    assert "overhead" in list_benchmarks()


def test_unknown_benchmark_is_a_typed_error():
    with pytest.raises(CLIError, match="did you mean 'overhead'"):
        run_benchmark("overhed")


def test_quick_overhead_run_writes_results_with_machine_and_ratio(tmp_path):
    done = subprocess.run([sys.executable, "-m", "plait.runtime.cli", "bench", "overhead", "--quick", "--json", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "overhead.json").read_text())
    assert record["benchmark"] == "overhead" and record["quick"] is True
    for field in ("cpu", "cores", "python", "torch", "plait"):
        assert record["machine"][field]
    rows = record["result"]["rows"]
    assert [r["nproc"] for r in rows] == [2]
    for row in rows:
        assert row["plait_tokens_per_s"] > 0 and row["ddp_tokens_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["plait_tokens_per_s"] / row["ddp_tokens_per_s"], rel=1e-3)
        assert row["ddp_zero1_tokens_per_s"] > 0  # the ZeRO-1 peer runs; plait's own ZeRO-1 only in the full run
        assert "plait_zero1_tokens_per_s" not in row and "ratio_vs_ddp_zero1" not in row


def test_quick_gf256_run_reports_every_path(tmp_path):
    record = run_benchmark("gf256", out_dir=tmp_path, quick=True)
    gbps = record["result"]["gbps"]
    assert {"kernel_1_thread", "numpy_xor", "scalar_kernel_1_thread"} <= set(gbps)
    assert all(v > 0 for v in gbps.values())
    assert json.loads((tmp_path / "gf256.json").read_text())["benchmark"] == "gf256"


def test_quick_parallel_run_matches_the_closed_form_ledger(tmp_path):
    record = run_benchmark("parallel", out_dir=tmp_path, quick=True)
    rows = record["result"]["rows"]
    assert [r["layout"] for r in rows] == ["pp2 tp2"]
    (row,) = rows
    assert row["ledger_matches"], (row["layout"], row["ledger"], row["closed_form"])
    assert row["step_s"] > 0 and row["parallel"]["pp"] == row["parallel"]["tp"] == 2
    assert row["bytes_per_axis"]["tp"] > 0 and row["bytes_per_axis"]["pp"] > 0


def test_quick_rings_run_times_every_way_and_checks_the_results(tmp_path):
    record = run_benchmark("rings", out_dir=tmp_path, quick=True)
    rows = record["result"]["rows"]
    assert [(r["world"], r["mb"]) for r in rows] == [(2, 1.0)]
    row = rows[0]
    ways = {"gloo_all_reduce", "gloo_reduce_scatter", "ring_reduce_scatter", "ring_reduce_scatter_started",
            "gloo_all_gather", "ring_all_gather"}
    assert set(row["median_ms"]) == ways
    rounds = record["result"]["settings"]["rounds"]
    assert all(len(row["times_ms"][w]) == rounds and min(row["times_ms"][w]) > 0 for w in ways)
    assert row["ring_rs_over_gloo_rs"] == round(row["median_ms"]["ring_reduce_scatter"]
                                                / row["median_ms"]["gloo_reduce_scatter"], 3)
    # two ranks: each sum is one fp32 addition of the same two numbers, in either order the same bits
    assert row["reduce_scatter_max_abs_diff"] == 0.0 and row["reduce_scatter_max_abs"] > 0
    assert row["all_gather_equal"] is True
