"""Render the numbers of the README's model card from the reports of ``scripts/train_default.py``.

    python scripts/model_card.py [--reports reports/default]

Prints Markdown; the README holds it between ``<!-- model-card:begin -->`` and
``<!-- model-card:end -->``, and tests/test_default_model.py checks that the README's copy is
what this script renders from the committed reports (so the card quotes the reports, digit for
digit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

BEGIN, END = "<!-- model-card:begin -->", "<!-- model-card:end -->"
FAKE_TYPES = ("entire_synthesis", "identity_swap", "local_manipulation", "expression")


def _ci(row: Dict[str, Any], key: str) -> str:
    lo, hi = row["ci"][key]
    if lo is None or hi is None:  # (a class too small to resample: evaluate.MIN_CLASS_FOR_CI)
        return f"{row[key]:.3f} (too few for a CI)"
    return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _row(rows: List[Dict[str, Any]], detector: str, kind: str, group: str) -> Optional[Dict[str, Any]]:
    for r in rows:
        if r.get("detector", "fakespotter") == detector and r["kind"] == kind and r["group"] == group:
            return r
    return None


def _groups(rows: List[Dict[str, Any]]) -> List[tuple]:
    seen: Dict[tuple, None] = {}
    for r in rows:
        seen[(r["kind"], r["group"])] = None
    return list(seen)


def test_table(report: Dict[str, Any]) -> str:
    rows = report["rows"]
    out = ["| test rows (fakes vs all reals) | reals | fakes | AUC | AP | TPR@5%FPR | TPR@op |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, group in _groups(rows):
        r = _row(rows, "fakespotter", kind, group)
        if r is None or kind == "source" or (kind == "generator" and group in FAKE_TYPES):
            continue  # a local type's generator row repeats its type's; sources: sources_table
        name = "all fakes" if kind == "all" else f"{kind.replace('_', ' ')}: {group}"
        out.append(f"| {name} | {r['n_real']} | {r['n_fake']} | {_ci(r, 'auc')} | {_ci(r, 'ap')} | "
                   f"{_ci(r, 'tpr_at_5pct_fpr')} | {_ci(r, 'tpr_operating')} |")
    return "\n".join(out)


def sources_table(report: Dict[str, Any]) -> str:
    """Each real source of the test split: how many of its faces the model calls fake."""
    from fakespotter.dataset import OTHER_REALS

    held_out = {o.source for o in OTHER_REALS.values() if o.held_out}
    rows = [r for r in report["rows"] if r.get("detector", "fakespotter") == "fakespotter" and r["kind"] == "source"]
    rows.sort(key=lambda r: (r["group"] in held_out, r["group"]))
    out = ["| real source (test split) | faces | flagged fake at the operating threshold | AUC vs all test fakes |",
           "|---|---:|---:|---:|"]
    for r in rows:
        flagged = round(r["fpr_operating"] * r["n_real"])
        name = f"{r['group']} (external)" if r["group"] in held_out else r["group"]
        out.append(f"| {name} | {r['n_real']} | {flagged} ({r['fpr_operating']:.0%}) | {_ci(r, 'auc')} |")
    return "\n".join(out)


def side_by_side(report: Dict[str, Any]) -> str:
    rows = report["rows"]
    detectors = list(dict.fromkeys(r.get("detector", "fakespotter") for r in rows))
    columns = [("all", "all")] + [("fake_type", t) for t in FAKE_TYPES if _row(rows, detectors[0], "fake_type", t)]
    head = ["detector (test AUC, 95% CI)"] + ["all fakes" if k == "all" else g.replace("_", " ") for k, g in columns]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    for d in detectors:
        cells = []
        for kind, group in columns:
            r = _row(rows, d, kind, group)
            cells.append("" if r is None else _ci(r, "auc"))
        out.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def robustness_table(report: Dict[str, Any]) -> str:
    rows = report["rows"]
    detectors = list(dict.fromkeys(r.get("detector", "fakespotter") for r in rows))
    out = ["| attack | level | " + " | ".join(f"{d} AUC" + (" [95% CI]" if d == "fakespotter" else "") for d in detectors)
           + " | fakespotter TPR@op [95% CI] | fakespotter FPR@op [95% CI] |",
           "|---|---:|" + "---:|" * (len(detectors) + 2)]
    keys = list(dict.fromkeys((r["attack"], r["level"]) for r in rows))
    for attack, level in keys:
        cells = []
        fs = None
        for d in detectors:
            r = next((x for x in rows if x.get("detector", "fakespotter") == d and x["attack"] == attack
                      and x["level"] == level), None)
            if r is None or r.get("auc") is None:
                cells.append("")
            elif d == "fakespotter" and "auc" in r.get("ci", {}):
                cells.append(_ci(r, "auc"))
            else:
                cells.append(f"{r['auc']:.3f}")
            if d == "fakespotter":
                fs = r
        op = ["" if fs is None or fs.get(k) is None else _ci(fs, k) if k in fs.get("ci", {}) else f"{fs[k]:.3f}"
              for k in ("tpr_operating", "fpr_operating")]
        out.append(f"| {attack} | {level} | " + " | ".join(cells + op) + " |")
    return "\n".join(out)


def _rule(op: Dict[str, Any]) -> str:
    if op.get("target_tpr") is not None:
        return (f"chosen on `val` to catch {op['target_tpr']:.0%} of its fakes (it flags "
                f"{op['fpr_at_validation']:.1%} of its reals)")
    return f"chosen on `val` for a {op['target_fpr']:.0%} false-positive rate"


def card(reports: Path) -> str:
    evaluation = json.loads((reports / "evaluate" / "metrics.json").read_text())
    training = json.loads((reports / "training.json").read_text())
    m = training["metrics"]
    parts = [
        f"Validation (the data set's `val` split, {sum(training['counts']['validation'].values())} chips): "
        f"AUC {m['validation_auc']:.3f}, accuracy at the operating threshold "
        f"{m['validation_accuracy_at_operating_threshold']:.3f} (optimistic: this split also chose the "
        f"classifier's epoch and the operating threshold; the test split below did not).",
        "",
        "Test (the `test` split; bootstrap 95% intervals; TPR@op = the share of a row's fakes caught at "
        f"the model's stored operating threshold, {_rule(evaluation['model']['operating_threshold'])}; on the "
        f"test split it flags {_row(evaluation['rows'], 'fakespotter', 'all', 'all')['fpr_operating']:.1%} of the "
        "reals, which every row shares. AP's chance level is a row's share of fakes, and the accuracy at the "
        "threshold (ACC@op in the reports) mostly follows that share, so neither compares across rows):",
        "",
        test_table(evaluation),
        "",
        "The test split's reals by source (external: packages that nothing in train or val came "
        "from):",
        "",
        sources_table(evaluation),
        "",
        "Side by side, trained on the same split (`fakespotter evaluate --baselines all`):",
        "",
        side_by_side(evaluation),
    ]
    robust = reports / "robustness" / "robustness.json"
    if robust.is_file():
        rob = json.loads(robust.read_text())
        n, n_eval = rob["settings"]["bootstrap"], evaluation["settings"]["bootstrap"]
        resamples = "" if n == n_eval else (f"; intervals from {n} bootstrap resamples, so the clean row's differ a "
                                             f"little from the {n_eval:,} above")
        parts += ["", "Robustness on the test split (`fakespotter robustness --baselines all`; every attack "
                  f"applied to real and fake chips alike{resamples}):", "", robustness_table(rob)]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", default="reports/default", help="report folder (default: %(default)s)")
    args = parser.parse_args(argv)
    sys.stdout.write(card(Path(args.reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
