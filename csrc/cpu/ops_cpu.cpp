// CPU implementations: argument checks (problem.cpp), then at::parallel_for over (row, word)
// units with the instruction-set variant chosen at run time (isa.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../problem.h"
#include "kernels.h"

namespace fakespotter {
namespace {

// The variant of a kernel family for the selected instruction set.
template <class Fn>
Fn pick(Fn scalar, Fn avx2, Fn avx512) {
  switch (cpu::selected_isa()) {
    case cpu::Isa::Avx512:
      return avx512;
    case cpu::Isa::Avx2:
      return avx2;
    default:
      return scalar;
  }
}

void run_pack(const PackProblem& p) {
  const int64_t units = p.layout.rows * p.words;
  if (units == 0) return;
  const auto kernel = pick(&cpu::pack_scalar, &cpu::pack_avx2, &cpu::pack_avx512);
  // Aim for about 64K elements read per task.
  const bool sums = p.granularity == Granularity::Channel && p.layout.spatial > 1;
  const int64_t per_unit = kWordBits * (sums ? p.layout.spatial : 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(per_unit, 1));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
}

at::Tensor threshold_pack(const at::Tensor& x, const at::Tensor& thresholds,
                          c10::string_view granularity) {
  PreparedPack prepared = prepare_pack("threshold_pack", x, thresholds, granularity);
  PackProblem& p = prepared.problem;
  at::Tensor out = at::empty({p.layout.rows, p.words}, x.options().dtype(at::kLong));
  bind_out("threshold_pack", p, x, out, 0);
  run_pack(p);
  return out;
}

void threshold_pack_into(const at::Tensor& x, const at::Tensor& thresholds,
                         c10::string_view granularity, const at::Tensor& out, int64_t word_offset) {
  PreparedPack prepared = prepare_pack("threshold_pack_into", x, thresholds, granularity);
  bind_out("threshold_pack_into", prepared.problem, x, out, word_offset);
  check_no_alias("threshold_pack_into", out, x, thresholds);
  run_pack(prepared.problem);
}

at::Tensor layer_popcount(const at::Tensor& packed, int64_t word_offset, int64_t num_words) {
  check_packed("layer_popcount", packed, word_offset, num_words);
  const at::Tensor rows = packed.contiguous();
  const int64_t n = rows.size(0);
  const int64_t stride = rows.size(1);
  at::Tensor out = at::empty({n}, packed.options());
  const uint64_t* src = reinterpret_cast<const uint64_t*>(rows.const_data_ptr<int64_t>());
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint64_t* w = src + r * stride + word_offset;
      int64_t count = 0;
      for (int64_t k = 0; k < num_words; ++k) count += __builtin_popcountll(w[k]);
      dst[r] = count;
    }
  });
  return out;
}

at::Tensor unpack_bits(const at::Tensor& packed, int64_t word_offset, int64_t num_features) {
  TORCH_CHECK_VALUE(num_features >= 0, "unpack_bits: num_features must be >= 0, got ",
                    int_str(num_features));
  check_packed("unpack_bits", packed, word_offset, words_for(num_features));
  const at::Tensor rows = packed.contiguous();
  const int64_t n = rows.size(0);
  const int64_t stride = rows.size(1);
  at::Tensor out = at::empty({n, num_features}, packed.options().dtype(at::kBool));
  const uint64_t* src = reinterpret_cast<const uint64_t*>(rows.const_data_ptr<int64_t>());
  bool* dst = out.data_ptr<bool>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint64_t* w = src + r * stride + word_offset;
      bool* o = dst + r * num_features;
      for (int64_t f = 0; f < num_features; ++f) o[f] = (w[f / kWordBits] >> (f % kWordBits)) & 1u;
    }
  });
  return out;
}

at::Tensor bitset_linear(const at::Tensor& packed, const at::Tensor& table, const at::Tensor& scale,
                         const std::optional<at::Tensor>& bias) {
  PreparedLinear prepared = prepare_linear("bitset_linear", packed, table, scale, bias);
  LinearProblem& p = prepared.problem;
  at::Tensor out = at::empty({p.rows, p.outputs}, scale.options());
  p.out = out.data_ptr<float>();
  if (p.rows * p.outputs == 0) return out;
  const auto kernel = pick(&cpu::linear_scalar, &cpu::linear_avx2, &cpu::linear_avx512);
  const int64_t per_row = std::max<int64_t>(1, p.groups * p.outputs);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / per_row);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fakespotter, CPU, m) {
  m.impl("threshold_pack", &threshold_pack);
  m.impl("threshold_pack_into", &threshold_pack_into);
  m.impl("layer_popcount", &layer_popcount);
  m.impl("unpack_bits", &unpack_bits);
  m.impl("bitset_linear", &bitset_linear);
}

}  // namespace fakespotter
