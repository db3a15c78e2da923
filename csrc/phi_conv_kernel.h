// Inner kernel of the quantizer's φ step on CPU (float32), compiled once per ISA like
// vq_lookup_kernel.h: each vq_lookup_<isa>.cpp includes it inside its own namespace after its
// traits `A` (load, store, bcast, fmadd(a, b, c) = a * b + c, W lanes). No includes here.
//
// One block of output rows of one image, channels last (C a multiple of A::W):
//   pad   the block's input rows with a zero halo, [rows + 2][Wd + 2][C]
//   wp    the 3x3 weights repacked [ky][kx][ci][co]
//   conv  = bias + sum over taps and ci of pad * wp          (the 3x3 convolution, padding 1)
//   p     = keep * h + mix * conv                            (φ: keep = 1 - r, mix = r)
//   out = p;  fhat += p;  frest -= p                         (h, out, fhat, frest [rows][Wd][C])
// Register tile: R pixels x G vectors of output channels; the weights of a tile's channels are
// loaded once per (tap, ci) and each input value is broadcast once per tile.

template <class A, int R, int G>
inline __attribute__((always_inline)) void phi_tile(const float* pad, int64_t ldp,
                                                    const float* wp, const float* bias,
                                                    int64_t C, int64_t co0, float keep,
                                                    float mix, int64_t off, const float* h,
                                                    float* out, float* fhat, float* frest) {
  using V = typename A::V;
  constexpr int W = A::W;
  V acc[R][G];
  VF_UNROLL
  for (int g = 0; g < G; ++g) {
    const V b = A::load(bias + co0 + g * W);
    VF_UNROLL
    for (int r = 0; r < R; ++r) acc[r][g] = b;
  }
  for (int t = 0; t < 9; ++t) {
    const float* in = pad + (t / 3) * ldp + (t % 3) * C;
    const float* wt = wp + t * C * C + co0;
    for (int64_t ci = 0; ci < C; ++ci) {
      V w[G];
      VF_UNROLL
      for (int g = 0; g < G; ++g) w[g] = A::load(wt + ci * C + g * W);
      VF_UNROLL
      for (int r = 0; r < R; ++r) {
        const V a = A::bcast(in + r * C + ci);
        VF_UNROLL
        for (int g = 0; g < G; ++g) acc[r][g] = A::fmadd(a, w[g], acc[r][g]);
      }
    }
  }
  const V vk = A::bcast(&keep), vm = A::bcast(&mix);
  VF_UNROLL
  for (int r = 0; r < R; ++r) {
    VF_UNROLL
    for (int g = 0; g < G; ++g) {
      const int64_t o = off + r * C + co0 + g * W;
      const V p = A::fmadd(vm, acc[r][g], A::load(h + o) * vk);
      A::store(out + o, p);
      A::store(fhat + o, A::load(fhat + o) + p);
      A::store(frest + o, A::load(frest + o) - p);
    }
  }
}

// A tile of exactly n <= R pixels.
template <class A, int R, int G>
struct PhiTail {
  static inline void run(int n, const float* pad, int64_t ldp, const float* wp,
                         const float* bias, int64_t C, int64_t co0, float keep, float mix,
                         int64_t off, const float* h, float* out, float* fhat, float* frest) {
    if (n == R)
      phi_tile<A, R, G>(pad, ldp, wp, bias, C, co0, keep, mix, off, h, out, fhat, frest);
    else
      PhiTail<A, R - 1, G>::run(n, pad, ldp, wp, bias, C, co0, keep, mix, off, h, out, fhat,
                                frest);
  }
};
template <class A, int G>
struct PhiTail<A, 0, G> {
  static inline void run(int, const float*, int64_t, const float*, const float*, int64_t,
                         int64_t, float, float, int64_t, const float*, float*, float*, float*) {}
};

// The PhiFn of vq_lookup_isa.h.
template <class A, int R, int G>
void phi_rows(const float* pad, int64_t rows, int64_t Wd, int64_t C, const float* wp,
              const float* bias, float keep, float mix, const float* h, float* out,
              float* fhat, float* frest) {
  constexpr int W = A::W;
  const int64_t ldp = (Wd + 2) * C;
  for (int64_t y = 0; y < rows; ++y) {
    const float* prow = pad + y * ldp;
    int64_t co0 = 0;
    for (; co0 + G * W <= C; co0 += G * W)
      for (int64_t x = 0; x < Wd; x += R)
        PhiTail<A, R, G>::run(static_cast<int>(Wd - x < R ? Wd - x : R), prow + x * C, ldp, wp,
                              bias, C, co0, keep, mix, (y * Wd + x) * C, h, out, fhat, frest);
    for (; co0 < C; co0 += W)  // channels left over: one vector at a time
      for (int64_t x = 0; x < Wd; x += R)
        PhiTail<A, R, 1>::run(static_cast<int>(Wd - x < R ? Wd - x : R), prow + x * C, ldp, wp,
                              bias, C, co0, keep, mix, (y * Wd + x) * C, h, out, fhat, frest);
  }
}
