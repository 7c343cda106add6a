"""Damaged scan data in a JPEG that libjpeg decodes with warnings only.

libjpeg answers damaged entropy-coded data ("Corrupt JPEG data: N extraneous bytes before
marker", "found marker 0xd5 instead of RST4", a scan cut short and closed with an EOI marker)
with a *warning*, fills what it cannot decode with grey and goes on; Pillow's JPEG decoder
prints nothing and never reads the warning count (src/libImaging/JpegDecode.c), so such a file
loads without an error. :func:`scan_damage` finds what the marker structure shows, from the
bytes alone (the JPEG standard, ITU T.81, B.1-B.2 and E.1.4), at about 0.5 us per KB:

* inside a scan's data, only stuffed ``FF 00`` bytes and restart markers RST0..7, in sequence,
  as many as the restart interval and the scan's MCU count give (one trailing RST tolerated:
  libjpeg accepts it silently); after the data, a marker that may follow a scan.

It does not see a damaged bit that still decodes as valid codes, nor damage inside a scan
without restart markers that ends where the scan should: a full entropy decode would be needed.
Nor a progressive file cut between scans and closed with EOI: the standard lets a file leave
coefficients short of full precision (libjpeg's encoder writes such files from a scan script),
so the bytes cannot tell it from one made so on purpose.
Junk bytes and markers without a segment (RSTn, TEM) between segments leave the pixels whole
(libjpeg skips them) and are not damage; a file that ends inside its scan data or a segment is
a truncation, the decoder's to report; frames other than DCT ones (lossless, hierarchical) are
not checked.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

try:  # libjpeg-turbo with its warnings as errors (a dependency; Pillow decodes where it is missing)
    import simplejpeg
except ImportError:  # pragma: no cover - an install without it
    simplejpeg = None

if TYPE_CHECKING:
    import numpy as np

_MARKER = re.compile(rb"\xff[^\x00\xff]")  # in scan data: FF 00 is a stuffed FF byte, FF FF a fill byte
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker other than RSTn
_RST = re.compile(rb"\xff[\xd0-\xd7]")
_RST_CYCLE = b"".join(bytes((0xFF, 0xD0 + i)) for i in range(8))
_DCT_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})  # baseline, extended, progressive (Huffman, arithmetic)
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0..15 (less DHT, JPG, DAC)
# what may follow a scan's data: DHT, DAC, DQT, DRI, SOS, COM, APPn, DNL, EOI
_AFTER_SCAN = frozenset({0xC4, 0xCC, 0xDB, 0xDD, 0xDA, 0xFE, 0xDC, 0xD9} | set(range(0xE0, 0xF0)))


def scan_damage(data: bytes) -> Optional[str]:
    """What damage the scan data of the first image of ``data`` (a JPEG) shows, or None: a
    valid file, one cut short inside its scan data (a truncation), not a JPEG, or a frame type
    this does not check."""
    if not data.startswith(b"\xff\xd8"):
        return None
    n = len(data)
    frame = -1
    width = height = 0
    comps: Dict[int, Tuple[int, int]] = {}  # component id -> (H, V) sampling factors
    scans = 0  # SOS segments so far
    interval = 0
    pos = 2
    while pos < n:
        if data[pos] != 0xFF:  # junk between segments: skipped, as libjpeg does (the pixels stay whole)
            nxt = data.find(b"\xff", pos)
            pos = n if nxt < 0 else nxt
            continue
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        m = data[pos]
        pos += 1
        if m == 0xD9:  # EOI
            return None
        if m in (0x00, 0x01, 0xD8) or 0xD0 <= m <= 0xD7:  # no segment: libjpeg skips these here
            continue
        if pos + 2 > n:
            break
        length = (data[pos] << 8) | data[pos + 1]
        end = pos + length
        if end > n:
            return None  # cut short (or a damaged length): the decoder's to report
        if length < 2:
            return f"marker 0x{m:02x} with length {length} at offset {pos - 2}" if scans else None
        seg = data[pos + 2:end]
        if m in _FRAMES:
            if frame >= 0 or m not in _DCT_FRAMES:  # a second frame (hierarchical), lossless: not checked
                return None
            if len(seg) < 6 or len(seg) < 6 + 3 * seg[5]:
                return None
            frame, height, width = m, (seg[1] << 8) | seg[2], (seg[3] << 8) | seg[4]
            for i in range(seg[5]):
                c = seg[6 + 3 * i:9 + 3 * i]
                if c[0] in comps:  # a component id twice (libjpeg tolerates it): not checked
                    return None
                comps[c[0]] = (max(1, c[1] >> 4), max(1, c[1] & 15))
        elif m == 0xDD and len(seg) >= 2:  # DRI
            interval = (seg[0] << 8) | seg[1]
        elif m == 0xDA:  # SOS, then the scan's entropy-coded data
            if frame < 0 or not seg or len(seg) < 4 + 2 * seg[0]:
                return None
            ns = seg[0]
            ids = tuple(seg[1 + 2 * i] for i in range(ns))
            if not ids or any(i not in comps for i in ids):
                return None
            scans += 1
            mk = _MARKER.search(data, end)
            rsts: List[bytes] = []
            if mk is not None and 0xD0 <= data[mk.start() + 1] <= 0xD7:  # (most scans have none)
                mk = _END_OF_SCAN.search(data, mk.start())
                rsts = _RST.findall(data, end, n if mk is None else mk.start())
            if rsts:
                if not interval:
                    return f"restart marker in scan {scans}, which has no restart interval"
                cycle = _RST_CYCLE * (len(rsts) // 8 + 1)
                if b"".join(rsts) != cycle[:2 * len(rsts)]:
                    k = next(i for i, r in enumerate(rsts) if r[1] != 0xD0 + i % 8)
                    return f"restart marker RST{rsts[k][1] - 0xD0} out of sequence (RST{k % 8} expected) in scan {scans}"
            if mk is None:
                return None  # cut short inside the scan data: a truncation
            scan_end = mk.start()
            if data[scan_end + 1] not in _AFTER_SCAN:
                return f"marker 0x{data[scan_end + 1]:02x} inside the data of scan {scans} at offset {scan_end}"
            if interval and height:
                mcus = _mcu_count(width, height, comps, ids)
                want = -(-mcus // interval) - 1
                last = scan_end
                while last > end and data[last - 1] == 0xFF:  # fill bytes before the marker
                    last -= 1
                trailing = last - 2 >= end and data[last - 2] == 0xFF and 0xD0 <= data[last - 1] <= 0xD7
                if len(rsts) != want and not (len(rsts) == want + 1 and trailing):
                    return (f"scan {scans} holds {len(rsts)} restart markers where its {mcus} MCUs and "
                            f"restart interval {interval} give {want}")
            pos = scan_end
            continue
        pos = end
    return None  # no EOI: cut short, the decoder's to report


def _mcu_count(width: int, height: int, comps: Dict[int, Tuple[int, int]], ids: Tuple[int, ...]) -> int:
    """The MCUs of a scan of components ``ids`` (T.81 A.2): one block each in a scan of one
    component, else the frame's MCUs."""
    hmax = max(h for h, _ in comps.values())
    vmax = max(v for _, v in comps.values())
    if len(ids) == 1:
        h, v = comps[ids[0]]
        w, t = -(-width * h // hmax), -(-height * v // vmax)  # the component's own size
        return -(-w // 8) * -(-t // 8)
    return -(-width // (8 * hmax)) * -(-height // (8 * vmax))



# libjpeg's warnings that always mean lost data (jerror.h: JWRN_HIT_MARKER, JWRN_HUFF_BAD_CODE,
# JWRN_ARITH_BAD_CODE, JWRN_MUST_RESYNC); "N extraneous bytes before marker" is left out: damage that
# ends a scan's decoding early gives it, and so do junk bytes that leave the pixels whole
_DAMAGE_WARNINGS = ("premature end of data segment", "bad Huffman code", "bad arithmetic code", "instead of RST")


def cmyk_damage(data: bytes) -> Optional[str]:
    """The lost data that libjpeg warns of in a CMYK (or YCCK) JPEG, or None: Pillow decodes
    these itself (its own inversion rules) and drops the warnings, so libjpeg-turbo decodes the
    file once more through simplejpeg, as a check (``_DAMAGE_WARNINGS``, as in
    :func:`decode_rgb`). None without simplejpeg, or where it declines the file."""
    if simplejpeg is None:
        return None
    try:
        simplejpeg.decode_jpeg(data, colorspace="CMYK", strict=True)
    except ValueError as e:
        message = str(e).strip()
        if message.startswith("Corrupt JPEG data") and any(w in message for w in _DAMAGE_WARNINGS):
            return f"libjpeg: {message}"
    return None


def decode_rgb(data: bytes) -> Tuple[Optional["np.ndarray"], Optional[str]]:
    """A JPEG (RGB or greyscale; not CMYK) decoded to RGB uint8 [H, W, 3] as stored (no EXIF
    turn) by libjpeg-turbo through simplejpeg, whose ``strict`` mode turns libjpeg's warnings
    into errors: ``(pixels, None)``; ``(None, warning)`` when the warning says that data was
    lost (``_DAMAGE_WARNINGS``: the decoder would fill the rest of the scan in grey or garble
    it). Other "Corrupt JPEG data" warnings (junk bytes between segments or before the end, a
    damaged ICC segment) leave the pixels whole: decoded again without ``strict``, as Pillow
    would. ``(None, None)`` when the caller should decode with Pillow instead, as before:
    simplejpeg is not installed, the file ends early (Pillow says "truncated"), or any other
    warning or error (an unknown JFIF revision, junk that simplejpeg cannot decode past, a
    feature it does not read).

    The pixels are Pillow's (both run libjpeg-turbo's default integer IDCT and fancy
    upsampling), in 0.4-0.8x the time for 12 MP photos: Pillow's decoder is as fast, but its
    image is copied twice more on the way to a numpy array.
    """
    if simplejpeg is None:
        return None, None
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True), None
    except ValueError as e:
        message = str(e).strip()
    if not message.startswith("Corrupt JPEG data"):
        return None, None
    if any(w in message for w in _DAMAGE_WARNINGS):
        return None, f"libjpeg: {message}"
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False), None
    except ValueError:
        return None, None
