"""Scan outputs at the record level, without a model: what a resume takes as complete, torn or
foreign, what a failed write keeps and counts, the output lock, Parquet parts. From a mutation
audit of scan.py's output code: each test fails on a one-line change that no other test caught."""
from __future__ import annotations

import importlib
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
