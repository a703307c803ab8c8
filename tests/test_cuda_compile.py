"""The CUDA sources compile, on every machine.

A CPU-only torch builds plait._C without its .cu files, so a CUDA mistake would
otherwise surface only on a GPU machine. Here nvcc compiles each csrc/**/*.cu to an
object for sm_90a against the installed torch's headers. Where torch has CUDA the
build itself compiled them, and a GPU lets the kernels be checked against the CPU ones.
"""

from __future__ import annotations

import pytest
import torch

import plait  # noqa: F401  (registers torch.ops.plait.*)
from nvcc_build import CSRC, CU_FILES, NVCC_COMPILE, NVCC_TIMEOUT_S, ROOT, BackgroundCompile, find_nvcc

OP_NAME = "plait::gf256_mul_add_"
# Every op with a CUDA kernel; each must be registered exactly where torch has CUDA.
CUDA_OP_NAMES = (
    OP_NAME,
    "plait::gf256_matmul_",
    "plait::lsh_hash",
    "plait::lsh_bucket_reduce",
    "plait::block_scaled_mm",
    "plait::block_scaled_grouped_mm",
    "plait::quantize_fp8",
    "plait::dequantize_fp8",
    "plait::quantize_mx",
    "plait::dequantize_mx",
    "plait::quantize_nvfp4",
    "plait::dequantize_nvfp4",
    "plait::matmul_into",
)


def _has_cuda_kernel(name: str = OP_NAME) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


def test_there_are_cuda_sources():
    names = {p.name for p in CU_FILES}
    expected = {"gf256_cuda.cu", "gf256_matmul_cuda.cu", "lsh_cuda.cu", "qgemm_cuda.cu", "quant_cuda.cu",
                "matmul_into_cuda.cu"}
    assert expected <= names, f"missing .cu files under {CSRC}: {sorted(names)}"


def test_cuda_sources_compile_with_nvcc(request, tmp_path):
    """Runs last (conftest.py): the compile started when the tests were collected, at nice 19, behind the others."""
    nvcc = find_nvcc()
    if nvcc is None:
        if torch.version.cuda is None:
            pytest.fail(
                "nvcc was not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin) and torch "
                f"{torch.__version__} has no CUDA, so nothing compiles the {len(CU_FILES)} "
                "csrc/**/*.cu files on this machine; install the CUDA toolkit (nvcc) or put it on PATH"
            )
        # torch has CUDA: the build compiled the .cu files into plait._C itself.
        assert _has_cuda_kernel(), (
            "nvcc is missing, torch has CUDA, yet plait._C has no CUDA kernel for "
            f"{OP_NAME}; rebuild with `pip install -e . --no-build-isolation`"
        )
        return
    compile_ = request.config.stash.get(NVCC_COMPILE, None) or BackgroundCompile(nvcc, tmp_path)
    results = compile_.results(NVCC_TIMEOUT_S)
    assert [r.source for r in results] == CU_FILES
    failures = [
        f"{r.source.relative_to(ROOT)}: nvcc exited {r.returncode}\n$ {' '.join(r.cmd)}\n{r.stderr}"
        for r in results
        if r.returncode != 0
    ]
    assert not failures, "\n\n".join(failures)


def test_a_cuda_mistake_fails_the_compile(tmp_path):
    """The check can fail: a .cu file with a type error is reported with nvcc's message."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc here; test_cuda_sources_compile_with_nvcc says why that is fine or not")
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k(int* p) { p = 1.5f; }\n")
    (result,) = BackgroundCompile(nvcc, tmp_path / "obj", sources=[bad]).results(NVCC_TIMEOUT_S)
    assert result.returncode not in (0, None) and "bad.cu" in result.stderr, result.stderr


@pytest.mark.parametrize("name", CUDA_OP_NAMES)
def test_kernel_registration_matches_the_build(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    if torch.cuda.is_available():
        assert _has_cuda_kernel(name), (
            f"torch has CUDA and a GPU but plait._C has no CUDA kernel for {name}; was it "
            "built with -DPLAIT_WITH_CUDA=OFF or against another torch? Rebuild with "
            "`pip install -e . --no-build-isolation`"
        )
    elif torch.version.cuda is None:
        assert not _has_cuda_kernel(name), "a CPU-only torch build should not carry CUDA kernels"
    else:
        pytest.skip("torch has CUDA but no GPU is visible; registration is checked on GPU machines")


def _cpu_and_cuda(
    dst: torch.Tensor, src: torch.Tensor, coef: int
) -> tuple[torch.Tensor, torch.Tensor]:
    expected = dst.clone()
    torch.ops.plait.gf256_mul_add_(expected, src, coef)
    out = dst.cuda()
    torch.ops.plait.gf256_mul_add_(out, src.cuda(), coef)
    return expected, out.cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_matches_cpu_kernel():
    gen = torch.Generator().manual_seed(0)

    def rand(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)

    # all coefficients, sizes around the 16-byte vector width
    for n in (0, 1, 15, 16, 17, 31, 33, 4096 + 37):
        src, dst = rand(n), rand(n)
        for coef in range(256):
            expected, got = _cpu_and_cuda(dst, src, coef)
            assert torch.equal(got, expected), (n, coef)

    # large inputs, including one that needs several grid-stride sweeps
    for n in ((1 << 20) + 7, (1 << 26) + 3):
        src, dst = rand(n), rand(n)
        for coef in (0, 1, 2, 0x8E, 0xFF):
            expected, got = _cpu_and_cuda(dst, src, coef)
            assert torch.equal(got, expected), (n, coef)

    # slices at byte offsets: equal alignment (vector body plus head and tail) and
    # different alignment (bytewise), in place in a bigger device buffer
    big_d, big_s = rand(70_000), rand(70_000)
    for od, os_ in ((0, 0), (1, 1), (5, 5), (1, 2), (3, 0), (15, 9)):
        n = 65_536 + 11
        for coef in (1, 0x1D, 0xFF):
            expected = big_d.clone()
            torch.ops.plait.gf256_mul_add_(expected[od : od + n], big_s[os_ : os_ + n], coef)
            dev = big_d.cuda()
            torch.ops.plait.gf256_mul_add_(dev[od : od + n], big_s.cuda()[os_ : os_ + n], coef)
            assert torch.equal(dev.cpu(), expected), (od, os_, coef)

    # on a side stream: the kernel must run on the current stream
    src, dst = rand(1 << 22), rand(1 << 22)
    expected = dst.clone()
    torch.ops.plait.gf256_mul_add_(expected, src, 0x8E)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        d, s = dst.cuda(), src.cuda()
        torch.ops.plait.gf256_mul_add_(d, s, 0x8E)
        got = d.cpu()
    stream.synchronize()
    assert torch.equal(got, expected)

    # the argument checks are shared with the CPU kernel
    on_gpu = torch.zeros(8, dtype=torch.uint8, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.plait.gf256_mul_add_(on_gpu, torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(RuntimeError, match="dst must be uint8"):
        torch.ops.plait.gf256_mul_add_(torch.zeros(8, device="cuda"), on_gpu, 3)


def _matmul_cpu_and_cuda(
    outs: list[torch.Tensor], ins: list[torch.Tensor], coefs: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """gf256_matmul_ on CPU copies and on CUDA copies of the same shards (outs hold
    garbage first: both kernels must overwrite every byte)."""
    expected = [o.clone() for o in outs]
    torch.ops.plait.gf256_matmul_(expected, ins, coefs)
    got = [o.cuda() for o in outs]
    torch.ops.plait.gf256_matmul_(got, [t.cuda() for t in ins], coefs)
    return expected, [g.cpu() for g in got]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matmul_matches_cpu_kernel():
    gen = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)

    # every output count (1 and 2 groups of four), input counts up to 32, sizes around
    # the 16-byte vector and in the grid-stride regime
    for k, m in ((1, 1), (2, 1), (3, 2), (4, 4), (5, 5), (10, 4), (7, 8), (32, 8), (32, 3)):
        for n in (1, 15, 16, 17, 33, 4096 + 37, (1 << 20) + 5):
            ins = list(rand(k, n).unbind(0))
            outs = list(rand(m, n).unbind(0))
            expected, got = _matmul_cpu_and_cuda(outs, ins, rand(m, k))
            for i in range(m):
                assert torch.equal(got[i], expected[i]), (k, m, n, i)

    # a large stripe that needs several grid-stride sweeps, with the RS parity matrix
    from plait.ops.rs_matrix import parity_matrix

    n = (1 << 25) + 3
    ins = list(rand(10, n).unbind(0))
    outs = list(rand(4, n).unbind(0))
    expected, got = _matmul_cpu_and_cuda(outs, ins, parity_matrix(10, 4))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))

    # shards at byte offsets of one device buffer: equal alignment (vector body, head and
    # tail) and unequal alignment (bytewise), written in place
    big_in, big_out = rand(200_000), rand(100_000)
    n = 16_384 + 11
    for offset_in, offset_out in ((0, 0), (3, 3), (1, 2), (5, 0)):
        starts_in = [offset_in + 16 * 1000 * j for j in range(6)]
        starts_out = [offset_out + 16 * 2000 * i for i in range(3)]
        coefs = rand(3, 6)
        expected = big_out.clone()
        torch.ops.plait.gf256_matmul_(
            [expected[s : s + n] for s in starts_out], [big_in[s : s + n] for s in starts_in], coefs
        )
        dev_in, dev_out = big_in.cuda(), big_out.cuda()
        torch.ops.plait.gf256_matmul_(
            [dev_out[s : s + n] for s in starts_out], [dev_in[s : s + n] for s in starts_in], coefs
        )
        assert torch.equal(dev_out.cpu(), expected), (offset_in, offset_out)

    # on a side stream: the kernel must run on the current stream
    ins = list(rand(4, 1 << 22).unbind(0))
    coefs = rand(2, 4)
    expected = [torch.empty(1 << 22, dtype=torch.uint8) for _ in range(2)]
    torch.ops.plait.gf256_matmul_(expected, ins, coefs)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dev_ins = [t.cuda() for t in ins]
        dev_outs = [torch.empty(1 << 22, dtype=torch.uint8, device="cuda") for _ in range(2)]
        torch.ops.plait.gf256_matmul_(dev_outs, dev_ins, coefs)
        got = [t.cpu() for t in dev_outs]
    stream.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))

    # the argument checks are shared with the CPU kernel
    on_gpu = torch.zeros(8, dtype=torch.uint8, device="cuda")
    one = torch.ones(1, 1, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"outs\[0\] is on cpu but ins\[0\] is on cuda"):
        torch.ops.plait.gf256_matmul_([torch.zeros(8, dtype=torch.uint8)], [on_gpu], one)
    with pytest.raises(RuntimeError, match=r"outs\[0\] overlaps ins\[0\]"):
        torch.ops.plait.gf256_matmul_([on_gpu], [on_gpu], one)
    with pytest.raises(RuntimeError, match="coefs must be a CPU tensor"):
        torch.ops.plait.gf256_matmul_([on_gpu], [on_gpu.clone()], one.cuda())
