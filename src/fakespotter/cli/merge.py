"""``fakespotter merge FOLDER OUT``: the records of a ``scan --engine ray`` output folder (its
part-*.jsonl shards) as one ordinary scan output, in input-listing order: the same file the
local engine writes for the same inputs, model and batch size. A folder of an unfinished scan,
or one missing a shard, gives the records it has, with a warning (also with --quiet) and exit
code 1 (finish it first with scan --engine ray --resume).

Exit codes: 0 merged, 1 merged what an unfinished scan or a folder missing a shard holds, 2
usage error (not a shards folder, a damaged shard or one from another scan, OUT exists or is
being written by another command), 3 writing OUT failed (disk full, file size limit: OUT is
written under a temporary name and renamed at the end, so an existing OUT stays as it was)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._common import log, record_stdout, usage_error, writable_output


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge the shards of 'scan --engine ray' into one output file",
                       description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="FOLDER", help="the --out folder of 'fakespotter scan --engine ray'")
    p.add_argument("out", metavar="OUT", help="the merged output file, - for stdout")
    p.add_argument("--format", choices=["jsonl", "csv"], default=None,
                   help="output format (default: csv when OUT ends with .csv, else jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no summary on stderr (default: one line)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..scan import OutputBusy
    from ..scan_ray import MANIFEST, STATS, ShardsError, merge_shards, read_shards

    folder = Path(args.folder)
    if not folder.is_dir():
        raise usage_error(f"{folder} {'is not a folder' if folder.exists() else 'does not exist'} (the output folder "
                          f"of 'fakespotter scan --engine ray')")
    if not (folder / MANIFEST).is_file():
        raise usage_error(f"{folder} is not the output folder of 'fakespotter scan --engine ray' (no {MANIFEST})")
    to_stdout = args.out == "-"
    fmt = args.format or ("csv" if not to_stdout and args.out.lower().endswith(".csv") else "jsonl")
    target = record_stdout() if to_stdout else writable_output(args.out, args.overwrite, "output", regular_only=True)
    if target is not None and not to_stdout:
        inside = os.path.realpath(target).startswith(os.path.realpath(folder) + os.sep)
        if inside:  # it would be cut (or read as a shard) before the shards are read
            raise usage_error(f"output {target} is inside the shards folder {folder}; write it elsewhere")
    try:
        for _ in read_shards(folder):  # damaged or unreadable shards are found before OUT is touched
            pass
    except ShardsError as e:
        raise usage_error(str(e)) from None
    except OSError as e:
        raise usage_error(f"cannot read the shards in {folder}{': ' + str(e.filename) if e.filename else ''}: "
                          f"{e.strerror or e}") from None
    try:
        n = merge_shards(folder, target, fmt, overwrite=args.overwrite)  # a file: under a temporary name
    except (ShardsError, OutputBusy) as e:
        raise usage_error(str(e)) from None
    except FileExistsError as e:  # made by another command while this one merged
        raise usage_error(str(e)) from None
    except OSError as e:  # disk full, file size limit, I/O error: OUT is as it was
        kept = f" ({args.out} is as it was)" if not to_stdout and Path(target).exists() else ""
        print(f"fakespotter merge: error: writing {args.out}: {e.strerror or e}; nothing was kept{kept}: free space "
              f"(or raise the file size limit) and merge again", file=sys.stderr)
        return 3
    try:
        stats = json.loads((folder / STATS).read_text())
    except (OSError, ValueError):
        stats = {}
    resume = f"'fakespotter scan ... --engine ray --out {folder} --resume'"
    expected = stats.get("images", 0) + stats.get("resumed_records", 0) if isinstance(stats, dict) else None
    incomplete = None  # (said even with --quiet: the merged file is not the whole scan)
    if not isinstance(stats, dict) or not stats.get("complete", False):
        incomplete = f"the scan in {folder} did not finish; finish it with {resume} and merge again"
    elif isinstance(expected, int) and n < expected:
        incomplete = (f"the scan in {folder} wrote {expected} records, but its shards hold {n} (a shard was "
                      f"deleted?); {resume} scans the inputs without a record again; then merge again")
    if incomplete:
        print(f"fakespotter merge: warning: {incomplete}", file=sys.stderr)
    log(f"merge: {n} records -> {'stdout' if to_stdout else args.out}", args.quiet)
    return 1 if incomplete else 0
