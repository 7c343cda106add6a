"""scan.py's pipeline where no other fast test looks: the decode of one file, detector settings,
time limits, the forkserver's preload and early server, _alive, a worker's start-up, the decode
loop (_decoded, _chunks, _wait) run against a fake in-process pool and a fake clock (crashes,
hangs, redo and isolation, kept pools), record groups, counts, stats and argument checks. Mostly
model-free; the few scans use scan_helpers' tiny detector trained on noise."""

from __future__ import annotations

import errno
import importlib
import io
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fakespotter import data as D
from scan_helpers import model_file, noise_image


def S():
    """The scan module (looked up at each use: the package's ``scan`` attribute is the function)."""
    return importlib.import_module("fakespotter.scan")


def png_bytes(h, w, seed=0):
    buf = io.BytesIO()
    Image.fromarray(noise_image(seed, h, w)).save(buf, "PNG")
    return buf.getvalue()


def cfg(aligned=True, file_timeout=0.0):
    return S()._Config(aligned, 150, 1, D.DEFAULT_PIXEL_LIMIT, 0.15, 0, file_timeout)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_file(tmp_path_factory)


# ----------------------------------------------------------------------------------------------
# worker side


def test_default_workers_is_the_usable_cpus_from_1_to_8(monkeypatch):
    for cpus, want in ((1, 1), (3, 3), (8, 8), (64, 8)):
        monkeypatch.setattr(S(), "usable_cpus", lambda: cpus)
        assert S().default_workers() == want


def test_a_decode_records_width_and_height_and_the_whole_image_box_of_a_chip():
    """A 30 wide, 26 high chip (not square, still an aligned chip): width, height and the box
    [0, 0, w, h] the right way round; the not_a_chip message without the function's own prefix."""
    res = S()._decode_one(D.Entry("x.png", data=png_bytes(26, 30)), cfg())
    assert res["error"] is None and (res["width"], res["height"], res["frames"]) == (30, 26, 1)
    assert res["faces"] == [([0, 0, 30, 26], None)] and res["chips"].shape == (1, 150, 150, 3)
    assert res["seconds"] > 0
    bad = S()._decode_one(D.Entry("strip.png", data=png_bytes(40, 100)), cfg())
    assert bad["error"][0] == "not_a_chip" and not bad["error"][1].startswith("chip_from_aligned")
    assert bad["chips"] is None and bad["faces"] == [] and bad["width"] == 100


def test_a_detector_failure_and_a_bug_get_their_own_error_kinds(monkeypatch):
    from fakespotter import faces as F

    entry = D.Entry("x.png", data=png_bytes(20, 20))

    def broken(*a, **k):
        raise RuntimeError("dlib said no")

    monkeypatch.setattr(F, "detect_and_align", broken)
    res = S()._decode_one(entry, cfg(aligned=False))
    assert res["error"] == ("face_detection_error", "RuntimeError: dlib said no") and res["chips"] is None
    monkeypatch.setattr(S(), "decode_image", lambda *a: {}["no such key"])
    res = S()._decode_one(entry, cfg())
    assert res["error"] == ("internal_error", "KeyError: 'no such key'")
    assert res["size"] == len(entry.data) and res["width"] is None


def test_found_faces_keep_their_boxes_and_detector_scores(monkeypatch):
    from fakespotter import faces as F

    found = [SimpleNamespace(chip=np.zeros((150, 150, 3), np.uint8), box=(1.0, 2.0, 11.0, 12.0), score=0.75)]
    monkeypatch.setattr(F, "detect_and_align", lambda *a, **k: found)
    res = S()._decode_one(D.Entry("x.png", data=png_bytes(20, 20)), cfg(aligned=False))
    assert res["error"] is None and res["faces"] == [([1, 2, 11, 12], 0.75)] and res["chips"].shape == (1, 150, 150, 3)


def test_workers_0_leaves_an_armed_timer_alone_even_with_the_default_handler():
    """_alarm_free: a timer armed by the program (its handler the default) is not the scan's to take."""
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    signal.setitimer(signal.ITIMER_REAL, 1000.0)
    try:
        res = S()._decode_timed(D.Entry("x.png", data=png_bytes(20, 20)), cfg(file_timeout=5.0))
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert res["error"] is None and left > 900
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_a_file_stopped_after_it_was_decoded_keeps_no_size_of_a_picture(monkeypatch):
    """The alarm fires during the chip step, after width/height/frames were learnt: the
    timeout record keeps size and sha256, and drops what a record of an error never has."""
    from fakespotter import faces as F

    def endless(*a, **k):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # (Python steps: the alarm is seen)
            pass
        raise AssertionError("the alarm never fired")

    monkeypatch.setattr(F, "chip_from_aligned", endless)
    data = png_bytes(20, 20)
    res = S()._decode_timed(D.Entry("x.png", data=data), cfg(file_timeout=0.2))
    assert res["error"][0] == "timeout" and res["size"] == len(data) and res["sha256"]
    assert (res["width"], res["height"], res["frames"], res["faces"], res["chips"]) == (None, None, None, [], None)


def test_detection_settings_take_the_given_ones_and_check_them():
    det = SimpleNamespace(upsample=1, weak_face_score=0.15, detect_pixels=0)
    ds = S().detection_settings
    assert ds(det, None, None, None, "scan") == (1, 0.15, 0)
    assert ds(det, 2, 0.5, 1 << 20, "scan") == (2, 0.5, 1 << 20)
    assert ds(det, 0, None, None, "scan")[0] == 0  # 0: no upsampling, allowed
    for bad in (True, -1, 1.0):
        with pytest.raises(ValueError, match="scan: upsample must be an int >= 0"):
            ds(det, bad, None, None, "scan")
    with pytest.raises(ValueError, match="scan: detect_pixels must be"):
        ds(det, None, None, -1, "scan")


def test_the_stuck_limit_grows_with_the_files_of_a_chunk_and_is_off_without_a_file_limit():
    s = S()
    assert s._stuck_limit(cfg(file_timeout=10.0), 3) == 30.0 + s.STUCK_GRACE_S
    assert s._stuck_limit(cfg(file_timeout=0.0), 3) is None


def test_file_timeout_takes_0_and_the_largest_value_as_floats():
    check = S().check_file_timeout
    assert check(0, "scan") == 0.0 and check(S().MAX_FILE_TIMEOUT_S, "scan") == S().MAX_FILE_TIMEOUT_S
    assert type(check(5, "scan")) is float


# ----------------------------------------------------------------------------------------------
# worker processes: forkserver preload, the early server, _alive


def test_the_workers_forkserver_keeps_the_callers_own_preload():
    from multiprocessing import forkserver

    server = forkserver._forkserver
    before = server._preload_modules
    try:
        server._preload_modules = ["json"]
        S()._context()
        assert server._preload_modules == ["json", "fakespotter._forkserver_preload"]
    finally:
        server._preload_modules = before


@pytest.fixture
def fake_forkserver(monkeypatch):
    """multiprocessing's forkserver as a stand-in: ``ensure_running`` starts pid 456 unless one
    runs; kills and stops recorded, not done."""
    from multiprocessing import forkserver

    fake = SimpleNamespace(_forkserver_pid=None, _preload_modules=[], stopped=0)
    fake._stop = lambda: setattr(fake, "stopped", fake.stopped + 1)
    monkeypatch.setattr(forkserver, "_forkserver", fake)
    monkeypatch.setattr(forkserver, "ensure_running",
                        lambda: setattr(fake, "_forkserver_pid", fake._forkserver_pid or 456))
    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(pid))
    monkeypatch.setattr(S(), "_early_server", None)
    return fake, killed


def test_only_a_server_start_worker_server_started_and_no_pool_used_is_stopped(fake_forkserver):
    fake, killed = fake_forkserver
    s = S()
    fake._forkserver_pid = 123  # running already (an earlier scan's): not ours to stop
    s.start_worker_server()
    s.stop_unused_worker_server()
    assert killed == [] and fake.stopped == 0
    fake._forkserver_pid = None  # started here, then used by a pool
    s.start_worker_server()
    s._pool(1).shutdown()
    s.stop_unused_worker_server()
    assert killed == [] and fake.stopped == 0
    fake._forkserver_pid = None  # started here, then replaced by another server (pid 789)
    s.start_worker_server()
    fake._forkserver_pid = 789
    s.stop_unused_worker_server()
    assert killed == [] and fake.stopped == 0
    fake._forkserver_pid = None  # started here, unused: stopped
    s.start_worker_server()
    s.stop_unused_worker_server()
    assert killed == [456] and fake.stopped == 1


def test_alive_is_false_for_a_zombie_and_for_a_process_gone():
    alive = S()._alive
    assert alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: a zombie
    assert not alive(child.pid)
    child.wait()
    assert not alive(child.pid)


def test_usable_cpus_is_the_size_of_the_affinity_mask():
    assert S().usable_cpus() == len(os.sched_getaffinity(0))


def test_a_workers_chunk_is_decoded_each_file_under_the_time_limit(monkeypatch):
    monkeypatch.delenv(S()._CRASH_ENV, raising=False)
    monkeypatch.delenv(S()._HANG_ENV, raising=False)
    monkeypatch.setattr(S(), "_decode_timed", lambda e, c: ("timed", e.path, c.file_timeout))
    got = S()._decode_chunk([D.Entry("a"), D.Entry("b")], cfg(file_timeout=5.0))
    assert got == [("timed", "a", 5.0), ("timed", "b", 5.0)]


def test_a_decode_records_the_frames_of_an_animation():
    frames = [Image.fromarray(np.full((24, 24, 3), v, np.uint8)) for v in (40, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    res = S()._decode_one(D.Entry("x.gif", data=buf.getvalue()), cfg())
    assert res["error"] is None and res["frames"] == 2


@pytest.fixture
def dlib_loads(monkeypatch):
    """dlib's detector and landmark model as stand-ins that record their loading; a worker
    that has not warmed up yet."""
    from fakespotter import faces as F

    loads = []
    monkeypatch.setattr(F, "_detector", lambda: loads.append("detector"))
    monkeypatch.setattr(F, "_predictor", lambda path: loads.append("predictor"))
    monkeypatch.setattr(F, "_landmark_path", lambda: "landmarks.dat")
    monkeypatch.setattr(F, "detect_and_align", lambda *a, **k: loads.append("detect") or [])
    monkeypatch.setattr(S(), "_WARM", False)
    return loads


def test_a_timed_decode_loads_dlib_before_the_file_only_when_it_detects_faces(dlib_loads):
    entry = D.Entry("x.png", data=png_bytes(20, 20))
    res = S()._decode_timed(entry, cfg(aligned=True, file_timeout=5.0))
    assert res["error"] is None and dlib_loads == []  # aligned chips: no detector to load
    S()._WARM = False
    res = S()._decode_timed(entry, cfg(aligned=False, file_timeout=5.0))
    assert res["error"] is None and dlib_loads == ["detector", "predictor", "detect"]
    S()._decode_timed(entry, cfg(aligned=False, file_timeout=5.0))
    assert dlib_loads == ["detector", "predictor", "detect", "detect"]  # once per worker


def test_the_per_file_alarm_is_set_to_the_limit_and_gone_after_the_file(monkeypatch):
    from fakespotter import faces as F

    seen, real = [], F.chip_from_aligned

    def chip(*a, **k):
        seen.append(signal.getitimer(signal.ITIMER_REAL)[0])
        return real(*a, **k)

    monkeypatch.setattr(F, "chip_from_aligned", chip)
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    res = S()._decode_timed(D.Entry("x.png", data=png_bytes(20, 20)), cfg(file_timeout=5.0))
    assert res["error"] is None and len(seen) == 1 and 0 < seen[0] <= 5.0
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_file_whose_worker_was_stopped_gets_a_timeout_naming_the_limit():
    res = S()._stuck_result(D.Entry("x.png"), cfg(file_timeout=10.0))
    limit = 10.0 + S().STUCK_GRACE_S
    assert res["error"][0] == "timeout" and f"{limit:g} s after it started" in res["error"][1]
    assert res["path"] == "x.png" and res["chips"] is None


def test_the_errors_keep_their_advice_out_of_their_reason():
    e = S().CompileError("no compiler")
    assert str(e) == "no compiler; scan with compile=False" and e.reason == "no compiler"
    e = S().WorkerStartError("died", " Advice.")
    assert str(e) == "died Advice." and e.reason == "died"


def test_a_broken_pool_is_blamed_on_its_start_only_when_no_worker_started():
    shut = []
    ex = SimpleNamespace(_fakespotter_started=SimpleNamespace(value=1), shutdown=lambda **k: shut.append(k))
    S()._check_started(ex)  # a worker started: a file is to blame
    assert shut == []
    ex._fakespotter_started.value = 0
    with pytest.raises(S().WorkerStartError) as e:
        S()._check_started(ex)
    assert str(e.value).endswith(" workers=0 decodes in this process instead.") and "workers=0" not in e.value.reason
    assert shut == [dict(wait=False, cancel_futures=True)]


def test_a_pool_the_system_will_not_set_up_is_a_worker_start_error(monkeypatch):
    """Shared memory read-only (/dev/shm) or full: the OSError reached the CLI, which took it for
    an output it could not write (exit 3)."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", "/dev/shm/pym-1-x")

    monkeypatch.setattr(S(), "ProcessPoolExecutor", refuse)
    with pytest.raises(S().WorkerStartError) as e:
        S()._pool(2)
    assert e.value.reason == ("scan: the decode worker processes could not be started ([Errno 30] Read-only file "
                              "system: '/dev/shm/pym-1-x').")
    assert str(e.value).endswith(" workers=0 decodes in this process instead.")


@pytest.mark.parametrize("replaced", [False, True])
def test_a_worker_the_system_will_not_start_is_a_worker_start_error(monkeypatch, replaced):
    """No file descriptor left (ulimit -n) when a submit starts a worker: a traceback, from the
    submit itself or from the one in the pool that replaces a pool found broken."""
    class NoFds(FakePool):
        def submit(self, fn, chunk, cfg):
            raise OSError(errno.EMFILE, "Too many open files")

    pools = []
    monkeypatch.setattr(S(), "_pool", lambda workers: pools.append(
        FakePool([], broken_at_submit=True) if replaced and not pools else NoFds([])) or pools[-1])
    monkeypatch.setattr(S().resource, "getrlimit", lambda which: (16, 1024))
    with pytest.raises(S().WorkerStartError) as e:
        list(S()._decoded(iter(entries(3)), cfg(), workers=1, chunk=1, window=2))
    assert e.value.reason == ("scan: the decode worker processes could not be started ([Errno 24] Too many open "
                              "files) (open files are limited to 16: ulimit -n raises that).")
    assert len(pools) == 1 + replaced


def test_a_sigterm_during_a_submit_is_acted_on_after_it():
    got = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with S()._signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # (a Python handler runs between steps of the main thread)
                pass
            assert got == []
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_worker_says_it_started_ignores_ctrl_c_and_exits_once_its_parent_is_gone(monkeypatch):
    s = S()
    threads, alive = [], {}
    monkeypatch.setattr(s, "threading", SimpleNamespace(Thread=lambda target, name, daemon: SimpleNamespace(
        start=lambda: threads.append(target))))
    monkeypatch.setattr(s, "quiet_pillow_logs", lambda: None)
    started = SimpleNamespace(value=0)
    before = signal.getsignal(signal.SIGINT)
    try:
        s._worker_init(4242, started)
        assert started.value == 1 and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)

    class Exit(Exception):
        pass

    naps = []

    def sleep(s):
        naps.append(s)
        if len(naps) > 5:
            raise AssertionError("the watch never noticed")

    monkeypatch.setattr(s, "time", SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(s, "_alive", lambda pid: alive.get(pid, True))
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(Exit(code)))
    alive[4242] = False  # the scan was killed; the forkserver (its parent) lives on
    with pytest.raises(Exit):
        threads[0]()
    assert len(naps) == 1


# ----------------------------------------------------------------------------------------------
# _decoded, _chunks and _wait against a fake pool (futures done at once) and a fake clock


class FakeProcess:
    def __init__(self, exitcode=None):
        self.exitcode, self.killed = exitcode, False

    def is_alive(self):
        return self.exitcode is None and not self.killed

    def kill(self):
        self.killed = True

    terminate = kill

    def join(self, timeout=None):
        pass


class FakePool:
    """A pool that runs each task at once in this process. ``crash``: a chunk holding one of
    these paths fails with BrokenProcessPool (as a worker's crash); ``hang``: its future is
    never done (until the pool's workers are stopped, see ``stuck_pools``); ``started``: the
    workers that finished starting; ``broken_at_submit``: submit raises BrokenProcessPool (a
    kept pool that died while idle). ``log`` gets each chunk's paths, ``submitted`` this pool's."""

    def __init__(self, log, crash=(), hang=(), started=1, broken_at_submit=False):
        self.log, self.crash, self.hang = log, set(crash), set(hang)
        self._processes = {1: FakeProcess()}
        self._fakespotter_started = SimpleNamespace(value=started)
        self.broken_at_submit = broken_at_submit
        self.submitted, self.hanging = [], []
        self.writer_closed = False
        self.killed_at_shutdown = None  # were its workers stopped before its (first) shutdown
        self._result_queue = SimpleNamespace(_writer=SimpleNamespace(close=lambda: setattr(self, "writer_closed", True)))

    def submit(self, fn, chunk, cfg):
        if self.broken_at_submit:
            raise BrokenProcessPool("died while idle")
        paths = [e.path for e in chunk]
        self.log.append(paths)
        self.submitted.append(paths)
        fut = Future()
        if any(p in self.crash for p in paths):
            fut.set_exception(BrokenProcessPool("a worker died"))
        elif any(p in self.hang for p in paths):
            self.hanging.append(fut)
        else:
            fut.set_result([dict(S()._new_result(e), sha256=e.path) for e in chunk])
        return fut

    def shutdown(self, wait=True, cancel_futures=False):
        if self.killed_at_shutdown is None:
            self.killed_at_shutdown = self._processes[1].killed


def entries(n, data=None):
    return [D.Entry(f"f{i:02d}", data=data) for i in range(n)]


@pytest.fixture
def fake_pools(monkeypatch):
    pools, submits = [], []
    monkeypatch.setattr(S(), "_pool", lambda workers: pools.append(FakePool(submits)) or pools[-1])
    return pools, submits


def test_decoded_hands_out_chunks_of_chunk_entries_and_the_rest(fake_pools):
    pools, submits = fake_pools
    got = list(S()._decoded(iter(entries(7)), cfg(), workers=1, chunk=3, window=2))
    assert [e.path for e, _ in got] == [f"f{i:02d}" for i in range(7)] and [r["sha256"] for _, r in got] == \
        [e.path for e, _ in got]
    assert [len(c) for c in submits] == [3, 3, 1]


def test_a_chunk_ends_at_chunk_bytes_of_tar_members(monkeypatch):
    monkeypatch.setattr(S(), "CHUNK_BYTES", 10)
    sizes = [len(c) for c in S()._chunks(iter(entries(5, data=b"12345")), 100)]
    assert sizes == [2, 2, 1]  # 5 + 5 bytes: exactly CHUNK_BYTES ends a chunk


def test_at_most_window_chunks_are_in_flight(fake_pools):
    pools, submits = fake_pools
    most, taken = 0, 0
    for _ in S()._decoded(iter(entries(12)), cfg(), workers=1, chunk=1, window=3):
        taken += 1
        most = max(most, len(submits) - taken + 1)
    assert len(submits) == 12 and most == 3


def test_the_first_chunks_limit_counts_all_its_files(fake_pools, monkeypatch):
    limits = []
    real = S()._wait

    def recording(fut, pool, limit, poll):
        limits.append(limit)
        return (yield from real(fut, pool, limit, poll))

    monkeypatch.setattr(S(), "_wait", recording)
    list(S()._decoded(iter(entries(4)), cfg(file_timeout=10.0), workers=1, chunk=4, window=1))
    assert limits == [40.0 + S().STUCK_GRACE_S]


def test_a_kept_pool_is_not_kept_when_the_caller_is_interrupted(fake_pools):
    pools, _ = fake_pools
    keep = {}
    it = S()._decoded(iter(entries(2)), cfg(), workers=1, chunk=4, window=1, keep=keep)
    next(it)
    with pytest.raises(KeyboardInterrupt):
        it.throw(KeyboardInterrupt)
    assert "pool" not in keep and pools[0]._processes[1].killed
    list(S()._decoded(iter(entries(2)), cfg(), workers=1, chunk=4, window=1, keep=keep))
    assert keep["pool"] is pools[1]  # (a run that ends keeps it)


def test_after_a_crash_each_file_in_flight_is_redone_alone_and_the_crash_is_its_files(fake_pools, monkeypatch):
    pools, submits = fake_pools
    monkeypatch.setattr(S(), "_pool", lambda workers: pools.append(FakePool(submits, crash={"f01"})) or pools[-1])
    got = [(e.path, r["error"] and r["error"][0]) for e, r in
           S()._decoded(iter(entries(8)), cfg(), workers=2, chunk=4, window=2)]
    assert got == [(f"f{i:02d}", "worker_crash" if i == 1 else None) for i in range(8)]
    assert submits[:2] == [["f00", "f01", "f02", "f03"], ["f04", "f05", "f06", "f07"]]
    assert all(len(c) == 1 for c in submits[2:])


class Clock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


@pytest.fixture
def fake_clock(monkeypatch):
    """_wait on a clock that moves only when it waits for a future that never ends."""
    clock = Clock()
    monkeypatch.setattr(S(), "time", SimpleNamespace(monotonic=clock.monotonic, perf_counter=time.perf_counter))

    def wait(fs, timeout):
        clock.now += timeout
        return SimpleNamespace(done=set())

    monkeypatch.setattr(S(), "wait_futures", wait)
    return clock


def run_wait(fut, pool, limit, poll):
    gen, polls = S()._wait(fut, pool, limit, poll), 0
    while True:
        try:
            next(gen)
        except StopIteration as end:
            return end.value, polls
        polls += 1
        assert polls < 1000, "polled without waiting"


def test_wait_polls_once_a_poll_and_stops_the_pool_at_the_limit(fake_clock):
    pool = FakePool([])
    why, polls = run_wait(Future(), pool, 10.0, 1.0)
    assert why == "stuck" and fake_clock.now == 10.0 and polls == 9
    assert pool._processes[1].killed and pool.writer_closed
    why, polls = run_wait(Future(), FakePool([]), 10.0, 2.5)
    assert why == "stuck" and polls == 3


def test_wait_stops_a_pool_with_a_dead_worker_after_the_grace(fake_clock):
    pool = FakePool([])
    pool._processes[2] = FakeProcess(exitcode=-9)
    why, polls = run_wait(Future(), pool, None, 1.0)
    assert why == "dead" and pool._processes[1].killed and pool.writer_closed
    assert S().DEAD_WORKER_GRACE_S <= fake_clock.now <= S().DEAD_WORKER_GRACE_S + S().DEAD_WORKER_CHECK_S


# ----------------------------------------------------------------------------------------------
# _decoded against fake pools whose files hang or crash their worker


@pytest.fixture
def stuck_pools(monkeypatch):
    """``.new``: the settings of the pools _decoded makes (``.first``: more for its first);
    ``.made``; ``.log``: the paths of each submit; ``.limits``: the limits waited with. _wait on
    a file that hangs stops the pool's workers (its futures fail) and says "stuck"."""
    st = SimpleNamespace(made=[], log=[], limits=[], new={}, first={})
    monkeypatch.setattr(S(), "_pool", lambda workers: st.made.append(
        FakePool(st.log, **st.new, **({} if st.made else st.first))) or st.made[-1])

    def wait(fut, pool, limit, poll):
        st.limits.append(limit)
        if fut.done():
            return "done"
        pool._processes[1].kill()
        for f in pool.hanging:
            if not f.done():
                f.set_exception(BrokenProcessPool("stopped"))
        return "stuck"
        yield  # (a generator, as _wait)

    monkeypatch.setattr(S(), "_wait", wait)
    return st


def kinds(got):
    return [(e.path, r["error"] and r["error"][0]) for e, r in got]


def test_a_kept_pool_serves_the_next_call(stuck_pools):
    kept = FakePool(stuck_pools.log)
    keep = {"pool": kept}
    list(S()._decoded(iter(entries(3)), cfg(), workers=1, chunk=2, window=1, keep=keep))
    assert stuck_pools.made == [] and kept.submitted == stuck_pools.log != [] and keep["pool"] is kept


def test_a_kept_pool_found_broken_is_replaced_and_its_workers_stopped(stuck_pools):
    old = FakePool(stuck_pools.log, broken_at_submit=True)
    keep = {"pool": old}
    got = list(S()._decoded(iter(entries(3)), cfg(), workers=1, chunk=2, window=1, keep=keep))
    assert kinds(got) == [(f"f{i:02d}", None) for i in range(3)]
    assert keep["pool"] is stuck_pools.made[0] and old._processes[1].killed
    never = FakePool([], broken_at_submit=True, started=0)  # its workers never started: not a file's fault
    with pytest.raises(S().WorkerStartError):
        list(S()._decoded(iter(entries(3)), cfg(), workers=1, chunk=2, window=1, keep={"pool": never}))


def test_a_pool_whose_workers_never_started_is_a_worker_start_error_not_crash_records(stuck_pools):
    stuck_pools.new.update(crash={"f00"})
    stuck_pools.first.update(started=0)  # (a fresh pool's would start: still the first one's fault)
    with pytest.raises(S().WorkerStartError):
        list(S()._decoded(iter(entries(4)), cfg(), workers=1, chunk=2, window=2))


def test_a_broken_pools_workers_are_stopped_before_it_is_shut_down(stuck_pools):
    stuck_pools.new.update(crash={"f01"})
    got = list(S()._decoded(iter(entries(4)), cfg(), workers=2, chunk=4, window=1))
    assert kinds(got) == [(f"f{i:02d}", "worker_crash" if i == 1 else None) for i in range(4)]
    assert all(p.killed_at_shutdown for p in stuck_pools.made[:-1])


def test_a_stuck_file_of_a_redo_is_a_timeout_and_the_files_behind_it_keep_their_order(stuck_pools):
    """f01 hangs: its chunk is redone one file per task, up to 4 * workers tasks ahead (done
    ones wait behind it); the redo's limit is one file's; f01 gets the timeout, and the files
    decoded behind it come out in order before the rest."""
    stuck_pools.new.update(hang={"f01"})
    got = list(S()._decoded(iter(entries(12)), cfg(file_timeout=10.0), workers=2, chunk=4, window=3))
    assert kinds(got) == [(f"f{i:02d}", "timeout" if i == 1 else None) for i in range(12)]
    one = 10.0 + S().STUCK_GRACE_S
    assert stuck_pools.limits[0] == 4 * 10.0 + S().STUCK_GRACE_S and set(stuck_pools.limits[1:]) == {one}
    redo = stuck_pools.made[1]
    assert redo.submitted == [[f"f{i:02d}"] for i in range(9)]


def test_in_isolation_a_file_that_hangs_is_a_timeout_and_one_that_crashes_a_worker_crash(stuck_pools):
    stuck_pools.new.update(crash={"f00"}, hang={"f01"})
    got = list(S()._decoded(iter(entries(6)), cfg(file_timeout=10.0), workers=2, chunk=4, window=1))
    assert kinds(got) == [("f00", "worker_crash"), ("f01", "timeout")] + [(f"f{i:02d}", None) for i in range(2, 6)]


def test_tar_members_in_flight_stop_at_in_flight_bytes(stuck_pools, monkeypatch):
    monkeypatch.setattr(S(), "IN_FLIGHT_BYTES", 10)
    most, taken = 0, 0
    for _ in S()._decoded(iter(entries(8, data=b"12345")), cfg(), workers=1, chunk=1, window=8):
        taken += 1
        most = max(most, len(stuck_pools.log) - taken + 1)
    assert len(stuck_pools.log) == 8 and most == 2  # 5 + 5 bytes: IN_FLIGHT_BYTES, no more submitted


# ----------------------------------------------------------------------------------------------
# the parent: groups, stats, arguments


def fake_decoded(results):
    def decoded(entries, cfg, workers, chunk, window, keep=None, poll=None):
        decoded.kwargs = dict(chunk=chunk, window=window, poll=poll)
        for i, k in enumerate(results):
            res = dict(S()._new_result(D.Entry(f"r{i}")), width=150, height=150, frames=1)
            if k:
                res.update(chips=np.full((k, 150, 150, 3), i, np.uint8), faces=[([0, 0, 9, 9], 0.9)] * k)
            decoded.pulled = i + 1
            yield D.Entry(f"r{i}"), res
    return decoded


def test_a_group_ends_where_a_forward_finished_and_after_batch_size_records_without_one(model, tmp_path,
                                                                                        monkeypatch):
    fake = fake_decoded([4, 4, 4])  # three images of 4 faces each
    monkeypatch.setattr(S(), "_decoded", fake)
    groups = list(S().scan([str(tmp_path)], model, batch_size=4, workers=0).batches())
    assert [[r["path"] for r in g] for g in groups] == [["r0"], ["r1"], ["r2"]]
    assert fake.kwargs["poll"] is not None and fake.kwargs["poll"] <= S().STALL_FLUSH_S  # (see STALL_FLUSH_S)
    monkeypatch.setattr(S(), "_decoded", fake_decoded([0] * 6))  # no face: no forward
    groups = list(S().scan([str(tmp_path)], model, batch_size=2, workers=0).batches())
    assert [len(g) for g in groups] == [2, 2, 2]


def test_a_full_batch_is_scored_and_handed_out_before_the_next_image_is_read(model, tmp_path, monkeypatch):
    fake = fake_decoded([1, 1, 1, 1])
    monkeypatch.setattr(S(), "_decoded", fake)
    groups = S().scan([str(tmp_path)], model, batch_size=2, workers=0).batches()
    assert [r["path"] for r in next(groups)] == ["r0", "r1"] and fake.pulled == 2
    assert [r["path"] for g in groups for r in g] == ["r2", "r3"]


def test_stats_say_the_settings_given_and_the_decode_time(model, tmp_path):
    for i in range(2):
        Image.fromarray(noise_image(i)).save(tmp_path / f"{i}.png")
    run = S().scan([str(tmp_path)], model, aligned=True, batch_size=2, workers=0, upsample=2, pixel_limit=10_000,
                   file_timeout=7)
    st = run.stats
    assert (st["upsample"], st["pixel_limit"], st["file_timeout"]) == (2, 10_000, 7.0)
    assert [r["status"] for r in run] == ["ok", "ok"] and run.stats["decode_faces_s"] > 0
    small = S().scan([str(tmp_path)], model, aligned=True, workers=0, pixel_limit=100)
    assert [r["error_kind"] for r in small] == ["too_many_pixels"] * 2


def test_a_run_whose_records_were_started_cannot_give_groups_too(model, tmp_path):
    for i in range(3):
        Image.fromarray(noise_image(i)).save(tmp_path / f"{i}.png")
    run = S().scan([str(tmp_path)], model, aligned=True, batch_size=1, workers=0)
    next(run)
    with pytest.raises(RuntimeError, match="this scan has already started"):
        run.batches()
    run.close()


def test_a_compiled_forward_counts_only_the_scans_forwards_and_a_failed_compile_restores_the_weights(
        model, tmp_path, monkeypatch):
    from fakespotter.detector import FakeSpotter

    for i in range(3):
        Image.fromarray(noise_image(i)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(torch, "compile", lambda module: module)  # (no inductor: the eager forward)
    run = S().scan([str(tmp_path)], model, aligned=True, batch_size=2, workers=0, compile=True, log=lambda m: None)
    assert len(list(run)) == 3 and run.stats["forwards"] == 2 and run.stats["compiled"] is True

    def broken(module):
        def fail(*a, **k):
            raise RuntimeError("no compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    det = FakeSpotter.load(model)
    convs = [m for m in det.tap_.backbone.module.modules() if isinstance(m, torch.nn.Conv2d)]
    with pytest.raises(S().CompileError):
        list(S().scan([str(tmp_path)], det, aligned=True, batch_size=2, workers=0, compile=True, channels_last=True,
                      log=lambda m: None))
    assert all(c.weight.is_contiguous() for c in convs), "the weights were not given back"


def test_error_kinds_are_counted():
    s = S()
    stats = s.new_stats()
    res = dict(s._new_result(D.Entry("x")), error=("empty_file", "empty"))
    for _ in range(3):
        s.count_record(stats, s.make_record(res, [], 0.0, "m"))
    assert stats["error_kinds"] == {"empty_file": 3} and stats["counts"]["error"] == 3


def test_devices_other_than_cpu_and_cuda_are_refused_and_cuda_indexes_are_checked(monkeypatch):
    s = S()
    with pytest.raises(ValueError, match="scan: device 'meta': only cpu and cuda devices are supported"):
        s.check_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device 'cuda:1': there are only 1 CUDA devices"):
        s.check_device("cuda:1")


def test_a_detector_on_the_cpu_is_refused_for_a_cuda_scan(model, monkeypatch):
    from fakespotter.detector import FakeSpotter

    det = FakeSpotter.load(model)
    with pytest.raises(ValueError, match="the detector's backbone is on cpu, but device is 'cuda'"):
        S()._load_model(det, "cuda")


def test_arguments_are_checked_before_the_model_is_loaded(tmp_path):
    s = S()
    assert s._input_list(b"/a/b.jpg") == ["/a/b.jpg"] and s._input_list(tmp_path) == [str(tmp_path)]
    missing = tmp_path / "no.fsm"  # (never read: every call fails first)
    with pytest.raises(ValueError, match="scan: pixel_limit must be an int >= 1, got 0"):
        s.scan([str(tmp_path)], missing, pixel_limit=0)
    with pytest.raises(ValueError, match="scan: upsample must be an int >= 0"):
        s.scan([str(tmp_path)], missing, upsample=-1)


def test_an_exclude_container_of_the_callers_own_leaves_out_its_paths(model, tmp_path):
    for i in range(3):
        Image.fromarray(noise_image(i)).save(tmp_path / f"{i}.png")

    class Keys:  # a Container, not a set: paths compared as written
        def __contains__(self, path):
            return path.endswith("1.png")

    got = [os.path.basename(r["path"]) for r in
           S().scan([str(tmp_path)], model, aligned=True, workers=0, exclude=Keys())]
    assert got == ["0.png", "2.png"]


def decoded_res(path, faces=0, error=None):
    res = dict(S()._new_result(D.Entry(path)), width=150, height=150, frames=1, error=error)
    res["faces"] = [([0, 0, 9, 9], 0.9)] * faces
    return res


def test_a_non_finite_score_is_an_internal_error_record():
    rec = S().make_record(decoded_res("x", faces=2), [0.5, math.nan], 0.0, "m")
    assert rec["status"] == "error" and rec["error_kind"] == "internal_error" and rec["faces"] == []
    assert rec["score"] is None and "non-finite" in rec["error"]


def test_labels_are_counted():
    s = S()
    stats = s.new_stats()
    for score in (2.0, 3.0, -1.0):
        s.count_record(stats, s.make_record(decoded_res("x", faces=1), [score], 0.0, "m"))
    assert stats["labels"] == {"fake": 2, "real": 1} and stats["faces"] == 3


def test_the_precision_is_bfloat16_on_a_cpu_and_float16_on_a_gpu_with_autocast():
    p = S().precision_of
    assert (p("cpu", True), p("cuda", True), p("cuda:1", True), p("cuda", False)) == \
        ("bfloat16", "float16", "float16", "float32")


def test_a_ptx_only_build_runs_on_the_gpu_it_was_built_for_and_later_ones():
    problem = S().cuda_build_problem
    info = {"cuda": True, "cuda_architectures": "86-virtual"}
    assert problem(info, (8, 6)) is None and problem(info, (9, 0)) is None and problem(info, (8, 0)) is not None


def test_bools_are_checked_before_the_model_is_loaded(tmp_path):
    with pytest.raises(TypeError, match="scan: autocast must be a bool, got int"):
        S().scan([str(tmp_path)], tmp_path / "no.fsm", autocast=1)


# ----------------------------------------------------------------------------------------------
# scans (the tiny detector, loaded once)


@pytest.fixture(scope="module")
def det(model):
    from fakespotter.detector import FakeSpotter

    return FakeSpotter.load(model)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """d/0.png .. d/2.png (aligned noise chips), the working folder their parent."""
    (tmp_path / "d").mkdir()
    for i in range(3):
        Image.fromarray(noise_image(i, 24, 24)).save(tmp_path / "d" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_skip_alone_limit_0_and_an_exclude_set_in_another_spelling(det, folder):
    run = S().scan(["d"], det, aligned=True, batch_size=2, workers=0, skip=1)
    assert [r["path"] for r in run] == ["d/1.png", "d/2.png"]
    assert run.stats["images"] == 2 and run.stats["counts"]["ok"] == 2  # (counted as handed out)
    assert list(S().scan(["d"], det, aligned=True, batch_size=2, workers=0, limit=0)) == []
    run = S().scan(["d"], det, aligned=True, batch_size=2, workers=0, exclude={str(folder / "d" / "1.png")})
    assert [r["path"] for g in run.batches() for r in g] == ["d/0.png", "d/2.png"]
    assert run.stats["images"] == 2 and run.stats["counts"]["ok"] == 2


def test_a_run_closed_before_it_started_gives_neither_records_nor_groups(det, folder):
    run = S().scan(["d"], det, aligned=True, batch_size=2, workers=0)
    run.close()
    assert list(run) == [] and list(run.batches()) == []


def test_autocast_runs_the_forward_in_bfloat16_on_a_cpu_and_says_so(det, folder):
    run = S().scan(["d"], det, aligned=True, batch_size=2, workers=0, autocast=True)
    assert run.stats["precision"] == "bfloat16"
    fwd = S()._Forward(det, "cpu", 2, autocast=True)
    assert fwd.amp_dtype is torch.bfloat16 and S()._Forward(det, "cpu", 2).amp_dtype is None


def test_a_close_as_the_run_starts_stops_it_before_any_work(det, folder, monkeypatch):
    """close() from another thread just as the first next() starts the run (before the scan's
    generator exists, so close() cannot close it): the run stops before it decodes or scores."""
    real, ran = S()._scan_groups, []

    def groups(job):
        run.close()  # (as from another thread, at that moment)

        def gen():
            ran.append(True)
            yield from real(job)
        return gen()

    monkeypatch.setattr(S(), "_scan_groups", groups)
    run = S().scan(["d"], det, aligned=True, batch_size=2, workers=0)
    assert list(run) == [] and ran == []
