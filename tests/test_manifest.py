"""The benchmark manifest: round trip, determinism and every check of the reader."""

import csv
import dataclasses
import hashlib
import io

import pytest

from fakespotter.manifest import (COLUMNS, MANIFEST_NAME, Manifest, ManifestError, ManifestRow, file_sha256,
                                  manifest_text, params_json, read_manifest, verify_files, write_manifest)


def _row(file, label="real", split="train", group=None, **kw):
    data = f"content of {file}".encode()
    base = dict(file=file, sha256=hashlib.sha256(data).hexdigest(), label=label,
                fake_type="entire_synthesis" if label == "fake" else "", generator="dcgan" if label == "fake" else "",
                source="pypi:x==1", group=group or file, split=split, licence="MIT", params=params_json({"seed": 1}))
    base.update(kw)
    return ManifestRow(**base)


@pytest.fixture
def dataset(tmp_path):
    rows = [_row("real/a.jpg"), _row("real/b.jpg", split="test"), _row("fake/c.jpg", "fake", split="val"),
            _row("fake/d.jpg", "fake", group="g", fake_type="identity_swap", generator="identity_swap"),
            _row("fake/e.jpg", "fake", group="g", fake_type="expression", generator="warp")]
    for r in rows:
        (tmp_path / r.file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r.file).write_bytes(f"content of {r.file}".encode())
    write_manifest(rows, tmp_path)
    return tmp_path, rows


def test_round_trip_sorted_and_deterministic(dataset):
    root, rows = dataset
    m = read_manifest(root)
    assert [r.file for r in m.rows] == sorted(r.file for r in rows)
    assert set(m.rows) == set(rows)
    assert (root / MANIFEST_NAME).read_text() == manifest_text(reversed(rows))
    assert (root / MANIFEST_NAME).read_text().splitlines()[0] == ",".join(COLUMNS)
    assert all(file_sha256(m.path(r)) == r.sha256 for r in m.rows)
    assert m.rows[0].params_dict == {"seed": 1}


def test_select(dataset):
    root, _ = dataset
    m = read_manifest(root)
    assert {r.file for r in m.select(splits="train").rows} == {"real/a.jpg", "fake/d.jpg", "fake/e.jpg"}
    assert m.select(splits=["test"]).labels() == [0]
    assert {r.file for r in m.select(fake_types=["expression"]).rows} == {"real/a.jpg", "real/b.jpg", "fake/e.jpg"}
    assert len(read_manifest(root / MANIFEST_NAME, splits=["val", "test"])) == 2
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        m.select(splits="dev")


def test_missing_files_refused_before_work(dataset):
    root, _ = dataset
    (root / "fake/c.jpg").unlink()
    with pytest.raises(ManifestError, match=r"1 of 5 listed files are missing .*fake/c\.jpg"):
        read_manifest(root)
    assert len(read_manifest(root, splits=["train"])) == 3  # the missing file is not in the selection
    assert len(read_manifest(root, check_files=False)) == 5


def test_no_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest at .*fakespotter data build"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(file="/abs.jpg"), "column 'file': must be a relative"),
    (dict(file="../up.jpg"), "column 'file'"),
    (dict(sha256="XYZ"), "column 'sha256'"),
    (dict(label="maybe"), "column 'label': must be one of real, fake, got 'maybe'"),
    (dict(fake_type="identity_swap"), "a real image has no fake_type"),
    (dict(split="dev"), "column 'split'"),
    (dict(group=""), "column 'group'"),
    (dict(params="[1]"), "column 'params': must be a JSON object"),
    (dict(params="{"), "column 'params': is not JSON"),
])
def test_bad_rows_name_row_and_column(tmp_path, change, match):
    rows = [_row("a.jpg"), dataclasses.replace(_row("b.jpg"), **change)]
    with pytest.raises(ManifestError, match=match):
        write_manifest(rows, tmp_path)
    good = manifest_text([_row("a.jpg")])
    bad = dataclasses.asdict(_row("b.jpg")) | change
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([bad[c] for c in COLUMNS])
    (tmp_path / MANIFEST_NAME).write_text(good + buf.getvalue())
    with pytest.raises(ManifestError, match="manifest.csv line 3"):
        read_manifest(tmp_path, check_files=False)
    (tmp_path / MANIFEST_NAME).write_text(good + "\n\n" + buf.getvalue())  # the file's line, blank ones too
    with pytest.raises(ManifestError, match="manifest.csv line 5"):
        read_manifest(tmp_path, check_files=False)


def test_fake_needs_a_type_and_groups_stay_in_one_split(tmp_path):
    with pytest.raises(ManifestError, match="column 'fake_type': must be one of entire_synthesis"):
        write_manifest([_row("a.jpg", "fake", fake_type="")], tmp_path)
    for call, name in ((lambda rows: write_manifest(rows, tmp_path), "write_manifest"), (manifest_text, "manifest_text")):
        with pytest.raises(ManifestError, match=rf"^{name} row 2, column 'fake_type'"):  # (the function called)
            call([_row("a.jpg", "fake", fake_type="")])
    with pytest.raises(ManifestError, match="group 'p' is in both 'train' and 'test'"):
        write_manifest([_row("a.jpg", group="p"), _row("b.jpg", group="p", split="test")], tmp_path)
    with pytest.raises(ManifestError, match="'a.jpg' is also on row 2"):
        write_manifest([_row("a.jpg"), _row("a.jpg")], tmp_path)



@pytest.mark.parametrize("other", ["./fake/a.jpg", "fake//a.jpg", "fake/./a.jpg"])
def test_one_image_twice_is_refused_whatever_the_spelling(tmp_path, other):
    """Another spelling of a listed file, or another file with the same bytes (its sha256),
    would count one image twice, or in two classes or splits."""
    first = _row("fake/a.jpg", "fake")
    with pytest.raises(ManifestError, match=r"row 3, column 'file': '(\./)?fake/(/|\./)?a\.jpg' is also on row 2"):
        write_manifest([first, dataclasses.replace(first, file=other, label="real", fake_type="", generator="")],
                       tmp_path)
    copy = _row("real/copy.jpg", split="test", sha256=first.sha256)
    with pytest.raises(ManifestError, match=r"row 3, column 'sha256': the same bytes as row 2 \('fake/a.jpg'\)"):
        write_manifest([first, copy], tmp_path)


def test_bad_header_and_width(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("file,label\na.jpg,real\n")
    with pytest.raises(ManifestError, match="header must be file,sha256"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(",".join(COLUMNS) + "\na.jpg,real\n")
    with pytest.raises(ManifestError, match="line 2: 2 columns, expected 10"):
        read_manifest(tmp_path)


def test_a_bom_and_blank_lines_are_read_and_bad_bytes_name_the_line(dataset):
    """Manifests edited by hand: a BOM (spreadsheets, Notepad) and a trailing blank line are
    fine; bytes that are not UTF-8 and an unbalanced quote name the line, as ManifestError."""
    root, rows = dataset
    path = root / MANIFEST_NAME
    text, want = path.read_bytes(), read_manifest(root).rows
    path.write_bytes(b"\xef\xbb\xbf" + text + b"\r\n\n")
    assert read_manifest(root).rows == want
    lines = text.split(b"\n")
    assert lines[4].startswith(b"real/a.jpg,")
    path.write_bytes(b"\n".join(lines[:4] + [lines[4].replace(b"real", b"r\xe9al", 1)] + lines[5:]))
    with pytest.raises(ManifestError, match=r"manifest.csv line 5: not UTF-8 \(byte 0xe9\)"):
        read_manifest(root)
    assert lines[-1] == b""
    path.write_bytes(b"\n".join(lines[:-2] + [b'"' + lines[-2] + b"x" * 200_000]))  # no closing quote
    with pytest.raises(ManifestError, match=r"manifest.csv line \d+: not valid CSV"):
        read_manifest(root)


# Tests from a mutation audit of manifest.py: each fails on a one-line change that no test caught.
@pytest.mark.parametrize("change, match", [
    (dict(file=""), "column 'file': must be a relative"),                       # m01
    (dict(file="a\\b.jpg"), "column 'file': must be a relative"),               # m03
    (dict(sha256="ab" * 31), "column 'sha256': must be 64 lowercase hex"),      # m05
    (dict(sha256="AB" * 32), "column 'sha256': must be 64 lowercase hex"),      # m06
    (dict(generator="dcgan"), "a real image has no fake_type or generator"),    # m07
])
def test_more_bad_rows(tmp_path, change, match):
    with pytest.raises(ManifestError, match=match):
        write_manifest([_row("a.jpg"), dataclasses.replace(_row("b.jpg"), **change)], tmp_path)


def test_a_header_with_the_columns_in_another_order_is_refused(tmp_path):
    """m21 (only the header's length checked)."""
    cols = list(COLUMNS)
    cols[1], cols[2] = cols[2], cols[1]
    (tmp_path / MANIFEST_NAME).write_text(",".join(cols) + "\n")
    with pytest.raises(ManifestError, match="header must be file,sha256"):
        read_manifest(tmp_path)


def test_a_folder_in_place_of_a_listed_file_is_missing(tmp_path):
    """m27 (is_file -> exists)."""
    r = _row("a.jpg")
    write_manifest([r], tmp_path)
    (tmp_path / "a.jpg").mkdir()
    with pytest.raises(ManifestError, match=r"1 of 1 listed files are missing .*\(a\.jpg\)"):
        read_manifest(tmp_path)


def test_missing_files_show_three_then_dots(tmp_path):
    """m28 (> 3 -> > 2), m29 (three shown -> two)."""
    rows = [_row(f"{c}.jpg") for c in "abcd"]
    write_manifest(rows[:3], tmp_path)
    with pytest.raises(ManifestError, match=r"3 of 3 listed files are missing .*\(a\.jpg, b\.jpg, c\.jpg\)$"):
        read_manifest(tmp_path)
    write_manifest(rows, tmp_path)
    with pytest.raises(ManifestError, match=r"4 of 4 listed files are missing .*\(a\.jpg, b\.jpg, c\.jpg, \.\.\.\)$"):
        read_manifest(tmp_path)


def test_a_folder_named_manifest_csv_is_no_manifest(tmp_path):
    """m35 (is_file -> exists): a folder manifest.csv inside the data set folder."""
    (tmp_path / MANIFEST_NAME).mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest at"):
        read_manifest(tmp_path)


def test_verify_files(tmp_path):
    """m32 (!= -> ==), m33 (unreadable files reported as bad): verify_files had no test."""
    rows = [_row("a.jpg"), _row("b.jpg"), _row("c.jpg")]
    for r in rows:
        (tmp_path / r.file).write_bytes(f"content of {r.file}".encode())
    (tmp_path / "b.jpg").write_bytes(b"changed")
    (tmp_path / "c.jpg").unlink()
    bad, unreadable = verify_files(Manifest(tmp_path, tuple(rows)))
    assert bad == ["b.jpg"]
    assert [f for f, _ in unreadable] == ["c.jpg"] and isinstance(unreadable[0][1], OSError)


def test_params_json_is_canonical():
    """m37 (sort_keys dropped)."""
    assert params_json({"b": 1, "a": [2, 3]}) == '{"a":[2,3],"b":1}'
