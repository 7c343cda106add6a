"""`fakespotter scan --format parquet`: a folder of part files whose records read back equal to the
JSON lines; resume after SIGKILL, unfinished, damaged and missing parts; what it refuses to
touch; the message without pyarrow."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fakespotter.cli import main
from fakespotter.scan import (ParquetParts, RecordWriter, output_paths, parquet_schema, path_key, read_records,
                              resume_state, scan)
from scan_helpers import model_file, write_good


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_file(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq_corpus")
    write_good(root / "a", 10, seed=31)
    write_good(root / "b", 3, seed=32, ext=".jpg")
    (root / "b" / "zz_empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def reference(corpus, model):
    """An uninterrupted scan (14 inputs, one of them an error)."""
    return list(scan([str(corpus)], model, aligned=True, batch_size=2, workers=0))


def cli(corpus, model, out, *extra):
    return ["scan", str(corpus), "--model", str(model), "--aligned", "--workers", "0", "--batch-size", "2",
            "--out", str(out), "--quiet", *extra]


def parts(folder):
    return sorted(os.listdir(folder))


def test_records_read_back_equal_the_json_lines(corpus, model, reference, tmp_path):
    assert main(cli(corpus, model, tmp_path / "o.jsonl")) == 1
    jsonl = [json.loads(line) for line in open(tmp_path / "o.jsonl")]
    assert jsonl == reference and len(jsonl) == 14
    # the format follows the .parquet suffix; --part-rows 4: several parts
    out = tmp_path / "o.parquet"
    assert main(cli(corpus, model, out, "--part-rows", "4")) == 1
    names = parts(out)
    assert len(names) >= 3 and names == [f"part-{i:06d}.parquet" for i in range(len(names))]
    table = pq.read_table(out)  # the folder is one table for pyarrow (and pandas, DuckDB, Spark)
    assert table.schema.equals(parquet_schema())
    assert table.schema.field("faces").type == pa.list_(pa.struct(
        [("box", pa.list_(pa.int64())), ("detector_score", pa.float64()), ("score", pa.float64())]))
    assert table.to_pylist() == jsonl
    assert list(read_records(out, "parquet")) == jsonl == list(read_records(tmp_path / "o.jsonl", "jsonl"))
    stats = json.loads((tmp_path / "o.parquet.stats.json").read_text())
    assert stats["format"] == "parquet" and stats["complete"] and stats["images"] == 14
    # --format parquet whatever the name
    assert main(cli(corpus, model, tmp_path / "results", "--format", "parquet")) == 1
    assert parts(tmp_path / "results") == ["part-000000.parquet"]  # 14 records < 10,000 per part
    assert list(read_records(tmp_path / "results", "parquet")) == jsonl


def test_row_groups_parts_and_non_utf8_names(reference, tmp_path):
    out = tmp_path / "o.parquet"
    w = ParquetParts(out, "new", part_rows=7, row_group_rows=3)
    for i in range(0, len(reference), 2):
        w.write(reference[i:i + 2])
    w.close()
    names = parts(out)
    assert len(names) == 2  # a part closes at 7 records, the rest of that write opens the next
    assert [pq.ParquetFile(out / n).metadata.num_rows for n in names] == [7, 7]
    assert pq.ParquetFile(out / names[0]).metadata.num_row_groups == 3  # 3 + 3 + 1
    assert list(read_records(out, "parquet")) == reference
    # a file name that is not UTF-8 (Python's surrogate escapes): written as \xNN
    odd = dict(reference[0], path=os.fsdecode(b"/data/caf\xe9.png"))
    w = RecordWriter(tmp_path / "odd.parquet", "parquet")
    w.write([odd])
    w.close()
    (back,) = read_records(tmp_path / "odd.parquet", "parquet")
    assert back["path"] == "/data/caf\\xe9.png" and back["faces"] == odd["faces"]
    # ... and alike in JSON lines and CSV, so every output is UTF-8 that any reader takes
    for fmt in ("jsonl", "csv"):
        w = RecordWriter(tmp_path / f"odd.{fmt}", fmt)
        w.write([odd])
        w.close()
        text = (tmp_path / f"odd.{fmt}").read_bytes().decode("utf-8")
        assert "caf\\" in text and "\\udc" not in text  # JSON doubles the backslash
        if fmt == "jsonl":
            assert [r["path"] for r in read_records(tmp_path / "odd.jsonl", fmt)] == ["/data/caf\\xe9.png"]
        assert list(output_paths(tmp_path / f"odd.{fmt}", fmt)) == [path_key(odd["path"], fmt)]
    # outputs of earlier versions held the name's bytes as such: a resume still matches them
    (tmp_path / "old.jsonl").write_text(json.dumps(odd) + "\n")  # "\udce9"
    (tmp_path / "old.csv").write_bytes((tmp_path / "odd.csv").read_bytes().replace(b"caf\\xe9", b"caf\xe9"))
    for fmt in ("jsonl", "csv"):
        assert list(output_paths(tmp_path / f"old.{fmt}", fmt)) == [path_key(odd["path"], fmt)]


def complete_parts(out):
    try:
        return sum(1 for n in os.listdir(out) if n.endswith(".parquet"))
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_gives_one_record_per_input(corpus, model, reference, tmp_path):
    """Killed four times (during start-up, and just after a part was closed, while the next one is
    being filled), resumed each time: the parts hold exactly the uninterrupted scan's records."""
    out = tmp_path / "o.parquet"
    cmd = [sys.executable, "-m", "fakespotter", *cli(corpus, model, out, "--resume", "--part-rows", "2")]
    rng = random.Random(7)
    kills = runs = 0
    while True:
        runs += 1
        assert runs < 15, "the scan does not finish"
        before = complete_parts(out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 4:
            if kills == 0:
                time.sleep(rng.uniform(0.1, 1.5))
            else:
                while proc.poll() is None and complete_parts(out) < before + 1:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                kills += 1
                continue
        rc = proc.wait(timeout=300)
        assert rc == 1, proc.stderr.read().decode()
        if kills >= 4:
            break
        assert list(read_records(out, "parquet")) == reference  # finished first: check, go again
        for n in os.listdir(out):
            os.unlink(out / n)
    got = list(read_records(out, "parquet"))
    assert got == reference
    assert sorted(r["path"] for r in got) == sorted({r["path"] for r in reference})
    assert all(not n.startswith(".") for n in os.listdir(out))
    stats = json.loads((tmp_path / "o.parquet.stats.json").read_text())
    assert stats["complete"] and stats["resumed_records"] + stats["images"] == 14 and stats["resumed_records"] > 0


def test_unfinished_damaged_and_missing_parts_are_redone(corpus, model, reference, tmp_path, capsys):
    out = tmp_path / "o.parquet"
    assert main(cli(corpus, model, out, "--part-rows", "4")) == 1
    names = parts(out)
    assert len(names) >= 4
    # the last part unfinished (as a kill during its close leaves it), the third one damaged
    os.rename(out / names[-1], out / f".{names[-1]}.inprogress")
    data = (out / names[2]).read_bytes()
    (out / names[2]).write_bytes(data[: len(data) // 2])
    st = resume_state(out, "parquet")
    assert st.parts == 2 and st.records == sum(pq.ParquetFile(out / n).metadata.num_rows for n in names[:2])
    assert st.torn_bytes > 0
    loud = [a for a in cli(corpus, model, out, "--resume", "--part-rows", "4") if a != "--quiet"]
    assert main(loud) == 1
    assert "dropping unfinished or damaged part files" in capsys.readouterr().err
    assert list(read_records(out, "parquet")) == reference
    assert all(not n.startswith(".") for n in os.listdir(out))
    # a missing part: the ones after it are dropped and redone, nothing doubled
    os.unlink(out / parts(out)[1])
    assert main(cli(corpus, model, out, "--resume", "--part-rows", "4")) == 1
    assert list(read_records(out, "parquet")) == reference


def test_a_resume_drops_the_damaged_part_and_all_after_it_whatever_it_writes(reference, tmp_path):
    """The parts from the first damaged one on are deleted by the resume, not only overwritten
    by new parts of the same names: a resume with bigger parts, or one with nothing left to
    write, leaves no part that would read back twice or that a reader would trip on."""
    for rest in ("bigger parts", "nothing"):
        out = tmp_path / rest.replace(" ", "_")
        w = ParquetParts(out, "new", part_rows=2)
        w.write(reference[:8])
        w.close()
        names = parts(out)
        assert len(names) == 4
        data = (out / names[1]).read_bytes()
        (out / names[1]).write_bytes(data[:-20])
        st = resume_state(out, "parquet")
        assert (st.parts, st.records) == (1, 2)
        assert st.torn_bytes == sum((out / n).stat().st_size for n in names[1:])
        w = RecordWriter(out, "parquet", "resume", st, part_rows=100)
        w.write(reference[2:8] if rest == "bigger parts" else [])
        w.close()
        assert parts(out) == (names[:2] if rest == "bigger parts" else names[:1])
        assert list(read_records(out, "parquet")) == (reference[:8] if rest == "bigger parts" else reference[:2])
        assert pq.read_table(out).num_rows == (8 if rest == "bigger parts" else 2)


def test_a_part_damaged_in_any_column_is_redone(corpus, model, reference, tmp_path):
    out = tmp_path / "o.parquet"
    assert main(cli(corpus, model, out, "--part-rows", "4")) == 1
    names = parts(out)
    meta = pq.ParquetFile(out / names[1]).metadata
    assert meta.row_group(0).column(0).path_in_schema == "path"
    for column in ("frames", "faces.list.element.score", "path"):  # not only status: any column's data
        chunk = next(meta.row_group(0).column(i) for i in range(meta.num_columns)
                     if meta.row_group(0).column(i).path_in_schema == column)
        data = bytearray((out / names[1]).read_bytes())
        start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
        data[start + chunk.total_compressed_size - 2] ^= 0x10  # a byte of the column's last page's data
        (out / names[1]).write_bytes(bytes(data))
        st = resume_state(out, "parquet")
        assert st.parts == 1 and st.records == 4, column  # part 1 and everything after it: redone
        assert main(cli(corpus, model, out, "--resume", "--part-rows", "4")) == 1
        assert list(read_records(out, "parquet")) == reference
        assert pq.read_table(out).num_rows == len(reference)  # the folder reads as one table again


def test_what_parquet_refuses(corpus, model, tmp_path, capsys):
    def err_of(args):
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("fakespotter scan: error: ") and len(err.strip().splitlines()) == 1, err
        return err

    # a folder of someone's files: neither resumed into nor replaced, nothing deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert "holds 'notes.txt', which a scan does not write" in err_of(cli(corpus, model, mine, "--format", "parquet",
                                                                          "--resume"))
    assert "refusing to replace it" in err_of(cli(corpus, model, mine, "--format", "parquet", "--overwrite"))
    assert "already exists" in err_of(cli(corpus, model, mine, "--format", "parquet"))
    assert os.listdir(mine) == ["notes.txt"]
    # a file where the folder should be
    f = tmp_path / "f.parquet"
    f.write_text("not a folder")
    assert "is not a parquet scan output" in err_of(cli(corpus, model, f, "--resume"))
    assert f.read_text() == "not a folder"
    # a Parquet file of other columns under a part name
    other = tmp_path / "other.parquet"
    other.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), other / "part-000000.parquet")
    assert "not of a scan's records" in err_of(cli(corpus, model, other, "--resume"))
    # stdout, and --part-rows for another format
    assert "not stdout" in err_of(["scan", str(corpus), "--model", str(model), "--aligned", "--format", "parquet"])
    assert "--part-rows applies to --format parquet" in err_of(cli(corpus, model, tmp_path / "o.jsonl",
                                                                    "--part-rows", "5"))
    assert "--part-rows must be >= 1" in err_of(cli(corpus, model, tmp_path / "o.parquet", "--part-rows", "0"))
    # another model's output
    out = tmp_path / "o.parquet"
    assert main(cli(corpus, model, out, "--limit", "3")) == 0
    table = pq.read_table(out / "part-000000.parquet")
    table = table.set_column(table.schema.get_field_index("model"), "model", pa.array(["0" * 64] * 3))
    pq.write_table(table, out / "part-000000.parquet")
    assert f"was written with model {'0' * 64}" in err_of(cli(corpus, model, out, "--resume"))
    # --overwrite replaces a scan's folder (and a file of that name)
    assert main(cli(corpus, model, out, "--overwrite", "--limit", "2")) == 0
    assert len(list(read_records(out, "parquet"))) == 2
    assert main(cli(corpus, model, f, "--overwrite", "--limit", "2")) == 0 and f.is_dir()


def test_without_pyarrow_the_message_says_what_to_install(corpus, model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    for args in (cli(corpus, model, tmp_path / "o.parquet"), cli(corpus, model, tmp_path / "o", "--format", "parquet")):
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and "pip install pyarrow" in err and "fakespotter[parquet]" in err, err
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "o").exists()
    with pytest.raises(ImportError, match=r"the parquet format needs pyarrow.*pip install pyarrow"):
        RecordWriter(tmp_path / "p", "parquet")
    assert main(cli(corpus, model, tmp_path / "o.jsonl", "--limit", "2")) == 0  # the other formats need none


def _locked_by_someone(path):
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.parametrize("mode", ["new", "overwrite"])
def test_a_folder_made_and_then_unusable_is_not_left_behind(tmp_path, monkeypatch, mode):
    """Under umask 777 the folder was made with mode 000, its lock could not be taken, and the
    empty folder stayed: a rerun was refused as "not writable"."""
    def refused(self):
        raise PermissionError(13, "Permission denied", str(self.folder))

    monkeypatch.setattr(ParquetParts, "_lock", refused)
    out = tmp_path / "o.parquet"
    with pytest.raises(PermissionError):
        ParquetParts(out, mode)
    assert not out.exists()
    out.mkdir()
    (out / "part-000000.parquet").write_bytes(b"theirs")  # a folder that was there: kept as it is
    with pytest.raises(PermissionError):
        ParquetParts(out, "resume", None)
    assert (out / "part-000000.parquet").read_bytes() == b"theirs"


def test_a_parquet_folder_is_locked_from_its_creation_and_a_second_scan_is_refused(corpus, model, reference,
                                                                                   tmp_path, capsys):
    """The folder a scan creates is locked at once (it used to be locked only when it existed
    before), and a second scan that would resume or replace it is refused before it reads it."""
    import fcntl

    out = tmp_path / "o.parquet"
    w = RecordWriter(out, "parquet", "new")
    assert _locked_by_someone(out)
    w.write(reference[:3])
    w.close()
    assert not _locked_by_someone(out)
    fd = os.open(out, os.O_RDONLY)  # another scan writing it
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        for flag in ("--resume", "--overwrite"):
            rc = main(cli(corpus, model, out, flag))
            err = capsys.readouterr().err
            assert rc == 2 and err.startswith("fakespotter scan: error: ") and len(err.strip().splitlines()) == 1
            assert "is being written by another scan" in err
    finally:
        os.close(fd)
    assert [r for r in read_records(out, "parquet")] == reference[:3]
    # a resume that fails once it holds the lock lets go of it
    with pytest.raises(ValueError, match="changed since its state was read"):
        ParquetParts(out, "resume", resume_state(out, "parquet")._replace(parts=5))
    assert not _locked_by_someone(out)
