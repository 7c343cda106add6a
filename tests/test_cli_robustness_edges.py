"""``fakespotter robustness``: what its rows, tables, notes, warnings and plot data say, and its
options' defaults and bounds (from a mutation audit of cli/robustness.py). The table helpers on
made-up scores; the command on tiny noise images, --aligned, a model of a few epochs."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from fakespotter import evaluate as ev
from fakespotter.cli import build_parser, main
from fakespotter.cli import robustness
from scan_helpers import write_images

NOISE = [0.01, 0.03, 0.05, 0.1]
KEEP = ("auc", "acc_operating", "tpr_operating", "fpr_operating", "eer", "ap")  # each row's metrics


def run_cli(args, capsys):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A model trained on 8 + 8 noise images (face detector settings off their defaults), and 4 +
    4 other images to attack."""
    root = tmp_path_factory.mktemp("rob")
    train_real, train_fake = write_images(root / "train_real", 8, 0, 1.0), write_images(root / "train_fake", 8, 1, 2.5)
    model = root / "m.fsm"
    rc = main([str(a) for a in ["train", "--real", train_real, "--fake", train_fake, "--aligned", "--hidden", "4",
                                "--epochs", "2", "--weak-face-score", "0.3", "--detect-pixels", "70000",
                                "--out", model, "--quiet"]])
    assert rc == 0
    from fakespotter.detector import FakeSpotter

    det = FakeSpotter.load(model)
    assert (det.weak_face_score, det.detect_pixels) == (0.3, 70000), "premise"
    return {"model": model, "op": float(det.operating_threshold_["logit"]), "train_real": train_real,
            "train_fake": train_fake, "real": write_images(root / "real", 4, 10, 1.0),
            "fake": write_images(root / "fake", 4, 11, 2.5)}


def capture_plot(monkeypatch):
    """Record what robustness.png is drawn from (and draw it)."""
    seen = {}
    plot = ev.plot_lines

    def record(panels, path, **kw):
        seen.update(panels=panels, **kw)
        return plot(panels, path, **kw)

    monkeypatch.setattr(ev, "plot_lines", record)
    return seen


# ---------------------------------------------------------------- the table helpers

def test_rows_count_only_scored_images_and_rank_only_them():
    """A level's row: n_real / n_fake are the images scored at that level (not the unreadable
    one, not those whose face the attack lost), each class's faces lost are counted apart,
    the mean scores and metrics leave the unscored out, the @op metrics are at the given
    threshold, the intervals use --seed; a level that lost every fake has no metrics (nan) and
    no intervals. Rows carry a detector column only when given one."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 10)
    clean = rng.normal(labels * 1.5, 1.0)
    clean[0] = np.nan  # unreadable: no score at any level
    faces = np.ones(20, int)
    faces[0] = -1
    noisy, noisy_faces = clean + 0.3, faces.copy()
    noisy[[10, 11]] = np.nan  # the attack lost the face of two fakes
    noisy_faces[[10, 11]] = 0
    gone, gone_faces = np.where(labels == 1, np.nan, clean), np.where(labels == 1, 0, faces)
    variants = [("clean", None), ("noise", 0.1), ("blur", 3)]
    scored = SimpleNamespace(scores=dict(zip(variants, [clean, noisy, gone])),
                             faces=dict(zip(variants, [faces, noisy_faces, gone_faces])))
    op, args = 0.4, argparse.Namespace(bootstrap=30, seed=3)
    rows = robustness._rows(labels, scored, variants, op, args, None)
    assert [(r["attack"], r["level"]) for r in rows] == [("clean", "-"), ("noise", 0.1), ("blur", 3)]
    assert all("detector" not in r for r in rows)
    assert robustness._rows(labels, scored, variants[:1], op, args, "spectrum")[0]["detector"] == "spectrum"

    r = rows[1]
    assert (r["n_real"], r["n_fake"], r["n_real_without_face"], r["n_fake_without_face"]) == (9, 8, 0, 2)
    ok = ~np.isnan(noisy)
    s, y = noisy[ok], labels[ok]
    assert r["mean_score_real"] == pytest.approx(s[y == 0].mean()) and r["mean_score_fake"] == pytest.approx(s[y == 1].mean())
    want = ev.evaluate(s, y, operating_threshold=op, bootstrap=30, seed=3)["rows"][0]
    assert set(r["ci"]) == set(KEEP)
    for m in KEEP:
        assert r[m] == pytest.approx(want[m]), m
        assert r["ci"][m] == pytest.approx(want["ci"][m]), m
    assert r["auc"] == pytest.approx(ev.roc_auc(s, y))
    assert r["acc_operating"] == pytest.approx(float(np.mean((s > op) == (y == 1))))
    other = ev.evaluate(s, y, operating_threshold=op, bootstrap=30, seed=4)["rows"][0]["ci"]["auc"]
    assert other != pytest.approx(r["ci"]["auc"]), "premise: another seed draws other resamples"

    r = rows[2]
    assert (r["n_real"], r["n_fake"], r["n_fake_without_face"]) == (9, 0, 10)
    assert "ci" not in r and math.isnan(r["mean_score_fake"])
    assert all(math.isnan(r[m]) for m in KEEP)


def test_faces_caveat_names_every_attack_that_changed_the_faces():
    labels = np.array([0, 0, 1, 1])
    faces = {("clean", None): np.array([1, 1, 1, 1]), ("blur", 3): np.array([0, 1, 1, 1]),
             ("jpeg", 30): np.array([1, 1, 0, 0])}
    scores = {v: np.where(f > 0, 0.5, np.nan) for v, f in faces.items()}
    (line,) = robustness._faces_caveat(labels, SimpleNamespace(scores=scores, faces=faces), list(faces))
    assert line == ("images without a face the detector finds (clean: 0 real and 0 fake) after blur 3: 1 real and "
                    "0 fake; jpeg 30: 0 real and 2 fake: those rows leave out other images than the clean row")
    faces[("resize", 0.5)] = np.array([1, 1, 1, 1])  # as clean: not named
    scores[("resize", 0.5)] = scores[("clean", None)]
    assert robustness._faces_caveat(labels, SimpleNamespace(scores=scores, faces=faces), list(faces)) == [line]
    faces[("clean", None)] = np.array([0, 1, 1, 1])  # blur loses the same face as clean; resize finds it
    faces[("noise", 0.1)] = np.array([1, 0, 1, 1])  # noise: as many faceless images as clean, another one
    scores = {v: np.where(f > 0, 0.5, np.nan) for v, f in faces.items()}
    (line,) = robustness._faces_caveat(labels, SimpleNamespace(scores=scores, faces=faces), list(faces))
    assert line == ("images without a face the detector finds (clean: 1 real and 0 fake) after jpeg 30: 0 real and "
                    "2 fake; resize 0.5: 0 real and 0 fake; noise 0.1: 1 real and 0 fake: those rows leave out "
                    "other images than the clean row")


def test_pivot_is_one_metric_a_column_per_detector():
    nan = float("nan")
    rows = [{"detector": "a", "attack": "clean", "level": "-", "auc": 0.5, "tpr_operating": 0.25},
            {"detector": "b", "attack": "clean", "level": "-", "auc": 0.9, "tpr_operating": 0.75},
            {"detector": "a", "attack": "noise", "level": 0.1, "auc": 0.6, "tpr_operating": nan}]  # b: no row
    assert robustness._pivot(rows, ["a", "b"], "tpr_operating") == (
        "| attack | level | a | b |\n|---|---|---:|---:|\n| clean | - | 0.250 | 0.750 |\n| noise | 0.1 | n/a | n/a |\n")


# ---------------------------------------------------------------- options

def test_options_defaults_and_bounds(tmp_path, capsys):
    parse = build_parser().parse_args
    base = ["robustness", "m.fsm", "--real", "r", "--fake", "f"]
    a = parse(base)
    assert a.attacks == ["jpeg", "blur", "resize", "noise"] and a.out_dir == "robustness" and a.bootstrap == 200
    assert a.train_augment is False and a.augment_fraction is None and a.run is robustness.run
    assert parse(base + ["--train-augment", "--augment-fraction", "0.3"]).augment_fraction == 0.3
    for bad in (["--attacks", "crop"], ["--attacks"], ["--bootstrap", "1.5"]):
        with pytest.raises(SystemExit) as e:
            parse(base + bad)
        assert e.value.code == 2, bad
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse(["robustness", "--help"])
    assert "``" not in capsys.readouterr().out


def test_an_existing_plot_is_refused_before_any_work(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "robustness.png").write_bytes(b"the user's")
    rc, _, err = run_cli(["robustness", corpus["model"], "--real", corpus["real"], "--fake", corpus["fake"], "--aligned",
                          "--out-dir", out, "--quiet"], capsys)
    assert rc == 2 and "robustness.png already exists; pass --overwrite" in err, err
    assert (out / "robustness.png").read_bytes() == b"the user's"


# ---------------------------------------------------------------- the command

def test_single_detector_report(corpus, tmp_path, capsys, monkeypatch):
    """One model, one attack given twice, --seed 5, an unreadable real image, an out-dir that
    exists: the rows, settings, counts, failures, notes, warnings, noise seeds and plot data."""
    from fakespotter import perturb

    real = shutil.copytree(corpus["real"], tmp_path / "real")
    (real / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    seeds = set()
    apply = perturb.apply

    def record(attack, level, rgb, seed=None, **kw):
        seeds.add((attack, level, seed))
        return apply(attack, level, rgb, seed=seed, **kw)

    monkeypatch.setattr(perturb, "apply", record)
    plot = capture_plot(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()  # (created if missing, used if there)
    rc, stdout, err = run_cli(["robustness", corpus["model"], "--real", real, "--fake", corpus["fake"], "--aligned",
                               "--attacks", "noise", "noise", "--seed", "5", "--bootstrap", "10", "--out-dir", out,
                               "--quiet"], capsys)
    assert rc == 1, err  # the unreadable image
    assert f"  unreadable: {real / 'zz_broken.png'}: " in err
    assert "warning: the intervals come from only 10 bootstrap resamples" in err
    rep = json.loads((out / "robustness.json").read_text())
    rows = rep["rows"]
    assert [(r["attack"], r["level"]) for r in rows] == [("clean", "-")] + [("noise", lv) for lv in NOISE]
    assert rep["label_columns"] == ["attack", "level"] and all("detector" not in r for r in rows)
    assert rep["settings"] == {"attacks": {"noise": NOISE}, "aligned": True, "applied_to": "chips",
                               "operating_threshold": pytest.approx(corpus["op"]), "bootstrap": 10, "seed": 5,
                               "level": 0.95}
    assert rep["counts"] == {"real": {"images": 5, "scored": 4, "without_face": 0, "unreadable": 1},
                             "fake": {"images": 4, "scored": 4, "without_face": 0, "unreadable": 0}}
    assert [f["path"] for f in rep["failures"]] == [str(real / "zz_broken.png")]
    # noise is seeded by --seed and the image's place among those evaluated (4: the unreadable one)
    assert seeds == {("noise", lv, (5, i)) for lv in NOISE for i in (0, 1, 2, 3, 5, 6, 7, 8)}
    md = (out / "robustness.md").read_text()
    assert md.startswith("# FakeSpotter robustness\n\n| attack | level | n_real | n_fake | n_real_without_face |")
    assert md.splitlines()[2].endswith("| AUC | ACC@op | TPR@op | FPR@op | EER |")
    sha = rep["model"]["sha256"]
    op = corpus["op"]
    assert (f"- model {rep['model']['path']} (sha256 {sha[:16]}...); ACC@op, TPR@op and FPR@op at its operating "
            f"threshold, logit {op:.4g}\n") in md
    assert "- attacks applied to chips, to real and fake alike; intervals: 10 stratified bootstrap resamples" in md
    assert "- clean: 5 real and 4 fake images; 1 unreadable (left out)\n" in md
    assert "- the intervals come from only 10 bootstrap resamples" in md
    assert "| noise | 0.1 |" in stdout
    noise = rows[1:]
    assert plot["panels"] == {"noise sigma (x 255)": {"AUC": (NOISE, [r["auc"] for r in noise]),
                                                      "TPR@op": (NOISE, [r["tpr_operating"] for r in noise]),
                                                      "FPR@op": (NOISE, [r["fpr_operating"] for r in noise])}}
    assert plot["ylabel"] == "AUC / rate" and plot["reference"] == rows[0]["auc"]
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"


def test_side_by_side_report(corpus, tmp_path, capsys, monkeypatch):
    """A baseline beside the model: each detector's rows at its own operating threshold; the
    pivot tables of AUC, TPR@op and FPR@op, then each detector's own table; a note per baseline;
    an unreadable training image named (exit 1); a plot line per detector, without the clean
    AUC reference."""
    train_real = shutil.copytree(corpus["train_real"], tmp_path / "train_real")
    (train_real / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    thresholds = []
    evaluate = ev.evaluate

    def record(*a, **kw):
        thresholds.append(kw["operating_threshold"])
        return evaluate(*a, **kw)

    monkeypatch.setattr(ev, "evaluate", record)
    plot = capture_plot(monkeypatch)
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["robustness", corpus["model"], "--real", corpus["real"], "--fake", corpus["fake"],
                               "--aligned", "--attacks", "noise", "--baselines", "spectrum", "--train-real", train_real,
                               "--train-fake", corpus["train_fake"], "--bootstrap", "0", "--out-dir", out, "--quiet"],
                              capsys)
    assert rc == 1, err
    assert f"  unreadable training image: {train_real / 'zz_broken.png'}: " in err
    rep = json.loads((out / "robustness.json").read_text())
    names = ["fakespotter", "spectrum"]
    ops = {n: rep["detectors"][n]["operating_threshold"] for n in names}
    assert ops["fakespotter"] == pytest.approx(corpus["op"]) and ops["spectrum"] != ops["fakespotter"]
    assert rep["settings"]["operating_threshold"] == ops
    assert thresholds == [ops["fakespotter"]] * 5 + [ops["spectrum"]] * 5
    rows = rep["rows"]
    assert [(r["detector"], r["attack"]) for r in rows] == [(n, a) for n in names for a in ["clean"] + ["noise"] * 4]
    md = (out / "robustness.md").read_text()
    pivots = "\n".join(f"## {head}\n\n" + robustness._pivot(rows, names, k) for k, head in
                       (("auc", "AUC"), ("tpr_operating", "TPR@op (fakes caught)"), ("fpr_operating", "FPR@op (reals flagged)")))
    assert md.startswith("# FakeSpotter robustness, side by side\n\n" + pivots + "\n## fakespotter\n\n")
    assert pivots in stdout
    mine = [r for r in rows if r["detector"] == "spectrum"]
    assert ("\n## spectrum\n\n" + ev.to_markdown({"rows": mine, "label_columns": ["attack", "level"]},
                                                  columns=["auc", "acc_operating", "tpr_operating", "fpr_operating",
                                                           "eer"])) in md
    t, v = (rep["detectors"]["spectrum"]["trained_on"][k] for k in ("train", "validation"))
    assert f"- spectrum: {rep['detectors']['spectrum']['description']}; trained on {t['real']} real and {t['fake']} " \
           f"fake chips, its operating threshold (the @op metrics) at logit {ops['spectrum']:.4g} (picked on " \
           f"{v['real']} + {v['fake']} validation chips)\n" in md  # (as evaluate says it)
    assert "- fakespotter:" not in md
    assert plot["panels"] == {"noise sigma (x 255)": {
        n: (NOISE, [r["auc"] for r in rows if r["detector"] == n and r["attack"] == "noise"]) for n in names}}
    assert plot["ylabel"] == "AUC" and plot["reference"] is None


def test_a_report_made_meanwhile_is_kept(corpus, tmp_path, capsys, monkeypatch):
    """Without --overwrite a report file another run makes while this one works is kept (exit 3,
    naming the command)."""
    out = tmp_path / "out"
    stale = robustness.remove_stale

    def meanwhile(*a, **kw):
        (out / "robustness.md").write_text("another run's")
        return stale(*a, **kw)

    monkeypatch.setattr(robustness, "remove_stale", meanwhile)
    rc, _, err = run_cli(["robustness", corpus["model"], "--real", corpus["real"], "--fake", corpus["fake"], "--aligned",
                          "--attacks", "resize", "--bootstrap", "0", "--no-plots", "--out-dir", out, "--quiet"], capsys)
    md = out / "robustness.md"
    assert rc == 3 and md.read_text() == "another run's", err
    assert err.startswith(f"fakespotter robustness: error: cannot write {md}: {md} already exists (it appeared while "
                          f"this was being written); it was kept; written: "), err


def test_faces_lost_to_an_attack_are_warned_and_the_clean_counts_are_the_clean_faces(corpus, tmp_path, capsys,
                                                                                      monkeypatch):
    """(Made up by editing the scored faces: a real image with no face when clean, a fake whose
    face the strongest noise loses.) The clean counts come from the clean faces; both warnings
    are printed and noted; the face detector runs with the model's settings. An old plot is
    removed by --overwrite --no-plots."""
    seen = {}
    score = ev.score_images_with

    def edit(*a, **kw):
        seen.update(kw)
        res = score(*a, **kw)
        first = res["fakespotter"]
        first.faces[("clean", None)][0] = 0
        first.scores[("clean", None)][0] = np.nan
        first.faces[("noise", 0.1)][4] = 0
        first.scores[("noise", 0.1)][4] = np.nan
        return res

    monkeypatch.setattr(ev, "score_images_with", edit)
    out = tmp_path / "out"
    out.mkdir()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig = plt.figure()
    fig.savefig(out / "robustness.png")  # an old plot of ours: --overwrite --no-plots removes it
    plt.close(fig)
    rc, _, err = run_cli(["robustness", corpus["model"], "--real", corpus["real"], "--fake", corpus["fake"], "--aligned",
                          "--attacks", "noise", "--bootstrap", "0", "--no-plots", "--overwrite", "--out-dir", out,
                          "--quiet"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["robustness.csv", "robustness.json", "robustness.md"]
    assert (seen["aligned"], seen["weak_face_score"], seen["detect_pixels"]) == (True, 0.3, 70000)
    rep = json.loads((out / "robustness.json").read_text())
    assert rep["counts"]["real"] == {"images": 4, "scored": 3, "without_face": 1, "unreadable": 0}
    assert rep["counts"]["fake"]["without_face"] == 0
    assert rep["images_without_face"] == [str(corpus["real"] / "000.png")]  # (as evaluate's report)
    said = ["1 of 4 real images have no face the detector finds: they are left out of the metrics",
            "images without a face the detector finds (clean: 1 real and 0 fake) after noise 0.01: 0 real and 0 fake; "
            "noise 0.03: 0 real and 0 fake; noise 0.05: 0 real and 0 fake; noise 0.1: 0 real and 1 fake: those rows "
            "leave out other images than the clean row"]
    md = (out / "robustness.md").read_text()
    for line in said:
        assert f"warning: {line}\n" in err and f"- {line}\n" in md, line


def test_without_aligned_faces_are_detected_in_the_images(corpus, tmp_path, capsys):
    """Without --aligned the images are photos to find faces in: noise has none, so nothing is
    scored (exit 2, one line), not the whole image taken as a chip."""
    rc, _, err = run_cli(["robustness", corpus["model"], "--real", corpus["real"], "--fake", corpus["fake"],
                          "--attacks", "resize", "--bootstrap", "0", "--no-plots", "--out-dir", tmp_path / "out",
                          "--quiet"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "no real image could be scored (4 without a face, 0 unreadable); check the inputs or pass --aligned" in err
