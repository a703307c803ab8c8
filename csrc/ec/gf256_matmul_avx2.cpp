// gf256_matmul_'s AVX2 kernel: split-nibble lookups with vpshufb on ymm (see
// gf256_kernel_loops.h). Built with -mavx2 (CMakeLists.txt); called only on CPUs with AVX2.
#include "ec/gf256_kernels.h"

#if defined(__x86_64__)
#include "ec/gf256_kernel_loops.h"

#include <immintrin.h>

namespace plait::ec {
namespace {

struct Ymm {
  using Reg = __m256i;
  static constexpr int kBytes = 32;
  // 64 bytes per step while the registers allow (2m accumulators, 4 nibble vectors, the
  // mask, 2 tables: 15 of 16 at m = 4); measured here, a 128-byte step at m <= 2 was
  // slower (the compiler spills).
  static constexpr int vecs(int m) { return m <= 4 ? 2 : 1; }

  [[gnu::always_inline]] static Reg load(const uint8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  [[gnu::always_inline]] static void store(uint8_t* p, Reg v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
  [[gnu::always_inline]] static Reg zero() { return _mm256_setzero_si256(); }
  [[gnu::always_inline]] static Reg nibble_mask() { return _mm256_set1_epi8(0x0f); }
  [[gnu::always_inline]] static Reg low_nibbles(Reg x, Reg mask) { return _mm256_and_si256(x, mask); }
  // No byte shift exists: shift 64-bit lanes, then drop the bits from the next byte.
  [[gnu::always_inline]] static Reg high_nibbles(Reg x, Reg mask) {
    return _mm256_and_si256(_mm256_srli_epi64(x, 4), mask);
  }
  [[gnu::always_inline]] static Reg table(const uint8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  [[gnu::always_inline]] static void pin(Reg& r) { __asm__("" : "+x"(r)); }
  [[gnu::always_inline]] static Reg shuffle(Reg table, Reg index) {
    return _mm256_shuffle_epi8(table, index);
  }
  // One product at a time into the accumulator: one temporary register, not two.
  [[gnu::always_inline]] static Reg xor3(Reg acc, Reg a, Reg b) {
    return _mm256_xor_si256(_mm256_xor_si256(acc, a), b);
  }
};

}  // namespace

MatmulBlockFn matmul_block_avx2(int m) { return loops::nibble_block_for<Ymm>(m); }

}  // namespace plait::ec
#endif  // __x86_64__
