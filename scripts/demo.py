"""The README's main job: scan a small sample corpus for synthetic faces.

Builds (once) a sample corpus from the registry-pinned sample data: real NBA Summer League
headshots, DCGAN face renders, three real news photos, and two broken files (to show that a bad
file becomes an error record, not a crash or a made-up score). Until the embedded default
detector ships (issue D), it trains a small demo detector on a disjoint part of the same sources
and scans the corpus with it, printing the scan summary.

The demo detector learns "these headshots vs these DCGAN renders": it says nothing about how
well fakespotter does on other photos or generators (see benchmarks/RESULTS.md and the model
card once the benchmark data set lands).

    python scripts/demo.py [--work .demo] [--train 40] [--corpus 30]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fakespotter import samples, weights
from fakespotter.cli import main as cli


def write_renders(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(samples.dcgan_faces(n, seed)):
        # 64 x 64 renders, upscaled so dlib's detector (like on the headshots) finds most faces
        Image.fromarray(face).resize((128, 128), Image.BICUBIC).save(folder / f"dcgan-{seed}-{i:03d}.png")


def copy_reals(folder: Path, paths) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copyfile(p, folder / p.name)


def build(work: Path, n_train: int, n_corpus: int) -> None:
    marker = work / ".built"
    if marker.exists() and marker.read_text() == f"{n_train} {n_corpus}":
        return
    if work.exists():
        shutil.rmtree(work)
    heads = samples.real_headshots()
    copy_reals(work / "train" / "real", heads[:n_train])
    write_renders(work / "train" / "fake", n_train, seed=1)
    corpus = work / "corpus"
    copy_reals(corpus / "real", heads[n_train : n_train + n_corpus])
    write_renders(corpus / "fake", n_corpus, seed=2)
    copy_reals(corpus / "photos", [weights.sample_photo_path(n) for n in ("obama.jpg", "obama2.jpg", "biden.jpg")])
    broken = corpus / "broken"
    broken.mkdir()
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "truncated.jpg").write_bytes(weights.sample_photo_path("biden.jpg").read_bytes()[:2000])
    marker.write_text(f"{n_train} {n_corpus}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=".demo", help="working folder (default: %(default)s)")
    parser.add_argument("--train", type=int, default=40, help="training images per class (default: %(default)s)")
    parser.add_argument("--corpus", type=int, default=30, help="corpus images per class (default: %(default)s)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    build(work, args.train, args.corpus)
    model = work / "demo-detector.fsm"
    if not model.exists():
        print("training a demo detector on sample headshots vs DCGAN renders ...", file=sys.stderr, flush=True)
        rc = cli(["train", "--real", str(work / "train" / "real"), "--fake", str(work / "train" / "fake"),
                  "--fake-type", "dcgan", "--out", str(model), "--report", str(work / "train-report.json"),
                  "--epochs", "60"])
        if rc not in (0, 1):
            return rc
    print(f"scanning {work / 'corpus'} ...", file=sys.stderr, flush=True)
    rc = cli(["scan", str(work / "corpus"), "--model", str(model), "--out", str(work / "scan.jsonl"), "--overwrite"])
    print(f"records: {work / 'scan.jsonl'}", file=sys.stderr)
    return 0 if rc in (0, 1) else rc  # 1 = some inputs failed: the broken files, on purpose


if __name__ == "__main__":
    sys.exit(main())
