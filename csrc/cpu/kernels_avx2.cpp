// AVX2 variant (plus F16C for float16): 8 floats per compare, movemask -> 8 bits; channel sums
// keep the 32 float64 lanes of bitpack.h in eight 4-wide registers.
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif

namespace fakespotter::cpu {
namespace {

struct Avx2Kernel {
  template <DType D>
  static __m256 load8(const void* x, int64_t i) {
    if constexpr (D == DType::Float32) {
      return _mm256_loadu_ps(static_cast<const float*>(x) + i);
    } else {
      const __m128i h = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
      if constexpr (D == DType::Float16) {
        return _mm256_cvtph_ps(h);
      } else {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      }
    }
  }

  template <DType D>
  static uint64_t pack64(const void* x, int64_t i, const float* thr, float t) {
    const __m256 tb = _mm256_set1_ps(t);
    uint64_t bits = 0;
    for (int k = 0; k < 8; ++k) {
      const __m256 v = load8<D>(x, i + 8 * k);
      const __m256 tk = thr ? _mm256_loadu_ps(thr + 8 * k) : tb;
      const uint64_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, tk, _CMP_GT_OQ)));
      bits |= m << (8 * k);
    }
    return bits;
  }

  template <DType D>
  static double channel_sum(const void* x, int64_t i, int64_t n);

  // R registers of 8 int32 lanes for AVX2; AVX-512 holds the same 8R outputs in half as many.
};

}  // namespace
}  // namespace fakespotter::cpu

#include "pack_driver.h"

namespace fakespotter::cpu {
namespace {

// Adds one block of 32 elements to the lanes; acc[j] holds lanes 4j .. 4j + 3.
template <DType D>
inline void add_block(__m256d* acc, const void* x, int64_t i) {
  for (int k = 0; k < 4; ++k) {
    const __m256 v = Avx2Kernel::load8<D>(x, i + 8 * k);
    acc[2 * k] = _mm256_add_pd(acc[2 * k], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    acc[2 * k + 1] = _mm256_add_pd(acc[2 * k + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
}

template <DType D>
double Avx2Kernel::channel_sum(const void* x, int64_t i, int64_t n) {
  __m256d acc[8];
  for (auto& a : acc) a = _mm256_setzero_pd();
  int64_t s = 0;
  for (; s + kSumLanes <= n; s += kSumLanes) add_block<D>(acc, x, i + s);
  if (s < n) {
    if constexpr (D == DType::Float32) {  // masked loads read zeros past the end
      const float* p = static_cast<const float*>(x) + i + s;
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int k = 0; k < 4; ++k) {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - s) - 8 * k), lane);
        const __m256 v = _mm256_maskload_ps(p + 8 * k, mask);
        acc[2 * k] = _mm256_add_pd(acc[2 * k], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        acc[2 * k + 1] = _mm256_add_pd(acc[2 * k + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
      }
    } else {
      const TailBlock<D> tail(x, i, s, n);
      add_block<D>(acc, tail.data, 0);
    }
  }
  // Fold by halves: lanes l += l + 16, + 8, + 4 (whole registers), then + 2 and + 1.
  for (int j = 0; j < 4; ++j) acc[j] = _mm256_add_pd(acc[j], acc[j + 4]);
  for (int j = 0; j < 2; ++j) acc[j] = _mm256_add_pd(acc[j], acc[j + 2]);
  const __m256d a = _mm256_add_pd(acc[0], acc[1]);
  const __m128d b = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(b, _mm_unpackhi_pd(b, b)));
}

}  // namespace

void pack_avx2(const PackProblem& p, int64_t begin, int64_t end) {
  pack_units<Avx2Kernel>(p, begin, end);
}

void linear_avx2(const LinearProblem& p, int64_t begin, int64_t end) {
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
void pack_avx2(const PackProblem& p, int64_t begin, int64_t end) { pack_scalar(p, begin, end); }
void linear_avx2(const LinearProblem& p, int64_t begin, int64_t end) { linear_scalar(p, begin, end); }
}  // namespace fakespotter::cpu

#endif
