"""The corpus scan of :mod:`fakespotter.scan` on a Ray cluster (``fakespotter scan --engine ray``).

>>> stats = ray_scan(["photos/"], "detector.fsm", "scan-out/")    # doctest: +SKIP
>>> merge_shards("scan-out/", "scan.jsonl")                         # doctest: +SKIP

How the work is split: the driver (this process) lists the inputs (``data.iter_entries``) and
leaves out those whose records the output already holds; the rest become a Ray Dataset of
``(index, entry)`` rows, ``index`` being the input's position in the listing. Ray tasks read,
hash, decode and detect/align faces (``scan._decode_one``, the local engine's per-image work, in
a child process of the task, so that a file that crashes its decoder costs only its own record);
a pool of actors, each loading the model once, runs backbone + taps + classifier on the chips
(``scan._Forward``: forwards of exactly ``batch_size`` chips, zero-padded, as the local engine
runs them, so an image's scores are the same whichever engine, actor or neighbours it had).
Records stream back to the driver, which writes them into shards of the output folder.

The output folder holds ``scan.json`` (what was scanned: model, batch size and the other
settings records depend on), shards ``part-RRR-SSSSSS.jsonl`` (run R of this folder, shard S)
and ``stats.json``. A shard is written under a temporary name, synced and renamed, so every
shard there is complete: a killed run loses at most the records not yet in a shard. A shard line
is a record with one more field, ``index``, first; a shard's lines are sorted by it.
:func:`merge_shards` writes the ordinary single-file output (JSONL or CSV): records in listing
order, without ``index``; for the same inputs, model and batch size it is byte-identical to the
local engine's output. Records hold no timing.

Ray retries what dies: a decode task is re-run, an actor is restarted (``max_restarts=-1``) and
its batch re-run (``max_task_retries=-1``). The driver keeps the first record of each index, so
the output has exactly one record per input however often a batch ran.

Every node needs fakespotter installed (with the backbone weights, ``python -m
fakespotter.weights fetch``) and must read the input paths (shared storage); the model file is
read by the driver and shipped to the actors, and the output is written by the driver.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .data import DEFAULT_PIXEL_LIMIT, Entry, check_sources, iter_entries
from .scan import (FILE_TIMEOUT_S, STATUSES, OutputBusy, RecordWriter, WorkerStartError, _Config, _decoded, _Forward,
                   _input_list, _lock, check_file_timeout, check_not_busy, count_record, detection_settings, input_key,
                   make_record, moved_away, new_stats, utf8_json)

__all__ = ["ray_scan", "merge_shards", "read_shards", "RayNotInstalled", "ShardsError", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'fakespotter[ray]'"
MANIFEST = "scan.json"
STATS = "stats.json"
_MANIFEST_FORMAT = "fakespotter-scan-shards"
_MANIFEST_VERSION = 1
# What the records depend on: a resumed scan must use the same, or its records would differ.
_SETTINGS = ("model", "batch_size", "aligned", "upsample", "weak_face_score", "detect_pixels", "pixel_limit",
             "shard_format")
# what a scan.json without the setting was scanned with
_SETTINGS_BEFORE = {"weak_face_score": 0.0, "detect_pixels": 0}
_DETECTION = ("upsample", "weak_face_score", "detect_pixels")  # settings of no consequence to an --aligned scan


class RayNotInstalled(ImportError):
    """Ray (the ``ray`` extra) is not installed."""


class ShardsError(ValueError):
    """An output folder that is not (or no longer) a consistent set of scan shards."""


def import_ray() -> Any:
    """``ray`` (with Ray Data), or :class:`RayNotInstalled` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayNotInstalled(f"the ray engine needs Ray, which is not installed ({e}); "
                              f"install it with: {INSTALL_HINT}") from None
    return ray


# ----------------------------------------------------------------------------------------------
# the shards folder


def _shard_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.glob("part-*") if p.suffix in (".jsonl",) and p.is_file())


def _read_shard(path: Path, model: Optional[str]) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(index, record) of each line of a shard; :class:`ShardsError` on a damaged line or on a
    record of a model other than ``model`` (the manifest's: a shard copied from another scan)."""
    last = -1
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no line end")
                r = json.loads(line.decode("utf-8", "surrogateescape"))
                index = r.pop("index")
                if not isinstance(index, int) or index <= last or not isinstance(r.get("path"), str) \
                        or r.get("status") not in STATUSES:
                    raise ValueError("not a shard record")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ShardsError(f"{path}: line {n} is not a scan record ({e}); the shards are written "
                                  f"atomically, so it was changed afterwards: delete the shard to rescan its "
                                  f"inputs with --resume") from None
            if model is not None and r.get("model") != model:
                raise ShardsError(f"{path}: line {n} was scored by model {r.get('model')!r}, this scan by {model!r} "
                                  f"({MANIFEST}): the shard comes from another scan; move it away (then --resume "
                                  f"rescans its inputs)")
            last = index
            yield index, r


def read_shards(folder: Union[str, Path]) -> Iterator[Dict[str, Any]]:
    """The records of a shards folder in input-listing order (a streaming k-way merge of the
    shards, each sorted by ``index``; few shards are open at once since shards are written in
    roughly listing order). Records lose their ``index``; a record met twice (the same index and
    path) is yielded once, while an input listed twice keeps both its records."""
    folder = Path(folder)
    model = _read_manifest(folder, required=True).get("model")
    firsts = []
    for p in _shard_files(folder):
        first = next(_read_shard(p, model), None)
        if first is not None:
            firsts.append(((first[0], first[1]["path"]), str(p)))
    firsts.sort()
    heap: List[Tuple[Tuple[int, str], int, Dict[str, Any], Iterator, str]] = []
    serial = itertools.count()  # ties never compare the dicts
    k = 0
    last: Optional[Tuple[int, str]] = None
    last_shard = ""
    while heap or k < len(firsts):
        while k < len(firsts) and (not heap or firsts[k][0] <= heap[0][0]):
            it = _read_shard(Path(firsts[k][1]), model)
            i, r = next(it)
            heapq.heappush(heap, ((i, r["path"]), next(serial), r, it, firsts[k][1]))
            k += 1
        key, _, r, it, shard = heapq.heappop(heap)
        nxt = next(it, None)
        if nxt is not None:
            heapq.heappush(heap, ((nxt[0], nxt[1]["path"]), next(serial), nxt[1], it, shard))
        if last is not None and key[0] == last[0] and key[1] != last[1]:  # one index is one input in a scan
            raise _two_inputs_at(key[0], last[1], key[1], [last_shard, shard])
        if key != last:  # the same input's record twice (index and path): once
            yield r
        last, last_shard = key, shard


def _two_inputs_at(index: int, path: str, other: str, shards: Sequence[Any]) -> ShardsError:
    return ShardsError(f"{' and '.join(map(str, shards))} both hold input {index} of the listing, as {path!r} and "
                       f"{other!r}: one of them comes from another scan; move it away (then --resume rescans its "
                       f"inputs)")


def merge_shards(folder: Union[str, Path], target: Union[str, Path, IO[str]], fmt: str = "jsonl",
                 overwrite: bool = False) -> int:
    """Write the records of a shards folder as one ordinary scan output (``fmt`` jsonl or csv,
    a file or a text stream), in input-listing order; the number of records written. A file is
    written under a temporary name beside it and renamed at the end, so an existing one (kept
    unless ``overwrite``: FileExistsError) stays as it was until the merge is complete; one
    that another scan is writing is refused (:class:`OutputBusy`)."""
    if not isinstance(target, (str, os.PathLike)):
        return _merge_into(folder, target, fmt, "overwrite")
    path = Path(target)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    check_not_busy(path)
    _remove_stale_merges(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.merge.tmp")
    try:
        n = _merge_into(folder, tmp, fmt, "new")
        if (path.exists() or path.is_symlink()) and not overwrite:  # made by another command meanwhile
            raise FileExistsError(f"{path} appeared while merging; pass overwrite=True (CLI: --overwrite) to "
                                  f"replace it")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # (after the rename: nothing there)
    return n


STALE_MERGE_S = 60.0  # a merge's temporary file untouched this long, and unlocked, was left by a killed merge


def _remove_stale_merges(path: Path) -> None:
    """Delete the temporary files of merges into ``path`` that were killed (SIGKILL, a crash):
    unlocked (a merge holds its file's lock while it writes) and not written for a minute."""
    import glob

    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.merge.tmp"):
        try:
            check_not_busy(tmp)
            if time.time() - tmp.stat().st_mtime >= STALE_MERGE_S:
                tmp.unlink()
        except (OutputBusy, OSError):  # another merge's, still running; or gone meanwhile
            pass


def _merge_into(folder: Union[str, Path], target: Union[Path, IO[str]], fmt: str, mode: str) -> int:
    writer = RecordWriter(target, fmt, mode)
    n = 0
    try:
        group: List[Dict[str, Any]] = []
        for r in read_shards(folder):
            group.append(r)
            if len(group) >= 4096:
                writer.write(group)
                n += len(group)
                group = []
        writer.write(group)
        n += len(group)
    finally:
        writer.close()
    return n


def _read_manifest(folder: Path, required: bool = False) -> Optional[Dict[str, Any]]:
    path = folder / MANIFEST
    if not path.is_file():
        if required:
            raise ShardsError(f"{folder} is not a scan shards folder (no {MANIFEST})")
        return None
    try:
        m = json.loads(path.read_text())
        ok = isinstance(m, dict) and m.get("format") == _MANIFEST_FORMAT
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ShardsError(f"{path} is not a fakespotter scan manifest")
    if m.get("version") != _MANIFEST_VERSION:
        raise ShardsError(f"{path}: manifest version {m.get('version')!r}, this fakespotter reads {_MANIFEST_VERSION}")
    return m


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, sync it, rename it over ``path``
    and sync the folder: ``path`` is either absent or complete, whatever happens."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # (a full disk: no temporary file left behind)
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ours(folder: Path) -> List[Path]:
    """The files of a shards folder that a scan wrote (and ``overwrite`` may delete)."""
    names = [folder / MANIFEST, folder / STATS]
    return ([p for p in names if p.exists()] + _shard_files(folder)
            + [p for p in folder.glob(".part-*.tmp")] + [p for p in folder.glob(f".{MANIFEST}.tmp")])


def prepare_output(out: Union[str, Path], mode: str, settings: Dict[str, Any]
                   ) -> Tuple[Dict[str, Any], List[Tuple[int, str]], Dict[str, int]]:
    """Check the output folder for ``mode`` (``new``: absent or empty; ``overwrite``: our files
    will be deleted; ``resume``: a folder of the same settings, or absent / empty) before any
    work. Returns the manifest to write, the ``(index, path)`` of each record already there and
    the counts of those records per status."""
    out = Path(out)
    if mode not in ("new", "overwrite", "resume"):
        raise ValueError(f"ray_scan: mode must be 'new', 'overwrite' or 'resume', got {mode!r}")
    if out.exists() and not out.is_dir():
        raise ShardsError(f"output {out} is a file; the ray engine writes a folder of shards (give a folder)")
    if not out.exists() and not out.parent.is_dir():
        raise ShardsError(f"output {out}: folder {out.parent} does not exist")
    manifest = {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, **settings, "runs": 1, "cwd": os.getcwd()}
    done: List[Tuple[int, str]] = []
    counts = {s: 0 for s in STATUSES}
    if not out.exists() or not any(out.iterdir()):
        return manifest, done, counts
    if mode == "new":
        if not (out / MANIFEST).exists() and not _shard_files(out):
            raise ShardsError(f"output {out} is not empty and holds no scan's shards: give a new or empty folder")
        raise ShardsError(f"output {out} is not empty; pass --resume to continue that scan or --overwrite to "
                          f"replace it")
    old = _read_manifest(out, required=mode == "resume")
    if mode == "overwrite":
        if old is None and not _shard_files(out):
            raise ShardsError(f"output {out} holds files that are not a scan's (no {MANIFEST}); refusing to "
                              f"write into it, even with --overwrite")
        return manifest, done, counts
    assert old is not None
    if not _shard_files(out):  # stopped before its first shard: nothing scanned to differ from (as the local engine)
        manifest["runs"] = int(old.get("runs", 1)) + 1
        return manifest, done, counts
    aligned = bool(settings["aligned"]) and bool(old.get("aligned"))
    diff = [k for k in _SETTINGS if old.get(k, _SETTINGS_BEFORE.get(k)) != settings[k]
            and not (aligned and k in _DETECTION)]
    if diff:
        raise ShardsError(f"--resume: {out} was scanned with other settings, so its records would differ: " +
                          ", ".join(f"{k} {old.get(k, _SETTINGS_BEFORE.get(k))!r} there, {settings[k]!r} now"
                                    for k in diff))
    for p in _shard_files(out):
        for index, r in _read_shard(p, settings["model"]):
            done.append((index, r["path"]))
            counts[r["status"]] += 1
    done.sort()  # one index is one input in a scan (a record met twice is the same input)
    for (i, a), (j, b) in zip(done, done[1:]):
        if i == j and a != b:  # (rare: the shards are read again to name the two)
            raise _two_inputs_at(i, a, b, [p for p in _shard_files(out)
                                           if any(k == i for k, _ in _read_shard(p, settings["model"]))])
    moved = moved_away(old.get("cwd"), (p for _, p in done))
    if moved:
        raise ShardsError(f"--resume: {out}{moved}")
    manifest["runs"] = int(old.get("runs", 1)) + 1
    return manifest, done, counts


# ----------------------------------------------------------------------------------------------
# what runs on the cluster


_DECODE_POOL: Dict[str, Any] = {}  # the decode process of this Ray worker, kept between tasks


def _decode_batch(batch: Dict[str, np.ndarray], cfg: Tuple, crash_marker: Optional[str] = None
                  ) -> Dict[str, np.ndarray]:
    """Ray task: rows of entries -> rows of (index, decode result as JSON, chips as bytes).

    The files are decoded in a child process (the local engine's ``_decoded`` with one worker,
    kept for the next task of this Ray worker): a file that crashes its decoder kills the child,
    not this task, and gets a ``worker_crash`` record; a task that died would be retried by Ray
    on the same file and fail the scan."""
    _crash_once(crash_marker and crash_marker + ".decode")
    c = _Config(*cfg)
    entries = [Entry(str(path), file=str(file) or None, data=bytes(data) if has_data else None,
                     error=tuple(json.loads(err)) if err else None, span=tuple(json.loads(span)) if span else None)
               for path, file, data, has_data, err, span in zip(batch["path"], batch["file"], batch["data"],
                                                                batch["has_data"], batch["error"], batch["span"])]
    for attempt in (1, 2):  # a child killed while starting (no file's fault): once more with a new one
        metas, chips = [], []
        try:
            for _, res in _decoded(iter(entries), c, workers=1, chunk=max(1, len(entries)), window=1,
                                   keep=_DECODE_POOL):
                ch = res.pop("chips")
                chips.append(b"" if ch is None else np.ascontiguousarray(ch, dtype=np.uint8).tobytes())
                metas.append(json.dumps(res))
            break
        except WorkerStartError as e:
            if attempt == 2:
                raise RuntimeError(f"{e.reason} (the decode child of a Ray decode task, twice; --decode-memory sets "
                                   f"the memory each decode task is given)") from None
    return {"index": np.asarray(batch["index"], dtype=np.int64), "meta": np.asarray(metas, dtype=object),
            "chips": np.asarray(chips, dtype=object)}


def _crash_once(marker: Optional[str]) -> None:
    """Tests (``ray_scan(_crash_marker=...)``): the first process to get here exits hard, as a
    killed worker would, once per marker file."""
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(70)


class _Scorer:
    """Ray actor: loads the model once, then decode rows -> (index, record line) rows."""

    def __init__(self, model_ref: List[Any], model_id: str, batch_size: int, device: str, threads: int,
                 crash_marker: Optional[str] = None):
        import ray
        import torch

        from ._malloc import keep_freed_memory
        from .detector import FakeSpotter

        keep_freed_memory()  # this process runs forwards only
        if threads > 0:
            torch.set_num_threads(threads)
        self.det = FakeSpotter.from_bytes(ray.get(model_ref[0]), device=device)
        self.model_id, self.B, self.device = model_id, batch_size, device
        self.threshold = float(self.det.operating_threshold_["logit"])
        H, W = self.det.tap_.preprocessing.size
        self.shape = (H, W, 3)
        self.fwd = _Forward(self.det, device, batch_size)
        self.crash_marker, self.calls, self.reported = crash_marker, 0, 0

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        self.calls += 1
        if self.calls == 2:  # mid-run: after a first batch went out
            _crash_once(self.crash_marker and self.crash_marker + ".actor")
        t0 = time.perf_counter()
        results = [json.loads(m) for m in batch["meta"]]
        logits: List[List[float]] = []
        chips: List[Tuple[int, int, np.ndarray]] = []
        for k, (res, raw) in enumerate(zip(results, batch["chips"])):
            arr = np.frombuffer(bytes(raw), dtype=np.uint8).reshape((-1,) + self.shape)
            logits.append([math.nan] * len(arr))
            chips.extend((k, j, arr[j]) for j in range(len(arr)))
        for (k, j, _), v in zip(chips, self.fwd.score([c for _, _, c in chips])):
            logits[k][j] = v
        lines = [json.dumps({"index": int(i), **make_record(res, lg, self.threshold, self.model_id)},
                            separators=(",", ":"), allow_nan=False)
                 for i, res, lg in zip(batch["index"], results, logits)]
        decode_s = [float(r.get("seconds", 0.0)) for r in results]
        score_s, backoffs = [0.0] * len(lines), [""] * len(lines)  # (this batch's: on its first row)
        if lines:
            score_s[0] = time.perf_counter() - t0
            new, self.reported = self.fwd.backoffs[self.reported:], len(self.fwd.backoffs)
            backoffs[0] = json.dumps(new) if new else ""
        return {"index": np.asarray(batch["index"], dtype=np.int64), "line": np.asarray(lines, dtype=object),
                "decode_s": np.asarray(decode_s), "score_s": np.asarray(score_s),
                "backoffs": np.asarray(backoffs, dtype=object)}


# ----------------------------------------------------------------------------------------------
# the driver


def _model_bytes(model: Any) -> Tuple[bytes, str, Any]:
    """(file bytes, model id, loaded detector) of a model file or a fitted FakeSpotter."""
    import hashlib

    from .detector import FakeSpotter, resolve_model

    if isinstance(model, FakeSpotter):
        model._check_fitted()
        return model.to_bytes(), model.model_sha256(), model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"ray_scan: model must be a model file path, 'default' or a fitted FakeSpotter, "
                        f"got {type(model).__name__}")
    path = resolve_model(model)
    det = FakeSpotter.load(path)  # refuses a bad file before any work
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest(), det


RAY_MIN_RESOURCE = 1e-4  # Ray refuses fractional resources finer than this
CONNECT_TIMEOUT_S = 10.0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _init_ray(ray: Any, address: Optional[str], ray_logs: bool = True) -> None:
    """``ray.init``, failing fast with a ValueError that names ``--address`` when no cluster
    answers there (Ray itself retries for ~14 minutes). ``ray_logs=False``: Ray's loggers print
    only errors and the workers' output stays in Ray's log files (``log_to_driver``). The
    process's signal handling is left as it was: see :func:`_own_signal_handlers`."""
    import socket

    if address and address != "auto" and "://" not in address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"ray_scan: address {address!r} (--address) is not HOST:PORT (a Ray head, e.g. head-node:6379), "
                             f"ray://HOST:PORT or auto")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ValueError(f"ray_scan: no Ray cluster answers at address {address} (--address) "
                             f"({e.strerror or type(e).__name__}: {e})") from None
    for what, text in (("working folder", os.getcwd()), ("command line", " ".join(sys.argv))):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # (ray.init fails on it deep inside, with a bare UnicodeEncodeError)
            raise ValueError(f"ray_scan: Ray cannot start from a process whose {what} holds bytes that are not "
                             f"UTF-8 ({text.encode('utf-8', 'surrogateescape')!r}); run it from another folder, and "
                             f"name such inputs in a file list (@list.txt) or their folder, or use the local "
                             f"engine") from None
    try:
        with _own_signal_handlers():
            ray.init(address=address, include_dashboard=False, log_to_driver=ray_logs,
                     logging_level=logging.WARNING if ray_logs else logging.ERROR)
    except ConnectionError as e:
        where = f"address {address} (--address)" if address else "RAY_ADDRESS or the running cluster"
        raise ValueError(f"ray_scan: cannot connect to the Ray cluster at {where}: {e}") from None


@contextlib.contextmanager
def _ray_loggers_at(level: int) -> Iterator[None]:
    """Ray's loggers in this process (Ray Core's ``ray``, whose level ``ray.init`` also sets, and
    Ray Data's ``ray.data``) at ``level`` or above while the block runs, as they were after it."""
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """The block (``ray.init``, ``ray.shutdown``) leaves the process's SIGTERM and SIGINT handling
    as it was. ``ray.init`` puts Ray's handlers in, which exit (15; 1 after stopping the local Ray
    instance) without the caller's cleanup, and a native one that takes SIGTERM with a stack dump
    and arms an abort 3 s later; ``ray.shutdown`` resets SIGTERM to the default beneath Python's
    handler. A SIGTERM that Ray's handler took in the block (the SystemExit it raised) goes again
    to the process's own handler; if that does not raise, the SystemExit ends the process."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # (only the main thread sets handlers)
        yield
        return
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    alarm = signal.getitimer(signal.ITIMER_REAL)[0] if hasattr(signal, "alarm") else None

    def restore() -> None:
        for sig, handler in handlers.items():
            if handler is not None:  # (None: a handler not set from Python, which it cannot put back)
                signal.signal(sig, handler)
        if alarm == 0:
            signal.alarm(0)  # (the abort that Ray's native handler arms)

    try:
        yield
    except SystemExit:
        restore()
        signal.raise_signal(signal.SIGTERM)
        raise
    finally:
        restore()


def _resources(ray: Any, actors: Optional[int], cpus_per_actor: float, gpus_per_actor: Optional[float],
               decode_cpus: float, decode_memory: int = 0) -> Tuple[int, float, str]:
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    # a task runs on one node: no decode task could ever be scheduled where no node offers the memory it reserves
    memory = [float(n.get("Resources", {}).get("memory", 0)) for n in ray.nodes() if n.get("Alive", True)]
    if memory and max(memory) < decode_memory:
        raise ValueError(f"ray_scan: each decode task reserves {decode_memory / 2 ** 20:.0f} MiB of Ray's 'memory' "
                         f"resource (decode_memory), and no node of the cluster offers that much (at most "
                         f"{max(memory) / 2 ** 20:.0f} MiB: ray start --memory); give the nodes more, or the tasks less")
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if gpus_per_actor > 0 and gpus < gpus_per_actor:
        raise ValueError(f"ray_scan: {gpus_per_actor:g} GPUs per actor (--gpus-per-actor), but the cluster has "
                         f"{gpus:g} GPUs")
    if actors is None:
        if gpus_per_actor > 0:  # one per GPU, as long as CPUs are left for the decode tasks
            actors = max(1, min(int(gpus // gpus_per_actor), int((cpus - decode_cpus) // cpus_per_actor)))
        else:
            actors = max(1, int((cpus // 2) // cpus_per_actor)) if cpus >= 2 else 1
    # actors hold their CPUs for the whole scan: without CPUs left over, no decode task would ever
    # run and the scan would wait forever
    if actors * cpus_per_actor + decode_cpus > cpus:
        raise ValueError(f"ray_scan: {actors} actors (--actors) x {cpus_per_actor:g} CPUs (--cpus-per-actor) + "
                         f"{decode_cpus:g} CPU for decode tasks (--decode-cpus) need more than the cluster's "
                         f"{cpus:g} CPUs; give fewer actors, CPUs per actor or decode CPUs")
    return actors, gpus_per_actor, "cuda" if gpus_per_actor > 0 else "cpu"


def ray_scan(inputs: Union[str, Sequence[str]], model: Any, out: Union[str, Path], *, aligned: bool = False,
             batch_size: int = 64, mode: str = "new", address: Optional[str] = None, actors: Optional[int] = None,
             cpus_per_actor: float = 1.0, gpus_per_actor: Optional[float] = None, actor_batch: Optional[int] = None,
             decode_cpus: float = 1.0, decode_batch: int = 16, decode_memory: int = 512 << 20,
             shard_size: int = 1000, flush_s: float = 60.0,
             pixel_limit: int = DEFAULT_PIXEL_LIMIT, limit: Optional[int] = None, upsample: Optional[int] = None,
             weak_face_score: Optional[float] = None, detect_pixels: Optional[int] = None,
             file_timeout: float = FILE_TIMEOUT_S, stdin: Optional[IO[str]] = None,
             progress: Optional[Callable[[int], None]] = None, show_ray_progress: bool = False,
             ray_logs: bool = True, log: Optional[Callable[[str], None]] = None,
             _crash_marker: Optional[str] = None) -> Dict[str, Any]:
    """Scan images on a Ray cluster into a folder of record shards; returns the run's stats.

    inputs, aligned, batch_size, pixel_limit, limit, upsample, weak_face_score, detect_pixels,
    file_timeout: as
        :func:`fakespotter.scan.scan` (the records are the same as its records for the same
        inputs, model and batch size).
    model: a model file, ``"default"`` (the embedded default detector, as for
        :func:`~fakespotter.scan.scan`) or a fitted ``FakeSpotter`` (read here, shipped to the actors).
    out: the output folder (created; its parent must exist).
    mode: ``new`` (``out`` absent or empty), ``overwrite`` (delete the scan files there first)
        or ``resume`` (skip the inputs whose records ``out`` holds; same model and settings; an
        input listed twice has two records; with changed inputs, see :func:`_to_scan`).
    address: the Ray cluster (``ray.init(address)``; None: the running one, ``RAY_ADDRESS``,
        or a new local instance). An already initialised Ray is used as it is.
    actors: scoring actors (default: one per GPU, as many as leave ``decode_cpus`` CPUs free, else
        half the cluster's CPUs). Actors and decode tasks must fit the cluster's CPUs together.
    cpus_per_actor / gpus_per_actor: resources of each actor (GPUs default: 1 when the cluster
        has GPUs, then the backbone runs on ``cuda``; else 0 and ``cpu``); an actor's torch
        threads = its CPUs.
    actor_batch: images per actor call (default ``batch_size``); their chips run in forwards of
        ``batch_size``, the last one padded: with face detection (a varying number of chips per
        image) a larger value pads less.
    decode_cpus / decode_batch / decode_memory: CPUs per decode task, images per decode call and
        memory (bytes) Ray reserves per decode task (an image at Pillow's pixel limit is ~270 MB
        as RGB).
    shard_size / flush_s: a shard is written every ``shard_size`` records or ``flush_s`` seconds.
    progress: called with the number of records of each written shard.
    ray_logs: Ray's own lines on stderr: its warnings and notices and the workers' output (True),
        or only its errors (False: while the scan runs, Ray's loggers print only errors and,
        when this call starts Ray, the workers' output stays in Ray's log files). Ray's native
        code still prints its errors.
    log: where one-line notices go (a resume whose inputs changed); default: this module's
        logger, at WARNING.
    Raises :class:`RayNotInstalled`, FileNotFoundError / ValueError / TypeError (bad arguments),
    :class:`ShardsError` (an output that is not ours, or another scan's), before any work;
    RuntimeError when the scan fails on the cluster (the shards written so far stay: resume).
    """
    inputs = _input_list(inputs)
    from .features import check_batch_size

    batch_size = check_batch_size(batch_size, "ray_scan")
    for name, v, lo in (("pixel_limit", pixel_limit, 1), ("decode_batch", decode_batch, 1),
                        ("shard_size", shard_size, 1), ("decode_memory", decode_memory, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"ray_scan: {name} must be an int >= {lo}, got {v!r}")
    for name, v in (("actors", actors), ("actor_batch", actor_batch), ("limit", limit)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "limit" else 1)):
            raise ValueError(f"ray_scan: {name} must be None or an int >= {0 if name == 'limit' else 1}, got {v!r}")
    for name, v in (("cpus_per_actor", cpus_per_actor), ("decode_cpus", decode_cpus)):
        if not _number(v) or not RAY_MIN_RESOURCE <= v < math.inf:
            raise ValueError(f"ray_scan: {name} must be a finite number >= {RAY_MIN_RESOURCE} (Ray's resolution), "
                             f"got {v!r}")
    if gpus_per_actor is not None and (not _number(gpus_per_actor) or not 0 <= gpus_per_actor < math.inf
                                       or 0 < gpus_per_actor < RAY_MIN_RESOURCE):
        raise ValueError(f"ray_scan: gpus_per_actor must be None, 0 or a finite number >= {RAY_MIN_RESOURCE}, "
                         f"got {gpus_per_actor!r}")
    if not _number(flush_s) or not 0 < flush_s < math.inf:
        raise ValueError(f"ray_scan: flush_s must be a finite number of seconds > 0, got {flush_s!r}")
    if address is not None and not isinstance(address, str):
        raise TypeError(f"ray_scan: address must be None or a str, got {type(address).__name__}")
    detection_settings(None, upsample, weak_face_score, detect_pixels, "ray_scan")  # (before the model loads)
    file_timeout = check_file_timeout(file_timeout, "ray_scan")
    check_sources(inputs, "scan")
    ray = import_ray()
    data, model_id, det = _model_bytes(model)
    upsample, weak_face_score, detect_pixels = detection_settings(det, upsample, weak_face_score, detect_pixels,
                                                                  "ray_scan")
    size = int(det.tap_.preprocessing.size[0])
    cfg = _Config(bool(aligned), size, int(upsample), int(pixel_limit), weak_face_score, detect_pixels, file_timeout)
    settings = {"model": model_id, "batch_size": batch_size, "aligned": bool(aligned), "upsample": upsample,
                "weak_face_score": weak_face_score, "detect_pixels": detect_pixels, "pixel_limit": pixel_limit,
                "shard_format": "jsonl", "inputs": inputs, "limit": limit}
    out = Path(out)
    manifest, done, resumed = prepare_output(out, mode, settings)
    if limit is not None and len(done) > limit:
        raise ShardsError(f"--resume: {out} already holds {len(done)} records, more than --limit {limit}")
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:  # one scan writes a folder at a time
        lock = _lock(os.open(out, os.O_RDONLY), out)
    except OutputBusy as e:
        raise ShardsError(str(e)) from None

    started = False
    loggers = contextlib.ExitStack()
    try:
        if not ray_logs:
            loggers.enter_context(_ray_loggers_at(logging.ERROR))
        if not ray.is_initialized():
            _init_ray(ray, address, ray_logs)
            started = True
        n_actors, gpus, device = _resources(ray, actors, float(cpus_per_actor), gpus_per_actor, float(decode_cpus),
                                            decode_memory)
        if mode == "overwrite":
            for p in _ours(out):
                p.unlink()
        for p in out.glob(".part-*.tmp"):  # a killed run's unfinished shard
            p.unlink()
        _write_atomic(out / MANIFEST, (json.dumps(utf8_json(manifest), indent=2) + "\n").encode())
        (out / STATS).unlink(missing_ok=True)  # an earlier run's: merge must not take this run as finished

        # (an uncompressed tar's members by their span of it: the decode tasks read them, as they read files)
        entries = itertools.islice(iter_entries(inputs, stdin=stdin, tar_spans=True), limit)
        rows = [{"index": index, "path": e.path, "file": e.file or "", "data": e.data or b"",
                 "has_data": e.data is not None, "error": json.dumps(list(e.error)) if e.error else "",
                 "span": json.dumps(list(e.span)) if e.span else ""}
                for index, e in _to_scan(entries, done, out, log or logging.getLogger(__name__).warning)]
        stats = new_stats()
        for k in ("forwards", "wait_s", "backbone_taps_s", "classifier_s"):  # the actors' time is actors_s
            del stats[k]
        stats.update(actors_s=0.0, engine="ray", batch_size=batch_size, batch_size_requested=batch_size,
                     oom_backoffs=[], actors=n_actors,
                     cpus_per_actor=float(cpus_per_actor), gpus_per_actor=gpus, device=device,
                     actor_batch=actor_batch or batch_size, decode_cpus=float(decode_cpus), aligned=bool(aligned),
                     upsample=upsample, weak_face_score=weak_face_score, detect_pixels=detect_pixels,
                     pixel_limit=pixel_limit, file_timeout=file_timeout, cwd=os.getcwd(), resumed_records=len(done), resumed_errors=resumed["error"], run=manifest["runs"],
                     output=str(out), model=model_id, complete=False)
        t_start = time.perf_counter()
        failed = False
        try:
            if rows:
                _run_or_fail(ray, rows, cfg, data, model_id, out, manifest["runs"], stats, n_actors=n_actors,
                     cpus_per_actor=float(cpus_per_actor), gpus=gpus, device=device,
                     actor_batch=actor_batch or batch_size, decode_cpus=float(decode_cpus), decode_batch=decode_batch,
                     decode_memory=decode_memory,
                     batch_size=batch_size, shard_size=shard_size, flush_s=flush_s, progress=progress,
                     show_ray_progress=show_ray_progress, crash_marker=_crash_marker,
                     log=log or logging.getLogger(__name__).warning)
            stats["complete"] = True
        except BaseException:
            failed = True
            raise
        finally:
            stats["wall_s"] = time.perf_counter() - t_start
            stats["images_per_s"] = stats["images"] / stats["wall_s"] if stats["wall_s"] > 0 else 0.0
            stats["output_counts"] = {s: resumed[s] + stats["counts"][s] for s in STATUSES}  # (the shards' records)
            try:
                _write_atomic(out / STATS, (json.dumps(utf8_json(stats), indent=2, sort_keys=True) + "\n").encode())
            except OSError:
                if not failed:  # (else the failure, a shard the full disk refused, is what to say)
                    raise
    finally:
        if started:
            with _own_signal_handlers():
                ray.shutdown()
        loggers.close()
        if created and not any(out.iterdir()):  # refused before writing (e.g. too many actors): no trace
            out.rmdir()
        os.close(lock)
    return stats


def _to_scan(entries: Iterable[Any], done: List[Tuple[int, str]], out: Path, log: Callable[[str], None]
             ) -> List[Tuple[int, Any]]:
    """``(index, entry)`` of the inputs that have no record yet. When every record sits at its
    input's place in this listing (a resumed scan of the same inputs), by index, so an input
    listed twice is scanned twice. Else (the inputs changed) by path, one input per record (a
    record at its input's place counts for that input first), and the new records are numbered
    after the old ones: they merge at the end, as the local engine appends them. Only the
    entries to scan are kept (a compressed tar's member bytes are in its entry)."""
    placed = {i: input_key(p) for i, p in done}
    keys: List[str] = []
    kept: List[Tuple[int, Any]] = []
    for i, e in enumerate(entries):
        keys.append(input_key(e.path))
        if placed.get(i) != keys[-1]:
            kept.append((i, e))
    if all(i < len(keys) and keys[i] == k for i, k in placed.items()):  # every record at its input's place
        return kept
    log(f"ray_scan: the {len(done)} records of {out} are not at their inputs' places in this listing (the inputs "
        f"changed?); skipping inputs by path instead, and the new records go after them")
    left = collections.Counter(input_key(p) for _, p in done)
    for i, k in placed.items():
        if i < len(keys) and keys[i] == k:
            left[k] -= 1
    start = max(placed) + 1
    todo = []
    for i, e in kept:
        k = keys[i]
        if left[k] > 0:
            left[k] -= 1
        else:
            todo.append((start + i, e))
    return todo


class _ShardWriteFailed(Exception):
    """A shard could not be written here (a full disk, ...): ``error``, the OSError."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def _run_or_fail(*args: Any, **kw: Any) -> None:
    """:func:`_run`; a failure on the cluster (Ray gives up on a task, an actor cannot load the
    model) becomes a RuntimeError, so that it is never taken for a bad argument. A shard that
    cannot be written raises its OSError (the command's exit 3 for a full disk)."""
    try:
        _run(*args, **kw)
    except _ShardWriteFailed as e:
        raise e.error from None
    except Exception as e:
        raise RuntimeError(f"ray_scan: the scan failed on the cluster: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    """A Ray error in one line: its first line and, when Ray appended a remote traceback (an actor
    that died while it started, a task that raised), that traceback's last line, the cause."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    first = f"{type(e).__name__}: {lines[0] if lines else ''}"
    cause = next((line for line in reversed(lines[1:]) if re.match(r"[A-Za-z_][\w.]*(Error|Exception): ", line)), None)
    return first if cause is None or cause in first else f"{first} ... {cause}"


def _take_backoffs(stats: Dict[str, Any], events: List[Dict[str, Any]], log: Callable[[str], None]) -> None:
    """An actor's forwards ran out of memory and halved its batch: into the stats (``batch_size``:
    the smallest any actor went on with), and said."""
    for event in events:
        stats["oom_backoffs"].append(event)
        stats["batch_size"] = min(stats["batch_size"], event["to"])
        log(f"scan: out of memory in an actor's forward of {event['from']} chips ({event['error']}); it goes on "
            f"with batches of {event['to']} (its scores are those of that batch size from there)")


def _run(ray: Any, rows: List[Dict[str, Any]], cfg: _Config, model_bytes: bytes, model_id: str, out: Path, run: int,
         stats: Dict[str, Any], *, n_actors: int, cpus_per_actor: float, gpus: float, device: str, actor_batch: int,
         decode_cpus: float, decode_batch: int, decode_memory: int, batch_size: int, shard_size: int, flush_s: float,
         progress: Optional[Callable[[int], None]], show_ray_progress: bool, crash_marker: Optional[str],
         log: Callable[[str], None]) -> None:
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = show_ray_progress
    ctx.print_on_execution_start = show_ray_progress
    blocks = max(1, min(len(rows) // decode_batch, 4096))
    # The model goes to the object store once; the actors get a reference (held here, so that a
    # restarted actor can still fetch it).
    model_ref = ray.put(model_bytes)
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    del rows
    # The decode tasks' memory reservation also keeps Ray Data from fusing them into the actors
    # (it fuses only operators with the same resources): fused, decoding would wait for the
    # backbone instead of running beside it. stats["ray_operators"] shows what ran.
    ds = ds.map_batches(_decode_batch, batch_size=decode_batch, batch_format="numpy", num_cpus=decode_cpus,
                        memory=decode_memory, fn_kwargs={"cfg": tuple(cfg), "crash_marker": crash_marker})
    ds = ds.map_batches(_Scorer, batch_size=actor_batch, batch_format="numpy", compute=ActorPoolStrategy(size=n_actors),
                        num_cpus=cpus_per_actor, num_gpus=gpus or None,
                        fn_constructor_kwargs={"model_ref": [model_ref], "model_id": model_id,
                                               "batch_size": batch_size, "device": device,
                                               "threads": max(1, int(cpus_per_actor)),
                                               "crash_marker": crash_marker})
    seen: set = set()
    shard: List[Tuple[int, str, Dict[str, Any]]] = []
    seq = itertools.count()
    t_flush = time.monotonic()

    def flush() -> None:
        """Write the shard; its records are counted once they are on disk (a failed write, a
        full disk, leaves them out of the stats, as out of the output)."""
        nonlocal t_flush

        def kept() -> None:  # the shard is on disk: count its records, and never write them again
            for _, _, r in shard:
                count_record(stats, r)
            if progress is not None:
                progress(len(shard))
            shard.clear()

        if shard:
            shard.sort(key=lambda x: x[0])
            name = out / f"part-{run:03d}-{next(seq):06d}.jsonl"
            try:
                _write_atomic(name, "".join(line + "\n" for _, line, _ in shard).encode("utf-8", "surrogateescape"))
            except BaseException as e:
                # a Ctrl-C or SIGTERM (or an error) after the rename, in the folder's fsync: the shard
                # is there, and the handler's last flush must not write it again; before the rename
                # its records stay, for that flush
                if name.exists():
                    kept()
                if isinstance(e, OSError):
                    if e.filename is None:
                        e.filename = str(name)
                    raise _ShardWriteFailed(e) from None
                raise
            kept()
        t_flush = time.monotonic()

    t0 = time.perf_counter()
    first: Optional[Tuple[float, int]] = None
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if first is None:
                first = (time.perf_counter(), len(batch["index"]))
            for i, line, dec_s, sc_s, off in zip(batch["index"], batch["line"], batch["decode_s"], batch["score_s"],
                                                 batch["backoffs"]):
                i = int(i)
                stats["decode_faces_s"] += float(dec_s)
                stats["actors_s"] += float(sc_s)
                if off:
                    _take_backoffs(stats, json.loads(off), log)
                if i in seen:  # a retried batch's second record of this input
                    continue
                seen.add(i)
                r = json.loads(line)
                r.pop("index")
                shard.append((i, str(line), r))
                if len(shard) >= shard_size:
                    flush()
            if time.monotonic() - t_flush >= flush_s:
                flush()
    except BaseException:  # Ctrl-C, SIGTERM, a failed task: the records scored so far are kept (and counted)
        try:
            flush()
        except Exception:
            pass
        raise
    flush()
    if first is not None:  # the start-up (actors starting, loading the model) and the rate after it
        t_end = time.perf_counter()
        stats["startup_s"] = first[0] - t0
        stats["steady_images_per_s"] = (stats["images"] - first[1]) / (t_end - first[0]) if t_end > first[0] else 0.0
    stats["ray_operators"] = [line.split(":")[0].split(" ", 2)[2] for line in ds.stats().splitlines()
                              if line.startswith("Operator ")]
