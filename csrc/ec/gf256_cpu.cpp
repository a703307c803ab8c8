// CPU kernel of plait::gf256_mul_add_(dst, src, coef): dst[i] ^= coef * src[i] in
// GF(2^8), in place on dst's memory (no copies; dst may be a view of shared memory).
//
// Paths, picked once per process:
//  - AVX2: split-nibble lookups with vpshufb, 64 bytes per iteration (see gf256.h).
//    The function carries __attribute__((target("avx2"))), so the file builds
//    without -mavx2 and runs anywhere; cpu::features() decides at run time.
//  - scalar: one lookup per byte in the 256-entry product row of coef. Used where
//    AVX2 is missing, or everywhere when PLAIT_GF256_NO_SIMD is set to a value other
//    than "" or "0" (read once, at the first call) so tests can compare the paths.
// coef == 0 returns at once; coef == 1 is a plain XOR.
//
// Large inputs are cut into blocks of kBlockBytes, the unit of work handed to
// at::parallel_for; inputs below kSerialBlocks blocks stay on the calling thread.
// Note: with torch's OpenMP backend, at::parallel_for is inline header code that
// only forks when this file is compiled with -fopenmp; without it, it runs serially.
#include "ec/gf256.h"

#include "cpu/features.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PLAIT_GF256_HAVE_AVX2_PATH 1
#else
#define PLAIT_GF256_HAVE_AVX2_PATH 0
#endif

namespace plait::ec {

uint8_t gf256_mul_add_check(const at::Tensor& dst, const at::Tensor& src, int64_t coef) {
  TORCH_CHECK(dst.scalar_type() == at::kByte, "gf256_mul_add_: dst must be uint8, got ",
              dst.scalar_type(), "; reinterpret the bytes with dst.view(torch.uint8)");
  TORCH_CHECK(src.scalar_type() == at::kByte, "gf256_mul_add_: src must be uint8, got ",
              src.scalar_type(), "; reinterpret the bytes with src.view(torch.uint8)");
  TORCH_CHECK(dst.is_contiguous(),
              "gf256_mul_add_: dst must be contiguous, got strides ", dst.strides(),
              "; it is updated in place, so pass a contiguous tensor (or a contiguous slice of one)");
  TORCH_CHECK(src.is_contiguous(), "gf256_mul_add_: src must be contiguous, got strides ",
              src.strides(), "; pass src.contiguous()");
  TORCH_CHECK(dst.numel() == src.numel(),
              "gf256_mul_add_: dst and src must have the same number of elements, got dst ",
              dst.numel(), " and src ", src.numel(), "; slice them to the same length");
  TORCH_CHECK(dst.device() == src.device(),
              "gf256_mul_add_: dst and src must be on the same device, got dst on ", dst.device(),
              " and src on ", src.device(), "; move src with src.to(dst.device)");
  TORCH_CHECK(coef >= 0 && coef <= 255,
              "gf256_mul_add_: coef must be a GF(2^8) element in [0, 255], got ", coef);
  TORCH_CHECK(at::get_overlap_status(dst, src) != at::MemOverlapStatus::Partial,
              "gf256_mul_add_: dst and src partially overlap in memory; they must be disjoint "
              "or the very same tensor (clone src first)");
  return static_cast<uint8_t>(coef);
}

namespace {

// 64 KiB per block: the unit of parallel work; several per thread on big inputs.
constexpr int64_t kBlockBytes = int64_t{1} << 16;
// Below 4 blocks (256 KiB, ~20 us of work) a fork/join costs more than it saves.
constexpr int64_t kSerialBlocks = 4;

enum class Path { kScalar, kAvx2 };

Path cpu_path() {
  static const Path path = [] {
    const char* env = std::getenv("PLAIT_GF256_NO_SIMD");
    if (env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0) return Path::kScalar;
#if PLAIT_GF256_HAVE_AVX2_PATH
    if (cpu::features().avx2) return Path::kAvx2;
#endif
    return Path::kScalar;
  }();
  return path;
}

void xor_scalar(uint8_t* dst, const uint8_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] ^= src[i];
}

void mul_add_scalar(uint8_t* dst, const uint8_t* src, int64_t n, const Gf256Row& row) {
  for (int64_t i = 0; i < n; ++i) dst[i] ^= row.v[src[i]];
}

#if PLAIT_GF256_HAVE_AVX2_PATH

__attribute__((target("avx2"))) void xor_avx2(uint8_t* dst, const uint8_t* src, int64_t n) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m256i s0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i s1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + i));
    const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + i + 32));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_xor_si256(d0, s0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 32), _mm256_xor_si256(d1, s1));
  }
  for (; i < n; ++i) dst[i] ^= src[i];
}

// c * s for the 32 bytes of s: lo[s & 15] ^ hi[s >> 4], each half one vpshufb.
// vpshufb looks up within each 128-bit lane, hence the tables broadcast to both lanes.
__attribute__((target("avx2"))) inline __m256i mul_avx2(__m256i s, __m256i tlo, __m256i thi,
                                                        __m256i mask) {
  const __m256i lo = _mm256_and_si256(s, mask);
  // There is no byte shift; a 64-bit shift moves the high nibbles down, the mask
  // then drops the bits that crossed from the neighbouring byte.
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi64(s, 4), mask);
  return _mm256_xor_si256(_mm256_shuffle_epi8(tlo, lo), _mm256_shuffle_epi8(thi, hi));
}

__attribute__((target("avx2"))) void mul_add_avx2(uint8_t* dst, const uint8_t* src, int64_t n,
                                                  const Gf256NibbleTables& t) {
  const __m256i tlo =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.lo)));
  const __m256i thi =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.hi)));
  const __m256i mask = _mm256_set1_epi8(0x0f);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m256i s0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i s1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + i));
    const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + i + 32));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_xor_si256(d0, mul_avx2(s0, tlo, thi, mask)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 32),
                        _mm256_xor_si256(d1, mul_avx2(s1, tlo, thi, mask)));
  }
  if (i + 32 <= n) {
    const __m256i s0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_xor_si256(d0, mul_avx2(s0, tlo, thi, mask)));
    i += 32;
  }
  // Tail of fewer than 32 bytes: the same nibble tables, one byte at a time.
  for (; i < n; ++i) dst[i] ^= gf256_mul_nibbles(t, src[i]);
}

#endif  // PLAIT_GF256_HAVE_AVX2_PATH

// dst[0:n] ^= c * src[0:n] on the calling thread; c >= 1. row is only read on the
// scalar path (and only built for it).
void mul_add_block(uint8_t* dst, const uint8_t* src, int64_t n, uint8_t c, Path path,
                   const Gf256NibbleTables& tables, const Gf256Row& row) {
#if PLAIT_GF256_HAVE_AVX2_PATH
  if (path == Path::kAvx2) {
    if (c == 1) {
      xor_avx2(dst, src, n);
    } else {
      mul_add_avx2(dst, src, n, tables);
    }
    return;
  }
#endif
  if (c == 1) {
    xor_scalar(dst, src, n);
  } else {
    mul_add_scalar(dst, src, n, row);
  }
}

void gf256_mul_add_cpu(const at::Tensor& dst, const at::Tensor& src, int64_t coef) {
  const uint8_t c = gf256_mul_add_check(dst, src, coef);
  TORCH_CHECK(dst.device().is_cpu(), "gf256_mul_add_: expected CPU tensors, got dst on ",
              dst.device());
  const int64_t n = dst.numel();
  if (c == 0 || n == 0) return;  // dst ^= 0

  uint8_t* d = dst.mutable_data_ptr<uint8_t>();
  const uint8_t* s = src.const_data_ptr<uint8_t>();
  const Path path = cpu_path();
  const Gf256NibbleTables& tables = kGf256NibbleTables.coef[c];
  Gf256Row row{};
  if (path == Path::kScalar && c != 1) row = gf256_row(tables);

  const int64_t nblocks = (n + kBlockBytes - 1) / kBlockBytes;
  at::parallel_for(0, nblocks, kSerialBlocks, [&](int64_t b0, int64_t b1) {
    const int64_t end = std::min(n, b1 * kBlockBytes);
    for (int64_t off = b0 * kBlockBytes; off < end; off += kBlockBytes) {
      mul_add_block(d + off, s + off, std::min(kBlockBytes, end - off), c, path, tables, row);
    }
  });
}

void gf256_mul_add_inplace_or_view(c10::DispatchKeySet keys, const at::Tensor& dst,
                                   const at::Tensor& src, int64_t coef) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("plait::gf256_mul_add_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, int64_t)>();
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, dst, src, coef);
  }
  dst.unsafeGetTensorImpl()->bump_version();
}

}  // namespace
}  // namespace plait::ec

TORCH_LIBRARY_IMPL(plait, CPU, m) {
  m.impl("gf256_mul_add_", &plait::ec::gf256_mul_add_cpu);
}

// Backend-independent: bump dst's version counter, as every built-in in-place op
// does, so that autograd notices when bytes it saved for backward were overwritten
// through a byte view (x.detach().view(torch.uint8) shares x's counter). This is
// the only autograd-related kernel: the op is defined on uint8 tensors, which never
// require grad, so there is no derivative to register.
TORCH_LIBRARY_IMPL(plait, ADInplaceOrView, m) {
  m.impl("gf256_mul_add_", &plait::ec::gf256_mul_add_inplace_or_view);
}
