// CUDA launchers for the fakespotter ops (kernels.cu). Raw device pointers and a stream; no torch headers.
// Each returns the launch's cudaError_t (cudaGetLastError after the launch).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../bitpack.h"

namespace fakespotter::cuda {

// Floats of device scratch that launch_pack needs for problem p: the [rows, channels] means of
// channel granularity over spatial maps, else 0.
inline int64_t pack_scratch_floats(const PackProblem& p) {
  return p.granularity == Granularity::Channel && p.layout.spatial != 1 ? p.layout.rows * p.features
                                                                         : 0;
}

// threshold_pack of a problem whose x, thresholds and out are device pointers; scratch: device
// memory for pack_scratch_floats(p) floats (may be null when that is 0).
cudaError_t launch_pack(const PackProblem& p, float* scratch, cudaStream_t stream);

// out[r] = set bits of packed[r, word_offset : word_offset + num_words].
cudaError_t launch_popcount(const uint64_t* packed, int64_t rows, int64_t row_stride,
                            int64_t word_offset, int64_t num_words, int64_t* out,
                            cudaStream_t stream);

// out[r, f] = bit f of packed[r, word_offset:], for f < num_features.
cudaError_t launch_unpack(const uint64_t* packed, int64_t rows, int64_t row_stride,
                          int64_t word_offset, int64_t num_features, bool* out,
                          cudaStream_t stream);

// bitset_linear of a problem whose pointers are device pointers.
cudaError_t launch_linear(const LinearProblem& p, cudaStream_t stream);

}  // namespace fakespotter::cuda
