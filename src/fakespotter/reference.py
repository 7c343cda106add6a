"""Pure-torch twins of the native ops: the executable specification and the test oracle.

Each function has the signature and the results of its ``torch.ops.fakespotter`` counterpart,
bit for bit, on any device. They are written for clarity, not speed. The bit layout and the
channel-mean summation order are those stated in ``csrc/bitpack.h``:

* feature ``i`` of a row lives in word ``i // 64``, bit ``i % 64`` (LSB first); padding bits are 0;
* element granularity numbers features ``c * S + s`` (``s`` row-major over the spatial dims);
  channel granularity numbers them ``c``;
* a channel's value is ``float32(sum / S)``, the float64 ``sum`` taken in 32 lanes (lane ``l``
  adds elements ``l, l + 32, ...`` in order) folded by halves (16, 8, 4, 2, 1);
* a bit is ``float32(value) > float32(threshold)``: strict, and 0 when either is NaN.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "WORD_BITS",
    "SUM_LANES",
    "threshold_pack",
    "threshold_pack_into",
    "layer_popcount",
    "unpack_bits",
    "pack_bits",
    "num_features",
    "bitset_linear",
]

WORD_BITS = 64
SUM_LANES = 32
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
    # (as c10 prints them; getattr: not every torch has them all)
    **{getattr(torch, name): c10 for name, c10 in (
        ("uint16", "UInt16"), ("uint32", "UInt32"), ("uint64", "UInt64"), ("complex32", "ComplexHalf"),
        ("float8_e4m3fn", "Float8_e4m3fn"), ("float8_e5m2", "Float8_e5m2"), ("float8_e4m3fnuz", "Float8_e4m3fnuz"),
        ("float8_e5m2fnuz", "Float8_e5m2fnuz"), ("float8_e8m0fnu", "Float8_e8m0fnu"), ("qint8", "QInt8"),
        ("quint8", "QUInt8"), ("qint32", "QInt32")) if hasattr(torch, name)},
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def num_features(x_shape, granularity: str) -> int:
    """Neurons of a layer with activation shape ``[N, C, *spatial]`` (or ``[N, D]``)."""
    if granularity == "channel":
        return x_shape[1]
    return x_shape[1] * _spatial(x_shape)


def _spatial(x_shape) -> int:
    spatial = 1
    for s in x_shape[2:]:
        spatial = spatial * s
    return spatial


def check_pack_args(op: str, x: torch.Tensor, thresholds: torch.Tensor, granularity: str) -> int:
    """The argument checks of threshold_pack; returns the number of features.

    Raises ValueError with the same messages as the native op.
    """
    if x.dim() < 2:
        raise ValueError(
            f"{op}: x must have shape [N, D] or [N, C, *spatial], got a {x.dim()}-d tensor "
            f"of shape {_shape(x)}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float32, float16 or bfloat16, got {_dtype_name(x.dtype)}")
    if granularity not in ("channel", "element"):
        raise ValueError(f"{op}: granularity must be 'channel' or 'element', got '{granularity}'")
    features = num_features(x.shape, granularity)
    if thresholds.dtype != torch.float32:
        raise ValueError(f"{op}: thresholds must be float32, got {_dtype_name(thresholds.dtype)}")
    if thresholds.device != x.device:
        raise ValueError(
            f"{op}: thresholds must be on x's device ({x.device}), got {thresholds.device}"
        )
    n = thresholds.numel()
    if n != 1 and n != features:
        raise ValueError(
            f"{op}: thresholds must have 1 entry (one per layer) or {features} entries "
            f"(one per {granularity}), got {n}"
        )
    return features


def check_out_args(op: str, x: torch.Tensor, features: int, out: torch.Tensor, word_offset: int) -> int:
    """The checks of threshold_pack_into's ``out`` / ``word_offset``; returns the layer's words."""
    words = -(-features // WORD_BITS)
    if out.dtype != torch.int64:
        raise ValueError(f"{op}: out must be int64, got {_dtype_name(out.dtype)}")
    if out.dim() != 2:
        raise ValueError(f"{op}: out must have shape [N, words], got shape {_shape(out)}")
    if out.device != x.device:
        raise ValueError(f"{op}: out must be on x's device ({x.device}), got {out.device}")
    if out.shape[0] != x.shape[0]:
        raise ValueError(
            f"{op}: out must have one row per row of x ({x.shape[0]}), got {out.shape[0]}"
        )
    if word_offset < 0:
        raise ValueError(f"{op}: word_offset must be >= 0, got {word_offset}")
    if word_offset + words > out.shape[1]:
        raise ValueError(
            f"{op}: out has {out.shape[1]} words per row, but this layer needs words "
            f"[{word_offset}, {word_offset + words}) (word_offset {word_offset} + {words} words)"
        )
    if out.shape[1] > 1 and out.stride(1) != 1:
        raise ValueError(
            f"{op}: out must have unit stride along its words, got strides "
            f"[{', '.join(str(s) for s in out.stride())}]"
        )
    if out.shape[0] > 1 and 0 < out.stride(0) < out.shape[1]:  # (stride 0: torch's own overlap error, below)
        raise ValueError(
            f"{op}: out's rows overlap (row stride {out.stride(0)} words, {out.shape[1]} words per row); "
            f"give each row memory of its own"
        )
    return words


def check_packed_args(op: str, packed: torch.Tensor, word_offset: int, num_words: int) -> None:
    if packed.dtype != torch.int64:
        raise ValueError(f"{op}: packed must be int64, got {_dtype_name(packed.dtype)}")
    if packed.dim() != 2:
        raise ValueError(f"{op}: packed must have shape [N, words], got shape {_shape(packed)}")
    if word_offset < 0 or num_words < 0:
        raise ValueError(
            f"{op}: word_offset and the word count must be >= 0, got {word_offset} and {num_words}"
        )
    if word_offset + num_words > packed.shape[1]:
        raise ValueError(
            f"{op}: packed has {packed.shape[1]} words per row, but words "
            f"[{word_offset}, {word_offset + num_words}) were asked for"
        )


def _channel_means(x: torch.Tensor) -> torch.Tensor:
    """float32 [N, C] channel means of x [N, C, *spatial] in the fixed float64 lane order."""
    n, c, s = x.shape[0], x.shape[1], _spatial(x.shape)
    v = x.reshape(n, c, s).to(torch.float64)  # exact for float32 / float16 / bfloat16
    pad = (-s) % SUM_LANES
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))  # +0.0 leaves every lane sum unchanged
    blocks = v.reshape(n, c, (s + pad) // SUM_LANES, SUM_LANES)
    lanes = torch.zeros(n, c, SUM_LANES, dtype=torch.float64, device=x.device)
    for k in range(blocks.shape[2]):  # sequential per lane, as the kernels do
        lanes = lanes + blocks[:, :, k, :]
    half = SUM_LANES // 2
    while half >= 1:
        lanes = lanes[..., :half] + lanes[..., half : 2 * half]
        half //= 2
    return (lanes[..., 0] / float(s)).to(torch.float32)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack bool [N, F] into int64 [N, ceil(F / 64)] words, feature i at word i // 64, bit i % 64."""
    n, f = bits.shape
    words = -(-f // WORD_BITS)
    padded = torch.zeros(n, words * WORD_BITS, dtype=torch.int64, device=bits.device)
    padded[:, :f] = bits.to(torch.int64)
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=bits.device)
    # Distinct powers of two: the (wrapping) int64 sum is their bitwise or; bit 63 is the sign.
    return (padded.reshape(n, words, WORD_BITS) << shifts).sum(dim=2)


def _layer_bits(x: torch.Tensor, thresholds: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity == "channel" and _spatial(x.shape) != 1:
        values = _channel_means(x)
    else:
        values = x.to(torch.float32).reshape(x.shape[0], num_features(x.shape, "element"))
    return values > thresholds.reshape(-1)


def threshold_pack(x: torch.Tensor, thresholds: torch.Tensor, granularity: str) -> torch.Tensor:
    """Twin of ``torch.ops.fakespotter.threshold_pack``: int64 [N, ceil(neurons / 64)]."""
    check_pack_args("threshold_pack", x, thresholds, granularity)
    return pack_bits(_layer_bits(x, thresholds, granularity))


def threshold_pack_into(
    x: torch.Tensor, thresholds: torch.Tensor, granularity: str, out: torch.Tensor, word_offset: int
) -> None:
    """Twin of ``torch.ops.fakespotter.threshold_pack_into``: writes the layer's words in place."""
    features = check_pack_args("threshold_pack_into", x, thresholds, granularity)
    words = check_out_args("threshold_pack_into", x, features, out, word_offset)
    check_no_alias("threshold_pack_into", out, x, thresholds)
    out[:, word_offset : word_offset + words] = pack_bits(_layer_bits(x, thresholds, granularity))


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """The bytes [first, end) that ``t``'s elements span (none when it is empty)."""
    if t.numel() == 0:
        return 0, 0
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def check_no_alias(op: str, out: torch.Tensor, x: torch.Tensor, thresholds: torch.Tensor) -> None:
    """threshold_pack_into: an ``out`` whose memory overlaps that of x or thresholds is refused
    (the kernels would read them after writing over them)."""
    o0, o1 = _byte_span(out)
    for name, t in (("x", x), ("thresholds", thresholds)):
        b0, b1 = _byte_span(t)
        if o0 < b1 and b0 < o1:
            raise ValueError(f"{op}: out shares memory with {name}, which would be read after being written over; "
                             f"give out memory of its own")


def unpack_bits(packed: torch.Tensor, word_offset: int, num_features: int) -> torch.Tensor:
    """Twin of ``torch.ops.fakespotter.unpack_bits``: bool [N, num_features]."""
    if num_features < 0:
        raise ValueError(f"unpack_bits: num_features must be >= 0, got {num_features}")
    words = -(-num_features // WORD_BITS)
    check_packed_args("unpack_bits", packed, word_offset, words)
    w = packed[:, word_offset : word_offset + words]
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=packed.device)
    bits = (w.unsqueeze(2) >> shifts) & 1
    return bits.reshape(packed.shape[0], words * WORD_BITS)[:, :num_features].to(torch.bool)


def layer_popcount(packed: torch.Tensor, word_offset: int, num_words: int) -> torch.Tensor:
    """Twin of ``torch.ops.fakespotter.layer_popcount``: int64 [N] set bits in the word range."""
    check_packed_args("layer_popcount", packed, word_offset, num_words)
    bits = unpack_bits(packed, word_offset, num_words * WORD_BITS)
    return bits.sum(dim=1, dtype=torch.int64)


def check_linear_args(op: str, packed, table, scale, bias) -> None:
    """The argument checks of bitset_linear (same messages as the native op)."""
    if packed.dtype != torch.int64:
        raise ValueError(f"{op}: packed must be int64, got {_dtype_name(packed.dtype)}")
    if packed.dim() != 2:
        raise ValueError(f"{op}: packed must have shape [N, words], got shape {_shape(packed)}")
    if table.dtype != torch.int32:
        raise ValueError(f"{op}: table must be int32, got {_dtype_name(table.dtype)}")
    if table.dim() != 3 or table.shape[1] != 16:
        raise ValueError(
            f"{op}: table must have shape [groups, 16, outputs] (fakespotter.ops.bitset_table), "
            f"got shape {_shape(table)}"
        )
    groups, outputs = table.shape[0], table.shape[2]
    words = (groups + 15) // 16
    if words != packed.shape[1]:
        raise ValueError(
            f"{op}: table covers {groups} groups of 4 features = {words} words, packed has "
            f"{packed.shape[1]} words per row"
        )
    if scale.dtype != torch.float32 or scale.dim() != 1 or scale.shape[0] != outputs:
        raise ValueError(
            f"{op}: scale must be float32 of shape [{outputs}], got {_dtype_name(scale.dtype)} "
            f"of shape {_shape(scale)}"
        )
    for name, t in (("table", table), ("scale", scale)):
        if t.device != packed.device:
            raise ValueError(f"{op}: {name} must be on packed's device ({packed.device}), got {t.device}")
    if bias is not None:
        if bias.dtype != torch.float32 or bias.dim() != 1 or bias.shape[0] != outputs:
            raise ValueError(
                f"{op}: bias must be float32 of shape [{outputs}], got {_dtype_name(bias.dtype)} "
                f"of shape {_shape(bias)}"
            )
        if bias.device != packed.device:
            raise ValueError(f"{op}: bias must be on packed's device ({packed.device}), got {bias.device}")


def bitset_linear(packed: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    """Twin of ``torch.ops.fakespotter.bitset_linear``: float32 [N, O].

    ``acc[n, o] = sum_g table[g, nibble g of row n, o]`` (int32, wrapping), then
    ``float32(double(acc) * double(scale) + double(bias))``; no bias adds +0.0.
    """
    check_linear_args("bitset_linear", packed, table, scale, bias)
    n, groups, outputs = packed.shape[0], table.shape[0], table.shape[2]
    shifts = 4 * torch.arange(16, dtype=torch.int64, device=packed.device)
    nibbles = ((packed.unsqueeze(2) >> shifts) & 15).reshape(n, 16 * packed.shape[1])[:, :groups]
    g = torch.arange(groups, device=packed.device).expand(n, groups)
    acc = table.to(torch.int64)[g, nibbles].sum(dim=1)  # [N, O], exact
    acc = ((acc + 2**31) % 2**32) - 2**31  # the int32 wrap-around of the kernels
    b = bias.double() if bias is not None else torch.zeros(outputs, dtype=torch.float64, device=packed.device)
    return (acc.double() * scale.double() + b).to(torch.float32)
