"""The command line: --help states defaults, bad arguments fail fast with exit 2 and one line,
train / calibrate / info / env work end to end (on tiny aligned inputs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakespotter.cli import main
from fakespotter.detector import FakeSpotter
from scan_helpers import without_permission_override

SUBCOMMANDS = ["train", "calibrate", "info", "env"]


def write_images(folder, n, seed, power):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = (rng.random((150, 150, 3)) ** power * 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_images(root / "real", 12, 0, 1.0), write_images(root / "fake", 12, 1, 2.5)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_states_defaults(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fakespotter " + cmd in out
    if cmd in ("train", "calibrate"):
        assert out.count("default") >= 8


def run_cli(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_bad_arguments_exit_2_before_work(corpus, tmp_path, capsys):
    real, fake = corpus
    empty = tmp_path / "empty"
    empty.mkdir()
    copy, other = shutil.copytree(real, tmp_path / "copy"), tmp_path / "other"
    write_images(other, 3, 2, 1.5)
    twin = tmp_path / "elsewhere" / fake.name  # another folder of the same name
    write_images(twin, 3, 4, 1.5)
    cases = [
        (["--real", str(tmp_path / "missing"), "--fake", str(fake)], "--real: .*missing does not exist"),
        (["--real", str(empty), "--fake", str(fake)], "--real: folder .*empty has no images"),
        (["--real", str(real), "--fake", str(real)], "12 images are both real and fake"),
        (["--real", str(real), "--fake", str(copy)], r"12 images are both real and fake, e\.g\. .* and .* \(same bytes\)"),
        (["--real", str(real), "--fake", str(fake), "--val-real", str(copy), "--val-fake", str(fake)],
         "both validation real and validation fake|both training and validation images"),
        (["--real", str(real), "--fake", str(fake), "--val-real", str(copy), "--val-fake", str(other)],
         r"12 images are both training and validation images, e\.g\. .* \(same bytes\)"),
        (["--real", str(real), "--fake", str(fake), "--fake-type", "a", "b"], "--fake-type names 2 types for 1 --fake sources"),
        (["--real", str(real), "--fake", str(fake), "--val-real", str(real)], "give both --val-real and --val-fake"),
        (["--real", str(real), "--fake", str(fake), "--target-fpr", "2"], r"--target-fpr must be in \(0, 1\)"),
        (["--real", str(real), "--fake", str(fake), "--target-tpr", "0"], r"--target-tpr must be in \(0, 1\]"),
        # options that would be ignored
        (["--real", str(real), "--fake", str(fake), "--target-fpr", "0.1", "--target-tpr", "0.5"],
         "give --target-fpr or --target-tpr, not both"),
        (["--real", str(real), "--fake", str(fake), "--split", "val"], "--split picks a split of --manifest"),
        (["--real", str(real), "--fake", str(fake), "--fake-type", " "], r"--fake-type names must not be blank, got \[' '\]"),
        (["--real", str(real), "--fake", str(fake), "--augment-fraction", "0.3"],
         "--augment-fraction is the share of training chips --augment attacks; give --augment too"),
        (["--real", str(real), "--fake", str(fake), "--augment", "--augment-fraction", "0"],
         r"--augment-fraction must be in \(0, 1\], got 0.0"),
        (["--real", str(real), "--fake", str(fake), "--hidden", "8", "0"], "--hidden widths must be >= 1, got 8 0"),
        (["--real", str(real), "--fake", str(fake), "--seed", "-2"], "--seed must be >= 0, got -2"),
        (["--real", str(real), str(real), "--fake", str(fake)], "12 images are listed more than once in the real images"),
        (["--real", str(real), "--fake", str(fake), "--layers", "relu1", "nosuch"], "nosuch"),
        (["--real", str(real), "--fake", str(fake), str(twin)],
         f"--fake .*{fake.name} and .*{fake.name} would both be named '{fake.name}' in the results; name each with "
         f"--fake-type"),
    ]
    for extra, pattern in cases:
        rc, out, err = run_cli(["train", *extra, "--out", str(tmp_path / "m.fsm")], capsys)
        assert rc == 2, (extra, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("fakespotter train: error: ")
        import re

        assert re.search(pattern, err), (pattern, err)
        assert not (tmp_path / "m.fsm").exists()
    rc, out, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--out", str(tmp_path / "no" / "m.fsm")], capsys)
    assert rc == 2 and "folder" in err and "does not exist" in err
    rc, out, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--out", str(tmp_path)], capsys)
    assert rc == 2 and "is a folder; give a file name" in err
    existing = tmp_path / "existing.fsm"
    existing.write_text("keep me")
    rc, out, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--out", str(existing)], capsys)
    assert rc == 2 and "already exists; pass --overwrite" in err and existing.read_text() == "keep me"


def test_unwritable_output(corpus, tmp_path):
    """A folder its owner cannot write to (root, who writes anywhere, runs without that power)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    prefix = without_permission_override(ro, "w")
    if prefix is None:
        pytest.skip("running as root, and setpriv cannot drop root's power to write anywhere here")
    done = subprocess.run(prefix + [sys.executable, "-m", "fakespotter", "train", "--real", str(corpus[0]), "--fake",
                                    str(corpus[1]), "--out", str(ro / "m.fsm")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and f"output model {ro / 'm.fsm'} is not writable" in done.stderr, done.stderr
    assert list(ro.iterdir()) == []


def test_an_output_on_a_read_only_file_system_says_so(corpus, tmp_path, capsys, monkeypatch):
    """The refusal of an output nobody can write names the reason when it is a read-only mount
    (os.access and statvfs stand in for one: root writes anywhere else)."""
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, st):
            self.f_flag = st.f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real_statvfs(p)))
    for args, said in (
            (["train", "--real", str(corpus[0]), "--fake", str(corpus[1]), "--out", str(tmp_path / "m.fsm")],
             f"output model {tmp_path / 'm.fsm'} is not writable (a read-only file system)"),
            (["scan", str(corpus[0]), "--out", str(tmp_path / "o.jsonl")],
             f"{tmp_path / 'o.jsonl'} is not writable (a read-only file system)"),
            (["scan", str(corpus[0]), "--out", str(tmp_path / "o.parquet")],
             f"output {tmp_path / 'o.parquet'} is not writable (a read-only file system)"),
            (["scan", str(corpus[0]), "--engine", "ray", "--out", str(tmp_path / "shards")],
             f"--out {tmp_path / 'shards'} is not writable (a read-only file system)"),
            (["evaluate", "default", "--real", str(corpus[0]), "--fake", str(corpus[1]), "--out-dir",
              str(tmp_path / "ev")], f"--out-dir {tmp_path / 'ev'}: cannot write there (a read-only file system)")):
        rc, out, err = run_cli(args, capsys)
        assert rc == 2 and said in err, (args, err)
    monkeypatch.setattr(os, "statvfs", real_statvfs)  # permissions, not the mount: no reason given
    rc, out, err = run_cli(["train", "--real", str(corpus[0]), "--fake", str(corpus[1]), "--out",
                            str(tmp_path / "m.fsm")], capsys)
    assert rc == 2 and err.rstrip().endswith("is not writable")


def test_a_full_disk_is_one_line_and_exit_3(corpus, tmp_path):
    """A write that fails for lack of room (here a file size limit) ends any command with one
    line naming the file, exit 3 and no temporary file, not a traceback."""
    import resource

    out = tmp_path / "t.safetensors"
    proc = subprocess.run([sys.executable, "-m", "fakespotter", "calibrate", str(corpus[0]), "--aligned", "--quiet",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)))
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip() == f"fakespotter calibrate: error: cannot write {out}: File too large"
    assert list(tmp_path.iterdir()) == []


def test_train_and_calibrate_refuse_an_output_that_is_an_input_or_not_a_file(corpus, tmp_path, capsys):
    real, fake = corpus
    victim = sorted(real.iterdir())[0]
    before = victim.read_bytes()
    (tmp_path / "link.fsm").symlink_to(victim)
    os.mkfifo(tmp_path / "pipe.json")
    for extra, message in ((["--out", str(victim)], f"output model {victim} is also an input"),
                           (["--out", str(tmp_path / "link.fsm")], "is also an input"),
                           (["--out", str(tmp_path / "m.fsm"), "--report", str(victim)], f"report {victim} is also an input"),
                           (["--out", str(tmp_path / "m.fsm"), "--report", str(tmp_path / "pipe.json")],
                            "exists and is not a regular file")):
        rc, out, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--aligned", "--overwrite",
                                *extra], capsys)
        assert rc == 2 and message in err, err
    rc, out, err = run_cli(["calibrate", str(real), "--aligned", "--out", str(victim), "--overwrite"], capsys)
    assert rc == 2 and f"output {victim} is also an input" in err, err
    assert victim.read_bytes() == before and not (tmp_path / "m.fsm").exists()


def test_an_os_error_on_a_file_is_one_line(monkeypatch, capsys):
    """An OSError that names a file ends a command with one line (exit 3 when it is a full disk
    or the like, else 1); one that names no file is a bug and keeps its traceback."""
    import errno

    from fakespotter.cli import info

    for error, rc, line in ((OSError(errno.EIO, "Input/output error", "/x/a.json"), 1,
                             "fakespotter info: error: /x/a.json: Input/output error"),
                            (OSError(errno.ENOSPC, "No space left on device", "/x/a.json"), 3,
                             "fakespotter info: error: cannot write /x/a.json: No space left on device")):
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(info, "run", fail)
        assert main(["info", "default"]) == rc
        assert capsys.readouterr().err.strip() == line
    monkeypatch.setattr(info, "run", lambda args: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError):
        main(["info", "default"])


def test_ctrl_c_while_the_command_starts_is_one_line():
    """A Ctrl-C during the command's imports (torch takes a second or two) used to print an
    import's KeyboardInterrupt traceback; it is sent here once torch's library is loading."""
    import signal
    import time

    exe = Path(sys.executable).with_name("fakespotter")
    if not exe.exists():
        pytest.skip("the fakespotter command is not installed beside this Python")
    p = subprocess.Popen([str(exe), "scan", "-", "--quiet"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{p.pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and err.strip().endswith("interrupted"), err
    # once the package is imported, Ctrl-C is Python's again (a program of the same name keeps it)
    code = ("import sys, signal; sys.argv[0] = '/x/fakespotter'; import fakespotter; "
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


def test_layers_may_be_given_more_than_once():
    from fakespotter.cli import build_parser

    for cmd in (["calibrate", "x", "--out", "o"], ["train", "--real", "r", "--fake", "f", "--out", "o"]):
        args = build_parser().parse_args(cmd + ["--layers", "relu1", "relu2", "--layers", "fc"])
        assert args.layers == ["relu1", "relu2", "fc"]


def test_missing_class_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "fakespotter", "train", "--real", "x", "--out", "m"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--fake" in result.stderr


def test_train_info_calibrate_end_to_end(corpus, tmp_path, capsys):
    real, fake = corpus
    model, report = tmp_path / "m.fsm", tmp_path / "report.json"
    rc, out, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--fake-type", "noise",
                            "--aligned", "--hidden", "8", "--epochs", "5", "--out", str(model),
                            "--report", str(report), "--quiet"], capsys)
    assert rc == 0, err
    assert "wrote" in out and "validation AUC" in out
    rep = json.loads(report.read_text())
    n_val = rep["training"]["counts"]["validation"]["real"]  # (3 of 12: no measure of a 1% FPR)
    assert err == (f"warning: an FPR of 0.01 cannot be measured on {n_val} validation reals (it takes 100): the "
                   f"threshold lets none of them through; give more validation reals, or pick it with --target-tpr\n")
    assert rep["training"]["sources"]["fake"][0]["type"] == "noise"
    assert rep["training"]["counts"]["images"] == {"real": 12, "fake": 12}
    assert len(rep["model_sha256"]) == 64 and rep["failures"] == []
    # trained on aligned chips, but it detects faces in the images given to it later, as scan does
    assert rep["training"]["sources"]["inputs"] == "aligned chips, resized"
    assert rep["parameters"]["aligned"] is False and FakeSpotter.load(model).aligned is False

    rc, out, err = run_cli(["info", str(model)], capsys)
    assert rc == 0 and "dlib_resnet_v1" in out and "operating threshold: logit" in out
    assert "for FPR <= 0.01 on validation reals" in out
    assert "face detection (scan's defaults with this model): upsample 1, weak-face-score 0.15, detect-pixels " in out
    tpr_model = tmp_path / "tpr.fsm"
    rc, out, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--aligned", "--hidden", "8",
                            "--epochs", "5", "--target-tpr", "0.8", "--out", str(tpr_model), "--quiet"], capsys)
    assert rc == 0 and "for TPR >= 0.8 on validation fakes" in out and "warning" not in err, err
    rc, out, err = run_cli(["info", str(tpr_model)], capsys)
    assert rc == 0 and "for TPR >= 0.8 on validation fakes" in out
    rc, out, err = run_cli(["info", str(model), "--json"], capsys)
    assert json.loads(out)["granularity"] == "channel"
    bad = tmp_path / "bad.fsm"
    bad.write_bytes(model.read_bytes()[:100])
    rc, out, err = run_cli(["info", str(bad)], capsys)
    assert rc == 2 and "truncated" in err

    thr = tmp_path / "t.safetensors"
    rc, out, err = run_cli(["calibrate", str(real), str(fake), "--aligned", "--out", str(thr), "--quiet"], capsys)
    assert rc == 0 and "from 24 face chips" in out
    from fakespotter import Thresholds

    t = Thresholds.load(thr)
    assert t.n_images == 24 and t.mode == "per_layer"
    rc, out, err = run_cli(["calibrate", str(real), "--out", str(thr), "--overwrite", "--batch-size", "0"], capsys)
    assert rc == 2 and "--batch-size must be from 1 to 4096" in err and Thresholds.load(thr).n_images == 24
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    rc, out, err = run_cli(["calibrate", str(broken), "--out", str(tmp_path / "t2.safetensors"), "--quiet"], capsys)
    assert rc == 2 and "no image gave a face chip (0 without a face, 1 unreadable)" in err
    assert f"the first unreadable: {broken / 'a.png'}: ValueError:" in err  # which file, and why
    rc, out, err = run_cli(["train", "--real", str(broken), "--fake", str(fake), "--aligned", "--out",
                            str(tmp_path / "m2.fsm"), "--quiet"], capsys)
    assert rc == 2 and "no real image gave a face chip (0 without a face, 1 unreadable)" in err
    assert f"the first unreadable: {broken / 'a.png'}: ValueError:" in err
    rc, out, err = run_cli(["calibrate", str(real), str(real / "."), "--aligned", "--out",
                            str(tmp_path / "t3.safetensors"), "--quiet"], capsys)
    assert rc == 2 and "12 images are listed more than once in the images" in err
    assert not (tmp_path / "t3.safetensors").exists()


def test_train_splits_each_class_on_its_own_images(corpus, tmp_path, capsys):
    """Without a manifest each image is its own group, of its class: real image 1 and fake
    image 1 are unrelated, so 3 fakes beside 12 reals are split on their own (tying them to
    the reals' split left no fake to validate on for about half the seeds)."""
    real, fake = corpus
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(fake.iterdir())[:3]:
        shutil.copy(p, few / p.name)
    for seed in range(5):
        rc, out, err = run_cli(["train", "--real", str(real), "--fake", str(few), "--aligned", "--hidden", "4",
                                "--epochs", "2", "--seed", str(seed), "--out", str(tmp_path / f"m{seed}.fsm"),
                                "--quiet"], capsys)
        assert rc == 0, (seed, err)


def test_train_says_the_model_was_written_when_its_report_could_not_be(corpus, tmp_path, capsys, monkeypatch):
    """A full disk under --report after the model was written: exit 3, the model named as
    written, and an earlier report under that name called an earlier one, not this model's."""
    import errno

    import fakespotter._atomic as atomic

    real, fake = corpus
    real = shutil.copytree(real, tmp_path / "real")
    (real / "junk.png").write_bytes(b"not a png")  # named all the same
    report = tmp_path / "r.json"
    report.write_text("{}")

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "write_atomic", full)
    rc, out, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--aligned", "--hidden", "4",
                            "--epochs", "2", "--out", str(tmp_path / "m.fsm"), "--report", str(report),
                            "--overwrite", "--quiet"], capsys)
    assert rc == 3 and out.startswith(f"wrote {tmp_path / 'm.fsm'}: validation AUC ")
    assert err.splitlines()[-1] == (f"fakespotter train: error: cannot write the report {report}: No space left on "
                                    f"device (the file there is an earlier report, not this model's)")
    assert err.splitlines()[0].startswith(f"  unreadable: {real / 'junk.png'}: ")
    assert (tmp_path / "m.fsm").is_file() and report.read_text() == "{}"


def test_outputs_that_appear_while_a_command_runs_are_kept(corpus, tmp_path, capsys, monkeypatch):
    """Outputs are checked at the start; calibrate's thresholds and train's report were then
    renamed over a file made meanwhile (by another run, say) without --overwrite."""
    from fakespotter.calibration import ThresholdCalibrator
    from fakespotter.detector import FakeSpotter

    real, fake = corpus
    out, model, report = tmp_path / "t.safetensors", tmp_path / "m.fsm", tmp_path / "r.json"

    def making(cls, name, *paths):
        real_method = getattr(cls, name)

        def method(self, *a, **k):
            for p in paths:
                p.write_text("someone else's")
            return real_method(self, *a, **k)
        monkeypatch.setattr(cls, name, method)

    making(ThresholdCalibrator, "partial_fit", out)
    rc, _, err = run_cli(["calibrate", str(real), "--aligned", "--out", str(out)], capsys)
    assert rc == 2 and f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it; the " \
                       f"thresholds were not written" in err, err
    making(FakeSpotter, "fit", report)
    rc, stdout, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--aligned", "--hidden", "4",
                               "--epochs", "2", "--out", str(model), "--report", str(report), "--quiet"], capsys)
    assert rc == 3 and stdout.startswith(f"wrote {model}: ") and err.strip().splitlines()[-1] == (
        f"fakespotter train: error: cannot write the report {report}: {report} already exists (it appeared while "
        f"this was being written); it was kept"), err
    model.unlink()
    making(FakeSpotter, "fit", model)
    rc, _, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--aligned", "--hidden", "4",
                          "--epochs", "2", "--out", str(model), "--quiet"], capsys)
    assert rc == 2 and "already exists" in err and "the trained model was not written" in err, err
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: "someone else's" for n in ("t.safetensors",
                                                                                                  "m.fsm", "r.json")}


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_write_atomic_without_replace_keeps_what_is_there(tmp_path, monkeypatch, links):
    from fakespotter._atomic import write_atomic

    if not links:  # (a file system without them: a check, then a rename)
        def no_link(*a, **k):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "o.json"
    write_atomic(path, "new\n", replace=False)
    with pytest.raises(FileExistsError, match=r"o.json already exists \(it appeared while this was being written\)"):
        write_atomic(path, "newer\n", replace=False)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "dangling", "x", replace=False)
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "o.json"]
    if links:  # NFS: a retried link that had made it the first time says EEXIST; the file is ours
        real_link = os.link

        def retried(src, dst, *a, **k):
            real_link(src, dst, *a, **k)
            raise FileExistsError(17, "File exists")
        monkeypatch.setattr(os, "link", retried)
        write_atomic(tmp_path / "nfs.json", "ours\n", replace=False)
        assert (tmp_path / "nfs.json").read_text() == "ours\n" and len(list(tmp_path.iterdir())) == 3


def test_calibrate_says_when_copies_count_again(corpus, tmp_path, capsys):
    real, _ = corpus
    imgs = shutil.copytree(real, tmp_path / "imgs")
    first = sorted(imgs.iterdir())[0]
    shutil.copy(first, imgs / f"copy_{first.name}")
    rc, out, err = run_cli(["calibrate", str(imgs), "--aligned", "--out", str(tmp_path / "t.safetensors")], capsys)
    assert rc == 0, err
    assert out.strip().endswith("from 13 face chips (0 unreadable images; 1 byte-identical copies of other images, "
                                "each counted again)"), out
    (imgs / f"copy_{first.name}").unlink()
    rc, out, err = run_cli(["calibrate", str(imgs), "--aligned", "--out", str(tmp_path / "u.safetensors")], capsys)
    assert rc == 0 and out.strip().endswith("from 12 face chips (0 unreadable images)"), out


def test_train_keeps_byte_identical_copies_on_one_side_and_counts_images(corpus, tmp_path, capsys, monkeypatch):
    """Copies inside a class share a group, so the hold-out never validates on a training
    image's copy; the report counts images (and images without a face) as given."""
    from fakespotter.detector import FakeSpotter

    real, fake = corpus
    dup = tmp_path / "dup"
    dup.mkdir()
    for p in sorted(real.iterdir())[:6]:
        shutil.copy(p, dup / p.name)
        shutil.copy(p, dup / f"copy_{p.name}")
    seen = {}
    fit = FakeSpotter.fit

    def spy(self, xr, xf, **kw):
        seen["groups"] = kw["groups"]
        return fit(self, xr, xf, **kw)

    monkeypatch.setattr(FakeSpotter, "fit", spy)
    report = tmp_path / "r.json"
    rc, out, err = run_cli(["train", "--real", str(dup), "--fake", str(fake), "--aligned", "--hidden", "4", "--epochs",
                            "2", "--out", str(tmp_path / "m.fsm"), "--report", str(report)], capsys)
    assert rc == 0, err
    assert "6 real images are byte-identical copies of others" in err
    gr, gf = seen["groups"]
    names = sorted(p.name for p in dup.iterdir())  # the order images are listed in
    group = dict(zip(names, gr))
    assert all(group[n] == group[f"copy_{n}"] for n in names if not n.startswith("copy_"))
    assert len(set(gr)) == 6 and len(set(gf)) == 12
    counts = json.loads(report.read_text())["training"]["counts"]
    assert counts["images"] == {"real": 12, "fake": 12} and counts["images_without_faces"] == {"real": 0, "fake": 0}


def test_train_on_a_class_of_copies_says_why_it_cannot_hold_out(corpus, tmp_path, capsys):
    """Copies of one image are one group: the hold-out cannot split the class, and the message
    says how many groups the class's faces come from, not just "too few"."""
    real, fake = corpus
    dup = tmp_path / "dup"
    dup.mkdir()
    one = sorted(real.iterdir())[0]
    for i in range(5):
        shutil.copy(one, dup / f"{i}_{one.name}")
    rc, out, err = run_cli(["train", "--real", str(dup), "--fake", str(fake), "--aligned", "--hidden", "4", "--epochs",
                            "2", "--out", str(tmp_path / "m.fsm")], capsys)
    assert rc == 2 and not (tmp_path / "m.fsm").exists()
    assert "4 real images are byte-identical copies of others" in err
    assert "cannot hold out a validation part of the real class (--validation-fraction 0.25): its faces come from 1 " \
           "group (" in err and "(--val-real and --val-fake)" in err


def test_env(capsys):
    rc, out, err = run_cli(["env", "--json"], capsys)
    info = json.loads(out)
    assert rc == 0 and info["native_build"]["cpu_isa_compiled"] == ["scalar", "avx2", "avx512"]
    assert info["cpu_isa_in_use"] in info["cpu_isa_supported"]
    from importlib import metadata

    for package in ("ray", "pyarrow", "matplotlib", "openvino"):  # ./dev installs every extra
        assert info[package] == metadata.version(package), package
    assert info["simplejpeg"] == metadata.version("simplejpeg") and info["pillow"] == metadata.version("pillow")
    assert info["native_build_vs_torch"] == "built against this torch release"


def test_version(capsys):
    import fakespotter

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"fakespotter {fakespotter.__version__}\n"


def test_a_bad_cpu_isa_variable_is_refused_before_work_and_shown_by_env(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKESPOTTER_CPU_ISA", "bogus")
    rc, out, err = run_cli(["scan", str(tmp_path), "--aligned"], capsys)
    assert rc == 2 and out == ""
    assert err == "fakespotter scan: error: FAKESPOTTER_CPU_ISA must be auto, scalar, avx2 or avx512, got 'bogus'\n"
    rc, out, err = run_cli(["env", "--json"], capsys)
    assert rc == 0 and json.loads(out)["cpu_isa_in_use"].startswith("error: FAKESPOTTER_CPU_ISA must be auto")


def test_closed_pipe_ends_quietly():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "fakespotter", "info", "default"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the command writes (like `| head` exiting)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_check_once_finds_links_and_check_disjoint_ignores_empty_files(tmp_path):
    from fakespotter.cli import UsageError
    from fakespotter.cli._common import check_disjoint, check_once

    (tmp_path / "a.png").write_bytes(b"pixels")
    os.link(tmp_path / "a.png", tmp_path / "hard.png")
    (tmp_path / "soft.png").symlink_to(tmp_path / "a.png")
    for other in ("hard.png", "soft.png"):
        with pytest.raises(UsageError, match=rf"1 images are listed more than once in --real .* e\.g\. .*{other}"):
            check_once([tmp_path / "a.png", tmp_path / other], "--real")
    (tmp_path / "empty1.png").write_bytes(b"")
    (tmp_path / "empty2.png").write_bytes(b"")
    check_disjoint([tmp_path / "empty1.png"], [tmp_path / "empty2.png"], "both")  # unreadable, not copies


def test_check_disjoint_finds_the_same_file_and_copies_only(tmp_path):
    from fakespotter.cli import UsageError
    from fakespotter.cli._common import check_disjoint

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x.png").write_bytes(b"0123456789")
    (a / "y.png").write_bytes(b"abcdefghij")
    (b / "z.png").write_bytes(b"0123456789")  # a copy of x
    (b / "w.png").write_bytes(b"ABCDEFGHIJ")  # same size as both, other bytes
    (b / "link.png").symlink_to(a / "y.png")  # y under another name
    os.mkfifo(b / "pipe.png")  # never opened (would block)
    with pytest.raises(UsageError, match=r"^2 images are both A and B, e\.g\. "):
        check_disjoint(sorted(a.iterdir()), sorted(b.iterdir()), "both A and B")
    with pytest.raises(UsageError, match=r"^1 images are both A and B, e\.g\. .*x\.png and .*z\.png \(same bytes\)$"):
        check_disjoint([a / "x.png"], sorted(b.iterdir()), "both A and B")
    check_disjoint([a / "x.png", a / "y.png"], [b / "w.png", b / "pipe.png", tmp_path / "missing.png"], "both")
    with pytest.raises(UsageError, match=r"^1 images are both, e\.g\. .*y\.png$"):
        check_disjoint([a / "y.png"], [tmp_path / "a" / ".." / "a" / "y.png"], "both")


def test_check_once_finds_copies_in_one_list(tmp_path):
    """For evaluation, a copy (same bytes, another file) in one class would be scored twice, as a
    second listing would: refused (a review find: evaluate counted it twice, where a manifest
    refuses it)."""
    from fakespotter.cli import UsageError
    from fakespotter.cli._common import check_once

    (tmp_path / "x.png").write_bytes(b"0123456789")
    (tmp_path / "y.png").write_bytes(b"abcdefghij")  # same size, other bytes
    (tmp_path / "again.png").write_bytes(b"0123456789")  # a copy of x
    os.mkfifo(tmp_path / "pipe.png")  # never opened (would block)
    check_once([tmp_path / n for n in ("x.png", "y.png", "pipe.png", "missing.png")], "--real", copies=True)
    check_once([tmp_path / n for n in ("x.png", "y.png", "again.png")], "--real")  # training keeps copies
    with pytest.raises(UsageError, match=r"^1 images of --real are copies of another one \(each would be counted "
                                         r"again\), e\.g\. .*x\.png and .*again\.png \(same bytes\)$"):
        check_once([tmp_path / n for n in ("x.png", "y.png", "again.png")], "--real", copies=True)


def test_progress_lines_with_a_total_have_an_eta(capsys):
    from fakespotter.cli._common import Progress

    import re

    p = Progress(10, "scoring", every=0.0)  # stderr is captured: not a terminal
    p.update(3)
    time.sleep(0.01)
    p.update(3)
    p.close()
    first, second = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"scoring: 3/10 in 0:\d\d, [\d.]+/s", first), first  # no rate to go by yet
    assert re.fullmatch(r"scoring: 6/10 in 0:\d\d, [\d.]+/s ETA \d+:\d\d", second), second
    Progress(10, "scoring", quiet=True, every=0.0).update(3)
    assert capsys.readouterr().err == ""


def test_the_eta_goes_by_the_rate_after_the_start(monkeypatch, capsys):
    """A scan's start (workers, the model, the first batch) is not its pace: 10 s to the first
    64 images, then 64 a second, leaves 1,000 - 128 images for 14 s, not 75 (a review find:
    first ETAs 25x too long)."""
    from fakespotter.cli import _common

    clock = iter([0.0, 10.0, 11.0])
    monkeypatch.setattr(_common.time, "monotonic", lambda: next(clock))
    p = _common.Progress(1000, "scan", every=0.0)
    p.update(64)
    p.update(64)
    assert capsys.readouterr().err.splitlines()[1] == "scan: 128/1000 in 0:11, 64.0/s ETA 0:14"


def test_ctrl_c_between_the_imports_and_the_command_is_a_quiet_exit_130():
    """The command's start-up handler was replaced by Python's at the end of the package's own
    imports, before the rest of the command was imported and main() could catch it: a Ctrl-C
    there was a KeyboardInterrupt traceback and exit -2."""
    code = ("import sys; sys.argv[0] = 'fakespotter'\n"
            "import os, signal\n"
            "from fakespotter.cli import main  # everything the console script imports before main()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "print('not reached')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout, run.stderr) == (130, "", "fakespotter: interrupted\n")
    # and once the command is done, while the interpreter exits (it was exit -2 and a traceback)
    code = code.replace("from fakespotter.cli import main  #", "from fakespotter.cli import main; main(['env']) #")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stderr) == (130, "fakespotter: interrupted\n") and "not reached" not in run.stdout
    # SIGTERM likewise: exit 143 as main() gives it, not death by the signal (-15), during the
    # imports and after main() (a second SIGTERM while the first one's exit goes on)
    for where in ("from fakespotter.cli import main  #", "from fakespotter.cli import main; main(['env']) #"):
        term = code.replace("from fakespotter.cli import main  #", where).replace("SIGINT", "SIGTERM")
        run = subprocess.run([sys.executable, "-c", term], capture_output=True, text=True, timeout=120)
        assert (run.returncode, run.stderr) == (143, "fakespotter: terminated\n") and "not reached" not in run.stdout


def test_python_dash_m_fakespotter_is_the_command_too(monkeypatch):
    """``python -m fakespotter`` got none of the command's start-up handling (its argv[0] is
    ``-m``, then __main__.py's path): a Ctrl-C in its first second gave a traceback from inside
    torch's import, an abort, or was lost. Only the command itself is: not another module or
    script given the same words as arguments."""
    import fakespotter

    for argv0, orig, want in (
            ("/venv/bin/fakespotter", ["/venv/bin/python", "/venv/bin/fakespotter", "scan"], True),
            ("-m", ["python3", "-m", "fakespotter", "scan", "x"], True),
            ("/p/fakespotter/__main__.py", ["python3", "-X", "dev", "-W", "error", "-u", "-m", "fakespotter"], True),
            ("-m", ["python3", "-mfakespotter", "env"], True),
            ("-m", ["python3", "-m", "fakespotter.weights", "fetch"], False),
            ("tool.py", ["python3", "tool.py", "-m", "fakespotter"], False),
            ("-c", ["python3", "-c", "pass", "-m", "fakespotter"], False),
            ("", ["python3"], False)):
        monkeypatch.setattr(sys, "argv", [argv0])
        monkeypatch.setattr(sys, "orig_argv", orig)
        assert fakespotter._run_as_the_command() is want, orig


def test_train_reports_and_checks_its_validation_folders(corpus, tmp_path, capsys):
    """--val-real / --val-fake: named in the report with their counts; a validation class without
    a face chip is a usage error naming the option, before the training images are read."""
    real, fake = corpus
    vreal, vfake = write_images(tmp_path / "vreal", 4, 7, 1.0), write_images(tmp_path / "vfake", 4, 8, 2.5)
    report = tmp_path / "r.json"
    rc, _, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--val-real", str(vreal), "--val-fake",
                          str(vfake), "--aligned", "--hidden", "4", "--epochs", "2", "--out", str(tmp_path / "m.fsm"),
                          "--report", str(report), "--quiet"], capsys)
    assert rc == 0, err
    v = json.loads(report.read_text())["training"]["sources"]["validation"]
    assert v == {"real": [str(vreal)], "fake": [str(vfake)], "images": {"real": 4, "fake": 4},
                 "images_without_faces": {"real": 0, "fake": 0}}
    rc, _, err = run_cli(["train", "--real", str(real), "--fake", str(fake), "--val-real", str(vreal), "--val-fake",
                          str(vfake), "--out", str(tmp_path / "n.fsm"), "--quiet"], capsys)  # noise: no face found
    assert rc == 2 and "no --val-real image gave a face chip (4 without a face, 0 unreadable)" in err, err


def test_train_fingerprints_only_the_images_it_read(corpus, tmp_path, capsys):
    """An undecodable file is skipped (exit 1) and gets no fingerprint: the model never saw it."""
    from fakespotter.detector import FakeSpotter

    real, fake = corpus
    mixed = shutil.copytree(real, tmp_path / "mixed")
    (mixed / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    rc, _, err = run_cli(["train", "--real", str(mixed), "--fake", str(fake), "--aligned", "--hidden", "4", "--epochs",
                          "2", "--out", str(tmp_path / "m.fsm"), "--quiet"], capsys)
    assert rc == 1 and "zz_broken.jpg" in err, err
    assert len(FakeSpotter.load(tmp_path / "m.fsm").training_images_) == 24


def test_the_command_lines_training_defaults_are_the_librarys():
    """train's and robustness's defaults are written in the command line's module (it starts
    without importing torch): they must stay those of FakeSpotter and Augmenter."""
    from fakespotter.cli._common import AUGMENT_FRACTION, TARGET_FPR
    from fakespotter.perturb import Augmenter

    assert (AUGMENT_FRACTION, TARGET_FPR) == (Augmenter().fraction, FakeSpotter().target_fpr)
    from fakespotter.cli._common import MAX_BATCH_SIZE
    from fakespotter.features import MAX_BATCH_SIZE as LIMIT

    assert MAX_BATCH_SIZE == LIMIT
