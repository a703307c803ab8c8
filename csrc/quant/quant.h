// Shared by the CPU and CUDA kernels of plait::quantize_* and plait::dequantize_*: the
// argument checks (defined in quant_cpu.cpp, so both backends refuse the same inputs in
// the same words) and the block layouts of the formats.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <string>

#include "quant/quant_math.h"

namespace plait::quant {


// A new tensor of a one-byte low-precision dtype, allocated as bytes and viewed: under
// torch.use_deterministic_algorithms(True) a new tensor is filled first, and that fill
// has no kernel for float4_e2m1fn_x2 (nor, in some builds, the float8 kinds).
inline at::Tensor empty_low_precision(at::IntArrayRef sizes, const at::TensorOptions& options, at::ScalarType dtype) {
  return at::empty(sizes, options.dtype(at::kByte)).view(dtype);
}

constexpr int64_t kMxBlock = 32;
constexpr int64_t kNvfp4Block = 16;

// The scale blocks of an FP8 granularity over x [rows, cols]: blocks of
// block_rows x block_cols, a [scale_rows, scale_cols] grid of float32 scales (0-d for
// "tensor").
struct Fp8Layout {
  int64_t rows;
  int64_t cols;
  int64_t block_rows;
  int64_t block_cols;
  int64_t scale_rows;
  int64_t scale_cols;
  bool per_tensor;
};

// Element formats of the FP8 granularities by name: "e4m3" or "e5m2".
Element fp8_element(const std::string& op, const std::string& elem);

// Checks x [M, K] (float32 or bfloat16, contiguous) and granularity ("tensor", "row",
// "1x128", "128x128").
Fp8Layout quantize_fp8_check(const at::Tensor& x, const std::string& granularity);

// Checks data (float8_e4m3fn or float8_e5m2 [M, K], contiguous), scale (float32 of the
// granularity's shape, contiguous, on data's device) and the output dtype.
Fp8Layout dequantize_fp8_check(const at::Tensor& data, const at::Tensor& scale,
                               const std::string& granularity, at::ScalarType dtype);

// Checks x [M, K] (float32 or bfloat16, contiguous; K even for "e2m1") and elem
// ("e4m3" for MXFP8, "e2m1" for MXFP4).
Element quantize_mx_check(const at::Tensor& x, const std::string& elem);

// Checks data (float8_e4m3fn [M, K] or float4_e2m1fn_x2 [M, K/2]) and scale
// (float8_e8m0fnu [M, ceil(K/32)]); returns K.
int64_t dequantize_mx_check(const at::Tensor& data, const at::Tensor& scale,
                            at::ScalarType dtype);

// Checks x [M, K] (float32 or bfloat16, contiguous, K even).
void quantize_nvfp4_check(const at::Tensor& x, int64_t block_rows);

// Checks data (float4_e2m1fn_x2 [M, K/2]), scale (float8_e4m3fn [M, ceil(K/16)]) and
// global_scale (float32 0-d); returns K.
int64_t dequantize_nvfp4_check(const at::Tensor& data, const at::Tensor& scale,
                               const at::Tensor& global_scale, at::ScalarType dtype);

// The ceil of a / b for a >= 0, b >= 1.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace plait::quant
