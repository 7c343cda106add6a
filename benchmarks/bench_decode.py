"""Decoding guards and decoders (``fakespotter.data`` / ``fakespotter.faces``): what they cost and save.

Same process, interleaved rounds, medians; each contender's output is checked first.

* PGM/PPM: Pillow's own decoders, which loop over samples (binary, maxval not 255) or tokens
  (plain P1-P3) in Python, against the numpy decoders ``faces.open_image`` swaps in. Same pixels.
* PNG whose last row is black: ``decode_image`` against the same without ``_check_png_data`` (the
  check inflates the image data again only for such a PNG), and the same pair for a PNG whose
  last row is not black (the check looks at one row).
* JPEG: ``_check_jpeg_scans`` (count the scans before decoding) against ``decode_image``; and
  ``_jpeg.scan_damage`` (the marker check of the scan data) against ``decode_image``, on a
  baseline JPEG, one with a restart marker every 4 blocks, and a progressive one.
* JPEG decoding: ``decode_image`` through simplejpeg (libjpeg-turbo with its warnings as errors,
  ``_jpeg.decode_rgb``) against the same through Pillow (the path it falls back to), on baseline
  4:2:0, 4:4:4, progressive and greyscale JPEGs of ``--mp`` and a 256x256 one. Same pixels.

Run: ``python benchmarks/bench_decode.py [--mp 4] [--repeats 5] [--jpeg-decode-only]``
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from unittest import mock

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import description, hardware, interleaved_times, paired_ratio  # noqa: E402


def photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: compresses like a photo, not like noise or flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 200, y / h * 200, (x + y) / (w + h) * 255], axis=-1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img)


def ours_decode(data: bytes) -> np.ndarray:
    from fakespotter.faces import open_image

    with open_image(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img)


def report(title: str, times, num: str, den: str) -> None:
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratio, lo, hi = paired_ratio(times, num, den)
    print(f"| {title} | {den} {med[den] * 1e3:.1f} ms | {num} {med[num] * 1e3:.1f} ms | {ratio:.3g}x "
          f"[{lo:.3g}, {hi:.3g}] |")


def main() -> None:
    from fakespotter import data as D

    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--mp", type=float, default=4.0, help="megapixels of the PNG and JPEG images (default 4)")
    ap.add_argument("--pnm-mp", type=float, default=1.0, help="megapixels of the PGM/PPM images (default 1: "
                                                                "Pillow takes seconds a megapixel)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds; medians are reported (default 5)")
    ap.add_argument("--jpeg-decode-only", action="store_true", help="only the simplejpeg vs Pillow JPEG decoding rows")
    args = ap.parse_args()
    print(hardware())
    side = lambda mp: int((mp * 1e6) ** 0.5)  # noqa: E731
    print(f"images: PNG/JPEG {side(args.mp)}^2 px, PGM/PPM {side(args.pnm_mp)}^2 px; {args.repeats} rounds, "
          f"medians; ratio = paired median [min, max] over rounds\n")
    print("| case | baseline | contender | contender / baseline |\n|---|---|---|---|")
    if not args.jpeg_decode_only:
        guards(args, side, D)
    jpeg_decoding(args, side, D)


def jpeg_decoding(args: argparse.Namespace, side, D) -> None:
    rgb = photo_like(side(args.mp), side(args.mp), seed=2)
    small = photo_like(256, 256, seed=3)
    cases = (("baseline 4:2:0", rgb, {}), ("baseline 4:4:4", rgb, {"subsampling": 0}),
             ("progressive 4:2:0", rgb, {"progressive": True}), ("greyscale", rgb[:, :, 0], {}),
             ("256x256 4:2:0", small, {}))
    for name, pixels, kw in cases:
        data = encode(Image.fromarray(pixels), "JPEG", quality=90, **kw)

        def pillow(d=data):
            with mock.patch.object(D, "decode_rgb", lambda _: (None, None)):
                return D.decode_image(d)

        assert np.array_equal(D.decode_image(data).rgb, pillow().rgb), name
        times = interleaved_times({"simplejpeg": lambda d=data: D.decode_image(d), "Pillow": pillow},
                                  repeats=args.repeats)
        report(f"JPEG q90 {name} ({len(data) / 1e6:.2f} MB): decode_image, simplejpeg vs Pillow", times,
               "simplejpeg", "Pillow")


def guards(args: argparse.Namespace, side, D) -> None:

    n = side(args.pnm_mp)
    rgb = photo_like(n, n)
    p3 = f"P3 {n} {n} 255\n".encode() + "\n".join(" ".join(map(str, row.ravel())) for row in rgb).encode() + b"\n"
    p6_16 = f"P6 {n} {n} 1000\n".encode() + (rgb.astype(">u2") * 1000 // 255).tobytes()
    for name, data in (("plain PPM (P3), 8-bit", p3), ("binary PPM (P6), maxval 1000", p6_16)):
        assert np.array_equal(pillow_decode(data), ours_decode(data)), name
        times = interleaved_times({"Pillow": lambda d=data: pillow_decode(d), "numpy": lambda d=data: ours_decode(d)},
                                  repeats=max(3, args.repeats // 2), warmup=0)
        report(name, times, "numpy", "Pillow")

    n = side(args.mp)
    rgb = photo_like(n, n, seed=1)
    for name, last in (("PNG, black last row: decode_image vs no check", 0), ("PNG, last row not black: same", None)):
        img = rgb.copy()
        if last is not None:
            img[-1] = last
        data = encode(Image.fromarray(img), "PNG")
        assert np.array_equal(D.decode_image(data).rgb, img)

        def unchecked(d=data):
            with mock.patch.object(D, "_check_png_data", lambda *a: None):
                return D.decode_image(d)

        times = interleaved_times({"checked": lambda d=data: D.decode_image(d), "unchecked": unchecked},
                                  repeats=args.repeats)
        report(name, times, "checked", "unchecked")

    jpeg = encode(Image.fromarray(rgb), "JPEG", quality=90)
    times = interleaved_times({"decode_image": lambda: D.decode_image(jpeg), "scan count": lambda: D._check_jpeg_scans(jpeg)},
                              repeats=args.repeats)
    report(f"JPEG q90 ({len(jpeg) / 1e6:.1f} MB): counting scans vs the whole decode", times, "scan count",
           "decode_image")

    from fakespotter._jpeg import scan_damage

    for name, kw in (("baseline", {}), ("restart every 4 blocks", {"restart_marker_blocks": 4}),
                     ("progressive", {"progressive": True})):
        data = encode(Image.fromarray(rgb), "JPEG", quality=90, **kw)
        assert scan_damage(data) is None
        times = interleaved_times({"decode_image": lambda d=data: D.decode_image(d),
                                   "marker check": lambda d=data: scan_damage(d)}, repeats=args.repeats)
        report(f"JPEG q90 {name} ({len(data) / 1e6:.1f} MB): marker check vs the whole decode", times,
               "marker check", "decode_image")


if __name__ == "__main__":
    main()
