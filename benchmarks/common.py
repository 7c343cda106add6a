"""Shared benchmark helpers: hardware description, timing with medians, bandwidth roofs."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> str:
    import fakespotter
    from fakespotter import _C

    info = _C.build_info()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
        f"fakespotter {fakespotter.__version__} (CPU variant in use: {_C.cpu_isa()}, "
        f"CUDA built: {info['cuda']}), GPU: {gpu}"
    )


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 1, sync: bool = False) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs."""
    return interleaved_medians({"fn": fn}, repeats, warmup, sync)["fn"]


def interleaved_medians(
    fns: Dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1, sync: bool = False
) -> Dict[str, float]:
    """Median wall time of each function, measured round-robin (one run of each per round) so
    that load from other processes on a shared machine hits every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if sync:
        torch.cuda.synchronize()
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
