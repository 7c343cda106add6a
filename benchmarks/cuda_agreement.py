"""How far GPU scores are from CPU scores: the embedded default detector on N 150x150 face
chips (a folder of image files), CPU float32 as the reference, against (1) fakespotter's own
GPU path (``det.rows``: ``taps.exact_float32``, no TF32) and (2) the same tap called directly
under torch's default settings (cuDNN TF32 convolutions on).

Run (on a machine with a GPU): ``python benchmarks/cuda_agreement.py FOLDER [--n 512]``.
Prints, for each GPU path, the largest and median |logit difference|, the share of labels that
agree and the share of packed bits that agree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import description, hardware  # noqa: E402
from fakespotter import ops  # noqa: E402
from fakespotter.detector import FakeSpotter  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("folder", help="a folder of 150x150 face chips")
    p.add_argument("--n", type=int, default=512, help="chips to score (default: %(default)s)")
    a = p.parse_args()
    files = sorted(Path(a.folder).iterdir())[:a.n]
    chips = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    print(hardware())
    cpu = FakeSpotter.default()
    gpu = FakeSpotter.default(device="cuda")
    thr = cpu.operating_threshold_["logit"]
    ref_rows = cpu.rows(chips)
    ref = cpu.decision_function(ref_rows).numpy()
    ref_bits = ops.unpack_bits(ref_rows).numpy()

    def direct_tf32_on() -> torch.Tensor:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        tap = gpu.tap_
        x = torch.from_numpy(chips).cuda().permute(0, 3, 1, 2).float()
        with torch.no_grad():
            return torch.cat([tap(tap.preprocessing(x[i:i + 64])) for i in range(0, len(x), 64)]).cpu()

    print(f"{len(files)} chips; default detector; CPU float32 is the reference")
    print("| GPU path | max abs d logit | median abs d logit | labels agree | bits agree |")
    print("|---|---|---|---|---|")
    for name, rows in (("det.rows (exact float32)", gpu.rows(chips).cpu()),
                       ("tap called directly, cuDNN TF32 on (torch default)", direct_tf32_on())):
        s = gpu.decision_function(rows).numpy()
        d = np.abs(s - ref)
        labels = float(np.mean((s > thr) == (ref > thr)))
        bits = float(np.mean(ops.unpack_bits(rows).numpy() == ref_bits))
        print(f"| {name} | {d.max():.3g} | {np.median(d):.3g} | {100 * labels:.2f}% | {100 * bits:.4f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
