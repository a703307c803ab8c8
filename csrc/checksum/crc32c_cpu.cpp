// plait::crc32c(data, crc=0, kernel=None) -> int: CRC-32C (Castagnoli) of a uint8 CPU
// tensor's bytes, the checksum of snapshot shards. Standard parameters (reflected
// polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF, so
// crc32c(b"123456789") == 0xE3069283), and chaining like zlib.crc32:
// crc32c(b, crc32c(a)) == crc32c(a + b).
//
// Inside, the 32-bit state is the "raw" CRC register (no initial or final inversion),
// which is linear in the data: the state after A || B is the state after A shifted by
// |B| zero bytes, XOR the state of B alone from 0. That identity is what lets several
// streams, and several threads, work on separate pieces and be combined.
//
// Shifting by n zero bytes multiplies by x^(8n) mod P. The raw state, read in the
// reflected bit order (bit 31 = x^0, ..., bit 0 = x^31), is a polynomial of degree < 32;
// mul_mod multiplies two such, and x^(8n) comes from x^(2^i) by square-and-multiply.
//
// Kernels, best first; a call uses the first this CPU runs, or the one its `kernel`
// argument names (crc32c_kernels() lists them), so tests can compare every one:
//  - vpclmul_avx512, vpclmul_avx2 (crc32c_vpclmul_*.cpp, own translation units): the
//    PCLMUL folding below on zmm / ymm registers, four or two 16-byte chunks per
//    carry-less multiply instruction.
//  - pclmul (x86 with SSE4.2 and PCLMULQDQ): four 128-bit accumulators each absorb 16
//    bytes per step by carry-less multiplication with x^(8 * 64) mod P, and are reduced
//    to 32 bits at the end by the crc32 instruction. The crc32 instruction alone is
//    limited by its throughput (about 6 GB/s on the 2-core EPYC machines here, even with
//    3 streams), PCLMULQDQ reaches about 10 GB/s.
//  - sse42: the crc32 instruction, three independent streams over consecutive 2 KiB
//    pieces (the instruction has a 3-cycle latency and can start one per cycle),
//    combined with a table of the shift by 2 KiB.
//  - portable: slicing-by-8 tables (8 KiB, built by the compiler), 8 bytes per step;
//    off x86 and on CPUs without SSE4.2.
// PLAIT_CRC32C_KERNEL names the default; PLAIT_CRC32C_NO_PCLMUL (not "" or "0") skips
// the folding kernels, PLAIT_CRC32C_NO_HW every hardware one. Read once.
// Above kParallelMinBytes the buffer is cut into one piece per thread (at::parallel_for),
// each piece's raw state computed from 0, and the pieces combined in order.
#include "checksum/crc32c_kernels.h"
#include "cpu/features.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define PLAIT_CRC32C_HAVE_X86_PATHS 1
#else
#define PLAIT_CRC32C_HAVE_X86_PATHS 0
#endif

namespace plait::checksum {
namespace {

// x^32 + x^28 + x^27 + ... + 1 without the x^32 term, bit-reversed (bit 31 is x^0).
constexpr uint32_t kPoly = 0x82F63B78u;
constexpr uint32_t kOne = 0x80000000u;  // the polynomial 1 in reflected order
constexpr uint32_t kX = 0x40000000u;    // the polynomial x

// ------------------------------------------------------------ GF(2)[x] / P arithmetic

// a * b mod P, both reflected. Walks a's coefficients from x^0 up while b is multiplied
// by x each step (a right shift, reducing x^32 to kPoly when bit 0, x^31, falls off).
constexpr uint32_t mul_mod(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (int i = 0; i < 32; ++i) {
    if (a & (kOne >> i)) product ^= b;
    b = (b & 1u) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return product;
}

// x^(2^i) mod P for i = 0..63, each the square of the one before.
constexpr std::array<uint32_t, 64> make_x_pow2() {
  std::array<uint32_t, 64> t{};
  t[0] = kX;
  for (size_t i = 1; i < t.size(); ++i) t[i] = mul_mod(t[i - 1], t[i - 1]);
  return t;
}

constexpr std::array<uint32_t, 64> kXPow2 = make_x_pow2();

// x^e mod P by square-and-multiply over the bits of e (e < 2^64).
constexpr uint32_t x_pow_mod(uint64_t e) {
  uint32_t r = kOne;
  for (size_t i = 0; e != 0; ++i, e >>= 1) {
    if (e & 1u) r = mul_mod(r, kXPow2[i]);
  }
  return r;
}

// The raw state after n more zero bytes.
constexpr uint32_t shift_zeros(uint32_t state, uint64_t n) { return mul_mod(x_pow_mod(8 * n), state); }

// The same shift for one fixed n, as four 256-entry tables: the shift is linear, so it
// is the XOR of the shifts of the state's four bytes, each one lookup.
struct ShiftTable {
  uint32_t t[4][256];
};

constexpr ShiftTable make_shift_table(uint64_t n) {
  ShiftTable s{};
  const uint32_t k = x_pow_mod(8 * n);
  for (unsigned b = 0; b < 4; ++b) {
    for (uint32_t v = 0; v < 256; ++v) s.t[b][v] = mul_mod(k, v << (8 * b));
  }
  return s;
}

inline uint32_t shift_by_table(const ShiftTable& s, uint32_t state) {
  return s.t[0][state & 0xff] ^ s.t[1][(state >> 8) & 0xff] ^ s.t[2][(state >> 16) & 0xff] ^
         s.t[3][state >> 24];
}

// Sanity checks of the arithmetic, evaluated by the compiler.
static_assert(mul_mod(kOne, 0x12345678u) == 0x12345678u, "1 is the identity");
static_assert(mul_mod(kX, kOne) == kX && mul_mod(kXPow2[1], kOne) == 0x20000000u, "x * x = x^2");
static_assert(x_pow_mod(32) == kPoly, "x^32 = P - x^32 (mod P)");
static_assert(x_pow_mod(40) == mul_mod(x_pow_mod(32), x_pow_mod(8)), "x^a * x^b = x^(a+b)");

// ------------------------------------------------------------------- portable tables

// t[0][v]: the raw state after one byte v from state 0 (the classic byte table);
// t[s][v]: the same followed by s zero bytes, so eight bytes take eight lookups.
struct SliceTables {
  uint32_t t[8][256];
};

constexpr SliceTables make_slice_tables() {
  SliceTables s{};
  for (uint32_t v = 0; v < 256; ++v) {
    uint32_t c = v;
    for (int bit = 0; bit < 8; ++bit) c = (c & 1u) ? (c >> 1) ^ kPoly : c >> 1;
    s.t[0][v] = c;
  }
  for (int k = 1; k < 8; ++k) {
    for (uint32_t v = 0; v < 256; ++v) {
      const uint32_t prev = s.t[k - 1][v];
      s.t[k][v] = (prev >> 8) ^ s.t[0][prev & 0xff];
    }
  }
  return s;
}

constexpr SliceTables kSlice = make_slice_tables();

static_assert(kSlice.t[0][0x80] == kPoly, "the top bit of a byte is x^7, times x^32 reduces to P");

uint32_t update_portable(uint32_t state, const uint8_t* p, size_t n) {
  if constexpr (std::endian::native == std::endian::little) {
    for (; n >= 8; p += 8, n -= 8) {
      uint64_t w;
      std::memcpy(&w, p, 8);
      const uint32_t lo = state ^ static_cast<uint32_t>(w);
      const auto hi = static_cast<uint32_t>(w >> 32);
      state = kSlice.t[7][lo & 0xff] ^ kSlice.t[6][(lo >> 8) & 0xff] ^
              kSlice.t[5][(lo >> 16) & 0xff] ^ kSlice.t[4][lo >> 24] ^ kSlice.t[3][hi & 0xff] ^
              kSlice.t[2][(hi >> 8) & 0xff] ^ kSlice.t[1][(hi >> 16) & 0xff] ^
              kSlice.t[0][hi >> 24];
    }
  }
  for (; n > 0; ++p, --n) state = (state >> 8) ^ kSlice.t[0][(state ^ *p) & 0xff];
  return state;
}

// --------------------------------------------------------------------------- SSE4.2

#if PLAIT_CRC32C_HAVE_X86_PATHS

inline uint64_t load64(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

__attribute__((target("sse4.2"))) uint32_t update_sse42_serial(uint32_t state, const uint8_t* p,
                                                               size_t n) {
  uint64_t c = state;
  for (; n >= 8; p += 8, n -= 8) c = _mm_crc32_u64(c, load64(p));
  auto s = static_cast<uint32_t>(c);
  for (; n > 0; ++p, --n) s = _mm_crc32_u8(s, *p);
  return s;
}

// Length of each of the three streams: long enough that the two table shifts per round
// (~20 cycles) are lost in the ~2,300 cycles of the round, short enough that buffers
// of a few KiB still use all three.
constexpr size_t kStreamBytes = 2048;
constexpr ShiftTable kShiftStream = make_shift_table(kStreamBytes);

__attribute__((target("sse4.2"))) uint32_t update_sse42(uint32_t state, const uint8_t* p, size_t n) {
  for (; n >= 3 * kStreamBytes; p += 3 * kStreamBytes, n -= 3 * kStreamBytes) {
    uint64_t c0 = state, c1 = 0, c2 = 0;
    const uint8_t* p1 = p + kStreamBytes;
    const uint8_t* p2 = p + 2 * kStreamBytes;
    for (size_t i = 0; i < kStreamBytes; i += 8) {
      c0 = _mm_crc32_u64(c0, load64(p + i));
      c1 = _mm_crc32_u64(c1, load64(p1 + i));
      c2 = _mm_crc32_u64(c2, load64(p2 + i));
    }
    // state(A || B || C) = shift(shift(a, |B|) ^ b, |C|) ^ c
    const uint32_t ab = shift_by_table(kShiftStream, static_cast<uint32_t>(c0)) ^
                        static_cast<uint32_t>(c1);
    state = shift_by_table(kShiftStream, ab) ^ static_cast<uint32_t>(c2);
  }
  return update_sse42_serial(state, p, n);
}

// --------------------------------------------------------------------------- PCLMUL
//
// A 16-byte chunk loaded little-endian is, in the reflected order, a polynomial of
// degree < 128 whose first 8 bytes (the low 64-bit lane) hold the x^127..x^64
// coefficients. Call the lanes H (low lane) and L (high lane): chunk = H x^64 + L.
// Moving a chunk D bytes later means multiplying it by x^(8D) mod P, and
//     H x^(64 + 8D) + L x^(8D)  ==  H * kH + L * kL   (mod P)
// up to one extra x: a carry-less multiply of two reflected 64-bit values returns
// their product times x (the 127-bit product lands one bit off the 128-bit reflected
// frame). Hence kH = x^(63 + 8D) mod P, kL = x^(8D - 1) mod P, each placed in the upper
// half of its 64-bit lane (a 32-bit reflected polynomial read as 64 bits). The products
// have degree < 96, so folding never overflows 128 bits.

constexpr uint64_t fold_constant(uint64_t exponent) { return uint64_t{x_pow_mod(exponent)} << 32; }

constexpr FoldConstants fold_by(uint64_t bytes) {
  return {fold_constant(63 + 8 * bytes), fold_constant(8 * bytes - 1)};
}

constexpr bool same(FoldConstants a, FoldConstants b) { return a.h == b.h && a.l == b.l; }

// The literals of crc32c_kernels.h (used by the VPCLMULQDQ files, which share no code
// with this one), checked against the derivation here. kFold64 moves a chunk across the
// four accumulators below, kFold16 onto the next chunk.
static_assert(same(kFold16, fold_by(16)) && same(kFold32, fold_by(32)) &&
                  same(kFold64, fold_by(64)) && same(kFold128, fold_by(128)) &&
                  same(kFold256, fold_by(256)),
              "crc32c_kernels.h's folding constants are x^(63 + 8D) and x^(8D - 1) mod P");

__attribute__((target("sse4.2,pclmul"))) inline __m128i fold(__m128i acc, __m128i k,
                                                             __m128i data) {
  const __m128i h = _mm_clmulepi64_si128(acc, k, 0x00);  // H * kH
  const __m128i l = _mm_clmulepi64_si128(acc, k, 0x11);  // L * kL
  return _mm_xor_si128(_mm_xor_si128(h, l), data);
}

__attribute__((target("sse4.2,pclmul"))) inline __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// Shortest input the folding path takes: below this, setting up and reducing four
// accumulators costs more than the crc32 instruction's 3 streams.
constexpr size_t kPclmulMinBytes = 256;
constexpr size_t kPrefetchBytes = 4096;

__attribute__((target("sse4.2,pclmul"))) uint32_t update_pclmul(uint32_t state, const uint8_t* p,
                                                                size_t n) {
  if (n < kPclmulMinBytes) return update_sse42(state, p, n);
  const __m128i k64 = _mm_set_epi64x(static_cast<int64_t>(kFold64.l), static_cast<int64_t>(kFold64.h));
  const __m128i k16 = _mm_set_epi64x(static_cast<int64_t>(kFold16.l), static_cast<int64_t>(kFold16.h));
  // Running from state s is running from 0 over the data with s XORed into its first
  // 4 bytes (the register and the next 4 bytes meet by XOR in either case).
  __m128i a0 = _mm_xor_si128(load128(p), _mm_cvtsi32_si128(static_cast<int>(state)));
  __m128i a1 = load128(p + 16);
  __m128i a2 = load128(p + 32);
  __m128i a3 = load128(p + 48);
  p += 64;
  n -= 64;
  // Four independent chains hide the multiplier's latency; each jumps 64 bytes. The
  // prefetch, one line per step 4 KiB ahead, lifts the rate on buffers streamed from
  // DRAM (measured: ~8.8 -> ~10 GB/s on one thread here); a prefetch never faults, so
  // running past the end is harmless.
  for (; n >= 64; p += 64, n -= 64) {
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
    a0 = fold(a0, k64, load128(p));
    a1 = fold(a1, k64, load128(p + 16));
    a2 = fold(a2, k64, load128(p + 32));
    a3 = fold(a3, k64, load128(p + 48));
  }
  // The accumulators hold consecutive chunks: fold each onto the next.
  __m128i a = fold(a0, k16, a1);
  a = fold(a, k16, a2);
  a = fold(a, k16, a3);
  for (; n >= 16; p += 16, n -= 16) a = fold(a, k16, load128(p));
  // a is congruent to everything so far, as the last 16 bytes read; its CRC from 0 is
  // the state. The crc32 instruction does that reduction in two steps.
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(a)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(a, 1)));
  return update_sse42_serial(static_cast<uint32_t>(c), p, n);
}

// The VPCLMULQDQ kernels take inputs from their minimum length up; shorter ones go the
// way of the next kernel down.
__attribute__((target("sse4.2,pclmul"))) uint32_t update_vpclmul_avx2(uint32_t state,
                                                                      const uint8_t* p,
                                                                      size_t n) {
  if (n < kVpclmulAvx2MinBytes) return update_pclmul(state, p, n);
  return crc32c_update_vpclmul_avx2(state, p, n);
}

__attribute__((target("sse4.2,pclmul"))) uint32_t update_vpclmul_avx512(uint32_t state,
                                                                        const uint8_t* p,
                                                                        size_t n) {
  if (n < kVpclmulAvx512MinBytes) return update_vpclmul_avx2(state, p, n);
  return crc32c_update_vpclmul_avx512(state, p, n);
}

#endif  // PLAIT_CRC32C_HAVE_X86_PATHS

// ---------------------------------------------------------------------------- dispatch

using UpdateFn = uint32_t (*)(uint32_t, const uint8_t*, size_t);

struct Crc32cKernel {
  const char* name;
  const char* needs;  // in words, for error messages
  bool (*runs_here)();
  UpdateFn update;
};

bool always() { return true; }

#if PLAIT_CRC32C_HAVE_X86_PATHS
bool has_sse42() { return cpu::features().sse42; }
bool has_pclmul() { return has_sse42() && cpu::features().pclmulqdq; }
bool has_vpclmul_avx2() { return has_pclmul() && cpu::features().vpclmulqdq && cpu::features().avx2; }
bool has_vpclmul_avx512() { return has_vpclmul_avx2() && cpu::features().avx512f; }
#endif

// In the order of preference of the default.
constexpr Crc32cKernel kKernels[] = {
#if PLAIT_CRC32C_HAVE_X86_PATHS
    {"vpclmul_avx512", "VPCLMULQDQ, AVX-512 F, AVX2, PCLMULQDQ and SSE4.2", has_vpclmul_avx512,
     update_vpclmul_avx512},
    {"vpclmul_avx2", "VPCLMULQDQ, AVX2, PCLMULQDQ and SSE4.2", has_vpclmul_avx2,
     update_vpclmul_avx2},
    {"pclmul", "PCLMULQDQ and SSE4.2", has_pclmul, update_pclmul},
    {"sse42", "SSE4.2", has_sse42, update_sse42},
#endif
    {"portable", "nothing", always, update_portable},
};

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

std::string kernel_names(bool runnable_only) {
  std::string names;
  for (const Crc32cKernel& k : kKernels) {
    if (runnable_only && !k.runs_here()) continue;
    if (!names.empty()) names += ", ";
    names += k.name;
  }
  return names;
}

const Crc32cKernel* find(std::string_view name, std::string* error, const char* source) {
  for (const Crc32cKernel& k : kKernels) {
    if (name != k.name) continue;
    if (k.runs_here()) return &k;
    *error = std::string(source) + " '" + std::string(name) + "' needs " + k.needs +
             ", which this CPU lacks; it runs: " + kernel_names(true);
    return nullptr;
  }
  *error = std::string(source) + " '" + std::string(name) +
           "' is not a crc32c kernel; pick one of: " + kernel_names(false) +
           " (this CPU runs: " + kernel_names(true) + ")";
  return nullptr;
}

struct DefaultKernel {
  const Crc32cKernel* kernel = nullptr;
  std::string error;  // why PLAIT_CRC32C_KERNEL could not be used
};

// PLAIT_CRC32C_KERNEL if set; else the first kernel this CPU runs, skipping the
// carry-less multiply ones if PLAIT_CRC32C_NO_PCLMUL is set and every hardware one if
// PLAIT_CRC32C_NO_HW is (each not "" or "0"). Read once.
const DefaultKernel& default_kernel() {
  static const DefaultKernel chosen = [] {
    DefaultKernel d;
    const char* forced = std::getenv("PLAIT_CRC32C_KERNEL");
    if (forced != nullptr && forced[0] != '\0') {
      d.kernel = find(forced, &d.error, "PLAIT_CRC32C_KERNEL");
      return d;
    }
    const bool no_hw = env_flag("PLAIT_CRC32C_NO_HW");
    const bool no_pclmul = env_flag("PLAIT_CRC32C_NO_PCLMUL");
    for (const Crc32cKernel& k : kKernels) {
      if (!k.runs_here()) continue;
      const std::string_view name = k.name;
      if (no_hw && name != "portable") continue;
      if (no_pclmul && name.find("pclmul") != std::string_view::npos) continue;
      d.kernel = &k;
      break;
    }
    return d;
  }();
  return chosen;
}

UpdateFn pick_update(std::optional<c10::string_view> name) {
  if (name.has_value()) {
    std::string error;
    const Crc32cKernel* k = find(*name, &error, "crc32c: kernel");
    TORCH_CHECK(k != nullptr, error);
    return k->update;
  }
  const DefaultKernel& d = default_kernel();
  TORCH_CHECK(d.kernel != nullptr, "crc32c: ", d.error,
              "; unset PLAIT_CRC32C_KERNEL or name one of those");
  return d.kernel->update;
}

// plait::crc32c_kernels(): the kernels this CPU runs, the default first, then the others
// in order of preference; with all=True, every kernel of this build.
std::vector<std::string> crc32c_kernels(bool all) {
  std::vector<std::string> names;
  const DefaultKernel& d = default_kernel();
  if (!all && d.kernel != nullptr) names.emplace_back(d.kernel->name);
  for (const Crc32cKernel& k : kKernels) {
    if (!all && (&k == d.kernel || !k.runs_here())) continue;
    names.emplace_back(k.name);
  }
  return names;
}

// Below 1 MiB (~100 us at one thread) a fork/join is not worth it; each thread gets at
// least 256 KiB.
constexpr int64_t kParallelMinBytes = int64_t{1} << 20;
constexpr int64_t kPieceMinBytes = int64_t{256} << 10;

uint32_t update(UpdateFn fn, uint32_t state, const uint8_t* p, int64_t n) {
  const int64_t threads = at::get_num_threads();
  if (n < kParallelMinBytes || threads < 2 || at::in_parallel_region()) {
    return fn(state, p, static_cast<size_t>(n));
  }
  const int64_t pieces = std::min<int64_t>(threads, n / kPieceMinBytes);
  // Equal pieces, multiples of 64 bytes; the last one takes the remainder.
  const int64_t piece = (n / pieces) & ~int64_t{63};
  std::vector<uint32_t> states(static_cast<size_t>(pieces));
  at::parallel_for(0, pieces, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t len = b + 1 == pieces ? n - b * piece : piece;
      states[b] = fn(b == 0 ? state : 0, p + b * piece, static_cast<size_t>(len));
    }
  });
  uint32_t s = states[0];
  for (int64_t b = 1; b < pieces; ++b) {
    const int64_t len = b + 1 == pieces ? n - b * piece : piece;
    s = shift_zeros(s, static_cast<uint64_t>(len)) ^ states[b];
  }
  return s;
}

int64_t crc32c(const at::Tensor& data, int64_t crc, std::optional<c10::string_view> kernel) {
  TORCH_CHECK(data.scalar_type() == at::kByte, "crc32c: data must be uint8, got ",
              data.scalar_type(), "; checksum the bytes of a tensor x with x.view(torch.uint8)");
  TORCH_CHECK(data.is_contiguous(), "crc32c: data must be contiguous, got strides ",
              data.strides(), "; pass data.contiguous()");
  TORCH_CHECK(data.device().is_cpu(), "crc32c: data must be a CPU tensor, got one on ",
              data.device(), "; copy it with data.cpu()");
  TORCH_CHECK(crc >= 0 && crc <= int64_t{0xFFFFFFFF},
              "crc32c: crc must be a CRC-32C value in [0, 2**32), got ", crc,
              "; pass 0 to start or the value a previous call returned to continue");
  const UpdateFn fn = pick_update(kernel);
  const uint32_t state = ~static_cast<uint32_t>(crc);
  const int64_t n = data.numel();
  if (n == 0) return crc;
  return static_cast<int64_t>(~update(fn, state, data.const_data_ptr<uint8_t>(), n));
}

}  // namespace
}  // namespace plait::checksum

// One kernel for every backend, so that a tensor on any device gets the device check's
// message (a CUDA or meta tensor reaches it too) rather than a missing-kernel error.
TORCH_LIBRARY_IMPL(plait, CompositeExplicitAutograd, m) {
  m.impl("crc32c", &plait::checksum::crc32c);
  m.impl("crc32c_kernels", &plait::checksum::crc32c_kernels);
}
