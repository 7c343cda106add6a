#include "problem.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <string>
#include <utility>

namespace fakespotter {

std::string int_str(int64_t v) { return std::to_string(v); }

namespace {

// a + b for a, b >= 0, as text: exact even where the int64 sum would overflow.
std::string end_str(int64_t a, int64_t b) {
  return std::to_string(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
}

std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + int_str(sizes[i]);
  return s + "]";
}

DType element_dtype(std::string_view op, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": x must be float32, float16 or bfloat16, got ",
                        x.scalar_type());
  }
  return DType::Float32;  // unreachable
}

}  // namespace

Granularity parse_granularity(std::string_view op, std::string_view granularity) {
  if (granularity == "channel") return Granularity::Channel;
  if (granularity == "element") return Granularity::Element;
  TORCH_CHECK_VALUE(false, op, ": granularity must be 'channel' or 'element', got '", granularity,
                    "'");
  return Granularity::Channel;  // unreachable
}

PreparedPack prepare_pack(std::string_view op, const at::Tensor& x, const at::Tensor& thresholds,
                          std::string_view granularity) {
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must have shape [N, D] or [N, C, *spatial], got a ",
                    int_str(x.dim()), "-d tensor of shape ", shape_str(x.sizes()));
  PackProblem p{};
  p.dtype = element_dtype(op, x);
  p.granularity = parse_granularity(op, granularity);

  Layout& L = p.layout;
  L.rows = x.size(0);
  L.row_stride = x.stride(0);
  L.channels = x.size(1);
  L.channel_stride = x.stride(1);
  L.spatial = 1;
  L.spatial_dims = 0;
  for (int64_t d = 2; d < x.dim(); ++d) {
    const int64_t size = x.size(d);
    const int64_t stride = x.stride(d);
    L.spatial *= size;
    if (size == 1) continue;
    if (L.spatial_dims > 0 &&
        L.spatial_stride[L.spatial_dims - 1] == stride * size) {  // merge with the previous dim
      L.spatial_size[L.spatial_dims - 1] *= size;
      L.spatial_stride[L.spatial_dims - 1] = stride;
      continue;
    }
    if (L.spatial_dims == kMaxSpatialDims) {
      // More than the kernels index: x as [N, C, spatial], one dim in the same logical order (a
      // copy where no view gives it; an empty x, which `contiguous` would return as it is, too).
      int64_t spatial = 1;
      for (int64_t k = 2; k < x.dim(); ++k) spatial *= x.size(k);
      return prepare_pack(op, x.reshape({x.size(0), x.size(1), spatial}), thresholds, granularity);
    }
    L.spatial_size[L.spatial_dims] = size;
    L.spatial_stride[L.spatial_dims] = stride;
    ++L.spatial_dims;
  }
  L.spatial_contiguous = L.spatial_dims == 0 || (L.spatial_dims == 1 && L.spatial_stride[0] == 1);
  L.row_contiguous = L.spatial_contiguous && (L.channels <= 1 || L.channel_stride == L.spatial);

  const bool channel = p.granularity == Granularity::Channel;
  p.features = channel ? L.channels : L.channels * L.spatial;
  p.words = words_for(p.features);

  TORCH_CHECK_VALUE(thresholds.scalar_type() == at::kFloat, op,
                    ": thresholds must be float32, got ", thresholds.scalar_type());
  TORCH_CHECK_VALUE(thresholds.device() == x.device(), op,
                    ": thresholds must be on x's device (", x.device(), "), got ",
                    thresholds.device());
  const int64_t n = thresholds.numel();
  TORCH_CHECK_VALUE(n == 1 || n == p.features, op,
                    ": thresholds must have 1 entry (one per layer) or ", int_str(p.features),
                    " entries (one per ", channel ? "channel" : "element", "), got ", int_str(n));
  PreparedPack prepared{p, thresholds.contiguous(), x};
  prepared.problem.per_neuron = n != 1;
  prepared.problem.thresholds = prepared.thresholds.const_data_ptr<float>();
  prepared.problem.x = x.const_data_ptr();
  return prepared;
}

namespace {

// The bytes [first, end) that a tensor's elements span (strides are never negative); none when
// it is empty.
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size()))};
}

}  // namespace

void check_no_alias(std::string_view op, const at::Tensor& out, const at::Tensor& x,
                    const at::Tensor& thresholds) {
  const auto [o0, o1] = byte_span(out);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"x", &x}, {"thresholds", &thresholds}}) {
    const auto [b0, b1] = byte_span(*t);
    TORCH_CHECK_VALUE(!(o0 < b1 && b0 < o1), op, ": out shares memory with ", name,
                      ", which would be read after being written over; give out memory of its own");
  }
}

void bind_out(std::string_view op, PackProblem& p, const at::Tensor& x, const at::Tensor& out,
              int64_t word_offset) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kLong, op, ": out must be int64, got ",
                    out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 2, op, ": out must have shape [N, words], got shape ",
                    shape_str(out.sizes()));
  TORCH_CHECK_VALUE(out.device() == x.device(), op, ": out must be on x's device (", x.device(),
                    "), got ", out.device());
  TORCH_CHECK_VALUE(out.size(0) == p.layout.rows, op, ": out must have one row per row of x (",
                    int_str(p.layout.rows), "), got ", int_str(out.size(0)));
  TORCH_CHECK_VALUE(word_offset >= 0, op, ": word_offset must be >= 0, got ", int_str(word_offset));
  // Written so that it cannot overflow: word_offset + p.words wraps to a negative number for a
  // word_offset near INT64_MAX, which would pass and point the kernel before `out`.
  TORCH_CHECK_VALUE(word_offset <= out.size(1) - p.words, op, ": out has ", int_str(out.size(1)),
                    " words per row, but this layer needs words [", int_str(word_offset), ", ",
                    end_str(word_offset, p.words), ") (word_offset ", int_str(word_offset), " + ",
                    int_str(p.words), " words)");
  TORCH_CHECK_VALUE(out.size(1) <= 1 || out.stride(1) == 1, op,
                    ": out must have unit stride along its words, got strides ",
                    shape_str(out.strides()));
  // Rows that share memory would be written by several threads at once: an expanded `out` (row
  // stride 0) is refused as torch's own out= ops (and the twin's copy) refuse it, rows that
  // overlap in part as the twin refuses them.
  TORCH_CHECK_VALUE(out.size(0) <= 1 || out.stride(0) == 0 || out.stride(0) >= out.size(1), op,
                    ": out's rows overlap (row stride ", int_str(out.stride(0)), " words, ",
                    int_str(out.size(1)), " words per row); give each row memory of its own");
  at::assert_no_internal_overlap(out);
  p.out = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()) + word_offset;
  p.out_row_stride = out.stride(0);
}

void check_packed(std::string_view op, const at::Tensor& packed, int64_t word_offset,
                  int64_t num_words) {
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kLong, op, ": packed must be int64, got ",
                    packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 2, op, ": packed must have shape [N, words], got shape ",
                    shape_str(packed.sizes()));
  TORCH_CHECK_VALUE(word_offset >= 0 && num_words >= 0, op,
                    ": word_offset and the word count must be >= 0, got ", int_str(word_offset),
                    " and ", int_str(num_words));
  TORCH_CHECK_VALUE(word_offset <= packed.size(1) - num_words, op, ": packed has ",
                    int_str(packed.size(1)), " words per row, but words [", int_str(word_offset), ", ",
                    end_str(word_offset, num_words), ") were asked for");
}

PreparedLinear prepare_linear(std::string_view op, const at::Tensor& packed,
                              const at::Tensor& table, const at::Tensor& scale,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kLong, op, ": packed must be int64, got ",
                    packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 2, op, ": packed must have shape [N, words], got shape ",
                    shape_str(packed.sizes()));
  TORCH_CHECK_VALUE(table.scalar_type() == at::kInt, op, ": table must be int32, got ",
                    table.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 3 && table.size(1) == 16, op,
                    ": table must have shape [groups, 16, outputs] (fakespotter.ops.bitset_table), "
                    "got shape ", shape_str(table.sizes()));
  const int64_t groups = table.size(0);
  const int64_t outputs = table.size(2);
  TORCH_CHECK_VALUE((groups + 15) / 16 == packed.size(1), op, ": table covers ", int_str(groups),
                    " groups of 4 features = ", int_str((groups + 15) / 16), " words, packed has ",
                    int_str(packed.size(1)), " words per row");
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
                        scale.size(0) == outputs,
                    op, ": scale must be float32 of shape [", int_str(outputs), "], got ",
                    scale.scalar_type(), " of shape ", shape_str(scale.sizes()));
  for (const at::Tensor* t : {&table, &scale}) {
    TORCH_CHECK_VALUE(t->device() == packed.device(), op, ": ", t == &table ? "table" : "scale",
                      " must be on packed's device (", packed.device(), "), got ", t->device());
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                          bias->size(0) == outputs,
                      op, ": bias must be float32 of shape [", int_str(outputs), "], got ",
                      bias->scalar_type(), " of shape ", shape_str(bias->sizes()));
    TORCH_CHECK_VALUE(bias->device() == packed.device(), op, ": bias must be on packed's device (",
                      packed.device(), "), got ", bias->device());
  }
  PreparedLinear prepared;
  prepared.packed = packed.contiguous();
  prepared.table = table.contiguous();
  prepared.scale = scale.contiguous();
  if (bias.has_value()) prepared.bias = bias->contiguous();
  LinearProblem& p = prepared.problem;
  p.packed = reinterpret_cast<const uint64_t*>(prepared.packed.const_data_ptr<int64_t>());
  p.rows = packed.size(0);
  p.row_stride = packed.size(1);
  p.table = prepared.table.const_data_ptr<int32_t>();
  p.groups = groups;
  p.outputs = outputs;
  p.scale = prepared.scale.const_data_ptr<float>();
  p.bias = bias.has_value() ? prepared.bias.const_data_ptr<float>() : nullptr;
  p.out = nullptr;
  return prepared;
}

}  // namespace fakespotter
