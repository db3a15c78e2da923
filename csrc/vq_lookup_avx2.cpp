// AVX2 + FMA variant of the VQ lookup's inner kernel (see vq_lookup_kernel.h), compiled with a
// target pragma whatever the build flags; vq_lookup.cpp runs it only where the CPU reports avx2
// and fma. Register tile: 6 codes x 16 float32 tokens (12 of the 16 ymm registers, two for the
// tokens, one for the broadcast code entry), the shape that fits 16 registers; and the int16
// screening (vq_screen_kernel.h) with vpmaddwd (vpdpwssd: vq_lookup_avx2vnni.cpp).
#include "vq_lookup_isa.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define VF_HAVE_AVX2 1
#include <immintrin.h>

#include <cstdint>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace varformer_vq {
namespace isa_avx2 {

struct F32 {
  using T = float;
  using I = int32_t;
  using V = __m256;
  using M = __m256;
  static constexpr int W = 8;
  static inline V load(const T* p) { return _mm256_loadu_ps(p); }
  static inline void store(T* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V bcast(const T* p) { return _mm256_broadcast_ss(p); }
  static inline V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static inline V min(V a, V b) { return _mm256_min_ps(a, b); }
  static inline V iload(const I* p) {
    return _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline void istore(I* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_castps_si256(v));
  }
  static inline V ibcast(const I* p) { return _mm256_castsi256_ps(_mm256_set1_epi32(*p)); }
  static inline V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static inline bool any(M m) { return _mm256_movemask_ps(m) != 0; }
};

struct F64 {
  using T = double;
  using I = int64_t;
  using V = __m256d;
  using M = __m256d;
  static constexpr int W = 4;
  static inline V load(const T* p) { return _mm256_loadu_pd(p); }
  static inline void store(T* p, V v) { _mm256_storeu_pd(p, v); }
  static inline V bcast(const T* p) { return _mm256_broadcast_sd(p); }
  static inline V fnmadd(V a, V b, V c) { return _mm256_fnmadd_pd(a, b, c); }
  static inline M lt(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_LT_OQ); }
  static inline V min(V a, V b) { return _mm256_min_pd(a, b); }
  static inline V iload(const I* p) {
    return _mm256_castsi256_pd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline void istore(I* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_castpd_si256(v));
  }
  static inline V ibcast(const I* p) {
    return _mm256_castsi256_pd(_mm256_set1_epi64x(static_cast<long long>(*p)));
  }
  static inline V select(M m, V a, V b) { return _mm256_blendv_pd(b, a, m); }
  static inline bool any(M m) { return _mm256_movemask_pd(m) != 0; }
};

// int32 lanes for the integer screening (vq_screen_kernel.h).
#include "vq_screen_ymm.h"
struct S32 : S32Ymm {
  // The add in place (asm): left to itself gcc adds into a fresh register and copies it back,
  // a third more instructions in the loop.
  static inline V madd(V acc, V e, V z) {
    const V t = _mm256_madd_epi16(e, z);
    __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(t));
    return acc;
  }
};

#include "vq_lookup_kernel.h"
#include "vq_screen_kernel.h"
#include "phi_conv_kernel.h"

constexpr int kChunkBytes = 16384;

void scan32(const float* zt, int64_t ld, const float* E, const float* hs, const int32_t* ids,
            int64_t C, int64_t v0, int64_t v1, float* best, int32_t* bidx) {
  scan<F32, 6, 2, 12, kChunkBytes>(zt, ld, E, hs, ids, C, v0, v1, best, bidx);
}

void scan64(const double* zt, int64_t ld, const double* E, const double* hs, const int64_t* ids,
            int64_t C, int64_t v0, int64_t v1, double* best, int64_t* bidx) {
  scan<F64, 6, 2, 12, kChunkBytes>(zt, ld, E, hs, ids, C, v0, v1, best, bidx);
}

// Screening tile 4 codes x 16 tokens (2 vectors: the panel width panel32 the driver lays out);
// measured on Zen 4 against 3-6 codes, the fastest.
void screen32(const int32_t* zt, int64_t ld, const int32_t* Eq, const int32_t* H, int64_t P,
              int64_t v0, int64_t v1, int32_t* best, int32_t* thr, const int32_t* marg,
              ScreenLists* lists) {
  screen<S32, 4, 2, 8, kChunkBytes>(zt, ld, Eq, H, P, v0, v1, best, thr, marg, lists);
}

void rescore32(const float* z, const float* E, const float* hs, int64_t C, const int32_t* codes,
               const int32_t* vals, int32_t n, int64_t limit, float* best, int32_t* bidx) {
  rescore(z, E, hs, C, codes, vals, n, limit, best, bidx);
}

void phi32(const float* pad, int64_t rows, int64_t Wd, int64_t C, const float* wp,
           const float* bias, float keep, float mix, const float* h, float* out, float* fhat,
           float* frest) {
  phi_rows<F32, 6, 2>(pad, rows, Wd, C, wp, bias, keep, mix, h, out, fhat, frest);
}

}  // namespace isa_avx2
}  // namespace varformer_vq

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace varformer_vq {

const IsaKernels* isa_kernels_avx2(const char** why) {
#ifdef VF_HAVE_AVX2
  // The screening's multiply-adds in one VNNI instruction where the CPU has it.
  static const ScreenFn vnni = screen32_avx2vnni();
  static const IsaKernels k{"avx2", "avx2,fma; screening vpmaddwd", isa_avx2::F32::W,
                            isa_avx2::F64::W,
                            2 * isa_avx2::F32::W, 2 * isa_avx2::F64::W,
                            isa_avx2::kChunkBytes, &isa_avx2::scan32, &isa_avx2::scan64,
                            &isa_avx2::phi32, &isa_avx2::screen32, &isa_avx2::rescore32,
                            isa_avx2::kScreenCap,
                            vnni, "vpdpwssd (avxvnni)"};
  if (why) *why = "";
  return &k;
#else
  if (why) *why = "not compiled: needs GCC or clang on x86-64";
  return nullptr;
#endif
}

}  // namespace varformer_vq
