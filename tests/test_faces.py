"""fakespotter.faces: decoding rules, detection and alignment into dlib face chips.

Decoding tests need nothing; detection tests need dlib-bin, the landmark model and the sample
photos and skip (saying how to get them) otherwise.
"""

import io
import os
import re
import shutil
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from fakespotter import faces as F
from fakespotter import weights as W
from fakespotter.data import decode_image


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# decoding


def test_rgb_passthrough_and_numpy_inputs():
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(F.load_image(a), a)
    np.testing.assert_array_equal(F.load_image(Image.fromarray(a)), a)
    np.testing.assert_array_equal(F.load_image(_png(Image.fromarray(a))), a)
    grey = a[..., 0]
    np.testing.assert_array_equal(F.load_image(grey), np.repeat(grey[..., None], 3, 2))
    np.testing.assert_array_equal(F.load_image(grey[..., None]), np.repeat(grey[..., None], 3, 2))


def test_path_input(tmp_path):
    a = np.full((4, 4, 3), 77, np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(a).save(path)
    np.testing.assert_array_equal(F.load_image(path), a)
    np.testing.assert_array_equal(F.load_image(str(path)), a)


def test_grey_and_bilevel():
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = F.load_image(_png(Image.fromarray(g, "L")))
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert (out == g[..., None]).all()
    bw = Image.fromarray(g > 127).convert("1")
    out = F.load_image(bw)
    assert set(np.unique(out)) == {0, 255}


def test_palette_with_and_without_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    np.testing.assert_array_equal(F.load_image(_png(p)), [[[10, 20, 30], [200, 100, 50]]])
    out = F.load_image(_png(p, transparency=1))  # index 1 fully transparent -> background
    np.testing.assert_array_equal(out, [[[10, 20, 30], [0, 0, 0]]])
    out = F.load_image(_png(p, transparency=1), background=(255, 255, 255))
    np.testing.assert_array_equal(out, [[[10, 20, 30], [255, 255, 255]]])


def test_alpha_is_composited_over_the_background():
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8)
    for img in (Image.fromarray(rgba, "RGBA"), _png(Image.fromarray(rgba, "RGBA")), rgba):
        np.testing.assert_array_equal(F.load_image(img), [[[200, 100, 50], [0, 0, 0],
                                                           [100, 50, 25]]])
    np.testing.assert_array_equal(
        F.load_image(rgba, background=(255, 255, 255)),
        [[[200, 100, 50], [255, 255, 255], [227, 177, 152]]])
    la = Image.fromarray(np.array([[[90, 255], [90, 0]]], np.uint8), "LA")
    np.testing.assert_array_equal(F.load_image(la), [[[90] * 3, [0] * 3]])
    pa = Image.new("PA", (2, 1))  # palette + alpha (a PIL image handed to the API)
    pa.putpalette([10, 20, 30] * 256)
    pa.putpixel((0, 0), (0, 255))
    pa.putpixel((1, 0), (0, 0))
    assert F.load_image(pa, background=(9, 9, 9)).tolist() == [[[10, 20, 30], [9, 9, 9]]]


def test_16_bit_grey_maps_by_257():
    v = np.array([[0, 256, 257, 385, 386, 65535]], np.uint16)
    expected = np.round(v / 257).astype(np.uint8)
    assert expected.tolist() == [[0, 1, 1, 1, 2, 255]]
    img = Image.open(io.BytesIO(_png(Image.fromarray(v))))
    assert img.mode.startswith("I")
    for src in (img, v):
        out = F.load_image(src)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out[..., 0], expected)
        np.testing.assert_array_equal(out[..., 2], expected)
    i32 = Image.fromarray(v.astype(np.int32) - 10, "I")  # 32-bit int: clipped to 0..65535
    assert F.load_image(i32)[0, :, 0].tolist() == [0, 1, 1, 1, 1, 255]
    ppm = Image.open(io.BytesIO(b"P5 3 1 65535\n" + np.array([0, 257, 65535], ">u2").tobytes()))
    assert ppm.mode == "I" and F.load_image(ppm)[0, :, 0].tolist() == [0, 1, 255]  # a 16-bit PPM


def test_8_bit_grey_in_32_bit_integers_is_taken_as_8_bit():
    """Mode I with no value above 255 is 8-bit grey stored wide (read as 16-bit it would be
    black): taken as is, negatives clipped; one value above 255 makes it 16-bit."""
    v = np.array([[-3, 0, 100, 255]], np.int32)
    assert F.load_image(Image.fromarray(v, "I"))[0, :, 0].tolist() == [0, 0, 100, 255]
    v[0, 0] = 256
    assert F.load_image(Image.fromarray(v, "I"))[0, :, 0].tolist() == [1, 0, 0, 1]


def test_float_and_cmyk_modes():
    f = Image.fromarray(np.array([[-5.0, 0.4, 127.6, 300.0]], np.float32), "F")
    assert F.load_image(f)[0, :, 0].tolist() == [0, 0, 128, 255]
    # no value above 1: a 0..1 image (as numpy and scientific tools save them), not a black one
    f = Image.fromarray(np.array([[-0.1, 0.0, 0.2, 0.5, 1.0]], np.float32), "F")
    assert F.load_image(f)[0, :, 0].tolist() == [0, 0, 51, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.01]], np.float32), "F")  # a third above 1: 0..255
    assert F.load_image(f)[0, :, 0].tolist() == [0, 0, 1]
    ramp = np.tile(np.linspace(0, 1, 1000, dtype=np.float32), (10, 1))  # 0..1, bar one highlight (it was black)
    ramp[3, 7] = 1.5
    out = F.load_image(Image.fromarray(ramp, "F"))[..., 0]
    assert out[3, 7] == 255 and out[0, -1] == 255 and abs(float(out.mean()) - 127.5) < 1
    ramp[:2, :6] = 1.5  # 12 of 10,000 values above 1: more than FLOAT_OVERSHOOT, taken as 0..255
    assert F.load_image(Image.fromarray(ramp, "F"))[..., 0].max() == 2
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    np.testing.assert_array_equal(F.load_image(cmyk), np.full((2, 2, 3), 255))
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(buf, "JPEG", quality=95)
    out = F.load_image(buf.getvalue())
    assert out.shape == (8, 8, 3) and out[..., 0].max() < 20 and out[..., 1].min() > 235


def test_colour_modes_whose_band_names_hold_an_a_are_opaque():
    """LAB's bands are L, A and B: no alpha. Taken as one it once composited a resized image's
    leftover fourth bytes (zeros) over black, and the whole image came out black."""
    rgb = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)).resize((45, 57))
    for mode in ("LAB", "HSV", "YCbCr"):
        img = rgb.convert(mode)
        np.testing.assert_array_equal(F.load_image(img), np.asarray(img.convert("RGB")))
        assert F.load_image(img).mean() > 50


def test_premultiplied_alpha_modes():
    """RGBa and La (alpha premultiplied, e.g. after Pillow's own resampling of RGBA) composite
    as their straight-alpha forms do; La has no direct conversion to RGB in Pillow."""
    la = Image.fromarray(np.array([[[200, 255], [200, 128], [200, 0]]], np.uint8), "LA")
    rgba = la.convert("RGBA")
    for straight, pre in ((la, la.convert("La")), (rgba, rgba.convert("RGBa"))):
        assert pre.mode in ("La", "RGBa")
        np.testing.assert_allclose(F.load_image(pre).astype(int), F.load_image(straight).astype(int), atol=1)
    assert F.load_image(la.convert("La"))[0, :, 0].tolist() == [200, 100, 0]


def test_bad_inputs_are_rejected_with_clear_errors(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.jpg is empty \(0 bytes\)"):
        F.load_image(tmp_path / "empty.jpg")
    with pytest.raises(ValueError, match=r"the image bytes are empty \(0 bytes\)"):
        F.load_image(b"")
    with pytest.raises(TypeError, match=r"arrays must be uint8 or uint16, got dtype float32 \(a float image: scale "
                                        r"it to 0..255 and convert it with np.round\(a\).astype\(np.uint8\)\)"):
        F.load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(4, 4, 2\)"):
        F.load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="got int"):
        F.load_image(3)
    with pytest.raises(ValueError, match="background must be 3 ints"):
        F.load_image(np.zeros((4, 4, 3), np.uint8), background=(0, 0))


def test_conversions_work_in_blocks_with_the_whole_image_formulas(monkeypatch):
    g = np.random.default_rng(4)
    rgba = g.integers(0, 256, (13, 11, 4), dtype=np.uint8)
    rgba[0, :4, 3] = [0, 1, 254, 255]
    u16 = g.integers(0, 65536, (13, 11), dtype=np.uint16)
    i32 = g.integers(-70000, 140000, (13, 11), dtype=np.int32)
    f32 = (g.standard_normal((13, 11)) * 200).astype(np.float32)
    bg = (7, 200, 255)
    want_rgba = ((rgba[..., :3].astype(np.uint32) * rgba[..., 3:].astype(np.uint32)
                  + np.array(bg, np.uint32) * (255 - rgba[..., 3:].astype(np.uint32)) + 127) // 255).astype(np.uint8)
    for block in (7, 11, 1 << 20):  # rows cut mid-image, one row per block, the whole image
        monkeypatch.setattr(F, "_BLOCK_PIXELS", block)
        np.testing.assert_array_equal(F._composite(rgba, bg), want_rgba)
        for a in (u16, i32):
            want = np.round(np.clip(a.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)
            np.testing.assert_array_equal(F._u16_to_u8(a), want)
        want_f = np.round(np.clip(f32.astype(np.float64), 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(F.load_image(Image.fromarray(f32, "F"))[..., 1], want_f)
        f01 = g.random((13, 11), dtype=np.float32)  # (its maximum is in one block, and scales them all)
        want_f = np.round(f01.astype(np.float64) * 255).astype(np.uint8)
        np.testing.assert_array_equal(F.load_image(Image.fromarray(f01, "F"))[..., 1], want_f)


def test_conversions_of_large_images_need_little_memory_beyond_their_output():
    # a 9400x9400 RGBA PNG took 5.5 GB to decode when these built whole-image uint32 temporaries
    tracemalloc = pytest.importorskip("tracemalloc")
    g = np.random.default_rng(5)
    rgba = g.integers(0, 256, (2000, 2000, 4), dtype=np.uint8)
    u16 = g.integers(0, 65536, (2000, 2000), dtype=np.uint16)
    for fn in (lambda: F._composite(rgba, (0, 0, 0)), lambda: F._u16_to_u8(u16)):
        tracemalloc.start()
        try:
            out = fn()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < out.nbytes + 32 * 2**20, (peak, out.nbytes)


def test_only_the_scanners_formats_are_decoded(tmp_path):
    # Pillow's EPS plugin runs Ghostscript on the file: the API opens what the scanner opens
    eps = tmp_path / "page.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "ICO")
    for source in (eps, buf.getvalue()):
        with pytest.raises(ValueError, match="not an image in a format fakespotter reads .JPEG, MPO, PNG"):
            F.load_image(source)


def test_frames_are_counted_and_tiff_pages_only_up_to_a_cap(monkeypatch):
    from fakespotter import data as D

    def tiff(pages):
        buf = io.BytesIO()
        first, *rest = [Image.new("L", (4, 4), i) for i in range(pages)]
        first.save(buf, "TIFF", save_all=True, append_images=rest)
        return buf.getvalue()

    gif = io.BytesIO()
    first, *rest = [Image.new("L", (4, 4), v) for v in (0, 100, 200)]
    first.save(gif, "GIF", save_all=True, append_images=rest)
    assert D.decode_image(gif.getvalue()).frames == 3
    assert D.decode_image(tiff(1)).frames == 1
    monkeypatch.setattr(D, "MAX_COUNTED_PAGES", 5)
    assert [D.decode_image(tiff(n)).frames for n in (5, 6)] == [5, None]  # more than the cap: not counted


def test_pillows_pixel_limit_holds_for_other_threads(monkeypatch):
    from fakespotter import data as D
    from scan_helpers import png_bomb

    limit = Image.MAX_IMAGE_PIXELS
    seen = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: (seen.append(Image.MAX_IMAGE_PIXELS), real_open(*a, **k))[1])
    D.decode_image(_png(Image.new("RGB", (32, 32))))
    assert seen == [limit]  # an ordinary image: opened with Pillow's limit in place
    bomb = png_bomb(20_000, 10_000)  # over twice Pillow's limit: the scanner's own limit decides
    with pytest.raises(D.ImageError, match="20000x10000 = 200000000 pixels, more than the pixel limit"):
        D.decode_image(bomb)
    assert seen[1:] == [limit, None] and Image.MAX_IMAGE_PIXELS == limit
    # while one thread decodes with the limit lifted, another's open waits, then meets the limit
    errors = []
    with F.pillow_pixel_limit_lifted():
        t = threading.Thread(target=lambda: errors.append(pytest.raises(ValueError, F.load_image, bomb)))
        t.start()
        t.join(0.5)
        assert t.is_alive() and Image.MAX_IMAGE_PIXELS is None
    t.join()
    assert Image.MAX_IMAGE_PIXELS == limit and "decompression bomb" in str(errors[0].value)


@pytest.mark.parametrize("orientation,transpose", [
    (3, Image.Transpose.ROTATE_180),
    (6, Image.Transpose.ROTATE_90),  # stored rotated 90 CCW; viewer rotates 90 CW
    (8, Image.Transpose.ROTATE_270),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_orientation_is_applied(orientation, transpose):
    a = np.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    stored = Image.fromarray(a).transpose(transpose)
    exif = Image.Exif()
    exif[0x0112] = orientation
    np.testing.assert_array_equal(F.load_image(_png(stored, exif=exif)), a)


def test_to_tensor_and_chip_from_aligned():
    chips = [np.full((150, 150, 3), i, np.uint8) for i in (0, 255)]
    t = F.to_tensor(chips)
    assert t.dtype == torch.float32 and t.shape == (2, 3, 150, 150)
    assert t[0].max() == 0 and t[1].min() == 255
    torch.testing.assert_close(F.to_tensor(np.stack(chips)), t)
    assert F.to_tensor([]).shape == (0, 3, 150, 150)
    with pytest.raises(ValueError, match="one shape"):
        F.to_tensor([chips[0], chips[0][:10]])
    c = np.random.default_rng(2).integers(0, 256, (150, 150, 3), dtype=np.uint8)
    assert F.chip_from_aligned(c) is not None
    np.testing.assert_array_equal(F.chip_from_aligned(c), c)
    big = F.chip_from_aligned(np.full((300, 280, 4), 255, np.uint8))
    assert big.shape == (150, 150, 3) and big.dtype == np.uint8 and (big == 255).all()
    assert F.chip_from_aligned(np.zeros((16, 32, 3), np.uint8)).shape == (150, 150, 3)  # the limits: allowed
    for h, w in ((1, 1), (15, 15), (16, 33), (400, 3)):
        with pytest.raises(ValueError, match=rf"a {w}x{h} image cannot be an aligned face chip"):
            F.chip_from_aligned(np.zeros((h, w, 3), np.uint8))


# A damaged EXIF block: SyntaxError ("not a TIFF file"), a BigTIFF magic whose 8-byte offset is
# missing (struct.error), a header cut short, and orientations outside 1..8.
_BAD_EXIF = {
    "garbage": b"garbage!" + bytes(24),
    "byte order": b"XX*\x00\x08\x00\x00\x00" + bytes(16),
    "bigtiff magic": b"II+\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00\x00\x00\x00\x00",
    "cut short": b"MM\x00*\x00",
    "orientation 0": b"II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
    "orientation 9": b"II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00",
}


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
@pytest.mark.parametrize("blob", list(_BAD_EXIF), ids=list(_BAD_EXIF))
def test_a_damaged_exif_block_leaves_the_image_as_stored(fmt, blob):
    """A readable image is not refused for its EXIF block: one that cannot be read counts as
    upright (a PNG or WebP with such a block was a decode error, or a bare struct.error)."""
    from fakespotter import data as D

    a = np.random.default_rng(6).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    Image.fromarray(a).save(buf, fmt, exif=_BAD_EXIF[blob], **kw)
    want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))  # the stored pixels
    if fmt != "JPEG":
        np.testing.assert_array_equal(want, a)
    np.testing.assert_array_equal(F.load_image(buf.getvalue()), want)
    np.testing.assert_array_equal(D.decode_image(buf.getvalue()).rgb, want)


def test_the_one_transparent_colour_of_rgb_and_16_bit_grey_is_composited():
    """PNG's tRNS for an RGB or a 16-bit grey image names one colour as transparent: composited
    like 8-bit grey's and palette transparency (RGB's and 16-bit grey's were ignored)."""
    rgb = np.array([[[10, 20, 30], [1, 2, 3], [10, 20, 31]]], np.uint8)
    png = _png(Image.fromarray(rgb), transparency=(10, 20, 30))
    np.testing.assert_array_equal(F.load_image(png), [[[0, 0, 0], [1, 2, 3], [10, 20, 31]]])
    np.testing.assert_array_equal(F.load_image(png, background=(7, 8, 9)), [[[7, 8, 9], [1, 2, 3], [10, 20, 31]]])
    grey = np.array([[1000, 30000, 1001, 65535]], np.uint16)
    png16 = _png(Image.fromarray(grey), transparency=1000)
    assert Image.open(io.BytesIO(png16)).mode.startswith("I")
    out = F.load_image(png16, background=(255, 0, 0))
    np.testing.assert_array_equal(out, [[[255, 0, 0], [117] * 3, [4] * 3, [255] * 3]])
    grey8 = _png(Image.fromarray((grey // 257).astype(np.uint8)), transparency=3)  # the 8-bit rule it matches
    np.testing.assert_array_equal(F.load_image(grey8, background=(255, 0, 0))[0, 0], [255, 0, 0])


@pytest.mark.parametrize("maxval", [1000, 4095, 65535])
def test_a_dark_16_bit_pgm_keeps_its_scale(maxval):
    """A PGM with maxval > 255 is 16-bit whatever its values (Pillow scales it to 0..65535): one
    whose scaled values are all <= 255 is near black, as the same samples in a 16-bit PNG are,
    not taken as 8-bit grey (it came out 257 times too bright)."""
    v = np.array([[0, 1, 255 * maxval // 65535, 2]], np.uint16)
    pgm = b"P5 4 1 %d\n" % maxval + v.astype(">u2").tobytes()
    scaled = np.round(v / maxval * 65535)  # what Pillow gives
    assert 0 < scaled.max() <= 255, "premise: values the 8-bit rule for 32-bit integers would take"
    want = np.round(scaled / 257).astype(np.uint8)
    np.testing.assert_array_equal(F.load_image(pgm), np.repeat(want[..., None], 3, 2))
    if maxval == 65535:
        np.testing.assert_array_equal(F.load_image(_png(Image.fromarray(v))), F.load_image(pgm))
    # the same values as an in-memory image of 32-bit integers keep the 8-bit rule
    i32 = Image.fromarray(scaled.astype(np.int32), "I")
    assert F.load_image(i32)[0, :, 0].tolist() == scaled[0].tolist()


def _bmp_v4(rgba):
    """A 32-bit BMP with a BITMAPV4HEADER whose masks include alpha (BGRA, bottom-up)."""
    h, w, _ = rgba.shape
    px = np.ascontiguousarray(rgba[::-1][..., [2, 1, 0, 3]]).tobytes()
    info = struct.pack("<IiiHHIIiiII", 108, w, h, 1, 32, 3, len(px), 2835, 2835, 0, 0)
    info += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000) + b"BGRs" + bytes(48)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(px), 0, 0, 14 + len(info)) + info + px


def test_a_bmp_whose_alpha_is_0_everywhere_is_opaque():
    """32-bit BMP writers often declare an alpha mask and leave every alpha byte 0: such a file is
    opaque (it came out all background), as Chromium shows it; other alpha is composited."""
    rgb = np.random.default_rng(7).integers(0, 256, (5, 3, 3), dtype=np.uint8)
    zero = np.dstack([rgb, np.zeros((5, 3), np.uint8)])
    assert Image.open(io.BytesIO(_bmp_v4(zero))).mode == "RGBA", "premise: Pillow reads the alpha"
    np.testing.assert_array_equal(F.load_image(_bmp_v4(zero)), rgb)
    some = zero.copy()
    some[0, 0, 3] = 255
    want = np.zeros_like(rgb)
    want[0, 0] = rgb[0, 0]
    np.testing.assert_array_equal(F.load_image(_bmp_v4(some)), want)
    np.testing.assert_array_equal(F.load_image(_png(Image.fromarray(zero, "RGBA"))), np.zeros_like(rgb))  # PNG: as said


def _ppm(magic, w, h, maxval, samples):
    return b"%s %d %d %d\n" % (magic, w, h, maxval) + samples.astype(">u2" if maxval > 255 else np.uint8).tobytes()


@pytest.mark.parametrize("magic", [b"P5", b"P6"])
@pytest.mark.parametrize("maxval", [1, 100, 254, 256, 1000, 4095, 65534, 65535])
def test_pgm_ppm_of_any_maxval_decode_as_pillow_does_without_its_per_sample_loop(monkeypatch, magic, maxval):
    """Pillow decodes a binary PGM/PPM whose maxval is not 255 one sample at a time in Python
    (20 s for a 3 MP 16-bit PPM); open_image decodes it in numpy to the same pixels, samples
    above maxval and halves (round to even) included, in blocks of any size."""
    from PIL import PpmImagePlugin

    bands = 3 if magic == b"P6" else 1
    g = np.random.default_rng(maxval)
    samples = g.integers(0, maxval + 1, (5, 7, bands))
    samples.flat[:3] = [maxval, 0, min(maxval + 1, 255 if maxval < 256 else 65535)]  # the ends, one above
    data = _ppm(magic, 7, 5, maxval, samples)
    with Image.open(io.BytesIO(data)) as ref:  # Pillow's own decoder
        ref.load()
        want_mode, want = ref.mode, np.asarray(ref)
    with pytest.raises((ValueError, OSError)) as cut:  # and its words for a file cut short
        Image.open(io.BytesIO(data[:-1])).load()
    monkeypatch.setattr(PpmImagePlugin.PpmDecoder, "decode", lambda *a: pytest.fail("Pillow's per-sample decoder ran"))
    for block in (4, 1 << 20):
        monkeypatch.setattr(F, "_BLOCK_PIXELS", block)
        with F.open_image(io.BytesIO(data)) as img:
            img.load()
            assert img.mode == want_mode
            np.testing.assert_array_equal(np.asarray(img), want)
    with pytest.raises(ValueError, match=r"load_image: \d+ bytes is not an image Pillow can decode "
                                         rf"\({type(cut.value).__name__}: {re.escape(str(cut.value))}\)"):
        F.load_image(data[:-1])


# Pillow's ways of failing on plain PBM/PGM/PPM data: words its messages (and ours) hold
_PNM_FAILURES = re.compile(r"Token too long|invalid literal for int|is negative|too large for this mode|"
                           r"not enough image data|Invalid token for this mode")
_SAFEBLOCKS = (1, 3, 7, 1 << 20)  # Pillow's (ImageFile.SAFEBLOCK) and tiny ones: every token and comment split


def _plain_decoded(opener, data, monkeypatch, safeblock):
    """``(mode, pixels)`` of ``data`` opened with ``opener`` and read in blocks of ``safeblock``
    bytes, or ``("fails", words)`` with the words of _PNM_FAILURES its ValueError holds."""
    monkeypatch.setattr(ImageFile, "SAFEBLOCK", safeblock)
    try:
        with opener(io.BytesIO(data)) as img:
            img.load()
            return img.mode, np.asarray(img).tolist()
    except ValueError as e:
        found = _PNM_FAILURES.search(str(e))
        assert found, f"an unexpected failure: {e!r}"
        return "fails", found.group()


def _pillow_and_ours(monkeypatch, data):
    """The outcomes of Pillow's own plain decoder at each of _SAFEBLOCKS, and of open_image's (with
    Pillow's made to fail) at each of them, parsing 1, 2 or 65536 tokens at once."""
    from PIL import PpmImagePlugin

    pillow = [_plain_decoded(Image.open, data, monkeypatch, size) for size in _SAFEBLOCKS]
    monkeypatch.setattr(PpmImagePlugin.PpmPlainDecoder, "decode", lambda *a: pytest.fail("Pillow's plain decoder ran"))
    ours = []
    for tokens in (1, 2, 1 << 16):
        monkeypatch.setattr(F, "_PNM_TOKENS", tokens)
        ours.append([_plain_decoded(F.open_image, data, monkeypatch, size) for size in _SAFEBLOCKS])
    return pillow, ours


def _plain_pnm(magic, maxval, samples, rng):
    """``samples`` (int [H, W, bands]; P1: 0 or 1) as a plain PBM/PGM/PPM written every way Pillow
    reads: comments anywhere whitespace may be (ended by LF, CR or CRLF), any whitespace between
    tokens (none between P1's), and P2/P3 tokens spelled as Python ints ("+7", "007", "1_0", "-0")."""
    h, w, _ = samples.shape
    seps = [b" ", b"\t", b"\n", b"\r\n", b"\r", b"\x0b", b"\x0c", b" \t ", b" # a comment\n", b"\t#\r\n",
            b"\n#x # y\r", b"\r\n#\n"]
    out = [magic + b" %d %d" % (w, h) + (b"" if magic == b"P1" else b" %d" % maxval) + b"\n# made by hand\r\n"]
    for v in samples.ravel().tolist():
        token = b"%d" % v
        how = rng.integers(8)
        if magic == b"P1":
            out.append(token + (rng.choice(seps) if how < 4 else b""))
            continue
        if how == 0:
            token = b"+" + token
        elif how == 1:
            token = token.rjust(10, b"0")
        elif how == 2 and v == 0:
            token = b"-0"
        elif how == 2 and v >= 10:
            token = token[:1] + b"_" + token[1:]
        out.append(token + rng.choice(seps))
    return b"".join(out)


@pytest.mark.parametrize("magic,maxval", [(b"P1", 1), (b"P2", 1), (b"P2", 100), (b"P2", 255), (b"P2", 256),
                                          (b"P2", 1000), (b"P2", 65535), (b"P3", 1), (b"P3", 15), (b"P3", 255),
                                          (b"P3", 4095), (b"P3", 65535)])
def test_plain_pbm_pgm_ppm_decode_as_pillow_does_without_its_per_token_loop(monkeypatch, magic, maxval):
    """Pillow parses plain (ASCII) PBM/PGM/PPM token by token in Python (27 s for a 10 MP P3);
    open_image decodes them in numpy to the same pixels, in the same modes and scales; and read in
    tiny blocks, where Pillow loses samples to comments that end at a block's start, it reads what
    Pillow reads."""
    bands = 3 if magic == b"P3" else 1
    rng = np.random.default_rng(maxval * 10 + magic[1])
    samples = rng.integers(0, maxval + 1, (4, 5, bands))
    samples.flat[:2] = [maxval, 0]
    if magic == b"P1":  # 1 is black
        want = ("1", (samples[..., 0] == 0).tolist())
    elif magic == b"P2" and maxval > 255:
        want = ("I", np.round(samples[..., 0] / maxval * 65535).astype(int).tolist())
    else:
        scaled = np.round(samples / maxval * 255).astype(int)
        want = ("L", scaled[..., 0].tolist()) if bands == 1 else ("RGB", scaled.tolist())
    pillow, ours = _pillow_and_ours(monkeypatch, _plain_pnm(magic, maxval, samples, rng))
    assert pillow[-1] == want  # premise: what Pillow reads (in its own blocks)
    assert ours == [pillow] * len(ours)


@pytest.mark.parametrize("data,safeblock,want", [
    (b"P2 4 1 255\n1#c\n2 3\t#\r4 5", 1 << 20, ("L", [[12, 3, 4, 5]])),  # a comment goes with its LF or CR
    (b"P2 2 1 255\n#c\r\n1 #c\r\n2", 1 << 20, ("L", [[1, 2]])),  # CRLF; the end of the file ends a token
    (b"P3 1 1 255\n1\t2\x0b3\x0c", 1 << 20, ("RGB", [[[1, 2, 3]]])),
    (b"P2 4 1 1000\n+7 -0 1_0 0001000\n", 1 << 20, ("I", [[459, 0, 655, 65535]])),
    (b"P2 2 1 255\n1 2 xyz 12345678901\n", 1 << 20, ("L", [[1, 2]])),  # tokens after the last sample: not read
    (b"P1 4 1\n0101", 1 << 20, ("1", [[True, False, True, False]])),
    (b"P1 2 2\n0#c\r1\n1 0 # c", 1 << 20, ("1", [[True, False], [False, True]])),
    (b"P2 2 1 255\n1\n", 1 << 20, ("fails", "not enough image data")),
    (b"P3 1 1 255\n1 2\n# 3\n", 1 << 20, ("fails", "not enough image data")),
    (b"P1 2 1\n0", 1 << 20, ("fails", "not enough image data")),
    (b"P2 2 1 10\n5 11\n", 1 << 20, ("fails", "too large for this mode")),
    (b"P2 1 1 65535\n00000000001\n", 1 << 20, ("fails", "Token too long")),
    (b"P2 1 1 255\n-1\n", 1 << 20, ("fails", "is negative")),
    (b"P2 1 1 255\n1x\n", 1 << 20, ("fails", "invalid literal for int")),
    (b"P2 1 1 255\n1__0\n", 1 << 20, ("fails", "invalid literal for int")),
    (b"P2 1 1 255\n_1\n", 1 << 20, ("fails", "invalid literal for int")),
    (b"P2 1 1 255\n1_\n", 1 << 20, ("fails", "invalid literal for int")),
    (b"P2 1 1 255\n1+2\n", 1 << 20, ("fails", "invalid literal for int")),
    (b"P2 1 1 255\n+\n", 1 << 20, ("fails", "invalid literal for int")),
    (b"P2 1 1 255\n0x1\n", 1 << 20, ("fails", "invalid literal for int")),
    (b"P2 1 1 255\n\xd9\xa1\n", 1 << 20, ("fails", "invalid literal for int")),  # (an Arabic-Indic 1)
    (b"P1 2 1\n02\n", 1 << 20, ("fails", "Invalid token for this mode")),
    # what depends on where Pillow's blocks end
    (b"P1 1 1\n0 x", 1 << 20, ("fails", "Invalid token for this mode")),  # the rest of a block read is checked
    (b"P1 1 1\n0 x", 2, ("1", [[True]])),  # ... not the next block
    (b"P2 1 1 255\n1 12345678901", 1 << 20, ("fails", "Token too long")),  # a block's unfinished last token
    (b"P2 1 1 255\n1 12345678901", 2, ("L", [[1]])),
    (b"P2 3 1 255\n1 #abc\n2\r3 4\n", 6, ("L", [[1, 3, 4]])),  # a block opening with LF that holds a CR
    (b"P2 3 1 65535\n1 12#c\r\n34 5 6\n", 6, ("I", [[1, 1234, 5]])),  # ... opening with CR, LF next
])
def test_plain_pnm_rules_and_failures_are_pillows(monkeypatch, data, safeblock, want):
    """open_image's plain PBM/PGM/PPM decoder reads what Pillow's does, block quirks included, and
    fails where it fails, for the same reason."""
    monkeypatch.setattr(F, "_PNM_TOKENS", 1 << 16)
    assert _plain_decoded(Image.open, data, monkeypatch, safeblock) == want  # premise: Pillow's reading
    pillow, ours = _pillow_and_ours(monkeypatch, data)
    assert ours == [pillow] * len(ours)
    assert _plain_decoded(F.open_image, data, monkeypatch, safeblock) == want


def test_pillows_failures_are_value_errors_that_name_the_image(tmp_path):
    """Whatever Pillow raises on a file it cannot read, load_image raises a ValueError naming it
    (Pillow's own ValueErrors escaped bare); a format Pillow knows but refuses says what its
    reader said (a 12-bit JPEG was "not an image in a format fakespotter reads")."""
    path = tmp_path / "over.pgm"
    path.write_bytes(b"P2 2 1 10\n5 300\n")  # a sample over the maxval
    with pytest.raises(ValueError, match=r"load_image: .*over\.pgm is not an image Pillow can decode \(ValueError: "
                                         r"Channel value too large"):
        F.load_image(path)
    sof1 = b"\xff\xd8\xff\xc1" + struct.pack(">HBHHB", 11, 12, 8, 8, 1) + b"\x01\x11\x00"  # a 12-bit JPEG's header
    (tmp_path / "x.jpg").write_bytes(sof1)
    for source, name in ((tmp_path / "x.jpg", r".*x\.jpg"), (sof1, r"15 bytes")):
        with pytest.raises(ValueError, match=rf"load_image: {name}: it starts like JPEG, but Pillow's JPEG reader "
                                             r"cannot read it: cannot handle 12-bit layers"):
            F.load_image(source)


def test_missing_dlib_error_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    failure = ModuleNotFoundError("No module named 'dlib'", name="dlib")

    def fake_import(name, *args, **kwargs):
        if name == "dlib":
            raise failure
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'fakespotter\[faces\]' \(the prebuilt dlib-bin==20\.0\.1\.post1\); or "
                                          r"give already-aligned face chips \(--aligned on the command line"):
        F._import_dlib()
    # installed, but its library cannot be loaded (no address space left, say): not "install it"
    failure = ImportError("/x/_dlib_pybind11.so: failed to map segment from shared object\nmore", name="_dlib_pybind11")
    with pytest.raises(ImportError, match=r"^dlib is installed but cannot be loaded: /x/_dlib_pybind11\.so: failed to "
                                          r"map segment from shared object$"):
        F._import_dlib()


# ----------------------------------------------------------------------------------------------
# detection and alignment (dlib-bin, landmark model and sample photos)


@pytest.fixture(scope="module")
def photos():
    try:
        import dlib  # noqa: F401
    except ImportError:
        pytest.skip("dlib-bin not installed: pip install dlib-bin==20.0.1.post1")
    try:
        W.weights_path(F.LANDMARKS_NAME)
    except W.WeightsNotFoundError:
        pytest.skip("weights not fetched: run `python -m fakespotter.weights fetch`")
    try:
        paths = W.fetch_sample_photos()
    except W.FetchError as exc:
        pytest.skip(f"sample photos not fetched ({exc}): run "
                    f"`python -m fakespotter.weights fetch --photos`")
    out = {}
    for name, path in paths.items():  # downscale: detection stays fast, faces stay ~100 px
        img = Image.open(path).convert("RGB")
        img.thumbnail((360, 360))
        out[name] = np.asarray(img)
    return out


def test_one_face_per_portrait(photos):
    for name, img in photos.items():
        faces = F.detect_and_align(img)
        assert len(faces) == 1, name
        (face,) = faces
        assert face.chip.shape == (150, 150, 3) and face.chip.dtype == np.uint8
        x0, y0, x1, y1 = face.box
        assert all(isinstance(v, int) for v in face.box) and x1 - x0 > 40 and y1 - y0 > 40
        assert face.score > 0 and face.landmarks.shape == (5, 2)
        assert (x0 - 10 <= face.landmarks[:, 0]).all() and (face.landmarks[:, 0] <= x1 + 10).all()


def test_chip_equals_dlib_get_face_chip(photos):
    import dlib

    img = photos["obama.jpg"]
    (face,) = F.detect_and_align(img)
    predictor = dlib.shape_predictor(str(W.weights_path(F.LANDMARKS_NAME)))
    (rect,) = dlib.get_frontal_face_detector()(img, 1)
    ref = dlib.get_face_chip(img, predictor(img, rect), size=150, padding=0.25)
    np.testing.assert_array_equal(face.chip, ref)


def test_no_face_gives_an_empty_list(photos):
    rng = np.random.default_rng(3)
    assert F.detect_and_align(np.full((200, 240, 3), 128, np.uint8)) == []
    assert F.detect_and_align(rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)) == []


def test_two_faces_give_two_chips(photos):
    a, b = photos["obama.jpg"], photos["biden.jpg"]
    h = max(a.shape[0], b.shape[0])
    canvas = np.zeros((h, a.shape[1] + b.shape[1], 3), np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1]:] = b
    faces = F.detect_and_align(canvas)
    assert len(faces) == 2
    assert sorted(f.box[0] < a.shape[1] for f in faces) == [False, True]
    assert faces[0].score >= faces[1].score
    assert F.to_tensor(faces).shape == (2, 3, 150, 150)


def _low_contrast(rgb, contrast=0.14):
    """A face the detector finds weakly: score in (0, WEAK_FACE_SCORE) (measured on biden.jpg)."""
    return (128 + (rgb.astype(float) - 128) * contrast).round().astype(np.uint8)


def _side_by_side(a, b):
    canvas = np.zeros((max(a.shape[0], b.shape[0]), a.shape[1] + b.shape[1], 3), np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1]:] = b
    return canvas


def test_weak_detections_are_dropped_beside_a_strong_face_only(photos):
    import dlib

    weak_alone = _low_contrast(photos["biden.jpg"])
    canvas = _side_by_side(photos["obama.jpg"], weak_alone)
    every = [(f.box, f.score) for f in F.detect_and_align(canvas, weak_face_score=0)]
    (alone,) = F.detect_and_align(weak_alone)  # all the image holds: kept
    assert 0 < alone.score < F.WEAK_FACE_SCORE, "premise: a weak detection"
    assert len(every) == 2 and every[0][1] >= F.WEAK_FACE_SCORE > every[1][1] > 0, "premise: strong + weak"
    assert [(f.box, f.score) for f in F.detect_and_align(canvas)] == every[:1]
    for t in (-1.0, 0.0, every[1][1]):  # at or below the weak score: both kept
        assert [(f.box, f.score) for f in F.detect_and_align(canvas, weak_face_score=t)] == every
    for t in (every[0][1] + 0.01, 9.0):  # above the strong face too: nothing is strong, both kept
        assert [(f.box, f.score) for f in F.detect_and_align(canvas, weak_face_score=t)] == every
    # every detection above dlib's own cut: the faces its detector returns with its defaults
    rects = dlib.get_frontal_face_detector()(canvas, 1)
    assert sorted((r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r in rects) == sorted(b for b, _ in every)


class _SeenByDetector:
    """dlib's detector, noting the size and upsampling of every image it is given."""

    def __init__(self, detector):
        self.detector, self.calls = detector, []

    def run(self, rgb, upsample, cut):
        self.calls.append((rgb.shape[:2], upsample))
        return self.detector.run(rgb, upsample, cut)


def _iou(a, b):
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def test_large_images_are_detected_at_detect_pixels(photos, monkeypatch):
    seen = _SeenByDetector(F._detector())
    monkeypatch.setattr(F, "_detector", lambda: seen)
    small = photos["obama.jpg"]  # upsampled once, within DETECT_PIXELS: detected as it is
    assert small.shape[0] * small.shape[1] * 4 <= F.DETECT_PIXELS
    assert [(f.box, f.score) for f in F.detect_and_align(small)] == \
        [(f.box, f.score) for f in F.detect_and_align(small, detect_pixels=0)]
    assert seen.calls == [(small.shape[:2], 1)] * 2
    seen.calls.clear()
    big = np.asarray(Image.fromarray(small).resize((small.shape[1] * 6, small.shape[0] * 6), Image.Resampling.BICUBIC))
    cap = 2048 * 2048  # a cap this image is well above (the default would be slow to test)
    assert big.shape[0] * big.shape[1] * 4 > 2 * cap, "premise: a large image"
    full = F.detect_and_align(big, detect_pixels=0)
    capped = F.detect_and_align(big, detect_pixels=cap)
    (h, w), up = seen.calls[1]  # a level of dlib's own pyramid of the doubled image, the first within the cap
    assert seen.calls[0] == (big.shape[:2], 1) and up == 0 and h * w <= cap < h * w * 36 / 25
    assert len(full) == len(capped) == 1  # the box in the full image's pixels, as full-size detection gives it:
    assert (capped[0].box, capped[0].score) == (full[0].box, full[0].score)
    np.testing.assert_array_equal(capped[0].landmarks, full[0].landmarks)
    np.testing.assert_array_equal(capped[0].chip, full[0].chip)
    seen.calls.clear()
    F.detect_and_align(big, upsample=0, detect_pixels=big.shape[0] * big.shape[1])  # fits at upsample 0
    assert seen.calls == [(big.shape[:2], 0)]


def test_capped_detection_gives_the_full_size_boxes(photos, monkeypatch):
    """Past detect_pixels the detector skips the larger levels of its pyramid: a face found at a
    level it keeps gets the box, score, landmarks and chip of full-size detection, at every
    upsampling."""
    for name, img in photos.items():
        for upsample, cap in ((1, 200_000), (2, 600_000)):
            assert img.shape[0] * img.shape[1] * 4 ** upsample > cap, "premise: levels are skipped"
            full = {f.box: f for f in F.detect_and_align(img, upsample=upsample, detect_pixels=0)}
            capped = F.detect_and_align(img, upsample=upsample, detect_pixels=cap)
            assert len(capped) == len(full) == 1, (name, upsample)
            for f in capped:
                g = full[f.box]
                assert f.score == g.score, (name, upsample)
                np.testing.assert_array_equal(f.chip, g.chip)
    # faces cut by the top or left edge: their window is wider there at its level, and their
    # boxes round -x.5 as dlib's detector does (away from zero)
    for top, left in ((50, 0), (60, 60), (60, 100)):
        img = photos["obama.jpg"][top:, left:]
        for upsample, cap in ((1, 100_000), (2, 400_000)):
            (g,) = F.detect_and_align(img, upsample=upsample, detect_pixels=0)
            assert g.box[1] < 0, "premise: the face is cut at the top"
            (f,) = F.detect_and_align(img, upsample=upsample, detect_pixels=cap)
            assert (f.box, f.score) == (g.box, g.score), (top, left, upsample)
    # more than PYRAMID_SPAN times the cap: a scaled copy, the boxes near
    seen = _SeenByDetector(F._detector())
    monkeypatch.setattr(F, "_detector", lambda: seen)
    img = photos["obama.jpg"]
    (g,) = F.detect_and_align(img, detect_pixels=0)
    cap = img.shape[0] * img.shape[1] * 4 // (F.PYRAMID_SPAN + 1)
    seen.calls.clear()
    (f,) = F.detect_and_align(img, detect_pixels=cap)
    ((h, w), up), = seen.calls
    assert up == 0 and h * w <= cap < (h + 1) * (w + 1) and _iou(f.box, g.box) > 0.7
    # a box that is not the detector's window at any level (never seen from dlib's detector) is
    # mapped up from the level the detector ran on
    monkeypatch.setattr(F, "_WINDOW_PX", 1000)
    img = photos["obama.jpg"]
    (f,) = F.detect_and_align(img, detect_pixels=200_000)
    (g,) = F.detect_and_align(img, detect_pixels=0)
    assert f.box != g.box and _iou(f.box, g.box) > 0.9


def test_images_too_wide_for_dlib_are_detected_on_a_narrower_copy(photos, monkeypatch):
    """dlib's pyramid (and so its detector) corrupts memory on images wider than ~81,400 px:
    an image wider than MAX_DETECT_WIDTH once upsampled is detected on a narrower copy."""
    seen = _SeenByDetector(F._detector())
    monkeypatch.setattr(F, "_detector", lambda: seen)
    face = photos["obama.jpg"]
    (want,) = F.detect_and_align(face, detect_pixels=0)
    monkeypatch.setattr(F, "MAX_DETECT_WIDTH", 3 * face.shape[1])  # too wide at upsample 1, not at 0
    canvas = np.zeros((face.shape[0], 2 * face.shape[1], 3), np.uint8)
    canvas[:, face.shape[1]:] = face
    for cap in (0, F.DETECT_PIXELS, canvas.shape[0] * canvas.shape[1]):  # the last: a copy no larger
        seen.calls.clear()
        (got,) = F.detect_and_align(canvas, detect_pixels=cap)
        ((h, w), up), = seen.calls
        assert w << up <= F.MAX_DETECT_WIDTH and (not cap or h * w <= cap)
        x0, y0, x1, y1 = got.box
        assert _iou((x0 - face.shape[1], y0, x1 - face.shape[1], y1), want.box) > 0.7  # near, not equal


def test_a_very_wide_image_does_not_break_the_process(tmp_path):
    """The real limit: a 65535x40 strip (a GIF's screen width set to 0xFFFF did it) once crashed
    the scan's process inside dlib. In a child process, with glibc's heap checks where it has them."""
    pytest.importorskip("dlib")
    env = dict(os.environ, MALLOC_CHECK_="3")
    debug = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
    if os.path.exists(debug):
        env["LD_PRELOAD"] = debug
    code = ("import numpy as np; from fakespotter import faces as F\n"
            "for w, h in ((65535, 40), (100_000, 300)):\n"
            "    img = np.full((h, w, 3), 128, np.uint8)\n"
            "    for cap in (0, F.DETECT_PIXELS):\n"
            "        assert F.detect_and_align(img, detect_pixels=cap) == []\n"
            "print('done')\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == "done\n", out.stderr[-2000:]


def test_detection_in_threads_gives_the_one_thread_results(photos):
    """dlib runs the detector without the GIL: one detector shared by threads corrupted memory
    or returned wrong boxes. Each thread has its own."""
    from concurrent.futures import ThreadPoolExecutor

    images = list(photos.values()) * 3

    def found(img):
        return [(f.box, f.score, f.chip.tobytes()) for f in F.detect_and_align(img)]

    want = [found(img) for img in images]
    with ThreadPoolExecutor(4) as ex:
        for _ in range(3):
            assert list(ex.map(found, images)) == want
        mine = F._detector()
        theirs = ex.submit(F._detector).result()
    assert mine is F._detector() and theirs is not mine


def test_one_detector_scoring_in_threads_gives_the_one_thread_scores(photos):
    """The README's promise to those who embed it: one detector, called from several threads at
    once (face detection, backbone and tap, classifier), scores as it does from one."""
    from concurrent.futures import ThreadPoolExecutor

    from fakespotter.detector import FakeSpotter

    det = FakeSpotter.default()
    images = list(photos.values()) * 2
    want = [det.decision_function(img).tolist() for img in images]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda img: det.decision_function(img).tolist(), images))
    assert got == want and any(s == s for w in want for s in w)  # (some face scored, not all NaN)


@pytest.mark.parametrize("bad", [-1, 1, 2048, F.MIN_DETECT_PIXELS - 1, 1.5, "100", True, None])
def test_detect_pixels_is_0_or_a_pixel_count_the_detector_can_use(bad):
    with pytest.raises(ValueError, match=r"detect_and_align: detect_pixels must be 0 \(no limit\) or a pixel count "
                                         r">= 65536 \(256x256; 4096x4096 is 16777216\), got"):
        F.detect_and_align(np.zeros((40, 40, 3), np.uint8), detect_pixels=bad)
    for good in (0, F.MIN_DETECT_PIXELS, np.int64(F.DETECT_PIXELS)):
        assert F.detect_and_align(np.zeros((40, 40, 3), np.uint8), detect_pixels=good) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.1", True, None])
def test_weak_face_score_must_be_a_finite_number(bad):
    with pytest.raises(ValueError, match=r"detect_and_align: weak_face_score must be a finite number, got"):
        F.detect_and_align(np.zeros((40, 40, 3), np.uint8), weak_face_score=bad)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_rotated_photo_gives_the_same_face(photos, fmt):
    upright = Image.fromarray(photos["obama2.jpg"])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90 degrees CCW; displays upright
    rotated = upright.transpose(Image.Transpose.ROTATE_90)
    up_buf, rot_buf = io.BytesIO(), io.BytesIO()
    kw = {"quality": 95} if fmt == "JPEG" else {}
    upright.save(up_buf, fmt, **kw)
    rotated.save(rot_buf, fmt, exif=exif, **kw)
    (ref,) = F.detect_and_align(up_buf.getvalue())
    (got,) = F.detect_and_align(rot_buf.getvalue())
    if fmt == "PNG":  # lossless: identical pixels after the transpose, identical results
        assert got.box == ref.box
        np.testing.assert_array_equal(got.chip, ref.chip)
    else:  # JPEG blocks differ once rotated: the same face, up to re-encoding noise
        assert np.abs(np.subtract(got.box, ref.box)).max() <= 4
        assert np.abs(got.chip.astype(int) - ref.chip).mean() < 4


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "CMYK"])
def test_other_modes_find_the_face(photos, mode):
    rgb = Image.fromarray(photos["obama.jpg"])
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
    elif mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    elif mode == "RGBA":
        img = rgb.convert("RGBA")
        img.putalpha(255)
    else:
        img = rgb.convert(mode)
    img = Image.open(io.BytesIO(_png(img) if mode != "CMYK" else _jpeg(img)))
    faces = F.detect_and_align(img)
    assert len(faces) == 1 and faces[0].chip.shape == (150, 150, 3)


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_jpegs_are_fed_to_libjpeg_whole(tmp_path):
    """libjpeg's arithmetic decoder cannot wait for more data, so an arithmetic-coded JPEG over
    Pillow's 64 KiB feed failed ("broken data stream"): JPEGs are fed whole, from bytes or a path."""
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(data, "JPEG", quality=95)
    data = data.getvalue()
    assert len(data) > 65536
    (tmp_path / "a.jpg").write_bytes(data)
    for source in (io.BytesIO(data), tmp_path / "a.jpg"):
        with F.open_image(source) as img:
            assert img.decodermaxblock >= len(data)
            img.load()


@pytest.mark.skipif(shutil.which("jpegtran") is None, reason="jpegtran (libjpeg-turbo's tools) is not installed")
def test_an_arithmetic_coded_jpeg_over_64_kib_decodes(tmp_path):
    src = tmp_path / "huffman.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(src, quality=95)
    arith = subprocess.run(["jpegtran", "-arithmetic", str(src)], capture_output=True, check=True).stdout
    assert len(arith) > 65536 and b"\xff\xc9" in arith  # SOF9: arithmetic-coded, sequential
    assert np.array_equal(F.load_image(arith), F.load_image(src))
    assert np.array_equal(decode_image(arith).rgb, F.load_image(src))


def test_a_window_at_any_level_and_edge_maps_back_to_that_level():
    """_found_at inverts dlib's mapping of a detector window (73 px, 81 where it starts left of or
    above the image) from pyramid level L up to the image: the window at an edge (left or top 0
    or -1) included. Pure geometry: no detector runs."""
    dlib = pytest.importorskip("dlib")
    down = dlib.pyramid_down(6)
    cases = 0
    for level in (1, 2, 3):
        for t in range(5, 40, 3):
            for at in (dlib.rectangle(0, t, 72, t + 72), dlib.rectangle(-1, t, 79, t + 72),
                       dlib.rectangle(t, 0, t + 72, 72), dlib.rectangle(t, -1, t + 72, 79),
                       dlib.rectangle(-1, -1, 79, 79), dlib.rectangle(t, t + 3, t + 72, t + 75)):
                rect = F._mapped(down, at, level, upward=True)
                assert F._found_at(rect, down) == (level, at), (level, at, rect)
                cases += 1
    assert cases == 3 * 12 * 6


def test_mapped_boxes_round_halves_away_from_zero():
    dlib = pytest.importorskip("dlib")

    class Pyramid:  # a level's box of exact halves, as dlib's own mapping can give
        def rect_up(self, rect, levels):
            return dlib.drectangle(-0.5, 0.5, 10.5, 20.5)

    assert F._mapped(Pyramid(), dlib.rectangle(0, 0, 1, 1), 1, upward=True) == dlib.rectangle(-1, 1, 11, 21)


def test_boxes_found_on_a_scaled_copy_are_scaled_back_exactly(monkeypatch):
    """A 400x500 copy of an 800x1000 image (detect_pixels a quarter of it): each box of the copy
    covers twice its pixels, inclusive right and bottom edges included."""
    dlib = pytest.importorskip("dlib")
    seen = []

    class Detector:
        def run(self, img, upsample, threshold):
            seen.append(img.shape)
            return [dlib.rectangle(10, 20, 29, 39), dlib.rectangle(0, 0, 399, 499)], [1.0, 0.5], [0, 0]

    monkeypatch.setattr(F, "_detector", lambda: Detector())
    boxes, scores = F._detect_scaled(np.zeros((1000, 800, 3), np.uint8), 200_000)
    assert seen == [(500, 400, 3)] and scores == [1.0, 0.5]
    assert boxes == [dlib.rectangle(20, 40, 59, 79), dlib.rectangle(0, 0, 799, 999)]


def test_the_documented_defaults_and_edges_of_the_colour_rules():
    """Transparent pixels composite onto black by default; a float image with exactly the
    allowed share of values above 1 is still taken as 0..1; bad backgrounds and sizes refused."""
    import inspect

    assert F.chip_from_aligned(np.zeros((150, 150, 4), np.uint8))[0, 0].tolist() == [0, 0, 0]
    assert inspect.signature(F.detect_and_align).parameters["background"].default == (0, 0, 0)
    a = np.full((10, 100), 0.5, np.float32)
    a[3, 7] = 2.0  # 1 value of 1000 above 1: F.FLOAT_OVERSHOOT
    assert F.load_image(Image.fromarray(a, mode="F"))[0, 0].tolist() == [128, 128, 128]
    a[4, 7] = 2.0  # 2 of 1000: the image is taken as 0..255
    assert F.load_image(Image.fromarray(a, mode="F"))[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="background"):
        F.load_image(np.zeros((4, 4, 4), np.uint8), background=(-1, 0, 0))
    with pytest.raises(ValueError, match="size"):
        F.detect_and_align(np.zeros((20, 20, 3), np.uint8), size=1.5)
