"""Decode images, detect faces and align them into the chips the default backbone expects.

The chip pipeline is dlib's own: the HOG frontal face detector, the 5-point landmark model and
``dlib.get_face_chip(img, shape, size=150, padding=0.25)``, which is how the face-recognition
ResNet's training chips were made.  dlib comes from the prebuilt PyPI wheel
``dlib-bin==20.0.1.post1`` and is imported only when detection is first used.

Decoding (``load_image``) turns any input into RGB uint8 ``[H, W, 3]`` the same way every time:

* files and bytes are decoded with Pillow, in the formats the scanner reads
  (``data.IMAGE_FORMATS``; no plugin that runs an external program, such as EPS's, and Pillow's
  decompression-bomb limit applies), JPEGs in RGB or grey with libjpeg-turbo through simplejpeg
  (the same pixels), with the scanner's refusals (``data.decode_image``): damaged JPEG scan
  data, a JPEG of more than ``data.MAX_JPEG_SCANS`` scans, PNG image data that ends early or
  fails its CRC (a PIL image passed in is taken as Pillow decodes it); the EXIF orientation is applied first
  (as Pillow's ``getexif`` reads it: EXIF, or XMP's ``tiff:Orientation`` when there is no EXIF); an EXIF
  block that cannot be read, or an orientation outside 1..8, counts as upright rather than
  failing the image; multi-frame files give their first frame (a TIFF whose first page is a
  thumbnail gives the thumbnail);
* ``1`` / ``L`` (grey) replicate the grey value into R, G and B; ``P`` is expanded through its
  palette; ``CMYK`` (Pillow takes every CMYK JPEG as Adobe-inverted, with or without an Adobe
  marker), ``YCbCr``, ``LAB`` and other colour modes use Pillow's conversion to RGB; colour
  profiles (ICC, gAMA, ...) are ignored;
* 16-bit grey (``I;16*``) maps 0..65535 to 0..255 by ``round(v / 257)``; ``I`` (32-bit
  integers, e.g. 16-bit PPM/PGM or integer TIFF) is clipped to 0..65535 and mapped the same way,
  unless it comes from a TIFF or an in-memory image and no value exceeds 255: then it is 8-bit
  grey kept as 32-bit integers, taken as is (a PGM/PPM or PNG says its own scale: Pillow gives
  0..65535 for any maxval above 255, so a dark 16-bit PGM stays dark); 16-bit RGB(A) PNG and
  TIFF reach here as 8-bit, reduced by Pillow to the high byte (``v >> 8``, within 1 of
  ``round(v / 257)``); ``F`` (float) values are taken as 0..255, clipped and rounded, unless at
  most 0.1% of them exceed 1 (``FLOAT_OVERSHOOT``): then the image is scaled 0..1 (as float
  images saved from numpy or a scientific tool often are, highlights or a resize's overshoot
  aside) and multiplied by 255 first (taken as 0..255 it would be black);
* transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa`` and ``La``, palette
  transparency, and the one transparent colour of an RGB or grey image, 16-bit grey included)
  is composited over an opaque ``background``,
  black by default: ``round((rgb * a + background * (255 - a)) / 255)``; a BMP whose alpha is 0
  everywhere is taken as opaque (32-bit BMP writers often leave the alpha bytes 0; Chromium
  shows such files opaque too);
* numpy arrays are taken as RGB(A) or grey, ``uint8`` or ``uint16`` (scaled as above).
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile

from . import _libtiff
from ._errors import first_line

__all__ = [
    "CHIP_SIZE",
    "CHIP_PADDING",
    "Face",
    "ImageInput",
    "load_image",
    "detect_and_align",
    "DETECT_PIXELS",
    "MAX_DETECT_WIDTH",
    "PYRAMID_SPAN",
    "WEAK_FACE_SCORE",
    "chip_from_aligned",
    "to_tensor",
]

CHIP_SIZE = 150
CHIP_PADDING = 0.25
MIN_CHIP_SIDE = 16  # an "aligned chip" smaller than this, or further than 2:1 from square, is refused
FLOAT_OVERSHOOT = 0.001  # a float image with at most this share of values above 1 is taken as 0..1
LANDMARKS_NAME = "shape_predictor_5_face_landmarks.dat"
DLIB_INSTALL = "pip install 'fakespotter[faces]' (the prebuilt dlib-bin==20.0.1.post1)"
# Detections (dlib's HOG + linear SVM margin, cut at 0) scoring below this are weak: dropped from an
# image that holds a face scoring at least this, kept when they are all it holds.  Measured
# (benchmarks/RESULTS.md, "Weak face detections"): the detections that were not faces (a badge,
# fabric, beside real faces in group photos; each one scored as fake) scored 0.02-0.13; weak
# detections alone in their image were faces (low-fidelity 64 px DCGAN renders, mostly).
WEAK_FACE_SCORE = 0.15
# The face detector works on at most this many pixels (after upsampling; _detect says how).
# Images up to 2048x2048 with upsample=1 are within it; a 24 MP photo costs ~1.4 s instead of
# ~7.5 s and its faces are found down to ~100 px (benchmarks/RESULTS.md, "Detection on large
# images": a 2048x2048 cap missed two thirds of the faces of a 24 MP group photo).
DETECT_PIXELS = 4096 * 4096
# Below this a cap leaves the detector (an 80x80 px window) next to nothing to look at; it also
# catches a side length given for the pixel count.
MIN_DETECT_PIXELS = 256 * 256

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
Background = Tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face.

    box: ``(x0, y0, x1, y1)`` detector box in pixels of the (EXIF-upright) image, ``x1``/``y1``
        exclusive; it may extend past the image border.
    chip: ``uint8 [150, 150, 3]`` RGB aligned chip (dlib ``get_face_chip``, padding 0.25).
    score: detector confidence (higher is more face-like; dlib's threshold is 0).
    landmarks: ``int [5, 2]`` (x, y) of dlib's 5-point model, in image pixels.
    """

    box: Tuple[int, int, int, int]
    chip: np.ndarray
    score: float
    landmarks: np.ndarray


# ----------------------------------------------------------------------------------------------
# decoding


def _check_background(background: Sequence[int]) -> Background:
    bg = tuple(int(v) for v in background)
    if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
        raise ValueError(f"load_image: background must be 3 ints in 0..255, got {background!r}")
    return bg  # type: ignore[return-value]


# The per-pixel conversions below work in integers and in blocks of about this many pixels, so
# that a large image needs little memory beyond its own decoded copies.
_BLOCK_PIXELS = 1 << 20


def _row_blocks(a: np.ndarray) -> Iterator[slice]:
    rows = max(1, _BLOCK_PIXELS // max(1, a.shape[1])) if a.ndim > 1 else max(1, _BLOCK_PIXELS)
    return (slice(i, i + rows) for i in range(0, a.shape[0], rows))


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    # round(v / 257) after clipping to 0..65535, exactly: v / 257 is never halfway between integers
    out = np.empty(a.shape, np.uint8)
    for rows in _row_blocks(a):
        v = np.clip(a[rows], 0, 65535).astype(np.int32)
        v *= 2
        v += 257
        out[rows] = v // 514
    return out


def _composite(rgba: np.ndarray, background: Background) -> np.ndarray:
    # round((rgb * a + background * (255 - a)) / 255): at most 255 * 255 + 127, within uint16
    out = np.empty(rgba.shape[:-1] + (3,), np.uint8)
    bg = np.asarray(background, dtype=np.uint16)
    for rows in _row_blocks(rgba):
        a = rgba[rows, ..., 3:4].astype(np.uint16)
        v = rgba[rows, ..., :3].astype(np.uint16)
        v *= a
        v += bg * (255 - a)
        v += 127
        out[rows] = v // 255
    return out


def _from_array(a: np.ndarray, background: Background) -> np.ndarray:
    if a.dtype == np.uint16:
        a = _u16_to_u8(a)
    elif a.dtype != np.uint8:
        hint = (" (a float image: scale it to 0..255 and convert it with np.round(a).astype(np.uint8))"
                if a.dtype.kind == "f" else "")
        raise TypeError(f"load_image: arrays must be uint8 or uint16, got dtype {a.dtype}{hint}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"load_image: arrays must be [H, W], [H, W, 1], [H, W, 3] or "
                         f"[H, W, 4] with H, W > 0, got shape {tuple(a.shape)}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = _composite(a, background)
    return np.ascontiguousarray(a)


# EXIF orientation -> the transpose that shows the stored image upright (ImageOps.exif_transpose's)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow's ways of failing on a damaged EXIF block (a bad TIFF header, a truncated IFD, ...)
_EXIF_ERRORS = (SyntaxError, struct.error, ValueError, TypeError, KeyError, IndexError, OverflowError,
                ZeroDivisionError, UnicodeDecodeError, EOFError, OSError)


def _orientation(img: Image.Image) -> int:
    """``img``'s EXIF orientation when it is one of 2..8, else 1 (also when its EXIF block
    cannot be read: a damaged block does not fail the image; and when the tag is not an integer,
    the EXIF standard's SHORT: a RATIONAL 6/1, which ``ImageOps.exif_transpose`` would obey)."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _EXIF_ERRORS:
        return 1
    return orientation if isinstance(orientation, int) and orientation in _UPRIGHT else 1


def _upright(img: Image.Image) -> Image.Image:
    """``img`` (loaded) turned as its EXIF orientation says (:func:`_orientation`)."""
    orientation = _orientation(img)
    return img if orientation == 1 else img.transpose(_UPRIGHT[orientation])


def upright_array(a: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels ``[H, W, C]`` turned as EXIF ``orientation`` says: :func:`_upright` on an array
    (the same pixels as Pillow's transposes), contiguous."""
    if orientation in (5, 6, 7, 8):  # a quarter turn: the transpose, then a flip
        a = a.transpose(1, 0, 2)
        a = {5: a, 6: a[:, ::-1], 7: a[::-1, ::-1], 8: a[::-1]}[orientation]
    elif orientation in (2, 3, 4):
        a = {2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1]}[orientation]
    return np.ascontiguousarray(a)


def _grey_with_key(grey: np.ndarray, transparent: np.ndarray, background: Background) -> np.ndarray:
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[transparent] = background
    return rgb


def _from_pil(img: Image.Image, background: Background) -> np.ndarray:
    fmt = img.format  # (the transposed copy has none)
    img.load()  # (a TIFF's own orientation is applied here, by Pillow >= 11: read it after)
    img = _upright(img)
    mode = img.mode
    key = img.info.get("transparency")
    if mode == "RGB" and key is None:
        return np.array(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img)
        if mode == "I" and fmt not in ("PPM", "PNG") and a.size and a.max() <= 255:
            grey = np.clip(a, 0, 255).astype(np.uint8)  # 8-bit values in 32-bit integers: as 16-bit they'd be black
        else:
            grey = _u16_to_u8(a)
        if isinstance(key, int):  # one transparent grey value, in the image's own scale
            return _grey_with_key(grey, a == key, background)
        return _from_array(grey, background)
    if mode == "F":  # float32: clipping and rounding to integers are exact in it
        a = np.asarray(img)
        over = 0  # values above 1
        for rows in _row_blocks(a):
            if np.isnan(a[rows]).any():  # (NaN has no grey value: it was cast to whatever the CPU gives)
                raise ValueError("load_image: a float image (Pillow mode 'F', e.g. a PFM) with NaN pixels")
            over += int(np.count_nonzero(a[rows] > 1))
        # a 0..1 image (taken as 0..255 it would be black), bar a few highlights or a resize's overshoot
        scale = np.float32(255 if over <= a.size * FLOAT_OVERSHOOT else 1)
        grey = np.empty(a.shape, np.uint8)
        for rows in _row_blocks(a):
            grey[rows] = np.round(np.clip(a[rows] * scale, 0, 255))
        return _from_array(grey, background)
    if mode == "La":  # grey with premultiplied alpha: Pillow converts it to LA only
        img, mode = img.convert("LA"), "LA"
    has_alpha = mode in ("RGBA", "RGBa", "LA", "PA") or key is not None  # (LAB's "A" is a colour band)
    if fmt == "BMP" and mode == "RGBA" and img.getchannel("A").getextrema() == (0, 0):
        has_alpha = False  # alpha bytes a writer left 0 (Chromium shows these BMPs opaque too)
    try:
        if has_alpha:
            return _composite(np.array(img.convert("RGBA"), dtype=np.uint8), background)
        return np.array(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ValueError(f"load_image: cannot convert Pillow mode {mode!r} to RGB: {exc}") from exc


# Pillow's decompression-bomb limit, Image.MAX_IMAGE_PIXELS, is process-wide: data.decode_image
# lifts it (when its own pixel limit allows a larger image) only while it holds this lock, and
# every open here takes the lock too, so that no other thread's open through here runs unguarded.
_PIXEL_GUARD = threading.RLock()


@contextlib.contextmanager
def pillow_pixel_limit_lifted() -> Iterator[None]:
    """Pillow's decompression-bomb check off in this block, for this thread's opens through
    :func:`open_image` (the caller checks the size before it loads any pixel)."""
    with _PIXEL_GUARD:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


class _PpmDecoder(ImageFile.PyDecoder):
    """Pillow's ``ppm`` decoder (binary PGM/PPM whose maxval is not 255, nor 65535 for grey) in
    numpy blocks: Pillow's own loops over samples in Python (20 s for a 3 MP 16-bit PPM, 500x
    its 8-bit time). The same values: ``min(out_max, round(v / maxval * out_max))`` in float64,
    halves to even; only whole pixels are decoded, and fewer than the image needs fail as Pillow's."""

    _pulls_fd = True

    def decode(self, buffer: Any) -> Tuple[int, int]:
        maxval = self.args[-1]
        bands = 3 if self.mode == "RGB" else 1  # modes "RGB", "L" and "I" (grey above 255)
        dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
        if self.mode == "I":
            out_max, out_dtype, rawmode = 65535, np.dtype("<u4"), "I;32"
        else:
            out_max, out_dtype, rawmode = 255, np.dtype(np.uint8), self.mode
        data = self.fd.read(self.state.xsize * self.state.ysize * bands * dtype.itemsize)
        v = np.frombuffer(data, dtype, len(data) // (dtype.itemsize * bands) * bands)
        out = np.empty(v.shape, out_dtype)
        for i in range(0, v.size, _BLOCK_PIXELS):
            out[i:i + _BLOCK_PIXELS] = np.minimum(out_max, np.round(v[i:i + _BLOCK_PIXELS] / maxval * out_max))
        del data, v
        out.flags.writeable = False  # (a read-only buffer: Pillow's raw decoder takes it without a copy)
        self.set_as_raw(out.data.cast("B"), rawmode)
        return -1, 0


def _pnm_space(a: np.ndarray) -> np.ndarray:
    """Where ``a`` (uint8) holds Pillow's whitespace in plain PBM/PGM/PPM data (``bytes.split``'s:
    space, tab, LF, VT, FF, CR)."""
    return (a == 32) | (a - np.uint8(9) < 5)


_PNM_TOKEN = 10  # Pillow's longest sample token, in bytes
_PNM_TOKENS = 1 << 16  # tokens parsed at once


class _PpmPlainDecoder(ImageFile.PyDecoder):
    """Pillow's ``ppm_plain`` decoder (plain PBM/PGM/PPM: P1, P2, P3) in numpy: Pillow's own parses
    each sample in Python (23 s for a 10 MP P3; 1 s here). The same pixels and the same failures,
    by the same rules on the same blocks (``fd.read(ImageFile.SAFEBLOCK)``, so that what depends
    on where a block ends does too):

    * a ``#`` starts a comment that ends at the first CR or LF after it; comment and end are
      deleted, so the bytes either side join ("1#c\\n2" is "12"); one still open at the end of a
      block runs on into the next, and when that block opens with LF (CR) and holds a CR (LF)
      further on, Pillow ends the comment at that later one (bytes lost: kept here too);
    * P1: every byte left that is not whitespace is a sample, "0" (white) or "1" (black), spaces
      optional; any other byte in a block that is read fails;
    * P2/P3: whitespace-separated tokens, each at most 10 bytes and a Python ``int`` (sign and
      underscores allowed: "+7", "-0", "1_0") in 0..maxval, scaled as
      ``round(v / maxval * out_max)`` (out_max 65535 for grey above 255, else 255); tokens after
      the last sample are not looked at, but the unfinished last token of the block that completes
      the image may not be longer than 10 bytes;
    * fewer samples than the image needs fail ("not enough image data").
    """

    _pulls_fd = True
    _comment_spans = False

    def decode(self, buffer: Any) -> Tuple[int, int]:
        self._comment_spans = False
        if self.mode == "1":
            out, rawmode = self._bits(), "1;8"
        elif self.mode == "I":
            out, rawmode = self._samples(np.dtype("<u4"), 65535), "I;32"
        else:
            out, rawmode = self._samples(np.dtype(np.uint8), 255), self.mode
        out.flags.writeable = False  # (read-only: Pillow's raw decoder takes it without a copy)
        self.set_as_raw(out.data.cast("B"), rawmode)
        return -1, 0

    def _read_block(self) -> bytes:
        return self.fd.read(ImageFile.SAFEBLOCK)

    def _uncomment(self, block: bytes) -> bytes:
        """``block`` without its comments (one open at the end of the last block first)."""
        while self._comment_spans and block:
            lf, cr = block.find(b"\n"), block.find(b"\r")
            end = min(lf, cr) if lf * cr > 0 else max(lf, cr)  # Pillow's rule, as the class says
            if end != -1:
                block = block[end + 1:]
                break
            block = self._read_block()
        self._comment_spans = False
        if b"#" not in block:
            return block
        # one line (up to and with its CR or LF) at a time: from its first '#' on, it is comment
        a = np.frombuffer(block, np.uint8)
        eol = (a == 10) | (a == 13)
        hashes = np.cumsum(a == 35, dtype=np.int64)
        before = np.maximum.accumulate(np.where(eol, hashes, 0))  # hashes up to the last CR/LF ...
        before = np.concatenate(([0], before[:-1]))  # ... before this byte
        comment = hashes > before
        self._comment_spans = bool(comment[-1] and not eol[-1])
        return a[~comment].tobytes()

    def _bits(self) -> np.ndarray:
        out = np.empty(self.state.xsize * self.state.ysize, np.uint8)
        n = 0
        while n < out.size:
            block = self._read_block()
            if not block:
                break
            a = np.frombuffer(self._uncomment(block), np.uint8)
            a = a[~_pnm_space(a)]
            bad = np.flatnonzero((a != 48) & (a != 49))
            if bad.size:
                raise ValueError(f"Invalid token for this mode: {a[bad[0]:bad[0] + 1].tobytes()!r} (plain PBM "
                                 f"samples are 0 and 1)")
            k = min(a.size, out.size - n)
            out[n:n + k] = (a[:k] == 48) * np.uint8(255)  # plain PBM's 1 is black: "1;8"'s 0
            n += k
        return out[:n]

    def _samples(self, dtype: np.dtype, out_max: int) -> np.ndarray:
        maxval = self.args[-1]
        bands = 3 if self.mode == "RGB" else 1
        out = np.empty(self.state.xsize * self.state.ysize * bands, dtype)
        n = 0
        half = b""  # the block's last token when no whitespace followed it there
        while n < out.size:
            block = self._read_block()
            if not block:
                if not half:
                    break
                block = b" "  # the end of the file ends the last token
            block = half + self._uncomment(block)
            a = np.frombuffer(block, np.uint8)
            space = _pnm_space(a)
            edges = np.flatnonzero(np.diff(np.concatenate(([True], space, [True])).view(np.int8)))
            starts, ends = edges[0::2], edges[1::2]  # (a token opens where a space run ends)
            half = b""
            if a.size and not space[-1]:
                half = block[starts[-1]:]
                starts, ends = starts[:-1], ends[:-1]
                if len(half) > _PNM_TOKEN:
                    raise ValueError(f"Token too long found in data: {half[:_PNM_TOKEN + 1]!r}")
            for i in range(0, min(starts.size, out.size - n), _PNM_TOKENS):  # (bounds the parse's [10, N] arrays)
                k = min(_PNM_TOKENS, starts.size - i, out.size - n)
                v = _parse_samples(a, starts[i:i + k], ends[i:i + k], maxval)
                out[n:n + k] = np.round(v / maxval * out_max)
                n += k
        return out[:n]


def _parse_samples(a: np.ndarray, starts: np.ndarray, ends: np.ndarray, maxval: int) -> np.ndarray:
    """The tokens ``a[starts[i]:ends[i]]`` as ints (int64 [N]); a ValueError on the first one that
    is longer than 10 bytes, not a Python ``int`` literal, negative or above ``maxval``."""
    lengths = ends - starts
    width = min(int(lengths.max()), _PNM_TOKEN)
    # [width, N]: row r holds byte r of each token's last `width` bytes, right-aligned (the last row
    # holds the last bytes; `inside` is False before a shorter token); rows are contiguous
    rows = np.arange(width)[:, None]
    inside = rows >= width - lengths
    b = a[np.maximum(ends - width + rows, 0)]
    d = b - np.uint8(48)
    dig = (d < 10) & inside
    us, minus = (b == 95) & inside, (b == 45) & inside
    sign = minus | ((b == 43) & inside)
    # int(): [+-] digit (["_"] digit)*
    bad = (inside & ~(dig | sign | us)).any(0) | ~dig.any(0)
    bad |= (sign[1:] & inside[:-1]).any(0)  # a sign only first
    bad |= us[0] | us[-1] | (us[1:-1] & ~(dig[:-2] & dig[2:])).any(0)  # '_' only between digits
    d *= dig
    v = np.zeros(len(starts), np.int64)
    if us.any():  # (an underscore is not a digit: each row shifts only where it holds one)
        for row, row_dig in zip(d, dig):
            v = np.where(row_dig, v * 10 + row, v)
    else:  # (a sign and what is before the token are 0s ahead of the first digit)
        for row in d:
            v *= 10
            v += row
    too_long, negative, too_large = lengths > _PNM_TOKEN, minus.any(0) & (v > 0), v > maxval
    failed = np.flatnonzero(too_long | bad | negative | too_large)
    if failed.size:  # the first failing token, said as Pillow says it
        i = failed[0]
        token = a[starts[i]:ends[i]].tobytes()
        if too_long[i]:
            raise ValueError(f"Token too long found in data: {token[:_PNM_TOKEN + 1]!r}")
        if bad[i]:
            raise ValueError(f"invalid literal for int() with base 10: {token!r}")
        if negative[i]:
            raise ValueError(f"Channel value is negative: {-v[i]}")
        raise ValueError(f"Channel value too large for this mode: {v[i]}")
    return v


# Pillow's PGM/PPM decoders that loop in Python -> the numpy ones that take their place
_PPM_DECODERS = {"ppm": "fakespotter_ppm", "ppm_plain": "fakespotter_ppm_plain"}
Image.register_decoder(_PPM_DECODERS["ppm"], _PpmDecoder)
Image.register_decoder(_PPM_DECODERS["ppm_plain"], _PpmPlainDecoder)


def open_image(source: Any) -> Image.Image:
    """``Image.open`` for the formats fakespotter reads (``data.IMAGE_FORMATS``: never a plugin
    such as EPS's, which runs an external program); a PBM/PGM/PPM that Pillow would decode
    sample by sample in Python is decoded by :class:`_PpmDecoder` (binary) or
    :class:`_PpmPlainDecoder` (plain: P1, P2, P3) instead, to the same pixels."""
    from .data import _open_formats

    formats = _open_formats()
    try:
        with _PIXEL_GUARD:
            img = Image.open(source, formats=formats)
    except Image.UnidentifiedImageError:
        if "HEIF" in formats or not _heif_opener_registered(source):
            raise
        with _PIXEL_GUARD:
            img = Image.open(source, formats=_open_formats())
    if img.format in ("JPEG", "MPO"):
        # libjpeg's arithmetic decoder cannot wait for more data: fed in Pillow's 64 KiB blocks, an
        # arithmetic-coded JPEG larger than that fails ("broken data stream"). Fed whole, it
        # decodes (Huffman-coded ones as fast as before).
        pos = img.fp.tell()
        img.decodermaxblock = max(img.decodermaxblock, img.fp.seek(0, os.SEEK_END))
        img.fp.seek(pos)
    if img.format == "PPM" and len(img.tile) == 1 and img.tile[0][0] in _PPM_DECODERS:
        tile = img.tile[0]
        codec = _PPM_DECODERS[tile[0]]
        img.tile = [tile._replace(codec_name=codec) if hasattr(tile, "_replace") else (codec,) + tuple(tile[1:])]
    return img


def _heif_opener_registered(source: Any) -> bool:
    """For a ``source`` that Pillow could not identify without a HEIF opener: whether it is a
    HEIC/HEIF image (a phone's photo) and pillow-heif's opener is now registered with Pillow,
    for the caller to open the source again. Registers it if pillow-heif is installed (the
    ``heif`` extra: libheif's decoder, which applies the image's rotation and mirroring); or
    another thread just did."""
    from .data import is_heif

    try:
        with contextlib.ExitStack() as stack:
            fp = stack.enter_context(open(source, "rb")) if isinstance(source, (str, os.PathLike)) else source
            fp.seek(0)
            head = fp.read(12)
    except (OSError, AttributeError, ValueError):
        return False
    if not is_heif(head):
        return False
    if "HEIF" in Image.OPEN:
        return True
    try:
        import pillow_heif
    except ImportError:
        return False
    with _PIXEL_GUARD:
        if "HEIF" not in Image.OPEN:
            pillow_heif.register_heif_opener()
    return "HEIF" in Image.OPEN


def _refusal(source: Any) -> str:
    """Why Pillow's reader for the format whose signature ``source`` starts with refused it (a
    12-bit JPEG, a 3-channel float TIFF, ...), as ``"it starts like FORMAT, but ..."``, or
    what would read it (HEIF without pillow-heif); ``""`` when no reader fakespotter uses
    claims the signature."""
    from .data import _open_formats, _signature, missing_reader

    try:
        with contextlib.ExitStack() as stack:
            fp = stack.enter_context(open(source, "rb")) if isinstance(source, (str, os.PathLike)) else source
            fp.seek(0)
            head = fp.read(16)
            needs = missing_reader(_signature(head))
            if needs:
                return needs
            for fmt in _open_formats():
                factory, accept = Image.OPEN[fmt]
                if accept is None or not accept(head):
                    continue
                fp.seek(0)
                try:
                    with _PIXEL_GUARD:
                        factory(fp, "").close()
                except Exception as e:  # the reader's own words (SyntaxError, ValueError, ...)
                    inner = e.__cause__ or e
                    if isinstance(inner, (KeyError, IndexError, TypeError, struct.error)):  # (as Pillow's SyntaxError)
                        return (f"it starts like {fmt}, but its header is damaged (Pillow's {fmt} reader failed "
                                f"on it: {'struct.error' if isinstance(inner, struct.error) else type(inner).__name__}: "
                                f"{str(inner).strip()})")
                    return f"it starts like {fmt}, but Pillow's {fmt} reader cannot read it: {str(e).strip()}"
    except OSError:
        pass
    return ""


@contextlib.contextmanager
def _pillow_errors(source: Any, name: str, said: Sequence[str] = ()) -> Iterator[None]:
    """Pillow's failures on an image it cannot read, as ValueErrors naming ``name`` (and what
    libtiff ``said`` meanwhile); OS errors (a missing file, ...) stay OSErrors."""
    try:
        yield
    except Image.DecompressionBombError as e:
        raise ValueError(f"load_image: {name}: {e}") from None
    except Image.UnidentifiedImageError:
        from .data import IMAGE_FORMATS

        why = _refusal(source)
        if why:
            raise ValueError(f"load_image: {name}: {why}") from None
        raise ValueError(f"load_image: {name} is not an image in a format fakespotter reads "
                         f"({', '.join(IMAGE_FORMATS)})") from None
    except OSError as e:
        if e.errno is not None:
            raise
        libtiff = f"; libtiff: {'; '.join(said)}" if said else ""
        raise ValueError(f"load_image: {name} is not an image Pillow can decode ({type(e).__name__}: {e}"
                         f"{libtiff})") from None
    except (SyntaxError, EOFError, ValueError, TypeError, IndexError, KeyError, struct.error, ZeroDivisionError,
            RuntimeError) as e:
        # Pillow's ways of saying "not an image I can read" (ValueError: e.g. its PNG text-chunk limits;
        # RuntimeError: pillow-heif's for libheif's errors)
        raise ValueError(f"load_image: {name} is not an image Pillow can decode ({type(e).__name__}: {e})") from None


def _decode(source: Any, name: str, background: Background) -> np.ndarray:
    """``source`` (a path or a binary file object) decoded; a PNG refused for the size of its
    text or ICC chunks alone is decoded again without them (as the scanner's ``decode_image``)."""
    from .data import png_text_too_large, without_png_text

    try:
        return _decode_once(source, name, background)
    except ValueError as e:
        if not png_text_too_large(str(e)):
            raise
    if isinstance(source, (str, os.PathLike)):
        data = Path(source).read_bytes()
    else:
        source.seek(0)
        data = source.read()
    return _decode_once(io.BytesIO(without_png_text(data)), name, background)


def _decode_once(source: Any, name: str, background: Background) -> np.ndarray:
    with _pillow_errors(source, name):
        img = open_image(source)
    with img:
        # the scanner's checks that Pillow lacks (data.decode_image): damaged JPEG scan data, JPEGs
        # of too many scans (simplejpeg decodes the rest), PNG image data that ends early or is damaged
        from .data import (ImageError, _check_bmff_whole, _check_png_chunks, _check_png_data, check_avif_size,
                           check_tiff_jpeg, check_tiff_tiles, is_tiff_jpeg, jpeg_pixels)

        try:
            if img.format in ("JPEG", "MPO"):  # (open_image has Pillow read these whole anyway)
                pos = img.fp.tell()
                img.fp.seek(0)
                data = img.fp.read()
                img.fp.seek(pos)
                rgb = jpeg_pixels(img, data)
                if rgb is not None:
                    return rgb
            tiff_jpeg = img.format == "TIFF" and is_tiff_jpeg(img)
            data = _bytes_of(source) if img.format in ("PNG", "AVIF", "HEIF") or tiff_jpeg else b""
            if img.format == "PNG":
                _check_png_chunks(data)
            bomb = "Pillow's decompression-bomb limit, Image.MAX_IMAGE_PIXELS x 2"
            if img.format == "TIFF" and Image.MAX_IMAGE_PIXELS:
                check_tiff_tiles(img, 2 * Image.MAX_IMAGE_PIXELS, bomb)
            if img.format == "AVIF":
                check_avif_size(data, 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 1 << 62, bomb)
            with _libtiff.collected(img.format == "TIFF") as said, _pillow_errors(source, name, said):
                img.load()
            lost = _libtiff.codec_errors(said)
            if lost:
                raise ValueError(f"load_image: {name}: TIFF: part of the image did not decode (libtiff: "
                                 f"{'; '.join(lost)})")
            if tiff_jpeg:
                check_tiff_jpeg(img, data)
            if img.format == "PNG":
                _check_png_data(img, data)
            if img.format in ("HEIF", "AVIF"):
                _check_bmff_whole(img.format, data)
        except ImageError as e:
            raise ValueError(f"load_image: {name}: {e.message}") from None
        return _from_pil(img, background)


def _bytes_of(source: Any) -> bytes:
    """The bytes of ``source``: a path, or a binary file object (read from its start)."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source).read_bytes()
    source.seek(0)
    return source.read()


def load_image(image: ImageInput, background: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Decode ``image`` to RGB ``uint8 [H, W, 3]`` (see the module docstring for the rules).

    image: a path, encoded bytes, a ``PIL.Image.Image`` or a ``uint8``/``uint16`` array
        ``[H, W]``, ``[H, W, 1|3|4]`` (RGB order).
    background: RGB colour transparent pixels are composited over (default black).
    """
    bg = _check_background(background)
    if isinstance(image, np.ndarray):
        return _from_array(image, bg)
    if isinstance(image, Image.Image):
        return _from_pil(image, bg)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("load_image: the image bytes are empty (0 bytes)")
        return _decode(io.BytesIO(data), f"{len(data)} bytes", bg)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            st = path.stat()
        except OSError as e:
            raise type(e)(e.errno, f"load_image: {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block Pillow, or never end
            raise ValueError(f"load_image: {path} is not a regular file")
        if st.st_size == 0:
            raise ValueError(f"load_image: {path} is empty (0 bytes)")
        return _decode(path, str(path), bg)
    raise TypeError(f"load_image: expected a path, bytes, PIL image or numpy array, "
                    f"got {type(image).__name__}")


# ----------------------------------------------------------------------------------------------
# detection and alignment


def _import_dlib() -> Any:
    try:
        import dlib  # noqa: PLC0415 (optional dependency, imported on first use)
    except ImportError as exc:
        if not (isinstance(exc, ModuleNotFoundError) and exc.name == "dlib"):  # there, but it cannot load
            raise ImportError(f"dlib is installed but cannot be loaded: {first_line(exc)}") from exc
        raise ImportError(
            f"fakespotter.faces needs dlib for face detection and alignment: {DLIB_INSTALL}; or give "
            f"already-aligned face chips (--aligned on the command line; aligned=True or "
            f"faces.chip_from_aligned in Python)"
        ) from exc
    return dlib


# One detector and landmark model per thread: dlib runs them without the GIL, and one object used
# by two threads at once corrupts memory or returns wrong detections.
_per_thread = threading.local()


def _detector() -> Any:
    if not hasattr(_per_thread, "detector"):
        _per_thread.detector = _import_dlib().get_frontal_face_detector()
    return _per_thread.detector


def _predictor(path: str) -> Any:
    cache = _per_thread.__dict__.setdefault("predictors", {})
    if path not in cache:
        cache[path] = _import_dlib().shape_predictor(path)
    return cache[path]


def _landmark_path() -> str:
    from fakespotter.weights import weights_path

    return str(weights_path(LANDMARKS_NAME))


def check_weak_face_score(value: Any, what: str) -> float:
    """``value`` as a float, or a ValueError naming ``what`` when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what}: weak_face_score must be a finite number, got {value!r}")
    return float(value)


def check_detect_pixels(value: Any, what: str) -> int:
    """``value`` as an int: 0 (no limit) or at least :data:`MIN_DETECT_PIXELS`; else a
    ValueError naming ``what``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or not (value == 0 or value >= MIN_DETECT_PIXELS)):
        raise ValueError(f"{what}: detect_pixels must be 0 (no limit) or a pixel count >= {MIN_DETECT_PIXELS} "
                         f"(256x256; 4096x4096 is {4096 * 4096}), got {value!r}")
    return int(value)


# The detector's 80x80 window spans this many pixels of the pyramid level it is found at
# (dlib's frontal face detector: every box it returns is this square at some level), 8 more
# on a side that starts left of or above the level's image (dlib's fhog_to_image moves such a
# corner half a cell the other way).
_WINDOW_PX = 73
_WINDOW_PX_CUT = 81
# dlib's pyramid_down, and so its detector, corrupts memory on images wider than ~81,400 px
# (dlib 20.0.1; a 65535x40 GIF, upsampled once, was enough). Wider images, after upsampling,
# are detected on a copy scaled to this width.
MAX_DETECT_WIDTH = 65536
# Past detect_pixels, an image up to this many times as large (after upsampling) is detected on
# the levels of dlib's own pyramid within detect_pixels, which gives the boxes of full-size
# detection but costs time in proportion to the image (making the levels); a larger one is
# detected on a copy scaled to detect_pixels, at the cost of detect_pixels alone, with boxes
# near those of full-size detection. At the default cap and upsampling: photos up to 16.8 MP
# (benchmarks/RESULTS.md, "Detection on large images": in one run, 12 MP took 2.1 s this way,
# 1.4 s on a scaled copy and 3.7 s at full size; 24 MP 3.5, 1.5 and 7.3 s). The levels' memory:
# the upsampled image and its first level, ~200 MB at the defaults.
PYRAMID_SPAN = 4


def _mapped(pyramid: Any, rect: Any, levels: int, upward: bool) -> Any:
    """``rect`` mapped ``levels`` levels up (or down) ``pyramid``, rounded as dlib's detector
    rounds its boxes: halves away from zero (the Python binding's own ``rect_up`` rounds -22.5
    to -22, the detector to -23)."""
    dlib = _import_dlib()
    f = (pyramid.rect_up if upward else pyramid.rect_down)(dlib.drectangle(rect), levels)
    r = [math.floor(v + 0.5) if v >= 0 else -math.floor(0.5 - v) for v in (f.left(), f.top(), f.right(), f.bottom())]
    return dlib.rectangle(*r)


def _found_at(rect: Any, down: Any) -> Tuple[int, Any]:
    """The pyramid level a detection ``rect`` (mapped up to level 0) came from, and its box
    there: the level where it is the detector's window (and maps up to ``rect``). (0,
    ``rect``) if there is none."""
    level, at = 0, rect
    while at.width() >= _WINDOW_PX:
        w = _WINDOW_PX_CUT if at.left() < 0 else _WINDOW_PX
        h = _WINDOW_PX_CUT if at.top() < 0 else _WINDOW_PX
        if at.width() == w and at.height() == h and _mapped(down, at, level, upward=True) == rect:
            return level, at
        level += 1
        at = _mapped(down, rect, level, upward=False)
    return 0, rect


def _detect(rgb: np.ndarray, upsample: int, detect_pixels: int) -> Tuple[List[Any], List[float]]:
    """dlib's detections (rectangles in ``rgb``'s pixels) and scores.

    dlib's detector doubles the image ``upsample`` times (its pyramid_up), then scans a pyramid
    of it, each level 5/6 the size of the one before (pyramid_down(6)), and maps each box up from
    its level. When the doubled image is past ``detect_pixels`` (by at most
    :data:`PYRAMID_SPAN` times), the levels above that many pixels are skipped: the levels are
    made as dlib makes them, the detector runs on the first one within the limit, and each box is
    mapped up from the level it was found at, as dlib maps it. So each face found gets the box
    and score that full-size detection gives it; faces smaller than the window at that level are
    not found. (dlib's non-maximum suppression then sees the detections of those levels only: a
    box that full-size detection drops for an overlapping, higher-scoring smaller one is kept.)
    Larger images, and images wider than :data:`MAX_DETECT_WIDTH` once doubled, are detected on
    a scaled copy (:func:`_detect_scaled`)."""
    h, w = rgb.shape[:2]
    pixels = h * w * 4 ** upsample
    if w << upsample > MAX_DETECT_WIDTH or (detect_pixels and pixels > PYRAMID_SPAN * detect_pixels):
        return _detect_scaled(rgb, detect_pixels)
    if not detect_pixels or pixels <= detect_pixels:
        rects, scores, _ = _detector().run(rgb, upsample, 0.0)
        return list(rects), list(scores)
    dlib = _import_dlib()
    up, down = dlib.pyramid_down(2), dlib.pyramid_down(6)
    img = np.ascontiguousarray(rgb)
    for _ in range(upsample):
        r = up.rect_up(dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1))
        img = dlib.resize_image(img, r.bottom() + 1, r.right() + 1)
    skipped = 0
    while img.shape[0] * img.shape[1] > detect_pixels:
        img = down(img)
        skipped += 1
    rects, scores, _ = _detector().run(img, 0, 0.0)
    del img
    boxes = []
    for r in rects:
        level, at = _found_at(r, down)
        box = _mapped(down, at, level + skipped, upward=True)
        boxes.append(_mapped(up, box, upsample, upward=False) if upsample else box)
    return boxes, list(scores)


def _detect_scaled(rgb: np.ndarray, detect_pixels: int) -> Tuple[List[Any], List[float]]:
    """:func:`_detect` for an image too large for the levels of dlib's pyramid, or too wide for
    it: the detector runs on a copy scaled to ``detect_pixels`` pixels, or to
    :data:`MAX_DETECT_WIDTH` wide if that is smaller (bilinear, antialiased when shrinking), and
    its boxes are scaled back: they are near, not equal to, the boxes of full-size detection."""
    h, w = rgb.shape[:2]
    scale = MAX_DETECT_WIDTH / w
    if detect_pixels:
        scale = min(scale, math.sqrt(detect_pixels / (h * w)))
    sw, sh = max(1, int(w * scale)), max(1, int(h * scale))
    small = np.asarray(Image.fromarray(rgb).resize((sw, sh), Image.Resampling.BILINEAR))
    rects, scores, _ = _detector().run(small, 0, 0.0)
    fx, fy = w / sw, h / sh
    dlib = _import_dlib()
    return [dlib.rectangle(round(r.left() * fx), round(r.top() * fy), round((r.right() + 1) * fx) - 1,
                           round((r.bottom() + 1) * fy) - 1) for r in rects], list(scores)


def detect_and_align(
    image: ImageInput,
    upsample: int = 1,
    size: int = CHIP_SIZE,
    padding: float = CHIP_PADDING,
    background: Sequence[int] = (0, 0, 0),
    weak_face_score: float = WEAK_FACE_SCORE,
    detect_pixels: int = DETECT_PIXELS,
) -> List[Face]:
    """Detect every face in ``image`` and align each into a ``size`` x ``size`` chip.

    image: anything ``load_image`` accepts.
    upsample: how many times the detector doubles the image first (finds faces down to about
        80 / 2**upsample pixels; each step costs about 4x the time).
    weak_face_score: detections scoring below this (but above dlib's cut, 0) are weak: dropped
        when the image holds a face scoring at least this, kept when they are all it holds
        (default :data:`WEAK_FACE_SCORE`; 0 or less keeps every detection).
    detect_pixels: the most pixels the detector works on, after upsampling (default
        :data:`DETECT_PIXELS`, 4096x4096; 0 for no limit). A larger image is searched for faces
        down to about ``80 * sqrt(H * W / detect_pixels)`` pixels. Up to :data:`PYRAMID_SPAN`
        times larger, the detector skips the levels of its image pyramid above this size: each
        face found at a level it keeps has the box, landmarks and chip of full-size detection
        (a face near that smallest size can be found at a coarser level only, with a larger
        box). Larger still, the detector sees a copy scaled to this size, and one wider than
        :data:`MAX_DETECT_WIDTH` once upsampled a copy at most that wide: the boxes (and so the
        chips) are near those of full-size detection. Landmarks and chips always come from the
        full image.
    Returns the faces sorted by detector score, highest first; an empty list when there is none.
    """
    if int(upsample) != upsample or upsample < 0:
        raise ValueError(f"detect_and_align: upsample must be an int >= 0, got {upsample!r}")
    if int(size) != size or size < 1:
        raise ValueError(f"detect_and_align: size must be a positive int, got {size!r}")
    if not padding >= 0:
        raise ValueError(f"detect_and_align: padding must be >= 0, got {padding!r}")
    weak_face_score = check_weak_face_score(weak_face_score, "detect_and_align")
    detect_pixels = check_detect_pixels(detect_pixels, "detect_and_align")
    rgb = load_image(image, background)
    dlib = _import_dlib()
    predictor = _predictor(_landmark_path())
    rects, scores = _detect(rgb, int(upsample), detect_pixels)
    order = sorted(range(len(rects)), key=lambda i: -scores[i])
    if order and scores[order[0]] >= weak_face_score:
        order = [i for i in order if scores[i] >= weak_face_score]
    faces = []
    for i in order:
        rect = rects[i]
        shape = predictor(rgb, rect)
        chip = np.asarray(dlib.get_face_chip(rgb, shape, size=int(size), padding=float(padding)),
                          dtype=np.uint8)
        landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.int64)
        box = (int(rect.left()), int(rect.top()), int(rect.right()) + 1, int(rect.bottom()) + 1)
        faces.append(Face(box=box, chip=chip, score=float(scores[i]), landmarks=landmarks))
    return faces


def chip_from_aligned(image: ImageInput, size: int = CHIP_SIZE,
                      background: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """An already-aligned face image as a ``uint8 [size, size, 3]`` chip (no detection).

    Images of another size are resized (bilinear, antialiased when shrinking) without keeping
    the aspect ratio: the input is assumed to be a chip cropped like dlib's, only scaled. An
    image that cannot be such a chip (a side under :data:`MIN_CHIP_SIDE` px, or sides more than
    2:1 apart) is refused with a ValueError.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"chip_from_aligned: size must be a positive int, got {size!r}")
    rgb = load_image(image, background)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_CHIP_SIDE or max(h, w) > 2 * min(h, w):
        raise ValueError(f"chip_from_aligned: a {w}x{h} image cannot be an aligned face chip (a side under "
                         f"{MIN_CHIP_SIDE} px, or not square within 2:1); detect faces instead (aligned=False; in the CLI, leave out --aligned)")
    if rgb.shape[:2] == (size, size):
        return rgb
    resized = Image.fromarray(rgb).resize((int(size), int(size)), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def to_tensor(chips: Union[np.ndarray, Sequence[Union[np.ndarray, Face]]]) -> torch.Tensor:
    """Stack chips into ``float32 [N, 3, H, W]`` with values in 0..255 (the backbone's input).

    chips: ``uint8 [N, H, W, 3]``, or a sequence of ``uint8 [H, W, 3]`` arrays or ``Face``s,
        all of one size.  An empty sequence gives ``[0, 3, 150, 150]``.
    """
    if isinstance(chips, np.ndarray):
        batch = chips
    else:
        arrays = [c.chip if isinstance(c, Face) else np.asarray(c) for c in chips]
        if not arrays:
            return torch.zeros((0, 3, CHIP_SIZE, CHIP_SIZE), dtype=torch.float32)
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"to_tensor: chips must all have one shape, got {sorted(shapes)}")
        batch = np.stack(arrays)
    if batch.dtype != np.uint8:
        raise TypeError(f"to_tensor: chips must be uint8, got dtype {batch.dtype}")
    if batch.ndim != 4 or batch.shape[3] != 3:
        raise ValueError(f"to_tensor: chips must be [N, H, W, 3], got shape {tuple(batch.shape)}")
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().contiguous()
