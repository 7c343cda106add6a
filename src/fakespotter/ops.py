"""Typed wrappers over the native ops in ``torch.ops.fakespotter``.

The ops themselves go through the PyTorch dispatcher, so they work eagerly, under
``torch.compile``, ``torch.export`` and TorchScript, on CPU and (when built with it) CUDA. Bit
layout: feature ``i`` of a row is bit ``i % 64`` of int64 word ``i // 64``; see ``reference``.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from .reference import WORD_BITS

__all__ = [
    "threshold_pack",
    "threshold_pack_into",
    "layer_popcount",
    "unpack_bits",
    "num_words",
    "quantize_linear",
    "bitset_table",
    "bitset_linear",
]

INT32_MAX = 2**31 - 1


def num_words(num_features: int) -> int:
    """Words a layer of ``num_features`` neurons occupies in a packed row."""
    return -(-num_features // WORD_BITS)


def _as_thresholds(thresholds, x: torch.Tensor, op: str) -> torch.Tensor:
    """A tensor as given (the op checks it); a float, or a list or numpy array of floats, as float32."""
    if isinstance(thresholds, torch.Tensor):
        return thresholds
    def real(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))

    try:
        if real(thresholds):
            return torch.tensor([float(thresholds)], dtype=torch.float32, device=x.device)
        if isinstance(thresholds, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in thresholds):
            raise TypeError  # (numpy would make [True, 0.5] a float array)
        values = np.asarray(thresholds)
        # numbers only: None, strings and bools are refused, not parsed (np.asarray(None, np.float32) is NaN,
        # which sets no bit); an object array (Python ints beyond int64, fractions) must hold real numbers
        if values.dtype.kind not in "fiuO" or (values.dtype.kind == "O" and not all(map(real, values.reshape(-1)))):
            raise TypeError
        values = values.astype(np.float32).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{op}: thresholds must be a float, or a float32 tensor / array / list of floats, "
                        f"got {type(thresholds).__name__}") from None
    return torch.from_numpy(values).to(x.device)


def threshold_pack(x: torch.Tensor, thresholds, granularity: str = "channel") -> torch.Tensor:
    """Threshold a layer's activations and pack the bits, in one pass over ``x``.

    Args:
        x (Tensor[N, C, *spatial] or Tensor[N, D]): float32, float16 or bfloat16, any strides.
        thresholds (Tensor, array, list or float): float32; one value for the layer (paper Eq. 1) or one per
            neuron (``C`` in channel granularity, ``C * prod(spatial)`` in element granularity).
        granularity: ``"channel"`` (a neuron is a channel, valued by its spatial mean) or
            ``"element"`` (every element is a neuron, in logical C, H, W order).

    Returns:
        Tensor[N, ceil(neurons / 64)] int64: bit ``i`` set when neuron ``i`` > its threshold.
    """
    return torch.ops.fakespotter.threshold_pack(x, _as_thresholds(thresholds, x, "threshold_pack"), granularity)


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
        x, _as_thresholds(thresholds, x, "threshold_pack_into"), granularity, out, word_offset
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


def quantize_linear(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a dense layer's weights for :func:`bitset_table`.

    Args:
        weight (Tensor[O, B] float): a ``torch.nn.Linear`` weight over B input bits.

    Returns:
        ``(q, scale)``: q (Tensor[B, O] int32) and scale (Tensor[O] float32, a power of two) with
        ``weight.T ~= q * scale``. Each output gets the finest power-of-two step for which its
        column of ``|q|`` sums to at most 2^31 - 1, so every partial sum is exact in int32. Error
        bound for a row with k bits set: ``|bits . q * scale - bits . weight| <= k * scale / 2``.
        ValueError for weights that are not a float matrix, not finite, or (float64 weights) so
        large that no float32 scale keeps a row's sum within int32.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_linear: weight must be a float [outputs, inputs] matrix, got {weight.dtype} of shape {list(weight.shape)}")
    w = weight.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("quantize_linear: weight has NaN or infinite entries")
    inputs = w.shape[1]
    budget = INT32_MAX - inputs  # rounding adds at most 1/2 per entry; keep a whole unit each
    if budget <= 0:
        raise ValueError(f"quantize_linear: {inputs} inputs is too many for exact int32 sums")
    total = w.abs().sum(dim=1)  # [O]
    exponent = torch.floor(torch.log2(budget / total.clamp_min(1e-300)))
    # (a row of zeros needs no step: the upper bound; the lower one keeps the float32 scale finite)
    exponent = exponent.clamp(-126, 100)
    q = torch.round(w * torch.exp2(exponent)[:, None])
    big = q.abs().sum(dim=1) > INT32_MAX
    if big.any():
        o = int(big.nonzero()[0])
        raise ValueError(f"quantize_linear: the weights of output {o} sum to {float(total[o]):g} in absolute value, "
                         f"too large for int32 sums with a float32 scale")
    scale = torch.exp2(-exponent).to(torch.float32)
    return q.to(torch.int32).T.contiguous(), scale


def bitset_table(q: torch.Tensor) -> torch.Tensor:
    """Regroup quantized weights by nibbles of the packed row for :func:`bitset_linear`.

    Args:
        q (Tensor[B, O] int32): one row per input bit (feature i = bit i of the packed row).

    Returns:
        Tensor[ceil(B / 4), 16, O] int32: ``table[g, m, o]`` = sum of ``q[4g + j, o]`` over the
        set bits j of m. Refused if a column of ``|q|`` sums past 2^31 - 1 (sums would not be
        exact in int32); :func:`quantize_linear` never produces such weights.
    """
    if q.dtype != torch.int32 or q.dim() != 2:
        raise ValueError(f"bitset_table: q must be int32 of shape [inputs, outputs], got {q.dtype} of shape {list(q.shape)}")
    q64 = q.to(torch.int64)
    sums = q64.abs().sum(dim=0)
    if sums.numel() and int(sums.max()) > INT32_MAX:
        o = int(sums.argmax())
        raise ValueError(
            f"bitset_table: the weights of output {o} sum to {int(sums[o])} in absolute value; at "
            f"most {INT32_MAX} keeps the int32 sums exact (quantize with a coarser scale)"
        )
    inputs, outputs = q.shape
    groups = -(-inputs // 4)
    padded = torch.zeros(groups * 4, outputs, dtype=torch.int64, device=q.device)
    padded[:inputs] = q64
    masks = ((torch.arange(16, device=q.device)[:, None] >> torch.arange(4, device=q.device)) & 1).to(torch.int64)
    table = (masks[None, :, :, None] * padded.reshape(groups, 1, 4, outputs)).sum(dim=2)
    return table.to(torch.int32).contiguous()


def bitset_linear(packed: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A dense layer evaluated on packed rows, without unpacking them.

    Args:
        packed (Tensor[N, W] int64): packed rows (bit i = input i).
        table (Tensor[G, 16, O] int32): from :func:`bitset_table`; ``ceil(G / 16) == W``.
        scale (Tensor[O] float32), bias (Tensor[O] float32 or None): from :func:`quantize_linear`
            and the layer.

    Returns:
        Tensor[N, O] float32: ``float32(double(exact integer sum) * scale + bias)``; equal, bit for
        bit, to ``unpack(packed).double() @ (q * scale).double() + bias`` rounded to float32.
    """
    return torch.ops.fakespotter.bitset_linear(packed, table, scale, bias)
