// Measured FP32 FMA peak of this machine (the benchmark harness's "% FLOP peak" ceiling).
//
//   fma_peak_gflops(threads, seconds, isa="") -> GFLOP/s
//   fma_peak_isa() -> the variant a call with isa="" runs ("avx512", "avx2" or "scalar")
//
// Each of `threads` threads (one OpenMP region, num_threads(threads); std::thread where the
// build has no OpenMP) runs 12 independent chains acc = acc * m + c, which covers FMA latency
// (4-5 cycles) x 2 pipes on current x86 cores with room to spare; m < 1, so every chain
// converges to c / (1 - m): no overflow, no denormals. A short calibration run on the calling
// thread sizes the repeats; the result is the best of 5 repeats of about seconds / 5 each
// (longer where the threads outnumber the free cores), counting
// 12 chains x lanes x 2 FLOP per iteration per thread over the region's wall time.
//
// The kernels carry their own target attributes (avx512f, avx2+fma) and are chosen at run time
// (__builtin_cpu_supports), so the build's flags stay portable. The scalar variant counts one
// lane per chain (the compiler may vectorise it; the FLOP count is the same either way).
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VARFORMER_FMA_X86 1
#else
#define VARFORMER_FMA_X86 0
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace varformer_fma {
namespace {

enum class Isa { avx512, avx2, scalar };

constexpr int kRepeats = 5;

#define VARFORMER_FMA_12(FMA)                                                   \
  a0 = FMA(a0, m, c); a1 = FMA(a1, m, c); a2 = FMA(a2, m, c);                   \
  a3 = FMA(a3, m, c); a4 = FMA(a4, m, c); a5 = FMA(a5, m, c);                   \
  a6 = FMA(a6, m, c); a7 = FMA(a7, m, c); a8 = FMA(a8, m, c);                   \
  a9 = FMA(a9, m, c); a10 = FMA(a10, m, c); a11 = FMA(a11, m, c);

#if VARFORMER_FMA_X86
__attribute__((target("avx512f"))) float chains_avx512(int64_t iters) {
  const __m512 m = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-3f);
  __m512 a0 = _mm512_set1_ps(0.00f), a1 = _mm512_set1_ps(0.01f), a2 = _mm512_set1_ps(0.02f),
         a3 = _mm512_set1_ps(0.03f), a4 = _mm512_set1_ps(0.04f), a5 = _mm512_set1_ps(0.05f),
         a6 = _mm512_set1_ps(0.06f), a7 = _mm512_set1_ps(0.07f), a8 = _mm512_set1_ps(0.08f),
         a9 = _mm512_set1_ps(0.09f), a10 = _mm512_set1_ps(0.10f), a11 = _mm512_set1_ps(0.11f);
  for (int64_t i = 0; i < iters; ++i) {
    VARFORMER_FMA_12(_mm512_fmadd_ps)
  }
  const __m512 s = _mm512_add_ps(
      _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                    _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7))),
      _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) float chains_avx2(int64_t iters) {
  const __m256 m = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-3f);
  __m256 a0 = _mm256_set1_ps(0.00f), a1 = _mm256_set1_ps(0.01f), a2 = _mm256_set1_ps(0.02f),
         a3 = _mm256_set1_ps(0.03f), a4 = _mm256_set1_ps(0.04f), a5 = _mm256_set1_ps(0.05f),
         a6 = _mm256_set1_ps(0.06f), a7 = _mm256_set1_ps(0.07f), a8 = _mm256_set1_ps(0.08f),
         a9 = _mm256_set1_ps(0.09f), a10 = _mm256_set1_ps(0.10f), a11 = _mm256_set1_ps(0.11f);
  for (int64_t i = 0; i < iters; ++i) {
    VARFORMER_FMA_12(_mm256_fmadd_ps)
  }
  const __m256 s = _mm256_add_ps(
      _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                    _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7))),
      _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  float sum = 0.0f;
  for (float v : out) sum += v;
  return sum;
}
#endif

inline float scalar_fma(float a, float m, float c) { return a * m + c; }

float chains_scalar(int64_t iters) {
  const float m = 0.999f, c = 1e-3f;
  float a0 = 0.00f, a1 = 0.01f, a2 = 0.02f, a3 = 0.03f, a4 = 0.04f, a5 = 0.05f, a6 = 0.06f,
        a7 = 0.07f, a8 = 0.08f, a9 = 0.09f, a10 = 0.10f, a11 = 0.11f;
  for (int64_t i = 0; i < iters; ++i) {
    VARFORMER_FMA_12(scalar_fma)
  }
  return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11));
}

#undef VARFORMER_FMA_12

int lanes(Isa isa) { return isa == Isa::avx512 ? 16 : isa == Isa::avx2 ? 8 : 1; }

const char* name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "scalar";
}

bool supported(Isa isa) {
#if VARFORMER_FMA_X86
  __builtin_cpu_init();
  if (isa == Isa::avx512) return __builtin_cpu_supports("avx512f");
  if (isa == Isa::avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  if (isa != Isa::scalar) return false;
#endif
  return true;
}

Isa widest() {
  for (Isa isa : {Isa::avx512, Isa::avx2})
    if (supported(isa)) return isa;
  return Isa::scalar;
}

float chains(Isa isa, int64_t iters) {
#if VARFORMER_FMA_X86
  if (isa == Isa::avx512) return chains_avx512(iters);
  if (isa == Isa::avx2) return chains_avx2(iters);
#endif
  return chains_scalar(iters);
}

volatile float g_sink = 0.0f;  // keeps the chains' results alive

// Wall seconds for `threads` threads each running `iters` iterations.
double run_once(Isa isa, int threads, int64_t iters) {
  std::vector<float> out(threads, 0.0f);
  const auto t0 = std::chrono::steady_clock::now();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  { out[omp_get_thread_num()] = chains(isa, iters); }
#else
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back([&, t] { out[t] = chains(isa, iters); });
  out[0] = chains(isa, iters);
  for (auto& th : pool) th.join();
#endif
  const auto t1 = std::chrono::steady_clock::now();
  float sum = 0.0f;
  for (float v : out) sum += v;
  g_sink = sum;
  return std::chrono::duration<double>(t1 - t0).count();
}

double fma_peak_gflops(int64_t threads, double seconds, std::string isa_name) {
  TORCH_CHECK(threads >= 1 && threads <= 4096, "fma_peak_gflops: threads must be in [1, 4096], "
              "got ", threads);
  TORCH_CHECK(seconds > 0 && seconds <= 60, "fma_peak_gflops: seconds must be in (0, 60], got ",
              seconds);
  Isa isa = widest();
  if (!isa_name.empty()) {
    if (isa_name == "avx512") isa = Isa::avx512;
    else if (isa_name == "avx2") isa = Isa::avx2;
    else if (isa_name == "scalar") isa = Isa::scalar;
    else TORCH_CHECK(false, "fma_peak_gflops: isa must be '', 'avx512', 'avx2' or 'scalar', got '",
                     isa_name, "'");
    TORCH_CHECK(supported(isa), "fma_peak_gflops: this CPU cannot run the ", isa_name,
                " variant");
  }
  const int nt = static_cast<int>(threads);
  const double flop_per_iter = 12.0 * lanes(isa) * 2.0 * nt;
  // Calibration on the calling thread (a region's start-up, e.g. creating the team, would
  // swamp short runs): grow until one run takes >= 5 ms. Then one short region starts the team.
  int64_t iters = 1024;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    g_sink = chains(isa, iters);
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (t >= 5e-3 || iters >= (int64_t(1) << 40)) {
      iters = std::max<int64_t>(1024, static_cast<int64_t>(iters * (seconds / kRepeats) / t));
      break;
    }
    iters *= 4;
  }
  run_once(isa, nt, 1024);
  double best = 0.0;
  for (int r = 0; r < kRepeats; ++r) {
    const double t = run_once(isa, nt, iters);
    best = std::max(best, flop_per_iter * iters / t);
  }
  return best / 1e9;
}

std::string fma_peak_isa() { return name(widest()); }

}  // namespace
}  // namespace varformer_fma

TORCH_LIBRARY_FRAGMENT(varformer_ext, m) {
  m.def("fma_peak_gflops(int threads, float seconds, str isa=\"\") -> float",
        &varformer_fma::fma_peak_gflops);
  m.def("fma_peak_isa() -> str", &varformer_fma::fma_peak_isa);
}
