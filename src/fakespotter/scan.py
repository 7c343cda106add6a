"""Scanning corpora: one record per input image, in input order, streaming.

>>> for record in scan(["photos/", "more.tar"], "detector.fsm"):     # doctest: +SKIP
...     print(record["path"], record["status"], record["score"], record["label"])

How the work is split: the parent lists the inputs lazily (``data.iter_entries``) and hands
small chunks of them to ``workers`` processes, which read, hash, decode and detect/align faces
(``workers=0`` does this inline). At most a fixed window of chunks is in flight and results are
taken back in submission order, so memory is bounded by the window (and by the bytes of the tar
members its chunks hold: :data:`IN_FLIGHT_BYTES`), never by the number of records (the listing
holds each folder's sorted entries on the current path), and
records come out in the input listing order whatever the timing. The parent gathers the chips
and runs backbone + tap + classifier under ``torch.inference_mode`` on exactly ``batch_size``
chips per forward (the last one zero-padded): oneDNN may round differently for another batch
size, so a fixed size makes an image's score independent of its neighbours, of ``workers`` and
of where an interrupted scan was resumed. A record is yielded as soon as all its faces are
scored (see :meth:`ScanRun.batches` for the groups a writer flushes together).

Records (:data:`RECORD_FIELDS`): ``path`` (``archive.tar::member`` for tar members), ``size``
(bytes) and ``sha256`` of the content, ``status`` (``ok``, ``no_face`` or ``error``),
``width``/``height`` of the decoded (EXIF-upright) image, ``frames`` (animated images: how many;
only the first is scored; null when unknown: a damaged later frame, a TIFF of over 1000 pages, an APNG whose frames are not the count it declares), ``faces`` (``{"box": [x0, y0, x1, y1], "detector_score", "score"}``
per face, highest detector score first; one whole-image box with ``detector_score`` null in
aligned mode), ``score`` (the largest face logit of "fake"; null without a face or on error:
never a made-up score), ``label`` (``"real"``/``"fake"`` at the model's operating threshold,
null without a score), ``model`` (the model file's sha256), ``error_kind`` (a key of
``data.ERROR_KINDS``) and ``error`` (a message). Records hold no timing, so two scans of the
same inputs with the same model and batch size give identical records (on one device, at one
precision, compiled or not: ``autocast`` and ``compile`` change the scores slightly; an
out-of-memory back-off changes the batch size for the rest of the run, see :func:`scan`).

Outputs (:class:`RecordWriter`): JSON lines and CSV, flushed and fsynced per group, so a killed
scan loses at most a torn last line; Parquet (pyarrow), a folder of part files that become
durable one part at a time (:class:`ParquetParts`). All three resume (:func:`resume_state`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import gc
import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import shlex
import re
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import IO, Any, Callable, Container, Dict, Generator, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

try:
    import resource  # (imported now: with no file descriptor left, importing it would fail too)
except ImportError:  # not a Unix
    resource = None  # type: ignore[assignment]

import numpy as np

from ._atomic import write_atomic
from ._errors import first_line
from .data import (DEFAULT_PIXEL_LIMIT, Entry, ImageError, check_sources, decode_image, iter_entries, quiet_pillow_logs,
                   read_entry)
from .faces import check_detect_pixels, check_weak_face_score

__all__ = [
    "RECORD_FIELDS",
    "STATUSES",
    "ScanRun",
    "CompileError",
    "WorkerStartError",
    "scan",
    "default_workers",
    "check_device",
    "precision_of",
    "RecordWriter",
    "ResumeState",
    "OutputMismatch",
    "read_output",
    "read_records",
    "resume_state",
    "ParquetParts",
    "parquet_schema",
]

RECORD_FIELDS = ("path", "size", "sha256", "status", "width", "height", "frames", "faces", "score", "label",
                 "model", "error_kind", "error")
STATUSES = ("ok", "no_face", "error")
FORMATS = ("jsonl", "csv", "parquet")

# Faces that have waited this long for a full batch are scored in a partial one (zero-padded: the
# same scores, at the cost of at most one extra forward per period), and records are given out at
# least this often: slow images (large photos) are written as they go.
STALL_FLUSH_S = 30.0

# Decoded records held behind one that waits for its faces to be scored: past this many, the
# waiting faces are scored in a partial (zero-padded, so same-score) forward. Without it a face
# followed by a run of fast records (errors, no_face) held every record decoded in
# STALL_FLUSH_S (~1.3 KB each: 360k records, +550 MB, measured) and wrote them as one group.
MAX_HELD_RECORDS = 4096

# A decode worker gives up on a file after this long (read, hash, decode, detect faces): a
# ``timeout`` record, and the worker goes on. Normal photos take well under 10 s; what takes
# longer is a file built to (a flood of PNG chunks: ~5 us each, 450 s for a 1 GB file).
FILE_TIMEOUT_S = 120.0
# The per-file limit is an alarm, seen between Python steps: a native call that never returns (a
# decoder's endless loop, a read from a hung network file system) would hold its worker, and the
# scan, for good. The scan's own process stops a worker whose files take this much longer than
# their limits together (the margin covers the worker's start-up and its first file's loading
# of dlib's models) and gives the file a ``timeout`` record.
STUCK_GRACE_S = 60.0

# A pool notices at once a worker that dies between results; one that dies while it writes a
# result leaves the pool waiting for the rest: the scan stops the pool's workers when one has
# been dead this long (looked for every DEAD_WORKER_CHECK_S) and the pool has not broken.
DEAD_WORKER_CHECK_S = 1.0
DEAD_WORKER_GRACE_S = 5.0

# Tar members are read in the scan's own process (a compressed archive cannot be read at random
# offsets) and travel to the workers with their chunk: a chunk ends at this many bytes of them, and
# no further chunk is handed out while the chunks in flight hold this many (a .tar.gz of 250 MB
# zero-filled members once held 4.9 GB here; one member of up to data.MAX_FILE_BYTES still goes).
CHUNK_BYTES = 64 << 20
IN_FLIGHT_BYTES = 512 << 20

_CRASH_ENV = "FAKESPOTTER_SCAN_TEST_CRASH"  # tests: a worker exits hard on paths ending with this
_START_CRASH = ":start:"  # ... or as it starts, when the variable says this
_HANG_ENV = "FAKESPOTTER_SCAN_TEST_HANG"  # tests: a worker hangs, deaf to its alarm, on paths ending with this


def _default_log(message: str) -> None:
    logging.getLogger(__name__).warning(message)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Decode workers when none is given: the usable CPUs, from 1 to 8. Decoding and face
    detection cost more than the forward (a 12 MP photo: ~2 s against ~10 ms a face), so the
    parent mostly waits: on 2 CPUs, 2 workers scanned 12 MP photos 1.76x as fast as 1, and
    headshots 1.32x (benchmarks/RESULTS.md, "Decode workers")."""
    return max(1, min(8, usable_cpus()))


# ----------------------------------------------------------------------------------------------
# worker side: bytes -> hash -> pixels -> face chips


class _Config(NamedTuple):
    aligned: bool
    size: int
    upsample: int
    pixel_limit: int
    weak_face_score: float
    detect_pixels: int
    file_timeout: float = 0.0  # seconds a worker spends on a file at most; 0: no limit


def _new_result(entry: Entry) -> Dict[str, Any]:
    return {"path": entry.path, "size": None, "sha256": None, "width": None, "height": None, "frames": None,
            "faces": [], "chips": None, "seconds": 0.0, "error": None}


def _decode_one(entry: Entry, cfg: _Config, out: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Everything a record needs but the scores, filled into ``out`` (a :func:`_new_result`) as
    it is learnt; never raises for a bad input."""
    t0 = time.perf_counter()
    out = _new_result(entry) if out is None else out
    try:
        data = read_entry(entry)
        out["size"] = len(data)
        out["sha256"] = hashlib.sha256(data).hexdigest()
        img = decode_image(data, cfg.pixel_limit)
        del data
        h, w = img.rgb.shape[:2]
        out.update(width=int(w), height=int(h), frames=img.frames)
        from . import faces as F

        if cfg.aligned:
            try:
                out["chips"] = F.chip_from_aligned(img.rgb, size=cfg.size)[None]
            except ValueError as e:
                raise ImageError("not_a_chip", str(e).split(": ", 1)[1]) from None
            out["faces"] = [([0, 0, int(w), int(h)], None)]
        else:
            try:
                found = F.detect_and_align(img.rgb, upsample=cfg.upsample, size=cfg.size,
                                           weak_face_score=cfg.weak_face_score, detect_pixels=cfg.detect_pixels)
            except Exception as e:
                raise ImageError("face_detection_error", f"{type(e).__name__}: {e}") from None
            if found:
                out["chips"] = np.stack([f.chip for f in found])
                out["faces"] = [([int(v) for v in f.box], float(f.score)) for f in found]
    except ImageError as e:
        out["error"] = (e.kind, e.message)
    except Exception as e:  # a bug, or an environment problem: recorded, never a crash of the scan
        out["error"] = ("internal_error", f"{type(e).__name__}: {e}")
    if out["error"] is not None:
        out["chips"], out["faces"] = None, []
    out["seconds"] = time.perf_counter() - t0
    return out


def _decode_chunk(entries: List[Entry], cfg: _Config) -> List[Dict[str, Any]]:
    """In a decode worker: :func:`_decode_one` for each entry, within ``cfg.file_timeout``."""
    crash, hang = os.environ.get(_CRASH_ENV), os.environ.get(_HANG_ENV)
    if crash and any(e.path.endswith(crash) for e in entries):
        os._exit(70)
    if hang and any(e.path.endswith(hang) for e in entries):  # as a native call that never returns
        import signal

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(1e6)
    return [_decode_timed(e, cfg) for e in entries]


class _FileTimeout(BaseException):
    """Raised by the worker's alarm: a BaseException, so that no ``except Exception`` on the
    way (a decoder's error handling) takes it for the file's own error."""


_WARM = False  # (this worker ran _warm_up)


def _warm_up(cfg: _Config) -> None:
    """What a worker's first file would start (Pillow's plugins, dlib and its landmark model),
    done before any file's time runs: an alarm that stopped a native extension's first import
    would leave it broken for every later file of the worker (dlib: "initialization failed")."""
    global _WARM
    if _WARM:
        return
    _WARM = True
    from . import faces as F
    from .data import _open_formats

    _open_formats()
    if not cfg.aligned:
        try:
            F._detector()
            F._predictor(F._landmark_path())
        except Exception:  # (dlib or its weights missing: each file's record says so)
            pass


def _alarm_free() -> bool:
    """SIGALRM is free for the per-file timer: the main thread (where Python runs handlers), no
    handler of anyone else's, no interval timer armed. Always so in a decode worker; with
    ``workers=0``, in a program that does not use SIGALRM itself."""
    import signal

    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))


def _decode_timed(entry: Entry, cfg: _Config) -> Dict[str, Any]:
    """:func:`_decode_one`, stopped by SIGALRM after ``cfg.file_timeout`` seconds. The alarm is
    seen between Python steps: a single native call (one libjpeg decode, one detector pass) runs
    to its end first. Untimed where SIGALRM is not ours to take (:func:`_alarm_free`)."""
    import signal

    if not cfg.file_timeout or not _alarm_free():
        return _decode_one(entry, cfg)
    _warm_up(cfg)
    armed = True

    def alarm(signum: int, frame: Any) -> None:
        if armed:  # (a one-shot timer: fires once, and not after the file is done)
            raise _FileTimeout

    t0 = time.perf_counter()
    out = _new_result(entry)
    previous = signal.signal(signal.SIGALRM, alarm)
    try:  # (armed inside: an alarm before the try would escape it)
        signal.setitimer(signal.ITIMER_REAL, cfg.file_timeout)
        _decode_one(entry, cfg, out)
        armed = False
    except _FileTimeout:
        armed = False
        # What was learnt of the file stays (its size and sha256 once it was read whole).
        out.update(width=None, height=None, frames=None, faces=[], chips=None, seconds=time.perf_counter() - t0,
                   error=("timeout", f"stopped after {cfg.file_timeout:g} s (the per-file time limit, "
                                     f"--file-timeout) reading, decoding and detecting faces in it"))
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return out


def detection_settings(det: Any, upsample: Optional[int], weak_face_score: Optional[float],
                       detect_pixels: Optional[int], who: str) -> Tuple[Optional[int], Optional[float], Optional[int]]:
    """A scan's face detector settings, checked (ValueError): those given, else the model
    ``det``'s (None: leave them None)."""
    if det is not None:
        upsample = det.upsample if upsample is None else upsample
        weak_face_score = det.weak_face_score if weak_face_score is None else weak_face_score
        detect_pixels = det.detect_pixels if detect_pixels is None else detect_pixels
    if upsample is not None and (not isinstance(upsample, int) or isinstance(upsample, bool) or upsample < 0):
        raise ValueError(f"{who}: upsample must be an int >= 0, got {upsample!r}")
    return (upsample, None if weak_face_score is None else check_weak_face_score(weak_face_score, who),
            None if detect_pixels is None else check_detect_pixels(detect_pixels, who))


def _error_result(entry: Entry, kind: str, message: str) -> Dict[str, Any]:
    return {**_new_result(entry), "error": (kind, message)}


def _crash_result(entry: Entry) -> Dict[str, Any]:
    return _error_result(entry, "worker_crash", "the decode worker process died while reading this file")


def _stuck_limit(cfg: _Config, files: int) -> Optional[float]:
    """Seconds after which a worker still busy with ``files`` files is stuck (None: no limit)."""
    return files * cfg.file_timeout + STUCK_GRACE_S if cfg.file_timeout else None


def _stuck_result(entry: Entry, cfg: _Config) -> Dict[str, Any]:
    return _error_result(entry, "timeout", f"its worker was still busy with it {_stuck_limit(cfg, 1):g} s after it "
                                           f"started, past the per-file time limit (--file-timeout "
                                           f"{cfg.file_timeout:g} s), in a native call that the limit cannot stop "
                                           f"(a decoder's endless loop, a hung network file system); the worker was "
                                           f"stopped")


def _workers_of(ex: ProcessPoolExecutor) -> List[Any]:
    """The pool's worker processes (it has no public handle on them)."""
    return list((getattr(ex, "_processes", None) or {}).values())


def _kill_workers(ex: ProcessPoolExecutor) -> None:
    """Stop the pool's worker processes at once (SIGKILL: one stuck in a native call may not be
    able to run a handler); the pool then fails its futures with BrokenProcessPool."""
    workers = _workers_of(ex)
    for p in workers:
        if p.is_alive():
            p.kill()
    _end_result_pipe(ex, workers)


def _end_result_pipe(ex: ProcessPoolExecutor, workers: List[Any]) -> None:
    """Once ``workers`` (the pool's processes, stopped) are gone: close this process's write end
    of the pool's result pipe. A worker that ended while it wrote a result leaves the pool's
    manager thread waiting for the rest of it - the pool never breaks, its futures never end,
    and the interpreter's exit waits for that thread - for good, since this process holds the
    last write end; closed, the wait ends and the pool breaks."""
    deadline = time.monotonic() + 2.0
    for p in workers:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    if not any(p.is_alive() for p in workers):
        writer = getattr(getattr(ex, "_result_queue", None), "_writer", None)
        if writer is not None:
            writer.close()


MAX_FILE_TIMEOUT_S = 1e6  # (setitimer takes at most ~9e9 s)


def check_file_timeout(value: Any, what: str) -> float:
    """A per-file time limit in seconds: a number from 0 (no limit) to MAX_FILE_TIMEOUT_S."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_FILE_TIMEOUT_S:
        raise ValueError(f"{what}: file_timeout must be a number of seconds from 0 (no limit) to "
                         f"{MAX_FILE_TIMEOUT_S:g}, got {value!r}")
    return float(value)


class CompileError(RuntimeError):
    """``compile=True``: torch.compile could not build the backbone's forward (inductor needs a
    C++ compiler on a CPU). Raised before any input is read. ``reason``: the message without
    its advice (for the command line)."""

    def __init__(self, reason: str):
        super().__init__(reason + "; scan with compile=False")
        self.reason = reason


class WorkerStartError(RuntimeError):
    """The decode worker processes died while starting, before they could read any file.
    ``reason``: the message without its advice to scripts (for the command line)."""

    def __init__(self, reason: str, advice: str = ""):
        super().__init__(reason + advice)
        self.reason = reason


def _context() -> Any:
    """The decode workers' start method. forkserver: workers fork from a clean server that
    imported fakespotter once, never from this (multi-threaded) process; spawn where forkserver
    does not exist."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    from multiprocessing import forkserver

    # (the server is the process's: keep what the caller asked it to preload)
    theirs = getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", None) or []
    ctx.set_forkserver_preload(list(dict.fromkeys([*theirs, "fakespotter._forkserver_preload"])))
    return ctx


def start_worker_server() -> None:
    """Start the decode workers' forkserver now, to import fakespotter and torch (about a second)
    while the caller does other work, such as loading its model: the pool's workers then fork
    at once. The CLI calls it; :func:`scan` does not, since a forkserver may import the
    caller's ``__main__`` as it starts (Python 3.11's does not), which would run a script
    without a main guard again. Nothing to do where workers are spawned."""
    ctx = _context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        def pid() -> Optional[int]:
            return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)

        before = pid()
        with _signals_held():  # (as a submit's start of the server: see there)
            forkserver.ensure_running()
        global _early_server
        _early_server = pid() if pid() != before else None


_early_server: Optional[int] = None  # the server start_worker_server started (its pid), until a pool uses it


def stop_unused_worker_server() -> None:
    """Stop the server :func:`start_worker_server` started if no pool has used it (a command
    that stops before its scan): while it imports torch it would hold the caller's stderr open
    for about a second after the command exits."""
    global _early_server
    pid, _early_server = _early_server, None
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if pid is None or getattr(server, "_forkserver_pid", None) != pid:
        return
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
        server._stop()  # (reaps it; the next pool starts another)
    except (OSError, AttributeError):
        pass


def _pool(workers: int) -> ProcessPoolExecutor:
    global _early_server
    _early_server = None
    ctx = _context()
    try:
        # set to 1 by the first worker to finish starting (see _check_started); a plain shared byte,
        # not an Event, whose lock a worker stopped inside its set() would hold for good
        started = ctx.RawValue("b", 0)
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(os.getpid(), started))
    except OSError as e:  # shared memory (/dev/shm) read-only or full, no file descriptor left, ...
        raise _cannot_start(e) from e
    ex._fakespotter_started = started  # type: ignore[attr-defined]
    return ex


def _cannot_start(e: OSError) -> WorkerStartError:
    """The error for a pool that the operating system would not set up or start a process for."""
    limit = ""
    if e.errno == errno.EMFILE and resource is not None:
        limit = f" (open files are limited to {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}: ulimit -n raises that)"
    return WorkerStartError(f"scan: the decode worker processes could not be started ({first_line(e)}){limit}.",
                            " workers=0 decodes in this process instead.")


def _check_started(ex: ProcessPoolExecutor) -> None:
    """After the pool broke: WorkerStartError when no worker ever finished starting, so no file
    is to blame (it would otherwise get a ``worker_crash`` record, and so would every other)."""
    started = getattr(ex, "_fakespotter_started", None)
    if started is None or started.value:
        return
    ex.shutdown(wait=False, cancel_futures=True)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    reason = (f"scan: the decode worker processes died while starting (start method {method!r}), before they "
              f"read a file; their own error, if they printed one, is above.")
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    advice = ("" if not main else
              f" Each worker starts by importing the main module ({main}), so a script must call fakespotter.scan()"
              f" under `if __name__ == \"__main__\":`, or its workers run the script again and fail.")
    raise WorkerStartError(reason, advice + " workers=0 decodes in this process instead.") from None


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back (not lost) while a submit may start a worker process.

    The scan's own handlers (Python's KeyboardInterrupt, the CLI's SIGTERM) run only after the
    submit, once the pool knows the new process, so stopping the pool ends it; raised half-way,
    the process would be left to start alone and fail loudly on the pool's vanished queues.
    (Another thread may take the signal, so a mask alone does not hold the handler back.)
    A forkserver started here ignores a Ctrl-C (sent to the whole process group) while it
    imports fakespotter (``fakespotter/__init__.py``; not in its interpreter's first ~30 ms),
    and the workers it forks ignore it (:func:`_worker_init`): only the scan acts on it."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    held: Dict[int, Any] = {}
    over = False

    def hold(signum: int, frame: Any) -> None:
        if over:  # still installed after the block: a signal cut the restoring short; act as the handler
            held[signum](signum, frame)
        else:
            caught.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(sig)):  # a Python handler; SIG_DFL / SIG_IGN act at once anyway
            held[sig] = signal.signal(sig, hold)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        over = True
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for sig, handler in held.items():
            signal.signal(sig, handler)
        if caught:
            held[caught[0]](caught[0], None)  # raises KeyboardInterrupt / the CLI's Terminated


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: not gone, and not a zombie (a scan killed with SIGKILL
    stays one until its own parent reaps it, which a caller blocked reading the scan's stderr,
    held open by the workers, never does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]  # (the name, in parentheses, may hold spaces)
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill alone
    return state not in (b"Z", b"X")


def _worker_init(parent: int, started: Any = None) -> None:
    """In each decode worker: Ctrl-C (sent to the whole process group) is the parent's to handle:
    it stops the pool, and a worker dying of it mid-task could hang that; a worker whose parent
    is gone (killed with SIGKILL) exits instead of living on. ``started`` (a shared byte) is
    set to 1: this worker got through its start-up."""
    import signal

    if os.environ.get(_CRASH_ENV) == _START_CRASH:
        os._exit(3)
    if started is not None:
        started.value = 1

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_pillow_logs()
    server = os.getppid()  # the forkserver (or the scan itself, spawned): it exits with the scan

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != server or not _alive(parent):
                os._exit(1)

    threading.Thread(target=watch, name="fakespotter-parent-watch", daemon=True).start()


def _decoded(entries: Iterator[Entry], cfg: _Config, workers: int, chunk: int, window: int,
             keep: Optional[Dict[str, Any]] = None,
             poll: Optional[float] = None) -> Iterator[Optional[Tuple[Entry, Dict[str, Any]]]]:
    """(entry, decode result) in input order; at most ``window`` chunks of ``chunk`` entries in
    flight. A worker that dies, or is stopped past its files' limits, loses no entry: the
    chunks in flight are redone in a fresh pool one entry per task (:func:`redo`, as many at
    once as there are workers), and an entry that kills its worker again, alone in the pool,
    gets a ``worker_crash``.
    ``keep``: a dict holding the pool between calls (``keep["pool"]``), for callers that decode
    many small batches; without it the pool lives for this call. ``poll``: also yield None
    after each ``poll`` seconds of waiting for the next result (the caller may use the time)."""
    if workers == 0:
        for e in entries:
            yield e, _decode_timed(e, cfg)
        return
    chunks = _chunks(entries, chunk)
    ex = keep.get("pool") if keep is not None else None
    ex = ex or _pool(workers)
    replaced: List[ProcessPoolExecutor] = []  # broken pools given up during this call
    pending: deque = deque()

    def submit(c: List[Entry]) -> Tuple[List[Entry], Any, ProcessPoolExecutor]:
        """(chunk, future, the pool it runs in)."""
        nonlocal ex
        try:
            try:
                with _signals_held():
                    return c, ex.submit(_decode_chunk, c, cfg), ex
            except BrokenProcessPool:  # a kept pool whose process died while it was idle
                _check_started(ex)
                ex.shutdown(wait=False, cancel_futures=True)
                replaced.append(ex)
                ex = _pool(workers)
                with _signals_held():
                    return c, ex.submit(_decode_chunk, c, cfg), ex
        except OSError as e:  # a worker process the submit starts (a fork, the forkserver's socket)
            raise _cannot_start(e) from e

    def new_pool() -> None:
        """A fresh pool for what is redone. Every task of the current one is redone (a submit
        that found the pool broken may have started it with the next chunk): its workers are
        stopped first, or the shutdown would wait for them, for good if one is stuck."""
        nonlocal ex
        _kill_workers(ex)
        ex.shutdown(wait=True, cancel_futures=True)
        replaced.append(ex)
        ex = _pool(workers)

    def start(item: Any) -> Tuple[List[Entry], Any, ProcessPoolExecutor]:
        """A task for ``item`` of a redo: an entry; or (entry, result), a file decoded before
        the pool broke, as a future already done."""
        if isinstance(item, Entry):
            return submit([item])
        e, res = item
        fut: Future = Future()
        fut.set_result([res])
        return [e], fut, ex

    def settled() -> List[Any]:
        """The tasks in flight as items for :func:`start`, in order (cleared)."""
        items = [(cc[0], f.result()[0]) if f.done() and not f.cancelled() and f.exception() is None else cc[0]
                 for cc, f, _ in pending]
        pending.clear()
        return items

    def redo(backlog: deque) -> Iterator[Optional[Tuple[Entry, Dict[str, Any]]]]:
        """The entries of a broken pool's chunks, in order, one per task and as many running as
        there are workers (each runs at once): the first in flight past its file's limit is
        that file's ``timeout``, and the others go on; when the pool breaks again, the entries
        still running are the suspects, redone one at a time (:func:`isolate`)."""
        while backlog or pending:
            # (at most `workers` running, each on a worker of its own; a few more done, waiting
            # in order behind a slow first one)
            while backlog and len(pending) < 4 * workers and sum(not f.done() for _, f, _ in pending) < workers:
                pending.append(start(backlog.popleft()))
            c, fut, pool = pending[0]
            why = yield from _wait(fut, pool, _stuck_limit(cfg, 1), poll)
            if why == "done" and fut.exception() is None:
                pending.popleft()
                yield c[0], fut.result()[0]
                continue
            if fut.exception() is not None:
                _check_started(pool)
            items = settled()  # (the first: done just as the pool was stopped, or not)
            new_pool()
            if not isinstance(items[0], Entry):  # done just as the pool was stopped, which stopped the others
                yield items.pop(0)
                if why == "stuck":
                    backlog.extendleft(reversed(items))
                else:  # a worker died (while it sent a result): one of the others' files did it
                    yield from isolate(items)
            elif why == "stuck":
                yield items[0], _stuck_result(items[0], cfg)
                backlog.extendleft(reversed(items[1:]))
            else:
                yield from isolate(items)

    def isolate(suspects: List[Any]) -> Iterator[Optional[Tuple[Entry, Dict[str, Any]]]]:
        """One of ``suspects`` (items for :func:`start`) killed its worker: each alone in the
        pool, in order; one that kills it again gets a ``worker_crash``, one past its limit a
        ``timeout``."""
        for item in suspects:
            pending.append(start(item))
            why = yield from _wait(pending[0][1], pending[0][2], _stuck_limit(cfg, 1), poll)
            (e,), fut, pool = pending.popleft()
            try:
                (res,) = fut.result()
            except BrokenProcessPool:
                _check_started(pool)
                res, why = _stuck_result(e, cfg) if why == "stuck" else _crash_result(e), "broken"
            if why != "done":  # (stuck: also when the file was done just as its worker was stopped)
                new_pool()
            yield e, res

    interrupted = False
    try:
        while True:
            while len(pending) < window and (not pending or sum(_held(c) for c, _, _ in pending) < IN_FLIGHT_BYTES):
                c = next(chunks, None)
                if c is None:
                    break
                pending.append(submit(c))
            if not pending:
                return
            c, fut, pool = pending[0]
            # The first chunk in flight runs (or is next to run) since it became the first: a
            # worker takes chunks in order. Past its files' limits and a margin, it is stuck.
            yield from _wait(fut, pool, _stuck_limit(cfg, len(c)), poll)  # (its chunks go on below, one file per task)
            pending.popleft()
            try:
                results = fut.result()
            except BrokenProcessPool:
                _check_started(pool)  # the pool this chunk ran in (a later submit may have replaced it)
                backlog = deque(list(c) + [e for cc, _, _ in pending for e in cc])
                pending.clear()
                new_pool()
                yield from redo(backlog)
                continue
            yield from zip(c, results)
    except GeneratorExit:  # the caller stopped reading
        raise
    except BaseException:  # Ctrl-C, SIGTERM, an error: perhaps while a worker was still starting
        interrupted = True
        raise
    finally:
        if keep is not None and not pending and not interrupted and not getattr(ex, "_broken", False):
            keep["pool"] = ex
        else:
            _stop(ex)
            if keep is not None:
                keep.pop("pool", None)
        for old in replaced:  # a worker a pool started as it broke (a submit racing its manager thread)
            _kill_workers(old)  # outlives the pool's own stop and holds the interpreter's exit


def _held(entries: List[Entry]) -> int:
    """The bytes of tar members ``entries`` hold."""
    return sum(len(e.data) for e in entries if e.data is not None)


def _chunks(entries: Iterator[Entry], chunk: int) -> Iterator[List[Entry]]:
    """``entries`` in lists of ``chunk``, or fewer that hold :data:`CHUNK_BYTES` of tar members."""
    batch: List[Entry] = []
    held = 0
    for e in entries:
        batch.append(e)
        held += _held([e])
        if len(batch) == chunk or held >= CHUNK_BYTES:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _wait(fut: Any, pool: ProcessPoolExecutor, limit: Optional[float],
          poll: Optional[float]) -> Generator[None, None, str]:
    """Wait for ``fut`` of ``pool``; None after each ``poll`` seconds (if given). Stop the pool's
    workers (so that ``fut`` fails with BrokenProcessPool) once ``limit`` seconds have gone by
    (returns "stuck"), or :data:`DEAD_WORKER_GRACE_S` after one of its workers is seen dead
    while the pool is not broken ("dead"): it died while it wrote a result (the OOM killer, a
    ``kill -9``), and the pool's manager thread waits for the rest of the message, which would
    hold the scan for good (``file_timeout=0``) or until the limit of all the files it was
    given. Else "done"."""
    since = last = time.monotonic()
    dead_since: Optional[float] = None
    while True:
        now = time.monotonic()
        waits = [DEAD_WORKER_CHECK_S]
        if limit is not None:
            waits.append(max(0.0, since + limit - now))
        if poll is not None:
            waits.append(max(0.0, last + poll - now))
        if wait_futures([fut], timeout=min(waits)).done:
            return "done"
        now = time.monotonic()
        if limit is not None and now - since >= limit:
            _kill_workers(pool)
            return "stuck"
        if dead_since is None:
            if any(p.exitcode is not None for p in _workers_of(pool)):
                dead_since = now
        elif now - dead_since >= DEAD_WORKER_GRACE_S:
            _kill_workers(pool)
            return "dead"
        if poll is not None and now - last >= poll:
            last = now
            yield None


def _stop(ex: ProcessPoolExecutor) -> None:
    """Shut the pool down without waiting, its workers ended first: chunks may be running whose
    results nobody will read (Ctrl-C, SIGTERM, a caller that stopped iterating), for which the
    interpreter's exit would wait (minutes with large images); and a worker still starting
    (the pool starts them as work comes: one may be on its way as a short scan ends) would fail
    to attach to the pool's queues and its start-up event once they are gone, with a traceback
    on stderr after the scan's own output."""
    workers = _workers_of(ex)
    for p in workers:
        if p.is_alive():
            p.terminate()
    _end_result_pipe(ex, workers)
    ex.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# parent side: chips -> rows -> scores -> records


def _oom_in(e: Optional[BaseException]) -> Optional[BaseException]:
    """The out-of-memory error that ``e`` is or was raised while handling, or None:
    ``torch.OutOfMemoryError`` (CUDA and others), ``MemoryError``, or a RuntimeError whose
    message says so (the CPU allocator's is "DefaultCPUAllocator: can't allocate memory"), or
    oneDNN's "could not create a primitive", which is how its failure to allocate a convolution's
    workspace near the memory cap reads (an error of another cause stays an error at batch 1).
    Near the memory cap, torch.fx's report of an error in a traced forward fails to import what
    it needs, and that ImportError hides the allocator's; an error raised ``from None`` says
    what it is itself."""
    import torch

    kinds = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if isinstance(t, type))
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, kinds + (MemoryError,)):
            return e
        if isinstance(e, RuntimeError):
            m = str(e).lower()
            if any(k in m for k in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                    "could not create a primitive")):
                return e
        e = e.__cause__ if e.__cause__ is not None else None if e.__suppress_context__ else e.__context__
    return None


def precision_of(device: str, autocast: bool) -> str:
    """The dtype the backbone computes in: ``"float32"``, or with ``autocast`` ``"bfloat16"``
    on CPU and ``"float16"`` on CUDA (what a scan's stats record and ``--resume`` compares)."""
    if not autocast:
        return "float32"
    return "float16" if str(device).startswith("cuda") else "bfloat16"


class _Forward:
    """Backbone + taps + classifier on uint8 chips, in forwards of exactly ``batch_size`` chips
    (the last zero-padded), with optional channels_last weights and autocast, and a batch size
    that halves on out-of-memory.

    Numerics: the default path is the one every scan had (uint8 NHWC -> device -> permuted to
    [N, 3, H, W], which is already channels_last-strided -> float32). ``channels_last`` also
    puts the conv weights in channels_last for the scan (restored by :meth:`restore`), so that
    every conv runs channels_last, also after dlib's padding ``add`` (whose output is NCHW).
    ``autocast`` runs backbone + taps under ``torch.autocast`` (bfloat16 on CPU, float16 on
    CUDA); without it the forward runs in IEEE float32 on a GPU too (``taps.exact_float32``: no
    TF32 convolutions), so GPU and CPU scans agree. The classifier always runs on the CPU (each
    row's logit on its own, whatever the batch: classifier.py).

    ``compile`` runs backbone + taps through ``torch.compile`` (inductor: channels_last
    convolutions, the affines, ReLUs and residual adds fused into C++ loops around them), compiled
    once here on a zero batch, so that a failure is raised before any input is read. Inductor's
    ``freezing`` is not used: it gained 1-4% on the CPU measured, for a longer compile and a graph
    that keeps the weights it was built with (benchmarks/RESULTS.md, "Compiled forward").
    """

    def __init__(self, det: Any, device: str, batch_size: int, channels_last: bool = False,
                 autocast: bool = False, log: Optional[Callable[[str], None]] = None, compile: bool = False):
        import torch

        self.det = det
        self.tap = det.tap_
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.channels_last = bool(channels_last)
        self.precision = precision_of(str(self.device), autocast)
        self.amp_dtype = getattr(torch, self.precision) if autocast else None
        self.backoffs: List[Dict[str, Any]] = []
        self.forwards = 0
        self.backbone_taps_s = 0.0
        self.classifier_s = 0.0
        self._log = log
        H, W = self.tap.preprocessing.size
        # CUDA: a pinned staging buffer, so the host-to-device copy is a DMA that needs no extra
        # bounce copy; it is safe to refill after each forward because the forward ends with the
        # rows' (synchronous) copy back to the CPU.
        pin = self.device.type == "cuda"
        self._buf_t = torch.zeros((self.batch_size, H, W, 3), dtype=torch.uint8, pin_memory=pin)
        self._buf = self._buf_t.numpy()
        self._saved: Dict[str, Any] = {}
        if self.channels_last:
            for name, p in self.tap.backbone.module.named_parameters():
                if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                    self._saved[name] = p.data
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
        self.compiled = bool(compile)
        self._net = self.tap
        self.compile_s = 0.0
        if self.compiled:
            t0 = time.perf_counter()
            self._compile()
            self.compile_s = time.perf_counter() - t0

    def _compile(self) -> None:
        import torch

        if self._log is not None:
            self._log(f"scan: compiling the backbone for batches of {self.batch_size} (torch.compile; about a "
                      f"minute on 2 CPUs, once per run)")
        self._net = torch.compile(self.tap)
        try:
            self.run(np.zeros((0,) + self._buf.shape[1:], np.uint8))
        except Exception as e:  # noqa: BLE001 - whatever inductor raises, said in one line
            self.restore()
            raise CompileError(f"torch.compile could not build the forward ({type(e).__name__}: "
                               f"{first_line(e)[:300]})") from e
        self.forwards, self.backbone_taps_s, self.classifier_s = 0, 0.0, 0.0

    def restore(self) -> None:
        """Give the backbone its own weights back (channels_last changed their memory format)."""
        if self._saved:
            params = dict(self.tap.backbone.module.named_parameters())
            for name, data in self._saved.items():
                params[name].data = data
            self._saved = {}

    def run(self, chips: np.ndarray) -> Tuple[Any, np.ndarray]:
        """One forward of exactly ``batch_size`` chips: ``chips`` uint8 [n <= batch_size, H, W, 3]
        -> (packed rows int64 [n, words] on the CPU, logits float32 [n])."""
        import torch

        from .taps import exact_float32

        B, n = self.batch_size, len(chips)
        buf = self._buf[:B]
        buf[:n] = chips
        buf[n:] = 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = self._buf_t[:B].to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32)
            x = self.tap.prepare(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.amp_dtype is not None:
                with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                    rows = self._net(x)
            else:
                with exact_float32():  # "float32" means it on a GPU too: no TF32 convolutions
                    rows = self._net(x)
            rows = rows.cpu()
            t1 = time.perf_counter()
            logits = self.det.classifier_.decision_function(rows[:n]).numpy()
        self.backbone_taps_s += t1 - t0
        self.classifier_s += time.perf_counter() - t1
        self.forwards += 1
        return rows[:n], logits

    def score(self, chips: Sequence[np.ndarray]) -> List[float]:
        """Logits of ``chips`` (uint8 [H, W, 3] each), in forwards of ``batch_size``. On out of
        memory the batch size halves (down to 1) and the chips of the failed forward are
        retried: no chip is lost or scored twice. The smaller size stays for the rest of the
        run; each back-off is logged once and kept in :attr:`backoffs` (``forward``: how many
        forwards had completed before it, ``from``/``to``: the batch sizes, ``error``). Out of
        memory in a forward of one chip: :class:`MemoryError`, saying so."""
        import torch

        out: List[float] = []
        i = 0
        failed_at: Optional[int] = None  # the batch size whose forward ran out of memory first
        done_before = 0  # forwards completed before that
        why = ""
        while i < len(chips):
            n = min(self.batch_size, len(chips) - i)
            logits = None
            try:
                _, logits = self.run(np.stack(chips[i:i + n]))
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                oom = _oom_in(e)
                if oom is None:
                    raise
                why = first_line(oom)[:200]
                if self.batch_size == 1:  # nothing smaller to go on with
                    halved = "" if failed_at is None else f", after halving the batch size from {failed_at}"
                    raise MemoryError(f"out of memory in a forward of a single chip{halved} ({why}); free memory "
                                      f"or raise this process's memory limit") from e
                del oom  # (its traceback holds the failed forward's tensors)
            if logits is None:  # outside the except block: the failed forward's tensors are freed
                gc.collect()  # (those an exception's reference cycle holds too: rare, and worth the memory)
                if failed_at is None:
                    failed_at, done_before = self.batch_size, self.forwards
                self.batch_size //= 2
                # the staging buffer too: the memory of the chips no forward will hold goes back (each
                # forward fills it afresh)
                shape, self._buf, self._buf_t = self._buf_t.shape[1:], None, None  # (the old one freed first)
                self._buf_t = torch.zeros((self.batch_size, *shape), dtype=torch.uint8,
                                          pin_memory=self.device.type == "cuda")
                self._buf = self._buf_t.numpy()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if failed_at is not None:
                event = {"forward": done_before, "from": failed_at, "to": self.batch_size, "error": why}
                self.backoffs.append(event)
                if self._log is not None:
                    self._log(f"scan: out of memory in a forward of {failed_at} chips ({why}); going on with "
                              f"batches of {self.batch_size} for the rest of this run (scores are those of a "
                              f"--batch-size {self.batch_size} scan from here on)")
                failed_at = None
            out.extend(float(v) for v in logits)
            i += n
        return out


class _Pending:
    __slots__ = ("res", "logits", "left", "t")

    def __init__(self, res: Dict[str, Any], t: float):
        self.res = res
        self.t = t  # when it was decoded
        n = 0 if res["chips"] is None else len(res["chips"])
        self.logits: List[float] = [math.nan] * n
        self.left = n


class ScanRun:
    """An iterator over the records of one scan (see :func:`scan`), with live ``stats``.

    ``stats``: ``counts`` per status and per label, ``images`` and ``faces`` of the records
    handed out so far, ``wall_s``, ``images_per_s``, and the time split ``decode_faces_s``
    (summed over workers: read, hash, decode, detect and align), ``wait_s`` (the parent waiting
    for decoded images), ``backbone_taps_s`` and ``classifier_s`` (parent); the settings that
    decide the scores: ``batch_size`` (the forward size in effect: smaller than
    ``batch_size_requested`` after an out-of-memory back-off, whose events are in
    ``oom_backoffs``), ``precision`` (``float32``, or the autocast dtype), ``channels_last``
    and ``compiled`` (``compile_s``: the seconds the compile took before the scan's clock
    started).

    The decode workers stop when the records run out, at :meth:`close`, when a ``with`` block
    around the run ends, or as soon as the run is dropped (leaving a ``for`` loop early).
    """

    def __init__(self, entries: Iterable[Entry], detector: Any, model_id: str, cfg: _Config, batch_size: int,
                 workers: int, device: str, channels_last: bool = False, autocast: bool = False,
                 log: Optional[Callable[[str], None]] = None, compile: bool = False):
        self.stats: Dict[str, Any] = dict(
            new_stats(), batch_size=batch_size, batch_size_requested=batch_size, oom_backoffs=[],
            precision=precision_of(device, autocast), channels_last=bool(channels_last), compiled=bool(compile),
            compile_s=0.0, workers=workers, device=device, aligned=cfg.aligned, upsample=cfg.upsample,
            weak_face_score=cfg.weak_face_score, detect_pixels=cfg.detect_pixels, pixel_limit=cfg.pixel_limit,
            file_timeout=cfg.file_timeout)
        # what the scan needs, apart from this object: its generator must not hold the ScanRun,
        # or dropping the run would leave a cycle (and the workers running) until the next gc
        self._job = _Job(iter(entries), detector, model_id, cfg, batch_size, workers, device, bool(channels_last),
                         bool(autocast), bool(compile), log if log is not None else _default_log,
                         float(detector.operating_threshold_["logit"]), self.stats)
        self._active: Optional[Iterator[List[Dict[str, Any]]]] = None
        self._flat: Optional[Iterator[Dict[str, Any]]] = None
        self._closed = False
        # close() from another thread than the one iterating: the generator is closed by the thread
        # that holds _turn (the iterating one, between records, or close() when none is inside)
        self._stopping = threading.Event()
        self._turn = threading.Lock()

    def __repr__(self) -> str:
        job, st = self._job, self.stats
        return (f"ScanRun(model={job.model_id[:12]}..., device={job.device!r}, workers={job.workers}, "
                f"batch_size={st['batch_size']}, images={st['images']}, counts={st['counts']})")

    def __iter__(self) -> "ScanRun":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._flat is None:
            if self._closed:
                raise StopIteration
            self._start()
            self._flat = (r for group in self._active for r in group)
        with self._turn:
            if self._stopping.is_set():  # closed (from another thread) before or while this one waited
                self._active.close()
                raise StopIteration
            record = next(self._flat)
            if self._stopping.is_set():
                self._active.close()
                raise StopIteration
        count_record(self.stats, record)
        return record

    def __enter__(self) -> "ScanRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the scan: shut the workers down (also done when the records run out). A run
        closed before it started yields nothing. Called from another thread than the one
        iterating the run (a UI's cancel button, a watchdog), the scan stops there before its
        next record (or group) is handed out."""
        self._closed = True
        self._stopping.set()
        if self._active is not None and self._turn.acquire(blocking=False):  # (else the iterating thread
            try:                                                             # is inside: it stops the run)
                self._active.close()
            finally:
                self._turn.release()

    def batches(self) -> Iterator[List[Dict[str, Any]]]:
        """The records in groups: a group ends where a backbone forward finished (or after
        ``batch_size`` records without one); a writer flushes and syncs once per group. Faces
        and records are held at most about :data:`STALL_FLUSH_S` seconds, and at most about
        :data:`MAX_HELD_RECORDS` records wait behind a face (then a partial batch is scored), so
        slow images (large photos) are written as they go, and a face followed by a long run of
        errors does not hold them all.
        A scan runs once: iterate either the records or the groups."""
        if self._closed and self._active is None:
            return iter(())
        self._start()
        return _counted(self._active, self.stats, self._stopping, self._turn)

    def _start(self) -> None:
        if self._active is not None:
            raise RuntimeError("ScanRun: this scan has already started; call scan() again to rescan")
        self._active = _scan_groups(self._job)


class _Job(NamedTuple):
    """The settings and state of one scan (see :class:`ScanRun`)."""

    entries: Iterator[Entry]
    det: Any
    model_id: str
    cfg: _Config
    batch_size: int
    workers: int
    device: str
    channels_last: bool
    autocast: bool
    compile: bool
    log: Callable[[str], None]
    threshold: float
    stats: Dict[str, Any]


def _counted(groups: Iterator[List[Dict[str, Any]]], stats: Dict[str, Any], stopping: threading.Event,
             turn: threading.Lock) -> Iterator[List[Dict[str, Any]]]:
    """The groups, each counted in ``stats`` as it is handed out, until ``stopping`` is set
    (``turn``: see :class:`ScanRun`)."""
    while True:
        with turn:
            group = None if stopping.is_set() else next(groups, None)
            if group is None or stopping.is_set():
                groups.close()  # type: ignore[attr-defined]
                return
        for record in group:
            count_record(stats, record)
        yield group


def _scan_groups(job: _Job) -> Iterator[List[Dict[str, Any]]]:
    """The scan itself: groups of records (see :meth:`ScanRun.batches`); counts are the caller's."""
    fwd = _Forward(job.det, job.device, job.batch_size, job.channels_last, job.autocast, job.log, job.compile)
    st = job.stats
    st["compile_s"] = fwd.compile_s
    t_start = time.perf_counter()
    queue: deque = deque()
    chips: List[Tuple[_Pending, int, np.ndarray]] = []
    out: List[Dict[str, Any]] = []

    def forward(n: int) -> None:
        logits = fwd.score([c for _, _, c in chips[:n]])
        for (p, j, _), v in zip(chips[:n], logits):
            p.logits[j] = v
            p.left -= 1
        del chips[:n]
        st.update(forwards=fwd.forwards, backbone_taps_s=fwd.backbone_taps_s, classifier_s=fwd.classifier_s,
                  batch_size=fwd.batch_size, oom_backoffs=list(fwd.backoffs))

    def emit() -> None:
        while queue and queue[0].left == 0:
            p = queue.popleft()
            out.append(make_record(p.res, p.logits, job.threshold, job.model_id))

    def finish_stats() -> None:
        st["wall_s"] = time.perf_counter() - t_start
        st["images_per_s"] = st["images"] / st["wall_s"] if st["wall_s"] > 0 else 0.0

    B = job.batch_size
    window = -(-(B + 2 * job.workers) // 4) + 2 * job.workers
    decoded = _decoded(job.entries, job.cfg, job.workers, chunk=4, window=max(window, 1), poll=1.0)
    done = object()
    written = time.perf_counter()  # when a group was last given out
    try:
        while True:
            t0 = time.perf_counter()
            nxt = next(decoded, done)
            now = time.perf_counter()
            st["wait_s"] += now - t0
            if nxt is done:
                break
            if nxt is not None:  # else: a second without a decoded image
                _, res = nxt
                st["decode_faces_s"] += res.get("seconds", 0.0)
                p = _Pending(res, now)
                queue.append(p)
                if res["chips"] is not None:
                    chips.extend((p, j, c) for j, c in enumerate(res["chips"]))
                    res["chips"] = None
            ran = False
            while len(chips) >= fwd.batch_size:
                forward(fwd.batch_size)
                ran = True
            if chips and (now - chips[0][0].t >= STALL_FLUSH_S  # slow images: score the faces there
                          or len(queue) >= max(MAX_HELD_RECORDS, 4 * fwd.batch_size)):  # many held behind them
                forward(len(chips))
                ran = True
            emit()
            if out and (ran or len(out) >= fwd.batch_size or now - written >= STALL_FLUSH_S):
                finish_stats()
                yield out
                out = []
                written = time.perf_counter()
        while chips:
            forward(min(fwd.batch_size, len(chips)))
        emit()
        finish_stats()
        if out:
            yield out
    finally:
        decoded.close()
        fwd.restore()
        finish_stats()


def make_record(res: Dict[str, Any], logits: Sequence[float], threshold: float, model_id: str) -> Dict[str, Any]:
    """The record of one decoded input (:func:`_decode_one`'s result) and the logits of its
    chips, in :data:`RECORD_FIELDS` order."""
    err = res["error"]
    faces = [{"box": box, "detector_score": ds, "score": float(s)} for (box, ds), s in zip(res["faces"], logits)]
    if err is None and any(not math.isfinite(f["score"]) for f in faces):
        err, faces = ("internal_error", "the classifier gave a non-finite score"), []
    if err is not None:
        status, score, label = "error", None, None
    elif not faces:
        status, score, label = "no_face", None, None
    else:
        status = "ok"
        score = max(f["score"] for f in faces)
        label = "fake" if score > threshold else "real"
    return {"path": res["path"], "size": res["size"], "sha256": res["sha256"], "status": status,
            "width": res["width"], "height": res["height"], "frames": res["frames"], "faces": faces,
            "score": score, "label": label, "model": model_id,
            "error_kind": None if err is None else err[0], "error": None if err is None else err[1]}


def new_stats() -> Dict[str, Any]:
    """Zeroed record counts (``images``, ``counts`` per status, ``labels``, ``error_kinds``,
    ``faces``) and time split, as :attr:`ScanRun.stats` starts."""
    return {"images": 0, "counts": {s: 0 for s in STATUSES}, "labels": {"real": 0, "fake": 0},
            "error_kinds": {}, "faces": 0, "forwards": 0, "wall_s": 0.0, "images_per_s": 0.0,
            "decode_faces_s": 0.0, "wait_s": 0.0, "backbone_taps_s": 0.0, "classifier_s": 0.0}


def count_record(stats: Dict[str, Any], record: Dict[str, Any]) -> None:
    """Add one record to the counts of ``stats`` (see :func:`new_stats`)."""
    stats["images"] += 1
    stats["counts"][record["status"]] += 1
    stats["faces"] += len(record["faces"])
    if record["label"] is not None:
        stats["labels"][record["label"]] += 1
    kind = record["error_kind"]
    if kind is not None:
        stats["error_kinds"][kind] = stats["error_kinds"].get(kind, 0) + 1


def new_counts() -> Dict[str, Any]:
    """The record counts of :func:`new_stats` alone (what :func:`count_record` changes)."""
    return {k: v for k, v in new_stats().items() if k in ("images", "counts", "labels", "error_kinds", "faces")}


def add_counts(stats: Dict[str, Any], other: Dict[str, Any]) -> None:
    """Add the record counts ``other`` (:func:`new_counts`) to ``stats``."""
    stats["images"] += other["images"]
    stats["faces"] += other["faces"]
    for key in ("counts", "labels"):
        for k, n in other[key].items():
            stats[key][k] += n
    for kind, n in other["error_kinds"].items():
        stats["error_kinds"][kind] = stats["error_kinds"].get(kind, 0) + n


def cuda_build_problem(info: Dict[str, Any], capability: Tuple[int, int]) -> Optional[str]:
    """Why fakespotter's native ops cannot run on a GPU of ``capability`` (major, minor), given
    their ``_C.build_info()``; None when they can. A CMake architecture ``NN`` holds code for
    compute capability N.N and PTX that later GPUs compile; ``NN-real`` the code only (GPUs of
    the same major version from N.N on), ``NN-virtual`` the PTX only."""
    rebuild = ("rebuild it where nvcc and a CUDA build of torch are both present: FAKESPOTTER_CUDA=ON pip install "
               "--no-build-isolation .")
    if not info.get("cuda"):
        return f"fakespotter's native ops were built without CUDA; {rebuild}"
    cc = capability[0] * 10 + capability[1]
    archs = str(info.get("cuda_architectures", "")).replace(";", " ").split()
    for arch in archs:
        number, _, kind = arch.partition("-")
        if not number.isdigit():  # all, native, 90a, ...: what nvcc made of it is not known here
            return None
        n = int(number)
        if (kind != "real" and cc >= n) or (kind != "virtual" and cc // 10 == n // 10 and cc >= n):
            return None
    return (f"this GPU has compute capability {capability[0]}.{capability[1]}, and fakespotter's CUDA kernels were "
            f"built for {' '.join(archs) or 'no architecture'}; {rebuild} -C cmake.define.CMAKE_CUDA_ARCHITECTURES={cc}")


def check_device(device: Any, what: str = "scan") -> str:
    """``device`` as a string after checking that it names a device this machine has; ValueError
    (naming ``what``) otherwise: "CUDA is not available" before any work, not a failure deep
    inside the first forward. Only CPU and CUDA devices are supported."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{what}: device {device!r} is not a device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'a CPU-only build' if torch.version.cuda is None else 'no usable GPU'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what}: device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
        from . import _C

        problem = cuda_build_problem(_C.build_info(), torch.cuda.get_device_capability(dev))
        if problem:
            raise ValueError(f"{what}: device {device!r}: {problem}")
    elif dev.type != "cpu":
        raise ValueError(f"{what}: device {device!r}: only cpu and cuda devices are supported")
    return str(dev)


def _load_model(model: Any, device: str) -> Tuple[Any, str]:
    import torch

    from .detector import FakeSpotter

    if isinstance(model, bytes):
        model = os.fsdecode(model)
    if isinstance(model, FakeSpotter):
        model._check_fitted()
        have, want = model.tap_._device(), torch.device(device)
        if have.type != want.type or (want.index is not None and have.index is not None and have.index != want.index):
            raise ValueError(f"scan: the detector's backbone is on {have}, but device is {device!r}; load it with "
                             f"FakeSpotter.load(path, device={device!r}) or pass the model file")
        return model, model.model_sha256()
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"scan: model must be a model file path, 'default' or a fitted FakeSpotter, "
                        f"got {type(model).__name__}")
    from .artifact import file_sha256
    from .detector import resolve_model

    path = resolve_model(model)
    det = FakeSpotter.load(path, device=device)
    return det, file_sha256(path)


def _input_list(inputs: Any) -> List[str]:
    """Scan inputs as strings: one path, or a sequence of them (str, bytes or path-like)."""
    if isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]
    return [os.fsdecode(s) if isinstance(s, (bytes, os.PathLike)) else str(s) for s in inputs]


def scan(inputs: Union[str, Sequence[str]], model: Any = "default", *, aligned: bool = False, batch_size: int = 64,
         workers: Optional[int] = None, device: str = "cpu", pixel_limit: int = DEFAULT_PIXEL_LIMIT,
         limit: Optional[int] = None, upsample: Optional[int] = None, weak_face_score: Optional[float] = None,
         detect_pixels: Optional[int] = None, skip: int = 0, exclude: Optional[Container[str]] = None,
         stdin: Optional[IO[str]] = None, channels_last: bool = False, autocast: bool = False,
         compile: bool = False, file_timeout: float = FILE_TIMEOUT_S,
         log: Optional[Callable[[str], None]] = None, listing: Optional[Iterable[Entry]] = None) -> ScanRun:
    """Scan images for synthesized faces; an iterator of one record per input image, in input order.

    inputs: paths - files, folders (recursive), ``@list.txt`` file lists, ``-`` (a list on
        ``stdin``) and tar archives (see ``data.iter_entries``).
    model: a model file (``FakeSpotter.save``), a fitted ``FakeSpotter``, or ``"default"``
        (the default): the embedded default detector (``FakeSpotter.default()``).
    aligned: inputs are already-aligned face chips (resized only; no detection).
    batch_size: chips per backbone forward (every forward has exactly this many).
    workers: decode / face-detection processes (default :func:`default_workers`; 0: inline).
    device: where the backbone runs (``cpu``, ``cuda``, ``cuda:1``, ...).
    pixel_limit: images with more pixels are refused (``too_many_pixels``) before decoding.
    file_timeout: seconds a decode worker spends on one file (read, decode, face detection) before
        it gives a ``timeout`` record and goes on (0: no limit). With ``workers=0`` it holds when
        ``scan`` runs in the main thread of a program that does not use SIGALRM itself. Checked
        between Python steps, so one long native call (a libjpeg decode) finishes first; a worker
        still busy :data:`STUCK_GRACE_S` past the limits of its files (stuck in a native call)
        is stopped and replaced, and its file gets the ``timeout`` record. Only a file that hits
        the limit gets a record that depends on the machine's speed.
    limit: scan only the first ``limit`` inputs of the listing.
    upsample / weak_face_score / detect_pixels: face detector upsampling, the score below which
        a detection is dropped from an image that holds a face scoring at least that, and the
        most pixels the detector works on (``faces.detect_and_align``); None (the default): the
        model's, the settings it was trained and evaluated with (the embedded default
        detector's: 1, 0.15 and 16777216), as its own ``decision_function`` uses them.
    skip / exclude: leave out the first ``skip`` inputs (after ``limit``), and inputs whose
        path is in ``exclude`` (a set or list of paths, str, bytes or path-like, in any
        spelling: ``d/x.jpg``, ``./d/x.jpg`` and ``$PWD/d/x.jpg`` are one): how a resumed scan
        continues.
    channels_last: run every conv of the backbone in channels_last memory format (the conv
        weights are switched for the scan and restored after it; the input is channels_last
        already). On the CPUs measured (benchmarks/RESULTS.md, issue E) the records are
        identical to the default's and the speed is the same; oneDNN may round differently on
        other hardware (the tests allow 1e-5).
    autocast: run backbone + taps under ``torch.autocast`` (bfloat16 on CPU, float16 on CUDA;
        the classifier stays float32). Scores change slightly: records are not bit-identical
        to a float32 scan, and ``stats["precision"]`` says which ran.
    compile: run backbone + taps through ``torch.compile`` (inductor), compiled once
        when the scan starts (about a minute on 2 CPUs; a C++ compiler is needed on a CPU). On
        the 2-CPU machine measured the forward ran 1.1-1.2x as fast, whole CLI scans 1.08x
        (benchmarks/RESULTS.md, "Compiled forward"); fused loops can round differently, so
        records may differ from an eager scan's in rare near-threshold bits
        (``stats["compiled"]``).
    log: where one-line notices go (an out-of-memory back-off); default: the
        ``fakespotter.scan`` logger, at WARNING.
    listing: the entries ``data.iter_entries(inputs, stdin)`` gives, when the caller has begun
        reading them already (a resume's check of the inputs done): the scan goes on from there
        instead of listing ``inputs`` again; ``skip`` and ``limit`` count from there too.
    The forward runs ``batch_size`` chips; when it runs out of memory the batch size halves
    (down to 1) and the same chips are retried, so no record is lost or doubled, and the
    smaller size is kept for the rest of the run (``stats["batch_size"]``, ``["oom_backoffs"]``);
    its scores are then those of a scan at that batch size; out of memory in a forward of one
    chip raises :class:`MemoryError`.
    Returns a :class:`ScanRun` (iterate it for records; ``.stats`` for counts and timings).
    Raises FileNotFoundError / ValueError for missing inputs or bad arguments (also a CUDA
    device where CUDA is not available), and ``artifact.ModelFileError`` for a bad model file,
    before any work; while iterating, :class:`WorkerStartError` (``fakespotter.WorkerStartError``)
    when the decode workers die as they start (a script without a main guard), and
    :class:`CompileError` when ``compile`` fails (before any input is read).
    """
    inputs = _input_list(inputs)
    from .features import check_batch_size

    batch_size = check_batch_size(batch_size, "scan")
    for name, v, lo in (("pixel_limit", pixel_limit, 1), ("skip", skip, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"scan: {name} must be an int >= {lo}, got {v!r}")
    if workers is None:
        workers = default_workers()
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"scan: workers must be an int >= 0, got {workers!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"scan: limit must be None or an int >= 0, got {limit!r}")
    for name, v in (("channels_last", channels_last), ("autocast", autocast), ("compile", compile)):
        if not isinstance(v, bool):
            raise TypeError(f"scan: {name} must be a bool, got {type(v).__name__}")
    file_timeout = check_file_timeout(file_timeout, "scan")
    device = check_device(device, "scan")
    check_sources(inputs, "scan")
    detection_settings(None, upsample, weak_face_score, detect_pixels, "scan")  # (before the model loads)
    det, model_id = _load_model(model, device)
    upsample, weak_face_score, detect_pixels = detection_settings(det, upsample, weak_face_score, detect_pixels, "scan")
    cfg = _Config(bool(aligned), int(det.tap_.preprocessing.size[0]), int(upsample), int(pixel_limit), weak_face_score,
                  detect_pixels, file_timeout)
    entries: Iterable[Entry] = iter_entries(inputs, stdin=stdin) if listing is None else listing
    if limit is not None or skip:
        entries = itertools.islice(entries, skip, limit)
    if isinstance(exclude, (set, frozenset, list, tuple)):  # paths in any spelling: ./d/x.jpg is d/x.jpg
        keys = {input_key(p) for p in _input_list(exclude)}
        entries = (e for e in entries if input_key(e.path) not in keys)
    elif exclude is not None:  # a container of its own (the CLI's resume keys)
        entries = (e for e in entries if e.path not in exclude)
    return ScanRun(entries, det, model_id, cfg, int(batch_size), workers, device, channels_last, autocast, log,
                   compile)


# ----------------------------------------------------------------------------------------------
# output: JSONL / CSV, flushed per group, resumable


def _csv_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v).replace("\r", "\\r").replace("\n", "\\n")  # one record per line, always


def _line(record: Dict[str, Any], fmt: str) -> str:
    record = _utf8_record(record)
    if fmt == "jsonl":
        return json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_csv_text(record[k]) for k in RECORD_FIELDS])
    return buf.getvalue()


def _csv_header() -> str:
    return ",".join(RECORD_FIELDS) + "\n"


class ResumeState(NamedTuple):
    """What an existing output holds: ``records`` complete ones (``counts`` per status),
    ``good_bytes`` up to the end of the last of them, ``torn_bytes`` after it (a torn or
    damaged tail, dropped on resume), ``model`` of its first record (None without one).
    Parquet: ``good_bytes`` / ``torn_bytes`` are the sizes of the complete part files kept
    (``parts`` of them) and of the unfinished or damaged ones dropped."""

    records: int
    counts: Dict[str, int]
    good_bytes: int
    torn_bytes: int
    model: Optional[str] = None
    parts: int = 0  # parquet: the complete part files kept (part-000000 .. parts - 1)


def _parse(line: bytes, fmt: str) -> Optional[Tuple[str, str, str]]:
    """(path, status, model) of one complete output line, or None when it is damaged."""
    try:
        text = line.decode("utf-8", "surrogateescape")
        if fmt == "jsonl":
            r = json.loads(text)
            path, status, model = r["path"], r["status"], r["model"]
        else:
            (row,) = list(csv.reader([text], strict=True))  # (strict: a quote left open is an error)
            if len(row) != len(RECORD_FIELDS):
                return None
            path, status, model = row[0], row[3], row[RECORD_FIELDS.index("model")]
        if not isinstance(path, str) or status not in STATUSES:
            return None
        return path, status, model
    except (ValueError, KeyError, TypeError, csv.Error):
        return None


class OutputMismatch(ValueError):
    """An existing output that is not a scan output of the expected format."""


def _check_head(path: Union[str, Path], fmt: str) -> None:
    """Refuse to resume into a file whose first complete line is neither a record nor (CSV) the
    header: cutting it would destroy what is not ours. A first line without a newline is dropped
    when it can be a record (or header) torn while being written: the start of one, maybe
    followed by the zero bytes a power loss leaves."""
    with open(path, "rb") as f:
        first = f.readline()
    if not first.endswith(b"\n"):
        head = first.rstrip(b"\x00")
        ok = _csv_header().encode().startswith(head) if fmt == "csv" else _torn_record(head)
    else:
        ok = first == _csv_header().encode() if fmt == "csv" else _parse(first[:-1], fmt) is not None
    if not ok:
        crlf = " (CRLF line endings: scan outputs end lines with LF alone)" if first.endswith(b"\r\n") else ""
        raise OutputMismatch(f"{path} is not a {fmt} scan output (its first line is {_clip(first)!r}){crlf}; "
                             f"refusing to resume into it")


_JSONL_START = b'{"path":"'  # how every JSON-lines record begins (RECORD_FIELDS[0] is "path", a string)
_JSON_STRING_BODY = re.compile(rb'(?:[^"\\\x00-\x1f\x80-\xff]|\\.)*')  # (ASCII: json.dumps escapes the rest)


def _torn_record(head: bytes) -> bool:
    """Whether ``head`` can be the start of a JSON-lines record as :func:`_line` writes it (its
    path, then its size, without spaces), cut short: not merely any JSON that starts with a
    "path" key, such as a settings file written by ``json.dump``."""
    if len(head) <= len(_JSONL_START):
        return _JSONL_START.startswith(head)
    if not head.startswith(_JSONL_START):
        return False
    rest = head[_JSON_STRING_BODY.match(head, len(_JSONL_START)).end():]
    after = b'","size":'
    return after.startswith(rest) or rest.startswith(after) or (rest[:1] == b"\\" and len(rest) < 6)


def _clip(line: bytes, n: int = 60) -> bytes:
    return line if len(line) <= n + 10 else line[:n] + b"..." + line[-8:]


def read_output(path: Union[str, Path], fmt: str) -> Iterator[Tuple[str, str, int]]:
    """(path, status, end offset) of each complete record of an existing output, in order,
    stopping at the first torn or damaged line (streaming: constant memory). Parquet: the
    records of the complete part files, the "offset" counting records."""
    for p, status, _, end in _read_output(path, fmt):
        yield p, status, end


def _read_output(path: Union[str, Path], fmt: str) -> Iterator[Tuple[str, str, str, int]]:
    if fmt == "parquet":
        yield from _parquet_read_output(path)
        return
    with open(path, "rb") as f:
        offset = 0
        if fmt == "csv":
            head = f.readline()
            if head != _csv_header().encode():
                return
            offset = len(head)
        for line in f:
            if not line.endswith(b"\n"):
                return
            parsed = _parse(line[:-1], fmt)
            if parsed is None:
                return
            offset += len(line)
            yield parsed[0], parsed[1], parsed[2], offset


def resume_state(path: Union[str, Path], fmt: str) -> ResumeState:
    """Read an existing output once (constant memory); :class:`OutputMismatch` when it is not
    a ``fmt`` scan output."""
    if fmt == "parquet":
        return _parquet_resume_state(path)
    _check_head(path, fmt)
    counts = {s: 0 for s in STATUSES}
    n, good, model = 0, 0, None
    for _, status, m, end in _read_output(path, fmt):
        counts[status] += 1
        n += 1
        good = end
        model = m if model is None else model
    size = os.path.getsize(path)
    if n == 0 and fmt == "csv":
        with open(path, "rb") as f:
            good = len(_csv_header()) if f.readline() == _csv_header().encode() else 0
    return ResumeState(n, counts, good, size - good, model)


def output_paths(path: Union[str, Path], fmt: str) -> Iterator[str]:
    """The paths of the complete records of an existing output, in order (as :func:`path_key`
    gives them)."""
    for p, _, _ in read_output(path, fmt):
        yield _utf8(p)  # outputs of earlier versions held file-name bytes that are not UTF-8 as such


def moved_away(then: Optional[str], stored: Iterable[str]) -> str:
    """Why an output's records cannot be matched to inputs from this working folder ("" when
    they can): some hold relative paths, and the scan that wrote them ran in ``then``, another
    folder, so the same files would be taken for new inputs and scanned again."""
    if not then or _utf8(os.path.abspath(then)) == _utf8(os.getcwd()):  # (as a stats file spells it)
        return ""
    if all(os.path.isabs(p.partition("::")[0]) for p in stored):
        return ""
    return (f" holds records with paths relative to the folder its scan ran in, {then}, and this is "
            f"{os.getcwd()}: resume from there (cd {shlex.quote(then)}), or its inputs would be scanned again")


def input_key(path: str) -> str:
    """An input's path as one key whatever its spelling (``d/x.jpg``, ``./d/x.jpg``,
    ``$PWD/d/x.jpg``; a tar member by its archive's path): how a resume matches records."""
    archive, sep, member = path.partition("::")
    return os.path.abspath(archive) + sep + member


def path_key(path: str, fmt: str) -> str:
    """An input's path as an output of format ``fmt`` stores it (file-name bytes that are not
    UTF-8 as ``\\xNN``; CSV also escapes line breaks)."""
    return _csv_text(_utf8(path)) if fmt == "csv" else _utf8(path)


class RecordWriter:
    """Writes records as JSON lines or CSV rows to a file (or a text stream such as stdout), or
    as a folder of Parquet part files.

    mode: ``"new"`` (the file must not exist), ``"overwrite"``, or ``"resume"`` (cut the file to
    ``state.good_bytes`` - its complete records - and append). ``write(group)`` writes and
    fsyncs: after it returns, those records survive a crash or power loss.

    Parquet (``fmt="parquet"``, needs pyarrow; ``target`` is a folder, see :class:`ParquetParts`):
    records become durable when their part file is closed, every ``part_rows`` records or
    ``part_seconds`` seconds, and at :meth:`close`; a killed scan redoes at most that much.

    ``written``: the counts (:func:`new_counts`) of the records that are in the output: a file's
    lines written whole, a Parquet folder's closed parts, all that a stream took. After a write
    or :meth:`close` failed (a full disk, a file size limit) nothing more is written. Ctrl-C and
    SIGTERM wait for a write or close to end.
    """

    def __init__(self, target: Union[str, Path, IO[str]], fmt: str = "jsonl", mode: str = "new",
                 state: Optional[ResumeState] = None, *, part_rows: int = 10_000, part_seconds: float = 60.0):
        if fmt not in FORMATS:
            raise ValueError(f"RecordWriter: fmt must be one of {FORMATS}, got {fmt!r}")
        if mode not in ("new", "overwrite", "resume"):
            raise ValueError(f"RecordWriter: mode must be 'new', 'overwrite' or 'resume', got {mode!r}")
        self.fmt = fmt
        self._fd: Optional[int] = None
        self._file: Any = None
        self._failed = False
        self._parts: Optional[ParquetParts] = None
        if fmt == "parquet":
            if not isinstance(target, (str, os.PathLike)):
                raise ValueError("RecordWriter: the parquet format writes a folder of part files; give its path, "
                                 "not a stream")
            if mode == "resume" and state is None:
                raise ValueError("RecordWriter: mode 'resume' needs the state of the existing output")
            self._parts = ParquetParts(target, mode, state, part_rows=part_rows, part_seconds=part_seconds)
            self.written = self._parts.written
            return
        self.written = new_counts()
        if not isinstance(target, (str, os.PathLike)):
            self._stream = target
            if fmt == "csv":
                self._stream.write(_csv_header())
                self._stream.flush()
            return
        if mode == "resume" and state is None:
            raise ValueError("RecordWriter: mode 'resume' needs the state of the existing output")
        flags = {"new": os.O_CREAT | os.O_EXCL, "overwrite": os.O_CREAT, "resume": 0}[mode]
        try:
            fd = os.open(target, os.O_RDWR | flags | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            raise OutputBusy(f"{target} appeared after the scan checked it (another scan writing it?); refusing "
                             f"to touch it") from None
        self._file = os.fdopen(_lock(fd, target), "r+b", buffering=0)  # locked before anything is cut
        self._fd = self._file.fileno()
        keep = state.good_bytes if mode == "resume" else 0
        try:
            self._file.truncate(keep)
            self._file.seek(keep)
            if fmt == "csv" and keep == 0:
                self._put(_csv_header().encode())
            os.fsync(self._fd)
        except OSError:  # (a full disk at the CSV header): no torn header left, nor an empty file to refuse
            try:
                self._file.truncate(keep)
                if keep == 0 and mode != "resume":  # (new, or an --overwrite whose old records are gone already)
                    os.unlink(target)
            except OSError:
                pass
            self._file.close()
            raise

    def _put(self, data: bytes) -> int:
        """Write ``data`` at the file's end (unbuffered); returns the bytes written, also when a
        write fails (then as the exception's ``written``)."""
        done = 0
        view = memoryview(data)
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])  # type: ignore[arg-type]
        except BaseException as e:
            e.written = done  # type: ignore[attr-defined]
            raise
        return done

    def write(self, records: Sequence[Dict[str, Any]]) -> None:
        """Write ``records`` whole: Ctrl-C and SIGTERM wait until they are written (and synced)."""
        if self._failed:
            raise RuntimeError("RecordWriter: an earlier write failed; nothing more is written")
        with _signals_held():
            self._write(records)

    def _write(self, records: Sequence[Dict[str, Any]]) -> None:
        if self._parts is not None:
            self._parts.write(records)
            return
        if self._fd is None:  # a stream: what reached it is not known
            try:
                self._stream.write("".join(_line(r, self.fmt) for r in records))
                self._stream.flush()
            except BaseException:
                self._failed = True
                raise
            for r in records:
                count_record(self.written, r)
            return
        lines = [_line(r, self.fmt).encode("utf-8", "surrogateescape") for r in records]
        written = sum(map(len, lines))
        start = os.lseek(self._fd, 0, os.SEEK_CUR)
        try:
            self._put(b"".join(lines))
            os.fsync(self._fd)
        except BaseException as e:
            self._failed = True
            written = getattr(e, "written", written)  # (fsync failed: every line reached the file)
            whole = 0
            for line in lines:
                if whole + len(line) > written:
                    break
                whole += len(line)
            if whole < written:  # a torn line (a full disk, a file size limit): cut, so that the file stays
                try:  # readable as it is (cutting needs no room); --resume would cut it too
                    os.ftruncate(self._fd, start + whole)
                    os.fsync(self._fd)
                except OSError:
                    pass
            raise
        finally:
            for r, line in zip(records, lines):
                written -= len(line)
                if written < 0:  # this line, and those after it, are not (wholly) in the file
                    break
                count_record(self.written, r)

    def close(self) -> None:
        if self._parts is not None:
            with _signals_held():  # (the last part is written and closed whole)
                self._parts.close()
            return
        if self._file is not None:
            try:
                if not self._failed:
                    os.fsync(self._fd)
            finally:
                self._file.close()
                self._file = self._fd = None


class OutputBusy(RuntimeError):
    """Another process writes the output (it holds the output's lock)."""


def _lock(fd: int, target: Any) -> int:
    """``fd`` with an exclusive advisory lock on its file, or :class:`OutputBusy` (fd closed)
    when another scan holds it: two scans writing one output would interleave records."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputBusy(f"{target} is being written by another scan (it holds the output's lock); let that "
                         f"one finish or stop it first") from None
    return fd


def check_not_busy(path: Union[str, Path]) -> None:
    """:class:`OutputBusy` when another scan holds the lock of the output ``path`` (a file or a
    Parquet folder), e.g. before reading it to resume or replace it; nothing when it is free or
    does not exist. (The writer takes the lock for good: this only says so sooner.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO: no wait
    except OSError:
        return
    os.close(_lock(fd, path))


def write_stats(path: Union[str, Path], stats: Dict[str, Any]) -> None:
    """Write the stats JSON atomically (a temporary file renamed over ``path``) and durably:
    ``--resume`` checks its settings against the records, which are synced as they are written."""
    write_atomic(path, json.dumps(utf8_json(stats), indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------
# Parquet: a folder of part files, each closed (and then durable) every part_rows records


PARQUET_INSTALL = "pip install pyarrow (or pip install 'fakespotter[parquet]')"
_PART = re.compile(r"part-(\d{6})\.parquet")
_UNFINISHED = re.compile(r"\.part-(\d{6})\.parquet\.inprogress")


def _pyarrow() -> Any:
    """``(pyarrow, pyarrow.parquet)``, or ImportError saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError(f"the parquet format needs pyarrow, which is not installed ({e}); {PARQUET_INSTALL}") from None
    return pyarrow, pyarrow.parquet


def parquet_schema() -> Any:
    """The Arrow schema of a scan's Parquet records: the fields of :data:`RECORD_FIELDS`, in that
    order, all nullable; ``faces`` a list of structs ``{box: list<int64>, detector_score: double,
    score: double}``, so that ``to_pylist()`` gives the same dicts as the JSON lines."""
    pa, _ = _pyarrow()
    face = pa.struct([("box", pa.list_(pa.int64())), ("detector_score", pa.float64()), ("score", pa.float64())])
    types = {"path": pa.string(), "size": pa.int64(), "sha256": pa.string(), "status": pa.string(),
             "width": pa.int64(), "height": pa.int64(), "frames": pa.int64(), "faces": pa.list_(face),
             "score": pa.float64(), "label": pa.string(), "model": pa.string(), "error_kind": pa.string(),
             "error": pa.string()}
    return pa.schema([(k, types[k]) for k in RECORD_FIELDS])


def _utf8_record(record: Dict[str, Any]) -> Dict[str, Any]:
    return {k: _utf8(v) for k, v in record.items()}


def utf8_json(value: Any) -> Any:
    """``value`` (JSON data) with every string as :func:`_utf8` writes it: a stats or settings
    file names inputs, the output and the working folder as the records name files."""
    if isinstance(value, dict):
        return {_utf8(k): utf8_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [utf8_json(v) for v in value]
    return _utf8(value)


def _utf8(text: Any) -> Any:
    """Every output is valid UTF-8: file-name bytes that are not (surrogate-escaped by Python)
    are written as ``\\xNN``, in every format alike."""
    if not isinstance(text, str):
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that is no escaped byte
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
        return raw.decode("utf-8", "backslashreplace")


def _part_name(i: int) -> str:
    return f"part-{i:06d}.parquet"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parquet_listing(folder: Union[str, Path]) -> Tuple[Dict[int, Path], List[Path]]:
    """({index: complete part}, [unfinished parts]) of a scan's Parquet folder;
    :class:`OutputMismatch` when it is not a folder or holds anything a scan does not write."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OutputMismatch(f"{folder} is not a parquet scan output (a parquet scan writes a folder of part "
                             f"files, this is a file); refusing to resume into it")
    parts: Dict[int, Path] = {}
    unfinished: List[Path] = []
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        m = _PART.fullmatch(e.name)
        if m and e.is_file(follow_symlinks=False):
            parts[int(m.group(1))] = Path(e.path)
        elif _UNFINISHED.fullmatch(e.name) and e.is_file(follow_symlinks=False):
            unfinished.append(Path(e.path))
        else:
            raise OutputMismatch(f"{folder} is not a parquet scan output: it holds {e.name!r}, which a scan does "
                                 f"not write; refusing to resume into it or replace it")
    return parts, unfinished


def _read_part(path: Path, columns: Optional[List[str]] = None, rows: bool = True
               ) -> Optional[List[Dict[str, Any]]]:
    """The records of one part file (only ``columns``; none of them, having read them all, without
    ``rows``), or None when it cannot be read, its page checksums included; :class:`OutputMismatch`
    when it is a readable Parquet file of another schema."""
    pa, pq = _pyarrow()
    try:
        f = pq.ParquetFile(path, page_checksum_verification=True)
        schema = f.schema_arrow
    except (OSError, pa.ArrowException, ValueError):
        return None
    if not schema.equals(parquet_schema()):
        raise OutputMismatch(f"{path} is a Parquet file, but not of a scan's records (its columns are "
                             f"{schema.names}); refusing to resume into it")
    try:
        table = f.read(columns=columns)
        return table.to_pylist() if rows else []
    except (OSError, pa.ArrowException, ValueError):
        return None


def _parquet_scan(folder: Union[str, Path]) -> Tuple[List[Path], List[Path]]:
    """(complete parts to keep, in order; files to drop): the parts numbered 0, 1, ... up to the
    first gap or unreadable one (any column of it: a damaged part is found here, not by the next
    reader of the folder); unfinished parts and everything after a gap are dropped."""
    parts, unfinished = _parquet_listing(folder)
    keep: List[Path] = []
    i = 0
    while i in parts and _read_part(parts[i], rows=False) is not None:
        keep.append(parts[i])
        i += 1
    drop = unfinished + [p for k, p in sorted(parts.items()) if k >= i]
    return keep, drop


def _parquet_read_output(folder: Union[str, Path], keep: Optional[List[Path]] = None
                         ) -> Iterator[Tuple[str, str, str, int]]:
    if keep is None:
        keep, _ = _parquet_scan(folder)
    n = 0
    for part in keep:
        for r in _read_part(part, ["path", "status", "model"]) or []:
            n += 1
            yield r["path"], r["status"], r["model"], n


def _parquet_resume_state(folder: Union[str, Path]) -> ResumeState:
    keep, drop = _parquet_scan(folder)
    counts = {s: 0 for s in STATUSES}
    n, model = 0, None
    for _, status, m, _ in _parquet_read_output(folder, keep):
        if status in counts:
            counts[status] += 1
        n += 1
        model = m if model is None else model
    size = lambda ps: sum(p.stat().st_size for p in ps)  # noqa: E731
    return ResumeState(n, counts, size(keep), size(drop), model, len(keep))


def read_records(path: Union[str, Path], fmt: str) -> Iterator[Dict[str, Any]]:
    """The records of a scan output, in order: the complete lines of a JSON-lines file (a last
    line without its line break, torn by a killed scan, is left out, as ``--resume`` drops it;
    a damaged line raises a ValueError naming it), or the complete part files of a Parquet
    folder (the same dicts; ``faces`` a list of dicts). One part in memory at a time."""
    if fmt == "parquet":
        keep, _ = _parquet_scan(path)
        for part in keep:
            yield from _read_part(part) or []
    elif fmt == "jsonl":
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    return
                try:
                    record = json.loads(line.decode("utf-8", "surrogateescape"))
                except ValueError as e:
                    raise ValueError(f"read_records: {path}, line {number}: not a JSON record ({e}): "
                                     f"{_clip(line.rstrip()).decode('utf-8', 'replace')}") from None
                yield record
    else:
        raise ValueError(f"read_records: fmt must be 'jsonl' or 'parquet', got {fmt!r}")


def is_parquet_output(folder: Union[str, Path]) -> bool:
    """Whether ``folder`` is a folder that holds nothing but a scan's Parquet part files (what
    ``--overwrite`` may empty)."""
    try:
        _parquet_listing(folder)
        return True
    except OutputMismatch:
        return False


class ParquetParts:
    """A scan's records as a folder of Parquet files ``part-000000.parquet``, ``part-000001...``,
    each holding the next records in input order (``pyarrow.parquet.read_table(folder)``,
    pandas, DuckDB and Spark read the folder as one table; :func:`read_records` too).

    Parquet files cannot be appended to: a part is written as the hidden
    ``.part-NNNNNN.parquet.inprogress`` (row groups of up to ``row_group_rows`` records), then
    closed, fsynced and renamed when it holds ``part_rows`` records or is ``part_seconds`` old
    (checked at each ``write``), and at :meth:`close`. A killed scan leaves an unfinished part
    that a resume deletes and redoes: at most one part's records are scanned again.

    mode: ``"new"`` (the folder must not exist), ``"overwrite"`` (empties a folder that holds
    only part files, replaces a file; refuses any other folder), ``"resume"`` (keeps the
    ``state.parts`` complete parts, drops the rest, goes on numbering after them).
    """

    def __init__(self, folder: Union[str, Path], mode: str = "new", state: Optional[ResumeState] = None, *,
                 part_rows: int = 10_000, part_seconds: float = 60.0, row_group_rows: int = 4096):
        self._pa, self._pq = _pyarrow()
        for name, v in (("part_rows", part_rows), ("row_group_rows", row_group_rows)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ParquetParts: {name} must be an int >= 1, got {v!r}")
        if not part_seconds > 0:
            raise ValueError(f"ParquetParts: part_seconds must be > 0, got {part_seconds!r}")
        self.folder = Path(folder)
        self._schema = parquet_schema()
        self._part_rows, self._part_seconds, self._group_rows = part_rows, float(part_seconds), row_group_rows
        self._next = 0
        self._lock_fd: Optional[int] = None
        self._writer: Any = None
        self._rows = 0  # records in the open part, buffered ones included
        self._open = new_counts()  # ... and their counts
        self.written = new_counts()  # those of the closed parts (see RecordWriter.written)
        self._failed = False
        self._buf: List[Dict[str, Any]] = []
        self._opened = 0.0
        if mode not in ("new", "overwrite", "resume"):
            raise ValueError(f"ParquetParts: mode must be 'new', 'overwrite' or 'resume', got {mode!r}")
        fresh = mode == "new" or not self.folder.is_dir()
        if fresh:
            if mode == "overwrite" and (self.folder.exists() or self.folder.is_symlink()):
                self.folder.unlink()
            try:
                self.folder.mkdir()
            except FileExistsError:
                raise OutputBusy(f"{self.folder} exists already (mode {mode!r} makes it; another scan writing it?); "
                                 f"refusing to touch it") from None
        try:
            self._lock()  # before anything in it is read or deleted
        except OSError:  # (a folder made unreadable by the umask, say: not left behind, empty)
            if fresh:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
            raise
        try:
            if not fresh:
                self._next = self._clear(mode, state)
            _fsync_dir(self.folder)
        except BaseException:
            self.close()
            raise

    def _unfinished(self) -> Path:
        return self.folder / f".{_part_name(self._next)}.inprogress"

    def _flush(self, everything: bool) -> None:
        """Write the buffered records as row groups of ``row_group_rows`` (and, with
        ``everything``, the rest as a last, smaller one)."""
        n = len(self._buf) if everything else len(self._buf) // self._group_rows * self._group_rows
        if n == 0:
            return
        if self._writer is None:
            self._writer = self._pq.ParquetWriter(self._unfinished(), self._schema, compression="zstd",
                                                  write_page_checksum=True)  # a resume verifies them
        rows = [_utf8_record(r) for r in self._buf[:n]]
        self._writer.write_table(self._pa.Table.from_pylist(rows, schema=self._schema),
                                 row_group_size=self._group_rows)
        del self._buf[:n]

    def _close_part(self) -> None:
        self._flush(everything=True)
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        tmp = self._unfinished()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.folder / _part_name(self._next))
        add_counts(self.written, self._open)
        self._next += 1
        self._rows = 0
        self._open = new_counts()
        _fsync_dir(self.folder)

    def _fail(self) -> None:
        """A write or close failed (or was interrupted): the open part, whatever state its
        writer is in, is deleted, never renamed into place; its records are lost."""
        self._failed = True
        self._open, self._buf, self._rows = new_counts(), [], 0
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        except Exception:
            pass
        try:
            self._unfinished().unlink()
        except OSError:
            pass

    def write(self, records: Sequence[Dict[str, Any]]) -> None:
        """Add ``records`` in order; a part closes as soon as it holds ``part_rows`` of them (the
        rest go on into the next part) or is ``part_seconds`` old."""
        if self._failed:
            raise RuntimeError("ParquetParts: an earlier write failed; nothing more is written")
        done = 0
        try:
            while done < len(records):
                if self._rows == 0:
                    self._opened = time.monotonic()
                take = records[done:done + self._part_rows - self._rows]
                for r in take:
                    count_record(self._open, r)
                self._buf.extend(take)
                self._rows += len(take)
                done += len(take)
                self._flush(everything=False)
                if self._rows >= self._part_rows or time.monotonic() - self._opened >= self._part_seconds:
                    self._close_part()
        except BaseException:
            self._fail()
            raise

    def _clear(self, mode: str, state: Optional[ResumeState]) -> int:
        """Make an existing folder ready to write in: ``overwrite`` deletes its parts (refusing a
        folder that holds anything else), ``resume`` deletes all but the complete parts.
        Returns the number of the first part to write."""
        if mode == "overwrite":
            parts, unfinished = _parquet_listing(self.folder)  # OutputMismatch: not ours, keep it
            for p in [*parts.values(), *unfinished]:
                p.unlink()
            return 0
        keep, drop = _parquet_scan(self.folder)
        if state is not None and len(keep) != state.parts:
            raise ValueError(f"ParquetParts: {self.folder} changed since its state was read "
                             f"({len(keep)} complete parts, the state says {state.parts})")
        for p in drop:
            p.unlink()
        return len(keep)

    def _lock(self) -> None:
        """Hold the folder's lock (:func:`_lock`) until :meth:`close`: one scan writes it at a time."""
        self._lock_fd = _lock(os.open(self.folder, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), self.folder)

    def close(self) -> None:
        """Close the open part (its records become durable; after a failure it is deleted) and
        release the folder's lock."""
        try:
            if not self._failed:
                try:
                    self._close_part()
                except BaseException:
                    self._fail()
                    raise
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
