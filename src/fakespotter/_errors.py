"""How an error is said: in one line (CLI messages, errors that wrap another), and why an output
folder cannot be written."""

from __future__ import annotations

import os
from pathlib import Path


def first_line(e: BaseException) -> str:
    """An error's message in one line: its first non-blank line, stripped, or its type's name
    when it has none (``AssertionError()``, a user module's bare ``RuntimeError()``)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def why_not_writable(folder: Path) -> str:
    """" (a read-only file system)" when ``folder`` is on one (else "": permissions), for the
    message that refuses an output there."""
    try:
        return " (a read-only file system)" if os.statvfs(folder).f_flag & os.ST_RDONLY else ""
    except (OSError, AttributeError):
        return ""
