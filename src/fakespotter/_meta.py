"""Fake (meta) kernels: output shapes for torch.compile, torch.export and FakeTensor tracing.

They run the same argument checks as the native ops (shared with the pure-torch twins), so a
bad call fails the same way while tracing as it does eagerly.
"""

from __future__ import annotations

import torch

from . import reference

_lib = "fakespotter::"


@torch.library.register_fake(_lib + "threshold_pack")
def _threshold_pack_fake(x, thresholds, granularity):
    features = reference.check_pack_args("threshold_pack", x, thresholds, granularity)
    words = (features + reference.WORD_BITS - 1) // reference.WORD_BITS
    return x.new_empty((x.shape[0], words), dtype=torch.int64)


@torch.library.register_fake(_lib + "threshold_pack_into")
def _threshold_pack_into_fake(x, thresholds, granularity, out, word_offset):
    features = reference.check_pack_args("threshold_pack_into", x, thresholds, granularity)
    reference.check_out_args("threshold_pack_into", x, features, out, word_offset)


@torch.library.register_fake(_lib + "layer_popcount")
def _layer_popcount_fake(packed, word_offset, num_words):
    reference.check_packed_args("layer_popcount", packed, word_offset, num_words)
    return packed.new_empty((packed.shape[0],), dtype=torch.int64)


@torch.library.register_fake(_lib + "unpack_bits")
def _unpack_bits_fake(packed, word_offset, num_features):
    if num_features < 0:
        raise ValueError(f"unpack_bits: num_features must be >= 0, got {num_features}")
    words = (num_features + reference.WORD_BITS - 1) // reference.WORD_BITS
    reference.check_packed_args("unpack_bits", packed, word_offset, words)
    return packed.new_empty((packed.shape[0], num_features), dtype=torch.bool)


@torch.library.register_fake(_lib + "bitset_linear")
def _bitset_linear_fake(packed, table, scale, bias):
    reference.check_linear_args("bitset_linear", packed, table, scale, bias)
    return packed.new_empty((packed.shape[0], table.shape[2]), dtype=torch.float32)
