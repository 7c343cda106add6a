"""``fakespotter evaluate``: score labelled folders of real and fake images with a model file and
write metrics with bootstrap 95% intervals: metrics.json, metrics.csv, report.md, roc.png and
det.png in --out-dir; the Markdown table is printed too.

Every image goes through the detector's pipeline (face detection and alignment, or a plain
resize with --aligned) and scores as its most suspicious face. Images without a face and
unreadable images are counted, reported and left out of the metrics. Rows: all images, then
each fake type against all reals, then (with several --real sources) each real source against
all fakes. Scores are logits of "fake"; ACC / precision / recall / F1 use --threshold, ACC@op
the model's stored operating threshold."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from ._common import Progress, add_class_sources, images_of, log, usage_error

OUTPUTS = ("metrics.json", "metrics.csv", "report.md", "roc.png", "det.png")


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --real / --fake sources, the chip pipeline and output options (shared with
    ``robustness``)."""
    p.add_argument("model", metavar="MODEL", help="a model file written by 'fakespotter train'")
    add_class_sources(p)
    p.add_argument("--real-source", nargs="+", default=None, metavar="NAME",
                   help="a name for each --real source, in order (default: the folder names)")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are already-aligned face crops: resize only, no face detection (default: detect)")
    p.add_argument("--upsample", type=int, default=None,
                   help="face detector upsampling (default: the model's setting)")
    p.add_argument("--batch-size", type=int, default=64, help="chips per backbone forward (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling and of the noise attack (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (default: write them; needs matplotlib)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress output (default: progress on a terminal)")


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a model on labelled real and fake images",
                       description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--out-dir", default="evaluation", metavar="DIR",
                   help="folder for the reports, created if missing (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the 95%% intervals; 0 for none (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="logit threshold of ACC, precision, recall and F1 (default: %(default)s, i.e. P(fake) 0.5)")
    p.set_defaults(run=run)


def check_corpus(args: argparse.Namespace, outputs: Sequence[str]) -> Dict[str, Any]:
    """Every check that can fail before work starts; loads the model. Returns the plan."""
    real = [(d, images_of([d], "--real")) for d in args.real]
    fake = [(d, images_of([d], "--fake")) for d in args.fake]
    if args.fake_type is not None and len(args.fake_type) != len(args.fake):
        raise usage_error(f"--fake-type names {len(args.fake_type)} types for {len(args.fake)} --fake sources")
    if args.real_source is not None and len(args.real_source) != len(args.real):
        raise usage_error(f"--real-source names {len(args.real_source)} sources for {len(args.real)} --real sources")
    fake_names = args.fake_type or [Path(d.lstrip("@")).name or d for d in args.fake]
    real_names = args.real_source or [Path(d.lstrip("@")).name or d for d in args.real]
    overlap = {p.resolve() for _, ps in real for p in ps} & {p.resolve() for _, ps in fake for p in ps}
    if overlap:
        raise usage_error(f"{len(overlap)} images are both real and fake, e.g. {sorted(overlap)[0]}")
    if args.batch_size < 1:
        raise usage_error(f"--batch-size must be positive, got {args.batch_size}")
    if args.upsample is not None and args.upsample < 0:
        raise usage_error(f"--upsample must be >= 0, got {args.upsample}")
    if getattr(args, "bootstrap", 0) < 0:
        raise usage_error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if not math.isfinite(getattr(args, "threshold", 0.0)):
        raise usage_error(f"--threshold must be a finite logit, got {args.threshold}")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise usage_error(f"--out-dir {out_dir} is a file, not a folder")
    if not out_dir.exists() and not out_dir.parent.is_dir():
        raise usage_error(f"--out-dir {out_dir}: folder {out_dir.parent} does not exist")
    files = [out_dir / name for name in outputs if not (args.no_plots and name.endswith(".png"))]
    existing = [f for f in files if f.exists()]
    if existing and not args.overwrite:
        raise usage_error(f"{existing[0]} already exists; pass --overwrite to replace the reports in {out_dir}")
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise usage_error("the plots need matplotlib (pip install matplotlib), or pass --no-plots") from None
    from .. import artifact
    from ..detector import FakeSpotter

    try:
        det = FakeSpotter.load(args.model)
    except artifact.ModelFileError as e:
        raise usage_error(f"model refused: {e}") from None
    det.batch_size = args.batch_size
    det.aligned = bool(args.aligned)
    if args.upsample is not None:
        det.upsample = args.upsample
    paths: List[Path] = []
    labels: List[int] = []
    groups: List[str] = []
    for label, sources, names in ((0, real, real_names), (1, fake, fake_names)):
        for (_, ps), name in zip(sources, names):
            paths.extend(ps)
            labels.extend([label] * len(ps))
            groups.extend([name] * len(ps))
    return {"detector": det, "paths": paths, "labels": np.asarray(labels, dtype=np.int64), "groups": groups,
            "out_dir": out_dir, "files": {f.name: f for f in files},
            "sources": {"real": [{"source": d, "name": n, "images": len(ps)} for (d, ps), n in zip(real, real_names)],
                        "fake": [{"source": d, "type": n, "images": len(ps)} for (d, ps), n in zip(fake, fake_names)]}}


def model_info(path: str, det: Any) -> Dict[str, Any]:
    from ..artifact import file_sha256

    return {"path": str(path), "sha256": file_sha256(path), "backbone": det.backbone,
            "operating_threshold": det.operating_threshold_}


def counts(labels: np.ndarray, scores: np.ndarray, faces: np.ndarray) -> Dict[str, Dict[str, int]]:
    """Per class: images, scored, without a face, unreadable."""
    out = {}
    for name, lab in (("real", 0), ("fake", 1)):
        m = labels == lab
        out[name] = {"images": int(m.sum()), "scored": int((m & ~np.isnan(scores)).sum()),
                     "without_face": int((m & (faces == 0)).sum()), "unreadable": int((m & (faces < 0)).sum())}
    return out


def require_both_classes(c: Dict[str, Dict[str, int]], aligned: bool) -> None:
    for name in ("real", "fake"):
        if c[name]["scored"] == 0:
            hint = "" if aligned else " or pass --aligned"
            raise usage_error(f"no {name} image could be scored ({c[name]['without_face']} without a face, "
                              f"{c[name]['unreadable']} unreadable); check the inputs{hint}")


def run(args: argparse.Namespace) -> int:
    plan = check_corpus(args, OUTPUTS)
    from .. import evaluate as ev

    det, paths, labels, groups = plan["detector"], plan["paths"], plan["labels"], plan["groups"]
    progress = Progress(len(paths), "scoring", args.quiet)
    scored = ev.score_images(det, paths, aligned=det.aligned, progress=progress.update)
    progress.close()
    scores, faces = scored.scores["clean"], scored.faces["clean"]
    c = counts(labels, scores, faces)
    require_both_classes(c, det.aligned)
    ok = ~np.isnan(scores)
    s, y, g = scores[ok], labels[ok], [groups[i] for i in np.flatnonzero(ok)]
    op = float(det.operating_threshold_["logit"])
    log(f"metrics with {args.bootstrap} bootstrap resamples ...", args.quiet)
    report = ev.evaluate(s, y, groups=g, threshold=args.threshold, operating_threshold=op,
                         bootstrap=args.bootstrap, seed=args.seed)
    report["model"] = model_info(args.model, det)
    report["sources"] = plan["sources"]
    report["counts"] = c
    report["failures"] = [{"path": p, "error": e} for _, p, e in scored.errors]
    report["images_without_face"] = [str(paths[i]) for i in np.flatnonzero(faces == 0)]
    notes = [f"model {report['model']['path']} (sha256 {report['model']['sha256'][:16]}...), operating threshold "
             f"logit {op:.4g} (target FPR {det.operating_threshold_.get('target_fpr')})",
             f"ACC, precision, recall, F1 at logit {args.threshold:g}; intervals: {args.bootstrap} stratified bootstrap "
             f"resamples, 95% percentile (seed {args.seed})"]
    for name in ("real", "fake"):
        k = c[name]
        notes.append(f"{name}: {k['images']} images, {k['scored']} scored, {k['without_face']} without a face, "
                     f"{k['unreadable']} unreadable (left out)")
    out_dir, files = plan["out_dir"], plan["files"]
    out_dir.mkdir(exist_ok=True)
    ev.write_json(report, files["metrics.json"])
    ev.write_csv(report, files["metrics.csv"])
    ev.write_markdown(report, files["report.md"], title="FakeSpotter evaluation", notes=notes)
    if not args.no_plots:
        curves = {name: (s[m], y[m]) for name, cls, m in ev.group_masks(y, g) if cls != "real"}
        ev.plot_roc(curves, files["roc.png"], title="ROC (fake = positive)")
        ev.plot_det(curves, files["det.png"], title="DET")
    print(ev.to_markdown(report), end="")
    for n in notes[2:]:
        print(n)
    print(f"wrote {', '.join(str(f) for f in files.values())}")
    for f in report["failures"][:10]:
        print(f"  unreadable: {f['path']}: {f['error']}", file=sys.stderr)
    return 1 if report["failures"] else 0

