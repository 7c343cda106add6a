"""The README's main job (./dev demo = scripts/demo.py) runs and prints the scan summary."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from fakespotter.artifact import file_sha256
from fakespotter.cli.scan import DEFAULT_MODEL_NOTE
from fakespotter.detector import default_model_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_scans_the_sample_corpus(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--work", str(tmp_path / "demo"), "--corpus", "6"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "status" in out and "images/s" in out
    assert "errors: empty_file 1, truncated 1" in out
    assert DEFAULT_MODEL_NOTE in out  # the embedded default's limits, said where its labels appear
    records = [json.loads(line) for line in (tmp_path / "demo" / "scan.jsonl").read_text().splitlines()]
    assert len(records) == 6 + 6 + 3 + 2  # reals, renders, photos, broken files: one record each
    assert {r["status"] for r in records} <= {"ok", "no_face", "error"}
    assert all((r["score"] is None) == (r["status"] != "ok") for r in records)
    assert any(r["status"] == "ok" for r in records)
    assert {r["model"] for r in records} == {file_sha256(default_model_path())}  # the embedded default


def test_demo_never_wipes_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--work", str(mine), "--corpus", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "is not a demo folder" in result.stderr, result.stderr
    assert (mine / "important.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["important.txt"]
