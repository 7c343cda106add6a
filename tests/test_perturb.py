"""The four attacks: each changes the image, is deterministic, keeps shape and dtype, and gets
stronger with its level; batches equal item-by-item application; bad arguments are refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fakespotter import perturb
from fakespotter.perturb import ATTACKS, apply


def smooth_image(seed=0, h=96, w=80):
    """A textured but natural-ish image: smooth gradients plus mid-frequency detail."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([128 + 60 * np.sin(xx / 9 + c) * np.cos(yy / 13 - c) for c in range(3)], -1)
    detail = rng.normal(0, 25, size=(h, w, 3))
    return np.clip(base + detail, 0, 255).astype(np.uint8)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


LEVELS = [(a, lv) for a, levels in ATTACKS.items() for lv in levels]


def test_registry():
    assert ATTACKS == {"jpeg": [95, 75, 50, 30], "blur": [0.5, 1, 2, 3], "resize": [0.75, 0.5, 0.25],
                       "noise": [0.01, 0.03, 0.05, 0.1]}
    assert set(perturb.DESCRIPTIONS) == set(ATTACKS)
    assert perturb.sweep(["blur"]) == [("blur", 0.5), ("blur", 1), ("blur", 2), ("blur", 3)]
    assert len(perturb.sweep()) == 15


@pytest.mark.parametrize("attack,level", LEVELS)
@pytest.mark.parametrize("shape", [(96, 80, 3), (150, 150, 3), (7, 5, 3)])
def test_changes_keeps_shape_and_is_deterministic(attack, level, shape):
    x = smooth_image(1, *shape[:2])
    before = x.copy()
    y = apply(attack, level, x, seed=4)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert np.array_equal(x, before), "the input must not be modified"
    assert not np.array_equal(y, x), "non-vacuous: the attack changes the image"
    assert np.array_equal(apply(attack, level, x, seed=4), y)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_stronger_with_level(attack):
    for seed in range(3):
        x = smooth_image(seed)
        p = [psnr(x, apply(attack, lv, x, seed=seed)) for lv in ATTACKS[attack]]
        assert all(a > b for a, b in zip(p, p[1:])), (attack, p)
        assert p[-1] < 35, (attack, p)  # the strongest level is a real distortion


def test_noise_seed_and_statistics():
    x = np.full((200, 200, 3), 128, np.uint8)
    a, b = apply("noise", 0.05, x, seed=1), apply("noise", 0.05, x, seed=2)
    assert not np.array_equal(a, b)
    d = a.astype(np.float64) - 128
    assert abs(d.mean()) < 0.2 and d.std() == pytest.approx(0.05 * 255, rel=0.03)


def test_blur_matches_a_direct_gaussian_convolution():
    x = smooth_image(2, 40, 30)
    sigma = 1.5
    r = int(np.ceil(4 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    k2 = np.outer(k, k)
    pad = np.pad(x.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    want = np.zeros(x.shape)
    for i in range(2 * r + 1):
        for j in range(2 * r + 1):
            want += k2[i, j] * pad[i : i + 40, j : j + 30]
    got = apply("blur", sigma, x)
    assert np.abs(got.astype(int) - np.clip(np.round(want), 0, 255).astype(int)).max() <= 1
    flat = np.full((20, 20, 3), 77, np.uint8)
    assert np.array_equal(apply("blur", 3, flat), flat)  # weights sum to one
    assert apply("blur", 3, np.full((1, 1, 3), 9, np.uint8)).tolist() == [[[9, 9, 9]]]


def test_batch_equals_items():
    batch = np.stack([smooth_image(s, 40, 40) for s in range(3)])
    for attack, level in LEVELS:
        got = apply(attack, level, batch, seed=7)
        assert got.shape == batch.shape and got.dtype == np.uint8
        for i in range(3):
            # noise: item i draws from default_rng([seed, i]), whatever batch it is in
            single = batch[i] if attack != "noise" else batch[i][None]
            want = apply(attack, level, single, seed=7)
            if attack == "noise":
                assert np.array_equal(got[0], want[0]) if i == 0 else not np.array_equal(got[i] - batch[i], want[0] - batch[i])
            else:
                assert np.array_equal(got[i], want), (attack, level, i)
    assert apply("jpeg", 50, np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 8, 8, 3)


def test_pil_in_pil_out():
    img = Image.fromarray(smooth_image(3))
    out = apply("jpeg", 30, img)
    assert isinstance(out, Image.Image) and out.size == img.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), apply("jpeg", 30, np.asarray(img)))


def test_bad_arguments():
    x = smooth_image()
    with pytest.raises(ValueError, match=r"attack must be one of \['blur', 'jpeg', 'noise', 'resize'\], got 'crop'"):
        apply("crop", 1, x)
    with pytest.raises(ValueError, match=r"jpeg: quality must be an int in 1..100, got 0"):
        apply("jpeg", 0, x)
    with pytest.raises(ValueError, match=r"blur: sigma must be a positive number of pixels, got -1"):
        apply("blur", -1, x)
    with pytest.raises(ValueError, match=r"resize: factor must be in \(0, 1\], got 2"):
        apply("resize", 2, x)
    with pytest.raises(ValueError, match=r"noise: sigma must be a fraction of the range in \(0, 1\], got 25"):
        apply("noise", 25, x)
    with pytest.raises(TypeError, match=r"blur: image must be uint8 \(RGB 0..255\), got dtype float32"):
        apply("blur", 1, x.astype(np.float32))
    with pytest.raises(ValueError, match=r"image must be \[H, W, 3\] or \[N, H, W, 3\] RGB with H, W >= 1, got shape \[96, 80\]"):
        apply("jpeg", 50, x[..., 0])
    with pytest.raises(ValueError, match="PIL images must be mode RGB, got 'L'"):
        apply("jpeg", 50, Image.fromarray(x[..., 0]))
    with pytest.raises(ValueError, match="unknown attacks"):
        perturb.sweep(["jpeg", "rotate"])


def test_noise_seed_sequences():
    x = smooth_image(4, 30, 30)
    a = apply("noise", 0.03, x, seed=(5, 0))
    assert np.array_equal(a, apply("noise", 0.03, x, seed=(5, 0)))
    assert not np.array_equal(a, apply("noise", 0.03, x, seed=(5, 1)))
    assert np.array_equal(apply("noise", 0.03, x, seed=5), apply("noise", 0.03, x, seed=[5]))
    with pytest.raises(ValueError, match=r"noise: seed must be an int >= 0 or a sequence of them, got -1"):
        apply("noise", 0.03, x, seed=-1)


EDGE_SHAPES = [(1, 1, 3), (1, 7, 3), (7, 1, 3), (2, 2, 3), (3, 1, 1, 3), (2, 5, 4, 3)]


@pytest.mark.parametrize("shape", EDGE_SHAPES)
@pytest.mark.parametrize("attack,level", [("jpeg", 30), ("blur", 3), ("resize", 0.25), ("noise", 0.1)])
def test_edge_shapes_strides_and_read_only_inputs(attack, level, shape):
    x = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    before = x.copy()
    y = apply(attack, level, x, seed=2)
    assert y.shape == x.shape and y.dtype == np.uint8 and np.array_equal(x, before)
    flipped = x[..., ::-1, :]  # a negative stride on the width axis
    assert np.array_equal(apply(attack, level, flipped, seed=2), apply(attack, level, flipped.copy(), seed=2))
    x.setflags(write=False)
    assert np.array_equal(apply(attack, level, x, seed=2), y)


def test_jpeg_and_resize_equal_direct_pillow_calls():
    import io

    x = smooth_image(5, 37, 29)
    for q in (1, 30, 95, 100):
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, "JPEG", quality=q, subsampling="4:2:0")
        assert np.array_equal(apply("jpeg", q, x), np.asarray(Image.open(buf).convert("RGB"))), q
    for f, small in ((0.75, (22, 28)), (0.5, (14, 18)), (0.25, (7, 9)), (0.01, (1, 1))):
        img = Image.fromarray(x).resize(small, Image.Resampling.BICUBIC).resize((29, 37), Image.Resampling.BICUBIC)
        assert np.array_equal(apply("resize", f, x), np.asarray(img)), f
    assert np.array_equal(apply("resize", 1, x), x)


@pytest.mark.parametrize("sigma", [0.3, 0.5, 1, 2, 3])
@pytest.mark.parametrize("hw", [(40, 30), (5, 9), (1, 6), (2, 7)])
def test_blur_equals_scipy_gaussian_filter(sigma, hw):
    """scipy's ``mode="mirror"`` is numpy's ``"reflect"`` (the edge pixel not repeated); its
    radius is ``int(truncate * sigma + 0.5)``, so truncate is set to give ours, ceil(4 sigma)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    x = smooth_image(6, *hw)
    r = max(1, int(np.ceil(4 * sigma)))
    mode = ["nearest" if n == 1 else "mirror" for n in hw]
    want = np.stack([ndimage.gaussian_filter(x[..., c].astype(np.float64), sigma, truncate=r / sigma, mode=mode)
                     for c in range(3)], -1)
    assert np.array_equal(apply("blur", sigma, x), np.clip(np.round(want), 0, 255).astype(np.uint8))


def test_noise_is_the_documented_draw_rounded_and_clipped():
    x = smooth_image(7, 30, 20)
    x[:5], x[-5:] = 0, 255  # clipping at both ends
    for seed, sigma in ((3, 0.1), ((4, 9), 0.03)):
        draw = np.random.default_rng([*np.atleast_1d(seed).tolist(), 0]).normal(0.0, sigma * 255.0, x.shape)
        want = np.clip(np.round(x + draw), 0, 255).astype(np.uint8)
        assert np.array_equal(apply("noise", sigma, x, seed=seed), want)
    y = apply("noise", 0.1, x, seed=3)
    assert y[:5].min() == 0 < y[:5].max() and y[-5:].min() < 255 == y[-5:].max()


def test_levels_at_the_ends_of_their_ranges():
    """The bounds the docstrings give: JPEG 1..100, blur sigma > 0, noise sigma in (0, 1]; and
    a constant image at either end of the range stays so under blur (no clipping off by one)."""
    x = smooth_image(8, 12, 10)
    for bad in (101, 0):
        with pytest.raises(ValueError, match=f"jpeg: quality must be an int in 1..100, got {bad}"):
            apply("jpeg", bad, x)
    with pytest.raises(ValueError, match="blur: sigma must be a positive number of pixels, got 0"):
        apply("blur", 0, x)
    with pytest.raises(ValueError, match=r"noise: sigma must be a fraction of the range in \(0, 1\], got 1.5"):
        apply("noise", 1.5, x)
    assert apply("noise", 1, x).shape == x.shape
    for value in (0, 255):
        flat = np.full((6, 5, 3), value, dtype=np.uint8)
        assert np.array_equal(apply("blur", 1, flat), flat), value


def test_noise_seeds_that_are_whole_numbers_of_any_type():
    x = smooth_image(9, 10, 10)
    assert np.array_equal(apply("noise", 0.1, x), apply("noise", 0.1, x, seed=0))  # the default seed is 0
    assert np.array_equal(perturb.noise(x, 0.1), perturb.noise(x, 0.1, seed=0))
    assert np.array_equal(apply("noise", 0.1, x, seed=1.0), apply("noise", 0.1, x, seed=1))
    assert np.array_equal(apply("noise", 0.1, x, seed=(2.0, 3)), apply("noise", 0.1, x, seed=(2, 3)))
    for bad in (1.5, (1.5, 2), (2, -1), ()):
        with pytest.raises(ValueError, match="noise: seed must be an int >= 0 or a sequence of them"):
            apply("noise", 0.1, x, seed=bad)


def test_augmenter_levels_fraction_and_attacks():
    """Levels are drawn across each attack's whole range (JPEG qualities integers); fraction 1
    attacks every chip; an empty or unknown attack list is refused; the default stream is 0."""
    x = np.random.default_rng(1).integers(0, 256, size=(400, 8, 8, 3), dtype=np.uint8)
    aug = perturb.Augmenter(fraction=1.0, seed=2)
    out = aug(x)
    assert np.array_equal(out, aug(x, 0)) and len(aug.last_) == len(x)
    for attack, levels in ATTACKS.items():
        drawn = [level for _, k, level in aug.last_ if k == attack]
        lo, hi = min(levels), max(levels)
        assert lo <= min(drawn) and max(drawn) <= hi and max(drawn) - min(drawn) > 0.8 * (hi - lo), (attack, drawn)
        if attack == "jpeg":
            assert all(isinstance(q, int) for q in drawn) and len(set(drawn)) > 20
    for bad in ([], ["nope"], ["jpeg", "crop"]):
        with pytest.raises(ValueError, match="Augmenter: attacks must be a non-empty subset of"):
            perturb.Augmenter(attacks=bad)


def test_augmenter_streams_copy_and_range_ends():
    """Two streams (the real and the fake class) draw independently; an attacked chip is the
    attack applied with the documented seed; the input is left as it was; JPEG qualities reach
    both ends of their range."""
    x = np.random.default_rng(3).integers(0, 256, size=(300, 8, 8, 3), dtype=np.uint8)
    keep = x.copy()
    aug = perturb.Augmenter(fraction=0.6, seed=4)
    out0 = aug(x, 0)
    first = aug.last_
    out1 = aug(x, 1)
    assert first != aug.last_ and not np.array_equal(out0, out1)
    assert np.array_equal(x, keep) and out0 is not x
    noisy = perturb.Augmenter(fraction=1.0, seed=4, attacks=["noise"])
    out = noisy(x[:5], 1)
    for i, attack, level in noisy.last_:
        assert np.array_equal(out[i], perturb.noise(x[i], level, seed=(4, 1, i)))
    aug = perturb.Augmenter(fraction=1.0, seed=0, attacks=["jpeg"])
    aug(np.zeros((3000, 1, 1, 3), np.uint8))
    qualities = {q for _, _, q in aug.last_}
    assert min(qualities) == min(ATTACKS["jpeg"]) and max(qualities) == max(ATTACKS["jpeg"])


def test_more_bad_arguments():
    x = smooth_image()
    with pytest.raises(ValueError, match=r"jpeg: quality must be an int in 1..100, got 50.5"):
        apply("jpeg", 50.5, x)
    with pytest.raises(ValueError, match=r"image must be \[H, W, 3\] or \[N, H, W, 3\] RGB with H, W >= 1"):
        apply("blur", 1, np.zeros((0, 5, 3), np.uint8))
    for bad in (1.5, -0.1, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"Augmenter: fraction must be in \[0, 1\]"):
            perturb.Augmenter(fraction=bad)
    for bad in (-1, 1.7, float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match=r"Augmenter: seed must be an int >= 0"):
            perturb.Augmenter(seed=bad)
    for bad in (float("nan"), float("inf"), [1, float("nan")]):
        with pytest.raises(ValueError, match=r"noise: seed must be an int >= 0 or a sequence of them"):
            apply("noise", 0.03, x, seed=bad)
    assert np.array_equal(apply("noise", 0.03, x, seed=np.array([5, 0])), apply("noise", 0.03, x, seed=(5, 0)))
