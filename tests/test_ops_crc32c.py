"""plait::crc32c and plait.ops.checksum: standard check values, chaining, a pure-Python
bitwise reference, unaligned and threaded inputs, every CPU kernel (VPCLMULQDQ folding on
zmm and ymm, PCLMULQDQ folding, SSE4.2 crc32 streams, portable tables) against the
reference on every length to 4096 and on large buffers, the folding constants, and
argument checks."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

import numpy as np

from plait.ops import checksum, crc32c_kernels

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


# ------------------------------------------------------------------------- the kernels
#
# Every kernel of the build, those this CPU lacks skipped with the reason; the terminal
# summary (tests/conftest.py) lists which ran.

ALL_KERNELS = crc32c_kernels(all=True)
HERE = set(crc32c_kernels())


@pytest.fixture(params=ALL_KERNELS)
def kernel(request, kernel_ran) -> str:
    name = request.param
    if name not in HERE:
        pytest.skip(f"this CPU lacks the instructions of crc32c kernel {name!r}")
    kernel_ran("crc32c", name)
    return name


def _prefix_crcs(data: bytes, crc: int) -> list[int]:
    """CRC-32C of every prefix of data (lengths 0..len), from the byte-table reference."""
    out, c = [crc], crc ^ 0xFFFFFFFF
    for byte in data:
        c = (c >> 8) ^ _BYTE_TABLE[(c ^ byte) & 0xFF]
        out.append(c ^ 0xFFFFFFFF)
    return out


def test_kernel_list():
    here = crc32c_kernels()
    assert set(ALL_KERNELS) in ({"vpclmul_avx512", "vpclmul_avx2", "pclmul", "sse42", "portable"}, {"portable"})
    assert "portable" in here and set(here) <= set(ALL_KERNELS) and len(set(here)) == len(here)
    if not any(k.startswith("PLAIT_CRC32C_") for k in os.environ):
        assert here[0] == next(k for k in ALL_KERNELS if k in set(here))
    with pytest.raises(RuntimeError, match=r"kernel 'crc64' is not a crc32c kernel; pick one of: .*portable"):
        OP(_t(b"x"), 0, "crc64")
    for name in set(ALL_KERNELS) - HERE:
        with pytest.raises(RuntimeError, match=rf"kernel '{name}' needs .*, which this CPU lacks"):
            checksum(_t(b"x"), kernel=name)


def test_standard_vectors_on_every_kernel(kernel):
    for data, expected in VECTORS:
        assert checksum(_t(data), kernel=kernel) == expected
    assert checksum(_t(b"56789"), checksum(_t(b"1234"), kernel=kernel), kernel=kernel) == 0xE3069283


def test_every_length_to_4096_at_random_alignments(kernel):
    rng = random.Random(5)
    buf = rng.randbytes(4096 + 64)
    big = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    for start in (0, 1, rng.randrange(2, 64), rng.randrange(2, 64)):
        seed = rng.getrandbits(32)
        expected = _prefix_crcs(buf[start : start + 4096], seed)
        got = [OP(big[start : start + n], seed, kernel) for n in range(4097)]
        bad = [n for n in range(4097) if got[n] != expected[n]]
        assert not bad, (kernel, start, bad[:10])


def test_large_buffers_and_threads(kernel):
    rng = np.random.default_rng(6)
    n = (24 << 20) + 13
    data = torch.from_numpy(rng.integers(0, 256, n, dtype=np.uint8))
    expected = OP(data, 0x1234, "portable")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert OP(data, 0x1234, kernel) == expected, (kernel, threads)
            assert OP(data[7:], 0, kernel) == OP(data[7:], 0, "portable"), (kernel, threads)
    finally:
        torch.set_num_threads(before)
    # the portable tables against the bitwise definition, on a piece
    piece = data[: 1 << 16].numpy().tobytes()
    assert OP(data[: 1 << 16], 0x1234, "portable") == crc32c_bytewise(piece, 0x1234)


# --------------------------------------------------------------- folding constants

REFLECTED_POLY = 0x82F63B78


def _reflect32(v: int) -> int:
    return int(f"{v:032b}"[::-1], 2)


def _x_pow_mod(e: int) -> int:
    """x^e mod P in plain bit order (bit i = x^i), P = x^32 + reflect(0x82F63B78)."""
    poly = (1 << 32) | _reflect32(REFLECTED_POLY)
    result, base = 1, 2
    while e:
        if e & 1:
            result = _clmul_mod(result, base, poly)
        base = _clmul_mod(base, base, poly)
        e >>= 1
    return result


def _clmul_mod(a: int, b: int, poly: int) -> int:
    product = 0
    while b:
        if b & 1:
            product ^= a
        b >>= 1
        a <<= 1
        if a >> 32:
            a ^= poly
    return product


def test_folding_constants_are_the_powers_of_x_they_claim():
    # crc32c_kernels.h: for a fold by D bytes, kH = x^(63 + 8D) mod P and kL = x^(8D - 1)
    # mod P, reflected, in the upper half of a 64-bit lane.
    import re
    from pathlib import Path

    header = (Path(__file__).resolve().parents[1] / "csrc" / "checksum" / "crc32c_kernels.h").read_text()
    found = re.findall(r"kFold(\d+)\{0x([0-9a-f]+)ull, 0x([0-9a-f]+)ull\}", header)
    assert sorted(int(d) for d, _, _ in found) == [16, 32, 64, 128, 256]
    for d, h, l in found:
        distance = int(d)
        assert int(h, 16) == _reflect32(_x_pow_mod(63 + 8 * distance)) << 32, distance
        assert int(l, 16) == _reflect32(_x_pow_mod(8 * distance - 1)) << 32, distance


def test_folding_identity_in_python():
    """The identity the kernels rest on, checked with Python integers: the CRC of a
    16-byte chunk followed by D zero bytes equals the CRC of the 16 bytes of the fold
    (H * kH) ^ (L * kL), with the multiplies carry-less on reflected operands."""
    rng = random.Random(7)

    def clmul(a: int, b: int) -> int:
        r = 0
        while b:
            if b & 1:
                r ^= a
            b >>= 1
            a <<= 1
        return r

    def reflect(v: int, bits: int) -> int:
        return int(f"{v:0{bits}b}"[::-1], 2)

    def raw_crc(data: bytes) -> int:  # no inversions, from 0
        return crc32c_bytewise(data, 0xFFFFFFFF) ^ 0xFFFFFFFF

    for distance in (16, 32, 64, 128, 256):
        kh = reflect(_x_pow_mod(63 + 8 * distance), 32) << 32
        kl = reflect(_x_pow_mod(8 * distance - 1), 32) << 32
        for _ in range(5):
            chunk = rng.randbytes(16)
            lo, hi = int.from_bytes(chunk[:8], "little"), int.from_bytes(chunk[8:], "little")
            # pclmulqdq of two reflected 64-bit values: the 127-bit product, reflected, times x
            def pclmul(a: int, b: int) -> int:
                return reflect(clmul(reflect(a, 64), reflect(b, 64)), 128) >> 1

            folded = pclmul(lo, kh) ^ pclmul(hi, kl)
            assert raw_crc(folded.to_bytes(16, "little")) == raw_crc(chunk + bytes(distance)), distance


def test_the_environment_chooses_the_default():
    code = "import torch, plait; print(torch.ops.plait.crc32c_kernels()[0])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_CRC32C_")}
    runs = {"PLAIT_CRC32C_NO_HW": "portable", "PLAIT_CRC32C_NO_PCLMUL": "sse42" if "sse42" in HERE else "portable", "PLAIT_CRC32C_KERNEL": "portable"}
    procs = {
        var: subprocess.Popen([sys.executable, "-c", code], env=env | {var: "portable" if var.endswith("KERNEL") else "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for var in runs
    }
    for var, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == runs[var], var
