"""Scanning corpora (DESIGN.md §8): one record per input image, in input order, streaming.

>>> for record in scan(["photos/", "more.tar"], "detector.fsm"):     # doctest: +SKIP
...     print(record["path"], record["status"], record["score"], record["label"])

How the work is split: the parent lists the inputs lazily (``data.iter_entries``) and hands
small chunks of them to ``workers`` processes, which read, hash, decode and detect/align faces
(``workers=0`` does this inline). At most a fixed window of chunks is in flight and results are
taken back in submission order, so memory is bounded by the window, never by the corpus, and
records come out in the input listing order whatever the timing. The parent gathers the chips
and runs backbone + tap + classifier under ``torch.inference_mode`` on exactly ``batch_size``
chips per forward (the last one zero-padded): oneDNN may round differently for another batch
size, so a fixed size makes an image's score independent of its neighbours, of ``workers`` and
of where an interrupted scan was resumed. A record is yielded as soon as all its faces are
scored (see :meth:`ScanRun.batches` for the groups a writer flushes together).

Records (:data:`RECORD_FIELDS`): ``path`` (``archive.tar::member`` for tar members), ``size``
(bytes) and ``sha256`` of the content, ``status`` (``ok``, ``no_face`` or ``error``),
``width``/``height`` of the decoded (EXIF-upright) image, ``frames`` (animated images: how many;
only the first is scored), ``faces`` (``{"box": [x0, y0, x1, y1], "detector_score", "score"}``
per face, highest detector score first; one whole-image box with ``detector_score`` null in
aligned mode), ``score`` (the largest face logit of "fake"; null without a face or on error:
never a made-up score), ``label`` (``"real"``/``"fake"`` at the model's operating threshold,
null without a score), ``model`` (the model file's sha256), ``error_kind`` (a key of
``data.ERROR_KINDS``) and ``error`` (a message). Records hold no timing, so two scans of the
same inputs with the same model and batch size give identical records.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import IO, Any, Container, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .data import DEFAULT_PIXEL_LIMIT, Entry, ImageError, check_sources, decode_image, iter_entries, read_entry

__all__ = [
    "RECORD_FIELDS",
    "STATUSES",
    "ScanRun",
    "scan",
    "default_workers",
    "RecordWriter",
    "ResumeState",
    "OutputMismatch",
    "read_output",
    "resume_state",
]

RECORD_FIELDS = ("path", "size", "sha256", "status", "width", "height", "frames", "faces", "score", "label",
                 "model", "error_kind", "error")
STATUSES = ("ok", "no_face", "error")
FORMATS = ("jsonl", "csv")

_CRASH_ENV = "FAKESPOTTER_SCAN_TEST_CRASH"  # tests: a worker exits hard on paths ending with this


def default_workers() -> int:
    """Decode workers when none is given: the usable CPUs less one (the parent runs the
    backbone), at least 1, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus - 1))


# ----------------------------------------------------------------------------------------------
# worker side: bytes -> hash -> pixels -> face chips


class _Config(NamedTuple):
    aligned: bool
    size: int
    upsample: int
    pixel_limit: int


def _decode_one(entry: Entry, cfg: _Config) -> Dict[str, Any]:
    """Everything a record needs but the scores; never raises for a bad input."""
    t0 = time.perf_counter()
    out: Dict[str, Any] = {"path": entry.path, "size": None, "sha256": None, "width": None, "height": None,
                           "frames": None, "faces": [], "chips": None, "error": None}
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
            out["chips"] = F.chip_from_aligned(img.rgb, size=cfg.size)[None]
            out["faces"] = [([0, 0, int(w), int(h)], None)]
        else:
            try:
                found = F.detect_and_align(img.rgb, upsample=cfg.upsample, size=cfg.size)
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
    crash = os.environ.get(_CRASH_ENV)
    if crash and any(e.path.endswith(crash) for e in entries):
        os._exit(70)
    return [_decode_one(e, cfg) for e in entries]


def _crash_result(entry: Entry) -> Dict[str, Any]:
    return {"path": entry.path, "size": None, "sha256": None, "width": None, "height": None, "frames": None,
            "faces": [], "chips": None, "seconds": 0.0,
            "error": ("worker_crash", "the decode worker process died while reading this file")}


def _pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: workers fork from a clean server that imported fakespotter once, never from
    # this (multi-threaded) process; spawn where forkserver does not exist.
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["fakespotter.scan"])
    else:
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _decoded(entries: Iterator[Entry], cfg: _Config, workers: int, chunk: int, window: int
             ) -> Iterator[Tuple[Entry, Dict[str, Any]]]:
    """(entry, decode result) in input order; at most ``window`` chunks of ``chunk`` entries in
    flight. A worker that dies loses no entry: the chunks in flight are redone one entry at a
    time in a fresh pool, and an entry that kills its worker again gets a ``worker_crash``."""
    if workers == 0:
        for e in entries:
            yield e, _decode_one(e, cfg)
        return
    chunks = iter(lambda: list(itertools.islice(entries, chunk)), [])
    ex = _pool(workers)
    pending: deque = deque()
    try:
        while True:
            while len(pending) < window:
                c = next(chunks, None)
                if c is None:
                    break
                pending.append((c, ex.submit(_decode_chunk, c, cfg)))
            if not pending:
                return
            c, fut = pending.popleft()
            try:
                results = fut.result()
            except BrokenProcessPool:
                backlog = list(c) + [e for cc, _ in pending for e in cc]
                pending.clear()
                ex.shutdown(wait=True, cancel_futures=True)
                ex = _pool(workers)
                for e in backlog:  # isolate the culprit: one entry per task
                    try:
                        (res,) = ex.submit(_decode_chunk, [e], cfg).result()
                    except BrokenProcessPool:
                        res = _crash_result(e)
                        ex.shutdown(wait=True, cancel_futures=True)
                        ex = _pool(workers)
                    yield e, res
                continue
            yield from zip(c, results)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# parent side: chips -> rows -> scores -> records


class _Pending:
    __slots__ = ("res", "logits", "left")

    def __init__(self, res: Dict[str, Any]):
        self.res = res
        n = 0 if res["chips"] is None else len(res["chips"])
        self.logits: List[float] = [math.nan] * n
        self.left = n


class ScanRun:
    """An iterator over the records of one scan (see :func:`scan`), with live ``stats``.

    ``stats``: ``counts`` per status and per label, ``images``, ``wall_s``, ``images_per_s``,
    and the time split ``decode_faces_s`` (summed over workers: read, hash, decode, detect and
    align), ``wait_s`` (the parent waiting for decoded images), ``backbone_taps_s`` and
    ``classifier_s`` (parent).
    """

    def __init__(self, entries: Iterable[Entry], detector: Any, model_id: str, cfg: _Config, batch_size: int,
                 workers: int, device: str):
        self._entries = iter(entries)
        self._det = detector
        self._model_id = model_id
        self._cfg = cfg
        self._batch_size = batch_size
        self._workers = workers
        self._device = device
        self._threshold = float(detector.operating_threshold_["logit"])
        self.stats: Dict[str, Any] = {
            "images": 0, "counts": {s: 0 for s in STATUSES}, "labels": {"real": 0, "fake": 0},
            "error_kinds": {}, "faces": 0, "forwards": 0, "wall_s": 0.0, "images_per_s": 0.0,
            "decode_faces_s": 0.0, "wait_s": 0.0, "backbone_taps_s": 0.0, "classifier_s": 0.0,
            "batch_size": batch_size, "workers": workers, "device": device, "aligned": cfg.aligned,
        }
        self._active: Optional[Iterator[List[Dict[str, Any]]]] = None
        self._flat: Optional[Iterator[Dict[str, Any]]] = None

    def __iter__(self) -> "ScanRun":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._flat is None:
            self._flat = (r for group in self.batches() for r in group)
        return next(self._flat)

    def close(self) -> None:
        """Stop the scan: shut the workers down (also done when the iterator is exhausted)."""
        if self._active is not None:
            self._active.close()

    def batches(self) -> Iterator[List[Dict[str, Any]]]:
        """The records in groups: a group ends where a backbone forward finished (or after
        ``batch_size`` records without one); a writer flushes and syncs once per group.
        A scan runs once: iterate either the records or the groups."""
        if self._active is not None:
            raise RuntimeError("ScanRun: this scan has already started; call scan() again to rescan")
        self._active = self._batches()
        return self._active

    def _batches(self) -> Iterator[List[Dict[str, Any]]]:
        import torch

        B = self._batch_size
        tap = self._det.tap_
        H, W = tap.preprocessing.size
        buf = np.zeros((B, H, W, 3), dtype=np.uint8)
        t_start = time.perf_counter()
        queue: deque = deque()
        chips: List[Tuple[_Pending, int, np.ndarray]] = []
        out: List[Dict[str, Any]] = []
        st = self.stats

        def forward(n: int) -> None:
            buf[:n] = np.stack([c for _, _, c in chips[:n]])
            buf[n:] = 0
            t0 = time.perf_counter()
            with torch.inference_mode():
                x = torch.from_numpy(buf).to(self._device).permute(0, 3, 1, 2).to(torch.float32)
                rows = tap(tap.preprocessing(x)).cpu()
                t1 = time.perf_counter()
                logits = self._det.classifier_.decision_function(rows)[:n].tolist()  # all B rows: same GEMM
            st["backbone_taps_s"] += t1 - t0
            st["classifier_s"] += time.perf_counter() - t1
            st["forwards"] += 1
            for (p, j, _), v in zip(chips[:n], logits):
                p.logits[j] = v
                p.left -= 1
            del chips[:n]

        def emit() -> None:
            while queue and queue[0].left == 0:
                out.append(self._record(queue.popleft()))

        def finish_stats() -> None:
            st["wall_s"] = time.perf_counter() - t_start
            st["images_per_s"] = st["images"] / st["wall_s"] if st["wall_s"] > 0 else 0.0

        window = -(-(B + 2 * self._workers) // 4) + 2 * self._workers
        decoded = _decoded(self._entries, self._cfg, self._workers, chunk=4, window=max(window, 1))
        try:
            while True:
                t0 = time.perf_counter()
                nxt = next(decoded, None)
                st["wait_s"] += time.perf_counter() - t0
                if nxt is None:
                    break
                _, res = nxt
                st["decode_faces_s"] += res.get("seconds", 0.0)
                p = _Pending(res)
                queue.append(p)
                if res["chips"] is not None:
                    chips.extend((p, j, c) for j, c in enumerate(res["chips"]))
                    res["chips"] = None
                ran = False
                while len(chips) >= B:
                    forward(B)
                    ran = True
                emit()
                if out and (ran or len(out) >= B):
                    finish_stats()
                    yield out
                    out = []
            while chips:
                forward(min(B, len(chips)))
            emit()
            finish_stats()
            if out:
                yield out
        finally:
            decoded.close()
            finish_stats()

    def _record(self, p: _Pending) -> Dict[str, Any]:
        res = p.res
        st = self.stats
        err = res["error"]
        faces = [{"box": box, "detector_score": ds, "score": float(s)} for (box, ds), s in zip(res["faces"], p.logits)]
        if err is None and any(not math.isfinite(f["score"]) for f in faces):
            err, faces = ("internal_error", "the classifier gave a non-finite score"), []
        if err is not None:
            status, score, label = "error", None, None
        elif not faces:
            status, score, label = "no_face", None, None
        else:
            status = "ok"
            score = max(f["score"] for f in faces)
            label = "fake" if score > self._threshold else "real"
        st["images"] += 1
        st["counts"][status] += 1
        st["faces"] += len(faces)
        if label is not None:
            st["labels"][label] += 1
        if err is not None:
            st["error_kinds"][err[0]] = st["error_kinds"].get(err[0], 0) + 1
        return {"path": res["path"], "size": res["size"], "sha256": res["sha256"], "status": status,
                "width": res["width"], "height": res["height"], "frames": res["frames"], "faces": faces,
                "score": score, "label": label, "model": self._model_id,
                "error_kind": None if err is None else err[0], "error": None if err is None else err[1]}


def _load_model(model: Any, device: str) -> Tuple[Any, str]:
    from .detector import FakeSpotter

    if isinstance(model, FakeSpotter):
        model._check_fitted()
        return model, getattr(model, "model_id_", None) or "in-memory"
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"scan: model must be a model file path, 'default' or a fitted FakeSpotter, "
                        f"got {type(model).__name__}")
    from .artifact import file_sha256
    from .detector import resolve_model

    path = resolve_model(model)
    det = FakeSpotter.load(path, device=device)
    return det, file_sha256(path)


def scan(inputs: Union[str, Sequence[str]], model: Any = "default", *, aligned: bool = False, batch_size: int = 64,
         workers: Optional[int] = None, device: str = "cpu", pixel_limit: int = DEFAULT_PIXEL_LIMIT,
         limit: Optional[int] = None, upsample: int = 1, skip: int = 0, exclude: Optional[Container[str]] = None,
         stdin: Optional[IO[str]] = None) -> ScanRun:
    """Scan images for synthesized faces; an iterator of one record per input image, in input order.

    inputs: paths - files, folders (recursive), ``@list.txt`` file lists, ``-`` (a list on
        ``stdin``) and tar archives (see ``data.iter_entries``).
    model: a model file (``FakeSpotter.save``), a fitted ``FakeSpotter``, or ``"default"``
        (the default): the embedded default detector (``FakeSpotter.default()``).
    aligned: inputs are already-aligned face chips (resized only; no detection).
    batch_size: chips per backbone forward (every forward has exactly this many).
    workers: decode / face-detection processes (default :func:`default_workers`; 0: inline).
    device: where the backbone runs.
    pixel_limit: images with more pixels are refused (``too_many_pixels``) before decoding.
    limit: scan only the first ``limit`` inputs of the listing.
    skip / exclude: leave out the first ``skip`` inputs (after ``limit``), and inputs whose
        path is in ``exclude``: how a resumed scan continues.
    Returns a :class:`ScanRun` (iterate it for records; ``.stats`` for counts and timings).
    Raises FileNotFoundError / ValueError for missing inputs or bad arguments, and
    ``artifact.ModelFileError`` for a bad model file, before any work.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(s) for s in inputs]
    for name, v, lo in (("batch_size", batch_size, 1), ("pixel_limit", pixel_limit, 1), ("upsample", upsample, 0),
                        ("skip", skip, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"scan: {name} must be an int >= {lo}, got {v!r}")
    if workers is None:
        workers = default_workers()
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"scan: workers must be an int >= 0, got {workers!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"scan: limit must be None or an int >= 0, got {limit!r}")
    check_sources(inputs, "scan")
    det, model_id = _load_model(model, device)
    cfg = _Config(bool(aligned), int(det.tap_.preprocessing.size[0]), int(upsample), int(pixel_limit))
    entries: Iterable[Entry] = iter_entries(inputs, stdin=stdin)
    if limit is not None or skip:
        entries = itertools.islice(entries, skip, limit)
    if exclude is not None:
        entries = (e for e in entries if e.path not in exclude)
    return ScanRun(entries, det, model_id, cfg, int(batch_size), workers, device)


# ----------------------------------------------------------------------------------------------
# output: JSONL / CSV, flushed per group, resumable


def _csv_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v).replace("\r", "\\r").replace("\n", "\\n")  # one record per line, always


def _line(record: Dict[str, Any], fmt: str) -> str:
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
    damaged tail, dropped on resume), ``model`` of its first record (None without one)."""

    records: int
    counts: Dict[str, int]
    good_bytes: int
    torn_bytes: int
    model: Optional[str] = None


def _parse(line: bytes, fmt: str) -> Optional[Tuple[str, str, str]]:
    """(path, status, model) of one complete output line, or None when it is damaged."""
    try:
        text = line.decode("utf-8", "surrogateescape")
        if fmt == "jsonl":
            r = json.loads(text)
            path, status, model = r["path"], r["status"], r["model"]
        else:
            (row,) = list(csv.reader([text]))
            if len(row) != len(RECORD_FIELDS):
                return None
            path, status, model = row[0], row[3], row[RECORD_FIELDS.index("model")]
        if not isinstance(path, str) or status not in STATUSES:
            return None
        return path, status, model
    except (ValueError, KeyError, TypeError):
        return None


class OutputMismatch(ValueError):
    """An existing output that is not a scan output of the expected format."""


def _check_head(path: Union[str, Path], fmt: str) -> None:
    """Refuse to resume into a file whose first complete line is neither a record nor (CSV) the
    header: cutting it would destroy what is not ours. A first line without a newline is a
    record (or header) torn while being written, and is dropped."""
    with open(path, "rb") as f:
        first = f.readline()
    if not first.endswith(b"\n"):
        return
    ok = first == _csv_header().encode() if fmt == "csv" else _parse(first[:-1], fmt) is not None
    if not ok:
        raise OutputMismatch(f"{path} is not a {fmt} scan output (its first line is {first[:60]!r}); "
                             f"refusing to resume into it")


def read_output(path: Union[str, Path], fmt: str) -> Iterator[Tuple[str, str, int]]:
    """(path, status, end offset) of each complete record of an existing output, in order,
    stopping at the first torn or damaged line (streaming: constant memory)."""
    for p, status, _, end in _read_output(path, fmt):
        yield p, status, end


def _read_output(path: Union[str, Path], fmt: str) -> Iterator[Tuple[str, str, str, int]]:
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
        yield p


def path_key(path: str, fmt: str) -> str:
    """An input's path as an output of format ``fmt`` stores it (CSV escapes line breaks)."""
    return _csv_text(path) if fmt == "csv" else path


class RecordWriter:
    """Writes records as JSON lines or CSV rows to a file (or a text stream such as stdout).

    mode: ``"new"`` (the file must not exist), ``"overwrite"``, or ``"resume"`` (cut the file to
    ``state.good_bytes`` - its complete records - and append). ``write(group)`` writes, flushes
    and fsyncs: after it returns, those records survive a crash or power loss.
    """

    def __init__(self, target: Union[str, Path, IO[str]], fmt: str = "jsonl", mode: str = "new",
                 state: Optional[ResumeState] = None):
        if fmt not in FORMATS:
            raise ValueError(f"RecordWriter: fmt must be one of {FORMATS}, got {fmt!r}")
        if mode not in ("new", "overwrite", "resume"):
            raise ValueError(f"RecordWriter: mode must be 'new', 'overwrite' or 'resume', got {mode!r}")
        self.fmt = fmt
        self._fd: Optional[int] = None
        if not isinstance(target, (str, os.PathLike)):
            self._stream = target
            if fmt == "csv":
                self._stream.write(_csv_header())
                self._stream.flush()
            return
        if mode == "resume":
            if state is None:
                raise ValueError("RecordWriter: mode 'resume' needs the state of the existing output")
            f = open(target, "r+b")
            f.truncate(state.good_bytes)
            f.seek(state.good_bytes)
            fresh = state.good_bytes == 0
        else:
            f = open(target, "xb" if mode == "new" else "wb")
            fresh = True
        self._stream = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        self._fd = f.fileno()
        if fmt == "csv" and fresh:
            self._stream.write(_csv_header())
        self._sync()

    def _sync(self) -> None:
        self._stream.flush()
        if self._fd is not None:
            os.fsync(self._fd)

    def write(self, records: Sequence[Dict[str, Any]]) -> None:
        self._stream.write("".join(_line(r, self.fmt) for r in records))
        self._sync()

    def close(self) -> None:
        if self._fd is not None:
            self._sync()
            self._stream.close()
            self._fd = None


def write_stats(path: Union[str, Path], stats: Dict[str, Any]) -> None:
    """Write the stats JSON atomically (a temporary file renamed over ``path``)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
