"""Scoring packed rows: bitset_linear (compact) vs unpack + float matmul, same process.

    .venv/bin/python benchmarks/bench_classifier.py [--threads 1 2] [--batch 64]

Row widths are those of the default backbone (dlib ResNet, every post-ReLU output plus the
descriptor) in channel and element granularity; first-layer widths are those of the classifiers
(the default shallow network: 16; logistic regression: 1; and a wider 64 for comparison). Rows
are random with half of the bits set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakespotter  # noqa: E402
from fakespotter import ops  # noqa: E402
from common import hardware, interleaved_medians  # noqa: E402


def default_row_features(granularity: str) -> int:
    from fakespotter.backbones.dlib_resnet import DEFAULT_LAYERS, DlibFaceResNet

    model = DlibFaceResNet().eval()
    shapes = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: shapes.__setitem__(name, o.shape))
             for name, m in model.named_modules() if name in DEFAULT_LAYERS]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 150, 150))
    finally:
        for h in hooks:
            h.remove()
    words = 0
    for name in DEFAULT_LAYERS:
        s = shapes[name]
        n = s[1] if granularity == "channel" else int(torch.tensor(s[1:]).prod())
        words += fakespotter.num_words(n)
    return words * 64


def run(batch: int, bits: int, outputs: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(bits, outputs)
    packed = torch.randint(-(2**63), 2**63 - 1, (batch, bits // 64), dtype=torch.int64, generator=g)
    q, scale = ops.quantize_linear(linear.weight)
    table = ops.bitset_table(q)
    bias = linear.bias.detach()
    weight = linear.weight.detach()
    compact = ops.bitset_linear(packed, table, scale, bias)
    float_path = torch.nn.functional.linear(fakespotter.unpack_bits(packed).float(), weight, bias)
    err = ((compact - float_path).abs() / weight.abs().sum(dim=1)).max().item()
    assert err < 1e-5, f"compact and float scores differ by {err} (relative to sum |w|)"
    t = interleaved_medians(
        {
            "compact": lambda: ops.bitset_linear(packed, table, scale, bias),
            "unpack_matmul": lambda: torch.nn.functional.linear(fakespotter.unpack_bits(packed).float(), weight, bias),
        },
        repeats,
        warmup=3,
    )
    return {
        "bits": bits,
        "outputs": outputs,
        "compact_rows_per_s": batch / t["compact"],
        "float_rows_per_s": batch / t["unpack_matmul"],
        "speedup": t["unpack_matmul"] / t["compact"],
        "max_rel_err": err,
        "table_MB": table.numel() * 4 / 1e6,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads (default: 1 2)")
    parser.add_argument("--batch", type=int, default=64, help="rows per call (default: 64)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs; medians reported (default: 9)")
    args = parser.parse_args(argv)
    print(hardware())
    configs = [("channel", 16), ("channel", 1), ("channel", 64), ("element", 16), ("element", 1)]
    widths = {g: default_row_features(g) for g in ("channel", "element")}
    print("| threads | granularity | row bits | outputs | compact rows/s | unpack+matmul rows/s | speedup | max err / sum|w| | table MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for granularity, outputs in configs:
            r = run(args.batch, widths[granularity], outputs, args.repeats)
            print(f"| {threads} | {granularity} | {r['bits']} | {outputs} | {r['compact_rows_per_s']:.0f} | "
                  f"{r['float_rows_per_s']:.0f} | {r['speedup']:.1f}x | {r['max_rel_err']:.1e} | {r['table_MB']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
