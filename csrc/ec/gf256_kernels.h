// The vector kernels of gf256_matmul_ on the CPU, and what the op hands them.
//
// Each instruction set has its own file, gf256_matmul_<isa>.cpp, compiled with that
// set's -m flags (CMakeLists.txt); the op (gf256_matmul_cpu.cpp) calls one only after
// cpu::features() says the CPU has it. Those files include nothing but this header,
// gf256_kernel_loops.h and <immintrin.h>: an inline function of a shared header, once
// compiled with -mavx512bw in one file, could be the copy the linker keeps for every
// file, and run on a CPU without AVX-512.
//
// Plain C++, no torch headers.
#pragma once

#include <cstdint>

namespace plait::ec {

// The stripe geometry the snapshot code uses: at most 32 data shards (k) and 8 parity
// shards (m), so an encode is one call. The fixed bounds keep the pointer arrays and the
// coefficient tables of a call in small fixed-size arrays (stack, kernel parameters,
// shared memory), and let the kernels keep one accumulator per output in registers.
inline constexpr int64_t kMatmulMaxIns = 32;
inline constexpr int64_t kMatmulMaxOuts = 8;

// The shards of one call: outs[i] = XOR_j coefs[i, j] * ins[j].
struct MatmulStripe {
  int k = 0;
  int m = 0;
  const uint8_t* ins[kMatmulMaxIns] = {};
  uint8_t* outs[kMatmulMaxOuts] = {};
};

// A block function computes bytes [begin, end) of every output; end - begin is a
// multiple of the kernel's vector width (the op does the tail). `tables` holds one entry
// per coefficient, entry j * m + i for coefs[i, j] (the inner loop walks the outputs of
// one input), prepared once per call by the op:
//  - nibble kernels (avx2, avx512): 32 bytes, the 16-entry tables lo then hi of
//    gf256.h's split-nibble technique (Gf256NibbleTables);
//  - affine kernels (gfni_*): a uint64_t, gf256_affine_matrix(coefs[i, j]).
using MatmulBlockFn = void (*)(const MatmulStripe& stripe, const void* tables, int64_t begin,
                               int64_t end);

// The block function for m outputs (1 <= m <= kMatmulMaxOuts) of each kernel. Defined
// only on x86; calling one on a CPU without its instructions is an illegal instruction.
MatmulBlockFn matmul_block_avx2(int m);        // AVX2: vpshufb nibble lookups, ymm
MatmulBlockFn matmul_block_avx512(int m);      // AVX-512 F+BW: the same on zmm
MatmulBlockFn matmul_block_gfni_avx2(int m);   // GFNI + AVX2: vgf2p8affineqb on ymm
MatmulBlockFn matmul_block_gfni_avx512(int m); // GFNI + AVX-512 F: vgf2p8affineqb on zmm
// Portable, any CPU: the loop of gfni_avx2 with each instruction computed from its
// definition in the Intel SDM, so that the loop and the matrices are tested on CPUs
// without GFNI. Slow; never chosen by default.
MatmulBlockFn matmul_block_gfni_emulated(int m);

}  // namespace plait::ec
