"""``fakespotter train`` and ``fakespotter evaluate``: the bounds of their options taken at their
limits, which option an error names, and what the train report and the exit status say (from a
mutation audit of cli/train.py and cli/evaluate.py). Tiny noise images, --aligned, a few epochs."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from fakespotter.cli import main
from scan_helpers import write_images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_images(root / "real", 8, 0, 1.0), write_images(root / "fake", 8, 1, 2.5)


def run_cli(args, capsys):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def usage_error(capsys, args, pattern, cmd="train"):
    rc, out, err = run_cli([cmd, *args], capsys)
    assert rc == 2, (args, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"fakespotter {cmd}: error: "), err
    assert re.search(pattern, err), (pattern, err)
    return err


# ---------------------------------------------------------------- train: checks before any work

@pytest.mark.parametrize("extra, pattern", [
    (["--target-fpr", "0"], r"--target-fpr must be in \(0, 1\), got 0.0"),
    (["--target-fpr", "1"], r"--target-fpr must be in \(0, 1\), got 1.0"),
    (["--validation-fraction", "0"], r"--validation-fraction must be in \(0, 1\), got 0.0"),
    (["--validation-fraction", "1"], r"--validation-fraction must be in \(0, 1\), got 1.0"),
    (["--seed", "-1"], r"--seed must be >= 0, got -1"),
    (["--epochs", "0"], r"--epochs must be positive, got 0"),
])
def test_train_bounds_are_refused_at_their_limits(corpus, tmp_path, capsys, extra, pattern):
    real, fake = corpus
    usage_error(capsys, ["--real", real, "--fake", fake, *extra, "--out", tmp_path / "m.fsm"], pattern)
    assert not (tmp_path / "m.fsm").exists()


def test_train_fake_type_must_name_every_fake_source(corpus, tmp_path, capsys):
    """Fewer names than --fake folders: refused, not a source left without a type."""
    real, fake = corpus
    other = write_images(tmp_path / "other", 2, 5, 2.0)
    usage_error(capsys, ["--real", real, "--fake", fake, other, "--fake-type", "a", "--out", tmp_path / "m.fsm"],
                r"--fake-type names 1 types for 2 --fake sources")


@pytest.mark.parametrize("given", ["--val-real", "--val-fake"])
def test_train_manifest_refuses_either_validation_option(corpus, tmp_path, capsys, given):
    """With --manifest the val split validates: one --val-* alone is refused for that reason
    (before the manifest is read: this one does not exist)."""
    usage_error(capsys, ["--manifest", tmp_path / "nope.csv", given, corpus[0], "--out", tmp_path / "m.fsm"],
                r"with --manifest the validation images are its val split; drop --val-real/--val-fake")


def test_train_report_and_model_may_not_be_one_file(corpus, tmp_path, capsys):
    real, fake = corpus
    m = tmp_path / "m.fsm"
    usage_error(capsys, ["--real", real, "--fake", fake, "--out", m, "--report", tmp_path / "." / "m.fsm"],
                r"--report and --out name the same file")
    assert not m.exists()


def test_train_validation_fakes_may_not_be_training_fakes(corpus, tmp_path, capsys):
    real, fake = corpus
    vreal = write_images(tmp_path / "vreal", 2, 7, 1.0)
    usage_error(capsys, ["--real", real, "--fake", fake, "--val-real", vreal, "--val-fake", fake,
                         "--out", tmp_path / "m.fsm"], r"8 images are both training and validation images")


def test_train_a_bad_validation_fake_folder_is_named_as_such(corpus, tmp_path, capsys):
    real, fake = corpus
    vreal = write_images(tmp_path / "vreal", 2, 7, 1.0)
    usage_error(capsys, ["--real", real, "--fake", fake, "--val-real", vreal, "--val-fake", tmp_path / "missing",
                         "--out", tmp_path / "m.fsm"], r"^fakespotter train: error: --val-fake: .*missing does not exist")


# ---------------------------------------------------------------- train: what it writes

@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One training run with every option the report should echo: 10 real files (two
    undecodable), 6 fakes, 3 + 2 validation images, --augment, --target-tpr 1 (its upper bound)."""
    real, fake = corpus
    root = tmp_path_factory.mktemp("trained")
    mixed = shutil.copytree(real, root / "real")
    (mixed / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    (mixed / "zz_broken2.jpg").write_bytes(b"\xff\xd8 not a JPEG either")
    fakes = root / "fake"
    fakes.mkdir()
    for p in sorted(fake.iterdir())[:6]:
        shutil.copy(p, fakes / p.name)
    vreal, vfake = write_images(root / "vreal", 3, 7, 1.0), write_images(root / "vfake", 2, 8, 2.5)
    model, report = root / "m.fsm", root / "r.json"
    capture = pytest.MonkeyPatch()
    import io
    import sys

    out, err = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", out)
    capture.setattr(sys, "stderr", err)
    try:
        rc = main([str(a) for a in ["train", "--real", mixed, "--fake", fakes, "--val-real", vreal, "--val-fake", vfake,
                                    "--aligned", "--hidden", "4", "--epochs", "2", "--seed", "3", "--augment",
                                    "--augment-fraction", "0.3", "--target-tpr", "1", "--out", model,
                                    "--report", report, "--quiet"]])
    finally:
        capture.undo()
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "model": model, "report": report,
            "real": mixed, "fake": fakes}


def test_train_with_an_unreadable_image_writes_the_model_and_exits_1(trained):
    assert trained["rc"] == 1, trained["err"]
    assert trained["out"].startswith(f"wrote {trained['model']}: validation AUC ")
    assert trained["out"].endswith("; 2 unreadable images\n")
    broken = [trained["real"] / "zz_broken.jpg", trained["real"] / "zz_broken2.jpg"]
    assert [line.split(": ")[1] for line in trained["err"].splitlines()] == [str(p) for p in broken]
    rep = json.loads(trained["report"].read_text())
    assert [f["path"] for f in rep["failures"]] == [str(p) for p in broken]
    assert rep["training"]["sources"]["unreadable_images"] == 2


def test_train_report_counts_each_class_and_validation_side(trained):
    rep = json.loads(trained["report"].read_text())
    assert rep["training"]["counts"]["images"] == {"real": 10, "fake": 6}
    v = rep["training"]["sources"]["validation"]
    assert v["images"] == {"real": 3, "fake": 2}


def test_train_options_reach_the_model(trained):
    """--hidden, --epochs, --seed, --target-tpr (1 is allowed) and the --augment seed are the model's."""
    rep = json.loads(trained["report"].read_text())
    p = rep["parameters"]
    assert (p["hidden"], p["max_epochs"], p["seed"], p["target_tpr"]) == ([4], 2, 3, 1.0)
    a = rep["training"]["augmentation"]
    assert (a["fraction"], a["seed"]) == (0.3, 3)
    assert rep["operating_threshold"]["target_tpr"] == 1.0


@pytest.mark.parametrize("n_val, fpr, warned", [(4, "0.25", None), (3, "0.3", 4)])
def test_train_warns_of_an_unmeasurable_fpr_only_below_one_false_positive(corpus, tmp_path, capsys, n_val, fpr,
                                                                          warned):
    """4 validation reals measure an FPR of 0.25 (one false positive); 3 cannot measure 0.3: it
    takes ceil(1 / 0.3) = 4."""
    real, fake = corpus
    vreal, vfake = write_images(tmp_path / "vreal", n_val, 7, 1.0), write_images(tmp_path / "vfake", 2, 8, 2.5)
    rc, out, err = run_cli(["train", "--real", real, "--fake", fake, "--val-real", vreal, "--val-fake", vfake,
                            "--aligned", "--hidden", "4", "--epochs", "2", "--target-fpr", fpr,
                            "--out", tmp_path / "m.fsm", "--quiet"], capsys)
    assert rc == 0 and out.startswith("wrote "), err
    if warned is None:
        assert err == ""
    else:
        assert err == (f"warning: an FPR of {fpr} cannot be measured on {n_val} validation reals (it takes {warned}): "
                       f"the threshold lets none of them through; give more validation reals, or pick it with "
                       f"--target-tpr\n")


def test_train_reports_images_without_faces_by_class(corpus, tmp_path, capsys, monkeypatch):
    """Each class's images without a face are its own (the loader stands in for a detector
    that found no face in one real image)."""
    from fakespotter.cli import train

    load = train.load_chips

    def one_real_without_a_face(paths, args, size, label, quiet, failures):
        x, index, missing = load(paths, args, size, label, quiet, failures)
        return x, index, missing + (label == "real")

    monkeypatch.setattr(train, "load_chips", one_real_without_a_face)
    real, fake = corpus
    report = tmp_path / "r.json"
    rc, _, err = run_cli(["train", "--real", real, "--fake", fake, "--aligned", "--hidden", "4", "--epochs", "2",
                          "--augment", "--out", tmp_path / "m.fsm", "--report", report], capsys)
    assert rc == 0, err
    assert "training on 8 real and 8 fake chips (augmented) ..." in err  # (not --quiet)
    rep = json.loads(report.read_text())
    assert rep["training"]["sources"]["images_without_faces"] == {"real": 1, "fake": 0}
    assert rep["training"]["counts"]["images_without_faces"] == {"real": 1, "fake": 0}


def build_manifest(root, split, n):
    """A manifest of n noise reals and n noise fakes (two fake types, two generators, one group
    per image), all in ``split``."""
    from fakespotter.manifest import ManifestRow, file_sha256, write_manifest

    rows = []
    for cls, seed, power in (("real", 40, 1.0), ("fake", 41, 2.5)):
        write_images(root / cls, n, seed, power)
        for i in range(n):
            name = f"{cls}/{i:03d}.png"
            fake_type, generator = (("local_manipulation", "g1"), ("entire_synthesis", "g0"))[i % 2]
            rows.append(ManifestRow(name, file_sha256(root / name), cls, fake_type if cls == "fake" else "",
                                    generator if cls == "fake" else "", "pypi:x==1", f"{cls}{i}", split, "test"))
    write_manifest(rows, root)
    return root


def test_train_from_a_manifest_names_its_sources_by_split_and_type(tmp_path, capsys):
    root = build_manifest(tmp_path / "ds", "train", 6)
    report = tmp_path / "r.json"
    rc, _, err = run_cli(["train", "--manifest", root, "--hidden", "4", "--epochs", "2", "--out", tmp_path / "m.fsm",
                          "--report", report, "--quiet"], capsys)
    assert rc == 0, err
    sources = json.loads(report.read_text())["training"]["sources"]
    assert sources["real"] == [{"source": f"{root}:train:real", "images": 6}]
    assert sources["fake"] == [{"source": f"{root}:train:local_manipulation", "type": "local_manipulation", "images": 3},
                               {"source": f"{root}:train:entire_synthesis", "type": "entire_synthesis", "images": 3}]
    assert sources["inputs"] == "aligned chips, resized"
    assert sources["manifest"]["split"] == "train" and sources["manifest"]["validation"] == ("held out from the split "
                                                                                             "by group")


def test_train_a_manifest_val_split_without_a_chip_is_named_in_words(tmp_path, capsys):
    """The val split's one real is not an image: the refusal names the class and the split."""
    import dataclasses

    from fakespotter.manifest import file_sha256, read_manifest, write_manifest

    root = build_manifest(tmp_path / "ds", "val", 2)
    (root / "real" / "000.png").write_bytes(b"not an image")
    rows = [dataclasses.replace(r, split="train") if r.file.endswith("001.png") else
            dataclasses.replace(r, sha256=file_sha256(root / r.file)) for r in read_manifest(root).rows]
    write_manifest(rows, root)
    usage_error(capsys, ["--manifest", root, "--out", tmp_path / "m.fsm", "--quiet"],
                r"^fakespotter train: error: no real image of the manifest's val split gave a face chip "
                r"\(0 without a face, 1 unreadable\); check the inputs; the first unreadable: .*000.png")


# ---------------------------------------------------------------- evaluate: checks before any work

def test_evaluate_usage_errors_before_the_model_is_read(corpus, tmp_path, capsys):
    """Each is refused before MODEL is read (this one does not exist), nothing written."""
    real, fake = corpus
    other = write_images(tmp_path / "other", 2, 5, 1.0)
    train_real, train_fake = write_images(tmp_path / "tr", 2, 11, 1.0), write_images(tmp_path / "tf", 2, 12, 2.5)
    out = tmp_path / "out"
    model = tmp_path / "nope.fsm"
    cases = [
        (["--real", real, other, "--fake", fake, "--real-source", "a"], r"--real-source names 1 sources for 2 --real "
                                                                        r"sources"),
        (["--manifest", tmp_path / "nope.csv", "--real-source", "a"],
         r"--real-source names --real folders; a manifest names its own sources"),
        (["--real", real, "--fake", fake, "--upsample", "-1"], r"--upsample must be >= 0, got -1"),
        (["--real", real, "--fake", fake, "--threshold", "inf"], r"--threshold must be a finite logit, got inf"),
        (["--real", real, "--fake", fake, "--threshold", "nan"], r"--threshold must be a finite logit, got nan"),
        (["--real", real, "--fake", fake, "--baselines", " , "], r"--baselines names no baseline"),
        (["--real", real, "--fake", fake, "--baselines", "nosuch"], r"--baselines: unknown baseline 'nosuch'"),
        (["--real", real, "--fake", fake, "--train-real", train_real],
         r"--train-real/--train-fake are the training images of --baselines without a manifest"),
        (["--real", real, "--fake", fake, "--train-fake", train_fake],
         r"--train-real/--train-fake are the training images of --baselines without a manifest"),
        (["--real", real, "--fake", fake, "--baselines", "spectrum", "--train-real", train_real],
         r"--baselines without a manifest needs training images: --train-real DIR... and --train-fake DIR..."),
        (["--real", real, "--fake", fake, "--baselines", "spectrum", "--train-real", train_real, "--train-fake",
          train_fake, "--out-dir", train_real], r"--out-dir .*tr holds input images"),
    ]
    for extra, pattern in cases:
        args = [model, *extra, "--quiet"] + ([] if "--out-dir" in extra else ["--out-dir", out])
        usage_error(capsys, args, pattern, cmd="evaluate")
        assert not out.exists()


def test_train_a_backbone_error_is_its_first_line_only(corpus, tmp_path, capsys, monkeypatch):
    import fakespotter.backbones as backbones

    def broken(name):
        raise RuntimeError("weights file is damaged\n  detail one\n  detail two")

    monkeypatch.setattr(backbones, "get_backbone", broken)
    real, fake = corpus
    err = usage_error(capsys, ["--real", real, "--fake", fake, "--out", tmp_path / "m.fsm"],
                      r"weights file is damaged$")
    assert "detail" not in err


def test_train_validation_without_a_face_hints_aligned(corpus, tmp_path, capsys):
    """Noise has no face for the detector: the refusal names --val-real and suggests --aligned."""
    real, fake = corpus
    vreal, vfake = write_images(tmp_path / "vreal", 2, 7, 1.0), write_images(tmp_path / "vfake", 2, 8, 2.5)
    usage_error(capsys, ["--real", real, "--fake", fake, "--val-real", vreal, "--val-fake", vfake,
                         "--out", tmp_path / "m.fsm", "--quiet"],
                r"no --val-real image gave a face chip \(2 without a face, 0 unreadable\); check the inputs or pass "
                r"--aligned$")


def test_evaluate_refuses_an_out_dir_it_cannot_write(corpus, tmp_path, capsys, monkeypatch):
    """Write permission is checked, not only search (os.access stands in for a read-only folder:
    root writes anywhere)."""
    import os

    real, fake = corpus
    out = tmp_path / "out"
    out.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else access(p, mode, **kw))
    usage_error(capsys, [tmp_path / "nope.fsm", "--real", real, "--fake", fake, "--out-dir", out],
                r"--out-dir .*out: cannot write there", cmd="evaluate")


# ---------------------------------------------------------------- evaluate: what it writes

@pytest.fixture(scope="module")
def model(corpus, tmp_path_factory):
    real, fake = corpus
    m = tmp_path_factory.mktemp("model") / "m.fsm"
    assert main(["train", "--real", str(real), "--fake", str(fake), "--aligned", "--hidden", "4", "--epochs", "2",
                 "--target-tpr", "0.8", "--out", str(m), "--quiet"]) == 0
    return m


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """6 readable reals and 2 undecodable files, 5 fakes (other noise than the training corpus)."""
    root = tmp_path_factory.mktemp("evalset")
    real, fake = write_images(root / "er", 6, 20, 1.0), write_images(root / "ef", 5, 21, 2.5)
    for name in ("zz1.jpg", "zz2.jpg"):
        (real / name).write_bytes(b"\xff\xd8 not a JPEG: " + name.encode())
    write_images(root / "one", 1, 22, 2.5)  # a fake type of one image
    return real, fake


def test_evaluate_without_intervals_at_a_threshold_exits_1_for_unreadable_images(model, eval_set, tmp_path, capsys,
                                                                                  monkeypatch):
    import fakespotter.evaluate as ev

    real, fake = eval_set
    out = tmp_path / "ev"
    upsample = []
    score = ev.score_images_with
    monkeypatch.setattr(ev, "score_images_with", lambda *a, **kw: upsample.append(kw["upsample"]) or score(*a, **kw))
    rc, stdout, err = run_cli(["evaluate", model, "--real", real, "--fake", fake, "--aligned", "--bootstrap", "0",
                               "--threshold", "0.5", "--upsample", "3", "--no-plots", "--out-dir", out, "--quiet"],
                              capsys)
    assert rc == 1, err
    assert upsample == [3]  # --upsample reaches the face detector
    assert stdout.endswith(f"wrote {out / 'metrics.json'}, {out / 'metrics.csv'}, {out / 'report.md'}\n")
    assert [line.split(": ")[1] for line in err.splitlines()] == [str(real / "zz1.jpg"), str(real / "zz2.jpg")]
    assert "warning" not in err  # (no caveat of few bootstrap resamples with none)
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["settings"]["threshold"] == 0.5 and rep["settings"]["bootstrap"] == 0
    assert rep["settings"]["operating_threshold"] == pytest.approx(rep["model"]["operating_threshold"]["logit"])
    assert rep["counts"]["real"] == {"images": 8, "scored": 6, "without_face": 0, "unreadable": 2}
    assert rep["images_without_face"] == []  # (the unreadable ones are not)
    md = (out / "report.md").read_text()
    assert "- ACC, precision, recall, F1 at logit 0.5; no intervals (--bootstrap 0)\n" in md


@pytest.mark.parametrize("n, warned", [(199, True), (200, False)])
def test_evaluate_warns_of_few_bootstrap_resamples_below_200(model, eval_set, tmp_path, capsys, n, warned):
    """... and of nothing else: a fake type with one scored image has its row."""
    real, fake = eval_set
    rc, _, err = run_cli(["evaluate", model, "--real", real, "--fake", fake, fake.parent / "one", "--aligned",
                          "--bootstrap", n, "--no-plots", "--out-dir", tmp_path / "ev", "--quiet"], capsys)
    assert rc == 1, err
    line = f"warning: the intervals come from only {n} bootstrap resamples: rough (1000 or more for reporting)"
    assert [x for x in err.splitlines() if x.startswith("warning")] == ([line] if warned else []), err
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "| one | fake | 6 | 1 |" in md


def test_evaluate_a_class_without_a_scored_image_names_its_own_unreadable_one_and_hints_aligned(model, eval_set,
                                                                                                  tmp_path, capsys):
    """Noise has no face for the detector: no real is scored; the first unreadable named is a real."""
    real, fake = eval_set
    err = usage_error(capsys, [model, "--real", real, "--fake", fake, "--no-plots", "--out-dir", tmp_path / "ev",
                               "--quiet"], "", cmd="evaluate")
    assert err.startswith(f"fakespotter evaluate: error: no real image could be scored (6 without a face, 2 unreadable; "
                          f"the first unreadable: {real / 'zz1.jpg'}: "), err
    assert err.endswith("); check the inputs or pass --aligned\n"), err


def test_seen_in_training_says_why_and_which_splits_are_unseen():
    """The warning for a manifest split the model's file says it was trained / validated on."""
    from types import SimpleNamespace

    from fakespotter.cli.evaluate import seen_in_training

    def said(split, manifest):
        det = SimpleNamespace(training_summary_={"sources": {"manifest": manifest}})
        return seen_in_training({"mode": "manifest", "sources": {"split": split, "manifest_sha256": "abc"}}, det)

    held_out = {"sha256": "abc", "split": "train", "validation": "held out from the split by group"}
    assert said("train", held_out) == [
        "the model was trained on split 'train' of this manifest (its classifier learnt these images): these metrics "
        "are optimistic; evaluate on a split it has not seen (test or val)"]
    assert said("val", held_out) == []
    with_val = {"sha256": "abc", "split": "train", "validation": "val"}
    assert said("val", with_val) == [
        "the model was validated on split 'val' of this manifest (its early stopping and operating threshold were "
        "chosen on these images): these metrics are optimistic; evaluate on a split it has not seen (test)"]
    assert said("test", with_val) == []
    assert said("train", {**with_val, "sha256": "other"}) == []  # another manifest: no such warning


def test_evaluate_an_unreadable_baseline_training_image_is_named_and_exit_1(model, tmp_path, capsys):
    real, fake = write_images(tmp_path / "r", 5, 30, 1.0), write_images(tmp_path / "f", 5, 31, 2.5)
    train_real, train_fake = write_images(tmp_path / "tr", 8, 32, 1.0), write_images(tmp_path / "tf", 8, 33, 2.5)
    (train_real / "zz.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    rc, _, err = run_cli(["evaluate", model, "--real", real, "--fake", fake, "--aligned", "--baselines", "spectrum",
                          "--train-real", train_real, "--train-fake", train_fake, "--bootstrap", "0", "--no-plots",
                          "--out-dir", tmp_path / "ev", "--quiet"], capsys)
    assert rc == 1, err
    assert err.startswith(f"  unreadable training image: {train_real / 'zz.jpg'}: "), err
    rep = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert rep["failures"] == [] and [f["path"] for f in rep["training_failures"]] == [str(train_real / "zz.jpg")]


def test_model_augmenter_rebuilds_the_models_augmenter(trained):
    """The fs-* ablations repeat a model's --augment: its fraction, seed and attacks."""
    from fakespotter.cli.evaluate import model_augmenter
    from fakespotter.detector import FakeSpotter

    a = model_augmenter(FakeSpotter.load(trained["model"]))
    assert type(a).__name__ == "Augmenter" and (a.fraction, a.seed) == (0.3, 3)


def test_evaluate_a_manifest_split_is_named_in_the_report(model, tmp_path, capsys):
    root = build_manifest(tmp_path / "ds", "test", 4)
    out = tmp_path / "ev"
    rc, _, err = run_cli(["evaluate", model, "--manifest", root, "--bootstrap", "0", "--no-plots", "--out-dir", out,
                          "--quiet"], capsys)
    assert rc == 0, err
    assert f"- manifest {root}, split test (aligned chips)\n" in (out / "report.md").read_text()
    sources = json.loads((out / "metrics.json").read_text())["sources"]  # (counts by name, sorted)
    assert list(sources["fake_types"].items()) == [("entire_synthesis", 2), ("local_manipulation", 2)]
    assert list(sources["generators"].items()) == [("g0", 2), ("g1", 2)]


@pytest.mark.parametrize("seed, warned", [(3, True), (4, False)])
def test_robustness_says_when_the_model_had_the_same_augmentation(trained, tmp_path, capsys, monkeypatch, seed,
                                                                  warned):
    """--train-augment of the model's own fraction and seed repeats the model: said before any
    training (which is stopped here); another seed is another augmentation."""
    from fakespotter.cli import robustness

    class Stop(Exception):
        pass

    def stop(*a, **kw):
        raise Stop

    monkeypatch.setattr(robustness, "train_detectors", stop)
    real, fake = write_images(tmp_path / "r", 2, 50, 1.0), write_images(tmp_path / "f", 2, 51, 2.5)
    with pytest.raises(Stop):
        main([str(a) for a in ["robustness", trained["model"], "--real", real, "--fake", fake, "--aligned",
                               "--train-augment", "--augment-fraction", "0.3", "--seed", seed,
                               "--train-real", trained["real"], "--train-fake", trained["fake"],
                               "--out-dir", tmp_path / "out", "--quiet"]])
    err = capsys.readouterr().err
    said = "warning: --train-augment: the model was trained with this augmentation already (fraction 0.3, seed 3)"
    assert (said in err) is warned and ("warning" in err) is warned, err


def test_evaluate_refuses_an_output_that_is_a_fifo_even_with_overwrite(corpus, tmp_path, capsys):
    import os

    real, fake = corpus
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "metrics.json")
    usage_error(capsys, [tmp_path / "nope.fsm", "--real", real, "--fake", fake, "--out-dir", out, "--overwrite"],
                r"metrics.json exists and is not a file; it cannot be replaced by a report", cmd="evaluate")


def test_side_by_side_titles_name_each_groups_kind():
    from fakespotter.cli.evaluate import side_by_side_markdown

    rows = [{"detector": "fakespotter", "kind": "fake_type", "group": "entire_synthesis", "class": "fake", "AUC": 0.5},
            {"detector": "fakespotter", "kind": "source", "group": "s1", "class": "real", "AUC": 0.7},
            {"detector": "fakespotter", "kind": "all", "group": "all", "class": "all", "AUC": 0.6}]
    text = side_by_side_markdown({"label_columns": ["detector", "kind", "group", "class"], "rows": rows},
                                 columns=["AUC"])
    assert [line for line in text.splitlines() if line.startswith("###")] == [
        "### fake type entire_synthesis: its fakes against all reals", "### source s1: its reals against all fakes",
        "### all images"]
