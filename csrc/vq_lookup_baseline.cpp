// Portable variant of the VQ lookup's inner kernel (see vq_lookup_kernel.h): 16-byte vectors
// through the GCC/clang vector extension, so SSE2 on any x86-64 CPU and NEON on aarch64, no
// target pragma. Register tile: 6 codes x 8 float32 tokens (x86-64 has 16 xmm registers).
#include "vq_lookup_isa.h"

#if defined(__GNUC__) || defined(__clang__)
#define VF_HAVE_BASELINE 1
#include <cstdint>
#include <cstring>

namespace varformer_vq {
namespace isa_baseline {

template <typename T_, typename I_>
struct Vec16 {
  using T = T_;
  using I = I_;
  typedef T V __attribute__((vector_size(16)));
  typedef I M __attribute__((vector_size(16)));   // lane mask (all ones / zero) or index bits
  static constexpr int W = 16 / static_cast<int>(sizeof(T));
  static inline V load(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
  static inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  template <typename X, typename Vx>
  static inline Vx splat(X x) {
    if constexpr (W == 4) return Vx{x, x, x, x};
    else return Vx{x, x};
  }
  static inline V bcast(const T* p) { return splat<T, V>(*p); }
  static inline V fnmadd(V a, V b, V c) { return c - a * b; }
  static inline V fmadd(V a, V b, V c) { return a * b + c; }
  static inline M lt(V a, V b) { return reinterpret_cast<M>(a < b); }
  static inline V select(M m, V a, V b) {
    return reinterpret_cast<V>((m & reinterpret_cast<M>(a)) | (~m & reinterpret_cast<M>(b)));
  }
  static inline V min(V a, V b) { return select(lt(a, b), a, b); }
  static inline bool any(M m) {
    I bits = 0;
    for (int i = 0; i < W; ++i) bits |= m[i];
    return bits != 0;
  }
  static inline V iload(const I* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
  static inline void istore(I* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static inline V ibcast(const I* p) { return reinterpret_cast<V>(splat<I, M>(*p)); }
};

using F32 = Vec16<float, int32_t>;
using F64 = Vec16<double, int64_t>;

#include "vq_lookup_kernel.h"
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

void phi32(const float* pad, int64_t rows, int64_t Wd, int64_t C, const float* wp,
           const float* bias, float keep, float mix, const float* h, float* out, float* fhat,
           float* frest) {
  phi_rows<F32, 6, 2>(pad, rows, Wd, C, wp, bias, keep, mix, h, out, fhat, frest);
}

}  // namespace isa_baseline
}  // namespace varformer_vq
#endif

namespace varformer_vq {

const IsaKernels* isa_kernels_baseline(const char** why) {
#ifdef VF_HAVE_BASELINE
  static const IsaKernels k{"baseline", "16-byte vectors (SSE2 / NEON)", isa_baseline::F32::W,
                            isa_baseline::F64::W, 2 * isa_baseline::F32::W,
                            2 * isa_baseline::F64::W, isa_baseline::kChunkBytes,
                            &isa_baseline::scan32, &isa_baseline::scan64,
                            &isa_baseline::phi32, nullptr, nullptr, 0,  // no screening
                            nullptr, ""};
  if (why) *why = "";
  return &k;
#else
  if (why) *why = "not compiled: needs GCC or clang (vector extension)";
  return nullptr;
#endif
}

}  // namespace varformer_vq
