"""``fakespotter calibrate``: estimate a tap's thresholds (paper Eq. 1: the mean activation of
each monitored layer over the calibration images; or one per neuron) and write them to a
safetensors file. The same images go through the same chip pipeline as training."""

from __future__ import annotations

import argparse

import numpy as np

from .._errors import first_line
from ._common import (Progress, add_model_args, check_batch_size, check_detection_args, check_once,
                      images_of, log, no_chips_error, refuse_inputs_as_output, usage_error, writable_output)


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="estimate per-layer (or per-neuron) thresholds from images",
                       description=__doc__.replace("``", ""))
    p.add_argument("images", nargs="+", metavar="SOURCE",
                   help="folders (recursive), @file lists (relative paths in a list are relative to the list's "
                        "folder) or image files")
    p.add_argument("--out", required=True, help="the thresholds file to write (safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: refuse)")
    add_model_args(p, batch_help="images read per calibration step (its forwards are all of 16 chips, so that the "
                                 "thresholds do not depend on it)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (default: on stderr, a bar on a terminal, else a line a minute)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    paths = images_of(args.images, "calibrate")
    check_once(paths, "the images")  # a repeat would count twice in the means
    check_batch_size(args)
    check_detection_args(args)
    out = writable_output(args.out, args.overwrite, "output")
    refuse_inputs_as_output(out, paths, "output")  # --overwrite would replace an image
    try:
        from ..backbones import get_backbone
        from ..taps import Tap

        tap = Tap(get_backbone(args.backbone), args.layers, granularity=args.granularity)
    except Exception as e:
        raise usage_error(first_line(e)) from None
    from ..calibration import ThresholdCalibrator
    from ..features import chips

    from ..artifact import file_sha256

    calibrator = ThresholdCalibrator(tap, mode=args.threshold_mode)
    progress = Progress(len(paths), "calibrating", args.quiet)
    pending, failures, seen, copies = [], [], set(), 0
    for path in paths:
        try:
            c = chips([str(path)], aligned=args.aligned, size=tap, upsample=args.upsample,
                      weak_face_score=args.weak_face_score, detect_pixels=args.detect_pixels)
            pending.extend(list(c.array))
            digest = file_sha256(path)  # (a copy under another name counts again: said below)
            copies += digest in seen
            seen.add(digest)
        except Exception as e:
            failures.append({"path": str(path), "error": f"{type(e).__name__}: {e}"})
            log(f"unreadable: {path}: {failures[-1]['error']}", args.quiet)
        if len(pending) >= args.batch_size:
            calibrator.partial_fit(np.stack(pending))
            pending = []
        progress.update()
    if pending:
        calibrator.partial_fit(np.stack(pending))
    progress.close()
    if not hasattr(calibrator, "thresholds_"):
        raise no_chips_error("image", len(paths), len(paths) - len(failures), args.aligned, failures)
    try:  # (written to a temporary file, then renamed into place)
        calibrator.thresholds_.save(out, overwrite=args.overwrite)
    except FileExistsError as e:  # made by someone else while this one calibrated
        raise usage_error(f"{e}; the thresholds were not written") from None
    again = f"; {copies} byte-identical copies of other images, each counted again" if copies else ""
    print(f"wrote {out}: {args.threshold_mode} thresholds of {len(tap.layers)} layers from "
          f"{calibrator.n_images_} face chips ({len(failures)} unreadable images{again})")
    return 1 if failures else 0
