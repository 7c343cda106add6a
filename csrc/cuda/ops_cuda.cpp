// CUDA implementations: the same argument checks as the CPU ones (problem.cpp), then the
// kernels of kernels.cu on torch's current stream of x's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../problem.h"
#include "kernels.h"

namespace fakespotter {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Launches a prepared problem, with the scratch its channel means need from torch's allocator
// (stream-ordered: freed after the launch, reusable by later work on the same stream).
void launch(const PackProblem& p, const at::Tensor& x) {
  const int64_t floats = cuda::pack_scratch_floats(p);
  at::Tensor scratch = floats > 0 ? at::empty({floats}, x.options().dtype(at::kFloat)) : at::Tensor();
  C10_CUDA_CHECK(cuda::launch_pack(p, floats > 0 ? scratch.data_ptr<float>() : nullptr, current_stream()));
}

at::Tensor threshold_pack(const at::Tensor& x, const at::Tensor& thresholds,
                          c10::string_view granularity) {
  const c10::cuda::CUDAGuard guard(x.device());
  PreparedPack prepared = prepare_pack("threshold_pack", x, thresholds, granularity);
  PackProblem& p = prepared.problem;
  at::Tensor out = at::empty({p.layout.rows, p.words}, x.options().dtype(at::kLong));
  bind_out("threshold_pack", p, x, out, 0);
  launch(p, x);
  return out;
}

void threshold_pack_into(const at::Tensor& x, const at::Tensor& thresholds,
                         c10::string_view granularity, const at::Tensor& out, int64_t word_offset) {
  const c10::cuda::CUDAGuard guard(x.device());
  PreparedPack prepared = prepare_pack("threshold_pack_into", x, thresholds, granularity);
  bind_out("threshold_pack_into", prepared.problem, x, out, word_offset);
  check_no_alias("threshold_pack_into", out, x, thresholds);
  launch(prepared.problem, x);
}

at::Tensor layer_popcount(const at::Tensor& packed, int64_t word_offset, int64_t num_words) {
  const c10::cuda::CUDAGuard guard(packed.device());
  check_packed("layer_popcount", packed, word_offset, num_words);
  const at::Tensor rows = packed.contiguous();
  at::Tensor out = at::empty({rows.size(0)}, packed.options());
  C10_CUDA_CHECK(cuda::launch_popcount(
      reinterpret_cast<const uint64_t*>(rows.const_data_ptr<int64_t>()), rows.size(0),
      rows.size(1), word_offset, num_words, out.data_ptr<int64_t>(), current_stream()));
  return out;
}

at::Tensor unpack_bits(const at::Tensor& packed, int64_t word_offset, int64_t num_features) {
  const c10::cuda::CUDAGuard guard(packed.device());
  TORCH_CHECK_VALUE(num_features >= 0, "unpack_bits: num_features must be >= 0, got ",
                    int_str(num_features));
  check_packed("unpack_bits", packed, word_offset, words_for(num_features));
  const at::Tensor rows = packed.contiguous();
  at::Tensor out = at::empty({rows.size(0), num_features}, packed.options().dtype(at::kBool));
  C10_CUDA_CHECK(cuda::launch_unpack(
      reinterpret_cast<const uint64_t*>(rows.const_data_ptr<int64_t>()), rows.size(0),
      rows.size(1), word_offset, num_features, out.data_ptr<bool>(), current_stream()));
  return out;
}

at::Tensor bitset_linear(const at::Tensor& packed, const at::Tensor& table, const at::Tensor& scale,
                         const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(packed.device());
  PreparedLinear prepared = prepare_linear("bitset_linear", packed, table, scale, bias);
  LinearProblem& p = prepared.problem;
  at::Tensor out = at::empty({p.rows, p.outputs}, scale.options());
  p.out = out.data_ptr<float>();
  C10_CUDA_CHECK(cuda::launch_linear(p, current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fakespotter, CUDA, m) {
  m.impl("threshold_pack", &threshold_pack);
  m.impl("threshold_pack_into", &threshold_pack_into);
  m.impl("layer_popcount", &layer_popcount);
  m.impl("unpack_bits", &unpack_bits);
  m.impl("bitset_linear", &bitset_linear);
}

}  // namespace fakespotter
