// Portable variant: plain C++ over the shared per-element logic of bitpack.h.
#include "kernels.h"

namespace fakespotter::cpu {
namespace {

struct ScalarKernel {
  template <DType D>
  static uint64_t pack64(const void* x, int64_t i, const float* thr, float t) {
    uint64_t bits = 0;
    for (int k = 0; k < kWordBits; ++k) {
      bits |= activation_bit(load_float(x, i + k, D), thr ? thr[k] : t) << k;
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
double ScalarKernel::channel_sum(const void* x, int64_t i, int64_t n) {
  double lanes[kSumLanes] = {};
  int64_t s = 0;
  for (; s + kSumLanes <= n; s += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) lanes[l] += static_cast<double>(load_float(x, i + s + l, D));
  }
  for (int l = 0; s + l < n; ++l) lanes[l] += static_cast<double>(load_float(x, i + s + l, D));
  return fold_lanes(lanes);
}

}  // namespace

void pack_scalar(const PackProblem& p, int64_t begin, int64_t end) {
  pack_units<ScalarKernel>(p, begin, end);
}

void linear_scalar(const LinearProblem& p, int64_t begin, int64_t end) {
  linear_rows(p, begin, end);
}

}  // namespace fakespotter::cpu
