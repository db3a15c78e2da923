// Nearest-codebook lookup (VAR VectorQuantizer2), CPU implementation, and the op schema.
//
//   z [N, C], codebook E [V, C], sqnorm [V] = sum_c E[v, c]^2, all float32 or all float64
//   d[n, v] = (|z_n|^2 + sqnorm[v]) - 2 * <z_n, E_v>
//   idx[n]  = argmin_v d[n, v]  (lowest index on ties, a NaN distance wins like torch.argmin)
//   dist[n] = d[n, idx[n]],  codes[n] = E[idx[n]] (or an empty [0, C] tensor)
//
// The N x V distance matrix is never formed. A work item is a block of TN tokens x a range of
// codes; its tokens are transposed once into zt [C][TN] so that vector lanes run over tokens, and
// codebook rows are read in place (one broadcast per element). Each token keeps a running
// (min, index) in registers while the codes stream past in increasing order. Extra memory:
// per-thread tiles, plus O(N) partial results when the codes are split across threads (small N).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "vq_lookup_checks.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace varformer_vq {
namespace {

// Bytes of one SIMD register, known at compile time (-march decides it).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

// Code index kept per token lane, as wide as T so that compares and selects vectorise together.
template <typename T> struct LaneIndex;
template <> struct LaneIndex<float> { using type = int32_t; };
template <> struct LaneIndex<double> { using type = int64_t; };

template <typename T>
struct Tile {
  static constexpr int kL = 2 * kVecBytes / static_cast<int>(sizeof(T));  // tokens / reg. tile
  static constexpr int kR = 6;  // codes per register tile (kR x 2 accumulator registers)
};

// Tokens per work item: a multiple of kL, up to 256, with the block zt [C][TN] near 128 KB.
template <typename T>
int64_t token_block(int64_t C) {
  constexpr int64_t L = Tile<T>::kL;
  const int64_t tn = 131072 / static_cast<int64_t>(sizeof(T)) / std::max<int64_t>(C, 1);
  return std::max<int64_t>(L, std::min<int64_t>(256, tn) / L * L);
}

// Codes per cache chunk: about 32 KB of codebook rows.
template <typename T>
int64_t code_chunk(int64_t C) {
  const int64_t rows = 32768 / static_cast<int64_t>(sizeof(T)) / std::max<int64_t>(C, 1);
  return std::max<int64_t>(Tile<T>::kR, rows);
}

// Per-thread scratch for one work item of up to TN tokens.
template <typename T>
struct Scratch {
  using I = typename LaneIndex<T>::type;
  std::vector<T> zt, zn, best;
  std::vector<I> bidx, bad;
  Scratch(int64_t C, int64_t TN)
      : zt(C * TN), zn(TN), best(TN), bidx(TN), bad(TN) {}
};

// RR codes (rows e of the codebook, stride C; sq their norms; first index v) against kL tokens
// (columns of the transposed block zt [C][ld]): updates the running (min, index) of each token.
template <typename T, int RR>
inline void micro(const T* zt, int64_t ld, const T* zn, const T* e, const T* sq, int64_t C,
                  typename LaneIndex<T>::type v, T* b, typename LaneIndex<T>::type* bi,
                  typename LaneIndex<T>::type* nan) {
  using I = typename LaneIndex<T>::type;
  constexpr int L = Tile<T>::kL;
  T acc[RR][L];
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
    for (int j = 0; j < L; ++j) acc[r][j] = T(0);
  for (int64_t c = 0; c < C; ++c) {
    const T* zc = zt + c * ld;
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const T ec = e[r * C + c];
#pragma omp simd
      for (int j = 0; j < L; ++j) acc[r][j] += ec * zc[j];
    }
  }
  // Codes in increasing order and a strict '<': the lowest index wins ties.
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r) {
    const T sqr = sq[r];
    const I vr = static_cast<I>(v + r);
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      const T d = (zn[j] + sqr) - T(2) * acc[r][j];
      const T bj = b[j];
      const I ij = bi[j];
      const bool lt = d < bj;
      const T nb = lt ? d : bj;
      const I ni = lt ? vr : ij;
      b[j] = nb;
      bi[j] = ni;
      nan[j] |= static_cast<I>(d != d);
    }
  }
}

// One work item: tokens [n0, n0 + nt) (nt <= TN) against codes [v0, v1).
// Writes per token the minimum, its index and whether a NaN distance was seen.
template <typename T>
void scan_item(const T* z, const T* E, const T* sq, int64_t C, int64_t n0, int64_t nt,
               int64_t v0, int64_t v1, Scratch<T>& s, T* out_min, int64_t* out_idx,
               uint8_t* out_nan) {
  using I = typename LaneIndex<T>::type;
  constexpr int L = Tile<T>::kL, R = Tile<T>::kR;
  const int64_t ld = (nt + L - 1) / L * L;  // padded token count
  T* zt = s.zt.data();
  // Transposed token block zt[c][l] = z[n0 + l, c] (padding 0) and squared norms.
  for (int64_t l = 0; l < nt; ++l) {
    const T* row = z + (n0 + l) * C;
    T acc = T(0);
    for (int64_t c = 0; c < C; ++c) {
      zt[c * ld + l] = row[c];
      acc += row[c] * row[c];
    }
    s.zn[l] = acc;
  }
  for (int64_t l = nt; l < ld; ++l) {
    for (int64_t c = 0; c < C; ++c) zt[c * ld + l] = T(0);
    s.zn[l] = T(0);
  }
  // Start at (+inf, v0): a token whose distances are all +inf gets the lowest index.
  for (int64_t l = 0; l < ld; ++l) {
    s.best[l] = std::numeric_limits<T>::infinity();
    s.bidx[l] = static_cast<I>(v0);
    s.bad[l] = 0;
  }
  const int64_t chunk = code_chunk<T>(C);
  for (int64_t vc = v0; vc < v1; vc += chunk) {
    const int64_t ve = std::min(v1, vc + chunk);
    for (int64_t l0 = 0; l0 < ld; l0 += L) {
      T b[L];
      I bi[L], nan[L];
      for (int j = 0; j < L; ++j) {
        b[j] = s.best[l0 + j]; bi[j] = s.bidx[l0 + j]; nan[j] = s.bad[l0 + j];
      }
      int64_t v = vc;
      for (; v + R <= ve; v += R)
        micro<T, R>(zt + l0, ld, s.zn.data() + l0, E + v * C, sq + v, C, static_cast<I>(v),
                    b, bi, nan);
      for (; v < ve; ++v)
        micro<T, 1>(zt + l0, ld, s.zn.data() + l0, E + v * C, sq + v, C, static_cast<I>(v),
                    b, bi, nan);
      for (int j = 0; j < L; ++j) {
        s.best[l0 + j] = b[j]; s.bidx[l0 + j] = bi[j]; s.bad[l0 + j] = nan[j];
      }
    }
  }
  for (int64_t l = 0; l < nt; ++l) {
    out_min[n0 + l] = s.best[l];
    out_idx[n0 + l] = s.bidx[l];
    out_nan[n0 + l] = s.bad[l] ? 1 : 0;
  }
}

// Exact scalar scan of one token (used only for tokens that met a NaN distance): the first NaN
// wins, as in torch.argmin; otherwise the first minimum.
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

template <typename T>
void lookup_cpu(const T* z, const T* E, const T* sq, int64_t N, int64_t V, int64_t C,
                T* dist, int64_t* idx, T* codes) {
  const int64_t TN = token_block<T>(C), chunk = code_chunk<T>(C);
  const int threads = std::max(1, at::get_num_threads());
  const int64_t nblocks = (N + TN - 1) / TN;
  const int64_t nchunks = (V + chunk - 1) / chunk;
  // Enough work items for all threads: with few token blocks, split the codes as well.
  int64_t splits = 1;
  if (nblocks < 4 * threads) splits = std::min(nchunks, (4 * threads + nblocks - 1) / nblocks);
  const int64_t per_split = (nchunks + splits - 1) / splits * chunk;  // codes per split
  splits = (V + per_split - 1) / per_split;
  const int64_t items = nblocks * splits;

  // Partial results [splits][N]; with one split they are the outputs themselves.
  std::vector<T> pmin_buf(splits > 1 ? splits * N : 0);
  std::vector<int64_t> pidx_buf(splits > 1 ? splits * N : 0);
  std::vector<uint8_t> pnan(splits * N);
  T* pmin = splits > 1 ? pmin_buf.data() : dist;
  int64_t* pidx = splits > 1 ? pidx_buf.data() : idx;

#pragma omp parallel num_threads(threads)
  {
    Scratch<T> s(C, TN);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / splits, sp = it % splits;
      const int64_t n0 = b * TN, nt = std::min(TN, N - n0);
      const int64_t v0 = sp * per_split, v1 = std::min(V, v0 + per_split);
      scan_item<T>(z, E, sq, C, n0, nt, v0, v1, s, pmin + sp * N, pidx + sp * N,
                   pnan.data() + sp * N);
    }
  }

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T m = pmin[n];
    int64_t mi = pidx[n];
    bool nan = pnan[n] != 0;
    // Splits cover increasing code ranges: a strict '<' keeps the lowest index.
    for (int64_t sp = 1; sp < splits; ++sp) {
      const T v = pmin[sp * N + n];
      if (v < m) { m = v; mi = pidx[sp * N + n]; }
      nan = nan || pnan[sp * N + n] != 0;
    }
    if (nan) scan_token_exact<T>(z + n * C, E, sq, C, V, &m, &mi);
    dist[n] = m;
    idx[n] = mi;
    if (codes != nullptr) std::memcpy(codes + n * C, E + mi * C, sizeof(T) * C);
  }
}

void check_inputs(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm,
                  c10::DeviceType device) {
  varformer_vq_checks::check_common(z, codebook, sqnorm);
  TORCH_CHECK(z.device().type() == device, "vq_lookup: z must be on ", device, ", got ",
              z.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vq_lookup_cpu(
    const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm, bool with_codes,
    int64_t /*cuda_stream*/) {
  check_inputs(z, codebook, sqnorm, c10::DeviceType::CPU);
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "vq_lookup (CPU): z must be float32 or float64, got ", z.scalar_type());
  const int64_t N = z.size(0), C = z.size(1), V = codebook.size(0);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, z.options());
  at::Tensor codes = at::empty({with_codes ? N : 0, C}, z.options());
  if (N == 0) return {idx, dist, codes};
  if (z.scalar_type() == at::kFloat) {
    lookup_cpu<float>(z.data_ptr<float>(), codebook.data_ptr<float>(),
                      sqnorm.data_ptr<float>(), N, V, C, dist.data_ptr<float>(),
                      idx.data_ptr<int64_t>(), with_codes ? codes.data_ptr<float>() : nullptr);
  } else {
    lookup_cpu<double>(z.data_ptr<double>(), codebook.data_ptr<double>(),
                       sqnorm.data_ptr<double>(), N, V, C, dist.data_ptr<double>(),
                       idx.data_ptr<int64_t>(),
                       with_codes ? codes.data_ptr<double>() : nullptr);
  }
  return {idx, dist, codes};
}

}  // namespace
}  // namespace varformer_vq

TORCH_LIBRARY(varformer_ext, m) {
  m.def("vq_lookup(Tensor z, Tensor codebook, Tensor sqnorm, bool with_codes, int cuda_stream)"
        " -> (Tensor idx, Tensor dist, Tensor codes)");
}

TORCH_LIBRARY_IMPL(varformer_ext, CPU, m) {
  m.impl("vq_lookup", &varformer_vq::vq_lookup_cpu);
}
