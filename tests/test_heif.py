"""HEIC/HEIF photos (what phones take): decoded through pillow-heif where it is installed (the
``heif`` extra; ``./dev setup`` installs it), its opener registered on the first HEIF met, in
the scanner's workers and in the API alike; a clear ``not_an_image`` record where it is not."""

from __future__ import annotations

import io
import os
from typing import Optional

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


def heic(rgb: np.ndarray, orientation: Optional[int] = 1, quality: int = 90, tile: int = 0) -> bytes:
    """``rgb`` encoded as HEIC by pillow-heif's writer (not through the opener the code under
    test registers), with an EXIF orientation (None: no EXIF); ``tile``: a grid of tiles this
    size, as phones store their photos."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    out = io.BytesIO()
    heif = pillow_heif.from_pillow(Image.fromarray(rgb))
    old = pillow_heif.options.GRID_TILE_SIZE
    pillow_heif.options.GRID_TILE_SIZE = tile
    try:
        heif.save(out, quality=quality, **({"exif": exif.tobytes()} if orientation is not None else {}))
    finally:
        pillow_heif.options.GRID_TILE_SIZE = old
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


def test_a_grid_heic_cut_short_is_truncated_though_libheif_decodes_it(unregistered, tmp_path):
    """libheif (>= 1.19) fills the tiles a cut grid image has no data for and says nothing:
    the scanner scored such a file as ok."""
    data = heic(noise_image(5, 200, 300), orientation=None, tile=64)  # (EXIF would follow the tiles' data)
    assert np.array_equal(D.decode_image(data).rgb, reference(data))
    cut = data[:len(data) * 3 // 4]
    with Image.open(io.BytesIO(cut)) as img:  # what this test is about: libheif decodes it
        img.load()
    path = tmp_path / "cut.heic"
    for n in (len(cut), len(data) - 1):
        with pytest.raises(D.ImageError) as e:
            D.decode_image(data[:n])
        assert e.value.kind == "truncated", (n, e.value.message)
        path.write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"(data ends early|Unexpected end of file).*[^\n]$"):
            load_image(str(path))


def test_two_threads_meeting_their_first_heic_at_once_both_decode_it(unregistered, monkeypatch):
    """Thread B's first open fails (no opener yet), then A registers pillow-heif's: B found the
    opener there and gave up ("has a HEIF signature, but its header cannot be read")."""
    import threading

    from fakespotter import faces

    data = heic(noise_image(6, 40, 70))
    b_failed, a_done = threading.Event(), threading.Event()
    real = faces._heif_opener_registered

    def b_waits_for_a(source):  # B is descheduled between its failed open and the check
        if threading.current_thread().name == "B" and not b_failed.is_set():
            b_failed.set()
            a_done.wait(30)
        return real(source)
    monkeypatch.setattr(faces, "_heif_opener_registered", b_waits_for_a)
    got = {}

    def run(name):
        if name == "A":
            b_failed.wait(30)
        try:
            got[name] = D.decode_image(data).rgb.shape
        except D.ImageError as e:
            got[name] = e.message
        finally:
            if name == "A":
                a_done.set()
    threads = [threading.Thread(target=run, args=(n,), name=n) for n in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {"A": (40, 70, 3), "B": (40, 70, 3)}


def test_every_brand_pillow_heif_reads_is_a_heif_and_hif_files_are_listed(unregistered, tmp_path):
    """A brand pillow-heif's opener accepts but fakespotter did not know (hevx) was not_an_image
    in a fresh process and decoded once another HEIF had registered the opener: the result
    depended on which worker took the file. Canon and Fujifilm cameras name HEIFs .hif."""
    data = heic(noise_image(7, 32, 48))
    assert data[8:12] in (b"heic", b"mif1")
    hevx = data[:8] + b"hevx" + data[12:]
    assert D.decode_image(hevx).rgb.shape == (32, 48, 3)
    (tmp_path / "IMG_0001.HIF").write_bytes(data)
    assert [os.path.basename(e.path) for e in D.iter_entries([str(tmp_path)])] == ["IMG_0001.HIF"]


def test_a_heic_that_declares_a_smaller_picture_than_it_codes_is_refused(unregistered):
    """A HEIF declaring 40x30 (``ispe``, all Pillow reports and the pixel limit checks) while
    coding 640x480: libheif refuses it (before decoding, in libheif 1.23), a decode_error. The
    API let pillow-heif's RuntimeError out; it is a ValueError naming the input now."""
    data = heic(noise_image(8, 480, 640))
    lie = bytearray(data)
    at = lie.find(b"ispe")
    while at >= 0:
        lie[at + 8:at + 16] = (40).to_bytes(4, "big") + (30).to_bytes(4, "big")
        at = lie.find(b"ispe", at + 4)
    assert pillow_heif.open_heif(io.BytesIO(bytes(lie))).size == (40, 30)
    with pytest.raises(D.ImageError) as e:
        D.decode_image(bytes(lie))
    assert e.value.kind == "decode_error" and "HEIF" in e.value.message
    with pytest.raises(ValueError, match="load_image: .* is not an image Pillow can decode"):
        load_image(bytes(lie))
