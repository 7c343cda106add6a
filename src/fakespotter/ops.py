"""Typed wrappers over the native ops in ``torch.ops.fakespotter``.

The ops themselves go through the PyTorch dispatcher, so they work eagerly, under
``torch.compile``, ``torch.export`` and TorchScript, on CPU and (when built with it) CUDA. Bit
layout: feature ``i`` of a row is bit ``i % 64`` of int64 word ``i // 64``; see ``reference``.
"""

from __future__ import annotations

import torch

from .reference import WORD_BITS

__all__ = ["threshold_pack", "threshold_pack_into", "layer_popcount", "unpack_bits", "num_words"]


def num_words(num_features: int) -> int:
    """Words a layer of ``num_features`` neurons occupies in a packed row."""
    return -(-num_features // WORD_BITS)


def _as_thresholds(thresholds, x: torch.Tensor) -> torch.Tensor:
    if isinstance(thresholds, torch.Tensor):
        return thresholds
    return torch.tensor([float(thresholds)], dtype=torch.float32, device=x.device)


def threshold_pack(x: torch.Tensor, thresholds, granularity: str = "channel") -> torch.Tensor:
    """Threshold a layer's activations and pack the bits, in one pass over ``x``.

    Args:
        x (Tensor[N, C, *spatial] or Tensor[N, D]): float32, float16 or bfloat16, any strides.
        thresholds (Tensor or float): float32; one value for the layer (paper Eq. 1) or one per
            neuron (``C`` in channel granularity, ``C * prod(spatial)`` in element granularity).
        granularity: ``"channel"`` (a neuron is a channel, valued by its spatial mean) or
            ``"element"`` (every element is a neuron, in logical C, H, W order).

    Returns:
        Tensor[N, ceil(neurons / 64)] int64: bit ``i`` set when neuron ``i`` > its threshold.
    """
    return torch.ops.fakespotter.threshold_pack(x, _as_thresholds(thresholds, x), granularity)


def threshold_pack_into(
    x: torch.Tensor,
    thresholds,
    out: torch.Tensor,
    word_offset: int,
    granularity: str = "channel",
) -> None:
    """Like :func:`threshold_pack`, but write the words into ``out[:, word_offset:]`` in place.

    Args:
        out (Tensor[N, total_words] int64): the preallocated feature rows; only this layer's words
            ``[word_offset, word_offset + ceil(neurons / 64))`` are written.
    """
    torch.ops.fakespotter.threshold_pack_into(
        x, _as_thresholds(thresholds, x), granularity, out, word_offset
    )


def layer_popcount(packed: torch.Tensor, word_offset: int = 0, num_words: int | None = None) -> torch.Tensor:
    """Set bits per row in ``packed[:, word_offset : word_offset + num_words]``.

    Args:
        packed (Tensor[N, W] int64): packed rows. ``num_words`` defaults to the rest of the row.

    Returns:
        Tensor[N] int64. Divided by a layer's neuron count it is the paper's mean neuron coverage.
    """
    if num_words is None:
        num_words = packed.shape[-1] - word_offset
    return torch.ops.fakespotter.layer_popcount(packed, word_offset, num_words)


def unpack_bits(packed: torch.Tensor, num_features: int | None = None, word_offset: int = 0) -> torch.Tensor:
    """The bits of packed rows as Tensor[N, num_features] bool (for training and debugging).

    ``num_features`` defaults to every bit from ``word_offset`` to the end of the row.
    """
    if num_features is None:
        num_features = (packed.shape[-1] - word_offset) * WORD_BITS
    return torch.ops.fakespotter.unpack_bits(packed, word_offset, num_features)
