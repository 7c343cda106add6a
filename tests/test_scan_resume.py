"""Resume: a scan killed with SIGKILL at random points and resumed each time ends with exactly one
record per input, byte-identical to an uninterrupted scan; torn and damaged tails are repaired;
a changed input listing falls back to skipping by path."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakespotter import data as D
from fakespotter.cli import main
from fakespotter.faces import WEAK_FACE_SCORE
from fakespotter.scan import RECORD_FIELDS, _line, scan
from scan_helpers import model_file, write_good


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_file(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_corpus")
    write_good(root / "a", 36, seed=21)
    write_good(root / "b", 12, seed=22, ext=".jpg")
    (root / "b" / "zz_empty.png").write_bytes(b"")
    (root / "b" / "zz_text.jpg").write_text("no image")
    return root


def outputs(records):
    """The JSONL and CSV an uninterrupted scan writes for these records."""
    return {"records": records, "jsonl": "".join(_line(r, "jsonl") for r in records),
            "csv": ",".join(RECORD_FIELDS) + "\n" + "".join(_line(r, "csv") for r in records)}


@pytest.fixture(scope="module")
def reference(corpus, model):
    """An uninterrupted scan of the whole corpus (50 inputs; the kill test)."""
    return outputs(list(scan([str(corpus)], model, aligned=True, batch_size=2, workers=0)))


@pytest.fixture(scope="module")
def small(corpus, model):
    """An uninterrupted scan of corpus/b (14 inputs; the other tests)."""
    return corpus / "b", outputs(list(scan([str(corpus / "b")], model, aligned=True, batch_size=2, workers=0)))


def cli(corpus, model, out, *extra):
    return ["scan", str(corpus), "--model", str(model), "--aligned", "--workers", "0", "--batch-size", "2",
            "--out", str(out), "--quiet", *extra]


def lines_in(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("fmt, signals, workers, stops", [
    ("jsonl", (signal.SIGKILL,), "0", 10),
    ("csv", (signal.SIGINT, signal.SIGTERM, signal.SIGKILL), "1", 6),  # Ctrl-C and SIGTERM end it themselves
])
def test_killed_at_random_points_then_resumed(corpus, model, reference, tmp_path, fmt, signals, workers, stops):
    out = tmp_path / f"o.{fmt}"
    cmd = [sys.executable, "-m", "fakespotter", *cli(corpus, model, out, "--resume")]
    cmd[cmd.index("--workers") + 1] = workers
    rng = random.Random(20240601)
    kills, runs = 0, 0
    total = len(reference["records"])
    while True:
        runs += 1
        assert runs < 30, "the scan does not finish"
        before = lines_in(out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < stops:
            if kills % 4 == 1:  # a random moment, mostly during start-up and listing
                time.sleep(rng.uniform(0.1, 2.5))
            else:  # after a random number of newly flushed records
                target = before + rng.randint(1, 3)
                while proc.poll() is None and lines_in(out) < target:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.15))
            if proc.poll() is None:
                sig = signals[kills % len(signals)]
                proc.send_signal(sig)
                rc = proc.wait(timeout=120)
                err = proc.stderr.read().decode()
                if rc != 1:  # (a scan that ended just before the signal: exit 1, two inputs are bad)
                    assert rc == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig], err
                    kills += 1
                    continue
        rc = proc.wait(timeout=300)
        err = proc.stderr.read().decode()
        assert rc == 1, err  # two inputs are bad
        if kills >= stops:
            break
        assert out.read_text() == reference[fmt]  # finished before the last kill: check, and go again
        out.unlink()
    assert kills >= stops
    assert out.read_text() == reference[fmt]
    assert len(reference["records"]) == total == 50
    stats = json.loads((tmp_path / f"o.{fmt}.stats.json").read_text())
    assert stats["complete"] and stats["resumed_records"] + stats["images"] == total


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_torn_last_line_is_dropped_and_rewritten(small, model, tmp_path, capsys, fmt):
    corpus, reference = small
    whole = reference[fmt]
    lines = whole.splitlines(keepends=True)
    head = 1 if fmt == "csv" else 0
    out = tmp_path / f"o.{fmt}"
    out.write_text("".join(lines[: head + 7]) + lines[head + 7][:25])  # torn mid-record
    assert main(cli(corpus, model, out, "--resume")) == 1
    assert out.read_text() == whole
    assert "dropping a torn last record" not in capsys.readouterr().err  # --quiet
    stats = json.loads((tmp_path / f"o.{fmt}.stats.json").read_text())
    assert stats["resumed_records"] == 7 and stats["images"] == len(reference["records"]) - 7


def test_damaged_line_and_everything_after_it_is_redone(small, model, tmp_path):
    corpus, reference = small
    lines = reference["jsonl"].splitlines(keepends=True)
    out = tmp_path / "o.jsonl"
    out.write_text("".join(lines[:5]) + "\x00\x00\x00\x00\n" + "".join(lines[6:9]))  # e.g. after a power loss
    assert main(cli(corpus, model, out, "--resume")) == 1
    assert out.read_text() == reference["jsonl"]


def test_a_csv_line_cut_inside_a_quoted_field_is_damaged(small, model, tmp_path):
    """A CSV line cut inside its quoted error text and ended with a newline (a hand edit) parses
    as a row of the right width, its quote left open: kept, it swallowed the next record for every
    CSV reader. It is damaged: redone, with what follows it."""
    corpus, reference = small
    lines = reference["csv"].splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if line.endswith('"\n'))  # a quoted error (it holds a comma)
    assert lines[i].rindex('"', 0, -2) < len(lines[i]) - 12, "premise: a quoted field longer than the cut"
    out = tmp_path / "o.csv"
    out.write_text("".join(lines[:i]) + lines[i][:-10] + "\n")
    assert main(cli(corpus, model, out, "--resume", "--format", "csv")) == 1
    assert out.read_text() == reference["csv"]


def test_resume_of_a_finished_or_missing_output(small, model, tmp_path):
    corpus, reference = small
    out = tmp_path / "o.jsonl"
    assert main(cli(corpus, model, out, "--resume")) == 1  # nothing there yet: a fresh scan
    assert out.read_text() == reference["jsonl"]
    assert main(cli(corpus, model, out, "--resume")) == 1  # complete: nothing to do, errors still count
    assert out.read_text() == reference["jsonl"]
    assert json.loads((tmp_path / "o.jsonl.stats.json").read_text())["images"] == 0


def test_resume_with_limit_and_changed_listing(small, model, tmp_path):
    corpus, reference = small
    out = tmp_path / "o.jsonl"
    assert main(cli(corpus, model, out, "--limit", "3")) == 0
    assert main(cli(corpus, model, out, "--resume", "--limit", "8")) == 0
    assert out.read_text() == "".join(reference["jsonl"].splitlines(keepends=True)[:8])
    # records that are not a prefix of the listing (another order): skip by path instead
    lines = reference["jsonl"].splitlines(keepends=True)
    shuffled = lines[9:12] + lines[3:6]
    out2 = tmp_path / "o2.jsonl"
    out2.write_text("".join(shuffled))
    assert main(cli(corpus, model, out2, "--resume")) == 1
    got = out2.read_text().splitlines(keepends=True)
    assert got[:6] == shuffled and sorted(got) == sorted(lines) and len(got) == len(lines)


def test_a_resume_lists_the_inputs_done_once(small, model, tmp_path, monkeypatch):
    """The resume's check that the records are the listing's first inputs hands its listing on
    to the scan: the inputs done are not listed (a tar.gz: decompressed) a second time."""
    corpus, reference = small
    out = tmp_path / "o.jsonl"
    assert main(cli(corpus, model, out, "--limit", "5")) == 0
    listed, tar = [], tmp_path / "b.tar.gz"
    sorted_entries, tar_entries = D._sorted_entries, D._tar_entries
    monkeypatch.setattr(D, "_sorted_entries", lambda folder: (listed.append(folder), sorted_entries(folder))[1])
    assert main(cli(corpus, model, out, "--resume")) == 1  # (the two broken files)
    assert listed == [str(corpus)] and out.read_text() == reference["jsonl"]
    # a tar archive's members are read once
    import tarfile

    with tarfile.open(tar, "w:gz") as tf:
        for p in sorted(corpus.iterdir())[:6]:
            tf.add(p, arcname=p.name)
    out = tmp_path / "t.jsonl"
    assert main(cli(tar, model, out, "--limit", "3")) == 0
    opened = []
    monkeypatch.setattr(D, "_tar_entries", lambda a, *rest: (opened.append(a), tar_entries(a, *rest))[1])
    assert main(cli(tar, model, out, "--resume")) == 0
    assert opened == [str(tar)] and lines_in(out) == 6


def test_an_input_listed_twice_keeps_both_records_when_a_resume_skips_by_path(small, model, tmp_path):
    """Skipping by path, each record stands for one input: a file listed twice whose second
    record is missing is scanned again, not taken as done."""
    corpus, _ = small
    twice = str(D.list_images(corpus)[0])
    ref = tmp_path / "ref.jsonl"
    args = cli(corpus, model, ref)
    assert main([*args[:2], twice, *args[2:]]) == 1
    lines = ref.read_text().splitlines(keepends=True)
    assert [json.loads(line)["path"] for line in lines].count(twice) == 2
    out = tmp_path / "o.jsonl"
    assert json.loads(lines[0])["path"] == twice
    out.write_text(lines[0] + "".join(lines[2:-1]))  # not a prefix: skip by path; the second `twice` missing
    args = cli(corpus, model, out, "--resume")
    assert main([*args[:2], twice, *args[2:]]) == 1
    got = out.read_text().splitlines(keepends=True)
    assert sorted(got) == sorted(lines)


def test_resume_refuses_what_it_would_damage(small, model, tmp_path, capsys):
    corpus, reference = small
    lines = reference["jsonl"].splitlines(keepends=True)
    out = tmp_path / "o.jsonl"
    out.write_text("".join(lines[:4]))
    # another format: the JSON lines are not CSV rows; nothing is cut
    rc = main(cli(corpus, model, out, "--resume", "--format", "csv"))
    err = capsys.readouterr().err
    assert rc == 2 and "is not a csv scan output" in err and out.read_text() == "".join(lines[:4])
    # another model
    out.write_text("".join(line.replace(reference["records"][0]["model"], "0" * 64) for line in lines[:4]))
    rc = main(cli(corpus, model, out, "--resume"))
    err = capsys.readouterr().err
    assert rc == 2 and f"was written with model {'0' * 64}" in err
    # a file that is no scan output at all
    out.write_text("my notes\nmore notes\n")
    assert main(cli(corpus, model, out, "--resume")) == 2 and out.read_text() == "my notes\nmore notes\n"
    # other face settings: --aligned, or (an output whose stats JSON predates the setting: dlib's
    # own cut, 0) --weak-face-score; nothing is cut
    out.write_text("".join(lines[:4]))
    stats = tmp_path / "o.jsonl.stats.json"
    old = {"counts": {"ok": 4}, "images": 4, "model": "m"}  # what every scan's stats JSON has held
    stats.write_text(json.dumps({**old, "aligned": False, "upsample": 1}))
    rc = main(cli(corpus, model, out, "--resume"))
    err = capsys.readouterr().err
    assert rc == 2 and "--aligned False there, True now" in err and out.read_text() == "".join(lines[:4])
    no_align = [a for a in cli(corpus, model, out, "--resume") if a != "--aligned"]
    rc = main(no_align)
    err = capsys.readouterr().err
    assert rc == 2 and f"--weak-face-score 0.0 there, {WEAK_FACE_SCORE} now" in err and out.read_text() == "".join(lines[:4])
    assert "--detect-pixels 0 there" in err  # a scan from before the cap detected at full size
    stats.write_text(json.dumps({**old, "aligned": True, "upsample": 1, "weak_face_score": 0.0}))
    assert main(cli(corpus, model, out, "--resume", "--upsample", "2")) == 1  # no detection: they don't matter
    assert out.read_text() == reference["jsonl"]
    # but a first record torn while being written is dropped
    out.write_text(lines[0][:30])
    assert main(cli(corpus, model, out, "--resume")) == 1 and out.read_text() == reference["jsonl"]
    # (torn anywhere: inside the path, an escape in it, or after it)
    from fakespotter.scan import _torn_record

    line = '{"path":"d/caf\\u00e9 \\"q\\".jpg","size":12,"sha256":null}'
    assert all(_torn_record(line[:n].encode()) for n in range(len(line) + 1))
    assert not any(_torn_record(t) for t in (b'{"path":"a"}', b'{"path":"d/x.jpg"]'))
    # ... but not a file of someone else's that lacks a newline, even one whose JSON starts with a
    # "path" key (json.dump writes no final newline)
    for text in ("my notes, no newline", json.dumps({"path": "/data/photos", "owner": "me"}),
                 '{"path":"/data/photos","owner":"me"}', '{"path":"a"}'):
        out.write_text(text)
        rc = main(cli(corpus, model, out, "--resume"))
        assert rc == 2 and "is not a jsonl scan output" in capsys.readouterr().err
        assert out.read_text() == text
    # an output that is also an input
    image = corpus / "img000.jpg"
    before = image.read_bytes()
    for target in (corpus, image):  # the input itself, or an image in an input folder
        rc = main(["scan", str(target), *cli(corpus, model, image, "--overwrite")[2:]])
        assert rc == 2 and "is also an input" in capsys.readouterr().err
    assert image.read_bytes() == before
    listing = tmp_path / "list.txt"  # the file list itself
    listing.write_text(f"{image}\n")
    rc = main(["scan", f"@{listing}", *cli(corpus, model, listing, "--overwrite")[2:]])
    assert rc == 2 and f"output {listing} is also an input (the file list @{listing})" in capsys.readouterr().err
    assert listing.read_text() == f"{image}\n" and not (tmp_path / "list.txt.stats.json").exists()


def test_resume_refuses_other_settings_and_more_than_limit(small, model, tmp_path, capsys):
    corpus, reference = small
    lines = reference["jsonl"].splitlines(keepends=True)
    out = tmp_path / "o.jsonl"
    assert main(cli(corpus, model, out, "--limit", "6")) == 0
    stats = (tmp_path / "o.jsonl.stats.json").read_text()
    for extra, message in ((["--batch-size", "3"], "--batch-size 2 there, 3 now"),
                           (["--channels-last"], "--channels-last False there, True now"),
                           (["--limit", "4"], "already holds 6 records, more than --limit 4")):
        rc = main([*cli(corpus, model, out, "--resume"), *extra])
        assert rc == 2 and message in capsys.readouterr().err, extra
        assert out.read_text() == "".join(lines[:6])
    # the same --limit again: nothing to do, nothing refused
    assert main([*cli(corpus, model, out, "--resume"), "--limit", "6"]) == 0
    assert out.read_text() == "".join(lines[:6])
    # without its stats JSON nothing can be checked: said, then resumed
    (tmp_path / "o.jsonl.stats.json").unlink()
    assert main([a for a in cli(corpus, model, out, "--resume", "--limit", "8") if a != "--quiet"]) == 0
    assert "has no stats JSON" in capsys.readouterr().err and out.read_text() == "".join(lines[:8])
    assert stats  # (the first run wrote one)


def test_resume_whole_output_counts_damaged_middle_and_other_spellings(small, model, tmp_path, capsys, monkeypatch):
    corpus, reference = small
    lines = reference["jsonl"].splitlines(keepends=True)
    out = tmp_path / "o.jsonl"
    assert main(cli(corpus, model, out)) == 1
    done = json.loads((tmp_path / "o.jsonl.stats.json").read_text())["counts"]
    assert main(cli(corpus, model, out, "--resume")) == 1  # nothing left: the whole output's counts stay
    stats = json.loads((tmp_path / "o.jsonl.stats.json").read_text())
    assert stats["images"] == 0 and stats["output_counts"] == done and stats["resumed_records"] == len(lines)
    # a damaged line in the middle: it and everything after it are scanned again, and said so
    out.write_text("".join(lines[:3]) + lines[3].replace('"status"', '"stat"') + "".join(lines[4:]))
    assert main([a for a in cli(corpus, model, out, "--resume") if a != "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"a damaged line and everything after it ({len(lines) - 3} lines" in err
    assert out.read_text() == reference["jsonl"]
    # the same inputs spelled another way (./corpus, an absolute path): skipped, not doubled
    out.write_text("".join(lines[:5]))
    monkeypatch.chdir(corpus.parent)
    for spelling in (f"./{corpus.name}", str(corpus.resolve())):
        out.write_text("".join(lines[:5]))
        assert main(cli(spelling, model, out, "--resume")) == 1
        got = [json.loads(line)["path"] for line in out.read_text().splitlines()]
        assert len(got) == len(lines) and got[:5] == [json.loads(line)["path"] for line in lines[:5]]


def test_a_resume_from_another_folder_is_refused_when_records_hold_relative_paths(small, model, tmp_path, capsys,
                                                                                  monkeypatch):
    corpus, reference = small
    out = tmp_path / "o.jsonl"
    monkeypatch.chdir(corpus.parent)
    main(cli(corpus.name, model, out, "--limit", "5"))  # records: b/...
    before = out.read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for spelling in (str(corpus), os.path.relpath(corpus)):  # the same files: matched by nothing here
        assert main(cli(spelling, model, out, "--resume")) == 2
        err = capsys.readouterr().err
        assert f"relative to the folder its scan ran in, {corpus.parent}, and this is {elsewhere}" in err
        assert f"(cd {corpus.parent})" in err and out.read_bytes() == before
    monkeypatch.chdir(corpus.parent)  # from there, in any spelling: one record per input
    assert main(cli(str(corpus), model, out, "--resume")) == 1
    assert len(out.read_text().splitlines()) == len(reference["jsonl"].splitlines())


def test_a_second_scan_of_the_same_output_is_refused(small, model, tmp_path, capsys):
    import fcntl

    corpus, reference = small
    out = tmp_path / "o.jsonl"
    out.write_text(reference["jsonl"].splitlines(keepends=True)[0])
    with open(out, "rb") as held:  # another scan writing it holds this lock
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        rc = main(cli(corpus, model, out, "--resume"))
        assert rc == 2 and "is being written by another scan" in capsys.readouterr().err
        assert out.read_text() == reference["jsonl"].splitlines(keepends=True)[0]
    assert main(cli(corpus, model, out, "--resume")) == 1 and out.read_text() == reference["jsonl"]


def _descendants(pid):
    """The pids of every process below ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pids):
    return {p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_scan_leaves_no_process_behind(model, tmp_path, sig):
    """SIGTERM unwinds like Ctrl-C (exit 143, output closed, stats written); after SIGKILL the
    decode workers and their server notice their parent is gone and exit, also while it is
    not reaped (a zombie until then: a caller blocked reading its stderr, which the workers
    held, waited forever)."""
    write_good(tmp_path / "c", 400, seed=23)
    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, "-m", "fakespotter", "scan", str(tmp_path / "c"), "--model", str(model), "--aligned",
           "--workers", "1", "--batch-size", "1", "--out", str(out), "--quiet"]
    log = tmp_path / "stderr.txt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)
    deadline = time.monotonic() + 120
    while lines_in(out) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the scan ended or stalled"
        time.sleep(0.05)
    helpers = _descendants(proc.pid)
    assert helpers, "premise: decode workers run in processes of their own"
    proc.send_signal(sig)
    if sig == signal.SIGTERM:
        proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while _alive(helpers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(helpers), "processes of the scan outlived it"
    proc.wait(timeout=60)
    err = log.read_text()
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line complete
    assert 3 <= len(records) < 400
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "fakespotter scan: terminated" in err and "Traceback" not in err
        assert json.loads((tmp_path / "o.jsonl.stats.json").read_text())["complete"] is False


def test_the_command_s_decode_workers_end_without_a_word(model, tmp_path):
    """Through the console script (argv[0] 'fakespotter', which the forkserver imports as
    __mp_main__): the decode workers, stopped with SIGTERM as the scan ends, printed the
    command's own "fakespotter: terminated" after a scan that went well."""
    script = Path(sys.executable).with_name("fakespotter")
    assert script.is_file(), "premise: the package is installed in this interpreter's environment"
    write_good(tmp_path / "c", 6, seed=3)
    run = subprocess.run([str(script), "scan", str(tmp_path / "c"), "--model", str(model), "--aligned", "--workers",
                          "2", "--out", str(tmp_path / "o.jsonl"), "--quiet"], capture_output=True, text=True,
                         timeout=300)
    assert (run.returncode, run.stderr) == (0, ""), run.stderr
    assert lines_in(tmp_path / "o.jsonl") == 6


@pytest.mark.parametrize("workers", [0, 2])
def test_the_command_starts_its_workers_server_before_the_model_loads(corpus, model, tmp_path, monkeypatch, workers):
    """``fakespotter scan`` starts the decode workers' forkserver (which imports torch, about a
    second) before it loads the model, so that the two overlap; not with --workers 0, nor for
    a command that refuses its device or model file (the server would hold its stderr open
    for that second after it exits)."""
    from fakespotter.detector import FakeSpotter

    S = sys.modules["fakespotter.scan"]
    order = []
    real_start, real_load = S.start_worker_server, FakeSpotter.load.__func__
    monkeypatch.setattr(S, "start_worker_server", lambda: (order.append("server"), real_start()))
    monkeypatch.setattr(FakeSpotter, "load", classmethod(lambda cls, *a, **k: (order.append("model"),
                                                                                real_load(cls, *a, **k))[1]))
    def scan_to(out, *more):
        return main(["scan", str(corpus / "a"), "--aligned", "--workers", str(workers), "--out", str(out), "--quiet",
                     *more])

    assert scan_to(tmp_path / "o.jsonl", "--model", str(model)) == 0
    assert order == (["server", "model"] if workers else ["model"])
    assert lines_in(tmp_path / "o.jsonl") == len(list((corpus / "a").iterdir()))
    order.clear()
    assert scan_to(tmp_path / "missing.jsonl", "--model", str(tmp_path / "missing.fsm")) == 2
    assert scan_to(tmp_path / "cuda.jsonl", "--model", str(model), "--device", "cuda:7") == 2
    assert order == []


def test_a_command_refused_after_its_workers_server_started_stops_it(corpus, model, tmp_path, monkeypatch):
    """A refusal that comes once the server is started (here a --resume with other settings,
    found after the model loaded) stops it: importing torch, it would hold the command's stderr
    open for about a second after the command exits."""
    from multiprocessing import forkserver

    S = sys.modules["fakespotter.scan"]
    out = tmp_path / "o.jsonl"
    args = ["scan", str(corpus / "a"), "--aligned", "--workers", "2", "--model", str(model), "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    forkserver._forkserver._stop()  # (this test process's server: the command's starts afresh)
    started = []
    real = S.start_worker_server
    monkeypatch.setattr(S, "start_worker_server", lambda: (real(), started.append(S._early_server)))
    assert main([*args, "--resume", "--batch-size", "3"]) == 2
    (pid,) = started
    assert pid is not None and forkserver._forkserver._forkserver_pid is None
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
    assert main([*args[:-3], "--out", str(tmp_path / "p.jsonl"), "--quiet"]) == 0  # a later scan starts another
    assert lines_in(tmp_path / "p.jsonl") == lines_in(out)


def test_signals_during_a_worker_start_wait_for_it_and_are_not_lost():
    """Ctrl-C or SIGTERM while a submit starts a worker: the handler runs once the submit is
    done (so the pool knows the process and stopping the pool ends it), not half-way."""
    import threading

    from fakespotter.cli import Terminated, _terminate
    from fakespotter.scan import _signals_held

    stop = threading.Event()  # a scan has other threads: the kernel may give the signal to one of them
    threading.Thread(target=stop.wait, daemon=True).start()
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # time for the handler, were it not held back
            reached.append("end of the guarded block")
    assert reached == ["end of the guarded block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with pytest.raises(Terminated):
            with _signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                reached.append("again")
        assert reached[-1] == "again" and signal.getsignal(signal.SIGTERM) is _terminate
    finally:
        signal.signal(signal.SIGTERM, previous)
    with _signals_held():  # no signal: nothing raised, handlers as they were
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stop.set()


def forkserver_child(tmp_path, child: str, preload, setup: str = ""):
    """Runs a script that starts a forkserver with ``preload``, runs ``setup`` (lines of the
    main block), then one process of the server whose ``child(q)`` (its body: ``child``) puts
    what it finds on ``q``; the script prints that."""
    script = tmp_path / "forkserver_child.py"
    script.write_text(f"""
import multiprocessing as mp, os, signal, sys, time
from multiprocessing import forkserver

def child(q):
{child}

if __name__ == "__main__":
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload({list(preload)!r})
{setup}
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    print(q.get(timeout=120))
    p.join()
""")
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)


def test_a_ctrl_c_while_the_forkserver_imports_fakespotter_leaves_it_running(tmp_path):
    """A Ctrl-C (sent to the whole process group) while the workers' forkserver imported
    torch killed it with a KeyboardInterrupt traceback: the scan's blocked SIGINT is not
    inherited by the server. It is ignored there now, and the server's processes get Python's
    handler."""
    setup = """
    forkserver.ensure_running()
    pid = forkserver._forkserver._forkserver_pid
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # torch's library mapped: the server is in fakespotter's imports
        with open(f"/proc/{pid}/maps") as f:
            if "libtorch" in f.read():
                break
        time.sleep(0.002)
    else:
        sys.exit("premise: the server never loaded torch")
    for _ in range(5):
        os.kill(pid, signal.SIGINT)
        time.sleep(0.02)"""
    run = forkserver_child(tmp_path, "    q.put(signal.getsignal(signal.SIGINT) is signal.default_int_handler)",
                           ["fakespotter._forkserver_preload"], setup)
    assert (run.returncode, run.stdout.strip()) == (0, "True"), run.stderr
    assert "KeyboardInterrupt" not in run.stderr


def test_a_process_forked_from_a_forkserver_imports_fakespotter_with_its_ctrl_c(tmp_path):
    """The caller's own forkserver processes (their stack holds the server's) that import
    fakespotter themselves are not taken for the server: Ctrl-C is not ignored there."""
    run = forkserver_child(tmp_path, """    import fakespotter
    q.put((fakespotter._in_forkserver_start(), signal.getsignal(signal.SIGINT) is signal.default_int_handler))""",
                           ["json"])
    assert (run.returncode, run.stdout.strip()) == (0, "(False, True)"), run.stderr


@pytest.mark.parametrize("start", ["by the scan", "before it"])
def test_the_forkserver_a_scan_starts_leaves_ctrl_c_to_the_callers_own_processes(corpus, model, tmp_path, start):
    """The forkserver is the process's: after a scan started it (with SIGINT blocked and
    ignored), the caller's own forkserver processes ignored Ctrl-C, and a join of them hung.
    It ignores SIGINT only while it imports torch, and keeps the caller's preload modules;
    also when ``start_worker_server`` started it before the scan (as the CLI does)."""
    early = "from fakespotter.scan import start_worker_server; start_worker_server()" if start == "before it" else ""
    child = """    q.put((signal.getsignal(signal.SIGINT) is signal.default_int_handler,
           signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []), "json" in sys.modules))"""
    setup = f"""
    import fakespotter
    {early}
    assert len(list(fakespotter.scan([{str(corpus / "a")!r}], {str(model)!r}, aligned=True, workers=1))) > 0"""
    run = forkserver_child(tmp_path, child, ["__main__", "json"], setup)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(True, False, True)"
    run = subprocess.run([sys.executable, "-c", "import signal, fakespotter._forkserver_preload; "
                          "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"],
                         capture_output=True, text=True)
    assert run.stdout.strip() == "True", run.stderr


def test_a_csv_output_with_its_header_alone_has_nothing_torn(tmp_path):
    """A CSV scan killed before its first record holds its header: nothing to cut, nothing
    counted; a first line that is not the header is all torn."""
    from fakespotter.scan import _csv_header, resume_state

    out = tmp_path / "o.csv"
    out.write_text(_csv_header())
    st = resume_state(out, "csv")
    assert (st.records, st.good_bytes, st.torn_bytes) == (0, len(_csv_header()), 0)
    out.write_text(_csv_header()[:20])
    st = resume_state(out, "csv")
    assert (st.records, st.good_bytes, st.torn_bytes) == (0, 0, 20)
