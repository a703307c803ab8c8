// The loop of gf256_matmul_'s GFNI ymm kernel (loops::affine_block, the very template
// gf256_matmul_gfni_avx2.cpp instantiates) over a portable 32-byte vector whose affine
// step is gf2p8affineqb computed from its definition in the Intel SDM:
//
//   affine_byte(A, x, imm8): for i in 0..7:
//       out.bit[i] = parity(A.byte[7 - i] AND x) XOR imm8.bit[i]
//   VGF2P8AFFINEQB dst, src1, src2, imm8 (256-bit): for each qword j and byte b:
//       dst.qword[j].byte[b] = affine_byte(src2.qword[j], src1.qword[j].byte[b], imm8)
//
// with src1 = the data x and src2 = the matrix, as _mm256_gf2p8affine_epi64_epi8(x, A, b)
// passes them. So it checks, on any CPU, the loop, the tables and the matrices that the
// GFNI kernels use; only the mapping of each step to its instruction is left to the
// CPUs that have GFNI. Built with the library's flags; slow (never the default kernel).
#include "ec/gf256_kernels.h"
#include "ec/gf256_kernel_loops.h"

namespace plait::ec {
namespace {

struct EmulatedYmm {
  struct Reg {
    uint64_t q[4];
  };
  static constexpr int kBytes = 32;
  static constexpr int vecs(int m) { return loops::affine_ymm_vecs(m); }

  // Memory order is little-endian lane order, as a vector load on x86 (byte b of qword j
  // is byte 8j + b); the code assumes a little-endian host, like the x86 it models.
  static Reg load(const uint8_t* p) {
    Reg r;
    __builtin_memcpy(r.q, p, sizeof r.q);
    return r;
  }
  static void store(uint8_t* p, Reg v) { __builtin_memcpy(p, v.q, sizeof v.q); }
  static Reg zero() { return Reg{{0, 0, 0, 0}}; }
  static Reg matrix(uint64_t a) { return Reg{{a, a, a, a}}; }

  static uint8_t affine_byte(uint64_t a, uint8_t x, uint8_t imm8) {
    uint8_t out = 0;
    for (int i = 0; i < 8; ++i) {
      const auto row = static_cast<uint8_t>(a >> (8 * (7 - i)));
      const unsigned bit = static_cast<unsigned>(__builtin_parity(row & x)) ^ ((imm8 >> i) & 1u);
      out = static_cast<uint8_t>(out | (bit << i));
    }
    return out;
  }

  static Reg affine(Reg x, Reg matrix) {
    Reg r;
    for (int j = 0; j < 4; ++j) {
      uint64_t q = 0;
      for (int b = 0; b < 8; ++b) {
        const auto byte = static_cast<uint8_t>(x.q[j] >> (8 * b));
        q |= uint64_t{affine_byte(matrix.q[j], byte, 0)} << (8 * b);
      }
      r.q[j] = q;
    }
    return r;
  }
  static Reg xor2(Reg a, Reg b) {
    return Reg{{a.q[0] ^ b.q[0], a.q[1] ^ b.q[1], a.q[2] ^ b.q[2], a.q[3] ^ b.q[3]}};
  }
};

}  // namespace

MatmulBlockFn matmul_block_gfni_emulated(int m) { return loops::affine_block_for<EmulatedYmm>(m); }

}  // namespace plait::ec
