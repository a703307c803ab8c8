// CUDA kernel of plait::matmul_into: the chunk's GEMM on the current stream, the stage copy
// (the next chunk arriving, e.g. from a peer's or a pinned host buffer) on a copy stream, so
// the copy engine moves it while the SMs multiply. Two events order them:
//
//   current: ... ─ e_ready ─ GEMM (cuBLAS, through ATen) ─ wait(e_copied) ─ ...
//   copy:          wait(e_ready) ─ copy ─ e_copied
//
// The copy starts after everything queued on the current stream before the call (its source
// and destination are ready and no longer read), and everything queued after the call waits
// for it. So on return, in stream order, both have happened, as with the CPU kernel; and
// since no later work on any stream the caching allocator knows of can run before e_copied,
// stage_src and stage_dst need no recordStream. Headers stay at the c10 level (no
// ATen/cuda/CUDAContext.h, which pulls in cuBLAS), as in the other .cu files.
#include "overlap/matmul_into.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

namespace plait::overlap {
namespace {

// `waiter` waits for the work queued on `signaller` so far. The event is destroyed at once:
// CUDA releases it when it completes, and the wait already refers to it.
void wait_for(cudaStream_t waiter, cudaStream_t signaller) {
  cudaEvent_t event;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(event, signaller));
  C10_CUDA_CHECK(cudaStreamWaitEvent(waiter, event, 0));
  C10_CUDA_CHECK(cudaEventDestroy(event));
}

void matmul_into_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out, int64_t row_offset,
                      bool accumulate, const std::optional<at::Tensor>& stage_src,
                      const std::optional<at::Tensor>& stage_dst) {
  matmul_into_check(x, w, out, row_offset, stage_src, stage_dst);
  c10::cuda::CUDAGuard guard(out.device());
  const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(out.device().index());
  if (!stage_src.has_value()) {
    gemm_into(x, w, out, row_offset, accumulate);
    return;
  }
  const c10::cuda::CUDAStream copy = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, out.device().index());
  wait_for(copy.stream(), compute.stream());
  {
    c10::cuda::CUDAStreamGuard on_copy(copy);
    at::Tensor dst = *stage_dst;
    dst.copy_(*stage_src, /*non_blocking=*/true);
  }
  gemm_into(x, w, out, row_offset, accumulate);
  wait_for(compute.stream(), copy.stream());
}

}  // namespace
}  // namespace plait::overlap

TORCH_LIBRARY_IMPL(plait, CUDA, m) { m.impl("matmul_into", &plait::overlap::matmul_into_cuda); }
