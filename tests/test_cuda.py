"""CUDA: the kernels compile for sm_80 and sm_90 wherever nvcc exists (no GPU needed), and where
a GPU and a CUDA build are present, CUDA results equal the CPU's bit for bit."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import torch

import fakespotter
from fakespotter import reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))
HAS_GPU = torch.cuda.is_available() and fakespotter._C.build_info()["cuda"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile(tmp_path, arch):
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        obj = tmp_path / f"{cu.stem}.sm{arch}.o"
        cmd = [NVCC, "-c", str(cu), "-o", str(obj), "-std=c++17", "--fmad=false", "-I", str(CSRC),
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Werror", "all-warnings"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert obj.stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_glue_compiles(tmp_path):
    # The torch glue, syntax-checked against this torch's headers. A CPU build of torch lacks one
    # generated header of c10/cuda; stand in for it (it only sets an export macro).
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_inc = pathlib.Path(torch.__file__).parent / "include"
    homes = [os.environ.get("CUDA_HOME"), pathlib.Path(NVCC).resolve().parents[1], "/usr/local/cuda"]
    incs = [pathlib.Path(h) / "include" for h in homes if h]
    cuda_inc = next((i for i in incs if (i / "cuda_runtime.h").exists()), None)
    if cuda_inc is None:
        pytest.skip(f"cuda_runtime.h not found under {incs}; set CUDA_HOME")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-I", str(CSRC), "-I", str(torch_inc), "-I", str(tmp_path / "stub"), "-I", str(cuda_inc),
           str(CSRC / "cuda" / "ops_cuda.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


cuda = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and a CUDA build of fakespotter")


def _layouts(x):
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
        yield "transposed", x.transpose(2, 3).contiguous().transpose(2, 3)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["channel", "element"])
@pytest.mark.parametrize("shape", [(64, 32, 72, 72), (64, 256, 9, 9), (33, 70, 13, 13), (17, 4099), (0, 5, 3, 3)], ids=str)
def test_cuda_equals_cpu(dtype, granularity, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * torch.rand(shape[1], *([1] * (len(shape) - 2)), generator=g) * 10).to(dtype)
    for name, xs in _layouts(x):
        for thr in (torch.tensor([0.05]), torch.randn(ref.num_features(shape, granularity), generator=g)):
            want = fakespotter.threshold_pack(xs, thr, granularity)
            got = fakespotter.threshold_pack(xs.cuda(), thr.cuda(), granularity)
            assert torch.equal(got.cpu(), want), (name, thr.numel())
            out = torch.full((shape[0], want.shape[1] + 2), -1, dtype=torch.int64, device="cuda")
            fakespotter.threshold_pack_into(xs.cuda(), thr.cuda(), out, 1, granularity)
            assert torch.equal(out[:, 1:-1].cpu(), want)
            assert (out[:, 0] == -1).all() and (out[:, -1] == -1).all()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_cuda_pack_into_one_row_of_any_stride(granularity):
    """A one-row out may have any row stride, smaller than its width too (a transposed column):
    the channels-innermost path zeroes the words before it ORs bits into them."""
    x = torch.randn(1, 40, 9, 9, generator=torch.Generator().manual_seed(3))
    for xs in (x, x.contiguous(memory_format=torch.channels_last)):
        want = fakespotter.threshold_pack(xs, torch.tensor([0.1]), granularity)
        out = torch.full((want.shape[1] + 2, 1), -1, dtype=torch.int64, device="cuda").T  # strides (1, 1)
        fakespotter.threshold_pack_into(xs.cuda(), torch.tensor([0.1], device="cuda"), out, 1, granularity)
        assert torch.equal(out[:, 1:-1].cpu(), want) and out[0, 0] == -1 and out[0, -1] == -1


@cuda
@pytest.mark.cuda
def test_cuda_channel_means_follow_the_lane_order():
    n, c, s = 4, 64, 200
    g = torch.Generator().manual_seed(5)
    x = torch.ones(n, c, s)
    for row in range(n):
        for ch in range(c):
            pos = torch.randperm(s, generator=g)[:2]
            k = int(torch.randint(30, 60, (1,), generator=g))
            x[row, ch, pos[0]], x[row, ch, pos[1]] = 2.0**k, -(2.0**k)
    means = ref._channel_means(x)
    innermost = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels innermost: their own kernel
    for row in range(n):
        for thr in (means[row], torch.nextafter(means[row], torch.tensor(-float("inf")))):
            want = ref.threshold_pack(x[row : row + 1], thr.contiguous(), "channel")
            for xs in (x, innermost):
                got = fakespotter.threshold_pack(xs[row : row + 1].cuda(), thr.contiguous().cuda(), "channel")
                assert torch.equal(got.cpu(), want), xs.stride()


@cuda
@pytest.mark.cuda
def test_cuda_popcount_unpack_and_errors():
    packed = torch.randint(-(2**63), 2**63 - 1, (9, 6), dtype=torch.int64)
    assert torch.equal(fakespotter.layer_popcount(packed.cuda(), 1, 4).cpu(), fakespotter.layer_popcount(packed, 1, 4))
    assert torch.equal(fakespotter.unpack_bits(packed.cuda(), 300, 1).cpu(), fakespotter.unpack_bits(packed, 300, 1))
    with pytest.raises(ValueError, match=r"thresholds must be on x's device \(cuda:0\), got cpu"):
        fakespotter.threshold_pack(torch.randn(2, 8, device="cuda"), torch.tensor([0.0]), "element")
    torch.library.opcheck(torch.ops.fakespotter.threshold_pack.default,
                          (torch.randn(3, 40, 7, 7, device="cuda"), torch.tensor([0.0], device="cuda"), "channel"))


@cuda
@pytest.mark.cuda
def test_cuda_uses_the_current_stream():
    x = torch.randn(64, 128, 18, 18, device="cuda")
    thr = torch.tensor([0.0], device="cuda")
    want = fakespotter.threshold_pack(x, thr, "channel")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = fakespotter.threshold_pack(x, thr, "channel")
    stream.synchronize()
    assert torch.equal(got, want)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("outputs", [1, 9, 64, 130, 300])
def test_cuda_bitset_linear_equals_cpu(outputs):
    from fakespotter import ops

    g = torch.Generator().manual_seed(outputs)
    w = torch.randn(outputs, 5000, generator=g)
    b = torch.randn(outputs, generator=g)
    q, scale = ops.quantize_linear(w)
    table = ops.bitset_table(q)
    packed = ref.pack_bits(torch.rand(257, 5000, generator=g) < 0.4)
    want = ops.bitset_linear(packed, table, scale, b)
    got = ops.bitset_linear(packed.cuda(), table.cuda(), scale.cuda(), b.cuda())
    assert torch.equal(got.cpu(), want)
    assert torch.equal(ops.bitset_table(q.cuda()).cpu(), table)


@cuda
@pytest.mark.cuda
def test_cuda_opcheck_every_op():
    from fakespotter import ops
    from test_opcheck import pack_samples

    OPS = torch.ops.fakespotter
    for x, thr, granularity in pack_samples():
        x, thr = x.cuda(), thr.cuda()
        torch.library.opcheck(OPS.threshold_pack.default, (x, thr, granularity))
        words = fakespotter.num_words(ref.num_features(x.shape, granularity))
        out = torch.zeros(x.shape[0], words + 3, dtype=torch.int64, device="cuda")
        torch.library.opcheck(OPS.threshold_pack_into.default, (x, thr, granularity, out, 2))
    packed = torch.randint(-(2**63), 2**63 - 1, (4, 5), dtype=torch.int64).cuda()
    torch.library.opcheck(OPS.layer_popcount.default, (packed, 1, 3))
    torch.library.opcheck(OPS.unpack_bits.default, (packed, 1, 130))
    q, scale = ops.quantize_linear(torch.randn(3, 320))
    torch.library.opcheck(OPS.bitset_linear.default,
                          (packed, ops.bitset_table(q).cuda(), scale.cuda(), torch.randn(3).cuda()))


# ----------------------------------------------------------------------------------------------
# taps, the detector and the scanner on the GPU

from test_taps import face_like_chips, reference_rows  # noqa: E402  (tests/ is on sys.path)


def _cuda_tap(net_or_backbone, granularity, x, mode, **kw):
    from fakespotter.calibration import ThresholdCalibrator
    from fakespotter.taps import Tap

    tap = Tap(net_or_backbone, granularity=granularity, **kw)
    tap.set_thresholds(ThresholdCalibrator(tap, mode=mode).fit([x]).thresholds_)
    assert tap.thresholds.is_cuda
    return tap


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("granularity", ["channel", "element"])
@pytest.mark.parametrize("mode", ["per_layer", "per_neuron"])
def test_cuda_tap_rows_equal_the_twin_on_hooked_activations(granularity, mode):
    from tapnets import SMALL_LAYERS, SMALL_SHAPE, small_chips, small_net

    net = small_net().cuda()
    x = small_chips(9).cuda()
    tap = _cuda_tap(net, granularity, x, mode, layers=SMALL_LAYERS, input_shape=SMALL_SHAPE)
    with torch.no_grad():
        rows = tap(x)
    assert rows.is_cuda
    assert torch.equal(rows, reference_rows(net, tap, x))
    bits = ref.unpack_bits(rows.cpu(), 0, rows.shape[1] * 64).float().mean().item()
    assert 0.05 < bits < 0.95


@cuda
@pytest.mark.cuda
def test_cuda_tap_execution_modes_identical(tmp_path):
    """eager, torch.compile (inductor: Triton kernels around the native op), torch.export
    (saved and reloaded) and TorchScript (saved and reloaded) give the same rows on the GPU."""
    from fakespotter.taps import export_tap, load_script_tap, script_tap
    from tapnets import SMALL_LAYERS, SMALL_SHAPE, small_chips, small_net

    net = small_net().cuda()
    x = small_chips(6).cuda()
    for granularity in ("channel", "element"):
        tap = _cuda_tap(net, granularity, x, "per_neuron", layers=SMALL_LAYERS, input_shape=SMALL_SHAPE)
        expected = reference_rows(net, tap, x)
        with torch.no_grad():
            rows = {"eager": tap(x), "inductor": torch.compile(tap, fullgraph=True)(x)}
            program = export_tap(tap)
            torch.export.save(program, tmp_path / "tap.pt2")
            rows["export_loaded"] = torch.export.load(tmp_path / "tap.pt2").module()(x)
            script_tap(tap).save(str(tmp_path / "tap.ts"))
            rows["script_loaded"] = load_script_tap(tmp_path / "tap.ts", map_location="cuda")(x)
        for mode, r in rows.items():
            assert r.is_cuda and torch.equal(r, expected), (granularity, mode)


def _dlib_or_skip():
    from tapnets import FETCH_HINT, dlib_cached

    if not dlib_cached():
        pytest.skip(FETCH_HINT)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_cuda_dlib_tap_equals_twin_and_mostly_the_cpu(granularity):
    """On the real backbone: the GPU rows are the twin of the GPU activations bit for bit, and
    agree with the CPU's rows (same thresholds) on nearly every bit: the convolutions round
    differently on the GPU, so only neurons within rounding of their threshold may differ."""
    _dlib_or_skip()
    from fakespotter.backbones import get_backbone
    from fakespotter.calibration import ThresholdCalibrator
    from fakespotter.taps import Tap

    x = face_like_chips(4)
    cpu_tap = Tap(get_backbone(), granularity=granularity)
    thresholds = ThresholdCalibrator(cpu_tap).fit([x]).thresholds_
    cpu_tap.set_thresholds(thresholds)
    gpu_backbone = get_backbone()
    gpu_backbone.module.cuda()
    tap = Tap(gpu_backbone, granularity=granularity, thresholds=thresholds)
    with torch.no_grad():
        want = cpu_tap(x)
        got = tap(x.cuda())
    assert got.is_cuda and torch.equal(got, reference_rows(gpu_backbone.module, tap, x.cuda()))
    a = ref.unpack_bits(want, 0, want.shape[1] * 64)
    b = ref.unpack_bits(got.cpu(), 0, want.shape[1] * 64)
    assert (a == b).float().mean().item() > 0.99


@cuda
@pytest.mark.cuda
def test_cuda_scan_matches_the_cpu_scan(tmp_path_factory):
    """The scanner on the GPU (pinned staging buffer, float32 and float16 autocast) gives the
    CPU scan's records, with scores that differ only by the GPU's rounding."""
    import numpy as np

    _dlib_or_skip()
    from fakespotter.detector import FakeSpotter
    from fakespotter.scan import scan
    from scan_helpers import model_file, write_good

    model = model_file(tmp_path_factory)
    corpus = tmp_path_factory.mktemp("cuda_corpus")
    write_good(corpus, 21, seed=7)
    (corpus / "broken.png").write_bytes(b"\x89PNG not really")
    cpu = list(scan([str(corpus)], model, aligned=True, batch_size=8, workers=0))
    run = scan([str(corpus)], model, aligned=True, batch_size=8, workers=0, device="cuda")
    gpu = list(run)
    assert run.stats["precision"] == "float32"
    assert [(r["path"], r["status"]) for r in gpu] == [(r["path"], r["status"]) for r in cpu]
    ok = [i for i, r in enumerate(cpu) if r["status"] == "ok"]
    assert len(ok) == 21
    a = np.array([gpu[i]["score"] for i in ok])
    b = np.array([cpu[i]["score"] for i in ok])
    assert np.ptp(b) > 0
    assert np.abs(a - b).max() <= 0.02 * np.ptp(b) + 1e-4, (a, b)
    det = FakeSpotter.load(model, device="cuda")
    det.aligned = True  # the files are chips: resize only, as the scan's --aligned
    direct = det.decision_function([gpu[i]["path"] for i in ok]).numpy()
    assert np.abs(direct - a).max() <= 0.02 * np.ptp(b) + 1e-4, (direct, a)
    half = list(scan([str(corpus)], model, aligned=True, batch_size=8, workers=0, device="cuda", autocast=True))
    h = np.array([half[i]["score"] for i in ok])
    assert not np.array_equal(h, a), "autocast changed nothing: did it run in float16?"
    assert np.abs(h - b).max() < 0.1 * np.ptp(b) + 0.05, (h, b)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_trace_check_accepts_sound_modules_and_refuses_an_aliased_one(dtype, monkeypatch):
    """Building a tap compares the traced forward with the module's own, within a tolerance (a
    GPU's reductions need not repeat bit for bit). On the GPU, with cuDNN's autotuner choosing
    algorithms and TF32 allowed by the caller, untrained ResNets (float32 and float16) are
    accepted and their rows are the twin's; the in-place alias of test_byob is still refused."""
    from fakespotter.backbones.resnet import resnet, resnet_default_layers
    from fakespotter.taps import Tap
    from test_byob import Aliased

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn.conv, "fp32_precision", "tf32")
    for arch in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        net = resnet(arch).eval().to("cuda", dtype)
        layers = list(resnet_default_layers(arch))
        x = torch.randn(3, 3, 96, 96, device="cuda", dtype=dtype)
        for granularity in ("channel", "element"):
            tap = Tap(net, layers, input_shape=(3, 96, 96), granularity=granularity)
            with torch.no_grad():
                rows = tap(x)
            assert rows.is_cuda and torch.equal(rows, reference_rows(net, tap, x)), (arch, granularity)
    with pytest.raises(ValueError, match=r"does not reproduce its layers \['fc'\]"):
        Tap(Aliased().eval().to("cuda", dtype), ["fc"], input_shape=(3, 8, 8), granularity="element")
