"""libtiff's error messages, into the error of the file they are about.

Pillow decodes compressed TIFFs with libtiff, whose errors ("LZWDecode: Not enough data at
scanline 216", "ZIPDecode: Decoding error at scanline 0, incorrect data check") go to libtiff's
error handler, by default a print to stderr; Pillow then raises only "decoder error -2". A scan
of many damaged TIFFs printed a line each through its progress bar, none saying which file.

:func:`collected` installs a handler (once per process) in the libtiff that Pillow loaded: in
a ``collected()`` block its messages are kept, for the caller to put in the file's error;
elsewhere they go to the handler that was there before (libtiff's print to stderr). The
handler receives libtiff's ``va_list`` as a pointer and formats it with C's ``vsnprintf`` (a
``va_list`` argument is passed as a pointer on x86-64 and AArch64 Linux and macOS). Where the
library cannot be found (not Linux or macOS, a Pillow without libtiff) nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import re
import sys
import threading
from typing import Iterator, List, Optional

_local = threading.local()
_lock = threading.Lock()
_installed: Optional[bool] = None
_keep: list = []  # the callback and library handles, alive for the process's life

_MAX_MESSAGES = 4  # a damaged file may report each of thousands of strips
# a codec's own messages: libjpeg's ("JPEGLib: ..."), a decoder's ("LZWDecode: ...", "JPEGPreDecode: ...")
_CODEC = re.compile(r"(JPEGLib|OJPEG\w*|\w*Decode\w*): ")


def _library_path() -> Optional[str]:
    """The libtiff file that Pillow's ``_imaging`` loaded, if any."""
    from PIL import Image  # noqa: F401  (loads _imaging, and with it libtiff)

    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    path = line.rstrip("\n").split(None, 5)[-1]
                    if os.path.basename(path).startswith("libtiff") and ".so" in path:
                        return path
        except OSError:
            return None
    elif sys.platform == "darwin":
        import PIL

        found = glob.glob(os.path.join(os.path.dirname(PIL.__file__), ".dylibs", "libtiff*.dylib"))
        return found[0] if found else None
    return None


def _install() -> bool:
    path = _library_path()
    if path is None:
        return False
    try:
        lib = ctypes.CDLL(path)
        vsnprintf = ctypes.CDLL(None).vsnprintf
        set_handler = lib.TIFFSetErrorHandler
    except (OSError, AttributeError):
        return False
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    vsnprintf.restype = ctypes.c_int
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)

    previous: list = []  # the handler that was there (libtiff's print to stderr), for messages outside a block

    def on_error(module: Optional[bytes], fmt: Optional[bytes], args: Optional[int]) -> None:
        kept = getattr(_local, "messages", None)
        if kept is None:
            if previous:
                previous[0](module, fmt, args)
            return
        if len(kept) >= _MAX_MESSAGES:
            return
        buf = ctypes.create_string_buffer(1024)
        if fmt is not None:
            vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode("utf-8", "replace")
        # (Pillow names every file it hands libtiff "tempfile.tif": no use to anyone)
        where = (module or b"").decode("utf-8", "replace")
        kept.append(text if not where or where == "tempfile.tif" else f"{where}: {text}")

    callback = handler_type(on_error)
    set_handler.argtypes = [handler_type]
    set_handler.restype = ctypes.c_void_p
    old = set_handler(callback)
    if old:
        previous.append(handler_type(old))
    _keep.extend([lib, vsnprintf, callback, previous])
    return True


@contextlib.contextmanager
def collected(active: bool = True) -> Iterator[List[str]]:
    """A list that gathers libtiff's error messages (at most a few) while the block runs in
    this thread; empty where they cannot be caught, or when not ``active`` (nothing done: for
    callers that decode a TIFF now and then)."""
    global _installed
    if not active:
        yield []
        return
    if _installed is None:
        with _lock:
            if _installed is None:
                _installed = _install()
    outer = getattr(_local, "messages", None)
    messages: List[str] = []
    _local.messages = messages
    try:
        yield messages
    finally:
        _local.messages = outer


def codec_errors(messages: List[str]) -> List[str]:
    """Of the ``messages`` of a :func:`collected` block, those a codec gave: errors that cost a
    strip or tile its pixels, also where the decode went on (libjpeg failing on one strip of a
    JPEG-compressed TIFF: Pillow loads the image with that strip left black)."""
    return [m for m in messages if _CODEC.match(m)]
