"""Finding the images of a corpus: folders (recursive), file lists and single files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Union

__all__ = ["IMAGE_EXTENSIONS", "list_images"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def list_images(source: Union[str, Path], what: str = "input") -> List[Path]:
    """The image files of ``source``, sorted: a folder (searched recursively, symlink loops
    skipped), ``@list.txt`` (one path per line, relative to the list's folder), or one file.

    Raises FileNotFoundError / ValueError naming ``what`` and the path when there is nothing.
    """
    text = str(source)
    if text.startswith("@"):
        listing = Path(text[1:])
        if not listing.is_file():
            raise FileNotFoundError(f"{what}: file list {listing} does not exist")
        base = listing.parent
        paths = []
        for line in listing.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                paths.append(p if p.is_absolute() else base / p)
        if not paths:
            raise ValueError(f"{what}: file list {listing} names no files")
        return paths
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what}: {path} is neither a file nor a folder")
    found = sorted(_walk(path))
    if not found:
        raise ValueError(f"{what}: folder {path} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def _walk(root: Path) -> Iterable[Path]:
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or the same folder reached twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name
