// CUDA kernels for threshold_pack, layer_popcount, unpack_bits and bitset_linear.
//
// Element granularity (and channels of one element): one warp per 4 consecutive output words of
// a row. Lane l reads features 64w + l and 64w + 32 + l of each of the 4 words (8 independent
// loads in flight per lane before any compare), and warp ballots make the 64-bit words, so
// consecutive lanes read consecutive addresses when a row is contiguous.
// Channel granularity: two passes. First one warp per (row, channel): lane l adds elements
// l, l + 32, ... of the channel in float64 (4 loads issued ahead of the 4 adds, which stay in
// that order) and an xor butterfly folds the 32 lanes: exactly the summation order bitpack.h
// fixes, so the means equal the CPU kernels' bit for bit. The float32 means go to a scratch
// [rows, channels] buffer (the caller's); the element pass then thresholds and packs them.
// (One warp per channel keeps the GPU busy when a layer has few channels and large maps.)
// Channels innermost in memory (channels_last; channel stride 1 over spatial maps): the lanes of
// a warp above would read one channel's positions C elements apart, one memory line per load.
// Here the lanes of a warp take neighbouring channels at the same position instead, so each load
// instruction reads whole lines or sectors. Channel means: thread (channel, lane l) adds
// positions l, l + 32, ... of its channel in that order, and the 32 lane sums are folded with
// fold_lanes: the order above, hence the same means. Element: one thread per (row, channel, 64
// positions) makes those 64 bits and ORs them into the (at most two) words they fall in, after
// the layer's words are zeroed.
// bitset_linear: one block per (row, 128 outputs); thread o walks the row's nibbles (every thread
// reads the same word: a broadcast) and adds table[g][nibble][o] (consecutive threads, consecutive
// addresses). Integer sums are exact, so the result does not depend on the order.
#include <cuda_runtime.h>

#include "kernels.h"

namespace fakespotter::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / kWarp;
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kMaxBlocks = 65535;

template <DType D>
__device__ __forceinline__ float load_typed(const void* x, int64_t i) {
  return load_float(x, i, D);
}

constexpr int kWordsPerWarp = 4;

// feature_value for element features (or channels of one element), any strides: the only kind
// the element kernel sees, without the generic channel-mean path (and its lane array).
__device__ __forceinline__ float element_value(const PackProblem& p, int64_t row, int64_t f) {
  const Layout& L = p.layout;
  const int64_t at = row * L.row_stride + (f / L.spatial) * L.channel_stride + L.spatial_offset(f % L.spatial);
  return load_float(p.x, at, p.dtype);
}

template <DType D>
__global__ void pack_element_kernel(PackProblem p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t groups = (p.words + kWordsPerWarp - 1) / kWordsPerWarp;
  const int64_t units = p.layout.rows * groups;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       u < units; u += warps) {
    const int64_t row = u / groups;
    const int64_t word0 = (u % groups) * kWordsPerWarp;
    const int64_t f0 = word0 * kWordBits + lane;
    float v[2 * kWordsPerWarp];
#pragma unroll
    for (int h = 0; h < 2 * kWordsPerWarp; ++h) {
      const int64_t f = f0 + h * kWarp;
      v[h] = 0.0f;
      if (f < p.features) {
        v[h] = p.layout.row_contiguous ? load_typed<D>(p.x, row * p.layout.row_stride + f)
                                       : element_value(p, row, f);
      }
    }
    uint64_t words[kWordsPerWarp];
#pragma unroll
    for (int h = 0; h < 2 * kWordsPerWarp; ++h) {
      const int64_t f = f0 + h * kWarp;
      const bool bit = f < p.features && activation_bit(v[h], p.threshold(f)) != 0;
      const uint64_t half = __ballot_sync(kFull, bit);
      words[h / 2] = h % 2 ? words[h / 2] | (half << 32) : half;
    }
#pragma unroll
    for (int j = 0; j < kWordsPerWarp; ++j) {
      if (lane == j && word0 + j < p.words) p.out[row * p.out_row_stride + word0 + j] = words[j];
    }
  }
}

template <DType D>
__global__ void channel_means_kernel(PackProblem p, float* means) {
  const int lane = threadIdx.x % kWarp;
  const Layout& L = p.layout;
  const int64_t units = L.rows * p.features;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       u < units; u += warps) {
    const int64_t row = u / p.features;
    const int64_t c = u % p.features;
    const int64_t base = row * L.row_stride + c * L.channel_stride;
    double sum = 0.0;
    int64_t s = lane;
    if (L.spatial_contiguous) {
      for (; s + 3 * kWarp < L.spatial; s += 4 * kWarp) {
        const float a0 = load_typed<D>(p.x, base + s);
        const float a1 = load_typed<D>(p.x, base + s + kWarp);
        const float a2 = load_typed<D>(p.x, base + s + 2 * kWarp);
        const float a3 = load_typed<D>(p.x, base + s + 3 * kWarp);
        sum += static_cast<double>(a0);
        sum += static_cast<double>(a1);
        sum += static_cast<double>(a2);
        sum += static_cast<double>(a3);
      }
      for (; s < L.spatial; s += kWarp) sum += static_cast<double>(load_typed<D>(p.x, base + s));
    } else {
      for (; s < L.spatial; s += kWarp) {
        sum += static_cast<double>(load_typed<D>(p.x, base + L.spatial_offset(s)));
      }
    }
    for (int offset = kWarp / 2; offset >= 1; offset /= 2) {
      sum += __shfl_xor_sync(kFull, sum, offset);
    }
    if (lane == 0) means[u] = channel_mean(sum, L.spatial);
  }
}

// Offset of spatial position s from a channel's element 0 (one merged dim: a multiply).
__device__ __forceinline__ int64_t position(const Layout& L, int64_t s) {
  return L.spatial_dims == 1 ? s * L.spatial_stride[0] : L.spatial_offset(s);
}

bool channels_innermost(const Layout& L) {
  return L.channel_stride == 1 && L.channels > 1 && L.spatial > 1;
}

// Block (kTileChannels channels, kSumLanes lanes): see the top of this file. A warp holds 8
// channels of 4 lanes: each load instruction reads 4 runs of 8 neighbouring elements (whole
// 32-byte sectors in float32), and small tiles keep every multiprocessor busy when a layer has
// few channels.
constexpr int kTileChannels = 8;

template <DType D>
__global__ void channel_means_cl_kernel(PackProblem p, float* means) {
  __shared__ double part[kSumLanes][kTileChannels + 1];
  const Layout& L = p.layout;
  const int cx = threadIdx.x;
  const int lane = threadIdx.y;
  const int64_t tiles = (p.features + kTileChannels - 1) / kTileChannels;
  for (int64_t u = blockIdx.x; u < L.rows * tiles; u += gridDim.x) {
    const int64_t row = u / tiles;
    const int64_t c = (u % tiles) * kTileChannels + cx;
    double sum = 0.0;
    if (c < p.features) {
      const int64_t base = row * L.row_stride + c;
      int64_t s = lane;
      for (; s + 3 * kSumLanes < L.spatial; s += 4 * kSumLanes) {
        const float a0 = load_typed<D>(p.x, base + position(L, s));
        const float a1 = load_typed<D>(p.x, base + position(L, s + kSumLanes));
        const float a2 = load_typed<D>(p.x, base + position(L, s + 2 * kSumLanes));
        const float a3 = load_typed<D>(p.x, base + position(L, s + 3 * kSumLanes));
        sum += static_cast<double>(a0);
        sum += static_cast<double>(a1);
        sum += static_cast<double>(a2);
        sum += static_cast<double>(a3);
      }
      for (; s < L.spatial; s += kSumLanes) sum += static_cast<double>(load_typed<D>(p.x, base + position(L, s)));
    }
    part[lane][cx] = sum;
    __syncthreads();
    if (lane == 0 && c < p.features) {
      double lanes[kSumLanes];
      for (int l = 0; l < kSumLanes; ++l) lanes[l] = part[l][cx];
      means[row * p.features + c] = channel_mean(fold_lanes(lanes), L.spatial);
    }
    __syncthreads();
  }
}

// One thread per (row, 64 positions, channel), channels fastest; the layer's words are zero.
template <DType D>
__global__ void pack_element_cl_kernel(PackProblem p) {
  const Layout& L = p.layout;
  const int64_t chunks = (L.spatial + kWordBits - 1) / kWordBits;
  const int64_t units = L.rows * chunks * L.channels;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = u % L.channels;
    const int64_t s0 = (u / L.channels) % chunks * kWordBits;
    const int64_t row = u / (L.channels * chunks);
    const int n = static_cast<int>(L.spatial - s0 < kWordBits ? L.spatial - s0 : kWordBits);
    const int64_t base = row * L.row_stride + c;
    const int64_t f0 = c * L.spatial + s0;
    uint64_t bits = 0;
#pragma unroll 8
    for (int i = 0; i < n; ++i) {
      bits |= activation_bit(load_typed<D>(p.x, base + position(L, s0 + i)), p.threshold(f0 + i)) << i;
    }
    if (bits == 0) continue;
    auto* out = reinterpret_cast<unsigned long long*>(p.out + row * p.out_row_stride + f0 / kWordBits);
    const int shift = static_cast<int>(f0 % kWordBits);
    atomicOr(out, static_cast<unsigned long long>(bits << shift));
    if (shift != 0 && (bits >> (kWordBits - shift)) != 0) {
      atomicOr(out + 1, static_cast<unsigned long long>(bits >> (kWordBits - shift)));
    }
  }
}

unsigned blocks_for_warps(int64_t warps) {
  const int64_t b = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned>(b < kMaxBlocks ? b : kMaxBlocks);
}

template <DType D>
void launch_element(const PackProblem& p, cudaStream_t stream) {
  const int64_t groups = (p.words + kWordsPerWarp - 1) / kWordsPerWarp;
  pack_element_kernel<D><<<blocks_for_warps(p.layout.rows * groups), kBlock, 0, stream>>>(p);
}

// The element problem over the [rows, features] float32 means of a channel problem.
PackProblem means_problem(const PackProblem& p, const float* means) {
  PackProblem m = p;
  m.x = means;
  m.dtype = DType::Float32;
  m.granularity = Granularity::Element;
  m.layout.row_stride = p.features;
  m.layout.channels = p.features;
  m.layout.channel_stride = 1;
  m.layout.spatial = 1;
  m.layout.spatial_dims = 0;
  m.layout.row_contiguous = true;
  m.layout.spatial_contiguous = true;
  return m;
}

unsigned blocks_for(int64_t threads) {
  const int64_t b = (threads + kBlock - 1) / kBlock;
  return static_cast<unsigned>(b < kMaxBlocks ? b : kMaxBlocks);
}

template <DType D>
cudaError_t launch_typed(const PackProblem& p, float* means, cudaStream_t stream) {
  const Layout& L = p.layout;
  if (pack_scratch_floats(p) > 0) {
    if (channels_innermost(L)) {
      const int64_t tiles = L.rows * ((p.features + kTileChannels - 1) / kTileChannels);
      channel_means_cl_kernel<D><<<static_cast<unsigned>(tiles < kMaxBlocks ? tiles : kMaxBlocks),
                                   dim3(kTileChannels, kSumLanes), 0, stream>>>(p, means);
    } else {
      channel_means_kernel<D><<<blocks_for_warps(L.rows * p.features), kBlock, 0, stream>>>(p, means);
    }
    launch_element<DType::Float32>(means_problem(p, means), stream);
  } else if (channels_innermost(L)) {
    // (bind_out refuses rows that overlap, so the pitch reaches the width; one row's stride may be
    // any number, and CUDA ignores the pitch of one row, but it is kept in range all the same)
    const size_t width = p.words * sizeof(uint64_t);
    const size_t pitch = L.rows == 1 ? width : p.out_row_stride * sizeof(uint64_t);
    const cudaError_t zeroed = cudaMemset2DAsync(p.out, pitch, 0, width, L.rows, stream);
    if (zeroed != cudaSuccess) return zeroed;
    const int64_t chunks = (L.spatial + kWordBits - 1) / kWordBits;
    pack_element_cl_kernel<D><<<blocks_for(L.rows * chunks * L.channels), kBlock, 0, stream>>>(p);
  } else {
    launch_element<D>(p, stream);
  }
  return cudaGetLastError();
}

__global__ void popcount_kernel(const uint64_t* packed, int64_t rows, int64_t row_stride,
                                int64_t word_offset, int64_t num_words, int64_t* out) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t* w = packed + r * row_stride + word_offset;
    int64_t count = 0;
    for (int64_t k = 0; k < num_words; ++k) count += __popcll(w[k]);
    out[r] = count;
  }
}

__global__ void unpack_kernel(const uint64_t* packed, int64_t rows, int64_t row_stride,
                              int64_t word_offset, int64_t num_features, bool* out) {
  const int64_t total = rows * num_features;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / num_features;
    const int64_t f = i % num_features;
    out[i] = (packed[r * row_stride + word_offset + f / kWordBits] >> (f % kWordBits)) & 1u;
  }
}

__global__ void linear_kernel(LinearProblem p) {
  const int64_t o = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    if (o < p.outputs) {
      const uint64_t* row = p.packed + r * p.row_stride;
      p.out[r * p.outputs + o] = linear_output(p, linear_acc_generic(p, row, o), o);
    }
  }
}

}  // namespace

cudaError_t launch_pack(const PackProblem& p, float* scratch, cudaStream_t stream) {
  if (p.layout.rows * p.words == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::Float16:
      return launch_typed<DType::Float16>(p, scratch, stream);
    case DType::BFloat16:
      return launch_typed<DType::BFloat16>(p, scratch, stream);
    default:
      return launch_typed<DType::Float32>(p, scratch, stream);
  }
}

cudaError_t launch_popcount(const uint64_t* packed, int64_t rows, int64_t row_stride,
                            int64_t word_offset, int64_t num_words, int64_t* out,
                            cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  popcount_kernel<<<blocks_for(rows), kBlock, 0, stream>>>(packed, rows, row_stride, word_offset,
                                                            num_words, out);
  return cudaGetLastError();
}

cudaError_t launch_unpack(const uint64_t* packed, int64_t rows, int64_t row_stride,
                          int64_t word_offset, int64_t num_features, bool* out,
                          cudaStream_t stream) {
  if (rows * num_features == 0) return cudaSuccess;
  unpack_kernel<<<blocks_for(rows * num_features), kBlock, 0, stream>>>(
      packed, rows, row_stride, word_offset, num_features, out);
  return cudaGetLastError();
}

cudaError_t launch_linear(const LinearProblem& p, cudaStream_t stream) {
  if (p.rows * p.outputs == 0) return cudaSuccess;
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned>(p.rows < kMaxBlocks ? p.rows : kMaxBlocks),
                  static_cast<unsigned>((p.outputs + kThreads - 1) / kThreads));
  linear_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fakespotter::cuda
