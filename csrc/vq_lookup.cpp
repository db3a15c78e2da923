// Nearest-codebook lookup (VAR VectorQuantizer2), CPU driver, and the op schema.
//
//   z [N, C], codebook E [V, C], sqnorm [V] = sum_c E[v, c]^2, all float32 or all float64
//   (on CPU sqnorm may be [0]: then computed here from E, with no extra torch op)
//   d[n, v] = (|z_n|^2 + sqnorm[v]) - 2 * <z_n, E_v>
//   idx[n]  = argmin_v d[n, v]  (lowest index on ties, a NaN distance wins like torch.argmin)
//   dist[n] = d[n, idx[n]],  codes[n] = E[idx[n]] (or an empty [0, C] tensor)
//
// The N x V distance matrix is never formed. A work item is a block of TN tokens x a range of
// codes; its tokens are transposed once into zt [C][TN] so that vector lanes run over tokens,
// and an inner kernel compiled per ISA (vq_lookup_isa.h; avx512, avx2, baseline) streams the
// codes past a running (min, index) per token. The variant is chosen per call from the CPU
// (__builtin_cpu_supports) or from VARFORMER_CPU_ISA=avx512|avx2|baseline (an error where the
// CPU lacks it). The inner kernel ranks codes by hs[v] - <z, e_v> (hs = sqnorm / 2), equivalent
// for finite inputs; tokens (or codebooks) that could meet a non-finite distance take an exact
// scalar scan with torch.argmin's NaN rule instead.
//
// float32 on the avx2 and avx512 variants: each block first screens the codes in 16-bit
// integers (vq_screen_kernel.h; twice the multiply-adds per instruction of float32 FMAs), keeping
// every code within a rigorous error margin of the token's best integer score, then rescores the
// kept codes (about one per token) in float32 exactly as the float32 scan computes them: the
// result is bit for bit the float32 scan's. VARFORMER_VQ_SCREEN=0 turns the screening off
// (=all screens calls of any size; by default from 512 tokens).
//
// Threads: run_blocks (cpu_threads.h: torch's OpenMP pool on a quiet machine, the extension's
// own helper pool on a busy one), one loop per call, items handed out dynamically (a thread the
// OS delays does not hold back the others' work); calls too small to pay for it run on the
// calling thread. Extra memory: per-thread tiles, plus O(N) partials when codes are split
// (small N).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_threads.h"
#include "vq_lookup_checks.h"
#include "vq_lookup_isa.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sched.h>

#include <chrono>
#include <cstdio>
#endif

namespace varformer_vq {
namespace {

// ------------------------------------------------------------------------------ ISA variants
struct Variant {
  const IsaKernels* k = nullptr;
  std::string why;  // why it cannot run here ('' if it can)
};

bool cpu_has(int id) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (id == kIsaAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (id == kIsaAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  if (id != kIsaBaseline) return false;
#endif
  return true;
}

const char* const kIsaNames[kIsaCount] = {"baseline", "avx2", "avx512"};
const char* const kIsaNeeds[kIsaCount] = {"", "avx2 and fma", "avx512f and avx512bw"};

const std::vector<Variant>& variants() {
  static const std::vector<Variant> table = [] {
    std::vector<Variant> t(kIsaCount);
    const char* why = "";
    t[kIsaBaseline].k = isa_kernels_baseline(&why);
    t[kIsaBaseline].why = why;
    t[kIsaAvx2].k = isa_kernels_avx2(&why);
    t[kIsaAvx2].why = why;
    t[kIsaAvx512].k = isa_kernels_avx512(&why);
    t[kIsaAvx512].why = why;
    for (int id = 0; id < kIsaCount; ++id)
      if (t[id].k != nullptr && !cpu_has(id))
        t[id].why = std::string("this CPU lacks ") + kIsaNeeds[id];
    return t;
  }();
  return table;
}

std::string usable_list() {
  std::string s;
  for (int id = kIsaCount - 1; id >= 0; --id)
    if (variants()[id].why.empty()) s += (s.empty() ? "" : ", ") + std::string(kIsaNames[id]);
  return s.empty() ? "none" : s;
}

// request: "" or "auto" (the widest variant this CPU runs), or a variant's name.
int resolve_isa(std::string request) {
  for (auto& ch : request) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  const auto& t = variants();
  if (request.empty() || request == "auto") {
    for (int id = kIsaCount - 1; id >= 0; --id)
      if (t[id].why.empty()) return id;
    TORCH_CHECK(false, "vq_lookup (CPU): no inner-kernel variant can run here (",
                t[kIsaBaseline].why, ")");
  }
  for (int id = 0; id < kIsaCount; ++id) {
    if (request != kIsaNames[id]) continue;
    TORCH_CHECK(t[id].why.empty(), "VARFORMER_CPU_ISA=", request, ": the ", request,
                " variant cannot run here (", t[id].why, "); usable: ", usable_list());
    return id;
  }
  TORCH_CHECK(false, "VARFORMER_CPU_ISA must be auto, avx512, avx2 or baseline, got '", request,
              "'");
  return kIsaBaseline;
}

int isa_from_env() {
  const char* env = std::getenv("VARFORMER_CPU_ISA");
  return resolve_isa(env ? env : "");
}

// ------------------------------------------------------------------------------ the lookup
template <typename T> struct LaneIndex;
template <> struct LaneIndex<float> { using type = int32_t; };
template <> struct LaneIndex<double> { using type = int64_t; };

template <typename T>
ScanFn<T, typename LaneIndex<T>::type> scan_of(const IsaKernels& k);
template <> ScanFn<float, int32_t> scan_of<float>(const IsaKernels& k) { return k.scan32; }
template <> ScanFn<double, int64_t> scan_of<double>(const IsaKernels& k) { return k.scan64; }

// Magnitude below which |z|^2, |e|^2 and every partial sum stay finite (so no NaN distance).
template <typename T>
constexpr T finite_limit() { return std::numeric_limits<T>::max() / T(16); }

// Multiply-adds below which one thread does the whole call (a parallel loop costs more).
// Longer calls ask for all of torch's threads; run_blocks decides where they run.
constexpr int64_t kSerialMacs = int64_t(1) << 21;

// hs[v] = sq[v] / 2 (sq computed from E where sq is null); returns whether the codebook is
// safe for the fast kernel: every entry finite and every |e|^2 within finite_limit.
template <typename T>
bool half_sqnorm(const T* E, const T* sq, int64_t V, int64_t C, T* hs) {
  const T lim = finite_limit<T>();
  bool ok = true;
  if (sq == nullptr) {  // a non-finite entry makes its row's sum non-finite
    for (int64_t v = 0; v < V; ++v) {
      const T* e = E + v * C;
      T acc = T(0);
      for (int64_t c = 0; c < C; ++c) acc += e[c] * e[c];
      hs[v] = acc / T(2);
      ok = ok && acc <= lim;
    }
    return ok;
  }
  for (int64_t v = 0; v < V; ++v) {
    hs[v] = sq[v] / T(2);
    ok = ok && sq[v] <= lim && sq[v] >= -lim;
  }
  T acc[16] = {};
  const int64_t n = V * C, n16 = n / 16 * 16;
  for (int64_t i = 0; i < n16; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += E[i + j] * T(0);  // NaN for any inf or NaN entry
  for (int64_t i = n16; i < n; ++i) acc[0] += E[i] * T(0);
  T s = T(0);
  for (int j = 0; j < 16; ++j) s += acc[j];
  return ok && s == T(0);
}

// Exact scalar scan of one token with VAR's formula: the first NaN distance wins, as in
// torch.argmin; otherwise the first minimum.
template <typename T>
void scan_token_exact(const T* zr, const T* E, const T* sq, int64_t C, int64_t V, T* out_min,
                      int64_t* out_idx) {
  T zn = T(0);
  for (int64_t c = 0; c < C; ++c) zn += zr[c] * zr[c];
  T m = T(0);
  int64_t mi = -1;
  for (int64_t v = 0; v < V; ++v) {
    T acc = T(0);
    for (int64_t c = 0; c < C; ++c) acc += zr[c] * E[v * C + c];
    const T d = (zn + sq[v]) - T(2) * acc;
    if (mi < 0 || d < m || (d != d && m == m)) { m = d; mi = v; }
  }
  *out_min = m;
  *out_idx = mi;
}

// ------------------------------------------------------------------------ integer screening
// Fewer tokens than this, or more channels, and the float32 scan runs alone (the per-block
// quantisation would cost more than it saves; the integer range needs few channels).
constexpr int64_t kScreenMinTokens = 512;
constexpr int64_t kScreenMaxChannels = 1024;

// The fewest tokens a float32 call screens (VARFORMER_VQ_SCREEN, read per call: unset or 1
// kScreenMinTokens, 0 never, "all" any call: for tests).
int64_t screen_min_tokens() {
  const char* env = std::getenv("VARFORMER_VQ_SCREEN");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "1") == 0) return kScreenMinTokens;
  if (std::strcmp(env, "0") == 0) return std::numeric_limits<int64_t>::max();
  if (std::strcmp(env, "all") == 0) return 1;
  TORCH_CHECK(false, "VARFORMER_VQ_SCREEN must be 0, 1 or all, got '", env, "'");
  return 0;
}

// Whether a call may screen with a VNNI multiply-add where the variant has one
// (VARFORMER_VQ_VNNI, read per call: unset or 1 yes, 0 no: the vpmaddwd + vpaddd form, as on a
// CPU without VNNI; for A/B runs). Results are the same either way.
bool vnni_allowed() {
  const char* env = std::getenv("VARFORMER_VQ_VNNI");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "1") == 0) return true;
  if (std::strcmp(env, "0") == 0) return false;
  TORCH_CHECK(false, "VARFORMER_VQ_VNNI must be 0 or 1, got '", env, "'");
  return false;
}

// The screening pass a float32 call of variant k runs (nullptr: none).
ScreenFn screen_fn(const IsaKernels& k) {
  const bool vnni = vnni_allowed();  // checks the variable on every call
  return k.screen32_vnni != nullptr && vnni ? k.screen32_vnni : k.screen32;
}

// The codebook in integers, once per call: Eq [V][P] pairs of -round(e / sE) (C padded to 2P),
// and what every token's error margin needs.
struct ScreenBook {
  int64_t P = 0;
  int32_t Q = 0;            // |qz|, |qe| <= Q, so that |<qz, qe>| <= 2P Q^2 <= 2^29
  double sE = 1.0;          // codebook scale
  double enorm = 0.0;       // max_v |e_v|
  double eerr = 0.0;        // max_v |e_v - sE qe_v|
  double hsmax = 0.0;       // max_v |hs[v]|
  std::vector<int32_t> Eq;
  std::vector<float> E, hs;  // what it was built from (the cache's key)
};

// x rounded to the nearest integer in [-q, q] (halves away from zero; inline, no libm call).
inline int32_t round_clamp(double x, double q) {
  x = x < -q ? -q : (x > q ? q : x);
  return static_cast<int32_t>(x + (x < 0.0 ? -0.5 : 0.5));
}

inline int32_t pack_pair(int32_t lo, int32_t hi) {
  return static_cast<int32_t>((static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16) |
                              static_cast<uint16_t>(lo));
}

void screen_book(const float* E, const float* hs, int64_t V, int64_t C, int64_t threads,
                 ScreenBook& b) {
  b.P = (C + 1) / 2;
  b.Q = static_cast<int32_t>(std::min(4095.0, std::floor(std::sqrt(double(1 << 29) /
                                                                     double(2 * b.P)))));
  std::vector<double> emax(V), enorm(V), eerr(V);
  varformer_cpu::run_range(V, 256, threads, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      double m = 0.0, n2 = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        const double x = E[v * C + c];
        m = std::max(m, std::fabs(x));
        n2 += x * x;
      }
      emax[v] = m;
      enorm[v] = std::sqrt(n2);
    }
  });
  double m = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    m = std::max(m, emax[v]);
    b.enorm = std::max(b.enorm, enorm[v]);
    b.hsmax = std::max(b.hsmax, std::fabs(double(hs[v])));
  }
  b.sE = m > 0.0 ? m / b.Q : 1.0;
  const double inv = 1.0 / b.sE;
  b.Eq.assign(V * b.P, 0);
  varformer_cpu::run_range(V, 256, threads, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      double e2 = 0.0;
      int32_t q[2];
      for (int64_t p = 0; p < b.P; ++p) {
        for (int h = 0; h < 2; ++h) {
          const int64_t c = 2 * p + h;
          const double x = c < C ? double(E[v * C + c]) : 0.0;
          q[h] = round_clamp(x * inv, b.Q);
          const double d = x - b.sE * q[h];
          e2 += d * d;
        }
        b.Eq[v * b.P + p] = pack_pair(-q[0], -q[1]);
      }
      eerr[v] = std::sqrt(e2);
    }
  });
  for (int64_t v = 0; v < V; ++v) b.eerr = std::max(b.eerr, eerr[v]);
}

// The integer codebook for (E, hs), reused while a call passes the same values (the quantizer's
// ten lookups per image share one codebook): comparing them costs a fifth of rebuilding or less
// (N = 256: 0.42 ms a call with the cache, 0.66 ms rebuilding, 0.36 ms not screening). One
// entry, kept for the process's life (about 1.5x the codebook's bytes).
std::shared_ptr<const ScreenBook> screen_book_cached(const float* E, const float* hs, int64_t V,
                                                     int64_t C, int64_t threads) {
  static std::mutex mu;
  static std::shared_ptr<const ScreenBook> last;
  std::shared_ptr<const ScreenBook> b;
  {
    std::lock_guard<std::mutex> lock(mu);
    b = last;
  }
  if (b && static_cast<int64_t>(b->hs.size()) == V && static_cast<int64_t>(b->E.size()) == V * C &&
      std::memcmp(b->hs.data(), hs, sizeof(float) * V) == 0 &&
      std::memcmp(b->E.data(), E, sizeof(float) * V * C) == 0)
    return b;
  auto fresh = std::make_shared<ScreenBook>();
  screen_book(E, hs, V, C, threads, *fresh);
  fresh->E.assign(E, E + V * C);
  fresh->hs.assign(hs, hs + V);
  std::lock_guard<std::mutex> lock(mu);
  last = fresh;
  return fresh;
}

// A token's margin, in units of s = sZ sE: twice a bound on |s a[v] - f[v]| over all codes,
// where a[v] is the integer score and f[v] the float32 value hs[v] - <z, e_v> of the float32
// tile. With zq = sZ qz and eq = sE qe:
//   s a[v] - (hs[v] - <z, e_v>) = (s H[v] - hs[v]) + <z - zq, e_v> + <zq, e_v - eq_v>
// is at most s/2 + |z - zq| enorm + |zq| eerr (+ the double rounding of H), and the float32
// value is within (C + 1) 2^-24 (|hs[v]| + |z| |e_v|) of the exact one (C + 1 roundings).
int32_t screen_margin(double s, double zerr, double zq, double zn, int64_t C,
                      const ScreenBook& b) {
  const double quant = (0.5 * s + zerr * b.enorm + zq * b.eerr) * (1.0 + 1e-6) +
                       b.hsmax * 1e-12;
  const double fp32 = double(C + 2) * std::ldexp(1.0, -24) * (b.hsmax + zn * b.enorm) * 1.01;
  const double m = std::ceil(2.0 * (quant + fp32) / s) + 2.0;
  return m >= double(1 << 30) ? (1 << 30) : static_cast<int32_t>(m);
}

template <typename T>
void lookup_cpu(const T* z, const T* E, const T* sq, int64_t N, int64_t V, int64_t C,
                T* dist, int64_t* idx, T* codes, const IsaKernels& k) {
  using I = typename LaneIndex<T>::type;
  const auto scan = scan_of<T>(k);
  const int64_t W = sizeof(T) == 4 ? k.group32 : k.group64;
  const int64_t PW = sizeof(T) == 4 ? k.panel32 : k.panel64;  // a multiple of W
  const int64_t macs = N * V * std::max<int64_t>(C, 1);
  int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(varformer_cpu::thread_budget(),
                                             macs / kSerialMacs));
  auto finish = [&](int64_t n, T m, int64_t mi, bool exact) {
    if (exact) scan_token_exact<T>(z + n * C, E, sq, C, V, &m, &mi);
    dist[n] = m;
    idx[n] = mi;
    if (codes != nullptr) std::memcpy(codes + n * C, E + mi * C, sizeof(T) * C);
  };

  std::vector<T> hs(V), sq_own;
  const bool fast = half_sqnorm<T>(E, sq, V, C, hs.data());
  if (sq == nullptr) {  // the exact scans need |e|^2 too
    sq_own.resize(V);
    for (int64_t v = 0; v < V; ++v) sq_own[v] = hs[v] * T(2);
    sq = sq_own.data();
  }
  if (!fast) {  // non-finite codebook: exact scans only
    varformer_cpu::run_range(N, 64, threads, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) finish(n, T(0), 0, true);
    });
    return;
  }
  std::vector<I> ids(V);
  for (int64_t v = 0; v < V; ++v) ids[v] = static_cast<I>(v);

  // Token block: a multiple of W, up to 256 tokens, zt [C][TN] near 64 KB.
  const int64_t tn_mem = 65536 / static_cast<int64_t>(sizeof(T)) / std::max<int64_t>(C, 1);
  const int64_t TN = std::max<int64_t>(W, std::min<int64_t>(256, tn_mem) / W * W);
  const int64_t nblocks = (N + TN - 1) / TN;
  // Enough work items for all threads: with few token blocks, split the codes as well.
  const int64_t chunk = std::max<int64_t>(
      1, k.chunk_bytes / static_cast<int64_t>(sizeof(T)) / std::max<int64_t>(C, 1));
  const int64_t nchunks = (V + chunk - 1) / chunk;
  int64_t splits = 1;
  if (threads > 1 && nblocks < 4 * threads)
    splits = std::min(nchunks, (4 * threads + nblocks - 1) / nblocks);
  const int64_t per_split = (nchunks + splits - 1) / splits * chunk;  // codes per split
  splits = (V + per_split - 1) / per_split;
  const int64_t items = nblocks * splits;

  // With split codes: partial results [splits][N]; the last split of a block to finish
  // combines that block (so the whole call is one parallel region).
  std::vector<T> pmin(splits > 1 ? splits * N : 0), zn_all(N);
  std::vector<int64_t> pidx(splits > 1 ? splits * N : 0);
  std::vector<uint8_t> flag(N);
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[nblocks]);
  for (int64_t b = 0; b < nblocks; ++b) done[b].store(0, std::memory_order_relaxed);
  const T lim = finite_limit<T>();

  // Integer screening (float32 on avx2 / avx512): the codebook once per call.
  const int64_t screen_from = screen_min_tokens();  // checks the variable on every call
  const ScreenFn screen_run = std::is_same<T, float>::value ? screen_fn(k) : nullptr;
  const bool screen = screen_run != nullptr && N >= screen_from && C <= kScreenMaxChannels;
  static const ScreenBook no_book;
  std::shared_ptr<const ScreenBook> bookp;
  if constexpr (std::is_same<T, float>::value) {
    if (screen) bookp = screen_book_cached(E, hs.data(), V, C, threads);
  }
  const ScreenBook& book = bookp ? *bookp : no_book;
  const int64_t P = book.P, cap = k.screen_cap;

  struct Bufs {
    std::vector<T> zt, best;
    std::vector<I> bidx;
    // screening only
    std::vector<int32_t> zq, sbest, thr, marg, cnt, code, val, H;
    std::vector<uint8_t> over, rowflag;
  };
  auto make_bufs = [&] {
    Bufs s{std::vector<T>(C * TN), std::vector<T>(TN), std::vector<I>(TN)};
    if (screen) {
      s.zq.resize(P * TN);
      s.sbest.resize(TN);
      s.thr.resize(TN);
      s.marg.resize(TN);
      s.cnt.resize(TN);
      s.code.resize(TN * cap);
      s.val.resize(TN * cap);
      s.H.resize(V);
      s.over.resize(TN);
      s.rowflag.resize(TN);
    }
    return s;
  };

  // |z_n|^2 in T; true where the token must take the exact scan (NaN, inf or huge). The first
  // item of a block records both for the block's finish.
  auto norm_row = [&](int64_t n, bool record) -> bool {
    const T* row = z + n * C;
    T acc = T(0);
    for (int64_t c = 0; c < C; ++c) acc += row[c] * row[c];
    const bool bad = !(acc <= lim);
    if (record) {
      zn_all[n] = acc;
      flag[n] = bad;
    }
    return bad;
  };

  // Screens then rescores one item into s.best / s.bidx; false where a token's list overflowed
  // (many codes within its margin: the float32 scan then redoes the item).
  auto screen_item = [&](int64_t n0, int64_t nt, int64_t ld, int64_t v0, int64_t v1,
                         bool first, Bufs& s) -> bool {
    if constexpr (std::is_same<T, float>::value) {
      double zmax = 0.0;
      for (int64_t l = 0; l < nt; ++l) {
        const bool bad = norm_row(n0 + l, first);
        s.rowflag[l] = bad;
        const T* row = z + (n0 + l) * C;
        if (!bad)
          for (int64_t c = 0; c < C; ++c) zmax = std::max(zmax, std::fabs(double(row[c])));
      }
      // The token scale of this block; large enough that |H| <= 2^29.
      double sZ = std::max(zmax / book.Q, book.hsmax / (double(1 << 29) * book.sE));
      if (!(sZ > 0.0)) sZ = 1.0;
      const double sc = sZ * book.sE, inv_s = 1.0 / sc, inv_z = 1.0 / sZ;
      for (int64_t v = v0; v < v1; ++v)
        s.H[v] = round_clamp(double(hs[v]) * inv_s, double(1 << 30));
      for (int64_t l = 0; l < ld; ++l) {
        const int64_t p0 = l / PW * PW, pw = std::min(PW, ld - p0);
        int32_t* col = s.zq.data() + p0 * P + (l - p0);
        s.sbest[l] = INT32_MAX;
        s.cnt[l] = 0;
        s.over[l] = 0;
        if (l >= nt || s.rowflag[l]) {  // padding or exact-scan token: never kept
          for (int64_t p = 0; p < P; ++p) col[p * pw] = 0;
          s.thr[l] = INT32_MIN;
          s.marg[l] = 0;
          continue;
        }
        const T* row = z + (n0 + l) * C;
        double zerr = 0.0, zq = 0.0, zn = 0.0;
        for (int64_t p = 0; p < P; ++p) {
          int32_t q[2];
          for (int h = 0; h < 2; ++h) {
            const int64_t c = 2 * p + h;
            const double x = c < C ? double(row[c]) : 0.0;
            q[h] = round_clamp(x * inv_z, book.Q);
            const double y = sZ * q[h];
            zerr += (x - y) * (x - y);
            zq += y * y;
            zn += x * x;
          }
          col[p * pw] = pack_pair(q[0], q[1]);
        }
        s.thr[l] = INT32_MAX;
        s.marg[l] = screen_margin(sc, std::sqrt(zerr), std::sqrt(zq), std::sqrt(zn), C, book);
      }
      ScreenLists lists{s.cnt.data(), s.code.data(), s.val.data(), s.over.data()};
      screen_run(s.zq.data(), ld, book.Eq.data(), s.H.data(), P, v0, v1, s.sbest.data(),
                 s.thr.data(), s.marg.data(), &lists);
      for (int64_t l = 0; l < nt; ++l)
        if (s.over[l] && !s.rowflag[l]) return false;
      for (int64_t l = 0; l < ld; ++l) {
        s.best[l] = std::numeric_limits<T>::infinity();
        s.bidx[l] = static_cast<I>(v0);
      }
      for (int64_t l = 0; l < nt; ++l) {
        if (s.rowflag[l]) continue;
        k.rescore32(z + (n0 + l) * C, E, hs.data(), C, s.code.data() + l * cap,
                    s.val.data() + l * cap, s.cnt[l],
                    static_cast<int64_t>(s.sbest[l]) + s.marg[l], s.best.data() + l,
                    s.bidx.data() + l);
      }
      return true;
    }
    return false;
  };

  auto run_item = [&](int64_t it, Bufs& s) {
    const int64_t b = it / splits, sp = it % splits;
    const int64_t n0 = b * TN, nt = std::min(TN, N - n0);
    const int64_t v0 = sp * per_split, v1 = std::min(V, v0 + per_split);
    const int64_t ld = (nt + W - 1) / W * W;
    T* best = s.best.data();
    I* bidx = s.bidx.data();
    if (!(screen && screen_item(n0, nt, ld, v0, v1, sp == 0, s))) {
      // Panels of PW tokens, each [C][PW] (the last [C][ld mod PW]); padding 0.
      T* zt = s.zt.data();
      for (int64_t l = 0; l < ld; ++l) {
        const int64_t p0 = l / PW * PW, pw = std::min(PW, ld - p0);
        T* col = zt + p0 * C + (l - p0);
        if (l >= nt) {
          for (int64_t c = 0; c < C; ++c) col[c * pw] = T(0);
          continue;
        }
        const T* row = z + (n0 + l) * C;
        for (int64_t c = 0; c < C; ++c) col[c * pw] = row[c];
        norm_row(n0 + l, sp == 0);
      }
      for (int64_t l = 0; l < ld; ++l) {
        best[l] = std::numeric_limits<T>::infinity();
        bidx[l] = static_cast<I>(v0);
      }
      scan(zt, ld, E, hs.data(), ids.data(), C, v0, v1, best, bidx);
    }
    if (splits == 1) {
      for (int64_t l = 0; l < nt; ++l) {
        const int64_t n = n0 + l;
        finish(n, zn_all[n] + (best[l] + best[l]), bidx[l], flag[n] != 0);
      }
      return;
    }
    for (int64_t l = 0; l < nt; ++l) {
      pmin[sp * N + n0 + l] = best[l];
      pidx[sp * N + n0 + l] = bidx[l];
    }
    if (done[b].fetch_add(1, std::memory_order_acq_rel) != splits - 1) return;
    for (int64_t n = n0; n < n0 + nt; ++n) {
      T m = pmin[n];
      int64_t mi = pidx[n];
      // Splits cover increasing code ranges: a strict '<' keeps the lowest index.
      for (int64_t s = 1; s < splits; ++s)
        if (pmin[s * N + n] < m) { m = pmin[s * N + n]; mi = pidx[s * N + n]; }
      finish(n, zn_all[n] + (m + m), mi, flag[n] != 0);
    }
  };

  varformer_cpu::run_blocks<Bufs>(items, threads, make_bufs,
                                  [&](int64_t it, Bufs& s) { run_item(it, s); });
}

void check_inputs(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm,
                  c10::DeviceType device) {
  varformer_vq_checks::check_common(z, codebook, sqnorm, /*allow_empty_sqnorm=*/true);
  TORCH_CHECK(z.device().type() == device, "vq_lookup: z must be on ", device, ", got ",
              z.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vq_lookup_cpu(
    const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm, bool with_codes,
    int64_t /*cuda_stream*/) {
  check_inputs(z, codebook, sqnorm, c10::DeviceType::CPU);
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "vq_lookup (CPU): z must be float32 or float64, got ", z.scalar_type());
  const IsaKernels& k = *variants()[isa_from_env()].k;
  const int64_t N = z.size(0), C = z.size(1), V = codebook.size(0);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, z.options());
  at::Tensor codes = at::empty({with_codes ? N : 0, C}, z.options());
  if (N == 0) return {idx, dist, codes};
  if (z.scalar_type() == at::kFloat) {
    lookup_cpu<float>(z.data_ptr<float>(), codebook.data_ptr<float>(),
                      sqnorm.numel() ? sqnorm.data_ptr<float>() : nullptr, N, V, C,
                      dist.data_ptr<float>(), idx.data_ptr<int64_t>(),
                      with_codes ? codes.data_ptr<float>() : nullptr, k);
  } else {
    lookup_cpu<double>(z.data_ptr<double>(), codebook.data_ptr<double>(),
                       sqnorm.numel() ? sqnorm.data_ptr<double>() : nullptr, N, V, C,
                       dist.data_ptr<double>(), idx.data_ptr<int64_t>(),
                       with_codes ? codes.data_ptr<double>() : nullptr, k);
  }
  return {idx, dist, codes};
}

// ------------------------------------------------------------------------------ the φ step
// The quantizer's per-scale φ on CPU, channels last, float32 (see phi_conv_kernel.h):
//   h [B, H, W, C], weight [C, C, 3, 3], bias [C]; f_hat, f_rest [B, H, W, C] updated in place
//   p = keep * h + mix * (conv3x3(h, weight, padding 1) + bias);  f_hat += p;  f_rest -= p
// -> p [B, H, W, C]. Work items are blocks of rows of one image, each copied with its zero halo
// into a per-thread buffer (no padded copy of the whole input).
at::Tensor phi_update_cpu(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                          double keep, double mix, const at::Tensor& f_hat,
                          const at::Tensor& f_rest) {
  TORCH_CHECK(h.dim() == 4, "phi_update: h must be 4-D [B, H, W, C] (channels last), got ",
              h.dim(), " dims");
  const int64_t B = h.size(0), H = h.size(1), Wd = h.size(2), C = h.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == C &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "phi_update: weight must be [C, C, 3, 3] with C=", C, ", got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "phi_update: bias must be [", C, "], got ",
              bias.sizes());
  TORCH_CHECK(f_hat.sizes() == h.sizes() && f_rest.sizes() == h.sizes(),
              "phi_update: f_hat and f_rest must be ", h.sizes(), " like h, got ",
              f_hat.sizes(), " and ", f_rest.sizes());
  for (const at::Tensor* t : {&h, &weight, &bias, &f_hat, &f_rest}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "phi_update: every tensor must be float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "phi_update: every tensor must be on the CPU, got ",
                t->device());
    TORCH_CHECK(t->is_contiguous(), "phi_update: every tensor must be contiguous");
  }
  TORCH_CHECK(f_hat.data_ptr() != f_rest.data_ptr() && h.data_ptr() != f_hat.data_ptr() &&
                  h.data_ptr() != f_rest.data_ptr(),
              "phi_update: h, f_hat and f_rest must be distinct tensors");
  // The widest variant allowed whose vector width divides C.
  int id = isa_from_env();
  while (id > kIsaBaseline && (variants()[id].why.size() || C % variants()[id].k->group32 != 0))
    --id;
  const IsaKernels& k = *variants()[id].k;
  TORCH_CHECK(C % k.group32 == 0, "phi_update: C must be a multiple of ", k.group32, ", got ", C);
  at::Tensor out = at::empty(h.sizes(), h.options());
  if (h.numel() == 0) return out;

  std::vector<float> wp(9 * C * C);  // [ky][kx][ci][co]
  const float* w = weight.data_ptr<float>();
  for (int64_t co = 0; co < C; ++co)
    for (int64_t ci = 0; ci < C; ++ci)
      for (int64_t t = 0; t < 9; ++t) wp[(t * C + ci) * C + co] = w[(co * C + ci) * 9 + t];

  const int64_t macs = B * H * Wd * C * C * 9;
  int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(varformer_cpu::thread_budget(),
                                             macs / kSerialMacs));
  // Row blocks: about four items per thread (whole images when there are enough of them).
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(H, B * H / (4 * threads)));
  const int64_t per_image = (H + rows - 1) / rows;
  const int64_t ldp = (Wd + 2) * C;
  const float *hp = h.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float *op = out.data_ptr<float>(), *fh = f_hat.data_ptr<float>(), *fr = f_rest.data_ptr<float>();
  const float kf = static_cast<float>(keep), mf = static_cast<float>(mix);
  varformer_cpu::run_blocks<std::vector<float>>(
      B * per_image, threads, [&] { return std::vector<float>((rows + 2) * ldp); },
      [&](int64_t item, std::vector<float>& pad) {
        const int64_t b = item / per_image, y0 = item % per_image * rows;
        const int64_t nr = std::min(rows, H - y0);
        for (int64_t r = 0; r < nr + 2; ++r) {  // input rows y0 - 1 .. y0 + nr, zero outside
          float* dst = pad.data() + r * ldp;
          const int64_t y = y0 - 1 + r;
          std::memset(dst, 0, sizeof(float) * C);
          std::memset(dst + (Wd + 1) * C, 0, sizeof(float) * C);
          if (y < 0 || y >= H)
            std::memset(dst + C, 0, sizeof(float) * Wd * C);
          else
            std::memcpy(dst + C, hp + (b * H + y) * Wd * C, sizeof(float) * Wd * C);
        }
        const int64_t o = (b * H + y0) * Wd * C;
        k.phi32(pad.data(), nr, Wd, C, wp.data(), bp, kf, mf, hp + o, op + o, fh + o, fr + o);
      });
  return out;
}

// The variant a call would run for `request` ('' = what VARFORMER_CPU_ISA says, else auto).
std::string vq_cpu_isa(std::string request) {
  return kIsaNames[request.empty() ? isa_from_env() : resolve_isa(request)];
}

// The screening instructions a float32 call of variant `request` ('' = VARFORMER_CPU_ISA's) runs
// now, e.g. "vpdpwssd (avxvnni)", or "none: <why>".
std::string vq_cpu_screen(std::string request) {
  const int id = request.empty() ? isa_from_env() : resolve_isa(request);
  const IsaKernels* k = variants()[id].k;
  const ScreenFn fn = k ? screen_fn(*k) : nullptr;
  const std::string name = kIsaNames[id];
  if (fn == nullptr && k != nullptr && k->vnni_how[0] != '\0')
    return "none: the " + name + " variant screens only with " + k->vnni_how +
           (k->screen32_vnni ? ", left out by VARFORMER_VQ_VNNI=0" : ", which this CPU lacks");
  if (fn == nullptr) return "none: the " + name + " variant has none";
  if (fn == k->screen32_vnni) return k->vnni_how;
  return k->screen32_vnni ? "vpmaddwd (VARFORMER_VQ_VNNI=0)" : "vpmaddwd";
}

// One line per variant: "name|target it was compiled for|why it cannot run here ('' if it can)".
std::vector<std::string> vq_cpu_isa_table() {
  std::vector<std::string> out;
  for (int id = kIsaCount - 1; id >= 0; --id) {
    const Variant& v = variants()[id];
    out.push_back(std::string(kIsaNames[id]) + "|" + (v.k ? v.k->target : "") + "|" + v.why);
  }
  return out;
}

}  // namespace
}  // namespace varformer_vq

TORCH_LIBRARY(varformer_ext, m) {
  m.def("vq_lookup(Tensor z, Tensor codebook, Tensor sqnorm, bool with_codes, int cuda_stream)"
        " -> (Tensor idx, Tensor dist, Tensor codes)");
  m.def("phi_update(Tensor h, Tensor weight, Tensor bias, float keep, float mix, "
        "Tensor(a!) f_hat, Tensor(b!) f_rest) -> Tensor");
  m.def("vq_cpu_isa(str request) -> str", &varformer_vq::vq_cpu_isa);
  m.def("set_cpu_thread_budget(int n) -> int", &varformer_cpu::set_thread_budget);
  m.def("vq_cpu_isa_table() -> str[]", &varformer_vq::vq_cpu_isa_table);
  m.def("vq_cpu_screen(str request) -> str", &varformer_vq::vq_cpu_screen);
}

TORCH_LIBRARY_IMPL(varformer_ext, CPU, m) {
  m.impl("vq_lookup", &varformer_vq::vq_lookup_cpu);
  m.impl("phi_update", &varformer_vq::phi_update_cpu);
}
