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
    assert report["model"]["sha256"] == file_sha256(default_model_path())
