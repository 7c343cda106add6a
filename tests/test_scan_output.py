"""Scan outputs at the record level, without a model: what a resume takes as complete, torn or
foreign, what a failed write keeps and counts, the output lock, Parquet parts, Ray shards and
their merge. From mutation audits of scan.py's output code and scan_ray.py's shard reading: each
test fails on a one-line change that no other test caught."""
from __future__ import annotations

import csv
import importlib
import json
import os
import time

import pytest

from fakespotter.scan import (RECORD_FIELDS, OutputMismatch, ParquetParts, RecordWriter, _csv_header, _line,
                              read_records, resume_state)

S = importlib.import_module("fakespotter.scan")  # (the module: fakespotter.scan is also the function)


def rec(i, status="ok", error=None, path=None):
    r = {k: None for k in RECORD_FIELDS}
    r.update(path=path or f"d/img{i:03d}.jpg", size=100 + i, sha256="ab" * 32, status=status, faces=[],
             model="m" * 64, error=error, error_kind="decode" if error else None)
    if status == "ok":
        r.update(width=8, height=8, frames=1, score=0.25, label="real",
                 faces=[{"box": [0, 0, 4, 4], "detector_score": 0.9, "score": 0.25}])
    return r


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_first_record_torn_by_a_power_loss_is_dropped_with_its_zero_bytes(tmp_path, fmt):
    # A first line cut short, then padded with zeros by a power loss, is torn, not foreign.
    first = _line(rec(0), "jsonl")[:15] if fmt == "jsonl" else _csv_header()[:20]
    out = tmp_path / f"o.{fmt}"
    out.write_bytes(first.encode() + b"\x00" * 16)
    st = resume_state(out, fmt)
    assert (st.records, st.good_bytes, st.torn_bytes) == (0, 0, len(first) + 16)


def test_a_csv_record_cut_just_before_its_newline_is_torn(tmp_path):
    # A last CSV row whole but for its "\n" (unquoted error text) is not complete.
    recs = [rec(0), rec(1, status="error", error="cannot decode image")]
    body = _csv_header() + "".join(_line(r, "csv") for r in recs)
    assert not body.endswith('"\n')  # premise: the last field unquoted
    out = tmp_path / "o.csv"
    out.write_text(body[:-1])
    st = resume_state(out, "csv")
    assert st.records == 1 and st.good_bytes == len(_csv_header()) + len(_line(recs[0], "csv"))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_record_with_an_unknown_status_or_extra_field_is_damaged(tmp_path, fmt):
    # An unknown status, or a CSV row with more fields than a record, is damage.
    good = _line(rec(0), fmt)
    bad = _line(rec(1), fmt).replace(',"status":"ok",', ',"status":"okay",') if fmt == "jsonl" \
        else _line(rec(1), fmt).replace(",ok,", ",okay,")
    head = _csv_header() if fmt == "csv" else ""
    out = tmp_path / f"o.{fmt}"
    out.write_text(head + good + bad)
    assert resume_state(out, fmt).records == 1
    if fmt == "csv":
        out.write_text(head + good + _line(rec(1), fmt)[:-1] + ",extra\n")
        assert resume_state(out, fmt).records == 1


def test_csv_text_escapes_cr_and_lf(tmp_path):
    # A record is one physical line whatever its path or error holds.
    r = rec(0, status="error", error="bad\r\nthing", path="d/a\rb\nc.jpg")
    line = _line(r, "csv")
    assert line.count("\n") == 1 and "\r" not in line
    out = tmp_path / "o.csv"
    out.write_text(_csv_header() + line)
    assert resume_state(out, "csv").records == 1
    assert S.path_key("d/a\rb\nc.jpg", "csv") == "d/a\\rb\\nc.jpg"  # kills path_key_nocsv


def _fail_fsync(monkeypatch):
    calls = []

    def fsync(fd):
        calls.append(fd)
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(S.os, "fsync", fsync)
    return calls


def test_a_write_whose_fsync_fails_keeps_and_counts_every_line(tmp_path, monkeypatch):
    # A failed fsync means every line reached the file: none is cut, all are counted.
    out = tmp_path / "o.jsonl"
    w = RecordWriter(out, "jsonl")
    w.write([rec(0)])
    recs = [rec(1), rec(2)]
    _fail_fsync(monkeypatch)
    with pytest.raises(OSError):
        w.write(recs)
    monkeypatch.undo()
    w.close()
    assert out.read_text() == "".join(_line(r, "jsonl") for r in [rec(0), *recs])
    assert w.written["images"] == 3


def test_a_write_cut_at_a_line_boundary_keeps_the_whole_lines(tmp_path, monkeypatch):
    # A write that stops (ENOSPC) exactly after a whole line keeps and counts that line.
    out = tmp_path / "o.jsonl"
    w = RecordWriter(out, "jsonl")
    recs = [rec(1), rec(2), rec(3)]
    first = len(_line(recs[0], "jsonl").encode())
    real = os.write
    state = {"n": 0}

    def write(fd, data):
        if state["n"] == 0:
            state["n"] = 1
            return real(fd, bytes(data[:first]))
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(S.os, "write", write)
    with pytest.raises(OSError):
        w.write(recs)
    monkeypatch.undo()
    w.close()
    assert out.read_text() == _line(recs[0], "jsonl") and w.written["images"] == 1


def test_a_symlink_named_like_a_part_is_not_ours(tmp_path):
    # A symbolic link named like a part file is not one of the scan's parts.
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    p = ParquetParts(folder, "new", part_rows=1)
    p.write([rec(0)])
    p.close()
    os.rename(folder / "part-000000.parquet", tmp_path / "elsewhere.parquet")
    os.symlink(tmp_path / "elsewhere.parquet", folder / "part-000000.parquet")
    with pytest.raises(OutputMismatch):
        S._parquet_listing(folder)


def test_a_part_closes_when_it_is_part_seconds_old_even_with_steady_writes(tmp_path):
    # A part's age counts from its first record, not from the last write.
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    p = ParquetParts(folder, "new", part_rows=1000, part_seconds=0.3)
    for i in range(6):
        p.write([rec(i)])
        time.sleep(0.1)
    assert p.written["images"] >= 3  # closed at least once within 0.6 s of steady writes
    p.close()


def test_check_not_busy_says_when_the_lock_is_held_and_never_waits_on_a_fifo(tmp_path):
    # A held lock is reported before anything is cut; a FIFO is never waited on.
    import fcntl
    import subprocess
    import sys

    out = tmp_path / "o.jsonl"
    out.write_text("")
    with open(out, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(S.OutputBusy):
            S.check_not_busy(out)
    S.check_not_busy(out)  # free: nothing
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = f"from fakespotter.scan import check_not_busy; check_not_busy({str(fifo)!r})"
    subprocess.run([sys.executable, "-c", code], timeout=20, check=True)  # returns, no writer needed


def test_a_resume_whose_csv_header_cannot_be_written_keeps_the_file(tmp_path, monkeypatch):
    # Mode "resume" never deletes the user's file, even one without a record.
    out = tmp_path / "o.csv"
    out.write_text(_csv_header()[:7])
    st = resume_state(out, "csv")
    assert st.good_bytes == 0

    def write(fd, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(S.os, "write", write)
    with pytest.raises(OSError):
        RecordWriter(out, "csv", "resume", st)
    monkeypatch.undo()
    assert out.exists() and out.read_bytes() == b""


@pytest.mark.parametrize("text", ["my notes, no newline", "path,owner\n/data/photos,me\n",
                                  _csv_header().replace("error", "errors") + "x\n"])
def test_a_csv_resume_refuses_a_file_whose_first_line_is_not_the_header(tmp_path, text):
    # A first line without a line break that does not begin the header, or a whole first line that
    # is not exactly the header: the user's file, which cutting would destroy.
    out = tmp_path / "o.csv"
    out.write_text(text)
    with pytest.raises(OutputMismatch, match="is not a csv scan output"):
        resume_state(out, "csv")


def test_two_writers_of_one_output_are_refused_whatever_the_format(tmp_path):
    # Two writers are refused with the lock held by a writer (an exclusive one), in both formats.
    out = tmp_path / "o.jsonl"
    w = RecordWriter(out, "jsonl")
    w.write([rec(0)])
    try:
        with pytest.raises(S.OutputBusy):
            RecordWriter(out, "jsonl", "resume", resume_state(out, "jsonl"))
    finally:
        w.close()
    assert out.read_text() == _line(rec(0), "jsonl")
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    p = ParquetParts(folder, "new")
    try:
        with pytest.raises(S.OutputBusy):
            ParquetParts(folder, "overwrite")
    finally:
        p.close()


def test_a_resume_writer_cuts_the_torn_tail_even_when_it_writes_nothing(tmp_path):
    # The torn tail is cut even when the resume writes nothing after it.
    out = tmp_path / "o.jsonl"
    good = _line(rec(0), "jsonl")
    out.write_text(good + _line(rec(1), "jsonl")[:40])
    w = RecordWriter(out, "jsonl", "resume", resume_state(out, "jsonl"))
    w.close()
    assert out.read_text() == good


def test_read_records_leaves_out_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    """A killed scan's output reads as its complete records (as --resume counts them), not as a
    JSONDecodeError at the torn line; a damaged line in the middle is an error naming the line."""
    out = tmp_path / "o.jsonl"
    whole = _line(rec(0), "jsonl") + _line(rec(1), "jsonl")
    out.write_text(whole + _line(rec(2), "jsonl")[:20])
    assert [r["path"] for r in read_records(out, "jsonl")] == [rec(0)["path"], rec(1)["path"]]
    assert resume_state(out, "jsonl").records == 2
    out.write_text(_line(rec(0), "jsonl") + "{oops\n" + _line(rec(1), "jsonl"))
    with pytest.raises(ValueError, match=r"o.jsonl, line 2: not a JSON record .*\{oops"):
        list(read_records(out, "jsonl"))


def test_csv_faces_are_json_and_a_json_line_is_strict_json():
    # A CSV row's faces are JSON (as in the JSON lines), not Python's repr; a NaN is refused, not
    # written as the non-JSON token NaN.
    row = next(csv.reader([_line(rec(0), "csv")]))
    assert json.loads(row[RECORD_FIELDS.index("faces")]) == rec(0)["faces"]
    with pytest.raises(ValueError):
        _line(dict(rec(0), score=float("nan")), "jsonl")


def test_a_json_record_whose_path_is_not_a_string_is_damaged(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text(_line(rec(0), "jsonl") + _line(rec(1), "jsonl").replace('"path":"d/img001.jpg"', '"path":5'))
    assert resume_state(out, "jsonl").records == 1


def test_read_output_of_a_csv_without_the_header_reads_nothing(tmp_path):
    out = tmp_path / "o.csv"
    out.write_text(_csv_header().replace("error\n", "err\n") + _line(rec(0), "csv"))
    assert list(S.read_output(out, "csv")) == []


def test_the_state_s_model_is_the_first_record_s(tmp_path):
    # --resume compares the output's model with --model: the first record's, not the last's.
    out = tmp_path / "o.jsonl"
    out.write_text(_line(rec(0), "jsonl") + _line(dict(rec(1), model="n" * 64), "jsonl"))
    assert resume_state(out, "jsonl").model == "m" * 64


def test_moved_away_only_for_relative_records_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = str(tmp_path / "elsewhere")
    assert S.moved_away(other, ["/abs/a.jpg", "d/b.jpg"]) != ""  # one relative record is enough
    assert S.moved_away(other, ["/abs/a.jpg", "/abs/b.tar::m/c.jpg"]) == ""
    assert S.moved_away(str(tmp_path), ["d/b.jpg"]) == ""  # the same folder
    assert S.moved_away(str(tmp_path) + "/.", ["d/b.jpg"]) == ""


def test_input_key_makes_the_archive_absolute_and_keeps_the_member_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert S.input_key("./d/x.jpg") == S.input_key("d/x.jpg") == str(tmp_path / "d/x.jpg")
    assert S.input_key("./a.tar::./m/../x.jpg") == str(tmp_path / "a.tar") + "::./m/../x.jpg"


def test_file_names_that_are_not_utf8_are_written_as_xNN():
    name = "d/caf" + b"\xe9".decode("utf-8", "surrogateescape") + ".jpg"
    assert S._utf8(name) == "d/caf\\xe9.jpg"
    assert S.path_key(name, "jsonl") == S.path_key(name, "csv") == "d/caf\\xe9.jpg"


def test_mode_new_refuses_an_existing_file(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("mine\n")
    with pytest.raises(S.OutputBusy):
        RecordWriter(out, "jsonl", "new")
    assert out.read_text() == "mine\n"


def test_a_resume_writer_appends_after_the_kept_records(tmp_path):
    out = tmp_path / "o.jsonl"
    good = _line(rec(0), "jsonl")
    out.write_text(good + _line(rec(1), "jsonl")[:40])
    w = RecordWriter(out, "jsonl", "resume", resume_state(out, "jsonl"))
    w.write([rec(2)])
    w.close()
    assert out.read_text() == good + _line(rec(2), "jsonl")


def test_a_new_output_whose_first_fsync_fails_is_not_left(tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    _fail_fsync(monkeypatch)
    with pytest.raises(OSError):
        RecordWriter(out, "jsonl", "new")
    monkeypatch.undo()
    assert not out.exists()


def _enospc_after(monkeypatch, n):
    real, left = os.write, [n]

    def write(fd, data):  # writes n bytes, then the disk is full
        if left[0]:
            done = real(fd, bytes(data[:left[0]]))
            left[0] -= done
            return done
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(S.os, "write", write)


@pytest.mark.parametrize("mode", ["new", "resume"])
def test_a_csv_header_cut_by_a_full_disk_is_not_left(tmp_path, monkeypatch, mode):
    # new: no file left; resume (nothing kept): the file left empty, no torn header.
    out = tmp_path / "o.csv"
    st = None
    if mode == "resume":
        out.write_text(_csv_header()[:7])
        st = resume_state(out, "csv")
    _enospc_after(monkeypatch, 5)
    with pytest.raises(OSError):
        RecordWriter(out, "csv", mode, st)
    monkeypatch.undo()
    assert (not out.exists()) if mode == "new" else out.read_bytes() == b""


def test_after_a_failed_write_nothing_more_is_written(tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    w = RecordWriter(out, "jsonl")
    _enospc_after(monkeypatch, 0)
    with pytest.raises(OSError):
        w.write([rec(0)])
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="earlier write failed"):
        w.write([rec(1)])
    w.close()
    assert out.read_text() == ""


# --- Parquet ---------------------------------------------------------------------------------

def _parts(folder, n, **kw):
    p = ParquetParts(folder, "new", part_rows=1, **kw)
    for i in range(n):
        p.write([rec(i)])
    p.close()


def test_a_part_of_another_schema_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    folder = tmp_path / "o.parquet"
    folder.mkdir()
    pq.write_table(pa.table({"x": [1]}), folder / "part-000000.parquet")
    with pytest.raises(OutputMismatch, match="not of a scan's records"):
        resume_state(folder, "parquet")


def test_parquet_state_parts_counts_the_kept_parts_alone(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    _parts(folder, 1)
    (folder / ".part-000001.parquet.inprogress").write_bytes(b"PAR1")
    st = resume_state(folder, "parquet")
    assert (st.records, st.parts) == (1, 1)
    RecordWriter(folder, "parquet", "resume", st).close()  # (the state matches the folder)


@pytest.mark.parametrize("kw", [dict(part_rows=0), dict(row_group_rows=0)])
def test_parquet_parts_refuse_zero_rows(tmp_path, kw):
    pytest.importorskip("pyarrow")
    with pytest.raises(ValueError, match="must be an int >= 1"):
        ParquetParts(tmp_path / "o.parquet", "new", **kw)


def test_parquet_mode_new_refuses_an_existing_folder(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    _parts(folder, 1)
    with pytest.raises(S.OutputBusy):
        ParquetParts(folder, "new")
    assert [r["path"] for r in read_records(folder, "parquet")] == [rec(0)["path"]]


def test_parquet_overwrite_replaces_a_dangling_symlink(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    os.symlink(tmp_path / "nowhere", folder)
    ParquetParts(folder, "overwrite").close()
    assert folder.is_dir() and not folder.is_symlink()


def test_parquet_overwrite_deletes_unfinished_parts_too(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    _parts(folder, 1)
    (folder / ".part-000003.parquet.inprogress").write_bytes(b"PAR1")
    ParquetParts(folder, "overwrite").close()
    assert list(folder.iterdir()) == []


def test_parquet_row_groups_are_full_across_writes(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    folder = tmp_path / "o.parquet"
    p = ParquetParts(folder, "new", part_rows=100, row_group_rows=4)
    p.write([rec(i) for i in range(3)])
    p.write([rec(i) for i in range(3, 6)])
    p.close()
    meta = pq.ParquetFile(folder / "part-000000.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 2]


def test_a_part_closes_as_soon_as_it_holds_part_rows(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    p = ParquetParts(folder, "new", part_rows=2)
    p.write([rec(0), rec(1)])
    assert (folder / "part-000000.parquet").exists() and p.written["images"] == 2
    p.close()


def test_a_part_whose_fsync_fails_is_not_renamed_into_place(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    p = ParquetParts(folder, "new", part_rows=1)
    _fail_fsync(monkeypatch)
    with pytest.raises(OSError):
        p.write([rec(0)])
    monkeypatch.undo()
    p.close()
    assert list(folder.iterdir()) == [] and p.written["images"] == 0


def test_a_failed_parquet_write_leaves_no_unfinished_part(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    p = ParquetParts(folder, "new", part_rows=100, row_group_rows=1)
    p.write([rec(0)])
    assert (folder / ".part-000000.parquet.inprogress").exists()  # premise: a row group written
    with pytest.raises(Exception):
        p.write([dict(rec(1), size="not a number")])
    p.close()
    assert list(folder.iterdir()) == []


def test_a_parquet_resume_refuses_a_folder_changed_since_its_state(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    _parts(folder, 2)
    st = resume_state(folder, "parquet")
    (folder / "part-000001.parquet").unlink()
    with pytest.raises(ValueError, match="changed since its state was read"):
        ParquetParts(folder, "resume", st)


def test_a_parquet_resume_numbers_its_parts_after_the_kept_ones(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    _parts(folder, 1)
    w = RecordWriter(folder, "parquet", "resume", resume_state(folder, "parquet"), part_rows=1)
    w.write([rec(1)])
    w.close()
    assert [r["path"] for r in read_records(folder, "parquet")] == [rec(0)["path"], rec(1)["path"]]


def test_read_records_stops_at_a_missing_part(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "o.parquet"
    _parts(folder, 3)
    (folder / "part-000001.parquet").unlink()
    assert [r["path"] for r in read_records(folder, "parquet")] == [rec(0)["path"]]


# --- scan_ray: shards, read_shards, merge_shards (a shards folder made by hand: no Ray) -------

def _shards(folder, files):
    """A shards folder holding ``files`` ({name: [index, ...] or [line dict, ...]})."""
    folder.mkdir()
    (folder / "scan.json").write_text(json.dumps({"format": "fakespotter-scan-shards", "version": 1,
                                                  "model": "m" * 64}))
    for name, lines in files.items():
        lines = [dict(rec(x), index=x) if isinstance(x, int) else x for x in lines]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_read_shards_merges_shards_in_listing_order_whatever_their_names(tmp_path):
    from fakespotter.scan_ray import ShardsError, read_shards
    src = _shards(tmp_path / "s", {"part-001-000000.jsonl": [3, 4], "part-001-000001.jsonl": [5],
                                   "part-001-000002.jsonl": [0, 1, 2], "part-001-000003.jsonl": [2]})
    assert [r["path"] for r in read_shards(src)] == [rec(i)["path"] for i in range(6)]  # 2 twice: once
    (src / "part-001-000004.jsonl").write_text(json.dumps(dict(rec(9), index=1)) + "\n")
    with pytest.raises(ShardsError, match="both hold input 1"):
        list(read_shards(src))


@pytest.mark.parametrize("bad", ["no line end", "torn", "index twice", "index back", "float index", "path", "status", "model"])
def test_a_damaged_or_foreign_shard_line_is_refused(tmp_path, bad):
    from fakespotter.scan_ray import ShardsError, read_shards
    lines = [dict(rec(0), index=0), dict(rec(2), index=2)]
    last = {"index twice": dict(rec(2), index=2), "index back": dict(rec(1), index=1),
            "float index": dict(rec(3), index=2.5), "path": dict(rec(3), index=3, path=5),
            "status": dict(rec(3), index=3, status="fine"), "model": dict(rec(3), index=3, model="n" * 64),
            "torn": None, "no line end": None}[bad]
    src = _shards(tmp_path / "s", {"part-001-000000.jsonl": lines + ([last] if last else [])})
    if bad in ("torn", "no line end"):  # (shards are written whole: either is damage)
        with open(src / "part-001-000000.jsonl", "a") as f:
            f.write(json.dumps(dict(rec(3), index=3))[:30 if bad == "torn" else None])
    with pytest.raises(ShardsError):
        list(read_shards(src))


def test_only_shard_files_are_read(tmp_path):
    from fakespotter.scan_ray import read_shards
    src = _shards(tmp_path / "s", {"part-001-000000.jsonl": [0], "part-001-000001.jsonl.bak": [1]})
    (src / "part-001-000002.jsonl").mkdir()
    assert [r["path"] for r in read_shards(src)] == [rec(0)["path"]]


def test_merge_shards_counts_writes_and_refuses(tmp_path):
    from fakespotter.scan_ray import merge_shards
    src = _shards(tmp_path / "s", {"part-001-000000.jsonl": [0, 1, 2]})
    out = tmp_path / "m.jsonl"
    assert merge_shards(src, out) == 3
    assert out.read_text() == "".join(_line(rec(i), "jsonl") for i in range(3))
    link = tmp_path / "link.jsonl"
    os.symlink(tmp_path / "nowhere", link)
    with pytest.raises(FileExistsError, match="already exists"):  # a dangling symlink is there too: refused
        merge_shards(src, link)  # before the merge
    import fcntl
    with open(out, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a scan writing it
        with pytest.raises(S.OutputBusy):
            merge_shards(src, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "m.jsonl", "s"]


def test_merge_removes_only_stale_unlocked_temporary_files(tmp_path):
    import fcntl

    from fakespotter.scan_ray import merge_shards
    src = _shards(tmp_path / "s", {"part-001-000000.jsonl": [0]})
    old = time.time() - 3600
    stale, fresh, held = (tmp_path / f".m.jsonl.{pid}.merge.tmp" for pid in (111, 222, 333))
    for p in (stale, fresh, held):
        p.write_text("half a merge\n")
    for p in (stale, held):
        os.utime(p, (old, old))
    with open(held, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        merge_shards(src, tmp_path / "m.jsonl")
    assert not stale.exists() and fresh.exists() and held.exists()


def test_a_merge_that_fails_or_finds_the_output_made_meanwhile_leaves_no_temporary_file(tmp_path, monkeypatch):
    import fakespotter.scan_ray as R
    src = _shards(tmp_path / "s", {"part-001-000000.jsonl": [0]})
    out = tmp_path / "m.jsonl"
    merge_into = R._merge_into

    def made_meanwhile(folder, target, fmt, mode):
        n = merge_into(folder, target, fmt, mode)
        out.write_text("another's\n")
        return n
    monkeypatch.setattr(R, "_merge_into", made_meanwhile)
    with pytest.raises(FileExistsError, match="appeared while merging"):
        R.merge_shards(src, out)
    assert out.read_text() == "another's\n" and sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "s"]
