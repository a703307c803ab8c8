// gf256_matmul_'s GFNI kernel on ymm: each product c * x is one vgf2p8affineqb of x with
// c's 8x8 bit matrix (gf256.h: gf256_affine_matrix), where the nibble kernels need two
// shuffles and the nibble split. The VEX form used here needs GFNI and AVX; built with
// -mgfni -mavx2 (CMakeLists.txt) and called only on CPUs with GFNI and AVX2.
//
// gf256_matmul_gfni_emulated.cpp runs this same loop (loops::affine_block) with every
// instruction computed from its SDM definition, so that the loop and the matrices are
// tested on CPUs without GFNI; only the one-line intrinsics below are not.
#include "ec/gf256_kernels.h"

#if defined(__x86_64__)
#include "ec/gf256_kernel_loops.h"

#include <immintrin.h>

namespace plait::ec {
namespace {

struct GfniYmm {
  using Reg = __m256i;
  static constexpr int kBytes = 32;
  static constexpr int vecs(int m) { return loops::affine_ymm_vecs(m); }

  [[gnu::always_inline]] static Reg load(const uint8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  [[gnu::always_inline]] static void store(uint8_t* p, Reg v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
  [[gnu::always_inline]] static Reg zero() { return _mm256_setzero_si256(); }
  // vpbroadcastq: the matrix in each of the four 64-bit lanes.
  [[gnu::always_inline]] static Reg matrix(uint64_t a) {
    return _mm256_set1_epi64x(static_cast<long long>(a));
  }
  // Intrinsic argument order: (x, A, b) computes A * x + b for each byte of x, with the
  // matrix A taken from x's 64-bit lane.
  [[gnu::always_inline]] static Reg affine(Reg x, Reg matrix) {
    return _mm256_gf2p8affine_epi64_epi8(x, matrix, 0);
  }
  [[gnu::always_inline]] static Reg xor2(Reg a, Reg b) { return _mm256_xor_si256(a, b); }
};

}  // namespace

MatmulBlockFn matmul_block_gfni_avx2(int m) { return loops::affine_block_for<GfniYmm>(m); }

}  // namespace plait::ec
#endif  // __x86_64__
