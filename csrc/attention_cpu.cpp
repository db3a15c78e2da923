// softmax(q kᵀ s) v on CPU, forward and backward: the two stages of mediator attention
// (varformer/ops/mediator_attention.py runs stage 1, the L mediators over the keys, and stage 2,
// the queries over the mediators and their summary, through these ops).
//
//   attention_fwd(q [G, Tq, d], k [G, Tk, d], v [G, Tk, d], scale) -> out [G, Tq, d], lse [G, Tq]
//   attention_bwd(dout, q, k, v, out, lse, scale) -> dq, dk, dv     (float32 or float64)
//
// Work is cut into tiles: (head g, query block of <= kQB rows, key chunk of <= kKC keys). A
// tile's score block stays in a per-thread buffer (L2) and every product runs through one
// packed-panel GEMM over B panels of 16 columns. float32 register tiles by the CPU's widest ISA
// (VARFORMER_CPU_ISA=avx2|baseline narrows it; attention_isa() reports it):
//   avx512  12 x 32 (two panels): 24 zmm accumulators, per k two loads and 12 broadcasts; A
//           read in place where row-major, else packed as [K][12] (16 x 16 zmm transposes for
//           the transposed operands); edges by masked stores
//   avx2    6 x 16, A read in place: 12 ymm accumulators, per k two loads and 6 broadcasts,
//           the k loop unrolled by two and C written from the registers (full tiles)
//   portable (float64, other CPUs) 6 x 16, vectorised by the compiler.
//
// Forward: one tile per unit, exact softmax over its key chunk; with several chunks each writes a
// partial output and log-sum-exp, merged in chunk order; with Tq <= 16 (few mediators over many
// keys) it computes sᵀ = k qᵀ instead, key rows read in place (forward_few_rows), and so does the
// backward (backward_few_rows). Backward: recomputes P = exp(s - lse), the row term
// delta = rowsum(dO o) once per call;
// units own either fixed groups of query blocks (dq exact, dk/dv one partial per group) or of
// key chunks (dk/dv exact, dq one partial per group), whichever side has more blocks; partials
// are summed in group order, so results do not depend on the thread count.
//
// Threads: run_blocks (cpu_threads.h: torch's OpenMP pool on a quiet machine, the extension's own
// helper pool on a busy one), one block loop per pass and per merge of partials, units from an
// atomic counter. Workers run with denormals flushed (FTZ/DAZ); exp is exactly 0 below -80
// (cpu_math.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "cpu_math.h"
#include "cpu_threads.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace varformer_attention {
namespace {

constexpr int64_t kMR = 6;      // rows of the AVX2 / portable register tile
constexpr int64_t kMR5 = 12;    // rows of the AVX-512 register tile
constexpr int64_t kNR = 16;     // columns of a register tile (B panel width)
constexpr int64_t kKB = 256;    // K block of one packing pass
constexpr int64_t kQB = 144;    // query rows of a tile (96, 144, 192 x 256, 384, 512 keys tried)
constexpr int64_t kKC = 256;    // keys of a tile
constexpr int64_t kGroups = 8;  // units of a call over all heads (fixed: not the thread count)

using varformer_cpu::Isa;
using varformer_cpu::kAvx2;
using varformer_cpu::kAvx512;
using varformer_cpu::kBase;

// Element (r, c) of a strided matrix view: p[r * rs + c * cs].
template <typename T>
struct View {
  const T* p;
  int64_t rs, cs;
};

// Row stride of a tile's score buffers: off powers of two, so that reading a column block of the
// buffer (the transposed products pᵀ dO, dsᵀ q) does not map every row to the same cache sets.
inline int64_t score_ld(int64_t keys) { return (keys + 15) / 16 * 16 + 16; }

// std::allocator that leaves elements default-initialised (for T = float / double: not
// written), so that sizing a buffer does not fill it with zeros.
template <typename T>
struct UninitAlloc : std::allocator<T> {
  template <typename U>
  struct rebind { using other = UninitAlloc<U>; };
  UninitAlloc() = default;
  template <typename U>
  UninitAlloc(const UninitAlloc<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept { ::new (static_cast<void*>(p)) U; }
  template <typename U, typename... A>
  void construct(U* p, A&&... args) { ::new (static_cast<void*>(p)) U(std::forward<A>(args)...); }
};
template <typename T>
using Buf = std::vector<T, UninitAlloc<T>>;

// Elements a Buf needs for n of them from a 64-byte aligned start (aligned(), below).
template <typename T>
constexpr size_t aligned_capacity(int64_t n) { return static_cast<size_t>(n) + 64 / sizeof(T); }

// A worker's buffers for one call, uninitialised: every element is written before it is read
// (zero-filling them, 0.3-1 MB per worker and call, took longer than a small call's work).
template <typename T>
struct Scratch {
  Buf<T> s, dp;      // scores / probabilities, and dp / ds, [kQB][score_ld]
  Buf<T> kt, vt;     // the unit's key chunk as packed panels of kᵀ and vᵀ [d][keys]
  Buf<T> kp, vp;     // ... and of k and v [keys][d]
  T *ktp = nullptr, *vtp = nullptr, *kpp = nullptr, *vpp = nullptr;   // their aligned starts
  Buf<T> edge;       // B packed by gemm(): one panel [K][kNR] (all of them: avx512)
  Buf<T> apk;        // avx512: A packed by register tiles, [tiles][K][kMR5]
  Buf<T> row0;       // few-rows backward: delta and lse padded to kNR rows each
  Buf<T> sums;       // forward: running row sums of a unit's query rows
  // score buffers sized for aligned() (which then never regrows them)
  Scratch()
      : s(aligned_capacity<T>(kQB * score_ld(kKC))), dp(aligned_capacity<T>(kQB * score_ld(kKC))),
        row0(2 * kNR) {}
};

// ------------------------------------------------------------------------------ GEMM
// acc[kMR][kNR] = sum_k A(i, k) B(k, j) with A(i, k) = a[i][k * acs] (row pointers a[i]) and
// B(k, j) = b[k * ldb + j]: read in place, no packing (portable; the compiler vectorises j).
template <typename T>
VF_INLINE void tile_generic(int64_t K, const T* const* a, int64_t acs, const T* __restrict b,
                            int64_t ldb, T* __restrict acc) {
  T c[kMR][kNR];
  for (int64_t i = 0; i < kMR; ++i)
#pragma omp simd
    for (int64_t j = 0; j < kNR; ++j) c[i][j] = T(0);
  for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 6
    for (int64_t i = 0; i < kMR; ++i) {
      const T ai = a[i][k * acs];
#pragma omp simd
      for (int64_t j = 0; j < kNR; ++j) c[i][j] += ai * b[k * ldb + j];
    }
  }
  for (int64_t i = 0; i < kMR; ++i)
#pragma omp simd
    for (int64_t j = 0; j < kNR; ++j) acc[i * kNR + j] = c[i][j];
}

#if defined(__x86_64__) || defined(__i386__)
// The same for float32 with AVX2+FMA: 6 x 2 ymm accumulators, per k two loads of B and six
// broadcasts of A. Not inlined: GCC cannot inline a target-specific function into the generic
// GEMM template.
VF_AVX2 __attribute__((noinline)) void tile_avx2(int64_t K, const float* const* a, int64_t acs,
                                                 const float* __restrict b, int64_t ldb,
                                                 float* __restrict acc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  for (int64_t k = 0; k < K; ++k, b += ldb) {
    const int64_t o = k * acs;
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a0 + o);
    c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a1 + o);
    c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a2 + o);
    c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a3 + o);
    c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a4 + o);
    c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a5 + o);
    c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  _mm256_storeu_ps(acc, c00); _mm256_storeu_ps(acc + 8, c01);
  _mm256_storeu_ps(acc + 16, c10); _mm256_storeu_ps(acc + 24, c11);
  _mm256_storeu_ps(acc + 32, c20); _mm256_storeu_ps(acc + 40, c21);
  _mm256_storeu_ps(acc + 48, c30); _mm256_storeu_ps(acc + 56, c31);
  _mm256_storeu_ps(acc + 64, c40); _mm256_storeu_ps(acc + 72, c41);
  _mm256_storeu_ps(acc + 80, c50); _mm256_storeu_ps(acc + 88, c51);
}

// One k of tile_avx2_full: rows 3j..3j+2 of A at q0 / q3 + {0, rs, rs2}, B row bk [16].
VF_AVX2 VF_INLINE void step_avx2(const float* bk, const float* q0, const float* q3, int64_t rs,
                                 int64_t rs2, __m256* c0, __m256* c1) {
  const __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
#pragma GCC unroll 6
  for (int i = 0; i < kMR; ++i) {
    const float* q = i < 3 ? q0 : q3;
    const int j = i % 3;
    const __m256 x = _mm256_broadcast_ss(q + (j == 0 ? 0 : (j == 1 ? rs : rs2)));
    c0[i] = _mm256_fmadd_ps(x, b0, c0[i]);
    c1[i] = _mm256_fmadd_ps(x, b1, c1[i]);
  }
}

// The full 6 x 16 AVX2 tile with A read in place as A(i, k) = a[i * rs + k * cs] (two row
// pointers, rows 3j..3j+2 at {0, rs, 2 rs}), the k loop unrolled by two, and C rows [0, 6) x
// [0, 16) (row stride ldc) = alpha acc + beta C written from the registers (beta 0: C not
// read). Unrolled, the loop has half the scalar uops per FMA (on Intel cores they share ports
// 0/1 with the FMAs): 1.05-1.10x the rolled tile in a stand-alone loop; in the kernel 3-9% on
// small stages, nothing measurable at d = 160 (NOTES.md, 2026-12-07). Edge tiles: tile_avx2.
VF_AVX2 __attribute__((noinline)) void tile_avx2_full(int64_t K, const float* a, int64_t rs,
                                                      int64_t cs, const float* __restrict b,
                                                      float alpha, float beta, float* C,
                                                      int64_t ldc) {
  __m256 c0[kMR], c1[kMR];
#pragma GCC unroll 6
  for (int i = 0; i < kMR; ++i) { c0[i] = _mm256_setzero_ps(); c1[i] = _mm256_setzero_ps(); }
  const float *p0 = a, *p3 = a + 3 * rs;
  const int64_t rs2 = 2 * rs;
  int64_t k = 0;
  for (; k + 2 <= K; k += 2, b += 2 * kNR, p0 += 2 * cs, p3 += 2 * cs) {
    step_avx2(b, p0, p3, rs, rs2, c0, c1);
    step_avx2(b + kNR, p0 + cs, p3 + cs, rs, rs2, c0, c1);
  }
  if (k < K) step_avx2(b, p0, p3, rs, rs2, c0, c1);
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
#pragma GCC unroll 6
  for (int i = 0; i < kMR; ++i) {
    float* r = C + i * ldc;
    __m256 y0 = _mm256_mul_ps(va, c0[i]), y1 = _mm256_mul_ps(va, c1[i]);
    if (beta != 0.0f) {
      y0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(r), y0);
      y1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(r + 8), y1);
    }
    _mm256_storeu_ps(r, y0);
    _mm256_storeu_ps(r + 8, y1);
  }
}
#endif

#if defined(__x86_64__) || defined(__i386__)
// dst[c * dld + r] = src[r * ld + c] for c < cols <= 16 and r < 16 (rows past `rows` zero),
// storing the lanes of `keep` of each dst row: a 16 x 16 transpose in zmm registers (unpack
// pairs of rows, then pairs of pairs, then 128-bit lanes), the packing of transposed operands.
VF_AVX512 void transpose16(const float* src, int64_t ld, int64_t rows, int64_t cols, float* dst,
                           int64_t dld, __mmask16 keep) {
  const __mmask16 cm = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + i * ld) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {   // r[i + m]: lane L holds column 4L + m of rows i..i+3
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), e = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xdd);
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xdd);
    t[m] = _mm512_shuffle_f32x4(v0, w0, 0x88);        // column m
    t[4 + m] = _mm512_shuffle_f32x4(v1, w1, 0x88);    // column 4 + m
    t[8 + m] = _mm512_shuffle_f32x4(v0, w0, 0xdd);    // column 8 + m
    t[12 + m] = _mm512_shuffle_f32x4(v1, w1, 0xdd);   // column 12 + m
  }
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c)
    if (c < cols) _mm512_mask_storeu_ps(dst + c * dld, keep, t[c]);
}

// C rows [0, mr) x columns [0, nr) (row stride ldc) = alpha A B + beta C (beta 0: C not read)
// for float32 with AVX-512: B NP (1 or 2) adjacent panels [K][kNR] pstride floats apart; A
// packed as [K][kMR5] (kInPlace false), or read in place as A(i, k) = a[i * rs + k * cs] (all
// kMR5 rows valid). kMR5 x NP zmm accumulators, per k NP loads and kMR5 broadcasts.
template <int NP, bool kInPlace>
VF_AVX512 __attribute__((noinline)) void tile_avx512(int64_t K, const float* __restrict a,
                                                     int64_t rs, int64_t cs,
                                                     const float* __restrict b,
                                                     int64_t pstride, int64_t mr, int64_t nr,
                                                     float alpha, float beta, float* C,
                                                     int64_t ldc) {
  __m512 c0[kMR5], c1[kMR5];
#pragma GCC unroll 12
  for (int i = 0; i < kMR5; ++i) {
    c0[i] = _mm512_setzero_ps();
    if (NP > 1) c1[i] = _mm512_setzero_ps();
  }
  // in place: rows 4j..4j+3 at p[4j] + {0, rs, 2 rs, 3 rs} (three pointers, three strides)
  const float *p0 = a, *p4 = a + 4 * rs, *p8 = a + 8 * rs;
  const int64_t rs2 = 2 * rs, rs3 = 3 * rs;
  for (int64_t k = 0; k < K; ++k, b += kNR) {
    const __m512 b0 = _mm512_loadu_ps(b);
    const __m512 b1 = NP > 1 ? _mm512_loadu_ps(b + pstride) : b0;
#pragma GCC unroll 12
    for (int i = 0; i < kMR5; ++i) {
      float ai;
      if (kInPlace) {
        const float* p = i < 4 ? p0 : (i < 8 ? p4 : p8);
        const int j = i % 4;
        ai = p[j == 0 ? 0 : (j == 1 ? rs : (j == 2 ? rs2 : rs3))];
      } else {
        ai = a[k * kMR5 + i];
      }
      const __m512 x = _mm512_set1_ps(ai);
      c0[i] = _mm512_fmadd_ps(x, b0, c0[i]);
      if (NP > 1) c1[i] = _mm512_fmadd_ps(x, b1, c1[i]);
    }
    if (kInPlace) { p0 += cs; p4 += cs; p8 += cs; }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const __mmask16 m0 = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? __mmask16(0xFFFF)
                                : (nr > 16 ? __mmask16((1u << (nr - 16)) - 1) : __mmask16(0));
#pragma GCC unroll 12
  for (int i = 0; i < kMR5; ++i) {
    if (i < mr) {
      float* r = C + i * ldc;
      __m512 y0 = _mm512_mul_ps(va, c0[i]);
      if (beta != 0.0f) y0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, r), y0);
      _mm512_mask_storeu_ps(r, m0, y0);
      if (NP > 1) {
        __m512 y1 = _mm512_mul_ps(va, c1[i]);
        if (beta != 0.0f) y1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, r + 16), y1);
        _mm512_mask_storeu_ps(r + 16, m1, y1);
      }
    }
  }
}

// gemm_packed (below) for float32 with AVX-512: row tiles of kMR5 against pairs of B panels (a
// single one at an odd edge), panels outer (a pair stays in L1 while every row tile streams by).
// Row-major A is read in place by its full row tiles, and so is column-major A where one pass
// of the tiles covers N (each tile read once: packing would not pay); the other tiles are
// packed first into apk [tile][K][kMR5] (rows past M zero): contiguous columns copied kMR5
// floats per k, row-major edge tiles by 16 x 16 transposes (12 lanes kept).
VF_AVX512 void gemm_packed_avx512(int64_t M, int64_t N, int64_t K, float alpha,
                                  const View<float>& A, const float* panels, float beta,
                                  float* C, int64_t ldc, float* __restrict apk, bool prefetch_c) {
  const int64_t pstride = K * kNR;
  const auto in_place = [&](int64_t mr) {
    return mr == kMR5 && (A.cs == 1 || (A.rs == 1 && N <= 2 * kNR));
  };
  for (int64_t m0 = 0; m0 < M; m0 += kMR5) {
    const int64_t mr = std::min(kMR5, M - m0);
    float* __restrict tp = apk + (m0 / kMR5) * K * kMR5;
    if (in_place(mr)) continue;
    if (A.rs == 1) {
      const __mmask16 rows = __mmask16((1u << mr) - 1), lanes = __mmask16((1u << kMR5) - 1);
      for (int64_t k = 0; k < K; ++k)
        _mm512_mask_storeu_ps(tp + k * kMR5, lanes,
                              _mm512_maskz_loadu_ps(rows, A.p + m0 + k * A.cs));
    } else if (A.cs == 1) {
      for (int64_t k0 = 0; k0 < K; k0 += 16)
        transpose16(A.p + m0 * A.rs + k0, A.rs, mr, std::min<int64_t>(16, K - k0),
                    tp + k0 * kMR5, kMR5, __mmask16((1u << kMR5) - 1));
    } else {
      for (int64_t i = 0; i < kMR5; ++i)
        for (int64_t k = 0; k < K; ++k)
          tp[k * kMR5 + i] = i < mr ? A.p[(m0 + i) * A.rs + k * A.cs] : 0.0f;
    }
  }
  for (int64_t n0 = 0; n0 < N; n0 += 2 * kNR) {
    const int64_t nr = std::min(2 * kNR, N - n0);
    const float* bp = panels + (n0 / kNR) * pstride;
    for (int64_t m0 = 0; m0 < M; m0 += kMR5) {
      const int64_t mr = std::min(kMR5, M - m0);
      float* c = C + m0 * ldc + n0;
      if (prefetch_c)   // C rows are read back after the K loop: fetch them while it runs
        for (int64_t i = 0; i < mr; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
          if (nr > kNR)
            _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + kNR), _MM_HINT_T0);
        }
      if (in_place(mr)) {
        const float* ar = A.p + m0 * A.rs;
        if (nr > kNR)
          tile_avx512<2, true>(K, ar, A.rs, A.cs, bp, pstride, mr, nr, alpha, beta, c, ldc);
        else tile_avx512<1, true>(K, ar, A.rs, A.cs, bp, pstride, mr, nr, alpha, beta, c, ldc);
      } else {
        const float* tp = apk + (m0 / kMR5) * K * kMR5;
        if (nr > kNR)
          tile_avx512<2, false>(K, tp, 0, 0, bp, pstride, mr, nr, alpha, beta, c, ldc);
        else tile_avx512<1, false>(K, tp, 0, 0, bp, pstride, mr, nr, alpha, beta, c, ldc);
      }
    }
  }
}
#endif

// A 64-byte aligned buffer of at least n elements inside v (grown as needed).
template <typename T>
VF_INLINE T* aligned(Buf<T>& v, int64_t n) {
  const size_t want = aligned_capacity<T>(n);
  if (v.size() < want) v.resize(want);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// B [K, N] with B(k, n) = src[k * rs + n * cs] as ceil(N / kNR) contiguous panels [K][kNR]
// (zero-padded at the edge): what the register tile streams, L1-resident whatever the strides.
template <typename T, int kIsa = kBase>
VF_INLINE void pack_panels(const T* src, int64_t rs, int64_t cs, int64_t K, int64_t N,
                           T* __restrict dst) {
  for (int64_t n0 = 0; n0 < N; n0 += kNR, dst += K * kNR) {
    const int64_t nr = std::min(kNR, N - n0);
#if defined(__x86_64__) || defined(__i386__)
    if constexpr (kIsa == kAvx512 && std::is_same<T, float>::value) {
      if (rs == 1) {   // B(k, n) = src[n * cs + k]: the panel is a transpose of nr rows
        for (int64_t k0 = 0; k0 < K; k0 += 16)
          transpose16(src + n0 * cs + k0, cs, nr, std::min<int64_t>(16, K - k0),
                      dst + k0 * kNR, kNR, __mmask16(0xFFFF));
        continue;
      }
    }
#endif
    if (cs == 1 && nr == kNR) {
      for (int64_t k = 0; k < K; ++k) {
        const T* __restrict r = src + k * rs + n0;
#pragma omp simd
        for (int64_t j = 0; j < kNR; ++j) dst[k * kNR + j] = r[j];
      }
      continue;
    }
    for (int64_t j = 0; j < kNR; ++j) {
      if (j >= nr) {
        for (int64_t k = 0; k < K; ++k) dst[k * kNR + j] = T(0);
        continue;
      }
      const T* __restrict c = src + (n0 + j) * cs;
      for (int64_t k = 0; k < K; ++k) dst[k * kNR + j] = c[k * rs];
    }
  }
}

// C [M, N] (row stride ldc) = alpha A B + beta C; A [M, K] a strided view, B given as packed
// panels (pack_panels); beta 0 never reads C. Each panel runs against all kMR-row tiles of A;
// the last tile re-reads A's last row (results dropped). kIsa selects the float32 register tile.
// prefetch_c: each tile's C rows are prefetched before its K loop (where beta reads C from L2 or
// memory: the backward's dq / dk / dv accumulations, 2-5% of a backward stage).
template <typename T, int kIsa>
VF_INLINE void gemm_packed(int64_t M, int64_t N, int64_t K, T alpha, const View<T>& A,
                           const T* panels, T beta, T* C, int64_t ldc, Scratch<T>& sc,
                           bool prefetch_c = false) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (kIsa == kAvx512 && std::is_same<T, float>::value) {
    gemm_packed_avx512(M, N, K, alpha, A, panels, beta, C, ldc,
                       aligned(sc.apk, (M + kMR5 - 1) / kMR5 * kMR5 * K), prefetch_c);
    return;
  }
#endif
  alignas(64) T acc[kMR * kNR];
  const T* rows[kMR];
  for (int64_t n0 = 0; n0 < N; n0 += kNR) {
    const int64_t nr = std::min(kNR, N - n0);
    const T* bp = panels + (n0 / kNR) * K * kNR;
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int64_t mr = std::min(kMR, M - m0);
#if defined(__x86_64__) || defined(__i386__)
      if (prefetch_c)   // as in gemm_packed_avx512
        for (int64_t i = 0; i < mr; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(C + (m0 + i) * ldc + n0), _MM_HINT_T0);
      if constexpr (kIsa == kAvx2 && std::is_same<T, float>::value) {
        if (mr == kMR && nr == kNR) {   // full tile: A by strides, C from the registers
          tile_avx2_full(K, A.p + m0 * A.rs, A.rs, A.cs, bp, alpha, beta, C + m0 * ldc + n0,
                         ldc);
          continue;
        }
      }
#endif
      // edge tiles (and the portable tile): row pointers, the last row repeated past M
      for (int64_t i = 0; i < kMR; ++i) rows[i] = A.p + std::min(m0 + i, M - 1) * A.rs;
#if defined(__x86_64__) || defined(__i386__)
      if constexpr (kIsa == kAvx2 && std::is_same<T, float>::value)
        tile_avx2(K, rows, A.cs, bp, kNR, acc);
      else tile_generic(K, rows, A.cs, bp, kNR, acc);
#else
      tile_generic(K, rows, A.cs, bp, kNR, acc);
#endif
      for (int64_t i = 0; i < mr; ++i) {
        T* __restrict c = C + (m0 + i) * ldc + n0;
        const T* __restrict x = acc + i * kNR;
        if (beta == T(0)) {
#pragma omp simd
          for (int64_t j = 0; j < nr; ++j) c[j] = alpha * x[j];
        } else {
#pragma omp simd
          for (int64_t j = 0; j < nr; ++j) c[j] = alpha * x[j] + beta * c[j];
        }
      }
    }
  }
}

// The same with B [K, N] row-major (row stride ldb), packed here: one panel at a time, or all
// at once for the AVX-512 tile (which runs two panels).
template <typename T, int kIsa>
VF_INLINE void gemm(int64_t M, int64_t N, int64_t K, T alpha, const View<T>& A, const T* B,
                    int64_t ldb, T beta, T* C, int64_t ldc, Scratch<T>& sc,
                    bool prefetch_c = false) {
  if constexpr (kIsa == kAvx512 && std::is_same<T, float>::value) {
    T* bp = aligned(sc.edge, K * ((N + kNR - 1) / kNR * kNR));
    pack_panels(B, ldb, int64_t(1), K, N, bp);
    gemm_packed<T, kIsa>(M, N, K, alpha, A, bp, beta, C, ldc, sc, prefetch_c);
    return;
  }
  T* bp = aligned(sc.edge, K * kNR);
  for (int64_t n0 = 0; n0 < N; n0 += kNR) {
    const int64_t nr = std::min(kNR, N - n0);
    pack_panels(B + n0, ldb, int64_t(1), K, nr, bp);
    gemm_packed<T, kIsa>(M, nr, K, alpha, A, bp, beta, C + n0, ldc, sc, prefetch_c);
  }
}

// ------------------------------------------------------------------------------ softmax exp
// Rows i < rows of a score tile (row stride ld): s[i][j] = exp_clamped(s[i][j] - m[i]) for
// j < n, and sums[i] = their sum where sums is given; float32 through the explicit vectors of
// cpu_math.h on avx512 / avx2 (called, not inlined: GCC will not inline target code into the
// generic templates that pick it).
#if defined(__x86_64__) || defined(__i386__)
VF_AVX512 __attribute__((noinline)) void exp_rows_avx512(float* s, int64_t rows, int64_t n,
                                                         int64_t ld, const float* m,
                                                         float* sums) {
  const __mmask16 tail = __mmask16((1u << (n % 16)) - 1);
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    const __m512 vm = _mm512_set1_ps(m[i]);
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512 e = varformer_cpu::exp_clamped16(_mm512_sub_ps(_mm512_loadu_ps(row + j), vm));
      _mm512_storeu_ps(row + j, e);
      acc = _mm512_add_ps(acc, e);
    }
    if (j < n) {
      const __m512 e = _mm512_maskz_mov_ps(
          tail, varformer_cpu::exp_clamped16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + j), vm)));
      _mm512_mask_storeu_ps(row + j, tail, e);
      acc = _mm512_add_ps(acc, e);
    }
    if (sums != nullptr) sums[i] = _mm512_reduce_add_ps(acc);
  }
}

VF_AVX2 __attribute__((noinline)) void exp_rows_avx2(float* s, int64_t rows, int64_t n,
                                                     int64_t ld, const float* m, float* sums) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    const __m256 vm = _mm256_set1_ps(m[i]);
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = varformer_cpu::exp_clamped8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm));
      _mm256_storeu_ps(row + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    float total = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
    for (; j < n; ++j) total += (row[j] = varformer_cpu::exp_clamped(row[j] - m[i]));
    if (sums != nullptr) sums[i] = total;
  }
}

// The same down the kNR = 16 lanes of `rows` rows: row r lane j = exp_clamped(x - m[j]), and
// acc[j] = their sum over the rows where acc is given (the transposed few-rows softmax).
VF_AVX512 __attribute__((noinline)) void exp_lanes_avx512(float* st, int64_t rows,
                                                          const float* m, float* acc) {
  const __m512 vm = _mm512_loadu_ps(m);
  __m512 a = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 e = varformer_cpu::exp_clamped16(_mm512_sub_ps(_mm512_loadu_ps(st + r * 16), vm));
    _mm512_storeu_ps(st + r * 16, e);
    a = _mm512_add_ps(a, e);
  }
  if (acc != nullptr) _mm512_storeu_ps(acc, a);
}

VF_AVX2 __attribute__((noinline)) void exp_lanes_avx2(float* st, int64_t rows, const float* m,
                                                      float* acc) {
  const __m256 m0 = _mm256_loadu_ps(m), m1 = _mm256_loadu_ps(m + 8);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 e0 = varformer_cpu::exp_clamped8(_mm256_sub_ps(_mm256_loadu_ps(st + r * 16), m0));
    const __m256 e1 =
        varformer_cpu::exp_clamped8(_mm256_sub_ps(_mm256_loadu_ps(st + r * 16 + 8), m1));
    _mm256_storeu_ps(st + r * 16, e0);
    _mm256_storeu_ps(st + r * 16 + 8, e1);
    a0 = _mm256_add_ps(a0, e0);
    a1 = _mm256_add_ps(a1, e1);
  }
  if (acc != nullptr) {
    _mm256_storeu_ps(acc, a0);
    _mm256_storeu_ps(acc + 8, a1);
  }
}
#endif

template <typename T, int kIsa>
VF_INLINE void exp_rows(T* __restrict s, int64_t rows, int64_t n, int64_t ld, const T* m,
                        T* sums) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (std::is_same<T, float>::value && kIsa == kAvx512)
    return exp_rows_avx512(s, rows, n, ld, m, sums);
  if constexpr (std::is_same<T, float>::value && kIsa == kAvx2)
    return exp_rows_avx2(s, rows, n, ld, m, sums);
#endif
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict row = s + i * ld;
    const T mi = m[i];
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) {
      row[j] = varformer_cpu::exp_clamped(row[j] - mi);
      acc += row[j];
    }
    if (sums != nullptr) sums[i] = acc;
  }
}

template <typename T, int kIsa>
VF_INLINE void exp_lanes(T* __restrict st, int64_t rows, const T* m, T* acc) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (std::is_same<T, float>::value && kIsa == kAvx512 && kNR == 16)
    return exp_lanes_avx512(st, rows, m, acc);
  if constexpr (std::is_same<T, float>::value && kIsa == kAvx2 && kNR == 16)
    return exp_lanes_avx2(st, rows, m, acc);
#endif
  alignas(64) T a[kNR] = {};
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict row = st + r * kNR;
#pragma omp simd
    for (int64_t j = 0; j < kNR; ++j) {
      row[j] = varformer_cpu::exp_clamped(row[j] - m[j]);
      a[j] += row[j];
    }
  }
  if (acc != nullptr) std::copy(a, a + kNR, acc);
}

// ------------------------------------------------------------------------------ tiles
template <typename T>
struct Args {
  int64_t G, Tq, Tk, d, nqb, nkc;
  T scale;
  const T *q, *k, *v, *dout, *out, *lse;
  const T* delta;   // backward: [G][Tq] row sums of dout * out
};

// Loads the key chunk kc of head g as packed panels (forward: kᵀ and v; backward: kᵀ, vᵀ and
// k), once per unit for all its query blocks; returns the chunk's key count.
template <typename T, int kIsa>
VF_INLINE int64_t load_chunk(const Args<T>& a, int64_t g, int64_t kc, bool backward,
                             Scratch<T>& sc) {
  const int64_t d = a.d, keys = std::min(kKC, a.Tk - kc * kKC), off = (g * a.Tk + kc * kKC) * d;
  const int64_t pd = (d + kNR - 1) / kNR * kNR, pk = (keys + kNR - 1) / kNR * kNR;
  sc.ktp = aligned(sc.kt, d * pk);
  pack_panels<T, kIsa>(a.k + off, int64_t(1), d, d, keys, sc.ktp);          // kᵀ(c, j) = k[j][c]
  if (backward) {
    sc.vtp = aligned(sc.vt, d * pk);
    pack_panels<T, kIsa>(a.v + off, int64_t(1), d, d, keys, sc.vtp);
    sc.kpp = aligned(sc.kp, keys * pd);
    pack_panels(a.k + off, d, int64_t(1), keys, d, sc.kpp);
  } else {
    sc.vpp = aligned(sc.vp, keys * pd);
    pack_panels(a.v + off, d, int64_t(1), keys, d, sc.vpp);
  }
  return keys;
}

// Forward tile (g, query block qb, the loaded chunk kc of `keys` keys), online softmax over
// the chunks of a unit: o [rows, d] (row stride d) holds the unnormalised output, mx [rows] the
// running row maximum and sum [rows] the running row sum; `first` starts them. The caller
// normalises after the unit's last chunk (finish_rows).
template <typename T, int kIsa>
VF_INLINE void forward_tile(const Args<T>& a, int64_t g, int64_t qb, int64_t keys, bool first,
                            T* o, T* mx, T* sum, Scratch<T>& sc) {
  const int64_t d = a.d, r0 = qb * kQB, rows = std::min(kQB, a.Tq - r0), ls = score_ld(keys);
  const T* q = a.q + (g * a.Tq + r0) * d;
  T* __restrict s = aligned(sc.s, kQB * score_ld(kKC));
  gemm_packed<T, kIsa>(rows, keys, d, a.scale, View<T>{q, d, 1}, sc.ktp, T(0), s, ls, sc);
  alignas(64) T m[kQB], acc[kQB];
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict row = s + i * ls;
    T mi = row[0];
#pragma omp simd reduction(max : mi)
    for (int64_t j = 0; j < keys; ++j) mi = row[j] > mi ? row[j] : mi;
    m[i] = !first && mx[i] > mi ? mx[i] : mi;
  }
  exp_rows<T, kIsa>(s, rows, keys, ls, m, acc);
  for (int64_t i = 0; i < rows; ++i) {
    if (first) {
      sum[i] = acc[i];
    } else {
      const T rescale = varformer_cpu::exp_clamped(mx[i] - m[i]);
      T* __restrict r = o + i * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) r[c] *= rescale;
      sum[i] = sum[i] * rescale + acc[i];
    }
    mx[i] = m[i];
  }
  gemm_packed<T, kIsa>(rows, d, keys, T(1), View<T>{s, ls, 1}, sc.vpp, first ? T(0) : T(1), o,
                       d, sc);
}

// o /= sum and lse = max + log(sum) for `rows` rows (mx holds the max, becomes the lse).
template <typename T>
VF_INLINE void finish_rows(int64_t rows, int64_t d, T* o, T* mx, const T* sum) {
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict r = o + i * d;
    const T x = T(1) / sum[i];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) r[c] *= x;
    mx[i] += varformer_cpu::log_positive(sum[i]);
  }
}

// delta[i] = sum_c dO[i][c] o[i][c] for rows i < rows (row stride d): the backward's row term.
template <typename T>
VF_INLINE void row_dots(const T* dO, const T* o, int64_t rows, int64_t d, T* delta) {
  for (int64_t i = 0; i < rows; ++i) {
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < d; ++c) acc += dO[i * d + c] * o[i * d + c];
    delta[i] = acc;
  }
}

// Backward tile (g, qb, the loaded chunk kc): dq rows (+)= scale ds k, the chunk's dk/dv rows
// (+)= scale dsᵀ q / pᵀ dO, accumulating where acc_q / acc_kv (else overwriting). Row strides d.
template <typename T, int kIsa>
VF_INLINE void backward_tile(const Args<T>& a, int64_t g, int64_t qb, int64_t kc, int64_t keys,
                             T* dq, T* dk, T* dv, bool acc_q, bool acc_kv, Scratch<T>& sc) {
  const int64_t d = a.d, r0 = qb * kQB, rows = std::min(kQB, a.Tq - r0), ls = score_ld(keys);
  const T* q = a.q + (g * a.Tq + r0) * d;
  const T* dO = a.dout + (g * a.Tq + r0) * d;
  const T* lse = a.lse + g * a.Tq + r0;
  const T* __restrict delta = a.delta + g * a.Tq + r0;
  // p = exp(scale q kᵀ - lse)
  T* __restrict p = aligned(sc.s, kQB * score_ld(kKC));
  gemm_packed<T, kIsa>(rows, keys, d, a.scale, View<T>{q, d, 1}, sc.ktp, T(0), p, ls, sc);
  exp_rows<T, kIsa>(p, rows, keys, ls, lse, static_cast<T*>(nullptr));
  // dv = pᵀ dO
  gemm<T, kIsa>(keys, d, rows, T(1), View<T>{p, 1, ls}, dO, d, acc_kv ? T(1) : T(0), dv, d,
                 sc, acc_kv);
  // ds = p (dO vᵀ - delta)
  T* __restrict ds = aligned(sc.dp, kQB * score_ld(kKC));
  gemm_packed<T, kIsa>(rows, keys, d, T(1), View<T>{dO, d, 1}, sc.vtp, T(0), ds, ls, sc);
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict r = ds + i * ls;
    const T* __restrict pr = p + i * ls;
    const T di = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < keys; ++j) r[j] = pr[j] * (r[j] - di);
  }
  gemm_packed<T, kIsa>(rows, d, keys, a.scale, View<T>{ds, ls, 1}, sc.kpp, acc_q ? T(1) : T(0),
                       dq, d, sc, acc_q);
  gemm<T, kIsa>(keys, d, rows, a.scale, View<T>{ds, 1, ls}, q, d, acc_kv ? T(1) : T(0), dk, d,
                 sc, acc_kv);
}

// Set-up of backward_few_rows for head g, once per unit: delta and lse padded to kNR rows
// (sc.row0 [0, kNR) and [kNR, 2 kNR); zeros past Tq), one panel each of qᵀ and dOᵀ [d][kNR]
// (sc.ktp, sc.vtp) and q and dO as panels [Tq][d] (sc.kpp, sc.vpp).
template <typename T, int kIsa>
VF_INLINE void few_rows_setup(const Args<T>& a, int64_t g, Scratch<T>& sc) {
  const int64_t d = a.d, tq = a.Tq, pd = (d + kNR - 1) / kNR * kNR;
  const T* q = a.q + g * tq * d;
  const T* dO = a.dout + g * tq * d;
  T* delta = sc.row0.data();
  T* lse = delta + kNR;
  std::fill(delta, delta + 2 * kNR, T(0));
  std::copy(a.delta + g * tq, a.delta + (g + 1) * tq, delta);
  std::copy(a.lse + g * tq, a.lse + (g + 1) * tq, lse);
  sc.ktp = aligned(sc.kt, d * kNR);
  sc.vtp = aligned(sc.vt, d * kNR);
  sc.kpp = aligned(sc.kp, tq * pd);
  sc.vpp = aligned(sc.vp, tq * pd);
  pack_panels<T, kIsa>(q, int64_t(1), d, d, tq, sc.ktp);     // qᵀ(c, i) = q[i][c]
  pack_panels<T, kIsa>(dO, int64_t(1), d, d, tq, sc.vtp);
  pack_panels(q, d, int64_t(1), tq, d, sc.kpp);              // q [tq][d] as panels
  pack_panels(dO, d, int64_t(1), tq, d, sc.vpp);
}

// Backward of head g's few query rows (Tq <= kNR, so one query block) against key chunk kc,
// after few_rows_setup, transposed as forward_few_rows: pᵀ = exp(scale k qᵀ - lse) and
// dpᵀ = v dOᵀ [keys][kNR] with k and v read in place against one packed panel each;
// dsᵀ = pᵀ (dpᵀ - delta); dv = pᵀ dO and dk = scale dsᵀ q with K = Tq; dqᵀ = scale kᵀ dsᵀ, the
// score buffer as its B panel, added to dq (acc_q) or stored. dk / dv rows of the chunk are
// overwritten (a single query block).
template <typename T, int kIsa>
VF_INLINE void backward_few_rows(const Args<T>& a, int64_t g, int64_t kc, T* dq, T* dk, T* dv,
                                 bool acc_q, Scratch<T>& sc) {
  const int64_t d = a.d, tq = a.Tq, keys = std::min(kKC, a.Tk - kc * kKC);
  const int64_t off = (g * a.Tk + kc * kKC) * d;
  const T* __restrict delta = sc.row0.data();
  const T* __restrict lse = delta + kNR;
  T* __restrict pt = aligned(sc.s, kKC * kNR);
  T* __restrict dst = aligned(sc.dp, kKC * kNR);
  gemm_packed<T, kIsa>(keys, kNR, d, a.scale, View<T>{a.k + off, d, 1}, sc.ktp, T(0), pt, kNR,
                       sc);
  exp_lanes<T, kIsa>(pt, keys, lse, static_cast<T*>(nullptr));
  gemm_packed<T, kIsa>(keys, d, tq, T(1), View<T>{pt, kNR, 1}, sc.vpp, T(0), dv, d, sc);
  gemm_packed<T, kIsa>(keys, kNR, d, T(1), View<T>{a.v + off, d, 1}, sc.vtp, T(0), dst, kNR,
                       sc);
  for (int64_t r = 0; r < keys; ++r) {
    T* __restrict row = dst + r * kNR;
    const T* __restrict pr = pt + r * kNR;
#pragma omp simd
    for (int64_t j = 0; j < kNR; ++j) row[j] = pr[j] * (row[j] - delta[j]);
  }
  gemm_packed<T, kIsa>(keys, d, tq, a.scale, View<T>{dst, kNR, 1}, sc.kpp, T(0), dk, d, sc);
  T* __restrict dqt = aligned(sc.edge, d * kNR);
  gemm_packed<T, kIsa>(d, kNR, keys, a.scale, View<T>{a.k + off, 1, d}, dst, T(0), dqt, kNR, sc);
  for (int64_t i = 0; i < tq; ++i) {
    T* __restrict r = dq + i * d;
    for (int64_t c = 0; c < d; ++c) r[c] = (acc_q ? r[c] : T(0)) + dqt[c * kNR + i];
  }
}

// ------------------------------------------------------------------------------ units
// Forward of head g over key chunks [c0, c1) for few query rows (Tq <= kNR: L mediators over
// many keys), o / l as forward_unit_impl. Scores as sᵀ = scale k mᵀ [keys][kNR] with the key rows
// read in place and mᵀ one packed panel (no kᵀ transposes, no idle rows in the register tiles);
// the softmax runs down the columns (lanes = query rows); outᵀ [d][kNR] (+)= vᵀ p takes the
// score buffer itself as its B panel. Columns past Tq (zero panel columns) are never stored.
template <typename T, int kIsa>
VF_INLINE void forward_few_rows(const Args<T>& a, int64_t g, int64_t c0, int64_t c1, T* o,
                                T* l, Scratch<T>& sc) {
  const int64_t d = a.d, tq = a.Tq;
  T* mt = aligned(sc.kt, d * kNR);
  pack_panels<T, kIsa>(a.q + g * tq * d, int64_t(1), d, d, tq, mt);   // mᵀ(c, i) = q[i][c]
  T* __restrict st = aligned(sc.s, kKC * kNR);
  T* __restrict ot = aligned(sc.vt, d * kNR);
  alignas(64) T mx[kNR], sum[kNR], m[kNR], rescale[kNR], acc[kNR];
  for (int64_t kc = c0; kc < c1; ++kc) {
    const bool first = kc == c0;
    const int64_t keys = std::min(kKC, a.Tk - kc * kKC), off = (g * a.Tk + kc * kKC) * d;
    gemm_packed<T, kIsa>(keys, kNR, d, a.scale, View<T>{a.k + off, d, 1}, mt, T(0), st, kNR, sc);
    for (int64_t j = 0; j < kNR; ++j) m[j] = st[j];
    for (int64_t r = 1; r < keys; ++r) {
      const T* __restrict row = st + r * kNR;
#pragma omp simd
      for (int64_t j = 0; j < kNR; ++j) m[j] = row[j] > m[j] ? row[j] : m[j];
    }
    for (int64_t j = 0; j < kNR; ++j) {
      if (!first && mx[j] > m[j]) m[j] = mx[j];
      rescale[j] = first ? T(0) : varformer_cpu::exp_clamped(mx[j] - m[j]);
      mx[j] = m[j];
    }
    exp_lanes<T, kIsa>(st, keys, m, acc);
    for (int64_t j = 0; j < kNR; ++j) sum[j] = first ? acc[j] : sum[j] * rescale[j] + acc[j];
    if (!first)
      for (int64_t c = 0; c < d; ++c) {
#pragma omp simd
        for (int64_t j = 0; j < kNR; ++j) ot[c * kNR + j] *= rescale[j];
      }
    gemm_packed<T, kIsa>(d, kNR, keys, T(1), View<T>{a.v + off, 1, d}, st, first ? T(0) : T(1),
                         ot, kNR, sc);
  }
  for (int64_t i = 0; i < tq; ++i) {
    T* __restrict r = o + (g * tq + i) * d;
    const T x = T(1) / sum[i];
    for (int64_t c = 0; c < d; ++c) r[c] = ot[c * kNR + i] * x;
    l[g * tq + i] = mx[i] + varformer_cpu::log_positive(sum[i]);
  }
}

// Forward unit u = (g, key group, query group; query group fastest): the groups' chunks
// (outer, each loaded once) x query blocks (inner), online softmax across the chunks. With one
// key group it writes out/lse; otherwise its normalised partial po [kgroups][G][Tq][d] and
// pl [kgroups][G][Tq], merged in key-group order afterwards.
template <typename T, int kIsa>
VF_INLINE void forward_unit_impl(const Args<T>& a, int64_t u, int64_t qgroups, int64_t kgroups,
                                 T* out, T* lse, T* po, T* pl, Scratch<T>& sc) {
  const int64_t qg = u % qgroups, kg = (u / qgroups) % kgroups, g = u / (qgroups * kgroups);
  const int64_t b0 = qg * a.nqb / qgroups, b1 = (qg + 1) * a.nqb / qgroups;
  const int64_t c0 = kg * a.nkc / kgroups, c1 = (kg + 1) * a.nkc / kgroups;
  T* o = kgroups == 1 ? out : po + kg * a.G * a.Tq * a.d;
  T* l = kgroups == 1 ? lse : pl + kg * a.G * a.Tq;
  if (a.Tq <= kNR) return forward_few_rows<T, kIsa>(a, g, c0, c1, o, l, sc);
  const int64_t row0 = g * a.Tq + b0 * kQB, nrows = std::min(a.Tq, b1 * kQB) - b0 * kQB;
  T* sum = aligned(sc.sums, nrows);
  for (int64_t kc = c0; kc < c1; ++kc) {
    const int64_t keys = load_chunk<T, kIsa>(a, g, kc, false, sc);
    for (int64_t qb = b0; qb < b1; ++qb) {
      const int64_t row = g * a.Tq + qb * kQB;
      forward_tile<T, kIsa>(a, g, qb, keys, kc == c0, o + row * a.d, l + row,
                             sum + (row - row0), sc);
    }
  }
  finish_rows(nrows, a.d, o + row0 * a.d, l + row0, sum);
}

// Backward unit u = (g, group). by_q: the group's query blocks; dk/dv go to this group's
// partial (pk/pv [groups][G][Tk][d]) or straight to dk/dv when groups == 1. Otherwise the
// group's key chunks, dq to its partial pq [groups][G][Tq][d]. Chunks outer (each loaded once),
// query blocks inner; dq accumulates over chunks, dk/dv over query blocks, in a fixed order.
template <typename T, int kIsa>
VF_INLINE void backward_unit_impl(const Args<T>& a, int64_t u, int64_t groups, bool by_q, T* dq,
                                  T* dk, T* dv, T* part, Scratch<T>& sc) {
  const int64_t g = u / groups, grp = u % groups, d = a.d;
  int64_t b0 = 0, b1 = a.nqb, c0 = 0, c1 = a.nkc;
  T *pq = dq, *pk = dk, *pv = dv;
  if (by_q) {
    b0 = grp * a.nqb / groups; b1 = (grp + 1) * a.nqb / groups;
    if (groups > 1) {
      pk = part + (grp * a.G) * a.Tk * d;
      pv = part + ((groups + grp) * a.G) * a.Tk * d;
    }
  } else {
    c0 = grp * a.nkc / groups; c1 = (grp + 1) * a.nkc / groups;
    if (groups > 1) pq = part + (grp * a.G) * a.Tq * d;
  }
  if (a.Tq <= kNR) {   // one query block: dk / dv of each chunk written once
    few_rows_setup<T, kIsa>(a, g, sc);
    for (int64_t kc = c0; kc < c1; ++kc) {
      const int64_t kr = (g * a.Tk + kc * kKC) * d;
      backward_few_rows<T, kIsa>(a, g, kc, pq + g * a.Tq * d, pk + kr, pv + kr, kc > c0, sc);
    }
    return;
  }
  for (int64_t kc = c0; kc < c1; ++kc) {
    const int64_t keys = load_chunk<T, kIsa>(a, g, kc, true, sc), kr = (g * a.Tk + kc * kKC) * d;
    for (int64_t qb = b0; qb < b1; ++qb)
      backward_tile<T, kIsa>(a, g, qb, kc, keys, pq + (g * a.Tq + qb * kQB) * d, pk + kr,
                              pv + kr, kc > c0, qb > b0, sc);
  }
}

template <typename T>
VF_AVX512 void forward_unit_avx512(const Args<T>& a, int64_t u, int64_t qgroups,
                                   int64_t kgroups, T* out, T* lse, T* po, T* pl,
                                   Scratch<T>& sc) {
  forward_unit_impl<T, kAvx512>(a, u, qgroups, kgroups, out, lse, po, pl, sc);
}
template <typename T>
VF_AVX2 void forward_unit_avx2(const Args<T>& a, int64_t u, int64_t qgroups, int64_t kgroups,
                               T* out, T* lse, T* po, T* pl, Scratch<T>& sc) {
  forward_unit_impl<T, kAvx2>(a, u, qgroups, kgroups, out, lse, po, pl, sc);
}
template <typename T>
void forward_unit_base(const Args<T>& a, int64_t u, int64_t qgroups, int64_t kgroups, T* out,
                       T* lse, T* po, T* pl, Scratch<T>& sc) {
  forward_unit_impl<T, kBase>(a, u, qgroups, kgroups, out, lse, po, pl, sc);
}
template <typename T>
VF_AVX512 void backward_unit_avx512(const Args<T>& a, int64_t u, int64_t groups, bool by_q,
                                    T* dq, T* dk, T* dv, T* part, Scratch<T>& sc) {
  backward_unit_impl<T, kAvx512>(a, u, groups, by_q, dq, dk, dv, part, sc);
}
template <typename T>
VF_AVX2 void backward_unit_avx2(const Args<T>& a, int64_t u, int64_t groups, bool by_q, T* dq,
                                T* dk, T* dv, T* part, Scratch<T>& sc) {
  backward_unit_impl<T, kAvx2>(a, u, groups, by_q, dq, dk, dv, part, sc);
}
template <typename T>
void backward_unit_base(const Args<T>& a, int64_t u, int64_t groups, bool by_q, T* dq, T* dk,
                        T* dv, T* part, Scratch<T>& sc) {
  backward_unit_impl<T, kBase>(a, u, groups, by_q, dq, dk, dv, part, sc);
}

// ------------------------------------------------------------------------------ ISA, threads
Isa isa() { return varformer_cpu::widest_isa(); }

// Threads for `macs` multiply-adds over `units` units: none beyond one per 2^20 multiply-adds
// (run_blocks decides where they run on a busy machine).
int64_t call_threads(double macs, int64_t units) {
  const int64_t by_work = std::max<int64_t>(1, static_cast<int64_t>(macs / double(1 << 20)));
  return std::max<int64_t>(1, std::min<int64_t>({varformer_cpu::thread_budget(), units, by_work}));
}

// Scratch with denormals flushed for the worker's lifetime (MXCSR is per thread; restored).
template <typename T>
struct FlushedScratch : Scratch<T> {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved = _mm_getcsr();
  FlushedScratch() { _mm_setcsr(saved | 0x8040); }
  ~FlushedScratch() { _mm_setcsr(saved); }
  FlushedScratch(FlushedScratch&& o) noexcept : Scratch<T>(std::move(o)), saved(o.saved) {}
#endif
};

// ------------------------------------------------------------------------------ ops
void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " differs from q's ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be 3-D [G, Tq, d], got ", q.dim(), " dims");
  TORCH_CHECK(k.dim() == 3, op, ": k must be 3-D [G, Tk, d], got ", k.dim(), " dims");
  TORCH_CHECK(q.size(2) > 0 && k.size(1) > 0, op, ": head dim d and key count Tk must be >= 1");
  check_tensor(op, "q", q, q, q.sizes());
  check_tensor(op, "k", k, q, {q.size(0), k.size(1), q.size(2)});
  check_tensor(op, "v", v, q, k.sizes());
}

template <typename T>
Args<T> make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  Args<T> a{};
  a.G = q.size(0); a.Tq = q.size(1); a.Tk = k.size(1); a.d = q.size(2);
  a.nqb = (a.Tq + kQB - 1) / kQB; a.nkc = (a.Tk + kKC - 1) / kKC;
  a.scale = static_cast<T>(scale);
  a.q = q.data_ptr<T>(); a.k = k.data_ptr<T>(); a.v = v.data_ptr<T>();
  return a;
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                  at::Tensor& out, at::Tensor& lse) {
  const Args<T> a = make_args<T>(q, k, v, scale);
  const double macs = 2.0 * a.G * a.Tq * a.Tk * a.d;
  // kGroups units over all heads where the sizes allow (fixed, so results do not depend on the
  // thread count): query groups first (no partials), but with at least 4 query blocks per unit
  // where key groups can take the rest (a unit packs each of its key chunks once for all its
  // query blocks), key groups for the rest
  const int64_t target = std::max<int64_t>(1, (kGroups + a.G - 1) / a.G);
  int64_t qgroups = std::min(a.nqb, target);
  if (a.nkc > 1 && a.nqb < 4 * qgroups) qgroups = std::max<int64_t>(1, a.nqb / 4);
  const int64_t kgroups =
      std::min(a.nkc, std::max<int64_t>(1, (target + qgroups - 1) / qgroups));
  const int64_t units = a.G * qgroups * kgroups;
  // partials left uninitialised: the units write every row of every key group's partial
  std::unique_ptr<T[]> po, pl;
  if (kgroups > 1) {
    po.reset(new T[kgroups * a.G * a.Tq * a.d]);
    pl.reset(new T[kgroups * a.G * a.Tq]);
  }
  T *o = out.data_ptr<T>(), *l = lse.data_ptr<T>(), *po_p = po.get(), *pl_p = pl.get();
  auto* fn = isa() == kAvx512 ? &forward_unit_avx512<T>
             : isa() == kAvx2  ? &forward_unit_avx2<T> : &forward_unit_base<T>;
  varformer_cpu::run_blocks<FlushedScratch<T>>(
      units, call_threads(macs, units), [] { return FlushedScratch<T>(); },
      [&](int64_t u, Scratch<T>& sc) { fn(a, u, qgroups, kgroups, o, l, po_p, pl_p, sc); });
  if (kgroups == 1) return;
  // merge the key groups' partials row by row, in group order
  const int64_t rows = a.G * a.Tq, d = a.d, nkc = kgroups;
  varformer_cpu::run_range(rows, std::max<int64_t>(1, 4096 / d), varformer_cpu::thread_budget(),
                           [&](int64_t r0, int64_t r1) {
    std::vector<T> w(nkc);
    for (int64_t r = r0; r < r1; ++r) {
      T top = pl_p[r];
      for (int64_t c = 1; c < nkc; ++c) top = std::max(top, pl_p[c * rows + r]);
      T total = T(0);
      for (int64_t c = 0; c < nkc; ++c) total += (w[c] = std::exp(pl_p[c * rows + r] - top));
      T* __restrict dst = o + r * d;
      for (int64_t x = 0; x < d; ++x) dst[x] = T(0);
      for (int64_t c = 0; c < nkc; ++c) {
        const T wc = w[c] / total;
        const T* __restrict src = po_p + (c * rows + r) * d;
#pragma omp simd
        for (int64_t x = 0; x < d; ++x) dst[x] += wc * src[x];
      }
      l[r] = top + std::log(total);
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  Args<T> a = make_args<T>(q, k, v, scale);
  a.dout = dout.data_ptr<T>(); a.out = out.data_ptr<T>(); a.lse = lse.data_ptr<T>();
  // the row term delta = rowsum(dout * out), once per call (every key chunk's tiles use it)
  std::unique_ptr<T[]> delta(new T[a.G * a.Tq]);
  varformer_cpu::run_range(a.G * a.Tq, std::max<int64_t>(1, 16384 / a.d),
                           varformer_cpu::thread_budget(), [&](int64_t r0, int64_t r1) {
    row_dots(a.dout + r0 * a.d, a.out + r0 * a.d, r1 - r0, a.d, delta.get() + r0);
  });
  a.delta = delta.get();
  const bool by_q = a.nqb >= a.nkc;
  const int64_t blocks = by_q ? a.nqb : a.nkc;
  const int64_t groups = std::min(blocks, std::max<int64_t>(1, (kGroups + a.G - 1) / a.G));
  const int64_t units = a.G * groups;
  const int64_t part_rows = groups == 1 ? 0 : (by_q ? 2 * a.Tk : a.Tq);
  // uninitialised: each group overwrites every row of its partial before accumulating into it
  std::unique_ptr<T[]> part(groups == 1 ? nullptr : new T[groups * a.G * part_rows * a.d]);
  T *dq_p = dq.data_ptr<T>(), *dk_p = dk.data_ptr<T>(), *dv_p = dv.data_ptr<T>();
  T* part_p = part.get();
  auto* fn = isa() == kAvx512 ? &backward_unit_avx512<T>
             : isa() == kAvx2  ? &backward_unit_avx2<T> : &backward_unit_base<T>;
  const double macs = 5.0 * a.G * a.Tq * a.Tk * a.d;
  varformer_cpu::run_blocks<FlushedScratch<T>>(
      units, call_threads(macs, units), [] { return FlushedScratch<T>(); },
      [&](int64_t u, Scratch<T>& sc) {
        fn(a, u, groups, by_q, dq_p, dk_p, dv_p, part_p, sc);
      });
  if (groups == 1) return;
  // sum the groups' partials in group order
  const int64_t G = a.G, d = a.d;
  auto reduce = [&](T* dst, const T* src, int64_t rows_per_head) {
    const int64_t n = G * rows_per_head * d, stride = n;
    varformer_cpu::run_range(n, 16384, varformer_cpu::thread_budget(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T acc = src[i];
        for (int64_t grp = 1; grp < groups; ++grp) acc += src[grp * stride + i];
        dst[i] = acc;
      }
    });
  };
  if (by_q) {
    reduce(dk_p, part_p, a.Tk);
    reduce(dv_p, part_p + groups * G * a.Tk * d, a.Tk);
  } else {
    reduce(dq_p, part_p, a.Tq);
  }
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, double scale) {
  check_qkv("attention_fwd", q, k, v);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options());
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_fwd",
                             [&] { forward_impl<scalar_t>(q, k, v, scale, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  const char* op = "attention_bwd";
  check_qkv(op, q, k, v);
  check_tensor(op, "grad_out", dout, q, q.sizes());
  check_tensor(op, "out", out, q, q.sizes());
  check_tensor(op, "lse", lse, q, {q.size(0), q.size(1)});
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_bwd", [&] {
    backward_impl<scalar_t>(dout, q, k, v, out, lse, scale, dq, dk, dv);
  });
  return {dq, dk, dv};
}

std::string attention_isa() { return varformer_cpu::isa_name(isa()); }

}  // namespace
}  // namespace varformer_attention

TORCH_LIBRARY_FRAGMENT(varformer_ext, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("attention_isa() -> str", &varformer_attention::attention_isa);
}

TORCH_LIBRARY_IMPL(varformer_ext, CPU, m) {
  m.impl("attention_fwd", &varformer_attention::attention_fwd);
  m.impl("attention_bwd", &varformer_attention::attention_bwd);
}
