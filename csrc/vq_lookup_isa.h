// Interface between the VQ lookup driver (vq_lookup.cpp) and its per-ISA inner kernels
// (vq_lookup_avx512*.cpp, vq_lookup_avx2*.cpp, vq_lookup_baseline.cpp). Plain C++ types only: the
// ISA translation units include no torch headers, so that no inline function compiled for a
// wider ISA can be shared with (and picked by the linker for) the portable code.
#pragma once

#include <cstdint>

namespace varformer_vq {

// Index of a variant; also its rank (higher is wider).
enum IsaId : int { kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaCount = 3 };

// Updates the running minimum of a block of tokens against codes [v0, v1).
//   zt   the block's ld tokens transposed in panels of `panel` tokens, each [C][panel], the
//        last one [C][ld mod panel] (ld a multiple of `group`, padding zero)
//   E    [V][C]   codebook rows;  hs [V] = |e_v|^2 / 2;  ids [V] = v (as the lane index type)
//   best [ld], bidx [ld]  running min of  hs[v] - <z, e_v>  and its code, updated in place
//                         (codes visited in increasing order, strict '<': lowest index wins)
// The distance is |z|^2 + 2 * best. Inputs must be finite (the driver checks).
template <typename T, typename I>
using ScanFn = void (*)(const T* zt, int64_t ld, const T* E, const T* hs, const I* ids,
                        int64_t C, int64_t v0, int64_t v1, T* best, I* bidx);

// The quantizer's φ step on one block of rows of one image (phi_conv_kernel.h): 3x3
// convolution with zero padding, φ's mix, and the f_hat / f_rest updates, channels last, float32,
// C a multiple of the variant's group32.
using PhiFn = void (*)(const float* pad, int64_t rows, int64_t Wd, int64_t C, const float* wp,
                       const float* bias, float keep, float mix, const float* h, float* out,
                       float* fhat, float* frest);

// Candidate lists of the integer screening pass (vq_screen_kernel.h), per token of a block:
// cnt [ld], code / val [ld][cap] (kept codes in increasing order and their int32 scores),
// over [ld] (set where a list overflowed: the driver rescans that block in float32).
struct ScreenLists {
  int32_t* cnt;
  int32_t* code;
  int32_t* val;
  uint8_t* over;
};

// Integer screening of a block of tokens against codes [v0, v1) (vq_screen_kernel.h):
//   zt   the block's ld tokens as int16 pairs in panels of `panel32` tokens, each [P][panel],
//        the last one [P][ld mod panel];  Eq [V][P] pairs of -qe;  H [V] scaled |e|^2 / 2
//   best, thr [ld]  running minimum score and best + marg (updated);  marg [ld] per token
using ScreenFn = void (*)(const int32_t* zt, int64_t ld, const int32_t* Eq, const int32_t* H,
                          int64_t P, int64_t v0, int64_t v1, int32_t* best, int32_t* thr,
                          const int32_t* marg, ScreenLists* lists);
// Exact float32 rescoring of one token's kept codes (vq_screen_kernel.h: rescore).
using RescoreFn = void (*)(const float* z, const float* E, const float* hs, int64_t C,
                           const int32_t* codes, const int32_t* vals, int32_t n, int64_t limit,
                           float* best, int32_t* bidx);

struct IsaKernels {
  const char* name;      // "avx512", "avx2", "baseline"
  const char* target;    // what it was compiled for, e.g. "avx2,fma"
  int group32;           // tokens per vector, float32 (ld must be a multiple)
  int group64;           // the same for float64
  int panel32;           // tokens per register tile (zt's panel width), float32
  int panel64;           // the same for float64
  int chunk_bytes;       // codebook bytes streamed per pass over a token block
  ScanFn<float, int32_t> scan32;
  ScanFn<double, int64_t> scan64;
  PhiFn phi32;
  ScreenFn screen32;      // integer screening with vpmaddwd + vpaddd; nullptr where none
  RescoreFn rescore32;
  int screen_cap;         // kept codes per token (ScreenLists' cap)
  // The screening with a VNNI multiply-add (vpdpwssd), nullptr where not compiled or this CPU
  // lacks the extension; vnni_how names it, e.g. "vpdpwssd (avxvnni)". Same results.
  ScreenFn screen32_vnni;
  const char* vnni_how;
};

// Each returns the variant's kernels, or nullptr where it was not compiled (other
// architecture or compiler); `why` then says why.
const IsaKernels* isa_kernels_avx512(const char** why);
const IsaKernels* isa_kernels_avx2(const char** why);
const IsaKernels* isa_kernels_baseline(const char** why);
// The screening with VNNI of the avx512 variant (vq_lookup_avx512vnni.cpp) and of the avx2
// variant (vq_lookup_avx2vnni.cpp, AVX-VNNI), or nullptr where not compiled or this CPU lacks
// the extension.
ScreenFn screen32_avx512vnni();
ScreenFn screen32_avx2vnni();

}  // namespace varformer_vq
