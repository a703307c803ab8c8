"""`plait bench ec`: the quick run writes a complete record (every case, thread count and
peer, ISA-L's kernel interleaved with plait's, each vector kernel at one thread, the
memory reference counting k*L + m*L bytes, ratios, goals, plait's decode verified), and
a missing peer is reported, not fatal."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from plait.bench import ec, ec_peers
from plait.ops import gf256_matmul_kernels
from plait.bench.runner import list_benchmarks

GBPS_KEYS = {
    "plait_encode", "plait_encode_cold", "plait_decode", "pyeclib_encode", "pyeclib_decode",
    "pyeclib_encode_default_malloc", "pyeclib_decode_default_malloc", "zfec_encode", "zfec_decode", "memcpy",
    "memory_bound", "isal_kernel_encode",
}
RATIO_KEYS = {
    "encode_vs_pyeclib", "decode_vs_pyeclib", "encode_vs_zfec", "decode_vs_zfec",
    "encode_vs_memory_bound", "decode_vs_memory_bound", "encode_cold_vs_memory_bound", "encode_vs_isal_kernel",
    "encode_vs_isal_kernel_paired",
}


def test_is_listed():
    assert "ec" in list_benchmarks()


def test_quick_run_writes_a_complete_record(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "plait.runtime.cli", "bench", "ec", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "ec.json").read_text())
    assert record["benchmark"] == "ec" and record["quick"] is True
    for field in ("cpu", "cores", "torch"):
        assert record["machine"][field]
    assert isinstance(record["machine"]["cpu_flags"], list)
    result = record["result"]
    threads = result["threads"]
    assert threads[0] == 1
    assert [tuple(c) for c in result["cases_km"]] == [(4, 2), (8, 2), (10, 4)]
    assert result["goals"] == {"vs_isal_kernel_per_core": 1.0, "vs_pyeclib_on_64MiB": 1.5, "vs_memory_bound": 0.7}
    kernels_here = gf256_matmul_kernels()
    assert result["plait_kernels"]["gf256_matmul_default"] == kernels_here[0]
    vector_kernels = [k for k in ec.VECTOR_KERNELS if k in kernels_here]
    cases = result["cases"]
    assert [(c["k"], c["m"], c["threads"]) for c in cases] == [(k, m, t) for k, m in [(4, 2), (8, 2), (10, 4)] for t in threads]
    peers = result["peers"]
    isal = result["isal"]["available"]
    for case in cases:
        k, m = case["k"], case["m"]
        assert case["verified"] is True, case  # plait's rebuilt shards equal the lost ones
        assert set(case["gbps"]) == GBPS_KEYS and set(case["ratios"]) == RATIO_KEYS
        for key in ("plait_encode", "plait_encode_cold", "plait_decode", "memcpy"):
            assert case["gbps"][key] > 0, key
        for lib in ("pyeclib", "zfec"):
            rates = [v for key, v in case["gbps"].items() if key.startswith(lib)]
            assert all((v is not None and v > 0) for v in rates) if peers[lib]["available"] else all(v is None for v in rates)
        # the memory reference: a copy of k*L bytes moves 2kL, an encode (k + m)L
        assert case["gbps"]["memory_bound"] == pytest.approx(case["gbps"]["memcpy"] * 2 * k / (k + m))
        assert case["ratios"]["encode_vs_memory_bound"] == pytest.approx(case["gbps"]["plait_encode"] / case["gbps"]["memory_bound"])
        if isal:  # ISA-L's kernel, checked to write plait's parity, at every thread count
            assert case["gbps"]["isal_kernel_encode"] > 0
            assert case["ratios"]["encode_vs_isal_kernel"] == pytest.approx(case["gbps"]["plait_encode"] / case["gbps"]["isal_kernel_encode"])
            assert case["goals_met"]["encode_vs_isal_kernel"] == ((case["ratios"]["encode_vs_isal_kernel"] >= 1.0) if case["threads"] == 1 else None)
            assert case["ratios"]["encode_vs_isal_kernel_paired"] > 0
            worst, best = case["gbps_range"]["isal_kernel_encode"]
            assert 0 < worst <= case["gbps"]["isal_kernel_encode"] <= best
        if peers["pyeclib"]["available"]:
            assert case["ratios"]["decode_vs_pyeclib"] == pytest.approx(case["gbps"]["plait_decode"] / case["gbps"]["pyeclib_decode"])
        if case["threads"] == 1:  # each vector kernel of this CPU, against ISA-L's for the same instructions
            assert list(case["kernels"]) == vector_kernels
            for kernel, rates in case["kernels"].items():
                assert rates["plait"] > 0
                assert (rates["isal"] is not None) == (isal and kernel not in result["isal"]["variants_missing"])
        else:
            assert case["kernels"] is None
        # quick stripes are 4 MiB: the pyeclib goal is judged on 64 MiB only
        assert case["goals_met"]["encode_vs_pyeclib"] is None
        assert case["goals_met"]["encode_vs_memory_bound"] == (case["ratios"]["encode_vs_memory_bound"] >= 0.7)
        assert case["data_bytes"] == case["k"] * case["shard_bytes"] and case["shard_bytes"] % 64 == 0
    assert result["all_verified"] is True
    assert result["noise"].startswith(("quiet", "shared"))
    for lib in ("pyeclib", "zfec"):
        installed = importlib.util.find_spec(lib) is not None
        assert peers[lib]["available"] == installed or not installed
    assert "ec: k=10 m=4" in done.stdout
    crc = result["checksum"]
    assert crc["all_agree"] is True
    assert {"crc32c_1_thread", "zlib_crc32_1_thread"} <= set(crc["gbps"]) and all(v > 0 for v in crc["gbps"].values())
    assert set(crc["gbps_1_thread_from_cache"]) >= set(result["plait_kernels"]["crc32c_here"])


def test_a_missing_peer_is_reported_not_fatal(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyeclib", None)  # makes `import pyeclib...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyeclib.ec_iface", None)
    out = ec_peers.measure_peers([{"bytes": 1 << 16, "repeats": 1}], ["pyeclib", "zfec"])
    assert out["available"]["pyeclib"] is False
    assert "ImportError" in out["errors"]["pyeclib"] or "ModuleNotFoundError" in out["errors"]["pyeclib"]
    for rates in out["rates"].values():
        assert "pyeclib_encode" not in rates
        if out["available"]["zfec"]:
            assert rates["zfec_encode"] > 0 and rates["zfec_decode"] > 0
