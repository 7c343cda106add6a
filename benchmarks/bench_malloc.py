"""Freed memory kept (``fakespotter._malloc``): whole CLI scans with and without it.

The CLI raises glibc's mmap and trim thresholds in its main process, so that each forward
reuses the memory of the one before instead of mapping and faulting in its activations again.
The setting is the process's and cannot be undone in it, so this runs ``fakespotter scan
--aligned`` in fresh subprocesses (bench_scan.py's corpus of ``--n`` JPEG chips and detector),
alternating ``kept`` (the default) and ``default`` (``FAKESPOTTER_MALLOC=default``: glibc as it
is), ``--repeats`` times each. Reported per setting, medians: the scan's wall seconds and its
backbone + taps seconds (from the stats JSON), the main process's minor page faults and peak
RSS (VmHWM; decode workers not included). The records of every run must be identical.

Run: ``python benchmarks/bench_malloc.py [--n 1000] [--repeats 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scan import build  # noqa: E402
from common import description, hardware  # noqa: E402

_CHILD = r"""
import json, resource, sys
from fakespotter.cli import main
rc = main(sys.argv[1:])
hwm = 0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
print(json.dumps({"rc": rc, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt, "vmhwm_kb": hwm}))
"""
SETTINGS = {"kept": {}, "default": {"FAKESPOTTER_MALLOC": "default"}}


def run_scan(model: Path, corpus: Path, out: Path, threads: int, extra_env: dict) -> dict:
    for p in (out, Path(str(out) + ".stats.json")):
        if p.exists():
            p.unlink()
    env = {k: v for k, v in os.environ.items() if k != "FAKESPOTTER_MALLOC"}
    env.update(extra_env, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", _CHILD, "scan", str(corpus), "--model", str(model), "--aligned",
                           "--out", str(out), "--quiet"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"scan failed ({proc.returncode}): {proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    stats = json.loads(Path(str(out) + ".stats.json").read_text())
    res.update(wall_s=stats["wall_s"], backbone_taps_s=stats["backbone_taps_s"], records=out.read_bytes())
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--n", type=int, default=1000, help="JPEG chips in the corpus (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting, alternated (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fakespotter-bench-scan"),
                   help="bench_scan.py's cache of the corpus and model (default: %(default)s)")
    a = p.parse_args()
    paths = build(Path(a.workdir), a.n, 0)
    print(hardware())
    print(f"fakespotter scan --aligned on {a.n} JPEG chips, default decode workers, batch 64, {a.threads} torch "
          f"threads; {a.repeats} alternated runs of each setting, medians\n")
    runs: dict = {k: [] for k in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            for name, env in SETTINGS.items():
                runs[name].append(run_scan(paths["model"], paths["corpus"], Path(tmp) / f"{name}.jsonl",
                                           a.threads, env))
    first = runs["kept"][0]["records"]
    if any(r["records"] != first for rs in runs.values() for r in rs):
        raise AssertionError("the records differ between runs")

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    print("| malloc | scan wall s | backbone + taps s | minor page faults | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for name in SETTINGS:
        print(f"| {name} | {med(name, 'wall_s'):.2f} | {med(name, 'backbone_taps_s'):.2f} | "
              f"{med(name, 'faults'):,.0f} | {med(name, 'vmhwm_kb') / 1024:.0f} |")
    print(f"\nkept vs default: scan {med('default', 'wall_s') / med('kept', 'wall_s'):.2f}x, backbone + taps "
          f"{med('default', 'backbone_taps_s') / med('kept', 'backbone_taps_s'):.2f}x as fast; records identical")


if __name__ == "__main__":
    main()
