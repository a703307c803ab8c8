"""ISA-L, the library inside pyeclib's wheel (``pyeclib.libs/libisal*.so``), called through
ctypes in the benchmark's own process: the like-for-like peer of plait's kernels.

Its encode kernels get plait's parity matrix and write into the same pre-faulted
buffers as plait's (no copies, no fragment headers), and its CRC-32C reads the same
bytes, so a timing loop can interleave the two. Not a benchmark itself (no ``run``).

ISA-L picks its kernels at run time, as plait does: ``ec_encode_data`` and
``crc32_iscsi`` are that choice. Its per-instruction-set encode functions are exported
too; :meth:`IsaL.encoder` reaches them by the name of the plait kernel that uses the
same instructions (``avx2``, ``avx512``, ``gfni_avx2``, ``gfni_avx512``), with the table
layout each expects (32 bytes per coefficient, or an 8-byte bit matrix for GFNI).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# plait kernel name -> (ISA-L table builder, ISA-L encode function); None: ISA-L's own choice.
ENCODE_FUNCTIONS: dict[str | None, tuple[str, str]] = {
    None: ("ec_init_tables", "ec_encode_data"),
    "avx2": ("ec_init_tables_base", "ec_encode_data_avx2"),
    "avx512": ("ec_init_tables_base", "ec_encode_data_avx512"),
    "gfni_avx2": ("ec_init_tables_gfni", "ec_encode_data_avx2_gfni"),
    "gfni_avx512": ("ec_init_tables_gfni", "ec_encode_data_avx512_gfni"),
}
# The widest table layout: 32 bytes per coefficient (the GFNI one takes 8).
_TABLE_BYTES = 32


class IsaL:
    """A loaded ISA-L library (see :func:`load`)."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib = lib
        self.path = path
        lib.crc32_iscsi.restype = ctypes.c_uint32
        lib.crc32_iscsi.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]

    @property
    def version(self) -> str | None:
        try:
            fn = self.lib.isal_get_version_str
        except AttributeError:
            return None
        fn.restype = ctypes.c_char_p
        return fn().decode()

    def encoder(self, k: int, m: int, matrix: list[list[int]], variant: str | None = None) -> Encoder | None:
        """An encoder of the m x k parity matrix with ISA-L's kernel for `variant` (None:
        ISA-L's run-time choice), or None if the library lacks the function."""
        init_name, encode_name = ENCODE_FUNCTIONS[variant]
        try:
            init, encode = getattr(self.lib, init_name), getattr(self.lib, encode_name)
        except AttributeError:
            return None
        flat = (ctypes.c_ubyte * (m * k))(*[v for row in matrix for v in row])
        tables = (ctypes.c_ubyte * (_TABLE_BYTES * k * m))()
        init(k, m, flat, tables)
        return Encoder(encode, tables, k, m)

    def crc32c(self, address: int, length: int, crc: int = 0) -> int:
        """CRC-32C with plait's and zlib's conventions: ISA-L's crc32_iscsi keeps the
        register uninverted, so the inversions happen here."""
        return self.lib.crc32_iscsi(address, length, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


class Encoder:
    """ISA-L's ``ec_encode_data`` of one matrix, over shards given by address; with
    threads > 1 the byte range is split in equal parts (multiples of 64 bytes) run on a
    pool of threads (ctypes releases the GIL), as plait splits its own."""

    def __init__(self, encode: Any, tables: ctypes.Array, k: int, m: int) -> None:
        self._encode, self._tables, self.k, self.m = encode, tables, k, m
        self._pool: ThreadPoolExecutor | None = None
        self._calls: list[tuple[int, ctypes.Array, ctypes.Array]] = []

    def bind(self, ins: list[int], outs: list[int], length: int, threads: int = 1) -> None:
        """Fix the shards (data addresses of the k inputs and m outputs) and the threads."""
        bounds = [length * i // threads // 64 * 64 for i in range(threads)] + [length]
        self._calls = []
        for lo, hi in zip(bounds, bounds[1:]):
            if hi > lo:
                self._calls.append((
                    hi - lo,
                    (ctypes.c_void_p * self.k)(*[a + lo for a in ins]),
                    (ctypes.c_void_p * self.m)(*[a + lo for a in outs]),
                ))
        if self._pool is not None:
            self._pool.shutdown()
        self._pool = ThreadPoolExecutor(len(self._calls)) if len(self._calls) > 1 else None

    def _one(self, call: tuple[int, ctypes.Array, ctypes.Array]) -> None:
        length, ins, outs = call
        self._encode(ctypes.c_int(length), self.k, self.m, self._tables, ins, outs)

    def __call__(self) -> None:
        if self._pool is None:
            for call in self._calls:
                self._one(call)
        else:
            for future in [self._pool.submit(self._one, c) for c in self._calls]:
                future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def load() -> tuple[IsaL | None, str | None]:
    """ISA-L from pyeclib's wheel, or (None, why not)."""
    spec = importlib.util.find_spec("pyeclib")
    if spec is None or not spec.submodule_search_locations:
        return None, "pyeclib is not installed (its wheel carries ISA-L)"
    root = os.path.dirname(list(spec.submodule_search_locations)[0])
    errors = []
    for path in sorted(glob.glob(os.path.join(root, "pyeclib.libs", "libisal*.so*"))):
        try:
            lib = ctypes.CDLL(path)
            lib.ec_init_tables, lib.ec_encode_data, lib.crc32_iscsi  # noqa: B018  (must exist)
            return IsaL(lib, path), None
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
    return None, "; ".join(errors) or f"no libisal*.so under {root}/pyeclib.libs"
