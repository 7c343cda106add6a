"""detector.py edge cases, from a mutation audit: the operating threshold, settings, scoring,
fit's split and summary, and load's checks. A small registered backbone (32x32 chips) keeps fits
cheap."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fakespotter import FakeSpotter, artifact, custom_backbone, detector
from fakespotter.backbones.registry import _REGISTRY, register_backbone
from fakespotter.detector import _operating_threshold, describe_operating_threshold
from tapnets import POOLED_LAYERS, PooledNet

SMALL = "detector-edges-small"


def chips(n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 120, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(100, 256, (n, 32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def small():
    before = dict(_REGISTRY)
    register_backbone(SMALL, lambda: custom_backbone(PooledNet(), POOLED_LAYERS, 32, id=SMALL, scale=1 / 255,
                                                     mean=(0.5,) * 3, std=(0.25,) * 3))
    yield SMALL
    _REGISTRY.clear()
    _REGISTRY.update(before)


def make(**kw) -> FakeSpotter:
    return FakeSpotter(**{"backbone": SMALL, "aligned": True, "hidden": (4,), "max_epochs": 3, **kw})


@pytest.fixture(scope="module")
def fitted(small, tmp_path_factory):
    real, fake = chips()
    det = make().fit(real, fake)
    path = tmp_path_factory.mktemp("m") / "m.fsm"
    det.save(path)
    return det, path, real, fake


def resave(path, dst, meta=None, tensors=None):
    t, m = artifact.read_model(path)
    if meta:
        meta(m)
    if tensors:
        tensors(t)
    for k in ("format", "format_version", "bit_layout_version"):
        m.pop(k)
    return artifact.write_model(dst, t, m)


# -- the operating threshold -----------------------------------------------------------------------

def test_an_fpr_target_met_exactly_is_taken():
    """100 reals, FPR 0.05: t is the 6th highest real, so exactly 5 reals lie above it (5.000...01
    floored, not 4)."""
    real = np.arange(100.0)
    op = _operating_threshold(real, np.array([99.5]), 0.05)
    assert op["logit"] == 94.0 and op["fpr_at_validation"] == 0.05
    assert _operating_threshold(np.arange(10.0), np.array([9.5]), 0.3)["fpr_at_validation"] == 0.3


def test_tpr_at_validation_counts_fakes_strictly_above_the_threshold():
    """A fake scoring exactly t is called real by predict (score > t): not counted as detected."""
    op = _operating_threshold(np.arange(10.0), np.array([8.0, 8.0, 9.5, 1.0]), 0.1)
    assert op["logit"] == 8.0 and op["tpr_at_validation"] == 0.25


def test_describe_operating_threshold_words():
    op = {"logit": 1.23456, "target_fpr": 0.01, "target_tpr": None, "fpr_at_validation": 0.008,
          "tpr_at_validation": 0.9}
    assert describe_operating_threshold(op) == ("logit 1.235 for FPR <= 0.01 on validation reals "
                                                "(validation FPR 0.008, TPR 0.9)")
    op.update(target_fpr=None, target_tpr=0.75)
    assert describe_operating_threshold(op) == ("logit 1.235 for TPR >= 0.75 on validation fakes "
                                                "(validation FPR 0.008, TPR 0.9)")


# -- settings ----------------------------------------------------------------------------------------

def test_repr_quotes_the_settings():
    r = repr(FakeSpotter(hidden=(4,)))
    assert r.startswith("FakeSpotter(backbone='dlib_resnet_v1', layers=None, granularity='channel', "
                        "threshold_mode='per_layer', classifier='mlp', hidden=(4,), target_fpr=0.01, ")
    assert r.endswith("device='cpu')")


@pytest.mark.parametrize("params, message", [
    ({"target_fpr": 1.0}, r"target_fpr must be in \(0, 1\), got 1.0"),
    ({"target_tpr": 0.0}, r"target_tpr must be in \(0, 1\] or None, got 0.0"),
    ({"target_fpr": "0.1"}, r"target_fpr must be in \(0, 1\), got '0.1'"),
    ({"target_tpr": True}, r"target_tpr must be in \(0, 1\] or None, got True"),
    ({"weak_face_score": float("nan")}, "weak_face_score must be a finite number, got nan"),
    ({"hidden": b"\x10"}, r"hidden must be a sequence of layer widths .*got b'\\x10'"),
    ({"validation_fraction": "0.5"}, r"validation_fraction must be in \(0, 1\) .*got '0.5'"),
    ({"device": "meta"}, "FakeSpotter: device 'meta': only cpu and cuda devices are supported"),
    ({"seed": True}, "^FakeSpotter: seed must be an int >= 0, got True"),
    ({"upsample": True}, "^FakeSpotter: upsample must be an int >= 0, got True"),
], ids=["fpr-1", "tpr-0", "fpr-str", "tpr-bool", "weak-nan", "hidden-bytes", "fraction-str", "device-meta", "seed-bool", "upsample-bool"])
def test_bad_settings_are_refused_before_any_work(small, params, message):
    real, fake = chips(4)
    with pytest.raises(ValueError, match=message):
        make(**params).fit(real, fake)


def test_a_target_tpr_of_one_is_allowed(small):
    real, fake = chips(8)
    det = make(target_tpr=1.0).fit(real, fake)
    assert det.operating_threshold_["target_tpr"] == 1.0 and det.operating_threshold_["tpr_at_validation"] == 1.0


@pytest.mark.parametrize("name, value", [("target_fpr", 0.2), ("target_tpr", 0.5), ("validation_fraction", 0.5),
                                         ("hidden", (5,)), ("backbone", "dlib_resnet_v1")])
def test_save_refuses_each_fitted_setting_changed_after_fit(fitted, name, value):
    det = copy.copy(fitted[0])
    setattr(det, name, value)
    with pytest.raises(ValueError, match=rf"FakeSpotter.save: {name} \(fitted with .*\): changed after fit, which "
                                         rf"does not change the fitted model; fit again, or set it back$"):
        det.to_bytes()


def test_save_says_them_for_several_changed_settings(fitted):
    det = copy.copy(fitted[0])
    det.target_fpr, det.seed = 0.2, 4
    with pytest.raises(ValueError, match=r"target_fpr \(fitted with 0.01, now 0.2\); seed \(fitted with 0, now 4\): "
                                         r".* or set them back$"):
        det.to_bytes()


# -- scoring -----------------------------------------------------------------------------------------

class _FaceRowsOf3:
    """Stands for FaceRows: image 0 holds two faces, image 1 one, image 2 none."""

    def __init__(self, rows):
        self.rows, self.images = rows, 0

    def __iter__(self):
        self.images = 3
        yield np.array([0, 0]), np.array([0, 1]), self.rows[:2]
        yield np.array([1]), np.array([0]), self.rows[2:]


def test_an_image_scores_its_most_suspicious_face(fitted, monkeypatch):
    det, _, real, fake = fitted
    rows = det.rows(np.concatenate([real[:1], fake[:1], real[1:2]]))
    s = det.classifier_.decision_function(rows)
    assert s[0] != s[1]
    monkeypatch.setattr(det, "_face_rows", lambda X: _FaceRowsOf3(rows))
    out = det.decision_function(["a", "b", "c"])
    assert out[0] == max(s[0], s[1]) and out[1] == s[2] and math.isnan(out[2])


def test_predict_proba_is_p_real_then_p_fake(fitted):
    det, _, real, fake = fitted
    x = np.concatenate([real[:3], fake[:3]])
    p = det.predict_proba(x)
    assert torch.equal(p[:, 1], torch.sigmoid(det.decision_function(x))) and torch.equal(p[:, 0], 1 - p[:, 1])


def test_a_score_equal_to_the_operating_threshold_is_real(fitted):
    det = copy.copy(fitted[0])
    x = fitted[3][:1]
    s = float(det.decision_function(x)[0])
    det.operating_threshold_ = {**det.operating_threshold_, "logit": s}
    assert det.predict(x).tolist() == ["real"]
    det.operating_threshold_ = {**det.operating_threshold_, "logit": float(np.nextafter(np.float32(s), np.float32(-np.inf)))}
    assert det.predict(x).tolist() == ["fake"]


# -- fit -----------------------------------------------------------------------------------------------

def _fake_chips(array, image_index):
    class C:
        pass

    c = C()
    c.array, c.image_index = array, np.asarray(image_index)
    return c


def test_fit_counts_the_images_without_a_face(small, monkeypatch):
    real, fake = chips(6)
    images = {"real": [np.zeros((40, 40, 3), np.uint8)] * 8, "fake": [np.ones((40, 40, 3), np.uint8)] * 8}
    monkeypatch.setattr(detector, "make_chips", lambda imgs, **kw: _fake_chips(
        real if imgs[0].max() == 0 else fake, [0, 1, 2, 3, 5, 6]))
    det = make(aligned=False).fit(images["real"], images["fake"])
    counts = det.training_summary_["counts"]
    assert counts["images"] == {"real": 8, "fake": 8} and counts["images_without_faces"] == {"real": 2, "fake": 2}


@pytest.mark.parametrize("empty", ["real", "fake"])
def test_fit_says_which_class_gave_no_face(small, monkeypatch, empty):
    real, fake = chips(6)

    def make_chips(imgs, **kw):  # the class named gives no chip
        none = (imgs[0].max() == 0) == (empty == "real")
        return _fake_chips(real[:0], []) if none else _fake_chips(fake, range(6))

    monkeypatch.setattr(detector, "make_chips", make_chips)
    images = ([np.zeros((40, 40, 3), np.uint8)] * 5, [np.ones((40, 40, 3), np.uint8)] * 7)
    n = 5 if empty == "real" else 7
    with pytest.raises(ValueError, match=rf"^FakeSpotter.fit: no face chips from the {empty} inputs \({n} images, no face"):
        make(aligned=False).fit(*images)


@pytest.mark.parametrize("n, fraction, n_val", [(3, 0.1, 1), (3, 0.9, 2), (6, 0.45, 3), (8, 0.25, 2)])
def test_the_validation_part_is_the_rounded_share_kept_between_one_and_all_but_one(small, n, fraction, n_val):
    real, fake = chips(n)
    det = make(validation_fraction=fraction).fit(real, fake)
    assert det.training_summary_["counts"]["validation"] == {"real": n_val, "fake": n_val}
    assert det.training_summary_["counts"]["train"] == {"real": n - n_val, "fake": n - n_val}


def test_a_group_shared_by_both_classes_is_held_out_whole_with_its_reals(small):
    """Groups of 1, 2, 4 and 8 chips; ids found in both classes (7 and "7" are one id): the fakes of
    a group go to the side of its reals, so both classes hold out the same group."""
    sizes = [1, 2, 4, 8]
    real, fake = chips(15)
    for real_ids, fake_ids in ((np.repeat(list("abcd"), sizes), np.repeat(list("abcd"), sizes)),
                               (np.repeat([0, 1, 2, 3], sizes), np.repeat(list("0123"), sizes))):
        for seed in range(4):
            v = make(seed=seed, max_epochs=1).fit(real, fake, groups=(real_ids, fake_ids)).training_summary_["counts"]["validation"]
            assert v["real"] == v["fake"] and v["real"] in sizes, (seed, v)


def test_fakes_whose_groups_all_train_leave_no_fake_validation_and_are_refused(small):
    real, fake = chips(4)
    for seed in range(4):
        with pytest.raises(ValueError, match=r"cannot hold out a validation part of the fake class .*from 1 group "):
            make(seed=seed).fit(real, fake, groups=(list("abcd"), list("aaaa")))


def test_a_validation_set_without_fakes_is_refused(small):
    real, fake = chips(6)
    with pytest.raises(ValueError, match="the validation set needs faces of both classes"):
        make().fit(real, fake, validation=(real[:2], fake[:0]))


def test_augment_gets_each_class_as_rounded_uint8_chips_with_its_stream(small):
    real, fake = chips(8)
    seen = []

    def augment(x, stream):
        seen.append((stream, x.copy()))
        return x

    realf = torch.from_numpy(real).permute(0, 3, 1, 2).float() + 0.6  # 255.6 rounds to 256, clamped to 255
    det = make().fit(realf, fake, validation=(real[:2], fake[:2]), augment=augment)
    assert [s for s, _ in seen] == [0, 1]
    assert np.array_equal(seen[0][1], np.clip(np.round(real.astype(np.float32) + 0.6), 0, 255).astype(np.uint8))
    assert np.array_equal(seen[1][1], fake)
    assert det.training_summary_["augmentation"] == {"type": "augment"}


def test_the_augmentation_summary(small):
    class Half:
        seed = 3

        def __call__(self, x, stream):
            return x

    class Full(Half):
        fraction, attacks = 0.5, ["jpeg"]

    assert detector._augment_summary(Half()) == {"type": "Half"}
    assert detector._augment_summary(Full()) == {"type": "Full", "fraction": 0.5, "seed": 3, "attacks": ["jpeg"]}


def test_the_training_summary(small):
    """Unequal classes (20 reals, 12 fakes), no sources given; thresholds from the training chips
    of both classes; the validation accuracy counts a real scoring exactly the threshold as real."""
    real, fake = chips(20)
    vreal, vfake = chips(6, seed=1)
    det = make().fit(real, fake[:12], validation=(vreal, vfake))
    t = det.training_summary_
    assert t["counts"]["train"] == {"real": 20, "fake": 12} and t["counts"]["validation"] == {"real": 6, "fake": 6}
    assert t["sources"] == {} and t["thresholds_images"] == 32
    s = det.decision_function(np.concatenate([vreal, vfake])).numpy()
    y = np.repeat([0, 1], 6)
    op = det.operating_threshold_
    assert op["fpr_at_validation"] == float(np.mean(s[y == 0] > op["logit"]))
    assert op["tpr_at_validation"] == float(np.mean(s[y == 1] > op["logit"]))
    assert t["metrics"]["validation_accuracy_at_operating_threshold"] == float(np.mean((s > op["logit"]) == (y == 1)))
    assert t["metrics"]["validation_auc"] > 0.9 and op["tpr_at_validation"] > 0.5


def test_the_seed_reaches_the_classifier_and_max_epochs_the_logistic_one(small):
    real, fake = chips(8)
    val = (real[:2], fake[:2])
    a, b = (make(seed=s).fit(real, fake, validation=val).classifier_.state_tensors() for s in (0, 1))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    det = make(classifier="logistic", max_epochs=2).fit(real, fake, validation=val)
    assert det.classifier_.max_epochs == 2


def test_element_granularity_reaches_the_tap(small, tmp_path):
    real, fake = chips(8)
    det = make(granularity="element").fit(real, fake)
    assert det.tap_.granularity == "element" and det.thresholds_.granularity == "element"
    assert artifact.read_model(det.save(tmp_path / "e.fsm"))[1]["granularity"] == "element"


# -- load ----------------------------------------------------------------------------------------------

def test_load_refuses_layer_names_that_are_not_strings(fitted, tmp_path):
    bad = resave(fitted[1], tmp_path / "l.fsm", meta=lambda m: m.update(layers=[1, 2, 3]))
    with pytest.raises(artifact.ModelFileError, match=r"l.fsm: metadata lacks .*layers must be a list of names, got \[1, 2, 3\]"):
        FakeSpotter.load(bad)


def test_load_refuses_a_row_width_the_layers_do_not_give(fitted, tmp_path):
    for n, delta in (("more", 1), ("fewer", -1)):
        bad = resave(fitted[1], tmp_path / f"{n}.fsm", meta=lambda m: m.update(row_words=m["row_words"] + delta))
        with pytest.raises(artifact.ModelFileError, match=rf"{n}.fsm: rows of \d+ words recorded, but these layers give"):
            FakeSpotter.load(bad)


def test_load_takes_the_threshold_image_count_and_a_count_of_zero(fitted, tmp_path):
    det, path, _, _ = fitted
    assert FakeSpotter.load(path).thresholds_.n_images == det.training_summary_["thresholds_images"] > 0
    for name, edit in (("zero", lambda m: m["training"].update(thresholds_images=0)), ("none", lambda m: m.pop("training"))):
        assert FakeSpotter.load(resave(path, tmp_path / f"{name}.fsm", meta=edit)).thresholds_.n_images == 0


def test_load_refuses_a_classifier_type_its_settings_contradict(small, tmp_path):
    """A linear mlp (hidden ()) stored, the settings saying logistic: the same widths, another type."""
    real, fake = chips(6)
    path = make(hidden=()).fit(real, fake).save(tmp_path / "m.fsm")
    bad = resave(path, tmp_path / "c.fsm", meta=lambda m: m["detector_params"].update(classifier="logistic"))
    with pytest.raises(artifact.ModelFileError, match=r"contradict the classifier stored \('mlp', hidden \[\]\)"):
        FakeSpotter.load(bad)


def test_a_file_from_another_version_keeps_its_own_sha256(fitted, tmp_path):
    """model_sha256 of a loaded model is its file's, also where saving it again would write other
    bytes (another fakespotter version wrote it)."""
    other = resave(fitted[1], tmp_path / "o.fsm", meta=lambda m: m.update(fakespotter_version="0.0.1"))
    det = FakeSpotter.load(other)
    assert det.model_sha256() == artifact.file_sha256(other) != __import__("hashlib").sha256(det.to_bytes()).hexdigest()


def test_float_chips_are_checked_a_batch_at_a_time(small, monkeypatch):
    """fit and the scoring methods check float32 chips' range batch_size chips at a time (no whole
    float32 copy)."""
    sizes = []
    original = detector.prepare_chips
    monkeypatch.setattr(detector, "prepare_chips", lambda x, *a, **k: (sizes.append(len(x)), original(x, *a, **k))[1])
    real, fake = chips(12)
    realf = torch.from_numpy(real).permute(0, 3, 1, 2).float()
    det = make(batch_size=5).fit(realf, fake)
    assert sizes == [5, 5, 2]
    sizes.clear()
    det.decision_function(realf.numpy())
    assert sizes == [5, 5, 2]


def test_the_split_is_drawn_among_the_images_with_a_face(small, monkeypatch):
    """Of 71 images only the first and the last hold a face: one of the two is held out per class,
    whatever the seed (drawn among all 71 images, both could land on one side)."""
    real, fake = chips(2)
    monkeypatch.setattr(detector, "make_chips", lambda imgs, **kw: _fake_chips(real if imgs[0].max() == 0 else fake, [0, 70]))
    images = ([np.zeros((40, 40, 3), np.uint8)] * 71, [np.ones((40, 40, 3), np.uint8)] * 71)
    for seed in range(4):
        det = make(aligned=False, seed=seed, max_epochs=1).fit(*images)
        assert det.training_summary_["counts"]["validation"] == {"real": 1, "fake": 1}
