"""Image conversion, face detection and alignment edges (faces.py), without dlib's models where a
stand-in detector does: from a mutation audit of faces.py, each test fails on a one-line change
that no other test caught."""
import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from fakespotter import faces as F


def _png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _bmp_v4(rgba):
    h, w, _ = rgba.shape
    px = np.ascontiguousarray(rgba[::-1][..., [2, 1, 0, 3]]).tobytes()
    info = struct.pack("<IiiHHIIiiII", 108, w, h, 1, 32, 3, len(px), 2835, 2835, 0, 0)
    info += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000) + b"BGRs" + bytes(48)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(px), 0, 0, 14 + len(info)) + info + px


def test_a_background_of_more_than_3_values_is_refused():  # (len(bg) != 3 -> < 3)
    with pytest.raises(ValueError, match="background must be 3 ints"):
        F.load_image(np.zeros((4, 4, 3), np.uint8), background=(0, 0, 0, 0))


@pytest.mark.parametrize("shape", [(0, 4, 3), (4, 0, 3), (0, 4)])
def test_empty_arrays_are_refused(shape):  # (drops a.shape[0] == 0)
    with pytest.raises(ValueError, match=r"with H, W > 0"):
        F.load_image(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_as_pillow_does(orientation):
    """Pillow path (PNG) and upright_array (the scanner's JPEG path) for all 8 orientations, against
    ImageOps.exif_transpose."""
    a = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _png(Image.fromarray(a), exif=exif)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(F.load_image(data), want)
    got = F.upright_array(a, orientation)
    np.testing.assert_array_equal(got, want)
    assert got.flags.c_contiguous


def test_an_orientation_that_is_not_an_integer_counts_as_upright():
    """An EXIF orientation stored as a RATIONAL 6/1 (Pillow gives IFDRational, == 6, hash of 6)
    is not an orientation: the image is taken as stored."""
    a = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    tiff = (b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
            + struct.pack(">HHII", 0x0112, 5, 1, 26) + struct.pack(">I", 0) + struct.pack(">II", 6, 1))
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, fmt, exif=b"Exif\x00\x00" + tiff)
        assert Image.open(io.BytesIO(buf.getvalue())).getexif().get(0x0112) == 6, "premise"
        assert F.load_image(buf.getvalue()).shape == (6, 10, 3), fmt


def test_16_bit_grey_under_256_is_still_16_bit():
    """I;16 values (in memory or from a TIFF) map by round(v / 257) even when all are <= 255:
    only mode I (32-bit) may be 8-bit grey."""
    a = np.array([[255, 128, 129, 0]], np.uint16)
    want = np.round(a / 257).astype(np.uint8)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16"), "premise"
    np.testing.assert_array_equal(F.load_image(img)[..., 0], want)
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    np.testing.assert_array_equal(F.load_image(buf.getvalue())[..., 0], want)


def test_a_bmp_whose_alpha_is_1_everywhere_is_composited():
    rgb = np.full((5, 3, 3), 255, np.uint8)
    one = np.dstack([rgb, np.ones((5, 3), np.uint8)])
    np.testing.assert_array_equal(F.load_image(_bmp_v4(one), background=(0, 0, 0)), np.ones_like(rgb))


def test_detect_pixels_false_is_refused():  # (False == 0 would mean "no limit")
    with pytest.raises(ValueError, match="detect_pixels must be 0"):
        F.detect_and_align(np.zeros((40, 40, 3), np.uint8), detect_pixels=False)


def test_a_box_that_is_no_level_window_is_found_at_level_0():
    """(4, 8, 90, 94) shrinks to a 73x73 box one level down, but that window maps up to another
    box: it is no detector window, so _found_at gives (0, rect)."""
    dlib = pytest.importorskip("dlib")
    down = dlib.pyramid_down(6)
    rect = dlib.rectangle(4, 8, 90, 94)
    assert F._found_at(rect, down) == (0, rect)
    big = dlib.rectangle(5, 5, 300, 200)  # not square: no level
    assert F._found_at(big, down) == (0, big)


def test_the_detector_sees_the_first_level_within_detect_pixels(monkeypatch):
    """detect_pixels equal to a pyramid level's exact pixel count: that level is the one run
    (not the next); equal to the image's pixels times 4**upsample: dlib's own upsampling runs."""
    dlib = pytest.importorskip("dlib")
    seen = []

    class Detector:
        def run(self, img, upsample, threshold):
            seen.append((img.shape[:2], upsample))
            return [], [], []

    monkeypatch.setattr(F, "_detector", lambda: Detector())
    rgb = np.zeros((300, 400, 3), np.uint8)
    up, down = dlib.pyramid_down(2), dlib.pyramid_down(6)
    r = up.rect_up(dlib.rectangle(0, 0, 399, 299))
    big = dlib.resize_image(rgb, r.bottom() + 1, r.right() + 1)
    level1 = down(big)
    n1 = level1.shape[0] * level1.shape[1]
    F._detect(rgb, 1, n1)
    assert seen == [(level1.shape[:2], 0)]
    seen.clear()
    F._detect(rgb, 1, 300 * 400 * 4)  # (pixels counts 600x800; dlib doubles it to 601x802)
    assert seen == [((300, 400), 1)]


def test_boxes_from_a_copy_scaled_unevenly_scale_back_per_axis(monkeypatch):
    """A 100000x7 image is detected on a 65536x4 copy (height truncated): x scales by w / sw, y by
    h / sh."""
    dlib = pytest.importorskip("dlib")

    class Detector:
        def run(self, img, upsample, threshold):
            assert img.shape[:2] == (4, 65536)
            return [dlib.rectangle(0, 0, 65535, 3)], [1.0], [0]

    monkeypatch.setattr(F, "_detector", lambda: Detector())
    boxes, _ = F._detect_scaled(np.zeros((7, 100_000, 3), np.uint8), 0)
    assert boxes == [dlib.rectangle(0, 0, 99_999, 6)]


def test_a_top_score_equal_to_weak_face_score_counts_as_strong(monkeypatch):
    """weak_face_score is inclusive: a face scoring exactly it is strong, so the weaker one beside
    it is dropped."""
    dlib = pytest.importorskip("dlib")
    rects = [dlib.rectangle(10, 10, 89, 89), dlib.rectangle(100, 10, 179, 89)]
    monkeypatch.setattr(F, "_detect", lambda rgb, up, dp: (rects, [0.25, 0.5]))
    faces = F.detect_and_align(np.zeros((120, 200, 3), np.uint8), weak_face_score=0.5)
    assert [f.score for f in faces] == [0.5] and faces[0].box == (100, 10, 180, 90)
    assert [f.score for f in F.detect_and_align(np.zeros((120, 200, 3), np.uint8), weak_face_score=0.75)] == [0.5, 0.25]


def test_a_nan_padding_is_refused():  # (not padding >= 0 -> padding < 0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        F.detect_and_align(np.zeros((40, 40, 3), np.uint8), padding=float("nan"))


def test_to_tensor_keeps_rows_and_columns():  # (H and W swapped: invisible on flat chips)
    c = np.random.default_rng(5).integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    t = F.to_tensor(c)
    assert t.shape == (2, 3, 6, 6)
    np.testing.assert_array_equal(t.numpy(), c.transpose(0, 3, 1, 2).astype(np.float32))
    assert F.to_tensor(list(c)).shape == (2, 3, 6, 6) and F.to_tensor(c[:, :, :4]).shape == (2, 3, 6, 4)


def test_to_tensor_refuses_chips_that_are_not_uint8():
    with pytest.raises(TypeError, match="chips must be uint8"):
        F.to_tensor(np.zeros((1, 150, 150, 3), np.float32))
    with pytest.raises(TypeError, match="chips must be uint8"):
        F.to_tensor([np.zeros((150, 150, 3), np.uint16)])


def test_a_tiff_is_turned_once():
    """Pillow (>= 11) applies a TIFF's orientation when it loads it (and drops the tag): the
    orientation is read after loading (a PIL image passed in unloaded included), so the image is not
    turned twice."""
    a = np.random.default_rng(9).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "TIFF", exif=exif)
    np.testing.assert_array_equal(F.load_image(buf.getvalue()), F.upright_array(a, 6))
    opened = Image.open(io.BytesIO(buf.getvalue()))  # a PIL image passed in before it is loaded
    np.testing.assert_array_equal(F.load_image(opened), F.upright_array(a, 6))


def test_an_empty_32_bit_image_is_refused_as_empty():  # (a.max() of no values)
    with pytest.raises(ValueError, match=r"H, W > 0"):
        F.load_image(Image.new("I", (0, 3)))


def test_a_copy_scaled_below_one_row_keeps_one(monkeypatch):
    seen = []

    class Detector:
        def run(self, img, upsample, threshold):
            seen.append(img.shape[:2])
            return [], [], []

    monkeypatch.setattr(F, "_detector", lambda: Detector())
    assert F._detect_scaled(np.zeros((1, 100_000, 3), np.uint8), 0) == ([], [])
    assert seen == [(1, 65536)]


def test_chips_have_the_size_asked_for(monkeypatch):
    dlib = pytest.importorskip("dlib")
    monkeypatch.setattr(F, "_detect", lambda rgb, up, dp: ([dlib.rectangle(10, 10, 89, 89)], [1.0]))
    faces = F.detect_and_align(np.zeros((120, 120, 3), np.uint8), size=64)
    assert [f.chip.shape for f in faces] == [(64, 64, 3)]
    with pytest.raises(ValueError, match="size must be a positive int"):
        F.detect_and_align(np.zeros((120, 120, 3), np.uint8), size=0)


def test_chip_from_aligned_resizes_bilinear():  # (a flat image resizes alike any way)
    c = np.random.default_rng(6).integers(0, 256, (300, 280, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(c).resize((150, 150), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(F.chip_from_aligned(c), want)
