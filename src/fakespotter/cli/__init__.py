"""The ``fakespotter`` command line: one module per subcommand, each a thin shell over the
library (``add_parser`` builds its arguments, ``run`` does the work). Exit codes: 0 success,
1 the work ran but some inputs failed, 2 usage error (reported before any work starts)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from . import calibrate, data, env, evaluate, info, merge, robustness, scan, train

COMMANDS = {"scan": scan, "merge": merge, "train": train, "calibrate": calibrate, "evaluate": evaluate,
            "robustness": robustness, "data": data, "info": info, "env": env}


class UsageError(Exception):
    """Bad arguments found after parsing (missing folder, unwritable output, ...): exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fakespotter",
        description="Spot AI-synthesized faces from the neuron activations of a frozen face-recognition CNN.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so outputs are closed and stats written."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f"fakespotter {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fakespotter {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"fakespotter {args.command}: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # e.g. `fakespotter info ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush is quiet
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
