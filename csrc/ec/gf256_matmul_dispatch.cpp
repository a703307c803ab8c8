// The CPU kernels of gf256_matmul_ and the choice between them; see
// gf256_matmul_dispatch.h. Also the op plait::gf256_matmul_kernels, which lists them.
#include "ec/gf256_matmul_dispatch.h"

#include "cpu/features.h"

#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace plait::ec {
namespace {

bool always() { return true; }

#if defined(__x86_64__)
bool has_avx2() { return cpu::features().avx2; }
bool has_avx512() { return cpu::features().avx512f && cpu::features().avx512bw; }
bool has_gfni_avx2() { return cpu::features().gfni && cpu::features().avx2; }
bool has_gfni_avx512() { return cpu::features().gfni && has_avx512(); }
#endif

// In the order of preference of the default. The GFNI kernels first: one instruction per
// product where the nibble kernels need five; then the wider vectors.
constexpr MatmulKernel kKernels[] = {
#if defined(__x86_64__)
    {"gfni_avx512", "GFNI, AVX-512 F and BW", has_gfni_avx512, matmul_block_gfni_avx512, 64,
     MatmulTables::kAffine, true},
    {"avx512", "AVX-512 F and BW", has_avx512, matmul_block_avx512, 64, MatmulTables::kNibble,
     true},
    {"gfni_avx2", "GFNI and AVX2", has_gfni_avx2, matmul_block_gfni_avx2, 32,
     MatmulTables::kAffine, true},
    {"avx2", "AVX2", has_avx2, matmul_block_avx2, 32, MatmulTables::kNibble, true},
#endif
    {"scalar", "nothing", always, nullptr, 1, MatmulTables::kRows, true},
    {"gfni_emulated", "nothing", always, matmul_block_gfni_emulated, 32, MatmulTables::kAffine,
     false},
};

std::string kernel_names(bool runnable_only) {
  std::string names;
  for (const MatmulKernel& k : kKernels) {
    if (runnable_only && !k.runs_here()) continue;
    if (!names.empty()) names += ", ";
    names += k.name;
  }
  return names;
}

// The kernel called `name`, or an error naming it: unknown, or not runnable here.
const MatmulKernel* find(std::string_view name, std::string* error, const char* source) {
  for (const MatmulKernel& k : kKernels) {
    if (name != k.name) continue;
    if (k.runs_here()) return &k;
    *error = std::string(source) + " '" + std::string(name) + "' needs " + k.needs +
             ", which this CPU lacks; it runs: " + kernel_names(true);
    return nullptr;
  }
  *error = std::string(source) + " '" + std::string(name) +
           "' is not a gf256_matmul_ CPU kernel; pick one of: " + kernel_names(false) +
           " (this CPU runs: " + kernel_names(true) + ")";
  return nullptr;
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

struct DefaultKernel {
  const MatmulKernel* kernel = nullptr;
  std::string error;  // why PLAIT_GF256_KERNEL could not be used
};

const DefaultKernel& default_kernel() {
  static const DefaultKernel chosen = [] {
    DefaultKernel d;
    const char* forced = std::getenv("PLAIT_GF256_KERNEL");
    if (forced != nullptr && forced[0] != '\0') {
      d.kernel = find(forced, &d.error, "PLAIT_GF256_KERNEL");
      return d;
    }
    const bool no_simd = env_flag("PLAIT_GF256_NO_SIMD");
    for (const MatmulKernel& k : kKernels) {
      if (!k.automatic || !k.runs_here()) continue;
      if (no_simd && k.block_for != nullptr) continue;
      d.kernel = &k;
      break;
    }
    return d;
  }();
  return chosen;
}

// plait::gf256_matmul_kernels(): the kernels this CPU runs, the default first, then the
// others in order of preference (so that tests can run every one and name the rest).
// With all=True, every kernel of this build, runnable here or not.
std::vector<std::string> gf256_matmul_kernels(bool all) {
  std::vector<std::string> names;
  const DefaultKernel& d = default_kernel();
  if (!all && d.kernel != nullptr) names.emplace_back(d.kernel->name);
  for (const MatmulKernel& k : kKernels) {
    if (!all && (&k == d.kernel || !k.runs_here())) continue;
    names.emplace_back(k.name);
  }
  return names;
}

}  // namespace

const MatmulKernel& matmul_kernel(std::optional<std::string_view> name) {
  if (name.has_value()) {
    std::string error;
    const MatmulKernel* k = find(*name, &error, "gf256_matmul_: kernel");
    TORCH_CHECK(k != nullptr, error);
    return *k;
  }
  const DefaultKernel& d = default_kernel();
  TORCH_CHECK(d.kernel != nullptr, "gf256_matmul_: ", d.error,
              "; unset PLAIT_GF256_KERNEL or name one of those");
  return *d.kernel;
}

}  // namespace plait::ec

TORCH_LIBRARY_IMPL(plait, CompositeExplicitAutograd, m) {
  m.impl("gf256_matmul_kernels", &plait::ec::gf256_matmul_kernels);
}
