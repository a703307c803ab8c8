// CPU kernels of plait::quantize_fp8 / quantize_mx / quantize_nvfp4 and their
// dequantize_* inverses (the formats, scale rules, rounding and packing of the plait
// low-precision contract; the element arithmetic is quant_math.h, shared with CUDA).
//
// Every quantize is two passes. First the amax of each (row, column block) — the block's
// width is the format's: 128, 32, 16, or the whole row — threaded over rows; the FP8
// granularities that span several rows (128x128, tensor) and NVFP4's tensor amax then
// fold those per-row amaxes, which is exact (an unsigned max over magnitude bits:
// associative, and NaN wins however they are grouped). Second, each element is scaled
// with its block's scale and encoded, threaded over rows. Both inner loops are free of
// branches (encode only selects) and take the rounding as a template argument; GCC
// vectorises the amax loop and the FP8 / MXFP8 encode loops at -O3 (the E2M1 pair loop
// stays scalar).
#include "quant/quant.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace plait::quant {
namespace {

// Rows per task of at::parallel_for: enough work per task for short rows.
constexpr int64_t kRowGrain = 16;
// Block scales per task.
constexpr int64_t kScaleGrain = 4096;

void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got ", name, " on ", t.device());
}

// amax[r * nblocks + b] over x[r, b * block : (b + 1) * block] (the last block partial).
template <typename scalar_t>
std::vector<float> row_block_amax(const scalar_t* x, int64_t rows, int64_t cols, int64_t block) {
  const int64_t nblocks = ceil_div(cols, block);
  std::vector<float> amax(static_cast<size_t>(rows * nblocks), 0.0f);
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = x + r * cols;
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t end = std::min(cols, (b + 1) * block);
        uint32_t m = 0;
        for (int64_t c = b * block; c < end; ++c) {
          m = max_bits(m, magnitude_bits(static_cast<float>(row[c])));
        }
        amax[r * nblocks + b] = amax_from_bits(m);
      }
    }
  });
  return amax;
}

// The code of element i of x in a block with factor f: x / f (FP8: f = s, never 0;
// NVFP4: f = d, and q = 0 where d == 0), or x * f (MX: f = 2^-X). Rounding is a template
// argument, so the round-to-nearest loops carry no hash and vectorise.
template <bool kStochastic, bool kDivide, typename scalar_t>
inline uint8_t encode_element(const scalar_t* x, int64_t i, float f, const Minifloat& fmt,
                              uint64_t seed) {
  const float xf = static_cast<float>(x[i]);
  const uint32_t u = kStochastic ? stochastic_bits(seed, static_cast<uint64_t>(i)) : 0u;
  if constexpr (kDivide) {
    const uint8_t code = encode(xf / f, fmt, kStochastic, u);
    return f == 0.0f ? uint8_t{0} : code;
  } else {
    return encode(xf * f, fmt, kStochastic, u);
  }
}

// ---------------------------------------------------------------------------------- FP8

// Rows [r0, r1) of x encoded with their blocks' scales. A function of its own, with
// everything by value: the code stores (uint8_t) may alias anything reached through a
// lambda's captures, which would reload them every element and keep the loop scalar.
template <bool kStochastic, typename scalar_t>
void fp8_encode_rows(const scalar_t* x, int64_t r0, int64_t r1, Fp8Layout layout,
                     const float* scale, Minifloat fmt, uint64_t seed, uint8_t* data) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* row_scale = scale + (r / layout.block_rows) * layout.scale_cols;
    for (int64_t b = 0; b < layout.scale_cols; ++b) {
      const float s = row_scale[b];
      const int64_t first = r * layout.cols + b * layout.block_cols;
      const int64_t last = r * layout.cols + std::min(layout.cols, (b + 1) * layout.block_cols);
      for (int64_t i = first; i < last; ++i) {
        data[i] = encode_element<kStochastic, true>(x, i, s, fmt, seed);
      }
    }
  }
}

template <typename scalar_t>
void fp8_quantize(const scalar_t* x, const Fp8Layout& layout, const Minifloat fmt,
                  bool stochastic, uint64_t seed, float* scale, uint8_t* data) {
  const int64_t rows = layout.rows, cols = layout.cols;
  const std::vector<float> amax = row_block_amax(x, rows, cols, layout.block_cols);
  const int64_t nblocks = layout.scale_cols;
  at::parallel_for(0, layout.scale_rows, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r_end = std::min(rows, (s + 1) * layout.block_rows);
      for (int64_t b = 0; b < nblocks; ++b) {
        uint32_t m = 0;
        for (int64_t r = s * layout.block_rows; r < r_end; ++r) {
          m = max_bits(m, magnitude_bits(amax[r * nblocks + b]));
        }
        scale[s * nblocks + b] = fp8_scale(amax_from_bits(m), fmt);
      }
    }
  });
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    if (stochastic) {
      fp8_encode_rows<true>(x, r0, r1, layout, scale, fmt, seed, data);
    } else {
      fp8_encode_rows<false>(x, r0, r1, layout, scale, fmt, seed, data);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cpu(const at::Tensor& x,
                                                    const std::string& granularity,
                                                    const std::string& elem, bool stochastic,
                                                    int64_t seed) {
  check_cpu("quantize_fp8", x, "x");
  const Fp8Layout layout = quantize_fp8_check(x, granularity);
  const Element element = fp8_element("quantize_fp8", elem);
  const Minifloat fmt = minifloat(element);
  const at::ScalarType data_type =
      element == Element::kE4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
  at::Tensor data = empty_low_precision({layout.rows, layout.cols}, x.options(), data_type);
  at::Tensor scale = at::empty({layout.scale_rows, layout.scale_cols}, x.options().dtype(at::kFloat));
  float* scale_ptr = scale.mutable_data_ptr<float>();
  uint8_t* data_ptr = static_cast<uint8_t*>(data.mutable_data_ptr());
  const uint64_t useed = static_cast<uint64_t>(seed);
  if (x.scalar_type() == at::kFloat) {
    fp8_quantize(x.const_data_ptr<float>(), layout, fmt, stochastic, useed, scale_ptr, data_ptr);
  } else {
    fp8_quantize(x.const_data_ptr<c10::BFloat16>(), layout, fmt, stochastic, useed, scale_ptr,
                 data_ptr);
  }
  if (layout.per_tensor) scale = scale.reshape({});
  return {data, scale};
}

// The 256 decoded values of a format's codes: one lookup per element.
std::array<float, 256> decode_table(const Minifloat& fmt) {
  std::array<float, 256> table{};
  for (int code = 0; code < 256; ++code) table[code] = decode(static_cast<uint8_t>(code), fmt);
  return table;
}

template <typename out_t>
void fp8_dequantize(const uint8_t* data, const float* scale, const Fp8Layout& layout,
                    const Minifloat& fmt, out_t* out) {
  const std::array<float, 256> table = decode_table(fmt);
  const int64_t cols = layout.cols;
  at::parallel_for(0, layout.rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row_scale = scale + (r / layout.block_rows) * layout.scale_cols;
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t i = r * cols + c;
        out[i] = static_cast<out_t>(table[data[i]] * row_scale[c / layout.block_cols]);
      }
    }
  });
}

at::Tensor dequantize_fp8_cpu(const at::Tensor& data, const at::Tensor& scale,
                              const std::string& granularity, at::ScalarType dtype) {
  check_cpu("dequantize_fp8", data, "data");
  const Fp8Layout layout = dequantize_fp8_check(data, scale, granularity, dtype);
  const Minifloat fmt = minifloat(data.scalar_type() == at::kFloat8_e4m3fn ? Element::kE4M3
                                                                            : Element::kE5M2);
  at::Tensor out = at::empty({layout.rows, layout.cols}, data.options().dtype(dtype));
  const uint8_t* codes = static_cast<const uint8_t*>(data.const_data_ptr());
  const float* s = scale.const_data_ptr<float>();
  if (dtype == at::kFloat) {
    fp8_dequantize(codes, s, layout, fmt, out.mutable_data_ptr<float>());
  } else {
    fp8_dequantize(codes, s, layout, fmt, out.mutable_data_ptr<c10::BFloat16>());
  }
  return out;
}

// ------------------------------------------------------------------- MXFP8, MXFP4, NVFP4

// Encodes row r of x with one multiplier or divisor per block of `block` elements (see
// encode_element). FP4 codes are packed two per byte, element 2j in the low nibble;
// blocks and rows have even lengths there, so a byte never spans two blocks.
template <bool kStochastic, bool kDivide, typename scalar_t>
void encode_row(const scalar_t* x, int64_t r, int64_t cols, int64_t block, const float* factor,
                Element element, uint64_t seed, uint8_t* data) {
  const Minifloat fmt = minifloat(element);
  const int64_t nblocks = ceil_div(cols, block);
  for (int64_t b = 0; b < nblocks; ++b) {
    const float f = factor[r * nblocks + b];
    const int64_t first = r * cols + b * block, last = r * cols + std::min(cols, (b + 1) * block);
    if (element == Element::kE2M1) {
      for (int64_t i = first; i < last; i += 2) {
        const uint8_t low = encode_element<kStochastic, kDivide>(x, i, f, fmt, seed);
        const uint8_t high = encode_element<kStochastic, kDivide>(x, i + 1, f, fmt, seed);
        data[i / 2] = static_cast<uint8_t>(low | (high << 4));
      }
    } else {
      for (int64_t i = first; i < last; ++i) {
        data[i] = encode_element<kStochastic, kDivide>(x, i, f, fmt, seed);
      }
    }
  }
}

// encode_row over rows [r0, r1), rounding chosen once.
template <bool kDivide, typename scalar_t>
void encode_rows(const scalar_t* x, int64_t r0, int64_t r1, int64_t cols, int64_t block,
                 const float* factor, Element element, bool stochastic, uint64_t seed,
                 uint8_t* data) {
  for (int64_t r = r0; r < r1; ++r) {
    if (stochastic) {
      encode_row<true, kDivide>(x, r, cols, block, factor, element, seed, data);
    } else {
      encode_row<false, kDivide>(x, r, cols, block, factor, element, seed, data);
    }
  }
}

template <typename scalar_t>
void mx_quantize(const scalar_t* x, int64_t rows, int64_t cols, Element element,
                 bool stochastic, uint64_t seed, bool scale_up, uint8_t* scale, uint8_t* data) {
  const int emax = element == Element::kE2M1 ? kMxEmaxE2M1 : kMxEmaxE4M3;
  std::vector<float> factor = row_block_amax(x, rows, cols, kMxBlock);
  const int64_t nscales = static_cast<int64_t>(factor.size());
  at::parallel_for(0, nscales, kScaleGrain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      scale[j] = scale_up ? mx_scale_code_up(factor[j], emax) : mx_scale_code(factor[j], emax);
      factor[j] = mx_inverse_scale(scale[j]);
    }
  });
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    encode_rows<false>(x, r0, r1, cols, kMxBlock, factor.data(), element, stochastic, seed, data);
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_mx_cpu(const at::Tensor& x, const std::string& elem,
                                                   bool stochastic, int64_t seed, bool scale_up) {
  check_cpu("quantize_mx", x, "x");
  const Element element = quantize_mx_check(x, elem);
  const bool fp4 = element == Element::kE2M1;
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor data = fp4 ? empty_low_precision({rows, cols / 2}, x.options(), at::kFloat4_e2m1fn_x2)
                        : empty_low_precision({rows, cols}, x.options(), at::kFloat8_e4m3fn);
  at::Tensor scale =
      empty_low_precision({rows, ceil_div(cols, kMxBlock)}, x.options(), at::kFloat8_e8m0fnu);
  uint8_t* scale_ptr = static_cast<uint8_t*>(scale.mutable_data_ptr());
  uint8_t* data_ptr = static_cast<uint8_t*>(data.mutable_data_ptr());
  const uint64_t useed = static_cast<uint64_t>(seed);
  if (x.scalar_type() == at::kFloat) {
    mx_quantize(x.const_data_ptr<float>(), rows, cols, element, stochastic, useed, scale_up, scale_ptr,
                data_ptr);
  } else {
    mx_quantize(x.const_data_ptr<c10::BFloat16>(), rows, cols, element, stochastic, useed, scale_up,
                scale_ptr, data_ptr);
  }
  return {data, scale};
}

// Each block amax of `amax` [rows, nblocks] replaced by the largest of its column over the
// `group` rows of its row group: the amax of a group x 16 tile, kept once per row.
void fold_row_groups(std::vector<float>& amax, int64_t rows, int64_t nblocks, int64_t group) {
  const int64_t groups = ceil_div(rows, group);
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * group, r1 = std::min(rows, r0 + group);
      for (int64_t b = 0; b < nblocks; ++b) {
        uint32_t m = 0;
        for (int64_t r = r0; r < r1; ++r) m = max_bits(m, magnitude_bits(amax[r * nblocks + b]));
        const float tile = amax_from_bits(m);
        for (int64_t r = r0; r < r1; ++r) amax[r * nblocks + b] = tile;
      }
    }
  });
}

template <typename scalar_t>
void nvfp4_quantize(const scalar_t* x, int64_t rows, int64_t cols, bool stochastic,
                    uint64_t seed, int64_t block_rows, uint8_t* scale, float* global_scale,
                    uint8_t* data) {
  std::vector<float> factor = row_block_amax(x, rows, cols, kNvfp4Block);
  if (block_rows > 1) fold_row_groups(factor, rows, ceil_div(cols, kNvfp4Block), block_rows);
  uint32_t amax_tensor = 0;
  for (const float m : factor) amax_tensor = max_bits(amax_tensor, magnitude_bits(m));
  const float g = nvfp4_global_scale(amax_from_bits(amax_tensor));
  *global_scale = g;
  const int64_t nscales = static_cast<int64_t>(factor.size());
  at::parallel_for(0, nscales, kScaleGrain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      scale[j] = nvfp4_block_code(factor[j], g);
      factor[j] = decode(scale[j], minifloat(Element::kE4M3)) * g;
    }
  });
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    encode_rows<true>(x, r0, r1, cols, kNvfp4Block, factor.data(), Element::kE2M1, stochastic,
                      seed, data);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_nvfp4_cpu(const at::Tensor& x,
                                                                  bool stochastic, int64_t seed,
                                                                  int64_t block_rows) {
  check_cpu("quantize_nvfp4", x, "x");
  quantize_nvfp4_check(x, block_rows);
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor data = empty_low_precision({rows, cols / 2}, x.options(), at::kFloat4_e2m1fn_x2);
  at::Tensor scale =
      empty_low_precision({rows, ceil_div(cols, kNvfp4Block)}, x.options(), at::kFloat8_e4m3fn);
  at::Tensor global_scale = at::empty({}, x.options().dtype(at::kFloat));
  uint8_t* scale_ptr = static_cast<uint8_t*>(scale.mutable_data_ptr());
  uint8_t* data_ptr = static_cast<uint8_t*>(data.mutable_data_ptr());
  float* g = global_scale.mutable_data_ptr<float>();
  const uint64_t useed = static_cast<uint64_t>(seed);
  if (x.scalar_type() == at::kFloat) {
    nvfp4_quantize(x.const_data_ptr<float>(), rows, cols, stochastic, useed, block_rows, scale_ptr, g,
                   data_ptr);
  } else {
    nvfp4_quantize(x.const_data_ptr<c10::BFloat16>(), rows, cols, stochastic, useed, block_rows,
                   scale_ptr, g, data_ptr);
  }
  return {data, scale, global_scale};
}

// out[r, c] = value(code) * block_scale[r, c / block] (* global for NVFP4, after the
// block scale: (q * sb) * g, the contract's order).
template <typename out_t>
void block_dequantize(const uint8_t* data, const float* block_scale, int64_t rows, int64_t cols,
                      int64_t block, Element element, const float* global, out_t* out) {
  const bool fp4 = element == Element::kE2M1;
  const std::array<float, 256> table = decode_table(minifloat(element));
  const int64_t nblocks = ceil_div(cols, block);
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t i = r * cols + c;
        const uint8_t code = fp4 ? static_cast<uint8_t>((data[i / 2] >> (4 * (c % 2))) & 0xF)
                                 : data[i];
        float value = table[code] * block_scale[r * nblocks + c / block];
        if (global != nullptr) value = value * *global;
        out[i] = static_cast<out_t>(value);
      }
    }
  });
}

template <typename Decode>
std::vector<float> decoded_scales(const at::Tensor& scale, Decode decode_code) {
  const uint8_t* codes = static_cast<const uint8_t*>(scale.const_data_ptr());
  std::vector<float> values(static_cast<size_t>(scale.numel()));
  for (size_t j = 0; j < values.size(); ++j) values[j] = decode_code(codes[j]);
  return values;
}

at::Tensor block_dequantize_cpu(const at::Tensor& data, const std::vector<float>& block_scale,
                                int64_t cols, int64_t block, Element element,
                                const float* global, at::ScalarType dtype) {
  const int64_t rows = data.size(0);
  at::Tensor out = at::empty({rows, cols}, data.options().dtype(dtype));
  const uint8_t* codes = static_cast<const uint8_t*>(data.const_data_ptr());
  if (dtype == at::kFloat) {
    block_dequantize(codes, block_scale.data(), rows, cols, block, element, global,
                     out.mutable_data_ptr<float>());
  } else {
    block_dequantize(codes, block_scale.data(), rows, cols, block, element, global,
                     out.mutable_data_ptr<c10::BFloat16>());
  }
  return out;
}

at::Tensor dequantize_mx_cpu(const at::Tensor& data, const at::Tensor& scale, at::ScalarType dtype) {
  check_cpu("dequantize_mx", data, "data");
  const int64_t cols = dequantize_mx_check(data, scale, dtype);
  const Element element =
      data.scalar_type() == at::kFloat4_e2m1fn_x2 ? Element::kE2M1 : Element::kE4M3;
  const std::vector<float> block_scale = decoded_scales(scale, e8m0_decode);
  return block_dequantize_cpu(data, block_scale, cols, kMxBlock, element, nullptr, dtype);
}

at::Tensor dequantize_nvfp4_cpu(const at::Tensor& data, const at::Tensor& scale,
                                const at::Tensor& global_scale, at::ScalarType dtype) {
  check_cpu("dequantize_nvfp4", data, "data");
  const int64_t cols = dequantize_nvfp4_check(data, scale, global_scale, dtype);
  const std::vector<float> block_scale =
      decoded_scales(scale, [](uint8_t code) { return decode(code, minifloat(Element::kE4M3)); });
  const float g = global_scale.item<float>();
  return block_dequantize_cpu(data, block_scale, cols, kNvfp4Block, Element::kE2M1, &g, dtype);
}

}  // namespace
}  // namespace plait::quant

TORCH_LIBRARY_IMPL(plait, CPU, m) {
  m.impl("quantize_fp8", &plait::quant::quantize_fp8_cpu);
  m.impl("dequantize_fp8", &plait::quant::dequantize_fp8_cpu);
  m.impl("quantize_mx", &plait::quant::quantize_mx_cpu);
  m.impl("dequantize_mx", &plait::quant::dequantize_mx_cpu);
  m.impl("quantize_nvfp4", &plait::quant::quantize_nvfp4_cpu);
  m.impl("dequantize_nvfp4", &plait::quant::dequantize_nvfp4_cpu);
}
