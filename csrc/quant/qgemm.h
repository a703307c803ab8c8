// Shared by the CPU and CUDA kernels of plait::block_scaled_mm and
// plait::block_scaled_grouped_mm: the formats of /work/quant-spec.md that these GEMMs
// take, the decoding of their element and scale codes (host and device), and the
// argument checks (defined in qgemm_cpu.cpp, so both backends refuse the same inputs in
// the same words).
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#if defined(__CUDACC__)
#define PLAIT_QGEMM_HD __host__ __device__ __forceinline__
#else
#define PLAIT_QGEMM_HD inline
#endif

namespace plait::quant {

enum class Format : int { fp8_1x128 = 0, fp8_128x128 = 1, mxfp8 = 2, mxfp4 = 3, nvfp4 = 4 };
enum class Element : int { e4m3 = 0, e5m2 = 1, e2m1 = 2 };

// Elements along K that share one scale: 128 (FP8 block-wise), 32 (MX), 16 (NVFP4).
PLAIT_QGEMM_HD int64_t block_length(Format f) {
  return f == Format::mxfp8 || f == Format::mxfp4 ? 32 : (f == Format::nvfp4 ? 16 : 128);
}
PLAIT_QGEMM_HD bool is_fp4(Format f) { return f == Format::mxfp4 || f == Format::nvfp4; }

// One operand as the kernels read it: `rows` rows of `row_bytes` bytes of codes
// (FP4: two per byte, element 2j in the low nibble of byte j), scales row-major with
// `scale_cols` per row (fp8-128x128: one row per 128 data rows).
struct Operand {
  const uint8_t* data = nullptr;
  const uint8_t* scale = nullptr;  // float32, E8M0 or E4M3 codes, by format
  const float* global = nullptr;   // nvfp4: the float32 0-d global scale
  int64_t rows = 0;
  int64_t row_bytes = 0;
  int64_t scale_cols = 0;
  Format fmt = Format::fp8_1x128;
  Element elem = Element::e4m3;
};

// The element codes as float32 (exact: every code is a float32 value).
PLAIT_QGEMM_HD float decode_e4m3(uint32_t code) {
  const float sign = (code & 0x80u) ? -1.0f : 1.0f;
  const int exponent = static_cast<int>((code >> 3) & 0xFu);
  const int mantissa = static_cast<int>(code & 0x7u);
  if (exponent == 15 && mantissa == 7) return NAN;
  if (exponent == 0) return sign * ldexpf(static_cast<float>(mantissa), -9);
  return sign * ldexpf(static_cast<float>(8 + mantissa), exponent - 10);
}

PLAIT_QGEMM_HD float decode_e5m2(uint32_t code) {
  const float sign = (code & 0x80u) ? -1.0f : 1.0f;
  const int exponent = static_cast<int>((code >> 2) & 0x1Fu);
  const int mantissa = static_cast<int>(code & 0x3u);
  if (exponent == 31) return mantissa == 0 ? sign * INFINITY : NAN;
  if (exponent == 0) return sign * ldexpf(static_cast<float>(mantissa), -16);
  return sign * ldexpf(static_cast<float>(4 + mantissa), exponent - 17);
}

// E2M1 nibble: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa.
PLAIT_QGEMM_HD float decode_e2m1(uint32_t nibble) {
  const float sign = (nibble & 0x8u) ? -1.0f : 1.0f;
  const int exponent = static_cast<int>((nibble >> 1) & 0x3u);
  const int mantissa = static_cast<int>(nibble & 0x1u);
  if (exponent == 0) return sign * 0.5f * static_cast<float>(mantissa);
  return sign * ldexpf(static_cast<float>(2 + mantissa), exponent - 2);
}

// E8M0: 2^(code - 127); 0xFF is NaN (a block that held NaN or infinity).
PLAIT_QGEMM_HD float decode_e8m0(uint32_t code) {
  return code == 0xFFu ? NAN : ldexpf(1.0f, static_cast<int>(code) - 127);
}

// The decode scale of operand row `row`, K block `kb` (nvfp4: the block scale only).
PLAIT_QGEMM_HD float block_scale(const Operand& op, int64_t row, int64_t kb) {
  const int64_t scale_row = op.fmt == Format::fp8_128x128 ? row / 128 : row;
  const int64_t i = scale_row * op.scale_cols + kb;
  switch (op.fmt) {
    case Format::mxfp8:
    case Format::mxfp4:
      return decode_e8m0(op.scale[i]);
    case Format::nvfp4:
      return decode_e4m3(op.scale[i]);
    default:
      return reinterpret_cast<const float*>(op.scale)[i];
  }
}

struct GemmShape {
  int64_t m, n, k;
  Format a_fmt, b_fmt;
};

// Checks a [M, K] (FP4: [M, K/2]) and its scale in a_fmt, b [N, K] and its scale in b_fmt
// (grouped: b [E, N, K] and b_scale [E, ...]), the pair, the globals (nvfp4 only) and
// the devices. `op` names the op in messages.
GemmShape block_scaled_mm_check(const char* op, const at::Tensor& a, const at::Tensor& a_scale,
                                const at::Tensor& b, const at::Tensor& b_scale,
                                std::string_view a_fmt, std::string_view b_fmt,
                                const std::optional<at::Tensor>& a_global,
                                const std::optional<at::Tensor>& b_global, bool grouped);

// Checks offsets int64 [E + 1] (CPU or a's device): 0, non-decreasing, M. Read on the host.
std::vector<int64_t> grouped_offsets_check(const at::Tensor& offsets, int64_t experts, int64_t m);

// The operand view of a checked 2-D data tensor and its scale; global may be null.
Operand make_operand(const at::Tensor& data, const at::Tensor& scale, Format fmt,
                     const float* global);

}  // namespace plait::quant
