// CUDA kernels of plait::lsh_hash and plait::lsh_bucket_reduce, on the current stream of
// x's device. Same arguments, checks (lsh.h) and results as the CPU kernels, bit for bit.
//
// lsh_hash: one block per token. The padded token lives in shared memory (P floats);
// each butterfly stage (half = 1, 2, 4, ...: the CPU kernel's order) is one sweep of the
// block over the P/2 pairs, then a barrier, so every element sees the same additions and
// subtractions in the same order as on the CPU. The argmax is a block reduction that
// keeps the larger |y_j| and, on equal ones, the lower j: the CPU's first maximum.
//
// lsh_bucket_reduce: sort-based, deterministic, with the CPU's output order.
//  1. A stable segmented sort of (key, row) per segment: a bucket becomes a run of equal
//     keys whose rows ascend, so its head holds the bucket's first row.
//  2. Marking each bucket's first row and an inclusive sum over rows gives every bucket
//     its centroid number in order of first appearance (segment-major, since segments
//     are row ranges); the total is C (the one host sync, to size the outputs).
//  3. Each run maps to its centroid; each row gets its index; counts by integer atomics.
//  4. One thread per (centroid, column) sums the run's rows in float64 in row order (the
//     run's order) and rounds the mean once, as the CPU does.
// Headers stay at the c10/ATen-core level (plus CUB), as in csrc/ec/*.cu.
#include "lsh/lsh.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace plait::lsh {
namespace {

constexpr int kMaxHashThreads = 256;
// The static shared memory of lsh_hash_kernel's argmax, next to the dynamic P floats.
constexpr int64_t kReductionSharedBytes = (kMaxHashThreads / 32) * (sizeof(float) + sizeof(int));
constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// The larger magnitude wins; on equal magnitudes, the lower index (the first maximum).
__device__ __forceinline__ void keep_best(float& best, int& arg, float other_best, int other_arg) {
  if (other_best > best || (other_best == best && other_arg < arg)) {
    best = other_best;
    arg = other_arg;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxHashThreads)
    lsh_hash_kernel(const scalar_t* __restrict__ x, const int8_t* __restrict__ signs,
                    int64_t* __restrict__ keys, int64_t width, int64_t padded, int64_t hashes,
                    int64_t dim) {
  extern __shared__ float y[];
  __shared__ float warp_best[kMaxHashThreads / 32];
  __shared__ int warp_arg[kMaxHashThreads / 32];
  const scalar_t* token = x + static_cast<int64_t>(blockIdx.x) * width;
  const int tid = threadIdx.x;
  int64_t key = 0;
  int64_t radix_power = 1;
  for (int64_t h = 0; h < hashes; ++h) {
    for (int stage = 0; stage < 3; ++stage) {
      const int8_t* sign = signs + (h * 3 + stage) * padded;
      for (int64_t i = tid; i < padded; i += blockDim.x) {
        const float v = stage > 0 ? y[i] : (i < width ? static_cast<float>(token[i]) : 0.0f);
        y[i] = sign[i] < 0 ? -v : v;
      }
      __syncthreads();
      for (int64_t half = 1; half < padded; half <<= 1) {
        for (int64_t k = tid; k < padded / 2; k += blockDim.x) {
          const int64_t i = (k / half) * 2 * half + (k % half);
          const float a = y[i];
          const float b = y[i + half];
          y[i] = a + b;
          y[i + half] = a - b;
        }
        __syncthreads();
      }
    }
    float best = -1.0f;  // below every |y_j|; NaN never wins, as on the CPU
    int arg = INT_MAX;
    for (int64_t j = tid; j < dim; j += blockDim.x) {
      keep_best(best, arg, fabsf(y[j]), static_cast<int>(j));
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other_best = __shfl_down_sync(0xffffffffu, best, offset);
      const int other_arg = __shfl_down_sync(0xffffffffu, arg, offset);
      keep_best(best, arg, other_best, other_arg);
    }
    if (tid % 32 == 0) {
      warp_best[tid / 32] = best;
      warp_arg[tid / 32] = arg;
    }
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
        keep_best(best, arg, warp_best[w], warp_arg[w]);
      }
      if (arg >= dim) arg = 0;  // every |y_j| NaN: the CPU kernel's j = 0
      const int64_t code = 2 * static_cast<int64_t>(arg) + (y[arg] < 0.0f ? 1 : 0);
      key += code * radix_power;
    }
    radix_power *= 2 * dim;
    __syncthreads();  // y is overwritten by the next hash
  }
  if (tid == 0) keys[blockIdx.x] = key;
}

at::Tensor lsh_hash_cuda(const at::Tensor& x, const at::Tensor& signs, int64_t dim) {
  TORCH_CHECK(x.is_cuda(), "lsh_hash: expected CUDA tensors, got x on ", x.device());
  const HashShape shape = lsh_hash_check(x, signs, dim);
  at::Tensor keys = x.new_empty({shape.rows}, x.options().dtype(at::kLong));
  if (shape.rows == 0) return keys;
  TORCH_CHECK(shape.rows <= INT_MAX, "lsh_hash: at most ", INT_MAX,
              " rows per call on CUDA, got ", shape.rows, "; hash the rows in chunks");

  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.device().index();
  int shared_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t shared_bytes = shape.padded * static_cast<int64_t>(sizeof(float));
  TORCH_CHECK(shared_bytes + kReductionSharedBytes <= shared_limit, "lsh_hash: d = ", shape.width, " pads to P = ",
              shape.padded, ", whose ", shared_bytes, " bytes exceed the ", shared_limit,
              " bytes of shared memory per block of this GPU; hash a projection of x to at most ",
              (shared_limit - kReductionSharedBytes) / 4, " columns");
  const int threads = static_cast<int>(std::clamp<int64_t>(shape.padded / 2, 32, kMaxHashThreads));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const auto launch = [&](auto kernel, const auto* data) {
    if (shared_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
    }
    kernel<<<static_cast<unsigned>(shape.rows), threads, shared_bytes, stream>>>(
        data, signs.const_data_ptr<int8_t>(), keys.mutable_data_ptr<int64_t>(), shape.width,
        shape.padded, shape.hashes, shape.dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (x.scalar_type() == at::kFloat) {
    launch(lsh_hash_kernel<float>, x.const_data_ptr<float>());
  } else {
    launch(lsh_hash_kernel<c10::BFloat16>, x.const_data_ptr<c10::BFloat16>());
  }
  return keys;
}

__global__ void iota_kernel(int64_t* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i;
}

// The segment holding row (or sorted position) i: the last s with offsets[s] <= i.
__device__ int64_t segment_of(const int64_t* offsets, int64_t nsegments, int64_t i) {
  int64_t lo = 0;
  int64_t hi = nsegments;  // offsets[nsegments] = N > i
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= i) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// head[i] = 1 where sorted position i starts a run of equal keys within its segment; the
// row there is its bucket's first row.
__global__ void mark_heads_kernel(const int64_t* sorted_keys, const int64_t* sorted_rows,
                                  const int64_t* offsets, int64_t nsegments, int64_t n,
                                  int64_t* head, int64_t* first_of_bucket) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t start = offsets[segment_of(offsets, nsegments, i)];
  const int64_t is_head = (i == start || sorted_keys[i] != sorted_keys[i - 1]) ? 1 : 0;
  head[i] = is_head;
  first_of_bucket[sorted_rows[i]] = is_head;
}

// centroid_rank: inclusive sum of first_of_bucket in row order; run_number: inclusive sum
// of head in sorted order.
__global__ void map_runs_kernel(const int64_t* head, const int64_t* sorted_rows,
                                const int64_t* centroid_rank, const int64_t* run_number,
                                int64_t n, int64_t* run_centroid, int64_t* run_begin) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || head[i] == 0) return;
  const int64_t c = centroid_rank[sorted_rows[i]] - 1;
  run_centroid[run_number[i] - 1] = c;
  run_begin[c] = i;
}

__global__ void assign_rows_kernel(const int64_t* sorted_rows, const int64_t* run_number,
                                   const int64_t* run_centroid, int64_t n, int64_t* index,
                                   unsigned long long* counts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t c = run_centroid[run_number[i] - 1];
  index[sorted_rows[i]] = c;
  atomicAdd(counts + c, 1ull);
}

__global__ void count_segment_centroids_kernel(const int64_t* offsets, const int64_t* centroid_rank,
                                               int64_t nsegments, int64_t* segment_centroids) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= nsegments) return;
  const int64_t begin = offsets[s];
  const int64_t end = offsets[s + 1];
  const int64_t before = begin > 0 ? centroid_rank[begin - 1] : 0;
  segment_centroids[s] = end > begin ? centroid_rank[end - 1] - before : 0;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t round_mean(double mean) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return mean;
  } else {
    return static_cast<scalar_t>(static_cast<float>(mean));  // bfloat16 through float32
  }
}

// blockIdx.x: centroid; blockIdx.y * blockDim.x + threadIdx.x: column.
template <typename scalar_t>
__global__ void centroid_kernel(const scalar_t* __restrict__ x, const int64_t* sorted_rows,
                                const int64_t* run_begin, const int64_t* counts, int64_t width,
                                scalar_t* __restrict__ centroids) {
  const int64_t c = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= width) return;
  const int64_t begin = run_begin[c];
  const int64_t count = counts[c];
  double sum = 0.0;
  for (int64_t k = 0; k < count; ++k) {
    sum += static_cast<double>(x[sorted_rows[begin + k] * width + j]);
  }
  centroids[c * width + j] = round_mean<scalar_t>(sum / static_cast<double>(count));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsh_bucket_reduce_cuda(
    const at::Tensor& x, const at::Tensor& keys, const at::Tensor& segments) {
  TORCH_CHECK(x.is_cuda(), "lsh_bucket_reduce: expected CUDA tensors, got x on ", x.device());
  const std::vector<int64_t> host_offsets = lsh_bucket_reduce_check(x, keys, segments);
  const int64_t nsegments = static_cast<int64_t>(host_offsets.size()) - 1;
  const int64_t n = x.size(0);
  const int64_t width = x.size(1);
  TORCH_CHECK(n <= INT_MAX && nsegments <= INT_MAX, "lsh_bucket_reduce: at most ", INT_MAX,
              " rows and segments per call on CUDA, got ", n, " rows and ", nsegments,
              " segments; reduce the segments in chunks");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const auto long_options = x.options().dtype(at::kLong);
  at::Tensor index = x.new_empty({n}, long_options);
  at::Tensor segment_centroids = x.new_zeros({nsegments}, long_options);
  if (n == 0) {
    return {x.new_empty({0, width}), x.new_empty({0}, long_options), index, segment_centroids};
  }

  at::Tensor offsets = x.new_empty({nsegments + 1}, long_options);
  // From pageable memory the copy has read host_offsets when it returns.
  C10_CUDA_CHECK(cudaMemcpyAsync(offsets.mutable_data_ptr<int64_t>(), host_offsets.data(),
                                 host_offsets.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
  at::Tensor rows = x.new_empty({n}, long_options);
  at::Tensor sorted_keys = x.new_empty({n}, long_options);
  at::Tensor sorted_rows = x.new_empty({n}, long_options);
  at::Tensor head = x.new_empty({n}, long_options);
  at::Tensor first_of_bucket = x.new_empty({n}, long_options);
  at::Tensor centroid_rank = x.new_empty({n}, long_options);
  at::Tensor run_number = x.new_empty({n}, long_options);
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int items = static_cast<int>(n);

  iota_kernel<<<blocks_for(n), kThreads, 0, stream>>>(rows.mutable_data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // One scratch buffer, sized for the largest of the three CUB calls.
  size_t sort_bytes = 0;
  size_t scan_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairs(
      nullptr, sort_bytes, keys.const_data_ptr<int64_t>(), sorted_keys.mutable_data_ptr<int64_t>(),
      rows.const_data_ptr<int64_t>(), sorted_rows.mutable_data_ptr<int64_t>(), items,
      static_cast<int>(nsegments), off, off + 1, stream));
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, head.const_data_ptr<int64_t>(),
                                               run_number.mutable_data_ptr<int64_t>(), items, stream));
  size_t scratch_bytes = std::max<size_t>({sort_bytes, scan_bytes, 1});
  at::Tensor scratch = x.new_empty({static_cast<int64_t>(scratch_bytes)}, x.options().dtype(at::kByte));
  void* scratch_ptr = scratch.mutable_data_ptr();

  C10_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairs(
      scratch_ptr, scratch_bytes, keys.const_data_ptr<int64_t>(), sorted_keys.mutable_data_ptr<int64_t>(),
      rows.const_data_ptr<int64_t>(), sorted_rows.mutable_data_ptr<int64_t>(), items,
      static_cast<int>(nsegments), off, off + 1, stream));
  mark_heads_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      sorted_keys.const_data_ptr<int64_t>(), sorted_rows.const_data_ptr<int64_t>(), off, nsegments, n,
      head.mutable_data_ptr<int64_t>(), first_of_bucket.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scratch_bytes = scratch.numel();
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(scratch_ptr, scratch_bytes,
                                               first_of_bucket.const_data_ptr<int64_t>(),
                                               centroid_rank.mutable_data_ptr<int64_t>(), items, stream));
  scratch_bytes = scratch.numel();
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(scratch_ptr, scratch_bytes, head.const_data_ptr<int64_t>(),
                                               run_number.mutable_data_ptr<int64_t>(), items, stream));

  int64_t total = 0;
  C10_CUDA_CHECK(cudaMemcpyAsync(&total, centroid_rank.const_data_ptr<int64_t>() + (n - 1), sizeof(int64_t),
                                 cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));

  at::Tensor run_centroid = x.new_empty({total}, long_options);
  at::Tensor run_begin = x.new_empty({total}, long_options);
  at::Tensor counts = x.new_zeros({total}, long_options);
  at::Tensor centroids = x.new_empty({total, width});
  map_runs_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      head.const_data_ptr<int64_t>(), sorted_rows.const_data_ptr<int64_t>(),
      centroid_rank.const_data_ptr<int64_t>(), run_number.const_data_ptr<int64_t>(), n,
      run_centroid.mutable_data_ptr<int64_t>(), run_begin.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  static_assert(sizeof(unsigned long long) == sizeof(int64_t));
  assign_rows_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      sorted_rows.const_data_ptr<int64_t>(), run_number.const_data_ptr<int64_t>(),
      run_centroid.const_data_ptr<int64_t>(), n, index.mutable_data_ptr<int64_t>(),
      reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  count_segment_centroids_kernel<<<blocks_for(nsegments), kThreads, 0, stream>>>(
      off, centroid_rank.const_data_ptr<int64_t>(), nsegments, segment_centroids.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (width > 0) {
    const dim3 grid(static_cast<unsigned>(total), static_cast<unsigned>(blocks_for(width)));
    const auto launch = [&](const auto* data, auto* out) {
      centroid_kernel<<<grid, kThreads, 0, stream>>>(data, sorted_rows.const_data_ptr<int64_t>(),
                                                     run_begin.const_data_ptr<int64_t>(),
                                                     counts.const_data_ptr<int64_t>(), width, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (x.scalar_type() == at::kFloat) {
      launch(x.const_data_ptr<float>(), centroids.mutable_data_ptr<float>());
    } else if (x.scalar_type() == at::kBFloat16) {
      launch(x.const_data_ptr<c10::BFloat16>(), centroids.mutable_data_ptr<c10::BFloat16>());
    } else {
      launch(x.const_data_ptr<double>(), centroids.mutable_data_ptr<double>());
    }
  }
  return {centroids, counts, index, segment_centroids};
}

}  // namespace
}  // namespace plait::lsh

TORCH_LIBRARY_IMPL(plait, CUDA, m) {
  m.impl("lsh_hash", &plait::lsh::lsh_hash_cuda);
  m.impl("lsh_bucket_reduce", &plait::lsh::lsh_bucket_reduce_cuda);
}
