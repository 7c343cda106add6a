"""The embedded default detector: shipped in the package, loadable by name, used by scan."""

import pytest

import fakespotter
from fakespotter import detector
from fakespotter.artifact import file_sha256
from fakespotter.detector import DEFAULT_MODEL, FakeSpotter, default_model_path, resolve_model


def test_default_is_shipped_inside_the_installed_package():
    path = default_model_path()
    assert path.is_file(), path
    assert path.parent.parent == __import__("pathlib").Path(fakespotter.__file__).parent
    assert path.stat().st_size < 2 << 20  # a small model file; the backbone weights are fetched by hash


def test_default_loads_and_is_the_documented_configuration():
    det = FakeSpotter.default()
    assert det.backbone == "dlib_resnet_v1" and det.granularity == "channel" and det.threshold_mode == "per_layer"
    assert det.tap_.backbone.id == fakespotter.get_backbone("dlib_resnet_v1").id
    sources = det.training_summary_["sources"]
    assert sources.get("made_by") == "scripts/train_default.py", sources
    assert set(sources["splits"]) == {"train", "val", "test"}


def test_resolve_model():
    assert resolve_model("some/file.fsm") == __import__("pathlib").Path("some/file.fsm")
    assert resolve_model(DEFAULT_MODEL) == default_model_path()


def test_missing_default_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(detector, "default_model_path", lambda: tmp_path / "default.fsm")
    with pytest.raises(FileNotFoundError, match="embedded default detector is missing .*reinstall fakespotter"):
        FakeSpotter.default()


def test_a_broken_default_is_named_as_such_on_the_command_line(monkeypatch, tmp_path, capsys):
    """It was "--model /.../default.fsm: /.../default.fsm: ..." for a --model never given."""
    from fakespotter.cli import main

    broken = tmp_path / "default.fsm"
    data = bytearray(default_model_path().read_bytes())
    data[-1] ^= 1
    broken.write_bytes(bytes(data))
    monkeypatch.setattr(detector, "default_model_path", lambda: broken)
    assert main(["scan", str(tmp_path), "--aligned", "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fakespotter scan: error: the embedded default detector: {broken}: ") and "--model" not in err
    assert err.rstrip().endswith("; reinstall fakespotter"), err


def test_scan_uses_the_default_when_no_model_is_given(tmp_path):
    from fakespotter import samples
    from PIL import Image

    chips, labels, _ = samples.sample_chips(1, 1, seed=3)
    for i, chip in enumerate(chips):
        Image.fromarray(chip).save(tmp_path / f"{i}.jpg", quality=95)
    records = list(fakespotter.scan([str(tmp_path)], aligned=True, workers=0))
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert {r["model"] for r in records} == {file_sha256(default_model_path())}
    explicit = list(fakespotter.scan([str(tmp_path)], str(default_model_path()), aligned=True, workers=0))
    assert [r["score"] for r in records] == [r["score"] for r in explicit]


def test_readme_model_card_quotes_the_committed_reports():
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("model_card", root / "scripts" / "model_card.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    readme = (root / "README.md").read_text()
    quoted = readme.split(mc.BEGIN, 1)[1].split(mc.END, 1)[0]
    assert quoted.strip() == mc.card(root / "reports" / "default").strip()
    # and the reports are about the shipped file
    import json

    report = json.loads((root / "reports" / "default" / "evaluate" / "metrics.json").read_text())
    robust = json.loads((root / "reports" / "default" / "robustness" / "robustness.json").read_text())
    assert report["model"]["sha256"] == robust["model"]["sha256"] == file_sha256(default_model_path())
    # the card's headline limit, quoted in prose and by the scanner's note on the default model
    from fakespotter.cli.scan import DEFAULT_MODEL_NOTE
    from fakespotter.dataset import OTHER_REALS

    held_out = {o.source for o in OTHER_REALS.values() if o.held_out}
    external = [r for r in report["rows"] if r.get("detector", "fakespotter") == "fakespotter"
                and r["kind"] == "source" and r["group"] in held_out]
    faces = sum(r["n_real"] for r in external)
    flagged = sum(round(r["fpr_operating"] * r["n_real"]) for r in external)
    others = [r for r in report["rows"] if r.get("detector", "fakespotter") == "fakespotter"
              and r["kind"] == "source" and r["group"] not in held_out]
    prose = " ".join(readme.split())
    assert f"({flagged} of the {faces} external test chips, none of the other {sum(r['n_real'] for r in others)})" \
        in prose and sum(round(r["fpr_operating"] * r["n_real"]) for r in others) == 0
    assert f"({flagged} of its {faces} unseen-source test faces)" in DEFAULT_MODEL_NOTE


def test_default_detects_faces_in_images_and_takes_one_image_alone(tmp_path):
    """The default model was trained on aligned chips, but images given to its API are face-
    detected (as the scanner does): an image without a face scores NaN, not a resized whole image;
    one image alone (array, PIL image, path) is one image, never a batch of its rows."""
    import numpy as np
    from PIL import Image

    det = FakeSpotter.default()
    assert det.aligned is False
    blank = np.full((300, 240, 3), 128, np.uint8)
    assert np.isnan(det.decision_function([blank]).numpy()).all()
    one = det.decision_function(blank)
    assert one.shape == (1,) and np.isnan(one.numpy()).all()
    assert det.predict(Image.fromarray(blank)) == [None]
    path = tmp_path / "blank.png"
    Image.fromarray(blank).save(path)
    assert det.decision_function(str(path)).shape == (1,)
    with pytest.raises(ValueError, match=r"images: an array of images must be .* got shape \[2, 3, 4, 5, 6\]"):
        det.decision_function(np.zeros((2, 3, 4, 5, 6), np.uint8))


def test_default_refuses_bad_inputs_naming_them(tmp_path):
    import os
    import signal

    import numpy as np

    det = FakeSpotter.default()
    with pytest.raises(ValueError, match="float32 chips hold NaN or infinite values"):
        det.decision_function(np.full((2, 3, 150, 150), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"image 1 \(bytes\): load_image: 10 bytes is not an image in a format fakespotter reads \(JPEG, MPO, PNG"):
        det.decision_function([np.zeros((80, 80, 3), np.uint8), b"notanimage"])
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)

    def hung(*_):
        raise AssertionError("reading a FIFO blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pytest.raises(ValueError, match=rf"load_image: {fifo} is not a regular file"):
            det.decision_function([str(fifo)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_float64_default_dtype_changes_neither_loading_nor_scores():
    """torch.set_default_dtype(torch.float64) (common in scientific code) made the backbone and
    the classifier float64 as they were built, and loading failed, blaming the model file."""
    import torch

    from fakespotter import samples

    x, _, _ = samples.sample_chips(3, 3, seed=11)
    expected = FakeSpotter.default().decision_function(x)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        det = FakeSpotter.default()
        assert torch.equal(torch.as_tensor(det.decision_function(x)), torch.as_tensor(expected))
        fitted = FakeSpotter(hidden=(4,), max_epochs=1).fit(x[:3], x[3:])
        assert all(p.dtype == torch.float32 for p in fitted.classifier_.network_.parameters())
    finally:
        torch.set_default_dtype(before)
