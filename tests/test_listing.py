"""Listing and reading inputs (data.py), without a model: folder order and walks, file lists,
tar members, error kinds, reading limits. From a mutation audit of data.py's listing code: each
test fails on a one-line change that no other test caught."""
from __future__ import annotations

import errno
import gzip
import io
import os
import sys
import tarfile
import threading

import pytest

from fakespotter import data as D


def _touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_folder_order_is_by_code_point_not_case_folded(tmp_path):
    for n in ("b.png", "A.png", "a.png", "B.png", "_u.png"):
        _touch(tmp_path / n)
    got = [p.name for p in D.iter_images(tmp_path)]
    assert got == ["A.png", "B.png", "_u.png", "a.png", "b.png"]


def test_an_entry_whose_type_cannot_be_read_is_taken_for_a_file(tmp_path, monkeypatch):
    _touch(tmp_path / "x.png")
    real = os.scandir

    class Bad:
        name = "x.png"

        def is_dir(self):
            raise PermissionError(errno.EACCES, "denied")

    class It:
        def __init__(self, folder):
            self.it = real(folder)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.it.close()

        def __iter__(self):
            return iter([Bad()])

    monkeypatch.setattr(D.os, "scandir", It)
    assert list(D.iter_images(tmp_path)) == [tmp_path / "x.png"]


def test_folders_on_two_devices_with_the_same_inode_are_both_walked(tmp_path, monkeypatch):
    _touch(tmp_path / "d1" / "a.png")
    _touch(tmp_path / "d2" / "b.png")
    real = os.stat

    def fake(path, *a, **kw):
        st = list(real(path, *a, **kw))[:10]
        st[1] = 42  # st_ino: the same everywhere
        st[2] = hash(os.fspath(path)) & 0xFFFF  # st_dev: one per folder
        return os.stat_result(st)

    monkeypatch.setattr(D.os, "stat", fake)
    assert [p.name for p in D.iter_images(tmp_path)] == ["a.png", "b.png"]


def _deny(monkeypatch, denied):
    real = os.scandir

    def scandir(folder):
        if os.path.basename(folder) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", folder)
        return real(folder)

    monkeypatch.setattr(D.os, "scandir", scandir)


def test_a_folder_that_cannot_be_listed_gets_a_permission_denied_entry(tmp_path, monkeypatch):
    _touch(tmp_path / "r" / "a.png")
    _touch(tmp_path / "r" / "locked" / "b.png")
    _touch(tmp_path / "r" / "z.png")
    _deny(monkeypatch, "locked")
    entries = list(D.iter_entries([str(tmp_path / "r")]))
    assert [e.path for e in entries] == [str(tmp_path / "r" / n) for n in ("a.png", "locked", "z.png")]
    assert entries[1].error[0] == "permission_denied" and "cannot list folder" in entries[1].error[1]
    # iter_images / list_images skip it
    assert [p.name for p in D.iter_images(tmp_path / "r")] == ["a.png", "z.png"]


def test_a_root_folder_that_cannot_be_listed_gets_an_entry(tmp_path, monkeypatch):
    _touch(tmp_path / "locked" / "a.png")
    _deny(monkeypatch, "locked")
    (e,) = D.iter_entries([str(tmp_path / "locked")])
    assert e.path == str(tmp_path / "locked") and e.error[0] == "permission_denied"


def test_only_a_lists_first_line_is_checked_for_an_image_signature(tmp_path):
    (tmp_path / "l.txt").write_text("a.png\nGIF89a.png\n\x89PNG\r\n")
    assert [e.path for e in D.iter_entries([f"@{tmp_path / 'l.txt'}"])] == [
        str(tmp_path / n) for n in ("a.png", "GIF89a.png", "\x89PNG")]


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_a_listed_name_with_a_trailing_space_keeps_it_when_such_a_file_exists(tmp_path, ending):
    _touch(tmp_path / "t.png ")
    (tmp_path / "l.txt").write_bytes(f"t.png {ending}".encode())
    (e,) = D.iter_entries([f"@{tmp_path / 'l.txt'}"])
    assert e.path == str(tmp_path / "t.png ") and D.read_entry(e) == b"x"


def test_a_crlf_line_from_a_stream_keeps_a_trailing_space_of_an_existing_file(tmp_path, monkeypatch):
    """(a stream given as stdin may hold \r\n endings)"""
    _touch(tmp_path / "t.png ")
    monkeypatch.chdir(tmp_path)
    (e,) = D.iter_entries(["-"], stdin=io.StringIO("t.png \r\n"))
    assert e.path == "t.png "


def test_an_indented_comment_line_is_skipped(tmp_path):
    (tmp_path / "l.txt").write_text("  # indented comment\na.png\n")
    assert [e.path for e in D.iter_entries([f"@{tmp_path / 'l.txt'}"])] == [str(tmp_path / "a.png")]


def test_a_named_pipe_list_is_relative_to_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "lists").mkdir()
    fifo = tmp_path / "lists" / "l.fifo"
    os.mkfifo(fifo)
    monkeypatch.chdir(tmp_path)

    def write():
        with open(fifo, "w") as f:
            f.write("a.png\n")

    t = threading.Thread(target=write, daemon=True)
    t.start()
    assert [e.path for e in D.iter_entries([f"@{fifo}"])] == ["a.png"]
    t.join(5)


def test_stdin_list_leaves_standard_input_open(tmp_path, monkeypatch):
    (tmp_path / "l.txt").write_text("a.png\n")
    with open(tmp_path / "l.txt") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        with D.stdin_list() as f:
            assert f.read() == "a.png\n"
        os.fstat(stdin.fileno())  # still open


def test_a_dangling_symlink_input_is_no_usage_error_but_a_not_found_entry(tmp_path):
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    D.check_sources([str(tmp_path / "gone.png")])
    (e,) = D.iter_entries([str(tmp_path / "gone.png")])
    with pytest.raises(D.ImageError) as info:
        D.read_entry(e)
    assert info.value.kind == "not_found"


def test_errno_kinds(tmp_path):
    _touch(tmp_path / "f.png")
    with pytest.raises(D.ImageError) as info:  # a file where a folder is expected: ENOTDIR
        D.read_entry(D.Entry(str(tmp_path / "f.png" / "x.png"), file=str(tmp_path / "f.png" / "x.png")))
    assert info.value.kind == "not_found"
    assert D._os_error(PermissionError(errno.EPERM, "Operation not permitted"), "p").kind == "permission_denied"
    assert D._os_error(OSError(errno.EIO, "I/O error"), "p").kind == "read_error"


def test_an_archive_that_cannot_be_opened_gets_the_os_errors_kind(tmp_path, monkeypatch):
    _touch(tmp_path / "a.tar", b"\0" * 1024)

    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(D, "_open_tar", denied)
    (e,) = D.iter_entries([str(tmp_path / "a.tar")])
    assert e.path == str(tmp_path / "a.tar") and e.error[0] == "permission_denied"


def test_a_gzip_archive_with_a_bad_header_is_a_bad_archive(tmp_path):
    data = bytearray(gzip.compress(b"\0" * 1024))
    data[2] = 9  # an unknown compression method: gzip.BadGzipFile, an OSError without errno
    _touch(tmp_path / "a.tar.gz", bytes(data))
    (e,) = D.iter_entries([str(tmp_path / "a.tar.gz")])
    assert e.error[0] == "bad_archive", e


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("spans", [False, True])
def test_tar_members_over_the_size_limit_are_too_large_and_at_it_are_read(tmp_path, monkeypatch, spans):
    monkeypatch.setattr(D, "MAX_FILE_BYTES", 10)
    _tar(tmp_path / "a.tar", [("at.png", b"0123456789"), ("over.png", b"0123456789A")])
    entries = list(D.iter_entries([str(tmp_path / "a.tar")], tar_spans=spans))
    assert [e.path.split("::")[1] for e in entries] == ["at.png", "over.png"]
    assert D.read_entry(entries[0]) == b"0123456789"
    assert entries[1].error[0] == "too_large"


def test_a_tar_listing_keeps_no_member_headers(tmp_path, monkeypatch):
    _tar(tmp_path / "a.tar", [(f"{i}.png", b"x") for i in range(20)])
    real, most = tarfile.TarFile.next, []

    def counting(self):
        most.append(len(self.members))
        return real(self)

    monkeypatch.setattr(tarfile.TarFile, "next", counting)
    assert len(list(D.iter_entries([str(tmp_path / "a.tar")]))) == 20
    assert max(most) <= 1


def test_data_after_a_damaged_header_is_named_even_when_it_is_blank_text(tmp_path):
    _tar(tmp_path / "a.tar", [("a.png", b"x" * 600), ("b.png", b"y" * 600)])
    whole = (tmp_path / "a.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tf:
        second = tf.getmembers()[1].offset
    bad = bytearray(whole[:second + 512 + 1024])
    bad[second] ^= 0x20  # the second member's header fails its checksum
    bad[second + 512:] = b" \n" * 512
    (tmp_path / "b.tar").write_bytes(bytes(bad))
    entries = list(D.iter_entries([str(tmp_path / "b.tar")]))
    assert entries[-1].error[0] == "bad_archive" and "but data follows" in entries[-1].error[1]


def test_a_fifo_member_is_named_a_fifo(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        info = tarfile.TarInfo("p.png")
        info.type = tarfile.FIFOTYPE
        tf.addfile(info)
    (e,) = D.iter_entries([str(tmp_path / "a.tar")])
    assert e.error == ("not_a_file", f"{tmp_path / 'a.tar'}::p.png: a FIFO inside the archive, not a file; links "
                                     f"are not followed")


def test_a_fifo_named_like_an_archive_is_not_opened(tmp_path):
    os.mkfifo(tmp_path / "p.tar")
    got = []
    t = threading.Thread(target=lambda: got.extend(D.iter_entries([str(tmp_path / "p.tar")])), daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock it
        os.close(os.open(tmp_path / "p.tar", os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("listing a FIFO named x.tar blocked on it")
    (e,) = got
    with pytest.raises(D.ImageError) as info:
        D.read_entry(e)
    assert info.value.kind == "not_a_file"


def test_trailing_slashes_are_not_in_the_paths(tmp_path):
    _touch(tmp_path / "r" / "a.png")
    assert [e.path for e in D.iter_entries([str(tmp_path / "r") + "//"])] == [str(tmp_path / "r" / "a.png")]


def test_reading_files_leaves_no_descriptor_open(tmp_path):
    p = _touch(tmp_path / "a.png", b"abc")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert D.read_entry(D.Entry(str(p), file=str(p))) == b"abc"
    for _ in range(5):
        with pytest.raises(D.ImageError):
            D.read_entry(D.Entry(str(tmp_path), file=str(tmp_path)))
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_span_whose_header_block_is_now_zeros_is_a_changed_archive(tmp_path):
    _tar(tmp_path / "a.tar", [("a.png", b"x" * 100)])
    (e,) = D.iter_entries([str(tmp_path / "a.tar")], tar_spans=True)
    data = bytearray((tmp_path / "a.tar").read_bytes())
    data[:512] = bytes(512)
    (tmp_path / "a.tar").write_bytes(bytes(data))
    with pytest.raises(D.ImageError) as info:
        D.read_entry(e)
    assert info.value.kind == "bad_archive"


def test_an_archive_name_in_capitals_is_opened(tmp_path):
    _tar(tmp_path / "A.TAR", [("a.png", b"x")])
    (e,) = D.iter_entries([str(tmp_path / "A.TAR")])
    assert e.path == f"{tmp_path / 'A.TAR'}::a.png" and D.read_entry(e) == b"x"


def test_a_dot_underscore_image_that_cannot_be_opened_is_still_listed(tmp_path, monkeypatch):
    """(unreadable ._x.jpg: its record says permission_denied; it must not vanish from the scan)"""
    _touch(tmp_path / "._x.jpg")
    real = os.open

    def guarded(path, *a, **kw):
        if str(path).endswith("._x.jpg"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(D.os, "open", guarded)
    (e,) = D.iter_entries([str(tmp_path)])
    with pytest.raises(D.ImageError) as info:
        D.read_entry(e)
    assert info.value.kind == "permission_denied"


def test_the_walk_opens_no_file_to_look_for_macos_metadata_unless_it_is_named_dot_underscore(tmp_path, monkeypatch):
    """(an open per file doubles the cost of listing a million-file corpus on a network file system)"""
    for n in ("a.jpg", "b.png", "._c.jpg"):
        _touch(tmp_path / n)
    looked, real = [], D._is_apple_double
    monkeypatch.setattr(D, "_is_apple_double", lambda p: (looked.append(os.path.basename(p)), real(p))[1])
    assert len(list(D.iter_images(tmp_path))) == 3 and looked == ["._c.jpg"]


def test_no_inputs_is_refused():
    with pytest.raises(ValueError, match="scan: no inputs given"):
        D.check_sources([], "scan")


@pytest.mark.parametrize("seen, actual, ok", [(100, 4096, True), (4095, 4096, True), (4095, 4097, False),
                                              (100, 4097, False)])
def test_a_growing_file_is_taken_up_to_exactly_the_limit(tmp_path, monkeypatch, seen, actual, ok):
    """fstat sees ``seen`` bytes, the file holds ``actual``: up to MAX_FILE_BYTES it is read whole, past it refused."""
    f = tmp_path / "a.png"
    f.write_bytes(bytes(range(256)) * 16 + b"z" * (actual - 4096))
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], seen, *real_fstat(fd)[7:])))
    monkeypatch.setattr(D, "MAX_FILE_BYTES", 4096)
    entry = D.Entry(str(f), str(f))
    if ok:
        assert D.read_entry(entry) == f.read_bytes()
    else:
        with pytest.raises(D.ImageError) as e:
            D.read_entry(entry)
        assert e.value.kind == "too_large"


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_a_carriage_return_inside_a_listed_name_is_part_of_it(tmp_path, monkeypatch, how):
    """Lists were read with universal newlines: "a\rb.png" was two inputs, "a" and "b.png"."""
    _touch(tmp_path / "a\rb.png")
    (tmp_path / "l.txt").write_bytes(b"a\rb.png\r\nc.png\n")
    monkeypatch.chdir(tmp_path)
    if how == "file":
        paths = [e.path for e in D.iter_entries(["@l.txt"])]
    else:
        with open("l.txt", "rb") as stdin:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stdin))
            paths = [e.path for e in D.iter_entries(["-"])]
    assert paths == ["a\rb.png", "c.png"]

