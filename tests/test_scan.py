"""fakespotter.scan and `fakespotter scan`: records, order, scores against the detector, workers,
inputs (folders, lists, stdin, tar), CSV, --limit, exit codes, real photos with face detection.

Most tests scan tiny aligned noise chips with a detector trained on noise (see scan_helpers)."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakespotter import data as D
from fakespotter.artifact import file_sha256
from fakespotter.cli import main
from fakespotter.detector import FakeSpotter
from fakespotter.faces import chip_from_aligned
from fakespotter.scan import RECORD_FIELDS, scan
from scan_helpers import model_file, noise_image, without_permission_override, write_good


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_file(tmp_path_factory)


@pytest.fixture(scope="module")
def det(model):
    return FakeSpotter.load(model)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_good(root / "a", 5, seed=1)
    write_good(root / "a" / "deeper", 2, seed=2, ext=".jpg")
    write_good(root / "b", 4, seed=3)
    (root / "b" / "notes.txt").write_text("not an image, not listed")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "b" / "empty.jpg").write_bytes(b"")
    return root


def run_cli(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def jsonl(path):
    return [json.loads(line) for line in open(path)]


# ----------------------------------------------------------------------------------------------
# records


def test_records_one_per_input_in_listing_order_with_exact_scores(corpus, model, det):
    records = list(scan([str(corpus)], model, aligned=True, batch_size=4, workers=0))
    listing = [str(p) for p in D.list_images(corpus)]
    assert [r["path"] for r in records] == listing == sorted(listing)
    assert all(list(r) == list(RECORD_FIELDS) for r in records)
    model_id = file_sha256(model)
    t = det.operating_threshold_["logit"]
    checked = 0
    for r in records:
        content = open(r["path"], "rb").read()
        assert r["size"] == len(content) and r["sha256"] == hashlib.sha256(content).hexdigest()
        assert r["model"] == model_id
        if r["path"].endswith(("broken.png", "empty.jpg")):
            assert r["status"] == "error" and r["score"] is None and r["label"] is None and r["faces"] == []
            assert r["error_kind"] == ("empty_file" if r["path"].endswith("empty.jpg") else "decode_error")
            assert r["error"]
            continue
        assert r["status"] == "ok" and r["error_kind"] is None and r["error"] is None
        assert r["width"] == r["height"] == 24 and r["frames"] == 1
        (face,) = r["faces"]
        assert face == {"box": [0, 0, 24, 24], "detector_score": None, "score": r["score"]}
        assert r["label"] == ("fake" if r["score"] > t else "real")
        if checked < 3:  # the same chip through the detector, in a forward of the same size (zero padding)
            batch = np.zeros((4, 150, 150, 3), np.uint8)
            batch[0] = chip_from_aligned(r["path"])
            assert r["score"] == float(det.decision_function(batch)[0])
            checked += 1
    labels = {r["label"] for r in records if r["label"]}
    assert labels == {"real", "fake"}, "the noise detector should call some of each"


def test_scores_do_not_depend_on_neighbours_workers_or_chunking(corpus, model):
    base = list(scan([str(corpus)], model, aligned=True, batch_size=4, workers=0))
    pooled = list(scan([str(corpus)], model, aligned=True, batch_size=4, workers=2))
    assert pooled == base
    # a later start (what a resume does) gives the same records for the rest
    tail = list(scan([str(corpus)], model, aligned=True, batch_size=4, workers=0, skip=3))
    assert tail == base[3:]
    excluded = {base[1]["path"], base[5]["path"]}
    rest = list(scan([str(corpus)], model, aligned=True, batch_size=4, workers=0, exclude=excluded))
    assert rest == [r for r in base if r["path"] not in excluded]


def test_batches_group_records_and_stats(corpus, model):
    run = scan([str(corpus)], model, aligned=True, batch_size=4, workers=0)
    groups = list(run.batches())
    n = sum(len(g) for g in groups)
    assert n == 13 and len(groups) >= 3 and all(groups)
    st = run.stats
    assert st["images"] == 13 and st["counts"] == {"ok": 11, "no_face": 0, "error": 2}
    assert st["error_kinds"] == {"decode_error": 1, "empty_file": 1} and st["faces"] == 11
    assert st["forwards"] == 3  # 11 chips in forwards of 4
    assert st["labels"]["real"] + st["labels"]["fake"] == 11
    assert st["images_per_s"] > 0 and st["backbone_taps_s"] > 0 and st["wall_s"] >= st["backbone_taps_s"]


def test_limit_scans_the_first_inputs(corpus, model):
    full = [r["path"] for r in scan([str(corpus)], model, aligned=True, batch_size=4, workers=0, limit=100)]
    first = [r["path"] for r in scan([str(corpus)], model, aligned=True, batch_size=4, workers=0, limit=5)]
    assert first == full[:5]
    assert list(scan([str(corpus)], model, aligned=True, batch_size=4, workers=0, limit=0)) == []


def test_library_refuses_bad_arguments(corpus, model, tmp_path):
    with pytest.raises(FileNotFoundError, match="scan: .*missing does not exist"):
        scan([str(tmp_path / "missing")], model)
    for bad in (0, 100_000):  # (100,000: a 6.75 GB staging buffer before the first forward, then the OOM killer)
        with pytest.raises(ValueError, match=f"scan: batch_size must be an int from 1 to 4096, got {bad}"):
            scan([str(corpus)], model, batch_size=bad)
    with pytest.raises(ValueError, match="scan: workers must be an int >= 0, got -1"):
        scan([str(corpus)], model, workers=-1)
    with pytest.raises(ValueError, match="'-' .* can be given once"):
        scan(["-", "-"], model)
    with pytest.raises(TypeError, match="scan: model must be a model file path, 'default' or a fitted FakeSpotter"):
        scan([str(corpus)], 42)


# ----------------------------------------------------------------------------------------------
# inputs


def test_tar_members_score_like_the_files(corpus, model, tmp_path):
    files = D.list_images(corpus / "a")
    for mode, name in (("w", "c.tar"), ("w:gz", "c.tar.gz")):
        with tarfile.open(tmp_path / name, mode) as tf:
            for p in files:
                tf.add(p, arcname=f"x/{p.name}")
            info = tarfile.TarInfo("x/readme.txt")
            info.size = 5
            tf.addfile(info, io.BytesIO(b"hello"))
    loose = list(scan([str(corpus / "a")], model, aligned=True, batch_size=4, workers=0))
    for name in ("c.tar", "c.tar.gz"):
        archived = list(scan([str(tmp_path / name)], model, aligned=True, batch_size=4, workers=1))
        assert [r["path"] for r in archived] == [f"{tmp_path / name}::x/{p.name}" for p in files]
        for a, b in zip(archived, loose):
            assert {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}
    # a damaged archive: the members before the damage, then one bad_archive record
    whole = (tmp_path / "c.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2 + 100])
    recs = list(scan([str(tmp_path / "cut.tar")], model, aligned=True, batch_size=4, workers=0))
    assert recs and recs[-1]["error_kind"] == "bad_archive" and recs[-1]["path"] == f"{tmp_path / 'cut.tar'}::"
    assert recs[0]["sha256"] == loose[0]["sha256"] and [r["status"] for r in recs[:-2]] == ["ok"] * (len(recs) - 2)
    assert recs[-2]["status"] == "ok" or recs[-2]["error_kind"] == "truncated"  # the member cut, if any
    # cut inside a member's data: its header was read, so that member gets a truncated record
    with tarfile.open(tmp_path / "c.tar") as tf:
        third = tf.getmembers()[2]
    for cut in (third.size // 2, third.size - 1):  # (one byte short: still truncated, never a short image)
        (tmp_path / "mid.tar").write_bytes(whole[: third.offset_data + cut])
        recs = list(scan([str(tmp_path / "mid.tar")], model, aligned=True, batch_size=4, workers=0))
        assert [r["status"] for r in recs] == ["ok", "ok", "error", "error"]
        assert recs[2]["path"] == f"{tmp_path / 'mid.tar'}::{third.name}" and recs[2]["error_kind"] == "truncated"
        assert f"inside this member of {third.size} bytes" in recs[2]["error"]
        assert recs[3]["path"] == f"{tmp_path / 'mid.tar'}::" and recs[3]["error_kind"] == "bad_archive"
    # damaged compressed data: found by zlib where it breaks the stream, else by gzip's CRC at the end
    packed = (tmp_path / "c.tar.gz").read_bytes()
    for at in range(len(packed) // 3, len(packed) - 20, len(packed) // 7):
        damaged = bytearray(packed)
        damaged[at] ^= 0x01
        (tmp_path / "damaged.tar.gz").write_bytes(bytes(damaged))
        recs = list(scan([str(tmp_path / "damaged.tar.gz")], model, aligned=True, batch_size=4, workers=0))
        assert recs[-1]["error_kind"] == "bad_archive", at
        if recs[-1]["path"] == str(tmp_path / "damaged.tar.gz"):  # zlib failed in the first block read
            assert len(recs) == 1 and "cannot open as a tar archive" in recs[0]["error"], at
        else:
            assert recs[-1]["path"] == f"{tmp_path / 'damaged.tar.gz'}::", at
    damaged = bytearray(packed)
    damaged[-6] ^= 0x01  # the stored CRC itself: every member reads fine, the check fails at the end
    (tmp_path / "crc.tar.gz").write_bytes(bytes(damaged))
    recs = list(scan([str(tmp_path / "crc.tar.gz")], model, aligned=True, batch_size=4, workers=0))
    assert [r["status"] for r in recs] == ["ok"] * len(files) + ["error"]
    assert "fails its check (CRC check failed" in recs[-1]["error"] and "may be damaged" in recs[-1]["error"]
    (tmp_path / "not.tar").write_bytes(b"this is no archive" * 100)
    (rec,) = scan([str(tmp_path / "not.tar")], model, aligned=True, workers=0)
    assert rec["status"] == "error" and rec["error_kind"] == "bad_archive"


def test_tar_damaged_header_links_and_special_members_get_records(corpus, model, tmp_path):
    files = D.list_images(corpus / "a")[:4]
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        for p in files:
            tf.add(p, arcname=p.name)
    whole = bytearray((tmp_path / "t.tar").read_bytes())
    with tarfile.open(tmp_path / "t.tar") as tf:
        second = tf.getmembers()[1].offset
    whole[second] ^= 0x20  # a byte of the second member's name: its header checksum fails
    (tmp_path / "bad.tar").write_bytes(bytes(whole))
    recs = list(scan([str(tmp_path / "bad.tar")], model, aligned=True, batch_size=4, workers=0))
    # tarfile stops quietly at a bad header: the rest of the archive must not vanish unnoticed
    assert [r["status"] for r in recs] == ["ok", "error"] and recs[1]["error_kind"] == "bad_archive"
    assert recs[1]["path"] == f"{tmp_path / 'bad.tar'}::" and "not read" in recs[1]["error"]
    # links, FIFOs and devices named like images: a not_a_file record each; folders: walked
    with tarfile.open(tmp_path / "links.tar", "w") as tf:
        tf.add(files[0], arcname="d/a.png")
        for name, kind, link in (("d/hard.png", tarfile.LNKTYPE, "d/a.png"), ("d/soft.png", tarfile.SYMTYPE, "a.png"),
                                 ("d/pipe.png", tarfile.FIFOTYPE, ""), ("d/dir.png", tarfile.DIRTYPE, ""),
                                 ("d/notes.txt", tarfile.SYMTYPE, "a.png")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tf.addfile(info)
    recs = list(scan([str(tmp_path / "links.tar")], model, aligned=True, batch_size=4, workers=0))
    got = {r["path"].split("::")[1]: (r["status"], r["error_kind"], r["error"]) for r in recs}
    assert list(got) == ["d/a.png", "d/hard.png", "d/soft.png", "d/pipe.png"]
    assert got["d/a.png"][0] == "ok" and {s for s, k, _ in list(got.values())[1:]} == {"error"}
    assert {k for _, k, _ in list(got.values())[1:]} == {"not_a_file"}
    assert "hard link to d/a.png" in got["d/hard.png"][2] and "symbolic link to a.png" in got["d/soft.png"][2]


def test_tar_members_listed_by_span_read_as_the_listing_reads_them(corpus, tmp_path):
    """The Ray engine lists an uncompressed archive's members by their span of it (the decode
    tasks read them, not the driver): whole, cut anywhere (inside a member, a header, the end
    padding), with a damaged header, links and macOS metadata, each entry reads as the listing
    that holds the bytes reads it: the same bytes, or the same error kind and message. Pax and
    GNU long names are spanned too. A compressed archive (by its content, not its name) and a
    sparse member still come with their bytes; an archive rewritten after it was listed (the
    member's header no longer before its offset) is refused, not read at its old offsets."""
    files = D.list_images(corpus / "a")[:4]
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        for p in files:
            tf.add(p, arcname=f"x/{p.name}")
        meta = D.APPLE_DOUBLE + b"metadata"
        info = tarfile.TarInfo("x/._a.png")
        info.size = len(meta)
        tf.addfile(info, io.BytesIO(meta))
        info = tarfile.TarInfo("x/soft.png")
        info.type, info.linkname = tarfile.SYMTYPE, "a.png"
        tf.addfile(info)
    whole = (tmp_path / "t.tar").read_bytes()
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tf:
        tf.add(files[0], arcname="x/a.png")

    def read(entry):
        try:
            return "bytes", D.read_entry(entry)
        except D.ImageError as e:
            return e.kind, str(e)

    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):  # (a header block before the one next to the data)
        with tarfile.open(tmp_path / "long.tar", "w", format=fmt) as tf:
            tf.add(files[0], arcname="é/" + "l" * 150 + ".png")
        (long,) = D.iter_entries([str(tmp_path / "long.tar")], tar_spans=True)
        assert long.span is not None and read(long) == ("bytes", files[0].read_bytes())
    archives = {"whole": whole}
    for cut in (300, 512 + 100, len(whole) // 2, len(whole) - 1024 - 10, len(whole) - 100):
        archives[f"cut{cut}"] = whole[:cut]
    header = bytearray(whole)
    with tarfile.open(tmp_path / "t.tar") as tf:
        header[tf.getmembers()[2].offset] ^= 0x20
    archives["header"] = bytes(header)
    for name, data in archives.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        by_bytes, by_span = list(D.iter_entries([str(path)])), list(D.iter_entries([str(path)], tar_spans=True))
        assert [e.path for e in by_span] == [e.path for e in by_bytes], name
        assert [read(e) for e in by_span] == [read(e) for e in by_bytes], name
        assert all(e.data is None and (e.span is None or e.file == str(path)) for e in by_span), name
    spanned = list(D.iter_entries([str(tmp_path / "t.tar")], tar_spans=True))
    assert [e.path.split("::")[1] for e in spanned] == [f"x/{p.name}" for p in files] + ["x/soft.png"]
    compressed = list(D.iter_entries([str(tmp_path / "t.tar.gz")], tar_spans=True))
    assert [e.span for e in compressed] == [None] and compressed[0].data == files[0].read_bytes()
    # compressed however its name reads (LZMA "alone", which tarfile opens as xz): bytes, not spans
    (tmp_path / "alone.tar").write_bytes(lzma.compress(whole, format=lzma.FORMAT_ALONE))
    alone = list(D.iter_entries([str(tmp_path / "alone.tar")], tar_spans=True))
    assert [e.span for e in alone] == [None] * len(alone) and alone[0].data == files[0].read_bytes()
    # a sparse member (GNU tar -S): its stored data is not its size: read while listing
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    with open(sparse / "s.png", "wb") as f:
        f.write(files[0].read_bytes())
        f.seek(1 << 20)
        f.write(b"\0")
    subprocess.run(["tar", "-cSf", str(tmp_path / "sparse.tar"), "-C", str(sparse), "s.png"], check=True)
    (entry,) = D.iter_entries([str(tmp_path / "sparse.tar")], tar_spans=True)
    assert entry.span is None and entry.data == (sparse / "s.png").read_bytes()
    # the archive rewritten after the listing (its members in another order): refused, not another image
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        for p in files[::-1]:
            tf.add(p, arcname=f"x/{p.name}")
    assert read(spanned[0]) == ("bad_archive", f"{spanned[0].path}: the archive changed after its members were "
                                               f"listed (this member's header is not where it was): scan it again")


def test_a_tar_that_ends_in_a_cut_or_damaged_member_header_ends_with_bad_archive(tmp_path):
    """tarfile takes a header cut short, or a damaged last block, after the first member for
    the archive's end: the members from there on were left out without a word. Zeros where
    the archive ends (its end blocks, cut or not) are its end."""
    blobs = [os.urandom(3000 + i) for i in range(3)]
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        for i, b in enumerate(blobs):
            info = tarfile.TarInfo(f"d/{i}.jpg")
            info.size = len(b)
            tf.addfile(info, io.BytesIO(b))
        end = tf.offset  # where the end-of-archive blocks begin
    with tarfile.open(tmp_path / "t.tar") as tf:
        third = tf.getmembers()[2].offset
    whole = (tmp_path / "t.tar").read_bytes()
    cases = {"cut in header": (whole[:third + 200], 2), "damaged last block": (whole[:end] + b"\x07" * 512, 3),
             "end blocks cut": (whole[:end + 700], 3), "no end blocks": (whole[:end], 3)}
    for name, (data, members) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.tar"
        path.write_bytes(data)
        for spans in (False, True):
            entries = list(D.iter_entries([str(path)], tar_spans=spans))
            assert [D.read_entry(e) for e in entries[:members]] == blobs[:members], (name, spans)
            if name in ("cut in header", "damaged last block"):
                at = third if name == "cut in header" else end
                assert len(entries) == members + 1 and entries[-1].error == (
                    "bad_archive", f"{path}: the archive ends in a damaged or cut member header at byte {at}: the "
                                   f"member it began, and any after it, were not read"), (name, spans)
            else:
                assert len(entries) == members, (name, spans)


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts the bytes read in /proc/self/io (Linux)")
def test_a_span_listing_reads_the_headers_not_the_members(tmp_path):
    """The Ray driver lists an uncompressed archive for its decode tasks, which read the members:
    the listing seeks past their data (it read the whole archive, each member twice in all)."""
    def read_so_far():
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar"))

    blob = os.urandom(256 << 10)
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        for i in range(40):
            info = tarfile.TarInfo(f"d/{i:03d}.jpg")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    before = read_so_far()
    entries = list(D.iter_entries([str(tmp_path / "t.tar")], tar_spans=True))
    read = read_so_far() - before
    assert len(entries) == 40 and all(e.span is not None and e.data is None for e in entries)
    assert read < (tmp_path / "t.tar").stat().st_size / 20, read
    assert D.read_entry(entries[7]) == blob


def test_lists_stdin_and_missing_entries(corpus, model, tmp_path, capsys, monkeypatch):
    a = D.list_images(corpus / "a")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{os.path.relpath(a[0], tmp_path)}\n\n{a[1]}\nmissing.png\n{corpus / 'b'}\n")
    recs = list(scan([f"@{listing}"], model, aligned=True, batch_size=4, workers=0))
    b = [str(p) for p in D.list_images(corpus / "b")]
    assert [r["path"] for r in recs] == [os.path.join(str(tmp_path), os.path.relpath(a[0], tmp_path)), str(a[1]),
                                         os.path.join(str(tmp_path), "missing.png")] + b
    assert recs[0]["status"] == "ok" and recs[2]["error_kind"] == "not_found"
    as_bytes = list(scan([os.fsencode(a[0]), a[1]], model, aligned=True, batch_size=4, workers=0))  # bytes, Path
    assert [r["path"] for r in as_bytes] == [str(a[0]), str(a[1])] and as_bytes[0]["status"] == "ok"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{a[2]}\n{a[3]}\n"))
    out = tmp_path / "stdin.jsonl"
    rc, _, err = run_cli(["scan", "-", str(a[4]), "--model", str(model), "--aligned", "--workers", "0",
                          "--batch-size", "4", "--out", str(out)], capsys)
    assert rc == 0, err
    assert [r["path"] for r in jsonl(out)] == [str(a[2]), str(a[3]), str(a[4])]
    monkeypatch.setattr(sys, "stdin", None)  # a program started with standard input closed (`<&-`)
    rc, _, err = run_cli(["scan", "-", "--model", str(model), "--aligned", "--out", str(tmp_path / "closed.jsonl")],
                         capsys)
    assert rc == 2 and "'-' reads the list of inputs from standard input" in err and "is closed" in err
    with pytest.raises(ValueError, match="standard input is closed"):
        list(scan(["-"], model, aligned=True, workers=0))


def test_stats_name_files_and_folders_in_utf8_as_the_records_do(corpus, model, tmp_path):
    """Non-UTF-8 bytes of an input's name or of the working folder were lone surrogates in the
    stats JSON ("\\udcff"), which strict JSON readers refuse; a resume from such a folder still
    knows it is where the scan ran."""
    home = tmp_path / os.fsdecode(b"w\xff")
    (home / "in").mkdir(parents=True)
    good = D.list_images(corpus / "a")[0]
    for name in (b"a\xe9.png", b"b.png"):
        (home / "in" / os.fsdecode(name)).write_bytes(good.read_bytes())
    cmd = [sys.executable, "-m", "fakespotter", "scan", "in", os.fsdecode(b"in/a\xe9.png"), "--model", str(model),
           "--aligned", "--workers", "0", "--out", "o.jsonl", "--quiet"]
    run = subprocess.run(cmd + ["--limit", "1"], cwd=home, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    text = (home / "o.jsonl.stats.json").read_bytes().decode("utf-8")
    assert "\\ud" not in text, text
    stats = json.loads(text)
    assert stats["inputs"] == ["in", "in/a\\xe9.png"] and stats["cwd"].endswith("w\\xff")
    run = subprocess.run(cmd + ["--resume"], cwd=home, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    assert [r["path"] for r in jsonl(home / "o.jsonl")] == ["in/a\\xe9.png", "in/b.png", "in/a\\xe9.png"]


def test_list_files_in_any_bytes_and_from_pipes(corpus, model, tmp_path, capsys):
    good = D.list_images(corpus / "a")[0]
    odd = tmp_path / os.fsdecode(b"caf\xe9 \xff.png")  # a name that is not UTF-8
    odd.write_bytes(good.read_bytes())
    listing = tmp_path / "list.txt"  # a byte-order mark, and the name's raw bytes
    listing.write_bytes(b"\xef\xbb\xbf" + bytes(good) + b"\n" + os.fsencode(odd) + b"\n")
    recs = list(scan([f"@{listing}"], model, aligned=True, batch_size=4, workers=0))
    assert [r["path"] for r in recs] == [str(good), str(odd)] and [r["status"] for r in recs] == ["ok", "ok"]
    assert recs[0]["sha256"] == recs[1]["sha256"]
    # a list that is a pipe (@/dev/stdin, @<(find ...)): read once, relative to the working folder, also on resume
    out = tmp_path / "piped.jsonl"
    cmd = [sys.executable, "-m", "fakespotter", "scan", "@/dev/stdin", "--model", str(model), "--aligned",
           "--workers", "0", "--out", str(out), "--quiet"]
    run = subprocess.run(cmd + ["--limit", "1"], input=bytes(listing.read_bytes()), capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    run = subprocess.run(cmd + ["--resume"], input=bytes(listing.read_bytes()), capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    escaped = str(odd).replace(os.fsdecode(b"\xe9"), "\\xe9").replace(os.fsdecode(b"\xff"), "\\xff")
    assert [r["path"] for r in jsonl(out)] == [str(good), escaped]  # every output is UTF-8
    # '-' reads stdin as a list file is read, whatever the locale says stdin's encoding is
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    run = subprocess.run([*cmd[:4], "-", *cmd[5:10], "--format", "jsonl", "--quiet"], input=listing.read_bytes(),
                         capture_output=True, env=env)
    assert run.returncode == 0, run.stderr.decode()
    assert [json.loads(line)["path"] for line in run.stdout.decode().splitlines()] == [str(good), escaped]
    # @/dev/stdin redirected from a file (a regular file then): still relative to the working folder, not to /dev
    rel = tmp_path / "rel.txt"
    rel.write_text(f"{good.relative_to(corpus)}\n")
    with open(rel, "rb") as stdin:
        run = subprocess.run([*cmd[:10], "--format", "jsonl", "--quiet"], stdin=stdin, capture_output=True,
                             cwd=corpus)
    assert run.returncode == 0, run.stderr.decode()
    assert [json.loads(line)["path"] for line in run.stdout.decode().splitlines()] == [str(good.relative_to(corpus))]
    # CSV on a stdout that is strict UTF-8: the name as \xNN, as in a CSV file
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    run = subprocess.run([*cmd[:4], f"@{listing}", *cmd[5:10], "--format", "csv", "--quiet"], capture_output=True,
                         env=env)
    assert run.returncode == 0, run.stderr.decode()
    assert escaped.encode() in run.stdout and run.stdout.count(b"\n") == 3
    run.stdout.decode("utf-8")  # valid UTF-8: pandas and csv readers take it
    for bad, message in ((tmp_path, "is a folder; give the folder without '@'"), (tmp_path / "no.txt", "does not exist")):
        rc, _, err = run_cli(["scan", f"@{bad}", "--model", str(model), "--aligned"], capsys)
        assert rc == 2 and message in err, err


def test_an_image_named_with_an_at_sign_is_not_read_as_a_file_list(model, tmp_path, capsys, monkeypatch):
    """'@' names a file list: ``scan *.jpg`` over alice.jpg and @alice.jpg read the JPEG's bytes
    as a list of paths (142 junk not_found records); with only @bob.jpg, "file list bob.jpg does
    not exist" gave no hint of ./@bob.jpg."""
    monkeypatch.chdir(tmp_path)
    for name in ("alice.jpg", "@alice.jpg", "@bob.jpg"):
        Image.new("RGB", (32, 32)).save(name)
    (tmp_path / "BMW.txt").write_text("alice.jpg\n")  # a list may start like a BMP ("BM") or a PPM ("P1")
    (tmp_path / "P1.txt").write_text("P1/../alice.jpg\n")
    (tmp_path / "P1").mkdir()
    for args, message in ((["@alice.jpg"], "scan: @alice.jpg names a file list, and alice.jpg is a JPEG image, not a "
                                           "list of paths (a file named @alice.jpg exists: write ./@alice.jpg to scan it)"),
                          (["alice.jpg", "@bob.jpg"], "scan: file list bob.jpg does not exist (a file named @bob.jpg "
                                                      "exists: write ./@bob.jpg to scan it)")):
        rc, _, err = run_cli(["scan", *args, "--model", str(model), "--aligned", "--out", "o.jsonl"], capsys)
        assert rc == 2 and message in err and not os.path.exists("o.jsonl"), err
    with pytest.raises(ValueError, match="@alice.jpg names a file list, and alice.jpg is a JPEG image"):
        D.list_images("@alice.jpg")
    for how in ("-", "@/dev/stdin"):  # an image piped in where the list is read (its lines were taken as paths)
        with open("alice.jpg", "rb") as f:
            run = subprocess.run([sys.executable, "-m", "fakespotter", "scan", how, "--model", str(model), "--aligned",
                                  "--out", "p.jsonl"], stdin=f, capture_output=True, text=True)
        assert run.returncode == 2 and not os.path.exists("p.jsonl"), run.stderr
        assert "is a JPEG image, not " in run.stderr and "give the image's path instead" in run.stderr
    with pytest.raises(ValueError, match="a file list holds one path a line, and this one is a PNG image"):
        list(scan(["-"], model, aligned=True, workers=0, stdin=io.StringIO(os.fsdecode(b"\x89PNG\r\n\x1a\n"))))
    recs = list(scan(["./@alice.jpg", "./@bob.jpg", "@BMW.txt", "@P1.txt"], model, aligned=True, workers=0))
    assert [(r["path"], r["status"]) for r in recs] == [("./@alice.jpg", "ok"), ("./@bob.jpg", "ok"),
                                                         ("alice.jpg", "ok"), ("P1/../alice.jpg", "ok")]


def test_macos_appledouble_files_are_not_inputs(model, tmp_path):
    """A corpus copied from a Mac holds ._name beside each photo (its Finder metadata; in zips,
    under __MACOSX/): each was a not_an_image error record. An image named ._x.jpg still counts."""
    folder = tmp_path / "in"
    (folder / "__MACOSX").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(folder / "photo.jpg")
    apple = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)
    (folder / "._photo.jpg").write_bytes(apple)
    (folder / "__MACOSX" / "._photo.jpg").write_bytes(apple)
    Image.new("RGB", (32, 32)).save(folder / "._real.jpg")
    archive = tmp_path / "mac.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(folder / "photo.jpg", "d/photo.jpg")
        tf.add(folder / "._photo.jpg", "d/._photo.jpg")
        tf.add(folder / "._real.jpg", "d/._real.jpg")
    recs = list(scan([str(folder), str(archive)], model, aligned=True, workers=0))
    assert [(os.path.relpath(r["path"], tmp_path), r["status"]) for r in recs] == [
        ("in/._real.jpg", "ok"), ("in/photo.jpg", "ok"), ("mac.tar::d/photo.jpg", "ok"), ("mac.tar::d/._real.jpg", "ok")]
    # named on its own, a file is read whatever it is
    (rec,) = scan([str(folder / "._photo.jpg")], model, aligned=True, workers=0)
    assert rec["error_kind"] == "not_an_image"
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "._x.jpg")  # (opening it to read its first bytes waited for a writer)
    (rec,) = scan([str(tmp_path / "fifo")], model, aligned=True, workers=0)
    assert rec["error_kind"] == "not_a_file"


def test_sockets_and_symlink_loops_get_the_kinds_the_api_gives(model, tmp_path):
    import socket

    sock = tmp_path / "s.jpg"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
        (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
        recs = list(scan([str(sock), str(tmp_path / "loop.jpg")], model, aligned=True, workers=0))
    assert [r["error_kind"] for r in recs] == ["not_a_file", "not_found"], [r["error"] for r in recs]


def test_inputs_without_images_say_so(model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    for quiet in ([], ["--quiet"]):
        rc, _, err = run_cli(["scan", str(tmp_path / "empty"), str(tmp_path / "notes"), "--model", str(model),
                              "--out", str(tmp_path / f"o{len(quiet)}.jsonl"), *quiet], capsys)
        assert rc == 0 and "warning: the inputs hold no image to scan (folders are searched for .apng .avif" in err, err


def test_a_file_is_read_without_reserving_the_size_limit(tmp_path):
    """read_entry read each file with read(MAX_FILE_BYTES + 1), which reserves a GiB: under a
    memory cap (ulimit -v, as on shared clusters) every file of a scan became an internal_error."""
    f = tmp_path / "a.png"
    f.write_bytes(b"x" * 5000)
    code = ("import resource, sys\n"
            "from fakespotter import data as D\n"
            "vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
            "cap = vm * 1024 + (256 << 20)  # a quarter of the size limit above what the process holds\n"
            "resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
            "print(len(D.read_entry(D.Entry(sys.argv[1], sys.argv[1]))))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "5000\n", proc.stderr


def test_a_file_that_grows_while_read_is_read_to_its_end_or_refused_past_the_limit(tmp_path, monkeypatch):
    f = tmp_path / "a.png"
    f.write_bytes(bytes(range(256)) * 40)  # 10240 bytes, of which fstat below sees 100
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 100, *real_fstat(fd)[7:])))
    entry = D.Entry(str(f), str(f))
    assert D.read_entry(entry) == f.read_bytes()
    monkeypatch.setattr(D, "MAX_FILE_BYTES", 4096)
    with pytest.raises(D.ImageError, match=r"a\.png: more than 4096 bytes \(it grew while it was read\)") as e:
        D.read_entry(entry)
    assert e.value.kind == "too_large"


def test_the_size_limit_takes_a_file_of_exactly_that_size(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MAX_FILE_BYTES", 100)
    (tmp_path / "at.png").write_bytes(b"x" * 100)
    (tmp_path / "over.png").write_bytes(b"x" * 101)
    assert D.read_entry(D.Entry(str(tmp_path / "at.png"), str(tmp_path / "at.png"))) == b"x" * 100
    with pytest.raises(D.ImageError) as e:
        D.read_entry(D.Entry(str(tmp_path / "over.png"), str(tmp_path / "over.png")))
    assert e.value.kind == "too_large"


def test_list_lines_are_paths_as_written(tmp_path):
    for name in ("#hash.png", " lead.png", "trail .png", "plain.png"):
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "l.txt"
    listing.write_text("# a comment\n./#hash.png\n lead.png\ntrail .png\n  plain.png \r\n \t\n#hash.png\n"
                       "missing.png\nfound.png\0other.png\n")
    entries = list(D.iter_entries([f"@{listing}"]))
    names = ("./#hash.png", " lead.png", "trail .png", "plain.png", "missing.png", "found.png\0other.png")
    assert [e.path for e in entries] == [os.path.join(str(tmp_path), n) for n in names]
    assert [D.read_entry(e) for e in entries[:4]] == [b"x"] * 4
    assert [type(e.error) for e in entries[4:]] == [type(None), tuple]
    kind, message = entries[-1].error
    assert kind == "not_found" and "cannot hold a NUL byte" in message and "find -print0" in message
    assert list(D.iter_images(f"@{listing}")) == [tmp_path / n for n in names]  # what the other commands read


def test_only_descriptor_names_are_lists_relative_to_the_working_folder(tmp_path):
    """/dev/stdin, /dev/fd/N and /proc/*/fd/N name a descriptor (the working folder is the base);
    a list file that merely lives under /dev (a RAM disk: /dev/shm) is relative to its folder."""
    import tempfile

    from fakespotter.data import _list_base

    (tmp_path / "l.txt").write_text("a.jpg\n")
    with open(tmp_path / "l.txt") as r:  # a regular file behind a descriptor
        n = r.fileno()
        assert _list_base(f"/dev/fd/{n}") == "" and _list_base(f"/proc/self/fd/{n}") == ""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    shm = tempfile.mkdtemp(dir="/dev/shm")
    try:
        (Path(shm) / "l.txt").write_text("a.jpg\n")
        assert _list_base(os.path.join(shm, "l.txt")) == shm
    finally:
        shutil.rmtree(shm)


def test_permission_denied_vanished_and_fifo(corpus, model, tmp_path, monkeypatch):
    files = write_good(tmp_path / "c", 3, seed=7)
    os.mkfifo(tmp_path / "c" / "pipe.png")
    real_open = os.open

    def guarded(path, *a, **kw):
        if str(path).endswith("img001.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(D.os, "open", guarded)
    run = scan([str(tmp_path / "c")], model, aligned=True, batch_size=1, workers=0)
    first = next(run)
    files[2].unlink()  # vanishes after the listing, before it is read
    recs = [first] + list(run)
    kinds = {os.path.basename(r["path"]): r["error_kind"] for r in recs}
    assert kinds == {"img000.png": None, "img001.png": "permission_denied", "img002.png": "not_found",
                     "pipe.png": "not_a_file"}


def test_unreadable_file_for_real(model, tmp_path):
    """A file its owner cannot read (root, who reads anything, scans without that power)."""
    (p,) = write_good(tmp_path / "c", 1, seed=8)
    p.chmod(0)
    prefix = without_permission_override(p, "r")
    if prefix is None:
        pytest.skip("running as root, and setpriv cannot drop root's power to read any file here")
    code = ("import json, sys; from fakespotter.scan import scan; "
            "print(json.dumps(list(scan([sys.argv[1]], sys.argv[2], aligned=True, workers=1))))")
    done = subprocess.run(prefix + [sys.executable, "-c", code, str(p), str(model)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (rec,) = json.loads(done.stdout.splitlines()[-1])
    assert rec["error_kind"] == "permission_denied" and rec["score"] is None and str(p) in rec["error"]


def test_a_face_waiting_for_its_batch_holds_back_a_bounded_number_of_records(model, tmp_path, monkeypatch):
    """A face waits for a full batch; records decoded behind it wait for it (input order). A
    long run of quick records (errors, no face) used to be held for up to STALL_FLUSH_S, in
    memory and unwritten; past MAX_HELD_RECORDS the face is scored in a partial batch, which
    gives the same score (every forward is padded to batch_size)."""
    S = sys.modules["fakespotter.scan"]
    folder = tmp_path / "in"
    write_good(folder, 1)  # img000.png, first in the listing
    for i in range(300):
        (folder / f"z{i:03d}.png").write_bytes(b"")  # empty_file records
    with scan([str(folder)], model, aligned=True, workers=1, batch_size=8) as run:
        whole = list(run.batches())
    monkeypatch.setattr(S, "MAX_HELD_RECORDS", 40)
    with scan([str(folder)], model, aligned=True, workers=1, batch_size=8) as run:
        bounded = list(run.batches())
    assert len(whole[0]) == 301  # (the scan ends within STALL_FLUSH_S)
    assert len(bounded[0]) <= 40 + 4 and len(bounded) > 5, [len(g) for g in bounded]
    assert [r for g in bounded for r in g] == whole[0]


def test_the_eta_counts_files_but_does_not_read_a_tar_archive_again(tmp_path):
    from types import SimpleNamespace

    from fakespotter.cli.scan import _count_inputs

    folder = tmp_path / "in"
    write_good(folder, 3)
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tf:
        tf.add(folder / "img000.png", arcname="x.png")
    progress = SimpleNamespace(total=None)
    _count_inputs([str(folder)], None, 1, progress)
    assert progress.total == 2  # 3 inputs, 1 done before a resume
    progress.total = None
    _count_inputs([str(folder), str(tmp_path / "a.tar.gz")], None, 0, progress)
    assert progress.total is None  # no ETA rather than decompressing the archive a second time


def test_walk_is_streaming_sorted_and_survives_symlink_loops(tmp_path):
    root = tmp_path / "r"
    for rel in ["a.png", "b/x.jpg", "b/c/y.png", "b.png", "ab/z.gif", "b/skip.txt"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "b" / "loop").symlink_to(root)
    (root / "b" / "c" / "up").symlink_to(root / "b")
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "e.png").write_bytes(b"x")
    (root / "l1").symlink_to(tmp_path / "ext")  # two links to one folder outside: walked once
    (root / "l2").symlink_to(tmp_path / "ext")
    got = list(D.iter_images(root))
    assert got == sorted(got) == [root / p for p in ["a.png", "ab/z.gif", "b/c/y.png", "b/x.jpg", "b.png", "l1/e.png"]]
    assert D.list_images(root) == got
    real_stat = os.stat  # a file system without inode numbers (st_ino 0, as some FUSE ones): folders by path

    def no_inodes(path, *args, **kwargs):
        st = list(real_stat(path, *args, **kwargs))[:10]
        st[1] = 0
        return os.stat_result(st)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(D.os, "stat", no_inodes)
        assert list(D.iter_images(root)) == got
    assert [e.path for e in D.iter_entries([str(root) + "/"])] == [str(p) for p in got]


# ----------------------------------------------------------------------------------------------
# faces (no --aligned)


def test_real_photos_faces_found(model, tmp_path):
    from fakespotter.weights import sample_photo_path

    try:
        photo = sample_photo_path("obama.jpg")
        from fakespotter.faces import _import_dlib

        _import_dlib()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"needs dlib and the sample photos: {e}")
    noise = tmp_path / "noise.png"
    Image.fromarray(noise_image(3, 200, 200)).save(noise)
    photo_rec, noise_rec = scan([str(photo), str(noise)], model, batch_size=4, workers=1)
    assert photo_rec["status"] == "ok" and len(photo_rec["faces"]) >= 1
    face = photo_rec["faces"][0]
    x0, y0, x1, y1 = face["box"]
    assert 0 <= x0 < x1 <= photo_rec["width"] and 0 <= y0 < y1 <= photo_rec["height"] and x1 - x0 > 100
    assert face["detector_score"] > 0 and photo_rec["score"] == max(f["score"] for f in photo_rec["faces"])
    assert photo_rec["label"] in ("real", "fake")
    assert noise_rec["status"] == "no_face" and noise_rec["score"] is None and noise_rec["label"] is None


def test_weak_face_score_drops_weak_detections_beside_a_strong_face(model, tmp_path, capsys):
    from fakespotter.faces import WEAK_FACE_SCORE
    from fakespotter.weights import sample_photo_path

    try:
        from fakespotter.faces import _import_dlib

        _import_dlib()
        photos = [Image.open(sample_photo_path(n)).convert("RGB") for n in ("obama.jpg", "biden.jpg")]
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"needs dlib and the sample photos: {e}")
    for p in photos:
        p.thumbnail((360, 360))
    a, b = np.asarray(photos[0]), np.asarray(photos[1]).astype(float)
    b = (128 + (b - 128) * 0.14).round().astype(np.uint8)  # a low-contrast face: a weak detection
    canvas = np.zeros((max(a.shape[0], b.shape[0]), a.shape[1] + b.shape[1], 3), np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1]:] = b
    paths = [str(tmp_path / "both.png"), str(tmp_path / "weak.png")]
    Image.fromarray(canvas).save(paths[0])
    Image.fromarray(b).save(paths[1])
    run = scan(paths, model, batch_size=4, workers=0)
    both, weak = list(run)
    assert run.stats["weak_face_score"] == WEAK_FACE_SCORE and run.stats["upsample"] == 1
    run = scan(paths, model, batch_size=4, workers=0, weak_face_score=0)
    every, weak0 = list(run)
    assert run.stats["weak_face_score"] == 0
    scores = [f["detector_score"] for f in every["faces"]]
    assert len(scores) == 2 and scores[0] >= WEAK_FACE_SCORE > scores[1] > 0, "premise: strong + weak"
    assert both["faces"] == every["faces"][:1] and both["score"] == every["faces"][0]["score"]
    # alone in its image, the weak detection is kept
    assert weak["faces"] == weak0["faces"] and len(weak["faces"]) == 1 and weak["status"] == "ok"
    # a model's own settings (what it was trained and evaluated with) are a scan's defaults, as in
    # its decision_function; an option given wins
    det0 = FakeSpotter.load(model)
    det0.weak_face_score = 0
    det0.save(tmp_path / "weak0.fsm")
    det0 = FakeSpotter.load(tmp_path / "weak0.fsm")
    run = scan(paths, tmp_path / "weak0.fsm", batch_size=4, workers=0)
    same = [dict(r, model=None) for r in (every, weak0)]  # (the model field: another file's hash)
    assert [dict(r, model=None) for r in run] == same and run.stats["weak_face_score"] == 0
    assert np.allclose(det0.decision_function(paths[:1]), every["score"], rtol=0, atol=1e-6)
    (r,) = scan(paths[:1], det0, batch_size=4, workers=0, weak_face_score=WEAK_FACE_SCORE)
    assert dict(r, model=None) == dict(both, model=None)
    for extra, faces in (([], every["faces"]), (["--weak-face-score", str(WEAK_FACE_SCORE)], both["faces"])):
        out = tmp_path / f"cli{len(extra)}.jsonl"
        rc, _, _ = run_cli(["scan", paths[0], "--model", str(tmp_path / "weak0.fsm"), "--batch-size", "4",
                            "--workers", "0", "--out", str(out), "--quiet", *extra], capsys)
        assert rc == 0 and json.loads(out.read_text())["faces"] == faces
        assert json.loads((tmp_path / f"cli{len(extra)}.jsonl.stats.json").read_text())["weak_face_score"] == (
            float(extra[1]) if extra else 0)
    with pytest.raises(ValueError, match="scan: weak_face_score must be a finite number"):
        scan(paths, model, weak_face_score=float("nan"))
    rc, _, err = run_cli(["scan", paths[0], "--model", str(model), "--weak-face-score", "inf"], capsys)
    assert rc == 2 and "--weak-face-score must be a finite number, got inf" in err
    # --detect-pixels: recorded; a cap that makes the detector see a smaller copy still finds the
    # face, with its box in the image's own pixels
    from fakespotter.faces import DETECT_PIXELS

    assert run.stats["detect_pixels"] == DETECT_PIXELS
    h, w = canvas.shape[:2]
    (small,) = list(scan(paths[:1], model, batch_size=4, workers=0, detect_pixels=h * w * 2))  # x1.41, not x2
    assert len(small["faces"]) >= 1 and (small["width"], small["height"]) == (w, h)
    assert max(abs(a - b) for a, b in zip(small["faces"][0]["box"], both["faces"][0]["box"])) < 0.1 * w
    with pytest.raises(ValueError, match=r"scan: detect_pixels must be 0 \(no limit\) or a pixel count >= 65536"):
        scan(paths, model, detect_pixels=-1)
    for bad in ("-5", "2048"):  # 2048: a side length where a pixel count belongs
        rc, _, err = run_cli(["scan", paths[0], "--model", str(model), "--detect-pixels", bad], capsys)
        assert rc == 2 and "--detect-pixels must be 0 (no limit) or a pixel count >= 65536 (256x256; " in err
        assert err.rstrip().endswith(f"got {bad}")


# ----------------------------------------------------------------------------------------------
# the command line


def test_help_states_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["scan", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fakespotter scan" in out and out.count("default") >= 12
    for flag in ("--resume", "--overwrite", "--fail-fast", "--pixel-limit", "--limit", "--format", "--workers"):
        assert flag in out


def test_csv_matches_jsonl(corpus, model, tmp_path, capsys):
    common = ["scan", str(corpus), "--model", str(model), "--aligned", "--workers", "0", "--batch-size", "4"]
    rc, _, _ = run_cli(common + ["--out", str(tmp_path / "o.jsonl")], capsys)
    rc2, _, err = run_cli(common + ["--out", str(tmp_path / "o.csv")], capsys)
    assert rc == rc2 == 1, err
    rows = list(csv.DictReader(open(tmp_path / "o.csv", newline="")))
    recs = jsonl(tmp_path / "o.jsonl")
    assert len(rows) == len(recs) == 13 and list(rows[0]) == list(RECORD_FIELDS)
    for row, rec in zip(rows, recs):
        assert row["path"] == rec["path"] and row["status"] == rec["status"] and row["sha256"] == rec["sha256"]
        assert (row["score"] == "") == (rec["score"] is None)
        if rec["score"] is not None:
            assert float(row["score"]) == rec["score"] and row["label"] == rec["label"]
            assert json.loads(row["faces"]) == rec["faces"]
        assert row["error_kind"] == (rec["error_kind"] or "")
    stats = json.loads((tmp_path / "o.csv.stats.json").read_text())
    assert stats["counts"] == {"ok": 11, "no_face": 0, "error": 2} and stats["complete"] is True
    assert stats["format"] == "csv" and stats["images_per_s"] > 0
    assert {"decode_faces_s", "backbone_taps_s", "classifier_s", "wait_s", "wall_s"} <= set(stats)


def test_tar_members_in_flight_are_bounded_by_their_bytes(model, tmp_path, monkeypatch):
    """Tar members are read in the scan's process and travel with their chunk: a .tar.gz of
    250 MB zero-filled members held 4.9 GB at once. Chunks end at CHUNK_BYTES of them, and none
    is handed out while those in flight hold IN_FLIGHT_BYTES."""
    S = sys.modules["fakespotter.scan"]
    files = write_good(tmp_path / "d", 12, seed=12)
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        for f in files:
            tf.add(f, arcname=f.name)
    biggest = max(f.stat().st_size for f in files)
    monkeypatch.setattr(S, "CHUNK_BYTES", 2 * biggest)
    monkeypatch.setattr(S, "IN_FLIGHT_BYTES", 3 * biggest)
    real_pool, submits = S._pool, []

    def recording_pool(workers):
        ex = real_pool(workers)
        submit, running = ex.submit, []

        def recorded(fn, chunk, *args):
            size = sum(len(e.data) for e in chunk)
            submits.append((size, sum(n for n, f in running if not f.done())))
            fut = submit(fn, chunk, *args)
            running.append((size, fut))
            return fut

        ex.submit = recorded
        return ex

    monkeypatch.setattr(S, "_pool", recording_pool)
    records = list(scan([str(tmp_path / "t.tar")], model, aligned=True, batch_size=4, workers=1))
    assert [r["status"] for r in records] == ["ok"] * 12 and len(submits) >= 4
    assert all(size < 3 * biggest and held < 3 * biggest for size, held in submits), submits


def test_a_scan_that_ends_has_ended_its_workers(model, tmp_path, monkeypatch):
    """Its idle workers too: the pool starts them as work comes, and one still starting as a short
    scan ended failed to attach to the pool's start-up event once it was gone, with a
    traceback on stderr after the scan's output (about one short scan in three)."""
    S = sys.modules["fakespotter.scan"]
    write_good(tmp_path / "c", 3, seed=5)
    real_stop, seen = S._stop, []

    def recording_stop(ex, *args, **kwargs):
        procs = S._workers_of(ex)
        real_stop(ex, *args, **kwargs)
        seen.append((len(procs), [p for p in procs if p.is_alive()]))

    monkeypatch.setattr(S, "_stop", recording_stop)
    assert len(list(scan([str(tmp_path / "c")], model, aligned=True, batch_size=4, workers=2))) == 3
    assert len(seen) == 1 and seen[0][0] >= 1 and seen[0][1] == []


def test_leaving_the_loop_early_stops_the_workers_and_stats_count_what_was_handed_out(model, tmp_path,
                                                                                        monkeypatch):
    """Dropping a run (a `for` loop left with break) ends its decode workers at once, not at
    the next garbage collection; `with` and close() do too; stats count records handed out."""
    import time

    S = sys.modules["fakespotter.scan"]  # the package's `scan` attribute is the function
    write_good(tmp_path / "c", 30, seed=41)
    pools = []
    real_pool = S._pool

    def recording_pool(n):
        pools.append(real_pool(n))
        return pools[-1]

    monkeypatch.setattr(S, "_pool", recording_pool)

    def stopped(procs):
        deadline = time.monotonic() + 10
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not any(p.is_alive() for p in procs)

    for record in scan([str(tmp_path / "c")], model, aligned=True, batch_size=1, workers=1):
        procs = list(pools[-1]._processes.values())
        break
    assert procs and stopped(procs)
    with scan([str(tmp_path / "c")], model, aligned=True, batch_size=1, workers=1) as run:
        next(run)
        procs = list(pools[-1]._processes.values())
    assert procs and stopped(procs) and run.stats["images"] == 1
    run = scan([str(tmp_path / "c")], model, aligned=True, batch_size=8, workers=0)
    it = iter(run)
    next(it), next(it)
    assert run.stats["images"] == 2 and sum(run.stats["counts"].values()) == 2
    run.close()
    assert run.stats["images"] == 2
    run = scan([str(tmp_path / "c")], model, aligned=True, workers=0)
    run.close()  # closed before it started: nothing
    assert list(run) == [] and list(run.batches()) == []


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("delay", [0.3, 0.0])
def test_close_from_another_thread_stops_the_scan(model, tmp_path, groups, delay):
    """A cancel from a UI or watchdog thread raised "generator already executing" there (the
    loop waiting inside the run, delay 0.3), or in the loop (its next record asked for while the
    other thread closed the run, delay 0), and the scan went on to its end."""
    import threading

    write_good(tmp_path / "c", 40, seed=43)
    run = scan([str(tmp_path / "c")], model, aligned=True, batch_size=1, workers=1)
    items = run.batches() if groups else run
    got, errors = [], []

    def cancel():
        time.sleep(delay)
        try:
            run.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    closer = threading.Thread(target=cancel)
    try:
        for item in items:
            got.append(item)
            if len(got) == 3:
                closer.start()
                time.sleep(0.001)
    except BaseException as e:  # noqa: BLE001
        errors.append(e)
    closer.join()
    n = sum(len(g) for g in got) if groups else len(got)
    assert not errors and 3 <= n < 40, (errors, n)
    assert run.stats["images"] == n


def test_scan_arguments_in_any_path_form_and_no_bools_for_counts(corpus, model, monkeypatch):
    files = [str(p) for p in D.list_images(corpus / "a")]
    monkeypatch.chdir(corpus)  # ./a/x.png, relative to here, is corpus/a/x.png
    left = [r["path"] for r in scan([str(corpus / "a")], model, aligned=True, workers=0,
                                     exclude={Path(files[0]), f"./{Path(files[1]).relative_to(corpus)}",
                                              os.fsencode(files[2])})]
    assert left == files[3:]
    for name in ("workers", "limit"):
        with pytest.raises(ValueError, match=f"scan: {name} must be"):
            scan([str(corpus / "a")], model, aligned=True, **{name: True})
    as_bytes = scan([files[0]], os.fsencode(str(model)), aligned=True, workers=0)
    assert [r["model"] for r in as_bytes] == [file_sha256(model)]


def test_a_scan_run_says_what_it_is(corpus, model):
    run = scan([str(corpus / "a")], model, aligned=True, batch_size=4, workers=0)
    assert repr(run).startswith(f"ScanRun(model={file_sha256(model)[:12]}..., device='cpu', workers=0, batch_size=4")
    assert "images=0" in repr(run)
    list(run)
    assert "images=7, counts={'ok': 7, 'no_face': 0, 'error': 0}" in repr(run)


def test_stdout_summary_and_exit_codes(corpus, model, tmp_path, capsys):
    good = corpus / "a"
    rc, out, err = run_cli(["scan", str(good), "--model", str(model), "--aligned", "--workers", "0",
                            "--batch-size", "4"], capsys)
    assert rc == 0
    recs = [json.loads(line) for line in out.splitlines()]
    assert len(recs) == 7 and all(r["status"] == "ok" for r in recs)
    assert "ok" in err and "images/s" in err and "real" in err and "fake" in err
    rows = [line.split() for line in err.splitlines()[:6]]  # the labels follow the ok line they break down
    assert [r[0] for r in rows] == ["status", "ok", "real", "fake", "no_face", "error"]
    assert int(rows[2][1]) + int(rows[3][1]) == int(rows[1][1]) == 7
    rc, out, err = run_cli(["scan", str(corpus / "b"), "--model", str(model), "--aligned", "--workers", "0",
                            "--out", "-", "--quiet"], capsys)
    assert rc == 1 and err == "" and len(out.splitlines()) == 6
    # --fail-fast stops after the group holding the first error
    rc, out, err = run_cli(["scan", str(corpus / "b"), "--model", str(model), "--aligned", "--workers", "0",
                            "--batch-size", "1", "--fail-fast"], capsys)
    assert rc == 1 and json.loads(out.splitlines()[-1])["status"] == "error" and len(out.splitlines()) < 6
    # --limit and --pixel-limit
    rc, out, _ = run_cli(["scan", str(good), "--model", str(model), "--aligned", "--workers", "0", "--limit", "2",
                          "--pixel-limit", "500"], capsys)
    recs = [json.loads(line) for line in out.splitlines()]
    assert rc == 1 and [r["error_kind"] for r in recs] == ["too_many_pixels"] * 2


def test_a_stderr_whose_reader_left_does_not_stop_the_scan(corpus, model, tmp_path):
    """`2>&1 | tee log` whose reader died: progress, notices and the summary are dropped, the
    scan goes on to the end and its exit code still says whether inputs failed."""
    listing = [str(p) for p in D.list_images(corpus)]
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("\n".join(listing[1:3]) + "\n")
    second.write_text("\n".join(listing) + "\n")  # not how the output begins: a notice on stderr
    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, "-m", "fakespotter", "scan", "--model", str(model), "--aligned", "--workers", "0",
           "--batch-size", "2", "--out", str(out)]
    assert subprocess.run(cmd + [f"@{first}", "--quiet"], capture_output=True).returncode == 0
    p = subprocess.Popen(cmd + [f"@{second}", "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stderr.close()
    assert p.wait(timeout=300) == 1  # broken.png and empty.jpg are error records
    assert p.stdout.read() == b""
    assert sorted(r["path"] for r in jsonl(out)) == sorted(listing)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_pillows_log_lines_stay_off_stderr(model, tmp_path, workers):
    """Pillow logs some refusals as errors ("More samples per pixel than can be decoded: 2048"),
    naming no file: with no logging set up, Python printed them on stderr, through --quiet. The
    record says what was wrong."""
    import struct

    out = io.BytesIO()
    Image.fromarray(noise_image(3, 20, 20)).save(out, "TIFF")
    data = bytearray(out.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, at)[0] == 277:  # SamplesPerPixel
            struct.pack_into("<H", data, at + 8, 2048)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "spp.tif").write_bytes(bytes(data))
    run = subprocess.run([sys.executable, "-m", "fakespotter", "scan", str(tmp_path / "d"), "--model", str(model),
                          "--aligned", "--workers", workers, "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr == "", run.stderr
    assert json.loads(run.stdout)["error_kind"] == "decode_error"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_records_on_stdout_whose_reader_left_end_the_scan_quietly(corpus, model, fmt):
    """`scan ... | head`: the scan stops with exit 0 and nothing on stderr, as every command
    does when its reader leaves; it said "error: writing stdout: Broken pipe" with exit 3, whose
    advice (--resume) cannot apply to stdout."""
    cmd = [sys.executable, "-m", "fakespotter", "scan", str(corpus), "--model", str(model), "--aligned", "--workers",
           "0", "--batch-size", "2", "--format", fmt, "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # the reader leaves after the first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and err == ""


def test_an_output_that_cannot_be_written_ends_with_one_line_exit_3_and_resumes(corpus, model, tmp_path):
    """Disk full / file size limit: no traceback, exit 3 (not 1, which says inputs failed), the
    records synced before stay and --resume completes the output."""
    import resource

    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, "-m", "fakespotter", "scan", str(corpus), "--model", str(model), "--aligned",
           "--workers", "0", "--batch-size", "2", "--out", str(out), "--quiet"]

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2500, resource.RLIM_INFINITY))

    run = subprocess.run(cmd, capture_output=True, preexec_fn=small_files, text=True)
    assert run.returncode == 3 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip() == (f"fakespotter scan: error: writing {out}: File too large: the records written "
                                  f"before stay; free space (or raise the file size limit) and rerun with --resume")
    stats = json.loads((tmp_path / "o.jsonl.stats.json").read_text())
    written = [json.loads(line) for line in out.read_text().splitlines()]  # the torn line was cut: all whole
    assert stats["complete"] is False and stats["images"] == sum(stats["counts"].values())
    # the stats count the lines that reached the file whole, of the group whose write failed too
    assert stats["images"] == len(written) > 0 and out.read_bytes().endswith(b"\n")
    assert stats["output_counts"] == {s: sum(r["status"] == s for r in written) for s in stats["counts"]}
    run = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr  # broken.png and empty.jpg are error records
    want = list(scan([str(corpus)], model, aligned=True, batch_size=2, workers=0))
    assert jsonl(out) == want
    with open("/dev/full", "w") as full:  # stdout on a full disk
        run = subprocess.run(cmd[:-3] + ["--quiet"], stdout=full, stderr=subprocess.PIPE, text=True)
    assert run.returncode == 3 and run.stderr == "fakespotter scan: error: writing stdout: No space left on device\n"
    run = subprocess.run(cmd[:-3] + ["--out", "/proc/none.jsonl"], capture_output=True, text=True)
    assert run.returncode == 2 and "cannot create /proc/none.jsonl: No such file or directory" in run.stderr


def test_a_csv_header_that_cannot_be_written_leaves_no_file(corpus, model, tmp_path):
    """A file size limit (a full disk) at the CSV header: exit 3 saying no record was written,
    and no empty or torn-header file left for the next run to refuse."""
    import resource

    out = tmp_path / "o.csv"
    run = subprocess.run([sys.executable, "-m", "fakespotter", "scan", str(corpus), "--model", str(model),
                          "--aligned", "--workers", "0", "--out", str(out), "--quiet"], capture_output=True, text=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (5, resource.RLIM_INFINITY)))
    assert run.returncode == 3 and run.stderr == (f"fakespotter scan: error: writing {out}: File too large: no record "
                                                  f"was written\n"), run.stderr
    assert not out.exists()
    out.write_text("an earlier output\n")  # --overwrite: emptied, then no empty file left behind either
    run = subprocess.run([sys.executable, "-m", "fakespotter", "scan", str(corpus), "--model", str(model),
                          "--aligned", "--workers", "0", "--out", str(out), "--overwrite", "--quiet"],
                         capture_output=True, text=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (5, resource.RLIM_INFINITY)))
    assert run.returncode == 3 and not out.exists(), run.stderr


def test_a_stats_file_that_cannot_be_written_is_named_not_the_records(corpus, model, tmp_path, capsys, monkeypatch):
    """Every record written, only the final stats write failing (a disk that filled up just
    then): exit 3 naming the stats file and saying the records are complete; --resume writes it."""
    S = sys.modules["fakespotter.scan"]  # (the package's `scan` is the function)

    out = tmp_path / "o.jsonl"
    real = S.write_stats

    def full_at_the_end(path, stats):
        if stats.get("complete"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, stats)

    monkeypatch.setattr(S, "write_stats", full_at_the_end)
    args = ["scan", str(corpus), "--model", str(model), "--aligned", "--workers", "0", "--out", str(out), "--quiet"]
    rc, _, err = run_cli(args, capsys)
    assert rc == 3 and err == (f"fakespotter scan: error: writing {out}.stats.json: No space left on device: every "
                               f"record is in {out}, but the stats file is not; free space and rerun with --resume "
                               f"to write it\n")
    monkeypatch.setattr(S, "write_stats", real)
    assert run_cli(args + ["--resume"], capsys)[0] == 1  # (broken.png and empty.jpg are error records)
    assert json.loads((tmp_path / "o.jsonl.stats.json").read_text())["complete"] is True
    assert jsonl(out) == list(scan([str(corpus)], model, aligned=True, workers=0))


def test_a_full_disk_that_also_stops_the_stats_file_says_so(corpus, model, tmp_path, capsys, monkeypatch):
    """The output's write fails, and then the final stats write too: the stats file still holds
    the counts of the scan's start (none), and the message says so; --resume puts it right."""
    S = sys.modules["fakespotter.scan"]

    out = tmp_path / "o.jsonl"
    real_stats, real_write = S.write_stats, S.RecordWriter.write
    calls = []

    def full(path, stats):
        calls.append(path)
        if len(calls) > 1:  # (the first is the settings, before any record)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_stats(path, stats)

    def write(self, records):
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setattr(S, "write_stats", full)
    monkeypatch.setattr(S.RecordWriter, "write", write)
    args = ["scan", str(corpus), "--model", str(model), "--aligned", "--workers", "0", "--out", str(out), "--quiet"]
    rc, _, err = run_cli(args, capsys)
    assert rc == 3 and err == (f"fakespotter scan: error: writing {out}: No space left on device: the records "
                               f"written before stay; free space (or raise the file size limit) and rerun with "
                               f"--resume (nor could {out}.stats.json be updated: its counts are those of the "
                               f"scan's start)\n")
    monkeypatch.setattr(S, "write_stats", real_stats)
    monkeypatch.setattr(S.RecordWriter, "write", real_write)
    assert run_cli(args + ["--resume"], capsys)[0] == 1
    assert json.loads((tmp_path / "o.jsonl.stats.json").read_text())["complete"] is True


def test_a_parquet_part_that_cannot_be_written_is_not_left_as_a_part(model, tmp_path):
    """A file size limit hit while a part was written: the command ended with a pyarrow
    traceback and exit 1 (its close flushed the buffered rows into the broken writer), or
    renamed the broken part into place, unreadable ("Parquet magic bytes not found"). Now:
    exit 3, the parts closed before stay, the broken one is gone, the stats count the records
    of the parts kept, and --resume completes the output."""
    import random
    import resource
    import string

    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    write_good(folder, 8)
    deep, rnd = folder / "zz", random.Random(0)
    for _ in range(4):  # records of incompressible 800-byte paths: the fifth part is the largest
        deep = deep / "".join(rnd.choice(string.ascii_letters) for _ in range(200))
    write_good(deep, 2, seed=9)
    out = tmp_path / "o.parquet"
    cmd = [sys.executable, "-m", "fakespotter", "scan", str(folder), "--model", str(model), "--aligned",
           "--workers", "0", "--batch-size", "2", "--format", "parquet", "--part-rows", "2", "--out", str(out),
           "--quiet"]
    sizes = []
    for limit in (7000, 3000):  # the fifth part fails; the first part fails
        shutil.rmtree(out, ignore_errors=True)
        run = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=lambda: resource.setrlimit(
            resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)))
        assert run.returncode == 3 and "Traceback" not in run.stderr, run.stderr
        assert "the records written before stay" in run.stderr
        kept = pq.read_table(out).to_pylist() if any(out.iterdir()) else []
        assert sorted(p.name for p in out.iterdir()) == [f"part-{i:06d}.parquet" for i in range(len(kept) // 2)]
        stats = json.loads((tmp_path / "o.parquet.stats.json").read_text())
        assert stats["images"] == len(kept) and stats["complete"] is False
        assert stats["output_counts"] == {s: sum(r["status"] == s for r in kept) for s in stats["counts"]}
        sizes.append(len(kept))
    assert sizes == [8, 0]
    run = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    want = list(scan([str(folder)], model, aligned=True, batch_size=2, workers=0))
    assert pq.read_table(out).to_pylist() == [{k: r[k] for k in pq.read_table(out).column_names} for r in want]


def test_a_signal_during_a_write_waits_for_it(corpus, model, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) during a write: the group is written whole and synced (a Parquet part
    closed), then the scan stops; before, a signal there could leave a torn line, or a part
    whose writer broke off, and stats that counted records not in the output."""
    import signal

    from fakespotter.scan import read_records

    S = sys.modules["fakespotter.scan"]
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / f"o.{fmt}"
        calls = []
        if fmt == "jsonl":
            real_write = os.write

            def cut(fd, data):
                if os.readlink(f"/proc/self/fd/{fd}") == str(out):
                    calls.append(1)
                    if len(calls) == 2:  # the second group: its first line and a bit of the next get out
                        n = real_write(fd, bytes(data)[:bytes(data).index(b"\n") + 6])
                        os.kill(os.getpid(), signal.SIGINT)
                        return n
                return real_write(fd, data)
            monkeypatch.setattr(os, "write", cut)
        else:
            real_close = S.ParquetParts._close_part

            def cut(self):  # Ctrl-C as the second part closes
                calls.append(1)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                return real_close(self)
            monkeypatch.setattr(S.ParquetParts, "_close_part", cut)
        assert main(["scan", str(corpus / "a"), "--model", str(model), "--aligned", "--workers", "0", "--batch-size",
                     "2", "--out", str(out), "--quiet"] + (["--part-rows", "2"] if fmt == "parquet" else [])) == 130
        monkeypatch.undo()
        kept = list(read_records(out, fmt))
        assert fmt == "parquet" or out.read_bytes().endswith(b"\n")  # no torn line
        stats = json.loads(Path(f"{out}.stats.json").read_text())
        assert stats["images"] == len(kept) == 4, (fmt, stats["images"], len(kept))
        assert stats["output_counts"] == {s: sum(r["status"] == s for r in kept) for s in stats["counts"]}
        assert not [p for p in out.parent.rglob(".*") if p.is_file()]  # no unfinished part


def test_a_signal_between_a_group_and_its_write_leaves_it_uncounted(corpus, model, tmp_path, monkeypatch):
    """Ctrl-C after the scan handed a group out (and counted it) but before its write began:
    the stats counted a group that was in no output. They now count what the writer wrote."""
    import signal

    from fakespotter.scan import read_records

    S = sys.modules["fakespotter.scan"]
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / f"o.{fmt}"
        real_write, calls = S.RecordWriter.write, []

        def cut(self, records):
            calls.append(1)
            if len(calls) == 2:  # the second group: the signal arrives before the write takes it
                os.kill(os.getpid(), signal.SIGINT)
            return real_write(self, records)
        monkeypatch.setattr(S.RecordWriter, "write", cut)
        assert main(["scan", str(corpus / "a"), "--model", str(model), "--aligned", "--workers", "0", "--batch-size",
                     "2", "--out", str(out), "--quiet"] + (["--part-rows", "2"] if fmt == "parquet" else [])) == 130
        monkeypatch.undo()
        kept = list(read_records(out, fmt))
        stats = json.loads(Path(f"{out}.stats.json").read_text())
        assert stats["images"] == len(kept) == 2, (fmt, stats["images"], len(kept))
        assert stats["output_counts"] == {s: sum(r["status"] == s for r in kept) for s in stats["counts"]}


def test_a_full_disk_before_the_first_record_leaves_nothing_behind(corpus, model, tmp_path, capsys, monkeypatch):
    S = sys.modules["fakespotter.scan"]  # (fakespotter.scan is also the function)
    real = S.write_stats

    def full(path, stats):
        raise OSError(28, "No space left on device")
    for name in ("o.jsonl", "o.csv", "o.parquet"):
        out = tmp_path / name
        monkeypatch.setattr(S, "write_stats", full)
        rc, _, err = run_cli(["scan", str(corpus / "a"), "--model", str(model), "--aligned", "--workers", "0",
                              "--out", str(out), "--quiet"], capsys)
        assert rc == 3 and f"cannot write {out}.stats.json: No space left on device; no record was written" in err
        assert not out.exists() and os.listdir(tmp_path) == []  # a plain rerun is not refused
        monkeypatch.setattr(S, "write_stats", real)
        rc, _, err = run_cli(["scan", str(corpus / "a"), "--model", str(model), "--aligned", "--workers", "0",
                              "--out", str(out), "--quiet"], capsys)
        assert rc == 0, err
        for p in tmp_path.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_usage_errors_exit_2_before_any_work(corpus, model, tmp_path, capsys):
    existing = tmp_path / "existing.jsonl"
    existing.write_text("keep me\n")
    (tmp_path / "notes.jsonl.stats.json").write_text("my notes\n")
    (tmp_path / "kept.jsonl").write_text("")  # an output whose stats JSON place holds something else
    (tmp_path / "kept.jsonl.stats.json").write_text('{"my": "settings"}\n')
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "nowhere" / "x.jsonl")
    bad_model = tmp_path / "bad.fsm"
    bad_model.write_bytes(b"not a model file")
    base = [str(corpus / "a"), "--aligned"]
    cases = [
        (["scan", *base, "--model", str(tmp_path / "none.fsm")], "--model .*none.fsm does not exist"),
        (["scan", *base, "--model", str(bad_model)], "--model .*bad.fsm: "),
        (["scan", str(tmp_path / "missing"), "--model", str(model)], "scan: .*missing does not exist"),
        (["scan", f"@{tmp_path / 'nolist.txt'}", "--model", str(model)], "file list .*nolist.txt does not exist"),
        (["scan", *base, "--model", str(model), "--out", str(existing)], "already exists; pass --resume .* or --overwrite"),
        (["scan", *base, "--model", str(model), "--out", str(existing), "--resume", "--overwrite"], "contradict"),
        (["scan", *base, "--model", str(model), "--resume"], "--resume needs an output file"),
        (["scan", *base, "--model", str(model), "--batch-size", "0"], "--batch-size must be from 1 to 4096"),
        (["scan", *base, "--model", str(model), "--batch-size", "100000"], r"--batch-size must be from 1 to 4096 \(a "
                                                                           r"forward holds about 2 MiB per chip"),
        (["scan", *base, "--model", str(model), "--limit", "-1"], "--limit must be >= 0"),
        (["scan", *base, "--model", str(model), "--out", str(tmp_path / "no" / "o.jsonl")], "folder .* does not exist"),
        (["scan", *base, "--model", str(model), "--device", "nonsense"], "device 'nonsense' is not a device"),
        (["scan", *base, "--model", str(model), "--out", str(tmp_path / "notes.jsonl")],
         "notes.jsonl.stats.json exists and is not a scan's stats JSON"),
        *((["scan", *base, "--model", str(model), "--out", str(tmp_path / "kept.jsonl"), flag],
           "kept.jsonl.stats.json exists and is not a scan's stats JSON") for flag in ("--resume", "--overwrite")),
        (["scan", *base, "--model", str(model), "--out", str(tmp_path / "dangling.jsonl")],
         "dangling.jsonl is a symbolic link to .*nowhere/x.jsonl, which does not exist"),
        (["scan", "@/dev/stdin", "-", "--model", str(model)], "read at most one listing from stdin"),
    ]
    import re

    for args, pattern in cases:
        rc, out, err = run_cli(args, capsys)
        assert rc == 2, (args, err)
        assert out == "" and err.startswith("fakespotter scan: error: ") and len(err.strip().splitlines()) == 1
        assert re.search(pattern, err), (pattern, err)
    assert existing.read_text() == "keep me\n" and (tmp_path / "notes.jsonl.stats.json").read_text() == "my notes\n"
    assert (tmp_path / "kept.jsonl.stats.json").read_text() == '{"my": "settings"}\n'
    assert not (tmp_path / "existing.jsonl.stats.json").exists()
    rc, _, _ = run_cli(["scan", *base, "--model", str(model), "--out", str(existing), "--overwrite",
                        "--workers", "0", "--quiet"], capsys)
    assert rc == 0 and len(jsonl(existing)) == 7


def test_more_workers_than_cpus_is_warned_about_and_the_scan_goes_on(corpus, model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.modules["fakespotter.scan"], "usable_cpus", lambda: 1)
    for workers, warned in (("2", True), ("1", False)):
        out = tmp_path / f"o{workers}.jsonl"
        rc, _, err = run_cli(["scan", str(corpus / "a"), "--aligned", "--model", str(model), "--workers", workers,
                              "--out", str(out), "--quiet"], capsys)
        assert rc == 0 and len(jsonl(out)) == 7, err
        assert ("warning: --workers 2 is more than the 1 CPU this scan may use" in err) is warned, err


def test_worker_crash_loses_no_record(corpus, model, tmp_path):
    """A worker that dies (as in a native decoder crash) costs only its own file a record of
    kind worker_crash; every other input is scanned."""
    out = tmp_path / "o.jsonl"
    env = dict(os.environ, FAKESPOTTER_SCAN_TEST_CRASH="img002.png")
    proc = subprocess.run([sys.executable, "-m", "fakespotter", "scan", str(corpus / "a"), "--model", str(model),
                           "--aligned", "--workers", "2", "--batch-size", "4", "--out", str(out), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    recs = jsonl(out)
    assert [r["path"] for r in recs] == [str(p) for p in D.list_images(corpus / "a")]
    kinds = {os.path.basename(r["path"]): r["error_kind"] for r in recs}
    assert kinds.pop("img002.png") == "worker_crash"
    assert set(kinds.values()) == {None}


def test_after_a_crash_the_files_in_flight_are_redone_by_every_worker(tmp_path):
    """The chunks in flight when a worker dies (window x 4 files: ~140 with 8 workers) were
    redone one file at a time, by one worker: minutes for large photos. Now one file per task,
    as many at once as there are workers; only the files in flight when the pool breaks again
    are redone alone, which finds the one that kills its worker."""
    files = write_good(tmp_path / "d", 16, seed=7)
    files[9].rename(files[9].with_name("img009-crash.png"))
    script = tmp_path / "crash.py"
    script.write_text(f"""
import sys
from fakespotter import data as D
import fakespotter.scan
S = sys.modules["fakespotter.scan"]  # (the package's `scan` is the function)
pools, real_pool = [], S._pool

def counting_pool(workers):  # counts the tasks a pool had in flight at once
    ex = real_pool(workers)
    submit, futures = ex.submit, []
    def counted(*args, **kw):
        fut = submit(*args, **kw)
        futures.append(fut)
        ex.most = max(getattr(ex, "most", 0), sum(not f.done() for f in futures))
        return fut
    ex.submit = counted
    pools.append(ex)
    return ex

if __name__ == "__main__":
    S._pool = counting_pool
    cfg = S._Config(aligned=True, size=150, upsample=1, pixel_limit=D.DEFAULT_PIXEL_LIMIT, weak_face_score=0.15,
                    detect_pixels=0, file_timeout=60.0)
    for e, r in S._decoded(D.iter_entries([{str(tmp_path / "d")!r}]), cfg, workers=2, chunk=4, window=4):
        print(e.path.rsplit("/", 1)[-1], r["error"] and r["error"][0], flush=True)
    print("pools", *[getattr(p, "most", 0) for p in pools], flush=True)
""")
    env = dict(os.environ, FAKESPOTTER_SCAN_TEST_CRASH="-crash.png")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert lines[:-1] == [f"{n} {'worker_crash' if 'crash' in n else None}" for n in names], proc.stdout
    # the first pool broke on the crash (a submit that found it broken may have started one more
    # for the next chunk); the next redid its chunks with both workers busy; the crash broke it
    # too, and the files then in flight were redone alone (then both workers again)
    most = [int(m) for m in lines[-1].split()[1:]]
    assert max(most[1:]) == 2 and 1 in most[2:], lines[-1]


@pytest.mark.parametrize("where", ["main", "redo"])
def test_a_pool_replaced_by_a_submit_is_not_waited_for(tmp_path, where):
    """A worker dies while the scan is busy between results (a forward; the OOM killer): the
    next submit finds the pool broken and starts a new one for the next file; the redo then
    shut that pool down waiting for its task, with no limit: for good when the file was stuck
    in a native call. Its workers are now stopped first (all its files are redone anyway)."""
    files = write_good(tmp_path / "d", 6, seed=8)
    for i in (3, 4) if where == "redo" else (1, 2):
        files[i].rename(files[i].with_name(f"img{i:03d}-hang.png"))
    if where == "redo":  # the first crash starts a redo; the kill comes during it
        files[0].rename(files[0].with_name("img000-crash.png"))
    kill_after, kw = ("img002.png", "workers=2, chunk=1, window=5") if where == "redo" else \
        ("img000.png", "workers=1, chunk=1, window=2")
    script = tmp_path / "replaced.py"
    script.write_text(f"""
import os
import signal
import sys
import time
from fakespotter import data as D
import fakespotter.scan
S = sys.modules["fakespotter.scan"]
pools, real_pool = [], S._pool

def recorded(workers):
    pools.append(real_pool(workers))
    return pools[-1]

if __name__ == "__main__":
    S._pool, S.STUCK_GRACE_S = recorded, 3.0
    cfg = S._Config(aligned=True, size=150, upsample=1, pixel_limit=D.DEFAULT_PIXEL_LIMIT, weak_face_score=0.15,
                    detect_pixels=0, file_timeout=2.0)
    for e, r in S._decoded(D.iter_entries([{str(tmp_path / "d")!r}]), cfg, {kw}):
        name = e.path.rsplit("/", 1)[-1]
        print(name, r["error"] and r["error"][0], flush=True)
        if name == {kill_after!r}:  # busy (a forward) while a worker is killed
            os.kill(next(p for p in S._workers_of(pools[-1]) if p.is_alive()).pid, signal.SIGKILL)
            time.sleep(2)
""")
    env = dict(os.environ, FAKESPOTTER_SCAN_TEST_HANG="-hang.png", FAKESPOTTER_SCAN_TEST_CRASH="-crash.png")
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the scan hung after: {e.stdout!r}") from None
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    want = {"crash": "worker_crash", "hang": "timeout"}
    assert proc.stdout.splitlines() == [f"{n} {next((k for t, k in want.items() if t in n), None)}" for n in names]


def chunk_flood_png(chunks: int) -> bytes:
    """A valid 64x64 PNG behind ``chunks`` empty IDAT chunks: Pillow reads each in Python (~5 us)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + bytes(64 * 3) for _ in range(64))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"") * chunks + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("workers", [1, 0])
def test_a_file_over_the_time_limit_gets_a_timeout_record_and_the_worker_goes_on(model, tmp_path, workers):
    folder = tmp_path / "in"
    folder.mkdir()
    write_good(folder, 3)  # img000.png ...
    (folder / "img001a.png").write_bytes(chunk_flood_png(3_000_000))  # ~10 s of Pillow's chunk loop here
    recs = list(scan([str(folder)], model, aligned=True, workers=workers, batch_size=2, file_timeout=1.0))
    kinds = {os.path.basename(r["path"]): r["error_kind"] for r in recs}
    assert kinds == {"img000.png": None, "img001.png": None, "img001a.png": "timeout", "img002.png": None}
    (slow,) = [r for r in recs if r["error_kind"]]
    assert slow["status"] == "error" and slow["score"] is None and "--file-timeout" in slow["error"]
    assert D.ERROR_KINDS["timeout"]
    # the file was read whole before its decode ran out of time: its record says which bytes it was
    data = (folder / "img001a.png").read_bytes()
    assert (slow["size"], slow["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert slow["width"] is None and slow["faces"] == []
    # a limit the file stays within changes nothing; 0 is no limit
    small = folder / "img001a.png"
    small.write_bytes(chunk_flood_png(10))
    for limit in (60, 0):
        assert all(r["status"] == "ok" for r in scan([str(folder)], model, aligned=True, workers=1, file_timeout=limit))


def test_workers_0_leaves_a_programs_own_sigalrm_alone(model, tmp_path):
    """With workers=0 the timer runs in the caller's process: only where SIGALRM is unused. A
    program's own handler and timer are kept, and its files are not timed."""
    import signal

    folder = tmp_path / "in"
    folder.mkdir()
    write_good(folder, 2)
    (folder / "img000a.png").write_bytes(chunk_flood_png(300_000))  # ~1 s
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 1000.0)
        recs = list(scan([str(folder)], model, aligned=True, workers=0, batch_size=2, file_timeout=0.01))
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 900 < left <= 1000 and signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert [r["status"] for r in recs] == ["ok"] * 3


def test_a_worker_loads_dlib_before_its_first_file_is_timed(model, tmp_path):
    """dlib's first import and model load take ~0.6 s; an alarm inside them left dlib broken
    for every later file of that worker ("initialization failed": face_detection_error)."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_good(folder, 6)
    recs = list(scan([str(folder)], model, workers=1, batch_size=2, file_timeout=0.1))
    assert len(recs) == 6 and all(r["status"] == "no_face" or r["error_kind"] == "timeout" for r in recs), \
        [(r["status"], r["error_kind"], r["error"]) for r in recs]
    assert any(r["status"] == "no_face" for r in recs)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), 1e10, "5", True])
def test_file_timeout_must_be_a_number_of_seconds(model, tmp_path, bad, capsys):
    """(1e10: more than setitimer takes, which failed the scan from the worker)"""
    with pytest.raises(ValueError, match=r"scan: file_timeout must be a number of seconds from 0 \(no limit\) to "):
        scan([str(tmp_path)], model, file_timeout=bad)
    if isinstance(bad, float) or bad == -1:
        rc, _, err = run_cli(["scan", str(tmp_path), "--model", str(model), "--file-timeout", str(bad)], capsys)
        assert rc == 2 and "--file-timeout must be a number of seconds from 0 (no limit) to 1e+06" in err, err


def test_the_per_file_alarm_never_escapes_nor_outlives_a_file(tmp_path, monkeypatch):
    """Whenever the alarm fires - before the file is read, during it, as it ends - the result is
    a record, and no handler or timer is left behind."""
    import signal

    S = sys.modules["fakespotter.scan"]
    path = tmp_path / "a.png"
    Image.fromarray(noise_image(1, 32, 32)).save(path)
    entry = D.Entry(str(path), file=str(path))
    before = signal.getsignal(signal.SIGALRM)
    kinds = set()
    for limit in (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3) * 50:
        cfg = S._Config(True, 150, 1, D.DEFAULT_PIXEL_LIMIT, 0.0, 0, limit)
        error = S._decode_timed(entry, cfg)["error"]
        kinds.add(error[0] if error else "ok")
        assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert kinds <= {"ok", "timeout"} and "timeout" in kinds


def test_a_script_without_a_main_guard_gets_a_clear_error_not_crash_records(corpus, model, tmp_path):
    """Workers import the main script as they start; one that calls scan() at its top level runs
    it again there and dies. That is no file's fault: the scan raises WorkerStartError saying
    what to do, instead of writing a worker_crash record for every input."""
    script = tmp_path / "noguard.py"
    script.write_text("import fakespotter\n"
                      f"for r in fakespotter.scan([{str(corpus / 'a')!r}], {str(model)!r}, aligned=True, workers=1):\n"
                      "    print('RECORD', r['status'], r['error_kind'])\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1 and "RECORD" not in proc.stdout, (proc.stdout, proc.stderr)
    # the traceback's last line (multiprocessing's resource tracker may warn after it as it cleans
    # up at exit: seen once in CI, under load)
    last = [line for line in proc.stderr.splitlines() if not line.startswith(" ") and "resource_tracker" not in line][-1]
    assert last.startswith("fakespotter.scan.WorkerStartError: scan: the decode worker processes died while starting")
    assert str(script) in last and 'if __name__ == "__main__":' in last and "workers=0" in last


@pytest.mark.parametrize("poll", [1.0, None], ids=["scan", "no-poll"])
def test_a_worker_stuck_in_a_native_call_is_stopped_and_its_file_gets_a_timeout(tmp_path, poll):
    """A file whose worker never comes back (a native call deaf to the alarm: SIGALRM blocked
    and a sleep, as FAKESPOTTER_SCAN_TEST_HANG does) held the scan for good. The worker is
    stopped once its chunk is past its files' limits and STUCK_GRACE_S; the other files of the
    chunks in flight are redone, and the stuck file alone gets a timeout record."""
    files = write_good(tmp_path / "d", 5, seed=6)
    files[1].rename(files[1].with_name("img001-hang.png"))
    script = tmp_path / "stuck.py"
    script.write_text(f"""
import sys
import time
from fakespotter import data as D
import fakespotter.scan
S = sys.modules["fakespotter.scan"]  # (the package's `scan` is the function)
if __name__ == "__main__":
    S.STUCK_GRACE_S = 3.0
    cfg = S._Config(aligned=True, size=150, upsample=1, pixel_limit=D.DEFAULT_PIXEL_LIMIT, weak_face_score=0.15,
                    detect_pixels=0, file_timeout=0.5)
    t0 = time.monotonic()
    for item in S._decoded(D.iter_entries([{str(tmp_path / "d")!r}]), cfg, workers=2, chunk=2, window=3,
                           poll={poll!r}):
        if item is not None:  # (None: a poll's second without a result)
            e, r = item
            print(e.path.rsplit("/", 1)[-1], r["error"] and r["error"][0], flush=True)
    print("seconds", round(time.monotonic() - t0), flush=True)
""")
    env = dict(os.environ, FAKESPOTTER_SCAN_TEST_HANG="-hang.png")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:5] == ["img000.png None", "img001-hang.png timeout", "img002.png None", "img003.png None",
                         "img004.png None"], proc.stdout
    assert int(lines[5].split()[1]) < 60  # two waits of about 4 s, and fresh pools


@pytest.mark.parametrize("how", ["kill", "abandon"])
def test_a_worker_that_dies_while_writing_a_result_breaks_the_pool_instead_of_hanging_it(how):
    """The pool's manager thread waited for the rest of the message for good: this process held
    the last write end of the result pipe. So a future of the watchdog's killed pool never
    ended (a scan with a stuck file and another worker sending a result hung), and the exit of a
    scan stopped by Ctrl-C, SIGTERM or a caller that stopped reading waited for that thread."""
    from concurrent.futures.process import BrokenProcessPool

    from scan_helpers import die_while_writing_a_result

    S = sys.modules["fakespotter.scan"]
    ex = S._pool(1)
    try:
        assert ex.submit(os.getpid).result(timeout=120) != os.getpid()
        fut = ex.submit(die_while_writing_a_result)
        manager = ex._executor_manager_thread
        deadline = time.monotonic() + 5
        while not fut.done() and manager.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker dies; the manager waits inside the message
        if how == "kill":
            S._kill_workers(ex)  # what the watchdog does
            with pytest.raises(BrokenProcessPool):
                fut.result(timeout=30)
        else:
            S._stop(ex)  # what an interrupted or closed scan does
        manager.join(timeout=30)
        assert not manager.is_alive()
    finally:
        S._stop(ex)


@pytest.mark.parametrize("limit", [None, 600.0])
def test_a_worker_killed_while_writing_a_result_is_noticed_without_the_limit(limit):
    """A worker the OOM killer (or a kill -9) ends while it writes a result leaves the pool's
    manager waiting inside the message, the pool never broken: the wait for its chunk held the
    scan for good with file_timeout=0, and until the limit of all its files (here 10 min)
    otherwise. The wait now stops the pool a few seconds after it sees a dead worker."""
    from concurrent.futures.process import BrokenProcessPool

    from scan_helpers import die_while_writing_a_result

    S = sys.modules["fakespotter.scan"]
    ex = S._pool(2)
    try:
        assert ex.submit(os.getpid).result(timeout=120) != os.getpid()
        other = ex.submit(time.sleep, 600)  # a healthy worker busy with its chunk: stopped too
        fut = ex.submit(die_while_writing_a_result)
        t0 = time.monotonic()
        waiting, polls = S._wait(fut, ex, limit, poll=0.5), 0
        while True:
            try:
                next(waiting)
                polls += 1
            except StopIteration as end:
                assert end.value == "dead"
                break
        waited = time.monotonic() - t0
        with pytest.raises(BrokenProcessPool):
            fut.result(timeout=30)
        with pytest.raises(BrokenProcessPool):
            other.result(timeout=30)
        assert waited < 120, waited  # (not a speed claim: without the check it waits for good, or 600 s)
        assert polls >= int(S.DEAD_WORKER_GRACE_S / 0.5) - 1  # the caller still got its polls
    finally:
        S._stop(ex)


def test_a_file_that_finishes_within_the_margin_is_not_stopped(model, tmp_path):
    """The margin is not a limit of its own: a worker whose alarm does its work is never stopped."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_good(folder, 3)
    (folder / "img001a.png").write_bytes(chunk_flood_png(3_000_000))  # ~10 s unless stopped
    scan_mod = sys.modules["fakespotter.scan"]
    old = scan_mod.STUCK_GRACE_S
    scan_mod.STUCK_GRACE_S = 5.0
    try:
        recs = list(scan([str(folder)], model, aligned=True, workers=1, batch_size=2, file_timeout=1.0))
    finally:
        scan_mod.STUCK_GRACE_S = old
    slow = [r for r in recs if r["error_kind"]]
    assert [r["error_kind"] for r in slow] == ["timeout"] and "the per-file time limit" in slow[0]["error"]
    assert "worker was stopped" not in slow[0]["error"]


def test_a_crash_found_by_the_next_submit_is_still_a_worker_crash(tmp_path):
    """A worker dies on a chunk while the scan is busy with the one before; the next submit
    finds the pool broken and starts a new one. The dead pool's chunk is then a worker_crash
    of its file, not a WorkerStartError judged on the new pool (whose workers have not started)."""
    files = write_good(tmp_path / "d", 4, seed=5)
    crash = files[1].with_name("img001-crash.png")
    files[1].rename(crash)
    script = tmp_path / "slow_consumer.py"
    script.write_text(f"""
import time
from fakespotter import data as D
from fakespotter.scan import _Config, _decoded
if __name__ == "__main__":
    cfg = _Config(aligned=True, size=150, upsample=1, pixel_limit=D.DEFAULT_PIXEL_LIMIT, weak_face_score=0.15,
                  detect_pixels=0)
    for i, (e, r) in enumerate(_decoded(D.iter_entries([{str(tmp_path / "d")!r}]), cfg, workers=1, chunk=1,
                                        window=2)):
        print(e.path.rsplit("/", 1)[-1], r["error"] and r["error"][0], flush=True)
        if i == 0:
            time.sleep(3)  # meanwhile the worker dies on the next chunk
""")
    env = dict(os.environ, FAKESPOTTER_SCAN_TEST_CRASH="-crash.png")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:4] == ["img000.png None", "img001-crash.png worker_crash", "img002.png None",
                                           "img003.png None"]


def test_workers_that_cannot_start_end_the_cli_scan_with_one_error_line(corpus, model, tmp_path):
    out = tmp_path / "o.jsonl"
    env = dict(os.environ, FAKESPOTTER_SCAN_TEST_CRASH=":start:")
    proc = subprocess.run([sys.executable, "-m", "fakespotter", "scan", str(corpus / "a"), "--model", str(model),
                           "--aligned", "--workers", "2", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("fakespotter scan: error: the decode worker processes died while starting")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().endswith(f"Rerun with --resume: {out} is kept, with what was written.")
    assert out.read_text() == "" and json.loads((tmp_path / "o.jsonl.stats.json").read_text())["complete"] is False


def test_decode_results_are_polled_while_the_workers_are_slow(corpus):
    """_decoded(poll=...) yields None after each poll interval with no result ready (a worker
    pool takes longer than 1 ms to start), and still every entry, in order."""
    from fakespotter.scan import _Config, _decoded

    cfg = _Config(aligned=True, size=150, upsample=1, pixel_limit=D.DEFAULT_PIXEL_LIMIT, weak_face_score=0.15,
                  detect_pixels=0)
    got = list(_decoded(D.iter_entries([str(corpus / "a")]), cfg, workers=1, chunk=4, window=2, poll=0.001))
    assert None in got
    assert [e.path for e, _ in filter(None, got)] == [str(p) for p in D.list_images(corpus / "a")]


def test_faces_that_wait_too_long_are_scored_in_a_partial_batch_with_the_same_scores(corpus, det, monkeypatch):
    """Faces that waited STALL_FLUSH_S for a full batch (slow, large photos) are scored and
    their records given out, zero-padded to the batch size as always: the same records, sooner."""
    import time

    S = sys.modules["fakespotter.scan"]  # the package's `scan` attribute is the function
    want = list(S.scan([str(corpus / "a")], det, aligned=True, workers=0))
    real = S._decoded

    def slow(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            yield item
            if i == 1:  # the third image is slow to decode
                time.sleep(1.2)
                yield None
    monkeypatch.setattr(S, "STALL_FLUSH_S", 1.0)
    monkeypatch.setattr(S, "_decoded", slow)
    groups = list(S.scan([str(corpus / "a")], det, aligned=True, workers=0, batch_size=64).batches())
    assert [len(g) for g in groups] == [2, len(want) - 2]
    assert [r for g in groups for r in g] == want


def test_decode_pool_kept_between_calls_and_replaced_when_it_died_idle(tmp_path):
    """scan._decoded(keep=...) (the Ray decode tasks' pool): the same worker serves the next
    call; one that died while idle is replaced without losing or failing an entry."""
    import signal
    import time

    from fakespotter.scan import _Config, _decoded

    files = write_good(tmp_path / "d", 4, seed=3)
    cfg = _Config(aligned=True, size=150, upsample=1, pixel_limit=D.DEFAULT_PIXEL_LIMIT, weak_face_score=0.15,
                  detect_pixels=0)

    def run(keep):
        return [(e.path, r["error"], r["sha256"]) for e, r in _decoded(D.iter_entries([str(tmp_path / "d")]), cfg,
                                                                       workers=1, chunk=2, window=1, keep=keep)]

    want = run(None)
    assert [w[0] for w in want] == [str(f) for f in files] and all(w[1] is None and w[2] for w in want)
    keep = {}
    assert run(keep) == want
    pool = keep["pool"]
    assert run(keep) == want and keep["pool"] is pool
    for pid in list(pool._processes):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert run(keep) == want and keep["pool"] is not pool
    keep["pool"].shutdown()


def test_summary_notes_the_default_models_limits_only_for_the_default(tmp_path):
    from fakespotter.cli.scan import DEFAULT_MODEL_NOTE, summary
    from fakespotter.detector import default_model_path
    from fakespotter.scan import new_stats

    stats = new_stats()
    assert summary(stats, 0, str(default_model_path())).endswith(DEFAULT_MODEL_NOTE)
    other = tmp_path / "mine.fsm"
    other.write_bytes(default_model_path().read_bytes())  # same bytes, another file: the user's own
    assert DEFAULT_MODEL_NOTE not in summary(stats, 0, str(other))
    assert DEFAULT_MODEL_NOTE not in summary(stats, 0)
    assert "compiling" not in summary(stats, 0)
    stats.update(images=10, wall_s=2.0, images_per_s=5.0, compile_s=41.6)
    assert "10 images in 2.0 s, 5.0 images/s, after 42 s of compiling" in summary(stats, 0)


def test_an_abandoned_pool_ends_its_running_workers():
    """After Ctrl-C / SIGTERM (or a caller that stops iterating) the chunks in flight are not
    waited for: their workers are ended, else the interpreter's exit waited for them (minutes
    with large images)."""
    import time

    from fakespotter.scan import _pool, _stop

    ex = _pool(1)
    ex.submit(time.sleep, 600)  # a chunk that would take ten minutes
    while not ex._processes:  # the worker has started
        time.sleep(0.05)
    (worker,) = ex._processes.values()
    _stop(ex)
    worker.join(30)
    assert not worker.is_alive() and worker.exitcode is not None


def test_folder_scans_list_every_common_photo_extension(model, tmp_path, monkeypatch):
    """JPEG under .jfif / .jpe / .mpo / any case, PBM, PNM and PFM, APNG, AVIF, and HEIC (which Pillow cannot decode without
    pillow-heif: a record that says so, not a file silently left out of a phone's photos; test_heif has it installed)."""
    import io as _io

    from scan_helpers import forget_heif_opener

    forget_heif_opener(monkeypatch, importable=False)
    from fakespotter.data import _open_formats

    folder = tmp_path / "photos"
    folder.mkdir()
    img = Image.fromarray(noise_image(1, 64, 64))
    jpeg = _io.BytesIO()
    img.save(jpeg, "JPEG")
    for name in ("a.JPG", "b.jfif", "c.jpe", "d.Jpeg"):
        (folder / name).write_bytes(jpeg.getvalue())
    if "AVIF" in _open_formats():
        img.save(folder / "e.avif", "AVIF")
    (folder / "f.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    (folder / "g.mpo").write_bytes(jpeg.getvalue())
    img.convert("1").save(folder / "h.pbm", "PPM")
    img.save(folder / "i.pnm", "PPM")
    img.save(folder / "j.apng", "PNG", save_all=True, append_images=[img])  # animated PNG: the first frame
    img.convert("F").save(folder / "k.pfm", "PPM")  # float grey (Pillow writes PFM for mode F)
    (folder / "notes.txt").write_text("not listed")
    records = {os.path.basename(r["path"]): r for r in scan([str(folder)], model, workers=0, aligned=True)}
    want = ({"a.JPG", "b.jfif", "c.jpe", "d.Jpeg", "f.heic", "g.mpo", "h.pbm", "i.pnm", "j.apng", "k.pfm"}
            | ({"e.avif"} if "AVIF" in _open_formats() else set()))
    assert set(records) == want
    assert all(records[n]["status"] == "ok" for n in want - {"f.heic"})
    heic = records["f.heic"]
    assert heic["status"] == "error" and heic["error_kind"] == "not_an_image" and "HEIF image" in heic["error"]


def test_progress_is_a_plain_line_now_and_then_when_stderr_is_not_a_terminal(corpus, model, tmp_path, capsys,
                                                                            monkeypatch):
    """In a log file or batch job there is no bar to redraw: a line every PROGRESS_EVERY_S
    seconds (0 here: one per group of records) with the count, the total and ETA once the
    inputs are counted beside the scan, and the rate; --quiet silences it."""
    import re

    from fakespotter.cli import _common

    monkeypatch.setattr(_common, "PROGRESS_EVERY_S", 0.0)
    base = ["scan", str(corpus / "a"), "--model", str(model), "--aligned", "--workers", "0", "--batch-size", "2"]
    rc, _, err = run_cli([*base, "--out", str(tmp_path / "a.jsonl")], capsys)
    assert rc == 0 and "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("scan: ")]
    found = [re.fullmatch(r"scan: (\d+)(/7)? in 0:\d\d, [\d.]+/s( ETA \d+:\d\d)?", line) for line in lines]
    assert [int(m.group(1)) for m in found] == [2, 4, 6, 7]
    assert found[-1].group(2) == "/7"  # (counting 7 files takes far less than three batches)
    rc, _, err = run_cli([*base, "--out", str(tmp_path / "b.jsonl"), "--quiet"], capsys)
    assert rc == 0 and err == ""


def test_a_record_writer_counts_what_it_wrote(corpus, model, tmp_path):
    """``written``: a file's lines written whole; none of a stream's group that failed (what
    reached it is not known); after a failure nothing more is written."""
    from fakespotter.scan import RecordWriter

    records = list(scan([str(corpus / "a")], model, aligned=True, workers=0))

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")
    writer = RecordWriter(Full(), "jsonl")
    with pytest.raises(OSError):
        writer.write(records[:3])
    assert writer.written["images"] == 0 and sum(writer.written["counts"].values()) == 0
    with pytest.raises(RuntimeError, match="an earlier write failed"):
        writer.write(records[3:])
    out = tmp_path / "o.jsonl"
    writer = RecordWriter(out, "jsonl")
    writer.write(records[:2])
    writer.close()
    assert writer.written["images"] == 2 and len(out.read_text().splitlines()) == 2
    want = {s: sum(r["status"] == s for r in records[:2]) for s in ("ok", "no_face", "error")}
    assert writer.written["counts"] == want


def test_a_record_takes_its_most_suspicious_face_and_a_tie_with_the_threshold_is_real():
    """label: fake when score > threshold (as ``FakeSpotter.predict`` decides), so a score equal
    to the threshold is real; score: the highest face's; a non-finite logit is an error record."""
    from fakespotter.scan import make_record

    res = {"path": "p.jpg", "size": 1, "sha256": "0" * 64, "width": 9, "height": 9, "frames": 1, "error": None,
           "faces": [([0, 0, 4, 4], 1.0), ([4, 4, 8, 8], 0.5)]}
    rec = make_record(res, [0.25, -1.0], 0.25, "m")
    assert (rec["status"], rec["score"], rec["label"]) == ("ok", 0.25, "real")
    assert [f["score"] for f in rec["faces"]] == [0.25, -1.0]
    assert make_record(res, [-3.0, 0.2500001], 0.25, "m")["label"] == "fake"
    bad = make_record(res, [0.1, float("nan")], 0.25, "m")
    assert (bad["status"], bad["error_kind"], bad["faces"], bad["label"]) == ("error", "internal_error", [], None)
    none = make_record(dict(res, faces=[]), [], 0.25, "m")
    assert (none["status"], none["score"], none["label"]) == ("no_face", None, None)
