// fakespotter bit layout and per-word logic, shared by the CPU kernels and the CUDA kernels.
//
// Bit layout (the one place it is stated in code):
//   * A sample's features are one row of int64 words. Feature i lives in word i / 64, bit i % 64
//     (LSB first), so on little-endian `row.view(uint8) == numpy.packbits(bits, bitorder="little")`.
//   * Features are numbered in logical order: element granularity -> c * S + s, where s is the
//     row-major index over the spatial dims; channel granularity -> c. Memory format does not matter.
//   * A layer's segment starts on a word boundary; bits past its last feature are zero.
//
// Activation bit: bit = float32(value) > float32(threshold). Strict; NaN on either side gives 0.
//
// Channel value (channel granularity): float32(sum / S), where sum is accumulated in float64 in a
// fixed order, so that every implementation agrees bit for bit: 32 lanes, lane l adds the
// elements s = l, l + 32, l + 64, ... in increasing s starting from +0.0; then the lanes are
// folded by halves (lane l += lane l + 16 for l < 16, then + 8, + 4, + 2, + 1) and lane 0 is the
// sum. This is the order a CUDA warp produces with a strided loop and an xor butterfly.
//
// This header includes no torch and no CUDA headers: raw pointers and plain structs only.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FS_HD __host__ __device__ __forceinline__
#else
// Host: always inlined, so that no out-of-line copy is emitted. The CPU kernel variants are
// separate translation units compiled for different ISAs (AVX2, AVX-512); an out-of-line copy
// would be a weak symbol in each, and the linker would keep one of them for all callers.
#define FS_HD inline __attribute__((always_inline))
#endif

namespace fakespotter {

constexpr int kWordBits = 64;
constexpr int kSumLanes = 32;
constexpr int kMaxSpatialDims = 6;

enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };
enum class Granularity : int32_t { Channel = 0, Element = 1 };

// Without overflow for any features >= 0 (unpack_bits takes num_features from the caller).
FS_HD int64_t words_for(int64_t features) {
  return features / kWordBits + (features % kWordBits != 0 ? 1 : 0);
}

// IEEE binary16 -> binary32, exact (subnormals, inf and NaN included).
FS_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

FS_HD float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

FS_HD float load_float(const void* base, int64_t index, DType dtype) {
  switch (dtype) {
    case DType::Float16:
      return half_bits_to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::BFloat16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(base)[index]);
    default:
      return static_cast<const float*>(base)[index];
  }
}

FS_HD uint64_t activation_bit(float value, float threshold) {
  return value > threshold ? 1u : 0u;
}

// Folds 32 lane sums into one, in the order stated at the top of this file.
FS_HD double fold_lanes(double* lanes) {
  for (int half = kSumLanes / 2; half >= 1; half /= 2) {
    for (int l = 0; l < half; ++l) lanes[l] += lanes[l + half];
  }
  return lanes[0];
}

FS_HD float channel_mean(double sum, int64_t spatial) {
  return static_cast<float>(sum / static_cast<double>(spatial));
}

// Where the elements of one layer's activation are: x[n, c, spatial...] lives at
//   n * row_stride + c * channel_stride + spatial_offset(s)      (in elements)
// where s is the row-major index over the spatial dims. Spatial dims of size 1 are dropped and
// mergeable dims are merged by the caller, so `spatial_dims` is small.
struct Layout {
  int64_t rows;
  int64_t row_stride;
  int64_t channels;
  int64_t channel_stride;
  int64_t spatial;  // product of the spatial sizes (1 for [N, D] input)
  int32_t spatial_dims;
  int64_t spatial_size[kMaxSpatialDims];
  int64_t spatial_stride[kMaxSpatialDims];
  // Fast-path facts, computed once by the caller:
  bool row_contiguous;      // the C * S elements of a row are contiguous, in logical order
  bool spatial_contiguous;  // the S elements of a channel are contiguous

  FS_HD int64_t spatial_offset(int64_t s) const {
    int64_t offset = 0;
    for (int d = spatial_dims - 1; d >= 0; --d) {
      const int64_t size = spatial_size[d];
      offset += (s % size) * spatial_stride[d];
      s /= size;
    }
    return offset;
  }
};

// One threshold_pack problem: a layer's activation, its thresholds, and where its words go.
struct PackProblem {
  const void* x;  // element 0 of the activation (storage offset applied)
  DType dtype;
  Layout layout;
  Granularity granularity;
  const float* thresholds;  // 1 value, or one per feature (in logical feature order)
  bool per_neuron;
  int64_t features;       // channels (channel granularity) or channels * spatial (element)
  int64_t words;          // words_for(features)
  uint64_t* out;          // word 0 of row 0 of this layer's segment
  int64_t out_row_stride; // in words

  FS_HD float threshold(int64_t feature) const {
    return per_neuron ? thresholds[feature] : thresholds[0];
  }
};

// The value of one feature of one row, for any strides (the generic path; fast paths must agree).
FS_HD float feature_value(const PackProblem& p, int64_t row, int64_t feature) {
  const Layout& L = p.layout;
  const int64_t base = row * L.row_stride;
  if (p.granularity == Granularity::Element || L.spatial == 1) {
    const int64_t c = feature / L.spatial;
    const int64_t s = feature % L.spatial;
    return load_float(p.x, base + c * L.channel_stride + L.spatial_offset(s), p.dtype);
  }
  double lanes[kSumLanes];
  for (int l = 0; l < kSumLanes; ++l) lanes[l] = 0.0;
  const int64_t cbase = base + feature * L.channel_stride;
  for (int64_t s = 0; s < L.spatial; ++s) {
    lanes[s % kSumLanes] += static_cast<double>(load_float(p.x, cbase + L.spatial_offset(s), p.dtype));
  }
  return channel_mean(fold_lanes(lanes), L.spatial);
}

// One output word (features 64 * word ... 64 * word + 63) of one row, for any strides.
FS_HD uint64_t pack_word_generic(const PackProblem& p, int64_t row, int64_t word) {
  const int64_t first = word * kWordBits;
  const int64_t last = first + kWordBits < p.features ? first + kWordBits : p.features;
  uint64_t bits = 0;
  for (int64_t f = first; f < last; ++f) {
    bits |= activation_bit(feature_value(p, row, f), p.threshold(f)) << (f - first);
  }
  return bits;
}

// ---------------------------------------------------------------------------------------------
// bitset_linear: the first dense layer of a classifier, evaluated on packed rows.
//
// The layer's weights are quantized to int32 (w ~= q * scale) and regrouped by nibbles of the row:
// table[g][m][o] = sum of q[4g + j][o] over the bits j of m (feature 4g + j is bit 4g + j of the
// row). A row's accumulator is then acc[o] = sum over groups g of table[g][nibble g of the row][o]:
// one table lookup per 4 features, no unpacking. Integer sums are exact in any order (the table
// builder keeps every column's sum of |q| below 2^31), so every implementation agrees bit for
// bit; the output is float32(double(acc) * double(scale[o]) + double(bias[o])).
struct LinearProblem {
  const uint64_t* packed;  // row r starts at packed + r * row_stride
  int64_t rows;
  int64_t row_stride;      // in words
  const int32_t* table;    // [groups][16][outputs], contiguous
  int64_t groups;
  int64_t outputs;
  const float* scale;      // [outputs]
  const float* bias;       // [outputs] or nullptr (adds +0.0)
  float* out;              // [rows][outputs], contiguous
};

FS_HD int nibble(const uint64_t* row, int64_t group) {
  return static_cast<int>((row[group / 16] >> (4 * (group % 16))) & 15u);
}

FS_HD float linear_output(const LinearProblem& p, uint32_t acc, int64_t o) {
  const double bias = p.bias ? static_cast<double>(p.bias[o]) : 0.0;
  return static_cast<float>(static_cast<double>(static_cast<int32_t>(acc)) *
                                static_cast<double>(p.scale[o]) +
                            bias);
}

// One output of one row, in plain wrap-around uint32 arithmetic (SIMD adds wrap the same way).
FS_HD uint32_t linear_acc_generic(const LinearProblem& p, const uint64_t* row, int64_t o) {
  uint32_t acc = 0;
  for (int64_t g = 0; g < p.groups; ++g) {
    acc += static_cast<uint32_t>(p.table[(g * 16 + nibble(row, g)) * p.outputs + o]);
  }
  return acc;
}

}  // namespace fakespotter
