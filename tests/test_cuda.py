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
    for row in range(n):
        for thr in (means[row], torch.nextafter(means[row], torch.tensor(-float("inf")))):
            got = fakespotter.threshold_pack(x[row : row + 1].cuda(), thr.contiguous().cuda(), "channel")
            assert torch.equal(got.cpu(), ref.threshold_pack(x[row : row + 1], thr.contiguous(), "channel"))


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
