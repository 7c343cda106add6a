"""evaluate's metrics against scikit-learn's on random scores (with and without ties), the
bootstrap intervals, grouped rows and the report writers."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from fakespotter import evaluate as ev

sk = pytest.importorskip("sklearn.metrics")


def random_case(seed, n=300, ties=False, balance=0.5):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < balance).astype(np.int64)
    y[:2] = [0, 1]  # both classes present
    s = rng.normal(size=n) + 1.2 * y
    if ties:
        s = np.round(s * 2) / 2  # a dozen distinct values: many ties within and across classes
    return s, y


CASES = [(seed, ties, n, balance) for seed in range(6) for ties in (False, True)
         for n, balance in ((300, 0.5), (57, 0.2))] + [(99, True, 10, 0.5), (7, False, 2, 0.5)]


def sk_tpr_at(y, s, target):
    fpr, tpr, _ = sk.roc_curve(y, s, drop_intermediate=False)
    return tpr[fpr <= target].max()


def sk_eer(y, s):
    """FPR = FNR on sklearn's ROC joined by straight lines, found on a fine grid."""
    fpr, tpr, _ = sk.roc_curve(y, s, drop_intermediate=False)
    # walk the polyline in order: parametrize by cumulative index, evaluate fnr - fpr densely
    t = np.linspace(0, len(fpr) - 1, 400001)
    f = np.interp(t, np.arange(len(fpr)), fpr)
    g = 1 - np.interp(t, np.arange(len(tpr)), tpr)
    i = np.argmax(g - f <= 0)
    return f[i]


@pytest.mark.parametrize("seed,ties,n,balance", CASES)
def test_rank_metrics_match_sklearn(seed, ties, n, balance):
    s, y = random_case(seed, n, ties, balance)
    assert ev.roc_auc(s, y) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert ev.average_precision(s, y) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
    for target in (0.0, 0.01, 0.05, 0.1, 0.5):
        assert ev.tpr_at_fpr(s, y, target) == pytest.approx(sk_tpr_at(y, s, target), abs=1e-12), target
    assert ev.equal_error_rate(s, y) == pytest.approx(sk_eer(y, s), abs=2e-4)
    fpr, tpr, thr = ev.roc_curve(s, y)
    fpr_sk, tpr_sk, thr_sk = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_sk)
    np.testing.assert_allclose(tpr, tpr_sk)
    np.testing.assert_array_equal(thr[1:], thr_sk[1:])
    p, r, t = ev.precision_recall_curve(s, y)
    p_sk, r_sk, t_sk = sk.precision_recall_curve(y, s)
    np.testing.assert_allclose(p, p_sk[:-1][::-1])
    np.testing.assert_allclose(r, r_sk[:-1][::-1])
    np.testing.assert_array_equal(t, t_sk[::-1])


@pytest.mark.parametrize("seed,ties,n,balance", CASES)
@pytest.mark.parametrize("threshold", [-0.5, 0.0, 0.5, 10.0])
def test_threshold_metrics_match_sklearn(seed, ties, n, balance, threshold):
    s, y = random_case(seed, n, ties, balance)
    pred = (s > threshold).astype(np.int64)
    m = ev.metrics(s, y, threshold=threshold, operating_threshold=threshold)
    assert m["acc"] == pytest.approx(sk.accuracy_score(y, pred), abs=1e-12)
    assert m["acc_operating"] == m["acc"]
    assert m["precision"] == pytest.approx(sk.precision_score(y, pred, zero_division=0), abs=1e-12)
    assert m["recall"] == pytest.approx(sk.recall_score(y, pred, zero_division=0), abs=1e-12)
    assert m["f1"] == pytest.approx(sk.f1_score(y, pred, zero_division=0), abs=1e-12)
    tn, fp, fn, tp = sk.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert m["tpr_operating"] == pytest.approx(tp / (tp + fn)) and m["fpr_operating"] == pytest.approx(fp / (fp + tn))
    assert m["auc"] == ev.roc_auc(s, y) and m["ap"] == ev.average_precision(s, y)
    assert m["eer"] == ev.equal_error_rate(s, y)
    assert m["tpr_at_1pct_fpr"] == ev.tpr_at_fpr(s, y, 0.01) and m["tpr_at_5pct_fpr"] == ev.tpr_at_fpr(s, y, 0.05)


def test_literal_cases():
    # perfect separation, perfect inversion, all tied
    y = np.array([0, 0, 1, 1])
    assert ev.roc_auc([0, 1, 2, 3], y) == 1.0 and ev.equal_error_rate([0, 1, 2, 3], y) == 0.0
    assert ev.roc_auc([3, 2, 1, 0], y) == 0.0 and ev.equal_error_rate([3, 2, 1, 0], y) == 1.0
    assert ev.roc_auc([1, 1, 1, 1], y) == 0.5 and ev.equal_error_rate([1, 1, 1, 1], y) == 0.5
    assert ev.average_precision([1, 1, 1, 1], y) == 0.5
    assert ev.tpr_at_fpr([0, 1, 2, 3], y, 0.0) == 1.0 and ev.tpr_at_fpr([1, 1, 1, 1], y, 0.4) == 0.0
    # a real tied with a fake counts one half
    assert ev.roc_auc([0, 1, 1], [0, 0, 1]) == 0.75
    # the detector module's AUC agrees
    from fakespotter.detector import roc_auc

    s, yy = random_case(3, 200, True)
    assert ev.roc_auc(s, yy) == pytest.approx(roc_auc(s, yy), abs=1e-12)


def test_one_class_and_bad_input():
    m = ev.metrics([0.1, 0.2], [1, 1])
    assert math.isnan(m["auc"]) and math.isnan(m["eer"]) and m["ap"] == 1.0 and m["recall"] == 1.0
    m = ev.metrics([0.1, 0.2], [0, 0])
    assert math.isnan(m["auc"]) and math.isnan(m["ap"]) and m["precision"] == 0.0 and math.isnan(m["recall"])
    assert math.isnan(ev.metrics([], [])["auc"])
    with pytest.raises(ValueError, match=r"metrics: 1 scores are NaN or infinite"):
        ev.metrics([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match=r"labels must be 0 \(real\) or 1 \(fake\), got values \[0, 2\]"):
        ev.roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=r"one entry per score \(2\), got shape \(3,\)"):
        ev.roc_auc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="target must be in"):
        ev.tpr_at_fpr([0.1, 0.2], [0, 1], 1.5)


def stat(s, y):
    return {"auc": ev.roc_auc(s, y), "acc": ev.threshold_metrics(s, y, 0.0)["acc"]}


def test_bootstrap_contains_point_narrows_and_is_seeded():
    widths = []
    for n in (60, 600, 6000):
        s, y = random_case(1, n)
        point = stat(s, y)
        ci = ev.bootstrap_ci(s, y, stat, n=300, seed=5)
        for k, (lo, hi) in ci.items():
            assert lo <= point[k] <= hi and lo < hi, (n, k, lo, point[k], hi)
        widths.append(ci["auc"][1] - ci["auc"][0])
    assert widths[0] > 2 * widths[1] > 4 * widths[2], widths  # ~ 1/sqrt(n)
    s, y = random_case(1, 200)
    assert ev.bootstrap_ci(s, y, stat, n=100, seed=1) == ev.bootstrap_ci(s, y, stat, n=100, seed=1)
    assert ev.bootstrap_ci(s, y, stat, n=100, seed=1) != ev.bootstrap_ci(s, y, stat, n=100, seed=2)
    # 95% > 50% interval
    lo95, hi95 = ev.bootstrap_ci(s, y, stat, n=400, seed=1)["auc"]
    lo50, hi50 = ev.bootstrap_ci(s, y, stat, n=400, seed=1, level=0.5)["auc"]
    assert lo95 < lo50 < hi50 < hi95
    assert all(math.isnan(v) for v in ev.bootstrap_ci([0.1, 0.2], [1, 1], stat, n=10)["auc"])
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        ev.bootstrap_ci(s, y, stat, n=-1)


def test_a_class_too_small_to_resample_gets_no_interval():
    """A class of one is redrawn the same every time: the interval, however narrow, would show
    only the other class's spread (one real scored -1, 0.5 or 2 against 300 fakes gave three
    disjoint "95% intervals")."""
    rng = np.random.default_rng(0)
    fakes = rng.normal(1, 1, 300)
    for n_real in (1, ev.MIN_CLASS_FOR_CI - 1):
        s, y = np.r_[rng.normal(0, 1, n_real), fakes], np.r_[np.zeros(n_real), np.ones(300)]
        assert all(math.isnan(v) for lo_hi in ev.bootstrap_ci(s, y, stat, n=50).values() for v in lo_hi)
        assert all(math.isnan(v) for v in ev.bootstrap_ci(s[::-1], 1 - y[::-1], stat, n=50)["auc"])  # fakes too few
        assert not any(math.isnan(v) for v in ev.bootstrap_ci(s, y, stat, n=50, min_class=1)["auc"])
    n_real = ev.MIN_CLASS_FOR_CI
    s, y = np.r_[rng.normal(0, 1, n_real), fakes], np.r_[np.zeros(n_real), np.ones(300)]
    lo, hi = ev.bootstrap_ci(s, y, stat, n=50)["auc"]
    assert lo < hi
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="min_class must be an int >= 1"):
            ev.bootstrap_ci(s, y, stat, n=5, min_class=bad)
    rep = ev.evaluate(np.r_[s, 0.3], np.r_[y, 0], groups=["a"] * n_real + ["f"] * 300 + ["b"], bootstrap=50)
    ci = {(r["group"], r["class"]): r["ci"]["auc"] for r in rep["rows"]}
    assert not math.isnan(ci["a", "real"][0]) and all(math.isnan(v) for v in ci["b", "real"])
    assert rep["settings"]["min_class_for_ci"] == ev.MIN_CLASS_FOR_CI


def test_rows_over_the_same_samples_have_the_same_intervals():
    """A generator that is its fake type (the local manipulations) gave the same data two
    intervals, from two seeds."""
    s, y = random_case(3, 120)
    kinds = np.where(y == 1, np.where(np.arange(len(y)) % 2, "swap", "gan"), "real")
    gens = np.where(kinds == "gan", "stylegan", kinds)
    rep = ev.evaluate_by(s, y, [("fake_type", kinds, "fake"), ("generator", gens, "fake")], bootstrap=40)
    ci = {(r["kind"], r["group"]): r["ci"] for r in rep["rows"]}
    assert ci["generator", "swap"] == ci["fake_type", "swap"]
    assert ci["generator", "stylegan"] == ci["fake_type", "gan"]
    assert ci["fake_type", "swap"] != ci["fake_type", "gan"]


def test_bootstrap_is_stratified():
    s, y = random_case(2, 100, balance=0.1)
    seen = []

    def count(a, b):
        seen.append((int((b == 0).sum()), int((b == 1).sum())))
        return {"n": float(len(a))}

    ev.bootstrap_ci(s, y, count, n=20, seed=0)
    assert set(seen) == {(int((y == 0).sum()), int((y == 1).sum()))}


def grouped_case():
    rng = np.random.default_rng(0)
    groups = ["nba"] * 80 + ["ffhq"] * 40 + ["dcgan"] * 60 + ["swap"] * 30
    y = np.array([0] * 120 + [1] * 90)
    shift = {"nba": 0.0, "ffhq": 0.3, "dcgan": 2.0, "swap": 0.5}
    s = np.array([rng.normal() + shift[g] for g in groups])
    return s, y, groups


def test_grouped_rows():
    s, y, groups = grouped_case()
    rep = ev.evaluate(s, y, groups=groups, threshold=0.2, operating_threshold=1.0, bootstrap=50, seed=3)
    rows = {r["group"]: r for r in rep["rows"]}
    assert [r["group"] for r in rep["rows"]] == ["all", "dcgan", "swap", "nba", "ffhq"]
    assert [r["class"] for r in rep["rows"]] == ["all", "fake", "fake", "real", "real"]
    assert (rows["dcgan"]["n_real"], rows["dcgan"]["n_fake"]) == (120, 60)
    assert (rows["nba"]["n_real"], rows["nba"]["n_fake"]) == (80, 90)
    g = np.array(groups)
    swap = (y == 0) | (g == "swap")
    assert rows["swap"]["auc"] == pytest.approx(sk.roc_auc_score(y[swap], s[swap]))
    assert rows["dcgan"]["auc"] > 0.85 > rows["swap"]["auc"]
    ffhq = (y == 1) | (g == "ffhq")
    assert rows["ffhq"]["acc_operating"] == pytest.approx(sk.accuracy_score(y[ffhq], s[ffhq] > 1.0))
    assert rows["all"]["ap"] == pytest.approx(sk.average_precision_score(y, s))
    for r in rep["rows"]:
        assert set(ev.METRICS) <= set(r) and set(r["ci"]) >= set(ev.METRICS)
        for k in ev.METRICS:
            lo, hi = r["ci"][k]
            assert lo <= hi
    # one real source: no real rows
    rep = ev.evaluate(s, y, groups=["r"] * 120 + groups[120:], bootstrap=0)
    assert [r["group"] for r in rep["rows"]] == ["all", "dcgan", "swap"]
    assert "acc_operating" not in rep["rows"][0] and math.isnan(rep["rows"][0]["ci"]["auc"][0])
    with pytest.raises(ValueError, match=r"groups must have one entry per score \(210\), got 3"):
        ev.evaluate(s, y, groups=["a", "b", "c"])


def test_writers(tmp_path):
    s, y, groups = grouped_case()
    rep = ev.evaluate(s, y, groups=groups, operating_threshold=1.0, bootstrap=30)
    rep["rows"][2]["ci"]["auc"] = [float("nan"), float("nan")]
    back = json.loads(ev.write_json(rep, tmp_path / "m.json").read_text())
    assert back["rows"][0]["auc"] == pytest.approx(rep["rows"][0]["auc"])
    assert back["rows"][2]["ci"]["auc"] == [None, None] and back["settings"]["bootstrap"] == 30
    table = list(csv.DictReader(io.StringIO(ev.write_csv(rep, tmp_path / "m.csv").read_text())))
    assert [r["group"] for r in table] == ["all", "dcgan", "swap", "nba", "ffhq"]
    assert float(table[1]["auc"]) == rep["rows"][1]["auc"] and float(table[1]["auc_lo"]) == rep["rows"][1]["ci"]["auc"][0]
    assert table[2]["auc_lo"] == "" and int(table[0]["n_real"]) == 120
    assert {"eer", "tpr_at_1pct_fpr_hi", "acc_operating"} <= set(table[0])
    md = ev.write_markdown(rep, tmp_path / "m.md", title="T", notes=["a note"]).read_text()
    lines = md.splitlines()
    assert lines[0] == "# T" and "| group | class | n_real | n_fake | AUC | AP | EER | ACC |" in md
    assert "TPR@1%FPR" in md and "ACC@op" in md and "- a note" in md
    assert "| ACC@op | TPR@op | FPR@op |" in md  # ACC@op alone follows the row's share of fakes
    head = next(l for l in lines if l.startswith("| group"))
    body = [l for l in lines if l.startswith("| ") and l is not head and not l.startswith("| group")]
    assert len(body) == 5 and all(l.count("|") == head.count("|") for l in body)
    assert f"{rep['rows'][0]['auc']:.3f} [" in md


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    s, y, groups = grouped_case()
    curves = {"all": (s, y), "tied": (np.round(s), y)}
    for f in (ev.plot_roc, ev.plot_det):
        p = f(curves, tmp_path / f"{f.__name__}.png")
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    p = ev.plot_lines({"jpeg": {"AUC": ([95, 75], [0.9, 0.8])}, "blur": {"AUC": ([1, 2], [0.7, 0.6])}},
                      tmp_path / "l.png", ylabel="AUC", reference=0.95)
    assert p.stat().st_size > 5000


def test_plots_without_matplotlib(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(ImportError, match=r"plots need matplotlib \(pip install matplotlib\)"):
        ev.plot_roc({"a": ([0, 1], [0, 1])}, tmp_path / "x.png")


def test_tpr_at_fpr_matches_a_brute_force_reference():
    """Every threshold tried by hand, FPR compared exactly as a fraction (targets given as
    floats mean their nearest simple fraction: 1/3, 0.01, ...)."""
    from fractions import Fraction

    rng = np.random.default_rng(11)
    for case in range(60):
        n = int(rng.choice([2, 3, 7, 40]))
        y = (rng.random(n) < 0.5).astype(np.int64)
        y[:2] = [0, 1]
        s = rng.integers(0, 4, n).astype(float) if case % 2 else rng.normal(size=n)
        reals, fakes = int((y == 0).sum()), int(y.sum())
        for target in (0.0, 0.01, 0.2, 1 / 3, 0.5, 1.0):
            want = 0.0
            for t in np.unique(s):
                fp, tp = int(((s >= t) & (y == 0)).sum()), int(((s >= t) & (y == 1)).sum())
                if Fraction(fp, reals) <= Fraction(target).limit_denominator(1000):
                    want = max(want, tp / fakes)
            assert ev.tpr_at_fpr(s, y, target) == want, (case, target)


def test_labels_as_bools_floats_and_lists():
    s, y = random_case(4, 80, ties=True)
    want = ev.metrics(s, y, operating_threshold=0.3)
    for lab in (y.astype(bool), y.astype(np.float32), y.tolist(), [bool(v) for v in y], y.astype(np.int8)):
        assert ev.metrics(s, lab, operating_threshold=0.3) == want
    assert ev.metrics(s.astype(np.float32), y)["auc"] == ev.roc_auc(s.astype(np.float32).astype(np.float64), y)


@pytest.mark.parametrize("kw,match", [
    (dict(fpr_targets=(5,)), r"metrics: fpr_targets must be fractions in \[0, 1\] \(0.01 = 1% FPR\), got 5"),
    (dict(fpr_targets=(-0.01,)), r"fpr_targets must be fractions in \[0, 1\].*got -0.01"),
    (dict(fpr_targets=(float("nan"),)), r"fpr_targets must be fractions in \[0, 1\].*got nan"),
    (dict(threshold=float("nan")), r"metrics: threshold must be a logit \(a number, not NaN\), got nan"),
    (dict(operating_threshold=float("nan")), r"metrics: operating_threshold must be a logit .*got nan"),
])
def test_bad_thresholds_and_targets_are_refused(kw, match):
    s, y = random_case(0, 30)
    with pytest.raises(ValueError, match=match):
        ev.metrics(s, y, **kw)
    with pytest.raises(ValueError, match=match.replace("metrics:", "evaluate:")):
        ev.evaluate(s, y, bootstrap=0, **kw)
    with pytest.raises(ValueError, match=match.replace("metrics:", "evaluate_by:")):
        ev.evaluate_by(s, y, [("type", ["a"] * len(y), "fake")], bootstrap=0, **kw)


def test_infinite_thresholds_call_everything_one_class():
    s, y = random_case(0, 30)
    assert ev.metrics(s, y, threshold=float("inf"))["acc"] == pytest.approx(np.mean(y == 0))
    assert ev.metrics(s, y, threshold=-float("inf"))["acc"] == pytest.approx(np.mean(y == 1))


def test_bootstrap_seed_is_checked():
    s, y = random_case(0, 30)
    for seed in (None, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"bootstrap_ci: seed must be an int >= 0, got"):
            ev.bootstrap_ci(s, y, stat, n=5, seed=seed)
    with pytest.raises(ValueError, match=r"evaluate: seed must be an int >= 0, got -1"):
        ev.evaluate(s, y, bootstrap=5, seed=-1)
    assert ev.bootstrap_ci(s, y, stat, n=5, seed=np.int64(3)) == ev.bootstrap_ci(s, y, stat, n=5, seed=3)


def test_bootstrap_matches_a_hand_written_percentile_bootstrap():
    """Same draws (reals then fakes, from default_rng(seed)), numpy's linear quantiles."""
    for seed, level in ((0, 0.95), (1, 0.9), (2, 0.5)):
        s, y = random_case(seed, 40, ties=True, balance=0.3)
        got = ev.bootstrap_ci(s, y.astype(bool), stat, n=150, seed=seed, level=level)
        rng = np.random.default_rng(seed)
        neg, pos = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
        vals = {"auc": [], "acc": []}
        for _ in range(150):
            idx = np.r_[neg[rng.integers(0, len(neg), len(neg))], pos[rng.integers(0, len(pos), len(pos))]]
            for k, v in stat(s[idx], y[idx]).items():
                vals[k].append(v)
        for k, v in vals.items():
            assert got[k] == tuple(np.percentile(v, [50 * (1 - level), 50 * (1 + level)])), (seed, k)


def test_bootstrap_values_missing_from_a_resample_are_left_out():
    s, y = random_case(1, 30)
    calls = []

    def partial(a, b):
        calls.append(1)
        if len(calls) == 1:  # the point estimate names both values
            return {"a": 1.0, "b": 2.0}
        return {"a": 1.0, "b": 3.0} if len(calls) % 2 else {"a": 1.0}

    ci = ev.bootstrap_ci(s, y, partial, n=400, seed=0)
    assert ci == {"a": (1.0, 1.0), "b": (3.0, 3.0)}


def test_fpr_targets_from_an_iterator_are_checked_too():
    s, y = random_case(0, 30)
    with pytest.raises(ValueError, match=r"metrics: fpr_targets must be fractions in \[0, 1\].*got 5.0"):
        ev.metrics(s, y, fpr_targets=iter((0.01, 5.0)))
    assert "tpr_at_1pct_fpr" in ev.metrics(s, y, fpr_targets=iter((0.01,)))


def test_metrics_of_one_distinct_score_and_one_class_curves():
    """Every score tied is one ROC point: AUC and EER are 0.5, not undefined. With one class
    the curves keep one point per distinct score plus the origin, NaN where a rate is undefined."""
    m = ev.metrics([0.5, 0.5, 0.5], [0, 1, 1])
    assert m["auc"] == 0.5 and m["eer"] == 0.5
    for y in ([0, 0], [1, 1]):
        fpr, tpr, thr = ev.roc_curve([0.1, 0.2], y)
        assert len(fpr) == len(tpr) == len(thr) == 3 and thr[0] == np.inf
        assert np.isnan(fpr).all() if y[0] == 1 else np.isnan(tpr).all()


def test_bootstrap_edge_sizes_and_levels():
    s, y = random_case(4, 60)
    one = ev.bootstrap_ci(s, y, stat, n=1, seed=2)  # one resample: both bounds are its value
    assert all(math.isfinite(lo) and lo == hi for lo, hi in one.values()), one
    always_nan = ev.bootstrap_ci(s, y, lambda a, b: {"x": float("nan")}, n=20)
    assert len(always_nan["x"]) == 2 and all(math.isnan(v) for v in always_nan["x"])
    for level in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
            ev.bootstrap_ci(s, y, stat, n=10, level=level)
    # a target of 0 (no false positive at all) is a valid target
    assert ev.metrics([0, 1, 2, 3], [0, 0, 1, 1], fpr_targets=[0.0])["tpr_at_0pct_fpr"] == 1.0


def test_defaults_of_the_reports():
    """The documented defaults: 1000 resamples, seed 0, 95% intervals, in every entry point."""
    import inspect

    s, y = random_case(5, 40)
    for report in (ev.evaluate(s, y), ev.evaluate_by(s, y, [("gen", ["g"] * len(y), "fake")])):
        settings = report["settings"]
        assert (settings["bootstrap"], settings["seed"], settings["level"]) == (1000, 0, 0.95)
    p = inspect.signature(ev.bootstrap_ci).parameters
    assert (p["n"].default, p["seed"].default, p["level"].default) == (1000, 0, 0.95)


def test_groups_that_would_share_a_row_name_are_refused():
    """Groups become row names (str): 1 and "1", or None and "None", were merged into one row."""
    s, y = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])
    for a, b in ((1, "1"), (None, "None"), (True, "True")):
        with pytest.raises(ValueError, match=rf"evaluate: groups: {a!r} and {b!r} are different groups with one name"):
            ev.evaluate(s, y, groups=["r", "r", a, b], bootstrap=0)
        with pytest.raises(ValueError, match=rf"evaluate_by: grouping 'gen': {a!r} and {b!r} are different groups"):
            ev.evaluate_by(s, y, [("gen", ["r", "r", a, b], "fake")], bootstrap=0)
    same = [("x", np.str_("x")), (1, np.int64(1)), (float("nan"), float("nan"))]
    for a, b in same:  # one group, spelled two ways
        rows = ev.evaluate(s, y, groups=["r", "r", a, b], bootstrap=0)["rows"]
        assert [r["group"] for r in rows] == ["all", str(a)] and rows[1]["n_fake"] == 2


def test_evaluate_by_rows_for_single_label_groupings():
    """A fake grouping gets a row per label, even a single one; a real grouping only when the
    reals carry more than one label (else its row would repeat the ``all`` row)."""
    s, y = random_case(6, 50)
    n = len(y)
    rep = ev.evaluate_by(s, y, [("gen", ["g"] * n, "fake"), ("src", ["a"] * n, "real")], bootstrap=0)
    assert [(r["kind"], r["group"], r["class"]) for r in rep["rows"]] == [("all", "all", "all"), ("gen", "g", "fake")]
    assert rep["label_columns"] == ["kind", "group", "class"]
    src = ["a" if i % 2 else "b" for i in range(n)]
    rep = ev.evaluate_by(s, y, [("src", src, "real")], bootstrap=0)
    assert [(r["kind"], r["group"]) for r in rep["rows"]][1:] == [("src", g) for g in dict.fromkeys(
        np.asarray(src)[np.asarray(y) == 0])]


def test_row_intervals_seeds_reports_and_edge_values(tmp_path):
    """Row i's intervals are bootstrap_ci's with seed + i (as the docstring says, so a user can
    redraw one row's); the Markdown report prints [low, high] in that order; an infinite
    threshold is written as null; a set without reals has no FPR; FPR targets below 1% keep
    their digits in the column name."""
    s, y, groups = grouped_case()
    rep = ev.evaluate(s, y, groups=groups, threshold=0.2, operating_threshold=1.0, bootstrap=40, seed=3)
    g = np.array(groups)
    assert [r["group"] for r in rep["rows"]] == ["all", "dcgan", "swap", "nba", "ffhq"]
    for i, mask in ((0, np.ones(len(s), bool)), (1, (y == 0) | (g == "dcgan")), (3, (y == 1) | (g == "nba"))):
        ci = ev.bootstrap_ci(s[mask], y[mask], lambda a, b: ev.metrics(a, b, 0.2, 1.0), n=40, seed=3 + i)
        assert rep["rows"][i]["ci"]["auc"] == list(ci["auc"]) and rep["rows"][i]["ci"]["eer"] == list(ci["eer"])
    md = ev.write_markdown(rep, tmp_path / "m.md").read_text()
    r = rep["rows"][1]
    lo, hi = r["ci"]["auc"]
    assert lo < hi and f"{r['auc']:.3f} [{lo:.3f}, {hi:.3f}]" in md
    back = json.loads(ev.write_json(ev.evaluate(s, y, threshold=float("inf"), bootstrap=0), tmp_path / "i.json")
                      .read_text())
    assert back["settings"]["threshold"] is None and back["rows"][0]["recall"] == 0.0
    assert math.isnan(ev.threshold_metrics([1.0, 2.0], [1, 1], 0.0)["fpr"])
    assert "tpr_at_0.1pct_fpr" in ev.metrics(s, y, fpr_targets=(0.001,))
