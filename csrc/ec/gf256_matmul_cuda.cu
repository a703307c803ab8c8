// CUDA kernel of plait::gf256_matmul_(outs, ins, coefs): outs[i] = XOR_j coefs[i, j] *
// ins[j] in GF(2^8), in place, on the current stream of the shards' device. Same
// arguments, checks and result as the CPU kernel (gf256_matmul_cpu.cpp).
//
// Each thread owns 16 bytes (one uint4) of every shard per grid-stride step: it loads
// the 16 bytes of each input in turn and adds their products into accumulators kept
// in registers, then stores each output once, so every byte crosses DRAM once.
//
// The products come from nibble tables in shared memory, laid out so that one 32-bit
// lookup serves four outputs: word tab[j][g][h][v] holds, in its byte b, the product
// coefs[4g + b, j] * (h ? v << 4 : v). An input byte x thus costs two lookups (low
// and high nibble) per group of four outputs, whatever the number of outputs in the
// group. The accumulators stay in that output-interleaved layout (one word per byte
// position and group, byte b belonging to output 4g + b) and are transposed into
// per-output words with byte permutes only at the store. For one (j, g, h) the 16
// words are consecutive, so a warp's lookups hit 16 distinct banks: no conflicts.
//
// The host passes the shard pointers and the raw coefficients by value (under 600
// bytes of kernel parameters); each block builds its tables (at most 8 KiB) once and
// then sweeps the data. uint4 accesses need every shard at the same address modulo 16;
// the bytes before the first 16-byte boundary and after the last whole vector, or all
// bytes when the shards' alignments differ, take a byte-at-a-time loop.
//
// Headers stay at the c10/ATen-core level, as in gf256_cuda.cu.
#include "ec/gf256.h"
#include "ec/gf256_matmul.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace plait::ec {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;
constexpr int kMaxIns = static_cast<int>(kMatmulMaxIns);
constexpr int kMaxOuts = static_cast<int>(kMatmulMaxOuts);
constexpr int kMaxGroups = (kMaxOuts + 3) / 4;

struct MatmulArgs {
  const uint8_t* ins[kMaxIns];
  uint8_t* outs[kMaxOuts];
  uint8_t coefs[kMaxOuts][kMaxIns];
  int k;
  int64_t n;     // bytes per shard
  int64_t head;  // bytes before the vector part (n when there is none)
  int64_t nvec;  // uint4 words in the vector part
};

// Shared-memory table index of (input j, group g, half h, nibble v).
template <int G>
__device__ __forceinline__ int table_index(int j, int g, int h, int v) {
  return ((j * G + g) * 2 + h) * 16 + v;
}

// The words a thread accumulates for one input byte x: both nibbles' lookups, per group.
template <int G>
__device__ __forceinline__ void add_byte(uint32_t (&acc)[G], const uint32_t* tab, int j,
                                         uint32_t x) {
#pragma unroll
  for (int g = 0; g < G; ++g) {
    acc[g] ^= tab[table_index<G>(j, g, 0, x & 0x0fu)] ^ tab[table_index<G>(j, g, 1, x >> 4)];
  }
}

// Bytes of four interleaved words w0..w3 (byte b of word p = output b at position p)
// regrouped per output: result[b] holds output b's bytes at positions 0..3.
__device__ __forceinline__ void transpose4(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3,
                                           uint32_t (&out)[4]) {
  // __byte_perm(x, y, s): byte i of the result is byte (s >> 4i) & 7 of y:x.
  const uint32_t t0 = __byte_perm(w0, w1, 0x5140);  // w0.0 w1.0 w0.1 w1.1
  const uint32_t t1 = __byte_perm(w0, w1, 0x7362);  // w0.2 w1.2 w0.3 w1.3
  const uint32_t t2 = __byte_perm(w2, w3, 0x5140);  // w2.0 w3.0 w2.1 w3.1
  const uint32_t t3 = __byte_perm(w2, w3, 0x7362);  // w2.2 w3.2 w2.3 w3.3
  out[0] = __byte_perm(t0, t2, 0x5410);             // w0.0 w1.0 w2.0 w3.0
  out[1] = __byte_perm(t0, t2, 0x7632);             // w0.1 w1.1 w2.1 w3.1
  out[2] = __byte_perm(t1, t3, 0x5410);
  out[3] = __byte_perm(t1, t3, 0x7632);
}

template <int M>
__global__ void __launch_bounds__(kThreads) gf256_matmul_kernel(const __grid_constant__ MatmulArgs args) {
  constexpr int G = (M + 3) / 4;
  __shared__ uint32_t tab[kMaxIns * G * 32];
  const int k = args.k;
  for (int e = threadIdx.x; e < k * G * 32; e += blockDim.x) {
    const int v = e & 15;
    const int h = (e >> 4) & 1;
    const int g = (e >> 5) % G;
    const int j = e / (32 * G);
    const auto x = static_cast<uint8_t>(h ? v << 4 : v);
    uint32_t word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int i = 4 * g + b;
      if (i < M) word |= static_cast<uint32_t>(gf256_mul(args.coefs[i][j], x)) << (8 * b);
    }
    tab[e] = word;
  }
  __syncthreads();

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  // Vector part: 16 bytes of every shard per step.
  for (int64_t idx = first; idx < args.nvec; idx += stride) {
    const int64_t off = args.head + 16 * idx;
    uint32_t acc[16][G];
#pragma unroll
    for (int p = 0; p < 16; ++p) {
#pragma unroll
      for (int g = 0; g < G; ++g) acc[p][g] = 0;
    }
    for (int j = 0; j < k; ++j) {
      const uint4 s = __ldg(reinterpret_cast<const uint4*>(args.ins[j] + off));
      const uint32_t words[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int b = 0; b < 4; ++b) add_byte<G>(acc[4 * w + b], tab, j, (words[w] >> (8 * b)) & 0xffu);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      // per_out[w][b]: output 4g + b's bytes 4w..4w+3.
      uint32_t per_out[4][4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        transpose4(acc[4 * w][g], acc[4 * w + 1][g], acc[4 * w + 2][g], acc[4 * w + 3][g], per_out[w]);
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int i = 4 * g + b;
        if (i < M) {
          *reinterpret_cast<uint4*>(args.outs[i] + off) =
              make_uint4(per_out[0][b], per_out[1][b], per_out[2][b], per_out[3][b]);
        }
      }
    }
  }

  // Bytes outside the vector part: [0, head) and [head + 16 * nvec, n), one at a time.
  const int64_t tail_start = args.head + 16 * args.nvec;
  const int64_t scalar_count = args.head + (args.n - tail_start);
  for (int64_t q = first; q < scalar_count; q += stride) {
    const int64_t pos = q < args.head ? q : tail_start + (q - args.head);
    uint32_t acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g] = 0;
    for (int j = 0; j < k; ++j) add_byte<G>(acc, tab, j, args.ins[j][pos]);
#pragma unroll
    for (int i = 0; i < M; ++i) args.outs[i][pos] = static_cast<uint8_t>(acc[i / 4] >> (8 * (i % 4)));
  }
}

template <int M>
void launch(const MatmulArgs& args, unsigned blocks, cudaStream_t stream) {
  gf256_matmul_kernel<M><<<blocks, kThreads, 0, stream>>>(args);
}

void gf256_matmul_cuda(at::TensorList outs, at::TensorList ins, const at::Tensor& coefs,
                       std::optional<c10::string_view> kernel) {
  gf256_matmul_check(outs, ins, coefs);
  TORCH_CHECK(ins[0].is_cuda(), "gf256_matmul_: expected CUDA tensors, got ins[0] on ",
              ins[0].device());
  TORCH_CHECK(!kernel.has_value(), "gf256_matmul_: kernel='", *kernel,
              "' names a CPU kernel, but the shards are on ", ins[0].device(),
              ", which has one kernel; pass kernel=None");
  const int64_t n = ins[0].numel();
  if (n == 0) return;

  const c10::cuda::CUDAGuard guard(ins[0].device());
  MatmulArgs args{};
  args.k = static_cast<int>(ins.size());
  const int m = static_cast<int>(outs.size());
  args.n = n;
  uintptr_t misalign = reinterpret_cast<uintptr_t>(ins[0].const_data_ptr()) & 15u;
  bool same_alignment = true;
  for (int j = 0; j < args.k; ++j) {
    args.ins[j] = ins[j].const_data_ptr<uint8_t>();
    same_alignment &= (reinterpret_cast<uintptr_t>(args.ins[j]) & 15u) == misalign;
  }
  for (int i = 0; i < m; ++i) {
    args.outs[i] = outs[i].mutable_data_ptr<uint8_t>();
    same_alignment &= (reinterpret_cast<uintptr_t>(args.outs[i]) & 15u) == misalign;
  }
  const auto c = coefs.accessor<uint8_t, 2>();
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < args.k; ++j) args.coefs[i][j] = c[i][j];
  }
  args.head = n;  // different alignments: every byte one at a time
  args.nvec = 0;
  if (same_alignment) {
    args.head = std::min<int64_t>(n, static_cast<int64_t>((16 - misalign) & 15u));
    args.nvec = (n - args.head) / 16;
  }
  const int64_t scalar_count = n - 16 * args.nvec;
  const int64_t work = std::max(args.nvec, scalar_count);

  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ins[0].device().index()));
  const int64_t max_blocks = static_cast<int64_t>(std::max(sms, 1)) * kBlocksPerSm;
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ins[0].device().index()).stream();
  switch (m) {
    case 1: launch<1>(args, blocks, stream); break;
    case 2: launch<2>(args, blocks, stream); break;
    case 3: launch<3>(args, blocks, stream); break;
    case 4: launch<4>(args, blocks, stream); break;
    case 5: launch<5>(args, blocks, stream); break;
    case 6: launch<6>(args, blocks, stream); break;
    case 7: launch<7>(args, blocks, stream); break;
    default: launch<8>(args, blocks, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace plait::ec

TORCH_LIBRARY_IMPL(plait, CUDA, m) {
  m.impl("gf256_matmul_", &plait::ec::gf256_matmul_cuda);
}
