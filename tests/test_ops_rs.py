"""plait::gf256_matmul_ and ReedSolomon on CPU: against the independent NumPy codec
(plait.ops.rs_reference), every erasure pattern of the small codes, ISA-L's Cauchy
parity, in-place writes into shared memory, threads, the scalar path, argument checks,
the fake kernel and opcheck. (The CUDA kernel is compared with this one in
test_cuda_compile.py, on GPU machines.)"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch

from plait.ops import ReedSolomon, gf256_matmul_, gf256_mul_add_
from plait.ops import rs_reference as ref
from plait.ops.gf256 import _product_table
from plait.ops.rs_matrix import decode_matrix, generator_matrix

OP = torch.ops.plait.gf256_matmul_

LENGTHS = [1, 2, 15, 31, 32, 33, 63, 64, 65, 127, 129, 4097, 65536 + 17]


def _rand(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def _np(tensors) -> np.ndarray:
    return np.stack([t.numpy() for t in tensors])


# --------------------------------------------------------------------------- reference


def test_reference_field_is_the_kernels_field():
    assert np.array_equal(ref.mul_table(), _product_table().numpy())
    assert all(ref.mul_table()[a, ref.inverse(a)] == 1 for a in range(1, 256))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 10, 16, 31, 32])
def test_rs_matrix_generator_equals_the_reference(k):
    for m in range(0, 9):
        assert np.array_equal(generator_matrix(k, m).numpy(), ref.generator(k, m)), (k, m)


def test_reference_decode_inverts_its_encode():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5, 40), dtype=np.uint8)
    parity = ref.encode(data, 3)
    shards = dict(enumerate(np.concatenate([data, parity])))
    got = ref.decode({i: shards[i] for i in (1, 3, 5, 6, 7)}, [0, 2, 4], k=5, m=3)
    for i in (0, 2, 4):
        assert np.array_equal(got[i], data[i])


# ------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("km", [(1, 1), (2, 1), (3, 2), (4, 2), (6, 3), (8, 2), (10, 4), (12, 4), (17, 5), (20, 6), (28, 7), (32, 8)])
def test_encode_matches_reference(km):
    k, m = km
    gen = torch.Generator().manual_seed(k * 100 + m)
    rs = ReedSolomon(k, m)
    for n in LENGTHS:
        data = list(_rand((k, n), gen).unbind(0))
        parity = list(_rand((m, n), gen).unbind(0))  # garbage: encode overwrites
        rs.encode(data, parity)
        assert np.array_equal(_np(parity), ref.encode(_np(data), m)), (k, m, n)


def test_matmul_matches_reference_for_random_matrices():
    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    table = ref.mul_table()
    for trial in range(60):
        k, m = int(rng.integers(1, 33)), int(rng.integers(1, 9))
        n = int(rng.choice([1, 7, 31, 33, 64, 100, 1000, 4097]))
        coefs = _rand((m, k), gen)
        if trial % 5 == 0:  # zeros and ones, which a kernel might special-case
            coefs[:, ::2] = 0
            coefs[:, 1::3] = 1
        ins = list(_rand((k, n), gen).unbind(0))
        outs = list(_rand((m, n), gen).unbind(0))
        gf256_matmul_(outs, ins, coefs)
        x = _np(ins)
        expected = np.zeros((m, n), dtype=np.uint8)
        for i, j in itertools.product(range(m), range(k)):
            expected[i] ^= table[int(coefs[i, j])][x[j]]
        assert np.array_equal(_np(outs), expected), (k, m, n)


def test_matmul_is_the_sum_of_mul_adds_for_every_coefficient():
    gen = torch.Generator().manual_seed(2)
    n = 1000 + 37
    ins = list(_rand((8, n), gen).unbind(0))
    for first in range(0, 256, 8):
        coefs = torch.arange(first, first + 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(8, 8)
        outs = [torch.empty(n, dtype=torch.uint8) for _ in range(8)]
        gf256_matmul_(outs, ins, coefs)
        for i in range(8):
            expected = torch.zeros(n, dtype=torch.uint8)
            for j in range(8):
                gf256_mul_add_(expected, ins[j], int(coefs[i, j]))
            assert torch.equal(outs[i], expected), (first, i)


def test_unaligned_slices_of_one_buffer():
    gen = torch.Generator().manual_seed(3)
    big = _rand((200_000,), gen)
    out_buf = torch.zeros(100_000, dtype=torch.uint8)
    n = 9_001
    starts_in = [1, 9_100, 18_203, 40_000 + 5]
    starts_out = [3, 20_017, 50_031]
    ins = [big[s : s + n] for s in starts_in]
    outs = [out_buf[s : s + n] for s in starts_out]
    coefs = _rand((3, 4), gen)
    gf256_matmul_(outs, ins, coefs)
    expected = ref._matmul(coefs.numpy(), _np(ins))
    assert np.array_equal(_np(outs), expected)
    # bytes outside the outputs are untouched
    mask = torch.ones(100_000, dtype=torch.bool)
    for s in starts_out:
        mask[s : s + n] = False
    assert not out_buf[mask].any()


def test_inputs_may_repeat_and_shapes_may_differ():
    gen = torch.Generator().manual_seed(4)
    x = _rand((64,), gen)
    out = torch.empty(4, 16, dtype=torch.uint8)
    gf256_matmul_([out], [x, x.view(8, 8)], [[3, 3]])  # 3x ^ 3x = 0
    assert not out.any()
    gf256_matmul_([out], [x, x], [[1, 0]])
    assert torch.equal(out.view(-1), x)


def test_threads_do_not_change_the_result():
    gen = torch.Generator().manual_seed(5)
    n = (1 << 21) + 13
    ins = list(_rand((10, n), gen).unbind(0))
    coefs = _rand((4, 10), gen)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs = [torch.empty(n, dtype=torch.uint8) for _ in range(4)]
            gf256_matmul_(outs, ins, coefs)
            results.append(outs)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    head = ref._matmul(coefs.numpy(), _np([t[:5000] for t in ins]))
    tail = ref._matmul(coefs.numpy(), _np([t[-5000:] for t in ins]))
    assert np.array_equal(_np([t[:5000] for t in results[0]]), head)
    assert np.array_equal(_np([t[-5000:] for t in results[0]]), tail)


# ---------------------------------------------------------------------------- decoding


def _stripe(k: int, m: int, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    data = list(_rand((k, n), gen).unbind(0))
    parity = [torch.empty(n, dtype=torch.uint8) for _ in range(m)]
    ReedSolomon(k, m).encode(data, parity)
    return data + parity


def test_every_erasure_pattern_of_the_small_codes():
    gen = torch.Generator().manual_seed(6)
    n = 67  # two vectors and a tail
    cases = 0
    for k in range(1, 7):
        for m in range(0, 4):
            rs = ReedSolomon(k, m)
            shards = _stripe(k, m, n, gen)
            for lost_count in range(0, m + 1):
                for lost in itertools.combinations(range(k + m), lost_count):
                    present = {i: shards[i] for i in range(k + m) if i not in lost}
                    wanted = {i: torch.full((n,), 0xA5, dtype=torch.uint8) for i in lost}
                    rs.decode(present, wanted)
                    for i in lost:
                        assert torch.equal(wanted[i], shards[i]), (k, m, lost, i)
                    cases += 1
    assert cases == sum(
        sum(len(list(itertools.combinations(range(k + m), c))) for c in range(m + 1))
        for k in range(1, 7)
        for m in range(4)
    )


@pytest.mark.parametrize("km", [(4, 2), (10, 4), (32, 8)])
def test_decode_matches_reference(km):
    k, m = km
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    n = 4097
    shards = _stripe(k, m, n, gen)
    for _ in range(4):
        lost = sorted(rng.choice(k + m, size=m, replace=False).tolist())
        present = {i: shards[i] for i in range(k + m) if i not in lost}
        wanted = {i: torch.empty(n, dtype=torch.uint8) for i in lost}
        ReedSolomon(k, m).decode(present, wanted)
        expected = ref.decode({i: t.numpy() for i, t in present.items()}, lost, k=k, m=m)
        for i in lost:
            assert np.array_equal(wanted[i].numpy(), expected[i]), (k, m, lost, i)
            assert torch.equal(wanted[i], shards[i])


def test_decode_uses_any_k_shards_and_rebuilds_more_than_eight():
    gen = torch.Generator().manual_seed(8)
    k, m, n = 12, 4, 300
    shards = _stripe(k, m, n, gen)
    rs = ReedSolomon(k, m)
    # more than k present: extra shards are ignored; wanted may name present shards too
    present = {i: shards[i] for i in range(2, k + m)}
    wanted = {i: torch.empty(n, dtype=torch.uint8) for i in range(k + m)}
    rs.decode(present, wanted)  # 16 outputs: two kernel calls
    for i in range(k + m):
        assert torch.equal(wanted[i], shards[i]), i
    rs.decode(present, {})  # nothing wanted: nothing to do


def test_decode_matrix_rows_of_present_shards_are_unit_vectors():
    d = decode_matrix(4, 2, [0, 1, 2, 5], [1, 3])
    assert d[0].tolist() == [0, 1, 0, 0]


def test_decode_errors():
    rs = ReedSolomon(4, 2)
    t = [torch.zeros(8, dtype=torch.uint8) for _ in range(6)]
    with pytest.raises(ValueError, match=r"needs at least k=4 shards .* got 3 \(\[0, 1, 4\]\); more than m=2"):
        rs.decode({0: t[0], 1: t[1], 4: t[4]}, {2: t[2]})
    with pytest.raises(ValueError, match=r"shards has shard indices \[6\] outside \[0, 6\)"):
        rs.decode({0: t[0], 1: t[1], 2: t[2], 6: t[3]}, {5: t[5]})
    with pytest.raises(ValueError, match=r"wanted has shard indices \[-1\] outside \[0, 6\)"):
        rs.decode({0: t[0], 1: t[1], 2: t[2], 3: t[3]}, {-1: t[5]})
    with pytest.raises(ValueError, match=r"expected 4 data shards, got 3"):
        rs.encode(t[:3], t[4:])
    with pytest.raises(ValueError, match=r"expected 2 parity shards, got 1"):
        rs.encode(t[:4], t[4:5])
    with pytest.raises(ValueError, match=r"k \(data shards\) must be in \[1, 32\], got 33"):
        ReedSolomon(33, 2)
    with pytest.raises(ValueError, match=r"m \(parity shards\) must be in \[0, 8\], got 9"):
        ReedSolomon(4, 9)
    # an output aliasing an input is refused by the kernel before any write
    with pytest.raises(RuntimeError, match=r"outs\[0\] overlaps ins\[0\]"):
        rs.decode({0: t[0], 1: t[1], 2: t[2], 3: t[3]}, {0: t[0]})


def test_parity_equals_isa_l_cauchy_through_pyeclib():
    """ISA-L's Cauchy mode (gf_gen_cauchy1_matrix) builds the same matrix; its parity,
    as pyeclib hands it out after an 80-byte fragment header, is ours byte for byte."""
    ec_iface = pytest.importorskip("pyeclib.ec_iface")
    for k, m in ((4, 2), (10, 4)):
        try:
            driver = ec_iface.ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy")
        except Exception as exc:  # the backend is optional in liberasurecode
            pytest.skip(f"pyeclib has no isa_l_rs_cauchy backend here: {exc}")
        payload = np.random.default_rng(k).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
        fragments = [np.frombuffer(f[80:], dtype=np.uint8) for f in driver.encode(payload)]
        data = [torch.from_numpy(f.copy()) for f in fragments[:k]]
        parity = [torch.empty_like(data[0]) for _ in range(m)]
        ReedSolomon(k, m).encode(data, parity)
        for j in range(m):
            assert np.array_equal(parity[j].numpy(), fragments[k + j]), (k, m, j)


# -------------------------------------------------------------------- zero-copy writes


def test_outputs_in_shared_memory_are_written_in_place():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    k, m, n = 6, 3, 10_007
    path = f"/dev/shm/plait-test-rs-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        region = torch.from_file(path, shared=True, size=(k + m) * n, dtype=torch.uint8)
        shards = [region[i * n : (i + 1) * n] for i in range(k + m)]
        gen = torch.Generator().manual_seed(9)
        data = _rand((k, n), gen)
        for i in range(k):
            shards[i].copy_(data[i])
        ptrs = [s.data_ptr() for s in shards]
        ReedSolomon(k, m).encode(shards[:k], shards[k:])
        assert [s.data_ptr() for s in shards] == ptrs
        with open(path, "rb") as f:
            on_disk = np.frombuffer(f.read(), dtype=np.uint8).reshape(k + m, n)
        assert np.array_equal(on_disk[:k], data.numpy())
        assert np.array_equal(on_disk[k:], ref.encode(data.numpy(), m))
        # rebuild two lost data shards into their own places in the file
        shards[0].fill_(0)
        shards[4].fill_(0)
        present = {i: shards[i] for i in range(k + m) if i not in (0, 4)}
        ReedSolomon(k, m).decode(present, {0: shards[0], 4: shards[4]})
        with open(path, "rb") as f:
            on_disk = np.frombuffer(f.read(), dtype=np.uint8).reshape(k + m, n)
        assert np.array_equal(on_disk[:k], data.numpy())
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_bumps_every_outputs_version_counter():
    ins = [torch.ones(64, dtype=torch.uint8)]
    outs = [torch.zeros(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)]
    before = [o._version for o in outs]
    OP(outs, ins, torch.tensor([[2], [3]], dtype=torch.uint8))
    assert [o._version for o in outs] == [v + 1 for v in before]
    x = torch.randn(8, requires_grad=True)
    y = x * 2
    loss = (y * y).sum()
    OP([y.detach().view(torch.uint8)], [torch.ones(32, dtype=torch.uint8)], torch.ones(1, 1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------------- bad inputs


def _u8(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.uint8)


def _c(m: int, k: int) -> torch.Tensor:
    return torch.ones(m, k, dtype=torch.uint8)


_buffer = torch.zeros(100, dtype=torch.uint8)

BAD_INPUTS = {
    "no ins": (lambda: ([_u8(8)], [], _c(1, 0)), r"ins must hold 1 to 32 tensors .* got 0"),
    "33 ins": (lambda: ([_u8(8)], [_u8(8)] * 33, _c(1, 33)), r"ins must hold 1 to 32 tensors .* got 33; use a code"),
    "no outs": (lambda: ([], [_u8(8)], _c(0, 1)), r"outs must hold 1 to 8 tensors, got 0"),
    "9 outs": (lambda: ([_u8(8) for _ in range(9)], [_u8(8)], _c(9, 1)), r"outs must hold 1 to 8 tensors, got 9; compute more"),
    "in dtype": (lambda: ([_u8(8)], [_u8(8), torch.zeros(2)], _c(1, 2)), r"ins\[1\] must be uint8, got Float; reinterpret"),
    "out dtype": (lambda: ([torch.zeros(8, dtype=torch.int16)], [_u8(8)], _c(1, 1)), r"outs\[0\] must be uint8, got Short"),
    "in strides": (lambda: ([_u8(8)], [_u8(16)[::2]], _c(1, 1)), r"ins\[0\] must be contiguous, got strides \[2\]"),
    "out strides": (lambda: ([_u8(8), _u8(16)[::2]], [_u8(8)], _c(2, 1)), r"outs\[1\] must be contiguous"),
    "in length": (lambda: ([_u8(8)], [_u8(8), _u8(9)], _c(1, 2)), r"ins\[1\] has 9 bytes but ins\[0\] has 8; every shard"),
    "out length": (lambda: ([_u8(7)], [_u8(8)], _c(1, 1)), r"outs\[0\] has 7 bytes but ins\[0\] has 8"),
    "device": (
        lambda: ([torch.empty(8, dtype=torch.uint8, device="meta")], [_u8(8)], _c(1, 1)),
        r"outs\[0\] is on meta but ins\[0\] is on cpu; all shards must be on one device",
    ),
    "coefs dtype": (lambda: ([_u8(8)], [_u8(8)], torch.ones(1, 1)), r"coefs must be uint8, got Float"),
    "coefs shape": (lambda: ([_u8(8)], [_u8(8), _u8(8)], _c(2, 1)), r"coefs must have shape \[len\(outs\), len\(ins\)\] = \[1, 2\], got \[2, 1\]"),
    "coefs rank": (lambda: ([_u8(8)], [_u8(8)], torch.ones(1, dtype=torch.uint8)), r"coefs must have shape .* got \[1\]"),
    "out overlaps in": (lambda: ([_buffer[0:50]], [_buffer[49:99]], _c(1, 1)), r"outs\[0\] overlaps ins\[0\] in memory; outputs are overwritten"),
    "out is in": (lambda: ([_buffer[0:50]], [_u8(50), _buffer[0:50]], _c(1, 2)), r"outs\[0\] overlaps ins\[1\]"),
    "outs overlap": (lambda: ([_buffer[0:50], _buffer[25:75]], [_u8(50)], _c(2, 1)), r"outs\[1\] overlaps outs\[0\] in memory"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_naming_the_argument(case):
    make, pattern = BAD_INPUTS[case]
    outs, ins, coefs = make()
    before = [o.clone() for o in outs if o.device.type == "cpu"]
    with pytest.raises(RuntimeError, match=pattern):
        OP(outs, ins, coefs)
    with pytest.raises(RuntimeError, match=pattern):
        gf256_matmul_(outs, ins, coefs)
    after = [o for o in outs if o.device.type == "cpu"]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a rejected call must not write"


def test_coefs_on_another_device_is_refused():
    with pytest.raises(RuntimeError, match=r"coefs must be a CPU tensor, got one on meta; .* pass coefs.cpu\(\)"):
        OP([_u8(8)], [_u8(8)], torch.ones(1, 1, dtype=torch.uint8, device="meta"))


def test_fake_kernel_checks_like_the_real_one():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        outs = [torch.empty(32, dtype=torch.uint8) for _ in range(2)]
        ins = [torch.empty(32, dtype=torch.uint8) for _ in range(3)]
        assert OP(outs, ins, torch.empty(2, 3, dtype=torch.uint8)) is None
        with pytest.raises(RuntimeError, match=r"ins\[1\] must be uint8"):
            OP(outs, [ins[0], torch.empty(32)], torch.empty(2, 2, dtype=torch.uint8))
        with pytest.raises(RuntimeError, match=r"outs\[1\] has 31 bytes but ins\[0\] has 32"):
            OP([outs[0], torch.empty(31, dtype=torch.uint8)], ins, torch.empty(2, 3, dtype=torch.uint8))
        with pytest.raises(RuntimeError, match=r"coefs must have shape"):
            OP(outs, ins, torch.empty(3, 2, dtype=torch.uint8))
        with pytest.raises(RuntimeError, match=r"outs must hold 1 to 8"):
            OP([], ins, torch.empty(0, 3, dtype=torch.uint8))
        with pytest.raises(RuntimeError, match=r"outs\[0\] must be contiguous"):
            OP([torch.empty(64, dtype=torch.uint8)[::2]], ins, torch.empty(1, 3, dtype=torch.uint8))


@pytest.mark.parametrize("k,m,n", [(1, 1, 0), (3, 2, 33), (10, 4, 4099)])
def test_opcheck(k, m, n):
    gen = torch.Generator().manual_seed(n)
    outs = list(_rand((m, n), gen).unbind(0))
    ins = list(_rand((k, n), gen).unbind(0))
    torch.library.opcheck(OP.default, ([o.clone() for o in outs], ins, _rand((m, k), gen)))


# --------------------------------------------------------------- scalar vs AVX2 paths

_PATH_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import plait  # noqa: F401  (registers torch.ops.plait.*)
    gen = torch.Generator().manual_seed(12)
    results = []
    for k, m, n in [(1, 1, 1), (3, 2, 95), (4, 4, 130), (5, 5, 4096 + 33), (10, 4, 70_001), (32, 8, 1000), (7, 8, 300_003)]:
        ins = list(torch.randint(0, 256, (k, n), dtype=torch.uint8, generator=gen).unbind(0))
        coefs = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
        outs = [torch.empty(n, dtype=torch.uint8) for _ in range(m)]
        torch.ops.plait.gf256_matmul_(outs, ins, coefs)
        results.append(torch.stack(outs))
    torch.save(results, sys.argv[1])
    """
)


def _start_paths_script(tmp_path, name: str, no_simd: str | None) -> tuple[subprocess.Popen, object]:
    out_file = tmp_path / f"{name}.pt"
    env = dict(os.environ)
    env.pop("PLAIT_GF256_NO_SIMD", None)
    if no_simd is not None:
        env["PLAIT_GF256_NO_SIMD"] = no_simd
    proc = subprocess.Popen([sys.executable, "-c", _PATH_SCRIPT, str(out_file)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out_file


def test_scalar_path_matches_avx2_path(tmp_path):
    # The path is picked once per process, so each runs in its own interpreter (both at once).
    runs = {name: _start_paths_script(tmp_path, name, flag) for name, flag in (("default", None), ("scalar", "1"))}
    results = {}
    for name, (proc, out_file) in runs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} path failed:\n{stderr}"
        results[name] = torch.load(out_file)
    assert len(results["default"]) == len(results["scalar"]) == 7
    for i, (a, b) in enumerate(zip(results["default"], results["scalar"], strict=True)):
        assert torch.equal(a, b), i
