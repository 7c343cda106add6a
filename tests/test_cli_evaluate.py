"""``fakespotter evaluate`` and ``fakespotter robustness`` end to end on a tiny detector trained
on aligned sample chips (real headshots vs DCGAN fakes), and their usage errors (exit 2, one
line, before any work)."""

from __future__ import annotations

import csv
import errno
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakespotter import evaluate as ev
from fakespotter.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    samples = pytest.importorskip("fakespotter.samples")
    try:
        x, y, _ = samples.sample_chips(16, 16, seed=0)
    except Exception as e:  # data not fetched and not fetchable here
        pytest.skip(f"sample data unavailable ({e}); run: python -m fakespotter.samples fetch")
    from fakespotter.detector import FakeSpotter

    root = tmp_path_factory.mktemp("evalcli")
    folders = {}
    for name, label in (("real", 0), ("fake", 1)):
        folders[name] = root / name
        folders[name].mkdir()
        for i, chip in enumerate(x[y == label]):
            Image.fromarray(chip).save(folders[name] / f"{i:03d}.png")
    for name, label in (("real_small", 0), ("fake_small", 1)):  # the first 8 of each class
        folders[name] = root / name
        folders[name].mkdir()
        for i, chip in enumerate(x[y == label][:8]):
            Image.fromarray(chip).save(folders[name] / f"{i:03d}.png")
    det = FakeSpotter(hidden=(8,), max_epochs=5, aligned=True, seed=0).fit(x[y == 0], x[y == 1])
    model = det.save(root / "tiny.fsm")
    scores = det.decision_function(x).numpy()
    return {"root": root, "model": model, "det": det, "chips": x, "labels": y, "scores": scores, **folders}


def run_cli(args, capsys):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_evaluate_end_to_end(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", setup["model"], "--real", setup["real"], "--fake", setup["fake"], "--fake-type", "dcgan",
            "--aligned", "--out-dir", out, "--bootstrap", "100", "--quiet"]
    rc, stdout, err = run_cli(args, capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["det.png", "metrics.csv", "metrics.json", "report.md", "roc.png"]
    rep = json.loads((out / "metrics.json").read_text())
    assert [r["group"] for r in rep["rows"]] == ["all", "dcgan"]
    assert rep["counts"] == {"real": {"images": 16, "scored": 16, "without_face": 0, "unreadable": 0},
                             "fake": {"images": 16, "scored": 16, "without_face": 0, "unreadable": 0}}
    # the CLI's numbers are the library's on the same chips (PNG is lossless)
    det, y, s = setup["det"], setup["labels"], setup["scores"]
    op = det.operating_threshold_["logit"]
    want = ev.metrics(s, y, operating_threshold=op)
    row = rep["rows"][0]
    for k in ("auc", "ap", "eer", "acc", "f1", "acc_operating", "tpr_at_5pct_fpr"):
        assert row[k] == pytest.approx(want[k], abs=1e-6), k
        lo, hi = row["ci"][k]
        assert lo <= row[k] + 1e-9 and row[k] <= hi + 1e-9, k
    assert row["auc"] > 0.6  # the tiny detector learned something on its own training chips
    assert rep["settings"]["operating_threshold"] == pytest.approx(op)
    assert rep["model"]["sha256"] and rep["failures"] == [] and rep["images_without_face"] == []
    table = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["group"] for r in table] == ["all", "dcgan"] and float(table[0]["auc"]) == pytest.approx(row["auc"])
    md = (out / "report.md").read_text()
    assert "| group | class | n_real | n_fake | AUC |" in md and "real: 16 images, 16 scored" in md
    assert "| ACC@op | TPR@op | FPR@op |" in md and "| ACC@op | TPR@op | FPR@op |" in stdout
    assert "| all | all | 16 | 16 |" in stdout and "| dcgan | fake | 16 | 16 |" in stdout
    for png in ("roc.png", "det.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # again without --overwrite: refused, files kept; with it: replaced
    before = (out / "metrics.json").read_text()
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and "metrics.json already exists; pass --overwrite" in err
    assert (out / "metrics.json").read_text() == before


def test_a_report_file_that_cannot_be_written_names_the_earlier_runs_files(setup, tmp_path, capsys, monkeypatch):
    """--overwrite and a full disk at the plots: exit 3; the message names the files this run
    wrote and those still there from the earlier run (a folder mixing two runs, said so); the
    table is printed all the same."""
    import errno

    out = tmp_path / "eval"
    fake = shutil.copytree(setup["fake_small"], tmp_path / "fake")
    (fake / "junk.png").write_bytes(b"not a png")  # named also when the reports fail
    args = ["evaluate", setup["model"], "--real", setup["real_small"], "--fake", fake, "--aligned",
            "--out-dir", out, "--bootstrap", "0", "--quiet"]
    assert run_cli(args, capsys)[0] == 1
    old_roc = (out / "roc.png").read_bytes()

    def full(curves, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ev, "plot_roc", full)
    rc, stdout, err = run_cli(args + ["--overwrite"], capsys)
    assert rc == 3 and "| all | all |" in stdout
    assert err.splitlines()[0] == (
        f"fakespotter evaluate: error: cannot write {out / 'roc.png'}: No space left on device; written: "
        f"{out / 'metrics.json'}, {out / 'metrics.csv'}, {out / 'report.md'}; from an earlier run, not "
        f"this one: {out / 'roc.png'}, {out / 'det.png'}")
    assert err.splitlines()[1].startswith(f"  unreadable: {fake / 'junk.png'}: ")
    assert (out / "roc.png").read_bytes() == old_roc


@pytest.mark.parametrize("cmd", ["evaluate", "robustness"])
def test_a_report_file_made_during_the_run_is_kept(setup, tmp_path, capsys, monkeypatch, cmd):
    """Without --overwrite the report names are checked at the start; a file another command
    makes under one of them while this one runs is kept, not replaced (exit 3, naming it). The
    plot is written last: the files before it are written, the plot is not. A dangling link
    under a report's name is refused at the start."""
    pytest.importorskip("matplotlib")
    command = importlib.import_module(f"fakespotter.cli.{cmd}")
    out = tmp_path / "eval"
    made = out / ("det.png" if cmd == "evaluate" else "robustness.png")
    stale = command.remove_stale

    def meanwhile(*a, **kw):  # runs after the start's checks, before the reports are written
        made.write_text("another run's plot")
        return stale(*a, **kw)

    monkeypatch.setattr(command, "remove_stale", meanwhile)
    extra = ["--attacks", "jpeg"] if cmd == "robustness" else []
    args = [cmd, setup["model"], "--real", setup["real_small"], "--fake", setup["fake_small"], "--aligned",
            "--out-dir", out, "--bootstrap", "0", "--quiet", *extra]
    rc, _, err = run_cli(args, capsys)
    assert rc == 3 and made.read_text() == "another run's plot"
    assert err.splitlines()[0].startswith(f"fakespotter {cmd}: error: cannot write {made}: {made} already exists (it "
                                          f"appeared while this was being written); it was kept; written: ")
    assert "earlier run" not in err and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    written = {p.name for p in out.iterdir()} - {made.name}
    assert len(written) == (4 if cmd == "evaluate" else 3)
    monkeypatch.setattr(command, "remove_stale", stale)
    for p in out.iterdir():
        p.unlink()
    made.symlink_to(tmp_path / "nowhere.png")
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and f"{made} already exists; pass --overwrite" in err and made.is_symlink()


class _FullStdout:
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    flush = write


@pytest.mark.parametrize("cmd", ["evaluate", "robustness"])
def test_a_stdout_that_fails_loses_no_report_file(setup, tmp_path, capsys, monkeypatch, cmd):
    """The table went to stdout before the files were written: with its reader gone (`| true`)
    the command exited 0 with an empty report folder; closed or full, with none either."""
    out = tmp_path / "eval"
    extra = ["--attacks", "jpeg"] if cmd == "robustness" else []
    args = [cmd, setup["model"], "--real", setup["real_small"], "--fake", setup["fake_small"], "--aligned",
            "--out-dir", out, "--bootstrap", "0", "--quiet", "--no-plots", *extra]
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", _FullStdout())
    assert main([str(a) for a in args]) == 3
    assert capsys.readouterr().err == f"fakespotter {cmd}: error: cannot write stdout: No space left on device\n"
    names = ["metrics.csv", "metrics.json", "report.md"] if cmd == "evaluate" else [
        "robustness.csv", "robustness.json", "robustness.md"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert json.loads((out / names[1]).read_text())["rows"]


def test_evaluate_counts_images_without_faces_and_unreadable(setup, tmp_path, capsys):
    fake2 = tmp_path / "fake2"
    fake2.mkdir()
    for i, p in enumerate(sorted(setup["fake"].iterdir())[:4]):  # mirrored: not copies, which are refused
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(fake2 / p.name)
    Image.fromarray(np.full((150, 150, 3), 128, np.uint8)).save(fake2 / "grey.png")  # no face
    (fake2 / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("stale")
    # without --aligned: faces are detected; a flat grey image has none
    rc, stdout, err = run_cli(["evaluate", setup["model"], "--real", setup["real_small"], "--fake", setup["fake_small"],
                               fake2, "--fake-type", "dcgan", "dcgan-copy", "--real-source", "nba", "--out-dir", out,
                               "--bootstrap", "0", "--no-plots", "--overwrite", "--quiet"], capsys)
    assert rc == 1, err  # the unreadable file
    assert "unreadable: " in err and "broken.png" in err
    rep = json.loads((out / "metrics.json").read_text())
    c = rep["counts"]["fake"]
    assert c["images"] == 14 and c["unreadable"] == 1 and c["without_face"] >= 1
    assert c["scored"] == 14 - c["unreadable"] - c["without_face"]
    assert any(p.endswith("grey.png") for p in rep["images_without_face"])
    n = c["without_face"]  # said on the console too, not only in the report: they leave the denominator
    assert f"warning: {n} of 14 fake images have no face the detector finds: they are left out of the metrics" in err
    assert [r["group"] for r in rep["rows"]] == ["all", "dcgan", "dcgan-copy"]
    assert rep["rows"][0]["n_fake"] == c["scored"] and rep["rows"][0]["ci"]["auc"] == [None, None]
    md = (out / "report.md").read_text()
    assert "no intervals (--bootstrap 0)" in md and "0 stratified bootstrap resamples" not in md


@pytest.mark.parametrize("cmd", ["evaluate", "robustness"])
def test_a_class_with_no_scored_image_names_its_first_unreadable_one(setup, tmp_path, capsys, cmd):
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.new("RGB", (10, 10)).save(odd / "a_tiny.png")  # --aligned: not a face chip
    Image.new("RGB", (150, 40)).save(odd / "b_wide.png")
    rc, _, err = run_cli([cmd, setup["model"], "--real", setup["real_small"], "--fake", odd, "--aligned",
                          "--out-dir", tmp_path / "out", "--bootstrap", "0", "--quiet"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"no fake image could be scored \(0 without a face, 2 unreadable; the first unreadable: "
                     r".*a_tiny\.png: ValueError: .*cannot be an aligned face chip", err), err


@pytest.mark.parametrize("cmd", ["evaluate", "robustness"])
def test_missing_backbone_weights_are_a_usage_error(setup, tmp_path, cmd):
    import os
    import subprocess
    import sys

    env = dict(os.environ, FAKESPOTTER_CACHE=str(tmp_path / "empty-cache"))
    run = subprocess.run([sys.executable, "-m", "fakespotter", cmd, str(setup["model"]), "--real", str(setup["real_small"]),
                          "--fake", str(setup["fake_small"]), "--out-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith(f"fakespotter {cmd}: error: ") and "python -m fakespotter.weights fetch" in run.stderr


@pytest.mark.parametrize("cmd", ["evaluate", "robustness"])
def test_batch_size_is_the_forward_size(setup, tmp_path, capsys, monkeypatch, cmd):
    """--batch-size chips per forward: images were decoded 32 at a time whatever it said, so
    forwards never held more than 32 images' faces."""
    from fakespotter.taps import Tap

    x, y = setup["chips"], setup["labels"]
    for name, label in (("real", 0), ("fake", 1)):  # 24 images a class: 48 in all
        (tmp_path / name).mkdir()
        for i, chip in enumerate(np.concatenate([x[y == label], x[y == label][:8, :, ::-1]])):
            Image.fromarray(np.ascontiguousarray(chip)).save(tmp_path / name / f"{i:03d}.png")
    sizes = []
    forward = Tap.forward
    monkeypatch.setattr(Tap, "forward", lambda self, t: sizes.append(t.shape[0]) or forward(self, t))
    extra = ["--attacks", "resize"] if cmd == "robustness" else []
    rc, _, err = run_cli([cmd, setup["model"], "--real", tmp_path / "real", "--fake", tmp_path / "fake", "--aligned",
                          "--batch-size", "48", "--bootstrap", "0", "--no-plots", "--out-dir", tmp_path / "out",
                          "--quiet", *extra], capsys)
    assert rc == 0, err
    assert sizes and set(sizes) == {48}, sizes  # one forward of all 48 chips per variant


def test_robustness_end_to_end(setup, tmp_path, capsys):
    out = tmp_path / "rob"
    rc, stdout, err = run_cli(["robustness", setup["model"], "--real", setup["real_small"], "--fake", setup["fake_small"],
                               "--aligned", "--attacks", "resize", "noise", "--out-dir", out, "--bootstrap", "50",
                               "--quiet"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["robustness.csv", "robustness.json", "robustness.md",
                                                     "robustness.png"]
    rep = json.loads((out / "robustness.json").read_text())
    assert [(r["attack"], r["level"]) for r in rep["rows"]] == [
        ("clean", "-"), ("resize", 0.75), ("resize", 0.5), ("resize", 0.25),
        ("noise", 0.01), ("noise", 0.03), ("noise", 0.05), ("noise", 0.1)]
    det, y = setup["det"], setup["labels"]
    small = np.r_[np.flatnonzero(y == 0)[:8], np.flatnonzero(y == 1)[:8]]
    x, y, clean = setup["chips"][small], y[small], setup["scores"][small]
    op = det.operating_threshold_["logit"]
    from fakespotter import perturb

    for r in rep["rows"]:
        assert r["n_real"] == 8 and r["n_fake"] == 8 and r["ci"]["auc"][0] <= r["auc"] <= r["ci"]["auc"][1]
    for r in (rep["rows"][0], rep["rows"][-1]):  # clean and noise 0.1: as the library does it
        s = clean if r["attack"] == "clean" else det.decision_function(
            np.stack([perturb.apply(r["attack"], r["level"], c, seed=(0, i)) for i, c in enumerate(x)])).numpy()
        assert r["auc"] == pytest.approx(ev.roc_auc(s, y), abs=1e-6), r
        assert r["acc_operating"] == pytest.approx(float(np.mean((s > op) == (y == 1))), abs=1e-9)
        assert r["mean_score_fake"] == pytest.approx(float(s[y == 1].mean()), abs=1e-5)
    # the attacks reach the scores, more at the stronger level
    shift = {(r["attack"], r["level"]): abs(r["mean_score_real"] - rep["rows"][0]["mean_score_real"]) for r in rep["rows"]}
    assert 0 < shift[("noise", 0.01)] < shift[("noise", 0.1)] and 0 < shift[("resize", 0.75)] < shift[("resize", 0.25)]
    md = (out / "robustness.md").read_text()
    assert "| attack | level | n_real | n_fake |" in md and "| resize | 0.25 |" in md and "ACC@op" in md
    assert "| noise | 0.1 |" in stdout
    table = list(csv.DictReader((out / "robustness.csv").open()))
    assert table[1]["attack"] == "resize" and table[1]["level"] == "0.75" and "auc_lo" in table[1]
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"


def test_robustness_warns_when_an_attack_changes_which_images_have_a_face():
    from types import SimpleNamespace

    from fakespotter.cli.robustness import _faces_caveat

    labels = np.array([0, 0, 1, 1])
    faces = {("clean", None): np.array([1, 1, 1, 0]), ("blur", 3): np.array([0, 1, 1, 0]),
             ("jpeg", 95): np.array([1, 1, 1, 0])}
    scores = {v: np.where(f > 0, 0.5, np.nan) for v, f in faces.items()}
    variants = list(faces)
    (line,) = _faces_caveat(labels, SimpleNamespace(scores=scores, faces=faces), variants)
    assert line.startswith("images without a face the detector finds (clean: 0 real and 1 fake) after blur 3: "
                           "1 real and 1 fake:") and "jpeg" not in line
    assert _faces_caveat(labels, SimpleNamespace(scores=scores, faces=faces), variants[::2]) == []


def test_robustness_rows_of_the_same_images_resample_alike():
    """Every row's bootstrap uses --seed: two levels that score the same images draw the same
    resamples, so their intervals differ only by what the attack changed (here nothing), and
    the report's "seed S" is each row's seed."""
    import argparse
    from types import SimpleNamespace

    from fakespotter.cli.robustness import _rows

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    s = rng.normal(labels, 1.0)
    variants = [("clean", None), ("jpeg", 95), ("jpeg", 75)]
    moved = s + rng.normal(0, 0.5, len(s))
    scored = SimpleNamespace(scores={variants[0]: s, variants[1]: s.copy(), variants[2]: moved},
                             faces={v: np.ones(len(s), int) for v in variants})
    args = argparse.Namespace(bootstrap=200, seed=7)
    rows = _rows(labels, scored, variants, 0.5, args, None)
    assert rows[0]["ci"] == rows[1]["ci"] and rows[0]["auc"] == rows[1]["auc"]
    assert rows[2]["ci"] != rows[0]["ci"]


@pytest.mark.parametrize("cmd", ["evaluate", "robustness"])
def test_help_states_defaults(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f"usage: fakespotter {cmd}" in out and out.count("default") >= 10


@pytest.mark.parametrize("cmd", ["evaluate", "robustness"])
def test_bad_input_exits_2_before_work(setup, tmp_path, capsys, cmd):
    real, fake, model = setup["real"], setup["fake"], setup["model"]
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_model = tmp_path / "bad.fsm"
    bad_model.write_bytes(model.read_bytes()[:200])
    not_model = tmp_path / "notes.fsm"
    not_model.write_text("hello")
    out = tmp_path / "out"
    copy, other = shutil.copytree(real, tmp_path / "copy"), tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(other / "o.png")
    cases = [
        ([model, "--real", empty, "--fake", fake], r"--real: folder .*empty has no images"),
        ([model, "--real", real, "--fake", tmp_path / "missing"], r"--fake: .*missing does not exist"),
        ([model, "--real", real, "--fake", real], r"16 images are both real and fake"),
        ([model, "--real", real, real, "--fake", fake], r"16 images are listed more than once in --real"),
        ([model, "--real", real, "--fake", fake, "--seed", "-1"], r"--seed must be >= 0, got -1"),
        ([model, "--real", real, "--fake", copy], r"16 images are both real and fake, e\.g\. .* \(same bytes\)"),
        ([model, "--real", real, copy, "--fake", fake], r"16 images of --real are copies of another one \(each would "
                                                       r"be counted again\), e\.g\. .* \(same bytes\)"),
        ([model, "--real", real, "--fake", fake, "--baselines", "spectrum", "--train-real", copy, "--train-fake", copy],
         r"16 images are both real and fake training images"),
        ([model, "--real", real, "--fake", fake, "--baselines", "spectrum", "--train-real", copy, "--train-fake", other],
         r"16 images are both training and evaluation images, e\.g\. .* \(same bytes\)"),
        ([model, "--real", real, "--fake", fake, "--fake-type", "a", "b"], r"--fake-type names 2 types for 1 --fake sources"),
        ([bad_model, "--real", real, "--fake", fake], r"model refused: .*truncated"),
        ([not_model, "--real", real, "--fake", fake], r"model refused: "),
        ([tmp_path / "nope.fsm", "--real", real, "--fake", fake], r"MODEL .*nope.fsm does not exist \(a model file, or .default."),
        ([model, "--real", real, "--fake", fake, "--bootstrap", "-1"], r"--bootstrap must be >= 0"),
        ([model, "--real", real, "--fake", fake, "--out-dir", not_model], r"--out-dir .*notes.fsm is a file"),
        ([model, "--real", real, "--fake", fake, "--out-dir", tmp_path / "a" / "b"], r"folder .*a does not exist"),
        ([model, "--real", real, "--fake", fake, "--out-dir", fake],  # the plots would be read as images
         r"--out-dir .*fake holds input images; write the reports into another folder"),
        ([model, "--real", real, "--fake", fake, "--split", "val"], r"--split picks a split of --manifest"),
    ]
    if cmd == "robustness":  # an option that would be ignored
        cases.append(([model, "--real", real, "--fake", fake, "--augment-fraction", "0.3"],
                      r"--augment-fraction is the share of training chips --train-augment attacks; give "
                      r"--train-augment too"))
    for extra, pattern in cases:
        rc, stdout, err = run_cli([cmd, *extra, "--out-dir", out, "--quiet"] if "--out-dir" not in extra
                                  else [cmd, *extra, "--quiet"], capsys)
        assert rc == 2, (extra, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"fakespotter {cmd}: error: "), err
        assert re.search(pattern, err), (pattern, err)
        assert not out.exists() and stdout == ""
    out.mkdir()
    name = "report.md" if cmd == "evaluate" else "robustness.md"
    (out / name).write_text("keep")
    rc, _, err = run_cli([cmd, model, "--real", real, "--fake", fake, "--out-dir", out], capsys)
    assert rc == 2 and f"{name} already exists; pass --overwrite" in err and (out / name).read_text() == "keep"
    (out / name).unlink()
    (out / name).mkdir()  # an output that is a folder: refused before any work, even with --overwrite
    rc, _, err = run_cli([cmd, model, "--real", real, "--fake", fake, "--out-dir", out, "--overwrite"], capsys)
    assert rc == 2 and f"{name} exists and is not a file" in err
    # one class missing: a one-line usage error, exit 2
    rc, _, err = run_cli([cmd, model, "--real", real, "--out-dir", tmp_path / "out2"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--fake is missing" in err


def test_evaluate_warnings_and_old_plots(setup, tmp_path, capsys):
    """A fake type with no scored image and a small --bootstrap are warned about (stderr and the
    report's notes); --overwrite --no-plots removes the old plots, not files of their names that
    matplotlib did not draw."""
    nofaces = tmp_path / "nofaces"
    nofaces.mkdir()
    for i in range(2):
        Image.fromarray(np.full((150, 150, 3), 100 + i, np.uint8)).save(nofaces / f"{i}.png")
    out = tmp_path / "eval"
    out.mkdir()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig = plt.figure()
    fig.savefig(out / "roc.png")  # an old plot: removed, as it was drawn from other data
    plt.close(fig)
    (out / "det.png").write_text("the user's")  # not a plot of ours: left as it was
    (out / "metrics.json").write_text("old")
    rc, _, err = run_cli(["evaluate", setup["model"], "--real", setup["real_small"], "--fake", setup["fake_small"],
                          nofaces, "--fake-type", "dcgan", "blank", "--out-dir", out, "--bootstrap", "10",
                          "--no-plots", "--overwrite"], capsys)
    assert rc == 0, err
    assert "warning: group blank: none of its 2 images was scored" in err
    assert "warning: the intervals come from only 10 bootstrap resamples" in err
    md = (out / "report.md").read_text()
    assert "- group blank: none of its 2 images was scored" in md and "only 10 bootstrap resamples" in md
    assert sorted(p.name for p in out.iterdir()) == ["det.png", "metrics.csv", "metrics.json", "report.md"]
    assert (out / "det.png").read_text() == "the user's" and f"left {out / 'det.png'} as it was" in err


def test_reports_are_replaced_whole_and_a_full_disk_is_one_line(setup, tmp_path):
    """Each report goes under a temporary name, then is renamed: a file size limit leaves the
    old report as it was, no temporary file, and one line naming the file (exit 3). Non-UTF-8
    folder names are kept in the reports and drawn in the plots."""
    import resource
    import subprocess

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/fak\xe9"))
    shutil.copytree(setup["fake_small"], odd)
    args = [sys.executable, "-m", "fakespotter", "evaluate", str(setup["model"]), "--real", str(setup["real_small"]),
            "--fake", str(odd), "--aligned", "--out-dir", str(out), "--overwrite", "--quiet"]
    run = subprocess.run(args, capture_output=True, text=True, errors="surrogateescape", timeout=300,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY)))
    assert run.returncode == 3, run.stderr
    assert run.stderr.strip() == (f"fakespotter evaluate: error: cannot write {out / 'metrics.json'}: File too large; "
                                  f"from an earlier run, not this one: {out / 'metrics.json'}")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"] and (out / "metrics.json").read_text() == "old"
    run = subprocess.run(args, capture_output=True, text=True, errors="surrogateescape", timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["det.png", "metrics.csv", "metrics.json", "report.md", "roc.png"]
    assert b"fak\xe9" in (out / "metrics.csv").read_bytes()  # the name as its bytes


def test_robustness_augmented_counts_are_what_it_trained_on(setup, tmp_path, capsys):
    """Without a validation set the augmented model holds part of its training images out: the
    report counts the chips it trained on, not all it was given."""
    test = {}
    for cls in ("real", "fake"):  # the 8 images that are not in the *_small training folders
        test[cls] = tmp_path / cls
        test[cls].mkdir()
        for p in sorted(setup[cls].iterdir())[8:]:
            shutil.copy(p, test[cls])
    out = tmp_path / "rob"
    rc, _, err = run_cli(["robustness", setup["model"], "--real", test["real"], "--fake", test["fake"],
                          "--attacks", "noise", "--train-augment", "--train-real", setup["real_small"],
                          "--train-fake", setup["fake_small"], "--seed", "3", "--aligned", "--out-dir", out, "--bootstrap", "0",
                          "--no-plots", "--quiet"], capsys)
    assert rc == 0, err
    t = json.loads((out / "robustness.json").read_text())["detectors"]["fakespotter+augment"]["trained_on"]
    for cls in ("real", "fake"):
        assert t["validation"][cls] > 0 and t["train"][cls] + t["validation"][cls] == 8, t


def test_the_default_detector_says_its_training_images_cannot_be_checked():
    """The embedded default detector records no fingerprints of its training images (a review
    find: evaluate on a smaller sample build's train split gave AUC 0.98 without a word); a
    split of its own build is known either way."""
    from fakespotter.cli.evaluate import seen_in_training
    from fakespotter.detector import FakeSpotter

    det = FakeSpotter.default()
    assert det.training_images_ is None, "premise"
    (line,) = seen_in_training({"mode": "folders"}, det)
    assert line.startswith("the embedded default detector records no fingerprints of its training images")
    assert "the train and val splits of the sample data" in line
    own = det.training_summary_["sources"]["manifest_sha256"]
    for split, want in (("test", []), ("val", ["validated on split 'val'"]), ("train", ["trained on split 'train'"])):
        got = seen_in_training({"mode": "manifest", "sources": {"manifest_sha256": own, "split": split}}, det)
        assert len(got) == len(want) and all(w in g for w, g in zip(want, got)), (split, got)
    other = seen_in_training({"mode": "manifest", "sources": {"manifest_sha256": "0" * 64, "split": "test"}}, det)
    assert len(other) == 1 and "records no fingerprints" in other[0]
