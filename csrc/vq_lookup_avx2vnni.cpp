// AVX-VNNI screening kernel of the float32 VQ lookup (vq_screen_kernel.h): the avx2 variant's
// integer screening where the CPU reports avx_vnni (Intel Alder Lake and later client cores,
// Sierra Forest, Sapphire Rapids, Zen 5): the 256-bit vpdpwssd multiplies the int16 pairs and
// adds into the int32 accumulator in one instruction (vpmaddwd + vpaddd otherwise). Compiled
// with a target pragma; the avx2 variant (vq_lookup_avx2.cpp) offers it, vq_lookup.cpp picks it
// per call (VARFORMER_VQ_VNNI).
#include "vq_lookup_isa.h"

#if (defined(__x86_64__) || defined(_M_X64)) &&                                           \
    ((defined(__clang__) && __clang_major__ >= 12) ||                                     \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define VF_HAVE_AVXVNNI 1
#include <immintrin.h>

#include <cstdint>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avxvnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")
#endif

namespace varformer_vq {
namespace isa_avx2vnni {

#define VF_UNROLL _Pragma("GCC unroll 32")

#include "vq_screen_ymm.h"
struct S32 : S32Ymm {
  // In place (asm): through the intrinsic gcc accumulates into a copy and moves it back (two
  // register moves per multiply-add, and spills), which made it slower than vpmaddwd + vpaddd.
  static inline V madd(V acc, V e, V z) {
    __asm__("%{vex%} vpdpwssd %2, %1, %0" : "+x"(acc) : "x"(e), "x"(z));
    return acc;
  }
};

#include "vq_screen_kernel.h"

constexpr int kChunkBytes = 16384;

// Tile 6 codes x 16 tokens (16 tokens: the panel width the avx2 driver lays out). 12
// accumulators cover vpdpwssd's latency on two ports (measured on Sapphire Rapids: 0.77x the
// time of 4 codes x 16, which leaves the accumulator chains short of issue slots).
void screen32(const int32_t* zt, int64_t ld, const int32_t* Eq, const int32_t* H, int64_t P,
              int64_t v0, int64_t v1, int32_t* best, int32_t* thr, const int32_t* marg,
              ScreenLists* lists) {
  screen<S32, 6, 2, 8, kChunkBytes>(zt, ld, Eq, H, P, v0, v1, best, thr, marg, lists);
}

}  // namespace isa_avx2vnni
}  // namespace varformer_vq

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace varformer_vq {

ScreenFn screen32_avx2vnni() {
#ifdef VF_HAVE_AVXVNNI
  __builtin_cpu_init();
  return __builtin_cpu_supports("avxvnni") ? &isa_avx2vnni::screen32 : nullptr;
#else
  return nullptr;
#endif
}

}  // namespace varformer_vq
