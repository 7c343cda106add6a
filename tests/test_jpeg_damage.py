"""JPEGs whose scan data is damaged in ways libjpeg only warns about (Pillow then loads them
without an error, grey where the data was lost): decode_image refuses them as decode_error, and
loads every valid variant as before, through simplejpeg (libjpeg's warnings as errors) and
through Pillow (where simplejpeg is missing or declines) to the same pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from fakespotter import _jpeg
from fakespotter._jpeg import scan_damage
from fakespotter.data import ImageError, decode_image

RNG = np.random.default_rng(5)


def photo(w: int = 160, h: int = 120) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1) + RNG.integers(-20, 21, (h, w, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def jpeg(img: Image.Image = None, **kw) -> bytes:
    b = io.BytesIO()
    (img or photo()).save(b, "JPEG", **kw)
    return b.getvalue()


def pillow_loads(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(img.convert("RGB"))


def scans(data: bytes):
    """(start, end) of each scan's entropy-coded data, found by walking the segments by their
    lengths (written here apart from the code under test)."""
    out, pos = [], 2
    while pos < len(data):
        assert data[pos] == 0xFF
        m = data[pos + 1]
        if m == 0xD9:
            return out
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += 2 + length
        if m == 0xDA:
            end = pos
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            out.append((pos, end))
            pos = end
    raise AssertionError("no EOI")


def restart_markers(data: bytes, start: int, end: int):
    return [i for i in range(start, end - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]


VALID = {
    "baseline": {}, "q5": {"quality": 5}, "q100-444": {"quality": 100, "subsampling": 0},
    "420-optimize": {"subsampling": 2, "optimize": True}, "422": {"subsampling": 1},
    "progressive": {"progressive": True}, "restart-blocks": {"restart_marker_blocks": 3},
    "restart-rows": {"restart_marker_rows": 1},
    "progressive-restart": {"progressive": True, "restart_marker_blocks": 2},
}


def valid_files():
    for name, kw in VALID.items():
        yield name, jpeg(**kw)
    yield "grey", jpeg(photo().convert("L"))
    yield "grey-restart", jpeg(photo().convert("L"), restart_marker_blocks=5)
    yield "cmyk", jpeg(photo().convert("CMYK"))
    # restart intervals counted in MCUs of every subsampling, on a size that is no whole number of
    # MCUs (cameras write 4:2:2 with restart markers): an MCU count taken from the wrong sampling
    # factor refuses these valid files
    for sub in ("4:4:4", "4:2:2", "4:2:0"):
        for progressive in (False, True):
            yield (f"{sub}-restart{'-progressive' * progressive}",
                   jpeg(photo(77, 61), subsampling=sub, restart_marker_blocks=3, progressive=progressive))
    for w, h in ((1, 1), (7, 5), (17, 9), (64, 1), (1, 70)):
        yield f"{w}x{h}", jpeg(photo(w, h))
        yield f"{w}x{h}-progressive-restart", jpeg(photo(w, h), progressive=True, restart_marker_blocks=1)
    data = jpeg(restart_marker_blocks=4)
    eoi = data.rindex(b"\xff\xd9")
    yield "trailing data after EOI", data + b"\x00junk\xff\xd8" * 10
    yield "stray bytes before EOI", data[:eoi] + b"\x12\x34\x56" + data[eoi:]
    yield "fill bytes before EOI", data[:eoi] + b"\xff" * 5 + data[eoi:]
    yield "junk between header segments", data[:20] + b"junk" + data[20:]  # after APP0
    trailing = 0xD0 + len(restart_markers(data, *scans(data)[0])) % 8  # the next in the sequence
    yield "fill bytes after a trailing RST", data[:eoi] + bytes((0xFF, trailing, 0xFF, 0xFF)) + data[eoi:]
    # component ids 1, 1, 1 in the frame and the scan header (seen in files; libjpeg accepts them)
    ids = bytearray(jpeg(restart_marker_blocks=3))
    sof, sos = ids.index(b"\xff\xc0"), ids.index(b"\xff\xda")
    assert ids[sof + 9] == 3 and ids[sos + 4] == 3
    ids[sof + 13] = ids[sof + 16] = ids[sos + 7] = ids[sos + 9] = 1
    yield "repeated component ids", bytes(ids)
    prog = jpeg(progressive=True)
    after = scans(prog)[0][1] + 2 + int.from_bytes(prog[scans(prog)[0][1] + 2:scans(prog)[0][1] + 4], "big")
    yield "junk between segments after a scan", prog[:after] + b"junk" + prog[after:]
    yield "RST between segments after a scan", prog[:after] + b"\xff\xd0" + prog[after:]
    # the standard lets a progressive file stop short of full precision (a scan script may): the
    # same bytes as a file cut between scans and closed, which is therefore not refused either
    yield "progressive scans that stop early", prog[:scans(prog)[2][1]] + b"\xff\xd9"
    b = io.BytesIO()
    photo().save(b, "MPO", save_all=True, append_images=[photo(80, 60)])
    yield "mpo", b.getvalue()


@pytest.mark.parametrize("name,data", list(valid_files()), ids=[n for n, _ in valid_files()])
def test_valid_jpegs_decode_as_before(name, data, monkeypatch):
    assert scan_damage(data) is None
    img = decode_image(data)
    expected = pillow_loads(data)
    assert (img.height, img.width) == expected.shape[:2]
    if not name.startswith(("cmyk", "mpo")):  # (CMYK's inversion, the first frame: load_image's business)
        assert np.array_equal(img.rgb, expected)
    monkeypatch.setattr(_jpeg, "simplejpeg", None)  # an install without it: Pillow, the same pixels
    assert np.array_equal(decode_image(data).rgb, img.rgb)


def test_simplejpeg_decodes_what_it_can():
    """The fast path is taken (not a silent fallback to Pillow for everything), also for junk
    bytes that libjpeg warns about but that leave the pixels; it declines junk in the header,
    which simplejpeg cannot decode past."""
    files = dict(valid_files())
    for name in ("baseline", "progressive", "grey", "422", "restart-rows", "mpo", "7x5", "stray bytes before EOI",
                 "junk between segments after a scan"):
        rgb, damage = _jpeg.decode_rgb(files[name])
        assert rgb is not None and damage is None, name
    assert _jpeg.decode_rgb(files["junk between header segments"]) == (None, None)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_the_fast_path(orientation, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(photo(37, 20), exif=exif.tobytes())
    fast = decode_image(data)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(fast.rgb, want) and fast.rgb.flags.c_contiguous
    assert (fast.height, fast.width) == want.shape[:2]
    monkeypatch.setattr(_jpeg, "simplejpeg", None)
    assert np.array_equal(decode_image(data).rgb, want)


def damaged_files():
    data = jpeg(restart_marker_blocks=2)
    (start, end), = scans(data)
    rsts = restart_markers(data, start, end)
    assert len(rsts) > 20
    third = rsts[2]
    yield "RST out of sequence", data[:third + 1] + b"\xd5" + data[third + 2:], "out of sequence"
    yield "interval lost", data[:third] + data[rsts[3]:], "out of sequence"
    yield "cut at a restart marker and closed", data[:rsts[-1]] + b"\xff\xd9", "restart markers where"
    last3 = rsts[-3]
    yield ("three intervals cut and closed", data[:last3] + b"\xff\xd9", "restart markers where")
    plain = jpeg()
    (start, end), = scans(plain)
    mid = (start + end) // 2
    yield "SOF marker inside scan data", plain[:mid] + b"\xff\xc0" + plain[mid + 2:], "marker 0xc0 inside"
    yield "reserved marker inside scan data", plain[:mid] + b"\xff\x57" + plain[mid + 2:], "marker 0x57 inside"
    yield "RST without a restart interval", plain[:mid] + b"\xff\xd3" + plain[mid + 2:], "no restart interval"
    # without restart markers the bytes show nothing; libjpeg's warnings do (simplejpeg)
    yield "cut and closed, no restart markers", plain[:mid] + b"\xff\xd9", "libjpeg: .*premature end of data segment"
    ones = b"\xff\x00" * 4  # 32 one bits: the all-ones code is never a Huffman code
    yield "invalid Huffman code", plain[:mid] + ones + plain[mid + 8:], "libjpeg: .*bad Huffman code"
    prog = jpeg(progressive=True)
    (s2, e2) = scans(prog)[1]
    yield "progressive scan cut and closed", prog[:(s2 + e2) // 2] + b"\xff\xd9", "libjpeg: .*premature end"
    # CMYK, which Pillow decodes (a fuzz find: 39% of the pixels garbled, and scored)
    cmyk = jpeg(photo().convert("CMYK"))
    (start, end), = scans(cmyk)
    mid = (start + end) // 2
    yield "CMYK, a slice of scan data lost", cmyk[:mid] + cmyk[mid + 300:], "libjpeg: .*premature end of data segment"


@pytest.mark.parametrize("name,data,message", list(damaged_files()), ids=[n for n, _, _ in damaged_files()])
def test_damaged_scan_data_is_a_decode_error(name, data, message):
    if "marker inside" not in name:  # (libjpeg's own errors)
        pillow_loads(data)  # what the check adds: Pillow loads these without a word
    with pytest.raises(ImageError, match=message) as e:
        decode_image(data)
    assert e.value.kind == "decode_error" and str(e.value).startswith("damaged JPEG data: ")


def test_scan_cut_without_an_end_marker_stays_truncated():
    data = jpeg()
    (start, end), = scans(data)
    prog = jpeg(progressive=True)
    seg = scans(prog)[2][1]  # the segment after the third scan, cut inside
    for cut in (data[:(start + end) // 2], data[:end], prog[:seg + 3], prog[:seg + 7]):
        assert scan_damage(cut) is None
        with pytest.raises(ImageError) as e:
            decode_image(cut)
        assert e.value.kind == "truncated"


def test_out_of_memory_on_the_fast_path_is_a_decode_error(monkeypatch):
    import fakespotter.data as data_module

    def no_memory(_):
        raise MemoryError

    monkeypatch.setattr(data_module, "decode_rgb", no_memory)
    with pytest.raises(ImageError, match="out of memory while decoding") as e:
        decode_image(jpeg())
    assert e.value.kind == "decode_error"


def test_the_python_api_decodes_and_refuses_jpegs_as_the_scanner():
    """faces.load_image (FakeSpotter, features and chips on images) shares the scanner's JPEG
    decoding: the same pixels, and the same refusals, as ValueErrors naming the input."""
    from scan_helpers import jpeg_with_scans

    from fakespotter.data import MAX_JPEG_SCANS
    from fakespotter.faces import load_image

    for name, data in valid_files():
        if not name.startswith("cmyk"):
            assert np.array_equal(load_image(data), decode_image(data).rgb), name
    for name, data, message in damaged_files():
        with pytest.raises(ValueError, match=rf"^load_image: {len(data)} bytes: damaged JPEG data: .*{message}"):
            load_image(data)
    with pytest.raises(ValueError, match=f"more than {MAX_JPEG_SCANS} scans"):
        load_image(jpeg_with_scans(MAX_JPEG_SCANS + 1))
