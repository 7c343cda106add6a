"""fakespotter: spot AI-synthesized faces by monitoring the neurons of a frozen face CNN.

Importing the package loads the native library, which registers ``torch.ops.fakespotter.*``.
"""

from __future__ import annotations

import multiprocessing as _mp
import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_starting(signum, frame) -> None:
    """The ``fakespotter`` command's Ctrl-C before its ``main`` runs: no traceback of an import."""
    _os.write(2, b"fakespotter: interrupted\n")
    _os._exit(130)


def _terminated_while_starting(signum, frame) -> None:
    """The command's SIGTERM outside its ``main`` (its imports, its exit): exit 143 as ``main``
    gives it, not death by the signal."""
    _os.write(2, b"fakespotter: terminated\n")
    _os._exit(143)


def _run_as_the_command() -> bool:
    """This process is the ``fakespotter`` command: its console script, or ``python -m fakespotter``
    (whose ``argv[0]`` is ``-m`` while this package is imported, then the path of ``__main__.py``)."""
    if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "fakespotter":
        return True
    args = list(getattr(_sys, "orig_argv", ()))[1:]  # the interpreter's options, then -m MODULE, -c or a script
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-m"):
            return (a[2:] or (args[i + 1] if i + 1 < len(args) else "")) == "fakespotter"
        if a == "-" or a.startswith("-c") or not a.startswith("-"):
            return False
        i += 2 if a in ("-X", "-W") else 1
    return False


def _quiet_start() -> None:
    """In the ``fakespotter`` command (also as ``python -m fakespotter``), a Ctrl-C or SIGTERM
    during its imports (torch takes a second or two) ends it quietly (exit 130 / 143); Python's
    handlers are back at the end of this package's imports (a program of the same name keeps
    them), and again once ``cli.main`` handles KeyboardInterrupt and SIGTERM (``cli`` installs
    these again as it is imported: the command's imports go on there)."""
    # (not in a forkserver, which imports the command's script as an __mp_main__ of its own but
    # never runs main; in the command, multiprocessing makes __mp_main__ another name of __main__)
    main = _sys.modules.get("__main__")
    if _run_as_the_command() and _mp.parent_process() is None and _sys.modules.get("__mp_main__", main) is main:
        if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
            _signal.signal(_signal.SIGINT, _interrupted_while_starting)
        if _signal.getsignal(_signal.SIGTERM) == _signal.SIG_DFL:
            _signal.signal(_signal.SIGTERM, _terminated_while_starting)


def _in_forkserver_start() -> bool:
    """Imported by a multiprocessing forkserver as it starts (its preload modules): a scan's
    decode workers' server, or a caller's own server that preloads fakespotter; not by a
    process forked from a server (``_serve_one``), whose stack holds the server's too."""
    forkserver = _sys.modules.get("multiprocessing.forkserver")
    frame = _sys._getframe(1) if forkserver is not None else None
    while frame is not None:
        if frame.f_code is forkserver._serve_one.__code__:
            return False
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


_quiet_start()
# A forkserver starts with Python's SIGINT handler (its parent's blocked mask is not inherited):
# a Ctrl-C to the process group while it imports torch here would kill it with a traceback. It
# ignores SIGINT until this package is imported, then has Python's handler again, which its
# processes inherit; the server ignores SIGINT itself from then on. (Not covered: the server's
# first ~30 ms, its interpreter's start and multiprocessing's imports, before it gets here.)
_sigint_before = _signal.signal(_signal.SIGINT, _signal.SIG_IGN) if _in_forkserver_start() else None

import torch  # noqa: E402,F401  (the native library links against torch's; load it first)

try:
    from . import _C  # noqa: F401  (registers the ops)
except ImportError as _e:  # (an undefined symbol: built against another torch release than this one)
    raise ImportError(f"fakespotter's native library cannot be loaded with torch {torch.__version__}: {_e}. It is "
                      f"built against one torch release: if torch changed since, or the package was built without "
                      f"--no-build-isolation (against the torch pip fetched for the build), rebuild it against "
                      f"this torch: pip install --no-build-isolation --force-reinstall --no-deps "
                      f"FAKESPOTTER_SOURCE") from _e
from . import _meta  # noqa: F401  (their shape functions)
from .ops import (
    bitset_linear,
    bitset_table,
    layer_popcount,
    num_words,
    quantize_linear,
    threshold_pack,
    threshold_pack_into,
    unpack_bits,
)
from .backbones import (
    DEFAULT_BACKBONE,
    Backbone,
    Preprocessing,
    custom_backbone,
    get_backbone,
    list_backbones,
    list_layers,
    register_backbone,
)
from .taps import Tap, TapLayout, export_tap, load_script_tap, script_tap
from .calibration import ThresholdCalibrator, Thresholds
from .features import Chips, Features, chips, features, mnc
from .classifier import BitsetLogisticClassifier, BitsetMLPClassifier
from .detector import FakeSpotter
from .scan import CompileError, WorkerStartError, scan
from .scan_ray import merge_shards, ray_scan  # imports Ray only when a Ray scan starts

__version__ = _C.build_info()["version"]


def _torch_build_mismatch() -> str:
    """Why the native library may not work with this torch ("" when it was built against this
    torch's release): pip builds it in an isolated environment, against whatever torch it
    fetches there, unless told ``--no-build-isolation``; or torch was upgraded since."""
    built = _C.build_info()["torch_version"]
    if built.split("+")[0].split(".")[:2] == str(torch.__version__).split("+")[0].split(".")[:2]:
        return ""
    return (f"fakespotter's native library was built against torch {built}, and this is torch {torch.__version__}: "
            f"its ops may fail to load or misbehave. Rebuild it against this torch (pip install --no-build-isolation "
            f"--force-reinstall --no-deps FAKESPOTTER_SOURCE), or install torch {built.split('+')[0]}")


if _torch_build_mismatch():
    import warnings as _warnings

    _warnings.warn(_torch_build_mismatch(), RuntimeWarning, stacklevel=2)

if _sigint_before is not None:
    _signal.signal(_signal.SIGINT, _sigint_before)
if _signal.getsignal(_signal.SIGINT) is _interrupted_while_starting:  # (the package's imports are done)
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
if _signal.getsignal(_signal.SIGTERM) is _terminated_while_starting:
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)

__all__ = [
    "__version__",
    # native ops
    "threshold_pack",
    "threshold_pack_into",
    "layer_popcount",
    "unpack_bits",
    "num_words",
    "quantize_linear",
    "bitset_table",
    "bitset_linear",
    # backbones and taps
    "DEFAULT_BACKBONE",
    "Backbone",
    "Preprocessing",
    "custom_backbone",
    "get_backbone",
    "list_backbones",
    "list_layers",
    "register_backbone",
    "Tap",
    "TapLayout",
    "export_tap",
    "load_script_tap",
    "script_tap",
    "ThresholdCalibrator",
    "Thresholds",
    # images to rows
    "Chips",
    "Features",
    "chips",
    "features",
    "mnc",
    # classifiers and the detector
    "BitsetMLPClassifier",
    "BitsetLogisticClassifier",
    "FakeSpotter",
    # corpora
    "scan",
    "CompileError",
    "WorkerStartError",
    "ray_scan",
    "merge_shards",
]
