"""Shared benchmark helpers: hardware description, timing with medians, bandwidth roofs."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch


def description(doc: str) -> str:
    """A script's --help description: its docstring's first paragraph, on one line."""
    return " ".join(doc.split("\n\n")[0].split())


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
    if torch.cuda.is_available():
        gpu += f" (torch CUDA {torch.version.cuda}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs)"
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
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, repeats, warmup, sync).items()}


def paired_ratio(times: Dict[str, List[float]], num: str, den: str) -> Tuple[float, float, float]:
    """Median, lowest and highest over the rounds of ``times[num][i] / times[den][i]``
    (:func:`interleaved_times`): each ratio compares two runs made one after the other, so load
    that comes and goes between rounds cancels out of it, as it does not out of a ratio of
    medians."""
    r = [a / b for a, b in zip(times[num], times[den])]
    return statistics.median(r), min(r), max(r)


def interleaved_times(
    fns: Dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1, sync: bool = False
) -> Dict[str, List[float]]:
    """Wall times of each function: ``repeats`` rounds of one run of each, after ``warmup`` runs.
    Each round starts one function further along, so that no function always runs right after
    the same other one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if sync:
        torch.cuda.synchronize()
    times: Dict[str, list] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            if sync:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def cuda_event_medians(fns: Dict[str, Callable[[int], object]], repeats: int = 7, inner: int = 20) -> Dict[str, float]:
    """Median seconds per call of each ``fn(i)`` on the GPU, timed with CUDA events around
    ``inner`` back-to-back calls (i = 0 .. inner-1, so a function can rotate among several
    inputs and keep the L2 cache out of the numbers), round-robin over ``repeats`` rounds after
    one untimed round."""
    times: Dict[str, list] = {name: [] for name in fns}
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for rnd in range(repeats + 1):
        for name, fn in fns.items():
            start.record()
            for i in range(inner):
                fn(i)
            stop.record()
            stop.synchronize()
            if rnd:
                times[name].append(start.elapsed_time(stop) / 1e3 / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cuda_copy_roof(nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """The card's device-to-device copy bandwidth in GB/s (bytes read + bytes written) over a
    ``nbytes`` buffer: the roof that GPU numbers are quoted against."""
    src = torch.rand(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_event_medians({"copy": lambda i: dst.copy_(src)}, repeats=repeats, inner=5)["copy"]
    return 2 * nbytes / t / 1e9
