// Argument checks of plait::quantize_* and plait::dequantize_*, shared by the CPU and
// CUDA kernels so both refuse the same inputs in the same words.
#include "quant/quant.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>

namespace plait::quant {
namespace {

void check_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K] (quantized along the last dim), got shape ",
              x.sizes(), "; flatten the leading dimensions with x.reshape(-1, x.shape[-1])");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type(), "; convert it with x.float()");
  TORCH_CHECK(x.size(1) >= 1, op, ": x must have at least one column, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous, got strides ", x.strides(),
              "; pass x.contiguous()");
}

void check_even_cols(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.size(1) % 2 == 0, op, ": x must have an even number of columns K (two FP4 ",
              "elements per byte), got K = ", x.size(1), "; pad x with a zero column");
}

void check_out_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op,
              ": dtype must be torch.float32 or torch.bfloat16, got ", dtype);
}

void check_data(const char* op, const at::Tensor& data, bool fp4) {
  TORCH_CHECK(data.dim() == 2, op, ": data must be 2-D, got shape ", data.sizes());
  TORCH_CHECK(data.is_contiguous(), op, ": data must be contiguous, got strides ", data.strides(),
              "; pass data.contiguous()");
  if (fp4) {
    TORCH_CHECK(data.scalar_type() == at::kFloat4_e2m1fn_x2, op,
                ": data must be torch.float4_e2m1fn_x2 (two E2M1 codes per byte), got ",
                data.scalar_type());
  }
}

void check_scale(const char* op, const at::Tensor& scale, const at::Tensor& data,
                 at::ScalarType dtype, const char* dtype_name, int64_t rows, int64_t cols) {
  TORCH_CHECK(scale.scalar_type() == dtype, op, ": scale must be ", dtype_name, ", got ",
              scale.scalar_type());
  TORCH_CHECK(scale.device() == data.device(), op, ": scale must be on data's device ",
              data.device(), ", got ", scale.device(), "; move it with scale.to(data.device)");
  TORCH_CHECK(scale.is_contiguous(), op, ": scale must be contiguous, got strides ",
              scale.strides(), "; pass scale.contiguous()");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == rows && scale.size(1) == cols, op,
              ": scale must have shape [", rows, ", ", cols, "] for data of shape ", data.sizes(),
              ", got ", scale.sizes());
}

Fp8Layout fp8_layout(const char* op, int64_t rows, int64_t cols, const std::string& granularity) {
  Fp8Layout layout{rows, cols, 1, 1, 0, 0, false};
  if (granularity == "tensor") {
    layout.block_rows = std::max<int64_t>(rows, 1);
    layout.block_cols = std::max<int64_t>(cols, 1);
    layout.per_tensor = true;
  } else if (granularity == "row") {
    layout.block_cols = std::max<int64_t>(cols, 1);
  } else if (granularity == "1x128") {
    layout.block_cols = 128;
  } else if (granularity == "128x128") {
    layout.block_rows = 128;
    layout.block_cols = 128;
  } else {
    TORCH_CHECK(false, op, ": granularity must be one of \"tensor\", \"row\", \"1x128\", ",
                "\"128x128\", got \"", granularity, "\"");
  }
  layout.scale_rows = layout.per_tensor ? 1 : ceil_div(rows, layout.block_rows);
  layout.scale_cols = layout.per_tensor ? 1 : ceil_div(cols, layout.block_cols);
  return layout;
}

}  // namespace

Element fp8_element(const std::string& op, const std::string& elem) {
  if (elem == "e4m3") return Element::kE4M3;
  TORCH_CHECK(elem == "e5m2", op, ": elem must be \"e4m3\" or \"e5m2\", got \"", elem, "\"");
  return Element::kE5M2;
}

Fp8Layout quantize_fp8_check(const at::Tensor& x, const std::string& granularity) {
  check_input("quantize_fp8", x);
  return fp8_layout("quantize_fp8", x.size(0), x.size(1), granularity);
}

Fp8Layout dequantize_fp8_check(const at::Tensor& data, const at::Tensor& scale,
                               const std::string& granularity, at::ScalarType dtype) {
  const char* op = "dequantize_fp8";
  check_data(op, data, false);
  TORCH_CHECK(data.scalar_type() == at::kFloat8_e4m3fn || data.scalar_type() == at::kFloat8_e5m2,
              op, ": data must be torch.float8_e4m3fn or torch.float8_e5m2, got ",
              data.scalar_type());
  check_out_dtype(op, dtype);
  const Fp8Layout layout = fp8_layout(op, data.size(0), data.size(1), granularity);
  if (layout.per_tensor) {
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 0, op,
                ": scale must be a float32 0-d tensor for granularity \"tensor\", got ",
                scale.scalar_type(), " of shape ", scale.sizes());
    TORCH_CHECK(scale.device() == data.device(), op, ": scale must be on data's device ",
                data.device(), ", got ", scale.device(), "; move it with scale.to(data.device)");
  } else {
    check_scale(op, scale, data, at::kFloat, "float32", layout.scale_rows, layout.scale_cols);
  }
  return layout;
}

Element quantize_mx_check(const at::Tensor& x, const std::string& elem) {
  check_input("quantize_mx", x);
  if (elem == "e4m3") return Element::kE4M3;
  TORCH_CHECK(elem == "e2m1", "quantize_mx: elem must be \"e4m3\" (MXFP8) or \"e2m1\" (MXFP4), got \"",
              elem, "\"");
  check_even_cols("quantize_mx", x);
  return Element::kE2M1;
}

int64_t dequantize_mx_check(const at::Tensor& data, const at::Tensor& scale, at::ScalarType dtype) {
  const char* op = "dequantize_mx";
  const bool fp4 = data.scalar_type() == at::kFloat4_e2m1fn_x2;
  TORCH_CHECK(fp4 || data.scalar_type() == at::kFloat8_e4m3fn, op,
              ": data must be torch.float8_e4m3fn (MXFP8) or torch.float4_e2m1fn_x2 (MXFP4), got ",
              data.scalar_type());
  check_data(op, data, fp4);
  check_out_dtype(op, dtype);
  const int64_t cols = fp4 ? 2 * data.size(1) : data.size(1);
  check_scale(op, scale, data, at::kFloat8_e8m0fnu, "torch.float8_e8m0fnu", data.size(0),
              ceil_div(cols, kMxBlock));
  return cols;
}

void quantize_nvfp4_check(const at::Tensor& x, int64_t block_rows) {
  check_input("quantize_nvfp4", x);
  check_even_cols("quantize_nvfp4", x);
  TORCH_CHECK(block_rows == 1 || block_rows == 16, "quantize_nvfp4: block_rows must be 1 (1x16 blocks) or 16 ",
              "(16x16 tiles, the 2-D weight scaling), got ", block_rows);
}

int64_t dequantize_nvfp4_check(const at::Tensor& data, const at::Tensor& scale,
                               const at::Tensor& global_scale, at::ScalarType dtype) {
  const char* op = "dequantize_nvfp4";
  check_data(op, data, true);
  check_out_dtype(op, dtype);
  const int64_t cols = 2 * data.size(1);
  check_scale(op, scale, data, at::kFloat8_e4m3fn, "torch.float8_e4m3fn", data.size(0),
              ceil_div(cols, kNvfp4Block));
  TORCH_CHECK(global_scale.scalar_type() == at::kFloat && global_scale.dim() == 0, op,
              ": global_scale must be a float32 0-d tensor, got ", global_scale.scalar_type(),
              " of shape ", global_scale.sizes());
  TORCH_CHECK(global_scale.device() == data.device(), op,
              ": global_scale must be on data's device ", data.device(), ", got ",
              global_scale.device(), "; move it with global_scale.to(data.device)");
  return cols;
}

}  // namespace plait::quant
