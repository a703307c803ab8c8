// CUDA kernel of plait::gf256_mul_add_(dst, src, coef): dst[i] ^= coef * src[i] in
// GF(2^8), in place, on the current stream of dst's device.
//
// The host builds the 256-entry product row of coef from the nibble tables of
// gf256.h and passes it by value; each block copies it into shared memory (256
// bytes) and looks up one byte per data byte. Threads move 16 bytes at a time
// (uint4) through a grid-stride loop when dst and src are equally aligned modulo 16;
// the unaligned head and the tail, or everything when the two alignments differ,
// go byte by byte. coef == 0 launches nothing, coef == 1 is a plain XOR.
//
// Headers stay at the c10/ATen-core level: ATen/cuda/CUDAContext.h would pull in
// cuBLAS/cuSPARSE headers that a bare CUDA toolkit may lack.
#include "ec/gf256.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace plait::ec {
namespace {

constexpr int kThreads = 256;
// Resident blocks per SM the grid asks for; the grid-stride loop covers the rest.
constexpr int kBlocksPerSm = 8;

// c * each of the four bytes of w.
__device__ __forceinline__ uint32_t mul_word(const uint8_t* table, uint32_t w) {
  return static_cast<uint32_t>(table[w & 0xffu]) |
         static_cast<uint32_t>(table[(w >> 8) & 0xffu]) << 8 |
         static_cast<uint32_t>(table[(w >> 16) & 0xffu]) << 16 |
         static_cast<uint32_t>(table[w >> 24]) << 24;
}

// Bytes [0, head) and [head + 16 * nvec, n) are done one at a time, the nvec uint4
// words from dst + head (16-byte aligned, and src + head too) sixteen at a time.
// dst and src may be the very same memory, hence no __restrict__.
template <bool kXorOnly>
__global__ void __launch_bounds__(kThreads)
    gf256_mul_add_kernel(uint8_t* dst, const uint8_t* src, int64_t n, int64_t head, int64_t nvec,
                         Gf256Row row) {
  __shared__ uint8_t table[256];
  if constexpr (!kXorOnly) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = row.v[i];
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  const uint4* s4 = reinterpret_cast<const uint4*>(src + head);
  uint4* d4 = reinterpret_cast<uint4*>(dst + head);
  for (int64_t i = first; i < nvec; i += stride) {
    const uint4 s = s4[i];
    uint4 d = d4[i];
    if constexpr (kXorOnly) {
      d.x ^= s.x;
      d.y ^= s.y;
      d.z ^= s.z;
      d.w ^= s.w;
    } else {
      d.x ^= mul_word(table, s.x);
      d.y ^= mul_word(table, s.y);
      d.z ^= mul_word(table, s.z);
      d.w ^= mul_word(table, s.w);
    }
    d4[i] = d;
  }

  const int64_t tail_start = head + 16 * nvec;
  const int64_t scalar_count = head + (n - tail_start);
  for (int64_t j = first; j < scalar_count; j += stride) {
    const int64_t k = j < head ? j : tail_start + (j - head);
    if constexpr (kXorOnly) {
      dst[k] ^= src[k];
    } else {
      dst[k] ^= table[src[k]];
    }
  }
}

void gf256_mul_add_cuda(const at::Tensor& dst, const at::Tensor& src, int64_t coef) {
  const uint8_t c = gf256_mul_add_check(dst, src, coef);
  TORCH_CHECK(dst.is_cuda(), "gf256_mul_add_: expected CUDA tensors, got dst on ", dst.device());
  const int64_t n = dst.numel();
  if (c == 0 || n == 0) return;  // dst ^= 0

  const c10::cuda::CUDAGuard guard(dst.device());
  uint8_t* d = dst.mutable_data_ptr<uint8_t>();
  const uint8_t* s = src.const_data_ptr<uint8_t>();

  const auto dmis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(d) & 15u);
  const auto smis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(s) & 15u);
  int64_t head = n;  // different alignments: all bytes one at a time
  int64_t nvec = 0;
  if (dmis == smis) {
    head = std::min<int64_t>(n, (16 - dmis) & 15);
    nvec = (n - head) / 16;
  }
  const int64_t scalar_count = n - 16 * nvec;
  const int64_t work = std::max(nvec, scalar_count);

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dst.device().index()));
  const int64_t max_blocks = static_cast<int64_t>(std::max(sms, 1)) * kBlocksPerSm;
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dst.device().index()).stream();
  Gf256Row row{};
  if (c == 1) {
    gf256_mul_add_kernel<true><<<blocks, kThreads, 0, stream>>>(d, s, n, head, nvec, row);
  } else {
    row = gf256_row(kGf256NibbleTables.coef[c]);
    gf256_mul_add_kernel<false><<<blocks, kThreads, 0, stream>>>(d, s, n, head, nvec, row);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace plait::ec

TORCH_LIBRARY_IMPL(plait, CUDA, m) {
  m.impl("gf256_mul_add_", &plait::ec::gf256_mul_add_cuda);
}
