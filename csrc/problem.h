// Argument checking shared by every backend, and the translation of tensors into the raw
// PackProblem that kernels take. Messages name the op, the argument, what was expected and what
// arrived; they are raised as ValueError in Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <string_view>

#include "bitpack.h"

namespace fakespotter {

// A checked threshold_pack call. `thresholds` and `x` keep alive the storage that
// problem.thresholds and problem.x point into (contiguous copies where needed: x with more than
// kMaxSpatialDims spatial dims that cannot be merged).
struct PreparedPack {
  PackProblem problem;
  at::Tensor thresholds;
  at::Tensor x;
};

// Checks x / thresholds / granularity and describes the layer (problem.out is left unset).
PreparedPack prepare_pack(std::string_view op, const at::Tensor& x, const at::Tensor& thresholds,
                          std::string_view granularity);

// Checks `out` and `word_offset` against the problem and points the problem at its segment.
void bind_out(std::string_view op, PackProblem& problem, const at::Tensor& x, const at::Tensor& out,
              int64_t word_offset);

// threshold_pack_into: refuses an `out` whose memory overlaps that of x or thresholds, which the
// kernels would read after writing over them.
void check_no_alias(std::string_view op, const at::Tensor& out, const at::Tensor& x,
                    const at::Tensor& thresholds);

// Checks packed rows and a word range [word_offset, word_offset + num_words).
void check_packed(std::string_view op, const at::Tensor& packed, int64_t word_offset,
                  int64_t num_words);

// Checks a bitset_linear call and describes it (problem.out is left unset). `holders` keeps
// alive the contiguous copies the problem points into.
struct PreparedLinear {
  LinearProblem problem;
  at::Tensor packed, table, scale, bias;
};
// Integers in error messages go through this (std::to_string), never through an ostream. Seen on
// one machine (torch 2.11.0+cu130, Ubuntu's g++ 13.3, libstdc++ 6.0.33, AVX-512 Xeon): a message
// formatting an int64 with `ostream <<` in this library crashed the process (SIGSEGV in
// basic_ostream::_M_insert<long>) while messages without integers raised normally; the cause
// was not established, so no message here depends on ostream's number formatting.
std::string int_str(int64_t v);

PreparedLinear prepare_linear(std::string_view op, const at::Tensor& packed,
                              const at::Tensor& table, const at::Tensor& scale,
                              const std::optional<at::Tensor>& bias);

}  // namespace fakespotter
