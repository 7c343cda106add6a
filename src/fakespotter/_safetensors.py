"""A minimal, dependency-free reader and writer of the safetensors file format.

Format (https://github.com/huggingface/safetensors): an unsigned little-endian 64-bit header
length ``n``; ``n`` bytes of UTF-8 JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (byte offsets into the data that follows)
and an optional ``"__metadata__"`` mapping of strings to strings; then the tensors' bytes,
little-endian, C order, back to back. Files written here are readable by the ``safetensors``
package and vice versa. Nothing in a file is ever executed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from ._atomic import write_atomic

__all__ = ["save_file", "load_file", "SafetensorsError"]

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_BY_NAME = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file is not valid safetensors; the message names the file and the problem."""


def save_file(tensors: Mapping[str, torch.Tensor], path: Union[str, Path],
              metadata: Optional[Mapping[str, str]] = None, replace: bool = True) -> None:
    """Write ``tensors`` (CPU copies are taken) and string ``metadata`` atomically to ``path``
    (``replace=False``: keep a file there, FileExistsError; see :func:`write_atomic`)."""
    path = Path(path)
    header: Dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("save_file: metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    blobs = []
    offset = 0
    for name, t in tensors.items():
        if name == "__metadata__":
            raise ValueError("save_file: '__metadata__' is not a valid tensor name")
        if t.dtype not in _DTYPES:
            raise TypeError(f"save_file: {name}: unsupported dtype {t.dtype}")
        data = t.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((-len(head)) % 8)
    write_atomic(path, b"".join([struct.pack("<Q", len(head)), head, *blobs]), replace=replace)


def load_file(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read ``(tensors, metadata)`` from ``path``; malformed files raise ``SafetensorsError``."""
    path = Path(path)

    def fail(what: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: not a valid safetensors file: {what}")

    with open(path, "rb") as f:  # the header is read and checked before the (maybe huge) rest
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise fail(f"{len(head)} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise fail(f"header length {n} does not fit in the file of {size} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # (ValueError: also a number of 5000 digits)
            raise fail(f"header is not JSON that can be read ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(header, dict):
            raise fail("header is not a JSON object")
        body = memoryview(f.read())
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # (null: none, as the safetensors library reads it)
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise fail("__metadata__ must map strings to strings")
    tensors: Dict[str, torch.Tensor] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = _BY_NAME[info["dtype"]]
            shape, offsets = info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                    and all(type(v) is int for v in shape + offsets)):  # (not bools, floats, strings)
                raise TypeError
            begin, end = offsets
        except (KeyError, TypeError):
            raise fail(f"tensor {name!r}: bad entry {str(info)[:200]}") from None
        numel = 1
        for s in shape:
            if not 0 <= s < 2**62:
                raise fail(f"tensor {name!r}: dimension out of range in {str(shape)[:200]}")
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(body) or end - begin != numel * itemsize:
            raise fail(f"tensor {name!r}: data_offsets [{begin}, {end}] do not hold "
                       f"{numel} x {info['dtype']} within {len(body)} data bytes")
        spans.append((begin, end))
        raw = bytearray(body[begin:end])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise fail("tensor data overlaps or leaves holes")
        position = end
    if position != len(body):
        raise fail(f"{len(body) - position} trailing bytes after the last tensor")
    return tensors, dict(metadata)
