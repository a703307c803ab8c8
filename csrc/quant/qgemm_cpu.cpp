// CPU kernels of plait::block_scaled_mm and plait::block_scaled_grouped_mm: out[M, N]
// float32 = dequant(a) [M, K] @ dequant(b) [N, K]^T, for the block-scaled formats of
// /work/quant-spec.md. The argument checks shared with the CUDA kernels live here too.
//
// Tiled: a task owns an output block of up to kNC columns and a chunk of rows. Per K
// chunk of kKC it decodes b's kNC x kKC tile once (transposed, [k][n]), then per kMC
// rows a's tile ([m][k]), each value q * s in float32 exactly as the spec's float32
// dequantize rounds it (nvfp4: (q * float(sb)) * g), through 256-entry (FP8, E8M0) and
// 16-entry (E2M1) tables; then the float32 core (qgemm_panel.h) adds the tile's products
// into out. So each output is a float32 inner product of the float32-dequantized
// operands: with u = 2^-24 its error against the exact (float64) product is at most
// gamma_{K+2} sum_k |a_k b_k| (K - 1 additions, one product and the two decode roundings
// per term; MX decodes exactly). a's tile is decoded once per column block (N / kNC
// times), b's once per row chunk. Non-finite blocks (NaN scale codes) decode to NaN
// and spread NaN into the outputs they touch, as the spec wants.
#include "quant/qgemm.h"
#include "quant/qgemm_panel.h"

#include "cpu/features.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <vector>

namespace plait::quant {

void gemm_panel_avx2(int64_t rows, int64_t cols, int64_t kc, const float* a, int64_t lda,
                     const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
void gemm_panel_baseline(int64_t rows, int64_t cols, int64_t kc, const float* a, int64_t lda,
                         const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);

namespace {

constexpr int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

constexpr std::array<std::string_view, 5> kFormatNames = {"fp8-1x128", "fp8-128x128", "mxfp8",
                                                          "mxfp4", "nvfp4"};
constexpr const char* kPairs =
    "a fp8-1x128 with b fp8-128x128 or fp8-1x128, mxfp8 x mxfp8, mxfp4 x mxfp4, nvfp4 x nvfp4";

Format parse_format(const char* op, const char* arg, std::string_view name) {
  for (size_t i = 0; i < kFormatNames.size(); ++i) {
    if (kFormatNames[i] == name) return static_cast<Format>(i);
  }
  const bool scaled_mm = name == "fp8-tensor" || name == "fp8-row";
  TORCH_CHECK(false, op, ": ", arg, " '", name, "' is not a block-scaled format; accepted: ",
              "fp8-1x128, fp8-128x128, mxfp8, mxfp4, nvfp4",
              scaled_mm ? " (fp8-tensor and fp8-row go through torch._scaled_mm: use plait.ops.qmm)"
                        : "");
  return Format::fp8_1x128;
}

const char* data_dtypes(Format f) {
  if (is_fp4(f)) return "float4_e2m1fn_x2 (two E2M1 codes per byte, so K is even)";
  return f == Format::mxfp8 ? "float8_e4m3fn" : "float8_e4m3fn or float8_e5m2";
}

bool data_dtype_ok(Format f, at::ScalarType t) {
  if (is_fp4(f)) return t == at::kFloat4_e2m1fn_x2;
  if (f == Format::mxfp8) return t == at::kFloat8_e4m3fn;
  return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2;
}

at::ScalarType scale_dtype(Format f) {
  if (f == Format::mxfp8 || f == Format::mxfp4) return at::kFloat8_e8m0fnu;
  return f == Format::nvfp4 ? at::kFloat8_e4m3fn : at::kFloat;
}

// Checks one operand (data [.., rows, cols], scale [.., srows, scols], with lead_dims
// leading expert dims, 0 or 1) and returns its logical K.
int64_t check_operand(const char* op, const char* name, const at::Tensor& data,
                      const at::Tensor& scale, Format fmt, int64_t lead_dims) {
  const std::string scale_name = std::string(name) + "_scale";
  const int64_t dims = 2 + lead_dims;
  TORCH_CHECK(data.dim() == dims, op, ": ", name, " must be ", dims, "-D ",
              lead_dims ? "[E, rows, K]" : "[rows, K]", " (FP4: K/2 bytes per row), got shape ",
              data.sizes());
  TORCH_CHECK(data_dtype_ok(fmt, data.scalar_type()), op, ": ", name, " in ",
              kFormatNames[static_cast<int>(fmt)], " must be ", data_dtypes(fmt), ", got ",
              data.scalar_type(), "; quantize it with plait.ops.quant.quantize(x, '",
              kFormatNames[static_cast<int>(fmt)], "')");
  TORCH_CHECK(data.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              data.strides(), "; pass ", name, ".contiguous()");
  const int64_t rows = data.size(dims - 2);
  const int64_t k = is_fp4(fmt) ? 2 * data.size(dims - 1) : data.size(dims - 1);
  const int64_t srows = fmt == Format::fp8_128x128 ? ceil_div(rows, 128) : rows;
  const int64_t scols = ceil_div(k, block_length(fmt));
  TORCH_CHECK(scale.scalar_type() == scale_dtype(fmt), op, ": ", scale_name, " in ",
              kFormatNames[static_cast<int>(fmt)], " must be ", scale_dtype(fmt), ", got ",
              scale.scalar_type());
  std::vector<int64_t> want;
  if (lead_dims) want.push_back(data.size(0));
  want.push_back(srows);
  want.push_back(scols);
  TORCH_CHECK(scale.sizes().vec() == want, op, ": ", scale_name, " in ",
              kFormatNames[static_cast<int>(fmt)], " must have shape ", at::IntArrayRef(want),
              " for ", name, " of shape ", data.sizes(), " (K = ", k, ", blocks of ",
              block_length(fmt), fmt == Format::fp8_128x128 ? " x 128" : "", "), got ",
              scale.sizes());
  TORCH_CHECK(scale.is_contiguous(), op, ": ", scale_name, " must be contiguous, got strides ",
              scale.strides(), "; pass ", scale_name, ".contiguous()");
  TORCH_CHECK(scale.device() == data.device(), op, ": ", scale_name, " must be on ", name,
              "'s device ", data.device(), ", got ", scale.device());
  return k;
}

void check_global(const char* op, const char* name, const std::optional<at::Tensor>& global,
                  Format fmt, const at::Tensor& data, int64_t experts) {
  if (fmt != Format::nvfp4) {
    TORCH_CHECK(!global.has_value(), op, ": ", name, " is only for nvfp4, but the format is ",
                kFormatNames[static_cast<int>(fmt)], "; pass None");
    return;
  }
  TORCH_CHECK(global.has_value(), op, ": ", name,
              " is required for nvfp4 (the float32 global decode scale g of the quantized tensor)");
  const at::Tensor& g = *global;
  const bool shape_ok = experts < 0 ? g.dim() == 0 : (g.dim() == 1 && g.size(0) == experts);
  TORCH_CHECK(g.scalar_type() == at::kFloat && shape_ok, op, ": ", name, " must be float32 ",
              experts < 0 ? "0-d" : "[E] (one per expert)", ", got ", g.scalar_type(), " ",
              g.sizes());
  TORCH_CHECK(g.device() == data.device(), op, ": ", name, " must be on the data's device ",
              data.device(), ", got ", g.device());
}

}  // namespace

GemmShape block_scaled_mm_check(const char* op, const at::Tensor& a, const at::Tensor& a_scale,
                                const at::Tensor& b, const at::Tensor& b_scale,
                                std::string_view a_fmt, std::string_view b_fmt,
                                const std::optional<at::Tensor>& a_global,
                                const std::optional<at::Tensor>& b_global, bool grouped) {
  const Format af = parse_format(op, "a_fmt", a_fmt);
  const Format bf = parse_format(op, "b_fmt", b_fmt);
  TORCH_CHECK(af != Format::fp8_128x128, op, ": a_fmt fp8-128x128 is accepted for b only; ",
              "quantize the activations a as fp8-1x128. Pairs: ", kPairs);
  const bool pair_ok = af == Format::fp8_1x128
                           ? (bf == Format::fp8_1x128 || bf == Format::fp8_128x128)
                           : bf == af;
  TORCH_CHECK(pair_ok, op, ": the pair a_fmt ", a_fmt, " x b_fmt ", b_fmt,
              " is not supported; accepted: ", kPairs);
  const int64_t ka = check_operand(op, "a", a, a_scale, af, 0);
  const int64_t kb = check_operand(op, "b", b, b_scale, bf, grouped ? 1 : 0);
  TORCH_CHECK(b.device() == a.device(), op, ": b must be on a's device ", a.device(), ", got ",
              b.device());
  TORCH_CHECK(ka == kb, op, ": K mismatch: a has K = ", ka, " (shape ", a.sizes(), ") but b has K = ",
              kb, " (shape ", b.sizes(), "); b is [N, K] (the weight, not its transpose)");
  check_global(op, "a_global", a_global, af, a, -1);
  check_global(op, "b_global", b_global, bf, b, grouped ? b.size(0) : -1);
  return {a.size(0), b.size(grouped ? 1 : 0), ka, af, bf};
}

std::vector<int64_t> grouped_offsets_check(const at::Tensor& offsets, int64_t experts, int64_t m) {
  const char* op = "block_scaled_grouped_mm";
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.size(0) == experts + 1,
              op, ": offsets must be int64 [E + 1] = [", experts + 1,
              "] (row offsets of each expert's rows in a), got ", offsets.scalar_type(), " ",
              offsets.sizes());
  const at::Tensor host = offsets.to(at::kCPU).contiguous();
  const int64_t* o = host.const_data_ptr<int64_t>();
  std::vector<int64_t> out(o, o + experts + 1);
  TORCH_CHECK(out[0] == 0 && out[experts] == m, op, ": offsets must start at 0 and end at M = ",
              m, " (the rows of a), got ", out[0], " and ", out[experts]);
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK(out[e] <= out[e + 1], op, ": offsets must be non-decreasing, got offsets[", e,
                "] = ", out[e], " > offsets[", e + 1, "] = ", out[e + 1]);
  }
  return out;
}

Operand make_operand(const at::Tensor& data, const at::Tensor& scale, Format fmt,
                     const float* global) {
  Operand op;
  op.data = static_cast<const uint8_t*>(data.const_data_ptr());
  op.scale = static_cast<const uint8_t*>(scale.const_data_ptr());
  op.global = global;
  op.rows = data.size(0);
  op.row_bytes = data.size(1);
  op.scale_cols = scale.size(1);
  op.fmt = fmt;
  op.elem = is_fp4(fmt) ? Element::e2m1
                        : (data.scalar_type() == at::kFloat8_e5m2 ? Element::e5m2 : Element::e4m3);
  return op;
}

namespace {

struct Tables {
  float e4m3[256], e5m2[256], e8m0[256], e2m1[16];
  Tables() {
    for (uint32_t c = 0; c < 256; ++c) {
      e4m3[c] = decode_e4m3(c);
      e5m2[c] = decode_e5m2(c);
      e8m0[c] = decode_e8m0(c);
    }
    for (uint32_t c = 0; c < 16; ++c) e2m1[c] = decode_e2m1(c);
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

// Blocking: kKC a multiple of every block length, so a K chunk holds whole blocks.
constexpr int64_t kKC = 256;
constexpr int64_t kNC = 128;
constexpr int64_t kMC = 96;  // a multiple of kMR

using PanelFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                         float*, int64_t, bool);

PanelFn panel_kernel() {
#if defined(__x86_64__) || defined(_M_X64)
  static const PanelFn fn = cpu::features().avx2 && __builtin_cpu_supports("fma")
                                ? &gemm_panel_avx2
                                : &gemm_panel_baseline;
#else
  static const PanelFn fn = &gemm_panel_baseline;
#endif
  return fn;
}

// Decodes rows [r0, r0 + rows) x k [k0, k0 + kc) of op, scaled, to dst[i * row_stride +
// k * k_stride]; rows up to padded_rows and k up to padded_kc are written as zeros.
void decode_tile(const Operand& op, int64_t r0, int64_t rows, int64_t padded_rows, int64_t k0,
                 int64_t kc, int64_t padded_kc, float* dst, int64_t row_stride,
                 int64_t k_stride) {
  const Tables& t = tables();
  const float* elem = op.elem == Element::e5m2 ? t.e5m2 : t.e4m3;
  const int64_t length = block_length(op.fmt);
  const float global = op.global ? *op.global : 1.0f;
  for (int64_t i = 0; i < padded_rows; ++i) {
    float* out = dst + i * row_stride;
    if (i >= rows) {
      for (int64_t k = 0; k < padded_kc; ++k) out[k * k_stride] = 0.0f;
      continue;
    }
    const int64_t r = r0 + i;
    const uint8_t* codes = op.data + r * op.row_bytes;
    for (int64_t kb = k0; kb < k0 + kc; kb += length) {
      const int64_t end = std::min(kb + length, k0 + kc);
      const float s = block_scale(op, r, kb / length);
      if (op.fmt == Format::nvfp4) {
        for (int64_t k = kb; k < end; ++k) {
          const uint32_t nibble = (codes[k >> 1] >> ((k & 1) * 4)) & 0xFu;
          out[(k - k0) * k_stride] = t.e2m1[nibble] * s * global;
        }
      } else if (op.fmt == Format::mxfp4) {
        for (int64_t k = kb; k < end; ++k) {
          const uint32_t nibble = (codes[k >> 1] >> ((k & 1) * 4)) & 0xFu;
          out[(k - k0) * k_stride] = t.e2m1[nibble] * s;
        }
      } else {
        for (int64_t k = kb; k < end; ++k) out[(k - k0) * k_stride] = elem[codes[k]] * s;
      }
    }
    for (int64_t k = kc; k < padded_kc; ++k) out[k * k_stride] = 0.0f;
  }
}

// out[m, n] for rows [0, a.rows) of a and all rows of b; ldo: out's row stride.
void block_scaled_mm_into(const Operand& a, const Operand& b, int64_t k, float* out,
                          int64_t ldo) {
  const int64_t m = a.rows, n = b.rows;
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(out + i * ldo, out + i * ldo + n, 0.0f);
    return;
  }
  const PanelFn panel = panel_kernel();
  const int64_t col_blocks = ceil_div(n, kNC);
  // Enough tasks for every thread a few times over; b's tile is decoded once per chunk.
  const int64_t want_chunks = ceil_div(4 * at::get_num_threads(), col_blocks);
  const int64_t chunk_rows = ceil_div(ceil_div(m, want_chunks), kMC) * kMC;
  const int64_t row_chunks = ceil_div(m, chunk_rows);
  at::parallel_for(0, col_blocks * row_chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> b_tile(static_cast<size_t>(kKC * kNC));
    std::vector<float> a_tile(static_cast<size_t>(kMC * kKC));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n0 = (task % col_blocks) * kNC;
      const int64_t cols = std::min(kNC, n - n0);
      const int64_t m_begin = (task / col_blocks) * chunk_rows;
      const int64_t m_end = std::min(m, m_begin + chunk_rows);
      for (int64_t k0 = 0; k0 < k; k0 += kKC) {
        const int64_t kc = std::min(kKC, k - k0);
        decode_tile(b, n0, cols, ceil_div(cols, kNR) * kNR, k0, kc, kc, b_tile.data(), 1, kNC);
        for (int64_t m0 = m_begin; m0 < m_end; m0 += kMC) {
          const int64_t rows = std::min(kMC, m_end - m0);
          decode_tile(a, m0, rows, ceil_div(rows, kMR) * kMR, k0, kc, kc, a_tile.data(), kKC, 1);
          panel(rows, cols, kc, a_tile.data(), kKC, b_tile.data(), kNC, out + m0 * ldo + n0, ldo,
                k0 > 0);
        }
      }
    }
  });
}

const float* global_ptr(const std::optional<at::Tensor>& g, int64_t index = 0) {
  return g.has_value() ? g->const_data_ptr<float>() + index : nullptr;
}

at::Tensor block_scaled_mm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                               const at::Tensor& b_scale, c10::string_view a_fmt,
                               c10::string_view b_fmt, const std::optional<at::Tensor>& a_global,
                               const std::optional<at::Tensor>& b_global) {
  const char* op = "block_scaled_mm";
  TORCH_CHECK(a.device().is_cpu(), op, ": expected CPU tensors, got a on ", a.device());
  const GemmShape s = block_scaled_mm_check(op, a, a_scale, b, b_scale, a_fmt, b_fmt, a_global,
                                            b_global, false);
  at::Tensor out = a.new_empty({s.m, s.n}, a.options().dtype(at::kFloat));
  block_scaled_mm_into(make_operand(a, a_scale, s.a_fmt, global_ptr(a_global)),
                       make_operand(b, b_scale, s.b_fmt, global_ptr(b_global)), s.k,
                       out.mutable_data_ptr<float>(), s.n);
  return out;
}

at::Tensor block_scaled_grouped_mm_cpu(const at::Tensor& a, const at::Tensor& a_scale,
                                       const at::Tensor& b, const at::Tensor& b_scale,
                                       const at::Tensor& offsets, c10::string_view a_fmt,
                                       c10::string_view b_fmt,
                                       const std::optional<at::Tensor>& a_global,
                                       const std::optional<at::Tensor>& b_global) {
  const char* op = "block_scaled_grouped_mm";
  TORCH_CHECK(a.device().is_cpu(), op, ": expected CPU tensors, got a on ", a.device());
  const GemmShape s = block_scaled_mm_check(op, a, a_scale, b, b_scale, a_fmt, b_fmt, a_global,
                                            b_global, true);
  const int64_t experts = b.size(0);
  const std::vector<int64_t> off = grouped_offsets_check(offsets, experts, s.m);
  at::Tensor out = a.new_empty({s.m, s.n}, a.options().dtype(at::kFloat));
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    const Operand ae = make_operand(a.narrow(0, off[e], rows), a_scale.narrow(0, off[e], rows),
                                    s.a_fmt, global_ptr(a_global));
    const Operand be = make_operand(b.select(0, e), b_scale.select(0, e), s.b_fmt,
                                    global_ptr(b_global, e));
    block_scaled_mm_into(ae, be, s.k, out.mutable_data_ptr<float>() + off[e] * s.n, s.n);
  }
  return out;
}

}  // namespace
}  // namespace plait::quant

TORCH_LIBRARY_IMPL(plait, CPU, m) {
  m.impl("block_scaled_mm", &plait::quant::block_scaled_mm_cpu);
  m.impl("block_scaled_grouped_mm", &plait::quant::block_scaled_grouped_mm_cpu);
}
