// CPU kernel of plait::gf256_matmul_(outs, ins, coefs): outs[i] = XOR_j coefs[i, j] *
// ins[j] in GF(2^8), written in place into each output's memory (no copies; outputs may
// be views of shared memory).
//
// The product is fused: for each 32- or 64-byte position the kernel loads every input
// once, splits its bytes into nibbles, and adds c * x (two vpshufb lookups, see gf256.h)
// into one register accumulator per output; after the last input it stores each
// accumulator once. Memory traffic is thus the k inputs read once and the m outputs
// written once, the least any encoder can do (k * m separate multiply-adds would read
// and write every output k times). What remains is the arithmetic, two vpshufb and two
// XORs per output and 32 input bytes, as in ISA-L's AVX2 kernels; on the 2-core EPYC
// machines here the two run at the same speed (bench/ec.py measures both).
//
// Paths, picked once per process (as in gf256_cpu.cpp):
//  - AVX2 (__attribute__((target("avx2"))), chosen at run time by __builtin_cpu_supports).
//    Templated on the number of outputs so the accumulators are registers: with at most
//    4 outputs each step covers 64 bytes (two accumulators per output, each table load
//    used twice); with 5 to 8 outputs, 32 bytes (8 accumulators, 2 tables, the nibbles,
//    the mask and a temporary fill 14 of the 16 ymm registers).
//  - scalar: one lookup per byte in the 256-entry product row of each coefficient; where
//    AVX2 is missing, or everywhere when PLAIT_GF256_NO_SIMD is set (not "" or "0").
//
// Work is cut into blocks of the same byte range of every shard, sized so that a block's
// inputs and outputs fit in L2 (kBlockTouchBytes), and blocks are split over threads
// with at::parallel_for; calls touching less than kSerialTouchBytes stay serial.
#include "ec/gf256.h"
#include "ec/gf256_matmul.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PLAIT_GF256_HAVE_AVX2_PATH 1
#else
#define PLAIT_GF256_HAVE_AVX2_PATH 0
#endif

namespace plait::ec {

namespace {

void check_shard(const at::Tensor& t, const char* list, size_t index, const at::Tensor& first) {
  TORCH_CHECK(t.scalar_type() == at::kByte, "gf256_matmul_: ", list, "[", index,
              "] must be uint8, got ", t.scalar_type(), "; reinterpret the bytes with ", list,
              "[", index, "].view(torch.uint8)");
  TORCH_CHECK(t.is_contiguous(), "gf256_matmul_: ", list, "[", index,
              "] must be contiguous, got strides ", t.strides(),
              "; pass a contiguous tensor (or a contiguous slice of one)");
  TORCH_CHECK(t.numel() == first.numel(), "gf256_matmul_: ", list, "[", index, "] has ",
              t.numel(), " bytes but ins[0] has ", first.numel(),
              "; every shard of a stripe must have the same length (pad the last one)");
  TORCH_CHECK(t.device() == first.device(), "gf256_matmul_: ", list, "[", index, "] is on ",
              t.device(), " but ins[0] is on ", first.device(),
              "; all shards must be on one device (move them with .to(ins[0].device))");
}

// [begin, end) of the bytes a tensor's elements occupy; empty tensors occupy none.
struct ByteRange {
  uintptr_t begin, end;
};

ByteRange byte_range(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>(t.numel())};
}

bool intersects(ByteRange a, ByteRange b) {
  return a.begin < a.end && b.begin < b.end && a.begin < b.end && b.begin < a.end;
}

}  // namespace

void gf256_matmul_check(at::TensorList outs, at::TensorList ins, const at::Tensor& coefs) {
  TORCH_CHECK(!ins.empty() && static_cast<int64_t>(ins.size()) <= kMatmulMaxIns,
              "gf256_matmul_: ins must hold 1 to ", kMatmulMaxIns,
              " tensors (the k <= 32 data shards of a stripe), got ", ins.size(),
              "; use a code with at most 32 data shards");
  TORCH_CHECK(!outs.empty() && static_cast<int64_t>(outs.size()) <= kMatmulMaxOuts,
              "gf256_matmul_: outs must hold 1 to ", kMatmulMaxOuts, " tensors, got ",
              outs.size(), "; compute more outputs in several calls of at most ",
              kMatmulMaxOuts, " (one per group of rows of coefs)");
  const at::Tensor& first = ins[0];
  for (size_t j = 0; j < ins.size(); ++j) check_shard(ins[j], "ins", j, first);
  for (size_t i = 0; i < outs.size(); ++i) check_shard(outs[i], "outs", i, first);

  TORCH_CHECK(coefs.scalar_type() == at::kByte, "gf256_matmul_: coefs must be uint8, got ",
              coefs.scalar_type(), "; build it with torch.tensor(rows, dtype=torch.uint8)");
  TORCH_CHECK(coefs.device().is_cpu(), "gf256_matmul_: coefs must be a CPU tensor, got one on ",
              coefs.device(), "; the coefficients are read on the host, pass coefs.cpu()");
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == static_cast<int64_t>(outs.size()) &&
                  coefs.size(1) == static_cast<int64_t>(ins.size()),
              "gf256_matmul_: coefs must have shape [len(outs), len(ins)] = [", outs.size(), ", ",
              ins.size(), "], got ", coefs.sizes(), "; row i holds the coefficients of outs[i]");

  // Outputs are overwritten while inputs are still being read, and two outputs sharing
  // bytes would race; compare raw address ranges, which also catches tensors of different
  // storages mapping the same memory.
  if (first.numel() == 0 || first.device().is_meta()) return;
  for (size_t i = 0; i < outs.size(); ++i) {
    const ByteRange o = byte_range(outs[i]);
    for (size_t j = 0; j < ins.size(); ++j) {
      TORCH_CHECK(!intersects(o, byte_range(ins[j])), "gf256_matmul_: outs[", i,
                  "] overlaps ins[", j, "] in memory; outputs are overwritten, so they must be "
                  "disjoint from every input (write into separate buffers)");
    }
    for (size_t p = 0; p < i; ++p) {
      TORCH_CHECK(!intersects(o, byte_range(outs[p])), "gf256_matmul_: outs[", i,
                  "] overlaps outs[", p, "] in memory; every output needs its own bytes");
    }
  }
}

namespace {

// Target bytes of all shards touched by one block: half of a 512 KiB L2, so that the
// block's inputs and outputs stay cached while the prefetchers run ahead on the next.
constexpr int64_t kBlockTouchBytes = int64_t{256} << 10;
// Per-shard block length bounds (multiples of 64, the widest step).
constexpr int64_t kMinBlockBytes = int64_t{4} << 10;
constexpr int64_t kMaxBlockBytes = int64_t{64} << 10;
// Below this many bytes touched in all (~40 us of work) a fork/join costs more than it saves.
constexpr int64_t kSerialTouchBytes = int64_t{1} << 20;

enum class Path { kScalar, kAvx2 };

Path cpu_path() {
  static const Path path = [] {
    const char* env = std::getenv("PLAIT_GF256_NO_SIMD");
    if (env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0) return Path::kScalar;
#if PLAIT_GF256_HAVE_AVX2_PATH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) return Path::kAvx2;
#endif
    return Path::kScalar;
  }();
  return path;
}

// The nibble tables of one coefficient, each 16-byte table repeated in both 128-bit
// halves because vpshufb looks up within each lane. Aligned for single aligned loads.
struct alignas(32) LaneTables {
  uint8_t lo[32];
  uint8_t hi[32];
};

// Everything a block needs, prepared once per call. tables[j * m + i] belongs to
// coefs[i, j]: the inner loop walks the outputs of one input, so tables are read in order.
struct MatmulPlan {
  int k = 0;
  int m = 0;
  std::array<const uint8_t*, kMatmulMaxIns> ins{};
  std::array<uint8_t*, kMatmulMaxOuts> outs{};
  std::array<uint8_t, kMatmulMaxIns * kMatmulMaxOuts> coefs{};  // [j * m + i]
};

// ---------------------------------------------------------------------------- scalar

// Block [begin, end) of every shard, one table lookup per input byte and output. Each
// output is built in place: the first input assigns, the rest accumulate; the block is
// small enough to stay in cache across the k passes.
void matmul_block_scalar(const MatmulPlan& plan, const Gf256Row* rows, int64_t begin, int64_t end) {
  const int64_t n = end - begin;
  for (int i = 0; i < plan.m; ++i) {
    uint8_t* out = plan.outs[i] + begin;
    for (int j = 0; j < plan.k; ++j) {
      const uint8_t* in = plan.ins[j] + begin;
      const uint8_t* row = rows[j * plan.m + i].v;
      if (j == 0) {
        for (int64_t p = 0; p < n; ++p) out[p] = row[in[p]];
      } else {
        for (int64_t p = 0; p < n; ++p) out[p] ^= row[in[p]];
      }
    }
  }
}

// ------------------------------------------------------------------------------ AVX2

#if PLAIT_GF256_HAVE_AVX2_PATH

__attribute__((target("avx2"))) inline __m256i load32(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

__attribute__((target("avx2"))) inline void store32(uint8_t* p, __m256i v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}

// Bytes [p, p + 32 * kVecs) of every output, kVecs = 1 or 2 ymm words per output. Per
// input and 32 bytes: one load, the nibble split (shift, two ANDs); per output: two
// table loads, two vpshufb, two XORs. Inlined into the block loop so that the mask and
// the pointers stay in registers across steps.
template <int M, int kVecs>
__attribute__((target("avx2"), always_inline)) inline void matmul_step_avx2(
    const MatmulPlan& plan, const LaneTables* tables, int64_t p) {
  const __m256i mask = _mm256_set1_epi8(0x0f);
  __m256i acc[kVecs][M];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[v][i] = _mm256_setzero_si256();
  }
  const int k = plan.k;
  for (int j = 0; j < k; ++j) {
    const uint8_t* in = plan.ins[j] + p;
    __m256i lo[kVecs], hi[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      const __m256i s = load32(in + 32 * v);
      lo[v] = _mm256_and_si256(s, mask);
      // No byte shift exists: shift 64-bit lanes, then drop the bits from the next byte.
      hi[v] = _mm256_and_si256(_mm256_srli_epi64(s, 4), mask);
    }
    const LaneTables* t = tables + j * M;
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      __m256i tlo = _mm256_load_si256(reinterpret_cast<const __m256i*>(t[i].lo));
      __m256i thi = _mm256_load_si256(reinterpret_cast<const __m256i*>(t[i].hi));
      // Pin the tables in registers: under register pressure the compiler would rather
      // load them again for each use, and loads share the ports with the data's.
      __asm__("" : "+x"(tlo), "+x"(thi));
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        // One product at a time into the accumulator: one temporary register, not two.
        acc[v][i] = _mm256_xor_si256(acc[v][i], _mm256_shuffle_epi8(tlo, lo[v]));
        acc[v][i] = _mm256_xor_si256(acc[v][i], _mm256_shuffle_epi8(thi, hi[v]));
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) store32(plan.outs[i] + p + 32 * v, acc[v][i]);
  }
}

template <int M>
__attribute__((target("avx2"))) void matmul_block_avx2(const MatmulPlan& plan,
                                                       const LaneTables* tables, int64_t begin,
                                                       int64_t end) {
  int64_t p = begin;
  // 64 bytes per step where the registers allow (2M accumulators, 4 nibble vectors, the
  // mask, 2 tables: 15 of 16 at M = 4); measured here, a 128-byte step at M <= 2 was
  // slower (the compiler spills), and so were non-temporal stores and software
  // prefetch on 64 MiB stripes (neither is used).
  if constexpr (M <= 4) {
    for (; p + 64 <= end; p += 64) matmul_step_avx2<M, 2>(plan, tables, p);
  }
  for (; p + 32 <= end; p += 32) matmul_step_avx2<M, 1>(plan, tables, p);
  // Tail of fewer than 32 bytes (only in the last block): byte by byte, from the
  // 16-byte halves of the same tables.
  for (; p < end; ++p) {
    for (int i = 0; i < M; ++i) {
      uint8_t v = 0;
      for (int j = 0; j < plan.k; ++j) {
        const uint8_t x = plan.ins[j][p];
        const LaneTables& t = tables[j * M + i];
        v ^= static_cast<uint8_t>(t.lo[x & 0x0f] ^ t.hi[x >> 4]);
      }
      plan.outs[i][p] = v;
    }
  }
}

using Avx2Block = void (*)(const MatmulPlan&, const LaneTables*, int64_t, int64_t);

Avx2Block avx2_block_for(int m) {
  static constexpr Avx2Block kBlocks[kMatmulMaxOuts] = {
      matmul_block_avx2<1>, matmul_block_avx2<2>, matmul_block_avx2<3>, matmul_block_avx2<4>,
      matmul_block_avx2<5>, matmul_block_avx2<6>, matmul_block_avx2<7>, matmul_block_avx2<8>};
  return kBlocks[m - 1];
}

#endif  // PLAIT_GF256_HAVE_AVX2_PATH

// Per-shard block length: (k + m) * block ~ kBlockTouchBytes, a multiple of 64 within
// [kMinBlockBytes, kMaxBlockBytes].
int64_t block_bytes(int k, int m) {
  const int64_t b = kBlockTouchBytes / (k + m);
  return std::clamp<int64_t>(b & ~int64_t{63}, kMinBlockBytes, kMaxBlockBytes);
}

template <typename BlockFn>
void for_each_block(int64_t n, int k, int m, const BlockFn& fn) {
  const int64_t block = block_bytes(k, m);
  const int64_t nblocks = (n + block - 1) / block;
  // at::parallel_for runs serially when the range is below the grain.
  const int64_t grain = std::max<int64_t>(1, kSerialTouchBytes / (block * (k + m)));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b * block, std::min(n, (b + 1) * block));
  });
}

void gf256_matmul_cpu(at::TensorList outs, at::TensorList ins, const at::Tensor& coefs) {
  gf256_matmul_check(outs, ins, coefs);
  TORCH_CHECK(ins[0].device().is_cpu(), "gf256_matmul_: expected CPU tensors, got ins[0] on ",
              ins[0].device());
  const int64_t n = ins[0].numel();
  if (n == 0) return;

  MatmulPlan plan;
  plan.k = static_cast<int>(ins.size());
  plan.m = static_cast<int>(outs.size());
  for (int j = 0; j < plan.k; ++j) plan.ins[j] = ins[j].const_data_ptr<uint8_t>();
  for (int i = 0; i < plan.m; ++i) plan.outs[i] = outs[i].mutable_data_ptr<uint8_t>();
  const auto c = coefs.accessor<uint8_t, 2>();
  for (int i = 0; i < plan.m; ++i) {
    for (int j = 0; j < plan.k; ++j) plan.coefs[j * plan.m + i] = c[i][j];
  }

#if PLAIT_GF256_HAVE_AVX2_PATH
  if (cpu_path() == Path::kAvx2) {
    // 64 bytes per coefficient, 16 KiB at most: prepared once, read by every thread.
    std::array<LaneTables, kMatmulMaxIns * kMatmulMaxOuts> tables;
    for (int e = 0; e < plan.k * plan.m; ++e) {
      const Gf256NibbleTables& t = kGf256NibbleTables.coef[plan.coefs[e]];
      std::memcpy(tables[e].lo, t.lo, 16);
      std::memcpy(tables[e].lo + 16, t.lo, 16);
      std::memcpy(tables[e].hi, t.hi, 16);
      std::memcpy(tables[e].hi + 16, t.hi, 16);
    }
    const Avx2Block block_fn = avx2_block_for(plan.m);
    for_each_block(n, plan.k, plan.m, [&](int64_t begin, int64_t end) {
      block_fn(plan, tables.data(), begin, end);
    });
    return;
  }
#endif
  // 256 bytes per coefficient, 64 KiB at most, built only on this (fallback) path.
  std::vector<Gf256Row> rows(static_cast<size_t>(plan.k * plan.m));
  for (int e = 0; e < plan.k * plan.m; ++e) {
    rows[e] = gf256_row(kGf256NibbleTables.coef[plan.coefs[e]]);
  }
  for_each_block(n, plan.k, plan.m, [&](int64_t begin, int64_t end) {
    matmul_block_scalar(plan, rows.data(), begin, end);
  });
}

void gf256_matmul_inplace_or_view(c10::DispatchKeySet keys, at::TensorList outs,
                                  at::TensorList ins, const at::Tensor& coefs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("plait::gf256_matmul_", "")
                             .typed<void(at::TensorList, at::TensorList, const at::Tensor&)>();
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, outs, ins, coefs);
  }
  for (const at::Tensor& out : outs) out.unsafeGetTensorImpl()->bump_version();
}

}  // namespace
}  // namespace plait::ec

TORCH_LIBRARY_IMPL(plait, CPU, m) {
  m.impl("gf256_matmul_", &plait::ec::gf256_matmul_cpu);
}

// As for gf256_mul_add_: bump every output's version counter, as built-in in-place ops
// do, so that autograd notices bytes it saved being overwritten through a byte view.
TORCH_LIBRARY_IMPL(plait, ADInplaceOrView, m) {
  m.impl("gf256_matmul_", &plait::ec::gf256_matmul_inplace_or_view);
}
