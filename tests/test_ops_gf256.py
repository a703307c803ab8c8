"""plait::gf256_mul_add_ (dst ^= coef * src in GF(2^8)) on CPU: kernel vs reference,
the reference's field arithmetic, in-place semantics, argument checks, opcheck, and
the scalar path vs the SIMD one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from plait.ops import GF256_POLY, gf256_mul, gf256_mul_add_, gf256_mul_add_reference
from plait.ops.gf256 import _product_table

OP = torch.ops.plait.gf256_mul_add_


def _bytes(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


# --------------------------------------------------------------------------- reference


def test_gf256_mul_known_values():
    assert GF256_POLY == 0x11D
    assert gf256_mul(2, 0x80) == 0x1D  # x * x^7 = x^8 = x^4 + x^3 + x^2 + 1
    assert gf256_mul(0x8E, 2) == 1
    assert gf256_mul(3, 7) == 9  # (x + 1)(x^2 + x + 1) = x^3 + 1, no reduction
    assert gf256_mul(0xFF, 0xFF) == 0xE2
    with pytest.raises(ValueError, match="b must be in"):
        gf256_mul(1, 256)


def test_reference_table_matches_shift_and_add():
    table = _product_table()
    expected = torch.tensor(
        [[gf256_mul(a, b) for b in range(256)] for a in range(256)], dtype=torch.uint8
    )
    assert torch.equal(table, expected)


def test_field_axioms():
    t = _product_table().long()
    a = torch.arange(256)
    # identity, zero, commutativity
    assert torch.equal(t[:, 1], a) and torch.equal(t[1, :], a)
    assert not t[0].any() and not t[:, 0].any()
    assert torch.equal(t, t.T)
    # every nonzero element has exactly one inverse: its row is a permutation holding 1 once
    for x in range(1, 256):
        assert torch.equal(t[x].sort().values, a), x
        assert int((t[x] == 1).sum()) == 1, x
    # distributivity over XOR and associativity, for all a, b and some c
    gen = torch.Generator().manual_seed(7)
    for c in [0, 1, 2, 0x1D, 0x8E, 0xFF] + torch.randint(0, 256, (10,), generator=gen).tolist():
        assert torch.equal(t[a[:, None], a[None, :] ^ c], t[:, :] ^ t[:, c][:, None]), c
        assert torch.equal(t[t[:, :], c], t[a[:, None], t[:, c][None, :]]), c


# ------------------------------------------------------------------- kernel vs reference

SIZES = [0, 1, 15, 16, 31, 32, 33, 63, 64, 65, 4095, 65536 + 3, (1 << 18) + 1, (1 << 20) + 7]


@pytest.mark.parametrize("n", SIZES)
def test_kernel_matches_reference(n):
    gen = torch.Generator().manual_seed(1000 + n)
    src = _bytes(n, gen)
    dst = _bytes(n, gen)
    for coef in [0, 1, 2, 0x8E, 0xFF] + torch.randint(3, 255, (3,), generator=gen).tolist():
        out = dst.clone()
        assert gf256_mul_add_(out, src, coef) is out
        assert torch.equal(out, gf256_mul_add_reference(dst.clone(), src, coef)), (n, coef)


def test_all_coefficients():
    gen = torch.Generator().manual_seed(1)
    n = 4096 + 37  # whole vectors and a tail
    src = _bytes(n, gen)
    dst = _bytes(n, gen)
    for coef in range(256):
        out = dst.clone()
        OP(out, src, coef)
        assert torch.equal(out, gf256_mul_add_reference(dst.clone(), src, coef)), coef


def test_every_byte_value_every_coefficient():
    # dst starts at 0, so dst ends as coef * src: the full multiplication table.
    src = torch.arange(256, dtype=torch.uint8).repeat(3)  # 768 bytes: SIMD body and tail
    table = _product_table()
    for coef in range(256):
        out = torch.zeros_like(src)
        OP(out, src, coef)
        assert torch.equal(out, table[coef].repeat(3)), coef


def test_shapes_may_differ_and_unaligned_offsets():
    gen = torch.Generator().manual_seed(2)
    dst = _bytes(4 * 97, gen).view(4, 97)
    src = _bytes(4 * 97, gen)
    out = dst.clone()
    OP(out, src, 0x53)
    assert torch.equal(out, gf256_mul_add_reference(dst.clone(), src, 0x53))
    # slices starting at odd byte offsets (unaligned loads), different for dst and src
    big_d = _bytes(10_000, gen)
    big_s = _bytes(10_000, gen)
    for od, os_ in [(1, 1), (1, 3), (7, 0), (31, 17)]:
        n = 5000 + od
        d = big_d[od : od + n].clone()
        OP(d, big_s[os_ : os_ + n], 0xA7)
        exp = gf256_mul_add_reference(big_d[od : od + n].clone(), big_s[os_ : os_ + n], 0xA7)
        assert torch.equal(d, exp), (od, os_)


def test_threads_do_not_change_the_result():
    gen = torch.Generator().manual_seed(3)
    n = (1 << 21) + 5
    src, dst = _bytes(n, gen), _bytes(n, gen)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            out = dst.clone()
            OP(out, src, 0xC3)
            results.append(out)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert torch.equal(results[0], gf256_mul_add_reference(dst.clone(), src, 0xC3))


# ------------------------------------------------------------------- in-place semantics


def test_in_place_on_a_slice_of_a_bigger_buffer():
    gen = torch.Generator().manual_seed(4)
    big = _bytes(100_000, gen)
    original = big.clone()
    view = big[1234:81234]
    assert view._base is big
    ptr = view.data_ptr()
    src = _bytes(view.numel(), gen)
    OP(view, src, 0x1D)
    assert view.data_ptr() == ptr
    expected = original.clone()
    gf256_mul_add_reference(expected[1234:81234], src, 0x1D)
    assert torch.equal(big, expected)
    assert torch.equal(big[:1234], original[:1234]) and torch.equal(big[81234:], original[81234:])


def test_in_place_on_a_byte_view_of_another_dtype():
    x = torch.zeros(16, dtype=torch.float32)
    b = x.view(torch.uint8)
    src = torch.tensor([0, 0, 0x80, 0x3F] * 16, dtype=torch.uint8)  # 1.0f, little endian
    OP(b, src, 1)
    assert torch.equal(x, torch.ones(16))


def test_bumps_the_version_counter():
    dst = torch.zeros(64, dtype=torch.uint8)
    v = dst._version
    OP(dst, torch.ones(64, dtype=torch.uint8), 3)
    assert dst._version == v + 1
    # autograd sees bytes it saved for backward overwritten through a byte view
    x = torch.randn(8, requires_grad=True)
    y = x * 2
    loss = (y * y).sum()
    gf256_mul_add_(y.detach().view(torch.uint8), torch.ones(32, dtype=torch.uint8), 1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_dst_may_be_src():
    gen = torch.Generator().manual_seed(5)
    x = _bytes(1000, gen)
    # x ^ 0x35 x = (1 ^ 0x35) x = 0x34 x
    expected = gf256_mul_add_reference(torch.zeros_like(x), x, 0x34)
    OP(x, x, 0x35)
    assert torch.equal(x, expected)


# ------------------------------------------------------------------------- bad inputs


def _u8(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.uint8)


_buffer = torch.zeros(100, dtype=torch.uint8)

BAD_INPUTS = {
    "dst dtype": (lambda: (torch.zeros(8), _u8(8), 3), r"dst must be uint8, got Float"),
    "src dtype": (lambda: (_u8(8), torch.zeros(8, dtype=torch.int16), 3), r"src must be uint8, got Short"),
    "dst strides": (lambda: (_u8(16)[::2], _u8(8), 3), r"dst must be contiguous"),
    "src strides": (lambda: (_u8(8), _u8(16)[::2], 3), r"src must be contiguous"),
    "sizes": (lambda: (_u8(8), _u8(9), 3), r"same number of elements, got dst 8 and src 9"),
    "coef high": (lambda: (_u8(8), _u8(8), 256), r"coef must be .* \[0, 255\], got 256"),
    "coef negative": (lambda: (_u8(8), _u8(8), -1), r"coef must be .* \[0, 255\], got -1"),
    "overlap": (lambda: (_buffer[0:50], _buffer[10:60], 3), r"dst and src partially overlap"),
    "device": (
        lambda: (_u8(8), torch.empty(8, dtype=torch.uint8, device="meta"), 3),
        r"dst and src must be on the same device",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_naming_the_argument(case):
    make, pattern = BAD_INPUTS[case]
    dst, src, coef = make()
    before = dst.clone() if dst.device.type == "cpu" else None
    with pytest.raises(RuntimeError, match=pattern):
        OP(dst, src, coef)
    with pytest.raises(RuntimeError, match=pattern):
        gf256_mul_add_(dst, src, coef)
    if before is not None:
        assert torch.equal(dst, before), "a rejected call must not write"


def test_non_integer_coef_is_a_type_error():
    with pytest.raises(TypeError):
        gf256_mul_add_(_u8(8), _u8(8), 2.0)


def test_fake_kernel_checks_like_the_real_one():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dst = torch.empty(32, dtype=torch.uint8)
        assert OP(dst, torch.empty(4, 8, dtype=torch.uint8), 7) is None
        with pytest.raises(RuntimeError, match="src must be uint8"):
            OP(dst, torch.empty(32), 7)
        with pytest.raises(RuntimeError, match="same number of elements"):
            OP(dst, torch.empty(31, dtype=torch.uint8), 7)
        with pytest.raises(RuntimeError, match="coef must be"):
            OP(dst, torch.empty(32, dtype=torch.uint8), 256)
        with pytest.raises(RuntimeError, match="dst must be contiguous"):
            OP(torch.empty(64, dtype=torch.uint8)[::2], torch.empty(32, dtype=torch.uint8), 1)


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("n,coef", [(0, 5), (1, 1), (33, 0x8E), (4099, 0xFF), (100_000, 2)])
def test_opcheck(n, coef):
    gen = torch.Generator().manual_seed(n)
    dst, src = _bytes(n, gen), _bytes(n, gen)
    torch.library.opcheck(OP.default, (dst, src, coef))


# --------------------------------------------------------------- scalar vs SIMD paths

_PATH_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from plait.ops import gf256_mul_add_reference
    gen = torch.Generator().manual_seed(11)
    outs = []
    for n in (0, 1, 31, 32, 33, 95, 4096 + 13, (1 << 20) + 7):
        src = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        dst = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        for coef in range(256) if n < 5000 else (0, 1, 2, 0x8E, 0xFF):
            out = dst.clone()
            torch.ops.plait.gf256_mul_add_(out, src, coef)
            ref = gf256_mul_add_reference(dst.clone(), src, coef)
            assert torch.equal(out, ref), (n, coef)
            outs.append(out)
    torch.save(outs, sys.argv[1])
    """
)


def _run_paths_script(tmp_path, name: str, no_simd: str | None) -> list[torch.Tensor]:
    out_file = tmp_path / f"{name}.pt"
    env = dict(os.environ)
    env.pop("PLAIT_GF256_NO_SIMD", None)
    if no_simd is not None:
        env["PLAIT_GF256_NO_SIMD"] = no_simd
    proc = subprocess.run(
        [sys.executable, "-c", _PATH_SCRIPT, str(out_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{name} path failed:\n{proc.stderr}"
    return torch.load(out_file)


def test_scalar_path_matches_simd_path(tmp_path):
    # The path is picked once per process, so each runs in its own interpreter.
    simd = _run_paths_script(tmp_path, "default", None)
    scalar = _run_paths_script(tmp_path, "scalar", "1")
    assert len(simd) == len(scalar) > 0
    for i, (a, b) in enumerate(zip(simd, scalar, strict=True)):
        assert torch.equal(a, b), i
