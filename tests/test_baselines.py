"""Baselines (descriptor probe, spectrum, MNC-only, FakeSpotter ablations), the logistic
regression they share, and the training augmentation: each learns a separable toy problem and
fails on shuffled labels; the spectrum matches a direct numpy computation; the ablations really
change the features."""

from __future__ import annotations

import numpy as np
import pytest

from fakespotter import baselines as bl
from fakespotter import perturb
from fakespotter.evaluate import roc_auc


# -- logistic regression ----------------------------------------------------------------------


def test_logistic_probe_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, 0, 1]
    y = (X[:, 0] + 0.1 * X[:, 1] + rng.normal(scale=0.8, size=80) > 0.5).astype(int)
    mine = bl.LogisticProbe(C=0.5).fit(X, y)
    mean, std = X.mean(0), X.std(0)
    ref = sklearn.LogisticRegression(C=0.5, tol=1e-12, max_iter=10000).fit((X - mean) / std, y)
    np.testing.assert_allclose(mine.decision_function(X), ref.decision_function((X - mean) / std), atol=1e-5)


def test_logistic_probe_errors():
    with pytest.raises(ValueError, match="only class 1"):
        bl.LogisticProbe().fit(np.zeros((3, 2)), [1, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        bl.LogisticProbe().fit(np.array([[np.nan], [1.0]]), [0, 1])
    with pytest.raises(ValueError, match=r"not fitted"):
        bl.LogisticProbe().decision_function(np.zeros((1, 2)))
    fitted = bl.LogisticProbe().fit(np.array([[0.0], [1.0]]), [0, 1])
    with pytest.raises(ValueError, match=r"X must be \[N, 1\]"):
        fitted.decision_function(np.zeros((2, 3)))


# -- spectrum ---------------------------------------------------------------------------------


def test_spectrum_of_a_sinusoid_peaks_in_its_radial_bin():
    n, k = 150, 25  # 25 cycles across the chip, along x and along y: power at radius 25 px
    x = np.arange(n)
    grey = 128 + 60 * np.cos(2 * np.pi * k * x / n)[None, :] + 60 * np.cos(2 * np.pi * k * x / n)[:, None]
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey))) ** 2
    ring = bl.azimuthal_average(power, 75)  # R = 75: one bin per pixel of radius
    assert ring.shape == (75,) and (np.flatnonzero(ring[1:] > 1e-9 * ring[1:].max()) + 1).tolist() == [k]
    chip = np.repeat(grey[:, :, None], 3, axis=2).round().astype(np.uint8)
    f = bl.spectrum_features(chip[None], bins=75)  # log power of the uint8 grey chip
    assert f.shape == (1, 75) and np.argmax(f[0, 1:]) + 1 == k  # bin 0 holds DC
    assert np.argmax(bl.spectrum_features(chip[None], bins=15)[0, 1:]) + 1 == k // 5


def test_spectrum_matches_direct_numpy():
    rng = np.random.default_rng(1)
    chips = rng.integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    bins = 8
    got = bl.spectrum_features(chips, bins=bins)
    for c, row in zip(chips, got):
        grey = 0.299 * c[..., 0] + 0.587 * c[..., 1] + 0.114 * c[..., 2]
        p = np.log(np.abs(np.fft.fftshift(np.fft.fft2(grey))) ** 2 + 1e-8)
        sums, counts = np.zeros(bins), np.zeros(bins)
        for i in range(40):
            for j in range(40):
                r = np.hypot(i - 20, j - 20)
                b = int(r * bins / 20)
                if b < bins:
                    sums[b] += p[i, j]
                    counts[b] += 1
        np.testing.assert_allclose(row, sums / counts, rtol=1e-10)
    with pytest.raises(ValueError, match="at most 20 bins"):
        bl.spectrum_features(chips, bins=21)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        bl.spectrum_features(chips[0])


def _toy_spectrum_chips(n: int, seed: int):
    """Reals: blocky noise; fakes: the same plus faint stripes of period 4 px (an upsampling
    artefact at radius 10 of the 40 x 40 spectrum)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 20, size=(2 * n, 10, 10, 3)).repeat(4, axis=1).repeat(4, axis=2)
    checker = np.cos(np.pi * np.arange(40) / 2)[None, None, :, None] * 6.0
    x = base.copy()
    x[n:] += checker
    y = np.r_[np.zeros(n, int), np.ones(n, int)]
    return np.clip(x, 0, 255).astype(np.uint8), y


def test_spectrum_detector_learns_and_fails_on_shuffled_labels():
    x, y = _toy_spectrum_chips(20, 0)
    xt, yt = _toy_spectrum_chips(20, 1)
    det = bl.SpectrumDetector(bins=16).fit(x, y)
    assert roc_auc(det.decision_function(xt), yt) > 0.95
    shuffled = np.random.default_rng(2).permutation(y)
    ctrl = bl.SpectrumDetector(bins=16).fit(x, shuffled)
    assert 0.25 < roc_auc(ctrl.decision_function(xt), yt) < 0.75
    # chips smaller than twice the bins (a backbone under 128 px at the default 64): one bin per pixel of radius
    small = bl.SpectrumDetector(bins=64).fit(x, y)
    assert small.bins_ == 20 and roc_auc(small.decision_function(xt), yt) > 0.95


# -- backbone baselines and FakeSpotter ablations on sample chips ------------------------------


@pytest.fixture(scope="module")
def chips():
    samples = pytest.importorskip("fakespotter.samples")
    try:
        x, y, _ = samples.sample_chips(16, 16, seed=0)
    except Exception as e:
        pytest.skip(f"sample data unavailable ({e}); run: python -m fakespotter.samples fetch")
    rng = np.random.default_rng(0)
    tr = np.zeros(len(y), bool)  # half of each class trains, half tests
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        tr[rng.permutation(idx)[: len(idx) // 2]] = True
    return x[tr], y[tr], x[~tr], y[~tr]


@pytest.fixture(scope="module")
def passes(chips):
    """One backbone pass over the training and the test chips, shared by the backbone tests."""
    x, _, xt, _ = chips
    reader = bl.BackboneReader()
    return reader(x), reader(xt)


@pytest.mark.parametrize("name", ["descriptor-probe", "mnc-only"])
def test_backbone_baselines_learn_and_fail_on_shuffled_labels(chips, passes, name):
    x, y, xt, yt = chips
    p, pt = passes
    det = bl.make_baseline(name).fit(x, y, backbone_pass=p)
    assert roc_auc(det.decision_function(xt, backbone_pass=pt), yt) > 0.8
    aucs = []
    for seed in range(5):  # a shuffled-label control: no better than chance on average
        s = np.random.default_rng(seed + 10).permutation(y)
        aucs.append(roc_auc(bl.make_baseline(name).fit(x, s, backbone_pass=p).decision_function(xt, backbone_pass=pt), yt))
    assert np.mean(aucs) < 0.75, aucs


def test_mnc_only_equals_the_taps_coverage(chips, passes):
    from fakespotter.backbones import get_backbone
    from fakespotter.calibration import ThresholdCalibrator
    from fakespotter.features import features
    from fakespotter.taps import Tap

    x, y, xt, _ = chips
    p, pt = passes
    det = bl.MNCOnly().fit(x, y, backbone_pass=p)
    m = det.mnc(pt)
    tap = Tap(get_backbone("dlib_resnet_v1"))
    assert m.shape == (len(xt), len(tap.layers))  # one number per monitored layer
    cal = ThresholdCalibrator(tap).fit([x])
    np.testing.assert_allclose(det.thresholds_, cal.layer_means_, rtol=1e-12)
    tap.set_thresholds(cal.thresholds_)
    np.testing.assert_array_equal(m, tap.mnc(features(xt, tap).rows).numpy())
    assert 0 < m.mean() < 1
    assert pt.descriptor.shape == (len(xt), 128)
    with torch_no_grad():
        bb = get_backbone("dlib_resnet_v1")
        import torch

        ref = bb.module(bb.preprocessing(torch.from_numpy(xt[:2]).permute(0, 3, 1, 2).float())).numpy()
    np.testing.assert_allclose(pt.descriptor[:2], ref, rtol=1e-5, atol=1e-5)  # the final descriptor


def torch_no_grad():
    import torch

    return torch.no_grad()


def test_fakespotter_ablations_change_the_features(chips):
    x, y, xt, yt = chips
    params = {"hidden": (8,), "max_epochs": 5, "seed": 0}
    fits = {n: bl.make_baseline(n, params).fit(x, y) for n in ("fs-element", "fs-per-neuron")}
    element, neuron = fits["fs-element"].detector_, fits["fs-per-neuron"].detector_
    assert element.tap_.granularity == "element" and neuron.tap_.granularity == "channel"
    assert element.tap_.layout.total_words > 10 * neuron.tap_.layout.total_words  # element rows are far wider
    assert element.thresholds_.mode == "per_layer" and neuron.thresholds_.mode == "per_neuron"
    t = neuron.thresholds_.values[1]
    assert t.numel() > 1 and len(set(t.tolist())) > 1  # one threshold per neuron, not one per layer
    for n, f in fits.items():
        assert roc_auc(f.decision_function(xt), yt) > 0.7, n


def test_suite_shares_one_split_and_resolves_names(chips):
    x, y, xt, yt = chips
    suite = bl.BaselineSuite(["spectrum", "descriptor-probe", "mnc-only"], seed=0).fit(x, y)
    assert suite.counts_["validation"]["real"] >= 1 and suite.counts_["validation"]["fake"] >= 1
    assert suite.counts_["train"]["real"] + suite.counts_["validation"]["real"] == int((y == 0).sum())
    s1 = suite.decision_functions(xt[:6])
    s2 = bl.BaselineSuite(["spectrum", "descriptor-probe", "mnc-only"], seed=0).fit(x, y).decision_functions(xt[:6])
    for n in s1:
        np.testing.assert_array_equal(s1[n], s2[n])  # seeded and deterministic
    assert set(suite.operating_thresholds_) == set(s1)
    assert bl.resolve_baselines("all", {"granularity": "channel", "threshold_mode": "per_layer"}) == [
        "descriptor-probe", "spectrum", "mnc-only", "fs-element", "fs-per-neuron"]
    assert bl.resolve_baselines("all", {"granularity": "element", "threshold_mode": "per_neuron"})[-2:] == [
        "fs-channel", "fs-per-layer"]
    assert bl.resolve_baselines("spectrum, mnc-only,spectrum") == ["spectrum", "mnc-only"]
    with pytest.raises(ValueError, match=r"unknown baseline 'cnn'; choose from descriptor-probe, spectrum"):
        bl.resolve_baselines("spectrum,cnn")


# -- augmentation -----------------------------------------------------------------------------


def test_augmenter_is_seeded_and_attacks_a_fraction():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(200, 24, 24, 3), dtype=np.uint8)
    aug = perturb.Augmenter(fraction=0.3, seed=5)
    a = aug(x, 0)
    record = aug.last_
    assert np.array_equal(a, aug(x, 0)) and not np.array_equal(a, aug(x, 1))
    changed = {i for i in range(len(x)) if not np.array_equal(a[i], x[i])}
    assert changed <= {i for i, _, _ in record} and 40 <= len(record) <= 80
    assert {k for _, k, _ in record} == set(perturb.ATTACKS)
    for _, k, level in record:
        assert min(perturb.ATTACKS[k]) <= level <= max(perturb.ATTACKS[k])
    assert np.array_equal(perturb.Augmenter(fraction=0.0)(x), x)
    assert repr(perturb.Augmenter(0.3, 5, ["jpeg"])) == "Augmenter(fraction=0.3, seed=5, attacks=['jpeg'])"
    with pytest.raises(ValueError, match="fraction must be in"):
        perturb.Augmenter(fraction=1.5)


def test_hold_out_keeps_a_group_of_both_classes_on_one_side():
    from fakespotter.baselines import _hold_out

    groups = np.array([f"id{i}" for i in range(10)] * 2 + ["fake-only-a", "fake-only-b"])
    y = np.array([0] * 10 + [1] * 12)
    for seed in range(5):
        val = _hold_out(groups, y, 0.3, seed)
        for g in np.unique(groups):
            assert len(set(val[groups == g].tolist())) == 1, (seed, g)  # never split, across the classes
        assert val[y == 0].sum() == 3 and 0 < val[y == 1].sum() < 12
    separate = np.where(y == 1, np.char.add("f-", groups), groups)  # same layout, no shared id
    assert any(not np.array_equal(_hold_out(separate, y, 0.3, s)[:10], _hold_out(separate, y, 0.3, s)[10:20])
               for s in range(5))


def test_an_explicit_target_fpr_replaces_the_models_target_tpr_and_a_lone_group_is_refused():
    suite = bl.BaselineSuite(["spectrum"], model_params={"target_tpr": 0.9, "target_fpr": None}, target_fpr=0.05)
    assert suite.target_fpr == 0.05 and suite.target_tpr is None
    kept = bl.BaselineSuite(["spectrum"], model_params={"target_tpr": 0.9})
    assert kept.target_tpr == 0.9
    with pytest.raises(ValueError, match=r"the real class has 1 group\(s\); at least 2 are needed"):
        bl._hold_out(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]), 0.25, 0)
    val = bl._hold_out(np.array([0, 1, 2, 3, 4, 5]), np.array([0, 0, 0, 1, 1, 1]), 0.9, 0)
    assert 0 < val[:3].sum() < 3 and 0 < val[3:].sum() < 3  # (a large fraction still leaves each class a side)
