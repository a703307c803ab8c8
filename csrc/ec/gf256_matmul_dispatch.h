// Which CPU kernel of gf256_matmul_ runs: the kernels this build has, which of them the
// CPU can execute (cpu::features()), the default, and the one a call names.
#pragma once

#include "ec/gf256_kernels.h"

#include <optional>
#include <string_view>

namespace plait::ec {

// How the op prepares a call's per-coefficient tables for a kernel.
enum class MatmulTables {
  kRows,    // the scalar kernel: 256-byte product rows (Gf256Row)
  kNibble,  // Gf256NibbleTables, 32 bytes
  kAffine,  // gf256_affine_matrix, 8 bytes
};

struct MatmulKernel {
  const char* name;
  const char* needs;  // the instructions it needs, in words, for error messages
  bool (*runs_here)();
  MatmulBlockFn (*block_for)(int m);  // nullptr for the scalar kernel
  int width;                          // bytes per vector; the op does the tail
  MatmulTables tables;
  bool automatic;                     // may be the default (the emulated one is not)
};

// The kernel for a call: `name` if given (it must be one this CPU runs), else the
// default: PLAIT_GF256_KERNEL if set, the scalar kernel if PLAIT_GF256_NO_SIMD is set
// (not "" or "0"), else the first automatic kernel the CPU runs, in the order
// gfni_avx512, avx512, gfni_avx2, avx2, scalar. The variables are read once.
// Raises (TORCH_CHECK) naming the bad name and the kernels that would run.
const MatmulKernel& matmul_kernel(std::optional<std::string_view> name);

}  // namespace plait::ec
