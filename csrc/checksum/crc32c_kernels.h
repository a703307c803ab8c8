// The VPCLMULQDQ kernels of plait::crc32c (one translation unit per instruction set,
// built with its -m flags; see gf256_kernels.h for why they include nothing else) and
// the folding constants they use.
//
// Folding (crc32c_cpu.cpp explains it for PCLMULQDQ): a 16-byte chunk H x^64 + L, moved
// D bytes later, becomes H * kH + L * kL with kH = x^(63 + 8D) mod P and
// kL = x^(8D - 1) mod P, P the Castagnoli polynomial; each constant is the 32-bit
// reflected remainder (bit 31 = x^0) in the upper half of a 64-bit lane. crc32c_cpu.cpp
// derives every constant below at compile time (fold_by, static_assert), and
// tests/test_ops_crc32c.py derives them again in Python, with plain (unreflected)
// polynomial arithmetic, and compares with the literals here.
//
// Plain C++, no torch headers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace plait::checksum {

struct FoldConstants {
  uint64_t h, l;
};

inline constexpr FoldConstants kFold16{0x3743f7bd00000000ull, 0x3171d43000000000ull};
inline constexpr FoldConstants kFold32{0x33ccbbbc00000000ull, 0xa2158b3400000000ull};
inline constexpr FoldConstants kFold64{0x1c19243b00000000ull, 0x75bba45b00000000ull};
inline constexpr FoldConstants kFold128{0x6577b24500000000ull, 0x7417153f00000000ull};
inline constexpr FoldConstants kFold256{0xe9a5d8be00000000ull, 0x1426a81500000000ull};

// The raw CRC state (no inversions) after n more bytes at p, from `state`. n must be at
// least the kernel's minimum; the op sends shorter inputs to the other paths.
//
// vpclmul_avx2: four ymm accumulators, 128 bytes per step (VEX VPCLMULQDQ: needs
// VPCLMULQDQ, AVX2, PCLMULQDQ and SSE4.2, for the final crc32 instructions).
inline constexpr size_t kVpclmulAvx2MinBytes = 256;
uint32_t crc32c_update_vpclmul_avx2(uint32_t state, const uint8_t* p, size_t n);
// vpclmul_avx512: four zmm accumulators, 256 bytes per step (EVEX: VPCLMULQDQ and AVX-512 F).
inline constexpr size_t kVpclmulAvx512MinBytes = 512;
uint32_t crc32c_update_vpclmul_avx512(uint32_t state, const uint8_t* p, size_t n);

}  // namespace plait::checksum
