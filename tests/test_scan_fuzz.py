"""Fuzz: a generated corpus of >= 300 malformed and odd images mixed with good ones. The scan must
not crash, must give exactly one record per input, an error record whose kind names the problem
for every bad input (and never a score), and a scored record for every odd-but-valid image."""

from __future__ import annotations

import json
import math
import os
import zlib

import pytest
from PIL import Image

from fakespotter.cli import main
from fakespotter.data import ERROR_KINDS, IMAGE_EXTENSIONS, MAX_JPEG_SCANS
from scan_helpers import (bad_files, damaged_files, jpeg_with_scans, model_file, noise_image, odd_good_files, png_file,
                          png_rows, write_good)

PIXEL_LIMIT = 2_000_000


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_file(tmp_path_factory)


def build(root):
    """Write the corpus; returns {path: expected}, expected = "ok" or a set of error kinds."""
    expect = {}
    for p in write_good(root / "good", 60, seed=11) + write_good(root / "good" / "jpeg", 30, seed=12, ext=".jpg"):
        expect[str(p)] = "ok"
    for seed in range(3):
        folder = root / f"odd{seed}"
        folder.mkdir()
        for name, data in odd_good_files(seed):
            (folder / name).write_bytes(data)
            expect[str(folder / name)] = "ok"
        folder = root / f"bad{seed}"
        folder.mkdir()
        for name, data, kinds in bad_files(seed):
            (folder / name).write_bytes(data)
            expect[str(folder / name)] = kinds
    damaged = root / "damaged"
    damaged.mkdir()
    ext = {"jpeg": ".jpg", "png": ".png", "gif": ".gif", "bmp": ".bmp", "webp": ".webp", "tiff": ".tif", "ppm": ".ppm"}
    for name, data in damaged_files().items():  # wrong header bytes, the file whole
        path = damaged / (name + ext[name.split("_")[0]])
        path.write_bytes(data)
        expect[str(path)] = {"decode_error"}
    rgb = noise_image(5, 30, 30)
    (damaged / "short_stream.png").write_bytes(png_file(rgb, zlib.compress(b"".join(png_rows(rgb, False)[:20])), False))
    expect[str(damaged / "short_stream.png")] = {"truncated"}  # its zlib stream ends, whole, after 20 of 30 rows
    (damaged / "many_scans.jpg").write_bytes(jpeg_with_scans(MAX_JPEG_SCANS + 1))
    expect[str(damaged / "many_scans.jpg")] = {"decode_error"}
    big = root / "big"
    big.mkdir()
    Image.new("RGB", (1600, 1200), (90, 120, 150)).save(big / "large_allowed.png")  # 1.92 MP: decoded
    expect[str(big / "large_allowed.png")] = "ok"
    Image.new("RGB", (1500, 1500), (90, 120, 150)).save(big / "over_limit.png")  # 2.25 MP: refused
    expect[str(big / "over_limit.png")] = {"too_many_pixels"}
    special = root / "special"
    special.mkdir()
    (special / "loop").symlink_to(root)  # a symlink loop: walked once, no duplicates
    (special / "link.png").symlink_to(root / "good" / "img000.png")
    expect[str(special / "link.png")] = "ok"
    (special / "broken_link.jpg").symlink_to(root / "nowhere.jpg")
    expect[str(special / "broken_link.jpg")] = {"not_found"}
    os.mkfifo(special / "fifo.png")
    expect[str(special / "fifo.png")] = {"not_a_file"}
    (special / "folder.jpg").mkdir()  # a folder with an image's name: walked into, not read
    Image.fromarray(noise_image(99)).save(special / "folder.jpg" / "inside.png")
    expect[str(special / "folder.jpg" / "inside.png")] = "ok"
    return expect


def test_fuzz_corpus(model, tmp_path, capsys):
    root = tmp_path / "corpus"
    root.mkdir()
    expect = build(root)
    listing = tmp_path / "vanished.txt"
    vanished = [str(tmp_path / f"gone{i}.png") for i in range(10)]
    listing.write_text("\n".join(vanished) + "\n")
    out = tmp_path / "o.jsonl"
    rc = main(["scan", str(root), f"@{listing}", "--model", str(model), "--aligned", "--workers", "2",
               "--batch-size", "16", "--pixel-limit", str(PIXEL_LIMIT), "--out", str(out), "--quiet"])
    assert rc == 1
    records = [json.loads(line) for line in open(out)]
    for p in vanished:
        expect[p] = {"not_found"}
    n_bad = sum(1 for v in expect.values() if v != "ok")
    assert len(expect) >= 300 and n_bad >= 150, (len(expect), n_bad)

    # one record per input, in listing order
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)) == len(expect)
    assert set(paths) == set(expect)
    in_root = [p for p in paths if p.startswith(str(root))]
    assert in_root == sorted(in_root) and paths[len(in_root):] == vanished
    assert all(os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS for p in paths)

    wrong = []
    for r in records:
        want = expect[r["path"]]
        if want == "ok":
            ok = (r["status"] == "ok" and r["error_kind"] is None and isinstance(r["score"], float)
                  and math.isfinite(r["score"]) and r["label"] in ("real", "fake") and len(r["faces"]) == 1
                  and r["sha256"] and r["size"] > 0)
        else:
            ok = (r["status"] == "error" and r["error_kind"] in want and r["error"] and r["score"] is None
                  and r["label"] is None and r["faces"] == [])
        assert r["error_kind"] is None or r["error_kind"] in ERROR_KINDS
        if not ok:
            wrong.append((r["path"], want, r["status"], r["error_kind"], r["error"]))
    assert not wrong, wrong[:10]

    by_name = {os.path.basename(r["path"]): r for r in records if "/odd0/" in r["path"]}
    assert by_name["animated.gif"]["frames"] == 3 and by_name["animated.png"]["frames"] == 4
    assert by_name["animated.webp"]["frames"] == 2 and by_name["cmyk.jpg"]["frames"] == 1
    for o in range(1, 9):  # EXIF orientations 5..8 swap width and height
        r = by_name[f"exif_orientation{o}.jpg"]
        assert (r["width"], r["height"]) == ((20, 30) if o >= 5 else (30, 20))
    assert by_name["grey16.png"]["status"] == by_name["palette_transparent.png"]["status"] == "ok"

    stats = json.loads((tmp_path / "o.jsonl.stats.json").read_text())
    assert stats["counts"]["error"] == n_bad and stats["counts"]["ok"] == len(expect) - n_bad
    assert sum(stats["error_kinds"].values()) == n_bad
    assert {"truncated", "decode_error", "empty_file", "not_an_image", "too_many_pixels", "not_found",
            "not_a_file"} <= set(stats["error_kinds"])
