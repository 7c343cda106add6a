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
import json
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


MARKER = ".built"  # what the demo wrote: {"corpus": N, "files": [the corpus's files]}
BUILDING = ".corpus.tmp"  # a corpus being built: renamed to corpus/ once complete
OURS = {MARKER, MARKER + ".tmp", BUILDING, "corpus", "scan.jsonl", "scan.jsonl.stats.json"}
PHOTOS = ("obama.jpg", "obama2.jpg", "biden.jpg")


def _files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def _demo_files(n_corpus: int) -> list:
    """The files the demo writes into ``corpus/`` for ``--corpus n_corpus``."""
    names = ([f"real/{p.name}" for p in samples.real_headshots()[:n_corpus]]
             + [f"fake/dcgan-{DEMO_SEED}-{i:03d}.png" for i in range(n_corpus)]
             + [f"photos/{n}" for n in PHOTOS] + ["broken/empty.jpg", "broken/truncated.jpg"])
    return sorted(names)


def _read_marker(work: Path):
    """What ``.built`` says the demo wrote: {"corpus": N or None, "files": [...]}, or None."""
    try:
        text = (work / MARKER).read_text()
    except OSError:
        return None
    try:
        built = json.loads(text)
    except ValueError:  # an older demo's "corpus N": it wrote the files of that size
        old = text.split()
        if len(old) == 2 and old[0] == "corpus" and old[1].isdigit():
            return {"corpus": int(old[1]), "files": _demo_files(int(old[1]))}
        return None
    return built if isinstance(built, dict) and isinstance(built.get("files"), list) else None


def _write_marker(work: Path, n_corpus, files) -> None:
    tmp = work / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"corpus": n_corpus, "files": sorted(files)}) + "\n")
    tmp.replace(work / MARKER)


def build(work: Path, n_corpus: int) -> None:
    """Build the corpus in ``work/corpus`` (made in ``work/.corpus.tmp`` and renamed when complete,
    so an interrupted build is simply redone). A corpus of the same size is kept, with any files
    added to it; another size replaces it, unless files the demo did not write are there (they
    are named, never deleted). A folder the demo did not make, and not empty, is refused."""
    built = _read_marker(work)
    if built is not None and built.get("corpus") == n_corpus and (work / "corpus").is_dir():
        shutil.rmtree(work / BUILDING, ignore_errors=True)  # (an interrupted rebuild's)
        return
    if work.exists() and not work.is_dir():
        raise SystemExit(f"demo: --work {work} is a file; give a new or empty folder")
    if work.exists():
        others = sorted(p.name for p in work.iterdir() if p.name not in OURS)
        if built is None and (others or (work / "corpus").exists() or (work / "scan.jsonl").exists()):
            raise SystemExit(f"demo: --work {work} exists and is not a demo folder (no {MARKER} marker); "
                             f"give a new or empty folder")
        corpus = work / "corpus"
        added = [f for f in _files(corpus) if f not in set(built["files"])] if corpus.is_dir() else []
        if others or added:
            raise SystemExit(f"demo: --work {work} holds files the demo did not write "
                             f"({', '.join((others + ['corpus/' + f for f in added])[:5])}"
                             f"{', ...' if len(others) + len(added) > 5 else ''}), and --corpus {n_corpus} "
                             f"rebuilds its corpus: move them away, or give another --work")
    tmp = work / BUILDING
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted build's
    copy_reals(tmp / "real", samples.real_headshots()[:n_corpus])
    write_renders(tmp / "fake", n_corpus, seed=DEMO_SEED)
    copy_reals(tmp / "photos", [weights.sample_photo_path(n) for n in PHOTOS])
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "truncated.jpg").write_bytes(weights.sample_photo_path("biden.jpg").read_bytes()[:2000])
    # the swap: first a marker that owns both corpora (an interrupt in between leaves a folder
    # the next run rebuilds), then the old corpus out, the new one in, and its own marker
    new = _files(tmp)
    _write_marker(work, None, set(new) | set(built["files"] if built else ()))
    shutil.rmtree(work / "corpus", ignore_errors=True)  # (the demo's own files: checked above)
    tmp.rename(work / "corpus")
    _write_marker(work, n_corpus, new)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=".demo",
                        help="working folder, made and owned by the demo: a folder that holds files and is not the "
                             "demo's is refused, and so is a rebuild of its corpus (another --corpus) while it holds files "
                             "the demo did not write; files added to its corpus are scanned too, never deleted; "
                             "each run replaces its scan.jsonl (default: %(default)s)")
    parser.add_argument("--corpus", type=_positive, default=30,
                        help="real headshots and DCGAN renders in the corpus, each (default: %(default)s)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    build(work, args.corpus)
    print(f"scanning {work / 'corpus'} ...", file=sys.stderr, flush=True)
    rc = cli(["scan", str(work / "corpus"), "--out", str(work / "scan.jsonl"), "--overwrite"])
    print(f"records: {work / 'scan.jsonl'}", file=sys.stderr)
    return 0 if rc in (0, 1) else rc  # 1 = some inputs failed: the broken files, on purpose


if __name__ == "__main__":
    sys.exit(main())
