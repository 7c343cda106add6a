"""pytest-benchmark entry for the op benchmark (``./dev bench``); the table with ratios comes
from ``python benchmarks/bench_ops.py``."""

from __future__ import annotations

import pytest
import torch

import fakespotter
from fakespotter import reference as ref

SHAPES = [(64, 32, 72, 72), (64, 128, 18, 18), (64, 256, 9, 9), (256, 512, 14, 14)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", ["op", "sum", "copy", "twin"])
@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_threshold_pack(benchmark, shape, granularity, impl, threads):
    torch.set_num_threads(threads)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    thr = torch.tensor([0.1])
    assert torch.equal(fakespotter.threshold_pack(x, thr, granularity), ref.threshold_pack(x, thr, granularity))
    scratch = torch.empty_like(x)
    fn = {
        "op": lambda: torch.ops.fakespotter.threshold_pack(x, thr, granularity),
        "sum": lambda: x.sum(),
        "copy": lambda: scratch.copy_(x),
        "twin": lambda: ref.threshold_pack(x, thr, granularity),
    }[impl]
    rounds = 3 if impl == "twin" else 10
    benchmark.extra_info["GB_read"] = x.numel() * 4 / 1e9
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
