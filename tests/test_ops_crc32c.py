"""plait::crc32c and plait.ops.checksum: standard check values, chaining, a pure-Python
bitwise reference, unaligned and threaded inputs, the three CPU paths (PCLMULQDQ folding,
SSE4.2 crc32 streams, portable tables) against each other, and argument checks."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from plait.ops import checksum

OP = torch.ops.plait.crc32c


def _t(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """CRC-32C from its definition: reflected, polynomial 0x82F63B78, one bit at a time."""
    c = crc ^ 0xFFFFFFFF
    for byte in data:
        c ^= byte
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def _register_after_byte(b: int) -> int:
    c = b
    for _ in range(8):
        c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c


_BYTE_TABLE = [_register_after_byte(b) for b in range(256)]


def crc32c_bytewise(data: bytes, crc: int = 0) -> int:
    """The same a byte at a time, from a table of the bitwise step (for longer inputs)."""
    c = crc ^ 0xFFFFFFFF
    for byte in data:
        c = (c >> 8) ^ _BYTE_TABLE[(c ^ byte) & 0xFF]
    return c ^ 0xFFFFFFFF


# ------------------------------------------------------------------------- known values

# The check value of the CRC catalogue and the iSCSI vectors of RFC 3720, B.4.
VECTORS = [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("data,expected", VECTORS)
def test_standard_vectors(data, expected):
    assert OP(_t(data)) == expected
    assert checksum(_t(data)) == expected
    assert crc32c_bitwise(data) == crc32c_bytewise(data) == expected


def test_chaining_like_zlib():
    a, b = b"1234", b"56789"
    assert OP(_t(b), OP(_t(a))) == OP(_t(a + b)) == 0xE3069283
    assert OP(_t(b""), 0x12345678) == 0x12345678
    assert OP(_t(b"\x00"), 0xFFFFFFFF) == crc32c_bitwise(b"\x00", 0xFFFFFFFF)


def test_against_the_bitwise_reference_with_random_splits():
    rng = random.Random(0)
    for n in list(range(0, 301)) + [511, 512, 1000, 4095, 6143, 6144, 6145]:
        data = rng.randbytes(n)
        seed = rng.getrandbits(32)
        expected = crc32c_bitwise(data, seed) if n <= 300 else crc32c_bytewise(data, seed)
        assert OP(_t(data), seed) == expected, n
        cut = rng.randint(0, n)
        assert OP(_t(data[cut:]), OP(_t(data[:cut]), seed)) == expected, (n, cut)


def test_unaligned_slices_and_byte_views():
    gen = torch.Generator().manual_seed(1)
    big = torch.randint(0, 256, (20_000,), dtype=torch.uint8, generator=gen)
    for start in (0, 1, 3, 7, 8, 13, 15, 16, 63):
        for n in (0, 1, 17, 255, 256, 257, 1000, 6200, 12_345):
            piece = big[start : start + n]
            assert OP(piece, start) == crc32c_bytewise(piece.numpy().tobytes(), start), (start, n)
    x = torch.arange(100, dtype=torch.float32)
    assert checksum(x.view(torch.uint8)) == crc32c_bitwise(x.numpy().tobytes())


def test_threads_and_pieces_agree():
    gen = torch.Generator().manual_seed(2)
    n = (8 << 20) + 13
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    before = torch.get_num_threads()
    try:
        values = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            values.append(OP(data, 0xDEADBEEF))
    finally:
        torch.set_num_threads(before)
    assert len(set(values)) == 1
    # the same by chaining irregular pieces, each below the threading threshold
    crc, pos = 0xDEADBEEF, 0
    for size in (1, 300_001, 7, 65_536, 1 << 19):
        crc = OP(data[pos : pos + size], crc)
        pos += size
    while pos < n:
        crc = OP(data[pos : pos + 999_983], crc)
        pos += 999_983
    assert crc == values[0]


def test_checksum_is_crc32c():
    gen = torch.Generator().manual_seed(3)
    for n in (0, 1, 100, 5000, 1 << 20):
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        assert checksum(data) == OP(data)
        assert checksum(data, seed=77) == OP(data, 77)
    assert checksum.__doc__ and "CRC-32C" in checksum.__doc__


# ------------------------------------------------------------------------- bad inputs

BAD_INPUTS = {
    "dtype": (lambda: (torch.zeros(8), 0), r"data must be uint8, got Float; checksum the bytes .* x.view\(torch.uint8\)"),
    "strides": (lambda: (torch.zeros(16, dtype=torch.uint8)[::2], 0), r"data must be contiguous, got strides \[2\]; pass data.contiguous\(\)"),
    "device": (lambda: (torch.zeros(8, dtype=torch.uint8, device="meta"), 0), r"data must be a CPU tensor, got one on meta; copy it with data.cpu\(\)"),
    "crc negative": (lambda: (torch.zeros(8, dtype=torch.uint8), -1), r"crc must be a CRC-32C value in \[0, 2\*\*32\), got -1"),
    "crc too big": (lambda: (torch.zeros(8, dtype=torch.uint8), 1 << 32), r"crc must be .* got 4294967296"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_naming_the_argument(case):
    make, pattern = BAD_INPUTS[case]
    data, crc = make()
    with pytest.raises(RuntimeError, match=pattern):
        OP(data, crc)
    with pytest.raises(RuntimeError, match=pattern):
        checksum(data, crc)


# ---------------------------------------------------------------- the paths, 64 MiB

_PATH_SCRIPT = textwrap.dedent(
    """
    import json, sys, numpy, torch
    import plait  # noqa: F401  (registers torch.ops.plait.*)
    torch.set_num_threads(2)
    big = torch.frombuffer(bytearray(numpy.random.default_rng(4).bytes(64 << 20)), dtype=torch.uint8)
    values = [torch.ops.plait.crc32c(big), torch.ops.plait.crc32c(big[5:], 0x1234)]
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 255, 256, 257, 1000, 6143, 6144, 6145, 20_000, (1 << 20) + 3):
        for start in (0, 1, 9):
            values.append(torch.ops.plait.crc32c(big[start : start + n], n))
    print(json.dumps(values))
    """
)


def test_hardware_paths_match_the_portable_tables():
    runs = {}
    for name, env_var in (("default", None), ("sse42", "PLAIT_CRC32C_NO_PCLMUL"), ("portable", "PLAIT_CRC32C_NO_HW")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_CRC32C_")}
        if env_var:
            env[env_var] = "1"
        runs[name] = subprocess.Popen([sys.executable, "-c", _PATH_SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    values = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} path failed:\n{err}"
        values[name] = out
    assert values["default"] == values["sse42"] == values["portable"]
