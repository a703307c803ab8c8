// gf256_matmul_'s GFNI kernel on zmm: the loop of gf256_matmul_gfni_avx2.cpp, 64 bytes
// per vector. The EVEX form of vgf2p8affineqb on zmm needs GFNI and AVX-512 F; built
// with -mgfni -mavx512f -mavx512bw (CMakeLists.txt) and called only on CPUs with those.
#include "ec/gf256_kernels.h"

#if defined(__x86_64__)
#include "ec/gf256_kernel_loops.h"

#include <immintrin.h>

namespace plait::ec {
namespace {

struct GfniZmm {
  using Reg = __m512i;
  static constexpr int kBytes = 64;
  // 256 bytes per step up to m = 5 (4m accumulators, 4 input vectors and a matrix: at
  // most 25 of the 32 zmm registers), 128 beyond (2m + 3 <= 19).
  static constexpr int vecs(int m) { return m <= 5 ? 4 : 2; }

  [[gnu::always_inline]] static Reg load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  [[gnu::always_inline]] static void store(uint8_t* p, Reg v) { _mm512_storeu_si512(p, v); }
  [[gnu::always_inline]] static Reg zero() { return _mm512_setzero_si512(); }
  [[gnu::always_inline]] static Reg matrix(uint64_t a) {
    return _mm512_set1_epi64(static_cast<long long>(a));
  }
  [[gnu::always_inline]] static Reg affine(Reg x, Reg matrix) {
    return _mm512_gf2p8affine_epi64_epi8(x, matrix, 0);
  }
  [[gnu::always_inline]] static Reg xor2(Reg a, Reg b) { return _mm512_xor_si512(a, b); }
};

}  // namespace

MatmulBlockFn matmul_block_gfni_avx512(int m) { return loops::affine_block_for<GfniZmm>(m); }

}  // namespace plait::ec
#endif  // __x86_64__
