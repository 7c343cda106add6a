"""The Python API: chips, features (rows + provenance), mnc; chip validation."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fakespotter  # noqa: F401
from fakespotter import weights as W
from fakespotter.backbones import custom_backbone, get_backbone
from fakespotter.features import Features, chips, features, mnc, prepare_chips
from fakespotter.taps import Tap

from tapnets import FETCH_HINT, SMALL_LAYERS, SMALL_SHAPE, dlib_cached, small_chips, small_net


def square_tap(size=16):
    return Tap(custom_backbone(small_net(), SMALL_LAYERS, (size, size)))


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_chip_batch_rows_equal_tap_rows_any_batch_size():
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    x = small_chips(7)
    with torch.no_grad():
        expected = torch.cat([tap(x[i:i + 1]) for i in range(7)])  # per image: batch-invariant
    with torch.backends.mkldnn.flags(enabled=False):
        for bs in (1, 3, 64):
            f = features(x, tap, batch_size=bs)
            assert isinstance(f, Features) and len(f) == 7
            assert torch.equal(f.rows, expected)
    assert f.image_index.tolist() == list(range(7)) and f.face_index.tolist() == [0] * 7
    u8 = x.round().to(torch.uint8)
    a = features(u8.permute(0, 2, 3, 1).numpy(), tap).rows
    b = features(u8.float(), tap).rows
    assert torch.equal(a, b)


def test_chip_batches_become_float32_one_batch_at_a_time(monkeypatch):
    import sys

    FT = sys.modules["fakespotter.features"]  # (fakespotter.features is also the function)

    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    u8 = small_chips(7).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    whole = features(u8, tap, batch_size=64).rows
    sizes = []
    real = FT.prepare_chips
    monkeypatch.setattr(FT, "prepare_chips", lambda x, *a: (sizes.append(len(x)), real(x, *a))[1])
    assert torch.equal(features(u8, tap, batch_size=3).rows, whole) and sizes == [3, 3, 1]
    sizes.clear()
    empty = features(u8[:0], tap)  # still checked, and its rows are where the tap's are
    assert sizes == [0] and empty.rows.shape == (0, tap.layout.total_words) and empty.rows.device == whole.device
    with pytest.raises(ValueError, match="chips must be"):
        features(u8[:0, :5], tap)


def test_mnc_matches_tap():
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    f = features(small_chips(4), tap)
    assert torch.equal(mnc(f, tap), tap.mnc(f.rows)) and mnc(f.rows, tap).shape == (4, 5)
    # numpy rows: shared, or copied where torch cannot share them (reversed, read-only), silently
    a = f.rows.numpy()
    assert torch.equal(mnc(a, tap), tap.mnc(f.rows))
    read_only = a.copy()
    read_only.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(mnc(a[::-1], tap), tap.mnc(f.rows.flip(0)))
        assert torch.equal(mnc(read_only, tap), tap.mnc(f.rows))


def test_read_only_chip_arrays_score_without_a_warning(tmp_path):
    """A memory-mapped chip file (np.load(mmap_mode="r")) is read-only: torch warns of sharing
    one, so each batch is copied instead; the rows are those of the writable array."""
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    f32 = small_chips(6).numpy()
    u8 = np.ascontiguousarray(f32.round().astype(np.uint8).transpose(0, 2, 3, 1))
    for chips in (f32, u8):
        np.save(tmp_path / "chips.npy", chips)
        mapped = np.load(tmp_path / "chips.npy", mmap_mode="r")
        assert not mapped.flags.writeable
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = features(mapped, tap, batch_size=4).rows
        assert torch.equal(got, features(chips, tap).rows)


def test_chip_validation_names_expected_and_actual():
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match=r"chips must be 15x13 \(the backbone's input size\), got "
                                         r"16x13 \(shape \[2, 16, 13, 3\]\)"):
        features(np.zeros((2, 16, 13, 3), np.uint8), tap)
    with pytest.raises(ValueError, match=r"chips must be 15x13 .*got 150x150"):
        features(torch.zeros(1, 3, 150, 150), tap)
    with pytest.raises(TypeError, match=r"chips must be uint8 \[N, 15, 13, 3\] or float32 "
                                        r"\[N, 3, 15, 13\], got dtype float64"):
        features(np.zeros((2, 15, 13, 3), np.float64), tap)
    with pytest.raises(TypeError, match="got dtype int32"):
        prepare_chips(torch.zeros(2, 3, 15, 13, dtype=torch.int32), tap)
    with pytest.raises(ValueError, match=r"uint8 chips must be \[N, 15, 13, 3\].*got shape \[2, 3, 15, 13\]"):
        features(torch.zeros(2, 3, 15, 13, dtype=torch.uint8), tap)
    with pytest.raises(ValueError, match=r"float32 chips must be \[N, 3, 15, 13\].*got shape \[2, 15, 13, 3\]"):
        features(torch.zeros(2, 15, 13, 3), tap)
    for bad in (0, 4097, 2.0):
        with pytest.raises(ValueError, match=f"features: batch_size must be an int from 1 to 4096, got {bad}"):
            features(small_chips(1), tap, batch_size=bad)
    over = torch.zeros(1, 3, 15, 13)
    over[0, 1, 2, 3] = 255.5
    with pytest.raises(ValueError, match=r"got values from 0 to 255.5"):
        features(over, tap)
    with pytest.raises(ValueError, match="face chips are square; the backbone wants 150x160"):
        chips([], aligned=True, size=(150, 160))
    assert chips([], aligned=True, size=(150, 150)).array.shape == (0, 150, 150, 3)
    x = small_chips(2).requires_grad_()
    with warnings.catch_warnings():  # (torch warned of float() on a tensor that requires grad)
        warnings.simplefilter("error")
        assert torch.equal(features(x, tap).rows, features(x.detach(), tap).rows)


def test_float_chips_on_the_0_1_scale_are_refused_everywhere():
    """Every backbone takes RGB 0..255 (its preprocessing does the rest): 0..1 float chips would
    calibrate and score silently wrong. Whole numbers (a dark uint8 chip as float) pass."""
    from fakespotter.calibration import ThresholdCalibrator

    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    for run in (lambda x: features(x, tap), lambda x: ThresholdCalibrator(tap).fit([x])):
        with pytest.raises(ValueError, match=r"every value is within 0\.\.1 .*multiply 0\.\.1 chips by 255"):
            run(small_chips(2) / 255)
        with pytest.raises(ValueError, match=r"got values from -0\.99.* to 0\.99.*normalised chips\?"):
            run(small_chips(2) / 127.5 - 1)
    dark = (small_chips(2) > 128).float()  # 0 and 1 only
    assert torch.equal(features(dark, tap).rows, features(dark.to(torch.uint8).permute(0, 2, 3, 1), tap).rows)
    assert ThresholdCalibrator(tap).fit([dark]).n_images_ == 2


def test_aligned_images_are_resized_and_indexed(tmp_path):
    tap = square_tap(16)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8),
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)),  # grey
            rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)]
    path = tmp_path / "c.png"
    Image.fromarray(imgs[2]).save(path)
    imgs.append(str(path))
    c = chips(imgs, aligned=True, size=tap)
    assert c.array.shape == (4, 16, 16, 3) and c.array.dtype == np.uint8
    assert np.array_equal(c.array[2], imgs[2]) and np.array_equal(c.array[3], imgs[2])
    f = features(imgs, tap, aligned=True, batch_size=3)
    assert f.image_index.tolist() == [0, 1, 2, 3] and f.images_without_faces == []
    assert torch.equal(f.rows, features(c.array, tap).rows)


def test_what_counts_as_one_image_and_what_is_refused(tmp_path):
    from fakespotter.features import as_image_list

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(img).save(path)
    data = path.read_bytes()
    for one in (str(path), path, data, bytearray(data), memoryview(data), img, Image.fromarray(img)):
        assert len(as_image_list(one)) == 1, type(one)
    tap = square_tap(16)
    assert np.array_equal(chips(memoryview(data), aligned=True, size=tap).array, chips(data, aligned=True, size=tap).array)
    with pytest.raises(TypeError, match=r"a torch tensor is taken as a chip batch .* pass one image as a numpy array"):
        as_image_list(torch.from_numpy(img))
    with pytest.raises(TypeError, match="got a dict"):
        as_image_list({str(path): 1})
    for paths in (np.array([str(path), str(path)]), np.array([path, path], dtype=object)):
        assert as_image_list(paths) == list(paths)  # a DataFrame column's .values
    for f in (io.BytesIO(data), open(path, "rb")):  # iterated, a file object gave its "lines", each an image
        with f, pytest.raises(TypeError, match=r"a file object \((BytesIO|BufferedReader)\) is not taken: pass its "
                                               r"bytes \(f\.read\(\)\) or the file's path"):
            as_image_list(f)
    with pytest.raises(FileNotFoundError, match=r"image 1: load_image: .*missing\.png: No such file") as e:
        chips([str(path), str(tmp_path / "missing.png")], aligned=True, size=tap)
    assert e.value.errno == 2


def test_a_missing_weights_file_is_not_blamed_on_an_image(monkeypatch, tmp_path):
    from fakespotter import faces
    from fakespotter.weights import WeightsNotFoundError

    def missing(*args, **kwargs):
        raise WeightsNotFoundError("shape_predictor_5_face_landmarks.dat is not in the fakespotter cache")

    monkeypatch.setattr(faces, "detect_and_align", missing)
    with pytest.raises(WeightsNotFoundError, match="^shape_predictor_5_face_landmarks.dat is not in"):
        chips([np.zeros((20, 20, 3), np.uint8)] * 2)


@pytest.fixture(scope="module")
def photos():
    try:
        paths = {n: W.sample_photo_path(n) for n in ("obama.jpg", "biden.jpg")}
    except W.WeightsError:
        pytest.skip("sample photos not cached: run `python -m fakespotter.weights fetch --photos`")
    out = {}
    for n, p in paths.items():  # smaller copies keep detection fast
        img = Image.open(p).convert("RGB")
        img.thumbnail((400, 400))
        out[n] = np.asarray(img)
    return out


def test_detected_faces_rows_and_provenance(photos):
    pytest.importorskip("dlib")
    if not dlib_cached():
        pytest.skip(FETCH_HINT)
    tap = Tap(get_backbone())
    blank = np.full((200, 200, 3), 128, np.uint8)  # no face: no row, reported
    images = [photos["obama.jpg"], blank, photos["biden.jpg"]]
    c = chips(images)
    assert c.array.shape[1:] == (150, 150, 3) and c.image_index.tolist() == [0, 2]
    f = features(images, tap, batch_size=1)
    assert f.image_index.tolist() == [0, 2] and f.face_index.tolist() == [0, 0]
    assert f.images_without_faces == [1]
    assert torch.equal(f.rows, features(c.array, tap).rows)
    m = mnc(f, tap)
    assert m.shape == (2, 30) and ((m > 0) & (m < 1)).any()
