// plait::gf256_matmul_(outs, ins, coefs): outs[i] = XOR_j coefs[i, j] * ins[j] over
// GF(2^8) (polynomial 0x11d), the whole Reed-Solomon encode or decode of one stripe in
// one pass: each input byte is read once and each output byte written once, where k + m
// calls of gf256_mul_add_ would read and write every output k times.
//
// Shared by the CPU kernel (gf256_matmul_cpu.cpp, which defines the checks) and the
// CUDA one (gf256_matmul_cuda.cu), so both accept exactly the same arguments and word
// their errors the same way.
#pragma once

#include "ec/gf256_kernels.h"  // kMatmulMaxIns, kMatmulMaxOuts

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace plait::ec {

// Argument checks of plait::gf256_matmul_, the same for every backend: counts, dtypes,
// contiguity, equal lengths, one device, coefs' shape and place, and that no output
// shares a byte with an input or another output. Defined in gf256_matmul_cpu.cpp.
void gf256_matmul_check(at::TensorList outs, at::TensorList ins, const at::Tensor& coefs);

}  // namespace plait::ec
