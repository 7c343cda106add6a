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
    with pytest.raises(ValueError, match=r"image must be \[H, W, 3\] or \[N, H, W, 3\] RGB, got shape \[96, 80\]"):
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
