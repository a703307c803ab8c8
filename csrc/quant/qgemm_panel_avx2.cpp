// The GEMM core of qgemm_panel.h built with AVX2 and FMA (CMakeLists.txt sets the flags
// for this file only); called where the CPU has both.
#include "quant/qgemm_panel.h"

namespace plait::quant {

void gemm_panel_avx2(int64_t rows, int64_t cols, int64_t kc, const float* a, int64_t lda,
                     const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  gemm_panel(rows, cols, kc, a, lda, b, ldb, c, ldc, accumulate);
}

}  // namespace plait::quant
