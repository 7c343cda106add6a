// The one place where fakespotter's native ops are declared. Backends (cpu/, cuda/) only add
// implementations; shape-only (fake / meta) kernels live in fakespotter/_meta.py and the
// pure-torch twins in fakespotter/reference.py. Bit layout: bitpack.h.
#include <torch/library.h>

TORCH_LIBRARY(fakespotter, m) {
  m.set_python_module("fakespotter._meta");
  // x: [N, D] or [N, C, *spatial], float32/float16/bfloat16, any strides. thresholds: float32,
  // 1 entry (per layer) or one per neuron. granularity: 'channel' (a neuron is a channel,
  // valued by its spatial mean) or 'element'. Returns int64 [N, ceil(neurons / 64)] packed bits.
  // Both accept any strides: flexible_layout lets torch.compile (inductor) hand over activations
  // in the layout it chose (channels_last after its conv fusions) instead of copying them back
  // to the eager strides first.
  m.def("threshold_pack(Tensor x, Tensor thresholds, str granularity) -> Tensor",
        {at::Tag::flexible_layout});
  // Same, written into words [word_offset, word_offset + ceil(neurons / 64)) of each row of a
  // preallocated int64 [N, total_words] `out`; other words are untouched.
  m.def(
      "threshold_pack_into(Tensor x, Tensor thresholds, str granularity, Tensor(a!) out, "
      "int word_offset) -> ()",
      {at::Tag::flexible_layout});
  // Set bits per row in words [word_offset, word_offset + num_words) of int64 [N, W] packed
  // rows (the numerator of mean neuron coverage). Returns int64 [N].
  m.def("layer_popcount(Tensor packed, int word_offset, int num_words) -> Tensor");
  // The first num_features bits of each row, starting at word_offset, as bool [N, num_features].
  m.def("unpack_bits(Tensor packed, int word_offset, int num_features) -> Tensor");
  // A dense layer on packed rows without unpacking: int64 [N, W] packed, int32 [G, 16, O] nibble
  // table (fakespotter.ops.bitset_table; W == ceil(G / 16)), float32 [O] scale and optional bias.
  // Returns float32 [N, O] = float32(double(sum_g table[g, nibble g, :]) * scale + bias).
  m.def("bitset_linear(Tensor packed, Tensor table, Tensor scale, Tensor? bias) -> Tensor");
}
