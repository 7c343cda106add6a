"""Decode workers: how a scan's speed depends on ``workers``, the basis of
``scan.default_workers``.

    python benchmarks/bench_workers.py [--repeats 3] [--max-workers N]
    python benchmarks/bench_workers.py --crash [--repeats 3]

Two corpora, scanned with face detection by the embedded default detector (``scan()``, batch
64, the default ``detect_pixels``): ``photos``, the registry photos (PIL-encoded JPEG q90)
scaled to 12 MP, 8 images; ``headshots``, 60 real headshots of the sample data (~250x250).
For each, the median wall time of a whole scan (pool start included) with 1, 2, ... workers up
to ``--max-workers`` (default: the usable CPUs), measured round-robin, and the ratio to
1 worker. The records of every worker count must be identical (checked).

``--crash``: what a decode worker's crash costs. The ``photos`` corpus with and without one more
file on which a worker exits hard (the scanner's test hook ``FAKESPOTTER_SCAN_TEST_CRASH``, as a
crash in a native decoder), scanned with ``--max-workers`` workers: the median wall times and
their difference, the time the pool's restart and the redo of the files in flight took.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from common import description, hardware, interleaved_medians  # noqa: E402

PHOTO_MP = 12
N_PHOTOS = 8
N_HEADSHOTS = 60


def build(root: Path) -> dict:
    from fakespotter import samples
    from fakespotter.faces import load_image
    from fakespotter.weights import fetch_sample_photos

    photos, heads = root / "photos", root / "headshots"
    if not (root / "done").exists():
        photos.mkdir(parents=True, exist_ok=True)
        heads.mkdir(parents=True, exist_ok=True)
        srcs = sorted(fetch_sample_photos().items())
        for i in range(N_PHOTOS):
            name, path = srcs[i % len(srcs)]
            img = Image.fromarray(load_image(path))
            s = (PHOTO_MP * 1e6 / (img.width * img.height)) ** 0.5
            img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
            img.save(photos / f"{i:02d}_{Path(name).stem}.jpg", quality=90)
        for i, path in enumerate(samples.real_headshots()[:N_HEADSHOTS]):
            Image.fromarray(load_image(path)).save(heads / f"{i:03d}.jpg", quality=90)
        (root / "done").write_text("ok")
    return {"photos": photos, "headshots": heads}


def main() -> None:
    from fakespotter.scan import default_workers, scan

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    ap.add_argument("--max-workers", type=int, default=cpus, help="largest worker count (default: the usable CPUs, "
                                                                   f"here {cpus})")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fakespotter-bench-workers"),
                    help="where the corpora are built, once (default: %(default)s)")
    ap.add_argument("--crash", action="store_true", help="measure what a worker crash costs instead (the module docstring says how; default: off)")
    args = ap.parse_args()
    if args.crash:
        os.environ["FAKESPOTTER_SCAN_TEST_CRASH"] = "-crash.jpg"  # before any worker starts
    from fakespotter.detector import FakeSpotter

    det = FakeSpotter.default()
    corpora = build(Path(args.workdir))
    print(hardware())
    print(f"usable CPUs {cpus}; default_workers() {default_workers()}; batch 64; medians of {args.repeats} "
          f"round-robin runs after one untimed run of each\n")
    if args.crash:
        crash(det, corpora["photos"], Path(args.workdir), args.max_workers, args.repeats)
        return
    print(f"{'corpus':<10} {'images':>6} {'workers':>7} {'median s':>9} {'images/s':>9} {'vs 1 worker':>11}")
    for name, folder in corpora.items():
        n = len(list(folder.iterdir()))
        records = {}

        def run(w: int, folder: Path = folder) -> None:
            records[w] = [(r["path"], r["status"], r["score"]) for r in scan([str(folder)], det, workers=w)]

        counts = range(1, args.max_workers + 1)
        t = interleaved_medians({w: (lambda w=w: run(w)) for w in counts}, repeats=args.repeats, warmup=1)
        assert all(records[w] == records[1] for w in counts), "records differ between worker counts"
        for w in counts:
            print(f"{name:<10} {n:>6} {w:>7} {t[w]:>9.2f} {n / t[w]:>9.2f} {t[1] / t[w]:>10.2f}x")


def crash(det, photos: Path, root: Path, workers: int, repeats: int) -> None:
    import shutil

    from fakespotter.scan import scan

    crashing = root / "photos-crash"
    if not crashing.exists():
        shutil.copytree(photos, crashing)
        first = sorted(crashing.iterdir())[len(list(crashing.iterdir())) // 2]
        shutil.copy(first, crashing / f"{first.stem}-crash.jpg")  # in the middle of the listing
    records = {}

    def run(folder: Path) -> None:
        records[folder.name] = [(Path(r["path"]).name, r["status"], r["error_kind"]) for r in
                                scan([str(folder)], det, workers=workers)]

    t = interleaved_medians({"whole": lambda: run(photos), "crash": lambda: run(crashing)}, repeats=repeats,
                            warmup=1)
    kinds = [k for _, _, k in records["photos-crash"] if k]
    assert kinds == ["worker_crash"], kinds
    n = len(records["photos"])
    print(f"{'corpus':<14} {'images':>6} {'workers':>7} {'median s':>9}")
    print(f"{'photos':<14} {n:>6} {workers:>7} {t['whole']:>9.2f}")
    print(f"{'photos+crash':<14} {n + 1:>6} {workers:>7} {t['crash']:>9.2f}")
    print(f"a crash cost {t['crash'] - t['whole']:.2f} s, {(t['crash'] - t['whole']) / (t['whole'] / n):.1f}x the time "
          f"per image of the scan without it")


if __name__ == "__main__":
    main()
