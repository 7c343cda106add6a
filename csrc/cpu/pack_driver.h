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
#include <vector>

#include "../bitpack.h"

namespace fakespotter::cpu {
namespace {

template <DType D>
inline float load_typed(const void* x, int64_t i) {
  if constexpr (D == DType::Float32) {
    return static_cast<const float*>(x)[i];
  } else {
    return load_float(x, i, D);
  }
}

// Channel granularity when channels are innermost in memory (channels_last): the 64 channels of
// a word are read together, one spatial position at a time, into 32 x 64 float64 lanes (16 KB,
// in L1); folding the lanes by halves across all 64 channels at once keeps the order of
// bitpack.h for each channel. Plain loops: each variant's target vectorizes them.
template <DType D>
uint64_t channels_innermost_word(const PackProblem& p, int64_t base, int64_t word) {
  const Layout& L = p.layout;
  const int64_t c0 = word * kWordBits;
  const int64_t count = std::min<int64_t>(kWordBits, p.features - c0);
  alignas(64) double lanes[kSumLanes][kWordBits];
  for (auto& lane : lanes) std::fill(lane, lane + kWordBits, 0.0);
  for (int64_t s = 0; s < L.spatial; ++s) {
    double* acc = lanes[s % kSumLanes];
    const int64_t at = base + c0 + L.spatial_offset(s);
    for (int64_t k = 0; k < count; ++k) acc[k] += static_cast<double>(load_typed<D>(p.x, at + k));
  }
  for (int half = kSumLanes / 2; half >= 1; half /= 2) {
    for (int l = 0; l < half; ++l) {
      for (int64_t k = 0; k < count; ++k) lanes[l][k] += lanes[l + half][k];
    }
  }
  uint64_t bits = 0;
  for (int64_t k = 0; k < count; ++k) {
    bits |= activation_bit(channel_mean(lanes[0][k], L.spatial), p.threshold(c0 + k)) << k;
  }
  return bits;
}

// Element granularity with at most one (merged) spatial stride, e.g. channels_last: walks
// (channel, position) incrementally instead of decomposing every feature index.
template <DType D>
uint64_t strided_word(const PackProblem& p, int64_t base, int64_t word) {
  const Layout& L = p.layout;
  const int64_t first = word * kWordBits;
  const int64_t count = std::min<int64_t>(kWordBits, p.features - first);
  const int64_t sstride = L.spatial_dims == 1 ? L.spatial_stride[0] : 0;
  int64_t c = first / L.spatial;
  int64_t s = first % L.spatial;
  uint64_t bits = 0;
  for (int64_t k = 0; k < count; ++k) {
    const float v = load_typed<D>(p.x, base + c * L.channel_stride + s * sstride);
    bits |= activation_bit(v, p.threshold(first + k)) << k;
    if (++s == L.spatial) {
      s = 0;
      ++c;
    }
  }
  return bits;
}

// Element granularity when channels are innermost in memory (channels_last) and spread over a
// run of words of one row: walking the words feature by feature would read one float per
// cache line. Instead the elements are read in memory order, all the run's channels at each
// spatial position, and every compare sets bit s % 64 of word s / 64 of its channel's bit
// stream (scratch, [spatial word][channel]: the words written at one position are adjacent);
// the output words are then cut from the channels' streams laid end to end (feature c * S + s).
inline uint64_t stream_bits(const uint64_t* streams, int64_t channels, int64_t k, int64_t s, int64_t n) {
  // bits s .. s + n - 1 (n <= 64, all within the stream) of channel k's stream
  const int64_t word = s / kWordBits;
  const int shift = static_cast<int>(s % kWordBits);
  uint64_t v = streams[word * channels + k] >> shift;
  if (shift != 0 && shift + n > kWordBits) v |= streams[(word + 1) * channels + k] << (kWordBits - shift);
  return n == kWordBits ? v : v & ((uint64_t{1} << n) - 1);
}

template <DType D>
void channels_innermost_elements(const PackProblem& p, int64_t base, uint64_t* out, int64_t first_word,
                                 int64_t end_word) {
  const Layout& L = p.layout;
  const int64_t S = L.spatial;
  const int64_t f0 = first_word * kWordBits;
  const int64_t f1 = std::min(end_word * kWordBits, p.features);
  const int64_t c0 = f0 / S;
  const int64_t nc = (f1 - 1) / S + 1 - c0;
  const int64_t lo = f0 - c0 * S;             // the first channel's features start at s = lo,
  const int64_t hi = f1 - (c0 + nc - 1) * S;  // the last channel's end before s = hi
  thread_local std::vector<uint64_t> scratch;
  scratch.assign(static_cast<size_t>(words_for(S) * nc), 0);
  uint64_t* streams = scratch.data();
  const float t = p.thresholds[0];
  for (int64_t s = nc == 1 ? lo : 0; s < (nc == 1 ? hi : S); ++s) {
    const int64_t k0 = s < lo ? 1 : 0;
    const int64_t k1 = s >= hi ? nc - 1 : nc;
    const int64_t at = base + L.spatial_offset(s) + c0;  // channel_stride == 1
    uint64_t* word = streams + (s / kWordBits) * nc;
    const int shift = static_cast<int>(s % kWordBits);
    if (p.per_neuron) {
      const float* thr = p.thresholds + c0 * S + s;
      for (int64_t k = k0; k < k1; ++k) word[k] |= activation_bit(load_typed<D>(p.x, at + k), thr[k * S]) << shift;
    } else {
      for (int64_t k = k0; k < k1; ++k) word[k] |= activation_bit(load_typed<D>(p.x, at + k), t) << shift;
    }
  }
  for (int64_t w = first_word; w < end_word; ++w) {
    const int64_t first = w * kWordBits;
    const int64_t count = std::min<int64_t>(kWordBits, p.features - first);
    uint64_t bits = 0;
    for (int64_t got = 0; got < count;) {  // a word may span several channels
      const int64_t f = first + got;
      const int64_t n = std::min(count - got, S - f % S);
      bits |= stream_bits(streams, nc, f / S - c0, f % S, n) << got;
      got += n;
    }
    out[w] = bits;
  }
}

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
    } else if (!direct && L.channel_stride == 1) {
      for (; w < end_word; ++w) out[w] = channels_innermost_word<D>(p, base, w);
    } else if (direct && L.channel_stride == 1 && L.spatial > 1) {
      channels_innermost_elements<D>(p, base, out, w, end_word);
      w = end_word;
    } else if (direct && L.spatial_dims <= 1) {
      for (; w < end_word; ++w) out[w] = strided_word<D>(p, base, w);
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

// bitset_linear over rows [begin, end), in blocks of up to kLinearRows rows x kLinearOutputs
// outputs: for each group g the block's rows add table[g][their nibble] into accumulators that
// stay in L1,
// so a group's 16 table rows are fetched once per block of rows, not once per row. Plain loops:
// each variant's compiler target vectorizes them (the adds wrap like the CUDA and twin sums).
constexpr int64_t kLinearRows = 64;
constexpr int64_t kLinearOutputs = 64;

template <int64_t kFixed>  // kFixed > 0: every block has exactly kFixed outputs
inline void linear_block(const LinearProblem& p, int64_t r0, int64_t nr, int64_t o0, int64_t no,
                         uint32_t* acc) {
  const int64_t width = kFixed > 0 ? kFixed : no;  // also the row stride of acc
  const int64_t gstride = 16 * p.outputs;
  for (int64_t k = 0; k < nr * width; ++k) acc[k] = 0;
  int64_t g = 0;
  // Four groups (16 bits of a word) per visit of a row's accumulators: a quarter of the
  // accumulator traffic; the four groups' tables (4 x 16 rows) stay in L1 for the whole block.
  for (; g + 4 <= p.groups; g += 4) {
    const int32_t* tg = p.table + g * gstride + o0;
    const uint64_t* words = p.packed + r0 * p.row_stride + g / 16;
    const int shift = static_cast<int>(4 * (g % 16));
    for (int64_t r = 0; r < nr; ++r) {
      const uint64_t bits = words[r * p.row_stride] >> shift;
      const int32_t* t0 = tg + static_cast<int64_t>(bits & 15u) * p.outputs;
      const int32_t* t1 = tg + gstride + static_cast<int64_t>((bits >> 4) & 15u) * p.outputs;
      const int32_t* t2 = tg + 2 * gstride + static_cast<int64_t>((bits >> 8) & 15u) * p.outputs;
      const int32_t* t3 = tg + 3 * gstride + static_cast<int64_t>((bits >> 12) & 15u) * p.outputs;
      uint32_t* a = acc + r * width;
      for (int64_t k = 0; k < width; ++k) {
        a[k] += (static_cast<uint32_t>(t0[k]) + static_cast<uint32_t>(t1[k])) +
                (static_cast<uint32_t>(t2[k]) + static_cast<uint32_t>(t3[k]));
      }
    }
  }
  for (; g < p.groups; ++g) {
    const int32_t* tg = p.table + g * gstride + o0;
    const uint64_t* words = p.packed + r0 * p.row_stride + g / 16;
    const int shift = static_cast<int>(4 * (g % 16));
    for (int64_t r = 0; r < nr; ++r) {
      const int32_t* t = tg + static_cast<int64_t>((words[r * p.row_stride] >> shift) & 15u) * p.outputs;
      uint32_t* a = acc + r * width;
      for (int64_t k = 0; k < width; ++k) a[k] += static_cast<uint32_t>(t[k]);
    }
  }
}

inline void linear_rows(const LinearProblem& p, int64_t begin, int64_t end) {
  // Accumulators of a block: at most 8 KB, so that they and the four groups' tables fit in L1.
  alignas(64) uint32_t acc[kLinearRows * kLinearOutputs / 2];
  for (int64_t o0 = 0; o0 < p.outputs; o0 += kLinearOutputs) {
    const int64_t no = std::min(kLinearOutputs, p.outputs - o0);
    const int64_t rows = std::clamp<int64_t>(int64_t{2048} / no, 1, kLinearRows);
    for (int64_t r0 = begin; r0 < end; r0 += rows) {
      const int64_t nr = std::min(rows, end - r0);
      switch (no) {  // widths the classifiers use, unrolled; any other width works too
        case 64:
          linear_block<64>(p, r0, nr, o0, no, acc);
          break;
        case 32:
          linear_block<32>(p, r0, nr, o0, no, acc);
          break;
        case 16:
          linear_block<16>(p, r0, nr, o0, no, acc);
          break;
        case 1:
          linear_block<1>(p, r0, nr, o0, no, acc);
          break;
        default:
          linear_block<0>(p, r0, nr, o0, no, acc);
      }
      for (int64_t r = 0; r < nr; ++r) {
        float* out = p.out + (r0 + r) * p.outputs + o0;
        for (int64_t k = 0; k < no; ++k) out[k] = linear_output(p, acc[r * no + k], o0 + k);
      }
    }
  }
}

}  // namespace
}  // namespace fakespotter::cpu
