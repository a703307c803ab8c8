// The float32 core of the CPU block-scaled GEMMs: c[m, n] (+)= a[m, kc] b[kc, n] on
// already decoded tiles. Compiled once per instruction set (qgemm_panel_*.cpp, each with
// its own -m flags), so it lives in an unnamed namespace: every file gets its own copy.
//
// Register blocking: a kMR x kNR tile of c stays in registers over the whole kc loop
// (6 x 16 float32: twelve 8-lane registers with AVX2, plus the b row and a broadcast).
// Each output is summed over k in order (the tile's sum, then added to c), so its
// rounding error stays within the recursive-summation bound the tests check.
#pragma once

#include <cstdint>
#include <cstring>

namespace plait::quant {
namespace {

constexpr int64_t kMR = 6;
constexpr int64_t kNR = 16;

// Eight float32 lanes (GCC/Clang vector extension): one AVX register, two SSE ones.
typedef float Lanes __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
constexpr int64_t kVectors = kNR / kLanes;

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// a: [kMR rows][lda], b: [kc][ldb] (kNR columns from b), c: [rows][ldc].
inline void micro_tile(int64_t kc, const float* __restrict__ a, int64_t lda,
                       const float* __restrict__ b, int64_t ldb, float* __restrict__ c,
                       int64_t ldc, int64_t rows, int64_t cols, bool accumulate) {
  Lanes acc[kMR][kVectors] = {};
  for (int64_t k = 0; k < kc; ++k) {
    Lanes bk[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) bk[v] = load_lanes(b + k * ldb + v * kLanes);
    for (int64_t i = 0; i < kMR; ++i) {
      const float ai = a[i * lda + k];
      for (int64_t v = 0; v < kVectors; ++v) acc[i][v] += ai * bk[v];
    }
  }
  if (rows == kMR && cols == kNR) {
    for (int64_t i = 0; i < kMR; ++i) {
      for (int64_t v = 0; v < kVectors; ++v) {
        float* ci = c + i * ldc + v * kLanes;
        const Lanes sum = accumulate ? load_lanes(ci) + acc[i][v] : acc[i][v];
        std::memcpy(ci, &sum, sizeof(sum));
      }
    }
    return;
  }
  float tile[kMR][kNR];
  std::memcpy(tile, acc, sizeof(tile));
  for (int64_t i = 0; i < rows; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      for (int64_t j = 0; j < cols; ++j) ci[j] += tile[i][j];
    } else {
      for (int64_t j = 0; j < cols; ++j) ci[j] = tile[i][j];
    }
  }
}

// c[rows, cols] (+)= a[rows, kc] b[kc, cols]; a has row stride lda and rows rounded up to
// kMR readable (zero padded), b has row stride ldb and cols rounded up to kNR readable.
inline void gemm_panel(int64_t rows, int64_t cols, int64_t kc, const float* a, int64_t lda,
                       const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < cols; j += kNR) {
    for (int64_t i = 0; i < rows; i += kMR) {
      micro_tile(kc, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc,
                 rows - i < kMR ? rows - i : kMR, cols - j < kNR ? cols - j : kNR, accumulate);
    }
  }
}

}  // namespace
}  // namespace plait::quant
