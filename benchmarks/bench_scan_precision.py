"""Does ``scan --channels-last`` / ``--autocast`` / ``--compile`` help on this machine? Backbone +
taps + classifier on the scanner's forward path, six settings timed in one process.

Config: ``--n`` real and ``--n`` fake aligned sample chips (``samples.sample_chips``, seed 1), a
detector (``FakeSpotter(hidden=(16, 16), max_epochs=20)``) trained once on other sample chips
(seed 0) and cached in ``--workdir``; batches of ``--batch`` chips (the last zero-padded, as
the scanner does); ``--threads`` torch threads. Contenders, timed round-robin (medians of
``--repeats``), each the scanner's own forward (``scan._Forward``):

    fp32            the default: float32; the chips are handed over channels_last already (they
                    are decoded HWC), the weights stay contiguous
    channels_last   the weights in channels_last memory format too, as ``scan --channels-last``
    autocast        torch.autocast (bfloat16 on CPU, float16 on CUDA) around backbone + taps
    both            channels_last and autocast
    compile         torch.compile (inductor) of backbone + taps, compiled before timing, as
                    ``scan --compile`` runs it
    compile+freeze  the same with inductor's ``freezing`` (weights as constants: on a CPU each
                    convolution fused with its affine, ReLU and residual add into one oneDNN call
                    on prepacked weights), which ``scan --compile`` leaves out. Set in inductor's
                    global config around the compile: ``torch.compile(m, options={"freezing":
                    True})`` freezes nothing (dynamo decides whether parameters are constants
                    while it traces, before the options reach inductor); the benchmark checks
                    that inductor's freezing passes ran.

Checked first against fp32: the packed rows (fraction of bits that differ) and the logits
(max |d logit|, labels that flip at the operating threshold).

Run: ``python benchmarks/bench_scan_precision.py [--n 64] [--batch 64] [--threads 2] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import description, hardware, interleaved_medians  # noqa: E402

# channels_last, autocast, compile, freeze; compile+freeze is built before compile, so that dynamo
# cannot hand it the unfrozen graph (with parameters as inputs, one graph serves every instance)
SETTINGS = {"fp32": (False, False, False, False), "channels_last": (True, False, False, False),
            "autocast": (False, True, False, False), "both": (True, True, False, False),
            "compile+freeze": (False, False, True, True), "compile": (False, False, True, False)}


def forward(model: Path, device: str, batch: int, channels_last: bool, autocast: bool, compile: bool,
            freeze: bool):
    """The scanner's forward for one setting, on its own copy of the model (channels_last changes
    the weights' memory format; a frozen graph holds its own)."""
    from torch._dynamo.utils import counters
    from torch._inductor import config

    from fakespotter.detector import FakeSpotter
    from fakespotter.scan import _Forward

    det = FakeSpotter.load(model, device=device)
    if not freeze:
        return _Forward(det, device, batch, channels_last=channels_last, autocast=autocast, compile=compile)
    counters.clear()
    with config.patch(freezing=True):  # the compile happens in _Forward, on a zero batch
        f = _Forward(det, device, batch, channels_last=channels_last, autocast=autocast, compile=compile)
    if not counters["inductor"]["binary_folding"]:
        raise AssertionError("inductor's freezing passes did not run (no binary folding)")
    return f


def build(workdir: Path, n: int):
    from fakespotter.detector import FakeSpotter
    from fakespotter.samples import sample_chips

    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "model.fsm"
    if not model.exists():
        chips, labels, _ = sample_chips(48, 48, seed=0)
        FakeSpotter(hidden=(16, 16), max_epochs=20).fit(chips[labels == 0], chips[labels == 1]).save(model)
    data = workdir / f"chips{n}.npz"
    if not data.exists():
        chips, labels, _ = sample_chips(n, n, seed=1)
        np.savez(data, chips=chips, labels=labels)
    return model, np.load(data)["chips"]


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--n", type=int, default=64, help="real and fake chips each (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="chips per forward (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="default: %(default)s")
    p.add_argument("--workdir", default=os.path.expanduser("~/.cache/fakespotter/bench_precision"),
                   help="cache for the model and chips (default: %(default)s)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from fakespotter._malloc import keep_freed_memory
    from fakespotter.detector import FakeSpotter

    malloc = "freed memory kept" if keep_freed_memory() else "left as it is"  # as the CLI runs

    model, chips = build(Path(a.workdir), a.n)
    det = FakeSpotter.load(model, device=a.device)
    thr = float(det.operating_threshold_["logit"])
    print(hardware())
    print(f"threads {a.threads}; batch {a.batch}; {len(chips)} aligned sample chips 150x150; "
          f"medians of {a.repeats} round-robin runs; device {a.device}; malloc {malloc}\n")

    fwd = {k: forward(model, a.device, a.batch, *s) for k, s in SETTINGS.items()}
    print("compile s: " + ", ".join(f"{k} {f.compile_s:.0f}" for k, f in fwd.items() if f.compiled))
    batches = [chips[i:i + a.batch] for i in range(0, len(chips), a.batch)]

    def rows_logits(f):
        rows, logits = [], []
        for b in batches:
            r, lg = f.run(b)
            rows.append(r)
            logits.append(lg)
        return torch.cat(rows), np.concatenate(logits)

    ref_rows, ref = rows_logits(fwd["fp32"])
    checks = {}
    for k, f in fwd.items():
        rows, lg = rows_logits(f)
        diff_bits = int((torch.bitwise_xor(rows, ref_rows).view(torch.uint8).numpy()[..., None]
                         >> np.arange(8, dtype=np.uint8) & 1).sum())
        total_bits = sum(s.features for s in det.tap_.layout.layers) * len(chips)
        flips = int(((lg > thr) != (ref > thr)).sum())
        checks[k] = (diff_bits / total_bits, float(np.abs(lg - ref).max()), flips)

    times = interleaved_medians({k: (lambda f=f: rows_logits(f)) for k, f in fwd.items()}, repeats=a.repeats)
    print("| setting | images/s | speed vs fp32 | bits differing from fp32 | max abs d logit | labels flipped |")
    print("|---|---|---|---|---|---|")
    for k in SETTINGS:
        bits, dl, flips = checks[k]
        print(f"| {k} | {len(chips) / times[k]:.1f} | {times['fp32'] / times[k]:.2f}x | {100 * bits:.3f}% | "
              f"{dl:.2e} | {flips} of {len(chips)} |")
    print(f"\nlogit spread (fp32): std {ref.std():.3f}, operating threshold {thr:.3f}; {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
