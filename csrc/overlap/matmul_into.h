// plait::matmul_into, one chunk of a collective matmul: shared by the CPU and CUDA kernels.
// The argument checks live in matmul_into_cpu.cpp so that both backends refuse the same
// inputs in the same words; the GEMM itself goes through ATen (MKL/OpenBLAS on the CPU,
// cuBLAS on CUDA), which writes a row slice of a row-major buffer in place.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace plait::overlap {

// Checks x [B, m, k], w [n, k], out [B, M, n] (one floating dtype, one device, out with unit
// stride along n and not overlapping x or w), 0 <= row_offset <= M - m, and that stage_src and
// stage_dst come together with one shape and dtype, stage_dst on out's device and overlapping
// none of x, w, out.
void matmul_into_check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out, int64_t row_offset,
                       const std::optional<at::Tensor>& stage_src, const std::optional<at::Tensor>& stage_dst);

// out[:, row_offset : row_offset + m] = x @ w^T (accumulate: +=), one GEMM per batch row on the
// current stream of out's device, through out's own memory.
void gemm_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out, int64_t row_offset, bool accumulate);

}  // namespace plait::overlap
