// Shared by the CPU and CUDA kernels of plait::lsh_hash and plait::lsh_bucket_reduce:
// argument checks (defined in lsh_cpu.cpp, so both backends refuse the same inputs in
// the same words) and the small integer helpers of the key layout.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace plait::lsh {

// The smallest power of two >= n (n >= 1): the length of the Walsh-Hadamard transform.
inline int64_t padded_length(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Bits of one hash's code, ceil(log2(2 * dim)): codes are in [0, 2 * dim).
inline int64_t code_bits(int64_t dim) {
  int64_t bits = 0;
  while ((int64_t{1} << bits) < 2 * dim) ++bits;
  return bits;
}

// Keys are sums code_h * (2 * dim)^h; this many hashes * code_bits(dim) bits must fit
// below the sign bit of an int64 with one bit to spare.
constexpr int64_t kMaxKeyBits = 62;

struct HashShape {
  int64_t rows;     // N
  int64_t width;    // d
  int64_t padded;   // P
  int64_t hashes;
  int64_t dim;      // p, the number of coordinates the code looks at
};

// Checks x [N, d] (float32 or bfloat16, contiguous), signs int8 [hashes, 3, P]
// (contiguous, on x's device) and 1 <= dim <= P, and that the key fits an int64.
// The values of signs (each +1 or -1) are checked only where they are on the CPU.
HashShape lsh_hash_check(const at::Tensor& x, const at::Tensor& signs, int64_t dim);

// Checks x [N, d] (float32, bfloat16 or float64, contiguous), keys int64 [N] on x's
// device, segments int64 [S] (CPU or x's device) with entries >= 0 summing to N.
// Returns the S + 1 row offsets of the segments (read on the host).
std::vector<int64_t> lsh_bucket_reduce_check(const at::Tensor& x, const at::Tensor& keys,
                                             const at::Tensor& segments);

}  // namespace plait::lsh
