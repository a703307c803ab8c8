"""Reed-Solomon encode and decode GB/s: plait against ISA-L's kernel, pyeclib, zfec and memory.

For (k, m) in (4, 2), (8, 2), (10, 4) and 64 MiB and 1 GiB of data per stripe, at one
thread and at all threads, the median of several runs of:

* plait encode: ``ReedSolomon(k, m).encode`` (one ``gf256_matmul_`` call, the default
  kernel for this CPU) into parity buffers allocated and pre-faulted once, as the
  snapshot daemon reuses its shared memory; and, for honesty, into freshly allocated
  (cold) buffers each run;
* ISA-L's kernel, the headline peer: ``ec_encode_data`` of the ISA-L inside pyeclib's
  wheel (its own run-time choice of kernel for this CPU), called through ctypes in this
  process with plait's parity matrix, into the same pre-faulted parity buffers (its
  bytes are checked equal to plait's); at all threads the shards are split over a
  thread pool as plait splits them. The goal: plait >= 1.0x ISA-L per core (one thread);
* plait decode: rebuild the first m data shards from the other k - m and the m parity
  shards, into pre-faulted buffers, checked equal to the originals;
* the memory reference: ``numpy.copyto`` of the k data shards' bytes into a pre-faulted
  buffer (split over threads for the all-threads row), rescaled to the bytes an encode
  or decode moves, k * L read and m * L written, where a copy of k * L bytes moves
  2 * k * L: ``memory_bound = memcpy * 2k / (k + m)``, the rate of a coder that only
  moved its bytes at copy speed. Goal: >= 0.7 of it;
* at one thread, every other vector kernel plait has on this CPU and ISA-L's function
  for the same instructions (``avx2``, ``avx512``, ``gfni_avx2``, ``gfni_avx512``);
* pyeclib ``isa_l_rs_vand`` and zfec (bench/ec_peers.py, in child processes).
  Goal: plait >= 1.5x pyeclib on 64 MiB.

plait's runs and ISA-L's are interleaved in one timing loop (the order rotating each
round), so that they share the machine's state: other processes, clock, page cache.
Rates count the k data shards' bytes (k * shard length), as ISA-L's and pyeclib's own
benchmarks do. ``--quick`` runs 4 MiB stripes only (for smoke tests).

It also times CRC-32C (``plait.ops.checksum``): every kernel this CPU runs and ISA-L's
``crc32_iscsi`` at one thread, interleaved, on the first stripe size (from memory) and
on 256 KiB (from cache); the default kernel at all threads; and ``zlib.crc32``.
"""

from __future__ import annotations

import os
import statistics
import time
import zlib
from typing import Any

from plait.bench import isal as isal_lib
from plait.bench.ec_peers import CASES, TUNED_MALLOC, MiB, payload, run_peers, shard_bytes

NAME = "ec"
GOAL_VS_ISAL_KERNEL = 1.0  # per core: plait's encode at one thread against ISA-L's
GOAL_VS_PYECLIB = 1.5  # on the 64 MiB stripes
GOAL_VS_MEMORY = 0.7  # of memory_bound
CACHE_HOT_BYTES = 256 << 10
# plait's kernels that have an ISA-L counterpart (bench/isal.py); scalar and the
# emulation are not measured.
VECTOR_KERNELS = ("gfni_avx512", "avx512", "gfni_avx2", "avx2")


def _plan(quick: bool) -> list[dict[str, int]]:
    """Stripe sizes and repetitions: (bytes of data, runs per measurement)."""
    if quick:
        return [{"bytes": 4 * MiB, "repeats": 3}]
    return [{"bytes": 64 * MiB, "repeats": 9}, {"bytes": 1024 * MiB, "repeats": 5}]


def _interleaved(runs: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, timed in rounds that run each once, in an order that rotates
    every round, so all see the same machine; times[name][r] is round r's."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over rounds of b's time / a's time in the same round: a's speed relative to
    b's, less sensitive to load that changes between rounds than a ratio of medians."""
    if a not in times or b not in times:
        return None
    return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))


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


# ------------------------------------------------------------------ plait and ISA-L


def _isal_encoders(isal, k: int, m: int, matrix, data, parity, kernels: list[str]) -> tuple[dict, dict[str, str]]:
    """ISA-L's encoders of this stripe (None: its own choice; else by plait kernel name),
    each checked to write plait's parity; and why any is missing."""
    import torch

    encoders, missing = {}, {}
    if isal is None:
        return encoders, missing
    expected = [p.clone() for p in parity]
    for variant in [None, *kernels]:
        encoder = isal.encoder(k, m, matrix.tolist(), variant)
        label = variant or "ec_encode_data"
        if encoder is None:
            missing[label] = "not in this ISA-L build"
            continue
        for p in parity:
            p.fill_(0)
        encoder.bind([t.data_ptr() for t in data], [p.data_ptr() for p in parity], data[0].numel())
        encoder()
        if all(torch.equal(a, b) for a, b in zip(parity, expected)):
            encoders[variant] = encoder
        else:
            missing[label] = "its parity differs from plait's (table layout not as assumed)"
            encoder.close()
        for p, e in zip(parity, expected):
            p.copy_(e)
    return encoders, missing


def _measure_stripe(flat, total: int, k: int, m: int, repeats: int, threads_list: list[int], isal, kernels: list[str]) -> dict[int, dict[str, Any]]:
    """Every run of one (k, m) stripe, at each thread count."""
    import numpy as np
    import torch

    from plait.ops import ReedSolomon, gf256_matmul_
    from plait.ops.rs_matrix import parity_matrix

    shard = shard_bytes(total, k)
    nbytes = k * shard
    data = list(flat[:nbytes].view(k, shard).unbind(0))
    rs = ReedSolomon(k, m)
    matrix = parity_matrix(k, m)
    # Pre-faulted outputs: written once before timing, as reused shared memory is.
    parity = [torch.full((shard,), 1, dtype=torch.uint8) for _ in range(m)]
    rebuilt = [torch.full((shard,), 1, dtype=torch.uint8) for _ in range(m)]
    copy_src = flat[:nbytes].numpy()
    copy_dst = np.ones(nbytes, dtype=np.uint8)
    present = {i: data[i] for i in range(m, k)} | {k + j: parity[j] for j in range(m)}
    wanted = {i: rebuilt[i] for i in range(m)}
    rs.encode(data, parity)  # warm-up, and the parity decode reads
    encoders, isal_missing = _isal_encoders(isal, k, m, matrix, data, parity, kernels)

    def encode_cold() -> None:
        rs.encode(data, [torch.empty(shard, dtype=torch.uint8) for _ in range(m)])

    results: dict[int, dict[str, Any]] = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        copy, pool = _copier(threads)
        runs: dict[str, Any] = {
            "plait_encode": lambda: rs.encode(data, parity),
            "plait_encode_cold": encode_cold,
            "plait_decode": lambda: rs.decode(present, wanted),
            "memcpy": lambda: copy(copy_dst, copy_src),
        }
        for variant, encoder in encoders.items():
            if variant is None or threads == 1:
                encoder.bind([t.data_ptr() for t in data], [p.data_ptr() for p in parity], shard, threads)
                runs["isal_kernel_encode" if variant is None else f"isal_{variant}"] = encoder
        if threads == 1:
            for kernel in kernels:
                runs[f"plait_{kernel}"] = lambda kernel=kernel: gf256_matmul_(parity, data, matrix, kernel=kernel)
        for r in rebuilt:
            r.fill_(0)
        for fn in runs.values():
            fn()
        verified = all(torch.equal(rebuilt[i], data[i]) for i in range(m))
        times = _interleaved(runs, repeats)
        if pool is not None:
            pool.shutdown()
        verified = verified and all(torch.equal(rebuilt[i], data[i]) for i in range(m))
        gbps = {name: nbytes / statistics.median(t) / 1e9 for name, t in times.items()}
        results[threads] = {
            "gbps": {key: gbps.get(key) for key in ("plait_encode", "plait_encode_cold", "plait_decode", "isal_kernel_encode", "memcpy")},
            # slowest and fastest round: how much the machine's load moved the rates
            "gbps_range": {
                name: [nbytes / max(times[name]) / 1e9, nbytes / min(times[name]) / 1e9]
                for name in ("plait_encode", "isal_kernel_encode") if name in times
            },
            "encode_vs_isal_kernel_paired": _paired_ratio(times, "plait_encode", "isal_kernel_encode"),
            "kernels": {
                kernel: {
                    "plait": gbps[f"plait_{kernel}"],
                    "isal": gbps.get(f"isal_{kernel}"),
                    "ratio": _ratio(gbps[f"plait_{kernel}"], gbps.get(f"isal_{kernel}")),
                    "ratio_paired": _paired_ratio(times, f"plait_{kernel}", f"isal_{kernel}"),
                }
                for kernel in kernels
            } if threads == 1 else None,
            "isal_missing": isal_missing,
            "verified": verified,
        }
    for encoder in encoders.values():
        encoder.close()
    return results


# ------------------------------------------------------------------------- checksum


def _measure_crc32c(size: dict[str, int], threads_list: list[int], isal) -> dict[str, Any]:
    """GB/s of plait.ops.checksum (CRC-32C): each kernel and ISA-L's crc32_iscsi at one
    thread, interleaved, from memory (one stripe's bytes) and from cache (256 KiB); the
    default kernel at every thread count; zlib.crc32 (the checksum it replaced)."""
    import torch

    from plait.ops import checksum, crc32c_kernels

    data = torch.frombuffer(bytearray(payload(size["bytes"])), dtype=torch.uint8)
    hot = data[:CACHE_HOT_BYTES].clone()
    kernels = crc32c_kernels()
    out: dict[str, Any] = {"bytes": size["bytes"], "cache_hot_bytes": CACHE_HOT_BYTES, "default_kernel": kernels[0]}
    expected = checksum(data, kernel="portable")
    agree = True
    for label, buf, repeats in (("from_memory", data, size["repeats"]), ("from_cache", hot, 200)):
        torch.set_num_threads(1)
        runs = {kernel: (lambda kernel=kernel, buf=buf: checksum(buf, kernel=kernel)) for kernel in kernels}
        if isal is not None:
            runs["isal_crc32_iscsi"] = lambda buf=buf: isal.crc32c(buf.data_ptr(), buf.numel())
            agree &= runs["isal_crc32_iscsi"]() == checksum(buf)
        agree &= all(checksum(buf, kernel=kernel) == checksum(buf, kernel="portable") for kernel in kernels)
        times = _interleaved(runs, repeats)
        out[f"gbps_1_thread_{label}"] = {name: buf.numel() / statistics.median(t) / 1e9 for name, t in times.items()}
    gbps = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        agree &= checksum(data) == expected
        name = f"crc32c_{threads}_thread{'s' if threads > 1 else ''}"
        gbps[name] = data.numel() / statistics.median(_timings(lambda: checksum(data), size["repeats"])) / 1e9
    view = data.numpy()
    gbps["zlib_crc32_1_thread"] = data.numel() / statistics.median(_timings(lambda: zlib.crc32(view), size["repeats"])) / 1e9
    if isal is not None:
        gbps["isal_crc32_iscsi_1_thread"] = out["gbps_1_thread_from_memory"]["isal_crc32_iscsi"]
    out["gbps"] = gbps
    out["ratio_vs_isal_1_thread"] = {
        label: _ratio(out[f"gbps_1_thread_{label}"][kernels[0]], out[f"gbps_1_thread_{label}"].get("isal_crc32_iscsi"))
        for label in ("from_memory", "from_cache")
    }
    out["all_agree"] = agree
    return out


def _timings(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# -------------------------------------------------------------------------------- run


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt(v: float | None) -> str:
    return f"{v:5.2f}" if v is not None else "  n/a"


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from plait.ops import crc32c_kernels, gf256_matmul_kernels

    sizes = _plan(quick)
    all_threads = torch.get_num_threads()
    # Other processes share the cores; the load averages tell how much (2 cores here).
    load_before = os.getloadavg()
    threads_list = sorted({1, all_threads})
    here = gf256_matmul_kernels()
    kernels = [k for k in VECTOR_KERNELS if k in here]
    isal, isal_error = isal_lib.load()
    if isal is None:
        print(f"ec: ISA-L is not available ({isal_error}); its rates are null", flush=True)
    peers_tuned = run_peers(sizes, ["pyeclib"], TUNED_MALLOC)
    peers_default = run_peers(sizes, ["pyeclib", "zfec"], {})
    for lib in ("pyeclib", "zfec"):
        if not peers_default["available"].get(lib):
            print(f"ec: {lib} is not available ({peers_default['errors'].get(lib)}); its rates are null", flush=True)

    cases = []
    isal_missing: dict[str, str] = {}
    try:
        for size in sizes:
            total = size["bytes"]
            flat = torch.frombuffer(bytearray(payload(total)), dtype=torch.uint8)
            for k, m in CASES:
                measured = _measure_stripe(flat, total, k, m, size["repeats"], threads_list, isal, kernels)
                tuned = peers_tuned["rates"].get(f"{k},{m},{total}", {})
                default = peers_default["rates"].get(f"{k},{m},{total}", {})
                for threads in threads_list:
                    p = measured[threads]
                    isal_missing |= p["isal_missing"]
                    gbps = p["gbps"] | {
                        "memory_bound": p["gbps"]["memcpy"] * 2 * k / (k + m),
                        "pyeclib_encode": tuned.get("pyeclib_encode"),
                        "pyeclib_decode": tuned.get("pyeclib_decode"),
                        "pyeclib_encode_default_malloc": default.get("pyeclib_encode"),
                        "pyeclib_decode_default_malloc": default.get("pyeclib_decode"),
                        "zfec_encode": default.get("zfec_encode"),
                        "zfec_decode": default.get("zfec_decode"),
                    }
                    ratios = {
                        "encode_vs_isal_kernel": _ratio(gbps["plait_encode"], gbps["isal_kernel_encode"]),
                        "encode_vs_isal_kernel_paired": p["encode_vs_isal_kernel_paired"],
                        "encode_vs_pyeclib": _ratio(gbps["plait_encode"], gbps["pyeclib_encode"]),
                        "decode_vs_pyeclib": _ratio(gbps["plait_decode"], gbps["pyeclib_decode"]),
                        "encode_vs_zfec": _ratio(gbps["plait_encode"], gbps["zfec_encode"]),
                        "decode_vs_zfec": _ratio(gbps["plait_decode"], gbps["zfec_decode"]),
                        "encode_vs_memory_bound": _ratio(gbps["plait_encode"], gbps["memory_bound"]),
                        "decode_vs_memory_bound": _ratio(gbps["plait_decode"], gbps["memory_bound"]),
                        "encode_cold_vs_memory_bound": _ratio(gbps["plait_encode_cold"], gbps["memory_bound"]),
                    }
                    vs_isal = ratios["encode_vs_isal_kernel"]
                    goals: dict[str, bool | None] = {
                        "encode_vs_isal_kernel": (vs_isal >= GOAL_VS_ISAL_KERNEL) if (vs_isal is not None and threads == 1) else None,
                    }
                    for op in ("encode", "decode"):
                        vs_py = ratios[f"{op}_vs_pyeclib"]
                        goals[f"{op}_vs_pyeclib"] = (vs_py >= GOAL_VS_PYECLIB) if (vs_py is not None and total == 64 * MiB) else None
                        goals[f"{op}_vs_memory_bound"] = ratios[f"{op}_vs_memory_bound"] >= GOAL_VS_MEMORY
                    cases.append({
                        "k": k, "m": m, "bytes": total, "shard_bytes": shard_bytes(total, k),
                        "data_bytes": k * shard_bytes(total, k), "threads": threads,
                        "gbps": gbps, "gbps_range": p["gbps_range"], "ratios": ratios, "kernels": p["kernels"], "goals_met": goals,
                        "verified": p["verified"],
                    })
                    print(
                        f"ec: k={k:2d} m={m} {total // MiB:5d} MiB {threads} thr: encode {gbps['plait_encode']:6.2f} "
                        f"(cold {gbps['plait_encode_cold']:5.2f}) | isa-l kernel {_fmt(gbps['isal_kernel_encode'])} "
                        f"x{_fmt(vs_isal)} | decode {gbps['plait_decode']:6.2f} | pyeclib "
                        f"{_fmt(gbps['pyeclib_encode'])}/{_fmt(gbps['pyeclib_decode'])} zfec {_fmt(gbps['zfec_encode'])}/"
                        f"{_fmt(gbps['zfec_decode'])} | memory bound {gbps['memory_bound']:5.2f} GB/s",
                        flush=True,
                    )
            del flat
    finally:
        torch.set_num_threads(all_threads)

    checksum_record = _measure_crc32c(sizes[0], threads_list, isal)
    torch.set_num_threads(all_threads)
    print("ec: checksum " + ", ".join(f"{key} {v:.2f}" for key, v in checksum_record["gbps"].items()) + " GB/s", flush=True)

    judged = [v for c in cases for v in c["goals_met"].values() if v is not None]
    headline = {
        f"{c['k']},{c['m']},{c['bytes'] // MiB}MiB": c["ratios"]["encode_vs_isal_kernel"] for c in cases if c["threads"] == 1
    }
    return {
        "description": (
            "GB/s of the k data shards' bytes; median of `repeats` runs; plait and ISA-L's kernel interleaved in "
            "one process on the same matrix and pre-faulted buffers; memory_bound = memcpy rate rescaled to the "
            "k*L read + m*L written of an encode; pyeclib and zfec single-threaded"
        ),
        "cases_km": [list(c) for c in CASES],
        "sizes": sizes,
        "threads": threads_list,
        "goals": {"vs_isal_kernel_per_core": GOAL_VS_ISAL_KERNEL, "vs_pyeclib_on_64MiB": GOAL_VS_PYECLIB, "vs_memory_bound": GOAL_VS_MEMORY},
        "plait_kernels": {"gf256_matmul_default": here[0], "gf256_matmul_here": here, "crc32c_default": crc32c_kernels()[0], "crc32c_here": crc32c_kernels()},
        "isal": {
            "available": isal is not None,
            "library": isal.path if isal is not None else None,
            "version": isal.version if isal is not None else None,
            "error": isal_error,
            "variants_missing": isal_missing,
        },
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
        "encode_vs_isal_kernel_1_thread": headline,
        "cases": cases,
        "all_verified": all(c["verified"] for c in cases),
        "goals_met": {"met": sum(judged), "judged": len(judged), "all": all(judged) if judged else None},
        "checksum": checksum_record,
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "noise": _noise_note(load_before, os.getloadavg()),
    }


def _noise_note(before: tuple[float, ...], after: tuple[float, ...]) -> str:
    """Whether other processes shared the cores during the run, from the load averages."""
    cores = os.cpu_count() or 1
    peak = max(before[0], after[0], after[1])
    if peak < 0.5:
        return f"quiet: 1-minute load average at most {peak:.2f} on {cores} cores"
    return (
        f"shared: load average up to {peak:.2f} on {cores} cores (other processes ran besides this one); "
        "rates move between rounds (see gbps_range), the paired ratios (same round) less so"
    )
