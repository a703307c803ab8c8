"""Reed-Solomon encode and decode GB/s: plait against pyeclib (ISA-L), zfec and memcpy.

For (k, m) in (4, 2), (8, 2), (10, 4) and 64 MiB and 1 GiB of data per stripe, at one
thread and at all threads, the median of several runs of:

* plait encode: ``ReedSolomon(k, m).encode`` (one ``gf256_matmul_`` call) into parity
  buffers allocated and pre-faulted once, as the snapshot daemon reuses its shared
  memory; and, for honesty, into freshly allocated (cold) buffers each run;
* plait decode: rebuild the first m data shards from the other k - m and the m parity
  shards, into pre-faulted buffers, and check the rebuilt bytes equal the originals;
* pyeclib 1.8 ``isa_l_rs_vand`` (ISA-L's AVX2 kernels behind liberasurecode) encode and
  decode of the same payload with the same m data fragments missing, in a child process
  started with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296``
  (glibc then recycles the fragment buffers instead of mapping and faulting fresh ones:
  pyeclib's best setting on these machines), and in one with the default malloc;
* zfec 1.6 encode and decode of the same shards (default malloc);
* for reference, ISA-L's own ``ec_encode_data`` (the library inside pyeclib's wheel, called
  through ctypes: no copies, pre-faulted outputs) with plait's parity matrix, i.e. the
  same product as plait's encode by ISA-L's hand-written AVX2 kernels;
* memcpy: ``numpy.copyto`` of the same k shards' bytes into a pre-faulted buffer (split
  over threads for the all-threads row), the speed of just moving the data once.

Rates count the k data shards' bytes (k * shard length), as ISA-L's and pyeclib's own
benchmarks do, for encode and decode alike. pyeclib and zfec are single-threaded: their
one-thread numbers stand in both rows. Goals: plait >= 1.5x pyeclib on 64 MiB, and
>= 70% of memcpy. ``--quick`` runs 4 MiB stripes only (for smoke tests).

It also times the shards' checksum, CRC-32C (``plait.ops.checksum``), on the first
stripe size, against ``zlib.crc32`` of the same bytes.

Peers run in child processes executing this file directly (``python bench/ec.py
--peers ...``), so they never load torch and keep their own heap; a missing peer is
reported as such, with the import error, and its rates are null.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

NAME = "ec"
CASES = ((4, 2), (8, 2), (10, 4))
GOAL_VS_PYECLIB = 1.5  # on the 64 MiB stripes
GOAL_VS_MEMCPY = 0.7
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
MiB = 1 << 20


def _plan(quick: bool) -> list[dict[str, int]]:
    """Stripe sizes and repetitions: (bytes of data, runs per measurement)."""
    if quick:
        return [{"bytes": 4 * MiB, "repeats": 3}]
    return [{"bytes": 64 * MiB, "repeats": 9}, {"bytes": 1024 * MiB, "repeats": 5}]


def _shard_bytes(total: int, k: int) -> int:
    # A multiple of 64 (whole vectors), as pyeclib aligns its fragments too.
    return total // k // 64 * 64


def _payload(nbytes: int) -> bytes:
    import numpy as np

    return np.random.default_rng(nbytes).bytes(nbytes)


def _median_seconds(fn, repeats: int, setup=None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------ peers


def _isal_library():
    """ISA-L as bundled in pyeclib's wheel (pyeclib.libs/libisal*.so), through ctypes, or None."""
    import ctypes
    import glob
    import importlib.util

    spec = importlib.util.find_spec("pyeclib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.dirname(list(spec.submodule_search_locations)[0])
    for path in sorted(glob.glob(os.path.join(root, "pyeclib.libs", "libisal*.so*"))):
        try:
            lib = ctypes.CDLL(path)
            lib.ec_init_tables, lib.ec_encode_data  # noqa: B018  (both must exist)
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _measure_isal_kernel(lib, payload: bytes, k: int, m: int, shard: int, coefs: list[list[int]], repeats: int) -> float:
    """GB/s of ISA-L's ec_encode_data alone (no pyeclib copies, pre-faulted outputs), with
    plait's parity matrix: the same product as plait's encode, by ISA-L's AVX2 kernels."""
    import ctypes

    import numpy as np

    data = np.frombuffer(payload, dtype=np.uint8)[: k * shard].reshape(k, shard)
    matrix = np.array(coefs, dtype=np.uint8)
    tables = (ctypes.c_ubyte * (32 * k * m))()
    lib.ec_init_tables(k, m, matrix.ctypes.data_as(ctypes.c_void_p), tables)
    parity = np.ones((m, shard), dtype=np.uint8)
    ins = (ctypes.c_void_p * k)(*[data[i].ctypes.data for i in range(k)])
    outs = (ctypes.c_void_p * m)(*[parity[j].ctypes.data for j in range(m)])
    lib.ec_encode_data(ctypes.c_int(shard), k, m, tables, ins, outs)
    t = _median_seconds(lambda: lib.ec_encode_data(ctypes.c_int(shard), k, m, tables, ins, outs), repeats)
    return k * shard / t / 1e9


def _measure_peers(sizes: list[dict[str, int]], which: list[str], parity_rows: dict[str, list[list[int]]]) -> dict[str, Any]:
    """In a child process: pyeclib and/or zfec rates for every case and size (and, with
    pyeclib, its bundled ISA-L kernel called directly)."""
    out: dict[str, Any] = {"available": {}, "versions": {}, "errors": {}, "rates": {}}
    import importlib.metadata

    for lib in which:
        try:
            if lib == "pyeclib":
                from pyeclib.ec_iface import ECDriver

                ECDriver(k=4, m=2, ec_type="isa_l_rs_vand")  # raises if the backend is missing
            else:
                import zfec  # noqa: F401
            out["available"][lib] = True
            out["versions"][lib] = importlib.metadata.version(lib)
        except Exception as exc:  # ImportError, or liberasurecode without ISA-L
            out["available"][lib] = False
            out["errors"][lib] = f"{type(exc).__name__}: {exc}"
    for size in sizes:
        total, repeats = size["bytes"], size["repeats"]
        payload_all = _payload(total)
        for k, m in CASES:
            shard = _shard_bytes(total, k)
            payload = payload_all[: k * shard]
            key = f"{k},{m},{total}"
            rates = out["rates"].setdefault(key, {})
            if out["available"].get("pyeclib"):
                from pyeclib.ec_iface import ECDriver

                driver = ECDriver(k=k, m=m, ec_type="isa_l_rs_vand")
                fragments = driver.encode(payload)  # warm-up, and the input of decode
                t = _median_seconds(lambda: driver.encode(payload), repeats)
                rates["pyeclib_encode"] = len(payload) / t / 1e9
                survivors = fragments[m:]  # the first m data fragments are lost
                if driver.decode(survivors) != payload:
                    raise AssertionError(f"pyeclib decode of k={k} m={m} is wrong")
                t = _median_seconds(lambda: driver.decode(survivors), repeats)
                rates["pyeclib_decode"] = len(payload) / t / 1e9
                del fragments, survivors
                isal = _isal_library()
                if isal is not None and f"{k},{m}" in parity_rows:
                    rates["isal_kernel_encode"] = _measure_isal_kernel(isal, payload, k, m, shard, parity_rows[f"{k},{m}"], repeats)
            if out["available"].get("zfec"):
                import zfec

                blocks = [payload[i * shard : (i + 1) * shard] for i in range(k)]
                encoder = zfec.Encoder(k, k + m)
                parity_ids = list(range(k, k + m))
                zfec_repeats = max(1, min(repeats, 3)) if total > 64 * MiB else repeats
                parity = encoder.encode(blocks, parity_ids)
                t = _median_seconds(lambda: encoder.encode(blocks, parity_ids), zfec_repeats)
                rates["zfec_encode"] = len(payload) / t / 1e9
                decoder = zfec.Decoder(k, k + m)
                shares = blocks[m:] + list(parity)
                numbers = list(range(m, k + m))
                rebuilt = decoder.decode(shares, numbers)
                if any(bytes(rebuilt[i]) != blocks[i] for i in range(m)):
                    raise AssertionError(f"zfec decode of k={k} m={m} is wrong")
                t = _median_seconds(lambda: decoder.decode(shares, numbers), zfec_repeats)
                rates["zfec_decode"] = len(payload) / t / 1e9
                del blocks, parity, shares, rebuilt
        del payload_all
    return out


def _run_peers(sizes: list[dict[str, int]], which: list[str], env_extra: dict[str, str], parity_rows: dict[str, list[list[int]]]) -> dict[str, Any]:
    env = {**os.environ, **env_extra}
    for var in TUNED_MALLOC:
        if var not in env_extra:
            env.pop(var, None)
    args = {"sizes": sizes, "which": which, "parity_rows": parity_rows}
    cmd = [sys.executable, os.path.abspath(__file__), "--peers", json.dumps(args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"bench ec: the peer process {which} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ plait


def _measure_plait(size: dict[str, int], threads_list: list[int]) -> dict[str, dict[str, Any]]:
    import numpy as np
    import torch

    from plait.ops import ReedSolomon

    total, repeats = size["bytes"], size["repeats"]
    flat = torch.frombuffer(bytearray(_payload(total)), dtype=torch.uint8)
    results: dict[str, dict[str, Any]] = {}
    for k, m in CASES:
        shard = _shard_bytes(total, k)
        nbytes = k * shard
        data = list(flat[:nbytes].view(k, shard).unbind(0))
        rs = ReedSolomon(k, m)
        # Pre-faulted outputs: written once before timing, as reused shared memory is.
        parity = [torch.full((shard,), 1, dtype=torch.uint8) for _ in range(m)]
        rebuilt = [torch.full((shard,), 1, dtype=torch.uint8) for _ in range(m)]
        copy_src = flat[:nbytes].numpy()
        copy_dst = np.ones(nbytes, dtype=np.uint8)
        for threads in threads_list:
            torch.set_num_threads(threads)
            copy, pool = _copier(threads)
            present = {i: data[i] for i in range(m, k)} | {k + j: parity[j] for j in range(m)}
            wanted = {i: rebuilt[i] for i in range(m)}

            def encode_cold() -> None:
                rs.encode(data, [torch.empty(shard, dtype=torch.uint8) for _ in range(m)])

            runs = {
                "encode": lambda: rs.encode(data, parity),
                "encode_cold": encode_cold,
                "decode": lambda: rs.decode(present, wanted),
                "memcpy": lambda: copy(copy_dst, copy_src),
            }
            rs.encode(data, parity)  # warm-up, and the parity decode reads
            for r in rebuilt:
                r.fill_(0)
            for fn in runs.values():
                fn()
            verified = all(torch.equal(rebuilt[i], data[i]) for i in range(m))
            # Interleaved, so that all four see the same machine (other processes, clock).
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(repeats):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            if pool is not None:
                pool.shutdown()
            verified = verified and all(torch.equal(rebuilt[i], data[i]) for i in range(m))
            t_enc, t_cold, t_dec, t_copy = (statistics.median(times[name]) for name in runs)
            results[f"{k},{m},{total},{threads}"] = {
                "plait_encode": nbytes / t_enc / 1e9,
                "plait_encode_cold": nbytes / t_cold / 1e9,
                "plait_decode": nbytes / t_dec / 1e9,
                "memcpy": nbytes / t_copy / 1e9,
                "verified": verified,
            }
        del data, parity, rebuilt, copy_src, copy_dst
    return results


def _copier(threads: int):
    """A function copying src into dst with numpy.copyto, split in `threads` parts on a
    thread pool made once (numpy releases the GIL while copying), and the pool."""
    import numpy as np

    if threads <= 1:
        return (lambda dst, src: np.copyto(dst, src)), None
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads)

    def copy(dst, src) -> None:
        bounds = [len(src) * i // threads for i in range(threads + 1)]
        parts = [(dst[bounds[i] : bounds[i + 1]], src[bounds[i] : bounds[i + 1]]) for i in range(threads)]
        for future in [pool.submit(np.copyto, d, s) for d, s in parts]:
            future.result()

    return copy, pool


def _measure_crc32c(size: dict[str, int], threads_list: list[int]) -> dict[str, float]:
    """GB/s of plait.ops.checksum (CRC-32C) on one stripe's bytes, at each thread count,
    and of zlib.crc32 (the checksum it replaced) on the same bytes."""
    import zlib

    import torch

    from plait.ops import checksum

    data = torch.frombuffer(bytearray(_payload(size["bytes"])), dtype=torch.uint8)
    out = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        checksum(data)
        out[f"crc32c_{threads}_thread{'s' if threads > 1 else ''}"] = data.numel() / _median_seconds(lambda: checksum(data), size["repeats"]) / 1e9
    view = data.numpy()
    out["zlib_crc32_1_thread"] = data.numel() / _median_seconds(lambda: zlib.crc32(view), size["repeats"]) / 1e9
    return out


# -------------------------------------------------------------------------------- run


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    sizes = _plan(quick)
    all_threads = torch.get_num_threads()
    # Other processes share the cores; the load averages tell how much (2 cores here).
    load_before = os.getloadavg()
    threads_list = sorted({1, all_threads})
    from plait.ops.rs_matrix import parity_matrix

    rows = {f"{k},{m}": parity_matrix(k, m).tolist() for k, m in CASES}
    peers_tuned = _run_peers(sizes, ["pyeclib"], TUNED_MALLOC, rows)
    peers_default = _run_peers(sizes, ["pyeclib", "zfec"], {}, {})
    for lib in ("pyeclib", "zfec"):
        if not peers_default["available"].get(lib):
            print(f"ec: {lib} is not available ({peers_default['errors'].get(lib)}); its rates are null", flush=True)

    cases = []
    try:
        for size in sizes:
            plait_rates = _measure_plait(size, threads_list)
            for k, m in CASES:
                total = size["bytes"]
                tuned = peers_tuned["rates"].get(f"{k},{m},{total}", {})
                default = peers_default["rates"].get(f"{k},{m},{total}", {})
                for threads in threads_list:
                    p = plait_rates[f"{k},{m},{total},{threads}"]
                    gbps = {
                        "plait_encode": p["plait_encode"],
                        "plait_encode_cold": p["plait_encode_cold"],
                        "plait_decode": p["plait_decode"],
                        "pyeclib_encode": tuned.get("pyeclib_encode"),
                        "pyeclib_decode": tuned.get("pyeclib_decode"),
                        "pyeclib_encode_default_malloc": default.get("pyeclib_encode"),
                        "pyeclib_decode_default_malloc": default.get("pyeclib_decode"),
                        "zfec_encode": default.get("zfec_encode"),
                        "zfec_decode": default.get("zfec_decode"),
                        "isal_kernel_encode": tuned.get("isal_kernel_encode"),
                        "memcpy": p["memcpy"],
                    }
                    ratios = {
                        "encode_vs_pyeclib": _ratio(gbps["plait_encode"], gbps["pyeclib_encode"]),
                        "decode_vs_pyeclib": _ratio(gbps["plait_decode"], gbps["pyeclib_decode"]),
                        "encode_vs_zfec": _ratio(gbps["plait_encode"], gbps["zfec_encode"]),
                        "decode_vs_zfec": _ratio(gbps["plait_decode"], gbps["zfec_decode"]),
                        "encode_vs_memcpy": _ratio(gbps["plait_encode"], gbps["memcpy"]),
                        "decode_vs_memcpy": _ratio(gbps["plait_decode"], gbps["memcpy"]),
                        "encode_cold_vs_memcpy": _ratio(gbps["plait_encode_cold"], gbps["memcpy"]),
                        "encode_vs_isal_kernel": _ratio(gbps["plait_encode"], gbps["isal_kernel_encode"]),
                    }
                    goals: dict[str, bool | None] = {}
                    for op in ("encode", "decode"):
                        vs_py = ratios[f"{op}_vs_pyeclib"]
                        goals[f"{op}_vs_pyeclib"] = (vs_py >= GOAL_VS_PYECLIB) if (vs_py is not None and total == 64 * MiB) else None
                        goals[f"{op}_vs_memcpy"] = ratios[f"{op}_vs_memcpy"] >= GOAL_VS_MEMCPY
                    cases.append({
                        "k": k, "m": m, "bytes": total, "shard_bytes": _shard_bytes(total, k),
                        "data_bytes": k * _shard_bytes(total, k), "threads": threads,
                        "gbps": gbps, "ratios": ratios, "goals_met": goals, "verified": p["verified"],
                    })
                    print(
                        f"ec: k={k:2d} m={m} {total // MiB:5d} MiB {threads} thr: encode {gbps['plait_encode']:6.2f} "
                        f"(cold {gbps['plait_encode_cold']:5.2f}) decode {gbps['plait_decode']:6.2f} | isa-l kernel "
                        f"{_fmt(gbps['isal_kernel_encode'])} | pyeclib "
                        f"{_fmt(gbps['pyeclib_encode'])}/{_fmt(gbps['pyeclib_decode'])} zfec {_fmt(gbps['zfec_encode'])}/"
                        f"{_fmt(gbps['zfec_decode'])} memcpy {gbps['memcpy']:5.2f} GB/s",
                        flush=True,
                    )
    finally:
        torch.set_num_threads(all_threads)

    checksum_gbps = _measure_crc32c(sizes[0], threads_list)
    torch.set_num_threads(all_threads)
    print("ec: checksum " + ", ".join(f"{key} {v:.2f}" for key, v in checksum_gbps.items()) + " GB/s", flush=True)

    judged = [v for c in cases for v in c["goals_met"].values() if v is not None]
    return {
        "description": "GB/s of the k data shards' bytes; median of `repeats` runs; pyeclib and zfec single-threaded",
        "cases_km": [list(c) for c in CASES],
        "sizes": sizes,
        "threads": threads_list,
        "goals": {"vs_pyeclib_on_64MiB": GOAL_VS_PYECLIB, "vs_memcpy": GOAL_VS_MEMCPY},
        "peers": {
            lib: {
                "available": bool(peers_default["available"].get(lib)),
                "version": peers_default["versions"].get(lib),
                "error": peers_default["errors"].get(lib),
            }
            for lib in ("pyeclib", "zfec")
        },
        "pyeclib_ec_type": "isa_l_rs_vand",
        "pyeclib_tuned_malloc_env": TUNED_MALLOC,
        "cases": cases,
        "all_verified": all(c["verified"] for c in cases),
        "goals_met": {"met": sum(judged), "judged": len(judged), "all": all(judged) if judged else None},
        "checksum": {"bytes": sizes[0]["bytes"], "gbps": checksum_gbps},
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
    }


def _fmt(v: float | None) -> str:
    return f"{v:5.2f}" if v is not None else "  n/a"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--peers":
    # Child process of _run_peers: no torch, no plait; JSON on the last line of stdout.
    args = json.loads(sys.argv[2])
    print(json.dumps(_measure_peers(args["sizes"], args["which"], args["parity_rows"])))
