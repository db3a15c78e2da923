// Vectorisable float math shared by the C++ CPU kernels (window and mediator attention).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define VF_INLINE inline __attribute__((always_inline))

namespace varformer_cpu {

// exp(x) for softmax arguments x <= 0 (x above 88 is clamped there): exactly 0 below -80,
// because results below ~1e-35 are far under the resolution of any row sum (>= 1) and,
// multiplied into the products that follow, would produce denormals (microcode assists,
// ~25x slower on x86); else 2^k * p(r) with r = x - k ln2 and a degree-6 polynomial (max rel.
// error ~1e-7), written so that the compiler vectorises it.
VF_INLINE float exp_clamped(float x) {
  const bool tiny = x < -80.0f;
  x = tiny ? -80.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504f + 12582912.0f;   // round(x / ln2) in the low mantissa bits
  const float k = t - 12582912.0f;
  const float r = x - k * 0.693145752f - k * 1.42860677e-6f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t tb;
  std::memcpy(&tb, &t, 4);
  const int32_t bits = (tb - 0x4B400000 + 127) << 23;
  float sc;
  std::memcpy(&sc, &bits, 4);
  return tiny ? 0.0f : p * sc;
}

VF_INLINE double exp_clamped(double x) { return x < -700.0 ? 0.0 : std::exp(x); }

#if defined(__x86_64__) || defined(__i386__)
// exp_clamped on 16 / 8 lanes, bit for bit the scalar function (same rounding of k, same
// fused multiply-adds): GCC's vectorisation of the scalar form spends about ten extra
// instructions per vector on its two selects. NaN stays NaN (max/min return their second
// operand on NaN, and "not less than" keeps unordered lanes).
VF_AVX512 VF_INLINE __m512 exp_clamped16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-80.0f), _CMP_NLT_UQ);
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-80.0f), x));
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 k = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), magic), magic);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, k);   // p 2^k, exact for the normal results here
}

VF_AVX2 VF_INLINE __m256 exp_clamped8(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-80.0f), _CMP_NLT_UQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-80.0f), x));
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), magic);
  const __m256 k = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}
#endif

// Natural log of a normal positive float (softmax row sums, >= 1): x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), log m from the series of atanh (max rel. error ~1e-7), vectorisable.
VF_INLINE float log_positive(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, 4);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  int32_t mb = (bits & 0x007fffff) | 0x3f800000;    // m in [1, 2)
  float m;
  std::memcpy(&m, &mb, 4);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float z = (m - 1.0f) / (m + 1.0f), z2 = z * z;   // |z| <= 0.1716
  float p = 0.11111111f;
  p = p * z2 + 0.14285714f;
  p = p * z2 + 0.2f;
  p = p * z2 + 0.33333333f;
  p = p * z2 + 1.0f;
  return 2.0f * z * p + static_cast<float>(e) * 0.693147181f;
}

VF_INLINE double log_positive(double x) { return std::log(x); }

}  // namespace varformer_cpu
