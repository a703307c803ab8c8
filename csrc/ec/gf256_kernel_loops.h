// The loops of gf256_matmul_'s vector kernels, written once over a vector type V and
// instantiated by each per-ISA file (gf256_matmul_<isa>.cpp), whose V wraps that ISA's
// intrinsics. Included only by those files; each instantiates these templates with its
// own V, declared in an anonymous namespace, so no two files share a compiled copy.
//
// The product is fused: for each step of kVecs vectors the kernel loads every input once
// and adds each coefficient's product into one register accumulator per output and
// vector; after the last input it stores each accumulator once. Memory traffic is thus
// the k inputs read once and the m outputs written once, the least any encoder can do.
//
// Two ways to multiply a vector of bytes by a constant c:
//  - nibble (AVX2, AVX-512 BW): c * x = lo[x & 15] ^ hi[x >> 4] with 16-entry tables,
//    two byte shuffles (see gf256.h);
//  - affine (GFNI): one gf2p8affineqb with c's 8x8 bit matrix (gf256_affine_matrix).
#pragma once

#include "ec/gf256_kernels.h"

#include <cstdint>

namespace plait::ec::loops {

// Vectors per step of the ymm affine kernels, real and emulated alike: 2 while the
// accumulators (2m), the two input vectors and a matrix fit in the 16 ymm registers.
constexpr int affine_ymm_vecs(int m) { return m <= 6 ? 2 : 1; }

// ---------------------------------------------------------------------------- nibble
//
// V provides: Reg, kBytes, vecs(m), load, store, zero, nibble_mask, low_nibbles,
// high_nibbles, table (16 bytes broadcast to every 128-bit lane, as the byte shuffles
// look up within lanes), pin, shuffle, xor3.

// Bytes [p, p + kVecs * kBytes) of every output. Per input and vector: one load and the
// nibble split; per output: two table loads, two shuffles, the sum into the accumulator.
// Inlined into the block loop so that the mask and the pointers stay in registers.
template <class V, int M, int kVecs>
[[gnu::always_inline]] inline void nibble_step(const MatmulStripe& s, const uint8_t* tables,
                                               int64_t p) {
  using Reg = typename V::Reg;
  const Reg mask = V::nibble_mask();
  Reg acc[kVecs][M];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[v][i] = V::zero();
  }
  const int k = s.k;
  for (int j = 0; j < k; ++j) {
    const uint8_t* in = s.ins[j] + p;
    Reg lo[kVecs], hi[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      const Reg x = V::load(in + V::kBytes * v);
      lo[v] = V::low_nibbles(x, mask);
      hi[v] = V::high_nibbles(x, mask);
    }
    const uint8_t* t = tables + 32 * j * M;
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      Reg tlo = V::table(t + 32 * i);
      Reg thi = V::table(t + 32 * i + 16);
      // Keep the tables in registers: under register pressure the compiler would rather
      // load them again for each use, and loads share the ports with the data's.
      V::pin(tlo);
      V::pin(thi);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        acc[v][i] = V::xor3(acc[v][i], V::shuffle(tlo, lo[v]), V::shuffle(thi, hi[v]));
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) V::store(s.outs[i] + p + V::kBytes * v, acc[v][i]);
  }
}

template <class V, int M>
void nibble_block(const MatmulStripe& s, const void* tables, int64_t begin, int64_t end) {
  constexpr int kVecs = V::vecs(M);
  const auto* t = static_cast<const uint8_t*>(tables);
  int64_t p = begin;
  for (; p + kVecs * V::kBytes <= end; p += kVecs * V::kBytes) nibble_step<V, M, kVecs>(s, t, p);
  if constexpr (kVecs > 1) {
    for (; p + V::kBytes <= end; p += V::kBytes) nibble_step<V, M, 1>(s, t, p);
  }
}

template <class V>
MatmulBlockFn nibble_block_for(int m) {
  static constexpr MatmulBlockFn kBlocks[kMatmulMaxOuts] = {
      nibble_block<V, 1>, nibble_block<V, 2>, nibble_block<V, 3>, nibble_block<V, 4>,
      nibble_block<V, 5>, nibble_block<V, 6>, nibble_block<V, 7>, nibble_block<V, 8>};
  return kBlocks[m - 1];
}

// ---------------------------------------------------------------------------- affine
//
// V provides: Reg, kBytes, vecs(m), load, store, zero, matrix (a 64-bit matrix broadcast
// to every 64-bit lane), affine (gf2p8affineqb with imm8 = 0: x's bytes times the
// matrix of their lane), xor2.

template <class V, int M, int kVecs>
[[gnu::always_inline]] inline void affine_step(const MatmulStripe& s, const uint64_t* matrices,
                                               int64_t p) {
  using Reg = typename V::Reg;
  Reg acc[kVecs][M];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[v][i] = V::zero();
  }
  const int k = s.k;
  for (int j = 0; j < k; ++j) {
    const uint8_t* in = s.ins[j] + p;
    Reg x[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) x[v] = V::load(in + V::kBytes * v);
    const uint64_t* a = matrices + j * M;
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const Reg matrix = V::matrix(a[i]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[v][i] = V::xor2(acc[v][i], V::affine(x[v], matrix));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) V::store(s.outs[i] + p + V::kBytes * v, acc[v][i]);
  }
}

template <class V, int M>
void affine_block(const MatmulStripe& s, const void* tables, int64_t begin, int64_t end) {
  constexpr int kVecs = V::vecs(M);
  const auto* a = static_cast<const uint64_t*>(tables);
  int64_t p = begin;
  for (; p + kVecs * V::kBytes <= end; p += kVecs * V::kBytes) affine_step<V, M, kVecs>(s, a, p);
  if constexpr (kVecs > 1) {
    for (; p + V::kBytes <= end; p += V::kBytes) affine_step<V, M, 1>(s, a, p);
  }
}

template <class V>
MatmulBlockFn affine_block_for(int m) {
  static constexpr MatmulBlockFn kBlocks[kMatmulMaxOuts] = {
      affine_block<V, 1>, affine_block<V, 2>, affine_block<V, 3>, affine_block<V, 4>,
      affine_block<V, 5>, affine_block<V, 6>, affine_block<V, 7>, affine_block<V, 8>};
  return kBlocks[m - 1];
}

}  // namespace plait::ec::loops
