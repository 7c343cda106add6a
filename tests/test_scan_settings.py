"""Scan settings that change how the backbone runs: --channels-last, --autocast, --compile (and --resume
refusing to mix precisions), the batch-size back-off on out-of-memory, and the device checks
(CUDA cannot run here: its absence must be a clear error before any work)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fakespotter.cli import main
from fakespotter.detector import FakeSpotter
from fakespotter.scan import _oom_in, precision_of, scan
from fakespotter.taps import Tap
from scan_helpers import model_file, write_good


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_file(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings_corpus")
    write_good(root / "a", 12, seed=41)
    (root / "a" / "zz_empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def base(corpus, model):
    """The default scan at batch size 4 (13 inputs, 12 chips)."""
    return list(scan([str(corpus)], model, aligned=True, batch_size=4, workers=0))


def scores(records):
    return np.array([np.nan if r["score"] is None else r["score"] for r in records])


def without_scores(records):
    return [dict(r, score=None, faces=[dict(f, score=None) for f in r["faces"]]) for r in records]


@pytest.fixture(scope="module")
def direct2(corpus, model):
    """The default scan at batch size 2."""
    return list(scan([str(corpus)], model, aligned=True, batch_size=2, workers=0))


def cli(corpus, model, out, *extra):
    return ["scan", str(corpus), "--model", str(model), "--aligned", "--workers", "0", "--batch-size", "4",
            "--out", str(out), "--quiet", *extra]


# ----------------------------------------------------------------------------------------------
# channels_last and autocast


def test_channels_last_gives_the_default_records_and_restores_the_weights(corpus, model, base):
    det = FakeSpotter.load(model)
    det.model_id_ = base[0]["model"]
    convs = [m for m in det.tap_.backbone.module.modules() if isinstance(m, torch.nn.Conv2d)]
    seen = []
    hooks = [c.register_forward_pre_hook(lambda m, i: seen.append(
        m.weight.is_contiguous(memory_format=torch.channels_last) and m.weight.shape[2] > 1)) for c in convs]
    try:
        run = scan([str(corpus)], det, aligned=True, batch_size=4, workers=0, channels_last=True)
        got = list(run)
    finally:
        for h in hooks:
            h.remove()
    assert any(seen), "the conv weights were not channels_last during the scan"
    assert all(c.weight.is_contiguous() for c in convs), "the weights were not given back"
    assert run.stats["channels_last"] is True and run.stats["precision"] == "float32"
    # measured bit-identical on this machine's oneDNN; other ISAs may round differently
    assert without_scores(got) == without_scores(base)
    np.testing.assert_allclose(scores(got), scores(base), rtol=0, atol=1e-5)
    assert [r["label"] for r in got] == [r["label"] for r in base]


def test_autocast_scores_are_close_to_float32(corpus, model, base):
    run = scan([str(corpus)], model, aligned=True, batch_size=4, workers=0, autocast=True)
    got = list(run)
    assert run.stats["precision"] == "bfloat16" == precision_of("cpu", True)
    assert precision_of("cuda:0", True) == "float16" and precision_of("cuda", False) == "float32"
    assert [r["status"] for r in got] == [r["status"] for r in base]
    a, b = scores(got), scores(base)
    ok = ~np.isnan(b)
    assert np.isnan(a[~ok]).all()
    assert not np.array_equal(a[ok], b[ok]), "autocast changed nothing: did it run in bfloat16?"
    spread = float(np.ptp(b[ok]))
    assert np.abs(a[ok] - b[ok]).max() < 0.1 * spread + 0.05, (a, b)
    same = sum(r["label"] == s["label"] for r, s in zip(got, base) if s["label"] is not None)
    assert same >= 0.8 * ok.sum()


def test_compile_gives_the_default_records(corpus, model, base, capsys):
    """torch.compile (inductor) of backbone + taps: one compile before the first
    input, the eager scan's records (measured identical here; inductor's fused loops may round
    differently elsewhere, hence the tolerance), and ``stats["compiled"]``."""
    det = FakeSpotter.load(model)
    det.model_id_ = base[0]["model"]
    notices = []
    run = scan([str(corpus)], det, aligned=True, batch_size=4, workers=0, compile=True, log=notices.append)
    got = list(run)
    assert run.stats["compiled"] is True and run.stats["forwards"] == 3 and run.stats["precision"] == "float32"
    assert len(notices) == 1 and "compiling the backbone for batches of 4" in notices[0]
    assert run.stats["compile_s"] > 0
    assert without_scores(got) == without_scores(base)
    np.testing.assert_allclose(scores(got), scores(base), rtol=0, atol=1e-5)
    assert [r["label"] for r in got] == [r["label"] for r in base]
    # the detector itself is left as it was: an eager scan with it gives the eager records
    assert list(scan([str(corpus)], det, aligned=True, batch_size=4, workers=0)) == base


def test_a_failed_compile_is_one_clear_error_before_any_input(corpus, model, tmp_path, capsys, monkeypatch):
    import sys

    S = sys.modules["fakespotter.scan"]  # the package's ``scan`` attribute is the function

    def broken(module, **kw):
        assert kw == {}

        def fail(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return fail
    monkeypatch.setattr(torch, "compile", broken)
    read = []
    monkeypatch.setattr(S, "_decode_one", lambda *a: read.append(a) or pytest.fail("an input was read"))
    with pytest.raises(S.CompileError, match=r"torch.compile could not build the forward \(RuntimeError: "
                                              r"InvalidCxxCompiler: No working C\+\+ compiler found\); scan with "
                                              r"compile=False$"):
        list(scan([str(corpus)], model, aligned=True, batch_size=4, workers=0, compile=True))
    out = tmp_path / "o.jsonl"
    rc = main(cli(corpus, model, out, "--compile"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("fakespotter scan: error: torch.compile could not build")
    assert err[0].endswith("compiler found); leave out --compile.") and not read
    assert out.read_text() == "" and json.loads((tmp_path / "o.jsonl.stats.json").read_text())["compiled"] is True
    with pytest.raises(TypeError, match="scan: compile must be a bool"):
        scan([str(corpus)], model, compile=1)


def test_resume_refuses_a_change_of_compile(corpus, model, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert main(cli(corpus, model, out, "--limit", "3")) == 0
    assert json.loads((tmp_path / "o.jsonl.stats.json").read_text())["compiled"] is False
    before = out.read_text()
    rc = main(cli(corpus, model, out, "--resume", "--compile"))
    err = capsys.readouterr().err
    assert rc == 2 and "--compile False there, True now" in err, err
    assert out.read_text() == before
    stats = json.loads((tmp_path / "o.jsonl.stats.json").read_text())
    assert stats["compile_s"] == 0.0
    del stats["compiled"]  # an output of a scan from before --compile existed: eager
    (tmp_path / "o.jsonl.stats.json").write_text(json.dumps(stats))
    rc = main(cli(corpus, model, out, "--resume", "--compile"))
    assert rc == 2 and "--compile False there, True now" in capsys.readouterr().err


def test_resume_refuses_another_precision(corpus, model, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert main(cli(corpus, model, out, "--autocast", "--limit", "3")) == 0
    stats = json.loads((tmp_path / "o.jsonl.stats.json").read_text())
    assert stats["precision"] == "bfloat16" and stats["channels_last"] is False
    before = out.read_text()
    rc = main(cli(corpus, model, out, "--resume"))
    err = capsys.readouterr().err
    assert rc == 2 and "was scanned in bfloat16, this run would compute in float32" in err, err
    assert out.read_text() == before
    assert main(cli(corpus, model, out, "--resume", "--autocast", "--limit", "5")) == 0
    assert len(out.read_text().splitlines()) == 5
    # an output without a stats JSON was written in float32 (as every scan before --autocast)
    (tmp_path / "o.jsonl.stats.json").unlink()
    rc = main(cli(corpus, model, out, "--resume", "--autocast", "--limit", "6"))
    assert rc == 2 and "was scanned in float32, this run would compute in bfloat16" in capsys.readouterr().err


def test_stats_are_on_disk_before_the_first_record(corpus, model, tmp_path, monkeypatch):
    """--resume needs the precision of a scan that was killed: the stats JSON exists (complete:
    false) before any record is written."""
    from fakespotter.scan import RecordWriter

    out = tmp_path / "o.jsonl"
    seen = {}
    real_write = RecordWriter.write

    def write(self, records):
        if "stats" not in seen:
            seen["stats"] = json.loads((tmp_path / "o.jsonl.stats.json").read_text())
        return real_write(self, records)

    monkeypatch.setattr(RecordWriter, "write", write)
    synced = []  # ... and synced, as the records are: a power cut must not leave records without it
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    assert main(cli(corpus, model, out, "--limit", "2")) == 0
    assert seen["stats"]["complete"] is False and seen["stats"]["precision"] == "float32"
    assert seen["stats"]["images"] == 0 and seen["stats"]["batch_size"] == 4
    assert sum(".o.jsonl.stats.json." in os.path.basename(p) for p in synced) == 2, synced  # at the start and end


# ----------------------------------------------------------------------------------------------
# out of memory: halve the batch, retry the same chips


def raised_while_handling(first: BaseException, then: BaseException) -> BaseException:
    try:
        try:
            raise first
        except type(first):
            raise then
    except type(then) as e:
        return e


OOMS = {
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                "memory: you tried to allocate 8589934592 bytes."),
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "python": lambda: MemoryError(),
    "onednn": lambda: RuntimeError("could not create a primitive descriptor for a convolution forward propagation "
                                   "primitive"),  # (oneDNN near the memory cap)
    # near a memory cap, torch.fx's report of an error in the traced forward failed to import torch._dynamo
    "masked": lambda: raised_while_handling(OOMS["cpu"](), ImportError("cannot import name 'NP_SUPPORTED_MODULES' "
                                                                       "from 'torch._dynamo.utils'")),
}


def oom_above(monkeypatch, limit, after=0, kind="cpu"):
    """Tap.forward raises an out-of-memory error for batches larger than ``limit``, from its
    ``after``-th call on; returns the batch sizes it was called with."""
    calls = []
    real = Tap.forward

    def forward(self, x):
        calls.append(int(x.shape[0]))
        if x.shape[0] > limit and len(calls) > after:
            raise OOMS[kind]()
        return real(self, x)

    monkeypatch.setattr(Tap, "forward", forward)
    return calls


def test_out_of_memory_is_found_where_it_is_and_nowhere_else():
    for make in OOMS.values():
        assert _oom_in(make()) is not None
    masked = OOMS["masked"]()
    assert isinstance(_oom_in(masked), RuntimeError) and "can't allocate" in str(_oom_in(masked))  # (what is logged)
    assert _oom_in(RuntimeError("CUDA error: out of memory")) is not None
    assert _oom_in(RuntimeError("shape mismatch")) is None and _oom_in(ValueError("out of memory")) is None
    assert _oom_in(raised_while_handling(ValueError("x"), ImportError("y"))) is None
    said = ValueError("a bad chip")  # raised `from None` while handling an out-of-memory error: itself
    said.__context__, said.__suppress_context__ = MemoryError(), True
    assert _oom_in(said) is None
    loop = ImportError("y")  # `raise e from e`: a cycle of causes ends
    loop.__cause__ = loop
    assert _oom_in(loop) is None


@pytest.mark.parametrize("kind", ["cpu", "cuda", "masked", "onednn"])
def test_oom_from_the_start_gives_the_records_of_the_smaller_batch(corpus, model, direct2, monkeypatch, kind):
    calls = oom_above(monkeypatch, 2, kind=kind)
    notes = []
    run = scan([str(corpus)], model, aligned=True, batch_size=8, workers=0, log=notes.append)
    got = list(run)
    assert got == direct2  # every input once, in order, scores of a batch-2 scan
    assert calls[:3] == [8, 4, 2] and set(calls[3:]) == {2}
    st = run.stats
    assert st["batch_size"] == 2 and st["batch_size_requested"] == 8 and st["forwards"] == 6  # 12 chips
    (event,) = st["oom_backoffs"]
    said = str(OOMS["cpu" if kind == "masked" else kind]())  # (masked: the allocator's error, not the ImportError)
    assert event["from"] == 8 and event["to"] == 2 and event["forward"] == 0 and event["error"] == said
    assert len(notes) == 1 and "forward of 8 chips" in notes[0] and "batches of 2" in notes[0]


def test_the_python_api_gives_the_scanners_rows_bit_for_bit():
    """features() made its chips contiguous NCHW, the scanner hands the backbone channels_last
    chips: a convolution's sums round differently, and 3 bits of 8.7 million in real chips' rows
    (element, per-neuron thresholds) differed between the API and the scanner."""
    from fakespotter import samples
    from fakespotter.backbones import get_backbone
    from fakespotter.calibration import ThresholdCalibrator
    from fakespotter.features import features
    from fakespotter.scan import _Forward
    from tapnets import dlib_cached

    if not dlib_cached():
        pytest.skip("dlib weights not cached")
    from fakespotter.weights import WeightsError

    try:
        chips, _, _ = samples.sample_chips(12, 12, seed=0)
    except (WeightsError, OSError) as e:
        pytest.skip(f"sample data unavailable ({e})")
    tap = Tap(get_backbone(), granularity="element")
    tap.set_thresholds(ThresholdCalibrator(tap, mode="per_neuron").fit([chips[:10]]).thresholds_)
    from types import SimpleNamespace

    det = SimpleNamespace(tap_=tap, classifier_=SimpleNamespace(decision_function=lambda r: torch.zeros(len(r))))
    scanner, _ = _Forward(det, "cpu", 14).run(chips[10:])  # (the scanner's forward: rows, then the classifier)
    assert torch.equal(features(chips[10:], tap, batch_size=14).rows, scanner)


@pytest.mark.parametrize("kind", ["cpu", "masked"])
def test_a_failed_forwards_tensors_are_freed_before_the_retry(model, monkeypatch, kind):
    """The retry runs outside the except block so that the failed forward's tensors are freed; a
    name bound to the error (or one it was raised while handling) kept them, through its traceback."""
    import weakref

    from fakespotter.scan import _Forward

    fwd = _Forward(FakeSpotter.load(model), "cpu", 8)
    held, alive = [], []
    real = Tap.forward

    def forward(self, x):
        alive.append([r() is not None for r in held])
        if x.shape[0] > 2:
            t = torch.zeros(1 << 20)  # (the failed forward's activations)
            held.append(weakref.ref(t))
            raise OOMS[kind]()
        return real(self, x)

    monkeypatch.setattr(Tap, "forward", forward)
    fwd.score(list(np.zeros((5, 150, 150, 3), np.uint8)))
    assert len(held) == 2 and alive[1:] == [[False], [False, False], [False, False], [False, False]], alive


def test_a_back_off_shrinks_the_staging_buffer_too(model, monkeypatch):
    """The chips' staging buffer was kept at the requested size after a back-off: memory no forward
    would use again (6.75 GB for a requested 100,000)."""
    from fakespotter.scan import _Forward

    fwd = _Forward(FakeSpotter.load(model), "cpu", 8)
    assert fwd._buf_t.shape[0] == 8
    oom_above(monkeypatch, 2)
    chips = list(np.random.default_rng(0).integers(0, 256, (5, 150, 150, 3), dtype=np.uint8))
    got = fwd.score(chips)
    assert fwd.batch_size == 2 and fwd._buf_t.shape[0] == 2 and fwd._buf.shape[0] == 2 and len(got) == 5
    monkeypatch.undo()
    assert got == _Forward(FakeSpotter.load(model), "cpu", 2).score(chips)


def test_oom_in_the_middle_loses_and_doubles_nothing(corpus, model, base, direct2, monkeypatch):
    calls = oom_above(monkeypatch, 2, after=1)  # the first forward (4 chips) fits, the second not
    run = scan([str(corpus)], model, aligned=True, batch_size=4, workers=0, log=lambda m: None)
    got = list(run)
    assert [r["path"] for r in got] == [r["path"] for r in base]
    assert got[:4] == base[:4]  # scored at 4 before the back-off
    assert got[4:] == direct2[4:]  # the failed forward's chips and all later ones at 2
    assert calls == [4, 4, 2, 2, 2, 2]  # 12 chips: 4, then the failed 4 again as 2 + 2, then 2 + 2
    assert run.stats["batch_size"] == 2 and run.stats["oom_backoffs"][0]["forward"] == 1


def test_oom_at_batch_one_and_other_errors_propagate(corpus, model, monkeypatch):
    oom_above(monkeypatch, 0)
    with pytest.raises(MemoryError, match=r"^out of memory in a forward of a single chip, after halving the batch "
                                          r"size from 2 \(\[enforce fail .*can't allocate memory.*\); free memory or "
                                          r"raise this process's memory limit$") as e:
        list(scan([str(corpus)], model, aligned=True, batch_size=2, workers=0, log=lambda m: None))
    assert "can't allocate memory" in str(e.value.__cause__)
    with pytest.raises(MemoryError, match=r"^out of memory in a forward of a single chip \(\[enforce"):
        list(scan([str(corpus)], model, aligned=True, batch_size=1, workers=0, log=lambda m: None))
    real = Tap.forward

    def broken(self, x):
        raise RuntimeError("something else broke")

    monkeypatch.setattr(Tap, "forward", broken)
    with pytest.raises(RuntimeError, match="something else broke"):
        list(scan([str(corpus)], model, aligned=True, batch_size=2, workers=0))
    monkeypatch.setattr(Tap, "forward", real)


def test_cli_oom_at_batch_one_is_one_line(corpus, model, tmp_path, capsys, monkeypatch):
    """It was the allocator's RuntimeError with a traceback."""
    oom_above(monkeypatch, 0)
    assert main(cli(corpus, model, tmp_path / "o.jsonl")) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("fakespotter scan: error: out of memory in a forward of a single chip, "
                                               "after halving the batch size from 4 ([enforce fail")


def test_cli_oom_is_logged_recorded_and_kept_on_resume(corpus, model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.jsonl"
    args = [a for a in cli(corpus, model, out) if a != "--quiet"]
    calls = oom_above(monkeypatch, 2)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("out of memory") == 1 and "going on with batches of 2" in err
    stats = json.loads((tmp_path / "o.jsonl.stats.json").read_text())
    assert stats["batch_size"] == 2 and stats["batch_size_requested"] == 4 and len(stats["oom_backoffs"]) == 1
    whole = out.read_text()
    # an interrupted scan of that run resumes at the smaller size, without running out of memory again
    out.write_text("".join(whole.splitlines(keepends=True)[:5]))
    calls.clear()
    assert main(args + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert "resuming with that size" in err and "out of memory in a forward" not in err
    assert set(calls) == {2} and out.read_text() == whole


# ----------------------------------------------------------------------------------------------
# devices


def test_cuda_not_available_is_a_clear_error_before_any_work(corpus, model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"scan: device '{dev}': CUDA is not available"):
            scan([str(corpus)], model, device=dev)
        rc = main(cli(corpus, model, tmp_path / "o.jsonl", "--device", dev))
        err = capsys.readouterr().err
        assert rc == 2 and f"device '{dev}': CUDA is not available" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.stats.json").exists()
    with pytest.raises(ValueError, match="only cpu and cuda devices are supported"):
        scan([str(corpus)], model, device="meta")
    with pytest.raises(ValueError, match="scan: device 'gpu0' is not a device"):
        scan([str(corpus)], model, device="gpu0")
    rc = main(cli(corpus, model, tmp_path / "o.jsonl", "--device", "meta"))
    assert rc == 2 and "only cpu and cuda devices" in capsys.readouterr().err
    with pytest.raises(TypeError, match="scan: autocast must be a bool"):
        scan([str(corpus)], model, autocast="yes")


def _as_if_a_gpu(monkeypatch, capability=(9, 0), archs="80 90"):
    from fakespotter import _C

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # get past the availability check
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(_C, "build_info", lambda: {"cuda": True, "cuda_architectures": archs})


def test_cuda_kernels_must_be_built_and_built_for_the_gpu(corpus, model, monkeypatch):
    from fakespotter.scan import cuda_build_problem

    assert "built without CUDA; rebuild it where nvcc" in cuda_build_problem({"cuda": False}, (9, 0))
    cases = {"80 90": {(8, 0): True, (8, 6): True, (9, 0): True, (10, 0): True, (7, 5): False},  # code + PTX
             "80-real": {(8, 0): True, (8, 9): True, (9, 0): False, (7, 0): False},  # code only: same major
             "90-virtual": {(9, 0): True, (12, 0): True, (8, 9): False},  # PTX only
             "75;80": {(7, 5): True, (7, 0): False},
             "native": {(5, 0): True}}
    for archs, runs in cases.items():
        for capability, ok in runs.items():
            problem = cuda_build_problem({"cuda": True, "cuda_architectures": archs}, capability)
            assert (problem is None) == ok, (archs, capability, problem)
    problem = cuda_build_problem({"cuda": True, "cuda_architectures": "80 90"}, (7, 5))
    assert "compute capability 7.5, and fakespotter's CUDA kernels were built for 80 90" in problem
    assert problem.endswith("-C cmake.define.CMAKE_CUDA_ARCHITECTURES=75")
    _as_if_a_gpu(monkeypatch, capability=(7, 5))
    with pytest.raises(ValueError, match="scan: device 'cuda': this GPU has compute capability 7.5"):
        scan([str(corpus)], model, device="cuda")
    for device, message in (("cuda", "FakeSpotter: device 'cuda': this GPU has compute capability 7.5"),
                            ("mps", "FakeSpotter: device 'mps': only cpu and cuda devices are supported")):
        with pytest.raises(ValueError, match=message):  # before any work: not torch's own error in the forward
            FakeSpotter(device=device).fit(np.zeros((2, 150, 150, 3), np.uint8), np.zeros((2, 150, 150, 3), np.uint8))


def test_a_detector_on_another_device_is_refused(corpus, model, monkeypatch):
    det = FakeSpotter.load(model)
    _as_if_a_gpu(monkeypatch)
    with pytest.raises(ValueError, match=r"the detector's backbone is on cpu, but device is 'cuda'.*FakeSpotter.load"):
        scan([str(corpus)], det, device="cuda")


def test_help_states_the_new_options_and_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--channels-last run every conv in channels_last" in out and "(default: off; local engine)" in out
    assert "--autocast run the backbone under torch.autocast: bfloat16 on CPU, float16 on CUDA" in out
    assert "(default: off, float32;" in out
    assert "--compile run the backbone through torch.compile (compiled once at the start" in out
    assert "--part-rows PART_ROWS parquet: records per part file" in out and "(default: 10000, or a part per 60 s" in out
    assert "parquet when it ends with .parquet" in out and "halved when a forward runs out of memory" in out
