// plait._C: a Python module with no Python API of its own. Importing it runs the
// static registrations below and in every kernel file (TORCH_LIBRARY_IMPL), which
// make the ops available as torch.ops.plait.*.
#include <Python.h>
#include <torch/library.h>

// Every op schema of plait is declared here, once. Kernels register per backend
// next to their implementation (csrc/<area>/*_cpu.cpp, *.cu).
TORCH_LIBRARY(plait, m) {
  // GF(2^8) multiply-accumulate over byte regions: dst[i] ^= coef * src[i], in the
  // field GF(2)[x] / (x^8 + x^4 + x^3 + x^2 + 1) (0x11d, as ISA-L and most RS codecs).
  m.def("gf256_mul_add_(Tensor(a!) dst, Tensor src, int coef) -> ()");
  // The fused product outs[i] = XOR_j coefs[i, j] * ins[j] over GF(2^8): a whole
  // Reed-Solomon encode (coefs = the parity rows) or decode (the decoding matrix) of a
  // stripe in one pass. outs are overwritten; coefs is a CPU uint8 [len(outs), len(ins)].
  // kernel names a CPU kernel (None: the best this CPU runs); CUDA tensors take None.
  m.def("gf256_matmul_(Tensor(a!)[] outs, Tensor[] ins, Tensor coefs, str? kernel=None) -> ()");
  // The CPU kernels of gf256_matmul_ this CPU runs, the default first (all=True: every
  // kernel of this build).
  m.def("gf256_matmul_kernels(bool all=False) -> str[]");
  // CRC-32C (Castagnoli) of a uint8 CPU tensor's bytes, chained like zlib.crc32:
  // crc32c(b, crc32c(a)) == crc32c(a + b). kernel names an implementation (None: the
  // best this CPU runs).
  m.def("crc32c(Tensor data, int crc=0, str? kernel=None) -> int");
  // The implementations of crc32c this CPU runs, the default first (all=True: every one
  // of this build).
  m.def("crc32c_kernels(bool all=False) -> str[]");
  // Exact accounting of CPU tensor storage (csrc/memory/cpu_tracker.cpp, used by
  // plait.runtime.memtrack): wrap the CPU allocator once; read [live bytes, peak bytes,
  // allocations, installed]; restart the peak from the live bytes; ask whether a storage's
  // data pointer was allocated through the wrapper.
  m.def("memtrack_install() -> bool");
  m.def("memtrack_stats() -> int[]");
  m.def("memtrack_reset_peak() -> int");
  m.def("memtrack_tracks(int ptr) -> bool");
  // LSH-MoE (plait/ops/lsh.py). Cross-polytope keys of the rows of x [N, d] (float32 or
  // bfloat16): per hash h, y = H D3 H D2 H D1 x (x zero-padded to P = next power of two
  // >= d, H the unnormalised Walsh-Hadamard transform, Di = diag(signs[h, i]), signs int8
  // [hashes, 3, P] of +-1), code_h = 2 argmax_{j < dim} |y_j| + [y_j* < 0]; the int64 key
  // is sum_h code_h (2 dim)^h.
  m.def("lsh_hash(Tensor x, Tensor signs, int dim) -> Tensor");
  // The buckets of equal keys within each segment of rows (segments: int64 row counts,
  // CPU or x's device) and their means: (centroids [C, d] in x's dtype, counts int64 [C],
  // index int64 [N]: each row's centroid, segment_centroids int64 [S]). Centroids are
  // segment-major, then in order of their key's first row; means are float64 sums in row
  // order, divided and rounded once.
  m.def("lsh_bucket_reduce(Tensor x, Tensor keys, Tensor segments) -> (Tensor, Tensor, Tensor, Tensor)");
  // qgemm: block-scaled GEMMs (plait/ops/qgemm.py, formats of plait/ops/quant.py).
  // out[M, N] float32 = dequant(a) [M, K] @ dequant(b) [N, K]^T with float32 accumulation;
  // a [M, K] (FP4: uint4 pairs [M, K/2]) with its decode scales in a_fmt, b [N, K] in b_fmt.
  // Pairs: fp8-1x128 x fp8-128x128 | fp8-1x128, mxfp8 x mxfp8, mxfp4 x mxfp4, nvfp4 x nvfp4
  // (a_global, b_global: nvfp4's float32 0-d global scales, else None).
  m.def("block_scaled_mm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, str a_fmt, str b_fmt, Tensor? a_global=None, Tensor? b_global=None) -> Tensor");
  // Grouped (MoE experts): b [E, N, K], b_scale [E, ...], b_global [E]; rows
  // offsets[e]:offsets[e + 1] of a (offsets int64 [E + 1]) are multiplied by expert e's b.
  m.def("block_scaled_grouped_mm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor offsets, str a_fmt, str b_fmt, Tensor? a_global=None, Tensor? b_global=None) -> Tensor");
  // quant: FP8/FP4 quantize and dequantize along the last dim of x [M, K] (float32 or
  // bfloat16), as in plait/ops/quant.py (formats, decode scales x ~ q * s, rounding,
  // FP4 packing, non-finite blocks). granularity: "tensor" | "row" | "1x128" | "128x128";
  // elem: "e4m3" | "e5m2" (fp8), "e4m3" (MXFP8) | "e2m1" (MXFP4); stochastic rounding
  // draws its bits from seed and each element's row-major index.
  m.def("quantize_fp8(Tensor x, str granularity, str elem, bool stochastic=False, int seed=0) -> (Tensor, Tensor)");
  m.def("dequantize_fp8(Tensor data, Tensor scale, str granularity, ScalarType dtype) -> Tensor");
  m.def("quantize_mx(Tensor x, str elem, bool stochastic=False, int seed=0, bool scale_up=False) -> (Tensor, Tensor)");
  m.def("dequantize_mx(Tensor data, Tensor scale, ScalarType dtype) -> Tensor");
  m.def("quantize_nvfp4(Tensor x, bool stochastic=False, int seed=0, int block_rows=1) -> (Tensor, Tensor, Tensor)");
  m.def("dequantize_nvfp4(Tensor data, Tensor scale, Tensor global_scale, ScalarType dtype) -> Tensor");
  // overlap: one chunk of a collective matmul (plait/ops/overlap.py, plait/parallel/tp_overlap.py).
  // out[:, row_offset : row_offset + m] = x @ w^T (accumulate: +=) for x [B, m, k], w [n, k] and
  // out [B, M, n] with unit stride along n, written through out's own memory (a slice of a
  // preallocated output, never a temporary). With stage_src, stage_dst = stage_src as well: the
  // next chunk's copy, which on CUDA runs on a copy stream while the GEMM runs on the current one.
  m.def("matmul_into(Tensor x, Tensor w, Tensor(a!) out, int row_offset, bool accumulate=False, Tensor? stage_src=None, Tensor(b!)? stage_dst=None) -> ()");
}

static struct PyModuleDef plait_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&plait_c_module); }
