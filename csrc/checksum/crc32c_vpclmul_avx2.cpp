// CRC-32C by carry-less multiplication folding on ymm (VEX VPCLMULQDQ): the PCLMULQDQ
// method of crc32c_cpu.cpp with two 16-byte chunks per register. Built with
// -mvpclmulqdq -mavx2 -mpclmul -msse4.2 (CMakeLists.txt); called only on CPUs with them.
//
// Four accumulators hold 128 consecutive bytes, lane 0 of each the earlier 16; each step
// moves them 128 bytes on (kFold128) and adds the next 128 bytes. At the end each is
// folded onto the next by 32 bytes (kFold32), the low lane onto the high one by 16
// (kFold16), and the 16 bytes left are reduced by the crc32 instruction.
#include "checksum/crc32c_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

namespace plait::checksum {
namespace {

// Lines prefetched ahead of the loads: 4 KiB, as in crc32c_cpu.cpp's PCLMULQDQ loop.
constexpr size_t kPrefetchBytes = 4096;

[[gnu::always_inline]] inline __m256i load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

[[gnu::always_inline]] inline __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// In each 128-bit lane: (acc.lo64 * k.lo64) ^ (acc.hi64 * k.hi64) ^ data.
[[gnu::always_inline]] inline __m256i fold(__m256i acc, __m256i k, __m256i data) {
  const __m256i h = _mm256_clmulepi64_epi128(acc, k, 0x00);
  const __m256i l = _mm256_clmulepi64_epi128(acc, k, 0x11);
  return _mm256_xor_si256(_mm256_xor_si256(h, l), data);
}

[[gnu::always_inline]] inline __m128i fold(__m128i acc, __m128i k, __m128i data) {
  const __m128i h = _mm_clmulepi64_si128(acc, k, 0x00);
  const __m128i l = _mm_clmulepi64_si128(acc, k, 0x11);
  return _mm_xor_si128(_mm_xor_si128(h, l), data);
}

// (kH, kL) in each 128-bit lane: kH multiplies the low 64 bits of a chunk.
[[gnu::always_inline]] inline __m256i constants256(FoldConstants k) {
  return _mm256_set_epi64x(static_cast<long long>(k.l), static_cast<long long>(k.h),
                           static_cast<long long>(k.l), static_cast<long long>(k.h));
}

}  // namespace

uint32_t crc32c_update_vpclmul_avx2(uint32_t state, const uint8_t* p, size_t n) {
  const __m256i k128 = constants256(kFold128);
  const __m256i k32 = constants256(kFold32);
  const __m128i k16 = _mm_set_epi64x(static_cast<long long>(kFold16.l),
                                     static_cast<long long>(kFold16.h));
  // Running from state s is running from 0 with s XORed into the first 4 bytes.
  __m256i a0 = _mm256_xor_si256(load256(p), _mm256_set_epi64x(0, 0, 0, state));
  __m256i a1 = load256(p + 32);
  __m256i a2 = load256(p + 64);
  __m256i a3 = load256(p + 96);
  p += 128;
  n -= 128;
  for (; n >= 128; p += 128, n -= 128) {
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + 64), _MM_HINT_T0);
    a0 = fold(a0, k128, load256(p));
    a1 = fold(a1, k128, load256(p + 32));
    a2 = fold(a2, k128, load256(p + 64));
    a3 = fold(a3, k128, load256(p + 96));
  }
  __m256i a = fold(a0, k32, a1);
  a = fold(a, k32, a2);
  a = fold(a, k32, a3);
  for (; n >= 32; p += 32, n -= 32) a = fold(a, k32, load256(p));
  __m128i b = fold(_mm256_castsi256_si128(a), k16, _mm256_extracti128_si256(a, 1));
  for (; n >= 16; p += 16, n -= 16) b = fold(b, k16, load128(p));
  // b is congruent to everything so far, read as the last 16 bytes: its CRC from 0 is
  // the state.
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(b)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(b, 1)));
  if (n >= 8) {
    uint64_t w;
    __builtin_memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
    p += 8;
    n -= 8;
  }
  auto s = static_cast<uint32_t>(c);
  for (; n > 0; ++p, --n) s = _mm_crc32_u8(s, *p);
  return s;
}

}  // namespace plait::checksum
#endif  // __x86_64__
