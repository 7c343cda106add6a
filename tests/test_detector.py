"""The FakeSpotter detector: fit, scores, the model file and every refusal of a bad file."""

from __future__ import annotations

import hashlib
import importlib
import json
import struct
import warnings

import numpy as np
import pytest
import torch

import fakespotter
from fakespotter import artifact
from fakespotter.classifier import NotFittedError
from fakespotter import detector
from fakespotter.detector import FakeSpotter, _operating_threshold
from fakespotter.evaluate import roc_auc


def noise_chips(n, seed, power):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 150, 150, 3, generator=g) ** power * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    real, fake = noise_chips(24, 0, 1.0), noise_chips(24, 1, 2.0)
    det = FakeSpotter(hidden=(8,), max_epochs=15).fit(real, fake, sources={"fake": "test noise"})
    path = tmp_path_factory.mktemp("model") / "det.fsm"
    det.save(path)
    return det, path, real, fake


def rewrite_header(src, dst, edit):
    """Copy a safetensors file, letting `edit(header_dict)` change its JSON header."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    head = json.dumps(header).encode()
    head += b" " * ((-len(head)) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n :])
    return dst


def test_save_load_identical_scores(fitted, tmp_path):
    det, path, real, fake = fitted
    again = FakeSpotter.load(path)
    x = torch.cat([real, fake])
    assert torch.equal(again.decision_function(x), det.decision_function(x))
    assert again.operating_threshold_ == det.operating_threshold_
    assert list(again.predict(x)) == list(det.predict(x))
    assert again.classes_ == ("real", "fake")
    meta = again.model_meta_
    assert meta["backbone"]["id"] == "dlib_resnet_v1" and len(meta["backbone"]["weights_sha256"]) == 64
    assert meta["training"]["counts"]["train"]["real"] + meta["training"]["counts"]["validation"]["real"] == 24
    assert meta["training"]["sources"] == {"fake": "test noise"}
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        det.save(path)
    (tmp_path / "dangling.fsm").symlink_to(tmp_path / "nowhere.fsm")  # there before: not "appeared while writing"
    with pytest.raises(FileExistsError, match=r"dangling.fsm already exists; pass overwrite=True"):
        det.save(tmp_path / "dangling.fsm")


def test_a_setting_the_fitted_model_embodies_changed_after_fit_is_not_saved(fitted, tmp_path):
    """Setting classifier, granularity, ... after fit changes no fitted part: save refuses to write
    a file whose settings say otherwise (a changed classifier type wrote a file load refused;
    a changed granularity one that said 'element' over a channel tap). Settings of use (batch
    size, face detection, device) are saved as they are now."""
    import copy

    det, path, real, fake = fitted
    for loaded in (False, True):
        d = copy.deepcopy(FakeSpotter.load(path) if loaded else det)
        d.classifier, d.granularity, d.hidden = "logistic", "element", [8]  # (a list: the same widths)
        with pytest.raises(ValueError, match=r"FakeSpotter.save: granularity \(fitted with 'channel', now 'element'\); "
                                             r"classifier \(fitted with 'mlp', now 'logistic'\): changed after fit"):
            d.save(tmp_path / "changed.fsm")
        assert not (tmp_path / "changed.fsm").exists()
        for name in ("seed", "layers", "threshold_mode", "max_epochs"):
            e = copy.deepcopy(det)
            setattr(e, name, {"seed": 1, "layers": ["fc"], "threshold_mode": "per_neuron", "max_epochs": 3}[name])
            with pytest.raises(ValueError, match=f"FakeSpotter.save: {name} "):
                e.to_bytes()
        d.classifier, d.granularity = "mlp", "channel"
        d.batch_size, d.upsample = 7, 0
        d.save(tmp_path / f"use{loaded}.fsm")
        again = FakeSpotter.load(tmp_path / f"use{loaded}.fsm")
        assert (again.batch_size, again.upsample) == (7, 0)
        assert torch.equal(again.decision_function(real[:4]), det.decision_function(real[:4]))


def test_a_model_file_from_before_the_batch_size_limit_loads(fitted, tmp_path):
    """Files written before batch_size was capped at 4096 hold larger ones: a setting of use, taken
    down to the limit, not a reason to refuse the model."""
    _, path, real, _ = fitted
    tensors, meta = artifact.read_model(path)
    meta["detector_params"]["batch_size"] = 5000
    artifact.write_model(tmp_path / "big.fsm", tensors, meta)
    det = FakeSpotter.load(tmp_path / "big.fsm")
    assert det.batch_size == 4096
    assert torch.equal(det.decision_function(real[:3]), FakeSpotter.load(path).decision_function(real[:3]))


def test_loading_leaves_the_callers_torch_random_stream_where_it_was(fitted):
    """Building a backbone or a classifier draws their random initial weights, which the file's
    replace: a user who seeds torch and then loads a detector gets the stream the seed gives."""
    from fakespotter.backbones import get_backbone

    _, path, real, _ = fitted
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    det = FakeSpotter.load(path)
    get_backbone("dlib_resnet_v1").module  # noqa: B018
    det.decision_function(real[:2])
    assert torch.equal(torch.rand(4), want)


def test_fit_on_image_files_records_their_fingerprints(fitted, tmp_path):
    """fit given image files (training and validation) keeps the first 64 bits of each file's
    sha256, saved and loaded with the model; fit on arrays keeps none."""
    from PIL import Image

    det, path, real, fake = fitted
    assert det.training_images_ is None and FakeSpotter.load(path).training_images_ is None
    files = {}
    for name, chips in (("real", real[:8]), ("fake", fake[:8]), ("vreal", real[8:12]), ("vfake", fake[8:12])):
        files[name] = [tmp_path / f"{name}{i}.png" for i in range(len(chips))]
        for f, c in zip(files[name], chips.numpy()):
            Image.fromarray(c).save(f)
    det2 = FakeSpotter(hidden=(4,), max_epochs=2, aligned=True).fit(
        [str(f) for f in files["real"]], files["fake"], validation=(files["vreal"], files["vfake"]))
    want = sorted(int.from_bytes(hashlib.sha256(f.read_bytes()).digest()[:8], "little", signed=True)
                  for fs in files.values() for f in fs)
    assert det2.training_images_.tolist() == want
    det2.save(tmp_path / "m.fsm")
    assert FakeSpotter.load(tmp_path / "m.fsm").training_images_.tolist() == want
    # format version 2 says the file may hold them; one without stays version 1 (older readers load it)
    assert artifact.read_model(tmp_path / "m.fsm")[1]["format_version"] == 2
    assert artifact.read_model(path)[1]["format_version"] == 1
    tensors, meta = artifact.read_model(tmp_path / "m.fsm")
    artifact.write_model(tmp_path / "v1.fsm", tensors, meta)
    rewrite_header(tmp_path / "v1.fsm", tmp_path / "v1.fsm", lambda h: h["__metadata__"].update(
        fakespotter=h["__metadata__"]["fakespotter"].replace('"format_version": 2', '"format_version": 1')))
    with pytest.raises(artifact.ModelFileError, match="format version 1 holds no training.images tensor"):
        artifact.read_model(tmp_path / "v1.fsm")


def test_the_same_training_gives_the_same_file_with_source_date_epoch(fitted, monkeypatch):
    """Training is deterministic on a CPU; only the time stamp differs, and SOURCE_DATE_EPOCH
    (the reproducible-builds convention) fixes it."""
    _, _, real, fake = fitted
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = (FakeSpotter(hidden=(4,), max_epochs=2).fit(real[:12], fake[:12]) for _ in range(2))
    assert a.training_summary_["created"] == "2023-11-14T22:13:20+00:00"
    assert a.to_bytes() == b.to_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ValueError, match="SOURCE_DATE_EPOCH must be whole seconds since 1970, got 'yesterday'"):
        FakeSpotter(hidden=(4,), max_epochs=2).fit(real[:12], fake[:12])


def test_scores_on_rows_chips_and_explanations(fitted):
    det, path, real, fake = fitted
    rows = det.rows(real[:4])
    assert torch.equal(det.decision_function(rows), det.decision_function(real[:4]))
    proba = det.predict_proba(real[:4])
    assert proba.shape == (4, 2) and torch.allclose(proba.sum(1), torch.ones(4))
    ex = det.explain(real[:4])
    assert ex["mnc"].shape == (4, len(ex["layers"]))
    assert ((ex["mnc"] >= 0) & (ex["mnc"] <= 1)).all()
    assert abs(float(ex["layer_weight_share"].sum()) - 1) < 1e-5
    # each layer's share counts the weights of its own features, not of the padding bits of its last
    # word (always 0, their weights never trained)
    w = det.classifier_.first_layer_weight().abs().sum(dim=0)
    slots = det.tap_.layout.layers
    assert any(s.features % 64 for s in slots)
    own = torch.stack([w[s.word_offset * 64 : s.word_offset * 64 + s.features].sum() for s in slots])
    assert torch.allclose(ex["layer_weight_share"], own / own.sum())


def test_images_without_faces_score_nan(fitted, tmp_path):
    from PIL import Image

    det = fitted[0]
    blank = tmp_path / "blank.png"
    Image.new("RGB", (120, 90), (40, 90, 200)).save(blank)
    s = det.decision_function([str(blank)])
    assert s.shape == (1,) and torch.isnan(s).all()
    assert det.predict([str(blank)]).tolist() == [None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_validation_split_holds_out_images_with_a_face(seed, monkeypatch):
    """Images without a face give no chip: the hold-out is drawn among the images that have
    one, so a class with many faceless images still gets validation_fraction of its faces
    (drawn among all images, the validation side could come out short, or empty)."""
    real, fake = noise_chips(16, 0, 1.0), noise_chips(16, 1, 2.0)
    chips = FakeSpotter._chips

    def with_faceless(self, data, what, tap, files=None):  # real: every third image has the face
        part, index, n, missing = chips(self, data, what, tap, files)
        return (part, index * 3, n * 3, missing + 2 * n) if what == "fit(real)" else (part, index, n, missing)

    monkeypatch.setattr(FakeSpotter, "_chips", with_faceless)
    det = FakeSpotter(hidden=(4,), max_epochs=1, validation_fraction=0.25, seed=seed).fit(real, fake)
    counts = det.training_summary_["counts"]
    assert counts["validation"] == {"real": 4, "fake": 4} and counts["images_without_faces"]["real"] == 32
    with pytest.raises(ValueError, match=r"validation part of the real class \(validation_fraction 0.25\): its "
                                         r"faces come from 1 image with a face;"):
        FakeSpotter(hidden=(4,), max_epochs=1, seed=seed).fit(real[:1], fake)


def test_not_fitted():
    with pytest.raises(NotFittedError, match="not fitted yet"):
        FakeSpotter().decision_function(noise_chips(1, 0, 1.0))


def test_bad_parameters():
    with pytest.raises(ValueError, match="classifier must be one of"):
        FakeSpotter(classifier="svm").fit(noise_chips(4, 0, 1), noise_chips(4, 1, 2))
    with pytest.raises(ValueError, match=r"target_fpr must be in \(0, 1\)"):
        FakeSpotter(target_fpr=0).fit(noise_chips(4, 0, 1), noise_chips(4, 1, 2))
    with pytest.raises(ValueError, match=r"target_tpr must be in \(0, 1\] or None, got 1.5"):
        FakeSpotter(target_tpr=1.5).fit(noise_chips(4, 0, 1), noise_chips(4, 1, 2))
    for params, message in (({"batch_size": 0}, "batch_size must be an int from 1 to 4096, got 0"),
                            ({"batch_size": 4097}, "batch_size must be an int from 1 to 4096, got 4097"),
                            ({"max_epochs": 0}, "max_epochs must be an int >= 1"),
                            ({"seed": None}, "seed must be an int >= 0, got None"),
                            ({"upsample": -1}, "upsample must be an int >= 0"),
                            ({"hidden": 16}, r"hidden must be a sequence of layer widths .*got 16"),
                            ({"validation_fraction": 0}, r"validation_fraction must be in \(0, 1\)"),
                            ({"validation_fraction": 1.5}, r"validation_fraction must be in \(0, 1\)")):
        with pytest.raises(ValueError, match=message):  # before any work, as the CLI refuses them
            FakeSpotter(**params).fit(noise_chips(4, 0, 1), noise_chips(4, 1, 2))


def test_operating_threshold_meets_target_fpr():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(0, 1, 1000), rng.normal(2, 1, 1000)
    op = _operating_threshold(real, fake, 0.05)
    assert op["fpr_at_validation"] <= 0.05 and op["fpr_at_validation"] > 0.04
    assert op["tpr_at_validation"] == float(np.mean(fake > op["logit"]))
    assert _operating_threshold(real, fake, 0.0001)["fpr_at_validation"] == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("target", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_operating_threshold_meets_target_tpr(target, dtype):
    rng = np.random.default_rng(1)
    real, fake = rng.normal(0, 1, 1000).astype(dtype), rng.normal(2, 1, 997).astype(dtype)
    fake[:50] = fake[50]  # ties
    op = _operating_threshold(real, fake, 0.05, target_tpr=target)
    t = op["logit"]
    assert op["target_tpr"] == target and op["target_fpr"] is None
    assert op["tpr_at_validation"] == float(np.mean(fake > t)) >= target
    # the highest such threshold: any fake at or above t, taken back, drops the TPR below target
    assert np.mean(fake > np.min(fake[fake > t])) < target
    assert op["fpr_at_validation"] == float(np.mean(real > t))
    assert "for TPR >= " in detector.describe_operating_threshold(op)
    assert "for FPR <= 0.05" in detector.describe_operating_threshold(_operating_threshold(real, fake, 0.05))


def test_fit_with_target_tpr_is_saved_and_loaded(tmp_path):
    real, fake = noise_chips(16, 5, 1.0), noise_chips(16, 6, 2.0)
    det = FakeSpotter(hidden=(8,), max_epochs=5, target_tpr=0.75).fit(real, fake)
    op = det.operating_threshold_
    assert op["target_tpr"] == 0.75 and op["tpr_at_validation"] >= 0.75
    again = FakeSpotter.load(det.save(tmp_path / "m.fsm"))
    assert again.target_tpr == 0.75 and again.operating_threshold_ == op


def test_roc_auc_literal():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5


# -- refusals ---------------------------------------------------------------------------------------

def test_refuses_truncated_file(fitted, tmp_path):
    path = fitted[1]
    bad = tmp_path / "truncated.fsm"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(artifact.ModelFileError, match="truncated"):
        FakeSpotter.load(bad)
    bad.write_bytes(b"")
    with pytest.raises(artifact.ModelFileError, match="shorter than the 8-byte header"):
        FakeSpotter.load(bad)


def test_refuses_unknown_versions(fitted, tmp_path):
    def bump(key, value):
        def edit(h):
            meta = json.loads(h["__metadata__"]["fakespotter"])
            meta[key] = value
            h["__metadata__"]["fakespotter"] = json.dumps(meta, sort_keys=True)
        return edit

    bad = rewrite_header(fitted[1], tmp_path / "v.fsm", bump("format_version", 99))
    with pytest.raises(artifact.ModelFileError, match="model format version 99 is not supported .*upgrade fakespotter"):
        FakeSpotter.load(bad)
    bad = rewrite_header(fitted[1], tmp_path / "b.fsm", bump("bit_layout_version", 2))
    with pytest.raises(artifact.ModelFileError, match="bit layout version 2 differs"):
        FakeSpotter.load(bad)


def test_refuses_tampered_header(fitted, tmp_path):
    def edit(h):
        meta = json.loads(h["__metadata__"]["fakespotter"])
        meta["operating_threshold"]["logit"] -= 1.0
        h["__metadata__"]["fakespotter"] = json.dumps(meta, sort_keys=True)

    bad = rewrite_header(fitted[1], tmp_path / "t.fsm", edit)
    with pytest.raises(artifact.ModelFileError, match="content digest mismatch"):
        FakeSpotter.load(bad)


def test_refuses_swapped_tensors(fitted, tmp_path):
    def swap(h):
        h["threshold.0"], h["threshold.1"] = h["threshold.1"], h["threshold.0"]

    bad = rewrite_header(fitted[1], tmp_path / "s.fsm", swap)
    with pytest.raises(artifact.ModelFileError, match="content digest mismatch"):
        FakeSpotter.load(bad)


def _resave(fitted, tmp_path, name, tensors=None, meta=None):
    tensors_, meta_ = artifact.read_model(fitted[1])
    if tensors:
        tensors(tensors_)
    if meta:
        meta(meta_)
    for k in ("format", "format_version", "bit_layout_version"):
        meta_.pop(k)
    return artifact.write_model(tmp_path / name, tensors_, meta_)


def test_refuses_wrong_backbone_hash(fitted, tmp_path):
    bad = _resave(fitted, tmp_path, "h.fsm", meta=lambda m: m["backbone"].update(weights_sha256="0" * 64))
    with pytest.raises(artifact.ModelFileError, match="trained with backbone weights sha256 0000.* installed dlib_resnet_v1 weights are"):
        FakeSpotter.load(bad)


def test_refuses_missing_and_misshaped_tensors(fitted, tmp_path):
    bad = _resave(fitted, tmp_path, "m.fsm", tensors=lambda t: t.pop("threshold.3"))
    with pytest.raises(artifact.ModelFileError, match=r"missing threshold tensors \['threshold.3'\]"):
        FakeSpotter.load(bad)
    bad = _resave(fitted, tmp_path, "x.fsm", tensors=lambda t: t.update({"threshold.2": torch.zeros(2)}))
    with pytest.raises(artifact.ModelFileError, match=r"threshold.2 \(layer .*\) must be float32 \[1\], got torch.float32 \[2\]"):
        FakeSpotter.load(bad)
    bad = _resave(fitted, tmp_path, "c.fsm", tensors=lambda t: t.update({"classifier.0.weight": t["classifier.0.weight"][:, :64]}))
    with pytest.raises(artifact.ModelFileError, match="classifier tensor 0.weight has shape"):
        FakeSpotter.load(bad)
    bad = _resave(fitted, tmp_path, "e.fsm", tensors=lambda t: t.update({"extra": torch.zeros(1)}))
    with pytest.raises(artifact.ModelFileError, match=r"unexpected tensors \['extra'\]"):
        FakeSpotter.load(bad)
    from fakespotter.detector import TRAINING_IMAGES

    bad = _resave(fitted, tmp_path, "i.fsm", tensors=lambda t: t.update({TRAINING_IMAGES: torch.zeros(2, 2, dtype=torch.int64)}))
    with pytest.raises(artifact.ModelFileError, match=rf"{TRAINING_IMAGES} must be int64 \[n\], got torch.int64 \[2, 2\]"):
        FakeSpotter.load(bad)



def _nan_at(name, value):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = value
    return edit


MANGLED = [
    # non-finite classifier values loaded, and every score came out NaN or infinite
    ("nan-bias", _nan_at("classifier.0.bias", float("nan")), None, r"classifier tensor 0.bias holds NaN or infinite"),
    ("inf-out", _nan_at("classifier.3.weight", float("inf")), None, r"classifier tensor 3.weight holds NaN or infinite"),
    # widths from the file: a negative one reached torch, a huge one its allocator
    ("hidden-negative", None, lambda m: m["classifier"]["params"].update(hidden=[-1]), r"hidden must be a list of layer widths >= 1, got \(-1,\)"),
    ("hidden-huge", None, lambda m: m["classifier"]["params"].update(hidden=[2**40]), r"classifier tensor 0.weight has shape \[8, \d+\] .*expected \[1099511627776,"),
    ("hidden-contradicts", None, lambda m: m["detector_params"].update(hidden=[9]), r"detector_params \(classifier 'mlp', hidden \[9\]\) contradict the classifier stored \('mlp', hidden \[8\]\)"),
    ("dropout-string", None, lambda m: m["classifier"]["params"].update(dropout="x"), r"dropout must be a number in \[0, 1\), got 'x'"),
    ("backbone-string", None, lambda m: m.update(backbone="dlib_resnet_v1"), r"metadata lacks or mangles a required field .*backbone and training must be mappings"),
    ("training-count", None, lambda m: m["training"].update(thresholds_images="many"), r"training.thresholds_images must be a count, got 'many'"),
    ("mode", None, lambda m: m.update(threshold_mode="median"), r"threshold_mode must be one of \('per_layer', 'per_neuron'\), got 'median'"),
    ("layers-string", None, lambda m: m.update(layers="relu1"), r"layers must be a list of names, got 'relu1'"),
    ("logit-bool", None, lambda m: m["operating_threshold"].update(logit=True), r"logit must be a finite number, got True"),
    ("logit-huge", None, lambda m: m["operating_threshold"].update(logit=10**400), r"metadata lacks or mangles a required field \(OverflowError"),
    ("logit-string", None, lambda m: m["operating_threshold"].update(logit="0.5"), r"logit must be a finite number, got '0.5'"),
]


@pytest.mark.parametrize("name, tensors, meta, message", MANGLED, ids=[c[0] for c in MANGLED])
def test_refuses_mangled_metadata_and_classifier_values_naming_the_file(fitted, tmp_path, name, tensors, meta, message):
    bad = _resave(fitted, tmp_path, f"{name}.fsm", tensors=tensors, meta=meta)
    with pytest.raises(artifact.ModelFileError, match=rf"{name}.fsm: .*{message}"):
        FakeSpotter.load(bad)


def test_refuses_an_unknown_classifier_and_bad_detector_params(fitted, tmp_path):
    """Both are a ModelFileError naming the file (what callers catch), not a KeyError from deeper
    down, nor a model that loads and is refused only when it is saved again."""
    bad = _resave(fitted, tmp_path, "k.fsm", meta=lambda m: m["classifier"].update(type="svm"))
    with pytest.raises(artifact.ModelFileError, match=r"k.fsm: unknown classifier type 'svm'"):
        FakeSpotter.load(bad)
    bad = _resave(fitted, tmp_path, "p.fsm", meta=lambda m: m["detector_params"].update(target_fpr=2.0))
    with pytest.raises(artifact.ModelFileError, match=r"p.fsm: detector_params: .*target_fpr must be in \(0, 1\)"):
        FakeSpotter.load(bad)


def test_refuses_non_finite_values_and_mangled_metadata_also_in_info(fitted, tmp_path, capsys):
    from fakespotter.cli import main

    def nan_threshold(t):
        t["threshold.0"] = torch.full_like(t["threshold.0"], float("nan"))

    cases = [
        (_resave(fitted, tmp_path, "t.fsm", tensors=nan_threshold), r"threshold.0 \(layer .*\) holds NaN or infinite"),
        (_resave(fitted, tmp_path, "o.fsm", meta=lambda m: m["operating_threshold"].update(logit=float("nan"))),
         "metadata lacks or mangles a required field"),
        (_resave(fitted, tmp_path, "n.fsm", meta=lambda m: m.update(training=[1])), "metadata lacks or mangles"),
        (_resave(fitted, tmp_path, "c.fsm", meta=lambda m: m.pop("classifier")), "metadata lacks or mangles"),
    ]
    for path, message in cases:
        with pytest.raises(artifact.ModelFileError, match=message):
            FakeSpotter.load(path)
        assert main(["info", str(path)]) == 2  # info checks what loading checks
        err = capsys.readouterr().err
        assert err.startswith("fakespotter info: error: ") and len(err.strip().splitlines()) == 1
    assert main(["info", str(tmp_path)]) == 2 and "is a folder, not a model file" in capsys.readouterr().err
    # another writer's training summary: loads (it is information only), and info shows it
    odd = _resave(fitted, tmp_path, "x.fsm", meta=lambda m: m["training"].update(counts=[1, 2]))
    FakeSpotter.load(odd)
    assert main(["info", str(odd)]) == 0 and "training: None train" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"hidden must be a sequence of layer widths \(ints >= 1\), e.g. \(16, 16\); got \(0,\)"):
        FakeSpotter(hidden=(0,)).fit(np.zeros((2, 150, 150, 3), np.uint8), np.zeros((2, 150, 150, 3), np.uint8))


def test_refuses_other_files(tmp_path):
    from fakespotter._safetensors import save_file

    with pytest.raises(artifact.ModelFileError, match="no such model file"):
        FakeSpotter.load(tmp_path / "nope.fsm")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(artifact.ModelFileError, match="not a fakespotter model"):
        FakeSpotter.load(plain)


def test_refuses_folders_fifos_and_unknown_devices_and_loads_default(fitted, tmp_path):
    import os

    with pytest.raises(artifact.ModelFileError, match="is a folder, not a model file"):
        FakeSpotter.load(tmp_path)
    os.mkfifo(tmp_path / "pipe.fsm")
    with pytest.raises(artifact.ModelFileError, match=r"is not a regular file \(a FIFO or device\?\)"):
        FakeSpotter.load(tmp_path / "pipe.fsm")
    for device, message in (("meta", "only cpu and cuda devices"), ("cuda:7" if torch.cuda.is_available() else "cuda",
                                                                    "CUDA")):
        with pytest.raises(ValueError, match=message):
            FakeSpotter.load(fitted[1], device=device)
    try:
        default = FakeSpotter.default()
    except Exception as e:  # noqa: BLE001  (weights not fetched here)
        pytest.skip(f"the default detector needs the backbone weights: {e}")
    same = FakeSpotter.load("default")  # the README: 'default' wherever a model file is expected
    assert same.get_params() == default.get_params() and same.aligned is False
    x = fitted[2][:3]
    assert torch.equal(same.decision_function(x), default.decision_function(x))


def test_pickles_as_its_model_file_and_deep_copies(fitted):
    """A fitted detector goes through pickle (multiprocessing, joblib, Ray) as its model file's
    bytes: unpickled, it scores the same; an unfitted one pickles its settings."""
    import copy
    import pickle

    det, _, real, fake = fitted
    x = torch.cat([real[:4], fake[:4]])
    for again in (pickle.loads(pickle.dumps(det)), FakeSpotter.from_bytes(det.to_bytes()), copy.deepcopy(det)):
        assert again is not det and again.tap_.layers == det.tap_.layers
        assert {**again.get_params(), "layers": None} == {**det.get_params(), "layers": None}
        assert torch.equal(again.decision_function(x), det.decision_function(x))
        assert again.operating_threshold_ == det.operating_threshold_
    assert pickle.dumps(det)[:200].count(b"torch") == 0  # the model file's bytes, not torch objects
    shallow = copy.copy(det)
    assert shallow.tap_ is det.tap_ and torch.equal(shallow.decision_function(x), det.decision_function(x))
    odd = copy.copy(det)
    odd.device, odd.detect_pixels = torch.device("cpu"), np.int64(1 << 20)  # not JSON types: saved as such
    again = pickle.loads(pickle.dumps(odd))
    assert again.device == "cpu" and again.detect_pixels == 1 << 20 and type(again.detect_pixels) is int
    odd.detect_pixels = 5  # a setting load would refuse: refused when saving, not in the receiving process
    with pytest.raises(ValueError, match="detect_pixels must be 0"):
        pickle.dumps(odd)
    unfitted = pickle.loads(pickle.dumps(FakeSpotter(hidden=(4,), seed=3)))
    assert unfitted.hidden == (4,) and unfitted.seed == 3 and not hasattr(unfitted, "tap_")
    with pytest.raises(artifact.ModelFileError, match="^model bytes: .*truncated or not a model file"):
        FakeSpotter.from_bytes(det.to_bytes()[:1000])  # no temporary file the caller never saw
    with pytest.raises(TypeError, match=r"^FakeSpotter.from_bytes: expected a model file's bytes, got str "
                                        r"\(FakeSpotter.load takes a path\)$"):
        FakeSpotter.from_bytes("det.fsm")


def test_a_model_file_named_default_is_loaded_by_its_path(fitted, tmp_path, monkeypatch, capsys):
    """Only the string "default" names the embedded detector: "./default" and Path("default") are
    a file of that name. The command line once normalised "./default" to "default" and scanned
    with the embedded detector instead of the file given."""
    import shutil
    from pathlib import Path

    from fakespotter.cli import main

    _, path, real, _ = fitted
    monkeypatch.chdir(tmp_path)
    shutil.copy(path, "default")
    mine = artifact.file_sha256(path)
    assert FakeSpotter.load("./default").model_sha256() == mine
    assert FakeSpotter.load(Path("default")).model_sha256() == mine
    assert FakeSpotter.load("default").model_sha256() == FakeSpotter.default().model_sha256() != mine
    from PIL import Image

    Image.fromarray(real[0].numpy()).save("chip.png")
    assert main(["scan", "chip.png", "--aligned", "--model", "./default", "--out", "-", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == mine
    assert main(["info", "./default"]) == 0
    assert capsys.readouterr().out.startswith(f"model: ./default (sha256 {mine})")


def test_model_sha256_names_the_file_and_saving_again_keeps_its_bytes(fitted, tmp_path):
    det, path, real, fake = fitted
    loaded = FakeSpotter.load(path)
    assert loaded.model_sha256() == artifact.file_sha256(path)
    again = tmp_path / "again.fsm"
    loaded.save(again)  # layers=None (the default layers) stays None: the same bytes
    assert again.read_bytes() == path.read_bytes() and loaded.layers is None
    assert det.model_sha256() == artifact.file_sha256(path)  # fitted here: the bytes save writes
    assert FakeSpotter.from_bytes(path.read_bytes()).model_sha256() == artifact.file_sha256(path)
    refit = FakeSpotter.load(path).fit(real[:8], fake[:8])
    assert refit.model_sha256() != artifact.file_sha256(path)
    assert refit.model_sha256() == hashlib.sha256(refit.to_bytes()).hexdigest()
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder; give the model file's path"):
        det.save(tmp_path, overwrite=True)


def test_scores_are_float32_whatever_the_callers_context(fitted, tmp_path):
    """Under a caller's torch.autocast, inference_mode or default dtype the scores are the plain
    float32 ones, ordinary tensors (not inference tensors)."""
    from PIL import Image

    det, _, real, fake = fitted
    blank = tmp_path / "blank.png"
    Image.new("RGB", (120, 90), (40, 90, 200)).save(blank)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for images in ([str(blank)], []):
            assert det.decision_function(images).dtype == torch.float32
            assert det.predict_proba(images).dtype == torch.float32
    finally:
        torch.set_default_dtype(old)
    x = torch.cat([real[:4], fake[:4]])
    plain, labels, rows = det.decision_function(x), list(det.predict(x)), det.rows(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = det.decision_function(x)
        assert s.dtype == torch.float32 and torch.equal(s, plain)
        assert list(det.predict(x)) == labels and torch.equal(det.rows(x), rows)
    with torch.inference_mode():
        s = det.decision_function(x)
    assert torch.equal(s, plain)
    s = det.decision_function(x)
    s += 1  # an ordinary tensor: in-place edits and autograd work
    assert torch.equal(s, plain + 1)


def test_float_chips_outside_0_255_are_refused(fitted):
    det, _, real, _ = fitted
    f = real[:2].permute(0, 3, 1, 2).float()
    assert torch.equal(det.decision_function(f), det.decision_function(real[:2]))
    with pytest.raises(ValueError, match=r"every value is within 0\.\.1 \(max .*\): multiply 0\.\.1 chips by 255"):
        det.decision_function(f / 255)
    with pytest.raises(ValueError, match=r"must be RGB 0\.\.255, got values from -1 to 0\.99.* \(normalised chips\?"):
        det.decision_function(f / 127.5 - 1)
    with pytest.raises(ValueError, match="must be RGB 0..255"):
        det.rows(f * 2)
    with pytest.raises(ValueError, match=r"^predict_proba: float32 chips must be RGB 0\.\.255"):
        det.predict_proba(f / 255)  # the method called, not an internal one, is named
    with pytest.raises(ValueError, match=r"^explain: chips must be 150x150"):
        det.explain(f[:, :, :, :149])
    dark = torch.zeros_like(real[:2])
    dark[0, 10:20, 10:20] = 1  # uint8 chips are never refused by value, however dark
    assert det.decision_function(dark).shape == (2,) and det.decision_function(dark.numpy()).shape == (2,)


def test_chip_views_path_arrays_and_misfit_rows(fitted, tmp_path):
    """A flipped view (OpenCV's BGR -> RGB) is scored like its copy; a numpy array of paths
    (a DataFrame column's .values) like the list; int32 rows get a message about rows."""
    from PIL import Image

    det, _, real, _ = fitted
    x = real[:3].numpy()
    for view in (x[..., ::-1], x[:, ::-1]):
        assert torch.equal(det.decision_function(view), det.decision_function(view.copy()))
        assert torch.equal(det.rows(view), det.rows(view.copy()))
    paths = []
    for i in range(2):
        Image.fromarray(x[i]).save(tmp_path / f"chip{i}.png")
        paths.append(str(tmp_path / f"chip{i}.png"))
    aligned = FakeSpotter.load(fitted[1])
    aligned.aligned = True
    assert torch.equal(aligned.decision_function(np.array(paths)), aligned.decision_function(paths))
    assert torch.equal(aligned.decision_function(np.array(paths, dtype=object)), aligned.decision_function(paths))
    with pytest.raises(TypeError, match="a 2-d int32 tensor is neither images nor packed rows: packed rows are int64"):
        det.decision_function(det.rows(real[:2]).to(torch.int32))


def test_a_generator_of_images_is_scored_as_it_is_read(fitted, monkeypatch):
    """A generator of images is not listed first: the first batch of chips is scored before the
    generator has given more than one batch of images (a video's frames, a corpus of arrays),
    and the scores, rows and explanations equal those of the same images in a list. An error
    names the image's index in the generator."""
    det = FakeSpotter.load(fitted[1])
    det.aligned, det.batch_size = True, 2
    frames = list(fitted[2][:5].numpy())  # [H, W, 3] arrays, taken as aligned chips
    read, read_at_scoring = [0], []

    def gen(items):
        for x in items:
            read[0] += 1
            yield x

    score = det.classifier_.decision_function
    monkeypatch.setattr(det.classifier_, "decision_function",
                        lambda rows: (read_at_scoring.append(read[0]), score(rows))[1])
    s = det.decision_function(gen(frames))
    assert read_at_scoring == [2, 4, 5] and s.shape == (5,)
    monkeypatch.undo()
    assert torch.equal(s, det.decision_function(frames))
    assert torch.equal(det.rows(gen(frames)), det.rows(frames))
    assert list(det.predict(gen(frames))) == list(det.predict(frames))
    e, want = det.explain(gen(frames)), det.explain(frames)
    assert torch.equal(e["mnc"], want["mnc"]) and e["image_index"].tolist() == want["image_index"].tolist() == [0, 1, 2, 3, 4]
    assert fakespotter.features(gen(frames), det.tap_, aligned=True).image_index.tolist() == [0, 1, 2, 3, 4]
    assert fakespotter.chips(gen(frames), aligned=True).array.shape == (5, 150, 150, 3)
    assert det.decision_function(gen([])).shape == (0,)
    with pytest.raises(ValueError, match=r"image 2 \(ndarray\): .*"):
        det.decision_function(gen(frames[:2] + [np.zeros((4, 4, 3), np.uint8)]))


def test_rows_as_numpy_and_explain_on_images(fitted, tmp_path):
    from PIL import Image

    det, _, real, _ = fitted
    rows = det.rows(real[:3])
    assert torch.equal(det.decision_function(rows.numpy()), det.decision_function(rows))
    assert torch.equal(det.explain(rows.numpy())["mnc"], det.explain(rows)["mnc"])
    # numpy rows reversed (negative strides) or read-only (a view of a file): torch cannot share them
    backwards, frozen = rows.numpy()[::-1], rows.numpy().copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(det.decision_function(backwards), det.decision_function(rows.flip(0)))
        assert torch.equal(det.explain(backwards)["mnc"], det.explain(rows.flip(0))["mnc"])
        assert torch.equal(det.decision_function(frozen), det.decision_function(rows))
        assert torch.equal(fakespotter.mnc(backwards, det.tap_), fakespotter.mnc(rows.flip(0), det.tap_))
    blank = tmp_path / "blank.png"
    Image.new("RGB", (120, 90), (40, 90, 200)).save(blank)
    ex = det.explain([str(blank), str(blank)])  # no faces: no rows, and the index says so
    assert ex["mnc"].shape == (0, len(ex["layers"])) and list(ex["image_index"]) == []
    assert "image_index" not in det.explain(real[:2])
    try:
        from fakespotter.weights import sample_photo_path

        photo = str(sample_photo_path("obama.jpg"))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"needs the sample photos: {e}")
    ex = det.explain([str(blank), photo, str(blank)])
    assert list(ex["image_index"]) == [1] and ex["mnc"].shape == (1, len(ex["layers"]))


def _validation_counts(det):
    v = det.training_summary_["counts"]["validation"]
    return v["real"], v["fake"]


def test_groups_are_never_split_also_across_the_classes():
    """Group sizes 1, 2, 4, 8 chips: the validation count names the groups held out. Each group
    is held out whole, and an id found in both classes is one group: its fakes go with its
    reals (separate ids are split per class, and then the classes differ for some seed)."""
    sizes = [1, 2, 4, 8]
    ids = np.repeat(list("abcd"), sizes)
    real, fake = noise_chips(len(ids), 0, 1.0), noise_chips(len(ids), 1, 2.0)
    same, differ = [], []
    for seed in range(4):
        det = FakeSpotter(hidden=(4,), max_epochs=2, seed=seed, validation_fraction=0.25)
        r, f = _validation_counts(det.fit(real, fake, groups=(ids, ids)))
        assert r in sizes and f in sizes  # one whole group of each class
        same.append(r == f)
        det = FakeSpotter(hidden=(4,), max_epochs=2, seed=seed, validation_fraction=0.25)
        r, f = _validation_counts(det.fit(real, fake, groups=(ids, np.char.add("fake-", ids))))
        assert r in sizes and f in sizes
        differ.append(r != f)
    assert all(same) and any(differ)


def test_groups_of_images_are_one_id_per_image(tmp_path):
    """Images (not chip batches): one group id per image, mapped to the image's chips; ids may
    be numbers in one class and text in the other."""
    real = [np.asarray(c) for c in noise_chips(8, 2, 1.0)]
    fake = [np.asarray(c) for c in noise_chips(8, 3, 2.0)]
    det = FakeSpotter(hidden=(4,), max_epochs=2, aligned=True, validation_fraction=0.25)
    det.fit(real, fake, groups=([0, 0, 0, 0, 0, 0, 1, 2], ["x"] * 7 + ["y"]))
    assert _validation_counts(det)[0] in (1, 6) and _validation_counts(det)[1] in (1, 7)
    assert det.training_summary_["counts"]["images"] == {"real": 8, "fake": 8}  # images, not groups
    with pytest.raises(ValueError, match=r"real groups must have one id per image \(8; one per chip for chip "
                                         r"batches\), got shape \(3,\)"):
        FakeSpotter(aligned=True).fit(real, fake, groups=([0, 1, 2], list(range(8))))


def _record_conversions(monkeypatch):
    """Wraps prepare_chips (uint8 or float chips -> float32 on the device) wherever it is called:
    returns the list of the chip counts it has converted."""
    features_module = importlib.import_module("fakespotter.features")  # the package exports a function of that name
    sizes = []
    original = features_module.prepare_chips

    def recording(chips, *args, **kwargs):
        x = original(chips, *args, **kwargs)
        sizes.append(int(x.shape[0]))
        return x

    monkeypatch.setattr(features_module, "prepare_chips", recording)  # features(), the calibrator
    monkeypatch.setattr(detector, "prepare_chips", recording)
    return sizes


def test_chips_go_to_float32_one_batch_at_a_time(monkeypatch):
    """fit (chips of either dtype, images, a validation set, augmentation) and the scoring
    methods never hold more than batch_size chips as float32: no whole-set copy."""
    real, fake = noise_chips(12, 0, 1.0), noise_chips(12, 1, 2.0)
    realf = real.permute(0, 3, 1, 2).float()
    sizes = _record_conversions(monkeypatch)
    fits = (((real.numpy(), fake), {}),
            ((realf, fake.permute(0, 3, 1, 2).float()), {"validation": (real[:6].numpy(), realf[:6].flip(0))}),
            ((real, fake), {"augment": lambda chips, stream: chips[:, ::-1]}),
            (([c for c in real.numpy()], list(fake.numpy())), {"groups": (np.arange(12) // 2, np.arange(12))}))
    for (r, f), kwargs in fits:
        sizes.clear()
        det = FakeSpotter(hidden=(4,), max_epochs=2, batch_size=5, aligned=True).fit(r, f, **kwargs)
        assert max(sizes) == 5 and sum(sizes) >= 24, (kwargs.keys(), sizes)  # every chip, in batches
    for x in (torch.cat([real, fake]), torch.cat([realf, realf]).numpy()):
        sizes.clear()
        det.decision_function(x), det.predict(x), det.predict_proba(x), det.rows(x), det.explain(x)
        assert max(sizes) == 5 and sum(sizes) >= 5 * 24, sizes


def test_fit_is_the_same_whatever_holds_the_chips():
    """Chips read a batch at a time (4 here: several per part, the last one short) give the same
    model whether they come as uint8 tensors, non-contiguous uint8 arrays, or float32 [N, 3, H, W]
    tensors or arrays: bit-identical thresholds, classifier and operating threshold."""
    real, fake = noise_chips(10, 7, 1.0), noise_chips(10, 8, 2.0)

    def flipped_view(x):  # the same values, negative strides
        return np.flip(np.flip(x.numpy(), 2).copy(), 2)

    def as_float(x):
        return x.permute(0, 3, 1, 2).float()

    inputs = [(real, fake), (flipped_view(real), flipped_view(fake)), (as_float(real), as_float(fake)),
              (as_float(real).numpy(), as_float(fake).permute(0, 2, 3, 1).numpy().transpose(0, 3, 1, 2))]
    fits = [FakeSpotter(hidden=(4,), max_epochs=3, batch_size=4).fit(r, f) for r, f in inputs]
    first = fits[0]
    for det in fits[1:]:
        assert all(torch.equal(a, b) for a, b in zip(det.thresholds_.values, first.thresholds_.values))
        a, b = det.classifier_.state_tensors(), first.classifier_.state_tensors()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert det.operating_threshold_ == first.operating_threshold_
        assert det.training_summary_["metrics"] == first.training_summary_["metrics"]
