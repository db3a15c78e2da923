// Screening pass of the float32 CPU VQ lookup in 16-bit integers, and the exact float32 rescoring
// of what it keeps. Included, like vq_lookup_kernel.h, inside each ISA's namespace after its
// traits, so every function here exists once per ISA. No includes.
//
// The driver (vq_lookup.cpp) scales z by 1/sZ and the codebook by 1/sE, rounds both to integers
// of at most Q in magnitude, and sets H[v] = round(hs[v] / (sZ sE)). A code's screening score
//   a[v] = H[v] - <qz, qe_v>   (int32, exact: |H| <= 2^29, |<qz, qe>| <= 2^29)
// is then within the token's margin M / 2 of hs[v] - <z, e_v> computed in float32 (in units of
// sZ sE; the driver derives M from the actual rounding errors, see screen_margin). Every code
// whose score is within M of the token's smallest score is kept, so the float32 minimiser is
// always among the kept codes; the rescoring computes those in float32 exactly as the float32
// tile does (same fused multiply-adds, same order), so the result is bit for bit the one the
// float32 scan gives.
//
// Traits `S` provide: V (int32 vector), W (lanes),
//   load(const int32_t*) / store(int32_t*, V)
//   bcast(const int32_t*)            one int32 (a pair of int16) in every lane
//   madd(acc, e, z) = acc + (e.lo * z.lo + e.hi * z.hi) per int32 lane (int16 halves)
//   min(a, b)                         per lane
//   le_mask(a, b)                     bit l set where a <= b in lane l
//
// Register tile: R codes x G vectors of tokens. zt holds the block's tokens in panels of G*W,
// each [P][G*W] int32 (P = channel pairs); Eq [V][P] holds the pairs of -qe (negated, so the
// tile only adds).

// Codes kept per token before the list is compacted against the current threshold; a token whose
// compacted list is still full is marked and rescanned in float32 by the driver.
constexpr int kScreenCap = 16;

inline void screen_push(ScreenLists& L, int64_t t, int32_t code, int32_t a, int32_t thr) {
  int32_t n = L.cnt[t];
  int32_t* codes = L.code + t * kScreenCap;
  int32_t* vals = L.val + t * kScreenCap;
  if (n == kScreenCap) {
    int32_t k = 0;
    for (int32_t j = 0; j < n; ++j)
      if (vals[j] <= thr) { codes[k] = codes[j]; vals[k] = vals[j]; ++k; }
    n = k;
    if (n == kScreenCap) { L.over[t] = 1; return; }
  }
  codes[n] = code;
  vals[n] = a;
  L.cnt[t] = n + 1;
}

// One token lane's update with a tile's scores a[0..R) for codes v..v+R-1 (increasing).
template <int R>
inline void screen_lane(const int32_t* a, int64_t stride, int64_t v, int64_t t, int32_t* best,
                        int32_t* thr, const int32_t* marg, ScreenLists& L) {
  for (int r = 0; r < R; ++r) {
    const int32_t s = a[r * stride];
    if (s > thr[t]) continue;
    if (s < best[t]) {
      best[t] = s;
      const int64_t th = static_cast<int64_t>(s) + marg[t];
      thr[t] = th > INT32_MAX ? INT32_MAX : static_cast<int32_t>(th);
    }
    screen_push(L, t, static_cast<int32_t>(v + r), s, thr[t]);
  }
}

template <class S, int R, int G>
inline __attribute__((always_inline)) void screen_tile(const int32_t* zt, int64_t ld,
                                                       const int32_t* e, const int32_t* H,
                                                       int64_t P, int64_t v, int64_t t0,
                                                       int32_t* best, int32_t* thr,
                                                       const int32_t* marg, ScreenLists& L) {
  using V = typename S::V;
  constexpr int W = S::W;
  V acc[R][G];
  VF_UNROLL
  for (int r = 0; r < R; ++r) {
    const V h = S::bcast(H + r);
    VF_UNROLL
    for (int g = 0; g < G; ++g) acc[r][g] = h;
  }
  for (int64_t p = 0; p < P; ++p) {
    V zv[G];
    VF_UNROLL
    for (int g = 0; g < G; ++g) zv[g] = S::load(zt + p * ld + g * W);
    VF_UNROLL
    for (int r = 0; r < R; ++r) {
      const V ec = S::bcast(e + r * P + p);
      VF_UNROLL
      for (int g = 0; g < G; ++g) acc[r][g] = S::madd(acc[r][g], ec, zv[g]);
    }
  }
  // Most tiles keep nothing: the tile's minimum against the threshold is all they cost.
  VF_UNROLL
  for (int g = 0; g < G; ++g) {
    V m = acc[0][g];
    VF_UNROLL
    for (int r = 1; r < R; ++r) m = S::min(acc[r][g], m);
    const int64_t tg = t0 + g * W;
    unsigned lanes = S::le_mask(m, S::load(thr + tg));
    if (lanes == 0) continue;
    alignas(64) int32_t buf[R * W];
    VF_UNROLL
    for (int r = 0; r < R; ++r) S::store(buf + r * W, acc[r][g]);
    for (; lanes != 0; lanes &= lanes - 1) {
      const int l = __builtin_ctz(lanes);
      screen_lane<R>(buf + l, W, v, tg + l, best, thr, marg, L);
    }
  }
}

template <class S, int R, int G>
struct ScreenTail {
  static inline void run(int rem, const int32_t* zt, int64_t ld, const int32_t* e,
                         const int32_t* H, int64_t P, int64_t v, int64_t t0, int32_t* best,
                         int32_t* thr, const int32_t* marg, ScreenLists& L) {
    if (rem == R)
      screen_tile<S, R, G>(zt, ld, e, H, P, v, t0, best, thr, marg, L);
    else
      ScreenTail<S, R - 1, G>::run(rem, zt, ld, e, H, P, v, t0, best, thr, marg, L);
  }
};
template <class S, int G>
struct ScreenTail<S, 0, G> {
  static inline void run(int, const int32_t*, int64_t, const int32_t*, const int32_t*, int64_t,
                         int64_t, int64_t, int32_t*, int32_t*, const int32_t*, ScreenLists&) {}
};

template <class S, int R, int G>
inline void screen_pass(const int32_t* zt, int64_t ld, const int32_t* Eq, const int32_t* H,
                        int64_t P, int64_t v0, int64_t v1, int64_t t0, int32_t* best,
                        int32_t* thr, const int32_t* marg, ScreenLists& L) {
  int64_t v = v0;
  for (; v + R <= v1; v += R)
    screen_tile<S, R, G>(zt, ld, Eq + v * P, H + v, P, v, t0, best, thr, marg, L);
  if (v < v1)
    ScreenTail<S, R - 1, G>::run(static_cast<int>(v1 - v), zt, ld, Eq + v * P, H + v, P, v, t0,
                                 best, thr, marg, L);
}

// The ScreenFn of vq_lookup_isa.h: codes [v0, v1) in chunks of about chunk_bytes, each swept
// over the whole token block (full panels of G*W tokens, then single vectors of the last one).
template <class S, int R, int G, int RT, int chunk_bytes>
void screen(const int32_t* zt, int64_t ld, const int32_t* Eq, const int32_t* H, int64_t P,
            int64_t v0, int64_t v1, int32_t* best, int32_t* thr, const int32_t* marg,
            ScreenLists* lists) {
  constexpr int W = S::W, L = G * W;
  ScreenLists& ls = *lists;
  int64_t chunk = chunk_bytes / 4 / (P > 0 ? P : 1);
  chunk = chunk < R ? R : chunk / R * R;
  const int64_t full = ld / L * L, rest = ld - full;
  for (int64_t vc = v0; vc < v1; vc += chunk) {
    const int64_t ve = vc + chunk < v1 ? vc + chunk : v1;
    for (int64_t l0 = 0; l0 < full; l0 += L)
      screen_pass<S, R, G>(zt + l0 * P, L, Eq, H, P, vc, ve, l0, best, thr, marg, ls);
    for (int64_t j = 0; j < rest; j += W)
      screen_pass<S, RT, 1>(zt + full * P + j, rest, Eq, H, P, vc, ve, full + j, best, thr,
                            marg, ls);
  }
}

// The RescoreFn of vq_lookup_isa.h: the float32 minimum of hs[v] - <z, e_v> over the n kept
// codes (increasing) whose score is at most `limit`, computed as the float32 tile computes it
// (start at hs[v], one fused z[c] * e_v[c] subtraction per channel in order); strict '<', so the
// lowest index wins ties. Returns the minimum in *best and its code in *bidx (unchanged if no
// code qualifies).
inline void rescore(const float* z, const float* E, const float* hs, int64_t C,
                    const int32_t* codes, const int32_t* vals, int32_t n, int64_t limit,
                    float* best, int32_t* bidx) {
  for (int32_t j = 0; j < n; ++j) {
    if (vals[j] > limit) continue;
    const int32_t v = codes[j];
    const float* e = E + static_cast<int64_t>(v) * C;
    float acc = hs[v];
    for (int64_t c = 0; c < C; ++c) acc = __builtin_fmaf(-e[c], z[c], acc);
    if (acc < *best) { *best = acc; *bidx = v; }
  }
}
