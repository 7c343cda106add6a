"""HEIC/HEIF photos (what phones take): decoded through pillow-heif where it is installed (the
``heif`` extra; ``./dev setup`` installs it), its opener registered on the first HEIF met, in
the scanner's workers and in the API alike; a clear ``not_an_image`` record where it is not."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from fakespotter import data as D
from fakespotter.faces import load_image
from fakespotter.scan import scan
from scan_helpers import forget_heif_opener, model_file, noise_image

pillow_heif = pytest.importorskip("pillow_heif")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_file(tmp_path_factory)


def heic(rgb: np.ndarray, orientation: int = 1, quality: int = 90) -> bytes:
    """``rgb`` encoded as HEIC by a separate copy of pillow-heif's writer (not the opener the
    code under test registers), with an EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    heif = pillow_heif.from_pillow(Image.fromarray(rgb))
    heif.save(out, quality=quality, exif=exif.tobytes())
    return out.getvalue()


def reference(data: bytes) -> np.ndarray:
    """libheif's pixels, read without Pillow's opener."""
    f = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True)
    return np.asarray(f.to_pillow().convert("RGB"))


@pytest.fixture
def unregistered(monkeypatch):
    forget_heif_opener(monkeypatch)


def test_a_heic_decodes_to_libheifs_pixels_in_the_scanner_and_the_api(unregistered, tmp_path):
    data = heic(noise_image(1, 48, 64))
    want = reference(data)
    assert want.shape == (48, 64, 3)
    img = D.decode_image(data)
    assert np.array_equal(img.rgb, want) and (img.width, img.height, img.frames) == (64, 48, 1)
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data)
    assert np.array_equal(load_image(str(path)), want)
    assert np.array_equal(load_image(data), want)


def test_the_rotation_a_phone_records_is_applied(unregistered):
    """A portrait photo is stored sideways with EXIF orientation 6; pillow-heif writes that as
    the image's own rotation, which libheif applies: the pixels come out upright, as a JPEG's do."""
    rgb = np.zeros((40, 70, 3), np.uint8)
    rgb[:10, :20] = 255  # a white block, top left as stored
    img = D.decode_image(heic(rgb, orientation=6, quality=100))
    jpeg = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(jpeg, "JPEG", quality=100, exif=exif.tobytes())
    upright = D.decode_image(jpeg.getvalue()).rgb
    assert img.rgb.shape == upright.shape == (70, 40, 3)
    assert np.array_equal(img.rgb.mean(axis=2) > 128, upright.mean(axis=2) > 128)  # the block top right


def test_damaged_heics_get_records_not_crashes(unregistered):
    data = heic(noise_image(2, 48, 64))
    for n in (12, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(D.ImageError) as e:
            D.decode_image(data[:n])
        assert e.value.kind == "truncated", (n, e.value.message)
        assert e.value.message == e.value.message.strip()
    junk = data[:12] + bytes(200)  # a HEIF brand, then nothing a box could be
    with pytest.raises(D.ImageError) as e:
        D.decode_image(junk)
    assert e.value.kind in ("decode_error", "truncated") and "HEIF" in e.value.message


@pytest.mark.parametrize("workers", [0, 1])
def test_a_scan_scores_a_heic_as_the_same_pixels_in_a_png(model, tmp_path, workers):
    """The scan's workers register the opener themselves (a fresh process has none)."""
    folder = tmp_path / "in"
    folder.mkdir()
    data = heic(noise_image(3, 150, 150))
    (folder / "a.heic").write_bytes(data)
    Image.fromarray(reference(data)).save(folder / "b.png")
    records = {os.path.basename(r["path"]): r for r in scan([str(folder)], model, aligned=True, workers=workers)}
    assert records["a.heic"]["status"] == "ok" and records["a.heic"]["score"] == records["b.png"]["score"]


def test_without_pillow_heif_a_heic_is_not_an_image_saying_what_would_read_it(monkeypatch):
    forget_heif_opener(monkeypatch, importable=False)
    data = heic(noise_image(4, 32, 32))
    with pytest.raises(D.ImageError) as e:
        D.decode_image(data)
    assert e.value.kind == "not_an_image" and "pip install pillow-heif" in e.value.message
    with pytest.raises(ValueError, match=r"load_image: \d+ bytes: a HEIF image: .*pip install pillow-heif"):
        load_image(data)
    assert "HEIF" not in Image.OPEN
