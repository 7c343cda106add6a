"""Argument checks and small helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .._errors import why_not_writable
from ..data import list_images

PROGRESS_EVERY_S = 60.0  # progress lines when stderr is not a terminal


def usage_error(message: str) -> Exception:
    from . import UsageError

    return UsageError(message)


def images_of(sources: List[str], what: str) -> List[Path]:
    """All images of the given folders / lists, or a usage error naming the bad one."""
    out: List[Path] = []
    for s in sources:
        try:
            out.extend(list_images(s, what))
        except (FileNotFoundError, ValueError) as e:
            raise usage_error(str(e)) from None
    return out


def check_once(paths: Iterable[Path], what: str, copies: bool = False) -> None:
    """A usage error when ``paths`` name one file more than once (under any spelling, or a hard
    link): it would be counted twice; with ``copies``, also when they hold two files with the
    same bytes (training keeps copies, in one group). ``what`` names the list, e.g. "--real"."""
    paths = list(paths)
    seen = set()
    repeated: List[Path] = []
    for p in paths:
        try:
            st = p.stat()
            key: Any = (st.st_dev, st.st_ino)  # the same file: symlinks and hard links too
        except (OSError, RuntimeError):
            key = p
        if key in seen:
            repeated.append(p)
        seen.add(key)
    if repeated:
        raise usage_error(f"{len(repeated)} images are listed more than once in {what} (each would be counted "
                          f"again), e.g. {repeated[0]}")
    pairs = _same_bytes(paths) if copies else []
    if pairs:
        raise usage_error(f"{len(pairs)} images of {what} are copies of another one (each would be counted again), "
                          f"e.g. {pairs[0][0]} and {pairs[0][1]} (same bytes)")


def check_disjoint(a: Iterable[Path], b: Iterable[Path], what: str) -> None:
    """A usage error when an image of ``a`` is also in ``b``: the same file under any spelling,
    or another file with the same bytes (a copy). ``what`` says what the overlap would mean,
    e.g. "both real and fake"."""
    pairs = _same_bytes(a, b)
    if pairs:
        a0, b0 = pairs[0]
        example = f"{a0}" if a0.resolve() == b0.resolve() else f"{a0} and {b0} (same bytes)"
        raise usage_error(f"{len(pairs)} images are {what}, e.g. {example}")


def _same_bytes(a: Iterable[Path], b: Optional[Iterable[Path]] = None) -> List[Tuple[Path, Path]]:
    """Pairs of images with the same bytes: two files of ``a`` (each file once, under whatever
    spelling), or, given ``b``, an image of ``a`` and one of ``b`` (also the same file). Only
    files of equal size are read (hashed), so distinct sets cost a ``stat`` per file."""
    import hashlib
    import stat

    def by_size(paths: Iterable[Path]) -> Dict[int, Dict[Path, Path]]:
        out: Dict[int, Dict[Path, Path]] = {}
        for p in paths:
            try:
                real = p.resolve()
                st = real.stat()
            except (OSError, RuntimeError):  # unreadable or a link loop: reported where it is decoded
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size:  # empty files are unreadable images, not copies
                out.setdefault(st.st_size, {}).setdefault(real, p)
        return out

    def digest(p: Path) -> Optional[str]:
        try:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()
        except OSError:
            return None

    sa = by_size(a)
    sb = sa if b is None else by_size(b)
    pairs: List[Tuple[Path, Path]] = []
    for size in sorted(sa.keys() & sb.keys()):
        if b is None and len(sa[size]) < 2:
            continue
        digests = {real: digest(real) for real in {**sa[size], **sb[size]}}
        seen: Dict[str, Path] = {}
        for real, p in sa[size].items():
            d = digests[real]
            if d is not None and b is None and d in seen:
                pairs.append((seen[d], p))
            elif d is not None:
                seen.setdefault(d, p)
        if b is not None:
            pairs += [(seen[digests[real]], p) for real, p in sb[size].items() if digests[real] in seen]
    return pairs


def model_file(spec: str, what: str = "model") -> str:
    """A model file argument: a path, or ``default`` for the embedded default detector."""
    from ..detector import resolve_model

    try:
        path = resolve_model(spec)
    except FileNotFoundError as e:
        raise usage_error(str(e)) from None
    if path.is_dir():
        raise usage_error(f"{what} {spec} is a folder, not a model file")
    if path.exists() and not path.is_file():
        raise usage_error(f"{what} {spec} is not a regular file (a FIFO or device?)")
    if not path.is_file():
        raise usage_error(f"{what} {spec} does not exist (a model file, or 'default' for the embedded detector)")
    return str(path) if spec == "default" else spec  # (str(Path("./default")) is "default": the embedded one)


def record_stdout() -> Any:
    """stdout for records: UTF-8 (what a file output holds), whatever the locale or
    PYTHONIOENCODING."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8", errors="surrogateescape")
    return sys.stdout


def writable_output(path: Optional[str], overwrite: bool, what: str, regular_only: bool = False
                    ) -> Optional[Path]:
    """Check before any work that ``path`` can be written and would not clobber a file."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise usage_error(f"{what} {p} is a folder; give a file name")
    if p.is_symlink() and not p.exists():
        raise usage_error(f"{what} {p} is a symbolic link to {os.readlink(p)}, which does not exist; give "
                          f"another name")
    if regular_only and p.exists() and not p.is_file():  # (a scan may write records into a FIFO)
        raise usage_error(f"{what} {p} exists and is not a regular file (a FIFO or device?); give another name")
    if p.exists() and not overwrite:
        raise usage_error(f"{what} {p} already exists; pass --overwrite to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise usage_error(f"{what} {p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise usage_error(f"{what} {p} is not writable{why_not_writable(parent)}")
    return p


def refuse_inputs_as_output(out: Optional[Path], inputs: Iterable[Path], what: str) -> None:
    """A usage error when ``out`` is one of ``inputs`` (the same file under any spelling, a
    symbolic or hard link): --overwrite would replace an input."""
    if out is None or not out.exists():
        return
    st = out.stat()
    for p in inputs:
        try:
            s = p.stat()
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            raise usage_error(f"{what} {out} is also an input ({p}); give another name")


AUGMENT_FRACTION = 0.5  # perturb.Augmenter's default (not imported: the command line starts without torch)
TARGET_FPR = 0.01  # FakeSpotter's default
MAX_BATCH_SIZE = 4096  # features.MAX_BATCH_SIZE


def check_batch_size(args: argparse.Namespace) -> None:
    """--batch-size from 1 to MAX_BATCH_SIZE (a larger forward can get the process killed for memory)."""
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise usage_error(f"--batch-size must be from 1 to {MAX_BATCH_SIZE} (a forward holds about 2 MiB per chip on "
                          f"a CPU; a GPU gains nothing past a few hundred), got {args.batch_size}")


def check_augment_fraction(args: argparse.Namespace, augment: bool, flag: str) -> None:
    """--augment-fraction, given only with ``flag`` (else a usage error); the default filled in."""
    if args.augment_fraction is None:
        args.augment_fraction = AUGMENT_FRACTION
    elif not augment:
        raise usage_error(f"--augment-fraction is the share of training chips {flag} attacks; give {flag} too")
    if not 0.0 < args.augment_fraction <= 1.0:
        raise usage_error(f"--augment-fraction must be in (0, 1], got {args.augment_fraction}")


def add_class_sources(p: argparse.ArgumentParser, default_split: str) -> None:
    """--real / --fake sources with the name of each fake type, or --manifest with --split
    (train, evaluate, robustness); :func:`class_mode` checks that exactly one is given."""
    p.add_argument("--real", nargs="+", default=None, metavar="DIR",
                   help="folders (searched recursively) or @file lists of real images (relative paths in a list "
                        "are relative to the list's folder) (default: none; give --real and --fake, or --manifest)")
    p.add_argument("--fake", nargs="+", default=None, metavar="DIR",
                   help="folders or @file lists of fake images, one per fake type (default: none; give --real "
                        "and --fake, or --manifest)")
    p.add_argument("--fake-type", nargs="+", default=None, metavar="NAME",
                   help="a name for each --fake source, in order (default: the folder names; two folders of "
                        "one name must be named here)")
    p.add_argument("--manifest", default=None, metavar="PATH",
                   help="a data set's manifest.csv or its folder (from 'fakespotter data build'), instead of "
                        "--real/--fake: rows give the classes, fake types, generators and sources; its chips "
                        "are aligned (implies --aligned) (default: none)")
    p.add_argument("--split", default=None, choices=["train", "val", "test"],
                   help=f"the manifest split to use (default: {default_split})")
    p.set_defaults(default_split=default_split)


def class_mode(args: argparse.Namespace) -> str:
    """"manifest" or "folders"; a usage error when neither or both are given, or one class is missing."""
    folders = args.real is not None or args.fake is not None
    if args.manifest is not None and folders:
        raise usage_error("give either --manifest or --real/--fake, not both")
    if args.manifest is None and not folders:
        raise usage_error("give the images: --manifest PATH, or --real DIR... and --fake DIR...")
    if args.manifest is None and (args.real is None or args.fake is None):
        raise usage_error(f"--{'fake' if args.fake is None else 'real'} is missing: give both --real and --fake")
    if args.manifest is not None and args.fake_type is not None:
        raise usage_error("--fake-type names --fake folders; a manifest names its own fake types")
    for flag in ("fake_type", "real_source"):  # (a name is a row of the results)
        names = getattr(args, flag, None) or []
        if any(not n.strip() for n in names):
            raise usage_error(f"--{flag.replace('_', '-')} names must not be blank, got {names!r}")
    if args.manifest is None and args.split is not None:
        raise usage_error("--split picks a split of --manifest; --real/--fake folders have none")
    if args.split is None:
        args.split = args.default_split
    return "manifest" if args.manifest is not None else "folders"


def open_manifest(path: str, splits: List[str]):
    """Read and check a manifest (only ``splits``' files must exist), or a usage error."""
    from ..manifest import read_manifest

    try:
        return read_manifest(path, splits=splits)
    except (FileNotFoundError, ValueError) as e:  # ManifestError is a ValueError
        raise usage_error(f"--manifest: {e}") from None


def folder_names(dirs: List[str], option: str, naming_option: str) -> List[str]:
    """The names of ``option``'s sources when ``naming_option`` gives none: each folder's own name;
    two alike (``a/fake`` and ``b/fake``) would be reported as one source: a usage error."""
    names = [Path(d.lstrip("@")).name or d for d in dirs]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise usage_error(f"{option} {dirs[names.index(n)]} and {dirs[i]} would both be named {n!r} in the "
                              f"results; name each with {naming_option}")
    return names


def manifest_part(manifest, split: str, what: str, need_both: bool = True):
    """The rows of ``split``, or a usage error when it is empty, lacks a class, or lists a file
    whose bytes are not the ones it names (:func:`check_listed_bytes`)."""
    part = manifest.select(splits=[split])
    if len(part) == 0:
        raise usage_error(f"--manifest {manifest.root}: split {split!r} ({what}) has no rows")
    if need_both:
        for label in ("real", "fake"):
            if not any(r.label == label for r in part.rows):
                raise usage_error(f"--manifest {manifest.root}: split {split!r} ({what}) has no {label} images")
    return check_listed_bytes(part, f"split {split!r} ({what})")


def check_listed_bytes(part, what: str):
    """``part`` (rows of a manifest), once each readable file has the sha256 its row lists; else a
    usage error: a file replaced or moved since the manifest was written would be scored under
    another row's label, silently. (Unreadable files are recorded as such when they are read.)"""
    from ..manifest import verify_files

    bad = verify_files(part)[0]
    if bad:
        raise usage_error(f"--manifest {part.root}: {len(bad)} file(s) of {what} differ from the sha256 the manifest "
                          f"lists, e.g. {bad[0]}: replaced or moved since it was written (fakespotter data check "
                          f"lists them)")
    return part


def has_both_classes(part) -> bool:
    return {r.label for r in part.rows} == {"real", "fake"}


def load_chips(paths: List[Path], how: Any, size: int, label: str, quiet: bool, failures: List[dict]):
    """Chips of every face of every image, with the image index of each; unreadable images are
    recorded in ``failures`` and skipped. ``how``: anything with the face settings ``aligned``,
    ``upsample``, ``weak_face_score`` and ``detect_pixels`` (a FakeSpotter, parsed arguments).
    Returns (chips uint8 [M, size, size, 3], index [M], images without a face)."""
    import numpy as np

    from ..features import chips

    progress = Progress(len(paths), f"{label} chips", quiet)
    arrays, index, no_face = [], [], 0
    for i, path in enumerate(paths):
        try:
            c = chips([str(path)], aligned=how.aligned, size=size, upsample=how.upsample,
                      weak_face_score=how.weak_face_score, detect_pixels=how.detect_pixels)
        except Exception as e:  # a bad file must not end the run
            failures.append({"path": str(path), "error": f"{type(e).__name__}: {e}"})
            c = None
        if c is not None:
            no_face += len(c) == 0
            arrays.append(c.array)
            index.extend([i] * len(c))
        progress.update()
    progress.close()
    array = np.concatenate(arrays) if arrays else np.zeros((0, size, size, 3), dtype=np.uint8)
    return array, np.asarray(index, dtype=np.int64), no_face


def no_chips_error(what: str, images: int, no_face: int, aligned: bool, unreadable: Sequence[dict] = ()
                   ) -> Exception:
    """The usage error for inputs that gave no face chip at all: ``images`` images, of which
    ``no_face`` were read and had no face (the rest were unreadable; ``unreadable``: their
    ``{"path", "error"}``, the first is named)."""
    hint = "" if aligned else " or pass --aligned"
    first = f"; the first unreadable: {unreadable[0]['path']}: {unreadable[0]['error']}" if unreadable else ""
    return usage_error(f"no {what} gave a face chip ({no_face} without a face, {images - no_face} unreadable); "
                       f"check the inputs{hint}{first}")


def add_model_args(p: argparse.ArgumentParser, batch_help: str = "chips per backbone forward; the thresholds are "
                   "calibrated in forwards of 16 chips whatever it is, so that they do not depend on it") -> None:
    p.add_argument("--backbone", default="dlib_resnet_v1",
                   help="backbone id: a built-in one with weights of its own (the resnet ids need a checkpoint: "
                        "Python API), or one an installed package declares under the entry-point group "
                        "fakespotter.backbones (default: %(default)s)")
    p.add_argument("--layers", nargs="+", action="extend", default=None, metavar="NAME",
                   help="monitored layers; may be given more than once (default: the backbone's: every "
                        "post-ReLU output and the descriptor)")
    p.add_argument("--granularity", choices=["channel", "element"], default="channel",
                   help="a neuron per channel or per element (default: %(default)s)")
    p.add_argument("--threshold-mode", choices=["per_layer", "per_neuron"], default="per_layer",
                   help="one threshold per layer (paper Eq. 1) or per neuron (default: %(default)s)")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are already-aligned face crops: resize only, no face detection (default: detect)")
    add_detection_args(p)
    p.add_argument("--batch-size", type=int, default=64, help=f"{batch_help} (default: %(default)s)")


def add_detection_args(p: argparse.ArgumentParser, from_model: bool = False) -> None:
    """--upsample, --weak-face-score and --detect-pixels: the face detector's settings.
    ``from_model``: their defaults are the model's (the settings it was trained and evaluated
    with), resolved by :func:`detection_from_model`."""
    from ..faces import DETECT_PIXELS, WEAK_FACE_SCORE

    def default(value: Any, shown: str = "%(default)s") -> Tuple[Any, str]:
        if from_model:
            return None, f"the model's setting; the embedded default detector's: {value}"
        return value, shown

    upsample, upsample_help = default(1)
    weak, weak_help = default(WEAK_FACE_SCORE)
    pixels, pixels_help = default(DETECT_PIXELS, "%(default)s = 4096x4096")
    p.add_argument("--upsample", type=int, default=upsample,
                   help="face detector upsampling; higher finds smaller faces, slower (up to --detect-pixels) "
                        f"(default: {upsample_help})")
    p.add_argument("--weak-face-score", type=float, default=weak, metavar="SCORE",
                   help="face detections scoring below this are weak: dropped from an image that holds a "
                        "face scoring at least this (the detector's rare hits on badges or fabric beside real "
                        "faces score low, and such chips tend to score as fake), kept when they are all it "
                        f"holds; 0 (or less: detections score above 0) keeps every detection (default: {weak_help})")
    p.add_argument("--detect-pixels", type=int, default=pixels, metavar="N",
                   help="the most pixels the face detector works on, after --upsample: in a larger image faces "
                        "are found down to about 80 * sqrt(pixels / N) px; up to 4N the detector skips the "
                        "levels of its pyramid above N (the faces found get the boxes and chips of full-size "
                        "detection), past that it works on a copy scaled to N (boxes near those), as it does "
                        f"for images over 65536 px wide once upsampled; 0 for no limit (default: {pixels_help})")


def detection_from_model(args: argparse.Namespace, det: Any) -> None:
    """Fill in the detection settings not given (:func:`add_detection_args` ``from_model``) from
    the model ``det``."""
    for name in ("upsample", "weak_face_score", "detect_pixels"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(det, name))


def check_detection_args(args: argparse.Namespace) -> None:
    import math

    if args.upsample is not None and args.upsample < 0:
        raise usage_error(f"--upsample must be >= 0, got {args.upsample}")
    if args.weak_face_score is not None and not math.isfinite(args.weak_face_score):
        raise usage_error(f"--weak-face-score must be a finite number, got {args.weak_face_score}")
    from ..faces import MIN_DETECT_PIXELS

    if not (args.detect_pixels in (None, 0) or args.detect_pixels >= MIN_DETECT_PIXELS):
        raise usage_error(f"--detect-pixels must be 0 (no limit) or a pixel count >= {MIN_DETECT_PIXELS} (256x256; "
                          f"the default 16777216 is 4096x4096), got {args.detect_pixels}")


def _columns() -> int:
    """The terminal's width for a progress line: $COLUMNS when set, else stderr's terminal, else 80."""
    try:
        return max(int(os.environ["COLUMNS"]), 1)
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0) + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress on stderr: a one-line bar redrawn in place on a terminal; elsewhere (a log file,
    a batch job) a plain line every ``every`` seconds (default :data:`PROGRESS_EVERY_S`).
    Nothing with ``quiet``.

    ``total`` may be None (unknown: no bar, no ETA) and may be set later, e.g. by a thread
    that counts the inputs while the work goes on."""

    def __init__(self, total: Optional[int], label: str, quiet: bool = False, every: Optional[float] = None):
        self.total, self.label, self.done, self.t0 = total, label, 0, time.monotonic()
        self.live = not quiet and sys.stderr.isatty()
        self.lines = not quiet and not self.live
        self.every = PROGRESS_EVERY_S if every is None else every
        self._last = self.t0
        self._first: Optional[Tuple[float, int]] = None  # (time, done) at the first update

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        first = self._first
        if first is None:
            self._first = (now, self.done)
        if not self.live and not (self.lines and now - self._last >= self.every):
            return
        self._last = now
        # the rate since the first update: the start (workers, a model, the first batch) would
        # make the first ETAs of a long job many times too long; none before it is known
        steady = first is not None and now > first[0] and self.done > first[1]
        rate = (self.done - first[1]) / (now - first[0]) if steady else self.done / max(now - self.t0, 1e-9)
        total = self.total
        eta = "" if total is None or not steady or rate <= 0 else f" ETA {_hms((total - self.done) / rate)}"
        if self.lines:
            of = "" if total is None else f"/{total}"
            sys.stderr.write(f"{self.label}: {self.done}{of} in {_hms(now - self.t0)}, {rate:.1f}/s{eta}\n")
            sys.stderr.flush()
            return
        # one line redrawn in place: never as wide as the terminal, or it wraps and scrolls
        room = _columns() - 1
        if total is None:
            line = f"{self.label} {self.done} {rate:.1f}/s "
        else:
            tail = f" {self.done}/{total} {rate:.1f}/s{eta} "
            width = min(30, room - len(self.label) - 3 - len(tail))  # (the bar's brackets and a space)
            filled = min(width, int(width * self.done / max(total, 1)))
            line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}]{tail}" if width >= 5
                    else f"{self.label}{tail}")
        sys.stderr.write(f"\r{line[:room]}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\n")
            sys.stderr.flush()


def write_each(steps: Sequence[Tuple[Path, Any]], command: str) -> Optional[int]:
    """Write a command's report files, ``(path, write)`` one after another (each through a
    temporary name). When one cannot be written (a full disk), say which this run wrote and
    which files under the other names are an earlier run's, and return exit status 3."""
    written: List[Path] = []
    for path, write in steps:
        try:
            write()
        except OSError as e:  # (FileExistsError: a file made under this name since the start, said in e)
            older = [str(p) for p, _ in steps if p not in written and p.exists()
                     and not (p == path and isinstance(e, FileExistsError))]
            print(f"fakespotter {command}: error: cannot write {path}: {e.strerror or e}"
                  + (f"; written: {', '.join(map(str, written))}" if written else "")
                  + (f"; from an earlier run, not this one: {', '.join(older)}" if older else ""), file=sys.stderr)
            return 3
        written.append(path)
    return None


def log(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
