"""How an error is said in one line (CLI messages, errors that wrap another)."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """An error's message in one line: its first non-blank line, stripped, or its type's name
    when it has none (``AssertionError()``, a user module's bare ``RuntimeError()``)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
