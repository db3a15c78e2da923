// AVX-512 (avx512f + avx512bw) variant of the VQ lookup's inner kernel (see vq_lookup_kernel.h),
// compiled with a target pragma whatever the build flags; vq_lookup.cpp runs it only where the
// CPU reports both. Register tile: 12 codes x 32 float32 tokens (24 of the 32 zmm registers),
// codebook entries as embedded broadcasts. Its int16 screening runs only with VNNI
// (vq_lookup_avx512vnni.cpp): vpmaddwd + vpaddd on zmm was slower than the float32 scan on an
// Intel core (1.07-1.12x the time, Sapphire Rapids with VARFORMER_VQ_VNNI=0; zmm integer ops
// issue on two ports, the same as the FMAs), which is what Skylake-SP would run.
#include "vq_lookup_isa.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define VF_HAVE_AVX512 1
#include <immintrin.h>

#include <cstdint>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
#endif

namespace varformer_vq {
namespace isa_avx512 {

struct F32 {
  using T = float;
  using I = int32_t;
  using V = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static inline V load(const T* p) { return _mm512_loadu_ps(p); }
  static inline void store(T* p, V v) { _mm512_storeu_ps(p, v); }
  static inline V bcast(const T* p) { return _mm512_set1_ps(*p); }
  static inline V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static inline V min(V a, V b) { return _mm512_min_ps(a, b); }
  static inline V iload(const I* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
  static inline void istore(I* p, V v) { _mm512_storeu_si512(p, _mm512_castps_si512(v)); }
  static inline V ibcast(const I* p) { return _mm512_castsi512_ps(_mm512_set1_epi32(*p)); }
  static inline V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  static inline bool any(M m) { return m != 0; }
};

struct F64 {
  using T = double;
  using I = int64_t;
  using V = __m512d;
  using M = __mmask8;
  static constexpr int W = 8;
  static inline V load(const T* p) { return _mm512_loadu_pd(p); }
  static inline void store(T* p, V v) { _mm512_storeu_pd(p, v); }
  static inline V bcast(const T* p) { return _mm512_set1_pd(*p); }
  static inline V fnmadd(V a, V b, V c) { return _mm512_fnmadd_pd(a, b, c); }
  static inline M lt(V a, V b) { return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ); }
  static inline V min(V a, V b) { return _mm512_min_pd(a, b); }
  static inline V iload(const I* p) { return _mm512_castsi512_pd(_mm512_loadu_si512(p)); }
  static inline void istore(I* p, V v) { _mm512_storeu_si512(p, _mm512_castpd_si512(v)); }
  static inline V ibcast(const I* p) {
    return _mm512_castsi512_pd(_mm512_set1_epi64(static_cast<long long>(*p)));
  }
  static inline V select(M m, V a, V b) { return _mm512_mask_blend_pd(m, b, a); }
  static inline bool any(M m) { return m != 0; }
};

#include "vq_lookup_kernel.h"
#include "vq_screen_kernel.h"
#include "phi_conv_kernel.h"

constexpr int kChunkBytes = 16384;

void scan32(const float* zt, int64_t ld, const float* E, const float* hs, const int32_t* ids,
            int64_t C, int64_t v0, int64_t v1, float* best, int32_t* bidx) {
  scan<F32, 12, 2, 12, kChunkBytes>(zt, ld, E, hs, ids, C, v0, v1, best, bidx);
}

void scan64(const double* zt, int64_t ld, const double* E, const double* hs, const int64_t* ids,
            int64_t C, int64_t v0, int64_t v1, double* best, int64_t* bidx) {
  scan<F64, 12, 2, 12, kChunkBytes>(zt, ld, E, hs, ids, C, v0, v1, best, bidx);
}

void rescore32(const float* z, const float* E, const float* hs, int64_t C, const int32_t* codes,
               const int32_t* vals, int32_t n, int64_t limit, float* best, int32_t* bidx) {
  rescore(z, E, hs, C, codes, vals, n, limit, best, bidx);
}

void phi32(const float* pad, int64_t rows, int64_t Wd, int64_t C, const float* wp,
           const float* bias, float keep, float mix, const float* h, float* out, float* fhat,
           float* frest) {
  phi_rows<F32, 12, 2>(pad, rows, Wd, C, wp, bias, keep, mix, h, out, fhat, frest);
}

}  // namespace isa_avx512
}  // namespace varformer_vq

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace varformer_vq {

const IsaKernels* isa_kernels_avx512(const char** why) {
#ifdef VF_HAVE_AVX512
  // The integer screening where the CPU has VNNI (none otherwise: see the top of this file).
  static const ScreenFn vnni = screen32_avx512vnni();
  static const IsaKernels k{"avx512", "avx512f,avx512bw; screening vpdpwssd (avx512vnni) only",
                            isa_avx512::F32::W, isa_avx512::F64::W,
                            2 * isa_avx512::F32::W, 2 * isa_avx512::F64::W,
                            isa_avx512::kChunkBytes,
                            &isa_avx512::scan32, &isa_avx512::scan64,
                            &isa_avx512::phi32, nullptr,
                            &isa_avx512::rescore32, isa_avx512::kScreenCap,
                            vnni, "vpdpwssd (avx512vnni)"};
  if (why) *why = "";
  return &k;
#else
  if (why) *why = "not compiled: needs GCC or clang on x86-64";
  return nullptr;
#endif
}

}  // namespace varformer_vq
