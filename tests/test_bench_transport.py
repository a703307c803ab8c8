"""`plait bench transport --quick`: both transports measured on every path, and the JSON says so."""

from __future__ import annotations

import json

import pytest

from plait.bench.runner import list_benchmarks, run_benchmark


def test_quick_transport_run_writes_every_path_for_both_transports(tmp_path):
    assert "transport" in list_benchmarks()
    record = run_benchmark("transport", out_dir=tmp_path, quick=True)
    assert json.loads((tmp_path / "transport.json").read_text()) == record
    assert record["benchmark"] == "transport" and record["quick"] is True
    result = record["result"]
    assert result["bytes"] == 32 << 20 and result["repetitions"] == 1
    assert set(result["paths"]) == {"get", "client_push", "daemon_push"}
    for path, row in result["paths"].items():
        for transport in ("tcp", "grpc"):
            assert row[f"{transport}_s"] > 0 and row[f"{transport}_gbps"] > 0, (path, transport)
            assert len(row[f"{transport}_all_s"]) == 1
            assert row[f"{transport}_gbps"] == pytest.approx(result["bytes"] / row[f"{transport}_s"] / 1e9, rel=0.01)
        assert row["tcp_over_grpc"] == pytest.approx(row["tcp_gbps"] / row["grpc_gbps"], rel=0.01)
