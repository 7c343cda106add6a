"""`fakespotter scan --engine ray`'s own code (src/fakespotter/cli/scan_ray.py) that the Ray tests
leave unchecked (from a mutation audit of it): the option checks, what the command passes on to
``ray_scan``, and how it reports ``ray_scan``'s errors and results. No Ray instance and no model:
``import_ray``, ``load_detector`` and ``ray_scan`` are stubbed, so each test takes milliseconds."""

from __future__ import annotations

import errno
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from fakespotter.cli import main


def _stats(**kw):
    stats = {"counts": {"ok": 2, "no_face": 0, "error": 0}, "labels": {"real": 1, "fake": 1}, "error_kinds": {},
             "images": 2, "wall_s": 1.0, "images_per_s": 2.0, "resumed_records": 0, "resumed_errors": 0,
             "output_counts": {"ok": 2, "no_face": 0, "error": 0}}
    stats.update(kw)
    return stats


@pytest.fixture
def ray_cli(tmp_path, monkeypatch, capsys):
    """``cli(*options, paths=None, result=..., effect=None)`` runs ``fakespotter scan IN --engine ray
    --out OUT *options`` with Ray, the model load and ``ray_scan`` stubbed; returns (exit code,
    stderr, the keyword arguments ray_scan got, or None when it was not reached)."""
    import fakespotter.cli.scan as cli_scan
    import fakespotter.scan_ray as SR

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    monkeypatch.setattr(SR, "import_ray", lambda: None)
    monkeypatch.setattr(cli_scan, "load_detector", lambda args: None)
    calls = []

    def cli(*options, paths=None, out=None, result=None, effect=None, aligned=True):
        def ray_scan(inputs, model, out_, **kw):
            calls.append(dict(kw, inputs=inputs, model=model, out=out_))
            if effect is not None:
                effect(kw)
            return _stats() if result is None else result
        monkeypatch.setattr(SR, "ray_scan", ray_scan)
        calls.clear()
        argv = ["scan", *(paths or [str(folder)]), "--engine", "ray", "--out", str(out or tmp_path / "o"), *options]
        rc = main(argv + (["--aligned"] if aligned else []))
        err = capsys.readouterr().err
        return rc, err, (calls[0] if calls else None)
    return cli


def test_every_option_reaches_ray_scan_as_given(ray_cli, tmp_path):
    rc, err, kw = ray_cli("--batch-size", "3", "--pixel-limit", "1234", "--limit", "5", "--upsample", "2",
                          "--weak-face-score", "0.25", "--detect-pixels", "70000", "--file-timeout", "7",
                          "--address", "127.0.0.1:1", "--actors", "1", "--cpus-per-actor", "0.5",
                          "--gpus-per-actor", "0", "--actor-batch", "1", "--decode-cpus", "0.0001",
                          "--shard-size", "1", "--quiet", aligned=False)
    assert rc == 0 and err == "", err
    assert kw["inputs"] == [str(tmp_path / "in")] and kw["out"] == str(tmp_path / "o")
    given = {"aligned": False, "batch_size": 3, "mode": "new", "pixel_limit": 1234, "limit": 5, "upsample": 2,
             "weak_face_score": 0.25, "detect_pixels": 70000, "file_timeout": 7.0, "stdin": None, "ray_logs": False,
             "address": "127.0.0.1:1", "actors": 1, "cpus_per_actor": 0.5, "gpus_per_actor": 0.0, "actor_batch": 1,
             "decode_cpus": 0.0001, "shard_size": 1}
    assert {k: kw[k] for k in given} == given
    for k in ("actors", "actor_batch", "shard_size"):  # counts, not floats
        assert type(kw[k]) is int, k
    assert callable(kw["progress"]) and callable(kw["log"])
    # the options not given are not passed on (ray_scan's defaults apply); without --quiet, Ray's logs
    rc, err, kw = ray_cli()
    ray_only = {"address", "actors", "cpus_per_actor", "gpus_per_actor", "actor_batch", "decode_cpus", "shard_size"}
    assert rc == 0 and not ray_only & set(kw) and kw["aligned"] is True and kw["ray_logs"] is True


def test_the_mode_follows_resume_and_overwrite(ray_cli):
    assert ray_cli()[2]["mode"] == "new"
    assert ray_cli("--resume")[2]["mode"] == "resume"
    assert ray_cli("--overwrite")[2]["mode"] == "overwrite"


def test_a_listing_on_stdin_is_passed_on(ray_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{tmp_path / 'in' / 'a.png'}\n"))
    rc, err, kw = ray_cli(paths=["-"])
    assert rc == 0 and kw["inputs"] == ["-"] and list(kw["stdin"]) == [f"{tmp_path / 'in' / 'a.png'}\n"]


@pytest.mark.parametrize("option", ["--address", "--actors", "--cpus-per-actor", "--gpus-per-actor", "--actor-batch",
                                    "--decode-cpus", "--shard-size"])
def test_each_ray_option_is_refused_by_the_local_engine(tmp_path, capsys, option):
    rc = main(["scan", str(tmp_path), "--aligned", "--out", str(tmp_path / "l.jsonl"), option, "1"])
    assert rc == 2 and f"{option} is an option of --engine ray" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--actors", "--actor-batch", "--shard-size"])
def test_counts_are_whole_numbers(ray_cli, capsys, option):
    with pytest.raises(SystemExit) as e:
        ray_cli(option, "2.5")
    assert e.value.code == 2 and f"argument {option}: invalid int value: '2.5'" in capsys.readouterr().err


@pytest.mark.parametrize("options, said", [
    (["--device", "cuda"], "--device is an option of --engine local (actors run on cuda when they get GPUs"),
    (["--channels-last"], "--channels-last is an option of --engine local"),
    (["--autocast"], "--autocast is an option of --engine local"),
    (["--part-rows", "5"], "--part-rows is an option of --engine local"),
    (["--batch-size", "0"], "--batch-size must be from 1 to"),
    (["--pixel-limit", "0"], "--pixel-limit must be >= 1, got 0"),
    (["--actor-batch", "0"], "--actor-batch must be >= 1, got 0"),
    (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    (["--cpus-per-actor", "inf"], "--cpus-per-actor must be a finite number >= 0.0001 (Ray's resolution), got inf"),
    (["--decode-cpus", "inf"], "--decode-cpus must be a finite number >= 0.0001"),
    (["--gpus-per-actor", "inf"], "--gpus-per-actor must be 0 or a finite number >= 0.0001, got inf"),
    (["--gpus-per-actor", "0.00001"], "--gpus-per-actor must be 0 or a finite number >= 0.0001, got 1e-05"),
    (["--gpus-per-actor", "-0.5"], "--gpus-per-actor must be 0 or a finite number >= 0.0001, got -0.5"),
    (["--upsample", "-1"], "--upsample must be >= 0, got -1"),
    (["--file-timeout", "-1"], "--file-timeout must be a number of seconds"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--format", "csv"], "('fakespotter merge FOLDER FILE --format csv')"),
])
def test_ray_options_refused_before_any_work(ray_cli, options, said):
    rc, err, kw = ray_cli(*options)
    assert rc == 2 and said in err and kw is None, err
    assert len(err.strip().splitlines()) == 1, err


def test_format_jsonl_is_taken(ray_cli):
    rc, err, kw = ray_cli("--format", "jsonl")
    assert rc == 0 and kw is not None, err


def test_resources_at_their_limits_are_taken(ray_cli):
    rc, err, kw = ray_cli("--cpus-per-actor", "0.0001", "--decode-cpus", "0.0001", "--gpus-per-actor", "0.0001")
    assert rc == 0 and (kw["cpus_per_actor"], kw["decode_cpus"], kw["gpus_per_actor"]) == (1e-4, 1e-4, 1e-4), err


def test_a_missing_input_is_refused(ray_cli, tmp_path):
    rc, err, kw = ray_cli(paths=[str(tmp_path / "gone")])
    assert rc == 2 and f"{tmp_path / 'gone'} does not exist" in err and kw is None


def test_face_detection_that_is_not_available_is_refused(ray_cli, monkeypatch):
    import fakespotter.faces as F

    def no_dlib():
        raise ImportError("No module named 'dlib'")

    monkeypatch.setattr(F, "_import_dlib", no_dlib)
    rc, err, kw = ray_cli(aligned=False)
    assert rc == 2 and "face detection is not available (No module named 'dlib')" in err and kw is None


@pytest.mark.parametrize("out, said", [
    ("-", "--engine ray writes a folder of shards: give it with --out FOLDER"),
    ("o.CSV", "names a .csv file; give a folder name"),
    ("o.parquet", "names a .parquet file; give a folder name"),
    ("gone/o", "folder {tmp}/gone does not exist"),
])
def test_an_out_that_is_no_folder_for_shards_is_refused(ray_cli, tmp_path, out, said):
    target = out if out == "-" else str(tmp_path / out)
    rc, err, kw = ray_cli(out=target)
    assert rc == 2 and said.format(tmp=tmp_path) in err and kw is None, err


def test_an_existing_folder_named_like_a_csv_file_is_taken(ray_cli, tmp_path):
    (tmp_path / "x.csv").mkdir()
    rc, err, kw = ray_cli(out=str(tmp_path / "x.csv"))
    assert rc == 0 and kw["out"] == str(tmp_path / "x.csv"), err


def test_the_permissions_checked_are_those_of_the_out_folder_itself(ray_cli, tmp_path, monkeypatch):
    """An existing --out folder is written into (its parent's permissions do not matter), and
    creating files there needs write and search (x) permission."""
    out = tmp_path / "shards"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: os.fspath(p) != str(out) and real(p, mode, **k))
    rc, err, kw = ray_cli(out=str(out))
    assert rc == 2 and f"--out {out} is not writable" in err and kw is None
    monkeypatch.setattr(os, "access", lambda p, mode, **k: not mode & os.X_OK)  # no search permission
    rc, err, kw = ray_cli(out=str(out))
    assert rc == 2 and f"--out {out} is not writable" in err and kw is None


# ----------------------------------------------------------------------------------------------
# what ray_scan raises and returns: exit codes and lines


def test_a_value_error_of_ray_scan_is_a_usage_error(ray_cli):
    def refuse(kw):
        raise ValueError("2 actors of 1 CPUs and decode tasks of 1 CPUs need more than the cluster's 2 CPUs")

    rc, err, kw = ray_cli(effect=refuse)
    assert rc == 2 and err == ("fakespotter scan: error: 2 actors of 1 CPUs and decode tasks of 1 CPUs need more "
                               "than the cluster's 2 CPUs\n")


def test_a_failure_on_the_cluster_is_one_line_and_exit_1(ray_cli, tmp_path):
    def failed(kw):
        raise RuntimeError("ray_scan: the scan failed on the cluster: RuntimeError: boom\nTraceback (most recent ...")

    rc, err, _ = ray_cli("--quiet", effect=failed)
    assert rc == 1 and err == "fakespotter scan: error: ray_scan: the scan failed on the cluster: RuntimeError: boom\n"
    out = tmp_path / "o"
    out.mkdir()
    (out / "part-001-000000.jsonl").write_text("")
    rc, err, _ = ray_cli("--quiet", effect=failed)
    assert rc == 1 and err.endswith(f"boom\nthe records written so far are in {out}; --resume continues from them\n")


def test_a_failure_without_a_message_is_named_by_its_type(ray_cli):
    def failed(kw):
        raise RuntimeError()

    rc, err, _ = ray_cli("--quiet", effect=failed)
    assert (rc, err) == (1, "fakespotter scan: error: RuntimeError\n")


def test_a_full_disk_is_one_line_and_exit_3(ray_cli, tmp_path):
    out = tmp_path / "o"

    def full(kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "part-001-000002.jsonl"))

    rc, err, _ = ray_cli("--quiet", effect=full)
    assert (rc, err) == (3, f"fakespotter scan: error: cannot write {out}/part-001-000002.jsonl: No space left on "
                            f"device: no record was written\n")
    out.mkdir()
    (out / "part-001-000000.jsonl").write_text("")
    rc, err, _ = ray_cli("--quiet", effect=full)
    assert (rc, err) == (3, f"fakespotter scan: error: cannot write {out}/part-001-000002.jsonl: No space left on "
                            f"device: the shards written before stay; free space (or raise the file size limit) and "
                            f"rerun with --resume\n")

    def full_no_name(kw):
        raise OSError(errno.EFBIG, "File too large")

    rc, err, _ = ray_cli("--quiet", effect=full_no_name)
    assert rc == 3 and err.startswith(f"fakespotter scan: error: cannot write {out}: File too large: ")


def test_another_os_error_is_not_taken_for_a_full_disk(ray_cli, tmp_path):
    def denied(kw):
        raise OSError(errno.EACCES, "Permission denied", str(tmp_path / "o" / "stats.json"))

    rc, err, _ = ray_cli("--quiet", effect=denied)
    assert (rc, err) == (1, f"fakespotter scan: error: {tmp_path / 'o' / 'stats.json'}: Permission denied\n")


def test_the_summary_counts_the_resumed_records_and_notes_the_default_model(ray_cli):
    from fakespotter.cli.scan import DEFAULT_MODEL_NOTE
    from fakespotter.detector import default_model_path

    stats = _stats(resumed_records=4, resumed_errors=2)
    rc, err, _ = ray_cli("--model", str(default_model_path()), result=stats)
    assert rc == 1, err  # the error records the folder held before: exit 1, as the local engine's resume
    assert "(resumed: 4 records were already there)" in err and DEFAULT_MODEL_NOTE in err


def test_ray_scans_progress_and_notices_are_shown_unless_quiet(ray_cli, monkeypatch):
    import fakespotter.cli._common as common

    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)  # a progress line at every update

    def talks(kw):
        kw["progress"](3)
        kw["log"]("scan: a notice of ray_scan")

    rc, err, _ = ray_cli(effect=talks)
    assert rc == 0 and "scan: 3 in " in err and "scan: a notice of ray_scan\n" in err
    rc, err, _ = ray_cli("--quiet", effect=talks)
    assert rc == 0 and err == ""


def test_the_progress_bar_line_is_ended_before_the_summary(ray_cli, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def talks(kw):
        kw["progress"](3)

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    rc, _, _ = ray_cli(effect=talks)
    lines = term.getvalue().split("\n")
    assert rc == 0 and lines[0].startswith("\rscan 3 ") and lines[1].startswith("status"), lines
