"""Finding the images of a corpus and reading them robustly.

* :func:`list_images` / :func:`iter_images` - the image files of a folder (recursive, sorted,
  symlink loops skipped), a ``@list.txt`` file list, or one file; ``iter_images`` streams, so a
  folder of millions of files is never held in memory (one folder listing per depth level).
* :func:`iter_entries` - what ``fakespotter scan`` reads: files, folders, file lists, ``-``
  (a list on stdin) and tar archives (their image members), as :class:`Entry` objects in a
  deterministic order.
* :func:`read_entry` / :func:`decode_image` - bytes and then RGB pixels, or an
  :class:`ImageError` whose ``kind`` (a key of :data:`ERROR_KINDS`) names the problem.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import logging
import os
import re
import stat
import struct
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _avif, _libtiff
from ._jpeg import cmyk_damage, decode_rgb, scan_damage

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "TAR_SUFFIXES",
    "DEFAULT_PIXEL_LIMIT",
    "MAX_FILE_BYTES",
    "ERROR_KINDS",
    "ImageError",
    "Entry",
    "DecodedImage",
    "list_images",
    "iter_images",
    "iter_entries",
    "check_sources",
    "read_entry",
    "decode_image",
]

# Folder and tar listings pick these up (any case). HEIC/HEIF files are listed also where
# pillow-heif is not installed: a record says what would read them, rather than they vanish from a
# scan of a phone's photos.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".bmp", ".gif", ".webp",
                              ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".avif", ".heic", ".heif",
                              ".hif"})
# Pillow plugins allowed to open a file (the formats of IMAGE_EXTENSIONS; MPO is a multi-picture
# JPEG; AVIF and HEIF where this Pillow has them: AVIF is built into Pillow >= 11.3 wheels, HEIF
# comes from pillow-heif, whose opener faces.open_image registers on the first HEIF it meets).
# Anything else - EPS (which would run Ghostscript), PSD, ICO, ... - is ``not_an_image``.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "AVIF", "HEIF")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
DEFAULT_PIXEL_LIMIT = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: 1 GiB of 4-byte pixels / 3
MAX_FILE_BYTES = 1 << 30
MAX_JPEG_SCANS = 500  # the limit of libjpeg-turbo's fuzz targets; libjpeg and mozjpeg write about 10 scans

ERROR_KINDS: Dict[str, str] = {
    "not_found": "the file does not exist (missing, vanished before it was read, or a broken symlink)",
    "permission_denied": "the file (or its folder) cannot be read with the current permissions",
    "not_a_file": "a folder, FIFO, device or socket where an image file was expected",
    "read_error": "the operating system failed to read the file",
    "empty_file": "the file has zero bytes",
    "too_large": f"the file has more than {MAX_FILE_BYTES} bytes",
    "not_an_image": "not an image in a supported format (JPEG, PNG, GIF, BMP, WebP, TIFF, PPM/PGM, AVIF, and "
                    "HEIC/HEIF where pillow-heif is installed)",
    "too_many_pixels": "width x height above the pixel limit (decompression-bomb guard), refused before decoding",
    "truncated": "the image data ends before the image does",
    "decode_error": f"the image is damaged (also a JPEG whose scan data shows damage that the decoder would fill "
                    f"in grey), uses a feature the decoder cannot read, or would take minutes to decode (a JPEG "
                    f"of more than {MAX_JPEG_SCANS} scans)",
    "bad_archive": "a tar archive (or the rest of it) that cannot be read",
    "face_detection_error": "face detection or alignment failed on the decoded image",
    "not_a_chip": "--aligned: the image cannot be an aligned face chip (a side under 16 px, or not square within 2:1)",
    "worker_crash": "the decode worker process died on this file (a crash in a native decoder)",
    "timeout": "reading, decoding and face detection took longer than the per-file time limit (--file-timeout)",
    "internal_error": "any other failure (a bug in fakespotter: please report it)",
}


class ImageError(Exception):
    """An input that cannot be scanned. ``kind`` is a key of :data:`ERROR_KINDS`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


# ----------------------------------------------------------------------------------------------
# discovery


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


APPLE_DOUBLE = b"\x00\x05\x16\x07"  # the magic number of an AppleDouble file


def _is_apple_double(path: str) -> bool:
    """Whether the file at ``path`` is a macOS AppleDouble file: the ``._photo.jpg`` beside (or
    in ``__MACOSX/`` of a zip of) ``photo.jpg``, holding its Finder metadata, never an image;
    found by its magic number, so an image named ``._x.jpg`` is still scanned."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # (a FIFO of that name: no waiting for a writer)
    except OSError:  # (its record will say why it cannot be read)
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, 4) == APPLE_DOUBLE
    except OSError:
        return False
    finally:
        os.close(fd)


def _sorted_entries(folder: str) -> List[Tuple[str, bool]]:
    """(name, is_dir) of a folder's entries, sorted by name; ``is_dir`` follows symlinks."""
    out = []
    with os.scandir(folder) as it:
        for e in it:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            out.append((e.name, is_dir))
    out.sort()
    return out


def _walk(root: str) -> Iterator[Tuple[str, Optional[OSError]]]:
    """(path, None) for each image file under ``root``, depth-first with each folder's entries
    sorted by name (so ``a/x.jpg`` comes before ``a b.jpg``: not quite ``sorted()`` over the
    paths); (folder, error) for a folder that cannot be listed. A folder reached again (a
    symlink loop, or two links to one folder) is skipped, and so are macOS AppleDouble files
    (:func:`_is_apple_double`). Folders are known by device and inode (``realpath`` on each
    made a tree of depth d cost d^3 lstat calls: minutes at depth 1,500)."""
    def key(folder: str) -> Any:  # (by path where the file system gives no inode numbers, as some FUSE ones)
        st = os.stat(folder)
        return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(folder)

    try:
        seen = {key(root)}
        stack = [iter(_sorted_entries(root))]
    except OSError as e:
        yield root, e
        return
    dirs = [root]
    while stack:
        nxt = next(stack[-1], None)
        if nxt is None:
            stack.pop()
            dirs.pop()
            continue
        name, is_dir = nxt
        path = os.path.join(dirs[-1], name)
        if not is_dir:
            if _is_image_name(name) and not (name.startswith("._") and _is_apple_double(path)):
                yield path, None
            continue
        try:
            k = key(path)
            if k in seen:
                continue
            seen.add(k)
            listing = _sorted_entries(path)
        except OSError as e:
            yield path, e
            continue
        stack.append(iter(listing))
        dirs.append(path)


def _list_paths(stream: Iterable[str], base: str = "") -> Iterator[str]:
    """The paths of a file list, joined to ``base`` unless absolute: one a line, as written
    (less the line ending); blank lines and lines starting with ``#`` are skipped (``./#x.jpg``
    names such a file). Spaces around a name belong to the list, not the name, unless a file
    has the name with them. A list that starts like an image (``scan - < photo.jpg``) is a
    ValueError."""
    for n, line in enumerate(stream):
        fmt = list_is_image(line) if n == 0 else None
        if fmt is not None:
            raise ValueError(f"a file list holds one path a line, and this one is a {fmt} image; give the "
                             f"image's path instead")
        line = line.rstrip("\r\n")
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name != line and not os.path.lexists(os.path.join(base, line)):
            line = name
        yield line if os.path.isabs(line) else os.path.join(base, line)


def list_is_image(first_line: str) -> Optional[str]:
    """The image format a file list's first line (as :func:`open_list` reads it) starts like:
    an image given where a list is read (``@photo.jpg``, ``scan - < photo.jpg``); else None.
    BMP's "BM" and PPM's "P1".."P6" can start a line of text, so they are not taken for one."""
    head = first_line.encode("utf-8", "surrogateescape")[:64]
    fmt = _signature(head) or ("PNG" if head.startswith(b"\x89PNG\r") else None)  # (a line ends inside its magic)
    return None if fmt in ("BMP", "PPM") else fmt


def open_list(listing: Union[str, Path]) -> IO[str]:
    """A file list for reading: UTF-8 (a byte-order mark is skipped), bytes that are not UTF-8
    kept as surrogates (so such file names still name their files), lines ended by "\\n" alone
    (a "\\r" inside a file name is part of it; "\\r\\n" endings are stripped by the reader)."""
    return open(listing, encoding="utf-8-sig", errors="surrogateescape", newline="\n")


def stdin_list() -> IO[str]:
    """Standard input read as :func:`open_list` reads a file list (a stream the caller put in
    ``sys.stdin`` without a file descriptor is taken as it is); ValueError when there is none
    (a program started with standard input closed)."""
    import sys

    if sys.stdin is None:
        raise ValueError("'-' reads the list of inputs from standard input, and this program's standard input is "
                         "closed")
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stdin
    return open(fd, encoding="utf-8-sig", errors="surrogateescape", newline="\n", closefd=False)


def _list_base(listing: str) -> str:
    """The folder relative paths of a file list start from: the list's own, or the working
    folder for a list that is no regular file (a pipe: ``@/dev/stdin``, ``@<(find ...)``) or
    is a file descriptor's name (``@/dev/stdin < list.txt``: the folder of /dev/stdin is no
    list's folder)."""
    descriptor = re.fullmatch(r"/dev/(stdin|fd/\d+)|/proc/[^/]+/fd/\d+", os.path.abspath(listing))
    return os.path.dirname(listing) if os.path.isfile(listing) and not descriptor else ""


def iter_images(source: Union[str, Path], what: str = "input") -> Iterator[Path]:
    """Stream the image files of ``source`` in :func:`list_images` order (no emptiness check;
    folders that cannot be listed are skipped)."""
    text = str(source)
    if text.startswith("@"):
        _check_list(text[1:], what)
        with open_list(text[1:]) as f:
            yield from map(Path, _list_paths(f, _list_base(text[1:])))
        return
    path = Path(source)
    if path.is_file():
        yield path
        return
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what}: {path} is neither a file nor a folder")
    for p, err in _walk(str(path)):
        if err is None:
            yield Path(p)


def list_images(source: Union[str, Path], what: str = "input") -> List[Path]:
    """The image files of ``source``, sorted: a folder (searched recursively, symlink loops
    skipped), ``@list.txt`` (one path per line, relative to the list's folder), or one file.

    Raises FileNotFoundError / ValueError naming ``what`` and the path when there is nothing.
    """
    found = list(iter_images(source, what))
    if not found:
        text = str(source)
        if text.startswith("@"):
            raise ValueError(f"{what}: file list {text[1:]} names no files")
        raise ValueError(f"{what}: folder {Path(source)} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


class Entry(NamedTuple):
    """One input of a scan. ``path`` names it in records (``archive.tar::member`` for a tar
    member); the content is the file ``file``, or ``data`` (a tar member's bytes), or the
    ``span`` (offset, size, header checksum) of a tar member in the uncompressed archive
    ``file``, listed without its bytes and read when the entry is; ``error`` is set when
    discovery already failed (an unreadable folder or archive)."""

    path: str
    file: Optional[str] = None
    data: Optional[bytes] = None
    error: Optional[Tuple[str, str]] = None
    span: Optional[Tuple[int, ...]] = None


def quiet_pillow_logs() -> None:
    """Keep Pillow's log lines about a file it reads ("More samples per pixel than can be
    decoded: 2048", logged as errors) off stderr: they name no file, and the file's record (or
    error) says what was wrong. For the processes that are fakespotter's own (the command line,
    the scanner's decode workers): a handler that drops them, where none was set up, in place of
    Python's last-resort print; a program that configures logging still gets them."""
    logging.getLogger("PIL").addHandler(logging.NullHandler())


def check_sources(sources: Sequence[str], what: str = "input") -> None:
    """Refuse (FileNotFoundError / ValueError, naming the source) what :func:`iter_entries`
    cannot start on: a missing path or file list, ``-`` given twice."""
    if not sources:
        raise ValueError(f"{what}: no inputs given")
    if sum(1 for s in sources if s == "-") > 1:
        raise ValueError(f"{what}: '-' (a file list on stdin) can be given once")
    for s in sources:
        if s == "-":
            continue
        if s.startswith("@"):
            _check_list(s[1:], what)
        else:
            try:
                os.lstat(s)
            except FileNotFoundError:
                raise FileNotFoundError(f"{what}: {s} does not exist") from None
            except OSError:  # e.g. a folder on the way that cannot be searched: its entry records why
                pass


def _check_list(listing: str, what: str) -> None:
    """FileNotFoundError / ValueError naming ``listing`` unless it can be read as a file list."""
    literal = f" (a file named @{listing} exists: write ./@{listing} to scan it)" if os.path.lexists(
        f"@{listing}") else ""
    try:
        mode = os.stat(listing).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: file list {listing} does not exist{literal}") from None
    except OSError as e:
        raise ValueError(f"{what}: file list {listing} cannot be read: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what}: file list {listing} is a folder; give the folder without '@' to scan it")
    if stat.S_ISREG(mode):  # (a pipe is opened by its reader only: opening it here would block)
        try:
            with open_list(listing) as f:
                fmt = list_is_image(f.readline(64))
        except OSError as e:
            raise ValueError(f"{what}: file list {listing} cannot be read: {e.strerror}") from None
        if fmt is not None:  # (@photo.jpg from a shell glob over files named '@...')
            hint = literal or "; give the image's path instead"
            raise ValueError(f"{what}: @{listing} names a file list, and {listing} is a {fmt} image, not a list of "
                             f"paths{hint}")


def _os_error(e: OSError, path: str) -> ImageError:
    kinds = {errno.ENOENT: "not_found", errno.ENOTDIR: "not_found", errno.ELOOP: "not_found",
             errno.EACCES: "permission_denied", errno.EPERM: "permission_denied", errno.EISDIR: "not_a_file",
             errno.ENXIO: "not_a_file"}  # (ENXIO: a socket, or a device with nothing behind it)
    return ImageError(kinds.get(e.errno, "read_error"), f"{path}: {e.strerror or e}")


def _tar_entries(archive: str, spans: bool = False) -> Iterator[Entry]:
    """The image members of a tar archive (any compression), streaming; the member bytes are
    read here since compressed archives cannot be read at random offsets. ``spans``: an
    uncompressed archive's members are listed by their span in it instead, without their bytes
    (for readers elsewhere: the Ray engine's decode tasks); the listing then reads the headers
    alone, seeking past the members' data."""
    stack = contextlib.ExitStack()
    try:
        tf, spans = _open_tar(archive, stack, spans)
    except _TAR_ERRORS as e:
        stack.close()
        kind = _os_error(e, archive).kind if isinstance(e, OSError) and e.errno else "bad_archive"
        yield Entry(archive, error=(kind, f"{archive}: cannot open as a tar archive: {e}"))
        return
    with stack:
        while True:
            try:
                m = tf.next()
                if m is None:  # tarfile ends quietly at a damaged or cut header
                    if not _rest_is_zeros(tf.fileobj):
                        yield Entry(f"{archive}::", error=(
                            "bad_archive", f"{archive}: reading stopped near byte {tf.offset} (a damaged member "
                                           f"header?), but data follows: anything after it was not read"))
                    elif getattr(tf, _LAST_BLOCK, b"").strip(b"\0"):  # not end-of-archive zeros: the archive's end
                        yield Entry(f"{archive}::", error=(
                            "bad_archive", f"{archive}: the archive ends in a damaged or cut member header at byte "
                                           f"{tf.offset}: the member it began, and any after it, were not read"))
                    return
                tf.members.clear()  # stream mode keeps every TarInfo otherwise
                if m.isdir() or not _is_image_name(m.name):
                    continue
                apple_double = os.path.basename(m.name).startswith("._") and m.isfile()
                path = f"{archive}::{m.name}"
                if not m.isfile():  # a link or special file: its own entry, never followed
                    yield Entry(path, error=("not_a_file", f"{path}: a {_member_kind(m)} inside the archive, "
                                                           f"not a file; links are not followed"))
                    continue
                if m.size > MAX_FILE_BYTES:
                    yield Entry(path, error=("too_large", f"{path}: {m.size} bytes, more than {MAX_FILE_BYTES}"))
                    continue
            except _TAR_ERRORS as e:
                yield Entry(f"{archive}::", error=("bad_archive", _damage(archive, e)))
                return
            if spans and not apple_double and not m.issparse():  # (a sparse member's data is not m.size bytes)
                yield Entry(path, file=archive, span=(m.offset_data, m.size, m.chksum))
                continue
            try:
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
            except _TAR_ERRORS as e:  # its header was read: the member has a record
                yield Entry(path, error=("truncated", f"{path}: the archive ends (or is damaged) inside this "
                                                      f"member of {m.size} bytes: {e}"))
                yield Entry(f"{archive}::", error=("bad_archive", _damage(archive, e)))
                return
            if not (apple_double and data.startswith(APPLE_DOUBLE)):  # (macOS tar's ._ metadata: no image)
                yield Entry(path, data=data)


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _damage(archive: str, e: BaseException) -> str:
    if isinstance(e, gzip.BadGzipFile) and "CRC" in str(e):  # found at the end of the data
        return (f"{archive}: the compressed data fails its check ({e}): the members listed before this record "
                f"were read from it, and one of them may be damaged")
    return f"{archive}: the archive is damaged or truncated after the members listed so far: {e}"


_LAST_BLOCK = "_fakespotter_last_block"


class _Header(tarfile.TarInfo):
    """tarfile's member header, which also keeps on its archive the last header block read
    (``_LAST_BLOCK``): where reading ends, zeros are the archive's end, anything else a header
    cut short or damaged (tarfile takes both for the end after the first member)."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:  # (tarfile's own, keeping the block)
        buf = tf.fileobj.read(tarfile.BLOCKSIZE)
        setattr(tf, _LAST_BLOCK, buf)
        obj = cls.frombuf(buf, tf.encoding, tf.errors)
        obj.offset = tf.fileobj.tell() - tarfile.BLOCKSIZE
        return obj._proc_member(tf)


def _open_tar(archive: str, stack: contextlib.ExitStack, seekable: bool = False) -> Tuple[tarfile.TarFile, bool]:
    """A tar archive opened for streaming (entered into ``stack``), and whether it was opened
    for random access instead: asked for with ``seekable``, and only an uncompressed archive
    can be (its members' data is then skipped by seeking, not read). A gzip-compressed one is
    read through GzipFile, which checks the data against the CRC at its end (tarfile's own gzip
    stream never does, so damaged compressed data went by unnoticed); bzip2 and xz check theirs
    block by block."""
    with open(archive, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        gz = stack.enter_context(gzip.open(archive, "rb"))
        return stack.enter_context(tarfile.open(fileobj=gz, mode="r|", tarinfo=_Header)), False
    tf = stack.enter_context(tarfile.open(archive, mode="r|*", tarinfo=_Header))
    if not (seekable and tf.fileobj.comptype == "tar"):  # (what tarfile would decompress itself, by content)
        return tf, False
    tf.close()
    return stack.enter_context(tarfile.open(archive, mode="r:", tarinfo=_Header)), True


def _rest_is_zeros(stream: Any) -> bool:
    """Whether what is left of a tar stream is end-of-archive padding (zero bytes)."""
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            return True
        if chunk.strip(b"\x00"):
            return False


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"symbolic link to {m.linkname}"
    if m.islnk():
        return f"hard link to {m.linkname}"
    return {tarfile.FIFOTYPE: "FIFO", tarfile.CHRTYPE: "character device",
            tarfile.BLKTYPE: "block device"}.get(m.type, f"member of type {m.type!r}")


def _path_entries(path: str, tar_spans: bool = False) -> Iterator[Entry]:
    if "\0" in path:  # no file has such a name; os calls would raise ValueError
        yield Entry(path, error=("not_found", f"{path!r}: a path cannot hold a NUL byte (a list of NUL-separated "
                                              f"paths, as find -print0 writes? give one path a line)"))
        return
    if os.path.isdir(path):
        for p, err in _walk(path):
            if err is None:
                yield Entry(p, file=p)
            else:
                e = _os_error(err, p)
                yield Entry(p, error=(e.kind, f"cannot list folder {p}: {err.strerror or err}"))
    elif _is_tar_name(path) and os.path.isfile(path):
        yield from _tar_entries(path, tar_spans)
    else:
        yield Entry(path, file=path)


def iter_entries(sources: Sequence[str], stdin: Optional[IO[str]] = None, tar_spans: bool = False
                 ) -> Iterator[Entry]:
    """Every input of ``sources`` in order, streaming:

    * a folder: its image files (by extension), recursively, sorted by path; symlink loops
      skipped; a folder that cannot be listed gives an entry with an error (tar archives inside
      folders are not opened: name them, or list them in a file list);
    * ``@list.txt``: one path per line (relative to the list's folder; ``#`` comments; UTF-8,
      other bytes kept; see :func:`_list_paths`), each expanded like a command-line path; ``-``
      and a list that is a pipe (``@/dev/stdin``): the same, read from ``stdin`` or the pipe
      (relative to the working folder);
    * a ``.tar`` (``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) file: its image members, as
      ``archive.tar::member``;
    * any other path: that file, whatever its name (a missing one gives a ``not_found`` entry).

    ``tar_spans``: an uncompressed archive's members come as spans of it, not their bytes
    (sparse members excepted).
    """
    for s in sources:
        if s == "-":
            for path in _list_paths(stdin if stdin is not None else stdin_list()):
                yield from _path_entries(path, tar_spans)
        elif s.startswith("@"):
            with open_list(s[1:]) as f:
                for path in _list_paths(f, _list_base(s[1:])):
                    yield from _path_entries(path, tar_spans)
        else:
            yield from _path_entries(os.path.normpath(s) if s.endswith(os.sep) else s, tar_spans)


# ----------------------------------------------------------------------------------------------
# reading and decoding


class DecodedImage(NamedTuple):
    """rgb: uint8 [H, W, 3] (EXIF-upright; see ``faces.load_image`` for the colour rules);
    width, height: W and H, the upright image's (as scan records give them; Pillow reports a
    TIFF's upright size but a JPEG's stored one); frames: how many it has (only the first is
    decoded; None when not known, see :func:`_frame_count`)."""

    rgb: np.ndarray
    width: int
    height: int
    frames: Optional[int]


def read_entry(entry: Entry) -> bytes:
    """The bytes of an entry, or :class:`ImageError` (not_found, permission_denied, not_a_file,
    read_error, too_large). A FIFO or device is refused without blocking on it."""
    if entry.error is not None:
        raise ImageError(*entry.error)
    if entry.data is not None:
        return entry.data
    if entry.span is not None:
        return _read_span(entry)
    path = entry.file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _os_error(e, path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not_a_file", f"{path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError("too_large", f"{path}: {st.st_size} bytes, more than {MAX_FILE_BYTES}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            # its size now and one byte more, to see whether it grows: read(MAX_FILE_BYTES + 1) would
            # reserve a GiB a file, which fails every file of a scan under a memory cap (ulimit -v)
            data = f.read(st.st_size + 1)
            if len(data) <= st.st_size:
                return data
            buf = bytearray(data)
            while len(buf) <= MAX_FILE_BYTES and (more := f.read(min(1 << 20, MAX_FILE_BYTES + 1 - len(buf)))):
                buf += more
        if len(buf) > MAX_FILE_BYTES:
            raise ImageError("too_large", f"{path}: more than {MAX_FILE_BYTES} bytes (it grew while it was read)")
        return bytes(buf)
    except OSError as e:
        raise _os_error(e, path) from None
    finally:
        os.close(fd)


def _read_span(entry: Entry) -> bytes:
    """The bytes of an uncompressed tar member, from its archive (read again since it was
    listed, perhaps on another machine): the header block before them must still be the
    member's (its checksum and size), or the archive changed and the offset may name another
    member's bytes now."""
    offset, size, chksum = entry.span
    try:
        with open(entry.file, "rb") as f:
            f.seek(offset - tarfile.BLOCKSIZE)
            header = f.read(tarfile.BLOCKSIZE)
            data = f.read(size)
    except OSError as e:
        raise _os_error(e, entry.file) from None
    try:
        info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
        same = (info.chksum, info.size) == (chksum, size)
    except tarfile.HeaderError:
        same = False
    if not same:
        raise ImageError("bad_archive", f"{entry.path}: the archive changed after its members were listed (this "
                                        f"member's header is not where it was): scan it again")
    if len(data) < size:  # (as the member's bytes read while listing it say it)
        raise ImageError("truncated", f"{entry.path}: the archive ends (or is damaged) inside this member of "
                                      f"{size} bytes: unexpected end of data")
    return data


_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")


def is_heif(head: bytes) -> bool:
    """Whether the first 12 bytes of a file are those of a HEIC/HEIF image (an ISO base media
    file whose major brand is a HEIF one)."""
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def _signature(data: bytes) -> Optional[str]:
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":  # ISO base media: the brand says which
        if data[8:12] in (b"avif", b"avis"):
            return "AVIF"
        if is_heif(data[:12]):
            return "HEIF"
    if len(data) >= 2 and data[0:1] == b"P" and data[1:2] in b"123456":
        return "PPM"
    return None


def _short_riff(data: bytes) -> bool:
    return len(data) >= 8 and len(data) < int.from_bytes(data[4:8], "little") + 8


def _cut_short(data: bytes, fmt: str) -> bool:
    """Whether ``data`` of format ``fmt`` ends inside a part that its own structure declares,
    with everything before the end well formed: a file cut short (``truncated``), told from one
    with wrong bytes (``decode_error``). Checked after a decode fails. A length or offset field
    damaged so that it points past the end reads as a cut: the two cannot be told apart."""
    walk = _CUT_WALKS.get(fmt)
    try:
        return walk is not None and walk(data)
    except Exception:  # a walk that trips over damage it did not foresee: no cut shown
        return False


def _jpeg_cut(data: bytes) -> bool:
    """JPEG: the marker segments up to the first scan header (how a scan's data ends is the
    decoder's to say)."""
    pos = 2
    while True:
        if pos + 2 > len(data):
            return True
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0x00, 0xD8, 0xD9):
            return False
        if pos + 4 > len(data):
            return True
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            return False
        if pos + 2 + length > len(data):
            return True
        if marker == 0xDA:
            return False
        pos += 2 + length


def _png_cut(data: bytes) -> bool:
    """PNG: the chunks (their CRCs checked) up to IEND."""
    pos = 8
    while True:
        if pos + 8 > len(data):
            return True
        length, ctype = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if length > 0x7FFFFFFF or not ctype.isalpha():
            return False
        end = pos + 12 + length
        if end > len(data):
            return True
        if zlib.crc32(memoryview(data)[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return False
        if ctype == b"IEND":
            return False
        pos = end


def _gif_table(flags: int) -> int:
    """The size of the colour table a GIF screen or image descriptor's flags announce."""
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _gif_cut(data: bytes) -> bool:
    """GIF: the screen descriptor, then the blocks (chains of sub-blocks) up to the trailer."""
    if len(data) < 13:
        return True
    pos = 13 + _gif_table(data[10])
    while True:
        if pos >= len(data):
            return True
        block = data[pos]
        if block == 0x3B:  # the trailer
            return False
        if block == 0x21:  # an extension: introducer, label
            pos += 2
        elif block == 0x2C:  # an image: descriptor, colour table, LZW code size
            if pos + 10 > len(data):
                return True
            pos += 10 + _gif_table(data[pos + 9]) + 1
        else:
            return False
        while True:
            if pos >= len(data):
                return True
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break


_BMP_INFO_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)


def _bmp_cut(data: bytes) -> bool:
    """BMP: the file size its header declares. ``BM`` is a weak signature (a text file may start
    with it), so the header bytes present must be a BMP's: reserved bytes zero, a pixel data
    offset inside the declared size, a known info header size; 6 bytes or fewer cannot show it."""
    if len(data) < 7:
        return False
    size = int.from_bytes(data[2:6], "little")
    if not max(len(data), 25) < size <= MAX_FILE_BYTES or data[6:10].strip(b"\x00"):
        return False
    if len(data) >= 14 and not 26 <= int.from_bytes(data[10:14], "little") <= size:
        return False
    return len(data) < 18 or int.from_bytes(data[14:18], "little") in _BMP_INFO_SIZES


_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_TIFF_DATA_TAGS = ((273, 279), (324, 325))  # (StripOffsets, StripByteCounts), (TileOffsets, TileByteCounts)


def _tiff_cut(data: bytes) -> bool:
    """TIFF: the first image file directory, the tag values it points to, and the strips or
    tiles of its image (a classic TIFF's: a BigTIFF's header differs, and is not walked)."""
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return True
    if int.from_bytes(data[2:4], "little" if order == "<" else "big") != 42:
        return False
    ifd = int.from_bytes(data[4:8], "little" if order == "<" else "big")
    if ifd < 8:
        return False
    if ifd + 2 > len(data):
        return True
    count = int.from_bytes(data[ifd:ifd + 2], "little" if order == "<" else "big")
    if count == 0:
        return False
    if ifd + 2 + 12 * count > len(data):
        return True
    arrays = {}
    for at in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, typ, n, value = struct.unpack_from(order + "HHII", data, at)
        size = _TIFF_TYPE_SIZES.get(typ, 0) * n
        if size > 4 and value + size > len(data):
            return True
        if typ in (3, 4) and any(tag in pair for pair in _TIFF_DATA_TAGS):
            arrays[tag] = np.frombuffer(data, order + ("u2" if typ == 3 else "u4"), n, at + 8 if size <= 4 else value)
    for offsets, sizes in _TIFF_DATA_TAGS:
        if offsets in arrays and sizes in arrays and len(arrays[offsets]) == len(arrays[sizes]):
            if (arrays[offsets].astype(np.int64) + arrays[sizes]).max(initial=0) > len(data):
                return True
    return False


def _ppm_cut(data: bytes) -> bool:
    """PPM/PGM/PBM: the header (magic, width, height and, but for bitmaps, maxval: decimal
    numbers after whitespace or comments), then for the binary kinds the pixel data it declares.
    ``P1``..``P6`` is a weak signature: the header must have begun (whitespace after the magic)."""
    kind = data[1] - 0x30
    if data[2:3] not in (b" ", b"\t", b"\n", b"\v", b"\f", b"\r"):
        return False
    values: List[int] = []
    pos = 2
    while len(values) < (2 if kind in (1, 4) else 3):
        start = pos
        while pos < len(data) and data[pos] in b" \t\n\v\f\r#":
            if data[pos] == 0x23:  # a comment, to the end of its line
                ends = [i for i in (data.find(b"\n", pos), data.find(b"\r", pos)) if i >= 0]
                if not ends:
                    return True
                pos = min(ends)
            pos += 1
        if pos == start:
            return False
        digits = pos
        while pos < len(data) and 0x30 <= data[pos] <= 0x39:
            pos += 1
        if pos == len(data):
            return True
        if pos == digits or data[pos] not in b" \t\n\v\f\r#":
            return False
        values.append(int(data[digits:pos]))
    if kind < 4:  # text pixel data: how it ends is the decoder's to say
        return False
    width, height = values[:2]
    row = (width + 7) // 8 if kind == 4 else width * (1 if kind == 5 else 3) * (1 if values[2] < 256 else 2)
    return len(data) < pos + 1 + row * height


def _check_bmff_whole(fmt: str, data: bytes) -> None:
    """A HEIF or AVIF whose boxes run past the end of ``data`` is ``truncated`` even when it
    decoded: libheif (>= 1.19) fills the missing tiles of a grid image (an iPhone's photo is a
    grid of 512x512 tiles) and says nothing."""
    if fmt in ("HEIF", "AVIF") and _bmff_cut(data):
        raise ImageError("truncated", f"{fmt} data ends early ({len(data)} bytes): a box runs past the end")


def _bmff_cut(data: bytes) -> bool:
    """AVIF/HEIF: the top-level boxes (size, type)."""
    pos = 0
    while pos < len(data):
        if pos + 8 > len(data):
            return True
        size, btype = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if size == 1:  # a 64-bit size follows the type
            if pos + 16 > len(data):
                return True
            size = int.from_bytes(data[pos + 8:pos + 16], "big")
        elif size == 0:  # the box runs to the end of the file
            return False
        if size < 8 or not all(0x20 <= b < 0x7F for b in btype):
            return False
        if pos + size > len(data):
            return True
        pos += size
    return False


_CUT_WALKS = {"JPEG": _jpeg_cut, "MPO": _jpeg_cut, "PNG": _png_cut, "GIF": _gif_cut, "BMP": _bmp_cut,
              "WEBP": _short_riff, "TIFF": _tiff_cut, "PPM": _ppm_cut, "AVIF": _bmff_cut, "HEIF": _bmff_cut}


def _decode_failure(e: BaseException, data: bytes, fmt: str, opening: bool = False,
                    libtiff: Sequence[str] = ()) -> ImageError:
    """The error for a decoder's exception ``e``; ``libtiff``: libtiff's messages meanwhile (in
    the error's text only: libtiff's "truncated or corrupt" does not say the data ends early).
    Pillow's word that the data ends early is not taken while it opens a BMP or PPM: text may
    start with their signatures (``BM``, ``P1``..)."""
    text = str(e).strip()  # (libheif's messages end in a newline)
    said = isinstance(e, EOFError) or "truncated" in text.lower()
    if libtiff:
        text += f" (libtiff: {'; '.join(libtiff)})"
    if (said and not (opening and fmt in ("BMP", "PPM"))) or _cut_short(data, fmt):
        return ImageError("truncated", f"{fmt} data ends early ({len(data)} bytes): {text or type(e).__name__}")
    if isinstance(e, MemoryError):
        return ImageError("decode_error", f"{fmt}: out of memory while decoding")
    return ImageError("decode_error", f"{fmt}: {type(e).__name__}: {text}")


def _open_formats() -> List[str]:
    from PIL import Image

    Image.init()
    return [f for f in IMAGE_FORMATS if f in Image.OPEN]  # MPO opens through the JPEG plugin


def decode_image(data: bytes, pixel_limit: int = DEFAULT_PIXEL_LIMIT) -> DecodedImage:
    """Decode encoded image bytes to RGB, or raise :class:`ImageError` (empty_file,
    not_an_image, too_many_pixels, truncated, decode_error).

    The pixel count is checked from the header, before any pixel is decoded: ``pixel_limit``
    replaces Pillow's own decompression-bomb check. Animated images give their first frame
    (``frames`` says how many there are).
    """
    from PIL import Image

    from .faces import pillow_pixel_limit_lifted

    if not data:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning, odd-metadata warnings
        for attempt in range(2):
            try:
                try:
                    return _decode(data, pixel_limit)
                except Image.DecompressionBombError:  # over twice Pillow's limit, which pixel_limit replaces
                    with pillow_pixel_limit_lifted():
                        return _decode(data, pixel_limit)
            except ImageError as e:
                if attempt or not png_text_too_large(e.message) or _signature(data) != "PNG":
                    raise
                data = without_png_text(data)
    raise AssertionError("unreachable")


def png_text_too_large(message: str) -> bool:
    """Whether Pillow refused a PNG for its metadata alone: text (tEXt, zTXt, iTXt) or an ICC
    profile (iCCP) over ``MAX_TEXT_CHUNK`` or ``MAX_TEXT_MEMORY``, guards for memory."""
    return "MAX_TEXT_" in message


_PNG_METADATA = (b"tEXt", b"zTXt", b"iTXt", b"iCCP")  # none of them changes the pixels decoded


def without_png_text(data: bytes) -> bytes:
    """A PNG less its text and ICC chunks (``_PNG_METADATA``): chunks are walked by their
    lengths, from the signature to IEND or the end of the data."""
    out, pos = [data[:8]], 8
    while pos + 8 <= len(data):
        end = pos + 12 + int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        if ctype not in _PNG_METADATA:
            out.append(data[pos:end])
        if ctype == b"IEND":
            break
        pos = end
    else:
        out.append(data[pos:])
    return b"".join(out)


def missing_reader(sig: Optional[str]) -> str:
    """For an image of format ``sig`` that this Pillow has no reader for (AVIF, HEIF), what
    would read it; else ``""``."""
    if sig not in ("AVIF", "HEIF") or sig in _open_formats():
        return ""
    how = ("pillow-heif (pip install pillow-heif, or fakespotter's heif extra)" if sig == "HEIF"
           else "a Pillow built with AVIF (the wheels of Pillow >= 11.3)")
    return f"a {sig} image: decoding it needs {how}; or convert it to JPEG or PNG"


def _decode(data: bytes, pixel_limit: int) -> DecodedImage:
    from PIL import Image, UnidentifiedImageError

    from .faces import _refusal, load_image, open_image

    sig = _signature(data)
    try:
        img = open_image(io.BytesIO(data))
    except UnidentifiedImageError:
        needs = missing_reader(sig)
        if needs:
            raise ImageError("not_an_image", needs) from None
        if sig is None:
            raise ImageError("not_an_image", f"not an image in a supported format "
                                             f"({', '.join(IMAGE_FORMATS)}); starts with {data[:8]!r}") from None
        if _cut_short(data, sig):
            raise ImageError("truncated", f"{sig} data ends early ({len(data)} bytes), inside its header") from None
        why = _refusal(io.BytesIO(data))  # a reader's own words: a 12-bit JPEG, a float RGB TIFF, ...
        raise ImageError("decode_error", why or f"has a {sig} signature, but its header cannot be read "
                                                f"(damaged, or cut short at {len(data)} bytes)") from None
    except Image.DecompressionBombError:
        raise
    except Exception as e:  # a plugin that fails while opening
        raise _decode_failure(e, data, sig or "image", opening=True) from None
    with img:
        fmt = img.format or sig or "image"
        width, height = img.size
        if width * height > pixel_limit:
            raise ImageError("too_many_pixels", f"{fmt} of {width}x{height} = {width * height} pixels, "
                                                f"more than the pixel limit {pixel_limit} (--pixel-limit)")
        if fmt == "TIFF":
            check_tiff_tiles(img, pixel_limit, "--pixel-limit")
        if fmt == "AVIF":
            check_avif_size(data, pixel_limit, "--pixel-limit")
        rgb = None
        if fmt in ("JPEG", "MPO"):
            try:
                rgb = jpeg_pixels(img, data)
            except MemoryError as e:
                raise _decode_failure(e, data, fmt) from None
        if rgb is None:
            if fmt == "PNG":
                _check_png_chunks(data)
            with _libtiff.collected(fmt == "TIFF") as said:
                try:
                    img.load()
                    if fmt == "PNG":
                        _check_png_data(img, data)
                    rgb = load_image(img)
                except (ImageError, Image.DecompressionBombError):
                    raise
                except Exception as e:
                    raise _decode_failure(e, data, fmt, libtiff=said) from None
            lost = _libtiff.codec_errors(said)
            if lost:
                raise ImageError("decode_error", f"TIFF: part of the image did not decode (libtiff: {'; '.join(lost)})")
            if fmt == "TIFF":
                check_tiff_jpeg(img, data)
            _check_bmff_whole(fmt, data)
        frames = _frame_count(img, data)
    return DecodedImage(rgb, int(rgb.shape[1]), int(rgb.shape[0]), frames)


def check_tiff_tiles(img: Any, pixel_limit: int, limit_name: str) -> None:
    """``too_many_pixels`` for a tiled TIFF one of whose tiles holds more pixels than
    ``pixel_limit``, or whose tiles together hold more than the limit and more than twice the
    image (more than an image's edge tiles pad): libtiff decodes every tile whole, whatever the
    image size says, so a 1 MB file declaring 100x100 pixels in one 20000x20000 tile took 1.2 GB,
    and an 11 KB one of 1000 tall tiles over a 16000x16 image 12 s of one native call."""
    tile_w, tile_h = img.tag_v2.get(322), img.tag_v2.get(323)  # TileWidth, TileLength
    if not isinstance(tile_w, int) or not isinstance(tile_h, int) or tile_w < 1 or tile_h < 1:
        return  # (strips, or tags libtiff refuses itself)
    width, height = img.size
    tiles = -(-width // tile_w) * -(-height // tile_h)
    covered = tiles * tile_w * tile_h
    if tile_w * tile_h > pixel_limit or (covered > pixel_limit and covered > 2 * width * height):
        raise ImageError("too_many_pixels", f"TIFF of {width}x{height} pixels in {tiles} tile{'s' * (tiles != 1)} of "
                                            f"{tile_w}x{tile_h}: decoding them covers {covered} pixels, more than the "
                                            f"pixel limit {pixel_limit} ({limit_name})")


def check_avif_size(data: bytes, pixel_limit: int, limit_name: str) -> None:
    """An AVIF coding a picture over the pixel limit, or larger than it declares, refused before
    decoding (``_avif.size_problem``): libavif decodes the coded picture whatever the ``ispe``
    box, from which Pillow takes the size the pixel limit is checked against."""
    problem = _avif.size_problem(data, pixel_limit, limit_name)
    if problem is not None:
        raise ImageError(*problem)


def is_tiff_jpeg(img: Any) -> bool:
    """Whether ``img`` (a TIFF) holds JPEG-compressed strips or tiles (Compression 7)."""
    return img.tag_v2.get(259) == 7


def check_tiff_jpeg(img: Any, data: bytes) -> None:
    """For a JPEG-compressed TIFF (:func:`is_tiff_jpeg`; loaded from ``data``), what the plain
    JPEG path refuses, strip by strip (or tile by tile): libjpeg's warnings inside libtiff reach
    no handler (Pillow turns libtiff's off while it decodes), and a strip whose data is damaged
    or cut short decoded with rows garbled or grey. Each strip, behind the tables of the
    JPEGTables tag, is a JPEG: ``truncated`` when it lacks its end marker, ``decode_error`` for
    the damage :func:`jpeg_pixels` refuses. Decodes each strip once more."""
    if not is_tiff_jpeg(img):
        return
    tiled = 324 in img.tag_v2
    offsets, counts = img.tag_v2.get(324 if tiled else 273), img.tag_v2.get(325 if tiled else 279)
    tables = img.tag_v2.get(347)
    if isinstance(offsets, int):
        offsets = (offsets,)
    if isinstance(counts, int):
        counts = (counts,)
    if not isinstance(offsets, tuple) or not isinstance(counts, tuple) or len(offsets) != len(counts):
        return  # (libtiff's to refuse)
    head = bytes(tables)[:-2] if isinstance(tables, (bytes, tuple)) and bytes(tables)[-2:] == b"\xff\xd9" else b""
    what = "tile" if tiled else "strip"
    for i, (offset, count) in enumerate(zip(offsets, counts)):
        part = data[offset:offset + count]
        if not part.startswith(b"\xff\xd8") or offset + count > len(data):
            continue  # (not JPEG data, or cut off with the file: libtiff's and the decoder's to report)
        if not part.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise ImageError("truncated", f"TIFF: the JPEG data of {what} {i} ends early (no end marker in its "
                                          f"{count} bytes)")
        jpeg = head + part[2:] if head else part
        damage = scan_damage(jpeg) or decode_rgb(jpeg)[1]
        if damage is not None:
            raise ImageError("decode_error", f"TIFF: damaged JPEG data in {what} {i}: {damage}")


def jpeg_pixels(img: Any, data: bytes) -> Optional[np.ndarray]:
    """The upright RGB pixels of the JPEG (or MPO) ``data`` that ``img`` (opened, not loaded)
    was opened from, decoded by simplejpeg (``_jpeg.decode_rgb``); None where Pillow should
    decode it (CMYK, or what simplejpeg declines). ImageError ``decode_error`` for a JPEG of more
    than MAX_JPEG_SCANS scans, damaged scan data (its markers, or libjpeg's warnings that data was
    lost; for CMYK, ``_jpeg.cmyk_damage``). MemoryError is the caller's."""
    from .faces import _orientation, upright_array

    _check_jpeg_scans(data)
    damage = scan_damage(data)  # what libjpeg would only warn about, filling in grey
    rgb = None
    if damage is None and img.mode in ("RGB", "L"):  # (CMYK: Pillow's own inversion rules)
        rgb, damage = decode_rgb(data)
    elif damage is None and img.mode == "CMYK":
        damage = cmyk_damage(data)
    if rgb is not None:
        rgb = upright_array(rgb, _orientation(img))
    if damage is not None:
        raise ImageError("decode_error", f"damaged JPEG data: {damage}")
    return rgb


_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff])")  # a marker (FF 00 is a stuffed FF byte of scan data)


def _check_jpeg_scans(data: bytes) -> None:
    """``decode_error`` for a JPEG whose first image has more than MAX_JPEG_SCANS scans (SOS
    segments): libjpeg decodes every scan over the whole image, so 10,000 near-empty scans of a
    9 MP image (a 150 kB file) take half a minute. The bytes FF DA are counted first (at memory
    speed); only when there are too many are the segments walked to count the real scans."""
    if data.count(b"\xff\xda") <= MAX_JPEG_SCANS:
        return
    scans, pos = 0, 2
    while scans <= MAX_JPEG_SCANS:
        m = _JPEG_MARKER.search(data, pos)
        if m is None or m.group(1) == b"\xd9":  # the end of the first image
            return
        pos = m.end()
        if m.group(1) == b"\x01" or b"\xd0" <= m.group(1) <= b"\xd8":  # no length (RSTn, SOI)
            continue
        if m.group(1) == b"\xda":
            scans += 1
        pos += int.from_bytes(data[pos:pos + 2], "big")  # past the segment; a scan's data is searched through
    raise ImageError("decode_error", f"JPEG of more than {MAX_JPEG_SCANS} scans (SOS segments): refused, as "
                                     f"decoding it could take minutes (a progressive JPEG has about 10)")


_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel, by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _check_png_data(img: Any, data: Union[bytes, Callable[[], bytes]]) -> None:
    """``truncated`` for a loaded PNG whose image data (the zlib stream of its IDAT chunks) ends
    before its image does. Pillow's decoder stops without an error where that stream ends on a
    row boundary, leaving the rows not reached zero; so the stream is inflated again (adding
    ~70% to the decode of a 12 MP PNG: benchmarks/RESULTS.md, "Decoding") only when the row the
    decoder writes last is all zero: the last row, or for an interlaced image the last odd row
    (Adam7's last pass). ``data``: the file's bytes, or a function that reads them (called only
    then)."""
    width, height = img.size
    if img.info.get("bbox", (0, 0, width, height)) != (0, 0, width, height):
        return  # (a bbox: an APNG whose first frame covers part of the image)
    interlaced = bool(img.info.get("interlace"))
    last = height - 1
    if interlaced:
        last -= 1 - last % 2  # the last odd row; -1 for an image of one row: checked whatever it holds
    if last >= 0 and img.crop((0, last, width, last + 1)).tobytes().strip(b"\x00"):
        return
    if callable(data):
        data = data()
    bits = data[24] * _PNG_SAMPLES.get(data[25], 0) if data[12:16] == b"IHDR" else 0
    if not bits:
        return
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    sizes = [((width - x + dx - 1) // dx, (height - y + dy - 1) // dy) for x, y, dx, dy in passes]
    need = sum(h * (1 + (w * bits + 7) // 8) for w, h in sizes if w > 0 and h > 0)
    got = _png_inflated_size(data, need)
    if got is not None and got < need:
        raise ImageError("truncated", f"PNG data ends early: the zlib stream of its image data (IDAT) holds "
                                      f"{got} of the {need} bytes of its {width}x{height} image")


def _check_png_chunks(data: bytes) -> None:
    """``decode_error`` for a PNG whose image data (an IDAT chunk) fails its CRC: Pillow checks
    the CRCs of the chunks it reads before the image data, not those of IDAT chunks (nor zlib's
    Adler-32 once every row is filled), so a flipped bit there decodes to garbled rows without
    an error. Also for a palette PNG without a palette (PLTE) before its image data, which the
    PNG standard requires and Pillow decodes in one colour. Chunks are walked as far as they
    hold together: a damaged length or a cut is the decoder's to report. 6 ms for a 12 MP PNG
    of 23 MB, 2.7% of its decode here."""
    pos, view = 8, memoryview(data)
    palette = data[12:16] == b"IHDR" and len(data) > 25 and data[25] == 3
    while pos + 12 <= len(data):
        length, ctype = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        end = pos + 12 + length
        if length > 0x7FFFFFFF or not ctype.isalpha() or end > len(data) or ctype == b"IEND":
            return
        if ctype == b"PLTE":
            palette = False
        if ctype == b"IDAT" and palette:
            raise ImageError("decode_error", f"damaged PNG: a palette image (colour type 3) without a palette "
                                             f"(PLTE chunk) before its image data (the IDAT chunk at byte {pos})")
        if ctype == b"IDAT" and zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise ImageError("decode_error", f"damaged PNG image data: the IDAT chunk at byte {pos} fails its CRC "
                                             f"check")
        pos = end


def _png_inflated_size(data: bytes, limit: int) -> Optional[int]:
    """How many bytes the zlib stream of a PNG's IDAT chunks inflates to, counted up to
    ``limit``; None when that stream is damaged."""
    inflate = zlib.decompressobj()
    got, pos, seen = 0, 8, False
    try:
        while pos + 8 <= len(data) and got < limit and not inflate.eof:
            length, ctype = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
            if ctype == b"IDAT":
                seen = True
                chunk = memoryview(data)[pos + 8:pos + 8 + length]
                for at in range(0, len(chunk), 1 << 20):  # (slices: each call copies its unused input)
                    piece: Any = chunk[at:at + (1 << 20)]
                    while piece and got < limit and not inflate.eof:
                        got += len(inflate.decompress(piece, 1 << 20))
                        piece = inflate.unconsumed_tail
            elif seen:  # the IDAT chunks are consecutive
                break
            pos += 12 + length
    except zlib.error:
        return None
    return got


MAX_COUNTED_PAGES = 1000


def _frame_count(img: Any, data: bytes) -> Optional[int]:
    """How many frames an opened image has; None when that is not known: a damaged later frame
    (an animated GIF cut short), a TIFF of more than MAX_COUNTED_PAGES pages (Pillow counts
    TIFF pages in quadratic time: a 5.7 MB file of 50,000 pages took a minute), or an APNG
    whose frame control chunks (fcTL) do not match the frame count it declares (acTL), or
    number more than MAX_COUNTED_PAGES."""
    try:
        if img.format == "TIFF":  # page by page (after a failed seek, Pillow's n_frames is one too many)
            for page in range(1, MAX_COUNTED_PAGES + 1):
                try:
                    img.seek(page)
                except EOFError:
                    return page
            return None
        frames = int(getattr(img, "n_frames", 1))
        if img.format == "PNG" and frames > 1 and _apng_frames(data) != frames:
            return None
        if img.format == "GIF" and frames > 1 and _gif_cut(data):
            return None  # Pillow counts a frame cut short
        return frames
    except Exception:
        return None


def _apng_frames(data: bytes) -> Optional[int]:
    """The frames of an APNG as Pillow numbers them: one a frame control chunk (fcTL), and the
    default image if its IDAT comes before the first fcTL; None past MAX_COUNTED_PAGES."""
    controls, default, pos = 0, 0, 8
    while pos + 8 <= len(data) and controls <= MAX_COUNTED_PAGES:
        ctype = data[pos + 4:pos + 8]
        if ctype == b"fcTL":
            controls += 1
        elif ctype == b"IDAT" and controls == 0:
            default = 1
        elif ctype == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return controls + default if controls <= MAX_COUNTED_PAGES else None
