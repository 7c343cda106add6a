// CUDA kernels for threshold_pack, layer_popcount, unpack_bits and bitset_linear.
//
// Element granularity (and channels of one element): one warp per output word. Lane l reads
// features 64w + l and 64w + 32 + l, compares them with their thresholds, and two warp ballots
// make the 64-bit word, so consecutive lanes read consecutive addresses when a row is
// contiguous.
// Channel granularity: one block of 8 warps per output word (64 channels); each warp sums 8
// channels one after another. Lane l adds elements l, l + 32, ... of the channel in float64 and
// an xor butterfly folds the 32 lanes: exactly the summation order bitpack.h fixes, so the
// means equal the CPU kernels' bit for bit.
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

template <DType D>
__global__ void pack_element_kernel(PackProblem p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t units = p.layout.rows * p.words;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       u < units; u += warps) {
    const int64_t row = u / p.words;
    const int64_t word = u % p.words;
    uint64_t halves[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t f = word * kWordBits + h * kWarp + lane;
      bool bit = false;
      if (f < p.features) {
        const float v = p.layout.row_contiguous
                            ? load_typed<D>(p.x, row * p.layout.row_stride + f)
                            : feature_value(p, row, f);
        bit = activation_bit(v, p.threshold(f)) != 0;
      }
      halves[h] = __ballot_sync(kFull, bit);
    }
    if (lane == 0) p.out[row * p.out_row_stride + word] = halves[0] | (halves[1] << 32);
  }
}

template <DType D>
__global__ void pack_channel_kernel(PackProblem p) {
  __shared__ uint64_t warp_bits[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  constexpr int kChannelsPerWarp = kWordBits / kWarpsPerBlock;
  const Layout& L = p.layout;
  const int64_t units = L.rows * p.words;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t row = u / p.words;
    const int64_t word = u % p.words;
    uint64_t bits = 0;
    for (int k = 0; k < kChannelsPerWarp; ++k) {
      const int slot = warp * kChannelsPerWarp + k;
      const int64_t c = word * kWordBits + slot;
      if (c >= p.features) break;  // uniform across the warp
      const int64_t base = row * L.row_stride + c * L.channel_stride;
      double sum = 0.0;
      for (int64_t s = lane; s < L.spatial; s += kWarp) {
        const int64_t at = base + (L.spatial_contiguous ? s : L.spatial_offset(s));
        sum += static_cast<double>(load_typed<D>(p.x, at));
      }
      for (int offset = kWarp / 2; offset >= 1; offset /= 2) {
        sum += __shfl_xor_sync(kFull, sum, offset);
      }
      bits |= activation_bit(channel_mean(sum, L.spatial), p.threshold(c)) << slot;
    }
    if (lane == 0) warp_bits[warp] = bits;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t w = 0;
      for (int i = 0; i < kWarpsPerBlock; ++i) w |= warp_bits[i];
      p.out[row * p.out_row_stride + word] = w;
    }
    __syncthreads();
  }
}

template <DType D>
void launch_typed(const PackProblem& p, cudaStream_t stream) {
  const int64_t units = p.layout.rows * p.words;
  if (p.granularity == Granularity::Channel && p.layout.spatial != 1) {
    const int64_t blocks = units < kMaxBlocks ? units : kMaxBlocks;
    pack_channel_kernel<D><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p);
  } else {
    const int64_t needed = (units + kWarpsPerBlock - 1) / kWarpsPerBlock;
    const int64_t blocks = needed < kMaxBlocks ? needed : kMaxBlocks;
    pack_element_kernel<D><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p);
  }
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

unsigned blocks_for(int64_t threads) {
  const int64_t b = (threads + kBlock - 1) / kBlock;
  return static_cast<unsigned>(b < kMaxBlocks ? b : kMaxBlocks);
}

}  // namespace

cudaError_t launch_pack(const PackProblem& p, cudaStream_t stream) {
  if (p.layout.rows * p.words == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::Float16:
      launch_typed<DType::Float16>(p, stream);
      break;
    case DType::BFloat16:
      launch_typed<DType::BFloat16>(p, stream);
      break;
    default:
      launch_typed<DType::Float32>(p, stream);
      break;
  }
  return cudaGetLastError();
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
