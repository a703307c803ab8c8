// CUDA kernels of plait::quantize_fp8 / quantize_mx / quantize_nvfp4 and their
// dequantize_* inverses, on the current stream of x's device. Same checks (quant.h),
// element arithmetic (quant_math.h, compiled with --fmad=false) and bits as the CPU
// kernels.
//
// Kept simple: one warp per (row, column block) reduces its amax (max is exact in any
// order, and NaN wins however the lanes are grouped, as on the CPU); one thread per scale
// folds the per-row amaxes of the row blocks that span several rows (128x128, tensor;
// NVFP4's tensor amax is a tree of warps over the block amaxes); one thread per output byte
// encodes (an element, or an FP4 pair), one thread per element decodes.
#include "quant/quant.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

namespace plait::quant {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride beyond this
constexpr int64_t kAmaxFold = 1024;  // amaxes one warp folds into one, per level of a tree

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t thread_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

__device__ __forceinline__ uint32_t random_bits(bool stochastic, uint64_t seed, int64_t i) {
  return stochastic ? stochastic_bits(seed, static_cast<uint64_t>(i)) : 0u;
}

// amax[r * nblocks + b] over x[r, b * block : (b + 1) * block], one warp each.
template <typename scalar_t>
__global__ void row_block_amax_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t cols,
                                      int64_t block, int64_t nblocks, float* __restrict__ amax) {
  const int lane = threadIdx.x % 32;
  const int64_t first_warp = thread_index() / 32;
  const int64_t warps = thread_stride() / 32;
  for (int64_t w = first_warp; w < rows * nblocks; w += warps) {
    const int64_t r = w / nblocks, b = w % nblocks;
    const int64_t end = (b + 1) * block < cols ? (b + 1) * block : cols;
    uint32_t m = 0;
    for (int64_t c = b * block + lane; c < end; c += 32) {
      m = max_bits(m, magnitude_bits(static_cast<float>(x[r * cols + c])));
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      m = max_bits(m, __shfl_down_sync(0xffffffffu, m, offset));
    }
    if (lane == 0) amax[w] = amax_from_bits(m);
  }
}

template <typename scalar_t>
at::Tensor row_block_amax(const scalar_t* x, int64_t rows, int64_t cols, int64_t block,
                          const at::Tensor& like, cudaStream_t stream) {
  const int64_t nblocks = ceil_div(cols, block);
  at::Tensor amax = like.new_empty({rows, nblocks}, like.options().dtype(at::kFloat));
  if (rows * nblocks == 0) return amax;
  const int64_t threads = rows * nblocks * 32;
  row_block_amax_kernel<<<blocks_for(threads), kThreads, 0, stream>>>(
      x, rows, cols, block, nblocks, amax.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return amax;
}

// ---------------------------------------------------------------------------------- FP8

__global__ void fp8_scale_kernel(const float* __restrict__ amax, Fp8Layout layout, Element element,
                                 float* __restrict__ scale) {
  const Minifloat fmt = minifloat(element);
  const int64_t n = layout.scale_rows * layout.scale_cols;
  for (int64_t j = thread_index(); j < n; j += thread_stride()) {
    const int64_t s = j / layout.scale_cols, b = j % layout.scale_cols;
    const int64_t r_end = (s + 1) * layout.block_rows < layout.rows ? (s + 1) * layout.block_rows
                                                                   : layout.rows;
    uint32_t m = 0;
    for (int64_t r = s * layout.block_rows; r < r_end; ++r) {
      m = max_bits(m, magnitude_bits(amax[r * layout.scale_cols + b]));
    }
    scale[j] = fp8_scale(amax_from_bits(m), fmt);
  }
}

template <typename scalar_t>
__global__ void fp8_quantize_kernel(const scalar_t* __restrict__ x, const float* __restrict__ scale,
                                    Fp8Layout layout, Element element, bool stochastic,
                                    uint64_t seed, uint8_t* __restrict__ data) {
  const Minifloat fmt = minifloat(element);
  const int64_t n = layout.rows * layout.cols;
  for (int64_t i = thread_index(); i < n; i += thread_stride()) {
    const int64_t r = i / layout.cols, c = i % layout.cols;
    const float s = scale[(r / layout.block_rows) * layout.scale_cols + c / layout.block_cols];
    const float v = static_cast<float>(x[i]) / s;
    data[i] = encode(v, fmt, stochastic, random_bits(stochastic, seed, i));
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x,
                                                     const std::string& granularity,
                                                     const std::string& elem, bool stochastic,
                                                     int64_t seed) {
  TORCH_CHECK(x.is_cuda(), "quantize_fp8: expected CUDA tensors, got x on ", x.device());
  const Fp8Layout layout = quantize_fp8_check(x, granularity);
  const Element element = fp8_element("quantize_fp8", elem);
  const at::ScalarType data_type =
      element == Element::kE4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
  at::Tensor data = x.new_empty({layout.rows, layout.cols}, x.options().dtype(data_type));
  at::Tensor scale =
      x.new_empty({layout.scale_rows, layout.scale_cols}, x.options().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const auto run = [&](const auto* in) {
    const at::Tensor amax = row_block_amax(in, layout.rows, layout.cols, layout.block_cols, x, stream);
    fp8_scale_kernel<<<blocks_for(scale.numel()), kThreads, 0, stream>>>(
        amax.const_data_ptr<float>(), layout, element, scale.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (data.numel() == 0) return;
    fp8_quantize_kernel<<<blocks_for(data.numel()), kThreads, 0, stream>>>(
        in, scale.const_data_ptr<float>(), layout, element, stochastic,
        static_cast<uint64_t>(seed), static_cast<uint8_t*>(data.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (x.scalar_type() == at::kFloat) {
    run(x.const_data_ptr<float>());
  } else {
    run(x.const_data_ptr<c10::BFloat16>());
  }
  if (layout.per_tensor) scale = scale.reshape({});
  return {data, scale};
}

template <typename out_t>
__global__ void fp8_dequantize_kernel(const uint8_t* __restrict__ data,
                                      const float* __restrict__ scale, Fp8Layout layout,
                                      Element element, out_t* __restrict__ out) {
  const Minifloat fmt = minifloat(element);
  const int64_t n = layout.rows * layout.cols;
  for (int64_t i = thread_index(); i < n; i += thread_stride()) {
    const int64_t r = i / layout.cols, c = i % layout.cols;
    const float s = scale[(r / layout.block_rows) * layout.scale_cols + c / layout.block_cols];
    out[i] = static_cast<out_t>(decode(data[i], fmt) * s);
  }
}

at::Tensor dequantize_fp8_cuda(const at::Tensor& data, const at::Tensor& scale,
                               const std::string& granularity, at::ScalarType dtype) {
  TORCH_CHECK(data.is_cuda(), "dequantize_fp8: expected CUDA tensors, got data on ", data.device());
  const Fp8Layout layout = dequantize_fp8_check(data, scale, granularity, dtype);
  const Element element =
      data.scalar_type() == at::kFloat8_e4m3fn ? Element::kE4M3 : Element::kE5M2;
  at::Tensor out = data.new_empty({layout.rows, layout.cols}, data.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(data.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(data.device().index()).stream();
  const uint8_t* codes = static_cast<const uint8_t*>(data.const_data_ptr());
  const float* s = scale.const_data_ptr<float>();
  if (dtype == at::kFloat) {
    fp8_dequantize_kernel<<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        codes, s, layout, element, out.mutable_data_ptr<float>());
  } else {
    fp8_dequantize_kernel<<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        codes, s, layout, element, out.mutable_data_ptr<c10::BFloat16>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------- MXFP8, MXFP4, NVFP4

// Block amax -> E8M0 code and the multiplier 2^-X.
__global__ void mx_scale_kernel(const float* __restrict__ amax, int64_t n, int emax, bool up,
                                uint8_t* __restrict__ scale, float* __restrict__ factor) {
  for (int64_t j = thread_index(); j < n; j += thread_stride()) {
    const uint8_t code = up ? mx_scale_code_up(amax[j], emax) : mx_scale_code(amax[j], emax);
    scale[j] = code;
    factor[j] = mx_inverse_scale(code);
  }
}

// amax [rows, nblocks]: each block amax replaced by the largest of its column over its group
// of `group` rows (the amax of a group x 16 tile, kept once per row); one thread per
// (row group, block).
__global__ void fold_row_groups_kernel(float* __restrict__ amax, int64_t rows, int64_t nblocks,
                                       int64_t group, int64_t groups) {
  for (int64_t i = thread_index(); i < groups * nblocks; i += thread_stride()) {
    const int64_t g = i / nblocks, b = i % nblocks;
    const int64_t r0 = g * group, r1 = r0 + group < rows ? r0 + group : rows;
    uint32_t m = 0;
    for (int64_t r = r0; r < r1; ++r) m = max_bits(m, magnitude_bits(amax[r * nblocks + b]));
    const float tile = amax_from_bits(m);
    for (int64_t r = r0; r < r1; ++r) amax[r * nblocks + b] = tile;
  }
}

// Block amax -> E4M3 block scale code and the divisor d = sb * g; amax_tensor is the
// one-element amax of all blocks.
__global__ void nvfp4_scale_kernel(const float* __restrict__ amax, int64_t n,
                                   const float* __restrict__ amax_tensor, uint8_t* __restrict__ scale,
                                   float* __restrict__ factor, float* __restrict__ global_scale) {
  const float g = nvfp4_global_scale(*amax_tensor);
  if (thread_index() == 0) *global_scale = g;
  for (int64_t j = thread_index(); j < n; j += thread_stride()) {
    const uint8_t code = nvfp4_block_code(amax[j], g);
    scale[j] = code;
    factor[j] = decode(code, minifloat(Element::kE4M3)) * g;
  }
}

// One thread per output byte: v = x * factor (MX) or x / factor (NVFP4, q = 0 where the
// divisor is 0); FP4 pairs packed with element 2j in the low nibble.
template <typename scalar_t, bool kDivide>
__global__ void block_quantize_kernel(const scalar_t* __restrict__ x, const float* __restrict__ factor,
                                      int64_t rows, int64_t cols, int64_t block, Element element,
                                      bool stochastic, uint64_t seed, uint8_t* __restrict__ data) {
  const Minifloat fmt = minifloat(element);
  const int per_byte = element == Element::kE2M1 ? 2 : 1;
  const int64_t nblocks = (cols + block - 1) / block;
  const int64_t n = rows * cols / per_byte;
  for (int64_t j = thread_index(); j < n; j += thread_stride()) {
    uint8_t byte = 0;
    for (int k = 0; k < per_byte; ++k) {
      const int64_t i = j * per_byte + k;
      const int64_t r = i / cols, c = i % cols;
      const float f = factor[r * nblocks + c / block];
      const float xf = static_cast<float>(x[i]);
      uint8_t code;
      if constexpr (kDivide) {
        code = f == 0.0f ? 0 : encode(xf / f, fmt, stochastic, random_bits(stochastic, seed, i));
      } else {
        code = encode(xf * f, fmt, stochastic, random_bits(stochastic, seed, i));
      }
      byte |= static_cast<uint8_t>(code << (4 * k));
    }
    data[j] = byte;
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_mx_cuda(const at::Tensor& x, const std::string& elem,
                                                    bool stochastic, int64_t seed, bool scale_up) {
  TORCH_CHECK(x.is_cuda(), "quantize_mx: expected CUDA tensors, got x on ", x.device());
  const Element element = quantize_mx_check(x, elem);
  const bool fp4 = element == Element::kE2M1;
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor data = fp4 ? empty_low_precision({rows, cols / 2}, x.options(), at::kFloat4_e2m1fn_x2)
                        : x.new_empty({rows, cols}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale =
      empty_low_precision({rows, ceil_div(cols, kMxBlock)}, x.options(), at::kFloat8_e8m0fnu);
  if (scale.numel() == 0) return {data, scale};
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const auto run = [&](const auto* in) {
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(in)>>;
    const at::Tensor amax = row_block_amax(in, rows, cols, kMxBlock, x, stream);
    at::Tensor factor = x.new_empty(amax.sizes(), x.options().dtype(at::kFloat));
    mx_scale_kernel<<<blocks_for(amax.numel()), kThreads, 0, stream>>>(
        amax.const_data_ptr<float>(), amax.numel(), fp4 ? kMxEmaxE2M1 : kMxEmaxE4M3, scale_up,
        static_cast<uint8_t*>(scale.mutable_data_ptr()), factor.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    block_quantize_kernel<scalar_t, false><<<blocks_for(data.numel()), kThreads, 0, stream>>>(
        in, factor.const_data_ptr<float>(), rows, cols, kMxBlock, element, stochastic,
        static_cast<uint64_t>(seed), static_cast<uint8_t*>(data.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (x.scalar_type() == at::kFloat) {
    run(x.const_data_ptr<float>());
  } else {
    run(x.const_data_ptr<c10::BFloat16>());
  }
  return {data, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_nvfp4_cuda(const at::Tensor& x,
                                                                   bool stochastic, int64_t seed,
                                                                   int64_t block_rows) {
  TORCH_CHECK(x.is_cuda(), "quantize_nvfp4: expected CUDA tensors, got x on ", x.device());
  quantize_nvfp4_check(x, block_rows);
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor data = empty_low_precision({rows, cols / 2}, x.options(), at::kFloat4_e2m1fn_x2);
  at::Tensor scale =
      x.new_empty({rows, ceil_div(cols, kNvfp4Block)}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor global_scale = x.new_empty({}, x.options().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const auto run = [&](const auto* in) {
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(in)>>;
    const at::Tensor amax = row_block_amax(in, rows, cols, kNvfp4Block, x, stream);
    const int64_t n = amax.numel();
    if (block_rows > 1 && n > 0) {
      const int64_t nblocks = ceil_div(cols, kNvfp4Block), groups = ceil_div(rows, block_rows);
      fold_row_groups_kernel<<<blocks_for(groups * nblocks), kThreads, 0, stream>>>(
          amax.mutable_data_ptr<float>(), rows, nblocks, block_rows, groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // The tensor amax: the block amaxes folded kAmaxFold at a time (one warp each) until one
    // is left. (One warp over all of them took 20 ms for a [16384, 8192] x on an H200.)
    at::Tensor amax_tensor = x.new_zeros({1, 1}, x.options().dtype(at::kFloat));
    if (n > 0) {
      at::Tensor level = amax;
      for (int64_t count = n; count > 1; count = level.numel()) {
        level = row_block_amax(level.const_data_ptr<float>(), 1, count, kAmaxFold, x, stream);
      }
      amax_tensor = level;
    }
    at::Tensor factor = x.new_empty({std::max<int64_t>(n, 1)}, x.options().dtype(at::kFloat));
    nvfp4_scale_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
        amax.const_data_ptr<float>(), n, amax_tensor.const_data_ptr<float>(),
        static_cast<uint8_t*>(scale.mutable_data_ptr()), factor.mutable_data_ptr<float>(),
        global_scale.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (data.numel() == 0) return;
    block_quantize_kernel<scalar_t, true><<<blocks_for(data.numel()), kThreads, 0, stream>>>(
        in, factor.const_data_ptr<float>(), rows, cols, kNvfp4Block, Element::kE2M1, stochastic,
        static_cast<uint64_t>(seed), static_cast<uint8_t*>(data.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (x.scalar_type() == at::kFloat) {
    run(x.const_data_ptr<float>());
  } else {
    run(x.const_data_ptr<c10::BFloat16>());
  }
  return {data, scale, global_scale};
}

// out = value(code) * block scale (* global, after: (q * sb) * g). scale_element: how
// the scale bytes decode (E8M0 for MX, E4M3 for NVFP4).
template <typename out_t>
__global__ void block_dequantize_kernel(const uint8_t* __restrict__ data,
                                        const uint8_t* __restrict__ scale, int64_t rows,
                                        int64_t cols, int64_t block, Element element,
                                        bool e8m0_scale, const float* __restrict__ global,
                                        out_t* __restrict__ out) {
  const Minifloat fmt = minifloat(element);
  const bool fp4 = element == Element::kE2M1;
  const int64_t nblocks = (cols + block - 1) / block;
  for (int64_t i = thread_index(); i < rows * cols; i += thread_stride()) {
    const int64_t r = i / cols, c = i % cols;
    const uint8_t code = fp4 ? static_cast<uint8_t>((data[i / 2] >> (4 * (c % 2))) & 0xF) : data[i];
    const uint8_t scale_code = scale[r * nblocks + c / block];
    const float s = e8m0_scale ? e8m0_decode(scale_code) : decode(scale_code, minifloat(Element::kE4M3));
    float value = decode(code, fmt) * s;
    if (global != nullptr) value = value * *global;
    out[i] = static_cast<out_t>(value);
  }
}

at::Tensor block_dequantize_cuda(const at::Tensor& data, const at::Tensor& scale, int64_t cols,
                                 int64_t block, Element element, bool e8m0_scale,
                                 const float* global, at::ScalarType dtype) {
  const int64_t rows = data.size(0);
  at::Tensor out = data.new_empty({rows, cols}, data.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(data.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(data.device().index()).stream();
  const uint8_t* codes = static_cast<const uint8_t*>(data.const_data_ptr());
  const uint8_t* scale_codes = static_cast<const uint8_t*>(scale.const_data_ptr());
  if (dtype == at::kFloat) {
    block_dequantize_kernel<<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        codes, scale_codes, rows, cols, block, element, e8m0_scale, global,
        out.mutable_data_ptr<float>());
  } else {
    block_dequantize_kernel<<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        codes, scale_codes, rows, cols, block, element, e8m0_scale, global,
        out.mutable_data_ptr<c10::BFloat16>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_mx_cuda(const at::Tensor& data, const at::Tensor& scale, at::ScalarType dtype) {
  TORCH_CHECK(data.is_cuda(), "dequantize_mx: expected CUDA tensors, got data on ", data.device());
  const int64_t cols = dequantize_mx_check(data, scale, dtype);
  const Element element =
      data.scalar_type() == at::kFloat4_e2m1fn_x2 ? Element::kE2M1 : Element::kE4M3;
  return block_dequantize_cuda(data, scale, cols, kMxBlock, element, true, nullptr, dtype);
}

at::Tensor dequantize_nvfp4_cuda(const at::Tensor& data, const at::Tensor& scale,
                                 const at::Tensor& global_scale, at::ScalarType dtype) {
  TORCH_CHECK(data.is_cuda(), "dequantize_nvfp4: expected CUDA tensors, got data on ", data.device());
  const int64_t cols = dequantize_nvfp4_check(data, scale, global_scale, dtype);
  return block_dequantize_cuda(data, scale, cols, kNvfp4Block, Element::kE2M1, false,
                               global_scale.const_data_ptr<float>(), dtype);
}

}  // namespace
}  // namespace plait::quant

TORCH_LIBRARY_IMPL(plait, CUDA, m) {
  m.impl("quantize_fp8", &plait::quant::quantize_fp8_cuda);
  m.impl("dequantize_fp8", &plait::quant::dequantize_fp8_cuda);
  m.impl("quantize_mx", &plait::quant::quantize_mx_cuda);
  m.impl("dequantize_mx", &plait::quant::dequantize_mx_cuda);
  m.impl("quantize_nvfp4", &plait::quant::quantize_nvfp4_cuda);
  m.impl("dequantize_nvfp4", &plait::quant::dequantize_nvfp4_cuda);
}
