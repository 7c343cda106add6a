"""Writing an output whole or not at all: a temporary file beside it, renamed over it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, Union


def write_atomic(path: Union[str, Path], data: Union[str, bytes, Callable[[str], None]], fsync: bool = True,
                 replace: bool = True) -> Path:
    """Write ``data`` (text, bytes, or a function that writes the path it is given, such as
    ``savefig``) under a temporary name beside ``path`` and rename it over ``path``: ``path`` is
    its old self or complete, whatever happens (a full disk, Ctrl-C, a kill). A symbolic link
    at ``path`` is replaced, not written through. The mode is open()'s, 0666 less the umask
    (mkstemp's would be 0600). Text is UTF-8, with the bytes of non-UTF-8 file names kept. An
    OSError names ``path``; the temporary file is removed on any failure.

    ``replace=False``: a file that exists at ``path`` when the data is in place (made since the
    caller checked, say, by another run) is kept, and :class:`FileExistsError` raised; the new
    file is linked in under ``path`` (no window between a check and a rename), or where the file
    system has no hard links, checked for and renamed."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if callable(data):
            os.close(fd)
            data(str(tmp))
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, FileExistsError) and e.filename in (None, str(tmp)):
            # (a full disk: name the output; _link_new's refusal names it already)
            e.filename = str(path)
        raise
    return path


def _link_new(tmp: Path, path: Path) -> None:
    """``tmp`` renamed to ``path`` unless something is at ``path`` (FileExistsError)."""
    exists = FileExistsError(f"{path} already exists (it appeared while this was being written); it was kept")
    try:
        os.link(tmp, path)
    except FileExistsError:
        if os.stat(tmp).st_nlink == 2:  # NFS: a retried link that had made it the first time
            tmp.unlink()
            return
        raise exists from None
    except OSError:  # no hard links here (EPERM, ENOTSUP, EXDEV, ...): a check, then a rename
        if os.path.lexists(path):
            raise exists from None
        os.replace(tmp, path)
        return
    tmp.unlink()
