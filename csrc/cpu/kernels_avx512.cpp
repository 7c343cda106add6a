// AVX-512F variant: 16 floats per compare straight into a mask register; channel sums keep the
// 32 float64 lanes of bitpack.h in four 8-wide registers.
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,f16c")
#endif

namespace fakespotter::cpu {
namespace {

struct Avx512Kernel {
  template <DType D>
  static __m512 load16(const void* x, int64_t i) {
    if constexpr (D == DType::Float32) {
      return _mm512_loadu_ps(static_cast<const float*>(x) + i);
    } else {
      const __m256i h = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
      if constexpr (D == DType::Float16) {
        return _mm512_cvtph_ps(h);
      } else {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
    }
  }

  template <DType D>
  static uint64_t pack64(const void* x, int64_t i, const float* thr, float t) {
    const __m512 tb = _mm512_set1_ps(t);
    uint64_t bits = 0;
    for (int k = 0; k < 4; ++k) {
      const __m512 v = load16<D>(x, i + 16 * k);
      const __m512 tk = thr ? _mm512_loadu_ps(thr + 16 * k) : tb;
      const uint64_t m = static_cast<uint16_t>(_mm512_cmp_ps_mask(v, tk, _CMP_GT_OQ));
      bits |= m << (16 * k);
    }
    return bits;
  }

  template <DType D>
  static double channel_sum(const void* x, int64_t i, int64_t n);

  // R blocks of 8 outputs: 16-lane registers hold two blocks each (an odd block is masked).
};

}  // namespace
}  // namespace fakespotter::cpu

#include "pack_driver.h"

namespace fakespotter::cpu {
namespace {

// Adds one block of 32 elements to the lanes; acc[j] holds lanes 8j .. 8j + 7.
template <DType D>
inline void add_block(__m512d* acc, const void* x, int64_t i) {
  for (int k = 0; k < 2; ++k) {
    const __m512 v = Avx512Kernel::load16<D>(x, i + 16 * k);
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    acc[2 * k] = _mm512_add_pd(acc[2 * k], _mm512_cvtps_pd(lo));
    acc[2 * k + 1] = _mm512_add_pd(acc[2 * k + 1], _mm512_cvtps_pd(hi));
  }
}

template <DType D>
double Avx512Kernel::channel_sum(const void* x, int64_t i, int64_t n) {
  __m512d acc[4];
  for (auto& a : acc) a = _mm512_setzero_pd();
  int64_t s = 0;
  for (; s + kSumLanes <= n; s += kSumLanes) add_block<D>(acc, x, i + s);
  if (s < n) {
    const TailBlock<D> tail(x, i, s, n);
    add_block<D>(acc, tail.data, 0);
  }
  // Fold by halves: lanes l += l + 16, + 8 (whole registers), then + 4, + 2 and + 1.
  for (int j = 0; j < 2; ++j) acc[j] = _mm512_add_pd(acc[j], acc[j + 2]);
  const __m512d a = _mm512_add_pd(acc[0], acc[1]);
  const __m256d b = _mm256_add_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd(a, 1));
  const __m128d c = _mm_add_pd(_mm256_castpd256_pd128(b), _mm256_extractf128_pd(b, 1));
  return _mm_cvtsd_f64(_mm_add_sd(c, _mm_unpackhi_pd(c, c)));
}

}  // namespace

void pack_avx512(const PackProblem& p, int64_t begin, int64_t end) {
  pack_units<Avx512Kernel>(p, begin, end);
}

void linear_avx512(const LinearProblem& p, int64_t begin, int64_t end) {
  linear_rows(p, begin, end);
}

}  // namespace fakespotter::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: the variant exists but is never selected

namespace fakespotter::cpu {
void pack_avx512(const PackProblem& p, int64_t begin, int64_t end) { pack_scalar(p, begin, end); }
void linear_avx512(const LinearProblem& p, int64_t begin, int64_t end) { linear_scalar(p, begin, end); }
}  // namespace fakespotter::cpu

#endif
