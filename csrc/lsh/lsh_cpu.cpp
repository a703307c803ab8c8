// CPU kernels of plait::lsh_hash and plait::lsh_bucket_reduce (LSH-MoE: tokens bound for
// the same expert are hashed with cross-polytope LSH, and the tokens of one bucket are
// sent as their mean). The argument checks shared with the CUDA kernels live here too.
//
// lsh_hash: each token x (padded with zeros to P, a power of two) is rotated by
// H D3 H D2 H D1 per hash function, H the unnormalised Walsh-Hadamard transform, Di the
// sign diagonals of signs[h, i]; the code is 2 j* + [y_j* < 0], j* = argmax_{j < dim} |y_j|
// (lowest j on ties). Neither H's 1/sqrt(P) nor a normalisation of x changes j* or the
// sign of y_j*, so both are skipped. Only additions, subtractions and sign flips touch
// the values, in float32 and in a fixed order per element (the butterfly stages with
// half = 1, 2, 4, ...), so the pure-PyTorch reference and the CUDA kernel compute the
// very same y, bit for bit. Tokens go through in tiles of kTile, stored coordinate-major
// ([P][kTile]), so the innermost loop of every butterfly runs over kTile independent
// tokens and vectorises whatever the stage's half, and stages go two per sweep over the
// tile (half the loads and stores); a tile is the unit of at::parallel_for.
//
// lsh_bucket_reduce: one pass per segment with a hash map from key to the segment's next
// centroid slot (slots in order of first appearance), then sums in float64 in row order
// and one division per element, rounded to x's dtype. Segments run in parallel.
#include "lsh/lsh.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace plait::lsh {

HashShape lsh_hash_check(const at::Tensor& x, const at::Tensor& signs, int64_t dim) {
  TORCH_CHECK(x.dim() == 2, "lsh_hash: x must be 2-D [tokens, hidden], got shape ", x.sizes(),
              "; flatten the leading dimensions with x.reshape(-1, x.shape[-1])");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "lsh_hash: x must be float32 or bfloat16, got ", x.scalar_type(),
              "; convert it with x.float()");
  TORCH_CHECK(x.size(1) >= 1, "lsh_hash: x must have at least one column, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "lsh_hash: x must be contiguous, got strides ", x.strides(),
              "; pass x.contiguous()");
  const int64_t padded = padded_length(x.size(1));
  TORCH_CHECK(signs.scalar_type() == at::kChar, "lsh_hash: signs must be int8, got ",
              signs.scalar_type(), "; draw them with plait.ops.lsh_signs(hashes, d, seed)");
  TORCH_CHECK(signs.dim() == 3 && signs.size(0) >= 1 && signs.size(1) == 3 &&
                  signs.size(2) == padded,
              "lsh_hash: signs must have shape [hashes >= 1, 3, ", padded,
              "] (3 sign diagonals of the padded length P = ", padded, " for d = ", x.size(1),
              "), got ", signs.sizes(), "; draw them with plait.ops.lsh_signs(hashes, ",
              x.size(1), ", seed)");
  TORCH_CHECK(signs.is_contiguous(), "lsh_hash: signs must be contiguous, got strides ",
              signs.strides(), "; pass signs.contiguous()");
  TORCH_CHECK(signs.device() == x.device(), "lsh_hash: signs must be on x's device ", x.device(),
              ", got ", signs.device(), "; move them with signs.to(x.device)");
  TORCH_CHECK(dim >= 1 && dim <= padded, "lsh_hash: dim must be in [1, P] = [1, ", padded,
              "] (P: d = ", x.size(1), " padded to a power of two), got ", dim);
  const int64_t hashes = signs.size(0);
  TORCH_CHECK(hashes * code_bits(dim) <= kMaxKeyBits, "lsh_hash: ", hashes,
              " hashes of ", code_bits(dim), " bits each (codes in [0, 2 * dim) = [0, ", 2 * dim,
              ")) need ", hashes * code_bits(dim), " bits, but a key holds at most ", kMaxKeyBits,
              "; use at most ", kMaxKeyBits / code_bits(dim), " hashes or a smaller dim");
  if (signs.device().is_cpu()) {
    const int8_t* s = signs.const_data_ptr<int8_t>();
    for (int64_t i = 0; i < signs.numel(); ++i) {
      TORCH_CHECK(s[i] == 1 || s[i] == -1, "lsh_hash: signs must hold only +1 and -1, got ",
                  static_cast<int>(s[i]), " at flat position ", i,
                  "; draw them with plait.ops.lsh_signs(hashes, d, seed)");
    }
  }
  return {x.size(0), x.size(1), padded, hashes, dim};
}

std::vector<int64_t> lsh_bucket_reduce_check(const at::Tensor& x, const at::Tensor& keys,
                                             const at::Tensor& segments) {
  TORCH_CHECK(x.dim() == 2, "lsh_bucket_reduce: x must be 2-D [tokens, hidden], got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble,
              "lsh_bucket_reduce: x must be float32, bfloat16 or float64, got ", x.scalar_type(),
              "; convert it with x.float()");
  TORCH_CHECK(x.is_contiguous(), "lsh_bucket_reduce: x must be contiguous, got strides ",
              x.strides(), "; pass x.contiguous()");
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.dim() == 1 && keys.size(0) == x.size(0),
              "lsh_bucket_reduce: keys must be int64 [N] with N = ", x.size(0),
              " (one key per row of x, from lsh_hash), got ", keys.scalar_type(), " ",
              keys.sizes());
  TORCH_CHECK(keys.is_contiguous(), "lsh_bucket_reduce: keys must be contiguous, got strides ",
              keys.strides(), "; pass keys.contiguous()");
  TORCH_CHECK(keys.device() == x.device(), "lsh_bucket_reduce: keys must be on x's device ",
              x.device(), ", got ", keys.device(), "; move them with keys.to(x.device)");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 1,
              "lsh_bucket_reduce: segments must be a 1-D int64 tensor of row counts, got ",
              segments.scalar_type(), " ", segments.sizes());
  TORCH_CHECK(segments.device().is_cpu() || segments.device() == x.device(),
              "lsh_bucket_reduce: segments must be on the CPU or on x's device ", x.device(),
              ", got ", segments.device());
  const at::Tensor counts = segments.device().is_cpu() ? segments.contiguous()
                                                       : segments.to(at::kCPU).contiguous();
  const int64_t* c = counts.const_data_ptr<int64_t>();
  std::vector<int64_t> offsets(static_cast<size_t>(counts.numel()) + 1, 0);
  for (int64_t s = 0; s < counts.numel(); ++s) {
    TORCH_CHECK(c[s] >= 0, "lsh_bucket_reduce: segments[", s, "] = ", c[s],
                " is negative; each entry is the number of rows of one segment");
    offsets[s + 1] = offsets[s] + c[s];
  }
  TORCH_CHECK(offsets.back() == x.size(0), "lsh_bucket_reduce: segments must sum to N = ",
              x.size(0), " (the rows of x), got ", offsets.back(),
              "; give the row count of every (rank, expert) segment, empty ones as 0");
  return offsets;
}

namespace {

// Tokens per tile: 8 float32 lanes, one AVX register or two SSE ones.
constexpr int64_t kTile = 8;
// Tiles per task of at::parallel_for.
constexpr int64_t kTilesPerTask = 4;

void flip_signs(float* __restrict__ v, const float* __restrict__ sign, int64_t padded) {
  for (int64_t i = 0; i < padded; ++i) {
    for (int64_t t = 0; t < kTile; ++t) v[i * kTile + t] *= sign[i];
  }
}

void butterfly(float* __restrict__ a, float* __restrict__ b) {
  for (int64_t t = 0; t < kTile; ++t) {
    const float sum = a[t] + b[t];
    const float diff = a[t] - b[t];
    a[t] = sum;
    b[t] = diff;
  }
}

// Stages half = h and 2h at once on the four rows i, i + h, i + 2h, i + 3h: the pairs
// (a, b), (c, d) of stage h, then (a, c), (b, d) of stage 2h. Each value goes through
// the same additions and subtractions as with one stage per sweep, with half the loads
// and stores.
void butterfly2(float* __restrict__ a, float* __restrict__ b, float* __restrict__ c,
                float* __restrict__ d) {
  for (int64_t t = 0; t < kTile; ++t) {
    const float ab_sum = a[t] + b[t];
    const float ab_diff = a[t] - b[t];
    const float cd_sum = c[t] + d[t];
    const float cd_diff = c[t] - d[t];
    a[t] = ab_sum + cd_sum;
    c[t] = ab_sum - cd_sum;
    b[t] = ab_diff + cd_diff;
    d[t] = ab_diff - cd_diff;
  }
}

// The unnormalised Walsh-Hadamard transform of every token of a [P][kTile] tile:
// stages half = 1, 2, 4, ... in order, two per sweep, and a last single one for odd log2 P.
void hadamard(float* v, int64_t padded) {
  int64_t half = 1;
  for (; 4 * half <= padded; half *= 4) {
    for (int64_t base = 0; base < padded; base += 4 * half) {
      for (int64_t i = base; i < base + half; ++i) {
        butterfly2(v + i * kTile, v + (i + half) * kTile, v + (i + 2 * half) * kTile,
                   v + (i + 3 * half) * kTile);
      }
    }
  }
  if (half < padded) {
    for (int64_t i = 0; i < half; ++i) butterfly(v + i * kTile, v + (i + half) * kTile);
  }
}

// One hash's rotation H D3 H D2 H D1 of a tile, in place; sign: the hash's 3 diagonals.
void rotate(float* v, const float* sign, int64_t padded) {
  for (int64_t stage = 0; stage < 3; ++stage) {
    flip_signs(v, sign + stage * padded, padded);
    hadamard(v, padded);
  }
}

template <typename scalar_t>
void hash_tile(const scalar_t* x, int64_t rows, const HashShape& shape,
               const float* sign, float* tile, float* work, int64_t* keys) {
  const int64_t padded = shape.padded;
  std::fill(tile, tile + padded * kTile, 0.0f);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t i = 0; i < shape.width; ++i) {
      tile[i * kTile + t] = static_cast<float>(x[t * shape.width + i]);
    }
  }
  int64_t key[kTile] = {};
  int64_t radix_power = 1;
  for (int64_t h = 0; h < shape.hashes; ++h) {
    std::copy(tile, tile + padded * kTile, work);
    rotate(work, sign + h * 3 * padded, padded);
    for (int64_t t = 0; t < rows; ++t) {
      float best = -1.0f;  // below every |y_j|, so j = 0 wins a zero vector
      int64_t arg = 0;
      for (int64_t j = 0; j < shape.dim; ++j) {
        const float magnitude = std::fabs(work[j * kTile + t]);
        if (magnitude > best) {
          best = magnitude;
          arg = j;
        }
      }
      const int64_t code = 2 * arg + (work[arg * kTile + t] < 0.0f ? 1 : 0);
      key[t] += code * radix_power;
    }
    radix_power *= 2 * shape.dim;
  }
  std::copy(key, key + rows, keys);
}

at::Tensor lsh_hash_cpu(const at::Tensor& x, const at::Tensor& signs, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu(), "lsh_hash: expected CPU tensors, got x on ", x.device());
  const HashShape shape = lsh_hash_check(x, signs, dim);
  at::Tensor keys = x.new_empty({shape.rows}, x.options().dtype(at::kLong));
  if (shape.rows == 0) return keys;

  // The sign diagonals as +-1.0f: a multiplication by them is exact, like a sign flip.
  std::vector<float> sign(static_cast<size_t>(signs.numel()));
  const int8_t* s = signs.const_data_ptr<int8_t>();
  for (size_t i = 0; i < sign.size(); ++i) sign[i] = static_cast<float>(s[i]);

  int64_t* out = keys.mutable_data_ptr<int64_t>();
  const int64_t tiles = (shape.rows + kTile - 1) / kTile;
  const auto hash_rows = [&](const auto* data) {
    at::parallel_for(0, tiles, kTilesPerTask, [&](int64_t t0, int64_t t1) {
      std::vector<float> tile(shape.padded * kTile), work(shape.padded * kTile);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = t * kTile;
        hash_tile(data + row * shape.width, std::min(kTile, shape.rows - row), shape,
                  sign.data(), tile.data(), work.data(), out + row);
      }
    });
  };
  if (x.scalar_type() == at::kFloat) {
    hash_rows(x.const_data_ptr<float>());
  } else {
    hash_rows(x.const_data_ptr<c10::BFloat16>());
  }
  return keys;
}

// float64 -> x's dtype; bfloat16 through float32 (as torch's own casts round it).
template <typename scalar_t>
scalar_t round_mean(double mean) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return mean;
  } else {
    return static_cast<scalar_t>(static_cast<float>(mean));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsh_bucket_reduce_cpu(
    const at::Tensor& x, const at::Tensor& keys, const at::Tensor& segments) {
  TORCH_CHECK(x.device().is_cpu(), "lsh_bucket_reduce: expected CPU tensors, got x on ",
              x.device());
  const std::vector<int64_t> offsets = lsh_bucket_reduce_check(x, keys, segments);
  const int64_t nsegments = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t width = x.size(1);
  const auto long_options = x.options().dtype(at::kLong);
  at::Tensor index = x.new_empty({x.size(0)}, long_options);
  at::Tensor segment_centroids = x.new_empty({nsegments}, long_options);
  const int64_t* key = keys.const_data_ptr<int64_t>();
  int64_t* slot = index.mutable_data_ptr<int64_t>();
  int64_t* per_segment = segment_centroids.mutable_data_ptr<int64_t>();

  // Pass 1: each row's slot within its segment, slots numbered by first appearance.
  at::parallel_for(0, nsegments, 1, [&](int64_t s0, int64_t s1) {
    std::unordered_map<int64_t, int64_t> slots;
    for (int64_t s = s0; s < s1; ++s) {
      slots.clear();
      slots.reserve(static_cast<size_t>(offsets[s + 1] - offsets[s]));
      for (int64_t t = offsets[s]; t < offsets[s + 1]; ++t) {
        slot[t] = slots.try_emplace(key[t], static_cast<int64_t>(slots.size())).first->second;
      }
      per_segment[s] = static_cast<int64_t>(slots.size());
    }
  });
  std::vector<int64_t> first_centroid(static_cast<size_t>(nsegments) + 1, 0);
  for (int64_t s = 0; s < nsegments; ++s) first_centroid[s + 1] = first_centroid[s] + per_segment[s];
  const int64_t total = first_centroid.back();
  at::Tensor centroids = x.new_empty({total, width});
  at::Tensor counts = x.new_empty({total}, long_options);
  int64_t* count = counts.mutable_data_ptr<int64_t>();

  // Pass 2: float64 sums in row order, then the mean rounded once to x's dtype.
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lsh_bucket_reduce", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    scalar_t* out = centroids.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nsegments, 1, [&](int64_t s0, int64_t s1) {
      std::vector<double> sums;
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t base = first_centroid[s];
        const int64_t local = per_segment[s];
        sums.assign(static_cast<size_t>(local * width), 0.0);
        std::fill(count + base, count + base + local, 0);
        for (int64_t t = offsets[s]; t < offsets[s + 1]; ++t) {
          double* sum = sums.data() + slot[t] * width;
          const scalar_t* row = data + t * width;
          for (int64_t j = 0; j < width; ++j) sum[j] += static_cast<double>(row[j]);
          ++count[base + slot[t]];
          slot[t] += base;
        }
        for (int64_t c = 0; c < local; ++c) {
          const double n = static_cast<double>(count[base + c]);
          for (int64_t j = 0; j < width; ++j) {
            out[(base + c) * width + j] = round_mean<scalar_t>(sums[c * width + j] / n);
          }
        }
      }
    });
  });
  return {centroids, counts, index, segment_centroids};
}

}  // namespace
}  // namespace plait::lsh

TORCH_LIBRARY_IMPL(plait, CPU, m) {
  m.impl("lsh_hash", &plait::lsh::lsh_hash_cpu);
  m.impl("lsh_bucket_reduce", &plait::lsh::lsh_bucket_reduce_cpu);
}
