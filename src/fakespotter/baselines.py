"""Baseline detectors, trained and scored side by side with a FakeSpotter model.

Every baseline takes face chips (``uint8 [N, H, W, 3]`` RGB, the backbone's input size) and
follows one interface: ``fit(chips, labels) -> self`` (labels 1 = fake, 0 = real) and
``decision_function(chips) -> float64 [N]``, logits of "fake" (higher = more likely synthetic).

* ``descriptor-probe`` (:class:`DescriptorProbe`): logistic regression on the backbone's final
  descriptor (dlib: the 128-d face descriptor), standardised: the linear-probe idea of UnivFD
  (Ojha et al., CVPR 2023) on a face-recognition network.
* ``spectrum`` (:class:`SpectrumDetector`): grey chip -> 2-D FFT -> log power -> azimuthal
  average in a fixed number of radial bins -> logistic regression (Durall et al., CVPR 2020).
* ``mnc-only`` (:class:`MNCOnly`): FakeSpotter's mean neuron coverage alone, one number per
  monitored layer (paper Eq. 2 with per-layer thresholds, Eq. 1, from the training chips), read
  by logistic regression: what the neuron *pattern* adds over the coverage.
* ``fs-channel`` / ``fs-element`` / ``fs-per-layer`` / ``fs-per-neuron``
  (:class:`FakeSpotterVariant`): FakeSpotter itself, trained with the evaluated model's
  settings except the one named (granularity or threshold mode).

The logistic regressions are :class:`LogisticProbe` (standardised features, L2 penalty, Newton
steps in float64: the objective of scikit-learn's ``LogisticRegression(C=...)``, no extra
dependency). :class:`BaselineSuite` trains a set of baselines on one split and scores them
together; ``descriptor-probe`` and ``mnc-only`` share one backbone pass per chip batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "BASELINES", "DESCRIPTIONS", "LogisticProbe", "spectrum_features", "azimuthal_average", "BackbonePass",
    "BackboneReader", "DescriptorProbe", "SpectrumDetector", "MNCOnly", "FakeSpotterVariant", "BaselineSuite",
    "resolve_baselines", "make_baseline",
]

DESCRIPTIONS = {
    "descriptor-probe": "logistic regression on the backbone's final descriptor (UnivFD-style linear probe)",
    "spectrum": "azimuthally averaged log power spectrum + logistic regression (Durall et al. 2020)",
    "mnc-only": "FakeSpotter ablation: per-layer mean neuron coverage only + logistic regression",
    "fs-channel": "FakeSpotter ablation: the model's settings with channel granularity",
    "fs-element": "FakeSpotter ablation: the model's settings with element granularity",
    "fs-per-layer": "FakeSpotter ablation: the model's settings with per-layer thresholds",
    "fs-per-neuron": "FakeSpotter ablation: the model's settings with per-neuron thresholds",
}
BASELINES = tuple(DESCRIPTIONS)
_VARIANTS = {"fs-channel": ("granularity", "channel"), "fs-element": ("granularity", "element"),
             "fs-per-layer": ("threshold_mode", "per_layer"), "fs-per-neuron": ("threshold_mode", "per_neuron")}


def _check_chips(chips: Any, what: str) -> np.ndarray:
    if isinstance(chips, torch.Tensor):
        chips = chips.numpy()
    if not isinstance(chips, np.ndarray):
        raise TypeError(f"{what}: chips must be a uint8 array [N, H, W, 3], got {type(chips).__name__}")
    if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[3] != 3:
        raise ValueError(f"{what}: chips must be uint8 [N, H, W, 3] RGB, got {chips.dtype} of shape {list(chips.shape)}")
    return chips


def _check_labels(y: Any, n: int, what: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{what}: {y.shape[0]} labels for {n} chips")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0 (real) or 1 (fake), got values {np.unique(y)[:5].tolist()}")
    if len(np.unique(y)) < 2:
        raise ValueError(f"{what}: training needs both real (0) and fake (1) chips, got only class {int(y[0]) if n else 'none'}")
    return y.astype(np.int64)


def _not_fitted(obj: Any, attr: str) -> None:
    if not hasattr(obj, attr):
        from .classifier import NotFittedError

        raise NotFittedError(f"this {type(obj).__name__} is not fitted yet; call fit(chips, labels)")


# ----------------------------------------------------------------------------------------------
# logistic regression


class LogisticProbe:
    """L2-penalised logistic regression on standardised features (scikit-learn contract).

    Minimises ``0.5 * |w|^2 + C * sum(log-loss)`` (intercept not penalised), the objective of
    ``sklearn.linear_model.LogisticRegression(C=C)``, on features standardised with the training
    mean and standard deviation (constant features get scale 1). Newton steps in float64 with a
    backtracking line search: deterministic, no random state.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 100, tol: float = 1e-10):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X: Any, y: Any) -> "LogisticProbe":
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"LogisticProbe.fit: X must be [N, features], got shape {list(X.shape)}")
        if not np.isfinite(X).all():
            raise ValueError("LogisticProbe.fit: X holds NaN or infinite values")
        if not self.C > 0:
            raise ValueError(f"LogisticProbe: C must be > 0, got {self.C}")
        y = _check_labels(y, X.shape[0], "LogisticProbe.fit").astype(np.float64)
        self.mean_ = X.mean(axis=0)
        scale = X.std(axis=0)
        self.scale_ = np.where(scale > 0, scale, 1.0)
        Z = np.c_[(X - self.mean_) / self.scale_, np.ones(len(X))]
        d = Z.shape[1]
        reg = np.full(d, 1.0 / self.C)
        reg[-1] = 0.0

        def loss(w: np.ndarray) -> float:
            t = Z @ w
            return float(np.sum(np.logaddexp(0.0, t) - y * t) + 0.5 * np.sum(reg * w * w))

        w = np.zeros(d)
        f = loss(w)
        self.n_iter_ = 0
        for it in range(int(self.max_iter)):
            p = 1.0 / (1.0 + np.exp(-(Z @ w)))
            g = Z.T @ (p - y) + reg * w
            H = (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(reg) + 1e-12 * np.eye(d)
            step = np.linalg.solve(H, g)
            a = 1.0
            while True:
                w_new = w - a * step
                f_new = loss(w_new)
                if f_new <= f - 1e-4 * a * float(g @ step) or a < 1e-10:
                    break
                a *= 0.5
            done = f - f_new <= self.tol * max(1.0, abs(f))
            w, f = w_new, f_new
            self.n_iter_ = it + 1
            if done:
                break
        self.coef_ = w[:-1] / self.scale_
        self.intercept_ = float(w[-1] - np.sum(w[:-1] * self.mean_ / self.scale_))
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        _not_fitted(self, "coef_")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"LogisticProbe: X must be [N, {self.n_features_in_}], got shape {list(X.shape)}")
        return X @ self.coef_ + self.intercept_


# ----------------------------------------------------------------------------------------------
# spectrum (Durall et al. 2020)


def azimuthal_average(power: np.ndarray, bins: int) -> np.ndarray:
    """Mean of ``power [..., H, W]`` (an fftshift-ed 2-D spectrum, DC at ``(H // 2, W // 2)``)
    over rings of the radial frequency ``r = sqrt(du^2 + dv^2)`` in pixels: bin ``k`` holds
    ``k * R / bins <= r < (k + 1) * R / bins`` with ``R = min(H, W) // 2`` (the inscribed circle;
    the corners beyond it are left out). Returns ``[..., bins]``."""
    if int(bins) != bins or bins < 1:
        raise ValueError(f"azimuthal_average: bins must be a positive int, got {bins!r}")
    h, w = power.shape[-2:]
    r_max = min(h, w) // 2
    if bins > r_max:
        raise ValueError(f"azimuthal_average: at most {r_max} bins for a {h}x{w} spectrum, got {bins}")
    v, u = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
    r = np.sqrt(u.astype(np.float64) ** 2 + v.astype(np.float64) ** 2)
    k = np.floor(r * bins / r_max).astype(np.int64).reshape(-1)
    inside = k < bins
    onehot = np.zeros((h * w, bins))
    onehot[np.flatnonzero(inside), k[inside]] = 1.0
    flat = power.reshape(*power.shape[:-2], h * w)
    return (flat @ onehot) / onehot.sum(axis=0)


def spectrum_features(chips: Any, bins: int = 64, eps: float = 1e-8) -> np.ndarray:
    """float64 [N, bins]: the azimuthally averaged log power spectrum of each chip's grey image
    (ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` on 0..255), ``log(|FFT|^2 + eps)``."""
    x = _check_chips(chips, "spectrum_features").astype(np.float64)
    grey = x @ np.array([0.299, 0.587, 0.114])
    spec = np.fft.fftshift(np.fft.fft2(grey, axes=(-2, -1)), axes=(-2, -1))
    return azimuthal_average(np.log(np.abs(spec) ** 2 + eps), bins)


class SpectrumDetector:
    """Durall et al. (2020): the 1-D power spectrum of a chip, classified by logistic regression.

    As here, not as in the paper: ``bins`` radial bins of the inscribed circle (at most one per
    pixel of its radius: ``bins_``), the corners beyond it left out; each bin standardised over
    the training chips (Durall et al. min-max scale each spectrum, which takes brightness and
    contrast out); the backbone's chips, not the images at their own resolution."""

    name = "spectrum"

    def __init__(self, bins: int = 64, C: float = 1.0):
        self.bins = bins
        self.C = C

    def fit(self, chips: Any, labels: Any, validation: Any = None) -> "SpectrumDetector":
        x = _check_chips(chips, "SpectrumDetector.fit")
        self.bins_ = min(int(self.bins), min(x.shape[1:3]) // 2)  # (a backbone under 128 px: fewer bins)
        self.probe_ = LogisticProbe(C=self.C).fit(spectrum_features(x, self.bins_), labels)
        return self

    def decision_function(self, chips: Any) -> np.ndarray:
        _not_fitted(self, "probe_")
        return self.probe_.decision_function(spectrum_features(_check_chips(chips, "SpectrumDetector"), self.bins_))


# ----------------------------------------------------------------------------------------------
# backbone features: one pass gives the descriptor and every layer's channel values


@dataclass
class BackbonePass:
    """What one backbone forward over a chip batch gives the backbone baselines.

    descriptor: float32 [N, D], the backbone's final descriptor (its last default layer;
    dlib: ``fc``, 128-d). values: one float32 [N, C_l] per monitored layer, each neuron's value
    in channel granularity (the spatial mean, computed as the native op does).
    """

    descriptor: np.ndarray
    values: List[np.ndarray]


class BackboneReader:
    """Runs a backbone once per chip batch and keeps the descriptor and the channel values of
    ``layers`` (default: the backbone's default layers)."""

    def __init__(self, backbone: str = "dlib_resnet_v1", layers: Optional[Sequence[str]] = None,
                 batch_size: int = 64, device: str = "cpu"):
        from .backbones import get_backbone
        from .taps import Tap

        bb = get_backbone(backbone)
        bb.module.to(device)
        self.layers = list(bb.default_layers if layers is None else layers)
        self.descriptor_layer = bb.default_layers[-1]
        names = self.layers + ([self.descriptor_layer] if self.descriptor_layer not in self.layers else [])
        self.tap = Tap(bb, names, granularity="channel")
        self.batch_size = int(batch_size)

    def __call__(self, chips: Any) -> BackbonePass:
        from .calibration import neuron_values
        from .features import prepare_chips

        x = prepare_chips(_check_chips(chips, "BackboneReader"), self.tap, "BackboneReader")
        names = list(self.tap.layers)
        parts: List[List[np.ndarray]] = [[] for _ in names]

        def keep(i: int, a: torch.Tensor) -> None:
            parts[i].append(neuron_values(a, "channel").cpu().numpy())

        for start in range(0, x.shape[0], self.batch_size):
            self.tap.capture(self.tap.prepare(x[start:start + self.batch_size]), keep)
        cat = [np.concatenate(p) if p else np.zeros((0, s.features), np.float32)
               for p, s in zip(parts, self.tap.layout.layers)]
        return BackbonePass(descriptor=cat[names.index(self.descriptor_layer)],
                            values=[cat[names.index(n)] for n in self.layers])


class _BackboneBaseline:
    def __init__(self, backbone: str = "dlib_resnet_v1", layers: Optional[Sequence[str]] = None,
                 C: float = 1.0, batch_size: int = 64):
        self.backbone = backbone
        self.layers = layers
        self.C = C
        self.batch_size = batch_size

    def _pass(self, chips: Any, passed: Optional[BackbonePass]) -> BackbonePass:
        if passed is not None:
            return passed
        if not hasattr(self, "reader_"):
            self.reader_ = BackboneReader(self.backbone, self.layers, self.batch_size)
        return self.reader_(chips)

    def _features(self, p: BackbonePass) -> np.ndarray:
        raise NotImplementedError

    def fit(self, chips: Any, labels: Any, validation: Any = None, backbone_pass: Optional[BackbonePass] = None):
        p = self._pass(_check_chips(chips, f"{type(self).__name__}.fit"), backbone_pass)
        self._prepare(p)
        self.probe_ = LogisticProbe(C=self.C).fit(self._features(p), labels)
        return self

    def _prepare(self, p: BackbonePass) -> None:
        pass

    def decision_function(self, chips: Any, backbone_pass: Optional[BackbonePass] = None) -> np.ndarray:
        _not_fitted(self, "probe_")
        return self.probe_.decision_function(self._features(self._pass(chips, backbone_pass)))


class DescriptorProbe(_BackboneBaseline):
    """A linear probe on the frozen backbone's final descriptor (the UnivFD idea)."""

    name = "descriptor-probe"

    def _features(self, p: BackbonePass) -> np.ndarray:
        return p.descriptor


class MNCOnly(_BackboneBaseline):
    """Mean neuron coverage per monitored layer (channel neurons, one threshold per layer: the
    mean of the layer's neuron values over the training chips) -> logistic regression.

    ``thresholds_``: float64 [L]; ``mnc(pass)``: float32 [N, L], the fraction of each layer's
    neurons with ``float32(value) > float32(threshold)`` (the tap's bits, counted).
    """

    name = "mnc-only"

    def _prepare(self, p: BackbonePass) -> None:
        self.thresholds_ = np.array([math.fsum(v.astype(np.float64).reshape(-1)) / max(v.size, 1) for v in p.values])

    def mnc(self, p: BackbonePass) -> np.ndarray:
        cols = [(v > np.float32(t)).mean(axis=1) for v, t in zip(p.values, self.thresholds_)]
        return np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((len(p.descriptor), 0), np.float32)

    def _features(self, p: BackbonePass) -> np.ndarray:
        return self.mnc(p)


class FakeSpotterVariant:
    """FakeSpotter itself with some settings replaced (an ablation); ``params`` are
    ``FakeSpotter`` keyword arguments (e.g. the evaluated model's ``get_params()``), and
    ``augment``, the augmenter ``fit`` gets (the model's own, so that an ablation changes one
    setting only)."""

    def __init__(self, name: str, params: Mapping[str, Any]):
        self.name = name
        self.params = dict(params)

    def fit(self, chips: Any, labels: Any, validation: Optional[Tuple[Any, Any]] = None,
            groups: Any = None) -> "FakeSpotterVariant":
        from .detector import FakeSpotter

        x = _check_chips(chips, f"{self.name}.fit")
        y = _check_labels(labels, len(x), f"{self.name}.fit")
        val = None
        if validation is not None:
            vx, vy = _check_chips(validation[0], f"{self.name}.fit(validation)"), np.asarray(validation[1])
            val = (vx[vy == 0], vx[vy == 1])
        grp = None if groups is None else (np.asarray(groups)[y == 0], np.asarray(groups)[y == 1])
        params = {k: v for k, v in self.params.items() if k in FakeSpotter._param_names}
        params["aligned"] = True
        self.detector_ = FakeSpotter(**params).fit(x[y == 0], x[y == 1], validation=val,
                                                  groups=None if val is not None else grp,
                                                  augment=self.params.get("augment"))
        return self

    def decision_function(self, chips: Any) -> np.ndarray:
        _not_fitted(self, "detector_")
        return self.detector_.decision_function(_check_chips(chips, self.name)).numpy().astype(np.float64)


def make_baseline(name: str, model_params: Optional[Mapping[str, Any]] = None, batch_size: int = 64) -> Any:
    """A fresh baseline by name; ``model_params`` (``FakeSpotter.get_params()`` of the evaluated
    model) give the backbone, layers and the FakeSpotter ablations' other settings."""
    params = dict(model_params or {})
    backbone = params.get("backbone", "dlib_resnet_v1")
    if name == "descriptor-probe":
        return DescriptorProbe(backbone, params.get("layers"), batch_size=batch_size)
    if name == "spectrum":
        return SpectrumDetector()
    if name == "mnc-only":
        return MNCOnly(backbone, params.get("layers"), batch_size=batch_size)
    if name in _VARIANTS:
        key, value = _VARIANTS[name]
        return FakeSpotterVariant(name, {**params, key: value, "batch_size": batch_size})
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)} or all")


def resolve_baselines(spec: Union[str, Sequence[str], None], model_params: Optional[Mapping[str, Any]] = None
                      ) -> List[str]:
    """Baseline names from ``"a,b"`` / a list / ``"all"``, in :data:`BASELINES` order of first
    mention. ``all``: the three non-FakeSpotter baselines plus the FakeSpotter ablations whose
    setting differs from the model's (given ``model_params``). Unknown names raise ValueError
    listing the valid ones."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else [s for part in spec for s in str(part).split(",")]
    names: List[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        if item == "all":
            params = dict(model_params or {})
            for n in BASELINES:
                if n in _VARIANTS:
                    key, value = _VARIANTS[n]
                    if params.get(key, {"granularity": "channel", "threshold_mode": "per_layer"}[key]) == value:
                        continue
                names.append(n)
        elif item in DESCRIPTIONS:
            names.append(item)
        else:
            raise ValueError(f"unknown baseline {item!r}; choose from {', '.join(BASELINES)} or all")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------
# a set of baselines on one split


def _hold_out(groups: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True = validation: ``fraction`` of each class's groups, seeded; a group in
    both classes is one group (its fakes go to the side of its reals)."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    for cls in (0, 1):
        g = np.unique(groups[y == cls])
        n = min(max(1, int(round(len(g) * fraction))), len(g) - 1)
        if n < 1:
            raise ValueError(f"BaselineSuite.fit: the {'fake' if cls else 'real'} class has {len(g)} group(s); "
                             f"at least 2 are needed to hold out a validation part (or give a validation set: validation=)")
        chosen = set(g[rng.permutation(len(g))[:n]].tolist())
        val |= (y == cls) & np.isin(groups, list(chosen))
    shared = (y == 1) & np.isin(groups, groups[y == 0])
    val[shared] = np.isin(groups[shared], groups[(y == 0) & val])
    if val[y == 1].all() or not val[y == 1].any():
        raise ValueError("BaselineSuite.fit: the fakes share their groups with the reals, and following the reals' "
                         "split leaves no fake on one side; give more groups or a validation set (validation=)")
    return val


class BaselineSuite:
    """Trains the named baselines on one split and scores them together.

    fit(chips, labels, groups=None, validation=None): without ``validation`` (chips, labels),
    ``validation_fraction`` of each class's groups (default: each chip its own group) is held
    out, seeded, the same part for every baseline; a group in both classes is held out whole.
    Each baseline is fitted on the rest; its operating threshold (``operating_thresholds_[name]``,
    a logit) is picked on the validation chips at ``target_fpr`` (or ``target_tpr``, the model's
    rule when it has one), as ``FakeSpotter`` does. The backbone baselines share one backbone
    pass per chip batch.
    """

    def __init__(self, names: Sequence[str], model_params: Optional[Mapping[str, Any]] = None,
                 batch_size: int = 64, target_fpr: Optional[float] = None, validation_fraction: Optional[float] = None,
                 seed: Optional[int] = None):
        self.names = list(names)
        self.model_params = dict(model_params or {})
        self.batch_size = batch_size
        self.target_fpr = target_fpr if target_fpr is not None else self.model_params.get("target_fpr", 0.01)
        self.target_tpr = None if target_fpr is not None else self.model_params.get("target_tpr")
        self.validation_fraction = (validation_fraction if validation_fraction is not None
                                    else self.model_params.get("validation_fraction", 0.25))
        self.seed = seed if seed is not None else self.model_params.get("seed", 0)

    def _reader(self) -> Optional[BackboneReader]:
        users = [b for b in self.baselines_.values() if isinstance(b, _BackboneBaseline)]
        if not users:
            return None
        if not hasattr(self, "reader_"):
            self.reader_ = BackboneReader(users[0].backbone, users[0].layers, self.batch_size)
        return self.reader_

    def fit(self, chips: Any, labels: Any, groups: Any = None,
            validation: Optional[Tuple[Any, Any]] = None) -> "BaselineSuite":
        from .detector import _operating_threshold

        x = _check_chips(chips, "BaselineSuite.fit")
        y = _check_labels(labels, len(x), "BaselineSuite.fit")
        if validation is None:
            g = np.arange(len(x)) if groups is None else np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
            val = _hold_out(np.asarray(g).reshape(-1), y, self.validation_fraction, self.seed)
            xv, yv, x, y = x[val], y[val], x[~val], y[~val]
        else:
            xv = _check_chips(validation[0], "BaselineSuite.fit(validation)")
            yv = _check_labels(validation[1], len(xv), "BaselineSuite.fit(validation)")
        self.baselines_ = {n: make_baseline(n, self.model_params, self.batch_size) for n in self.names}
        reader = self._reader()
        p = reader(x) if reader is not None else None
        for name, b in self.baselines_.items():
            if isinstance(b, _BackboneBaseline):
                b.fit(x, y, backbone_pass=p)
            elif isinstance(b, FakeSpotterVariant):
                b.fit(x, y, validation=(xv, yv))
            else:
                b.fit(x, y)
        scores = self.decision_functions(xv)
        self.operating_thresholds_ = {n: _operating_threshold(s[yv == 0], s[yv == 1], self.target_fpr, self.target_tpr)
                                      for n, s in scores.items()}
        self.counts_ = {"train": {"real": int((y == 0).sum()), "fake": int((y == 1).sum())},
                        "validation": {"real": int((yv == 0).sum()), "fake": int((yv == 1).sum())}}
        return self

    def decision_functions(self, chips: Any) -> Dict[str, np.ndarray]:
        """``{name: float64 [N] logits of "fake"}`` for every baseline."""
        _not_fitted(self, "baselines_")
        x = _check_chips(chips, "BaselineSuite")
        reader = self._reader()
        p = reader(x) if reader is not None and len(x) else None
        out = {}
        for name, b in self.baselines_.items():
            if len(x) == 0:
                out[name] = np.zeros(0)
            elif isinstance(b, _BackboneBaseline):
                out[name] = b.decision_function(x, backbone_pass=p)
            else:
                out[name] = b.decision_function(x)
        return out
