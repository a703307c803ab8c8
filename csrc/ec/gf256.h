// GF(2^8) arithmetic shared by the erasure-coding kernels (CPU and CUDA).
//
// The field is GF(2)[x] / (x^8 + x^4 + x^3 + x^2 + 1), polynomial 0x11d, the one used
// by ISA-L, klauspost/reedsolomon and most Reed-Solomon codecs. Addition is XOR.
//
// The kernels multiply a byte region by a constant c with the split-nibble technique:
// multiplication by c is linear over GF(2), so
//     c * x = c * (x & 0x0f)  ^  c * (x & 0xf0)
// and each half needs only a 16-entry table:
//     lo[n] = c * n,   hi[n] = c * (n << 4),   c * x = lo[x & 15] ^ hi[x >> 4].
// 16-entry byte tables are exactly what a byte shuffle (pshufb / vpshufb / tbl)
// looks up, 16 or 32 bytes per instruction.
//
// Only plain C++ here (no torch headers), usable from host and device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PLAIT_GF256_HD __host__ __device__
#else
#define PLAIT_GF256_HD
#endif

namespace at {
class Tensor;
}

namespace plait::ec {

// Low 8 bits of the reduction polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d).
inline constexpr unsigned kGf256Poly = 0x11d;

// a * b in GF(2^8), shift-and-add ("Russian peasant") multiplication. Used to
// build tables, never per byte of data.
PLAIT_GF256_HD constexpr uint8_t gf256_mul(uint8_t a, uint8_t b) {
  unsigned x = a, y = b, r = 0;
  while (y != 0) {
    if (y & 1u) r ^= x;
    y >>= 1;
    x <<= 1;
    if (x & 0x100u) x ^= kGf256Poly;
  }
  return static_cast<uint8_t>(r);
}

// The two 16-entry tables of the split-nibble technique for coefficient c.
struct Gf256NibbleTables {
  uint8_t lo[16];  // lo[n] = c * n
  uint8_t hi[16];  // hi[n] = c * (n << 4)
};

PLAIT_GF256_HD constexpr Gf256NibbleTables gf256_nibble_tables(uint8_t c) {
  Gf256NibbleTables t{};
  for (unsigned n = 0; n < 16; ++n) {
    t.lo[n] = gf256_mul(c, static_cast<uint8_t>(n));
    t.hi[n] = gf256_mul(c, static_cast<uint8_t>(n << 4));
  }
  return t;
}

// The nibble tables of every coefficient, computed by the compiler (8 KiB), so that a
// call looks them up instead of running 32 multiplications.
struct Gf256AllNibbleTables {
  Gf256NibbleTables coef[256];
};

PLAIT_GF256_HD constexpr Gf256AllNibbleTables gf256_all_nibble_tables() {
  Gf256AllNibbleTables all{};
  for (unsigned c = 0; c < 256; ++c) all.coef[c] = gf256_nibble_tables(static_cast<uint8_t>(c));
  return all;
}

inline constexpr Gf256AllNibbleTables kGf256NibbleTables = gf256_all_nibble_tables();

// c * x for one byte, from the nibble tables.
PLAIT_GF256_HD constexpr uint8_t gf256_mul_nibbles(const Gf256NibbleTables& t, uint8_t x) {
  return static_cast<uint8_t>(t.lo[x & 0x0f] ^ t.hi[x >> 4]);
}

// The whole product row c * x for x = 0..255: one lookup per byte, for scalar code
// (the CPU fallback, the CUDA kernel's shared-memory table).
struct Gf256Row {
  uint8_t v[256];
};

PLAIT_GF256_HD constexpr Gf256Row gf256_row(const Gf256NibbleTables& t) {
  Gf256Row row{};
  for (unsigned x = 0; x < 256; ++x) row.v[x] = gf256_mul_nibbles(t, static_cast<uint8_t>(x));
  return row;
}

// Multiplication by c as an 8x8 matrix over GF(2), in the layout of the GFNI
// instruction gf2p8affineqb. Multiplying by a constant is linear over GF(2): bit i of
// c * x is the parity of (row_i AND x), where bit j of row_i is bit i of c * x^j. The
// instruction (Intel SDM, GF2P8AFFINEQB) computes bit i of each output byte as
// parity(A.byte[7 - i] AND x) XOR imm8.bit[i], so row_i goes to byte 7 - i of the 64-bit
// matrix A, and imm8 = 0. This works for any field polynomial, where gf2p8mulb multiplies
// only in AES's field (0x11b), not in this one (0x11d).
PLAIT_GF256_HD constexpr uint64_t gf256_affine_matrix(uint8_t c) {
  uint64_t a = 0;
  for (unsigned i = 0; i < 8; ++i) {
    uint64_t row = 0;
    for (unsigned j = 0; j < 8; ++j) {
      row |= static_cast<uint64_t>((gf256_mul(c, static_cast<uint8_t>(1u << j)) >> i) & 1u) << j;
    }
    a |= row << (8 * (7 - i));
  }
  return a;
}

// The matrices of every coefficient (2 KiB), computed by the compiler.
struct Gf256AllAffineMatrices {
  uint64_t coef[256];
};

PLAIT_GF256_HD constexpr Gf256AllAffineMatrices gf256_all_affine_matrices() {
  Gf256AllAffineMatrices all{};
  for (unsigned c = 0; c < 256; ++c) all.coef[c] = gf256_affine_matrix(static_cast<uint8_t>(c));
  return all;
}

inline constexpr Gf256AllAffineMatrices kGf256AffineMatrices = gf256_all_affine_matrices();

// Sanity checks of the field, evaluated by the compiler.
static_assert(gf256_mul(2, 0x80) == 0x1d, "x * x^7 reduces by 0x11d");
static_assert(gf256_mul(0x53, 1) == 0x53 && gf256_mul(0, 0xff) == 0, "identity and zero");
static_assert(gf256_mul(0x8e, 0x02) == 0x01, "0x8e is the inverse of 2 under 0x11d");
static_assert(gf256_mul_nibbles(kGf256NibbleTables.coef[0xb7], 0x6d) == gf256_mul(0xb7, 0x6d),
              "nibble split agrees with direct multiplication");
static_assert(gf256_affine_matrix(1) == 0x0102040810204080ull, "1 is the identity matrix");
static_assert(gf256_affine_matrix(0) == 0, "0 is the zero matrix");

// Argument checks of plait::gf256_mul_add_, the same for every backend so that the
// messages do not drift apart; defined in gf256_cpu.cpp. Returns coef as a byte.
uint8_t gf256_mul_add_check(const at::Tensor& dst, const at::Tensor& src, int64_t coef);

}  // namespace plait::ec
