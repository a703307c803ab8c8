// CRC-32C by carry-less multiplication folding on zmm (EVEX VPCLMULQDQ): the method of
// crc32c_vpclmul_avx2.cpp with four 16-byte chunks per register, the three-way XOR of a
// fold in one vpternlogq. Built with -mvpclmulqdq -mavx512f -mpclmul -msse4.2
// (CMakeLists.txt); called only on CPUs with them.
//
// Four accumulators hold 256 consecutive bytes; each step moves them 256 bytes on
// (kFold256). At the end each is folded onto the next by 64 bytes (kFold64), the four
// lanes of the last one onto each other by 16 (kFold16), and the 16 bytes left are
// reduced by the crc32 instruction.
#include "checksum/crc32c_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

namespace plait::checksum {
namespace {

constexpr size_t kPrefetchBytes = 4096;

[[gnu::always_inline]] inline __m512i load512(const uint8_t* p) { return _mm512_loadu_si512(p); }

[[gnu::always_inline]] inline __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// In each 128-bit lane: (acc.lo64 * k.lo64) ^ (acc.hi64 * k.hi64) ^ data; 0x96 is the
// truth table of a three-way XOR.
[[gnu::always_inline]] inline __m512i fold(__m512i acc, __m512i k, __m512i data) {
  const __m512i h = _mm512_clmulepi64_epi128(acc, k, 0x00);
  const __m512i l = _mm512_clmulepi64_epi128(acc, k, 0x11);
  return _mm512_ternarylogic_epi64(h, l, data, 0x96);
}

[[gnu::always_inline]] inline __m128i fold(__m128i acc, __m128i k, __m128i data) {
  const __m128i h = _mm_clmulepi64_si128(acc, k, 0x00);
  const __m128i l = _mm_clmulepi64_si128(acc, k, 0x11);
  return _mm_xor_si128(_mm_xor_si128(h, l), data);
}

[[gnu::always_inline]] inline __m512i constants512(FoldConstants k) {
  const auto h = static_cast<long long>(k.h), l = static_cast<long long>(k.l);
  return _mm512_set_epi64(l, h, l, h, l, h, l, h);
}

}  // namespace

uint32_t crc32c_update_vpclmul_avx512(uint32_t state, const uint8_t* p, size_t n) {
  const __m512i k256 = constants512(kFold256);
  const __m512i k64 = constants512(kFold64);
  const __m128i k16 = _mm_set_epi64x(static_cast<long long>(kFold16.l),
                                     static_cast<long long>(kFold16.h));
  __m512i a0 = _mm512_xor_si512(load512(p), _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, state));
  __m512i a1 = load512(p + 64);
  __m512i a2 = load512(p + 128);
  __m512i a3 = load512(p + 192);
  p += 256;
  n -= 256;
  for (; n >= 256; p += 256, n -= 256) {
    for (size_t line = 0; line < 256; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + line), _MM_HINT_T0);
    }
    a0 = fold(a0, k256, load512(p));
    a1 = fold(a1, k256, load512(p + 64));
    a2 = fold(a2, k256, load512(p + 128));
    a3 = fold(a3, k256, load512(p + 192));
  }
  __m512i a = fold(a0, k64, a1);
  a = fold(a, k64, a2);
  a = fold(a, k64, a3);
  for (; n >= 64; p += 64, n -= 64) a = fold(a, k64, load512(p));
  __m128i b = fold(_mm512_castsi512_si128(a), k16, _mm512_extracti32x4_epi32(a, 1));
  b = fold(b, k16, _mm512_extracti32x4_epi32(a, 2));
  b = fold(b, k16, _mm512_extracti32x4_epi32(a, 3));
  for (; n >= 16; p += 16, n -= 16) b = fold(b, k16, load128(p));
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
