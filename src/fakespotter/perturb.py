"""The paper's four perturbation attacks on RGB images or face chips (FakeSpotter, IJCAI 2020,
robustness section): JPEG compression, Gaussian blur, resizing down and back up, Gaussian noise.

Every attack takes ``uint8 [H, W, 3]`` (one image) or ``uint8 [N, H, W, 3]`` (a chip batch) and
returns the same shape and dtype; a ``PIL.Image`` comes back as a ``PIL.Image``. Attacks are
deterministic: only noise draws random numbers, from ``seed`` (and, in a batch, one stream per
item: ``default_rng([*seed, item])``, so an item's noise depends on its place in the batch, not
on the batch's size or its other items).

:data:`ATTACKS` lists the levels swept by ``fakespotter robustness``, weakest first.

>>> jpeg50 = apply("jpeg", 50, chip)                        # doctest: +SKIP
>>> noisy = apply("noise", 0.05, chips, seed=3)             # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Dict, List, Sequence, Union

import numpy as np
from PIL import Image

__all__ = ["ATTACKS", "DESCRIPTIONS", "apply", "sweep", "jpeg", "blur", "resize", "noise", "Augmenter"]

ATTACKS: Dict[str, List[float]] = {
    "jpeg": [95, 75, 50, 30],          # JPEG quality (Pillow, 4:2:0 chroma subsampling)
    "blur": [0.5, 1, 2, 3],            # Gaussian sigma in pixels
    "resize": [0.75, 0.5, 0.25],       # scale factor down, then back up to the original size
    "noise": [0.01, 0.03, 0.05, 0.1],  # Gaussian sigma as a fraction of the 0..255 range
}

DESCRIPTIONS = {
    "jpeg": "JPEG quality",
    "blur": "blur sigma (px)",
    "resize": "resize factor (down, up)",
    "noise": "noise sigma (x 255)",
}

ImageLike = Union[np.ndarray, Image.Image]


def _check_image(image: Any, what: str) -> np.ndarray:
    a = np.asarray(image) if isinstance(image, Image.Image) else image
    if isinstance(image, Image.Image) and image.mode != "RGB":
        raise ValueError(f"{what}: PIL images must be mode RGB, got {image.mode!r}")
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what}: image must be a uint8 array [H, W, 3] / [N, H, W, 3] or a PIL image, "
                        f"got {type(image).__name__}")
    if a.dtype != np.uint8:
        raise TypeError(f"{what}: image must be uint8 (RGB 0..255), got dtype {a.dtype}")
    if a.ndim not in (3, 4) or a.shape[-1] != 3 or 0 in a.shape[-3:-1]:
        raise ValueError(f"{what}: image must be [H, W, 3] or [N, H, W, 3] RGB with H, W >= 1, got shape "
                         f"{list(a.shape)}")
    return a


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _per_item(a: np.ndarray, f: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    if a.ndim == 3:
        return f(a, 0)
    if len(a) == 0:
        return a.copy()
    return np.stack([f(x, i) for i, x in enumerate(a)])


def _pil_in_out(image: ImageLike, out: np.ndarray) -> ImageLike:
    return Image.fromarray(out) if isinstance(image, Image.Image) else out


def jpeg(image: ImageLike, quality: float) -> ImageLike:
    """Encode as JPEG at ``quality`` (1..100, Pillow, 4:2:0) and decode again."""
    if not _is_number(quality) or int(quality) != quality or not 1 <= quality <= 100:
        raise ValueError(f"jpeg: quality must be an int in 1..100, got {quality!r}")
    a = _check_image(image, "jpeg")

    def one(x: np.ndarray, _: int) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(x)).save(buf, format="JPEG", quality=int(quality), subsampling=2)
        with Image.open(io.BytesIO(buf.getvalue())) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)

    return _pil_in_out(image, _per_item(a, one))


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(image: ImageLike, sigma: float) -> ImageLike:
    """Separable Gaussian blur of standard deviation ``sigma`` pixels (kernel radius
    ``max(1, ceil(4 sigma))``; edges mirrored without repeating the edge pixel, numpy's
    ``"reflect"`` = scipy's ``"mirror"``; a 1-pixel axis is kept as is), rounded back to uint8."""
    if not (_is_number(sigma) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"blur: sigma must be a positive number of pixels, got {sigma!r}")
    a = _check_image(image, "blur")
    k = _gaussian_kernel(float(sigma))
    r = len(k) // 2

    def conv(x: np.ndarray, axis: int) -> np.ndarray:
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="reflect" if n > 1 else "edge")
        out = np.zeros_like(x, dtype=np.float64)
        for j, w in enumerate(k):
            out += w * np.take(xp, np.arange(j, j + n), axis=axis)
        return out

    def one(x: np.ndarray, _: int) -> np.ndarray:
        y = conv(conv(x.astype(np.float64), 0), 1)
        return np.clip(np.round(y), 0, 255).astype(np.uint8)

    return _pil_in_out(image, _per_item(a, one))


def resize(image: ImageLike, factor: float) -> ImageLike:
    """Shrink by ``factor`` (0 < factor <= 1; bicubic, antialiased) and enlarge back to the
    original size (bicubic): the detail finer than the small size is lost."""
    if not (_is_number(factor) and 0 < factor <= 1):
        raise ValueError(f"resize: factor must be in (0, 1], got {factor!r}")
    a = _check_image(image, "resize")

    def one(x: np.ndarray, _: int) -> np.ndarray:
        h, w = x.shape[:2]
        small = (max(1, int(round(w * factor))), max(1, int(round(h * factor))))
        img = Image.fromarray(np.ascontiguousarray(x))
        img = img.resize(small, Image.Resampling.BICUBIC).resize((w, h), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)

    return _pil_in_out(image, _per_item(a, one))


def noise(image: ImageLike, sigma: float, seed: Union[int, Sequence[int]] = 0) -> ImageLike:
    """Add Gaussian noise of standard deviation ``sigma * 255`` (sigma a fraction of the range),
    rounded and clipped to uint8. seed: an int or a sequence of ints (e.g. ``(run seed, image
    number)``); item ``i`` of a batch (0 for one image) uses ``default_rng([*seed, i])``."""
    if not (_is_number(sigma) and 0 < sigma <= 1):
        raise ValueError(f"noise: sigma must be a fraction of the range in (0, 1], got {sigma!r}")
    seeds = [seed] if _is_number(seed) else list(seed) if isinstance(seed, (tuple, list, np.ndarray)) else [None]
    if not seeds or not all(_is_number(s) and math.isfinite(s) and int(s) == s and s >= 0 for s in seeds):
        raise ValueError(f"noise: seed must be an int >= 0 or a sequence of them, got {seed!r}")
    seeds = [int(s) for s in seeds]
    a = _check_image(image, "noise")

    def one(x: np.ndarray, i: int) -> np.ndarray:
        rng = np.random.default_rng([*seeds, i])
        y = x.astype(np.float64) + rng.normal(0.0, sigma * 255.0, size=x.shape)
        return np.clip(np.round(y), 0, 255).astype(np.uint8)

    return _pil_in_out(image, _per_item(a, one))


_FUNCTIONS = {"jpeg": jpeg, "blur": blur, "resize": resize, "noise": noise}


def apply(attack: str, level: float, image: ImageLike, seed: Union[int, Sequence[int]] = 0) -> ImageLike:
    """Apply ``attack`` (a key of :data:`ATTACKS`) at ``level`` to an image or chip batch.

    ``seed`` only matters for noise. Levels outside :data:`ATTACKS` are allowed when valid for
    the attack (any JPEG quality 1..100, any blur sigma > 0, ...).
    """
    if attack not in _FUNCTIONS:
        raise ValueError(f"perturb.apply: attack must be one of {sorted(_FUNCTIONS)}, got {attack!r}")
    if attack == "noise":
        return noise(image, level, seed=seed)
    return _FUNCTIONS[attack](image, level)


def sweep(attacks: Sequence[str] = tuple(ATTACKS)) -> List[tuple]:
    """``[(attack, level), ...]`` of the named attacks at their :data:`ATTACKS` levels."""
    bad = [a for a in attacks if a not in ATTACKS]
    if bad:
        raise ValueError(f"perturb.sweep: unknown attacks {bad}; choose from {sorted(ATTACKS)}")
    return [(a, level) for a in attacks for level in ATTACKS[a]]


class Augmenter:
    """Training-time augmentation with the four attacks: each chip, with probability
    ``fraction``, gets one attack drawn uniformly from ``attacks`` at a level drawn uniformly
    between that attack's weakest and strongest :data:`ATTACKS` level (JPEG quality an integer).

    ``augmenter(chips, stream)`` returns a copy of ``uint8 [N, H, W, 3]`` chips; draws come from
    ``default_rng([seed, stream])`` (noise from ``(seed, stream, i)``), so a call is
    deterministic and two streams (e.g. the real and the fake class) are independent.
    ``last_`` records ``[(index, attack, level), ...]`` of the latest call.
    """

    def __init__(self, fraction: float = 0.5, seed: int = 0, attacks: Sequence[str] = tuple(ATTACKS)):
        if not (_is_number(fraction) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"Augmenter: fraction must be in [0, 1], got {fraction!r}")
        if not (_is_number(seed) and math.isfinite(seed) and int(seed) == seed and seed >= 0):
            raise ValueError(f"Augmenter: seed must be an int >= 0, got {seed!r}")
        bad = [a for a in attacks if a not in ATTACKS]
        if bad or not attacks:
            raise ValueError(f"Augmenter: attacks must be a non-empty subset of {sorted(ATTACKS)}, got {list(attacks)}")
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.attacks = list(attacks)

    def __repr__(self) -> str:
        return f"Augmenter(fraction={self.fraction!r}, seed={self.seed!r}, attacks={self.attacks!r})"

    def level(self, attack: str, rng: np.random.Generator) -> float:
        lo, hi = min(ATTACKS[attack]), max(ATTACKS[attack])
        if attack == "jpeg":
            return int(rng.integers(int(lo), int(hi) + 1))
        return float(rng.uniform(lo, hi))

    def __call__(self, chips: np.ndarray, stream: int = 0) -> np.ndarray:
        a = _check_image(chips, "Augmenter")
        if a.ndim != 4:
            raise ValueError(f"Augmenter: chips must be [N, H, W, 3], got shape {list(a.shape)}")
        rng = np.random.default_rng([self.seed, int(stream)])
        out = a.copy()
        self.last_ = []
        for i in range(len(a)):
            if rng.random() >= self.fraction:
                continue
            attack = self.attacks[int(rng.integers(len(self.attacks)))]
            level = self.level(attack, rng)
            out[i] = apply(attack, level, a[i], seed=(self.seed, int(stream), i))
            self.last_.append((i, attack, level))
        return out
