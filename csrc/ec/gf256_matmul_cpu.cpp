// CPU kernel of plait::gf256_matmul_(outs, ins, coefs, kernel=None): outs[i] = XOR_j
// coefs[i, j] * ins[j] in GF(2^8), written in place into each output's memory (no copies;
// outputs may be views of shared memory).
//
// This file has the argument checks, the cutting into blocks and threads, the scalar
// kernel and the tails; the vector kernels are in gf256_matmul_<isa>.cpp (their loops in
// gf256_kernel_loops.h), one file per instruction set, and gf256_matmul_dispatch.cpp
// picks one: the best this CPU runs (GFNI on zmm or ymm, AVX-512 or AVX2 nibble
// lookups, scalar), or the one `kernel` names, so that tests can run every one.
//
// Memory traffic of every kernel is the k inputs read once and the m outputs written
// once, the least any encoder can do (k * m separate multiply-adds would read and write
// every output k times); what differs is the arithmetic per byte. bench/ec.py measures
// each kernel against ISA-L's on the same matrix and buffers.
//
// Work is cut into blocks of the same byte range of every shard, sized so that a block's
// inputs and outputs fit in L2 (kBlockTouchBytes), and blocks are split over threads
// with at::parallel_for; calls touching less than kSerialTouchBytes stay serial. A
// vector kernel computes a block's whole vectors; the last block's tail of fewer bytes
// than a vector is done here, byte by byte.
#include "ec/gf256.h"
#include "ec/gf256_matmul.h"
#include "ec/gf256_matmul_dispatch.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

namespace plait::ec {

namespace {

void check_shard(const at::Tensor& t, const char* list, size_t index, const at::Tensor& first) {
  TORCH_CHECK(t.scalar_type() == at::kByte, "gf256_matmul_: ", list, "[", index,
              "] must be uint8, got ", t.scalar_type(), "; reinterpret the bytes with ", list,
              "[", index, "].view(torch.uint8)");
  TORCH_CHECK(t.is_contiguous(), "gf256_matmul_: ", list, "[", index,
              "] must be contiguous, got strides ", t.strides(),
              "; pass a contiguous tensor (or a contiguous slice of one)");
  TORCH_CHECK(t.numel() == first.numel(), "gf256_matmul_: ", list, "[", index, "] has ",
              t.numel(), " bytes but ins[0] has ", first.numel(),
              "; every shard of a stripe must have the same length (pad the last one)");
  TORCH_CHECK(t.device() == first.device(), "gf256_matmul_: ", list, "[", index, "] is on ",
              t.device(), " but ins[0] is on ", first.device(),
              "; all shards must be on one device (move them with .to(ins[0].device))");
}

// [begin, end) of the bytes a tensor's elements occupy; empty tensors occupy none.
struct ByteRange {
  uintptr_t begin, end;
};

ByteRange byte_range(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>(t.numel())};
}

bool intersects(ByteRange a, ByteRange b) {
  return a.begin < a.end && b.begin < b.end && a.begin < b.end && b.begin < a.end;
}

}  // namespace

void gf256_matmul_check(at::TensorList outs, at::TensorList ins, const at::Tensor& coefs) {
  TORCH_CHECK(!ins.empty() && static_cast<int64_t>(ins.size()) <= kMatmulMaxIns,
              "gf256_matmul_: ins must hold 1 to ", kMatmulMaxIns,
              " tensors (the k <= 32 data shards of a stripe), got ", ins.size(),
              "; use a code with at most 32 data shards");
  TORCH_CHECK(!outs.empty() && static_cast<int64_t>(outs.size()) <= kMatmulMaxOuts,
              "gf256_matmul_: outs must hold 1 to ", kMatmulMaxOuts, " tensors, got ",
              outs.size(), "; compute more outputs in several calls of at most ",
              kMatmulMaxOuts, " (one per group of rows of coefs)");
  const at::Tensor& first = ins[0];
  for (size_t j = 0; j < ins.size(); ++j) check_shard(ins[j], "ins", j, first);
  for (size_t i = 0; i < outs.size(); ++i) check_shard(outs[i], "outs", i, first);

  TORCH_CHECK(coefs.scalar_type() == at::kByte, "gf256_matmul_: coefs must be uint8, got ",
              coefs.scalar_type(), "; build it with torch.tensor(rows, dtype=torch.uint8)");
  TORCH_CHECK(coefs.device().is_cpu(), "gf256_matmul_: coefs must be a CPU tensor, got one on ",
              coefs.device(), "; the coefficients are read on the host, pass coefs.cpu()");
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == static_cast<int64_t>(outs.size()) &&
                  coefs.size(1) == static_cast<int64_t>(ins.size()),
              "gf256_matmul_: coefs must have shape [len(outs), len(ins)] = [", outs.size(), ", ",
              ins.size(), "], got ", coefs.sizes(), "; row i holds the coefficients of outs[i]");

  // Outputs are overwritten while inputs are still being read, and two outputs sharing
  // bytes would race; compare raw address ranges, which also catches tensors of different
  // storages mapping the same memory.
  if (first.numel() == 0 || first.device().is_meta()) return;
  for (size_t i = 0; i < outs.size(); ++i) {
    const ByteRange o = byte_range(outs[i]);
    for (size_t j = 0; j < ins.size(); ++j) {
      TORCH_CHECK(!intersects(o, byte_range(ins[j])), "gf256_matmul_: outs[", i,
                  "] overlaps ins[", j, "] in memory; outputs are overwritten, so they must be "
                  "disjoint from every input (write into separate buffers)");
    }
    for (size_t p = 0; p < i; ++p) {
      TORCH_CHECK(!intersects(o, byte_range(outs[p])), "gf256_matmul_: outs[", i,
                  "] overlaps outs[", p, "] in memory; every output needs its own bytes");
    }
  }
}

namespace {

// Target bytes of all shards touched by one block: half of a 512 KiB L2, so that the
// block's inputs and outputs stay cached while the prefetchers run ahead on the next.
constexpr int64_t kBlockTouchBytes = int64_t{256} << 10;
// Per-shard block length bounds (multiples of 64, the widest vector).
constexpr int64_t kMinBlockBytes = int64_t{4} << 10;
constexpr int64_t kMaxBlockBytes = int64_t{64} << 10;
// Below this many bytes touched in all (~40 us of work) a fork/join costs more than it saves.
constexpr int64_t kSerialTouchBytes = int64_t{1} << 20;

// The per-coefficient tables of one call, in the layout its kernel reads (see
// gf256_kernels.h), entry j * m + i for coefs[i, j]. At most 64 KiB (the scalar rows).
struct CallTables {
  std::vector<Gf256Row> rows;
  std::array<Gf256NibbleTables, kMatmulMaxIns * kMatmulMaxOuts> nibbles;
  std::array<uint64_t, kMatmulMaxIns * kMatmulMaxOuts> matrices;
};

static_assert(sizeof(Gf256NibbleTables) == 32, "nibble kernels read 32 bytes per coefficient");

// ---------------------------------------------------------------------------- scalar

// Bytes [begin, end) of every output, one table lookup per input byte and output. Each
// output is built in place: the first input assigns, the rest accumulate; the block is
// small enough to stay in cache across the k passes.
void matmul_block_scalar(const MatmulStripe& s, const Gf256Row* rows, int64_t begin,
                         int64_t end) {
  const int64_t n = end - begin;
  for (int i = 0; i < s.m; ++i) {
    uint8_t* out = s.outs[i] + begin;
    for (int j = 0; j < s.k; ++j) {
      const uint8_t* in = s.ins[j] + begin;
      const uint8_t* row = rows[j * s.m + i].v;
      if (j == 0) {
        for (int64_t p = 0; p < n; ++p) out[p] = row[in[p]];
      } else {
        for (int64_t p = 0; p < n; ++p) out[p] ^= row[in[p]];
      }
    }
  }
}

// The bytes [begin, end) after a vector kernel's last whole vector (fewer than its
// width, only in the last block), from the nibble tables of the constexpr set.
void matmul_tail(const MatmulStripe& s, const uint8_t* coefs, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    for (int i = 0; i < s.m; ++i) {
      uint8_t v = 0;
      for (int j = 0; j < s.k; ++j) {
        v ^= gf256_mul_nibbles(kGf256NibbleTables.coef[coefs[j * s.m + i]], s.ins[j][p]);
      }
      s.outs[i][p] = v;
    }
  }
}

// Per-shard block length: (k + m) * block ~ kBlockTouchBytes, a multiple of 64 within
// [kMinBlockBytes, kMaxBlockBytes].
int64_t block_bytes(int k, int m) {
  const int64_t b = kBlockTouchBytes / (k + m);
  return std::clamp<int64_t>(b & ~int64_t{63}, kMinBlockBytes, kMaxBlockBytes);
}

template <typename BlockFn>
void for_each_block(int64_t n, int k, int m, const BlockFn& fn) {
  const int64_t block = block_bytes(k, m);
  const int64_t nblocks = (n + block - 1) / block;
  // at::parallel_for runs serially when the range is below the grain.
  const int64_t grain = std::max<int64_t>(1, kSerialTouchBytes / (block * (k + m)));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b * block, std::min(n, (b + 1) * block));
  });
}

void gf256_matmul_cpu(at::TensorList outs, at::TensorList ins, const at::Tensor& coefs,
                      std::optional<c10::string_view> kernel_name) {
  gf256_matmul_check(outs, ins, coefs);
  TORCH_CHECK(ins[0].device().is_cpu(), "gf256_matmul_: expected CPU tensors, got ins[0] on ",
              ins[0].device());
  const MatmulKernel& kernel = matmul_kernel(kernel_name);
  const int64_t n = ins[0].numel();
  if (n == 0) return;

  MatmulStripe stripe;
  stripe.k = static_cast<int>(ins.size());
  stripe.m = static_cast<int>(outs.size());
  const int k = stripe.k, m = stripe.m;
  for (int j = 0; j < k; ++j) stripe.ins[j] = ins[j].const_data_ptr<uint8_t>();
  for (int i = 0; i < m; ++i) stripe.outs[i] = outs[i].mutable_data_ptr<uint8_t>();
  std::array<uint8_t, kMatmulMaxIns * kMatmulMaxOuts> c{};  // [j * m + i]
  const auto rows = coefs.accessor<uint8_t, 2>();
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < k; ++j) c[j * m + i] = rows[i][j];
  }

  CallTables tables;
  const void* kernel_tables = nullptr;
  switch (kernel.tables) {
    case MatmulTables::kRows:
      tables.rows.resize(static_cast<size_t>(k * m));
      for (int e = 0; e < k * m; ++e) tables.rows[e] = gf256_row(kGf256NibbleTables.coef[c[e]]);
      for_each_block(n, k, m, [&](int64_t begin, int64_t end) {
        matmul_block_scalar(stripe, tables.rows.data(), begin, end);
      });
      return;
    case MatmulTables::kNibble:
      for (int e = 0; e < k * m; ++e) tables.nibbles[e] = kGf256NibbleTables.coef[c[e]];
      kernel_tables = tables.nibbles.data();
      break;
    case MatmulTables::kAffine:
      for (int e = 0; e < k * m; ++e) tables.matrices[e] = kGf256AffineMatrices.coef[c[e]];
      kernel_tables = tables.matrices.data();
      break;
  }
  const MatmulBlockFn block_fn = kernel.block_for(m);
  const int64_t width = kernel.width;
  for_each_block(n, k, m, [&](int64_t begin, int64_t end) {
    const int64_t vector_end = begin + (end - begin) / width * width;
    if (vector_end > begin) block_fn(stripe, kernel_tables, begin, vector_end);
    if (vector_end < end) matmul_tail(stripe, c.data(), vector_end, end);
  });
}

void gf256_matmul_inplace_or_view(c10::DispatchKeySet keys, at::TensorList outs,
                                  at::TensorList ins, const at::Tensor& coefs,
                                  std::optional<c10::string_view> kernel) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("plait::gf256_matmul_", "")
                             .typed<void(at::TensorList, at::TensorList, const at::Tensor&,
                                         std::optional<c10::string_view>)>();
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, outs, ins, coefs, kernel);
  }
  for (const at::Tensor& out : outs) out.unsafeGetTensorImpl()->bump_version();
}

}  // namespace
}  // namespace plait::ec

TORCH_LIBRARY_IMPL(plait, CPU, m) {
  m.impl("gf256_matmul_", &plait::ec::gf256_matmul_cpu);
}

// As for gf256_mul_add_: bump every output's version counter, as built-in in-place ops
// do, so that autograd notices bytes it saved being overwritten through a byte view.
TORCH_LIBRARY_IMPL(plait, ADInplaceOrView, m) {
  m.impl("gf256_matmul_", &plait::ec::gf256_matmul_inplace_or_view);
}
