"""fakespotter.generators: the pinned MobileStyleGAN IR files and deterministic OpenVINO renders.

Fetch tests run offline on fake wheels.  Render tests need OpenVINO and the cached IR files
(fetched once by ``./dev setup``; the fixture fetches them if needed and skips, naming the
command, when that is impossible).
"""

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fakespotter import generators as G
from fakespotter.samples import WheelSource
from fakespotter.weights import FetchError, WeightsError, WeightsHashError, WeightsNotFoundError

FILES = {name: f"contents of {name}".encode() for name in G.MOBILESTYLEGAN_FILES}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _wheel(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(G.MOBILESTYLEGAN_MEMBER_DIR + name, data)
        zf.writestr("random_face/__init__.py", b"import gdown\n")
    return buf.getvalue()


@pytest.fixture
def fake_pins(monkeypatch):
    monkeypatch.setattr(G, "MOBILESTYLEGAN_FILES", {n: _sha(d) for n, d in FILES.items()})

    def make(files):
        wheel = _wheel(files)
        monkeypatch.setattr(G, "RANDOM_FACE_WHEEL",
                            WheelSource("random-face==0", "rf-0-py3-none-any.whl", _sha(wheel), 1))
        calls = []

        def downloader(src, dest):
            calls.append(src.requirement)
            (Path(dest) / src.filename).write_bytes(wheel)
            return Path(dest) / src.filename

        return downloader, calls

    return make


def test_fetch_extracts_only_the_ir_files_and_is_idempotent(fake_pins, tmp_path):
    downloader, calls = fake_pins(FILES)
    with pytest.raises(WeightsNotFoundError, match="python -m fakespotter.generators fetch"):
        G.mobilestylegan_dir(tmp_path)
    d = G.fetch_mobilestylegan(root=tmp_path, downloader=downloader)
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)
    assert all((d / n).read_bytes() == b for n, b in FILES.items())
    G.fetch_mobilestylegan(root=tmp_path, downloader=downloader)
    assert calls == ["random-face==0"]
    (d / "SynthesisNetwork.bin").write_bytes(b"tampered")
    with pytest.raises(WeightsHashError, match=r"SynthesisNetwork\.bin: expected sha256"):
        G.mobilestylegan_dir(tmp_path)
    G.fetch_mobilestylegan(root=tmp_path, downloader=downloader)
    assert len(calls) == 2 and G.mobilestylegan_dir(tmp_path) == d


def test_fetch_refuses_bad_wheel_bad_member_and_missing_member(fake_pins, tmp_path, monkeypatch):
    downloader, _ = fake_pins(FILES)
    good = G.RANDOM_FACE_WHEEL
    monkeypatch.setattr(G, "RANDOM_FACE_WHEEL", WheelSource(good.requirement, good.filename,
                                                            "0" * 64, 1))
    with pytest.raises(WeightsHashError, match=r"random-face==0.*expected sha256 0{64}.*refusing"):
        G.fetch_mobilestylegan(root=tmp_path / "a", downloader=downloader)
    downloader, _ = fake_pins({**FILES, "MappingNetwork.bin": b"other"})
    with pytest.raises(WeightsHashError, match=r"random_face/data/MappingNetwork\.bin inside"):
        G.fetch_mobilestylegan(root=tmp_path / "b", downloader=downloader)
    downloader, _ = fake_pins({k: v for k, v in FILES.items() if k != "SynthesisNetwork.xml"})
    with pytest.raises(FetchError, match=r"does not contain random_face/data/SynthesisNetwork"):
        G.fetch_mobilestylegan(root=tmp_path / "c", downloader=downloader)
    assert not (tmp_path / "c" / G.MOBILESTYLEGAN_SUBDIR / "SynthesisNetwork.xml").exists()


def test_pins_are_the_documented_ones():
    assert G.RANDOM_FACE_WHEEL.sha256 == (
        "e5d10e2be7df63f06123855ec591ca35dcb1d059eba47ddcb175d7d26b4019b5")
    assert sorted(G.MOBILESTYLEGAN_FILES) == sorted(
        f"{net}Network.{ext}" for net in ("Mapping", "Synthesis") for ext in ("xml", "bin"))
    assert all(len(v) == 64 for v in G.MOBILESTYLEGAN_FILES.values())


def test_latents_depend_only_on_the_seed():
    a = G.latent(5)
    assert a.shape == (512,) and a.dtype == np.float32
    assert np.array_equal(a, G.latent(5)) and not np.array_equal(a, G.latent(6))
    assert abs(float(a.std()) - 1.0) < 0.15
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        G.latent(-1)


def test_missing_openvino_names_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    with pytest.raises(ImportError, match=r"pip install 'fakespotter\[data\]'"):
        G._import_openvino()


@pytest.fixture(scope="module")
def gan():
    pytest.importorskip("openvino", reason="needs OpenVINO: pip install 'fakespotter[data]'")
    try:
        G.fetch_mobilestylegan()
    except (WeightsError, OSError) as exc:
        pytest.skip(f"MobileStyleGAN IR not cached and not fetchable ({str(exc).splitlines()[0]}); "
                    f"run `{G.FETCH_GENERATORS_COMMAND}`")
    return G.MobileStyleGAN(threads=2)


def test_render_is_a_deterministic_face_image(gan):
    img = gan.render(3, psi=0.7)
    assert img.shape == (1024, 1024, 3) and img.dtype == np.uint8
    assert np.array_equal(img, gan.render(3, psi=0.7))
    assert 40 < float(img.std()) and 30 < float(img.mean()) < 225
    other = gan.render(4, psi=0.7)
    assert float(np.abs(other.astype(int) - img).mean()) > 10
    # psi = 0 gives the mean face whatever the seed
    assert np.array_equal(gan.render(3, psi=0.0), gan.render(4, psi=0.0))
    with pytest.raises(ValueError, match=r"psi must be in \[0, 1\], got 1.5"):
        gan.render(3, psi=1.5)


def test_render_does_not_depend_on_the_thread_count(gan):
    one = G.MobileStyleGAN(threads=1)
    assert np.array_equal(one.render(7, psi=0.8), gan.render(7, psi=0.8))
    assert np.array_equal(one.mean_style(), gan.mean_style())


def test_mean_style_is_cached_on_disk(gan):
    path = gan.model_dir / f"mean_style-{G.MEAN_STYLE_SEED}-{G.MEAN_STYLE_SAMPLES}.npy"
    mean = gan.mean_style()
    assert path.is_file() and np.array_equal(np.load(path), mean)
    assert mean.shape == (512,) and np.isfinite(mean).all()
    # the mean differs from a single style: it is an average, not one sample
    assert float(np.abs(mean - gan.style(0)).mean()) > 1e-3


def test_face_is_detected_in_a_render(gan):
    from fakespotter.faces import detect_and_align
    from fakespotter.samples import _resize

    faces = detect_and_align(_resize(gan.render(11, psi=0.7), 0.25))
    assert len(faces) >= 1 and faces[0].score > 0
