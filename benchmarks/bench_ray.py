"""Corpus scanning on Ray: `scan --engine ray` with 1 and 2 CPU actors against the local engine.

Config: the corpus and model of ``bench_scan.py`` (N pre-aligned 150x150 face chips as JPEG
files, quality 90, from ``samples.sample_chips``; ``FakeSpotter(hidden=(16, 16), max_epochs=20)``),
batch 64, cached in ``--workdir`` (shared with bench_scan.py). One local Ray instance started
here (``ray.init(num_cpus=--ray-cpus)``, loopback, no dashboard) serves every Ray run. Contenders,
timed in rotation (round-robin, medians of ``--repeats``), each checked first:

    local-2t: ``scan.scan(folder, det, aligned=True)``, default decode workers, 2 torch threads,
              records written as JSONL (flushed and fsynced per batch)
    local-1t: the same with 1 torch thread (the per-core baseline of the Ray actors)
    ray-1:    ``scan_ray.ray_scan(folder, model, out, aligned=True, actors=1)``: decode tasks
              (1 CPU each) and 1 actor (1 CPU, 1 torch thread)
    ray-2:    the same with 2 actors

Checked before timing: each Ray run's merged records == the local engine's records (identical,
timing fields aside). A Ray run's wall time includes starting its actor pool and loading the
model in every actor (a few seconds); ``steady`` is images/s from the first written shard to
the last, i.e. without that start-up.

Ray's CPUs are logical: on a 2-core machine ``--ray-cpus 3`` lets 2 actors and a decode task
be scheduled at once, but they share the 2 cores.

Run: ``python benchmarks/bench_ray.py [--n 1000] [--repeats 3] [--ray-cpus 3]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scan import BATCH, JPEG_QUALITY, build  # noqa: E402
from common import description, hardware, interleaved_medians  # noqa: E402


def local_scan(det, corpus: Path, out_dir: Path, threads: int, last: Dict[str, Any]) -> Callable[[], None]:
    from fakespotter.scan import RecordWriter, scan

    def run() -> None:
        torch.set_num_threads(threads)
        out = out_dir / f"local{threads}.jsonl"
        if out.exists():
            out.unlink()
        r = scan([str(corpus)], det, aligned=True, batch_size=BATCH)
        w = RecordWriter(out, "jsonl", "new")
        try:
            for group in r.batches():
                w.write(group)
        finally:
            r.close()
            w.close()
        last[f"local{threads}"] = out
    return run


def ray_run(model: Path, corpus: Path, out_dir: Path, actors: int, last: Dict[str, Any]) -> Callable[[], None]:
    from fakespotter.scan_ray import ray_scan

    def run() -> None:
        out = out_dir / f"ray{actors}"
        stats = ray_scan([str(corpus)], model, out, aligned=True, batch_size=BATCH, actors=actors,
                         cpus_per_actor=1.0, mode="overwrite")
        last.setdefault(f"ray{actors}", []).append({"stats": stats, "steady": stats["steady_images_per_s"],
                                                    "startup": stats["startup_s"]})
        last[f"ray{actors}_out"] = out
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--n", type=int, default=1000, help="JPEG chips in the corpus (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    p.add_argument("--ray-cpus", type=int, default=3,
                   help="logical CPUs of the local Ray instance (default: %(default)s: 2 actors + 1 decode task)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fakespotter-bench-scan"),
                   help="where the corpus and model are cached (default: %(default)s)")
    a = p.parse_args()
    if a.n < BATCH or a.repeats < 1 or a.ray_cpus < 3:
        p.error("need --n >= 64, --repeats >= 1, --ray-cpus >= 3")

    import ray

    from fakespotter.artifact import file_sha256
    from fakespotter.detector import FakeSpotter
    from fakespotter.scan import default_workers
    from fakespotter.scan_ray import read_shards

    paths = build(Path(a.workdir), a.n, 0)
    det = FakeSpotter.load(paths["model"])
    det.model_id_ = file_sha256(paths["model"])  # records name the model file, as ray_scan's do
    out_dir = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    ray.init(num_cpus=a.ray_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)
    try:
        last: Dict[str, Any] = {}
        fns = {
            "local-2t": local_scan(det, paths["corpus"], out_dir, 2, last),
            "local-1t": local_scan(det, paths["corpus"], out_dir, 1, last),
            "ray-1": ray_run(paths["model"], paths["corpus"], out_dir, 1, last),
            "ray-2": ray_run(paths["model"], paths["corpus"], out_dir, 2, last),
        }
        for fn in fns.values():  # checks, and warm-up
            fn()
        local = [json.loads(line) for line in open(last["local2"])]
        if len(local) != a.n or any(r["status"] != "ok" for r in local):
            raise AssertionError(f"local scan: {len(local)} records for {a.n} files")
        if [json.loads(line) for line in open(last["local1"])] != local:
            raise AssertionError("local scan: 1 and 2 torch threads give different records")
        for k in (1, 2):
            got = list(read_shards(last[f"ray{k}_out"]))
            if got != local:
                diff = next((a, b) for a, b in zip(got + [None] * len(local), local) if a != b)
                raise AssertionError(f"ray with {k} actors: records differ from the local engine's, first {diff}")
        for k in (1, 2):
            last[f"ray{k}"].clear()
        t = interleaved_medians(fns, repeats=a.repeats, warmup=0)
    finally:
        ray.shutdown()
        shutil.rmtree(out_dir, ignore_errors=True)

    ips = {k: a.n / v for k, v in t.items()}
    steady = {f"ray-{k}": float(np.median([r["steady"] for r in last[f"ray{k}"]])) for k in (1, 2)}
    startup = {f"ray-{k}": float(np.median([r["startup"] for r in last[f"ray{k}"]])) for k in (1, 2)}
    load = os.getloadavg()
    print(hardware())
    print(f"\n{a.n} JPEG chips 150x150 (q{JPEG_QUALITY}), batch {BATCH}; local: {default_workers()} decode "
          f"worker(s); Ray: local instance with {a.ray_cpus} logical CPUs, actors of 1 CPU / 1 torch thread, "
          f"decode tasks of 1 CPU; medians of {a.repeats} round-robin runs; load average after the run "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    print("checks: every Ray run's merged records == the local engine's (and local 1 thread == 2 threads)\n")
    print("| contender | images/s end to end | vs local-2t | start-up s | images/s after start-up |")
    print("|---|---|---|---|---|")
    names = {"local-2t": "local engine, 2 torch threads", "local-1t": "local engine, 1 torch thread",
             "ray-1": "--engine ray, 1 CPU actor", "ray-2": "--engine ray, 2 CPU actors"}
    for k, name in names.items():
        st = f"{startup[k]:.1f} | {steady[k]:.1f}" if k in steady else " | "
        print(f"| {name} | {ips[k]:.1f} | {ips[k] / ips['local-2t']:.2f}x | {st} |")
    print(f"\nray-2 / ray-1: {ips['ray-2'] / ips['ray-1']:.2f}x end to end, "
          f"{steady['ray-2'] / steady['ray-1']:.2f}x steady")


if __name__ == "__main__":
    main()
