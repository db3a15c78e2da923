// Inner kernel of the CPU VQ lookup, written once against a small vector-traits class `A` and
// compiled once per ISA: each vq_lookup_<isa>.cpp includes this file inside its own namespace,
// after its system headers and its target pragma, and after defining the traits. No includes
// here, and nothing outside that namespace, so every function exists once per ISA.
//
// Traits `A` provide: T (float/double), I (int32/int64 lane index), V (vector of T), M (compare
// mask), W (lanes), and
//   load(const T*) / store(T*, V)       unaligned vector load / store
//   bcast(const T*)                      one T in every lane
//   fnmadd(a, b, c) = c - a * b          (fused where the ISA has FMA)
//   lt(a, b) -> M                        a < b, per lane (false for NaN)
//   min(a, b) = lt(a, b) ? a : b
//   iload(const I*) / istore(I*, V) / ibcast(const I*)   index lanes, held as bits in a V
//   select(M m, V a, V b) = m ? a : b    bitwise
//   any(M m)                             whether any lane is set
//
// Register tile: R codes x G vectors of tokens (R*G accumulators). Accumulators start at
// hs[v] = |e_v|^2 / 2 and take  - e_v[c] * z[c]  per channel, so the tile ends holding
// hs[v] - <z, e_v>, which orders codes exactly as VAR's distance (|z|^2 + |e_v|^2) - 2 <z, e_v>
// does for a fixed token; the running (min, index) is then three vector ops per accumulator.

#ifndef VF_UNROLL
#define VF_UNROLL _Pragma("GCC unroll 32")
#endif

template <class A, int R, int G>
inline __attribute__((always_inline)) void tile(const typename A::T* zt, int64_t ld,
                                                const typename A::T* e,
                                                const typename A::T* hs,
                                                const typename A::I* ids, int64_t C,
                                                typename A::T* best, typename A::I* bidx) {
  using V = typename A::V;
  using M = typename A::M;
  constexpr int W = A::W;
  V acc[R][G];
  VF_UNROLL
  for (int r = 0; r < R; ++r) {
    const V h = A::bcast(hs + r);
    VF_UNROLL
    for (int g = 0; g < G; ++g) acc[r][g] = h;
  }
  for (int64_t c = 0; c < C; ++c) {
    const typename A::T* zc = zt + c * ld;
    V zv[G];
    VF_UNROLL
    for (int g = 0; g < G; ++g) zv[g] = A::load(zc + g * W);
    VF_UNROLL
    for (int r = 0; r < R; ++r) {
      const V ec = A::bcast(e + r * C + c);
      VF_UNROLL
      for (int g = 0; g < G; ++g) acc[r][g] = A::fnmadd(ec, zv[g], acc[r][g]);
    }
  }
  // Codes in increasing order and a strict '<': the lowest index wins ties. Most tiles hold no
  // new minimum for any lane once a few hundred codes have passed: then the tile's minimum
  // (R - 1 vector mins and one compare) is all it costs.
  VF_UNROLL
  for (int g = 0; g < G; ++g) {
    V b = A::load(best + g * W);
    V m = acc[0][g];
    VF_UNROLL
    for (int r = 1; r < R; ++r) m = A::min(acc[r][g], m);
    if (!A::any(A::lt(m, b))) continue;
    V bi = A::iload(bidx + g * W);
    VF_UNROLL
    for (int r = 0; r < R; ++r) {
      const M m = A::lt(acc[r][g], b);
      b = A::min(acc[r][g], b);
      bi = A::select(m, A::ibcast(ids + r), bi);
    }
    A::store(best + g * W, b);
    A::istore(bidx + g * W, bi);
  }
}

// The last rem < R codes of a range: a tile of exactly rem codes.
template <class A, int R, int G>
struct TailTile {
  static inline void run(int rem, const typename A::T* zt, int64_t ld, const typename A::T* e,
                         const typename A::T* hs, const typename A::I* ids, int64_t C,
                         typename A::T* best, typename A::I* bidx) {
    if (rem == R)
      tile<A, R, G>(zt, ld, e, hs, ids, C, best, bidx);
    else
      TailTile<A, R - 1, G>::run(rem, zt, ld, e, hs, ids, C, best, bidx);
  }
};
template <class A, int G>
struct TailTile<A, 0, G> {
  static inline void run(int, const typename A::T*, int64_t, const typename A::T*,
                         const typename A::T*, const typename A::I*, int64_t,
                         typename A::T*, typename A::I*) {}
};

// Codes [v0, v1) against tokens [l0, l0 + G*W) of the block, R codes per tile.
template <class A, int R, int G>
inline void codes_pass(const typename A::T* zt, int64_t ld, const typename A::T* E,
                       const typename A::T* hs, const typename A::I* ids, int64_t C,
                       int64_t v0, int64_t v1, typename A::T* best, typename A::I* bidx) {
  int64_t v = v0;
  for (; v + R <= v1; v += R) tile<A, R, G>(zt, ld, E + v * C, hs + v, ids + v, C, best, bidx);
  if (v < v1)
    TailTile<A, R - 1, G>::run(static_cast<int>(v1 - v), zt, ld, E + v * C, hs + v, ids + v,
                               C, best, bidx);
}

// The ScanFn of vq_lookup_isa.h: tiles of R codes x G*W tokens over the block's full panels,
// then single vectors of tokens over the last, narrower panel (ld is a multiple of W), the codes
// streamed in chunks of about `chunk_bytes`, each chunk swept over the whole token block while
// it stays in L1. zt holds panels of L = G*W tokens one after the other, each [C][L] (the last
// one [C][ld mod L]), so that a tile's token rows are contiguous.
template <class A, int R, int G, int RT, int chunk_bytes>
void scan(const typename A::T* zt, int64_t ld, const typename A::T* E,
          const typename A::T* hs, const typename A::I* ids, int64_t C, int64_t v0,
          int64_t v1, typename A::T* best, typename A::I* bidx) {
  constexpr int W = A::W, L = G * W;
  int64_t chunk = chunk_bytes / static_cast<int64_t>(sizeof(typename A::T)) / (C > 0 ? C : 1);
  chunk = chunk < R ? R : chunk / R * R;
  const int64_t full = ld / L * L, rest = ld - full;
  for (int64_t vc = v0; vc < v1; vc += chunk) {
    const int64_t ve = vc + chunk < v1 ? vc + chunk : v1;
    for (int64_t l0 = 0; l0 < full; l0 += L)
      codes_pass<A, R, G>(zt + l0 * C, L, E, hs, ids, C, vc, ve, best + l0, bidx + l0);
    for (int64_t j = 0; j < rest; j += W)
      codes_pass<A, RT, 1>(zt + full * C + j, rest, E, hs, ids, C, vc, ve, best + full + j,
                           bidx + full + j);
  }
}
