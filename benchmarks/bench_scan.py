"""Corpus scanning: `fakespotter scan --aligned` end to end against its baselines (CPU or CUDA).

Config: N pre-aligned 150x150 face chips stored as JPEG files (quality 90), made from
``samples.sample_chips`` (real headshots and DCGAN faces, mixed; flipped and shifted by a few
pixels to reach N), a small detector (``FakeSpotter(hidden=(16, 16), max_epochs=20)``) trained
once on other sample chips; batch 64; ``--threads`` torch threads. Corpus and model are built
once and cached in ``--workdir``. All contenders run in this process, timed in rotation
(round-robin, medians of ``--repeats``), each checked first:

    (a) bare:   the dlib backbone's forward on the same N chips, already decoded into float
                tensors, batch 64, ``torch.inference_mode`` (no taps, no classifier, no I/O)
    (b) scan:   ``fakespotter.scan.scan(folder, det, aligned=True)`` with the default decode
                workers, records written to a JSONL file by ``RecordWriter`` (flushed and
                fsynced per batch): listing, reading, sha256, decoding, forward + tap,
                classifier, writing. Checked: its scores == ``det.decision_function`` on the
                same chips (one batch of 64), and one record per file
    (c) naive:  a Python loop decoding each file with PIL, the backbone with forward hooks
                keeping every monitored float activation, numpy channel means + thresholds per
                layer into a float bit vector, the classifier's float network on it; batch 64.
                Checked: its bits agree with the tap's on >= 99% of bits
    (d) resnet: CNNDetection's detector architecture (torchvision ResNet-50, one logit, random
                weights) at 224x224 with (c)'s loader (PIL decode, PIL resize to 224, ImageNet
                normalisation), batch 64, on the first ``--n-resnet`` files
    (e) memory: ``fakespotter scan --aligned`` (the CLI, in a fresh subprocess per run) on N
                files and on ``--big`` files (the N files hard-linked into subfolders): images/s
                and the peak RSS (VmHWM) of the scanning process (decode workers not
                included)

With ``--device cuda`` every contender runs its network on the GPU ((c) copies the activations
to the host for numpy); decoding stays on the CPU.

Run: ``python benchmarks/bench_scan.py [--n 1000] [--big 10000] [--threads 2] [--repeats 3] [--device cpu]``
prints the hardware, a Markdown table of images/s and ratios, the targets of issue E and
(b)'s time split from its stats.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import description, hardware, interleaved_medians  # noqa: E402

BATCH = 64
JPEG_QUALITY = 90
TRAIN = (48, 48)       # sample chips the detector is trained on (seed 0)
CORPUS_BASE = (32, 32)  # other sample chips the corpus is made of (seed 1)


# ----------------------------------------------------------------------------------------------
# corpus and model (built once, cached in the work folder)


def _variants(base: np.ndarray, n: int) -> np.ndarray:
    """n chips from ``base`` [B, H, W, 3]: chip i % B, flipped on odd rounds, rolled by a few
    pixels per round so that files differ (distinct content hashes)."""
    out = np.empty((n, *base.shape[1:]), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, len(base))
        c = base[k]
        if r % 2:
            c = c[:, ::-1]
        if r:
            c = np.roll(c, (r // 2 % 5, r // 10 % 5), axis=(0, 1))
        out[i] = c
    return out


def build(workdir: Path, n: int, big: int) -> Dict[str, Any]:
    """Corpus folder of n JPEG chips, the big corpus (hard links), and the model file."""
    from fakespotter.detector import FakeSpotter
    from fakespotter.samples import sample_chips

    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "model.fsm"
    if not model.exists():
        t0 = time.perf_counter()
        chips, labels, _ = sample_chips(*TRAIN, seed=0)
        det = FakeSpotter(hidden=(16, 16), max_epochs=20)
        det.fit(chips[labels == 0], chips[labels == 1])
        det.save(model)
        print(f"# trained the detector on {len(chips)} chips in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    corpus = workdir / f"corpus{n}"
    if not corpus.exists():
        base_file = workdir / "corpus_base.npz"
        if not base_file.exists():
            chips, labels, _ = sample_chips(*CORPUS_BASE, seed=1)
            np.savez(base_file, chips=chips, labels=labels)
        base = np.load(base_file)["chips"]
        # interleave real and fake so that every batch holds both
        order = np.stack([np.arange(CORPUS_BASE[0]), CORPUS_BASE[0] + np.arange(CORPUS_BASE[1])], 1).reshape(-1)
        tmp = Path(tempfile.mkdtemp(dir=workdir))
        for i, c in enumerate(_variants(base[order], n)):
            Image.fromarray(c).save(tmp / f"chip{i:06d}.jpg", quality=JPEG_QUALITY)
        tmp.rename(corpus)
    big_dir = workdir / f"corpus{n}x{-(-big // n)}"
    if big and not big_dir.exists():
        tmp = Path(tempfile.mkdtemp(dir=workdir))
        files = sorted(corpus.iterdir())
        for k in range(-(-big // n)):
            sub = tmp / f"part{k:02d}"
            sub.mkdir()
            for f in files:
                os.link(f, sub / f.name)
        tmp.rename(big_dir)
    return {"model": model, "corpus": corpus, "big": big_dir if big else None}


# ----------------------------------------------------------------------------------------------
# the contenders


def decode_pil(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def bare_forward(det, x: torch.Tensor, device: str) -> Callable[[], None]:
    """(a): backbone forward on preprocessed float chips [N, 3, 150, 150] already on the device,
    batch 64."""
    module = det.tap_.backbone.module
    pre = det.tap_.preprocessing
    with torch.inference_mode():
        xs = [pre(x[i:i + BATCH].to(device)).contiguous() for i in range(0, len(x), BATCH)]

    def run() -> None:
        with torch.inference_mode():
            for b in xs:
                module(b)
        if device != "cpu":
            torch.cuda.synchronize()
    return run


def scan_files(det, corpus: Path, out_dir: Path, last: Dict[str, Any], device: str) -> Callable[[], None]:
    """(b): the library scan of a folder, records written as JSONL (as the CLI does)."""
    from fakespotter.scan import RecordWriter, scan

    def run() -> None:
        out = out_dir / "scan.jsonl"
        if out.exists():
            out.unlink()
        r = scan([str(corpus)], det, aligned=True, batch_size=BATCH, device=device)
        w = RecordWriter(out, "jsonl", "new")
        try:
            for group in r.batches():
                w.write(group)
        finally:
            r.close()
            w.close()
        last["stats"] = dict(r.stats)
        last["out"] = out
    return run


class NaiveScanner:
    """(c): PIL loop, forward hooks keeping float activations, numpy thresholds, float classifier."""

    def __init__(self, det) -> None:
        tap = det.tap_
        if tap.granularity != "channel":
            raise ValueError("NaiveScanner: channel granularity only")
        self.module = tap.backbone.module
        self.device = tap.thresholds.device
        self.pre = tap.preprocessing
        self.layers = list(tap.layers)
        self.thresholds = [t.cpu().numpy().astype(np.float32) for t in tap.layer_thresholds()]
        self.offsets = [s.word_offset * 64 for s in tap.layout.layers]
        self.width = tap.layout.total_words * 64
        self.net = det.classifier_.network_
        self.acts: Dict[str, torch.Tensor] = {}

    def bits(self, chips: np.ndarray) -> np.ndarray:
        """float32 [n, total_words * 64] bit vector (0/1) of uint8 chips [n, H, W, 3]."""
        x = self.pre(torch.from_numpy(chips).to(self.device).permute(0, 3, 1, 2).float())
        mods = dict(self.module.named_modules())
        handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: self.acts.__setitem__(n, o))
                   for n in self.layers]
        try:
            with torch.no_grad():
                self.module(x)
        finally:
            for h in handles:
                h.remove()
        v = np.zeros((len(chips), self.width), dtype=np.float32)
        for name, thr, off in zip(self.layers, self.thresholds, self.offsets):
            a = self.acts[name].cpu().numpy()
            m = a.reshape(a.shape[0], a.shape[1], -1).mean(axis=2) if a.ndim > 2 else a
            v[:, off:off + m.shape[1]] = m > thr
        self.acts.clear()
        return v

    def scores(self, chips: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.net(torch.from_numpy(self.bits(chips))).squeeze(1).numpy()

    def run_files(self, files: Sequence[Path]) -> List[Tuple[str, float]]:
        out: List[Tuple[str, float]] = []
        for i in range(0, len(files), BATCH):
            part = files[i:i + BATCH]
            chips = np.stack([decode_pil(f) for f in part])
            out += [(str(f), float(s)) for f, s in zip(part, self.scores(chips))]
        return out


class ResNetDetector:
    """(d): CNNDetection's detector (ResNet-50, one logit) at 224x224 with (c)'s loader."""

    MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

    def __init__(self, device: str, size: int = 224) -> None:
        from fakespotter.backbones.resnet import resnet

        torch.manual_seed(0)
        self.net = resnet("resnet50", num_classes=1).eval().to(device)
        self.device = device
        self.size = size

    def load(self, path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
            return (np.asarray(im, dtype=np.float32) / 255.0 - self.MEAN) / self.STD

    def run_files(self, files: Sequence[Path]) -> List[Tuple[str, float]]:
        out: List[Tuple[str, float]] = []
        for i in range(0, len(files), BATCH):
            part = files[i:i + BATCH]
            x = torch.from_numpy(np.stack([self.load(f) for f in part])).permute(0, 3, 1, 2).to(self.device)
            with torch.inference_mode():
                s = torch.sigmoid(self.net(x)).squeeze(1).tolist()
            out += [(str(f), v) for f, v in zip(part, s)]
        return out


# ----------------------------------------------------------------------------------------------
# checks before timing


def check(det, corpus: Path, files: List[Path], naive: NaiveScanner, resnet: ResNetDetector,
          scan_fn: Callable[[], None], last: Dict[str, Any]) -> Dict[str, float]:
    """Gate: (b)'s scores == det.decision_function on the same chips, one record per file;
    (c) agrees with the tap on >= 99% of bits; (d) gives finite scores. Also warms every path up."""
    from fakespotter import ops

    scan_fn()
    recs = [json.loads(line) for line in Path(last["out"]).read_text().splitlines()]
    if len(recs) != len(files) or any(r["status"] != "ok" for r in recs):
        raise AssertionError(f"scan: {len(recs)} records for {len(files)} files, statuses "
                             f"{sorted({r['status'] for r in recs})}")
    by_path = {r["path"]: r for r in recs}
    first = files[:BATCH]
    chips = np.stack([decode_pil(f) for f in first])
    expected = det.decision_function(chips).numpy()
    got = np.array([by_path[str(f)]["score"] for f in first])
    # CPU: the same numbers. CUDA: both in exact float32 (equal on an H200), but cuDNN may pick
    # other algorithms for the scan's fixed batch than for decision_function's: a small tolerance.
    tol = 1e-5 if det.tap_.thresholds.device.type == "cpu" else 0.02 * (1 + float(np.ptp(expected)))
    score_vs_direct = float(np.abs(got - expected).max())
    if score_vs_direct > tol:
        raise AssertionError(f"scan scores differ from decision_function: max |d| {score_vs_direct:.3g}")
    for r, f in zip(recs[:8], first[:8]):
        if r["sha256"] != hashlib.sha256(f.read_bytes()).hexdigest():
            raise AssertionError(f"scan: wrong sha256 for {f}")
    rows = det.rows(chips).cpu()
    tap_bits = ops.unpack_bits(rows).float().numpy()
    naive_bits = naive.bits(chips)
    agreement = float((tap_bits == naive_bits).mean())
    monitored = np.zeros(naive.width, dtype=bool)
    for s in det.tap_.layout.layers:
        monitored[s.word_offset * 64:s.word_offset * 64 + s.features] = True
    agreement_monitored = float((tap_bits[:, monitored] == naive_bits[:, monitored]).mean())
    if agreement_monitored < 0.99:
        raise AssertionError(f"naive bits agree with the tap on only {agreement_monitored:.4f} of the bits")
    naive_scores = naive.scores(chips)
    score_diff = float(np.abs(naive_scores - expected).max())
    rs = resnet.run_files(files[:8])
    if not all(np.isfinite(s) for _, s in rs):
        raise AssertionError("resnet: non-finite scores")
    return {"bit_agreement": agreement_monitored, "bit_agreement_all": agreement,
            "naive_score_maxdiff": score_diff, "score_vs_direct": score_vs_direct}


# ----------------------------------------------------------------------------------------------
# (e): a fresh process per scan, peak RSS


_CHILD = r"""
import json, sys, time
from fakespotter.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
hwm = 0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
print(json.dumps({"rc": rc, "wall_s": wall, "vmhwm_kb": hwm}))
"""


def scan_subprocess(model: Path, corpus: Path, out_dir: Path, threads: int, device: str) -> Dict[str, Any]:
    out = out_dir / f"sub_{corpus.name}.jsonl"
    for p in (out, Path(str(out) + ".stats.json")):
        if p.exists():
            p.unlink()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", _CHILD, "scan", str(corpus), "--model", str(model), "--aligned",
                           "--device", device, "--out", str(out), "--quiet"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"scan subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    stats = json.loads(Path(str(out) + ".stats.json").read_text())
    with open(out) as f:
        n = sum(1 for _ in f)
    if n != stats["images"] or stats["counts"]["ok"] != n:
        raise AssertionError(f"scan subprocess: {n} records, stats {stats['counts']}")
    res.update(images=n, images_per_s=stats["images_per_s"], scan_wall_s=stats["wall_s"])
    return res


# ----------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--n", type=int, default=1000, help="JPEG chips in the corpus (default: %(default)s)")
    p.add_argument("--big", type=int, default=10000,
                   help="files in the big corpus for (e), rounded up to a multiple of --n; 0: skip (e) "
                        "(default: %(default)s)")
    p.add_argument("--n-resnet", type=int, default=128,
                   help="files (d) scans (ResNet-50 is slow on CPU; default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="where the networks run: cpu, cuda (default: %(default)s)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fakespotter-bench-scan"),
                   help="where the corpus and model are cached (default: %(default)s)")
    a = p.parse_args()
    if a.n < BATCH or a.repeats < 1 or a.threads < 1 or a.n_resnet < 1 or a.big < 0:
        p.error("need --n >= 64, --repeats >= 1, --threads >= 1, --n-resnet >= 1, --big >= 0")
    torch.set_num_threads(a.threads)

    from fakespotter.detector import FakeSpotter
    from fakespotter.scan import default_workers

    paths = build(Path(a.workdir), a.n, a.big)
    det = FakeSpotter.load(paths["model"], device=a.device)
    files = sorted(paths["corpus"].iterdir())
    out_dir = Path(tempfile.mkdtemp(prefix="bench_scan_"))
    try:
        x = torch.from_numpy(np.stack([decode_pil(f) for f in files])).permute(0, 3, 1, 2).float()
        naive = NaiveScanner(det)
        resnet = ResNetDetector(a.device)
        last: Dict[str, Any] = {}
        fns = {
            "a": bare_forward(det, x, a.device),
            "b": scan_files(det, paths["corpus"], out_dir, last, a.device),
            "c": lambda: naive.run_files(files),
            "d": lambda: resnet.run_files(files[:a.n_resnet]),
        }
        checks = check(det, paths["corpus"], files, naive, resnet, fns["b"], last)
        stats_runs: List[Dict[str, Any]] = []

        scan_once = fns["b"]

        def b_and_keep() -> None:
            scan_once()
            stats_runs.append(last["stats"])
        fns["b"] = b_and_keep
        t = interleaved_medians(fns, repeats=a.repeats, warmup=0)
        ips = {k: (a.n_resnet if k == "d" else a.n) / v for k, v in t.items()}
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise

    print(hardware())
    print(f"\ndevice {a.device}; threads {a.threads}; decode workers {default_workers()} (default); batch {BATCH}; "
          f"{a.n} JPEG chips 150x150 (q{JPEG_QUALITY}); (d) on {a.n_resnet} of them; medians of "
          f"{a.repeats} round-robin runs\n")
    print(f"checks: scan scores == decision_function (64 chips, max |d| {checks['score_vs_direct']:.2g}); naive bits agree with "
          f"the tap on {100 * checks['bit_agreement']:.3f}% of monitored bits; naive float classifier "
          f"vs scan max |d logit| {checks['naive_score_maxdiff']:.2g}\n")
    print("| contender | images/s | (b) / it |")
    print("|---|---|---|")
    names = {"a": "(a) bare backbone forward, decoded float tensors", "b": "(b) scan --aligned from JPEG files",
             "c": "(c) naive FakeSpotter scan (PIL, float hooks, numpy, float classifier)",
             "d": "(d) ResNet-50 224x224 detector, same loader as (c)"}
    for k in "abcd":
        print(f"| {names[k]} | {ips[k]:.1f} | {ips['b'] / ips[k]:.2f}x |")
    keys = ("wall_s", "wait_s", "decode_faces_s", "backbone_taps_s", "classifier_s")
    split = {k: float(np.median([st[k] for st in stats_runs])) for k in keys}
    print("\n(b) time split, medians (s): " + ", ".join(f"{k} {v:.2f}" for k, v in split.items())
          + f"; workers {stats_runs[-1]['workers']}, forwards {stats_runs[-1]['forwards']}")
    print("wait_s: the parent waiting for decoded chips; decode_faces_s: summed over workers (read, "
          "sha256, decode, resize); backbone_taps_s and classifier_s: in the parent")

    sys.stdout.flush()
    mem: Dict[str, Dict[str, Any]] = {}
    try:
        if a.big:
            mem["small"] = scan_subprocess(paths["model"], paths["corpus"], out_dir, a.threads, a.device)
            mem["big"] = scan_subprocess(paths["model"], paths["big"], out_dir, a.threads, a.device)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if mem:
        s, b = mem["small"], mem["big"]
        print("\n| (e) scan --aligned, fresh process | files | images/s | peak RSS scanner (MiB) |")
        print("|---|---|---|---|")
        for label, r in (("N", s), ("big", b)):
            print(f"| {label} | {r['images']} | {r['images_per_s']:.1f} | {r['vmhwm_kb'] / 1024:.0f} |")
        rss_ratio = b["vmhwm_kb"] / s["vmhwm_kb"]
        print(f"\nRSS big / N (scanner): {rss_ratio:.3f}")
    print("\ntargets (issue E):")
    print(f"- (b) >= 0.9x (a): {ips['b'] / ips['a']:.2f}x -> {'met' if ips['b'] >= 0.9 * ips['a'] else 'MISSED'}")
    print(f"- (b) >= 3x (c):   {ips['b'] / ips['c']:.2f}x -> {'met' if ips['b'] >= 3 * ips['c'] else 'MISSED'}")
    print(f"- (b) >= 5x (d):   {ips['b'] / ips['d']:.2f}x -> {'met' if ips['b'] >= 5 * ips['d'] else 'MISSED'}")
    if mem:
        print(f"- peak RSS big within 10% of N: {rss_ratio:.3f} -> {'met' if rss_ratio <= 1.10 else 'MISSED'}")


if __name__ == "__main__":
    main()
