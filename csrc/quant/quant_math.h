// The element arithmetic of plait's FP8/FP4 formats (/work contract: quant-spec), shared
// verbatim by the CPU kernels (quant_cpu.cpp) and the CUDA kernels (quant_cuda.cu), so
// both evaluate the same float32 expressions in the same order and give the same bits.
// Files that include it are compiled without FMA contraction (CMakeLists.txt).
//
// A minifloat with `ebits` exponent and `mbits` mantissa bits and bias b has the minimum
// normal exponent emin = 1 - b; in the binade [2^e, 2^(e+1)) (e >= emin; the subnormals
// share e = emin) the spacing is ulp = 2^(e - mbits). With m = |v| / ulp, k = floor(m)
// and rem = m - k, the representable neighbours of |v| are k ulp and (k + 1) ulp, and the
// magnitude code of j ulp is ((e - emin) << mbits) + j (j = 2^(mbits+1) is the next
// binade's first code). Both products are exact (powers of two), so rem is the exact
// fraction the stochastic rule of the contract compares with u / 2^24.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define PLAIT_QUANT_HD __host__ __device__ __forceinline__
#else
#define PLAIT_QUANT_HD inline
#endif

namespace plait::quant {

struct Minifloat {
  int mbits;
  int bias;
  int sign_shift;     // ebits + mbits
  int max_code;       // magnitude code of the largest finite value
  float max_value;
  uint8_t nan_code;   // what NaN encodes to (E2M1 has no NaN: 0)
  bool has_inf;       // E5M2: exponent all ones, mantissa 0
  bool has_nan;
};

// OCP FP8 E4M3 (fn: no infinity, NaN = S.1111.111), OCP FP8 E5M2 (IEEE-like), and the
// E2M1 element of MXFP4 / NVFP4 (no infinity, no NaN). An enum plus a constexpr
// function rather than global objects: device code may call the function but not refer
// to host globals.
enum class Element : uint8_t { kE4M3, kE5M2, kE2M1 };

PLAIT_QUANT_HD constexpr Minifloat minifloat(Element element) {
  switch (element) {
    case Element::kE4M3:
      return {3, 7, 7, 0x7E, 448.0f, 0x7F, false, true};
    case Element::kE5M2:
      return {2, 15, 7, 0x7B, 57344.0f, 0x7F, true, true};
    default:
      return {1, 1, 3, 0x7, 6.0f, 0x0, false, false};
  }
}

// MX v1.0: the largest exponent of the element format, emax_elem.
constexpr int kMxEmaxE4M3 = 8;
constexpr int kMxEmaxE2M1 = 2;
constexpr uint8_t kE8M0Nan = 0xFF;

PLAIT_QUANT_HD float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

PLAIT_QUANT_HD uint32_t float_to_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  return bits;
}

PLAIT_QUANT_HD float quiet_nan() { return bits_to_float(0x7FC00000u); }

PLAIT_QUANT_HD bool is_nan(float f) { return (float_to_bits(f) & 0x7FFFFFFFu) > 0x7F800000u; }

PLAIT_QUANT_HD bool is_finite(float f) { return (float_to_bits(f) & 0x7F800000u) != 0x7F800000u; }

// 2^n as a float32, for normal exponents (-126 <= n <= 127).
PLAIT_QUANT_HD float pow2(int n) { return bits_to_float(static_cast<uint32_t>(n + 127) << 23); }

// |v| as the bits of a float32: for non-negative floats, unsigned order is numeric order,
// with +inf above every finite value and every NaN above +inf. So the unsigned max of
// these bits is the block's amax, NaN if any element is NaN, with no float compares
// (it vectorises as an integer max).
PLAIT_QUANT_HD uint32_t magnitude_bits(float v) { return float_to_bits(v) & 0x7FFFFFFFu; }

// The amax that magnitude bits stand for (every NaN as the canonical quiet NaN).
PLAIT_QUANT_HD float amax_from_bits(uint32_t bits) {
  return bits > 0x7F800000u ? quiet_nan() : bits_to_float(bits);
}

PLAIT_QUANT_HD uint32_t max_bits(uint32_t a, uint32_t b) { return a > b ? a : b; }

// The contract's per-element random bits: a splitmix64 finaliser of seed + (i + 1) * the
// golden-ratio increment, top 24 bits.
PLAIT_QUANT_HD uint32_t stochastic_bits(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 40);
}

// The code of v: round to nearest, ties to even (stochastic: away from zero iff
// u < frac * 2^24), finite values saturated to +-max. NaN gives fmt.nan_code; +-inf
// saturates like a finite value. The sign of v (also of -0) goes to the sign bit.
// Written without early returns (selects only), so loops over it vectorise. The
// stochastic compare is in float32: u < 2^24 and rem * 2^24 are both exact there, so it
// decides as the contract's float64 one does.
PLAIT_QUANT_HD uint8_t encode(float v, const Minifloat& fmt, bool stochastic, uint32_t u) {
  const uint32_t bits = float_to_bits(v);
  const uint32_t sign = (bits >> 31) << fmt.sign_shift;
  const float a = bits_to_float(bits & 0x7FFFFFFFu);
  const bool in_range = a < fmt.max_value;  // false for NaN and for saturating values
  const float a_in = in_range ? a : 0.0f;
  const int emin = 1 - fmt.bias;
  int e = static_cast<int>(float_to_bits(a_in) >> 23) - 127;
  e = e < emin ? emin : e;
  const float m = a_in * pow2(fmt.mbits - e);
  const int k = static_cast<int>(m);
  const float rem = m - static_cast<float>(k);
  const bool up = stochastic ? static_cast<float>(u) < rem * 16777216.0f
                             : (rem > 0.5f || (rem == 0.5f && (k & 1) != 0));
  int code = ((e - emin) << fmt.mbits) + k + (up ? 1 : 0);
  code = (code > fmt.max_code || !in_range) ? fmt.max_code : code;
  const uint8_t signed_code = static_cast<uint8_t>(sign | static_cast<uint32_t>(code));
  return is_nan(v) ? fmt.nan_code : signed_code;
}

// The value of a code (the low sign_shift + 1 bits of `code`).
PLAIT_QUANT_HD float decode(uint8_t code, const Minifloat& fmt) {
  const uint32_t magnitude_mask = (1u << fmt.sign_shift) - 1u;
  const uint32_t magnitude = code & magnitude_mask;
  const bool negative = ((code >> fmt.sign_shift) & 1u) != 0;
  const uint32_t exponent = magnitude >> fmt.mbits;
  const uint32_t mantissa = magnitude & ((1u << fmt.mbits) - 1u);
  const uint32_t exponent_ones = magnitude_mask >> fmt.mbits;
  float value;
  if (fmt.has_inf && exponent == exponent_ones) {
    value = mantissa == 0 ? bits_to_float(0x7F800000u) : quiet_nan();
  } else if (fmt.has_nan && !fmt.has_inf && magnitude == magnitude_mask) {
    value = quiet_nan();
  } else if (exponent == 0) {
    value = static_cast<float>(mantissa) * pow2(1 - fmt.bias - fmt.mbits);
  } else {
    value = static_cast<float>((1u << fmt.mbits) + mantissa) *
            pow2(static_cast<int>(exponent) - fmt.bias - fmt.mbits);
  }
  return negative ? -value : value;
}

// The FP8 decode scale of a block: amax / fmax; 1 where that is 0 (an all-zero block,
// or an amax so small that the division underflows); NaN for a non-finite amax.
PLAIT_QUANT_HD float fp8_scale(float amax, const Minifloat& fmt) {
  if (!is_finite(amax)) return quiet_nan();
  const float scale = amax / fmt.max_value;
  return scale == 0.0f ? 1.0f : scale;
}

// The E8M0 code of an MX block (OCP MX v1.0 6.3): X = floor(log2(amax)) - emax_elem,
// clamped to [-127, 127], code X + 127; amax 0 gives code 0, a non-finite amax 0xFF.
PLAIT_QUANT_HD uint8_t mx_scale_code(float amax, int emax_elem) {
  if (!is_finite(amax)) return kE8M0Nan;
  if (amax == 0.0f) return 0;
  const uint32_t bits = float_to_bits(amax);
  int floor_log2 = static_cast<int>(bits >> 23) - 127;
  if ((bits >> 23) == 0) {  // float32 subnormal: the position of the leading one
    floor_log2 = -127;
    for (uint32_t mantissa = bits; mantissa < 0x00400000u; mantissa <<= 1) --floor_log2;
  }
  int x = floor_log2 - emax_elem;
  if (x < -127) x = -127;
  if (x > 127) x = 127;
  return static_cast<uint8_t>(x + 127);
}

// 2^(127 - code) = 2^-X, the multiplier that scales a block into the element range; NaN
// for the NaN code. 127 - code is in [-127, 127] and every such power is a normal float32
// except 2^-127, which is never needed: code 254 needs amax >= 2^(127 + emax_elem).
PLAIT_QUANT_HD float mx_inverse_scale(uint8_t code) {
  if (code == kE8M0Nan) return quiet_nan();
  return pow2(127 - static_cast<int>(code));
}

// The round-up rule (Mishra et al. 2025, "Recipes for Pre-training LLMs with MXFP8"): the
// smallest X with amax * 2^-X <= the element's largest value (448 for E4M3, 6 for E2M1), so
// no block's largest element saturates. OCP's floor(log2 amax) - emax leaves amax * 2^-X in
// [2^emax, 2^(emax+1)), which exceeds 448 (or 6) for the top of that range: then X is one
// more. amax * 2^-X is exact (a power-of-two scaling of a normal range).
PLAIT_QUANT_HD uint8_t mx_scale_code_up(float amax, int emax_elem) {
  const uint8_t code = mx_scale_code(amax, emax_elem);
  if (code == kE8M0Nan || code >= 254 || amax == 0.0f) return code;
  const float largest = emax_elem == kMxEmaxE2M1 ? 6.0f : 448.0f;
  return amax * mx_inverse_scale(code) > largest ? static_cast<uint8_t>(code + 1) : code;
}

// The E8M0 value 2^(code - 127) (code 0: 2^-127, a float32 subnormal); NaN for 0xFF.
PLAIT_QUANT_HD float e8m0_decode(uint8_t code) {
  if (code == kE8M0Nan) return quiet_nan();
  if (code == 0) return bits_to_float(0x00400000u);
  return bits_to_float(static_cast<uint32_t>(code) << 23);
}

// NVFP4's global decode scale g = amax_tensor / (448 * 6); 1 where that is 0, NaN for a
// non-finite amax.
PLAIT_QUANT_HD float nvfp4_global_scale(float amax_tensor) {
  if (!is_finite(amax_tensor)) return quiet_nan();
  const float g = amax_tensor / (448.0f * 6.0f);
  return g == 0.0f ? 1.0f : g;
}

// The E4M3 block scale code of an NVFP4 16-block: to_e4m3(amax_block / 6 / g), the E4M3
// NaN code for a non-finite amax.
PLAIT_QUANT_HD uint8_t nvfp4_block_code(float amax_block, float g) {
  const Minifloat e4m3 = minifloat(Element::kE4M3);
  if (!is_finite(amax_block)) return e4m3.nan_code;
  return encode(amax_block / 6.0f / g, e4m3, false, 0);
}

}  // namespace plait::quant
