"""From images or face chips to packed activation rows: the Python API of the neuron monitor.

* :func:`chips` - detect and align faces (or resize already-aligned crops) into chips, to look
  at what the backbone will see;
* :func:`features` - packed rows ``int64 [M, words]`` for every face of every image (or every
  chip), with the image and face each row came from;
* :func:`mnc` - mean neuron coverage per monitored layer, from the rows.

A *chip batch* is ``uint8 [N, H, W, 3]`` RGB (numpy array or tensor) or ``float32
[N, 3, H, W]`` with values 0..255, where ``(H, W)`` is the backbone's input size; the tap's
preprocessing turns it into the module's input.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .faces import DETECT_PIXELS, WEAK_FACE_SCORE
from .taps import Tap, exact_float32

__all__ = ["Chips", "Features", "chips", "features", "mnc", "prepare_chips"]


@dataclass
class Chips:
    """Face chips and where they came from.

    array: uint8 [M, H, W, 3]; image_index / face_index: int64 [M] (face 0 is the detector's
    highest-scoring face; always 0 for aligned inputs); faces: the ``faces.Face`` records
    (box, landmarks, score), ``None`` for aligned inputs.
    """

    array: np.ndarray
    image_index: np.ndarray
    face_index: np.ndarray
    faces: List[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.array.shape[0])


@dataclass
class Features:
    """Packed rows and their provenance: rows int64 [M, words]; image_index, face_index int64 [M].

    Images in which no face was found have no row (see ``images_without_faces``).
    """

    rows: Tensor
    image_index: np.ndarray
    face_index: np.ndarray
    images_without_faces: List[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def _is_chip_batch(x: Any) -> bool:
    return isinstance(x, (np.ndarray, Tensor)) and x.ndim == 4


def as_image_list(images: Any) -> List[Any]:
    """``images`` as a list of images: one image (a path, encoded bytes, a PIL image or an
    ``[H, W]`` / ``[H, W, C]`` array) becomes a list of one; any other iterable is listed."""
    return list(image_iterable(images)[0])


def image_iterable(images: Any) -> Tuple[Iterable[Any], bool]:
    """(images, alone): one image as a list of one, a sequence as it is, any other iterable (a
    generator) as an iterator, read as it is consumed; ``alone``: one image, or a sequence of one
    (its errors then name no index). Refuses what is neither an image nor a sequence of them."""
    from PIL import Image

    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)):
        return [images], True
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        return [images], True
    if isinstance(images, np.ndarray) and images.ndim == 1 and images.dtype.kind in "UO":
        images = images.tolist()  # paths, e.g. a DataFrame column's .values
    if isinstance(images, Tensor) and images.dim() == 2 and images.dtype not in (torch.uint8, torch.bool) and not images.is_floating_point():
        raise TypeError(f"images: a 2-d {str(images.dtype).replace('torch.', '')} tensor is neither images nor "
                        f"packed rows: packed rows are int64 [N, words]")
    if isinstance(images, Tensor) and images.dim() in (2, 3):
        raise TypeError(f"images: a torch tensor is taken as a chip batch (uint8 [N, H, W, 3] or float32 "
                        f"[N, 3, H, W]); pass one image as a numpy array (tensor.numpy()), got shape "
                        f"{list(images.shape)}")
    if isinstance(images, (np.ndarray, Tensor)):
        raise ValueError(f"images: an array of images must be a list of [H, W] or [H, W, C] arrays, or a chip "
                         f"batch [N, H, W, 3] / [N, 3, H, W]; got shape {list(images.shape)}")
    if isinstance(images, (dict, set)):
        raise TypeError(f"images: expected an image or a sequence of images, got a {type(images).__name__} "
                        f"(its order is not the images' order)")
    if callable(getattr(images, "read", None)):  # (iterating one gives its lines, each taken as an image)
        raise TypeError(f"images: a file object ({type(images).__name__}) is not taken: pass its bytes "
                        f"(f.read()) or the file's path")
    if isinstance(images, Sequence) or (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
        return images, len(images) == 1  # (a list, a tuple, a pandas Series of paths)
    try:
        return iter(images), False
    except TypeError:
        raise TypeError(f"images: expected an image (path, bytes, PIL image, array) or a sequence of them, "
                        f"got {type(images).__name__}") from None


def prepare_chips(chips: Any, tap: Tap, what: str = "features") -> Tensor:
    """Validate a chip batch; return float32 [N, 3, H, W] 0..255 on the tap's device, in
    channels_last memory (what the scanner's uint8 [N, H, W, 3] batches are: a convolution's sums
    round differently in the other layout, and the rows would differ from the scanner's in a few
    bits in millions).

    Raises TypeError (wrong type or dtype) / ValueError (wrong shape or size), naming what was
    expected and what arrived.
    """
    h, w = tap.preprocessing.size
    if isinstance(chips, np.ndarray):
        a = np.ascontiguousarray(chips)
        # (torch warns of a read-only array, a memmap say, rather than share it: a copy of the batch)
        chips = torch.from_numpy(a if a.flags.writeable else a.copy())
    if not isinstance(chips, Tensor):
        raise TypeError(f"{what}: chips must be uint8 [N, {h}, {w}, 3] or float32 [N, 3, {h}, {w}] "
                        f"(array or tensor), got {type(chips).__name__}")
    shape = list(chips.shape)
    if chips.dtype == torch.uint8:
        if chips.dim() != 4 or shape[3] != 3:
            raise ValueError(f"{what}: uint8 chips must be [N, {h}, {w}, 3] (RGB, channels last), "
                             f"got shape {shape}")
        if shape[1:3] != [h, w]:
            raise ValueError(f"{what}: chips must be {h}x{w} (the backbone's input size), got "
                             f"{shape[1]}x{shape[2]} (shape {shape}); a 4-d array is taken as a batch of "
                             f"chips: align faces with chips(), or pass the images as a list (one array "
                             f"each) with aligned=True to resize them")
        x = chips.permute(0, 3, 1, 2).to(torch.float32)
    elif chips.dtype == torch.float32:
        chips = chips.detach()  # (scores take no gradient; torch warns of float() on one that needs it)
        if chips.dim() != 4 or shape[1] != 3:
            raise ValueError(f"{what}: float32 chips must be [N, 3, {h}, {w}] (RGB 0..255), "
                             f"got shape {shape}")
        if shape[2:] != [h, w]:
            raise ValueError(f"{what}: chips must be {h}x{w} (the backbone's input size), got "
                             f"{shape[2]}x{shape[3]} (shape {shape})")
        if not bool(torch.isfinite(chips).all()):
            raise ValueError(f"{what}: float32 chips hold NaN or infinite values (expected RGB 0..255)")
        check_chip_range(chips, what)
        x = chips
    else:
        raise TypeError(f"{what}: chips must be uint8 [N, {h}, {w}, 3] or float32 [N, 3, {h}, {w}], "
                        f"got dtype {str(chips.dtype).replace('torch.', '')} with shape {shape}")
    return x.to(tap.thresholds.device).contiguous(memory_format=torch.channels_last)


def check_chip_range(chips: Tensor, what: str) -> None:
    """For float chips (RGB 0..255 is what every backbone's preprocessing takes): a ValueError
    for values outside 0..255, or all within 0..1 with fractions (the usual torch image scale,
    which would silently score every face wrong). Whole numbers are never refused: a very dark
    uint8 chip, as float, is all 0 and 1."""
    if chips.numel():
        lo, hi = float(chips.min()), float(chips.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{what}: float32 chips must be RGB 0..255, got values from {lo:g} to {hi:g} "
                             f"(normalised chips? the backbone's own preprocessing is applied to 0..255)")
        if 0 < hi <= 1 and bool((chips != chips.round()).any()):
            raise ValueError(f"{what}: float32 chips must be RGB 0..255, but every value is within 0..1 "
                             f"(max {hi:g}): multiply 0..1 chips by 255")


def _square_size(tap_or_size: Any) -> int:
    size = tap_or_size.preprocessing.size if isinstance(tap_or_size, Tap) else tap_or_size
    if isinstance(size, int):
        return size
    if size[0] != size[1]:
        raise ValueError(f"chips: face chips are square; the backbone wants {size[0]}x{size[1]}")
    return int(size[0])


def _iter_chips(images: Iterable[Any], alone: bool, size: int, aligned: bool, upsample: int,
                weak_face_score: float, detect_pixels: int) -> Iterator[Tuple[int, int, np.ndarray, Any]]:
    """(image index, face index, chip, face) of every face, image by image; an image without
    faces yields (index, -1, None, None), so that every image is counted as it is read."""
    from . import faces
    from .weights import WeightsError

    for i, image in enumerate(images):
        try:
            if aligned:
                found = [(faces.chip_from_aligned(image, size=size), None)]
            else:
                found = [(f.chip, f) for f in faces.detect_and_align(image, upsample=upsample, size=size,
                                                                     weak_face_score=weak_face_score,
                                                                     detect_pixels=detect_pixels)]
        except (ValueError, TypeError, OSError) as e:  # name the image when it is one of many
            if alone or isinstance(e, WeightsError):  # a missing model is no image's fault
                raise
            name = image if isinstance(image, (str, os.PathLike)) else type(image).__name__
            if isinstance(e, OSError) and e.errno is not None:  # FileNotFoundError, ...: same class, plus the index
                raise type(e)(e.errno, f"image {i}: {e.strerror}", e.filename) from e
            raise type(e)(f"image {i} ({name}): {e}") from e
        for j, (chip, face) in enumerate(found):
            yield i, j, chip, face
        if not found:
            yield i, -1, None, None


def chips(images: Any, aligned: bool = False, size: Any = 150, upsample: int = 1,
          weak_face_score: float = WEAK_FACE_SCORE, detect_pixels: int = DETECT_PIXELS) -> Chips:
    """Face chips of ``images`` (paths, PIL images or arrays; anything ``faces.load_image`` takes;
    a generator is read as the chips are made, one image at a time).

    aligned=False: every detected face becomes a chip (dlib 5-point alignment, padding 0.25;
    weak detections beside a face scoring ``weak_face_score`` or more are dropped, see
    ``faces.detect_and_align``, like ``detect_pixels``); an image without faces contributes none.
    aligned=True: each image is one already-aligned chip, only resized. ``size`` is an int or a
    Tap (its input size).
    """
    s = _square_size(size)
    found = [x for x in _iter_chips(*image_iterable(images), s, aligned, upsample, weak_face_score, detect_pixels)
             if x[2] is not None]
    array = (np.stack([c for _, _, c, _ in found]) if found
             else np.zeros((0, s, s, 3), dtype=np.uint8))
    return Chips(array=array,
                 image_index=np.array([i for i, _, _, _ in found], dtype=np.int64),
                 face_index=np.array([j for _, j, _, _ in found], dtype=np.int64),
                 faces=[f for _, _, _, f in found])


class FaceRows:
    """The packed rows of the faces of ``images``, computed a batch of ``batch_size`` chips at a
    time as the images are read (a generator is never listed): iterating gives (image index
    [k], face index [k], rows int64 [k, words]) per batch; afterwards ``images`` is the number
    of images read and ``without_faces`` the indices of those without a face."""

    def __init__(self, images: Any, tap: Tap, aligned: bool = False, batch_size: int = 64, upsample: int = 1,
                 weak_face_score: float = WEAK_FACE_SCORE, detect_pixels: int = DETECT_PIXELS):
        _check_tap_and_batch_size(tap, batch_size)
        self._chips = _iter_chips(*image_iterable(images), _square_size(tap), aligned, upsample,
                                  weak_face_score, detect_pixels)
        self._tap, self._batch_size = tap, int(batch_size)
        self.images = 0
        self.without_faces: List[int] = []

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray, Tensor]]:
        pending: List[Tuple[int, int, np.ndarray]] = []
        for i, j, chip, _ in self._chips:
            self.images = i + 1
            if chip is None:
                self.without_faces.append(i)
                continue
            pending.append((i, j, chip))
            if len(pending) == self._batch_size:
                yield self._rows(pending)
                pending = []
        if pending:
            yield self._rows(pending)

    def collect(self) -> Features:
        """All the rows, as :class:`Features`."""
        batches = list(self)
        none = [np.zeros(0, np.int64)]
        return Features(rows=_cat_rows([r for _, _, r in batches], self._tap),
                        image_index=np.concatenate([i for i, _, _ in batches] or none),
                        face_index=np.concatenate([j for _, j, _ in batches] or none),
                        images_without_faces=self.without_faces)

    def _rows(self, pending: List[Tuple[int, int, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray, Tensor]:
        x = prepare_chips(np.stack([c for _, _, c in pending]), self._tap)
        with torch.no_grad(), exact_float32():
            rows = self._tap(self._tap.prepare(x))
        return (np.array([i for i, _, _ in pending], dtype=np.int64),
                np.array([j for _, j, _ in pending], dtype=np.int64), rows)


def features(images_or_chips: Any, tap: Tap, aligned: bool = False, batch_size: int = 64,
             upsample: int = 1, weak_face_score: float = WEAK_FACE_SCORE,
             detect_pixels: int = DETECT_PIXELS) -> Features:
    """Packed activation rows of every face (or chip), in batches of ``batch_size``.

    images_or_chips: a chip batch (4-d array or tensor, see the module docstring), or a sequence
        of images (one image alone is accepted too); images are turned into chips as
        :func:`chips` does, streaming: one batch of chips is held at a time, and a generator
        of images is read as it goes.
    Returns :class:`Features`: rows int64 [M, tap.layout.total_words] plus the image / face
    index of each row.
    """
    if not _is_chip_batch(images_or_chips):
        return FaceRows(images_or_chips, tap, aligned, batch_size, upsample, weak_face_score, detect_pixels).collect()
    _check_tap_and_batch_size(tap, batch_size)
    out: List[Tensor] = []
    n = int(images_or_chips.shape[0])
    with torch.no_grad(), exact_float32():
        for start in range(0, max(n, 1), batch_size):  # float32 on the device one batch at a time
            x = prepare_chips(images_or_chips[start:start + batch_size], tap)
            if x.shape[0]:
                out.append(tap(tap.prepare(x)))
    return Features(rows=_cat_rows(out, tap), image_index=np.arange(n, dtype=np.int64),
                    face_index=np.zeros(n, dtype=np.int64))


# Chips per backbone forward at most: the dlib backbone's forward holds about 2 MiB per chip on a
# CPU, so 4096 take ~8 GiB; past a few hundred a GPU gains nothing either. (A larger request, with
# memory overcommitted as Linux does by default, got the process killed rather than a MemoryError
# the scanner's back-off could catch.)
MAX_BATCH_SIZE = 4096


def check_batch_size(value: Any, what: str) -> int:
    """``value`` as an int from 1 to :data:`MAX_BATCH_SIZE`, else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_BATCH_SIZE:
        raise ValueError(f"{what}: batch_size must be an int from 1 to {MAX_BATCH_SIZE}, got {value!r}")
    return int(value)


def _check_tap_and_batch_size(tap: Any, batch_size: Any) -> None:
    check_batch_size(batch_size, "features")
    if not isinstance(tap, Tap):
        raise TypeError(f"features: tap must be a Tap, got {type(tap).__name__}")


def _cat_rows(out: List[Tensor], tap: Tap) -> Tensor:
    return torch.cat(out) if out else torch.zeros((0, tap.layout.total_words), dtype=torch.int64,
                                                  device=tap.thresholds.device)


def mnc(rows: Any, tap: Tap) -> Tensor:
    """Mean neuron coverage per monitored layer (paper Eq. 2): float32 [N, L].

    rows: int64 [N, words] packed rows, a tensor or numpy array (or a :class:`Features`).
    """
    if isinstance(rows, Features):
        rows = rows.rows
    return tap.mnc(rows_tensor(rows))


def rows_tensor(rows: Any) -> Tensor:
    """Packed rows as a tensor: a tensor as it is; a numpy array shared, or copied where torch
    cannot share it (negative strides; read-only, like a view of a file)."""
    if isinstance(rows, Tensor):
        return rows
    rows = np.asarray(rows)
    if not rows.flags.writeable or any(s < 0 for s in rows.strides):
        rows = rows.copy()
    return torch.from_numpy(rows)
