"""Taps: bare backbone vs backbone + tap vs a naive hook-and-numpy monitor (CPU or CUDA).

Configs: dlib face ResNet v1 (default layers: 29 post-ReLU outputs + descriptor), batch 64 of
150x150 chips, ``channel`` and ``element`` granularity, per-layer thresholds calibrated on the
batch. Every config is checked for correctness before it is timed (tap rows == the pure-torch
twin on hooked activations; the naive monitor agrees with the tap). All variants run in the
same process, timed in rotation; the numbers are medians of ``REPEATS`` runs after a warm-up, and
the ratios (overhead, b/c) medians of the ratios within a round, with their range for the overhead.

    (a) bare:  backbone(x)
    (b) tap:   Tap(backbone)(x)               packed rows, activations dropped as they are packed
    (c) naive: forward hooks keep every monitored float activation; afterwards numpy computes
               the neuron values, compares and np.packbits them (on CUDA the activations are
               copied to the host first, as a numpy monitor must)

On CUDA every timed call ends with a device synchronisation; ``--tf32 off`` turns cuDNN's
TF32 convolutions off (torch's default leaves them on), for float32-exact forwards.

``--compile`` also times (a) and (b) through ``torch.compile`` (inductor, as ``scan --compile``
runs them), in the same rotation, printed as a second table. The
naive monitor stays eager: its Python hooks and numpy are what a compiled graph leaves out
(hooks registered on a compiled module are not called). Compiled rows are checked against the
eager tap's: channel rows must be equal; element rows may differ in near-threshold bits (inductor's
fused loops round differently), and the fraction that differs is printed.

Run: ``python benchmarks/bench_taps.py [--threads 2] [--batch 64] [--repeats 5] [--device cuda] [--compile]
[--input channels_last]``
prints a table; ``./dev bench`` runs the pytest-benchmark versions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch

import fakespotter  # noqa: F401
from fakespotter import reference
from fakespotter._malloc import keep_freed_memory
from fakespotter.backbones import get_backbone
from fakespotter.calibration import ThresholdCalibrator
from fakespotter.taps import Tap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import description, hardware, interleaved_times, paired_ratio  # noqa: E402

BATCH = int(os.environ.get("FAKESPOTTER_BENCH_BATCH", 64))
THREADS = int(os.environ.get("FAKESPOTTER_BENCH_THREADS", 2))
REPEATS = 5


def bench_chips(n: int) -> torch.Tensor:
    """Real face chips (the sample photos, flipped and jittered) when available, else smooth noise."""
    g = torch.Generator().manual_seed(0)
    try:
        from fakespotter import weights as W
        from fakespotter.features import chips

        found = chips([str(W.sample_photo_path(p)) for p in ("obama.jpg", "obama2.jpg", "biden.jpg")])
        base = torch.from_numpy(found.array).permute(0, 3, 1, 2).float()
        base = torch.cat([base, base.flip(3)])
    except Exception:  # no dlib / photos: synthetic chips
        low = torch.rand((8, 3, 10, 10), generator=g) * 255
        base = torch.nn.functional.interpolate(low, size=(150, 150), mode="bilinear")
    x = base[torch.arange(n) % base.shape[0]]
    return (x + torch.randn(x.shape, generator=g) * 4).clamp(0, 255).contiguous()


class NaiveMonitor:
    """Keeps every monitored float activation from forward hooks; packs with numpy afterwards."""

    def __init__(self, module: torch.nn.Module, layers: List[str], thresholds: List[float],
                 granularity: str) -> None:
        self.module = module
        self.layers = layers
        self.thresholds = thresholds
        self.granularity = granularity
        self.acts: Dict[str, torch.Tensor] = {}

    def _hook(self, name: str) -> Callable[..., None]:
        def fn(_m, _i, out):
            self.acts[name] = out
        return fn

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        self.acts.clear()
        # hooks only while the naive monitor runs: the tap shares the backbone's modules
        mods = dict(self.module.named_modules())
        handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.layers]
        try:
            with torch.no_grad():
                self.module(x)
        finally:
            for h in handles:
                h.remove()
        parts = []
        for name, thr in zip(self.layers, self.thresholds):
            a = self.acts[name].cpu().numpy()
            n = a.shape[0]
            if self.granularity == "channel" and a.ndim > 2:
                v = a.reshape(n, a.shape[1], -1).mean(axis=2, dtype=np.float64).astype(np.float32)
            else:
                v = a.reshape(n, -1)
            bits = v > np.float32(thr)
            pad = (-bits.shape[1]) % 64
            bits = np.pad(bits, ((0, 0), (0, pad)))
            parts.append(np.packbits(bits, axis=1, bitorder="little"))
        self.acts.clear()
        return np.ascontiguousarray(np.concatenate(parts, axis=1)).view(np.int64)


def setup(granularity: str, batch: int, device: str = "cpu", channels_last: bool = False
          ) -> Tuple[torch.nn.Module, Tap, NaiveMonitor, torch.Tensor]:
    backbone = get_backbone()
    backbone.module.to(device)
    x = bench_chips(batch).to(device)
    if channels_last:  # as the scanner hands its decoded [N, H, W, 3] chips over: so run its activations
        x = x.contiguous(memory_format=torch.channels_last)
    tap = Tap(backbone, granularity=granularity)
    tap.set_thresholds(ThresholdCalibrator(tap).fit([x[:16]]).thresholds_)
    naive = NaiveMonitor(backbone.module, tap.layers, tap.thresholds.tolist(), granularity)
    return backbone.module, tap, naive, x


def check(module: torch.nn.Module, tap: Tap, naive: NaiveMonitor, x: torch.Tensor) -> float:
    """Gate: tap rows == twin on hooked activations; returns the naive monitor's bit agreement."""
    xs = x[:8]
    with torch.no_grad():
        rows = tap(xs)
    acts: Dict[str, torch.Tensor] = {}
    mods = dict(module.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o))
               for n in tap.layers]
    try:
        with torch.no_grad():
            module(xs)
    finally:
        for h in handles:
            h.remove()
    expected = torch.zeros_like(rows)  # on the rows' device: the twin runs where the tap ran
    for slot, thr in zip(tap.layout.layers, tap.layer_thresholds()):
        reference.threshold_pack_into(acts[slot.name], thr, tap.granularity, expected,
                                      slot.word_offset)
    if not torch.equal(rows, expected):
        raise AssertionError("tap rows differ from the reference twin")
    naive_rows = torch.from_numpy(naive(xs))
    a = reference.unpack_bits(rows.cpu(), 0, rows.shape[1] * 64)
    b = reference.unpack_bits(naive_rows, 0, rows.shape[1] * 64)
    agreement = (a == b).float().mean().item()
    if agreement < 0.999:
        raise AssertionError(f"naive monitor agrees on only {agreement:.5f} of the bits")
    return agreement


def run(threads: int = THREADS, batch: int = BATCH, repeats: int = REPEATS, device: str = "cpu",
        compile: bool = False, channels_last: bool = False) -> List[dict]:
    torch.set_num_threads(threads)
    results = []
    for granularity in ("channel", "element"):
        module, tap, naive, x = setup(granularity, batch, device, channels_last)
        agreement = check(module, tap, naive, x)
        fns = {"bare": lambda: module(x), "tap": lambda: tap(x), "naive": lambda: naive(x)}
        compiled: Dict[str, float] = {}
        if compile:
            bare_c, tap_c = torch.compile(module), torch.compile(tap)
            with torch.no_grad():
                bare_c(x)
                rows, rows_c = tap(x), tap_c(x)
            differ = torch.bitwise_xor(rows, rows_c).view(torch.uint8).cpu().numpy()
            compiled["bits_differing"] = float(np.unpackbits(differ).sum()) / tap.layout.total_features / batch
            if granularity == "channel" and compiled["bits_differing"]:
                raise AssertionError(f"compiled channel rows differ: {compiled['bits_differing']:.2e} of the bits")
            fns.update(bare_c=lambda: bare_c(x), tap_c=lambda: tap_c(x))
        with torch.no_grad():
            runs = interleaved_times(fns, repeats, sync=device == "cuda")
        t = {k: statistics.median(v) for k, v in runs.items()}
        t_bare, t_tap, t_naive = t["bare"], t["tap"], t["naive"]
        if compile:
            compiled.update(bare=batch / t["bare_c"], tap=batch / t["tap_c"],
                            overhead=[r - 1.0 for r in paired_ratio(runs, "tap_c", "bare_c")],
                            speedup_vs_naive=paired_ratio(runs, "naive", "tap_c")[0],
                            speedup_vs_eager=paired_ratio(runs, "tap", "tap_c")[0])
        act_bytes = sum(4 * int(np.prod(s.shape)) for s in tap.layout.layers)
        results.append(dict(
            granularity=granularity, batch=batch, threads=threads,
            bare=batch / t_bare, tap=batch / t_tap, naive=batch / t_naive,
            overhead=[r - 1.0 for r in paired_ratio(runs, "tap", "bare")],
            speedup_vs_naive=paired_ratio(runs, "naive", "tap")[0],
            row_bytes=tap.layout.bytes_per_row(), act_bytes=act_bytes, agreement=agreement, compiled=compiled,
        ))
    return results


def pct(overhead: List[float]) -> str:
    """``[median, lowest, highest]`` as ``"  2.6% [-1.0%, 5.1%]"`` (the overhead columns)."""
    mid, lo, hi = (100 * v for v in overhead)
    return f"{mid:>9.1f}%{f'[{lo:.1f}%, {hi:.1f}%]':>17}"


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads (default: %(default)s)")
    p.add_argument("--batch", type=int, default=BATCH, help="chips per forward (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=REPEATS,
                   help="timed round-robin rounds; medians are reported (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the backbone runs (default: cpu)")
    p.add_argument("--compile", action="store_true",
                   help="also time (a) and (b) through torch.compile (inductor) (default: eager only)")
    p.add_argument("--input", default="contiguous", choices=["contiguous", "channels_last"],
                   help="memory format of the input chips; channels_last is how the scanner hands them over, "
                        "and the activations follow it (default: contiguous)")
    p.add_argument("--tf32", default="default", choices=["default", "off"],
                   help="CUDA: leave cuDNN's TF32 convolutions at torch's default, or turn them off (default: default)")
    a = p.parse_args()
    if a.tf32 == "off":
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    where = f"device cuda, cuDNN conv fp32_precision {torch.backends.cudnn.conv.fp32_precision}; " if a.device == "cuda" else ""
    # as the CLI runs its forwards (fakespotter._malloc): without it each CPU forward faults its
    # activations in again, which adds time and noise to every contender
    malloc = "freed memory kept" if keep_freed_memory() else "left as it is"
    print(hardware())
    print(f"{where}threads {a.threads}; batch {a.batch} x 150x150 {a.input}; median of {a.repeats}; malloc {malloc}")
    print(f"{'granularity':<12}{'(a) bare':>12}{'(b) tap':>12}{'(c) naive':>12}"
          f"{'overhead':>10}{'(range)':>17}{'b/c':>7}{'row B/img':>11}{'f32 B/img':>11}{'ratio':>10}")
    results = run(a.threads, a.batch, a.repeats, a.device, a.compile, a.input == "channels_last")
    for r in results:
        print(f"{r['granularity']:<12}{r['bare']:>10.1f}/s{r['tap']:>10.1f}/s{r['naive']:>10.1f}/s"
              f"{pct(r['overhead'])}{r['speedup_vs_naive']:>6.2f}x{r['row_bytes']:>11}"
              f"{r['act_bytes']:>11}{r['act_bytes'] / r['row_bytes']:>9.2f}x")
    print("chips/s (medians); overhead = time(b)/time(a) - 1 and b/c = time(c)/time(b), medians over the rounds "
          "of the ratio within a round (range: lowest, highest); ratio = float32 activation bytes / packed row "
          "bytes (naive agrees with the tap on >= 99.9% of bits)")
    if a.compile:
        print("\ncompiled (torch.compile, inductor), in the same rotation; (c) is the eager naive monitor")
        print(f"{'granularity':<12}{'(a) bare':>12}{'(b) tap':>12}{'overhead':>10}{'(range)':>17}{'b/c':>7}{'b vs eager b':>14}"
              f"{'bits != eager':>15}")
        for r in results:
            c = r["compiled"]
            print(f"{r['granularity']:<12}{c['bare']:>10.1f}/s{c['tap']:>10.1f}/s{pct(c['overhead'])}"
                  f"{c['speedup_vs_naive']:>6.2f}x{c['speedup_vs_eager']:>13.2f}x{c['bits_differing']:>15.2e}")


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry points (./dev bench)


@pytest.fixture(scope="module", params=["channel", "element"])
def configured(request):
    from fakespotter.weights import WeightsError

    torch.set_num_threads(THREADS)
    try:
        module, tap, naive, x = setup(request.param, BATCH)
    except WeightsError as e:
        pytest.skip(str(e))
    check(module, tap, naive, x)
    return module, tap, naive, x


def test_bare_backbone(benchmark, configured):
    module, _, _, x = configured
    with torch.no_grad():
        benchmark(module, x)


def test_backbone_with_tap(benchmark, configured):
    _, tap, _, x = configured
    with torch.no_grad():
        benchmark(tap, x)


def test_naive_hook_numpy_monitor(benchmark, configured):
    _, _, naive, x = configured
    benchmark(naive, x)


if __name__ == "__main__":
    main()
