// The int32 ymm lanes of the integer screening (vq_screen_kernel.h) shared by the avx2 and
// avx2 + AVX-VNNI variants: everything but the multiply-add, which each variant defines in its
// S32 (derived from this). Included inside a variant's namespace and target region.
struct S32Ymm {
  using V = __m256i;
  static constexpr int W = 8;
  static inline V load(const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static inline void store(int32_t* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
  static inline V bcast(const int32_t* p) { return _mm256_set1_epi32(*p); }
  static inline V min(V a, V b) { return _mm256_min_epi32(a, b); }
  static inline unsigned le_mask(V a, V b) {
    const __m256i gt = _mm256_cmpgt_epi32(a, b);
    return ~static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(gt))) & 0xFFu;
  }
};
