"""``fakespotter scan PATH... [--model MODEL]``: score every image of a corpus, one record per
image (JSON lines or CSV, written and synced as each batch finishes; or Parquet, a folder of
part files, each synced as it is closed).

Inputs are image files, folders (recursive), @file lists, - (a list on stdin) and tar archives.
Every input gets a record: status ok (with the score of its most suspicious face and a label),
no_face, or error (with an error kind: empty_file, truncated, not_an_image, too_many_pixels,
permission_denied, not_found, decode_error, ...); an unreadable file never gets a score.
--resume continues an interrupted scan of the same inputs into the same output: the output
then holds exactly one complete record per input (Parquet: a killed scan redoes the records of
its unfinished part file, at most --part-rows). A stats JSON (counts, images/s, time split, the
settings that decide the scores) is written next to the output as OUT.stats.json.

Scores are reproducible for a given batch size, precision and device. --autocast computes the
backbone in bfloat16 (CPU) or float16 (CUDA): scores then differ slightly from a float32 scan, and
--resume refuses to mix the two. When a forward runs out of memory, the batch size halves and the
same chips are retried (no record is lost or doubled); the smaller size stays for the rest of the
run and for a resume of it, and the stats JSON records it.

Exit codes: 0 every input scanned, 1 some inputs are error records, 2 usage error, 3 the output
could not be written (disk full, ...; --resume continues)."""

from __future__ import annotations

import argparse
import copy
import errno
import itertools
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Dict, Optional

from .._errors import first_line
from ._common import (Progress, add_detection_args, check_batch_size, check_detection_args, detection_from_model,
                      log, model_file, record_stdout, usage_error, why_not_writable, writable_output)


def add_parser(sub) -> None:
    from ..data import DEFAULT_PIXEL_LIMIT
    from ..scan import FILE_TIMEOUT_S, STUCK_GRACE_S, default_workers

    p = sub.add_parser("scan", help="scan images, folders, file lists and tar archives for synthesized faces",
                       description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, folders (recursive), @list.txt file lists (relative paths in a list are relative "
                        "to the list's folder), - (a list on stdin, relative to the working folder), tar archives")
    p.add_argument("--model", default="default",
                   help="a model file written by 'fakespotter train' (default: %(default)s, the embedded "
                        "default detector: a reference model whose real faces are mostly one source's; "
                        "see the README's model card for its limits)")
    p.add_argument("--out", default=None,
                   help="output file (a folder for --format parquet); - or none: stdout (default: stdout)")
    p.add_argument("--format", choices=["jsonl", "csv", "parquet"], default=None,
                   help="output format; parquet (needs pyarrow) writes --out as a folder of part files "
                        "(default: csv when --out ends with .csv, parquet when it ends with .parquet, else jsonl)")
    p.add_argument("--part-rows", type=int, default=None,
                   help="parquet: records per part file; a killed scan redoes at most one part "
                        f"(default: {PART_ROWS}, or a part per {PART_SECONDS:.0f} s, whichever comes first; local engine)")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are already-aligned face chips: resize only, no face detection (default: detect)")
    add_detection_args(p, from_model=True)
    p.add_argument("--batch-size", type=int, default=64,
                   help="chips per backbone forward, halved when a forward runs out of memory; scores are "
                        "reproducible for a given batch size (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode and face-detection processes, 0 to decode inline (default: the usable CPUs, "
                        f"from 1 to 8; here {default_workers()}; more than the usable CPUs gets a warning; local engine only)")
    p.add_argument("--device", default="cpu",
                   help="where the backbone runs, e.g. cpu, cuda, cuda:1 (default: %(default)s; local engine: Ray "
                        "actors use their GPU when they get one)")
    p.add_argument("--channels-last", action="store_true",
                   help="run every conv in channels_last memory format (conv weights too; the input is "
                        "channels_last already); measured no faster on CPU (default: off; local engine)")
    p.add_argument("--autocast", action="store_true",
                   help="run the backbone under torch.autocast: bfloat16 on CPU, float16 on CUDA; scores "
                        "differ slightly from float32 (default: off, float32; bfloat16 is slower on CPUs "
                        "without native bfloat16; local engine)")
    p.add_argument("--compile", action="store_true",
                   help="run the backbone through torch.compile (compiled once at the start, about a minute on 2 "
                        "CPUs; needs a C++ compiler on a CPU): the forward ran 1.1-1.2x as fast on the 2-CPU machine measured; "
                        "scores may differ from an eager scan in rare near-threshold bits (default: off; local "
                        "engine)")
    p.add_argument("--pixel-limit", type=int, default=DEFAULT_PIXEL_LIMIT,
                   help="refuse images with more pixels than this before decoding (and a tiled TIFF whose tiles, which "
                        "libtiff decodes whole, hold more, where they hold over twice the image) (default: "
                        "%(default)s, Pillow's)")
    p.add_argument("--file-timeout", type=float, default=FILE_TIMEOUT_S, metavar="SECONDS",
                   help="give up on a file that takes longer to read, decode and detect faces in: a 'timeout' "
                        f"error record, and the scan goes on; a worker still busy {STUCK_GRACE_S:g} s past the limits "
                        f"of the files it was given (up to 4 at a time; stuck in a native call) is stopped and "
                        f"replaced, and the files are retried one per task under the same rule (default: "
                        f"%(default)g; 0: no limit)")
    p.add_argument("--limit", type=int, default=None, help="scan only the first N inputs (default: all)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted scan into the existing --out (default: refuse an existing --out)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, emptied as the scan starts (--engine ray: the scan's own "
                        "files in the folder are deleted, once the cluster is reached) (default: refuse)")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop once the batch that holds the first error record is written (default: go on; "
                        "local engine)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress and no summary, and with --engine ray none of Ray's notices, only its errors "
                        "(default: all on stderr; progress is a bar on a terminal, else a line a minute)")
    from .scan_ray import add_arguments

    add_arguments(p)
    p.set_defaults(run=run)


def check_file_timeout(args: argparse.Namespace) -> None:
    from ..scan import check_file_timeout as check

    try:
        check(args.file_timeout, "scan")
    except ValueError as e:
        raise usage_error(str(e).replace("scan: file_timeout", "--file-timeout")) from None


PART_ROWS = 10_000
PART_SECONDS = 60.0


def check(args: argparse.Namespace) -> Dict[str, Any]:
    """Every check that can fail before work starts; returns what the work needs."""
    from ..scan import default_workers, usable_cpus

    if args.workers is None:
        args.workers = default_workers()
    check_batch_size(args)
    for name, lo in (("workers", 0), ("pixel_limit", 1)):
        if getattr(args, name) < lo:
            raise usage_error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    check_detection_args(args)
    check_file_timeout(args)
    check_inputs(args)
    to_stdout = args.out in (None, "-")
    suffix = "" if to_stdout else args.out.lower().rstrip("/")
    fmt = args.format or ("csv" if suffix.endswith(".csv") else "parquet" if suffix.endswith(".parquet") else "jsonl")
    if args.part_rows is not None and fmt != "parquet":
        raise usage_error(f"--part-rows applies to --format parquet, not {fmt}")
    if args.part_rows is not None and args.part_rows < 1:
        raise usage_error(f"--part-rows must be >= 1, got {args.part_rows}")
    if fmt == "parquet":
        from ..scan import PARQUET_INSTALL

        try:
            import pyarrow  # noqa: F401
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise usage_error(f"--format parquet needs pyarrow, which is not installed: {PARQUET_INSTALL}") from None
        if to_stdout:
            raise usage_error("--format parquet writes a folder of part files; give it with --out, not stdout")
    out: Optional[Path] = None
    mode = "new"
    if to_stdout:
        if args.resume:
            raise usage_error("--resume needs an output file (--out), not stdout")
    else:
        out = _parquet_output(args) if fmt == "parquet" else writable_output(args.out, True, "output")
        if out.is_char_device():  # (/dev/null, a terminal: no file to resume or replace; a FIFO is written to)
            raise usage_error(f"output {out} is a device, not a file: leave out --out for records on stdout "
                              f"(> /dev/null discards them)")
        if out.exists():
            if args.resume:
                mode = "resume"
            elif args.overwrite:
                mode = "overwrite"
            else:
                raise usage_error(f"output {out} already exists; pass --resume to continue that scan "
                                  f"or --overwrite to replace it")
            from ..scan import OutputBusy, check_not_busy

            try:  # before its records are read for --resume
                check_not_busy(out)
            except OutputBusy as e:
                raise usage_error(str(e)) from None
        _check_stats_file(Path(str(out) + ".stats.json"))  # (--resume and --overwrite replace it too)
        _refuse_input_as_output(args.paths, out)
    check_faces(args)
    cpus = usable_cpus()
    if args.workers > cpus:  # a warning, not a refusal: files on slow storage may still gain
        print(f"fakespotter scan: warning: --workers {args.workers} is more than the {cpus} CPU{'s' * (cpus > 1)} "
              f"this scan may use: the workers share them, each with its own memory, so decoding gets no faster",
              file=sys.stderr)
    return {"out": out, "fmt": fmt, "mode": mode, "detector": load_detector(args, start_workers=args.workers > 0)}


def check_inputs(args: argparse.Namespace) -> None:
    """--limit, --resume vs --overwrite and the input paths (both engines)."""
    from ..data import check_sources

    if args.limit is not None and args.limit < 0:
        raise usage_error(f"--limit must be >= 0, got {args.limit}")
    if args.resume and args.overwrite:
        raise usage_error("--resume and --overwrite contradict each other; give one")
    try:
        check_sources(args.paths, "scan")
    except (FileNotFoundError, ValueError) as e:
        raise usage_error(str(e)) from None


def piped_listing(args: argparse.Namespace, reread: bool) -> Optional[IO[str]]:
    """The listing to read for ``-`` in ``args.paths``, or None without one. A file list that is
    a pipe (``@/dev/stdin``, ``@<(find ...)``) can be read only once, so it stands in for ``-``
    (relative paths from the working folder, as for ``-``); with ``reread`` (a resume reads the
    listing twice) the listing is first copied to a temporary file."""
    from ..data import list_is_image, open_list, stdin_list

    pipes = [p for p in args.paths if p.startswith("@") and not os.path.isfile(p[1:])]
    if len(pipes) + ("-" in args.paths) > 1:
        raise usage_error("read at most one listing from stdin ('-') or a pipe ('@/dev/stdin'); save the "
                          "others to files")
    if pipes:
        source: IO[str] = open_list(pipes[0][1:])
        args.paths = ["-" if p == pipes[0] else p for p in args.paths]
    elif "-" in args.paths:
        try:
            source = stdin_list()
        except ValueError as e:
            raise usage_error(str(e)) from None
    else:
        return None
    first = source.readline()
    fmt = list_is_image(first)
    if fmt is not None:  # (scan - < photo.jpg)
        raise usage_error(f"the list of inputs on standard input (or a pipe) is a {fmt} image, not one path a line; "
                          f"give the image's path instead")
    source = itertools.chain([first], source)  # type: ignore[assignment]
    if not reread:
        return source
    spool = tempfile.SpooledTemporaryFile(max_size=1 << 23, mode="w+", encoding="utf-8", errors="surrogateescape",
                                         newline="\n")
    spool.writelines(source)
    spool.seek(0)
    return spool


def check_faces(args: argparse.Namespace) -> None:
    if not args.aligned:
        try:
            from ..faces import _import_dlib, _landmark_path

            _import_dlib()
            _landmark_path()
        except Exception as e:  # no dlib, no landmark model: say so before any work
            from ..weights import WeightsError

            fix = "" if isinstance(e, WeightsError) else "; install it"  # the message says how to fetch
            raise usage_error(f"face detection is not available ({first_line(e)}){fix}, "
                              f"or pass --aligned for already-aligned chips") from None


def load_detector(args: argparse.Namespace, start_workers: bool = False) -> Any:
    """The --model on --device (``model_sha256()`` is its file's), with the detection settings
    not given filled in from it; usage errors before work. ``start_workers``: once the device
    and the model file are found, start the decode workers' server, whose imports (about a
    second) then overlap the model's load (the server holds stderr until they end: not for a
    command that is about to refuse its arguments)."""
    from ..artifact import ModelFileError
    from ..detector import FakeSpotter
    from ..scan import check_device, start_worker_server

    try:
        check_device(args.device, "--device")
    except ValueError as e:  # "--device: device 'cuda:3': there are only 1 CUDA devices"
        raise usage_error(str(e).split(": ", 1)[1]) from None
    embedded = args.model == "default"
    args.model = model_file(args.model, "--model")
    if start_workers:
        start_worker_server()
    try:
        det = FakeSpotter.load(args.model, device=args.device)
    except (ModelFileError, OSError, ValueError) as e:
        said = first_line(e)
        if not embedded:
            raise usage_error(f"--model {args.model}: {said}") from None
        fix = "; reinstall fakespotter" if isinstance(e, ModelFileError) else ""  # (else: weights to fetch)
        raise usage_error(f"the embedded default detector: {said}{fix}") from None
    detection_from_model(args, det)
    return det


def _refuse_input_as_output(paths, out: Path) -> None:
    """An output that is one of the inputs (the file itself, or an image file in an input folder)
    would be cut before it is read."""
    from ..data import IMAGE_EXTENSIONS

    real = os.path.realpath(out)
    for s in paths:
        if s.startswith("@") and os.path.isfile(s[1:]) and os.path.realpath(s[1:]) == real:
            raise usage_error(f"output {out} is also an input (the file list {s}); give another --out")
        if s == "-" or s.startswith("@") or not os.path.exists(s):
            continue
        folder = os.path.realpath(s)
        inside = os.path.isdir(s) and real.startswith(folder + os.sep) and out.suffix.lower() in IMAGE_EXTENSIONS
        if inside or real == folder:
            raise usage_error(f"output {out} is also an input ({s}); give another --out")


def _check_stats_file(path: Path) -> None:
    """The stats JSON is written next to the output: refuse to replace a file there that is not
    a scan's stats (a scan's, e.g. left by a deleted output, is replaced)."""
    import json

    if not os.path.lexists(path):
        return
    try:
        ours = path.is_file() and {"counts", "images", "model"} <= set(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise usage_error(f"{path} exists and is not a scan's stats JSON, which a scan writes there; move it, "
                          f"or give another --out")


def _parquet_output(args) -> Path:
    """--out of a parquet scan: a folder that may be created, or (with --overwrite) one that
    holds only part files; never a folder of anything else."""
    from ..scan import is_parquet_output

    out = Path(args.out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise usage_error(f"output {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.is_dir() and not os.access(out, os.W_OK)):
        raise usage_error(f"output {out} is not writable{why_not_writable(parent)}")
    if args.overwrite and out.is_dir() and not is_parquet_output(out):
        raise usage_error(f"output {out} is a folder that holds more than a parquet scan's part files; "
                          f"refusing to replace it (give a new folder name)")
    return out


# Settings that decide the records, besides the model and the precision (checked apart): the
# stats JSON's key -> (the option, what a stats JSON without the key stands for; None: unknown).
_RECORD_SETTINGS = {"aligned": ("--aligned", None), "upsample": ("--upsample", None),
                    "weak_face_score": ("--weak-face-score", 0.0), "detect_pixels": ("--detect-pixels", 0),
                    "pixel_limit": ("--pixel-limit", None),
                    "batch_size_requested": ("--batch-size", None), "channels_last": ("--channels-last", None),
                    "compiled": ("--compile", False)}


def previous_settings(out: Path) -> Optional[Dict[str, Any]]:
    """The settings of the scan that wrote ``out``, from its stats JSON (written when a scan
    starts), or None without one. An output without ``precision`` was written in float32, like
    every scan before --autocast; a record setting is None where it is not known."""
    import json

    try:
        stats = json.loads(Path(str(out) + ".stats.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stats, dict):
        return None
    prev = {"precision": stats.get("precision", "float32"), "batch_size": stats.get("batch_size"),
            "cwd": stats.get("cwd")}
    for k, (_, before) in _RECORD_SETTINGS.items():
        prev[k] = stats.get(k, before)
    return prev


def _dropped(out: Path, fmt: str, state: Any) -> str:
    """What a resume cuts from ``out``, in words."""
    if fmt == "parquet":
        return f"unfinished or damaged part files ({state.torn_bytes} bytes)"
    with open(out, "rb") as f:
        f.seek(state.good_bytes)
        lines = f.read().count(b"\n")
    if lines == 0:
        return f"a torn last record ({state.torn_bytes} bytes)"
    return (f"a damaged line and everything after it ({lines} lines, {state.torn_bytes} bytes; their inputs are "
            f"scanned again)")


def _resume_plan(args, out: Path, fmt: str, model_id: str, stdin) -> Dict[str, Any]:
    """How much of ``out`` is done and how to skip it: the records are a prefix of the input
    listing (the normal case: skip that many inputs, constant memory), else skip by path."""
    from ..data import iter_entries
    from ..scan import OutputMismatch, moved_away, output_paths, path_key, precision_of, resume_state

    try:
        state = resume_state(out, fmt)
    except OutputMismatch as e:
        raise usage_error(f"--resume: {e}") from None
    if state.model is not None and state.model != model_id:
        raise usage_error(f"--resume: {out} was written with model {state.model}, but --model {args.model} is "
                          f"{model_id}; scan into another output")
    plan: Dict[str, Any] = {"state": state, "listing": None, "exclude": None, "batch_size": args.batch_size}
    if state.records == 0:
        return plan
    if args.limit is not None and state.records > args.limit:
        raise usage_error(f"--resume: {out} already holds {state.records} records, more than --limit {args.limit}")
    prev = previous_settings(out)
    if prev is None:
        log(f"scan: {out} has no stats JSON ({out}.stats.json), so the settings of its records cannot be checked; "
            f"resuming with these (float32 assumed)", args.quiet)
        prev = {"precision": "float32", "batch_size": None, "cwd": None, **{k: None for k in _RECORD_SETTINGS}}
    moved = moved_away(prev["cwd"], output_paths(out, fmt))
    if moved:
        raise usage_error(f"--resume: {out}{moved}")
    precision = precision_of(args.device, args.autocast)
    if prev["precision"] != precision:
        raise usage_error(f"--resume: {out} was scanned in {prev['precision']}, this run would compute in {precision} "
                          f"({'with' if args.autocast else 'without'} --autocast on {args.device}); its scores would "
                          f"not match: give the original setting, or scan into another output")
    now = {k: getattr(args, flag[2:].replace("-", "_")) for k, (flag, _) in _RECORD_SETTINGS.items()}
    detection = ("upsample", "weak_face_score", "detect_pixels")
    changed = [k for k in _RECORD_SETTINGS if prev[k] is not None and prev[k] != now[k]
               and not (k in detection and args.aligned and prev["aligned"])]  # no detection: they don't matter
    if changed:
        raise usage_error(f"--resume: {out} was scanned with other settings, so its records would differ: "
                          + ", ".join(f"{_RECORD_SETTINGS[k][0]} {prev[k]!r} there, {now[k]!r} now" for k in changed)
                          + "; give the original settings, or scan into another output")
    if (prev["batch_size_requested"] == args.batch_size and isinstance(prev["batch_size"], int)
            and 1 <= prev["batch_size"] < args.batch_size):
        plan["batch_size"] = prev["batch_size"]
        log(f"scan: {out} went on with batches of {prev['batch_size']} after running out of memory; resuming "
            f"with that size", args.quiet)
    entries = iter_entries(args.paths, stdin=stdin)
    if args.limit is not None:
        entries = itertools.islice(entries, args.limit)
    done = output_paths(out, fmt)
    n = 0
    for stored, entry in zip(done, entries):  # (zip asks `done` first: `entries` stops at n)
        if stored != path_key(entry.path, fmt):
            break
        n += 1
    if n == state.records:
        plan["listing"] = entries  # the scan goes on from here: the inputs done are listed once
    else:
        if stdin is not None:
            stdin.seek(0)
        log(f"scan: the {state.records} records of {out} are not the first inputs of this listing (the inputs "
            f"changed?); skipping inputs by path instead", args.quiet)
        plan["exclude"] = _Keys(output_paths(out, fmt), fmt)
    return plan


class _Keys:
    """The inputs an output holds records of, matched whatever the path's spelling (``d/x.jpg``,
    ``./d/x.jpg``, ``$PWD/d/x.jpg``; tar members by their archive's path). Each record stands
    for one input: ``path in keys`` uses one up, so an input listed twice with one record
    is scanned once more. Ask once per input, in listing order (as ``scan(exclude=)`` does)."""

    def __init__(self, keys, fmt):
        from collections import Counter

        from ..scan import input_key

        self.left, self.fmt = Counter(input_key(k) for k in keys), fmt

    def __contains__(self, path) -> bool:
        from ..scan import input_key, path_key

        key = input_key(path_key(path, self.fmt))
        if self.left[key] <= 0:
            return False
        self.left[key] -= 1
        return True


def _count_inputs(paths, limit, resumed: int, progress: Progress) -> None:
    """The number of inputs, for the ETA; none when they hold a tar archive, which counting
    would read (and decompress) a second time beside the scan."""
    from ..data import iter_entries

    n = 0
    try:
        for e in itertools.islice(iter_entries(paths), limit):
            if e.file is None and "::" in e.path:  # a tar member
                return
            n += 1
    except Exception:  # only the ETA is lost
        return
    progress.total = max(n - resumed, 0)


DEFAULT_MODEL_NOTE = ("note: the embedded default detector learned real faces mostly from one source (NBA "
                      "headshots) and flags real faces from elsewhere far more often (5 of its 23 unseen-source test "
                      "faces); read the README's model card before trusting its labels")


def summary(stats: Dict[str, Any], resumed: int, model: Optional[str] = None) -> str:
    """The end-of-scan summary; ``model``: the model file used (a note follows for the default)."""
    from ..detector import default_model_path

    c, lab = stats["counts"], stats["labels"]
    lines = [f"{'status':<10}{'images':>10}"]
    lines.append(f"{'ok':<10}{c['ok']:>10}")
    lines += [f"{'  ' + k:<10}{lab[k]:>10}" for k in ("real", "fake")]  # the labels of the ok images
    lines += [f"{s:<10}{c[s]:>10}" for s in ("no_face", "error")]
    if stats["error_kinds"]:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["error_kinds"].items())))
    tail = f"{stats['images']} images in {stats['wall_s']:.1f} s, {stats['images_per_s']:.1f} images/s"
    if stats.get("compile_s"):
        tail += f", after {stats['compile_s']:.0f} s of compiling"
    if resumed:
        tail += f" (resumed: {resumed} records were already there)"
    lines.append(tail)
    if resumed and "output_counts" in stats:
        lines.append("the output holds " + ", ".join(f"{s} {n}" for s, n in stats["output_counts"].items()))
    if model is not None and Path(model).resolve() == default_model_path().resolve():
        lines.append(DEFAULT_MODEL_NOTE)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        from .scan_ray import run_ray

        return run_ray(args)
    from .scan_ray import refuse_ray_only

    refuse_ray_only(args)
    from ..scan import stop_unused_worker_server

    try:
        return _run(args)
    finally:
        stop_unused_worker_server()


def _run(args: argparse.Namespace) -> int:
    plan = check(args)
    from ..scan import CompileError, OutputBusy, RecordWriter, WorkerStartError, scan, write_stats

    out, fmt = plan["out"], plan["fmt"]
    stdin = piped_listing(args, reread=plan["mode"] == "resume")
    if plan["mode"] == "resume":
        resume = _resume_plan(args, out, fmt, plan["detector"].model_sha256(), stdin)
    else:
        resume = {"state": None, "listing": None, "exclude": None, "batch_size": args.batch_size}
    state = resume["state"]
    if state is not None and state.torn_bytes:
        log(f"scan: dropping {_dropped(out, fmt, state)} from {out}", args.quiet)
    run_ = scan(args.paths, plan["detector"], aligned=args.aligned, batch_size=resume["batch_size"],
                workers=args.workers, device=args.device, pixel_limit=args.pixel_limit, limit=args.limit,
                upsample=args.upsample, weak_face_score=args.weak_face_score, detect_pixels=args.detect_pixels,
                file_timeout=args.file_timeout, exclude=resume["exclude"], stdin=stdin, listing=resume["listing"],
                channels_last=args.channels_last, autocast=args.autocast, compile=args.compile,
                log=lambda m: log(m, args.quiet))
    part_rows = args.part_rows if args.part_rows is not None else PART_ROWS
    try:
        writer = RecordWriter(record_stdout() if out is None else out, fmt, plan["mode"], state, part_rows=part_rows,
                              part_seconds=PART_SECONDS)
    except OutputBusy as e:
        raise usage_error(str(e)) from None
    except OSError as e:  # /proc/x.jsonl, a read-only mount: passed the checks, cannot be created
        from . import _WRITE_ERRNOS

        if out is None:  # stdout, at the CSV header: as when records cannot be written (below)
            if isinstance(e, BrokenPipeError):  # its reader left: as for every command
                return 0
            print(f"fakespotter scan: error: writing stdout: {e.strerror or e}: no record was written", file=sys.stderr)
            return 3
        if e.errno in _WRITE_ERRNOS and e.errno != errno.EROFS:  # (a full disk at the CSV header)
            print(f"fakespotter scan: error: writing {out}: {e.strerror or e}: no record was written", file=sys.stderr)
            return 3
        raise usage_error(f"cannot create {out}: {e.strerror or e}") from None
    resumed = state.records if state is not None else 0

    def stats(complete: bool) -> Dict[str, Any]:  # counts: this run's; output_counts: the whole output's
        before = state.counts if state is not None else {}
        output_counts = {s: n + before.get(s, 0) for s, n in run_.stats["counts"].items()}
        return dict(run_.stats, complete=complete, resumed_records=resumed, output_counts=output_counts, format=fmt,
                    output=None if out is None else str(out), model=plan["detector"].model_sha256(),
                    inputs=list(args.paths), limit=args.limit, batch_size_requested=args.batch_size,
                    cwd=os.getcwd())

    stats_path = None if out is None else Path(str(out) + ".stats.json")
    if stats_path is not None:  # the settings are on disk before the first record: --resume checks them
        try:
            write_stats(stats_path, stats(False))
        except OSError as e:  # a full disk, most likely: what this run created goes again
            writer.close()
            if plan["mode"] == "new":  # the file (or empty parquet folder) it made
                try:
                    os.rmdir(out) if out.is_dir() else out.unlink()
                except OSError:
                    pass
            print(f"fakespotter scan: error: cannot write {stats_path}: {e.strerror or e}; no record was written",
                  file=sys.stderr)
            return 3
    batch_size = run_.stats["batch_size"]
    progress = Progress(None, "scan", args.quiet)
    if not args.quiet and "-" not in args.paths:  # the ETA needs a count, made while the scan goes on
        threading.Thread(target=_count_inputs, args=(args.paths, args.limit, resumed, progress), daemon=True).start()
    complete = False
    failed: Optional[OSError] = None  # writing the output (disk full, file too large, I/O error)
    stats_failed = False  # only the stats file could not be written
    stats_behind = False  # the stats file could not be written (as well as the output, maybe)
    try:
        for group in run_.batches():
            try:
                writer.write(group)
            except OSError as e:
                failed = e
                break
            progress.update(len(group))
            if stats_path is not None and run_.stats["batch_size"] != batch_size:  # an out-of-memory back-off
                batch_size = run_.stats["batch_size"]
                write_stats(stats_path, stats(False))
            if args.fail_fast and any(r["status"] == "error" for r in group):
                log("scan: stopping after the batch with the first error (--fail-fast)", args.quiet)
                break
        else:
            complete = True
    except WorkerStartError as e:  # no file's fault: not a record each, and no traceback
        again = "" if out is None else f" Rerun with --resume: {out} is kept, with what was written."
        print(f"fakespotter scan: error: {e.reason.removeprefix('scan: ')} --workers 0 decodes in the scan's own "
              f"process.{again}", file=sys.stderr)
        return 1
    except CompileError as e:
        print(f"fakespotter scan: error: {e.reason}; leave out --compile.", file=sys.stderr)
        return 1
    finally:
        run_.close()
        try:
            writer.close()
        except OSError as e:
            failed = failed or e
        run_.stats.update(copy.deepcopy(writer.written))  # what is in the output (not a failed or cut write)
        progress.close()
        if stats_path is not None:
            try:
                write_stats(stats_path, stats(complete and failed is None))
            except OSError as e:
                stats_failed, stats_behind = failed is None, True
                failed = failed or e
    if failed is not None:
        if out is None:  # what is still buffered would fail again at exit
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, sys.stdout.fileno())
            except OSError:  # no file descriptor (closed when the command started): nothing buffered
                pass
            os.close(null)
            if isinstance(failed, BrokenPipeError):  # `scan ... | head`: the reader left, as for every command
                return 0
        then = "" if out is None else (": the records written before stay; free space (or raise the file size "
                                       "limit) and rerun with --resume")
        what = out or "stdout"
        if stats_failed:  # the records are all there: only the stats file is behind
            what = stats_path
            if complete:
                then = (f": every record is in {out}, but the stats file is not; free space and rerun with "
                        f"--resume to write it")
        elif stats_behind:  # (--resume counts the output itself; the stats file catches up then)
            then += f" (nor could {stats_path} be updated: its counts are those of the scan's start)"
        print(f"fakespotter scan: error: writing {what}: {failed.strerror or failed}{then}",
              file=sys.stderr)
        return 3
    if not args.quiet:
        print(summary(stats(complete), resumed, args.model), file=sys.stderr)
    if complete and not resumed and not sum(run_.stats["counts"].values()) and args.limit != 0:
        from ..data import IMAGE_EXTENSIONS

        print(f"fakespotter scan: warning: the inputs hold no image to scan (folders are searched for "
              f"{' '.join(sorted(IMAGE_EXTENSIONS))} files; name others, or list them with @list.txt)",
              file=sys.stderr)
    errors = run_.stats["counts"]["error"] + (state.counts["error"] if state is not None else 0)
    return 1 if errors else 0
