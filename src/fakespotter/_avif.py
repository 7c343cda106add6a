"""The picture sizes an AVIF codes (its AV1 sequence headers), against what its boxes declare.

libavif decodes the AV1 picture an item codes whatever its ``ispe`` box declares, and Pillow
takes the declared size: a 2 KB file declaring 64x64 but coding 12000x12000 was decoded whole
(144 MP, past the pixel limit that the declared size passed) and a 64x64 corner of it scored.
:func:`coded_sizes` reads the ``max_frame_width`` / ``max_frame_height`` of the sequence header
of every ``av01`` item (in its ``av1C`` box or at the start of its data) from the bytes alone
(ISO/IEC 14496-12 ``meta``/``iinf``/``iloc``; AV1 spec 5.3 and 5.5).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def f(self, n: int) -> int:
        v = 0
        for _ in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise ValueError("sequence header cut short")
            v = (v << 1) | ((self.data[byte] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return v

    def uvlc(self) -> int:
        zeros = 0
        while not self.f(1):
            zeros += 1
        return (1 << 32) - 1 if zeros >= 32 else self.f(zeros) + (1 << zeros) - 1


def _sequence_size(payload: bytes) -> Tuple[int, int]:
    """(max_frame_width, max_frame_height) of an AV1 sequence header OBU's payload."""
    b = _Bits(payload)
    b.f(3)  # seq_profile
    b.f(1)  # still_picture
    if b.f(1):  # reduced_still_picture_header
        b.f(5)  # seq_level_idx[0]
    else:
        decoder_model = False
        delay_bits = 0
        if b.f(1):  # timing_info_present_flag
            b.f(32), b.f(32)
            if b.f(1):  # equal_picture_interval
                b.uvlc()
            decoder_model = bool(b.f(1))
            if decoder_model:
                delay_bits = b.f(5) + 1
                b.f(32), b.f(5), b.f(5)
        initial_delay = b.f(1)
        for _ in range(b.f(5) + 1):  # operating points
            b.f(12)
            if b.f(5) > 7:  # seq_level_idx
                b.f(1)
            if decoder_model and b.f(1):
                b.f(delay_bits), b.f(delay_bits), b.f(1)
            if initial_delay and b.f(1):
                b.f(4)
    wbits, hbits = b.f(4) + 1, b.f(4) + 1
    return b.f(wbits) + 1, b.f(hbits) + 1


def _obus(data: bytes) -> Iterator[Tuple[int, bytes]]:
    """(type, payload) of the OBUs of ``data`` (low-overhead format; one without a size runs to
    the end)."""
    pos = 0
    while pos < len(data):
        header = data[pos]
        kind, extension, sized = (header >> 3) & 15, header & 4, header & 2
        pos += 2 if extension else 1
        size = len(data) - pos
        if sized:
            size = shift = 0
            for _ in range(8):  # leb128
                if pos >= len(data):
                    return
                byte = data[pos]
                pos += 1
                size |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
        yield kind, data[pos:pos + size]
        pos += size


def _boxes(data: bytes, start: int, end: int) -> Iterator[Tuple[bytes, int, int]]:
    """(type, payload start, box end) of the boxes in ``data[start:end]``."""
    pos = start
    while pos + 8 <= end:
        size, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        head = 8
        if size == 1:
            if pos + 16 > end:
                return
            size, head = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            return
        yield kind, pos + head, pos + size
        pos += size


def _uint(data: bytes, pos: int, n: int) -> Tuple[int, int]:
    return int.from_bytes(data[pos:pos + n], "big"), pos + n


def _child(data: bytes, start: int, end: int, kind: bytes) -> Optional[Tuple[int, int]]:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def _track_sizes(data: bytes, trak: Tuple[int, int], configs: List[bytes],
                 declared: List[Tuple[int, int]]) -> None:
    """What an animated AVIF's track (``moov/trak``) declares (``tkhd``, the ``av01`` sample
    entry) and where its sequence header is (the entry's ``av1C``, its first sample)."""
    tkhd = _child(data, *trak, b"tkhd")
    if tkhd is not None:
        at = tkhd[0] + (88 if data[tkhd[0]] == 1 else 76)  # (after the matrix: width, height in 16.16)
        if at + 8 <= tkhd[1]:
            declared.append((_uint(data, at, 4)[0] >> 16, _uint(data, at + 4, 4)[0] >> 16))
    stbl: Optional[Tuple[int, int]] = trak
    for kind in (b"mdia", b"minf", b"stbl"):
        stbl = _child(data, *stbl, kind) if stbl is not None else None
    if stbl is None:
        return
    stsd = _child(data, *stbl, b"stsd")
    if stsd is not None:
        for kind, s, e in _boxes(data, stsd[0] + 8, stsd[1]):
            if kind == b"av01" and s + 78 <= e:
                declared.append((_uint(data, s + 24, 2)[0], _uint(data, s + 26, 2)[0]))
                config = _child(data, s + 78, e, b"av1C")
                if config is not None and config[1] - config[0] > 4:
                    configs.append(data[config[0] + 4:config[1]])
    chunks = _child(data, *stbl, b"stco") or _child(data, *stbl, b"co64")
    sizes = _child(data, *stbl, b"stsz")
    if chunks is not None and sizes is not None and _uint(data, chunks[0] + 4, 4)[0]:
        wide = data[chunks[0] - 4:chunks[0]] == b"co64"
        offset = _uint(data, chunks[0] + 8, 8 if wide else 4)[0]
        size = _uint(data, sizes[0] + 4, 4)[0] or _uint(data, sizes[0] + 12, 4)[0]
        configs.append(data[offset:offset + min(size, 4096)])


def coded_sizes(data: bytes) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """(the (width, height) the sequence header of each ``av01`` item or track codes, the sizes
    their ``ispe``, ``tkhd`` and sample entries declare); what cannot be read is left out."""
    configs: List[bytes] = []
    declared: List[Tuple[int, int]] = []
    moov = _child(data, 0, len(data), b"moov")
    if moov is not None:
        for kind, s, e in _boxes(data, *moov):
            if kind == b"trak":
                _track_sizes(data, (s, e), configs, declared)
    meta = _child(data, 0, len(data), b"meta")
    if meta is None:
        return _coded(configs), declared
    av01: List[int] = []
    extents: Dict[int, Tuple[int, int, int]] = {}  # item -> (construction method, offset, length)
    idat: Optional[Tuple[int, int]] = None
    for kind, s, e in _boxes(data, meta[0] + 4, meta[1]):
        try:
            if kind == b"iinf":
                version = data[s]
                pos = s + 4 + (2 if version == 0 else 4)
                for k2, s2, e2 in _boxes(data, pos, e):
                    if k2 == b"infe" and data[s2] >= 2:
                        item, p = _uint(data, s2 + 4, 2 if data[s2] == 2 else 4)
                        if data[p + 2:p + 6] == b"av01":
                            av01.append(item)
            elif kind == b"iloc":
                version = data[s]
                sizes = data[s + 4:s + 6]
                off_n, len_n, base_n = sizes[0] >> 4, sizes[0] & 15, sizes[1] >> 4
                idx_n = sizes[1] & 15 if version in (1, 2) else 0
                count, pos = _uint(data, s + 6, 2 if version < 2 else 4)
                for _ in range(count):
                    if pos >= e:  # (a count the box does not hold)
                        break
                    item, pos = _uint(data, pos, 2 if version < 2 else 4)
                    method = 0
                    if version in (1, 2):
                        method, pos = _uint(data, pos, 2)
                        method &= 15
                    pos += 2  # data_reference_index
                    base, pos = _uint(data, pos, base_n)
                    n, pos = _uint(data, pos, 2)
                    for j in range(n):
                        if pos >= e:
                            break
                        pos += idx_n
                        offset, pos = _uint(data, pos, off_n)
                        length, pos = _uint(data, pos, len_n)
                        if j == 0:
                            extents[item] = (method, base + offset, length)
            elif kind == b"idat":
                idat = (s, e)
            elif kind == b"iprp":
                for k2, s2, e2 in _boxes(data, s, e):
                    if k2 == b"ipco":
                        for k3, s3, e3 in _boxes(data, s2, e2):
                            if k3 == b"av1C" and e3 - s3 > 4:
                                configs.append(data[s3 + 4:e3])
                            elif k3 == b"ispe" and e3 - s3 >= 12:
                                declared.append((_uint(data, s3 + 4, 4)[0], _uint(data, s3 + 8, 4)[0]))
        except IndexError:
            continue
    for item in av01:
        method, offset, length = extents.get(item, (-1, 0, 0))
        if method == 1 and idat is not None:
            offset += idat[0]
        elif method != 0:
            continue
        configs.append(data[offset:offset + min(length or len(data), 4096)])
    return _coded(configs), declared


def _coded(configs: List[bytes]) -> List[Tuple[int, int]]:
    """The sizes the first sequence header of each of ``configs`` (OBUs) codes."""
    coded = []
    for obus in configs:
        for kind, payload in _obus(obus):
            if kind == 1:
                try:
                    coded.append(_sequence_size(payload))
                except ValueError:
                    pass
                break
            if kind in (3, 4, 6):  # a frame begins: no sequence header came first
                break
    return coded


def size_problem(data: bytes, pixel_limit: int, limit_name: str) -> Optional[Tuple[str, str]]:
    """(error kind, message) for an AVIF that codes a picture of more than ``pixel_limit``
    pixels (``too_many_pixels``), or a larger one than its boxes declare
    (``decode_error``: a grid's tiles, an alpha plane and a thumbnail code no more than the
    image's size); None otherwise."""
    coded, declared = coded_sizes(data)
    for w, h in coded:
        if w * h > pixel_limit:
            return "too_many_pixels", (f"AVIF coding a {w}x{h} picture = {w * h} pixels, more than the pixel limit "
                                       f"{pixel_limit} ({limit_name})")
    if coded and declared:
        dw, dh = max(w for w, _ in declared), max(h for _, h in declared)
        cw, ch = max(w for w, _ in coded), max(h for _, h in coded)
        if cw > dw or ch > dh:
            return "decode_error", (f"AVIF declaring a {dw}x{dh} image but coding a {cw}x{ch} picture: a decoder "
                                    f"would give a part of it")
    return None
