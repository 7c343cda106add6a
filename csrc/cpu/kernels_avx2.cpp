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
  static float load(const void* x, int64_t i) {
    return load_float(x, i, D);
  }

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
};

}  // namespace
}  // namespace fakespotter::cpu

#include "pack_driver.h"

namespace fakespotter::cpu {
namespace {

template <DType D>
double Avx2Kernel::channel_sum(const void* x, int64_t i, int64_t n) {
  // acc[j] holds lanes 4j .. 4j + 3.
  __m256d acc[8];
  for (auto& a : acc) a = _mm256_setzero_pd();
  int64_t s = 0;
  for (; s + kSumLanes <= n; s += kSumLanes) {
    for (int k = 0; k < 4; ++k) {
      const __m256 v = load8<D>(x, i + s + 8 * k);
      acc[2 * k] = _mm256_add_pd(acc[2 * k], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
      acc[2 * k + 1] = _mm256_add_pd(acc[2 * k + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
  }
  alignas(32) double lanes[kSumLanes];
  for (int j = 0; j < 8; ++j) _mm256_store_pd(lanes + 4 * j, acc[j]);
  return finish_channel_sum<Avx2Kernel, D>(lanes, x, i, s, n);
}

}  // namespace

void pack_avx2(const PackProblem& p, int64_t begin, int64_t end) {
  pack_units<Avx2Kernel>(p, begin, end);
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
}  // namespace fakespotter::cpu

#endif
