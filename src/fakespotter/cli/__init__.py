"""The ``fakespotter`` command line: one module per subcommand, each a thin shell over the
library (``add_parser`` builds its arguments, ``run`` does the work). Exit codes: 0 success,
1 the work ran but some inputs failed, 2 usage error (reported before any work starts), 3 an
output could not be written (a full disk, a file size limit, a read-only mount), 130 / 143
interrupted (Ctrl-C / SIGTERM)."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from typing import Any, Optional, Sequence

from .. import _quiet_start

_quiet_start()  # (the command's imports go on here, until main() handles KeyboardInterrupt)

from .._errors import first_line  # noqa: E402
from .._malloc import keep_freed_memory  # noqa: E402
from . import calibrate, data, env, evaluate, info, merge, robustness, scan, train  # noqa: E402

COMMANDS = {"scan": scan, "merge": merge, "train": train, "calibrate": calibrate, "evaluate": evaluate,
            "robustness": robustness, "data": data, "info": info, "env": env}


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class UsageError(Exception):
    """Bad arguments found after parsing (missing folder, unwritable output, ...): exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fakespotter",
        description="Spot AI-synthesized faces from the neuron activations of a frozen face-recognition CNN.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"fakespotter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so outputs are closed and stats written."""


def _terminate(signum, frame) -> None:
    raise Terminated()


class _Stream:
    """sys.stdout / sys.stderr, telling a reader that left apart. stdout: ``broken`` is set and
    the BrokenPipeError goes on (``| head`` ends the command). stderr (progress, notices,
    summary; ``2>&1 | tee log`` whose reader died): from then on it goes to /dev/null and the
    work goes on, so a scan never stops half-way with exit 0."""

    def __init__(self, stream: Any, fd: int) -> None:
        self.stream, self.fd, self.broken = stream, fd, False

    def _left(self) -> None:
        self.broken = True
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.fd)  # what is still buffered goes there too
        os.close(null)

    def write(self, text: str) -> int:
        if self.fd == 2 and not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a file name's bytes that are not UTF-8: \xNN, as records write them
                from ..scan import _utf8

                text = _utf8(text)
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._left()
            if self.fd == 1:
                raise
            return len(text)
        except OSError as e:  # (a full disk under `> file`: say which output)
            raise self._named(e) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._left()
            if self.fd == 1:
                raise
        except OSError as e:
            raise self._named(e) from None

    def _named(self, e: OSError) -> OSError:
        if e.filename is None:
            e.filename = ("stdout", "stderr")[self.fd - 1]
        return e

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _Closed:
    """A standard stream the command was started without (``>&-``: Python's ``sys.stdout`` is
    None). stdout: writing to it fails as a full disk does, naming it, so records are never
    lost in silence; stderr: what is said goes nowhere, and the work goes on."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> int:
        if self.fd == 1:
            raise OSError(errno.EBADF, "it was closed when the command started", "stdout")
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "it was closed when the command started", ("stdout", "stderr")[self.fd - 1])


def _check_cpu_isa() -> None:
    """A bad FAKESPOTTER_CPU_ISA is refused before any work, not at the first packing op."""
    from .. import _C

    try:
        _C.cpu_isa()
    except ValueError as e:
        raise UsageError(first_line(e)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, _ = (_Stream(sys.stdout or _Closed(1), 1),
                                       _Stream(sys.stderr or _Closed(2), 2))
    name = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))  # "data build"
    from .. import _interrupted_while_starting

    command_line = signal.getsignal(signal.SIGINT) is _interrupted_while_starting  # (the console script's)
    try:
        if command_line:  # the command's start-up is over: KeyboardInterrupt is handled below
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if args.command != "env":  # env reports it instead: it is what a bug report asks for
            _check_cpu_isa()
        keep_freed_memory()  # forwards reuse their memory instead of faulting it in each time
        from ..data import quiet_pillow_logs

        quiet_pillow_logs()
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f"fakespotter {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fakespotter {name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"fakespotter {name}: terminated", file=sys.stderr)
        return 143
    except MemoryError as e:  # (a scan's forward of one chip, a load, ...): what was written stays
        said = first_line(e)  # (numpy's: "Unable to allocate 2.25 MiB for an array ...")
        print(f"fakespotter {name}: error: {said if 'memory' in said.lower() else 'out of memory: ' + said}",
              file=sys.stderr)
        return 1
    except BrokenPipeError as e:
        if out.broken:  # e.g. `fakespotter info ... | head`: the reader left; no traceback
            return 0
        print(f"fakespotter {name}: error: {e}", file=sys.stderr)  # another pipe: not success
        return 1
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            # a full disk, a file size limit, a read-only mount: each command writes its files
            # through a temporary name (or says how to go on), so none is left half-written
            print(f"fakespotter {name}: error: cannot write {e.filename or 'an output'}: "
                  f"{e.strerror or e}", file=sys.stderr)
            return 3
        if e.filename is None:  # not about a file: a bug to report, with its traceback
            raise
        print(f"fakespotter {name}: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        sys.stdout, sys.stderr = saved
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if command_line:  # a Ctrl-C while the interpreter exits: quiet too, not a traceback
            signal.signal(signal.SIGINT, _interrupted_while_starting)
