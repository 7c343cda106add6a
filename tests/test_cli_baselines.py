"""``train`` / ``evaluate`` / ``robustness`` over a manifest, with baselines side by side and
--train-augment, and their usage errors (exit 2, one line, before any work)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fakespotter.cli import main
from fakespotter.manifest import ManifestRow, file_sha256, write_manifest


def _build(root, x, y, splits=("train",) * 6 + ("val",) * 2 + ("test",) * 4):
    """A manifest of aligned JPEG chips: per class, chips in the order of ``splits``; reals from
    two sources, fakes of two types / generators; a group per real, a group per two fakes."""
    rows, k = [], {0: 0, 1: 0}
    for chip, lab in zip(x, y):
        i = k[int(lab)]
        k[int(lab)] += 1
        if i >= len(splits):
            continue
        if lab == 0:
            name, ft, gen, src, grp = f"real/{i:03d}.jpg", "", "", f"pypi:src{i % 2}==1", f"r{i}"
        else:
            name, src, grp = f"fake/{i:03d}.jpg", "pypi:gan-face-generate==1.1.1", f"f{i // 2}"
            ft, gen = ("entire_synthesis", "dcgan") if i % 2 else ("local_manipulation", "dcgan_blend")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(chip).save(root / name, quality=95)
        rows.append(ManifestRow(name, file_sha256(root / name), "fake" if lab else "real", ft, gen, src, grp,
                                splits[i], "test"))
    write_manifest(rows, root)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    samples = pytest.importorskip("fakespotter.samples")
    try:
        x, y, _ = samples.sample_chips(12, 12, seed=0)
    except Exception as e:
        pytest.skip(f"sample data unavailable ({e}); run: python -m fakespotter.samples fetch")
    root = tmp_path_factory.mktemp("blcli")
    manifest = _build(root / "ds", x, y)
    model = root / "tiny.fsm"
    rc = main(["train", "--manifest", str(manifest.parent), "--out", str(model), "--hidden", "8", "--epochs", "5",
               "--quiet"])
    assert rc == 0
    return {"root": root, "manifest": manifest, "model": model, "x": x, "y": y}


def run_cli(args, capsys):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_train_from_manifest_uses_train_and_val_splits(setup):
    from fakespotter.detector import FakeSpotter

    det = FakeSpotter.load(setup["model"])
    t = det.training_summary_
    assert t["counts"]["train"] == {"real": 6, "fake": 6} and t["counts"]["validation"] == {"real": 2, "fake": 2}
    assert t["sources"]["manifest"]["validation"] == "val" and t["sources"]["inputs"] == "aligned chips, resized"
    assert det.aligned is False  # it detects faces in the photos given to it later, as scan does
    assert t["augmentation"] is None


def test_train_augment(setup, tmp_path, capsys):
    from fakespotter.detector import FakeSpotter

    out = tmp_path / "aug.fsm"
    rc, stdout, err = run_cli(["train", "--manifest", setup["manifest"], "--out", out, "--hidden", "8", "--epochs", "5",
                               "--augment", "--augment-fraction", "0.5", "--quiet"], capsys)
    assert rc == 0, err
    aug, plain = FakeSpotter.load(out), FakeSpotter.load(setup["model"])
    assert aug.training_summary_["augmentation"] == {"type": "Augmenter", "fraction": 0.5, "seed": 0,
                                                     "attacks": ["jpeg", "blur", "resize", "noise"]}
    # the augmented chips changed the calibrated thresholds
    assert not all(bool((a == b).all()) for a, b in zip(aug.thresholds_.values, plain.thresholds_.values))
    # an ablation of an augmented model is trained with the same augmentation: it changes one setting
    rc, _, err = run_cli(["evaluate", out, "--manifest", setup["manifest"], "--baselines", "fs-per-neuron",
                          "--out-dir", tmp_path / "ev", "--bootstrap", "0", "--no-plots", "--quiet"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert rep["detectors"]["fs-per-neuron"]["augmentation"] == aug.training_summary_["augmentation"]


def test_an_ablation_that_changes_nothing_is_the_model_whatever_the_seed_given(setup, tmp_path, capsys):
    """The ablations took --seed (default 0) for the model's own seed: one whose setting is the
    model's (fs-channel of a channel model) gave other scores than the model's."""
    out = tmp_path / "s3.fsm"
    rc, _, err = run_cli(["train", "--manifest", setup["manifest"], "--out", out, "--hidden", "8", "--epochs", "5",
                          "--seed", "3", "--quiet"], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["evaluate", out, "--manifest", setup["manifest"], "--baselines", "fs-channel", "--out-dir",
                          tmp_path / "ev", "--bootstrap", "0", "--no-plots", "--quiet"], capsys)
    assert rc == 0, err
    rows = json.loads((tmp_path / "ev" / "metrics.json").read_text())["rows"]
    model, ablation = ([r for r in rows if r["detector"] == d] for d in ("fakespotter", "fs-channel"))
    drop = ("detector",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in model] == \
        [{k: v for k, v in r.items() if k not in drop} for r in ablation]


def test_evaluate_manifest_with_baselines(setup, tmp_path, capsys):
    out = tmp_path / "ev"
    rc, stdout, err = run_cli(["evaluate", setup["model"], "--manifest", setup["manifest"], "--baselines",
                               "spectrum,mnc-only,fs-per-neuron", "--out-dir", out, "--bootstrap", "20", "--quiet"], capsys)
    assert rc == 0, err
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["label_columns"] == ["detector", "kind", "group", "class"]
    dets = ["fakespotter", "spectrum", "mnc-only", "fs-per-neuron"]
    assert list(rep["detectors"]) == dets
    groups = [("all", "all"), ("fake_type", "local_manipulation"), ("fake_type", "entire_synthesis"),
              ("generator", "dcgan_blend"), ("generator", "dcgan"), ("source", "pypi:src0==1"), ("source", "pypi:src1==1")]
    assert [(r["detector"], r["kind"], r["group"]) for r in rep["rows"]] == [(d, k, g) for d in dets for k, g in groups]
    for r in rep["rows"]:
        n = (4, 4) if r["kind"] == "all" else (4, 2) if r["class"] == "fake" else (2, 4)
        assert (r["n_real"], r["n_fake"]) == n, r
        assert 0 <= r["auc"] <= 1
    for d in dets[1:]:
        t = rep["detectors"][d]["trained_on"]
        assert t["split"] == "train" and t["validation_from"] == "val" and t["train"] == {"real": 6, "fake": 6}
        assert t["validation"] == {"real": 2, "fake": 2}
    table = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(table) == len(rep["rows"]) and table[0]["detector"] == "fakespotter" and "auc_lo" in table[0]
    md = (out / "report.md").read_text()
    assert "### all images" in md and "### generator dcgan: its fakes against all reals" in md
    assert "| detector | n_real | n_fake | AUC |" in md and "| fs-per-neuron | 4 | 4 |" in md
    assert "### source pypi:src1==1: its reals against all fakes" in stdout


@pytest.mark.parametrize("split, said", [("train", "trained"), ("val", "validated"), ("test", None)])
def test_evaluate_warns_of_a_split_the_model_was_trained_on(setup, tmp_path, capsys, split, said):
    """The model file records the manifest (its sha256) and split it learnt from: evaluating it
    there measures fit, and would go unnoticed in a table of numbers."""
    for cmd, extra in (("evaluate", []), ("robustness", ["--attacks", "noise"])):
        rc, _, err = run_cli([cmd, setup["model"], "--manifest", setup["manifest"], "--split", split,
                              "--out-dir", tmp_path / cmd, "--bootstrap", "0", "--no-plots", "--quiet", *extra], capsys)
        assert rc == 0, err
        warning = f"warning: the model was {said} on split '{split}' of this manifest"
        assert (warning in err) == (said is not None), err
        assert said is None or "evaluate on a split it has not seen (test)" in err
        report = tmp_path / cmd / ("report.md" if cmd == "evaluate" else "robustness.md")
        assert (f"the model was {said} on split" in report.read_text()) == (said is not None)
    # another manifest (another build, other splits) is not the one it was trained on
    other = _build(tmp_path / "ds2", setup["x"], setup["y"], splits=("test",) * 4 + ("val",) * 2 + ("train",) * 6)
    rc, _, err = run_cli(["evaluate", setup["model"], "--manifest", other.parent, "--split", split, "--out-dir",
                          tmp_path / "o", "--bootstrap", "0", "--no-plots", "--quiet"], capsys)
    assert rc == 0 and "warning: the model was" not in err, err


def test_robustness_manifest_with_baseline_and_train_augment(setup, tmp_path, capsys):
    out = tmp_path / "rob"
    rc, stdout, err = run_cli(["robustness", setup["model"], "--manifest", setup["manifest"], "--attacks", "noise",
                               "--baselines", "spectrum", "--train-augment", "--out-dir", out, "--bootstrap", "10",
                               "--quiet"], capsys)
    assert rc == 0, err
    assert "repeats the model" not in err  # (trained without augmentation)
    rep = json.loads((out / "robustness.json").read_text())
    dets = ["fakespotter", "fakespotter+augment", "spectrum"]
    assert list(rep["detectors"]) == dets and rep["label_columns"] == ["detector", "attack", "level"]
    levels = [("clean", "-"), ("noise", 0.01), ("noise", 0.03), ("noise", 0.05), ("noise", 0.1)]
    assert [(r["detector"], r["attack"], r["level"]) for r in rep["rows"]] == [(d, a, lv) for d in dets for a, lv in levels]
    assert all(r["n_real"] == 4 and r["n_fake"] == 4 for r in rep["rows"])
    aug = rep["detectors"]["fakespotter+augment"]
    assert aug["augmentation"]["fraction"] == 0.5 and aug["trained_on"]["train"] == {"real": 6, "fake": 6}
    clean = {r["detector"]: r["mean_score_real"] for r in rep["rows"] if r["attack"] == "clean"}
    assert clean["fakespotter"] != clean["fakespotter+augment"]  # a different, retrained model
    md = (out / "robustness.md").read_text()
    assert "## AUC" in md and "| attack | level | fakespotter | fakespotter+augment | spectrum |" in md
    assert "## TPR@op (fakes caught)" in md and "## FPR@op (reals flagged)" in md and "## ACC@op" not in md
    assert "## fakespotter+augment" in md and "| noise | 0.1 |" in stdout
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"


def test_train_augment_says_when_the_model_had_the_same_augmentation(setup, tmp_path, capsys):
    """A model trained with train --augment, retrained by robustness --train-augment with the same
    fraction and seed on the same split, is the same model: its column would repeat the model's."""
    from fakespotter.detector import FakeSpotter

    det = FakeSpotter.load(setup["model"])
    det.training_summary_["augmentation"] = {"type": "Augmenter", "fraction": 0.5, "seed": 0,
                                             "attacks": ["jpeg", "blur", "resize", "noise"]}
    det.save(tmp_path / "aug.fsm")
    said = "warning: --train-augment: the model was trained with this augmentation already (fraction 0.5, seed 0)"
    for seed, warned in (("0", True), ("1", False)):
        rc, _, err = run_cli(["robustness", tmp_path / "aug.fsm", "--manifest", setup["manifest"], "--attacks",
                              "noise", "--train-augment", "--seed", seed, "--out-dir", tmp_path / seed, "--bootstrap",
                              "0", "--no-plots", "--quiet"], capsys)
        assert rc == 0 and (said in err) == warned, err


@pytest.mark.parametrize("cmd", ["evaluate", "robustness", "train"])
def test_manifest_usage_errors(setup, tmp_path, capsys, cmd):
    root, x, y = setup["root"], setup["x"], setup["y"]
    manifest, model = setup["manifest"], setup["model"]
    missing = _build(tmp_path / "missing", x, y)
    (missing.parent / "fake" / "001.jpg").unlink()  # a train file
    (missing.parent / "fake" / "010.jpg").unlink()  # a test file
    no_test = _build(tmp_path / "notest", x, y, splits=("train",) * 8 + ("val",) * 4)
    one_class = tmp_path / "oneclass"
    one_class.mkdir()
    from fakespotter.manifest import read_manifest

    rows = [r if not (r.split == "test" and r.is_fake) else r.__class__(**{**r.__dict__, "split": "val"})
            for r in read_manifest(manifest, check_files=False).rows]
    import shutil

    shutil.copytree(manifest.parent, one_class, dirs_exist_ok=True)
    # the moved rows take their groups' other members along (splits are made by group)
    moved = {r.group for r in rows if r.split == "val" and r.is_fake}
    write_manifest([r.__class__(**{**r.__dict__, "split": "val"}) if r.group in moved else r for r in rows], one_class)
    real_dir = tmp_path / "reals"
    real_dir.mkdir()
    Image.fromarray(x[0]).save(real_dir / "a.png")
    out = tmp_path / "out"
    head = [model] if cmd != "train" else []
    tail = ["--out-dir", out] if cmd != "train" else ["--out", tmp_path / "m.fsm"]
    cases = [
        ([], r"give the images: --manifest PATH, or --real DIR\.\.\. and --fake DIR\.\.\."),
        (["--manifest", manifest, "--real", real_dir], r"give either --manifest or --real/--fake, not both"),
        (["--real", real_dir], r"--fake is missing: give both --real and --fake"),
        (["--manifest", missing], r"--manifest: .*1 of \d+ listed files are missing under .*\(fake/0(01|10)\.jpg\)"),
        (["--manifest", tmp_path / "nowhere"], r"--manifest: no manifest at .*nowhere"),
    ]
    if cmd != "train":
        cases += [
            (["--manifest", no_test], r"split 'test' \(evaluation\) has no rows"),
            (["--manifest", one_class], r"split 'test' \(evaluation\) has no fake images"),
            (["--manifest", manifest, "--baselines", "spectrum,cnn"],
             r"--baselines: unknown baseline 'cnn'; choose from descriptor-probe, spectrum, mnc-only, fs-channel, "
             r"fs-element, fs-per-layer, fs-per-neuron or all"),
            *((["--manifest", manifest, "--baselines", "spectrum", "--split", split],
               r"--baselines trains on the manifest's train split and picks its operating threshold on val; evaluate "
               r"on --split test$") for split in ("train", "val")),
            (["--real", real_dir, "--fake", real_dir.parent / "fake_nope", "--baselines", "spectrum"],
             r"--fake: .*fake_nope does not exist"),
            (["--real", real_dir, "--fake", root / "ds" / "fake", "--baselines", "spectrum"],
             r"--baselines without a manifest needs training images: --train-real DIR\.\.\. and --train-fake DIR\.\.\."),
            (["--real", real_dir, "--fake", root / "ds" / "fake", "--train-real", real_dir],
             r"--train-real/--train-fake are the training images of --baselines " +
             ("or --train-augment " if cmd == "robustness" else "") + "without a manifest$"),
            (["--manifest", manifest, "--baselines", "spectrum", "--train-fake", real_dir],
             r"with --manifest the training images are its train split; drop --train-real/--train-fake$"),
        ]
    else:
        cases += [(["--manifest", no_test, "--split", "test"], r"split 'test' \(training\) has no rows")]
    for extra, pattern in cases:
        rc, stdout, err = run_cli([cmd, *head, *extra, *tail, "--quiet"], capsys)
        assert rc == 2, (extra, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"fakespotter {cmd}: error: "), err
        assert re.search(pattern, err), (pattern, err)
        assert not out.exists() and stdout == ""
    # with --baselines the train split is read too: both missing files are named
    if cmd != "train":
        rc, _, err = run_cli([cmd, *head, "--manifest", missing, "--baselines", "spectrum", *tail, "--quiet"], capsys)
        assert rc == 2 and re.search(r"2 of \d+ listed files are missing", err) and "fake/001.jpg" in err and "fake/010.jpg" in err


@pytest.mark.parametrize("cmd,split", [("evaluate", "test"), ("robustness", "test"), ("train", "train")])
def test_help_states_manifest_defaults(cmd, split, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--manifest PATH" in out and f"the manifest split to use (default: {split})" in out
    if cmd != "train":
        assert "--baselines NAME[,NAME...]" in out and "(default: none)" in out


def test_model_for_another_backbone_is_refused(setup, tmp_path, capsys):
    from fakespotter import artifact

    tensors, meta = artifact.read_model(setup["model"])
    meta["backbone"]["weights_sha256"] = "0" * 64
    other = artifact.write_model(tmp_path / "other.fsm", tensors, meta)
    rc, stdout, err = run_cli(["evaluate", other, "--manifest", setup["manifest"], "--baselines", "spectrum",
                               "--out-dir", tmp_path / "o", "--quiet"], capsys)
    assert rc == 2 and "model refused: " in err and "backbone weights sha256" in err and stdout == ""
    assert np.all(setup["y"][:1] == 0)


def test_a_model_trained_from_folders_knows_its_images(setup, tmp_path, capsys):
    """train records fingerprints of the files it learnt from (sha256 prefixes, in the model
    file); evaluate and robustness warn, with counts, when they score any of them, under any
    name, and say nothing for images it has not seen."""
    import shutil

    from fakespotter import artifact
    from fakespotter.detector import TRAINING_IMAGES, FakeSpotter

    ds = setup["manifest"].parent
    folders = {k: tmp_path / k for k in ("real", "fake", "new_real", "new_fake")}
    for cls in ("real", "fake"):
        files = sorted((ds / cls).glob("*.jpg"))
        for name, part in ((cls, files[:8]), (f"new_{cls}", files[8:])):
            folders[name].mkdir()
            for f in part:
                shutil.copy(f, folders[name] / f.name)
    model = tmp_path / "m.fsm"
    rc, _, err = run_cli(["train", "--real", folders["real"], "--fake", folders["fake"], "--aligned", "--out", model,
                          "--hidden", "4", "--epochs", "3", "--quiet"], capsys)
    assert rc == 0, err
    seen = FakeSpotter.load(model).training_images_
    assert seen.dtype == torch.int64 and len(seen) == 16 and torch.equal(seen, seen.sort().values)
    rc, out, _ = run_cli(["info", model], capsys)
    assert "training images: 16 file fingerprints" in out
    rc, _, err = run_cli(["train", "--real", folders["real"], "--fake", folders["fake"], "--aligned", "--out",
                          tmp_path / "private.fsm", "--hidden", "4", "--epochs", "3", "--no-fingerprints", "--quiet"], capsys)
    assert rc == 0 and FakeSpotter.load(tmp_path / "private.fsm").training_images_ is None, err

    shutil.copy(sorted(folders["real"].iterdir())[0], folders["new_real"] / "renamed.jpg")  # one seen image
    cases = [(("real", "fake"), "16 of the 16 evaluated images (8 real, 8 fake) are files the model was trained"),
             (("new_real", "new_fake"), "1 of the 9 evaluated images (1 real, 0 fake) are files the model was trained")]
    for (r, f), said in cases:
        for cmd, extra in (("evaluate", []), ("robustness", ["--attacks", "noise"])):
            out_dir = tmp_path / f"{cmd}-{r}"
            rc, _, err = run_cli([cmd, model, "--real", folders[r], "--fake", folders[f], "--aligned", "--out-dir",
                                  out_dir, "--bootstrap", "0", "--no-plots", "--quiet", *extra], capsys)
            assert rc == 0 and f"warning: {said}" in err, err
    (folders["new_real"] / "renamed.jpg").unlink()
    rc, _, err = run_cli(["evaluate", model, "--real", folders["new_real"], "--fake", folders["new_fake"], "--aligned",
                          "--out-dir", tmp_path / "unseen", "--bootstrap", "0", "--no-plots", "--quiet"], capsys)
    assert rc == 0 and "trained or validated on" not in err, err

    tensors, meta = artifact.read_model(model)  # a fingerprint tensor of another type is refused
    tensors[TRAINING_IMAGES] = tensors[TRAINING_IMAGES].float()
    artifact.write_model(tmp_path / "bad.fsm", tensors, meta)
    with pytest.raises(artifact.ModelFileError, match=r"bad\.fsm: training\.images must be int64 \[n\], got torch\.float32"):
        FakeSpotter.load(tmp_path / "bad.fsm")


def test_the_split_seen_warning_suggests_a_split_the_model_has_not_seen(setup, tmp_path, capsys):
    model = tmp_path / "t.fsm"
    rc, _, err = run_cli(["train", "--manifest", setup["manifest"], "--split", "test", "--out", model, "--hidden", "4",
                          "--epochs", "2", "--quiet"], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["evaluate", model, "--manifest", setup["manifest"], "--split", "test", "--out-dir",
                          tmp_path / "e", "--bootstrap", "0", "--no-plots", "--quiet"], capsys)
    assert rc == 0 and "the model was trained on split 'test'" in err, err
    assert "evaluate on a split it has not seen (train)" in err, err


def test_files_whose_bytes_the_manifest_does_not_list_are_refused(setup, tmp_path, capsys):
    """A manifest names each file's sha256: a file replaced or two files swapped since it was
    written would be scored under the other's label, so train and evaluate refuse the split."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(setup["manifest"].parent, ds)
    real, fake = ds / "real" / "011.jpg", ds / "fake" / "011.jpg"  # test split (see _build)
    a, b = real.read_bytes(), fake.read_bytes()
    real.write_bytes(b)
    fake.write_bytes(a)
    rc, _, err = run_cli(["evaluate", setup["model"], "--manifest", ds, "--split", "test", "--out-dir", tmp_path / "e",
                          "--bootstrap", "0", "--no-plots", "--quiet"], capsys)
    assert rc == 2 and "2 file(s) of split 'test' (evaluation) differ from the sha256 the manifest lists" in err, err
    assert not (tmp_path / "e").exists()
    (ds / "fake" / "006.jpg").write_bytes(a)  # a val file: train validates on it
    rc, _, err = run_cli(["train", "--manifest", ds, "--out", tmp_path / "m.fsm", "--quiet"], capsys)
    assert rc == 2 and "1 file(s) of split 'val' (validation) differ" in err and "fake/006.jpg" in err, err


def test_a_model_with_its_own_augmenter_refuses_only_the_ablations(setup, tmp_path, capsys):
    """The fs-* ablations repeat the model's augmentation; one the file cannot describe (a user's
    callable) rules them out, before any work, and only them."""
    from fakespotter.detector import FakeSpotter

    def flip(chips, stream):
        return chips[:, :, ::-1].copy()

    x, y = setup["x"], setup["y"]
    model = tmp_path / "flip.fsm"
    FakeSpotter(aligned=True, hidden=(4,), max_epochs=3).fit(x[y == 0], x[y == 1], augment=flip).save(model)
    rc, _, err = run_cli(["evaluate", model, "--manifest", setup["manifest"], "--baselines", "fs-element", "--out-dir",
                          tmp_path / "a", "--bootstrap", "0", "--no-plots", "--quiet"], capsys)
    assert rc == 2 and "augmentation 'flip'" in err and "fs-*" in err, err
    rc, _, err = run_cli(["evaluate", model, "--manifest", setup["manifest"], "--baselines", "spectrum", "--out-dir",
                          tmp_path / "b", "--bootstrap", "0", "--no-plots", "--quiet"], capsys)
    assert rc == 0, err
