"""Every CPU kernel of plait::gf256_matmul_ against the NumPy reference codec.

The tests are parametrised over every kernel of the build (``gf256_matmul_kernels(all=
True)``); those this CPU lacks are skipped with the reason, and the terminal summary
(tests/conftest.py) lists which kernels ran and which this CPU lacks. On a CPU without
GFNI the GFNI kernels' loop and bit matrices still run, through ``gfni_emulated``; and
the bit matrices are checked here, for all 256 x 256 products, against the instruction's
definition in the Intel SDM.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from plait.ops import gf256_matmul_, gf256_matmul_kernels
from plait.ops import rs_reference as ref

ALL_KERNELS = gf256_matmul_kernels(all=True)
HERE = set(gf256_matmul_kernels())
FAMILY = "gf256_matmul_"

# Around the widths of every kernel's steps (32, 64 and 128 bytes) and the blocks (4 KiB up).
LENGTHS = [1, 2, 31, 32, 33, 63, 64, 65, 95, 96, 127, 128, 129, 191, 255, 256, 257, 4096 + 97, 70_001]


@pytest.fixture(params=ALL_KERNELS)
def kernel(request, kernel_ran) -> str:
    name = request.param
    if name not in HERE:
        pytest.skip(f"this CPU lacks the instructions of gf256_matmul_ kernel {name!r}")
    kernel_ran(FAMILY, name)
    return name


def _rand(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def _np(tensors) -> np.ndarray:
    return np.stack([t.numpy() for t in tensors])


def _expected(coefs: torch.Tensor, ins) -> np.ndarray:
    table = ref.mul_table()
    x = _np(ins)
    out = np.zeros((coefs.shape[0], x.shape[1]), dtype=np.uint8)
    for i, j in itertools.product(range(coefs.shape[0]), range(coefs.shape[1])):
        out[i] ^= table[int(coefs[i, j])][x[j]]
    return out


# -------------------------------------------------------------------- the kernel list


def test_kernel_list():
    here = gf256_matmul_kernels()
    assert set(ALL_KERNELS) == {"gfni_avx512", "avx512", "gfni_avx2", "avx2", "scalar", "gfni_emulated"} or (
        set(ALL_KERNELS) == {"scalar", "gfni_emulated"}  # a build off x86
    )
    assert set(here) <= set(ALL_KERNELS) and len(set(here)) == len(here)
    assert {"scalar", "gfni_emulated"} <= set(here)
    assert here[0] != "gfni_emulated"  # never the default
    if not os.environ.get("PLAIT_GF256_KERNEL") and not os.environ.get("PLAIT_GF256_NO_SIMD"):
        # the default is the first runnable kernel in order of preference
        assert here[0] == next(k for k in ALL_KERNELS if k in set(here))


def test_unknown_and_unavailable_kernels_are_refused():
    ins, outs = [torch.zeros(64, dtype=torch.uint8)], [torch.zeros(64, dtype=torch.uint8)]
    with pytest.raises(RuntimeError, match=r"kernel 'avx3' is not a gf256_matmul_ CPU kernel; pick one of: .*avx2"):
        gf256_matmul_(outs, ins, [[2]], kernel="avx3")
    for name in set(ALL_KERNELS) - HERE:
        with pytest.raises(RuntimeError, match=rf"kernel '{name}' needs .*, which this CPU lacks; it runs: "):
            gf256_matmul_(outs, ins, [[2]], kernel=name)


def test_the_environment_chooses_the_default():
    # The variables are read once per process: one interpreter each, all started at once.
    first = "import torch, plait; print(torch.ops.plait.gf256_matmul_kernels()[0])"
    call = (
        "import torch, plait; torch.ops.plait.gf256_matmul_([torch.zeros(1, dtype=torch.uint8)], "
        "[torch.zeros(1, dtype=torch.uint8)], torch.ones(1, 1, dtype=torch.uint8))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_GF256_")}
    runs = {
        "forced": (first, {"PLAIT_GF256_KERNEL": "gfni_emulated"}),
        "no_simd": (first, {"PLAIT_GF256_NO_SIMD": "1"}),
        "bad": (call, {"PLAIT_GF256_KERNEL": "avx3"}),
    }
    procs = {
        name: subprocess.Popen([sys.executable, "-c", code], env=env | variables, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (code, variables) in runs.items()
    }
    out = {name: proc.communicate(timeout=120) + (proc.returncode,) for name, proc in procs.items()}
    assert out["forced"][2] == 0 and out["forced"][0].strip() == "gfni_emulated", out["forced"]
    assert out["no_simd"][2] == 0 and out["no_simd"][0].strip() == "scalar", out["no_simd"]
    assert out["bad"][2] != 0 and "PLAIT_GF256_KERNEL 'avx3' is not a gf256_matmul_ CPU kernel" in out["bad"][1]


# ------------------------------------------------------------------ GFNI bit matrices


def affine_matrix(c: int) -> int:
    """The 8x8 bit matrix of multiplication by c as gf2p8affineqb takes it (the same
    construction as gf256.h's gf256_affine_matrix, written again from its definition):
    byte 7 - i holds row i, whose bit j is bit i of c * x^j."""
    table = ref.mul_table()
    a = 0
    for i in range(8):
        row = sum(((int(table[c, 1 << j]) >> i) & 1) << j for j in range(8))
        a |= row << (8 * (7 - i))
    return a


def gf2p8affineqb_byte(a: int, x: int, imm8: int = 0) -> int:
    """One byte of GF2P8AFFINEQB, from the Intel SDM: bit i of the result is
    parity(A.byte[7 - i] AND x) XOR imm8.bit[i]."""
    out = 0
    for i in range(8):
        row = (a >> (8 * (7 - i))) & 0xFF
        out |= ((bin(row & x).count("1") & 1) ^ ((imm8 >> i) & 1)) << i
    return out


def test_affine_matrices_multiply_in_the_field_through_the_sdm_definition():
    table = ref.mul_table()
    assert affine_matrix(1) == 0x0102040810204080  # the identity of the SDM's examples
    assert gf2p8affineqb_byte(0x0102040810204080, 0xA5) == 0xA5
    assert gf2p8affineqb_byte(0, 0x00, 0x63) == 0x63  # imm8 is added to every byte
    for c in range(256):
        a = affine_matrix(c)
        row = [gf2p8affineqb_byte(a, x) for x in range(256)]
        assert row == table[c].tolist(), c


def test_every_coefficient_times_every_byte(kernel):
    # Output i of input j's coefficient c covers all 256 * 256 products in 4 calls of 8 x 8:
    # the shards hold every byte value, twice and then a tail (vectors and the scalar tail).
    x = torch.arange(256, dtype=torch.uint8)
    ins = [torch.cat([x.roll(j), x.roll(j), x[:45]]) for j in range(8)]
    table = torch.from_numpy(ref.mul_table())
    for first in range(0, 256, 64):
        coefs = torch.arange(first, first + 64, dtype=torch.uint8).view(8, 8)
        outs = [torch.full_like(ins[0], 0x5A) for _ in range(8)]
        gf256_matmul_(outs, ins, coefs, kernel=kernel)
        for i in range(8):
            expected = torch.zeros_like(ins[0])
            for j in range(8):
                expected ^= table[int(coefs[i, j])][ins[j].long()]
            assert torch.equal(outs[i], expected), (kernel, first, i)
        # a single coefficient alone: exactly c * x for every x
        for c in range(first, first + 64):
            out = torch.empty(256, dtype=torch.uint8)
            gf256_matmul_([out], [x], [[c]], kernel=kernel)
            assert torch.equal(out, table[c]), (kernel, c)


# ------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("m", range(1, 9))
def test_every_output_count_and_length(kernel, m):
    gen = torch.Generator().manual_seed(100 + m)
    lengths = LENGTHS if kernel != "gfni_emulated" else LENGTHS[:-1]  # the emulation is slow
    for k in (1, 3, 10, 32) if m != 8 else (1, 2, 7, 32):
        for n in lengths:
            ins = list(_rand((k, n), gen).unbind(0))
            coefs = _rand((m, k), gen)
            outs = list(_rand((m, n), gen).unbind(0))  # garbage: the kernel overwrites
            gf256_matmul_(outs, ins, coefs, kernel=kernel)
            assert np.array_equal(_np(outs), _expected(coefs, ins)), (kernel, k, m, n)


def test_all_kernels_give_the_same_bytes_on_a_large_stripe(kernel):
    gen = torch.Generator().manual_seed(7)
    n = (1 << 20) + 77 if kernel != "gfni_emulated" else 70_003
    k, m = 10, 4
    ins = list(_rand((k, n), gen).unbind(0))
    coefs = _rand((m, k), gen)
    scalar = [torch.empty(n, dtype=torch.uint8) for _ in range(m)]
    gf256_matmul_(scalar, ins, coefs, kernel="scalar")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs = [torch.empty(n, dtype=torch.uint8) for _ in range(m)]
            gf256_matmul_(outs, ins, coefs, kernel=kernel)
            assert all(torch.equal(a, b) for a, b in zip(outs, scalar)), (kernel, threads)
    finally:
        torch.set_num_threads(before)
    head = _expected(coefs, [t[:3000] for t in ins])
    assert np.array_equal(_np([t[:3000] for t in scalar]), head)


def test_unaligned_shards_and_untouched_neighbours(kernel):
    gen = torch.Generator().manual_seed(8)
    big = _rand((300_000,), gen)
    out_buf = _rand((200_000,), gen)
    original = out_buf.clone()
    n = 20_011
    ins = [big[s : s + n] for s in (1, 30_003, 60_017, 90_031, 120_062)]
    starts = (5, 40_019, 80_047, 120_001)
    outs = [out_buf[s : s + n] for s in starts]
    coefs = _rand((4, 5), gen)
    gf256_matmul_(outs, ins, coefs, kernel=kernel)
    assert np.array_equal(_np(outs), _expected(coefs, ins))
    mask = torch.ones(out_buf.numel(), dtype=torch.bool)
    for s in starts:
        mask[s : s + n] = False
    assert torch.equal(out_buf[mask], original[mask])


def test_zero_and_one_coefficients(kernel):
    gen = torch.Generator().manual_seed(9)
    n = 1000
    ins = list(_rand((6, n), gen).unbind(0))
    coefs = torch.tensor([[0, 1, 0, 1, 0, 1], [0] * 6, [1] * 6, [1, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    outs = list(_rand((4, n), gen).unbind(0))
    gf256_matmul_(outs, ins, coefs, kernel=kernel)
    assert np.array_equal(_np(outs), _expected(coefs, ins))
    assert not outs[1].any() and torch.equal(outs[3], ins[0])
