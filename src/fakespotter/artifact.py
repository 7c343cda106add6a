"""The model file: one safetensors file, tensors plus a JSON metadata header.

Layout: the safetensors header's ``__metadata__`` holds two strings,

* ``fakespotter``: JSON with ``format`` ("fakespotter-model"), ``format_version``,
  ``bit_layout_version`` and everything the detector needs (backbone id and weights sha256,
  preprocessing, layers, granularity, threshold mode, classifier type and parameters, operating
  threshold, training summary);
* ``content_sha256``: a digest over that JSON and every tensor (name, dtype, shape, bytes), so a
  header edited by hand, tensors swapped between names, or a file damaged in transit is refused
  instead of silently scoring differently.

Tensors: ``threshold.<i>`` (one per monitored layer), ``classifier.*``, and from format version 2
``training.images``, the fingerprints of the image files the model was trained and validated on
(the first 64 bits of each file's sha256, int64, sorted), when it learnt from files.

Nothing in a model file is ever executed (no pickle); reading validates everything before
anything is built, so a refused file is never half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from ._safetensors import SafetensorsError, load_file, save_file
from .manifest import file_sha256  # (one sha256 of a file for the package; used from here too)

__all__ = ["FORMAT", "FORMAT_VERSION", "BIT_LAYOUT_VERSION", "ModelFileError", "write_model", "read_model",
           "image_fingerprints"]

FORMAT = "fakespotter-model"
# 2: may hold TRAINING_IMAGES. A file is written with the lowest version that describes it, so
# that a file without that tensor still loads where only version 1 is known.
FORMAT_VERSION = 2
TRAINING_IMAGES = "training.images"  # fingerprints of the image files a model learnt from (int64 [n])
BIT_LAYOUT_VERSION = 1  # csrc/bitpack.h: feature i = bit i % 64 of word i // 64, layers word-aligned


class ModelFileError(ValueError):
    """A model file is refused; the message names the file and the problem."""


def content_digest(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_model(path: Union[str, Path], tensors: Mapping[str, torch.Tensor], meta: Mapping,
                overwrite: bool = False) -> Path:
    """Write a model file atomically. An existing file is kept unless ``overwrite=True``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the model file's path (e.g. {path / 'model.fsm'})")
    if os.path.lexists(path) and not overwrite:  # (a dangling link too: something is there)
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    full = dict(meta)
    version = FORMAT_VERSION if TRAINING_IMAGES in tensors else 1
    full.update(format=FORMAT, format_version=version, bit_layout_version=BIT_LAYOUT_VERSION)
    meta_json = json.dumps(full, sort_keys=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"fakespotter": meta_json, "content_sha256": content_digest(meta_json, tensors)}
    try:
        save_file(tensors, path, metadata, replace=overwrite)
    except FileExistsError:  # made while this one was being written
        raise FileExistsError(f"{path} already exists (it appeared while the model was being written); pass "
                              f"overwrite=True (CLI: --overwrite) to replace it") from None
    return path


def read_model(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read and check a model file: ``(tensors, meta)``, or :class:`ModelFileError`."""
    path = Path(path)
    if not path.is_file():
        what = ("is a folder, not a model file" if path.is_dir() else
                "is not a regular file (a FIFO or device?)" if path.exists() else "no such model file")
        raise ModelFileError(f"{path}: {what}")
    try:
        tensors, metadata = load_file(path)
    except SafetensorsError as e:
        raise ModelFileError(f"{e} (truncated or not a model file?)") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if "fakespotter" not in metadata:
        raise ModelFileError(f"{path}: a safetensors file, but not a fakespotter model (no 'fakespotter' metadata)")
    meta_json = metadata["fakespotter"]
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: the 'fakespotter' metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: metadata format is {meta.get('format') if isinstance(meta, dict) else meta!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if not (isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= FORMAT_VERSION):
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ModelFileError(
            f"{path}: model format version {version!r} is not supported (this fakespotter reads "
            f"versions 1 to {FORMAT_VERSION}{'; upgrade fakespotter' if newer else ''})"
        )
    if TRAINING_IMAGES in tensors and version < 2:
        raise ModelFileError(f"{path}: format version {version} holds no {TRAINING_IMAGES} tensor, but this file does")
    if meta.get("bit_layout_version") != BIT_LAYOUT_VERSION:
        raise ModelFileError(
            f"{path}: bit layout version {meta.get('bit_layout_version')!r} differs from this "
            f"fakespotter's {BIT_LAYOUT_VERSION}: its thresholds and classifier do not fit the rows"
        )
    if metadata.get("content_sha256") != content_digest(meta_json, tensors):
        raise ModelFileError(
            f"{path}: content digest mismatch: the header or the tensors were changed after the "
            f"file was written (or the file is damaged); refusing to load it"
        )
    return tensors, meta




def fingerprint(sha256_hex: str) -> int:
    """The first 64 bits of a sha256 as a signed int64 (what ``training.images`` holds)."""
    return int.from_bytes(bytes.fromhex(sha256_hex[:16]), "little", signed=True)


def file_digests(paths: Iterable[Union[str, "os.PathLike[str]"]],
                 known: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """sha256 of files by ``str(path)``: from ``known`` (e.g. a manifest's, whose files are not
    opened) where it has the path, else hashed, leaving out the files that cannot be read."""
    out: Dict[str, str] = {}
    for p in paths:
        key = str(p)
        try:
            out[key] = known[key] if known and key in known else file_sha256(p)
        except OSError:
            continue
    return out


def image_fingerprints(paths: Iterable[Union[str, "os.PathLike[str]"]],
                       digests: Optional[Mapping[str, str]] = None) -> Optional[torch.Tensor]:
    """int64 [n], sorted and unique: the fingerprints of the readable files' sha256 (see
    :func:`file_digests`); None for no file. A model file keeps those of the images it was
    trained and validated on (tensor ``training.images``), so that evaluating it on them can be
    flagged."""
    values = {fingerprint(d) for d in file_digests(paths, digests).values()}
    if not values:
        return None
    return torch.tensor(sorted(values), dtype=torch.int64)
