"""The erasure-coding libraries `plait bench ec` compares with, measured in a child process.

pyeclib 1.8 ``isa_l_rs_vand`` (ISA-L's kernels behind liberasurecode, with its copies and
fragment headers) and zfec 1.6 encode and decode the same payload as plait, with the
same m data shards lost. They run in a process started as ``python bench/ec_peers.py
--peers JSON`` so that they never load torch and keep their own heap: pyeclib once
with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296`` (glibc then
recycles the fragment buffers instead of mapping and faulting fresh ones: its best
setting on these machines) and once with the default malloc. A missing library is
reported, with the import error, and its rates are null. Not a benchmark itself.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

CASES = ((4, 2), (8, 2), (10, 4))
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
MiB = 1 << 20


def shard_bytes(total: int, k: int) -> int:
    # A multiple of 64 (whole vectors), as pyeclib aligns its fragments too.
    return total // k // 64 * 64


def payload(nbytes: int) -> bytes:
    import numpy as np

    return np.random.default_rng(nbytes).bytes(nbytes)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_peers(sizes: list[dict[str, int]], which: list[str]) -> dict[str, Any]:
    """In the child process: pyeclib and/or zfec rates (GB/s of the k data shards' bytes)
    for every case and size."""
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
        payload_all = payload(total)
        for k, m in CASES:
            shard = shard_bytes(total, k)
            data = payload_all[: k * shard]
            rates = out["rates"].setdefault(f"{k},{m},{total}", {})
            if out["available"].get("pyeclib"):
                from pyeclib.ec_iface import ECDriver

                driver = ECDriver(k=k, m=m, ec_type="isa_l_rs_vand")
                fragments = driver.encode(data)  # warm-up, and the input of decode
                rates["pyeclib_encode"] = len(data) / median_seconds(lambda: driver.encode(data), repeats) / 1e9
                survivors = fragments[m:]  # the first m data fragments are lost
                if driver.decode(survivors) != data:
                    raise AssertionError(f"pyeclib decode of k={k} m={m} is wrong")
                rates["pyeclib_decode"] = len(data) / median_seconds(lambda: driver.decode(survivors), repeats) / 1e9
                del fragments, survivors
            if out["available"].get("zfec"):
                import zfec

                blocks = [data[i * shard : (i + 1) * shard] for i in range(k)]
                encoder = zfec.Encoder(k, k + m)
                parity_ids = list(range(k, k + m))
                zfec_repeats = max(1, min(repeats, 3)) if total > 64 * MiB else repeats
                parity = encoder.encode(blocks, parity_ids)
                rates["zfec_encode"] = len(data) / median_seconds(lambda: encoder.encode(blocks, parity_ids), zfec_repeats) / 1e9
                decoder = zfec.Decoder(k, k + m)
                shares = blocks[m:] + list(parity)
                numbers = list(range(m, k + m))
                rebuilt = decoder.decode(shares, numbers)
                if any(bytes(rebuilt[i]) != blocks[i] for i in range(m)):
                    raise AssertionError(f"zfec decode of k={k} m={m} is wrong")
                rates["zfec_decode"] = len(data) / median_seconds(lambda: decoder.decode(shares, numbers), zfec_repeats) / 1e9
                del blocks, parity, shares, rebuilt
        del payload_all
    return out


def run_peers(sizes: list[dict[str, int]], which: list[str], env_extra: dict[str, str]) -> dict[str, Any]:
    """measure_peers in a child process with the malloc variables of env_extra only."""
    env = {**os.environ, **env_extra}
    for var in TUNED_MALLOC:
        if var not in env_extra:
            env.pop(var, None)
    cmd = [sys.executable, os.path.abspath(__file__), "--peers", json.dumps({"sizes": sizes, "which": which})]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"bench ec: the peer process {which} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--peers":
    # Child process of run_peers: no torch, no plait; JSON on the last line of stdout.
    args = json.loads(sys.argv[2])
    print(json.dumps(measure_peers(args["sizes"], args["which"])))
