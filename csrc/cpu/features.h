// What the CPU running this process can execute, read once from CPUID and XGETBV.
//
// A feature counts only when the operating system also saves the registers it uses
// (XCR0): AVX needs the YMM state, AVX-512 the opmask and ZMM states. The kernels that
// use these instructions are compiled in their own translation units with their own -m
// flags and are called only after this says yes.
//
// Only plain C++ here (no torch headers): the per-ISA kernel files include it too.
#pragma once

namespace plait::cpu {

struct Features {
  bool sse42 = false;
  bool pclmulqdq = false;
  bool avx = false;       // and the OS saves YMM state
  bool avx2 = false;
  bool avx512f = false;   // and the OS saves opmask and ZMM state
  bool avx512bw = false;
  bool avx512vl = false;
  bool gfni = false;        // SSE form; the VEX (ymm) form needs avx, the EVEX form avx512f
  bool vpclmulqdq = false;  // likewise: ymm form needs avx, zmm form avx512f
};

// Detected on the first call, then the same value for the life of the process.
const Features& features();

}  // namespace plait::cpu
