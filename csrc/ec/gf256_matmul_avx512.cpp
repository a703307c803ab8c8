// gf256_matmul_'s AVX-512 kernel: the split-nibble lookups of the AVX2 one on zmm
// (vpshufb on zmm is AVX-512 BW), the two products summed into the accumulator by one
// vpternlogq. Built with -mavx512f -mavx512bw (CMakeLists.txt); called only on CPUs
// with both.
#include "ec/gf256_kernels.h"

#if defined(__x86_64__)
#include "ec/gf256_kernel_loops.h"

#include <immintrin.h>

namespace plait::ec {
namespace {

struct Zmm {
  using Reg = __m512i;
  static constexpr int kBytes = 64;
  // 128 bytes per step: 2m accumulators, 4 nibble vectors, the mask and 2 tables take at
  // most 23 of the 32 zmm registers.
  static constexpr int vecs(int) { return 2; }

  [[gnu::always_inline]] static Reg load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  [[gnu::always_inline]] static void store(uint8_t* p, Reg v) { _mm512_storeu_si512(p, v); }
  [[gnu::always_inline]] static Reg zero() { return _mm512_setzero_si512(); }
  [[gnu::always_inline]] static Reg nibble_mask() { return _mm512_set1_epi8(0x0f); }
  [[gnu::always_inline]] static Reg low_nibbles(Reg x, Reg mask) { return _mm512_and_si512(x, mask); }
  [[gnu::always_inline]] static Reg high_nibbles(Reg x, Reg mask) {
    return _mm512_and_si512(_mm512_srli_epi64(x, 4), mask);
  }
  [[gnu::always_inline]] static Reg table(const uint8_t* p) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // "v": any of the 32 EVEX-encodable vector registers ("x" would allow only 16).
  [[gnu::always_inline]] static void pin(Reg& r) { __asm__("" : "+v"(r)); }
  [[gnu::always_inline]] static Reg shuffle(Reg table, Reg index) {
    return _mm512_shuffle_epi8(table, index);
  }
  // acc ^ a ^ b: truth table 0x96 (bit (acc << 2 | a << 1 | b) set where the XOR is 1).
  [[gnu::always_inline]] static Reg xor3(Reg acc, Reg a, Reg b) {
    return _mm512_ternarylogic_epi64(acc, a, b, 0x96);
  }
};

}  // namespace

MatmulBlockFn matmul_block_avx512(int m) { return loops::nibble_block_for<Zmm>(m); }

}  // namespace plait::ec
#endif  // __x86_64__
