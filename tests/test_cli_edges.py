"""The command line's argument checks, exit codes and messages that the end-to-end tests leave
unchecked (from a mutation audit of src/fakespotter/cli/): mostly model-free; a few run
the embedded default detector's metadata or a calibration of 3 aligned chips."""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import platform
import signal
import sys

import numpy as np
import pytest
from PIL import Image

from fakespotter.cli import UsageError, main


def run_cli(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def write_images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


# ----------------------------------------------------------------------------------------------
# main(): exit codes and the streams


def test_a_read_only_mount_is_exit_3_and_a_pipe_other_than_stdout_is_exit_1(monkeypatch, capsys):
    from fakespotter.cli import info

    for error, rc, line in ((OSError(errno.EROFS, "Read-only file system", "/x/a.json"), 3,
                             "fakespotter info: error: cannot write /x/a.json: Read-only file system"),
                            (OSError(errno.EDQUOT, "Disk quota exceeded", "/x/a.json"), 3,
                             "fakespotter info: error: cannot write /x/a.json: Disk quota exceeded"),
                            (BrokenPipeError(errno.EPIPE, "Broken pipe"), 1,
                             "fakespotter info: error: [Errno 32] Broken pipe")):
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(info, "run", fail)
        assert run_cli(["info", "default"], capsys)[::2] == (rc, line + "\n")


def test_an_interrupt_inside_a_command_is_one_line_and_its_exit_code(monkeypatch, capsys):
    from fakespotter.cli import Terminated, info

    for error, rc, said in ((KeyboardInterrupt(), 130, "interrupted"), (Terminated(), 143, "terminated")):
        def stop(args, error=error):
            raise error

        monkeypatch.setattr(info, "run", stop)
        assert run_cli(["info", "default"], capsys) == (rc, "", f"fakespotter info: {said}\n")


def test_main_puts_back_the_sigterm_handler_and_the_streams(monkeypatch, capsys):
    from fakespotter.cli import info

    def mine(signum, frame):
        pass

    during = {}

    def run(args):
        during["handler"] = signal.getsignal(signal.SIGTERM)
        return 0

    monkeypatch.setattr(info, "run", run)
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        streams = sys.stdout, sys.stderr
        assert main(["info", "default"]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine and (sys.stdout, sys.stderr) == streams
        assert during["handler"] is not mine  # SIGTERM unwinds the command meanwhile
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Gone:
    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


@pytest.mark.parametrize("method", ["write", "flush"])
def test_a_stderr_whose_reader_left_goes_on_and_a_stdout_stops(method):
    """stderr (fd 2): the text goes to /dev/null and the work goes on; stdout (fd 1): the
    BrokenPipeError goes on. (The fds are saved and put back: dup2 points them at /dev/null.)"""
    from fakespotter.cli import _Stream

    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        err = _Stream(_Gone(), 2)
        call = (lambda s: s.write("progress")) if method == "write" else (lambda s: s.flush())
        call(err)  # no exception
        assert err.broken
        out = _Stream(_Gone(), 1)
        with pytest.raises(BrokenPipeError):
            call(out)
        assert out.broken
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


class _Full:
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    flush = write


def test_a_full_stdout_is_named_and_exit_3(monkeypatch, capsys):
    """`fakespotter info default > /dev/full` said "cannot write an output"."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", _Full())
    assert main(["info", "default"]) == 3
    assert capsys.readouterr().err == "fakespotter info: error: cannot write stdout: No space left on device\n"


def test_a_closed_stdout_is_an_error_that_names_it(monkeypatch, capsys, tmp_path):
    """`>&-` (sys.stdout is None): an AttributeError traceback; and the scan's records were lost."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["info", "default"]) == 1
    assert capsys.readouterr().err == "fakespotter info: error: stdout: it was closed when the command started\n"
    folder = write_images(tmp_path / "imgs", 2)
    assert main(["scan", str(folder), "--aligned", "--workers", "0", "--quiet"]) == 3  # its records: to stdout
    assert capsys.readouterr().err == "fakespotter scan: error: writing stdout: it was closed when the command started\n"


@pytest.mark.parametrize("stdout", ["full", "closed", "gone"])
def test_a_csv_scan_to_a_stdout_that_fails_at_its_header(monkeypatch, capsys, tmp_path, stdout):
    """The CSV header is written as the output opens: its failure said "cannot create None",
    exit 2, where a JSON-lines scan says "writing stdout", exit 3 (or 0: the reader left)."""
    folder = write_images(tmp_path / "imgs", 2)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", {"full": _Full(), "closed": None, "gone": _Gone()}[stdout])
    saved = os.dup(1)  # (a reader that left: fd 1 is pointed at /dev/null)
    try:
        rc = main(["scan", str(folder), "--aligned", "--workers", "0", "--quiet", "--format", "csv"])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    why = {"full": "No space left on device", "closed": "it was closed when the command started"}.get(stdout)
    assert (rc, capsys.readouterr().err) == ((0, "") if stdout == "gone" else (
        3, f"fakespotter scan: error: writing stdout: {why}: no record was written\n"))


def test_a_closed_stderr_lets_a_scan_run_to_its_end(monkeypatch, capsys, tmp_path):
    """`2>&-` (sys.stderr is None): the progress set-up raised AttributeError, unseen, and the
    scan stopped with exit 1 and an empty output."""
    folder = write_images(tmp_path / "imgs", 3)
    out = tmp_path / "s.jsonl"
    monkeypatch.setattr(sys, "stderr", None)
    assert main(["scan", str(folder), "--aligned", "--workers", "0", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 3
    assert json.loads((tmp_path / "s.jsonl.stats.json").read_text())["complete"] is True


def test_messages_name_a_files_non_utf8_bytes_as_records_do(tmp_path, capsys):
    """A message showed the byte 0xff of a file name as \\udcff (Python's escape), the records as \\xff."""
    bad = os.fsdecode(b"nope\xff")
    assert main(["scan", str(tmp_path / bad), "--aligned"]) == 2
    err = capsys.readouterr().err
    assert "nope\\xff does not exist" in err and "udcff" not in err


def test_a_bad_cpu_isa_is_one_line_in_the_refusal_and_in_env(monkeypatch, capsys, tmp_path):
    from fakespotter import _C

    def bad():
        raise ValueError("FAKESPOTTER_CPU_ISA must be auto, ...\nException raised from isa.cpp:52 (C++ trace)")

    monkeypatch.setattr(_C, "cpu_isa", bad)
    rc, out, err = run_cli(["scan", str(tmp_path), "--aligned"], capsys)
    assert (rc, err) == (2, "fakespotter scan: error: FAKESPOTTER_CPU_ISA must be auto, ...\n")
    rc, out, err = run_cli(["env", "--json"], capsys)
    assert rc == 0 and json.loads(out)["cpu_isa_in_use"] == "error: FAKESPOTTER_CPU_ISA must be auto, ..."


# ----------------------------------------------------------------------------------------------
# _common: argument checks


def ns(**kw):
    return argparse.Namespace(**kw)


def test_first_line_is_an_errors_first_non_blank_line_or_its_type():
    from fakespotter._errors import first_line

    assert first_line(ValueError("bad\nC++ trace")) == "bad"
    assert first_line(ValueError("\n  \nbad")) == "bad"
    assert first_line(AssertionError()) == "AssertionError" and first_line(RuntimeError("")) == "RuntimeError"


def test_a_backbone_that_fails_without_a_message_is_one_line(monkeypatch, capsys, tmp_path):
    import fakespotter.backbones as B

    def broken(name):
        raise AssertionError()  # (as a bare assert in a user's factory)

    monkeypatch.setattr(B, "get_backbone", broken)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    rc, out, err = run_cli(["calibrate", str(tmp_path), "--backbone", "nope", "--out", str(tmp_path / "t.json")],
                           capsys)
    assert (rc, err) == (2, "fakespotter calibrate: error: AssertionError\n")


def test_batch_size_and_augment_fraction_take_their_upper_bounds():
    from fakespotter.cli._common import MAX_BATCH_SIZE, check_augment_fraction, check_batch_size

    check_batch_size(ns(batch_size=MAX_BATCH_SIZE))
    with pytest.raises(UsageError, match="--batch-size must be from 1 to 4096"):
        check_batch_size(ns(batch_size=MAX_BATCH_SIZE + 1))
    args = ns(augment_fraction=1.0)
    check_augment_fraction(args, True, "--augment")
    assert args.augment_fraction == 1.0
    args = ns(augment_fraction=None)
    check_augment_fraction(args, False, "--augment")  # the default, given without --augment: fine
    assert args.augment_fraction == 0.5


def test_detection_settings_are_checked_at_their_bounds():
    from fakespotter.cli._common import check_detection_args
    from fakespotter.faces import MIN_DETECT_PIXELS

    check_detection_args(ns(upsample=0, weak_face_score=0.0, detect_pixels=MIN_DETECT_PIXELS))
    check_detection_args(ns(upsample=None, weak_face_score=None, detect_pixels=0))
    for kw, said in ((dict(upsample=-1), "--upsample must be >= 0, got -1"),
                     (dict(weak_face_score=float("inf")), "--weak-face-score must be a finite number, got inf"),
                     (dict(weak_face_score=float("nan")), "--weak-face-score must be a finite number, got nan"),
                     (dict(detect_pixels=MIN_DETECT_PIXELS - 1), f"got {MIN_DETECT_PIXELS - 1}$")):
        args = ns(**{"upsample": 1, "weak_face_score": 0.15, "detect_pixels": 0, **kw})
        with pytest.raises(UsageError, match=said):
            check_detection_args(args)


def test_detection_settings_not_given_are_the_models():
    from fakespotter.cli._common import detection_from_model

    args = ns(upsample=None, weak_face_score=0.5, detect_pixels=None)
    detection_from_model(args, ns(upsample=2, weak_face_score=0.15, detect_pixels=0))
    assert (args.upsample, args.weak_face_score, args.detect_pixels) == (2, 0.5, 0)


def test_class_mode_names_the_missing_class_and_fills_in_the_split():
    from fakespotter.cli._common import class_mode

    def args(**kw):
        return ns(**{"real": None, "fake": None, "manifest": None, "fake_type": None, "split": None,
                     "default_split": "test", **kw})

    with pytest.raises(UsageError, match="^--fake is missing: give both"):
        class_mode(args(real=["r"]))
    with pytest.raises(UsageError, match="^--real is missing: give both"):
        class_mode(args(fake=["f"]))
    with pytest.raises(UsageError, match="^give either --manifest or --real/--fake, not both"):
        class_mode(args(real=["r"], fake=["f"], manifest="m"))
    with pytest.raises(UsageError, match="^--fake-type names --fake folders; a manifest names its own"):
        class_mode(args(manifest="m", fake_type=["x"]))
    a = args(manifest="m")
    assert class_mode(a) == "manifest" and a.split == "test"
    a = args(real=["r"], fake=["f"])
    assert class_mode(a) == "folders" and a.split == "test"


def test_folder_names_of_file_lists_drop_the_at_sign():
    from fakespotter.cli._common import folder_names

    assert folder_names(["@fake", "a/other"], "--fake", "--fake-type") == ["fake", "other"]
    with pytest.raises(UsageError, match="would both be named 'fake'"):
        folder_names(["@fake", "b/fake"], "--fake", "--fake-type")


def test_copies_inside_one_side_are_no_overlap(tmp_path):
    from fakespotter.cli._common import check_disjoint

    (tmp_path / "x.png").write_bytes(b"0123456789")
    (tmp_path / "x2.png").write_bytes(b"0123456789")  # a copy of x, on the same side
    (tmp_path / "w.png").write_bytes(b"ABCDEFGHIJ")  # same size, other bytes
    check_disjoint([tmp_path / "x.png", tmp_path / "x2.png"], [tmp_path / "w.png"], "both real and fake")


def test_no_chips_error_counts_the_unreadable_and_hints_aligned_only_without_it():
    from fakespotter.cli._common import no_chips_error

    e = no_chips_error("real image", 5, 2, False)
    assert str(e) == "no real image gave a face chip (2 without a face, 3 unreadable); check the inputs or pass --aligned"
    e = no_chips_error("image", 1, 0, True, [{"path": "a.png", "error": "ValueError: bad"}])
    assert str(e) == ("no image gave a face chip (0 without a face, 1 unreadable); check the inputs; the first "
                      "unreadable: a.png: ValueError: bad")


def test_an_existing_output_that_cannot_be_written_is_refused_even_with_overwrite(tmp_path, monkeypatch):
    """(os.access stands in for a read-only file: root writes anywhere.)"""
    from fakespotter.cli._common import writable_output

    out = tmp_path / "o.json"
    out.write_text("{}")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(out) else real_access(p, mode, **k))
    with pytest.raises(UsageError, match=r"^output .*o\.json is not writable"):
        writable_output(str(out), True, "output")
    assert writable_output(str(tmp_path / "new.json"), False, "output") == tmp_path / "new.json"


def test_an_existing_output_is_refused_only_when_it_is_an_input(tmp_path):
    from fakespotter.cli._common import refuse_inputs_as_output

    a, b, out = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "o.json"
    for p in (a, b, out):
        p.write_bytes(p.name.encode())
    refuse_inputs_as_output(out, [a, b, tmp_path / "missing.png"], "output")
    with pytest.raises(UsageError, match=r"^output .*b\.png is also an input \(.*b\.png\); give another name$"):
        refuse_inputs_as_output(b, [a, b], "output")


def test_a_model_that_is_a_fifo_is_named_as_such(tmp_path):
    from fakespotter.cli._common import model_file

    os.mkfifo(tmp_path / "m.fsm")
    with pytest.raises(UsageError, match=r"^--model .*m\.fsm is not a regular file \(a FIFO or device\?\)$"):
        model_file(str(tmp_path / "m.fsm"), "--model")
    with pytest.raises(UsageError, match="does not exist"):
        model_file(str(tmp_path / "none.fsm"), "--model")
    from fakespotter.detector import default_model_path

    assert model_file("default") == str(default_model_path())  # the embedded one, by its path


def test_record_stdout_writes_any_file_name(capsys):
    from fakespotter.cli._common import record_stdout

    out = record_stdout()
    assert out is sys.stdout and out.errors == "surrogateescape" and out.encoding.lower().replace("-", "") == "utf8"


def test_calibrates_default_upsample_is_1():
    from fakespotter.cli import build_parser

    args = build_parser().parse_args(["calibrate", "x", "--out", "o"])
    assert (args.upsample, args.weak_face_score, args.detect_pixels) == (1, 0.15, 4096 * 4096)
    scan = build_parser().parse_args(["scan", "x"])  # the model's, filled in later
    assert (scan.upsample, scan.weak_face_score, scan.detect_pixels) == (None, None, None)


def test_hms_rounds_and_shows_hours_from_one():
    from fakespotter.cli._common import _hms

    assert [_hms(s) for s in (-3, 0.4, 0.5, 59.6, 3599.4, 3600, 3661)] == [
        "0:00", "0:00", "0:01", "1:00", "59:59", "1:00:00", "1:01:01"]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_terminals_bar_is_full_at_most_and_ends_its_line(monkeypatch):
    from fakespotter.cli._common import Progress

    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.delenv("COLUMNS", raising=False)  # (no terminal behind it: 80 columns)
    p = Progress(4, "scan")
    p.update(8)  # more than the total (a total counted while the work goes on)
    p.close()
    text = tty.getvalue()
    assert text.startswith("\rscan [" + "#" * 30 + "] 8/4 ") and text.endswith("\n"), repr(text)


@pytest.mark.parametrize("columns", [12, 30, 50, 200])
def test_a_terminals_bar_fits_the_terminal(monkeypatch, columns):
    """The bar was 30 characters wide whatever the terminal: on a narrow one each redraw wrapped
    and scrolled."""
    from fakespotter.cli._common import Progress

    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv("COLUMNS", str(columns))
    for total in (None, 1000):
        p = Progress(total, "scan")
        for _ in range(3):
            p.update(7)
    lines = tty.getvalue().split("\r")[1:]
    assert len(lines) == 6 and all(0 < len(line) < columns for line in lines), lines
    bars = [line for line in lines if "[" in line]
    if columns >= 50:
        assert len(bars) == 3
    elif columns == 12:  # (no room for a bar: the counts alone, cut)
        assert not bars
    if columns == 200:
        assert all("[" + "." * 30 + "]" in line for line in bars)  # (7 of 1000 fill no mark of 30)
    assert all("/1000" in line or columns < 16 for line in lines[3:])


def test_write_each_says_what_it_wrote_and_which_files_are_older(tmp_path, capsys):
    from fakespotter.cli._common import write_each

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    c.write_text("an earlier run's")

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    assert write_each([(a, lambda: a.write_text("1")), (b, full), (c, lambda: None)], "evaluate") == 3
    assert capsys.readouterr().err == (f"fakespotter evaluate: error: cannot write {b}: No space left on device; "
                                       f"written: {a}; from an earlier run, not this one: {c}\n")
    b.write_text("made meanwhile")

    def appeared():
        raise FileExistsError(f"{b} already exists (it appeared while this was being written)")

    assert write_each([(b, appeared)], "evaluate") == 3  # b is not this run's, and not an earlier one's either
    assert capsys.readouterr().err == (f"fakespotter evaluate: error: cannot write {b}: {b} already exists (it "
                                       f"appeared while this was being written)\n")
    assert write_each([(a, lambda: None)], "evaluate") is None


def test_log_is_silent_when_quiet(capsys):
    from fakespotter.cli._common import log

    log("said")
    log("not said", quiet=True)
    assert capsys.readouterr().err == "said\n"


# ----------------------------------------------------------------------------------------------
# info and env


def test_info_summary_of_the_default_model(capsys):
    from fakespotter.artifact import read_model

    rc, out, err = run_cli(["info", "default"], capsys)
    assert rc == 0 and err == ""
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert "note" not in lines  # its backbone is registered here: checked
    tensors, meta = read_model(out.splitlines()[0].split()[1])
    assert lines["layers"].startswith(f"{len(meta['layers'])} ({meta['layers'][0]} ... {meta['layers'][-1]}), ")
    assert meta["layers"][0] != meta["layers"][-1]
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert lines["tensors"] == f"{len(tensors)} ({nbytes} bytes)"
    rc, out, err = run_cli(["info", "default", "--json"], capsys)
    assert rc == 0 and out == json.dumps(meta, indent=2, sort_keys=True) + "\n"


def test_info_counts_the_training_image_fingerprints():
    import torch

    from fakespotter.cli.info import _images_line
    from fakespotter.detector import TRAINING_IMAGES

    assert _images_line({"a": torch.zeros(3), TRAINING_IMAGES: torch.arange(5)}).startswith("5 file fingerprints")


def test_env_as_text(capsys):
    rc, out, err = run_cli(["env"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert f"python: {platform.python_version()}" in lines
    i = lines.index("native_build:")
    assert lines[i + 1].startswith("  version: ")
    assert not out.lstrip().startswith("{")


# ----------------------------------------------------------------------------------------------
# calibrate (3 aligned chips through the default backbone)


def test_calibrate_options_reach_the_thresholds_and_an_unreadable_image_is_exit_1(tmp_path, capsys):
    from fakespotter import Thresholds

    imgs = write_images(tmp_path / "imgs", 3)
    (imgs / "zz_broken.png").write_bytes(b"not a png")
    out = tmp_path / "t.safetensors"
    rc, stdout, err = run_cli(["calibrate", str(imgs), "--aligned", "--threshold-mode", "per_neuron", "--granularity",
                               "element", "--layers", "relu1", "fc", "--out", str(out), "--quiet"], capsys)
    assert rc == 1 and "(1 unreadable images)" in stdout, err
    t = Thresholds.load(out)
    assert (t.mode, t.granularity, t.n_images) == ("per_neuron", "element", 3)


def test_calibrate_hints_aligned_only_without_it(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    for extra, hinted in (([], True), (["--aligned"], False)):
        rc, _, err = run_cli(["calibrate", str(broken), *extra, "--out", str(tmp_path / "t.safetensors"), "--quiet"],
                             capsys)
        assert rc == 2 and ("check the inputs or pass --aligned" in err) is hinted, err
    imgs = write_images(tmp_path / "imgs", 2)
    rc, _, err = run_cli(["calibrate", str(imgs), str(imgs / "000.png"), "--aligned", "--out",
                          str(tmp_path / "t.safetensors"), "--quiet"], capsys)
    assert rc == 2 and "1 images are listed more than once in the images" in err, err


# ----------------------------------------------------------------------------------------------
# data


def test_data_build_refuses_threads_below_1_first(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")  # (a mutant that lets --threads 0 through is refused here)
    rc, _, err = run_cli(["data", "build", str(full), "--threads", "0"], capsys)
    assert rc == 2 and err == "fakespotter data build: error: --threads must be >= 1, got 0\n"


def test_data_build_says_a_library_that_cannot_load_in_one_line(tmp_path, capsys, monkeypatch):
    """dlib (or OpenVINO) there but not loadable once the build ran (no address space left to map
    it): a traceback."""
    from fakespotter import dataset as D

    def build(*a, **k):
        raise ImportError("dlib is installed but cannot be loaded: failed to map segment from shared object")

    monkeypatch.setattr(D, "_preflight", lambda: None)
    monkeypatch.setattr(D, "build", build)
    rc, _, err = run_cli(["data", "build", str(tmp_path / "ds")], capsys)
    assert rc == 1 and err == ("fakespotter data build: error: dlib is installed but cannot be loaded: failed to map "
                               "segment from shared object (any previous build is as it was)\n")


def test_out_of_memory_is_one_line_that_says_so(monkeypatch, capsys):
    """train took a MemoryError while it loaded the backbone for a usage error (exit 2), and
    numpy's message does not say "memory"."""
    from fakespotter.cli import info

    def oom(args):
        raise MemoryError("Unable to allocate 2.25 MiB for an array with shape (590000,) and data type float32")

    monkeypatch.setattr(info, "run", oom)
    rc, _, err = run_cli(["info", "default"], capsys)
    assert rc == 1 and err == ("fakespotter info: error: out of memory: Unable to allocate 2.25 MiB for an array with "
                               "shape (590000,) and data type float32\n")
    monkeypatch.setattr(info, "run", lambda args: (_ for _ in ()).throw(MemoryError()))
    assert run_cli(["info", "default"], capsys)[::2] == (1, "fakespotter info: error: MemoryError\n")


def test_train_out_of_memory_loading_the_backbone_is_not_a_usage_error(tmp_path, capsys, monkeypatch):
    import fakespotter.backbones as B

    def oom(name):
        raise MemoryError("Unable to allocate 2.25 MiB for an array")

    monkeypatch.setattr(B, "get_backbone", oom)
    real, fake = write_images(tmp_path / "real", 2), write_images(tmp_path / "fake", 2, seed=1)
    rc, _, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--aligned", "--out",
                          str(tmp_path / "m.fsm")], capsys)
    assert rc == 1 and err == "fakespotter train: error: out of memory: Unable to allocate 2.25 MiB for an array\n"


def hand_made(root, n_real=1):
    """A data set of ``n_real`` real JPEG chips, each its own group in the split it belongs to."""
    from fakespotter import dataset as D
    from fakespotter.manifest import ManifestRow, file_sha256, write_manifest

    (root / "real").mkdir(parents=True)
    rows = []
    for i in range(n_real):
        f = root / "real" / f"{i}.jpg"
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(f, quality=90)
        group = f"g{i}"
        rows.append(ManifestRow(file=f"real/{i}.jpg", sha256=file_sha256(f), label="real", fake_type="",
                                generator="", source="hand", group=group, split=D.split_of(group), licence="CC0"))
    write_manifest(rows, root)
    return rows


def test_data_check_of_a_folder_finds_unlisted_files(tmp_path, capsys):
    hand_made(tmp_path / "d")
    rc, out, err = run_cli(["data", "check", str(tmp_path / "d")], capsys)
    assert rc == 0, err
    (tmp_path / "d" / "real" / "stray.jpg").write_bytes(b"x")
    rc, out, err = run_cli(["data", "check", str(tmp_path / "d")], capsys)
    assert rc == 1 and json.loads(out)["unlisted_files"] == ["real/stray.jpg"]
    assert "1 file(s) under real/ and fake/ are not in the manifest, e.g. real/stray.jpg" in err


def test_data_check_fails_on_an_unreadable_file_and_an_empty_manifest(tmp_path, capsys, monkeypatch):
    import fakespotter.manifest as M

    hand_made(tmp_path / "d")
    real_verify = M.verify_files
    monkeypatch.setattr(M, "verify_files", lambda m: ([], [("real/0.jpg", OSError(errno.EIO, "Input/output error"))]))
    rc, out, err = run_cli(["data", "check", str(tmp_path / "d")], capsys)
    assert rc == 1 and json.loads(out)["unreadable"] == ["real/0.jpg"]
    assert f"cannot read {tmp_path / 'd' / 'real' / '0.jpg'}: Input/output error" in err
    monkeypatch.setattr(M, "verify_files", real_verify)
    M.write_manifest([], tmp_path / "d")
    (tmp_path / "d" / "real" / "0.jpg").unlink()
    rc, out, err = run_cli(["data", "check", str(tmp_path / "d")], capsys)
    assert rc == 1 and "the manifest lists no files" in err


def test_data_check_names_four_differing_counts_then_dots(tmp_path, capsys):
    rows = hand_made(tmp_path / "d")
    key = f"{rows[0].split}:real"
    for others, dots in ((4, True), (3, False)):
        counts = {"zz": {f"k{i}": 1 for i in range(others)}}  # + the listed one the build lacks
        (tmp_path / "d" / "build.json").write_text(json.dumps({"counts": counts}))
        rc, out, err = run_cli(["data", "check", str(tmp_path / "d")], capsys)
        line = [x for x in err.splitlines() if "counts differ" in x][0]
        assert rc == 1 and line.endswith(", ...") is dots, line
        assert f"{key} 1 listed, 0 built" in line


# ----------------------------------------------------------------------------------------------
# merge (the shards library stubbed: the command's own checks, warnings and exit codes)


@pytest.fixture
def shards_folder(tmp_path, monkeypatch):
    import fakespotter.scan_ray as R

    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / R.MANIFEST).write_text("{}")
    calls = []

    def merge_shards(folder, target, fmt, overwrite=False):
        calls.append((target, fmt))
        return merge_shards.n

    merge_shards.n = 5
    monkeypatch.setattr(R, "read_shards", lambda folder: iter(()))
    monkeypatch.setattr(R, "merge_shards", merge_shards)
    return folder, calls, merge_shards


def test_merge_warns_and_exits_1_only_when_the_scan_is_unfinished_or_short(shards_folder, tmp_path, capsys):
    folder, calls, merge = shards_folder
    stats = folder / "stats.json"
    for written, n, warned in (({"complete": True, "images": 5}, 5, None),
                               ({"complete": True, "images": 3, "resumed_records": 2}, 5, None),
                               ({"complete": True, "images": 3, "resumed_records": 3}, 5, "wrote 6 records, but its "
                                                                                          "shards hold 5"),
                               ({"images": 5}, 5, "did not finish"),
                               ({"complete": False, "images": 5}, 5, "did not finish")):
        stats.write_text(json.dumps(written))
        merge.n = n
        rc, _, err = run_cli(["merge", str(folder), str(tmp_path / "m.jsonl"), "--overwrite"], capsys)
        if warned is None:
            assert rc == 0 and err == f"merge: {n} records -> {tmp_path / 'm.jsonl'}\n", (written, err)
        else:
            assert rc == 1 and err.startswith("fakespotter merge: warning: ") and warned in err, (written, err)
    rc, _, err = run_cli(["merge", str(folder), str(tmp_path / "m.jsonl"), "--overwrite", "--quiet"], capsys)
    assert rc == 1 and "merge: 5 records" not in err and "warning" in err  # (the warning even with --quiet)


def test_merge_picks_csv_by_any_case_and_takes_an_out_beside_the_folder(shards_folder, tmp_path, capsys):
    folder, calls, merge = shards_folder
    (folder / "stats.json").write_text(json.dumps({"complete": True, "images": 5}))
    beside = tmp_path / "shards.CSV"  # its path starts with the folder's, but it is not inside it
    assert run_cli(["merge", str(folder), str(beside)], capsys)[0] == 0
    assert calls[-1] == (beside, "csv")


def test_merge_into_a_full_disk_is_exit_3(shards_folder, tmp_path, capsys, monkeypatch):
    import fakespotter.scan_ray as R

    folder, calls, merge = shards_folder

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(R, "merge_shards", full)
    out = tmp_path / "m.jsonl"
    out.write_text("old\n")
    rc, _, err = run_cli(["merge", str(folder), str(out), "--overwrite"], capsys)
    assert rc == 3 and err.startswith(f"fakespotter merge: error: writing {out}: No space left on device; nothing was "
                                      f"kept ({out} is as it was)")


# ----------------------------------------------------------------------------------------------
# scan: argument checks (before any model is loaded) and the summary


def scan_err(args, capsys):
    rc, out, err = run_cli(["scan", *args], capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    return err


def test_scan_refuses_counts_below_their_minimum(tmp_path, capsys):
    d = str(tmp_path)
    assert "--pixel-limit must be >= 1, got 0" in scan_err([d, "--aligned", "--pixel-limit", "0"], capsys)
    assert "--workers must be >= 0, got -1" in scan_err([d, "--aligned", "--workers", "-1"], capsys)
    assert "--limit must be >= 0, got -1" in scan_err([d, "--aligned", "--limit", "-1"], capsys)
    err = scan_err([d, "--aligned", "--out", str(tmp_path / "o.parquet"), "--part-rows", "0"], capsys)
    assert "--part-rows must be >= 1, got 0" in err
    err = scan_err([d, "--aligned", "--file-timeout", "-1"], capsys)
    assert err.startswith("fakespotter scan: error: --file-timeout must be a number of seconds")


def test_scan_part_rows_is_for_parquet_only_whatever_the_suffix_case(tmp_path, capsys):
    for out, fmt in (("O.CSV", "csv"), ("o.jsonl", "jsonl"), ("o.Jsonl", "jsonl")):
        err = scan_err([str(tmp_path), "--aligned", "--out", str(tmp_path / out), "--part-rows", "5"], capsys)
        assert f"--part-rows applies to --format parquet, not {fmt}" in err


def test_scan_refuses_a_device_as_its_output(tmp_path, capsys):
    """--out /dev/null said "already exists; pass --resume or --overwrite", and with --overwrite
    "cannot create /dev/null: Invalid argument"."""
    for extra in ([], ["--overwrite"], ["--resume"]):
        err = scan_err([str(tmp_path), "--aligned", "--out", os.devnull, *extra], capsys)
        assert err == (f"fakespotter scan: error: output {os.devnull} is a device, not a file: leave out --out for "
                       f"records on stdout (> /dev/null discards them)\n")


def test_scan_refuses_a_stats_file_that_is_not_a_scans(tmp_path, capsys):
    (tmp_path / "o.jsonl.stats.json").write_text(json.dumps({"counts": {}, "images": 0}))  # no "model"
    err = scan_err([str(tmp_path), "--aligned", "--out", str(tmp_path / "o.jsonl")], capsys)
    assert "o.jsonl.stats.json exists and is not a scan's stats JSON" in err


class _Stop(Exception):
    pass


@pytest.fixture
def stop_at_the_model(monkeypatch):
    """check() runs every check, then stops where it would load the model."""
    from fakespotter.cli import scan as cli_scan

    def stop(args, start_workers=False):
        raise UsageError("checks passed")

    monkeypatch.setattr(cli_scan, "load_detector", stop)


def test_scan_refuses_an_output_that_is_an_input_but_not_a_record_file_in_an_input_folder(tmp_path, capsys,
                                                                                         stop_at_the_model):
    img = write_images(tmp_path / "imgs", 1) / "000.png"
    assert "is also an input" in scan_err([str(img), "--aligned", "--out", str(img), "--overwrite"], capsys)
    assert "is also an input" in scan_err([str(tmp_path / "imgs"), "--aligned", "--out", str(tmp_path / "imgs" / "new.jpg")],
                                          capsys)
    err = scan_err([str(tmp_path / "imgs"), "--aligned", "--out", str(tmp_path / "imgs" / "o.jsonl")], capsys)
    assert err == "fakespotter scan: error: checks passed\n"


def test_scan_says_how_to_get_face_detection(tmp_path, capsys, monkeypatch):
    import fakespotter.faces as F
    from fakespotter.weights import WeightsError

    def no_dlib():
        raise ImportError("No module named 'dlib'")

    monkeypatch.setattr(F, "_import_dlib", no_dlib)
    assert scan_err([str(tmp_path)], capsys) == ("fakespotter scan: error: face detection is not available (No module "
                                                 "named 'dlib'); install it, or pass --aligned for already-aligned "
                                                 "chips\n")
    monkeypatch.setattr(F, "_import_dlib", lambda: None)

    def no_weights():
        raise WeightsError("landmarks missing: run fakespotter-weights fetch\nmore")

    monkeypatch.setattr(F, "_landmark_path", no_weights)
    assert scan_err([str(tmp_path)], capsys) == ("fakespotter scan: error: face detection is not available (landmarks "
                                                 "missing: run fakespotter-weights fetch), or pass --aligned for "
                                                 "already-aligned chips\n")


def test_scan_summary_lines():
    from fakespotter.cli.scan import summary
    from fakespotter.scan import new_stats

    stats = new_stats()
    stats.update(images=6, wall_s=3.0, images_per_s=2.0)
    stats["counts"].update(ok=4, no_face=1, error=1)
    stats["labels"].update(real=3, fake=1)
    stats["error_kinds"].update(truncated=1, empty_file=2)
    lines = summary(stats, 0).splitlines()
    assert [line.split() for line in lines[:6]] == [["status", "images"], ["ok", "4"], ["real", "3"], ["fake", "1"],
                                                   ["no_face", "1"], ["error", "1"]]
    assert lines[6:] == ["errors: empty_file 2, truncated 1", "6 images in 3.0 s, 2.0 images/s"]
    stats["output_counts"] = {"ok": 9, "no_face": 1, "error": 1}
    lines = summary(stats, 5).splitlines()
    assert lines[-2:] == ["6 images in 3.0 s, 2.0 images/s (resumed: 5 records were already there)",
                          "the output holds ok 9, no_face 1, error 1"]


def test_scan_with_limit_0_is_no_warning_of_inputs_without_images(tmp_path, capsys):
    write_images(tmp_path / "imgs", 1)
    rc, out, err = run_cli(["scan", str(tmp_path / "imgs"), "--aligned", "--workers", "0", "--limit", "0"], capsys)
    assert rc == 0 and out == "" and "warning" not in err, err


def test_scan_warns_of_more_workers_than_cpus_only(tmp_path, capsys, monkeypatch, stop_at_the_model):
    monkeypatch.setattr(sys.modules["fakespotter.scan"], "usable_cpus", lambda: 2)
    for workers, warned in (("2", False), ("3", True)):
        rc, out, err = run_cli(["scan", str(tmp_path), "--aligned", "--workers", workers], capsys)
        assert rc == 2 and err.endswith("fakespotter scan: error: checks passed\n"), err
        assert ("warning: --workers 3 is more than the 2 CPUs this scan may use" in err) is warned, err
        assert len(err.splitlines()) == 1 + warned, err


def test_info_refuses_a_bad_model_in_one_line(monkeypatch, capsys):
    import fakespotter.artifact as A

    def bad(path):
        raise A.ModelFileError(f"{path}: truncated\n(the rest of a long explanation)")

    monkeypatch.setattr(A, "read_model", bad)
    rc, out, err = run_cli(["info", "default"], capsys)
    assert rc == 2 and out == "" and err.endswith(": truncated\n") and len(err.splitlines()) == 1, err


def test_info_json_sorts_the_keys_of_any_writer(monkeypatch, capsys):
    import fakespotter.artifact as A

    real_read = A.read_model

    def reversed_keys(path):  # metadata written in another order (another writer's)
        tensors, meta = real_read(path)
        return tensors, dict(reversed(list(meta.items())))

    monkeypatch.setattr(A, "read_model", reversed_keys)
    rc, out, err = run_cli(["info", "default", "--json"], capsys)
    assert rc == 0 and list(json.loads(out)) == sorted(json.loads(out)), err
