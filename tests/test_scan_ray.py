"""`fakespotter scan --engine ray` / fakespotter.scan_ray: on a local Ray instance started here
(loopback, 2 CPUs, one per test module), the records equal the local engine's; killed workers are
retried with exactly one record per input; resume skips what the shards hold; merge writes the
local engine's file byte for byte; the CLI's checks exit 2 before any work.

Each Ray scan costs ~5-15 s (actor start and model load), so the runs are shared where a test
only needs to read an output."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from fakespotter.cli import main
from fakespotter.faces import DETECT_PIXELS, WEAK_FACE_SCORE
from fakespotter.scan import RecordWriter, scan
from fakespotter.scan_ray import ShardsError, merge_shards, prepare_output, ray_scan, read_shards
from scan_helpers import model_file, write_good

BATCH = 4


POISON = "poison-decoder-crash.png"  # a decode process exits hard on this file (scan._CRASH_ENV)


@pytest.fixture(scope="module")
def ray_local():
    # set before ray.init: the Ray workers (and their decode processes) inherit it
    os.environ["FAKESPOTTER_SCAN_TEST_CRASH"] = POISON
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
        yield
        ray.shutdown()
    finally:
        os.environ.pop("FAKESPOTTER_SCAN_TEST_CRASH", None)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_file(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """27 inputs: 20 images in two folders, two broken files, a tar archive of 3 images, a
    file list naming one more image and a missing file."""
    root = tmp_path_factory.mktemp("ray_corpus")
    write_good(root / "imgs" / "a", 12, seed=1)
    write_good(root / "imgs" / "b", 8, seed=2, ext=".jpg")
    (root / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "imgs" / "b" / "empty.jpg").write_bytes(b"")
    extra = write_good(root / "extra", 4, seed=3)
    with tarfile.open(root / "pack.tar", "w") as tf:
        for p in extra[:3]:
            tf.add(p, arcname=p.name)
    (root / "list.txt").write_text(f"{extra[3]}\n{root / 'gone.png'}\n")
    return [str(root / "imgs"), str(root / "pack.tar"), "@" + str(root / "list.txt")]


@pytest.fixture(scope="module")
def local(corpus, model):
    return list(scan(corpus, model, aligned=True, batch_size=BATCH, workers=0))


@pytest.fixture(scope="module")
def shards(ray_local, corpus, model, tmp_path_factory):
    """A Ray scan's output folder and stats; actor calls of 3 images (forwards padded
    differently from the local engine's), shards of 5 records."""
    out = tmp_path_factory.mktemp("ray_out") / "shards"
    stats = ray_scan(corpus, model, out, aligned=True, batch_size=BATCH, actor_batch=3, shard_size=5, decode_batch=2)
    return out, stats


def local_bytes(records, fmt):
    buf = io.StringIO()
    RecordWriter(buf, fmt).write(records)
    return buf.getvalue().encode("utf-8", "surrogateescape")


def shard_lines(folder):
    return [json.loads(line) for p in sorted(Path(folder).glob("part-*.jsonl")) for line in open(p)]


def test_records_equal_the_local_engine(shards, local, tmp_path):
    out, stats = shards
    assert len(local) == 27
    kinds = {r["error_kind"] for r in local}
    assert {"decode_error", "empty_file", "not_found", None} <= kinds  # the same errors, below
    assert sum(r["status"] == "ok" for r in local) == 24 and len({r["score"] for r in local if r["score"]}) == 24
    assert list(read_shards(out)) == local  # same scores, same errors, listing order
    sizes = [len(open(p).readlines()) for p in sorted(out.glob("part-*.jsonl"))]
    assert sum(sizes) == 27 and max(sizes) <= 5, sizes  # shard_size=5 (records arrive in blocks)
    for fmt in ("jsonl", "csv"):
        target = tmp_path / f"merged.{fmt}"
        assert merge_shards(out, target, fmt) == 27
        assert target.read_bytes() == local_bytes(local, fmt)
    assert stats["complete"] and stats["images"] == 27 and stats["counts"] == {"ok": 24, "no_face": 0, "error": 3}
    # decoding ran in tasks of its own, beside the actors (not fused into them)
    assert stats["ray_operators"][-2:] == ["MapBatches(_decode_batch)", "MapBatches(_Scorer)"]
    lines = shard_lines(out)
    assert sorted(r["index"] for r in lines) == list(range(27))  # one record per input
    files = sorted(out.glob("part-*.jsonl"))
    assert len(files) >= 2 and not list(out.glob(".*.tmp"))
    for p in files:
        idx = [json.loads(line)["index"] for line in open(p)]
        assert idx == sorted(idx)


def test_killed_workers_are_retried_and_each_input_has_one_record(ray_local, corpus, model, local, tmp_path):
    marker = tmp_path / "crash"
    out = tmp_path / "shards"
    stats = ray_scan(corpus, model, out, aligned=True, batch_size=BATCH, actor_batch=2, shard_size=4,
                     decode_batch=2, _crash_marker=str(marker))
    # a decode task's worker and an actor (on its second batch) each exited hard once
    assert Path(str(marker) + ".decode").exists() and Path(str(marker) + ".actor").exists()
    assert stats["complete"] and stats["images"] == 27
    lines = shard_lines(out)
    assert sorted(r["index"] for r in lines) == list(range(27))
    assert len({r["path"] for r in lines}) == 27
    assert list(read_shards(out)) == local


def test_a_file_that_crashes_its_decoder_gets_a_worker_crash_record(ray_local, model, tmp_path):
    """As in the local engine: a file whose decoding kills the process (every time, unlike a
    killed worker) costs only its own record, of kind worker_crash; the scan completes."""
    folder = tmp_path / "c"
    write_good(folder, 5, seed=9)
    shutil.copy(folder / "img001.png", folder / POISON)
    out = tmp_path / "shards"
    stats = ray_scan([str(folder)], model, out, aligned=True, batch_size=BATCH, decode_batch=3)
    assert stats["complete"] and stats["images"] == 6
    kinds = {Path(r["path"]).name: r["error_kind"] for r in read_shards(out)}
    assert kinds.pop(POISON) == "worker_crash"
    assert kinds == {f"img{i:03d}.png": None for i in range(5)}


def test_resume_redoes_only_what_is_missing(shards, corpus, model, local, tmp_path):
    src, _ = shards
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    files = sorted(out.glob("part-*.jsonl"))
    lost = [json.loads(line)["path"] for line in open(files[1])]
    files[1].unlink()  # as if the run was killed before writing it ...
    (out / ".part-001-000009.jsonl.tmp").write_text('{"index": 3, "pa')  # ... while writing another
    stats = ray_scan(corpus, model, out, aligned=True, batch_size=BATCH, mode="resume", shard_size=100)
    assert stats["resumed_records"] == 27 - len(lost) and stats["images"] == len(lost) and stats["run"] == 2
    assert sorted(json.loads(line)["path"] for p in out.glob("part-002-*.jsonl") for line in open(p)) == sorted(lost)
    assert not list(out.glob(".*.tmp"))
    assert list(read_shards(out)) == local
    # nothing left to do: a second resume scans nothing and starts no work
    again = ray_scan(corpus, model, out, aligned=True, batch_size=BATCH, mode="resume")
    assert again["images"] == 0 and again["resumed_records"] == 27 and again["complete"]
    held = {s: sum(r["status"] == s for r in local) for s in ("ok", "no_face", "error")}
    assert stats["output_counts"] == again["output_counts"] == held  # (the summary's "the output holds")
    with pytest.raises(ShardsError, match="already holds 27 records, more than --limit 3"):
        ray_scan(corpus, model, out, aligned=True, batch_size=BATCH, mode="resume", limit=3)
    with pytest.raises(ValueError):  # more actors than the cluster's 2 CPUs hold: found once Ray runs
        ray_scan(corpus, model, tmp_path / "refused", aligned=True, batch_size=BATCH, actors=5)
    assert not (tmp_path / "refused").exists()  # the folder it made for the scan is gone again


def test_a_resume_is_unfinished_until_it_ends_and_needs_the_first_runs_folder(shards, corpus, model, tmp_path,
                                                                               monkeypatch, capsys):
    import fakespotter.scan_ray as SR

    src, _ = shards
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    next(out.glob("part-*.jsonl")).unlink()
    seen = []

    def killed(*args, **kw):  # what a kill -9 of the resume leaves: no stats written at its end
        seen.append((out / SR.STATS).exists())
        raise SystemExit("killed")
    monkeypatch.setattr(SR, "_run", killed)
    with pytest.raises(SystemExit):
        ray_scan(corpus, model, out, aligned=True, batch_size=BATCH, mode="resume")
    assert seen == [False]  # the first run's stats (complete) are gone once the resume starts
    assert main(["merge", str(out), str(tmp_path / "m.jsonl"), "--quiet"]) == 1  # (said also with --quiet)
    assert "fakespotter merge: warning: the scan in" in capsys.readouterr().err
    # records with relative paths, written from another folder: refused before any work
    manifest = json.loads((out / SR.MANIFEST).read_text())
    assert manifest["cwd"] == os.getcwd()
    (out / SR.MANIFEST).write_text(json.dumps(dict(manifest, cwd=str(tmp_path / "elsewhere"))))
    shard = next(out.glob("part-*.jsonl"))
    lines = [json.loads(line) for line in open(shard)]
    shard.write_text("".join(json.dumps(dict(r, path=os.path.relpath(r["path"]))) + "\n" for r in lines))
    with pytest.raises(ShardsError, match=f"relative to the folder its scan ran in, {tmp_path / 'elsewhere'}"):
        ray_scan(corpus, model, out, aligned=True, batch_size=BATCH, mode="resume")


def test_merge_into_a_full_disk_or_a_busy_output_says_so_in_one_line(shards, tmp_path, capsys):
    import resource
    import subprocess

    src, _ = shards
    out = tmp_path / "m.jsonl"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2500, resource.RLIM_INFINITY))

    run = subprocess.run([sys.executable, "-m", "fakespotter", "merge", str(src), str(out)], capture_output=True,
                         text=True, preexec_fn=small_files)
    assert run.returncode == 3 and "Traceback" not in run.stderr, run.stderr
    assert f"fakespotter merge: error: writing {out}: File too large; nothing was kept" in run.stderr
    assert not out.exists()  # no torn file that a rerun would refuse to replace
    busy = RecordWriter(out, "jsonl", "new")  # another command writing it: holds its lock
    try:
        assert main(["merge", str(src), str(out), "--overwrite"]) == 2
        assert "is being written by another scan" in capsys.readouterr().err
    finally:
        busy.close()
    assert main(["merge", str(src), str(out), "--overwrite"]) == 0


def test_merge_replaces_out_whole_or_not_at_all(shards, tmp_path, capsys, monkeypatch):
    """OUT is written under a temporary name and renamed: a failed merge leaves the old OUT as
    it was (it used to be emptied at once, and deleted on any error), a hard link to a shard
    given as OUT keeps the shard, and a FIFO or device is refused before any work."""
    import os
    import resource
    import subprocess

    src, _ = shards
    out = tmp_path / "m.jsonl"
    out.write_text("the user's\n")
    run = subprocess.run([sys.executable, "-m", "fakespotter", "merge", str(src), str(out), "--overwrite"],
                         capture_output=True, text=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2500, resource.RLIM_INFINITY)))
    assert run.returncode == 3 and f"({out} is as it was)" in run.stderr, run.stderr
    assert out.read_text() == "the user's\n" and sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]
    shard = sorted(src.glob("part-*.jsonl"))[0]
    before = shard.read_bytes()
    os.link(shard, tmp_path / "link.jsonl")
    assert main(["merge", str(src), str(tmp_path / "link.jsonl"), "--overwrite", "--quiet"]) == 0
    assert shard.read_bytes() == before and len((tmp_path / "link.jsonl").read_text().splitlines()) == 27
    os.mkfifo(tmp_path / "pipe")
    assert main(["merge", str(src), str(tmp_path / "pipe"), "--overwrite"]) == 2
    assert "exists and is not a regular file" in capsys.readouterr().err
    # the Python function does the same
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        merge_shards(src, out)
    def full(self, records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sys.modules["fakespotter.scan"].RecordWriter, "write", full)
    with pytest.raises(OSError, match="No space left"):
        merge_shards(src, out, overwrite=True)
    monkeypatch.undo()
    assert out.read_text() == "the user's\n" and not list(tmp_path.glob(".m.jsonl.*"))
    assert merge_shards(src, out, overwrite=True) == 27


def test_an_interrupted_ray_scan_keeps_and_counts_the_records_it_scored(ray_local, corpus, model, tmp_path,
                                                                        monkeypatch):
    import types

    import fakespotter.scan_ray as SR

    scored = []

    def interrupted(line):  # Ctrl-C after six records, before a shard of 100 is full
        if len(scored) == 6:
            raise KeyboardInterrupt
        r = json.loads(line)
        scored.append(r["path"])
        return r
    monkeypatch.setattr(SR, "json", types.SimpleNamespace(loads=interrupted, dumps=json.dumps))
    with pytest.raises(KeyboardInterrupt):
        ray_scan(corpus, model, tmp_path / "o", aligned=True, batch_size=BATCH, shard_size=100)
    assert sorted(r["path"] for r in shard_lines(tmp_path / "o")) == sorted(scored)
    stats = json.loads((tmp_path / "o" / SR.STATS).read_text())
    assert stats["images"] == 6 and stats["complete"] is False


@pytest.mark.parametrize("renamed", [True, False])
def test_an_interrupt_during_a_shard_write_neither_writes_it_twice_nor_loses_it(ray_local, corpus, model, tmp_path,
                                                                                monkeypatch, renamed):
    """A Ctrl-C landing after a shard's rename (in the folder's fsync) went to the interrupt
    handler with the shard's records still pending: its last flush wrote them into a second
    shard, and merge then warned of a deleted shard on every run. One landing before the rename
    leaves the records to that last flush: they are kept, once."""
    import fakespotter.scan_ray as SR

    real, calls = SR._write_atomic, []

    def interrupted(path, data):
        if path.name.startswith("part-"):
            calls.append(path.name)
            if len(calls) == 1:
                if renamed:
                    real(path, data)
                raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(SR, "_write_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ray_scan(corpus, model, tmp_path / "o", aligned=True, batch_size=BATCH, shard_size=3)
    indexes = [r["index"] for r in shard_lines(tmp_path / "o")]
    assert len(SR._shard_files(tmp_path / "o")) == 1 and len(indexes) == len(set(indexes)) == 3
    stats = json.loads((tmp_path / "o" / SR.STATS).read_text())
    assert stats["images"] == 3 and sum(stats["output_counts"].values()) == 3  # counted once
    # the settings a local scan's stats hold too (they were only in the scan's manifest)
    from fakespotter.scan import DEFAULT_PIXEL_LIMIT, FILE_TIMEOUT_S

    assert (stats["pixel_limit"], stats["file_timeout"], stats["cwd"]) == (DEFAULT_PIXEL_LIMIT, FILE_TIMEOUT_S,
                                                                          os.getcwd())


def test_a_ray_scan_whose_shard_write_fails_counts_only_what_it_wrote(ray_local, corpus, model, tmp_path,
                                                                      monkeypatch, capsys):
    """A full disk: the stats counted every record received, also those of the shard that
    could not be written (the local engine takes a failed group back out too)."""
    import fakespotter.scan_ray as SR

    real, writes = SR._write_atomic, []

    def full_after_one_shard(path, data):
        if path.name.startswith("part-"):
            writes.append(path.name)
            if len(writes) > 1:
                raise OSError(28, "No space left on device")
        real(path, data)
    monkeypatch.setattr(SR, "_write_atomic", full_after_one_shard)
    with pytest.raises(OSError, match="No space left") as e:  # the write's own error (not "failed on the cluster")
        ray_scan(corpus, model, tmp_path / "o", aligned=True, batch_size=BATCH, shard_size=4)
    assert e.value.errno == 28 and "part-" in e.value.filename
    written = shard_lines(tmp_path / "o")
    stats = json.loads((tmp_path / "o" / SR.STATS).read_text())
    assert len(written) == 4 and stats["images"] == 4 and stats["complete"] is False
    # the command: a full disk is exit 3, naming the shard, as for the local engine
    writes.clear()  # the first shard is written, the second is not
    assert main(["scan", *corpus, "--model", str(model), "--aligned", "--engine", "ray", "--out",
                 str(tmp_path / "o2"), "--batch-size", str(BATCH), "--shard-size", "4", "--quiet"]) == 3
    err = capsys.readouterr().err.splitlines()[-1]  # (Ray's own lines before it)
    assert re.fullmatch(rf"fakespotter scan: error: cannot write {re.escape(str(tmp_path / 'o2'))}/part-\S+\.jsonl: No "
                        r"space left on device: the shards written before stay; free space \(or raise the file size "
                        r"limit\) and rerun with --resume", err), err
    assert len(shard_lines(tmp_path / "o2")) == 4
    assert main(["scan", *corpus, "--model", str(model), "--aligned", "--engine", "ray", "--out",
                 str(tmp_path / "o4"), "--batch-size", str(BATCH), "--quiet"]) == 3  # the first shard fails
    assert capsys.readouterr().err.splitlines()[-1].endswith(": No space left on device: no record was written")
    # the stats file, written last, finds the disk full too: the shard's error is still the one said
    writes.clear()

    def full_for_all(path, data):
        if path.name.startswith("part-"):
            writes.append(path.name)
        if len(writes) > 1:
            raise OSError(28, "No space left on device")
        real(path, data)
    monkeypatch.setattr(SR, "_write_atomic", full_for_all)
    with pytest.raises(OSError, match="No space left") as e:
        ray_scan(corpus, model, tmp_path / "o3", aligned=True, batch_size=BATCH, shard_size=4)
    assert e.value.filename is not None and "part-" in e.value.filename


def test_an_atomic_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    import fakespotter.scan_ray as SR

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(SR.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        SR._write_atomic(tmp_path / "stats.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_what_a_resume_scans_an_input_listed_twice_and_changed_inputs():
    """By index while every record sits at its input's place (an input listed twice is two
    inputs); by path, one input per record, once the inputs changed, the new records numbered
    after the old ones (they merge at the end, as the local engine appends them)."""
    from types import SimpleNamespace

    from fakespotter.scan_ray import _to_scan

    def run(paths, done):
        notes = []
        got = [(i, e.path) for i, e in _to_scan(iter([SimpleNamespace(path=p) for p in paths]), done, Path("o"),
                                                notes.append)]
        return got, notes

    assert run(["a", "b", "b", "c"], [(0, "a"), (2, "b")]) == ([(1, "b"), (3, "c")], [])
    assert run(["a", "b", "./b"], [(1, "b")]) == ([(0, "a"), (2, "./b")], [])  # another spelling: its own place
    got, notes = run(["x", "a", "b", "b", "c"], [(0, "a"), (1, "b"), (2, "b")])  # x inserted first
    assert got == [(3, "x"), (7, "c")] and "not at their inputs' places" in notes[0]
    got, _ = run(["a", "b", "b"], [(0, "a"), (5, "b")])  # an earlier changed-input resume put b at 5
    assert got == [(8, "b")]


def test_merge_removes_the_temporary_files_of_killed_merges_only(shards, tmp_path):
    """A merge killed with SIGKILL leaves its hidden temporary file; the next merge into the same
    output removes it, but not one that a running merge holds (locked), nor a fresh one."""
    import fcntl
    import os

    src, _ = shards
    out = tmp_path / "m.jsonl"
    old = time.time() - 3600
    stale, fresh, held = (tmp_path / f".m.jsonl.{pid}.merge.tmp" for pid in (111, 222, 333))
    for p in (stale, fresh, held):
        p.write_text('{"path": "half a merge"}\n')
    for p in (stale, held):
        os.utime(p, (old, old))
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a merge that is still writing
    try:
        assert merge_shards(src, out) == 27
    finally:
        os.close(fd)
    assert not stale.exists() and fresh.exists() and held.exists()
    (tmp_path / ".other.jsonl.111.merge.tmp").write_text("another output's")
    os.utime(tmp_path / ".other.jsonl.111.merge.tmp", (old, old))
    assert merge_shards(src, out, overwrite=True) == 27 and (tmp_path / ".other.jsonl.111.merge.tmp").exists()


def test_merge_keeps_both_records_of_an_input_listed_twice_and_says_when_a_shard_is_missing(shards, tmp_path,
                                                                                             capsys):
    src, stats = shards
    twice = tmp_path / "twice"
    twice.mkdir()
    shutil.copy(src / "scan.json", twice / "scan.json")
    recs = [dict(r, index=i) for i, r in enumerate(list(read_shards(src))[:3])]
    recs.insert(1, dict(recs[0], index=1))  # the first input listed twice in a row
    for i, r in enumerate(recs[2:], 2):
        r["index"] = i
    (twice / "part-001-000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [r["path"] for r in read_shards(twice)] == [r["path"] for r in recs]
    (twice / "part-001-000001.jsonl").write_text(json.dumps(recs[2]) + "\n")  # the same record again: once
    assert len(list(read_shards(twice))) == 4
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    lost = sorted(missing.glob("part-*.jsonl"))[1]
    n = sum(1 for _ in open(lost))
    lost.unlink()
    assert main(["merge", str(missing), str(tmp_path / "m.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"wrote 27 records, but its shards hold {27 - n} (a shard was deleted?)" in err and "--resume" in err


def test_a_shard_from_another_scan_is_refused_by_merge_and_resume(shards, corpus, model, tmp_path, capsys):
    """A shard copied in from another scan's folder: records of another model, or another input
    at an index this scan gave to one, are refused rather than merged as if they were this scan's."""
    src, _ = shards
    parts = sorted(src.glob("part-*.jsonl"))
    other_model = tmp_path / "other_model"
    shutil.copytree(src, other_model)
    recs = [json.loads(line) for line in open(parts[0])]
    foreign = other_model / "part-999-000000.jsonl"
    foreign.write_text("".join(json.dumps(dict(r, index=r["index"] + 1000, model="another-model")) + "\n"
                               for r in recs))
    with pytest.raises(ShardsError, match=r"part-999-000000.jsonl: line 1 was scored by model 'another-model'"):
        list(read_shards(other_model))
    assert main(["merge", str(other_model), str(tmp_path / "m.jsonl")]) == 2
    assert "from another scan" in capsys.readouterr().err and not (tmp_path / "m.jsonl").exists()
    with pytest.raises(ShardsError, match="another-model"):
        ray_scan(corpus, model, other_model, aligned=True, batch_size=BATCH, mode="resume")
    other_inputs = tmp_path / "other_inputs"
    shutil.copytree(src, other_inputs)
    (other_inputs / "part-999-000000.jsonl").write_text(
        json.dumps(dict(recs[0], path=recs[0]["path"] + ".elsewhere.png")) + "\n")
    both = f"part-001-000000.jsonl and .*part-999-000000.jsonl both hold input {recs[0]['index']} of the listing"
    with pytest.raises(ShardsError, match=both):
        list(read_shards(other_inputs))
    with pytest.raises(ShardsError, match=both):
        ray_scan(corpus, model, other_inputs, aligned=True, batch_size=BATCH, mode="resume")
    assert main(["merge", str(other_inputs), str(tmp_path / "m.jsonl")]) == 2
    assert "from another scan" in capsys.readouterr().err and not (tmp_path / "m.jsonl").exists()


def test_a_folder_another_scan_writes_is_refused(shards, corpus, model, tmp_path):
    import fcntl

    src, _ = shards
    busy = tmp_path / "busy"
    shutil.copytree(src, busy)
    before = sorted(p.name for p in busy.iterdir())
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the scan writing it does
        with pytest.raises(ShardsError, match="is being written by another scan"):
            ray_scan(corpus, model, busy, aligned=True, batch_size=BATCH, mode="overwrite")
    finally:
        os.close(fd)
    assert sorted(p.name for p in busy.iterdir()) == before


def test_output_folder_checks(shards, tmp_path):
    src, _ = shards
    settings = json.loads((src / "scan.json").read_text())
    settings = {k: settings[k] for k in ("model", "batch_size", "aligned", "upsample", "weak_face_score",
                                         "detect_pixels", "pixel_limit", "shard_format", "inputs", "limit")}
    with pytest.raises(ShardsError, match="not empty; pass --resume"):
        prepare_output(src, "new", settings)
    shard = sorted(src.glob("part-*.jsonl"))[0]
    before = shard.read_bytes()
    for target in (shard, src / "merged.jsonl"):  # merging into the folder it reads: refused, nothing cut
        assert main(["merge", str(src), str(target), "--overwrite"]) == 2
    assert shard.read_bytes() == before and not (src / "merged.jsonl").exists()
    with pytest.raises(ShardsError, match=r"batch_size 4 there, 8 now"):
        prepare_output(src, "resume", dict(settings, batch_size=8))
    prepare_output(src, "resume", dict(settings, weak_face_score=0.5, upsample=2, detect_pixels=9))  # aligned: no detection
    detected = tmp_path / "detected"  # a scan with face detection, from before the setting: dlib's own cut, 0
    shutil.copytree(src, detected)
    manifest = json.loads((detected / "scan.json").read_text())
    del manifest["weak_face_score"], manifest["detect_pixels"]
    (detected / "scan.json").write_text(json.dumps(dict(manifest, aligned=False)))
    with pytest.raises(ShardsError, match=rf"weak_face_score 0.0 there, {WEAK_FACE_SCORE} now"):
        prepare_output(detected, "resume", dict(settings, aligned=False))
    with pytest.raises(ShardsError, match=rf"detect_pixels 0 there, {DETECT_PIXELS} now"):
        prepare_output(detected, "resume", dict(settings, aligned=False, weak_face_score=0.0))
    prepare_output(detected, "resume", dict(settings, aligned=False, weak_face_score=0.0, detect_pixels=0))
    with pytest.raises(ShardsError, match="model"):
        prepare_output(src, "resume", dict(settings, model="0" * 64))
    started = tmp_path / "started"  # stopped before its first shard: nothing to differ from, as locally
    started.mkdir()
    shutil.copy(src / "scan.json", started / "scan.json")
    manifest, done, _ = prepare_output(started, "resume", dict(settings, batch_size=8))
    assert manifest["batch_size"] == 8 and manifest["runs"] == 2 and done == []
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ShardsError, match="not a scan's"):
        prepare_output(foreign, "overwrite", settings)
    with pytest.raises(ShardsError, match="no scan.json"):
        prepare_output(foreign, "resume", settings)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ShardsError, match="is a file"):
        prepare_output(tmp_path / "file", "new", settings)
    damaged = tmp_path / "damaged"
    shutil.copytree(src, damaged)
    first = sorted(damaged.glob("part-*.jsonl"))[0]
    first.write_text(first.read_text()[:-20] + "\n")
    with pytest.raises(ShardsError, match=r"part-001-000000.jsonl: line \d+ is not a scan record"):
        list(read_shards(damaged))
    with pytest.raises(ShardsError, match="not a scan shards folder"):
        list(read_shards(foreign))


def test_cli_ray_scan_and_merge_equal_the_local_cli(ray_local, corpus, model, tmp_path, capsys):
    local_out = tmp_path / "local.jsonl"
    assert main(["scan", *corpus, "--model", str(model), "--aligned", "--batch-size", str(BATCH), "--workers", "0",
                 "--out", str(local_out), "--quiet"]) == 1  # error records: exit 1
    out = tmp_path / "shards"
    rc = main(["scan", *corpus, "--model", str(model), "--aligned", "--batch-size", str(BATCH), "--engine", "ray",
               "--out", str(out), "--actors", "1", "--shard-size", "10"])
    err = capsys.readouterr().err
    assert rc == 1 and "27 images" in err and f"fakespotter merge {out} FILE" in err
    assert main(["merge", str(out), str(tmp_path / "merged.jsonl"), "--quiet"]) == 0
    assert (tmp_path / "merged.jsonl").read_bytes() == local_out.read_bytes()
    # resume of a finished scan: nothing to do, still exit 1 for the error records it holds
    assert main(["scan", *corpus, "--model", str(model), "--aligned", "--batch-size", str(BATCH), "--engine", "ray",
                 "--out", str(out), "--resume", "--quiet"]) == 1
    assert main(["merge", str(out), "-", "--format", "csv", "--quiet"]) == 0
    csv_out = capsys.readouterr().out
    assert main(["scan", *corpus, "--model", str(model), "--aligned", "--batch-size", str(BATCH), "--workers", "0",
                 "--format", "csv", "--quiet"]) == 1
    assert capsys.readouterr().out == csv_out


def test_a_failure_on_the_cluster_is_no_usage_error(ray_local, corpus, model, tmp_path, capsys, monkeypatch):
    import fakespotter.scan_ray as SR

    def broken(*args, **kw):
        raise ValueError("an actor could not load the model")  # as Ray would re-raise it here
    monkeypatch.setattr(SR, "_run", broken)
    with pytest.raises(RuntimeError, match="failed on the cluster: ValueError: an actor could not load the model"):
        ray_scan(corpus, model, tmp_path / "a", aligned=True, batch_size=BATCH)
    assert json.loads((tmp_path / "a" / "stats.json").read_text())["complete"] is False
    rc = main(["scan", *corpus, "--model", str(model), "--aligned", "--engine", "ray", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 1 and "failed on the cluster" in err and "--resume" not in err  # nothing written to resume from
    (tmp_path / "b" / "part-000000-000000.jsonl").write_text("")  # as if a shard had been written
    main(["scan", *corpus, "--model", str(model), "--aligned", "--engine", "ray", "--out", str(tmp_path / "b"),
          "--resume"])
    assert "the records written so far are in" in capsys.readouterr().err

    def died(*args, **kw):  # an actor that died as it started: Ray's text, coloured, the cause last
        raise RuntimeError("The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker"
                           "\x1b[39m (pid=1)\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                           "ValueError: FakeSpotter.load: device 'cuda': CUDA is not available here")
    monkeypatch.setattr(SR, "_run", died)
    with pytest.raises(RuntimeError) as e:
        ray_scan(corpus, model, tmp_path / "c", aligned=True, batch_size=BATCH)
    assert str(e.value) == ("ray_scan: the scan failed on the cluster: RuntimeError: The actor died because of an "
                            "error raised in its creation task, ray::MapWorker (pid=1) ... ValueError: "
                            "FakeSpotter.load: device 'cuda': CUDA is not available here")


def test_resources_leave_cpus_for_the_decode_tasks():
    import fakespotter.scan_ray as SR

    class Cluster:
        def __init__(self, nodes=(), **res):
            self.res, self.node_memory = res, nodes

        def cluster_resources(self):
            return self.res

        def nodes(self):
            return [{"Alive": True, "Resources": {"memory": m}} for m in self.node_memory]

    # GPU actors hold a CPU each: 4 GPUs and 2 CPUs give one actor, so that decode tasks can run
    assert SR._resources(Cluster(CPU=2.0, GPU=4.0), None, 1.0, None, 1.0) == (1, 1.0, "cuda")
    assert SR._resources(Cluster(CPU=16.0, GPU=4.0), None, 1.0, None, 1.0) == (4, 1.0, "cuda")
    assert SR._resources(Cluster(CPU=2.0), None, 1.0, None, 1.0) == (1, 0.0, "cpu")
    for res, actors, cpus_per_actor, gpus in (({"CPU": 2.0, "GPU": 4.0}, 2, 1.0, None),
                                              ({"CPU": 2.0, "GPU": 1.0}, 1, 2.0, 1.0), ({"CPU": 4.0}, 4, 1.0, 0.0)):
        with pytest.raises(ValueError, match=r"need more than the cluster's .* CPUs; give fewer actors"):
            SR._resources(Cluster(**res), actors, cpus_per_actor, gpus, 1.0)
    # a node started with little 'memory' (ray start --memory 200000000): no decode task could ever run
    assert SR._resources(Cluster(CPU=2.0, nodes=[2e8, float(1 << 30)]), None, 1.0, None, 1.0, 512 << 20) == (1, 0.0, "cpu")
    for nodes in ([2e8], [2e8] * 4):  # (a task runs on one node: four small ones do not add up)
        with pytest.raises(ValueError, match=r"each decode task reserves 512 MiB of Ray's 'memory' resource .*, and no "
                                             r"node of the cluster offers that much \(at most 191 MiB: ray start"):
            SR._resources(Cluster(CPU=2.0, nodes=nodes), None, 1.0, None, 1.0, 512 << 20)


def test_ray_cannot_start_from_a_folder_or_command_line_that_is_not_utf8(tmp_path, monkeypatch):
    """ray.init fails deep inside with a bare UnicodeEncodeError (taken for a usage error
    saying only "surrogates not allowed"); the local engine scans the same inputs."""
    import fakespotter.scan_ray as SR

    class Ray:
        def init(self, **kw):
            raise AssertionError("not reached")

    odd = tmp_path / os.fsdecode(b"cwd\xfd")
    odd.mkdir()
    monkeypatch.chdir(odd)
    with pytest.raises(ValueError, match=r"Ray cannot start from a process whose working folder holds bytes that "
                                         r"are not UTF-8 \(b'.*cwd\\xfd'\); run it from another folder"):
        SR._init_ray(Ray(), None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fakespotter", "scan", os.fsdecode(b"d\xff")])
    with pytest.raises(ValueError, match=r"whose command line holds bytes that are not UTF-8 .*file list \(@list.txt\)"):
        SR._init_ray(Ray(), None)


def test_an_address_where_no_cluster_answers_is_refused_at_once(monkeypatch):
    import signal
    import socket
    import time

    import fakespotter.scan_ray as SR

    class NoInit:
        def init(self, **kw):
            raise AssertionError("ray.init must not be reached")

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=f"no Ray cluster answers at address 127.0.0.1:{port} .--address."):
        SR._init_ray(NoInit(), f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < SR.CONNECT_TIMEOUT_S
    with pytest.raises(ValueError, match="'bogus' .--address. is not HOST:PORT"):
        SR._init_ray(NoInit(), "bogus")

    class Refused:  # ray.init of 'auto' with no cluster; and Ray's own signal handlers
        def init(self, **kw):
            signal.signal(signal.SIGTERM, lambda *a: None)
            raise ConnectionError("Could not find any running Ray instance")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="cannot connect to the Ray cluster at address auto .--address.: Could not"):
        SR._init_ray(Refused(), "auto")
    assert signal.getsignal(signal.SIGTERM) is before


def _catches_sigterm():
    """Whether this process's SIGTERM disposition (the kernel's, not Python's record of it) is a handler."""
    with open("/proc/self/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def test_a_sigterm_that_rays_own_handler_takes_during_init_reaches_the_process_handler():
    import time

    import fakespotter.scan_ray as SR

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop()

    class Ray:  # a SIGTERM while ray.init runs
        def __init__(self, code):
            self.code = code

        def init(self, **kw):
            # Ray's handler: exit 15 (1 once it started a local instance and stopped it again); and
            # the alarm Ray's native crash handler arms as it takes a SIGTERM (an abort 3 s later)
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(self.code))
            signal.alarm(60)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        for code in (15, 1):
            with pytest.raises(Stop):
                SR._init_ray(Ray(code), None)
            assert signal.getsignal(signal.SIGTERM) is stop
            assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, before)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the signal disposition from /proc")
def test_ray_scan_leaves_the_sigterm_handler_in_place_after_ray_shutdown(corpus, model, tmp_path, monkeypatch):
    import ctypes

    import fakespotter.scan_ray as SR

    libc = ctypes.CDLL(None)
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]

    class Ray:  # a cluster without resources to read: ray_scan stops after ray.init, and shuts Ray down
        def is_initialized(self):
            return False

        def init(self, **kw):
            pass

        def cluster_resources(self):
            raise RuntimeError("no resources")

        def shutdown(self):  # as Ray's core worker does as it stops: SIG_DFL, natively
            libc.signal(signal.SIGTERM, signal.SIG_DFL)

    monkeypatch.setattr(SR, "import_ray", Ray)
    before = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        assert _catches_sigterm()
        with pytest.raises(RuntimeError, match="no resources"):
            ray_scan(corpus, model, tmp_path / "o", aligned=True)
        assert _catches_sigterm()
    finally:
        signal.signal(signal.SIGTERM, before)


def _cli(*args, code="from fakespotter.cli import main; sys.exit(main())"):
    """The command line in a new process (that starts Ray itself), with ``code`` run first."""
    import subprocess

    return subprocess.run([sys.executable, "-c", f"import sys\n{code}", *args], capture_output=True, text=True,
                          timeout=600)


def test_a_quiet_ray_scan_prints_none_of_rays_notices(corpus, model, tmp_path):
    """--quiet: nothing on stderr but errors; Ray's warnings, notices and its workers' output stay
    in its log files. Ray's native code prints its errors, among them one line for every actor pool
    that restarts its actors (ray-project/ray#53727): no setting hides it without hiding the others."""
    import re

    r = _cli("scan", *corpus, "--model", str(model), "--aligned", "--batch-size", str(BATCH), "--engine", "ray",
             "--out", str(tmp_path / "o"), "--limit", "4", "--quiet")
    assert r.returncode == 0 and len(shard_lines(tmp_path / "o")) == 4, r.stderr
    native_error = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ E \d+ \d+\] ")
    assert all(native_error.match(line) for line in r.stderr.splitlines() if line.strip()), r.stderr


def test_sigterm_while_ray_starts_exits_143_with_one_line(corpus, model, tmp_path):
    """SIGTERM while ray.init runs ends the scan as it does later: exit 143, one line of ours. Here
    it comes right after the driver connected, when Ray's Python handler and its native crash
    handler (a stack dump, then an abort 3 s later) are both in place."""
    connected = ("import os, signal\n"
                 "import ray._private.worker as w\n"  # ray.init's last step (Ray internals: this test's only)
                 "connect = w.connect\n"
                 "def connect_then_sigterm(*a, **kw):\n"
                 "    connect(*a, **kw)\n"
                 "    os.kill(os.getpid(), signal.SIGTERM)\n"
                 "w.connect = connect_then_sigterm\n"
                 "from fakespotter.cli import main\n"
                 "sys.exit(main())\n")
    r = _cli("scan", *corpus, "--model", str(model), "--aligned", "--engine", "ray", "--out", str(tmp_path / "o"),
             "--quiet", code=connected)
    assert r.returncode == 143, r.stderr
    assert r.stderr.rstrip().endswith("fakespotter scan: terminated") and "Traceback" not in r.stderr, r.stderr


def test_cli_usage_errors_exit_2_before_any_work(corpus, model, tmp_path, capsys, monkeypatch):
    base = ["scan", *corpus, "--model", str(model), "--aligned"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x.txt").write_text("x")
    cases = [
        (base + ["--engine", "ray"], "give it with --out FOLDER"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o"), "--format", "csv"], "writes JSONL shards"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o"), "--format", "parquet"], "is for the local engine"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o.csv")], "names a .csv file; give a folder name"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o"), "--workers", "2"], "--workers is an option of --engine local"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o"), "--fail-fast"], "--fail-fast is an option"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o"), "--compile"],
         "--compile is an option of --engine local (Ray actors run the default eager forward)"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o"), "--actors", "0"], "--actors must be >= 1"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o"), "--cpus-per-actor", "0"],
         "--cpus-per-actor must be a finite number >= 0.0001"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o"), "--decode-cpus", "0.00001"],
         "--decode-cpus must be a finite number >= 0.0001 (Ray's resolution)"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o"), "--gpus-per-actor", "nan"],
         "--gpus-per-actor must be 0 or a finite number >= 0.0001, got nan"),
        (base + ["--engine", "ray", "--out", str(taken)], "is not empty and holds no scan's shards: give a new or "
                                                          "empty folder"),
        (base + ["--engine", "ray", "--out", str(taken), "--overwrite"], "not a scan's"),
        (base + ["--engine", "ray", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no.fsm")], "does not exist"),
        (base + ["--out", str(tmp_path / "l.jsonl"), "--address", "127.0.0.1:6379"], "--address is an option of --engine ray"),
        (base + ["--out", str(tmp_path / "l.jsonl"), "--shard-size", "5"], "--shard-size is an option of --engine ray"),
        (["merge", str(taken), str(tmp_path / "m.jsonl")], "is not the output folder"),
        (["merge", str(tmp_path / "gone"), str(tmp_path / "m.jsonl")], "gone does not exist (the output folder"),
        (["merge", str(taken / "x.txt"), str(tmp_path / "m.jsonl")], "x.txt is not a folder (the output folder"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert (taken / "x.txt").read_text() == "x" and not (tmp_path / "o").exists()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(base + ["--engine", "ray", "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'fakespotter[ray]'" in capsys.readouterr().err


def test_help_states_the_ray_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in ("--engine {local,ray}", "(default: local)", "(default: RAY_ADDRESS", "(default: one per GPU",
              "(default: 1)", "(default: --batch-size)", "(default: 1000)", "(default: 1 when the cluster has GPUs"):
        assert s in text, s
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "(default: csv when OUT ends with .csv, else jsonl)" in " ".join(capsys.readouterr().out.split())


def test_ray_is_imported_only_when_a_ray_scan_starts():
    import subprocess

    code = "import sys, fakespotter, fakespotter.cli; assert fakespotter.ray_scan; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_decode_child_that_dies_while_starting_is_started_again_once(tmp_path, monkeypatch):
    """A Ray decode task's child killed before its first file (no file's fault) failed the whole
    scan with the local engine's advice (workers=0); now a second child is started, and a second
    failure names the Ray task and its --decode-memory."""
    import fakespotter.scan_ray as SR
    from fakespotter.scan import WorkerStartError, _Config

    write_good(tmp_path, 1)
    (f,) = sorted(tmp_path.iterdir())
    batch = {"index": [0], "path": [str(f)], "file": [str(f)], "data": [b""], "has_data": [False], "error": [""],
             "span": [""]}
    cfg = tuple(_Config(True, 150, 0, 10**8, 0.0, 0))
    real, calls = SR._decoded, []

    def dies_first(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise WorkerStartError("scan: the decode worker processes died while starting", " workers=0 ...")
        return real(*a, **k)

    monkeypatch.setattr(SR, "_decoded", dies_first)
    try:
        out = SR._decode_batch(batch, cfg)
    finally:  # the task keeps its decode process for the next one: a live worker here would keep the
        from fakespotter.scan import _stop  # forkserver up, and a later test that stops it waits for good

        pool = SR._DECODE_POOL.pop("pool", None)
        if pool is not None:
            _stop(pool)
    assert len(calls) == 2 and list(out["index"]) == [0] and json.loads(out["meta"][0])["error"] is None

    def always(*a, **k):
        raise WorkerStartError("scan: the decode worker processes died while starting", " workers=0 ...")

    monkeypatch.setattr(SR, "_decoded", always)
    with pytest.raises(RuntimeError, match=r"died while starting \(the decode child of a Ray decode task, twice; "
                                           r"--decode-memory") as e:
        SR._decode_batch(batch, cfg)
    assert "workers=0" not in str(e.value)


def test_an_actor_that_runs_out_of_memory_reports_its_back_off(ray_local, model, monkeypatch):
    """A Ray actor halves its batch on out of memory, as the local engine does; the halving was
    not in the scan's stats (its scores are those of the smaller batch from there)."""
    import fakespotter.scan_ray as SR
    from fakespotter.detector import FakeSpotter
    from fakespotter.taps import Tap

    det = FakeSpotter.load(model)
    real = Tap.forward

    def oom_above_2(self, x):
        if x.shape[0] > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")
        return real(self, x)

    monkeypatch.setattr(Tap, "forward", oom_above_2)
    actor = SR._Scorer([ray.put(det.to_bytes())], det.model_sha256(), 8, "cpu", 0)
    chips = np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)
    meta = json.dumps({"path": "x.png", "size": 1, "sha256": "0" * 64, "width": 150, "height": 150, "frames": 1,
                       "faces": [([0, 0, 150, 150], None)] * 3, "seconds": 0.0, "error": None})
    batch = {"index": np.array([0, 1]), "meta": np.array([meta, meta], dtype=object),
             "chips": np.array([chips.tobytes(), chips.tobytes()], dtype=object)}
    out = actor(batch)
    (event,) = json.loads(out["backoffs"][0])
    assert (event["from"], event["to"]) == (8, 2) and "can't allocate" in event["error"] and out["backoffs"][1] == ""
    again = actor(batch)  # reported once
    assert list(again["backoffs"]) == ["", ""]
    assert [json.loads(line)["score"] for line in out["line"]] == [json.loads(line)["score"] for line in again["line"]]
    stats, said = {"batch_size": 8, "oom_backoffs": []}, []  # the driver: into the stats, and said
    SR._take_backoffs(stats, [event, {**event, "from": 2, "to": 1}], said.append)
    assert stats["batch_size"] == 1 and len(stats["oom_backoffs"]) == 2 and len(said) == 2
    assert said[0].startswith("scan: out of memory in an actor's forward of 8 chips (") and "batches of 2" in said[0]
