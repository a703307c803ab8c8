// CPU kernel of plait::matmul_into and the checks both backends share (matmul_into.h).
//
// One GEMM per batch row b: out[b] is row-major [M, n], so its rows row_offset ... +m form a
// matrix with leading dimension n that BLAS writes directly (ATen's addmm keeps an out= view
// whose inner stride is 1 instead of computing into a temporary and copying it back). So the
// chunk's product lands in its slice of the preallocated output with no concatenation copy.
// On the CPU the stage copy runs before the GEMM: both would share the same cores.
#include "overlap/matmul_into.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace plait::overlap {

namespace {

bool is_gemm_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

void matmul_into_check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out, int64_t row_offset,
                       const std::optional<at::Tensor>& stage_src, const std::optional<at::Tensor>& stage_dst) {
  TORCH_CHECK(x.dim() == 3, "matmul_into: x must be [B, m, k], got ", x.dim(), " dims ", x.sizes());
  TORCH_CHECK(w.dim() == 2, "matmul_into: w must be [n, k], got ", w.dim(), " dims ", w.sizes());
  TORCH_CHECK(out.dim() == 3, "matmul_into: out must be [B, M, n], got ", out.dim(), " dims ", out.sizes());
  TORCH_CHECK(is_gemm_dtype(x.scalar_type()), "matmul_into: x must be float32, float64, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "matmul_into: x, w and out must have one dtype, got ", x.scalar_type(), ", ", w.scalar_type(), " and ",
              out.scalar_type());
  TORCH_CHECK(w.device() == x.device() && out.device() == x.device(),
              "matmul_into: x, w and out must be on the same device, got ", x.device(), ", ", w.device(), " and ",
              out.device());
  TORCH_CHECK(x.size(0) == out.size(0), "matmul_into: x has ", x.size(0), " batch rows but out has ", out.size(0));
  TORCH_CHECK(x.size(2) == w.size(1), "matmul_into: x [B, m, k] has k = ", x.size(2), " but w [n, k] has k = ",
              w.size(1));
  TORCH_CHECK(w.size(0) == out.size(2), "matmul_into: w [n, k] has n = ", w.size(0), " but out [B, M, n] has n = ",
              out.size(2));
  TORCH_CHECK(row_offset >= 0 && row_offset + x.size(1) <= out.size(1), "matmul_into: rows ", row_offset, " ... ",
              row_offset + x.size(1), " of the chunk do not fit out's ", out.size(1), " rows");
  TORCH_CHECK(out.size(2) <= 1 || out.stride(2) == 1,
              "matmul_into: out must have unit stride along n (a slice of a row-major buffer), got strides ",
              out.strides());
  at::assert_no_overlap(out, x);
  at::assert_no_overlap(out, w);
  TORCH_CHECK(stage_src.has_value() == stage_dst.has_value(),
              "matmul_into: stage_src and stage_dst come together (the copy source and its destination)");
  if (stage_src.has_value()) {
    const at::Tensor& src = *stage_src;
    const at::Tensor& dst = *stage_dst;
    TORCH_CHECK(src.sizes() == dst.sizes() && src.scalar_type() == dst.scalar_type(),
                "matmul_into: stage_src ", src.sizes(), " ", src.scalar_type(), " and stage_dst ", dst.sizes(), " ",
                dst.scalar_type(), " must match in shape and dtype");
    TORCH_CHECK(dst.device() == out.device(), "matmul_into: stage_dst must be on out's device ", out.device(),
                ", got ", dst.device());
    at::assert_no_overlap(dst, x);
    at::assert_no_overlap(dst, w);
    at::assert_no_overlap(dst, out);
  }
}

void gemm_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out, int64_t row_offset, bool accumulate) {
  const at::Tensor wt = w.t();
  const at::Tensor rows = out.narrow(1, row_offset, x.size(1));
  for (int64_t b = 0; b < x.size(0); ++b) {
    at::Tensor dst = rows.select(0, b);
    if (accumulate) {
      at::addmm_out(dst, dst, x.select(0, b), wt);
    } else {
      at::mm_out(dst, x.select(0, b), wt);
    }
  }
}

namespace {

void matmul_into_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out, int64_t row_offset,
                     bool accumulate, const std::optional<at::Tensor>& stage_src,
                     const std::optional<at::Tensor>& stage_dst) {
  matmul_into_check(x, w, out, row_offset, stage_src, stage_dst);
  if (stage_src.has_value()) {
    at::Tensor dst = *stage_dst;
    dst.copy_(*stage_src);
  }
  gemm_into(x, w, out, row_offset, accumulate);
}

}  // namespace
}  // namespace plait::overlap

TORCH_LIBRARY_IMPL(plait, CPU, m) { m.impl("matmul_into", &plait::overlap::matmul_into_cpu); }
