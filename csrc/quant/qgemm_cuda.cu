// CUDA kernels of plait::block_scaled_mm and plait::block_scaled_grouped_mm for Hopper
// (sm_90a; any sm_80+ runs it), on the current stream of a's device. Same arguments and
// checks (qgemm.h) as the CPU kernels.
//
// One block of 4 warps per 64 x 64 output tile. Per 16-wide K step, a's and b's tiles are
// decoded to bf16 in shared memory WITHOUT their scales (every E4M3, E5M2 and E2M1 value
// is exact in bf16) and multiplied by tensor cores (WMMA 16x16x16, float32 accumulate),
// each warp a 32 x 32 quarter. At the end of each scale block along K (128, 32 or 16
// elements; the pair shares its block length) the warps' partial sums go through shared
// memory and every output adds scale_a(row) * scale_b(col) * partial into its float32
// accumulator (DeepSeek-V3's promotion of block partials into FP32), so scales are
// applied in float32 and never rounded to bf16. NVFP4's global scales multiply the
// result at the end. Correctness first: no pipelining, no TMA, no wgmma.
#include "quant/qgemm.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <vector>

namespace plait::quant {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kStepK = 16;
constexpr int kThreads = 128;
constexpr int kPerThread = kTileM * kTileN / kThreads;

// The element of operand `op` at (row, k), unscaled (the code's value).
__device__ __forceinline__ float element(const Operand& op, int64_t row, int64_t k) {
  const uint8_t* codes = op.data + row * op.row_bytes;
  if (op.elem == Element::e2m1) return decode_e2m1((codes[k >> 1] >> ((k & 1) * 4)) & 0xFu);
  return op.elem == Element::e5m2 ? decode_e5m2(codes[k]) : decode_e4m3(codes[k]);
}

// Rows [row0, row0 + 64) x k [k0, k0 + 16) of op to bf16 tile[row][k]; zeros outside
// rows < op.rows and k < k_end.
__device__ __forceinline__ void load_tile(const Operand& op, int64_t row0, int64_t k0,
                                          int64_t k_end, __nv_bfloat16* tile) {
  for (int i = threadIdx.x; i < kTileM * kStepK; i += kThreads) {
    const int64_t row = row0 + i / kStepK;
    const int64_t k = k0 + i % kStepK;
    const float v = row < op.rows && k < k_end ? element(op, row, k) : 0.0f;
    tile[i] = __float2bfloat16(v);
  }
}

__global__ void __launch_bounds__(kThreads)
    block_scaled_mm_kernel(Operand a, Operand b, int64_t k_total, float* __restrict__ out,
                           int64_t ldo) {
  using namespace nvcuda;
  __shared__ __align__(32) __nv_bfloat16 a_tile[kTileM * kStepK];
  __shared__ __align__(32) __nv_bfloat16 b_tile[kTileN * kStepK];
  __shared__ __align__(32) float partial[kTileM * kTileN];

  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int warp = threadIdx.x / 32;
  const int warp_m = (warp / 2) * 32;
  const int warp_n = (warp % 2) * 32;
  const int64_t length = block_length(a.fmt);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> sums[2][2];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_frag[2];
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b_frag[2];
  float acc[kPerThread];
  for (int t = 0; t < kPerThread; ++t) acc[t] = 0.0f;

  for (int64_t block_k0 = 0; block_k0 < k_total; block_k0 += length) {
    const int64_t block_end = min(block_k0 + length, k_total);
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(sums[i][j], 0.0f);
    }
    for (int64_t k0 = block_k0; k0 < block_end; k0 += kStepK) {
      load_tile(a, m0, k0, block_end, a_tile);
      load_tile(b, n0, k0, block_end, b_tile);
      __syncthreads();
      // a_tile is [m][k] (row-major A); b_tile is [n][k], i.e. B = b^T [k][n] column-major.
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a_frag[i], a_tile + (warp_m + 16 * i) * kStepK, kStepK);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b_frag[j], b_tile + (warp_n + 16 * j) * kStepK, kStepK);
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) wmma::mma_sync(sums[i][j], a_frag[i], b_frag[j], sums[i][j]);
      }
      __syncthreads();
    }
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(partial + (warp_m + 16 * i) * kTileN + warp_n + 16 * j, sums[i][j],
                                kTileN, wmma::mem_row_major);
      }
    }
    __syncthreads();
    const int64_t kb = block_k0 / length;
    for (int t = 0; t < kPerThread; ++t) {
      const int idx = threadIdx.x + t * kThreads;
      const int64_t row = m0 + idx / kTileN;
      const int64_t col = n0 + idx % kTileN;
      if (row < a.rows && col < b.rows) {
        acc[t] += block_scale(a, row, kb) * block_scale(b, col, kb) * partial[idx];
      }
    }
    __syncthreads();
  }
  const float global = (a.global ? *a.global : 1.0f) * (b.global ? *b.global : 1.0f);
  for (int t = 0; t < kPerThread; ++t) {
    const int idx = threadIdx.x + t * kThreads;
    const int64_t row = m0 + idx / kTileN;
    const int64_t col = n0 + idx % kTileN;
    if (row < a.rows && col < b.rows) out[row * ldo + col] = acc[t] * global;
  }
}

void launch(const Operand& a, const Operand& b, int64_t k, float* out, int64_t ldo,
            cudaStream_t stream) {
  if (a.rows == 0 || b.rows == 0) return;
  const dim3 grid(static_cast<unsigned>((b.rows + kTileN - 1) / kTileN),
                  static_cast<unsigned>((a.rows + kTileM - 1) / kTileM));
  block_scaled_mm_kernel<<<grid, kThreads, 0, stream>>>(a, b, k, out, ldo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const float* global_ptr(const std::optional<at::Tensor>& g, int64_t index = 0) {
  return g.has_value() ? g->const_data_ptr<float>() + index : nullptr;
}

at::Tensor block_scaled_mm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                const at::Tensor& b_scale, c10::string_view a_fmt,
                                c10::string_view b_fmt, const std::optional<at::Tensor>& a_global,
                                const std::optional<at::Tensor>& b_global) {
  const char* op = "block_scaled_mm";
  const GemmShape s = block_scaled_mm_check(op, a, a_scale, b, b_scale, a_fmt, b_fmt, a_global,
                                            b_global, false);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = a.new_zeros({s.m, s.n}, a.options().dtype(at::kFloat));
  launch(make_operand(a, a_scale, s.a_fmt, global_ptr(a_global)),
         make_operand(b, b_scale, s.b_fmt, global_ptr(b_global)), s.k,
         out.mutable_data_ptr<float>(), s.n, c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor block_scaled_grouped_mm_cuda(const at::Tensor& a, const at::Tensor& a_scale,
                                        const at::Tensor& b, const at::Tensor& b_scale,
                                        const at::Tensor& offsets, c10::string_view a_fmt,
                                        c10::string_view b_fmt,
                                        const std::optional<at::Tensor>& a_global,
                                        const std::optional<at::Tensor>& b_global) {
  const char* op = "block_scaled_grouped_mm";
  const GemmShape s = block_scaled_mm_check(op, a, a_scale, b, b_scale, a_fmt, b_fmt, a_global,
                                            b_global, true);
  const int64_t experts = b.size(0);
  // The offsets are read on the host (one sync when they live on the device) to size
  // each expert's launch.
  const std::vector<int64_t> off = grouped_offsets_check(offsets, experts, s.m);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = a.new_zeros({s.m, s.n}, a.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    launch(make_operand(a.narrow(0, off[e], rows), a_scale.narrow(0, off[e], rows), s.a_fmt,
                        global_ptr(a_global)),
           make_operand(b.select(0, e), b_scale.select(0, e), s.b_fmt, global_ptr(b_global, e)),
           s.k, out.mutable_data_ptr<float>() + off[e] * s.n, s.n, stream);
  }
  return out;
}

}  // namespace
}  // namespace plait::quant

TORCH_LIBRARY_IMPL(plait, CUDA, m) {
  m.impl("block_scaled_mm", &plait::quant::block_scaled_mm_cuda);
  m.impl("block_scaled_grouped_mm", &plait::quant::block_scaled_grouped_mm_cuda);
}
