// AVX-512 VNNI screening kernel of the float32 VQ lookup (vq_screen_kernel.h): the avx512
// variant's integer screening where the CPU reports avx512_vnni (Cascade Lake and later, Zen 4):
// vpdpwssd multiplies the int16 pairs and adds into the int32 accumulator in one instruction
// (madd + add otherwise, which also costs register copies). Compiled with a target pragma; the
// avx512 variant (vq_lookup_avx512.cpp) picks it at run time.
#include "vq_lookup_isa.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define VF_HAVE_AVX512VNNI 1
#include <immintrin.h>

#include <cstdint>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vnni"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni")
#endif

namespace varformer_vq {
namespace isa_avx512vnni {

#define VF_UNROLL _Pragma("GCC unroll 32")

struct S32 {
  using V = __m512i;
  static constexpr int W = 16;
  static inline V load(const int32_t* p) { return _mm512_loadu_si512(p); }
  static inline void store(int32_t* p, V v) { _mm512_storeu_si512(p, v); }
  static inline V bcast(const int32_t* p) { return _mm512_set1_epi32(*p); }
  static inline V madd(V acc, V e, V z) { return _mm512_dpwssd_epi32(acc, e, z); }
  static inline V min(V a, V b) { return _mm512_min_epi32(a, b); }
  static inline unsigned le_mask(V a, V b) { return _mm512_cmple_epi32_mask(a, b); }
};

#include "vq_screen_kernel.h"

constexpr int kChunkBytes = 16384;

void screen32(const int32_t* zt, int64_t ld, const int32_t* Eq, const int32_t* H, int64_t P,
              int64_t v0, int64_t v1, int32_t* best, int32_t* thr, const int32_t* marg,
              ScreenLists* lists) {
  screen<S32, 8, 2, 12, kChunkBytes>(zt, ld, Eq, H, P, v0, v1, best, thr, marg, lists);
}

}  // namespace isa_avx512vnni
}  // namespace varformer_vq

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace varformer_vq {

ScreenFn screen32_avx512vnni() {
#ifdef VF_HAVE_AVX512VNNI
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") ? &isa_avx512vnni::screen32 : nullptr;
#else
  return nullptr;
#endif
}

}  // namespace varformer_vq
