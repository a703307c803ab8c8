// plait::memtrack_*: the live and peak bytes of every tensor storage allocated through
// c10's CPU allocator, process-wide (every thread: autograd, intra-op workers, gloo's
// work threads), counted exactly at each allocation and free.
//
// It wraps the allocator c10::GetCPUAllocator() returns rather than reading the
// profiler's [memory] events, because those are reported only on threads that carry
// the profiler's thread-local state, and gloo allocates its temporaries (the flat
// buffer of an all-gather, say) on its own threads. The wrapper keeps data == context
// (its raw_deleter frees by pointer), so raw_allocate callers and the profiler's own
// reporting, which the wrapped allocator still does, keep working.
//
// Installed once and never removed: tensors allocated through it hold its deleter. Only
// storages allocated after installation are counted (plait.runtime.memtrack accounts
// for the ones alive before it).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace plait::memory {
namespace {

std::mutex mutex;
std::unordered_map<void*, size_t> sizes;  // live tracked storages: pointer -> requested bytes
int64_t live = 0;
int64_t peak = 0;
int64_t allocations = 0;  // since installation, for tests that need to see the tracker at work
c10::Allocator* wrapped = nullptr;
c10::DeleterFnPtr wrapped_delete = nullptr;

void tracked_delete(void* ptr) {
  {
    std::lock_guard<std::mutex> guard(mutex);
    auto it = sizes.find(ptr);
    if (it != sizes.end()) {
      live -= static_cast<int64_t>(it->second);
      sizes.erase(it);
    }
  }
  wrapped_delete(ptr);
}

struct TrackingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    void* ptr = wrapped->raw_allocate(nbytes);
    if (ptr != nullptr && nbytes > 0) {
      std::lock_guard<std::mutex> guard(mutex);
      sizes[ptr] = nbytes;
      live += static_cast<int64_t>(nbytes);
      peak = std::max(peak, live);
      ++allocations;
    }
    return {ptr, ptr, &tracked_delete, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &tracked_delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

TrackingCPUAllocator tracker;

}  // namespace

// Wrap the current CPU allocator (idempotent). Returns false, installing nothing, when that
// allocator cannot free by pointer alone (no raw_deleter), which a wrapper needs.
bool memtrack_install() {
  std::lock_guard<std::mutex> guard(mutex);
  if (wrapped != nullptr) {
    return true;
  }
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current->raw_deleter() == nullptr) {
    return false;
  }
  wrapped = current;
  wrapped_delete = current->raw_deleter();
  // The highest priority: a later SetCPUAllocator of lower priority must not unwrap it.
  c10::SetCPUAllocator(&tracker, UINT8_MAX);
  return true;
}

// [live, peak, allocations, installed] in bytes (counts for the last two).
std::vector<int64_t> memtrack_stats() {
  std::lock_guard<std::mutex> guard(mutex);
  return {live, peak, allocations, wrapped != nullptr ? 1 : 0};
}

// Start a new window: the peak restarts from the live bytes; returns them.
int64_t memtrack_reset_peak() {
  std::lock_guard<std::mutex> guard(mutex);
  peak = live;
  return live;
}

// Whether the storage at ptr was allocated through the tracker (and is alive).
bool memtrack_tracks(int64_t ptr) {
  std::lock_guard<std::mutex> guard(mutex);
  return sizes.count(reinterpret_cast<void*>(ptr)) > 0;
}

}  // namespace plait::memory

TORCH_LIBRARY_IMPL(plait, CompositeExplicitAutograd, m) {
  m.impl("memtrack_install", &plait::memory::memtrack_install);
  m.impl("memtrack_stats", &plait::memory::memtrack_stats);
  m.impl("memtrack_reset_peak", &plait::memory::memtrack_reset_peak);
  m.impl("memtrack_tracks", &plait::memory::memtrack_tracks);
}
