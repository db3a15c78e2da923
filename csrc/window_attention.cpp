// Shifted-window (Swin) attention on CPU, forward and backward, and their op schemas.
//
//   qkv [B, H, W, 3C] (q, k, v; heads x head_dim each), table [(2ws-1)^2, heads]
//   per image b, window (wy, wx) of the image rolled by -shift, head h, tokens i, j of the window:
//     s_ij = scale * q_i . k_j + table[rpi(i, j), h] + (shift > 0 && region(i) != region(j) ? -100 : 0)
//     out_i = sum_j softmax_j(s_i.) v_j,   lse_i = log sum_j exp(s_ij)
//   out [B, H, W, C] and lse [B, heads, H*W] are written at the pixel each token came from.
//
// The roll and the window partition live in the addressing (token t of window (wy, wx) reads
// pixel ((wy*ws + t/ws + shift) % H, (wx*ws + t%ws + shift) % W)); region ids come from the
// coordinates. One work item is one (image, window, head): its q, k, v rows are copied into
// small per-thread buffers padded to multiples of 8 (k and v also transposed), the N x N scores
// stay in those buffers (L1/L2), and the products run through one register-tiled micro-kernel.
// The backward recomputes P = exp(s - lse), writes dq, dk, dv straight into dqkv in image
// layout (every pixel belongs to exactly one window: no races) and reduces the table gradient
// deterministically: items are cut into a fixed number of chunks (independent of the thread
// count); a chunk sums ds per head and token pair (vector adds, no scattered table updates per
// item), maps those sums to its own partial table once, and the partial tables are summed in
// chunk order at the end.
//
// One block loop per call (run_blocks, cpu_threads.h: torch's OpenMP pool on a quiet machine,
// the extension's own helper pool on a busy one); threads take blocks of items from an atomic
// counter, so a descheduled thread delays only the blocks it holds; small calls run serially
// (see call_threads). The kernels are compiled for AVX-512, AVX2+FMA and the build's
// baseline with function-local target attributes and chosen at run time from the CPU
// (VARFORMER_CPU_ISA=avx2|baseline narrows it, cpu_isa.h; window_attention_isa() reports it).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "cpu_math.h"
#include "cpu_threads.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace varformer_window {
namespace {

constexpr int64_t kPad = 8;     // tokens and head dims are padded to multiples of this
inline int64_t pad8(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// ------------------------------------------------------------------------------ micro-kernel
// C[m, n] = alpha * sum_k A(m, k) B[k, n] for an MB x NB tile; A(m, k) = A[m*sam + k*sak].
template <typename T, int MB, int NB>
VF_INLINE void tile(int64_t K, const T* __restrict A, int64_t sam, int64_t sak,
                    const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc, T alpha) {
  T acc[MB][NB];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma omp simd
    for (int n = 0; n < NB; ++n) acc[m][n] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict b = B + k * ldb;
    const T* __restrict a = A + k * sak;
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const T am = a[m * sam];
#pragma omp simd
      for (int n = 0; n < NB; ++n) acc[m][n] += am * b[n];
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
#pragma omp simd
    for (int n = 0; n < NB; ++n) C[m * ldc + n] = alpha * acc[m][n];
}

// C [M, Nc] = alpha * A(M x K) B(K x Nc); M a multiple of MB, Nc a multiple of 8.
template <typename T, int MB>
VF_INLINE void gemm(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t sam, int64_t sak,
                    const T* B, int64_t ldb, T* C, int64_t ldc, T alpha) {
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    int64_t n0 = 0;
    for (; n0 + 16 <= Nc; n0 += 16)
      tile<T, MB, 16>(K, A + m0 * sam, sam, sak, B + n0, ldb, C + m0 * ldc + n0, ldc, alpha);
    if (n0 < Nc)
      tile<T, MB, 8>(K, A + m0 * sam, sam, sak, B + n0, ldb, C + m0 * ldc + n0, ldc, alpha);
  }
}

// ------------------------------------------------------------------------------ geometry
struct Geometry {
  int64_t B, H, W, C, nh, hd, ws, shift, N, NP, HDP, HDV, nWy, nWx, items;
  double scale;
};

Geometry geometry(const at::Tensor& qkv, int64_t ws, int64_t shift, int64_t nh, double scale) {
  Geometry g;
  g.B = qkv.size(0); g.H = qkv.size(1); g.W = qkv.size(2); g.C = qkv.size(3) / 3;
  g.nh = nh; g.hd = g.C / nh; g.ws = ws; g.shift = shift; g.N = ws * ws;
  g.NP = pad8(g.N); g.HDP = pad8(g.hd); g.HDV = pad8(g.hd + 1); g.nWy = g.H / ws; g.nWx = g.W / ws;
  g.items = g.B * g.nWy * g.nWx * nh;
  g.scale = scale;
  return g;
}

// Pixel offsets (in rows of the image-layout tensors) and region ids of one window's tokens,
// and whether the window needs the shift mask (tokens from more than one region). Cached in
// the scratch: consecutive items of a block are the heads of one window.
struct WindowCache {
  int64_t window = -1;
  bool mixed = false;
};

VF_INLINE bool window_tokens(const Geometry& g, int64_t w, int64_t* pix, int32_t* rid,
                             WindowCache& cache) {
  if (cache.window == w) return cache.mixed;
  const int64_t wx = w % g.nWx, wy = (w / g.nWx) % g.nWy, b = w / (g.nWx * g.nWy);
  bool mixed = false;
  for (int64_t ty = 0; ty < g.ws; ++ty) {
    const int64_t ys = wy * g.ws + ty;                      // row in the rolled frame
    int64_t y = ys + g.shift;
    y = y >= g.H ? y - g.H : y;
    const int ry = ys < g.H - g.ws ? 0 : (ys < g.H - g.shift ? 1 : 2);
    for (int64_t tx = 0; tx < g.ws; ++tx) {
      const int64_t xs = wx * g.ws + tx, t = ty * g.ws + tx;
      int64_t x = xs + g.shift;
      x = x >= g.W ? x - g.W : x;
      pix[t] = (b * g.H + y) * g.W + x;
      const int rx = xs < g.W - g.ws ? 0 : (xs < g.W - g.shift ? 1 : 2);
      rid[t] = g.shift > 0 ? ry * 3 + rx : 0;
      mixed = mixed || rid[t] != rid[0];
    }
  }
  cache.window = w;
  cache.mixed = mixed;
  return mixed;
}

// Software prefetch of window w's pixel rows (`ld` elements from `base` + pixel * ld) into the
// cache: the rows of a window are scattered over ws image rows, which the hardware prefetcher
// does not follow, so without it every head's first touch of q/k/v waits on memory. Issued
// for the next window while the current one's heads run, spread over those heads (head h
// fetches pixel rows [h N / heads, (h+1) N / heads)) and into L2, not L1: a window's rows
// (up to 80 KB in the backward at VarFormer's 128² shape) issued at once filled the miss
// queue and evicted the current window's rows from L1 (measured on a Zen 4 guest, 2 threads,
// 128², 4x4 windows: forward 1.1-1.5x and backward 1.2-1.3x faster than all rows into L1 at
// head 0; benchmarks/results/NOTES.md).
template <typename T>
VF_INLINE void prefetch_window(const Geometry& g, int64_t w, const T* base, int64_t ld,
                               bool write, int64_t part, int64_t parts) {
  if (w >= g.B * g.nWy * g.nWx) return;
  const int64_t wx = w % g.nWx, wy = (w / g.nWx) % g.nWy, b = w / (g.nWx * g.nWy);
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t t = part * g.N / parts, t1 = (part + 1) * g.N / parts; t < t1; ++t) {
    int64_t y = wy * g.ws + t / g.ws + g.shift;
    y = y >= g.H ? y - g.H : y;
    int64_t x = wx * g.ws + t % g.ws + g.shift;
    x = x >= g.W ? x - g.W : x;
    const T* row = base + ((b * g.H + y) * g.W + x) * ld;
    for (int64_t c = 0; c < ld; c += kLine) {
      if (write) __builtin_prefetch(row + c, 1, 2);
      else __builtin_prefetch(row + c, 0, 2);
    }
  }
}

// Bias of every head and token pair from the table: [heads][N][NP] (padding columns 0).
template <typename T>
std::vector<T> bias_matrix(const Geometry& g, const T* table, std::vector<int32_t>& rpi) {
  const int64_t N = g.N, NP = g.NP, ws = g.ws;
  rpi.assign(N * N, 0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j)
      rpi[i * N + j] = static_cast<int32_t>((i / ws - j / ws + ws - 1) * (2 * ws - 1) +
                                            (i % ws - j % ws + ws - 1));
  std::vector<T> bias(g.nh * N * NP, T(0));
  for (int64_t h = 0; h < g.nh; ++h)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) bias[(h * N + i) * NP + j] = table[rpi[i * N + j] * g.nh + h];
  return bias;
}

// Per-thread buffers (zero-initialised once, so padding stays zero and finite).
template <typename T>
struct Scratch {
  std::vector<int64_t> pix;
  std::vector<int32_t> rid;
  std::vector<T> qb, kb, vb, ob, kt, vt, s, p, delta, rowsum;
  std::vector<T> dbias;   // backward: this chunk's sum of ds per head and token pair [nh][N*N]
  WindowCache cache;
  explicit Scratch(const Geometry& g, bool backward)
      : pix(g.N), rid(g.N), qb(g.NP * g.HDP), kb(backward ? g.NP * g.HDP : 0),
        vb(g.NP * g.HDV), ob(g.NP * g.HDV), kt(g.HDP * g.NP), vt(backward ? g.HDP * g.NP : 0),
        s(g.NP * g.NP), p(backward ? g.NP * g.NP : 0), delta(g.NP), rowsum(g.NP),
        dbias(backward ? g.nh * g.N * g.N : 0) {
    // forward: v rows (stride HDV) carry a column of ones, so p v also yields the row sums
    if (!backward)
      for (int64_t t = 0; t < g.NP; ++t) vb[t * g.HDV + g.hd] = T(1);
  }
};

// Copies hd channels starting at channel `off` of N pixel rows (row length ld) into rows of
// `dst` (stride HDP) and, if `dst_t` is given, transposed into dst_t [hd][NP].
template <typename T>
VF_INLINE void gather_rows(const Geometry& g, const T* src, int64_t ld, int64_t off,
                           const int64_t* pix, T* __restrict dst, T* __restrict dst_t,
                           int64_t HDP) {
  const int64_t hd = g.hd, NP = g.NP;
  for (int64_t t = 0; t < g.N; ++t) {
    const T* __restrict r = src + pix[t] * ld + off;
    if (dst != nullptr) {
      T* __restrict d = dst + t * HDP;
#pragma omp simd
      for (int64_t c = 0; c < hd; ++c) d[c] = r[c];
    }
    if (dst_t != nullptr) {
      // scalar on purpose: vectorised, this strided store becomes a slow scatter
#pragma omp simd safelen(1)
      for (int64_t c = 0; c < hd; ++c) dst_t[c * NP + t] = r[c];
    }
  }
}

// Writes rows [0, N) x [0, hd) of buf (stride HDP) to dst + pix[t] * ld.
template <typename T>
VF_INLINE void scatter_rows(const Geometry& g, const T* __restrict buf, T* dst, int64_t ld,
                            const int64_t* pix) {
  const int64_t hd = g.hd, HDP = g.HDP;
  for (int64_t t = 0; t < g.N; ++t) {
    T* __restrict d = dst + pix[t] * ld;
    const T* __restrict b = buf + t * HDP;
#pragma omp simd
    for (int64_t c = 0; c < hd; ++c) d[c] = b[c];
  }
}

// s_ij = scale * s_ij + bias + mask - sub_i for j < N, then exp in place; rows i < N.
// With sub == nullptr the row maximum is subtracted and written to lse_row[i] (the forward;
// rows stay unnormalised); otherwise sub is the saved lse (the backward: p itself).
template <typename T>
VF_INLINE void softmax_rows(const Geometry& g, T* __restrict s, const T* __restrict bias,
                            const int32_t* __restrict rid, bool masked, const T* sub,
                            T* __restrict lse_row, T* /*unused*/) {
  const int64_t N = g.N, NP = g.NP;
  const T scale = static_cast<T>(g.scale);
  for (int64_t i = 0; i < N; ++i) {
    T* __restrict row = s + i * NP;
    const T* __restrict brow = bias + i * NP;
    if (masked) {
      const int32_t ri = rid[i];
#pragma omp simd
      for (int64_t j = 0; j < N; ++j)
        row[j] = row[j] * scale + brow[j] + (rid[j] != ri ? T(-100) : T(0));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) row[j] = row[j] * scale + brow[j];
    }
    T l;
    if (sub != nullptr) {
      l = sub[i];
    } else {
      T m = row[0];
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < N; ++j) m = row[j] > m ? row[j] : m;
      lse_row[i] = m;
      l = m;
    }
    // one exp loop for both cases (written twice, GCC left the forward's copy scalar)
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) row[j] = varformer_cpu::exp_clamped(row[j] - l);
  }
}

// ------------------------------------------------------------------------------ forward
template <typename T>
struct FwdArgs {
  Geometry g;
  const T* qkv;
  const T* bias;   // [heads][N][NP]
  T* out;          // [B*H*W, C]
  T* lse;          // [B, heads, H*W]
};

template <typename T, int MB>
VF_INLINE void forward_item(const FwdArgs<T>& a, int64_t item, Scratch<T>& sc) {
  const Geometry& g = a.g;
  const int64_t h = item % g.nh, w = item / g.nh, b = w / (g.nWx * g.nWy);
  const int64_t N = g.N, NP = g.NP, HDP = g.HDP, HDV = g.HDV, C3 = 3 * g.C, hd = g.hd;
  const bool masked = window_tokens(g, w, sc.pix.data(), sc.rid.data(), sc.cache);
  const int64_t* pix = sc.pix.data();
  prefetch_window(g, w + 1, a.qkv, C3, false, h, g.nh);
  gather_rows(g, a.qkv, C3, h * hd, pix, sc.qb.data(), static_cast<T*>(nullptr), HDP);
  gather_rows(g, a.qkv, C3, g.C + h * hd, pix, static_cast<T*>(nullptr), sc.kt.data(), HDP);
  gather_rows(g, a.qkv, C3, 2 * g.C + h * hd, pix, sc.vb.data(), static_cast<T*>(nullptr),
              HDV);
  // s = q k^T; e = exp(s - rowmax) (unnormalised); [o | l] = e [v | 1]; out = o / l
  gemm<T, MB>(NP, NP, hd, sc.qb.data(), HDP, 1, sc.kt.data(), NP, sc.s.data(), NP, T(1));
  T* __restrict lse_row = sc.delta.data();
  softmax_rows(g, sc.s.data(), a.bias + h * N * NP, sc.rid.data(), masked,
               static_cast<const T*>(nullptr), lse_row, static_cast<T*>(nullptr));
  T* __restrict ob = sc.ob.data();
  gemm<T, MB>(NP, HDV, N, sc.s.data(), NP, 1, sc.vb.data(), HDV, ob, HDV, T(1));
  T* __restrict inv = sc.rowsum.data();
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) {
    const T l = ob[i * HDV + hd];
    inv[i] = T(1) / l;
    lse_row[i] += varformer_cpu::log_positive(l);
  }
  const int64_t HW = g.H * g.W;
  T* __restrict out = a.out + h * hd;
  for (int64_t i = 0; i < N; ++i) {
    T* __restrict d = out + pix[i] * g.C;
    const T* __restrict o = ob + i * HDV;
    const T r = inv[i];
#pragma omp simd
    for (int64_t c = 0; c < hd; ++c) d[c] = o[c] * r;
  }
  T* __restrict lse = a.lse + (b * g.nh + h) * HW - b * HW;
  for (int64_t i = 0; i < N; ++i) lse[pix[i]] = lse_row[i];
}

// ------------------------------------------------------------------------------ backward
template <typename T>
struct BwdArgs {
  Geometry g;
  const T* dout;   // [B*H*W, C]
  const T* qkv;
  const T* out;
  const T* lse;    // [B, heads, H*W]
  const T* bias;
  const int32_t* rpi;   // [N*N] table row of each token pair
  T* dqkv;         // [B*H*W, 3C]
  T* partial;      // [chunks][(2ws-1)^2 * heads]
  int64_t table_size;
};

template <typename T, int MB>
VF_INLINE void backward_item(const BwdArgs<T>& a, int64_t item, Scratch<T>& sc) {
  const Geometry& g = a.g;
  const int64_t h = item % g.nh, w = item / g.nh, b = w / (g.nWx * g.nWy);
  const int64_t N = g.N, NP = g.NP, HDP = g.HDP, C = g.C, C3 = 3 * C, hd = g.hd;
  const int64_t HW = g.H * g.W;
  const T scale = static_cast<T>(g.scale);
  const bool masked = window_tokens(g, w, sc.pix.data(), sc.rid.data(), sc.cache);
  const int64_t* pix = sc.pix.data();
  prefetch_window(g, w + 1, a.qkv, C3, false, h, g.nh);
  prefetch_window(g, w + 1, a.dout, C, false, h, g.nh);
  prefetch_window(g, w + 1, a.out, C, false, h, g.nh);
  prefetch_window(g, w + 1, static_cast<const T*>(a.dqkv), C3, true, h, g.nh);
  gather_rows(g, a.qkv, C3, h * hd, pix, sc.qb.data(), static_cast<T*>(nullptr), HDP);
  gather_rows(g, a.qkv, C3, C + h * hd, pix, sc.kb.data(), sc.kt.data(), HDP);
  gather_rows(g, a.qkv, C3, 2 * C + h * hd, pix, static_cast<T*>(nullptr), sc.vt.data(), HDP);
  gather_rows(g, a.dout, C, h * hd, pix, sc.vb.data(), static_cast<T*>(nullptr), HDP);  // vb = dO
  T lse_row[256];
  for (int64_t i = 0; i < N; ++i) {
    const T* __restrict o = a.out + pix[i] * C + h * hd;
    const T* __restrict d = sc.vb.data() + i * HDP;
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < hd; ++c) acc += o[c] * d[c];
    sc.delta[i] = acc;
    lse_row[i] = a.lse[(b * g.nh + h) * HW + (pix[i] - b * HW)];
  }
  // p = exp(scale q k^T + bias + mask - lse)
  gemm<T, MB>(NP, NP, hd, sc.qb.data(), HDP, 1, sc.kt.data(), NP, sc.p.data(), NP, T(1));
  softmax_rows(g, sc.p.data(), a.bias + h * N * NP, sc.rid.data(), masked,
               static_cast<const T*>(lse_row), static_cast<T*>(nullptr), sc.rowsum.data());
  // dp = dO v^T, ds = p (dp - delta) (in s); ds summed per token pair for the table gradient
  // (mapped to table rows once per chunk, in backward_range: no scattered adds per item)
  gemm<T, MB>(NP, NP, hd, sc.vb.data(), HDP, 1, sc.vt.data(), NP, sc.s.data(), NP, T(1));
  T* __restrict dbias = sc.dbias.data() + h * N * N;
  for (int64_t i = 0; i < N; ++i) {
    T* __restrict ds = sc.s.data() + i * NP;
    const T* __restrict pr = sc.p.data() + i * NP;
    T* __restrict db = dbias + i * N;
    const T di = sc.delta[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      ds[j] = pr[j] * (ds[j] - di);
      db[j] += ds[j];
    }
    for (int64_t j = N; j < NP; ++j) ds[j] = T(0);
  }
  T* dq = a.dqkv + h * hd;
  // dv = p^T dO
  gemm<T, MB>(NP, HDP, N, sc.p.data(), 1, NP, sc.vb.data(), HDP, sc.ob.data(), HDP, T(1));
  scatter_rows(g, sc.ob.data(), dq + 2 * C, C3, pix);
  // dk = scale ds^T q
  gemm<T, MB>(NP, HDP, N, sc.s.data(), 1, NP, sc.qb.data(), HDP, sc.ob.data(), HDP, scale);
  scatter_rows(g, sc.ob.data(), dq + C, C3, pix);
  // dq = scale ds k
  gemm<T, MB>(NP, HDP, N, sc.s.data(), NP, 1, sc.kb.data(), HDP, sc.ob.data(), HDP, scale);
  scatter_rows(g, sc.ob.data(), dq, C3, pix);
}

// ------------------------------------------------------------------------------ drivers
// Threads for a call of `macs` multiply-adds: none beyond one per kSerialMacs of work
// (run_blocks, cpu_threads.h, decides where they run on a busy machine).
constexpr int64_t kSerialMacs = int64_t(1) << 18;

int64_t call_threads(int64_t macs) {
  return std::max<int64_t>(1,
                           std::min<int64_t>(varformer_cpu::thread_budget(), macs / kSerialMacs));
}

// Items [i0, i1) of one block; instantiated per ISA below (the hot loops must be compiled
// inside the target-attributed functions, not in the generic driver's lambda).
template <typename T, int MB>
VF_INLINE void forward_range(const FwdArgs<T>& a, int64_t i0, int64_t i1, Scratch<T>& sc) {
  for (int64_t it = i0; it < i1; ++it) forward_item<T, MB>(a, it, sc);
}

template <typename T, int MB>
VF_INLINE void backward_range(const BwdArgs<T>& a, int64_t i0, int64_t i1, Scratch<T>& sc,
                              T* part) {
  for (int64_t it = i0; it < i1; ++it) backward_item<T, MB>(a, it, sc);
  // this chunk's per-pair sums -> its partial table (fixed order), then cleared for the next;
  // only the heads its items touched (consecutive items are the heads of one window)
  const int64_t nh = a.g.nh, NN = a.g.N * a.g.N;
  T* __restrict db = sc.dbias.data();
  const int64_t touched = std::min<int64_t>(nh, i1 - i0);
  for (int64_t k = 0; k < touched; ++k) {
    const int64_t h = (i0 + k) % nh;
    for (int64_t ij = 0; ij < NN; ++ij) part[a.rpi[ij] * nh + h] += db[h * NN + ij];
    std::fill(db + h * NN, db + (h + 1) * NN, T(0));
  }
}

template <typename T>
VF_AVX512 void forward_avx512(const FwdArgs<T>& a, int64_t i0, int64_t i1, Scratch<T>& sc) {
  forward_range<T, 8>(a, i0, i1, sc);
}
template <typename T>
VF_AVX2 void forward_avx2(const FwdArgs<T>& a, int64_t i0, int64_t i1, Scratch<T>& sc) {
  forward_range<T, 4>(a, i0, i1, sc);
}
template <typename T>
void forward_base(const FwdArgs<T>& a, int64_t i0, int64_t i1, Scratch<T>& sc) {
  forward_range<T, 2>(a, i0, i1, sc);
}
template <typename T>
VF_AVX512 void backward_avx512(const BwdArgs<T>& a, int64_t i0, int64_t i1, Scratch<T>& sc,
                               T* part) {
  backward_range<T, 8>(a, i0, i1, sc, part);
}
template <typename T>
VF_AVX2 void backward_avx2(const BwdArgs<T>& a, int64_t i0, int64_t i1, Scratch<T>& sc,
                           T* part) {
  backward_range<T, 4>(a, i0, i1, sc, part);
}
template <typename T>
void backward_base(const BwdArgs<T>& a, int64_t i0, int64_t i1, Scratch<T>& sc, T* part) {
  backward_range<T, 2>(a, i0, i1, sc, part);
}

using varformer_cpu::Isa;

Isa isa() { return varformer_cpu::widest_isa(); }

template <typename T>
void forward_all(const FwdArgs<T>& a) {
  auto* fn = isa() == varformer_cpu::kAvx512 ? &forward_avx512<T>
             : isa() == varformer_cpu::kAvx2 ? &forward_avx2<T> : &forward_base<T>;
  const int64_t items = a.g.items;
  const int64_t threads = call_threads(2 * items * a.g.N * a.g.N * a.g.hd);
  const int64_t per = std::max<int64_t>(1, items / (8 * threads));   // ~8 blocks per thread
  const int64_t nblocks = (items + per - 1) / per;
  varformer_cpu::run_blocks<Scratch<T>>(
      nblocks, threads, [&] { return Scratch<T>(a.g, false); },
      [&](int64_t k, Scratch<T>& sc) { fn(a, k * per, std::min(items, (k + 1) * per), sc); });
}

template <typename T>
void backward_all(const BwdArgs<T>& a, int64_t chunks) {
  auto* fn = isa() == varformer_cpu::kAvx512 ? &backward_avx512<T>
             : isa() == varformer_cpu::kAvx2 ? &backward_avx2<T> : &backward_base<T>;
  const int64_t items = a.g.items;
  varformer_cpu::run_blocks<Scratch<T>>(
      chunks, call_threads(5 * items * a.g.N * a.g.N * a.g.hd),
      [&] { return Scratch<T>(a.g, true); },
      [&](int64_t k, Scratch<T>& sc) {
        fn(a, k * items / chunks, (k + 1) * items / chunks, sc, a.partial + k * a.table_size);
      });
}

// ------------------------------------------------------------------------------ ops
void check_common(const char* op, const at::Tensor& qkv, const at::Tensor& table, int64_t ws,
                  int64_t shift, int64_t nh) {
  TORCH_CHECK(qkv.device().is_cpu(), op, ": qkv must be a CPU tensor, got ", qkv.device());
  TORCH_CHECK(qkv.dim() == 4, op, ": qkv must be 4-D [B, H, W, 3C], got ", qkv.dim(), " dims");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble, op,
              ": qkv must be float32 or float64, got ", qkv.scalar_type());
  TORCH_CHECK(qkv.is_contiguous(), op, ": qkv must be contiguous");
  TORCH_CHECK(ws >= 1 && ws <= 16, op, ": window_size must be in [1, 16], got ", ws);
  TORCH_CHECK(shift >= 0 && shift < ws, op, ": shift_size must be in [0, ", ws, "), got ", shift);
  TORCH_CHECK(nh >= 1, op, ": num_heads must be >= 1, got ", nh);
  const int64_t C3 = qkv.size(3);
  TORCH_CHECK(C3 % 3 == 0 && (C3 / 3) % nh == 0 && C3 > 0, op, ": qkv's last dim must be 3*C ",
              "with C a multiple of num_heads=", nh, ", got ", C3);
  TORCH_CHECK(qkv.size(1) % ws == 0 && qkv.size(2) % ws == 0, op,
              ": H and W must be multiples of window_size=", ws, ", got H=", qkv.size(1),
              ", W=", qkv.size(2));
  TORCH_CHECK(table.dim() == 2 && table.size(0) == (2 * ws - 1) * (2 * ws - 1) &&
                  table.size(1) == nh,
              op, ": rpb_table must have shape [", (2 * ws - 1) * (2 * ws - 1), ", ", nh,
              "], got ", table.sizes());
  TORCH_CHECK(table.device().is_cpu(), op, ": rpb_table must be a CPU tensor");
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& qkv,
                at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == qkv.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " differs from qkv dtype ", qkv.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), op, ": ", name,
              " must be a contiguous CPU tensor");
}

std::tuple<at::Tensor, at::Tensor> window_attention_fwd(const at::Tensor& qkv,
                                                        const at::Tensor& rpb_table,
                                                        int64_t ws, int64_t shift, int64_t nh,
                                                        double scale) {
  const char* op = "window_attention_fwd";
  check_common(op, qkv, rpb_table, ws, shift, nh);
  const Geometry g = geometry(qkv, ws, shift, nh, scale);
  at::Tensor out = at::empty({g.B, g.H, g.W, g.C}, qkv.options());
  at::Tensor lse = at::empty({g.B, nh, g.H * g.W}, qkv.options());
  if (g.items == 0) return {out, lse};
  const at::Tensor table = rpb_table.to(qkv.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention", [&] {
    std::vector<int32_t> rpi;
    const std::vector<scalar_t> bias = bias_matrix<scalar_t>(g, table.data_ptr<scalar_t>(), rpi);
    const FwdArgs<scalar_t> a{g, qkv.data_ptr<scalar_t>(), bias.data(),
                              out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>()};
    forward_all<scalar_t>(a);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& rpb_table,
    const at::Tensor& out, const at::Tensor& lse, int64_t ws, int64_t shift, int64_t nh,
    double scale) {
  const char* op = "window_attention_bwd";
  check_common(op, qkv, rpb_table, ws, shift, nh);
  const Geometry g = geometry(qkv, ws, shift, nh, scale);
  check_like(op, "grad_out", grad_out, qkv, {g.B, g.H, g.W, g.C});
  check_like(op, "out", out, qkv, {g.B, g.H, g.W, g.C});
  check_like(op, "lse", lse, qkv, {g.B, nh, g.H * g.W});
  const int64_t tsize = rpb_table.size(0) * nh;
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  at::Tensor dtable = at::zeros({rpb_table.size(0), nh}, qkv.options());
  if (g.items == 0) return {dqkv, dtable};
  const at::Tensor table = rpb_table.to(qkv.scalar_type()).contiguous();
  // A fixed number of chunks (not threads): the table gradient's summation order depends only
  // on the problem, so it is the same for any thread count.
  // At least 16 items a chunk: each chunk maps its per-pair sums (heads x N^2) to the table
  // once, which for 8x8 windows and a few items a chunk cost more than the items' own adds.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.items / 16, 128));
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention", [&] {
    std::vector<int32_t> rpi;
    const std::vector<scalar_t> bias = bias_matrix<scalar_t>(g, table.data_ptr<scalar_t>(), rpi);
    std::vector<scalar_t> partial(chunks * tsize, scalar_t(0));
    const BwdArgs<scalar_t> a{g, grad_out.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), bias.data(),
                              rpi.data(), dqkv.data_ptr<scalar_t>(), partial.data(), tsize};
    backward_all<scalar_t>(a, chunks);
    scalar_t* dt = dtable.data_ptr<scalar_t>();
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t t = 0; t < tsize; ++t) dt[t] += partial[k * tsize + t];
  });
  return {dqkv, dtable};
}

std::string window_attention_isa() { return varformer_cpu::isa_name(isa()); }

}  // namespace
}  // namespace varformer_window

TORCH_LIBRARY_FRAGMENT(varformer_ext, m) {
  m.def("window_attention_fwd(Tensor qkv, Tensor rpb_table, int window_size, int shift_size, "
        "int num_heads, float scale) -> (Tensor out, Tensor lse)");
  m.def("window_attention_bwd(Tensor grad_out, Tensor qkv, Tensor rpb_table, Tensor out, "
        "Tensor lse, int window_size, int shift_size, int num_heads, float scale) "
        "-> (Tensor grad_qkv, Tensor grad_rpb_table)");
  m.def("window_attention_isa() -> str", &varformer_window::window_attention_isa);
}

TORCH_LIBRARY_IMPL(varformer_ext, CPU, m) {
  m.impl("window_attention_fwd", &varformer_window::window_attention_fwd);
  m.impl("window_attention_bwd", &varformer_window::window_attention_bwd);
}
