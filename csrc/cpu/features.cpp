#include "cpu/features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <cstdint>

namespace plait::cpu {
namespace {

#if defined(__x86_64__) || defined(__i386__)

bool bit(unsigned reg, int index) { return ((reg >> index) & 1u) != 0; }

// XCR0, the register states the OS saves on a context switch. Read with the raw opcode's
// mnemonic through asm: the intrinsic would need this file built with -mxsave.
uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t{hi} << 32) | lo;
}

Features detect() {
  Features f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return f;
  f.sse42 = bit(ecx, 20);
  f.pclmulqdq = bit(ecx, 1);
  const bool osxsave = bit(ecx, 27);
  const bool avx_cpu = bit(ecx, 28);
  const uint64_t xcr = osxsave ? xcr0() : 0;
  const bool ymm_state = (xcr & 0x6) == 0x6;     // SSE (bit 1) and AVX (bit 2) state
  const bool zmm_state = (xcr & 0xe0) == 0xe0;   // opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7)
  f.avx = avx_cpu && ymm_state;

  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  f.avx2 = f.avx && bit(ebx, 5);
  f.avx512f = f.avx && zmm_state && bit(ebx, 16);
  f.avx512bw = f.avx512f && bit(ebx, 30);
  f.avx512vl = f.avx512f && bit(ebx, 31);
  f.gfni = bit(ecx, 8);
  f.vpclmulqdq = bit(ecx, 10);
  return f;
}

#else

Features detect() { return {}; }

#endif

}  // namespace

const Features& features() {
  static const Features detected = detect();
  return detected;
}

}  // namespace plait::cpu
