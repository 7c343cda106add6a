"""The package's own safetensors reader (model files, thresholds, checkpoints): what it refuses,
each with a message naming the file and the fault, never a bare error from deeper down."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fakespotter._safetensors import SafetensorsError, load_file, save_file


def raw_file(path, header, body: bytes):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)
    return path


F4 = struct.pack("<4f", 1, 2, 3, 4)


def test_a_well_formed_file_reads_back(tmp_path):
    save_file({"a": torch.arange(4.0), "b": torch.zeros(0)}, tmp_path / "ok.safetensors", {"k": "v"})
    tensors, meta = load_file(tmp_path / "ok.safetensors")
    assert torch.equal(tensors["a"], torch.arange(4.0)) and tensors["b"].numel() == 0 and meta == {"k": "v"}
    hand = raw_file(tmp_path / "hand.safetensors", {"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, F4)
    assert load_file(hand)[0]["x"].tolist() == [[1, 2], [3, 4]]
    null = raw_file(tmp_path / "null.safetensors", {"__metadata__": None, "x": {"dtype": "F32", "shape": [4],
                                                                              "data_offsets": [0, 16]}}, F4)
    assert load_file(null)[1] == {}  # (as the safetensors library reads it: third-party weights do this)


@pytest.mark.parametrize("header, body, message", [
    ([1, 2], b"", "header is not a JSON object"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings to strings"),
    ({"__metadata__": ["k"]}, b"", "__metadata__ must map strings to strings"),
    ({"__metadata__": []}, b"", "__metadata__ must map strings to strings"),
    ({"x": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, F4, r"tensor 'x': dimension out of range in \[-2, -2\]"),
    ({"x": {"dtype": "F32", "shape": [0, 10**20], "data_offsets": [0, 0]}}, b"", r"tensor 'x': dimension out of range"),
    ({"x": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, F4, "tensor 'x': bad entry"),
    ({"x": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, F4, "tensor 'x': bad entry"),
    ({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, F4[:4], "tensor 'x': bad entry"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}, F4, "tensor 'x': bad entry"),
    ({"x": [4]}, F4, "tensor 'x': bad entry"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [4, 20]}}, b"junk" + F4, "tensor data overlaps or leaves holes"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "y": {"dtype": "F32", "shape": [2],
      "data_offsets": [8, 16]}}, F4, "tensor data overlaps or leaves holes"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F4 + b"JUNKJUNK", "8 trailing bytes after the last tensor"),
    ({"x": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, F4, r"tensor 'x': data_offsets \[0, 16\] do not hold 5 x F32"),
    ({"x": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, F4, "tensor 'x': bad entry"),
], ids=["not-object", "metadata-values", "metadata-list", "metadata-empty-list", "negative-dim", "huge-dim",
        "shape-string", "shape-float", "shape-bool", "three-offsets", "entry-list", "hole", "overlap", "trailing", "size",
        "dtype"])
def test_malformed_files_are_refused_naming_the_file_and_the_fault(tmp_path, header, body, message):
    path = raw_file(tmp_path / "bad.safetensors", header, body)
    with pytest.raises(SafetensorsError, match=r"bad.safetensors: not a valid safetensors file: " + message):
        load_file(path)


@pytest.mark.parametrize("head, message", [
    (b"[" * 100_000, "RecursionError"),
    (b'{"x": ' + b"9" * 5000 + b"}", "ValueError: Exceeds the limit"),
    (b'{"x": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', "tensor 'x': bad entry"),
], ids=["deep", "long-number", "inf-dim"])
def test_headers_that_json_cannot_read_or_that_overflow_are_refused(tmp_path, head, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head)
    with pytest.raises(SafetensorsError, match=r"bad.safetensors: not a valid safetensors file: .*" + message):
        load_file(path)
