"""``fakespotter evaluate``: score labelled images with a model file and write metrics with
bootstrap 95% intervals: metrics.json, metrics.csv, report.md, roc.png and det.png in --out-dir;
the Markdown is printed too.

Images come from --real / --fake folders or from a data set's --manifest (its --split, default
test; manifest chips are aligned, so --aligned is implied). Every image goes through the
detector's pipeline (face detection and alignment, or a plain resize with --aligned) and scores
as its most suspicious face. Images without a face and unreadable images are counted, reported
and left out of the metrics. A row with fewer than 5 real or 5 fake images has no intervals. A
warning says when the manifest split is one the model was trained or validated on, or when
evaluated images have the bytes of images it was trained or validated on (the fingerprints its
file keeps). Rows: all images, then each fake type against all reals, then
(with a manifest) each generator against all reals, then each real source against all fakes
(when there are several). Scores are logits of "fake"; ACC / precision / recall / F1 use
--threshold; ACC@op, TPR@op (fakes caught) and FPR@op (reals flagged) each detector's operating
threshold (the model's stored one). ACC@op and AP mostly follow a row's share of fakes (AP's chance
level is that share): compare rows by AUC, TPR@op and FPR@op.

--baselines trains other detectors on the manifest's train split (validation: its val split,
or a held-out part of train) or on --train-real / --train-fake folders, and reports them side
by side with the model, one row per (detector, group): descriptor-probe (logistic regression on
the backbone's descriptor), spectrum (Durall et al. 2020), mnc-only, and FakeSpotter ablations
fs-channel, fs-element, fs-per-layer, fs-per-neuron (the model's settings with one changed,
trained with the model's own --augment, seed included, when it had one; a model trained with
another augmenter cannot have them); all = the first three plus the ablations that differ from
the model."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import evaluate as ev
from .._atomic import write_atomic
from ..baselines import BASELINES as BASELINE_NAMES, resolve_baselines
from ._common import (Progress, add_class_sources, check_augment_fraction, check_batch_size, check_disjoint,
                      check_listed_bytes, check_once, class_mode, folder_names, has_both_classes, images_of,
                      load_chips, log, manifest_part, model_file, no_chips_error, open_manifest, usage_error,
                      why_not_writable, write_each)

OUTPUTS = ("metrics.json", "metrics.csv", "report.md", "roc.png", "det.png")


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --real / --fake sources or --manifest, baselines, the chip pipeline and output
    options (shared with ``robustness``)."""
    p.add_argument("model", metavar="MODEL",
                   help="a model file written by 'fakespotter train', or 'default' for the embedded default detector")
    add_class_sources(p, default_split="test")
    p.add_argument("--real-source", nargs="+", default=None, metavar="NAME",
                   help="a name for each --real source, in order (default: the folder names; two folders of "
                        "one name must be named here)")
    p.add_argument("--baselines", default=None, metavar="NAME[,NAME...]",
                   help="train these detectors too and report them side by side: "
                        f"{', '.join(BASELINE_NAMES)} or all (default: none)")
    p.add_argument("--train-real", nargs="+", default=None, metavar="DIR",
                   help="real training images of --baselines (and robustness's --train-augment) without a "
                        "manifest (default: none)")
    p.add_argument("--train-fake", nargs="+", default=None, metavar="DIR",
                   help="fake training images of --baselines (and robustness's --train-augment) without a "
                        "manifest (default: none)")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are already-aligned face crops: resize only, no face detection (default: detect; "
                        "always on with --manifest)")
    p.add_argument("--upsample", type=int, default=None,
                   help="face detector upsampling (default: the model's setting)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="chips per backbone forward; images are also decoded this many at a time (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed (>= 0) of the bootstrap, of the training of the baselines and (robustness) of the "
                        "augmented model: their validation hold-out, initialisation and the augmented model's "
                        "augmentation (fs-* ablations repeat the model's own augmentation, seed included); and "
                        "(robustness) of the noise attack (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (default: write them; needs matplotlib)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (default: on stderr, a bar on a terminal, else a line a minute)")


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a model (and baselines) on labelled real and fake images",
                       description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--out-dir", default="evaluation", metavar="DIR",
                   help="folder for the reports, created if missing (not its parent) (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the 95%% intervals; 0 for none (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="logit threshold of ACC, precision, recall and F1 (default: %(default)s, i.e. P(fake) 0.5)")
    p.set_defaults(run=run)


def _count_by(values: Sequence[str]) -> Dict[str, int]:
    return dict(sorted(Counter(values).items()))


def check_corpus(args: argparse.Namespace, outputs: Sequence[str]) -> Dict[str, Any]:
    """Every check that can fail before work starts; loads the model. Returns the plan."""
    mode = class_mode(args)
    digests: Dict[str, str] = {}  # sha256 by path, where a manifest lists them
    augment = bool(getattr(args, "train_augment", False))
    if mode == "folders":
        real = [(d, images_of([d], "--real")) for d in args.real]
        fake = [(d, images_of([d], "--fake")) for d in args.fake]
        if args.fake_type is not None and len(args.fake_type) != len(args.fake):
            raise usage_error(f"--fake-type names {len(args.fake_type)} types for {len(args.fake)} --fake sources")
        if args.real_source is not None and len(args.real_source) != len(args.real):
            raise usage_error(f"--real-source names {len(args.real_source)} sources for {len(args.real)} --real sources")
        check_once([p for _, ps in real for p in ps], "--real", copies=True)  # (a copy would be scored twice)
        check_once([p for _, ps in fake for p in ps], "--fake", copies=True)
        check_disjoint([p for _, ps in real for p in ps], [p for _, ps in fake for p in ps], "both real and fake")
    elif args.real_source is not None:
        raise usage_error("--real-source names --real folders; a manifest names its own sources")
    check_batch_size(args)
    if args.upsample is not None and args.upsample < 0:
        raise usage_error(f"--upsample must be >= 0, got {args.upsample}")
    if getattr(args, "bootstrap", 0) < 0:
        raise usage_error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.seed < 0:
        raise usage_error(f"--seed must be >= 0, got {args.seed}")
    if not math.isfinite(getattr(args, "threshold", 0.0)):
        raise usage_error(f"--threshold must be a finite logit, got {args.threshold}")
    if hasattr(args, "augment_fraction"):  # (robustness)
        check_augment_fraction(args, augment, "--train-augment")
    try:
        names = resolve_baselines(args.baselines)  # names only; 'all' is resolved once the model is loaded
    except ValueError as e:
        raise usage_error(f"--baselines: {e}") from None
    if args.baselines is not None and not names:
        raise usage_error("--baselines names no baseline")
    training = bool(names) or augment
    what = "--baselines" if names else "--train-augment"
    if mode == "manifest" or not training:
        if args.train_real is not None or args.train_fake is not None:
            raise usage_error(("--train-real/--train-fake are the training images of --baselines or --train-augment "
                               "without a manifest" if hasattr(args, "train_augment") else
                               "--train-real/--train-fake are the training images of --baselines without a manifest")
                              if not training else
                              "with --manifest the training images are its train split; drop --train-real/--train-fake")
    elif args.train_real is None or args.train_fake is None:
        raise usage_error(f"{what} without a manifest needs training images: --train-real DIR... and --train-fake DIR...")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise usage_error(f"--out-dir {out_dir} is a file, not a folder")
    if not out_dir.exists() and not out_dir.parent.is_dir():
        raise usage_error(f"--out-dir {out_dir}: folder {out_dir.parent} does not exist")
    where = out_dir if out_dir.exists() else out_dir.parent
    if not os.access(where, os.W_OK | os.X_OK):
        raise usage_error(f"--out-dir {out_dir}: cannot write there{why_not_writable(where)}")
    every = [out_dir / name for name in outputs]
    for f in every:
        if f.exists() and not f.is_file():
            raise usage_error(f"{f} exists and is not a file; it cannot be replaced by a report")
    files = [f for f in every if not (args.no_plots and f.suffix == ".png")]
    existing = [f for f in every if os.path.lexists(f)]  # (a dangling link too: the reports are not written through it)
    if existing and not args.overwrite:
        raise usage_error(f"{existing[0]} already exists; pass --overwrite to replace the reports in {out_dir}")
    stale = [f for f in existing if f not in files]  # old plots that --no-plots would leave beside new reports
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise usage_error("the plots need matplotlib (pip install matplotlib), or pass --no-plots") from None

    train: Optional[Dict[str, Any]] = None
    if mode == "folders":
        fake_names = args.fake_type or folder_names(args.fake, "--fake", "--fake-type")
        real_names = args.real_source or folder_names(args.real, "--real", "--real-source")
        paths: List[Path] = []
        labels: List[int] = []
        groups: List[str] = []
        for label, sources, gnames in ((0, real, real_names), (1, fake, fake_names)):
            for (_, ps), name in zip(sources, gnames):
                paths.extend(ps)
                labels.extend([label] * len(ps))
                groups.extend([name] * len(ps))
        groupings = None
        sources = {"real": [{"source": d, "name": n, "images": len(ps)} for (d, ps), n in zip(real, real_names)],
                   "fake": [{"source": d, "type": n, "images": len(ps)} for (d, ps), n in zip(fake, fake_names)]}
        if training:
            tr, tf = images_of(args.train_real, "--train-real"), images_of(args.train_fake, "--train-fake")
            check_once(tr, "--train-real")
            check_once(tf, "--train-fake")
            check_disjoint(tr, tf, "both real and fake training images")
            check_disjoint(tr + tf, paths, "both training and evaluation images")
            train = {"real": tr, "fake": tf, "real_groups": None, "fake_groups": None, "val": None,
                     "source": {"real": args.train_real, "fake": args.train_fake}}
    else:
        if training and args.split != "test":  # (val picks their thresholds and stops their training)
            raise usage_error(f"{what} trains on the manifest's train split and picks its operating threshold on val; "
                              f"evaluate on --split test")
        manifest = open_manifest(args.manifest, [args.split] + (["train", "val"] if training else []))
        part = manifest_part(manifest, args.split, "evaluation")
        paths = part.paths()
        labels = part.labels()
        digests = {str(part.path(r)): r.sha256 for r in part.rows}
        groups = None
        groupings = [("fake_type", [r.fake_type or "real" for r in part.rows], "fake"),
                     ("generator", [r.generator or "real" for r in part.rows], "fake"),
                     ("source", [r.source for r in part.rows], "real")]
        fakes = [r for r in part.rows if r.is_fake]
        reals = [r for r in part.rows if not r.is_fake]
        from ..manifest import MANIFEST_NAME, file_sha256

        sources = {"manifest": str(manifest.root), "manifest_sha256": file_sha256(manifest.root / MANIFEST_NAME),
                   "split": args.split, "images": len(part),
                   "fake_types": _count_by([r.fake_type for r in fakes]),
                   "generators": _count_by([r.generator for r in fakes]),
                   "real_sources": _count_by([r.source for r in reals])}
        if training:
            tpart = manifest_part(manifest, "train", "training")
            vpart = check_listed_bytes(manifest.select(splits=["val"]), "split 'val' (validation)")
            # the fakes by type, as `train` orders them: an ablation sees the model's chips in its order
            types = {t: i for i, t in enumerate(dict.fromkeys(r.fake_type for r in tpart.rows if r.is_fake))}
            tfakes = sorted((r for r in tpart.rows if r.is_fake), key=lambda r: types[r.fake_type])
            train = {"real": [tpart.path(r) for r in tpart.rows if not r.is_fake],
                     "fake": [tpart.path(r) for r in tfakes],
                     "real_groups": [r.group for r in tpart.rows if not r.is_fake],
                     "fake_groups": [r.group for r in tfakes],
                     "val": ([vpart.path(r) for r in vpart.rows if not r.is_fake],
                             [vpart.path(r) for r in vpart.rows if r.is_fake]) if has_both_classes(vpart) else None,
                     "source": {"manifest": str(manifest.root), "split": "train",
                                "validation_from": "val" if has_both_classes(vpart) else "held out from train by group"}}

    folders = {Path(p).parent for p in paths + ((train["real"] + train["fake"]) if train else [])}
    if out_dir.resolve() in {f.resolve() for f in folders}:  # the plots would be read as images next time
        raise usage_error(f"--out-dir {out_dir} holds input images; write the reports into another folder")

    from .. import artifact
    from ..detector import FakeSpotter
    from ..weights import WeightsError

    args.model = model_file(args.model, "MODEL")
    try:
        det = FakeSpotter.load(args.model)
    except artifact.ModelFileError as e:
        raise usage_error(f"model refused: {e}") from None
    except WeightsError as e:  # the backbone's weights are not fetched (the message says how)
        raise usage_error(str(e)) from None
    det.batch_size = args.batch_size
    det.aligned = bool(args.aligned) or mode == "manifest"
    if args.upsample is not None:
        det.upsample = args.upsample
    names = resolve_baselines(args.baselines, det.get_params())
    if any(n.startswith("fs-") for n in names):
        model_augmenter(det)  # (a usage error now, not after the training chips are decoded)
    if augment:
        a = (det.training_summary_ or {}).get("augmentation") or {}
        from ..perturb import ATTACKS

        if (a.get("type") == "Augmenter" and a.get("fraction") == args.augment_fraction and a.get("seed") == args.seed
                and list(a.get("attacks", ())) == list(ATTACKS)):
            print(f"warning: --train-augment: the model was trained with this augmentation already (fraction "
                  f"{args.augment_fraction:g}, seed {args.seed}); trained on the same images, the "
                  f"{AUGMENTED_NAME} column repeats the model", file=sys.stderr)
    return {"detector": det, "paths": paths, "labels": np.asarray(labels, dtype=np.int64), "groups": groups,
            "groupings": groupings, "out_dir": out_dir, "files": {f.name: f for f in files}, "sources": sources,
            "mode": mode, "baselines": names, "train": train, "stale": stale, "digests": digests}


def remove_stale(plan: Dict[str, Any], quiet: bool) -> None:
    """Delete the old plots of an --overwrite --no-plots run: they were drawn from other data.
    A file of a plot's name that matplotlib did not draw is not ours: it stays."""
    from PIL import Image

    for f in plan["stale"]:
        try:
            with Image.open(f) as im:
                drawn = im.format == "PNG" and "Matplotlib" in str(im.info.get("Software", ""))
        except (OSError, ValueError):
            drawn = False
        if drawn:
            f.unlink(missing_ok=True)
            log(f"removed {f}: an old plot (--no-plots draws none)", quiet)
        else:
            log(f"left {f} as it was: not a plot drawn by matplotlib (--no-plots draws none)", quiet)


MODEL_NAME = "fakespotter"
AUGMENTED_NAME = "fakespotter+augment"


def model_augmenter(det: Any) -> Any:
    """The augmenter the model was trained with, rebuilt from its training summary (the FakeSpotter
    ablations train with it too), or None. One that cannot be rebuilt (a user's own callable)
    is refused: the ablations would differ from the model in two ways."""
    a = (getattr(det, "training_summary_", None) or {}).get("augmentation")
    if not a:
        return None
    if a.get("type") != "Augmenter" or not all(k in a for k in ("fraction", "seed", "attacks")):
        raise usage_error(f"--baselines: the model was trained with augmentation {a.get('type')!r}, which its file "
                          f"does not describe fully: FakeSpotter ablations (fs-*) cannot repeat it; leave them out")
    from ..perturb import Augmenter

    return Augmenter(fraction=a["fraction"], seed=a["seed"], attacks=a["attacks"])


def train_detectors(plan: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """Train the baselines (and, with --train-augment, an augmented copy of the model) on the
    plan's training images. Returns ``{"score": f(chips) -> {name: scores}, "detectors": {name:
    info}, "failures": [...]}``; the model itself is always the first detector."""
    det = plan["detector"]
    info: Dict[str, Dict[str, Any]] = {MODEL_NAME: {"description": "the model under evaluation", "kind": "model",
                                                    "operating_threshold": float(det.operating_threshold_["logit"])}}
    suite = augmented = None
    failures: List[Dict[str, str]] = []
    train = plan["train"]
    if train is not None:
        from ..baselines import DESCRIPTIONS, BaselineSuite

        size = int(det.tap_.preprocessing.size[0])
        chips = {}
        for label in ("real", "fake"):
            before = len(failures)
            x, index, no_face = load_chips(train[label], det, size, f"training {label}", args.quiet, failures)
            if len(x) == 0:
                raise no_chips_error(f"{label} training image", len(train[label]), no_face, det.aligned,
                                     failures[before:])
            g = train[f"{label}_groups"]  # manifest groups; else one per image, of its class
            chips[label] = (x, np.char.add(f"{label}:", index.astype(str)) if g is None
                            else np.asarray(g, dtype=object)[index].astype(str))
        xr, gr = chips["real"]
        xf, gf = chips["fake"]
        validation = None
        if train["val"] is not None:
            vr = load_chips(train["val"][0], det, size, "validation real", args.quiet, failures)[0]
            vf = load_chips(train["val"][1], det, size, "validation fake", args.quiet, failures)[0]
            if len(vr) and len(vf):
                validation = (vr, vf)
        x = np.concatenate([xr, xf])
        y = np.r_[np.zeros(len(xr), np.int64), np.ones(len(xf), np.int64)]
        g = np.r_[gr, gf]  # a manifest group in both classes is one group, as in FakeSpotter.fit
        # the model's settings, its seed too: an ablation differs from the model in its one setting only
        params = {**det.get_params(), "aligned": det.aligned, "batch_size": args.batch_size}
        if plan["baselines"]:
            log(f"training baselines {', '.join(plan['baselines'])} on {len(xr)} real and {len(xf)} fake chips ...",
                args.quiet)
            ablations = any(n.startswith("fs-") for n in plan["baselines"])  # (only they need the model's augmenter)
            suite = BaselineSuite(plan["baselines"], {**params, "augment": model_augmenter(det) if ablations else None},
                                  batch_size=args.batch_size, seed=args.seed)
            val = None if validation is None else (np.concatenate(validation),
                                                   np.r_[np.zeros(len(validation[0]), np.int64), np.ones(len(validation[1]), np.int64)])
            try:
                suite.fit(x, y, groups=g, validation=val)
            except ValueError as e:
                raise usage_error(f"--baselines: {e}") from None
            for name in plan["baselines"]:
                info[name] = {"description": DESCRIPTIONS[name], "kind": "baseline",
                              "operating_threshold": suite.operating_thresholds_[name]["logit"],
                              "trained_on": {**train["source"], **suite.counts_}}
                inner = getattr(suite.baselines_[name], "detector_", None)  # (a FakeSpotter ablation)
                if inner is not None:
                    info[name]["augmentation"] = inner.training_summary_["augmentation"]
        if getattr(args, "train_augment", False):
            from ..detector import FakeSpotter
            from ..perturb import Augmenter

            log(f"training the model's settings with augmentation on {len(xr)} real and {len(xf)} fake chips ...",
                args.quiet)
            augmenter = Augmenter(fraction=args.augment_fraction, seed=args.seed)
            augmented = FakeSpotter(**params)
            try:
                augmented.fit(xr, xf, validation=validation, groups=None if validation else (gr, gf), augment=augmenter)
            except ValueError as e:
                raise usage_error(f"--train-augment: {e}") from None
            summary = augmented.training_summary_["counts"]
            info[AUGMENTED_NAME] = {"description": f"the model's settings retrained with the four attacks on a random "
                                                   f"{args.augment_fraction:g} of the training chips (seed {args.seed})",
                                    "kind": "augmented", "operating_threshold": augmented.operating_threshold_["logit"],
                                    "trained_on": {**train["source"], "train": summary["train"],
                                                   "validation": summary["validation"]},
                                    "augmentation": augmented.training_summary_.get("augmentation")}

    order = [MODEL_NAME] + ([AUGMENTED_NAME] if augmented is not None else []) + list(plan["baselines"])
    info = {k: info[k] for k in order if k in info}

    def score(chips: np.ndarray) -> Dict[str, np.ndarray]:
        out = {MODEL_NAME: det.decision_function(chips).numpy()}
        if augmented is not None:
            out[AUGMENTED_NAME] = augmented.decision_function(chips).numpy()
        if suite is not None:
            out.update(suite.decision_functions(chips))
        return out

    return {"score": score, "detectors": info, "failures": failures}


def side_by_side_markdown(report: Dict[str, Any], columns: Optional[Sequence[str]] = None) -> str:
    """One table per group (its label columns other than ``detector``), a line per detector."""
    labels = [c for c in report["label_columns"] if c != "detector"]
    order: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in report["rows"]:
        order.setdefault(tuple(r[c] for c in labels), []).append(r)
    if columns is None:  # (TPR@op and FPR@op too: ACC@op alone mostly follows a row's share of fakes)
        columns = ev._columns(report["rows"], report["label_columns"])
    parts = []
    for key, rows in order.items():
        d = dict(zip(labels, key))
        if d.get("group") == "all":
            title = "all images"
        elif d.get("class") == "real":
            title = f"{d.get('kind', 'real source')} {d['group']}: its reals against all fakes"
        else:
            title = f"{d.get('kind', 'fake type').replace('_', ' ')} {d['group']}: its fakes against all reals"
        parts.append(f"### {title}\n\n" + ev.to_markdown({"rows": rows, "label_columns": ["detector"]}, columns=columns))
    return "\n".join(parts)


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


def require_both_classes(c: Dict[str, Dict[str, int]], aligned: bool, labels: np.ndarray,
                         errors: Sequence[Tuple[int, str, str]]) -> None:
    """A usage error when a class has no scored image, naming its first unreadable one."""
    for name, lab in (("real", 0), ("fake", 1)):
        if c[name]["scored"] == 0:
            hint = "" if aligned else " or pass --aligned"
            first = next((f"; the first unreadable: {p}: {m}" for i, p, m in errors if labels[i] == lab), "")
            raise usage_error(f"no {name} image could be scored ({c[name]['without_face']} without a face, "
                              f"{c[name]['unreadable']} unreadable{first}); check the inputs{hint}")


def unscored_groups(plan: Dict[str, Any], scored: np.ndarray) -> List[str]:
    """A line per fake type / real source / generator none of whose images was scored: it has
    no row in the report, which would otherwise go unnoticed."""
    groupings = ([("group", plan["groups"])] if plan["groupings"] is None
                 else [(kind.replace("_", " "), g) for kind, g, _ in plan["groupings"]])
    out = []
    for kind, names in groupings:
        total = Counter(names)
        ok = Counter(g for g, s in zip(names, scored) if s)
        out += [f"{kind} {g}: none of its {n} images was scored (no face, or unreadable), so it has no row"
                for g, n in total.items() if ok[g] == 0]
    return out


def baseline_notes(detectors: Dict[str, Any]) -> List[str]:
    """A line per baseline detector trained beside the model: what it is, its training and
    validation chips, and its operating threshold."""
    notes = []
    for name, about in detectors.items():
        if name != MODEL_NAME:
            t = about["trained_on"]
            notes.append(f"{name}: {about['description']}; trained on {t['train']['real']} real and "
                         f"{t['train']['fake']} fake chips, its operating threshold (the @op metrics) at logit "
                         f"{about['operating_threshold']:.4g} "
                         f"(picked on {t['validation']['real']} + {t['validation']['fake']} validation chips)")
    return notes


def intervals_note(n: int, seed: int) -> str:
    if n == 0:
        return "no intervals (--bootstrap 0)"
    return (f"intervals: {n} stratified bootstrap resamples, 95% percentile (seed {seed}); none for a row with "
            f"fewer than {ev.MIN_CLASS_FOR_CI} real or fake images (resampling so few says nothing of how such "
            f"images vary)")


def bootstrap_caveat(n: int) -> List[str]:
    if 0 < n < 200:
        return [f"the intervals come from only {n} bootstrap resamples: rough (1000 or more for reporting)"]
    return []


def no_face_caveat(c: Dict[str, Dict[str, int]]) -> List[str]:
    """A line when images are left out of the metrics for having no face the detector finds: a
    fake left out is neither caught nor missed, which comparisons of detectors must know."""
    parts = [f"{k['without_face']} of {k['images']} {name}" for name, k in c.items() if k["without_face"]]
    if not parts:
        return []
    return [f"{' and '.join(parts)} images have no face the detector finds: they are left out of the metrics"]


def seen_in_training(plan: Dict[str, Any], det: Any) -> List[str]:
    """A line when the evaluated split of a manifest is one the model was trained or validated
    on, as its file records (the manifest's sha256); for another split of that manifest none;
    else a line when evaluated images are files it was trained or validated on (its
    ``training_images_``), or, for the default detector, which records none, that this cannot be
    checked: such metrics measure fit, not detection."""
    own = _own_manifest(plan, det)
    if own is None:
        return _images_seen(plan, det)
    split = plan["sources"]["split"]
    if split not in own:
        return []
    why = ("its classifier learnt these images" if own[split] == "trained"
           else "its early stopping and operating threshold were chosen on these images")
    unseen = [s for s in ("test", "val", "train") if s not in own]
    return [f"the model was {own[split]} on split {split!r} of this manifest ({why}): these metrics are optimistic; "
            f"evaluate on a split it has not seen ({' or '.join(unseen)})"]


def _images_seen(plan: Dict[str, Any], det: Any) -> List[str]:
    seen = getattr(det, "training_images_", None)
    if seen is None or len(seen) == 0:
        sources = (getattr(det, "training_summary_", None) or {}).get("sources") or {}
        if not sources.get("manifest_sha256"):  # (a model that opted out, or fit on arrays)
            return []
        return ["the embedded default detector records no fingerprints of its training images, so whether these "
                "images were among them cannot be checked: it learnt the train and val splits of the sample data "
                "(fakespotter data build; a smaller build shares them), so evaluate it on a test split or on "
                "other images"]
    from ..artifact import file_digests, fingerprint

    labels = plan["labels"]
    digests = file_digests(plan["paths"], plan["digests"])  # (a manifest's listed files count, read or not)
    read = [i for i, p in enumerate(plan["paths"]) if str(p) in digests]
    mine = np.asarray([fingerprint(digests[str(plan["paths"][i])]) for i in read], np.int64)
    hits = np.bincount(labels[read][np.isin(mine, seen.numpy())], minlength=2)
    if not hits.sum():
        return []
    return [f"{hits.sum()} of the {len(labels)} evaluated images ({hits[0]} real, {hits[1]} fake) are files the "
            f"model was trained or validated on (the same bytes): these metrics are optimistic; evaluate on images "
            f"it has not seen"]


def _own_manifest(plan: Dict[str, Any], det: Any) -> Optional[Dict[str, str]]:
    """The splits of the evaluated manifest that the model was trained or validated on (split ->
    "trained" / "validated"), when its file records this manifest; else None."""
    if plan["mode"] != "manifest":
        return None
    sources = (getattr(det, "training_summary_", None) or {}).get("sources") or {}
    m = sources.get("manifest")
    if isinstance(m, dict) and m.get("sha256"):  # (fakespotter train --manifest)
        sha, used = m["sha256"], {m.get("split"): "trained", **({"val": "validated"} if m.get("validation") == "val"
                                                                 else {})}
    elif sources.get("manifest_sha256"):  # (scripts/train_default.py: train split, validated on val)
        sha, used = sources["manifest_sha256"], {"train": "trained", "val": "validated"}
    else:
        return None
    return used if sha == plan["sources"]["manifest_sha256"] else None


def run(args: argparse.Namespace) -> int:
    from ..detector import describe_operating_threshold

    plan = check_corpus(args, OUTPUTS)
    det, paths, labels = plan["detector"], plan["paths"], plan["labels"]
    trained = train_detectors(plan, args)
    detectors = trained["detectors"]
    progress = Progress(len(paths), "scoring", args.quiet)
    scored = ev.score_images_with(trained["score"], paths, size=int(det.tap_.preprocessing.size[0]),
                                  aligned=det.aligned, upsample=det.upsample,
                                  weak_face_score=det.weak_face_score, detect_pixels=det.detect_pixels,
                                  chunk_size=args.batch_size, progress=progress.update)
    progress.close()
    first = scored[MODEL_NAME]
    faces = first.faces["clean"]
    c = counts(labels, first.scores["clean"], faces)
    require_both_classes(c, det.aligned, labels, first.errors)
    caveats = (seen_in_training(plan, det) + unscored_groups(plan, ~np.isnan(first.scores["clean"]))
               + no_face_caveat(c) + bootstrap_caveat(args.bootstrap))
    for line in caveats:
        print(f"warning: {line}", file=sys.stderr)
    log(f"metrics with {args.bootstrap} bootstrap resamples ...", args.quiet)
    multi = len(detectors) > 1
    rows: List[Dict[str, Any]] = []
    curves: Dict[str, Any] = {}
    settings: Dict[str, Any] = {}
    for name, about in detectors.items():
        scores = scored[name].scores["clean"]
        ok = ~np.isnan(scores)
        s, y = scores[ok], labels[ok]
        kw = dict(threshold=args.threshold, operating_threshold=about["operating_threshold"],
                  bootstrap=args.bootstrap, seed=args.seed)
        if plan["groupings"] is None:
            g = [plan["groups"][i] for i in np.flatnonzero(ok)]
            rep = ev.evaluate(s, y, groups=g, **kw)
            label_columns = ["group", "class"]
        else:
            gs = [(kind, [gr[i] for i in np.flatnonzero(ok)], cls) for kind, gr, cls in plan["groupings"]]
            rep = ev.evaluate_by(s, y, gs, **kw)
            label_columns = rep["label_columns"]
        settings = rep["settings"]
        for r in rep["rows"]:
            rows.append({"detector": name, **r} if multi else r)
        if multi:
            curves[name] = (s, y)
        else:
            gl = plan["groups"] if plan["groupings"] is None else plan["groupings"][0][1]
            gk = [gl[i] for i in np.flatnonzero(ok)]
            curves = {g: (s[m], y[m]) for g, cls, m in ev.group_masks(y, gk) if cls != "real"}
    op = float(det.operating_threshold_["logit"])
    report: Dict[str, Any] = {"label_columns": (["detector"] if multi else []) + label_columns,
                              "settings": {**settings, "operating_threshold": op}, "rows": rows}
    if multi:
        report["settings"]["operating_threshold"] = {n: a["operating_threshold"] for n, a in detectors.items()}
    report["detectors"] = detectors
    report["model"] = model_info(args.model, det)
    report["sources"] = plan["sources"]
    report["counts"] = c
    report["failures"] = [{"path": p, "error": e} for _, p, e in first.errors]
    report["training_failures"] = trained["failures"]
    report["images_without_face"] = [str(paths[i]) for i in np.flatnonzero(faces == 0)]
    notes = [f"model {report['model']['path']} (sha256 {report['model']['sha256'][:16]}...), operating threshold "
             f"{describe_operating_threshold(det.operating_threshold_)}",
             f"ACC, precision, recall, F1 at logit {args.threshold:g}; {intervals_note(args.bootstrap, args.seed)}"]
    if plan["mode"] == "manifest":
        notes.append(f"manifest {plan['sources']['manifest']}, split {plan['sources']['split']} (aligned chips)")
    notes += caveats
    for name in ("real", "fake"):
        k = c[name]
        notes.append(f"{name}: {k['images']} images, {k['scored']} scored, {k['without_face']} without a face, "
                     f"{k['unreadable']} unreadable (left out)")
    notes += baseline_notes(detectors)
    out_dir, files = plan["out_dir"], plan["files"]
    out_dir.mkdir(exist_ok=True)
    remove_stale(plan, args.quiet)
    replace = args.overwrite  # (else a report file made since the start is kept: exit 3, naming it)
    steps = [(files["metrics.json"], lambda: ev.write_json(report, files["metrics.json"], replace=replace)),
             (files["metrics.csv"], lambda: ev.write_csv(report, files["metrics.csv"], replace=replace))]
    if multi:
        text = side_by_side_markdown(report)
        steps.append((files["report.md"], lambda: write_atomic(
            files["report.md"], "# FakeSpotter evaluation, side by side\n\n" + text + "\n"
            + "".join(f"- {n}\n" for n in notes), replace=replace)))
    else:
        text = ev.to_markdown(report)
        steps.append((files["report.md"], lambda: ev.write_markdown(report, files["report.md"], replace=replace,
                                                                     title="FakeSpotter evaluation", notes=notes)))
    if not args.no_plots:
        title = "all images" if multi else "fake = positive"
        steps += [(files["roc.png"], lambda: ev.plot_roc(curves, files["roc.png"], title=f"ROC ({title})",
                                                         replace=replace)),
                  (files["det.png"], lambda: ev.plot_det(curves, files["det.png"], replace=replace,
                                                         title=f"DET ({title})" if multi else "DET"))]
    return write_report_files(steps, "evaluate", report, text)


def write_report_files(steps: List[Tuple[Path, Any]], command: str, report: Dict[str, Any], text: str) -> int:
    """Write evaluate's or robustness's files (:func:`write_each`), then print ``text`` (the
    table) and name the unreadable images: files first, so that a stdout that fails (its reader
    gone, closed, full) loses none. The exit status: 3 when a file could not be written, else 1
    when images were unreadable."""
    rc = write_each(steps, command)
    print(text, end="")
    if rc is None:
        print(f"wrote {', '.join(str(p) for p, _ in steps)}")
    for f in report["failures"][:10]:
        print(f"  unreadable: {f['path']}: {f['error']}", file=sys.stderr)
    for f in report["training_failures"][:10]:
        print(f"  unreadable training image: {f['path']}: {f['error']}", file=sys.stderr)
    return rc or (1 if report["failures"] or report["training_failures"] else 0)
