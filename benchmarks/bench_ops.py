"""threshold_pack on real CNN layer shapes, against same-process baselines.

Run as a script for the table that benchmarks/RESULTS.md quotes:

    .venv/bin/python benchmarks/bench_ops.py [--threads 1 2] [--repeats 7] [--device cpu|cuda]
        [--memory-format contiguous|channels_last]

or through pytest-benchmark (``./dev bench``). Every measured op is first checked against its
pure-torch twin. Reported: median time, GB/s of activation read, and ratios against
(1) the twin (reference.py), (2) numpy compare + packbits (element) or numpy mean + compare +
packbits (channel), (3) torch mean + compare + pack (channel; torch's own mean, not bit-exact),
and the bandwidth roofs of the same run: a plain copy into a preallocated tensor and a plain sum.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakespotter  # noqa: E402,F401  (registers the ops)
from fakespotter import reference as ref  # noqa: E402
from common import cuda_copy_roof, cuda_event_medians, hardware, interleaved_medians  # noqa: E402

SHAPES = [(64, 32, 72, 72), (64, 128, 18, 18), (64, 256, 9, 9), (256, 512, 14, 14)]
THRESHOLD = 0.1
# CUDA: every contender rotates among copies of the input totalling at least this many bytes, so
# that the GPU's L2 cache (50-60 MB on an H100/H200) cannot hold them between calls.
ROTATE_BYTES = 512 << 20


def numpy_baseline(x: torch.Tensor, granularity: str) -> np.ndarray:
    a = x.numpy()
    n = a.shape[0]
    if granularity == "channel":
        values = a.reshape(n, a.shape[1], -1).mean(axis=2, dtype=np.float64).astype(np.float32)
    else:
        values = a.reshape(n, -1)
    return np.packbits(values > np.float32(THRESHOLD), axis=1, bitorder="little")


def torch_mean_baseline(x: torch.Tensor) -> torch.Tensor:
    return ref.pack_bits(x.mean(dim=tuple(range(2, x.dim()))) > THRESHOLD)


def in_format(x: torch.Tensor, memory_format: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" and x.dim() == 4 else x


def time_cuda(shape, granularity: str, repeats: int, memory_format: str) -> dict:
    """Median seconds per call of each contender on the GPU (CUDA events, rotating inputs)."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(*shape, generator=g)
    k = max(2, -(-ROTATE_BYTES // (x0.numel() * 4)))
    xs = [in_format(x, memory_format) for x in [x0.cuda()] + [torch.randn(*shape, device="cuda") for _ in range(k - 1)]]
    scratch = [torch.empty_like(x) for x in xs]
    thr = torch.tensor([THRESHOLD], device="cuda")
    for x in (xs[0], xs[-1]):
        got = torch.ops.fakespotter.threshold_pack(x, thr, granularity)
        if not torch.equal(got, ref.threshold_pack(x, thr, granularity)):
            raise AssertionError("native op disagrees with its twin: refusing to time it")
    fast = {
        "op": lambda i: torch.ops.fakespotter.threshold_pack(xs[i % k], thr, granularity),
        "copy": lambda i: scratch[i % k].copy_(xs[i % k]),
        "sum": lambda i: xs[i % k].sum(),
    }
    if granularity == "channel":
        fast["torch_mean"] = lambda i: torch_mean_baseline(xs[i % k])
    inner = k * max(1, -(-20 // k))
    t = cuda_event_medians(fast, repeats, inner)
    t.update(cuda_event_medians({"twin": lambda i: ref.threshold_pack(xs[i % k], thr, granularity)},
                                max(3, repeats // 2), k))
    return t


def time_cpu(shape, granularity: str, repeats: int, memory_format: str):
    """The input and the median seconds of each contender on the CPU (wall clock, round-robin)."""
    x = in_format(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), memory_format)
    thr = torch.tensor([THRESHOLD])
    got = torch.ops.fakespotter.threshold_pack(x, thr, granularity)
    assert torch.equal(got, ref.threshold_pack(x, thr, granularity)), \
        "native op disagrees with its twin: refusing to time it"
    scratch = torch.empty_like(x)
    fast = {
        "op": lambda: torch.ops.fakespotter.threshold_pack(x, thr, granularity),
        "copy": lambda: scratch.copy_(x),
        "sum": lambda: x.sum(),
    }
    if granularity == "channel":
        fast["torch_mean"] = lambda: torch_mean_baseline(x)
    t = interleaved_medians(fast, repeats)
    slow = {"twin": lambda: ref.threshold_pack(x, thr, granularity),
            "numpy": lambda: numpy_baseline(x, granularity)}
    t.update(interleaved_medians(slow, max(3, repeats // 2)))
    return x, t


def run_case(shape, granularity: str, device: str, repeats: int, memory_format: str = "contiguous") -> dict:
    if device == "cuda":
        x = torch.empty(shape, device="meta")
        t = time_cuda(shape, granularity, repeats, memory_format)
    else:
        x, t = time_cpu(shape, granularity, repeats, memory_format)
    gb = x.numel() * x.element_size() / 1e9
    row = {
        "shape": "x".join(map(str, shape)),
        "layout": memory_format if len(shape) == 4 else "contiguous",
        "MB": x.numel() * 4 / 1e6,
        "granularity": granularity,
        "op_ms": t["op"] * 1e3,
        "op_GBps": gb / t["op"],
        "sum_GBps": gb / t["sum"],
        "copy_GBps": 2 * gb / t["copy"],  # a copy reads and writes
        "op_vs_sum": t["sum"] / t["op"],
        "x_twin": t["twin"] / t["op"],
    }
    if "numpy" in t:
        row["x_numpy"] = t["numpy"] / t["op"]
    if "torch_mean" in t:
        row["x_torch_mean"] = t["torch_mean"] / t["op"]
    return row


def format_table(rows) -> str:
    cols = ["shape", "layout", "MB", "granularity", "op_ms", "op_GBps", "sum_GBps", "copy_GBps", "op_vs_sum",
            "x_twin", "x_numpy", "x_torch_mean"]
    lines = ["| threads | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for threads, r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(f"| {threads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads to run with (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement; medians are reported (default: 7)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default: cpu)")
    parser.add_argument("--shapes", nargs="+", default=None, help="shapes as NxCxHxW (default: the four of the issue)")
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"],
                        help="memory format of 4-d inputs: channels_last as a channels_last network hands its "
                             "activations to a tap (default: contiguous)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    print(hardware())
    if args.device == "cuda":
        print(f"card copy bandwidth (2 GiB device-to-device, read + write): {cuda_copy_roof():.0f} GB/s")
    rows = []
    for threads in args.threads if args.device == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for shape in shapes:
            for granularity in ("element", "channel"):
                rows.append((threads, run_case(shape, granularity, args.device, args.repeats, args.memory_format)))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
