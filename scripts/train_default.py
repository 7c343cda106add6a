"""Train the embedded default detector and write the reports its model card quotes.

    python scripts/train_default.py --data DATA [--out src/fakespotter/models/default.fsm]
                                    [--reports reports/default] [--overwrite]

DATA is a benchmark data set made by ``fakespotter data build DATA`` (the full build, not
``--small``); it is built first when DATA holds no manifest. The detector is FakeSpotter with
its library defaults (dlib ResNet backbone, every post-ReLU layer + the descriptor, channel
granularity, per-layer thresholds (paper Eq. 1), the 16-16 bitset MLP), trained on the
manifest's ``train`` split; the ``val`` split drives early stopping and the operating
threshold; the ``test`` split is touched only by the reports.

The operating threshold is set for a true-positive rate (``TARGET_TPR`` of the val fakes), not a
false-positive rate: the val reals are mostly NBA headshots, on which any threshold looks safe,
while real faces from other sources score far higher (on val, the three face-api faces scored
above most headshots).  At TPR 0.5 of all val fakes (about three quarters of the entire-synthesis
ones; the local types score near the reals) 2 of the 54 val reals are flagged; the value was
fixed on val before the test split was scored.

- ``REPORTS/evaluate/``: ``fakespotter evaluate`` of the default detector and the baselines
  (all trained on the same train split) on the test split;
- ``REPORTS/robustness/``: ``fakespotter robustness`` over the four attacks, same detectors;
- ``REPORTS/training.json``: the training summary stored in the model file.

Everything is seeded; the model file differs between runs of the same code only in its creation
time (``SOURCE_DATE_EPOCH`` sets that too). The shipped file was trained by an earlier version
(README, "Model card"): the current code gives another file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from fakespotter import FakeSpotter
from fakespotter.cli import main as cli
from fakespotter.manifest import MANIFEST_NAME, file_sha256, read_manifest

TARGET_TPR = 0.5
SEED = 0


def load_chips(manifest, label: str) -> np.ndarray:
    rows = [r for r in manifest.rows if r.label == label]
    chips = []
    for r in rows:
        with Image.open(manifest.path(r)) as img:
            chips.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    return np.stack(chips)


def counts(manifest) -> dict:
    return {split: dict(Counter(f"{r.label}/{r.fake_type or 'real'}/{r.generator or r.source}"
                                for r in manifest.rows if r.split == split))
            for split in ("train", "val", "test")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the benchmark data set folder (built when missing)")
    parser.add_argument("--out", default="src/fakespotter/models/default.fsm", help="model file (default: %(default)s)")
    parser.add_argument("--reports", default="reports/default", help="report folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace the model file and reports (default: refuse)")
    parser.add_argument("--skip-reports", action="store_true", help="train only (default: train, then report)")
    args = parser.parse_args(argv)
    data, out, reports = Path(args.data), Path(args.out), Path(args.reports)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} exists; pass --overwrite to replace it")
    if not (data / MANIFEST_NAME).is_file():
        print(f"building the benchmark data set in {data} ...", file=sys.stderr, flush=True)
        rc = cli(["data", "build", str(data)])
        if rc != 0:
            return rc
    full = read_manifest(data)
    train, val = full.select(splits="train"), full.select(splits="val")
    print(f"training on {len(train)} chips, validating on {len(val)} ...", file=sys.stderr, flush=True)
    det = FakeSpotter(aligned=True, seed=SEED, target_tpr=TARGET_TPR)
    det.fit(load_chips(train, "real"), load_chips(train, "fake"),
            validation=(load_chips(val, "real"), load_chips(val, "fake")),
            sources={"manifest_sha256": file_sha256(data / MANIFEST_NAME), "splits": counts(full),
                     "made_by": "scripts/train_default.py"})
    out.parent.mkdir(parents=True, exist_ok=True)
    det.save(out, overwrite=True)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "training.json").write_text(json.dumps(det.training_summary_, indent=2, sort_keys=True) + "\n")
    print(json.dumps(det.training_summary_["metrics"], indent=2), file=sys.stderr)
    if args.skip_reports:
        return 0
    common = [str(out), "--manifest", str(data), "--split", "test", "--baselines", "all", "--overwrite", "--quiet"]
    for command in ("evaluate", "robustness"):
        print(f"fakespotter {command} ...", file=sys.stderr, flush=True)
        rc = cli([command, *common, "--out-dir", str(reports / command)])
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
