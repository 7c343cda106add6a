"""``fakespotter robustness``: the paper's four perturbation attacks applied to real and fake
images alike, each at every level, and the model's AUC and accuracy at its stored operating
threshold per level (with bootstrap 95% intervals): robustness.json, robustness.csv,
robustness.md and robustness.png (one panel per attack: AUC, TPR@op and FPR@op against the level;
side by side, each detector's AUC) in --out-dir; the Markdown table is printed too.

Levels (weakest first): jpeg quality 95 75 50 30; blur sigma 0.5 1 2 3 px; resize factor
0.75 0.5 0.25 (down, then back up); noise sigma 0.01 0.03 0.05 0.1 of the 0..255 range. The
attack is applied to the decoded image before face detection, so its level is in that image's
pixels (a face in a larger photo is attacked less, in chip pixels) and an attack can lose faces
(counted per level: its row then covers fewer images); or to the 150 px chip with --aligned and
a manifest's chips. Noise is seeded per image from
--seed and the image's position among those evaluated (an image added or removed changes the
noise of those after it). The row "clean" is the unattacked baseline.

Images come from --real / --fake folders or a data set's --manifest (--split, default test).
--baselines (see 'fakespotter evaluate --help') and --train-augment (a copy of the model, same
backbone, layers, granularity, threshold mode and classifier, retrained with the four attacks
applied at random levels to a random --augment-fraction of the training chips) are trained on
the manifest's train split or on --train-real / --train-fake, and reported side by side with
the model: rows per (detector, attack, level), AUC, TPR@op and FPR@op tables with a column per
detector, and one line per detector in the plot. Warnings, as evaluate's, say when the images
are ones the model was trained or validated on (a manifest split, or the same bytes)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import evaluate as ev
from .._atomic import write_atomic
from ._common import AUGMENT_FRACTION, Progress, log
from .evaluate import (MODEL_NAME, add_corpus_args, baseline_notes, bootstrap_caveat, check_corpus, counts,
                       intervals_note, model_info, no_face_caveat, remove_stale, require_both_classes, seen_in_training,
                       train_detectors, write_report_files)

OUTPUTS = ("robustness.json", "robustness.csv", "robustness.md", "robustness.png")


def add_parser(sub) -> None:
    from ..perturb import ATTACKS

    p = sub.add_parser("robustness", help="AUC and accuracy under JPEG, blur, resize and noise attacks",
                       description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS), metavar="ATTACK",
                   help=f"attacks to sweep, of {' '.join(ATTACKS)} (default: all four)")
    p.add_argument("--out-dir", default="robustness", metavar="DIR",
                   help="folder for the reports, created if missing (not its parent) (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N",
                   help="bootstrap resamples for the 95%% intervals; 0 for none (default: %(default)s)")
    p.add_argument("--train-augment", action="store_true",
                   help="also train the model's settings with the attacks as augmentation and report it side by "
                        "side (default: off)")
    p.add_argument("--augment-fraction", type=float, default=None,
                   help=f"share of training chips attacked with --train-augment (default: {AUGMENT_FRACTION})")
    p.set_defaults(run=run)


_KEEP = ("auc", "acc_operating", "tpr_operating", "fpr_operating", "eer", "ap")


def _rows(labels: np.ndarray, scored: Any, variants: List[Tuple[str, Any]], op: float, args: argparse.Namespace,
          detector: Optional[str]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for attack, level in variants:
        s, f = scored.scores[(attack, level)], scored.faces[(attack, level)]
        c = counts(labels, s, f)
        ok = ~np.isnan(s)
        row: Dict[str, Any] = {} if detector is None else {"detector": detector}
        row.update({"attack": attack, "level": "-" if level is None else level,
                    "n_real": c["real"]["scored"], "n_fake": c["fake"]["scored"],
                    "n_real_without_face": c["real"]["without_face"],
                    "n_fake_without_face": c["fake"]["without_face"],
                    "mean_score_real": float(np.mean(s[ok & (labels == 0)])) if c["real"]["scored"] else float("nan"),
                    "mean_score_fake": float(np.mean(s[ok & (labels == 1)])) if c["fake"]["scored"] else float("nan")})
        if c["real"]["scored"] and c["fake"]["scored"]:
            r = ev.evaluate(s[ok], labels[ok], operating_threshold=op, bootstrap=args.bootstrap,
                            seed=args.seed)["rows"][0]  # (one seed: rows with the same images resample alike)
            row.update({m: r[m] for m in _KEEP})
            row["ci"] = {m: r["ci"][m] for m in _KEEP}
        else:  # the attack removed every face of a class: nothing to rank
            row.update({m: float("nan") for m in _KEEP})
        rows.append(row)
    return rows


def _faces_caveat(labels: np.ndarray, scored: Any, variants: List[Tuple[str, Any]]) -> List[str]:
    """A line naming the attacks after which faces are found in other images than in the clean
    ones (most often fewer): their rows then cover other images than the clean row."""
    def without(v: Tuple[str, Any]) -> Tuple[int, int]:
        c = counts(labels, scored.scores[v], scored.faces[v])
        return c["real"]["without_face"], c["fake"]["without_face"]

    clean = without(variants[0])
    faceless = scored.faces[variants[0]] == 0
    parts = []
    for v in variants[1:]:
        if not np.array_equal(scored.faces[v] == 0, faceless):  # (the same counts may be other images)
            r, f = without(v)
            parts.append(f"{v[0]} {v[1]}: {r} real and {f} fake")
    if not parts:
        return []
    return [f"images without a face the detector finds (clean: {clean[0]} real and {clean[1]} fake) after "
            f"{'; '.join(parts)}: those rows leave out other images than the clean row"]


def _pivot(rows: List[Dict[str, Any]], names: List[str], metric: str) -> str:
    """A Markdown table: a line per (attack, level), a column per detector."""
    table: Dict[tuple, Dict[str, Any]] = {}
    for r in rows:
        table.setdefault((r["attack"], r["level"]), {})[r["detector"]] = r.get(metric)

    def cell(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    lines = ["| attack | level | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for (attack, level), vals in table.items():
        lines.append(f"| {attack} | {level} | " + " | ".join(cell(vals.get(n)) for n in names) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    plan = check_corpus(args, OUTPUTS)
    from .. import perturb

    det, paths, labels = plan["detector"], plan["paths"], plan["labels"]
    trained = train_detectors(plan, args)
    detectors = trained["detectors"]
    names = list(detectors)
    multi = len(names) > 1
    attacks = list(dict.fromkeys(args.attacks))
    variants: List[Tuple[str, Any]] = [("clean", None)] + perturb.sweep(attacks)

    def transform(attack: str, level: Any):
        def f(rgb: np.ndarray, i: int) -> np.ndarray:
            return perturb.apply(attack, level, rgb, seed=(args.seed, i))
        return f

    transforms = {v: (None if v[0] == "clean" else transform(*v)) for v in variants}
    progress = Progress(len(paths), f"scoring x{len(variants)} variants" + (f" x{len(names)} detectors" if multi else ""),
                        args.quiet)
    scored = ev.score_images_with(trained["score"], paths, size=int(det.tap_.preprocessing.size[0]),
                                  transforms=transforms, aligned=det.aligned, upsample=det.upsample,
                                  weak_face_score=det.weak_face_score, detect_pixels=det.detect_pixels,
                                  chunk_size=args.batch_size, progress=progress.update)
    progress.close()
    first = scored[MODEL_NAME]
    clean_counts = counts(labels, first.scores[("clean", None)], first.faces[("clean", None)])
    require_both_classes(clean_counts, det.aligned, labels, first.errors)
    caveats = (seen_in_training(plan, det) + no_face_caveat(clean_counts) + _faces_caveat(labels, first, variants)
               + bootstrap_caveat(args.bootstrap))
    for line in caveats:
        print(f"warning: {line}", file=sys.stderr)
    op = float(det.operating_threshold_["logit"])
    log(f"metrics of {len(variants)} variants ...", args.quiet)
    rows: List[Dict[str, Any]] = []
    for name in names:
        rows += _rows(labels, scored[name], variants, detectors[name]["operating_threshold"], args,
                      name if multi else None)
    report = {"label_columns": (["detector"] if multi else []) + ["attack", "level"],
              "settings": {"attacks": {a: perturb.ATTACKS[a] for a in attacks}, "aligned": det.aligned,
                           "applied_to": "chips" if det.aligned else "images before face detection",
                           "operating_threshold": op if not multi else {n: a["operating_threshold"] for n, a in detectors.items()},
                           "bootstrap": args.bootstrap, "seed": args.seed, "level": 0.95},
              "rows": rows, "detectors": detectors, "model": model_info(args.model, det), "sources": plan["sources"],
              "counts": clean_counts, "failures": [{"path": p, "error": e} for _, p, e in first.errors],
              "training_failures": trained["failures"],
              "images_without_face": [str(paths[i]) for i in np.flatnonzero(first.faces[("clean", None)] == 0)]}
    files = plan["files"]
    plan["out_dir"].mkdir(exist_ok=True)
    notes = [f"model {report['model']['path']} (sha256 {report['model']['sha256'][:16]}...); ACC@op, TPR@op "
             f"and FPR@op at its operating threshold, logit {op:.4g}",
             f"attacks applied to {report['settings']['applied_to']}, to real and fake alike; "
             f"{intervals_note(args.bootstrap, args.seed)}",
             f"clean: {clean_counts['real']['images']} real and {clean_counts['fake']['images']} fake images; "
             f"{clean_counts['real']['unreadable'] + clean_counts['fake']['unreadable']} unreadable (left out)"]
    notes += caveats + baseline_notes(detectors)
    columns = ["auc", "acc_operating", "tpr_operating", "fpr_operating", "eer"]
    remove_stale(plan, args.quiet)
    if multi:
        pivots = (("auc", "AUC"), ("tpr_operating", "TPR@op (fakes caught)"),  # (not ACC@op: it follows the
                  ("fpr_operating", "FPR@op (reals flagged)"))                   # share of fakes)
        text = "\n".join(f"## {head}\n\n" + _pivot(rows, names, k) for k, head in pivots)
        full = "".join(f"\n## {n}\n\n" + ev.to_markdown({"rows": [r for r in rows if r["detector"] == n],
                                                            "label_columns": ["attack", "level"]}, columns=columns)
                       for n in names)
        markdown = "# FakeSpotter robustness, side by side\n\n" + text + full + "\n"
    else:
        text = ev.to_markdown(report, columns=columns)
        markdown = "# FakeSpotter robustness\n\n" + text + "\n"
    replace = args.overwrite  # (else a report file made since the start is kept: exit 3, naming it)
    steps = [(files["robustness.json"], lambda: ev.write_json(report, files["robustness.json"], replace=replace)),
             (files["robustness.csv"], lambda: ev.write_csv(report, files["robustness.csv"], replace=replace)),
             (files["robustness.md"], lambda: write_atomic(files["robustness.md"], replace=replace,
                                                            data=markdown + "".join(f"- {n}\n" for n in notes)))]
    if not args.no_plots:
        panels = {}
        for a in attacks:
            panel = {}
            for name in names:
                rs = [r for r in rows if r["attack"] == a and r.get("detector", name) == name]
                xs = [r["level"] for r in rs]
                if multi:
                    panel[name] = (xs, [r["auc"] for r in rs])
                else:
                    panel.update({"AUC": (xs, [r["auc"] for r in rs]), "TPR@op": (xs, [r["tpr_operating"] for r in rs]),
                                  "FPR@op": (xs, [r["fpr_operating"] for r in rs])})
            panels[perturb.DESCRIPTIONS[a]] = panel
        steps.append((files["robustness.png"], lambda: ev.plot_lines(
            panels, files["robustness.png"], ylabel="AUC" if multi else "AUC / rate",
            reference=None if multi else rows[0]["auc"], replace=replace)))
    return write_report_files(steps, "robustness", report, text)
