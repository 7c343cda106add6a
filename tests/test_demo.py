"""The README's main job (./dev demo = scripts/demo.py) runs and prints the scan summary."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

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


def test_demo_rebuilds_its_own_corpus_but_never_a_file_added_to_it(tmp_path, monkeypatch):
    """Another --corpus rebuilds the corpus the demo wrote; a file the user added to it (or
    beside it) is named and the rebuild refused, nothing deleted; an interrupted build (its
    half-made folder) is redone, not refused; --corpus below 1 is a usage error."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import demo

    work = tmp_path / "demo"
    demo.build(work, 2)
    corpus = work / "corpus"
    assert sorted(p.parent.name for p in corpus.rglob("*.*")).count("real") == 2
    demo.build(work, 3)  # its own files only: rebuilt
    assert len(list((corpus / "real").iterdir())) == 3 and not (work / demo.BUILDING).exists()
    (corpus / "real" / "mine.png").write_bytes(b"my own image")
    demo.build(work, 3)  # the same size: kept, the added file with it (the scan takes it)
    with pytest.raises(SystemExit, match=r"holds files the demo did not write \(corpus/real/mine\.png\)"):
        demo.build(work, 2)
    assert (corpus / "real" / "mine.png").read_bytes() == b"my own image" and len(list((corpus / "real").iterdir())) == 4
    (corpus / "real" / "mine.png").unlink()
    (work / "notes.md").write_text("mine")
    with pytest.raises(SystemExit, match=r"holds files the demo did not write \(notes\.md\)"):
        demo.build(work, 2)
    # a first build stopped half-way (Ctrl-C): only the half-made folder is there
    half = tmp_path / "half"
    (half / demo.BUILDING / "real").mkdir(parents=True)
    (half / demo.BUILDING / "real" / "x.jpg").write_bytes(b"partial")
    demo.build(half, 1)
    assert sorted(p.name for p in half.iterdir()) == [demo.MARKER, "corpus"]
    # a folder of an older demo (marker "corpus N"): the files of that size are the demo's, others not
    (half / demo.MARKER).write_text("corpus 1")
    (half / "corpus" / "real" / "mine.png").write_bytes(b"mine")
    with pytest.raises(SystemExit, match=r"holds files the demo did not write \(corpus/real/mine\.png\)"):
        demo.build(half, 2)
    (half / "corpus" / "real" / "mine.png").unlink()
    demo.build(half, 2)
    assert len(list((half / "corpus" / "real").iterdir())) == 2
    # interrupted in the swap (Ctrl-C): before the new corpus is in, and before its marker is
    for stop_at in ("rmtree", "marker"):
        calls = []

        def interrupt(real):
            def fn(*a, **k):
                calls.append(a)
                if stop_at == "rmtree" and str(a[0]).endswith("corpus") or stop_at == "marker" and len(calls) == 2:
                    raise KeyboardInterrupt
                return real(*a, **k)
            return fn

        target = (demo.shutil, "rmtree") if stop_at == "rmtree" else (demo, "_write_marker")
        with monkeypatch.context() as m:
            m.setattr(*target, interrupt(getattr(*target)))
            with pytest.raises(KeyboardInterrupt):
                demo.build(half, 3 if stop_at == "rmtree" else 1)
        (half / "scan.jsonl").write_text("")  # an earlier scan's output beside it
        demo.build(half, 2)  # redone, not refused
        assert len(list((half / "corpus" / "real").iterdir())) == 2 and not (half / demo.BUILDING).exists()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--work", str(tmp_path / "neg"),
                             "--corpus", "-3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--corpus: must be at least 1, got -3" in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--corpus", "abc"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--corpus: must be a whole number, got 'abc'" in result.stderr
    assert not (tmp_path / "neg").exists()
