"""The README's main job: scan a small sample corpus for synthetic faces with the embedded
default detector.

Builds (once) a sample corpus from the registry-pinned sample data: real NBA Summer League
headshots, DCGAN face renders (latents the default detector was not trained on), three real
news photos, and two broken files (to show that a bad file becomes an error record, not a crash
or a made-up score); then runs ``fakespotter scan`` on it and prints the summary.

The headshots and photos are also in the default detector's benchmark data (some in its
training split), so this corpus shows how the scanner works, not how accurate the detector is:
the README's model card gives held-out test numbers.

    python scripts/demo.py [--work .demo] [--corpus 30]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image

from fakespotter import samples, weights
from fakespotter.cli import main as cli

DEMO_SEED = 2  # DCGAN latents of seed 2: not among the benchmark data's renders (seed 0)


def write_renders(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(samples.dcgan_faces(n, seed)):
        # 64 x 64 renders, upscaled so dlib's detector (like on the headshots) finds most faces
        Image.fromarray(face).resize((128, 128), Image.BICUBIC).save(folder / f"dcgan-{seed}-{i:03d}.png")


def copy_reals(folder: Path, paths) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copyfile(p, folder / p.name)


def build(work: Path, n_corpus: int) -> None:
    """Build the corpus in ``work``: a folder this script made (it holds ``.built``) is rebuilt
    when ``n_corpus`` changed; any other folder that is not empty is refused, never wiped."""
    marker = work / ".built"
    if marker.exists() and marker.read_text() == f"corpus {n_corpus}":
        return
    if work.exists():
        if not work.is_dir() or (not marker.exists() and any(work.iterdir())):
            raise SystemExit(f"demo: --work {work} exists and is not a demo folder (no .built marker); "
                             f"give a new or empty folder, the demo replaces its contents")
        shutil.rmtree(work)
    corpus = work / "corpus"
    copy_reals(corpus / "real", samples.real_headshots()[:n_corpus])
    write_renders(corpus / "fake", n_corpus, seed=DEMO_SEED)
    copy_reals(corpus / "photos", [weights.sample_photo_path(n) for n in ("obama.jpg", "obama2.jpg", "biden.jpg")])
    broken = corpus / "broken"
    broken.mkdir()
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "truncated.jpg").write_bytes(weights.sample_photo_path("biden.jpg").read_bytes()[:2000])
    marker.write_text(f"corpus {n_corpus}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=".demo",
                        help="working folder, made and owned by the demo: a folder holding anything else is "
                             "refused (default: %(default)s)")
    parser.add_argument("--corpus", type=int, default=30, help="images per class in the corpus (default: %(default)s)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    build(work, args.corpus)
    print(f"scanning {work / 'corpus'} ...", file=sys.stderr, flush=True)
    rc = cli(["scan", str(work / "corpus"), "--out", str(work / "scan.jsonl"), "--overwrite"])
    print(f"records: {work / 'scan.jsonl'}", file=sys.stderr)
    return 0 if rc in (0, 1) else rc  # 1 = some inputs failed: the broken files, on purpose


if __name__ == "__main__":
    sys.exit(main())
