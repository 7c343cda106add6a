"""Metrics of a detector from its scores, with bootstrap confidence intervals, per-group rows,
ROC / DET plots and report writers (JSON, CSV, Markdown); and scoring a corpus of image files.

Conventions: ``scores`` are logits of "fake" (higher = more likely synthetic), ``labels`` are
1 = fake (the positive class) and 0 = real. A sample is called fake when ``score > threshold``
(as ``FakeSpotter.predict`` does). Rank metrics (AUC, AP, EER, TPR at FPR) look only at the order
of the scores; ties are handled as scikit-learn does (tied samples enter the curves together).
The metrics are pure numpy; matplotlib is imported only by the plot functions.

>>> m = metrics(scores, labels, threshold=0.0, operating_threshold=1.3)   # doctest: +SKIP
>>> rep = evaluate(scores, labels, groups=types, bootstrap=1000, seed=0)  # doctest: +SKIP
>>> write_json(rep, "metrics.json"); print(to_markdown(rep))              # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._atomic import write_atomic
from .faces import DETECT_PIXELS, WEAK_FACE_SCORE

__all__ = [
    "FPR_TARGETS", "MIN_CLASS_FOR_CI", "METRICS", "roc_curve", "precision_recall_curve", "roc_auc", "average_precision",
    "equal_error_rate", "tpr_at_fpr", "threshold_metrics", "metrics", "bootstrap_ci", "group_masks", "evaluate", "evaluate_by",
    "to_json_dict", "write_json", "to_csv", "write_csv", "to_markdown", "write_markdown",
    "plot_roc", "plot_det", "plot_lines", "score_images", "score_images_with", "ImageScores",
]

FPR_TARGETS = (0.01, 0.05)
MIN_CLASS_FOR_CI = 5  # a row with fewer reals or fewer fakes than this gets no intervals


def _tpr_key(target: float) -> str:
    return f"tpr_at_{target * 100:g}pct_fpr"


# The metrics of one row, in report order; "acc_operating" only when an operating threshold is given.
METRICS = ("auc", "ap", "eer", "acc", "precision", "recall", "f1",
           *(_tpr_key(f) for f in FPR_TARGETS), "acc_operating")


def _check(scores: Any, labels: Any, what: str) -> Tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1) if np.ndim(scores) <= 1 else None
    if s is None:
        raise ValueError(f"{what}: scores must be 1-d, got shape {np.shape(scores)}")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != s.shape[0]:
        raise ValueError(f"{what}: labels must be 1-d with one entry per score ({s.shape[0]}), got shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0 (real) or 1 (fake), got values {np.unique(y)[:5].tolist()}")
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).sum())
        raise ValueError(f"{what}: {bad} scores are NaN or infinite; drop the images without a face first")
    return s, y.astype(bool)


def _real(x: Any) -> float:
    """float(x) for a real number (a bool is not one); NaN for anything else."""
    try:
        return float("nan") if isinstance(x, (bool, np.bool_, str, bytes)) else float(x)
    except (TypeError, ValueError):
        return float("nan")


def _threshold(t: Any, what: str, name: str = "threshold") -> float:
    """A logit threshold: any number but NaN (+-inf call everything real / fake)."""
    v = _real(t)
    if math.isnan(v):
        raise ValueError(f"{what}: {name} must be a logit (a number, not NaN), got {t!r}")
    return v


def _targets(fpr_targets: Any, what: str) -> Tuple[float, ...]:
    """FPR targets as fractions in [0, 1] (0.01 = 1% FPR)."""
    given = tuple(fpr_targets)  # (an iterator is read once)
    out = tuple(_real(f) for f in given)
    for f, v in zip(given, out):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{what}: fpr_targets must be fractions in [0, 1] (0.01 = 1% FPR), got {f!r}")
    return out


def _counts(s: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, true positives, false positives) at each distinct score: the
    samples with score >= thresholds[i] are called fake at point i."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.zeros(0, dtype=np.int64)
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    return s[last], tps, fps


def roc_curve(scores: Any, labels: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, descending, from (0, 0) at +inf.

    Equals ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``. NaN rates
    when a class is absent.
    """
    s, y = _check(scores, labels, "roc_curve")
    t, tps, fps = _counts(s, y)
    p, n = tps[-1] if len(tps) else 0.0, fps[-1] if len(fps) else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tps] / p if p else np.full(len(t) + 1, np.nan)
        fpr = np.r_[0.0, fps] / n if n else np.full(len(t) + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, t]


def precision_recall_curve(scores: Any, labels: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) at every distinct score, thresholds descending (no
    closing (1, 0) point, unlike scikit-learn's, which also orders ascending)."""
    s, y = _check(scores, labels, "precision_recall_curve")
    t, tps, fps = _counts(s, y)
    p = tps[-1] if len(tps) else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tps / (tps + fps)
        recall = tps / p if p else np.full(len(t), np.nan)
    return precision, recall, t


def _auc(tps: np.ndarray, fps: np.ndarray) -> float:
    p, n = tps[-1], fps[-1]
    if p == 0 or n == 0:
        return float("nan")
    tpr, fpr = np.r_[0.0, tps] / p, np.r_[0.0, fps] / n
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _ap(tps: np.ndarray, fps: np.ndarray) -> float:
    p = tps[-1]
    if p == 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall = np.r_[0.0, tps / p]
    return float(np.sum(np.diff(recall) * precision))


def _eer(tps: np.ndarray, fps: np.ndarray) -> float:
    p, n = tps[-1], fps[-1]
    if p == 0 or n == 0:
        return float("nan")
    fpr, fnr = np.r_[0.0, fps / n], 1.0 - np.r_[0.0, tps / p]
    d = fnr - fpr  # non-increasing along the curve, from 1 to -1
    i = int(np.argmax(d <= 0))
    if i == 0:
        return 0.0
    w = d[i - 1] / (d[i - 1] - d[i])
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def _tpr_at(tps: np.ndarray, fps: np.ndarray, target: float) -> float:
    p, n = tps[-1], fps[-1]
    if p == 0 or n == 0:
        return float("nan")
    ok = np.r_[0.0, fps] / n <= target + 1e-12
    return float(np.max(np.r_[0.0, tps][ok]) / p)


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (a tie between a real and a fake counts one half); NaN when a
    class is absent. Equals ``sklearn.metrics.roc_auc_score``."""
    _, tps, fps = _counts(*_check(scores, labels, "roc_auc"))
    return _auc(tps, fps) if len(tps) else float("nan")


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision, sum over thresholds of (R_k - R_k-1) P_k (no interpolation); NaN
    without fakes. Equals ``sklearn.metrics.average_precision_score``."""
    _, tps, fps = _counts(*_check(scores, labels, "average_precision"))
    return _ap(tps, fps) if len(tps) else float("nan")


def equal_error_rate(scores: Any, labels: Any) -> float:
    """The rate where FPR = FNR on the ROC curve, its points joined by straight lines."""
    _, tps, fps = _counts(*_check(scores, labels, "equal_error_rate"))
    return _eer(tps, fps) if len(tps) else float("nan")


def tpr_at_fpr(scores: Any, labels: Any, target: float) -> float:
    """The highest TPR of a threshold whose FPR is at most ``target`` (no interpolation: a
    threshold exists that achieves it on these samples; FPR is compared with a 1e-12
    allowance, so 3 of 300 reals is within 0.01). ``target`` is a fraction in [0, 1]."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"tpr_at_fpr: target must be in [0, 1], got {target}")
    _, tps, fps = _counts(*_check(scores, labels, "tpr_at_fpr"))
    return _tpr_at(tps, fps, target) if len(tps) else float("nan")


def threshold_metrics(scores: Any, labels: Any, threshold: float) -> Dict[str, float]:
    """acc, precision, recall, f1, tpr, fpr with fake = ``score > threshold``; precision and
    F1 are 0 when nothing is called fake (scikit-learn's ``zero_division=0``)."""
    s, y = _check(scores, labels, "threshold_metrics")
    return _at(s, y, _threshold(threshold, "threshold_metrics"))


def _at(s: np.ndarray, y: np.ndarray, t: float) -> Dict[str, float]:
    pred = s > t
    tp = float(np.sum(pred & y))
    fp = float(np.sum(pred & ~y))
    p, n = float(y.sum()), float(len(y) - y.sum())
    nan = float("nan")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / p if p else nan
    f1 = 2 * tp / (2 * tp + fp + (p - tp)) if (2 * tp + fp + p - tp) else 0.0
    return {"acc": float(np.mean(pred == y)) if len(y) else nan, "precision": precision, "recall": recall,
            "f1": f1, "tpr": recall, "fpr": fp / n if n else nan}


def metrics(scores: Any, labels: Any, threshold: float = 0.0, operating_threshold: Optional[float] = None,
            fpr_targets: Sequence[float] = FPR_TARGETS) -> Dict[str, float]:
    """Every metric of :data:`METRICS` for one set of scores (one sort for all rank metrics).

    threshold: logit for acc / precision / recall / f1 (default 0, i.e. P(fake) = 0.5).
    operating_threshold: the model's stored logit threshold; adds ``acc_operating``,
    ``tpr_operating`` and ``fpr_operating``.
    fpr_targets: FPRs as fractions in [0, 1]; each adds ``tpr_at_<100 f>pct_fpr``.
    """
    s, y = _check(scores, labels, "metrics")
    op = None if operating_threshold is None else _threshold(operating_threshold, "metrics", "operating_threshold")
    return _metrics(s, y, _threshold(threshold, "metrics"), op, _targets(fpr_targets, "metrics"))


def _metrics(s: np.ndarray, y: np.ndarray, threshold: float, op: Optional[float],
             fpr_targets: Tuple[float, ...]) -> Dict[str, float]:
    nan = float("nan")
    _, tps, fps = _counts(s, y)
    rank = len(tps) > 0
    out = {"auc": _auc(tps, fps) if rank else nan, "ap": _ap(tps, fps) if rank else nan,
           "eer": _eer(tps, fps) if rank else nan}
    at = _at(s, y, threshold)
    out.update({k: at[k] for k in ("acc", "precision", "recall", "f1")})
    for f in fpr_targets:
        out[_tpr_key(f)] = _tpr_at(tps, fps, f) if rank else nan
    if op is not None:
        at = _at(s, y, float(op))
        out.update({"acc_operating": at["acc"], "tpr_operating": at["tpr"], "fpr_operating": at["fpr"]})
    return out


def bootstrap_ci(scores: Any, labels: Any, statistic: Callable[[np.ndarray, np.ndarray], Mapping[str, float]],
                 n: int = 1000, seed: int = 0, level: float = 0.95,
                 min_class: int = MIN_CLASS_FOR_CI) -> Dict[str, Tuple[float, float]]:
    """Percentile bootstrap intervals of every value ``statistic(scores, labels)`` returns.

    Resampling is stratified: each resample draws the reals from the reals and the fakes from
    the fakes, with replacement, keeping both counts. Deterministic for ``seed`` (an int >= 0).
    The bounds are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled
    values (numpy's linear interpolation); a resample where a value is NaN or missing is left
    out of that value's interval. Returns ``{name: (low, high)}``: NaN bounds when ``n`` is 0 or
    a class has fewer than ``min_class`` samples (none, or so few that redrawing them says
    nothing of how such samples vary: a class of one is drawn the same every time, and the
    interval, however narrow, would only show the other class's spread).
    """
    s, y = _check(scores, labels, "bootstrap_ci")
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)) or int(n) != n or n < 0:
        raise ValueError(f"bootstrap_ci: n must be an int >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"bootstrap_ci: seed must be an int >= 0, got {seed!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    if isinstance(min_class, bool) or not isinstance(min_class, (int, np.integer)) or min_class < 1:
        raise ValueError(f"bootstrap_ci: min_class must be an int >= 1, got {min_class!r}")
    point = statistic(s, y.astype(np.int64))
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if n == 0 or min(len(pos), len(neg)) < min_class:
        return {k: (float("nan"), float("nan")) for k in point}
    rng = np.random.default_rng(seed)
    values = {k: np.full(int(n), np.nan) for k in point}
    yb = np.r_[np.zeros(len(neg), dtype=np.int64), np.ones(len(pos), dtype=np.int64)]
    for b in range(int(n)):
        idx = np.r_[neg[rng.integers(0, len(neg), len(neg))], pos[rng.integers(0, len(pos), len(pos))]]
        for k, v in statistic(s[idx], yb).items():
            if k in values:
                values[k][b] = v
    alpha = (1.0 - level) / 2
    out = {}
    for k, v in values.items():
        v = v[~np.isnan(v)]
        out[k] = (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) if len(v) else (float("nan"),) * 2
    return out


# ----------------------------------------------------------------------------------------------
# reports


def _group_names(groups: Sequence[Hashable], what: str) -> np.ndarray:
    """The groups as the names their rows get (str), refusing two different groups that would
    share one (``1`` and ``"1"``, ``None`` and ``"None"``: their samples would be one row)."""
    def same(a: Any, b: Any) -> bool:
        try:
            return a is b or bool(a == b) or (a != a and b != b)  # (NaN)
        except (TypeError, ValueError):
            return False

    first: Dict[str, Hashable] = {}
    names = []
    for v in groups:
        name = str(v)
        other = first.setdefault(name, v)
        if not same(other, v):
            raise ValueError(f"{what}: {other!r} and {v!r} are different groups with one name, {name!r}")
        names.append(name)
    return np.asarray(names, dtype=object)


def group_masks(labels: Any, groups: Optional[Sequence[Hashable]] = None) -> List[Tuple[str, str, np.ndarray]]:
    """The rows of a report as ``(name, class, mask)``: ``("all", "all", everything)``; then per
    fake group (first-seen order) its fakes with all reals; then, when the reals carry more than
    one group, per real group its reals with all fakes."""
    y = np.asarray(labels).astype(bool)
    out = [("all", "all", np.ones(len(y), dtype=bool))]
    if groups is None:
        return out
    g = _group_names(groups, "evaluate: groups")
    if g.shape != y.shape:
        raise ValueError(f"evaluate: groups must have one entry per score ({len(y)}), got {len(g)}")
    for name in dict.fromkeys(g[y]):
        out.append((name, "fake", ~y | ((g == name) & y)))
    real_groups = list(dict.fromkeys(g[~y]))
    if len(real_groups) > 1:
        for name in real_groups:
            out.append((name, "real", y | ((g == name) & ~y)))
    return out


def evaluate(scores: Any, labels: Any, groups: Optional[Sequence[Hashable]] = None, threshold: float = 0.0,
             operating_threshold: Optional[float] = None, bootstrap: int = 1000, seed: int = 0,
             level: float = 0.95, fpr_targets: Sequence[float] = FPR_TARGETS) -> Dict[str, Any]:
    """Metrics overall and per group, each with bootstrap intervals.

    groups: one label per sample (fake type / generator for fakes, source for reals). Each
    fake group gets a row of its fakes against all reals; when the reals carry more than one
    group, each real group gets a row of its reals against all fakes.
    Row ``i``'s intervals come from :func:`bootstrap_ci` with seed ``seed + i`` (a row over the
    same samples as an earlier row has that row's intervals; a row with fewer than
    ``MIN_CLASS_FOR_CI`` reals or fakes has none). Returns a report: ``{"settings": {...}, "rows": [{"group", "class", "n_real", "n_fake",
    <metric>: value, "ci": {<metric>: [low, high]}}, ...]}``; the first row is ``"all"``.
    """
    s, y = _check(scores, labels, "evaluate")
    masks = [({"group": name, "class": cls}, mask) for name, cls, mask in group_masks(y, groups)]
    return _report(s, y, masks, threshold, operating_threshold, bootstrap, seed, level, fpr_targets)


def evaluate_by(scores: Any, labels: Any, groupings: Sequence[Tuple[str, Sequence[Hashable], str]],
                threshold: float = 0.0, operating_threshold: Optional[float] = None, bootstrap: int = 1000,
                seed: int = 0, level: float = 0.95, fpr_targets: Sequence[float] = FPR_TARGETS) -> Dict[str, Any]:
    """Like :func:`evaluate`, with several groupings: rows carry ``kind`` too.

    groupings: ``[(kind, one label per sample, "fake" | "real"), ...]``. For a ``"fake"``
    grouping, each label seen on a fake gets a row of those fakes against all reals; for
    ``"real"``, each label seen on a real gets a row of those reals against all fakes (only
    when the reals carry more than one label: else that row is the ``all`` row). The first row
    is ``kind="all"``.
    """
    s, y = _check(scores, labels, "evaluate_by")
    masks: List[Tuple[Dict[str, str], np.ndarray]] = [({"kind": "all", "group": "all", "class": "all"},
                                                        np.ones(len(y), dtype=bool))]
    for kind, groups, cls in groupings:
        if cls not in ("fake", "real"):
            raise ValueError(f"evaluate_by: grouping {kind!r} must be for 'fake' or 'real', got {cls!r}")
        g = _group_names(groups, f"evaluate_by: grouping {kind!r}")
        if g.shape != y.shape:
            raise ValueError(f"evaluate_by: grouping {kind!r} needs one entry per score ({len(y)}), got {len(g)}")
        mine = y if cls == "fake" else ~y
        names = list(dict.fromkeys(g[mine]))
        if cls == "real" and len(names) < 2:
            continue
        for name in names:
            masks.append(({"kind": kind, "group": name, "class": cls}, ~mine | ((g == name) & mine)))
    return _report(s, y, masks, threshold, operating_threshold, bootstrap, seed, level, fpr_targets,
                   label_columns=["kind", "group", "class"])


def _report(s: np.ndarray, y: np.ndarray, masks: Sequence[Tuple[Dict[str, str], np.ndarray]], threshold: float,
            operating_threshold: Optional[float], bootstrap: int, seed: int, level: float,
            fpr_targets: Sequence[float], label_columns: Optional[List[str]] = None) -> Dict[str, Any]:
    what = "evaluate_by" if label_columns is not None else "evaluate"
    threshold = _threshold(threshold, what)
    op = None if operating_threshold is None else _threshold(operating_threshold, what, "operating_threshold")
    targets = _targets(fpr_targets, what)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{what}: seed must be an int >= 0, got {seed!r}")

    def stat(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
        return _metrics(a, b.astype(bool), threshold, op, targets)

    intervals: Dict[bytes, Dict[str, List[float]]] = {}  # by the row's samples

    def row(names: Dict[str, str], mask: np.ndarray, offset: int) -> Dict[str, Any]:
        a, b = s[mask], y[mask]
        r: Dict[str, Any] = {**names, "n_real": int((~b).sum()), "n_fake": int(b.sum())}
        r.update(stat(a, b))
        key = np.packbits(mask).tobytes()
        if key not in intervals:  # (the same samples under two names, e.g. a generator that is a fake type)
            intervals[key] = {k: list(v) for k, v in bootstrap_ci(a, b, stat, n=bootstrap, seed=seed + offset,
                                                                   level=level).items()}
        r["ci"] = {k: list(v) for k, v in intervals[key].items()}
        return r

    rows = [row(names, mask, i) for i, (names, mask) in enumerate(masks)]
    settings = {"threshold": float(threshold), "operating_threshold": op, "bootstrap": int(bootstrap),
                "seed": int(seed), "level": float(level), "min_class_for_ci": MIN_CLASS_FOR_CI,
                "fpr_targets": list(targets),
                "positive_class": "fake", "decision": "fake when score > threshold"}
    out: Dict[str, Any] = {"settings": settings, "rows": rows}
    if label_columns is not None:
        out["label_columns"] = list(label_columns)
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) or math.isinf(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _save_figure(fig: Any, path: Union[str, Path], replace: bool = True) -> None:
    """``fig.savefig`` to ``path`` atomically, in the format its suffix names."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png"), replace=replace)


def _shown(name: Any) -> str:
    """A name as a plot can draw it: the bytes of a non-UTF-8 file name as U+FFFD."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def to_json_dict(report: Mapping[str, Any]) -> Dict[str, Any]:
    """The report with NaN / inf as null (strict JSON)."""
    return _jsonable(dict(report))


def write_json(report: Mapping[str, Any], path: Union[str, Path], replace: bool = True) -> Path:
    """The report as strict JSON. Every writer here writes through a temporary file; with
    ``replace=False`` a file at ``path`` is kept (FileExistsError), even one made meanwhile."""
    p = Path(path)
    return write_atomic(p, json.dumps(to_json_dict(report), indent=2, allow_nan=False) + "\n", replace=replace)


def _labels(report: Mapping[str, Any]) -> List[str]:
    return list(report.get("label_columns", ("group", "class")))


def _columns(rows: Sequence[Mapping[str, Any]], labels: Sequence[str] = ("group", "class")) -> List[str]:
    keys = [k for k in METRICS if any(k in r for r in rows)]
    extra = [k for r in rows for k in r if k not in keys and k not in (*labels, "ci")
             and not k.startswith("n_")]
    return keys + list(dict.fromkeys(extra))


def to_csv(report: Mapping[str, Any]) -> str:
    """One line per row: its labels (``report["label_columns"]``, default group and class),
    counts, then each metric with ``_lo`` / ``_hi`` bounds."""
    rows = report["rows"]
    labels = _labels(report)
    counts = [k for k in rows[0] if k.startswith("n_")] if rows else []
    metric_cols = _columns(rows, labels)
    header = [*labels, *counts]
    for k in metric_cols:
        header += [k, f"{k}_lo", f"{k}_hi"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return repr(float(v)) if isinstance(v, (float, np.floating)) else str(v)

    for r in rows:
        line = [*(r.get(k) for k in labels), *(r.get(k) for k in counts)]
        for k in metric_cols:
            lo, hi = (r.get("ci") or {}).get(k, (None, None))
            line += [fmt(r.get(k)), fmt(lo), fmt(hi)]
        w.writerow([fmt(v) if not isinstance(v, str) else v for v in line])
    return buf.getvalue()


def write_csv(report: Mapping[str, Any], path: Union[str, Path], replace: bool = True) -> Path:
    p = Path(path)
    return write_atomic(p, to_csv(report), replace=replace)


_HEADINGS = {"auc": "AUC", "ap": "AP", "eer": "EER", "acc": "ACC", "precision": "Precision", "recall": "Recall",
             "f1": "F1", "acc_operating": "ACC@op", "tpr_operating": "TPR@op", "fpr_operating": "FPR@op"}


def _heading(k: str) -> str:
    if k in _HEADINGS:
        return _HEADINGS[k]
    if k.startswith("tpr_at_") and k.endswith("pct_fpr"):
        return f"TPR@{k[7:-7]}%FPR"
    return k


def to_markdown(report: Mapping[str, Any], columns: Optional[Sequence[str]] = None, digits: int = 3) -> str:
    """A Markdown table: one line per row, each metric as ``value [low, high]`` when the row has
    intervals."""
    rows = report["rows"]
    labels = _labels(report)
    cols = list(columns) if columns is not None else _columns(rows, labels)
    counts = [k for k in rows[0] if k.startswith("n_")] if rows else []
    head = [*labels, *counts, *(_heading(k) for k in cols)]

    def cell(r: Mapping[str, Any], k: str) -> str:
        v = r.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        text = f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)
        lo, hi = (r.get("ci") or {}).get(k, (None, None))
        if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
            text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
        return text

    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * len(labels) + ["---:"] * (len(head) - len(labels))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([*(str(r.get(k, "")) for k in labels),
                                        *(str(r.get(k, "")) for k in counts), *(cell(r, k) for k in cols)]) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(report: Mapping[str, Any], path: Union[str, Path], title: Optional[str] = None,
                   notes: Sequence[str] = (), replace: bool = True) -> Path:
    """The Markdown table with an optional title and notes (one bullet each)."""
    text = (f"# {title}\n\n" if title else "") + to_markdown(report)
    if notes:
        text += "\n" + "".join(f"- {n}\n" for n in notes)
    p = Path(path)
    write_atomic(p, text, replace=replace)
    return p


# ----------------------------------------------------------------------------------------------
# plots (matplotlib, imported on use; no pyplot, so no global state and no display needed)


def _figure(width: float = 5.0, height: float = 5.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("fakespotter.evaluate: plots need matplotlib (pip install matplotlib)") from e
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_roc(curves: Mapping[str, Tuple[Any, Any]], path: Union[str, Path], title: str = "ROC",
             replace: bool = True) -> Path:
    """ROC curves (one per name: ``(scores, labels)``), with each curve's AUC in the legend."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, (s, y) in curves.items():
        fpr, tpr, _ = roc_curve(s, y)
        ax.plot(fpr, tpr, label=f"{_shown(name)} (AUC {roc_auc(s, y):.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (reals called fake)",
           ylabel="true-positive rate (fakes caught)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path, replace)
    return Path(path)


_DET_TICKS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)


def plot_det(curves: Mapping[str, Tuple[Any, Any]], path: Union[str, Path], title: str = "DET",
             replace: bool = True) -> Path:
    """Detection error trade-off: FNR against FPR on normal-deviate (probit) axes, with each
    curve's EER in the legend. Rates are clipped to [0.1%, 99.9%] for display."""
    ppf = np.vectorize(NormalDist().inv_cdf)
    lo, hi = 0.001, 0.999
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, (s, y) in curves.items():
        fpr, tpr, _ = roc_curve(s, y)
        ax.plot(ppf(np.clip(fpr, lo, hi)), ppf(np.clip(1 - tpr, lo, hi)),
                label=f"{_shown(name)} (EER {equal_error_rate(s, y):.3f})")
    ticks = ppf(np.array(_DET_TICKS))
    labels = [f"{t * 100:g}" for t in _DET_TICKS]
    ax.plot(ppf([lo, hi]), ppf([lo, hi]), color="0.7", linestyle=":", linewidth=1)
    ax.set_xticks(ticks, labels, fontsize="x-small")
    ax.set_yticks(ticks, labels, fontsize="x-small")
    ax.set(xlim=ppf([lo, hi]), ylim=ppf([lo, hi]), xlabel="false-positive rate (%)",
           ylabel="false-negative rate (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path, replace)
    return Path(path)


def plot_lines(panels: Mapping[str, Mapping[str, Tuple[Sequence[Any], Sequence[float]]]], path: Union[str, Path],
               ylabel: str, title: str = "", reference: Optional[float] = None, replace: bool = True) -> Path:
    """One small panel per key of ``panels``, each with lines ``{label: (x values, y values)}``
    (x may be numbers or strings); ``reference`` draws a dashed horizontal line (e.g. clean AUC)."""
    n = max(len(panels), 1)
    fig = _figure(3.2 * n, 3.4)
    for i, (name, lines) in enumerate(panels.items(), 1):
        ax = fig.add_subplot(1, n, i)
        for label, (xs, ys) in lines.items():
            pos = np.arange(len(xs))
            ax.plot(pos, ys, marker="o", label=label)
            ax.set_xticks(pos, [str(x) for x in xs])
        if reference is not None:
            ax.axhline(reference, color="0.5", linestyle="--", linewidth=1, label="clean")
        ax.set(title=name, ylim=(0, 1.02), ylabel=ylabel if i == 1 else None)
        ax.grid(alpha=0.3)
        if i == 1:
            ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, path, replace)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# scoring a corpus


@dataclass
class ImageScores:
    """Scores of a list of images under one or more variants (e.g. attack levels).

    scores[key]: float64 [N], each image's most suspicious face, NaN when no face was found or
    the image could not be read; faces[key]: int64 [N] faces found (-1: unreadable);
    errors: ``[(index, path, message)]`` of unreadable images.
    """

    scores: Dict[Any, np.ndarray]
    faces: Dict[Any, np.ndarray]
    errors: List[Tuple[int, str, str]] = field(default_factory=list)


Transform = Callable[[np.ndarray, int], np.ndarray]


def score_images(detector: Any, images: Sequence[Any], transforms: Optional[Mapping[Any, Optional[Transform]]] = None,
                 aligned: Optional[bool] = None, chunk_size: int = 32,
                 progress: Optional[Callable[[int], None]] = None) -> ImageScores:
    """Score every image (path, array, PIL image) with a fitted ``FakeSpotter``.

    transforms: ``{key: f(rgb uint8 [H, W, 3], image index) -> rgb}`` or None for the image as
    it is (default ``{"clean": None}``); each image is decoded once and scored under every
    transform. aligned: the inputs are aligned crops (the transform then sees the resized
    chip); default the detector's own setting. Otherwise the transform sees the decoded image
    before face detection, so an attack can also lose faces. An image that cannot be decoded
    is recorded in ``errors``, never scored. Holds ``chunk_size`` images at a time.
    """
    aligned = detector.aligned if aligned is None else bool(aligned)
    out = score_images_with(lambda chips: {"_": detector.decision_function(chips).numpy()}, images,
                            size=int(detector.tap_.preprocessing.size[0]), transforms=transforms, aligned=aligned,
                            upsample=detector.upsample, weak_face_score=detector.weak_face_score,
                            detect_pixels=detector.detect_pixels, chunk_size=chunk_size, progress=progress)
    return out["_"]


def score_images_with(score: Callable[[np.ndarray], Mapping[str, Any]], images: Sequence[Any], size: int,
                      transforms: Optional[Mapping[Any, Optional[Transform]]] = None, aligned: bool = False,
                      upsample: int = 1, weak_face_score: float = WEAK_FACE_SCORE,
                      detect_pixels: int = DETECT_PIXELS, chunk_size: int = 32,
                      progress: Optional[Callable[[int], None]] = None) -> Dict[str, ImageScores]:
    """Score every image with several detectors at once: ``score(chips uint8 [M, size, size, 3])
    -> {name: scores [M]}`` is called on the chips of every chunk and transform, so decoding,
    face detection and the attacks are done once for all detectors. Returns ``{name:
    ImageScores}`` (their ``faces`` and ``errors`` are the same objects). Otherwise as
    :func:`score_images`.
    """
    from . import faces as _faces

    transforms = dict(transforms) if transforms is not None else {"clean": None}
    n = len(images)
    scores: Dict[str, Dict[Any, np.ndarray]] = {}
    nfaces = {k: np.zeros(n, dtype=np.int64) for k in transforms}
    errors: List[Tuple[int, str, str]] = []
    for start in range(0, n, chunk_size):
        decoded: List[Tuple[int, np.ndarray]] = []
        for i in range(start, min(start + chunk_size, n)):
            try:
                rgb = _faces.load_image(images[i])
                if aligned:
                    rgb = _faces.chip_from_aligned(rgb, size=size)
                decoded.append((i, rgb))
            except Exception as e:  # an unreadable file becomes an error record, never a score
                errors.append((i, str(images[i]), f"{type(e).__name__}: {e}"))
                for k in transforms:
                    nfaces[k][i] = -1
        for key, f in transforms.items():
            chip_list, owner = [], []
            for i, rgb in decoded:
                x = rgb if f is None else f(rgb, i)
                if aligned:
                    chip_list.append(x)
                    owner.append(i)
                else:
                    for face in _faces.detect_and_align(x, upsample=upsample, size=size,
                                                        weak_face_score=weak_face_score,
                                                        detect_pixels=detect_pixels):
                        chip_list.append(face.chip)
                        owner.append(i)
            for i in owner:
                nfaces[key][i] += 1
            if not chip_list:
                continue
            for name, per_chip in score(np.stack(chip_list)).items():
                per_chip = np.asarray(per_chip, dtype=np.float64).reshape(-1)
                table = scores.setdefault(name, {k: np.full(n, np.nan) for k in transforms})[key]
                for i, v in zip(owner, per_chip):
                    table[i] = v if math.isnan(table[i]) else max(table[i], v)
        if progress is not None:
            progress(min(start + chunk_size, n) - start)
    if not scores:  # nothing was scored: learn the names from an empty call
        scores = {name: {k: np.full(n, np.nan) for k in transforms}
                  for name in score(np.zeros((0, size, size, 3), dtype=np.uint8))}
    return {name: ImageScores(scores=s, faces=nfaces, errors=errors) for name, s in scores.items()}
