// The SIMD variant the C++ attention kernels (window and mediator) run, chosen once per process.
//
// widest_isa(): avx512 (F/VL/BW/DQ) > avx2 (+FMA) > baseline (portable code), the widest this
// CPU runs; VARFORMER_CPU_ISA=avx2|baseline narrows it (a request never widens it). VF_AVX512 /
// VF_AVX2 are the target attributes of the functions compiled for each variant.
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#define VF_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#define VF_AVX2 __attribute__((target("avx2,fma")))
#else  // other architectures: only the baseline variant is ever chosen (widest_isa)
#define VF_AVX512
#define VF_AVX2
#endif

namespace varformer_cpu {

enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_widest_isa() {
  Isa best = kBase;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = kAvx2;
  if (best == kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    best = kAvx512;
#endif
  const char* env = std::getenv("VARFORMER_CPU_ISA");
  if (env != nullptr) {
    const std::string want(env);
    if (want == "baseline") best = kBase;
    else if (want == "avx2" && best >= kAvx2) best = kAvx2;
  }
  return best;
}

// Per translation unit, decided on first use.
inline Isa widest_isa() {
  static const Isa chosen = detect_widest_isa();
  return chosen;
}

inline const char* isa_name(Isa i) {
  return i == kAvx512 ? "avx512" : (i == kAvx2 ? "avx2" : "baseline");
}

}  // namespace varformer_cpu
