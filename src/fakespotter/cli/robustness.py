"""``fakespotter robustness``: the paper's four perturbation attacks applied to real and fake
images alike, each at every level, and the model's AUC and accuracy at its stored operating
threshold per level (with bootstrap 95% intervals): robustness.json, robustness.csv,
robustness.md and robustness.png (AUC and ACC@op against the level, one panel per attack) in
--out-dir; the Markdown table is printed too.

Levels (weakest first): jpeg quality 95 75 50 30; blur sigma 0.5 1 2 3 px; resize factor
0.75 0.5 0.25 (down, then back up); noise sigma 0.01 0.03 0.05 0.1 of the 0..255 range. The
attack is applied to the decoded image before face detection (so an attack can also lose
faces: counted per level), or to the chip with --aligned. Noise is seeded per image from
--seed. The row "clean" is the unattacked baseline."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Tuple

import numpy as np

from ._common import Progress, log
from .evaluate import add_corpus_args, check_corpus, counts, model_info, require_both_classes

OUTPUTS = ("robustness.json", "robustness.csv", "robustness.md", "robustness.png")


def add_parser(sub) -> None:
    from ..perturb import ATTACKS

    p = sub.add_parser("robustness", help="AUC and accuracy under JPEG, blur, resize and noise attacks",
                       description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS), metavar="ATTACK",
                   help=f"attacks to sweep, of {' '.join(ATTACKS)} (default: all four)")
    p.add_argument("--out-dir", default="robustness", metavar="DIR",
                   help="folder for the reports, created if missing (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N",
                   help="bootstrap resamples for the 95%% intervals; 0 for none (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan = check_corpus(args, OUTPUTS)
    from .. import evaluate as ev
    from .. import perturb

    det, paths, labels = plan["detector"], plan["paths"], plan["labels"]
    attacks = list(dict.fromkeys(args.attacks))
    variants: List[Tuple[str, Any]] = [("clean", None)] + perturb.sweep(attacks)

    def transform(attack: str, level: Any):
        def f(rgb: np.ndarray, i: int) -> np.ndarray:
            return perturb.apply(attack, level, rgb, seed=(args.seed, i))
        return f

    transforms = {v: (None if v[0] == "clean" else transform(*v)) for v in variants}
    progress = Progress(len(paths), f"scoring x{len(variants)} variants", args.quiet)
    scored = ev.score_images(det, paths, transforms=transforms, aligned=det.aligned, progress=progress.update)
    progress.close()
    clean_counts = counts(labels, scored.scores[("clean", None)], scored.faces[("clean", None)])
    require_both_classes(clean_counts, det.aligned)
    op = float(det.operating_threshold_["logit"])
    log(f"metrics of {len(variants)} variants ...", args.quiet)
    rows: List[Dict[str, Any]] = []
    for k, (attack, level) in enumerate(variants):
        s, f = scored.scores[(attack, level)], scored.faces[(attack, level)]
        c = counts(labels, s, f)
        ok = ~np.isnan(s)
        row: Dict[str, Any] = {"attack": attack, "level": "-" if level is None else level,
                               "n_real": c["real"]["scored"], "n_fake": c["fake"]["scored"],
                               "n_real_without_face": c["real"]["without_face"],
                               "n_fake_without_face": c["fake"]["without_face"],
                               "mean_score_real": float(np.mean(s[ok & (labels == 0)])) if c["real"]["scored"] else float("nan"),
                               "mean_score_fake": float(np.mean(s[ok & (labels == 1)])) if c["fake"]["scored"] else float("nan")}
        if c["real"]["scored"] and c["fake"]["scored"]:
            r = ev.evaluate(s[ok], labels[ok], operating_threshold=op, bootstrap=args.bootstrap,
                            seed=args.seed + k)["rows"][0]
            keep = ("auc", "acc_operating", "tpr_operating", "fpr_operating", "eer", "ap")
            row.update({m: r[m] for m in keep})
            row["ci"] = {m: r["ci"][m] for m in keep}
        else:  # the attack removed every face of a class: nothing to rank
            row.update({m: float("nan") for m in ("auc", "acc_operating", "tpr_operating", "fpr_operating", "eer", "ap")})
        rows.append(row)
    report = {"label_columns": ["attack", "level"],
              "settings": {"attacks": {a: perturb.ATTACKS[a] for a in attacks}, "aligned": det.aligned,
                           "applied_to": "chips" if det.aligned else "images before face detection",
                           "operating_threshold": op, "bootstrap": args.bootstrap, "seed": args.seed, "level": 0.95},
              "rows": rows, "model": model_info(args.model, det), "sources": plan["sources"], "counts": clean_counts,
              "failures": [{"path": p, "error": e} for _, p, e in scored.errors]}
    files = plan["files"]
    plan["out_dir"].mkdir(exist_ok=True)
    notes = [f"model {report['model']['path']} (sha256 {report['model']['sha256'][:16]}...); ACC@op at its "
             f"operating threshold, logit {op:.4g}",
             f"attacks applied to {report['settings']['applied_to']}, to real and fake alike; intervals: "
             f"{args.bootstrap} stratified bootstrap resamples, 95% percentile",
             f"clean: {clean_counts['real']['images']} real and {clean_counts['fake']['images']} fake images; "
             f"{clean_counts['real']['unreadable'] + clean_counts['fake']['unreadable']} unreadable (left out)"]
    columns = ["auc", "acc_operating", "tpr_operating", "fpr_operating", "eer"]
    ev.write_json(report, files["robustness.json"])
    ev.write_csv(report, files["robustness.csv"])
    text = "# FakeSpotter robustness\n\n" + ev.to_markdown(report, columns=columns) + "\n" + "".join(f"- {n}\n" for n in notes)
    files["robustness.md"].write_text(text)
    if not args.no_plots:
        panels = {}
        for a in attacks:
            rs = [r for r in rows if r["attack"] == a]
            xs = [r["level"] for r in rs]
            panels[perturb.DESCRIPTIONS[a]] = {"AUC": (xs, [r["auc"] for r in rs]),
                                               "ACC@op": (xs, [r["acc_operating"] for r in rs])}
        ev.plot_lines(panels, files["robustness.png"], ylabel="AUC / accuracy", reference=rows[0]["auc"])
    print(ev.to_markdown(report, columns=columns), end="")
    print(f"wrote {', '.join(str(f) for f in files.values())}")
    for f in report["failures"][:10]:
        print(f"  unreadable: {f['path']}: {f['error']}", file=sys.stderr)
    return 1 if report["failures"] else 0

