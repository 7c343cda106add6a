// The loop over work units shared by the CPU variants. A variant includes this after switching
// on its target instructions and provides a kernel struct K with
//   template <DType D> static uint64_t pack64(const void* x, int64_t i, const float* thr, float t);
//       bits of x[i .. i + 63] > (thr ? thr[0 .. 63] : t)
//   template <DType D> static double channel_sum(const void* x, int64_t i, int64_t n);
//       sum of x[i .. i + n - 1] in float64, in the lane order of bitpack.h (n may be 0)
// Everything here has internal linkage, so code built for one instruction set never stands in
// for another's at link time.
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "../bitpack.h"

namespace fakespotter::cpu {
namespace {

template <class K, DType D>
void pack_units_typed(const PackProblem& p, int64_t begin, int64_t end) {
  const Layout& L = p.layout;
  // A feature is one element (element granularity, or a channel with one element).
  const bool direct = p.granularity == Granularity::Element || L.spatial == 1;
  const int64_t full_words = p.features / kWordBits;  // words whose 64 features all exist
  const float t0 = p.features > 0 ? p.thresholds[0] : 0.0f;
  for (int64_t u = begin; u < end;) {  // one run of words of one row per iteration
    const int64_t row = u / p.words;
    const int64_t first_word = u % p.words;
    const int64_t end_word = std::min(p.words, first_word + (end - u));
    const int64_t base = row * L.row_stride;
    uint64_t* out = p.out + row * p.out_row_stride;
    int64_t w = first_word;
    if (direct && L.row_contiguous) {
      const int64_t fast_end = std::min(end_word, full_words);
      if (p.per_neuron) {
        for (; w < fast_end; ++w) {
          out[w] = K::template pack64<D>(p.x, base + w * kWordBits, p.thresholds + w * kWordBits, t0);
        }
      } else {
        for (; w < fast_end; ++w) out[w] = K::template pack64<D>(p.x, base + w * kWordBits, nullptr, t0);
      }
    } else if (!direct && L.spatial_contiguous) {
      for (; w < end_word; ++w) {
        const int64_t first = w * kWordBits;
        const int64_t count = std::min<int64_t>(kWordBits, p.features - first);
        uint64_t bits = 0;
        for (int64_t k = 0; k < count; ++k) {
          const int64_t c = first + k;
          const double sum = K::template channel_sum<D>(p.x, base + c * L.channel_stride, L.spatial);
          bits |= activation_bit(channel_mean(sum, L.spatial), p.threshold(c)) << k;
        }
        out[w] = bits;
      }
    }
    for (; w < end_word; ++w) out[w] = pack_word_generic(p, row, w);  // any other layout, tails
    u += end_word - first_word;
  }
}

template <class K>
void pack_units(const PackProblem& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case DType::Float16:
      return pack_units_typed<K, DType::Float16>(p, begin, end);
    case DType::BFloat16:
      return pack_units_typed<K, DType::BFloat16>(p, begin, end);
    default:
      return pack_units_typed<K, DType::Float32>(p, begin, end);
  }
}

// The last n - from (< 32) elements of a channel, copied into a zero-filled block of 32 so that
// SIMD variants can add it like a full block: adding +0.0 leaves every lane sum unchanged (a lane
// starts at +0.0 and can never become -0.0).
template <DType D>
struct TailBlock {
  using Elem = std::conditional_t<D == DType::Float32, float, uint16_t>;
  alignas(64) Elem data[kSumLanes];
  TailBlock(const void* x, int64_t i, int64_t from, int64_t n) {
    std::memset(data, 0, sizeof(data));
    std::memcpy(data, static_cast<const Elem*>(x) + i + from, (n - from) * sizeof(Elem));
  }
};

// bitset_linear rows. K provides
//   template <int R> static void linear_block(const LinearProblem& p, const uint64_t* row,
//                                             int64_t o0, uint32_t* acc);
//       acc[0 .. 8R) = accumulators of outputs o0 .. o0 + 8R - 1 (R SIMD registers of 8 lanes)
template <class K>
void linear_rows(const LinearProblem& p, int64_t begin, int64_t end) {
  uint32_t acc[64];
  for (int64_t r = begin; r < end; ++r) {
    const uint64_t* row = p.packed + r * p.row_stride;
    float* out = p.out + r * p.outputs;
    int64_t o0 = 0;
    for (; o0 + 64 <= p.outputs; o0 += 64) {
      K::template linear_block<8>(p, row, o0, acc);
      for (int k = 0; k < 64; ++k) out[o0 + k] = linear_output(p, acc[k], o0 + k);
    }
    for (; o0 + 8 <= p.outputs; o0 += 8) {
      K::template linear_block<1>(p, row, o0, acc);
      for (int k = 0; k < 8; ++k) out[o0 + k] = linear_output(p, acc[k], o0 + k);
    }
    for (; o0 < p.outputs; ++o0) out[o0] = linear_output(p, linear_acc_generic(p, row, o0), o0);
  }
}

}  // namespace
}  // namespace fakespotter::cpu
