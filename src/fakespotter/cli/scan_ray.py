"""``fakespotter scan --engine ray``: the scan's Ray options, their checks and the run (a thin
shell over ``fakespotter.scan_ray``); the output is a folder of shards that ``fakespotter merge``
turns into the ordinary single-file output."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict

from .._errors import first_line
from ._common import (Progress, check_batch_size, check_detection_args, log, usage_error,
                      why_not_writable)

# Options of --engine ray only; their None defaults mean "not given" (then ray_scan's defaults apply).
_RAY_ONLY = ("address", "actors", "cpus_per_actor", "gpus_per_actor", "actor_batch", "decode_cpus", "shard_size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: processes on this machine; ray: a Ray cluster (needs pip install "
                        "'fakespotter[ray]'; --out is then a folder of record shards, see 'fakespotter merge') "
                        "(default: %(default)s)")
    g = p.add_argument_group("ray engine (--engine ray)")
    g.add_argument("--address", default=None,
                   help="Ray cluster address, e.g. ray://head:10001 or head:6379 (default: RAY_ADDRESS, else a "
                        "cluster already running on this machine, else a new local Ray instance)")
    g.add_argument("--actors", type=int, default=None,
                   help="scoring actors, each loads the model once (default: one per GPU, as many as leave "
                        "--decode-cpus for decoding; without GPUs half the cluster's CPUs, the other half decodes)")
    g.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs per actor, also its torch threads (default: 1)")
    g.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per actor; > 0 runs the backbone on cuda (default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--actor-batch", type=int, default=None,
                   help="images per actor call, scored in forwards of --batch-size chips (default: --batch-size)")
    g.add_argument("--decode-cpus", type=float, default=None,
                   help="CPUs per read/decode/face-detection task (default: 1)")
    g.add_argument("--shard-size", type=int, default=None,
                   help="records per output shard; a shard is also written with the first records that come "
                        "60 s or more after the last one (default: 1000)")


def refuse_ray_only(args: argparse.Namespace) -> None:
    """With the local engine, a Ray option is a mistake: say so rather than ignore it."""
    for dest in _RAY_ONLY:
        if getattr(args, dest) is not None:
            raise usage_error(f"--{dest.replace('_', '-')} is an option of --engine ray")


def check(args: argparse.Namespace) -> Dict[str, Any]:
    """Every check of a Ray scan that can fail before work starts."""
    from ..scan_ray import INSTALL_HINT, RayNotInstalled, import_ray
    from .scan import check_faces, check_file_timeout, check_inputs, load_detector

    try:
        import_ray()
    except RayNotInstalled:
        raise usage_error(f"--engine ray needs Ray, which is not installed here; install it with: {INSTALL_HINT}"
                          ) from None
    if args.out in (None, "-"):
        raise usage_error("--engine ray writes a folder of shards: give it with --out FOLDER (then "
                          "'fakespotter merge FOLDER FILE' writes one file)")
    if args.format == "csv":
        raise usage_error("--engine ray writes JSONL shards; --format csv is for the merged file "
                          "('fakespotter merge FOLDER FILE --format csv')")
    if args.format not in (None, "jsonl"):
        raise usage_error(f"--engine ray writes JSONL shards, and 'fakespotter merge FOLDER FILE' writes JSON lines "
                          f"or CSV; --format {args.format} is for the local engine")
    suffix = args.out.lower().rsplit(".", 1)[-1]  # "x.csv/" names a folder: fine
    if suffix in ("csv", "parquet") and not os.path.isdir(args.out):  # a folder of JSONL shards, by that name?
        raise usage_error(f"--engine ray writes a folder of JSONL shards, but --out {args.out} names a .{suffix} "
                          f"file; give a folder name (then 'fakespotter merge FOLDER FILE' writes one file)")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise usage_error(f"--out {out}: folder {out.parent} does not exist")
    where = out if out.is_dir() else out.parent
    if not os.access(where, os.W_OK | os.X_OK):
        raise usage_error(f"--out {out} is not writable{why_not_writable(where)}")
    local_only = (("--workers", args.workers is not None, "Ray schedules the decode tasks (--decode-cpus)"),
                  ("--fail-fast", args.fail_fast, "Ray runs batches out of order"),
                  ("--device", args.device != "cpu", "actors run on cuda when they get GPUs (--gpus-per-actor)"),
                  ("--channels-last", args.channels_last, "Ray actors run the default float32 forward"),
                  ("--autocast", args.autocast, "Ray actors run the default float32 forward"),
                  ("--compile", args.compile, "Ray actors run the default eager forward"),
                  ("--part-rows", args.part_rows is not None, "it sizes Parquet part files; see --shard-size"))
    for flag, given, why in local_only:
        if given:
            raise usage_error(f"{flag} is an option of --engine local ({why})")
    check_batch_size(args)
    for name, lo in (("pixel_limit", 1), ("actors", 1), ("actor_batch", 1),
                     ("shard_size", 1)):
        v = getattr(args, name)
        if v is not None and v < lo:
            raise usage_error(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    from ..scan_ray import RAY_MIN_RESOURCE

    for name in ("cpus_per_actor", "decode_cpus"):
        v = getattr(args, name)
        if v is not None and not RAY_MIN_RESOURCE <= v < math.inf:
            raise usage_error(f"--{name.replace('_', '-')} must be a finite number >= {RAY_MIN_RESOURCE} (Ray's "
                              f"resolution), got {v}")
    v = args.gpus_per_actor
    if v is not None and (not 0 <= v < math.inf or 0 < v < RAY_MIN_RESOURCE):
        raise usage_error(f"--gpus-per-actor must be 0 or a finite number >= {RAY_MIN_RESOURCE}, got {v}")
    check_detection_args(args)
    check_file_timeout(args)
    check_inputs(args)
    check_faces(args)
    load_detector(args)
    return {"mode": "resume" if args.resume else "overwrite" if args.overwrite else "new"}


def run_ray(args: argparse.Namespace) -> int:
    plan = check(args)
    from ..scan_ray import ShardsError, ray_scan
    from .scan import piped_listing, summary

    progress = Progress(None, "scan", args.quiet)
    kw = {k: getattr(args, k) for k in _RAY_ONLY if getattr(args, k) is not None}
    try:
        stats = ray_scan(args.paths, args.model, args.out, aligned=args.aligned, batch_size=args.batch_size,
                         mode=plan["mode"], pixel_limit=args.pixel_limit, limit=args.limit, upsample=args.upsample,
                         weak_face_score=args.weak_face_score, detect_pixels=args.detect_pixels,
                         file_timeout=args.file_timeout, stdin=piped_listing(args, reread=False),
                         progress=progress.update, ray_logs=not args.quiet, log=lambda m: log(m, args.quiet), **kw)
    except (ShardsError, ValueError) as e:  # raised before any work (see ray_scan)
        raise usage_error(str(e)) from None
    except RuntimeError as e:  # the cluster failed the scan: say so in one line, keep what was written
        kept = (f"\nthe records written so far are in {args.out}; --resume continues from them"
                if any(Path(args.out).glob("part-*")) else "")
        print(f"fakespotter scan: error: {first_line(e)}{kept}", file=sys.stderr)
        return 1
    except OSError as e:  # a shard or the stats could not be written here (a full disk)
        from . import _WRITE_ERRNOS

        if e.errno not in _WRITE_ERRNOS:
            raise
        kept = ("the shards written before stay; free space (or raise the file size limit) and rerun with --resume"
                if any(Path(args.out).glob("part-*")) else "no record was written")
        print(f"fakespotter scan: error: cannot write {e.filename or args.out}: {e.strerror or e}: {kept}",
              file=sys.stderr)
        return 3
    finally:
        progress.close()
    if not args.quiet:
        print(summary(stats, stats["resumed_records"], args.model), file=sys.stderr)
        log(f"records: {args.out}/part-*.jsonl; one file in input order: fakespotter merge {args.out} FILE")
    return 1 if stats["counts"]["error"] + stats["resumed_errors"] else 0
