"""``fakespotter train``: fit a detector on folders of real and fake images and write the model
file plus a JSON training report.

Every image goes through the same pipeline (face detection and 5-point alignment into the
backbone's chips, or a plain resize with --aligned). The validation part is held out by image;
thresholds are calibrated on the training chips of both classes; the operating threshold is
picked on the validation chips at --target-fpr (of the reals), or at --target-tpr (of the
fakes) when given.

With --manifest (a data set from 'fakespotter data build'; its chips are aligned, so --aligned
is implied) the --split (default train) is the training set, held out by group, and the val
split, when it has both classes, is the validation set. --augment applies the four robustness
attacks (JPEG, blur, resize, noise) at random levels to a random --augment-fraction of the
training chips (seeded by --seed; validation chips stay clean).

The model file keeps the fingerprints of the training and validation images that were read
(--no-fingerprints leaves them out) and a time stamp: SOURCE_DATE_EPOCH (seconds since 1970), when
set, makes the same training give the same file, byte for byte.

Exit status: 0; 1 when some images could not be read (they are skipped and named, and the model
is written); 2 for a usage error (nothing written); 3 when the model or the report could not be
written (a full disk: an earlier file under that name stays as it was)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from .._errors import first_line
from ._common import (AUGMENT_FRACTION, TARGET_FPR, add_class_sources, add_model_args, check_augment_fraction,
                      check_batch_size, check_detection_args, check_disjoint, check_listed_bytes, check_once,
                      class_mode, folder_names, has_both_classes, images_of, load_chips, log, manifest_part,
                      no_chips_error, open_manifest, refuse_inputs_as_output, usage_error, writable_output)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a detector on real and fake images", description=__doc__.replace("``", ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_class_sources(p, default_split="train")
    p.add_argument("--val-real", nargs="+", default=None, metavar="DIR",
                   help="explicit validation reals (default: hold out --validation-fraction of the images)")
    p.add_argument("--val-fake", nargs="+", default=None, metavar="DIR",
                   help="explicit validation fakes, with --val-real (default: held out like the reals)")
    p.add_argument("--out", required=True, help="the model file to write")
    p.add_argument("--report", default=None, help="a JSON training report to write (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    add_model_args(p)
    p.add_argument("--classifier", choices=["mlp", "logistic"], default="mlp",
                   help="a shallow network on the activation bits (two hidden layers, --hidden) or logistic "
                        "regression (default: %(default)s)")
    p.add_argument("--hidden", nargs="+", type=int, default=[16, 16], metavar="N",
                   help="hidden layer widths of the shallow network (default: 16 16). Layers after the first "
                        "score each row on its own in float64, so wide ones cost more: ~0.2 s per 200k rows "
                        "for 16 16, ~40 s for 256 256")
    p.add_argument("--target-fpr", type=float, default=None,
                   help=f"false-positive rate of the operating threshold on the validation reals "
                        f"(default: {TARGET_FPR})")
    p.add_argument("--target-tpr", type=float, default=None,
                   help="pick the operating threshold for this true-positive rate on the validation "
                        "fakes instead of --target-fpr, when the validation reals are too uniform to "
                        "stand for the reals the model will meet (default: off)")
    p.add_argument("--validation-fraction", type=float, default=0.25,
                   help="share of images held out when no --val-* is given (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=200, help="training epochs at most (default: %(default)s)")
    p.add_argument("--augment", action="store_true",
                   help="attack a random share of the training chips with JPEG, blur, resize or noise (default: off)")
    p.add_argument("--augment-fraction", type=float, default=None,
                   help=f"share of training chips attacked with --augment (default: {AUGMENT_FRACTION})")
    p.add_argument("--no-fingerprints", action="store_true",
                   help="do not record the training images' fingerprints (the first 64 bits of each file's sha256) "
                        "in the model file; they let evaluate warn of images the model has seen, and let anyone "
                        "holding the model test whether a given file was among them (default: recorded)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the augmentation and the classifier (default: %(default)s)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (default: on stderr, a bar on a terminal, else a line a minute)")
    p.set_defaults(run=run)


def _sources(dirs: List[str], what: str) -> List[Tuple[str, List[Path]]]:
    return [(d, images_of([d], what)) for d in dirs]


def check(args: argparse.Namespace) -> Dict:
    """Every check that can fail before work starts; returns what the work needs."""
    mode = class_mode(args)
    manifest_groups = None
    digests: Dict[str, str] = {}  # sha256 by path, as a manifest lists them
    if mode == "folders":
        real = _sources(args.real, "--real")
        fake = _sources(args.fake, "--fake")
        if args.fake_type is not None and len(args.fake_type) != len(args.fake):
            raise usage_error(f"--fake-type names {len(args.fake_type)} types for {len(args.fake)} --fake sources")
        types = args.fake_type or folder_names(args.fake, "--fake", "--fake-type")
    else:
        if args.val_real is not None or args.val_fake is not None:
            raise usage_error("with --manifest the validation images are its val split; drop --val-real/--val-fake")
        manifest = open_manifest(args.manifest, [args.split, "val"])
        part = manifest_part(manifest, args.split, "training")
        by_type: Dict[str, List[Path]] = {}
        for r in part.rows:
            if r.is_fake:
                by_type.setdefault(r.fake_type, []).append(part.path(r))
        real = [(f"{args.manifest}:{args.split}:real", [part.path(r) for r in part.rows if not r.is_fake])]
        fake = [(f"{args.manifest}:{args.split}:{t}", ps) for t, ps in by_type.items()]
        types = list(by_type)
        manifest_groups = ([r.group for r in part.rows if not r.is_fake],  # in the order of real / fake paths
                           [r.group for t in types for r in part.rows if r.is_fake and r.fake_type == t])
        vpart = manifest.select(splits=["val"] if args.split != "val" else [])
        check_listed_bytes(vpart, "split 'val' (validation)")
        digests = {str(m.path(r)): r.sha256 for m in (part, vpart) for r in m.rows}
        args.aligned = True
    check_augment_fraction(args, args.augment, "--augment")
    if (args.val_real is None) != (args.val_fake is None):
        raise usage_error("give both --val-real and --val-fake, or neither")
    check_once([p for _, ps in real for p in ps], "the real images")
    check_once([p for _, ps in fake for p in ps], "the fake images")
    check_disjoint([p for _, ps in real for p in ps], [p for _, ps in fake for p in ps], "both real and fake")
    if args.target_fpr is not None and args.target_tpr is not None:
        raise usage_error("give --target-fpr or --target-tpr, not both: the operating threshold is picked by one")
    if args.target_fpr is None:
        args.target_fpr = TARGET_FPR
    if not 0 < args.target_fpr < 1:
        raise usage_error(f"--target-fpr must be in (0, 1), got {args.target_fpr}")
    if args.target_tpr is not None and not 0 < args.target_tpr <= 1:
        raise usage_error(f"--target-tpr must be in (0, 1], got {args.target_tpr}")
    if not 0 < args.validation_fraction < 1:
        raise usage_error(f"--validation-fraction must be in (0, 1), got {args.validation_fraction}")
    if args.seed < 0:
        raise usage_error(f"--seed must be >= 0, got {args.seed}")
    if any(h < 1 for h in args.hidden):
        raise usage_error(f"--hidden widths must be >= 1, got {' '.join(map(str, args.hidden))}")
    check_batch_size(args)
    if args.epochs < 1:
        raise usage_error(f"--epochs must be positive, got {args.epochs}")
    check_detection_args(args)
    out = writable_output(args.out, args.overwrite, "output model", regular_only=True)
    report = writable_output(args.report, args.overwrite, "report", regular_only=True)
    if report is not None and report.resolve() == out.resolve():
        raise usage_error("--report and --out name the same file")
    val = None
    if args.val_real is not None:
        val = (images_of(args.val_real, "--val-real"), images_of(args.val_fake, "--val-fake"))
        check_once(val[0], "--val-real")
        check_once(val[1], "--val-fake")
        check_disjoint(val[0], val[1], "both validation real and validation fake")
        check_disjoint([p for _, ps in real + fake for p in ps], val[0] + val[1],
                       "both training and validation images")
    elif mode == "manifest" and has_both_classes(vpart):
        val = ([vpart.path(r) for r in vpart.rows if not r.is_fake], [vpart.path(r) for r in vpart.rows if r.is_fake])
    every_input = [p for _, ps in real + fake for p in ps] + (val[0] + val[1] if val else [])
    manifest_sha256 = None
    if mode == "manifest":
        from ..manifest import MANIFEST_NAME, file_sha256

        every_input.append(manifest.root / MANIFEST_NAME)
        manifest_sha256 = file_sha256(manifest.root / MANIFEST_NAME)  # (evaluate warns of a split seen in training)
    for o, name in ((out, "output model"), (report, "report")):  # --overwrite would replace an input
        refuse_inputs_as_output(o, every_input, name)
    try:
        from ..backbones import get_backbone

        backbone = get_backbone(args.backbone)
        backbone.module  # noqa: B018  (loads and verifies the weights now, not after the chips)
        if args.layers is not None:  # unknown layer names: now, not after decoding every image
            from ..taps import Tap

            Tap(backbone, args.layers, granularity=args.granularity)
    except MemoryError:  # not a usage error: said as one line by the command line's main
        raise
    except Exception as e:  # missing weights, unknown id or layer: say so before any work
        raise usage_error(first_line(e)) from None
    return {"real": real, "fake": fake, "types": types, "val": val, "out": out, "report": report,
            "size": int(backbone.input_shape[1]), "groups": manifest_groups, "mode": mode,
            "manifest_sha256": manifest_sha256, "digests": digests}


def extract(paths: List[Path], label: str, args, size: int, failures: List[Dict]) -> Tuple[np.ndarray, np.ndarray, int]:
    """Chips of every face of every image, with the image index of each; unreadable images are
    recorded in ``failures`` and skipped."""
    return load_chips(paths, args, size, label, args.quiet, failures)


def _content_groups(paths: List[Path], label: str, quiet: bool, digests: Dict[str, str]) -> np.ndarray:
    """A group id per image: byte-identical copies share their first one's, so the hold-out
    never puts an image in training and its copy in validation (which would flatter the
    validation AUC and the operating threshold picked on it)."""
    first: Dict[str, int] = {}
    ids = [first.setdefault(digests[str(p)], i) if str(p) in digests else i for i, p in enumerate(paths)]
    copies = len(paths) - len(set(ids))
    if copies:
        log(f"train: {copies} {label} images are byte-identical copies of others; each stays on the side of the "
            f"validation split its original is on", quiet)
    return np.asarray(ids, dtype=np.int64)


def run(args: argparse.Namespace) -> int:
    plan = check(args)
    from ..artifact import file_digests, file_sha256, image_fingerprints
    from ..detector import FakeSpotter, describe_operating_threshold

    failures: List[Dict] = []
    real_paths = [p for _, ps in plan["real"] for p in ps]
    fake_paths = [p for _, ps in plan["fake"] for p in ps]
    validation = val_missing = None
    if plan["val"] is not None:  # first: an unusable validation set is said before the training images' work
        (vr, _, vr_missing), (vf, _, vf_missing) = (
            extract(paths, f"validation {label}", args, plan["size"], failures)
            for paths, label in zip(plan["val"], ("real", "fake")))
        for label, x, paths, missing in (("real", vr, plan["val"][0], vr_missing),
                                         ("fake", vf, plan["val"][1], vf_missing)):
            if len(x) == 0:
                what = f"--val-{label} image" if plan["mode"] == "folders" else f"{label} image of the manifest's val split"
                raise no_chips_error(what, len(paths), missing, args.aligned,
                                     [f for f in failures if f["path"] in {str(p) for p in paths}])
        validation, val_missing = (vr, vf), {"real": vr_missing, "fake": vf_missing}
    xr, gr, nr_missing = extract(real_paths, "real", args, plan["size"], failures)
    xf, gf, nf_missing = extract(fake_paths, "fake", args, plan["size"], failures)
    for label, x, n, missing in (("real", xr, len(real_paths), nr_missing), ("fake", xf, len(fake_paths), nf_missing)):
        if len(x) == 0:
            paths = {str(p) for p in (real_paths if label == "real" else fake_paths)}
            raise no_chips_error(f"{label} image", n, missing, args.aligned,
                                 [f for f in failures if f["path"] in paths])
    sources = {
        "real": [{"source": d, "images": len(ps)} for d, ps in plan["real"]],
        "fake": [{"source": d, "type": t, "images": len(ps)} for (d, ps), t in zip(plan["fake"], plan["types"])],
        "images_without_faces": {"real": nr_missing, "fake": nf_missing},
        "unreadable_images": len(failures),
    }
    if validation is not None:
        sources["validation"] = {
            "real": args.val_real if plan["mode"] == "folders" else f"{args.manifest}:val:real",
            "fake": args.val_fake if plan["mode"] == "folders" else f"{args.manifest}:val:fake",
            "images": {"real": len(plan["val"][0]), "fake": len(plan["val"][1])},
            "images_without_faces": val_missing}
    det = FakeSpotter(backbone=args.backbone, layers=args.layers, granularity=args.granularity,
                      threshold_mode=args.threshold_mode, classifier=args.classifier, hidden=tuple(args.hidden),
                      target_fpr=args.target_fpr, target_tpr=args.target_tpr, validation_fraction=args.validation_fraction,
                      max_epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                      aligned=False, upsample=args.upsample, weak_face_score=args.weak_face_score,
                      detect_pixels=args.detect_pixels)
    # aligned=False: the model detects faces in the images it is given later, as scan does, whatever
    # its training inputs were (a photo resized as a chip scores as nonsense); those are recorded here
    sources["inputs"] = "aligned chips, resized" if args.aligned else "faces detected and aligned"
    val_paths = plan["val"][0] + plan["val"][1] if plan["val"] is not None else []
    digests = file_digests(real_paths + fake_paths + val_paths, plan["digests"])  # (unreadable: no chip either)
    if plan["groups"] is None:  # one group per image, of its class (real image 7 and fake image 7 are unrelated)
        cr = _content_groups(real_paths, "real", args.quiet, digests)
        cf = _content_groups(fake_paths, "fake", args.quiet, digests)
        gr, gf = np.char.add("real:", cr[gr].astype(str)), np.char.add("fake:", cf[gf].astype(str))
    else:  # manifest groups (identity / source): one id in both classes is one group (a real and its fakes)
        gr = np.asarray(plan["groups"][0], dtype=object)[gr].astype(str)
        gf = np.asarray(plan["groups"][1], dtype=object)[gf].astype(str)
        sources["manifest"] = {"path": str(args.manifest), "sha256": plan["manifest_sha256"], "split": args.split,
                               "validation": "val" if validation is not None else "held out from the split by group"}
    augment = None
    if args.augment:
        from ..perturb import Augmenter

        augment = Augmenter(fraction=args.augment_fraction, seed=args.seed)
    log(f"training on {len(xr)} real and {len(xf)} fake chips{' (augmented)' if augment else ''} ...", args.quiet)
    try:
        det.fit(xr, xf, validation=validation, sources=sources, groups=None if validation else (gr, gf),
                augment=augment)
    except ValueError as e:  # (in the API's words: validation= is --val-real / --val-fake here)
        raise usage_error(str(e).replace("(validation=)", "(--val-real and --val-fake)")
                          .replace("validation_fraction", "--validation-fraction")) from None
    # fit saw chips; these are the images they came from (evaluate warns when it scores one of them)
    unread = {f["path"] for f in failures}  # (undecodable: the model never saw them)
    det.training_images_ = None if args.no_fingerprints else image_fingerprints(
        [p for p in real_paths + fake_paths + val_paths if str(p) not in unread], digests)
    counts = det.training_summary_["counts"]
    counts["images"] = {"real": len(real_paths), "fake": len(fake_paths)}
    counts["images_without_faces"] = {"real": nr_missing, "fake": nf_missing}
    try:
        det.save(plan["out"], overwrite=args.overwrite)
    except FileExistsError as e:  # made by someone else while this one trained
        raise usage_error(f"{e}; the trained model was not written") from None
    summary = det.training_summary_
    report = {
        "model": str(plan["out"]),
        "model_sha256": file_sha256(plan["out"]),
        "parameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in det.get_params().items()},
        "operating_threshold": det.operating_threshold_,
        "training": summary,
        "failures": failures,
    }
    m = summary["metrics"]
    op = det.operating_threshold_
    wrote = (f"wrote {plan['out']}: validation AUC {m['validation_auc']:.3f}; operating threshold "
             f"{describe_operating_threshold(op)}; {len(failures)} unreadable images")
    n_val = summary["counts"]["validation"]["real"]
    if op.get("target_tpr") is None and n_val * op["target_fpr"] < 1:  # (one false positive is more than it)
        wrote += (f"\nwarning: an FPR of {op['target_fpr']:g} cannot be measured on {n_val} validation reals (it takes "
                  f"{math.ceil(1 / op['target_fpr'])}): the threshold lets none of them through; give more validation "
                  f"reals, or pick it with --target-tpr")
    if plan["report"] is not None:
        from .._atomic import write_atomic

        try:
            write_atomic(plan["report"], json.dumps(report, indent=2) + "\n", replace=args.overwrite)
        except OSError as e:  # the model is written: say so, and that a report there is an older one
            older = (" (the file there is an earlier report, not this model's)"
                     if Path(plan["report"]).exists() and not isinstance(e, FileExistsError) else "")
            _said(wrote, failures)
            print(f"fakespotter train: error: cannot write the report {plan['report']}: {e.strerror or e}{older}",
                  file=sys.stderr)
            return 3
    _said(wrote, failures)
    return 1 if failures else 0


def _said(wrote: str, failures: List[Dict]) -> None:
    line, _, warning = wrote.partition("\n")
    print(line)
    for f in failures[:10]:
        print(f"  unreadable: {f['path']}: {f['error']}", file=sys.stderr)
    if warning:
        print(warning, file=sys.stderr)
