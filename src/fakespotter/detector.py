"""The FakeSpotter detector: backbone + tap (layers, granularity, thresholds) + bitset classifier
+ an operating threshold. The embedding API.

>>> det = FakeSpotter(granularity="channel").fit(real_images, fake_images)   # doctest: +SKIP
>>> det.predict(["photo.jpg"])                                               # doctest: +SKIP
>>> det.save("detector.fsm"); FakeSpotter.load("detector.fsm")              # doctest: +SKIP

``fit`` turns both classes into face chips through the same pipeline, holds out a validation
part (by image: the faces of one image never straddle the split), calibrates the thresholds on
the training chips of both classes (paper Eq. 1, or per neuron), packs every chip into a row,
trains the classifier on the rows with early stopping on the validation rows, and picks the
operating threshold on the validation rows at the target false-positive rate.

Scores are logits of "fake" (higher = more likely synthetic). Inputs to the scoring methods may
be packed rows (int64 ``[N, words]``), a chip batch (uint8 ``[N, H, W, 3]`` or float32
``[N, 3, H, W]`` in 0..255), or a sequence of images (paths, arrays, PIL images): then each
image gets the score of its most suspicious face, and NaN when no face was found.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import artifact
from .backbones import DEFAULT_BACKBONE, get_backbone, list_backbones
from .calibration import MODES as THRESHOLD_MODES, ThresholdCalibrator, Thresholds
from .classifier import BitsetLogisticClassifier, BitsetMLPClassifier, NotFittedError
from .evaluate import roc_auc
from .faces import DETECT_PIXELS, WEAK_FACE_SCORE, check_detect_pixels, check_weak_face_score
from .features import (MAX_BATCH_SIZE, FaceRows, _is_chip_batch, as_image_list, check_batch_size,
                       chips as make_chips, features, prepare_chips, rows_tensor)
from .taps import Tap

__all__ = ["FakeSpotter", "CLASSES", "DEFAULT_MODEL", "default_model_path", "resolve_model",
           "describe_operating_threshold"]

CLASSES = ("real", "fake")
DEFAULT_MODEL = "default"  # names the embedded default detector wherever a model file is expected
TRAINING_IMAGES = artifact.TRAINING_IMAGES
TRAIN_DEFAULT_COMMAND = "python scripts/train_default.py"


def default_model_path() -> Path:
    """The embedded default detector's file inside the installed package (see the README's model
    card; trained by ``scripts/train_default.py`` on ``fakespotter data build``'s train split)."""
    return Path(__file__).with_name("models") / "default.fsm"


def is_default_model(model: Any) -> bool:
    """Whether ``model`` names the embedded default: the string ``"default"`` (not a path object,
    nor ``"./default"``, which name a file)."""
    return isinstance(model, str) and model == DEFAULT_MODEL


def resolve_model(model: Union[str, Path]) -> Path:
    """A model file path; the string ``"default"`` (:data:`DEFAULT_MODEL`) is the embedded default."""
    if not is_default_model(model):
        return Path(model)
    path = default_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"the embedded default detector is missing from this installation ({path}); "
                                f"reinstall fakespotter, or train it with '{TRAIN_DEFAULT_COMMAND}'")
    return path
_CLASSIFIERS = {"mlp": BitsetMLPClassifier, "logistic": BitsetLogisticClassifier}


def _operating_threshold(real_scores: np.ndarray, fake_scores: np.ndarray, target_fpr: float,
                         target_tpr: Optional[float] = None) -> Dict[str, Any]:
    """The operating threshold t on validation scores ("fake" when score > t).

    Without ``target_tpr``: the lowest t with FPR = mean(real > t) <= target_fpr.  With it: the
    highest t with TPR = mean(fake > t) >= target_tpr (``target_fpr`` is then not used).  Both
    rates at t are recorded."""
    if target_tpr is None:
        real_sorted = np.sort(real_scores)[::-1]
        k = int(math.floor(target_fpr * len(real_sorted) + 1e-9))  # reals allowed above t
        t = float(real_sorted[k]) if k < len(real_sorted) else float(real_sorted[-1]) - 1e-6
    else:
        fake_sorted = np.sort(np.asarray(fake_scores))[::-1]
        m = max(1, int(math.ceil(target_tpr * len(fake_sorted) - 1e-9)))  # fakes needed above t
        # the next value below, in the scores' own precision (they are compared in it)
        t = float(np.nextafter(fake_sorted[m - 1], fake_sorted.dtype.type(-np.inf)))
    return {
        "logit": t,
        "target_fpr": None if target_tpr is not None else float(target_fpr),
        "target_tpr": None if target_tpr is None else float(target_tpr),
        "fpr_at_validation": float(np.mean(real_scores > t)),
        "tpr_at_validation": float(np.mean(fake_scores > t)),
    }


def describe_operating_threshold(op: Dict[str, Any]) -> str:
    """``op`` (a model's ``operating_threshold_``) in words, e.g. for ``info`` and reports."""
    rule = (f"for TPR >= {op['target_tpr']} on validation fakes" if op.get("target_tpr") is not None
            else f"for FPR <= {op.get('target_fpr')} on validation reals")
    return (f"logit {op['logit']:.4g} {rule} (validation FPR {op.get('fpr_at_validation', float('nan')):.4g}, "
            f"TPR {op.get('tpr_at_validation', float('nan')):.4g})")


class FakeSpotter:
    """Detects AI-synthesized faces from the activation bits of a frozen face-recognition CNN.

    Args:
        backbone: registered backbone id (default: dlib's face-recognition ResNet v1).
        layers: monitored layers (default: the backbone's: every post-ReLU output + descriptor).
        granularity: ``"channel"`` (default) or ``"element"`` neurons.
        threshold_mode: ``"per_layer"`` (paper Eq. 1, default) or ``"per_neuron"``.
        classifier: ``"mlp"`` (a shallow network on the activation bits, as the paper's; its size
            and training are this implementation's choices; default) or ``"logistic"``.
        hidden: hidden layer widths of the shallow network (default (16, 16); ``()``: none, a
            logistic regression trained as the network is; the first layer runs on packed bits,
            and its width sets the cost of scoring: see benchmarks/RESULTS.md).
        target_fpr: false-positive rate the operating threshold is picked for on the
            validation split's reals (default 0.01).
        target_tpr: if set, the operating threshold is picked for this true-positive rate on
            the validation split's fakes instead (``target_fpr`` is then not used): the choice
            when the validation reals are too uniform to stand for the reals a user will meet.
        validation_fraction: share of each class's images held out when ``fit`` gets no
            explicit validation set (default 0.25).
        max_epochs: classifier training epochs at most (early stopping usually ends sooner).
        seed: seeds the split and the classifier (default 0): fits are deterministic on CPU.
        batch_size: chips per backbone forward (default 64).
        aligned: inputs are already-aligned face crops (resize only, no detection).
        upsample: dlib detector upsampling (find smaller faces; slower).
        weak_face_score: detections scoring below this are dropped from an image that holds a
            face scoring at least this (default ``faces.WEAK_FACE_SCORE``; 0 keeps every one).
        detect_pixels: the most pixels the face detector works on; in larger images it skips
            the levels of its pyramid above that size (default ``faces.DETECT_PIXELS``; 0 for no
            limit).
        device: where the backbone runs (default "cpu").

    After ``fit`` (or ``load``), besides the fitted parts: ``training_summary_`` (counts, metrics,
    sources, seed) and ``training_images_``, the fingerprints (first 64 bits of the sha256,
    int64 [n], sorted) of the image files it was trained and validated on, or None when it
    learnt from arrays; both are saved in the model file. ``fakespotter evaluate`` and
    ``robustness`` warn when they score such files.
    """

    classes_ = CLASSES

    def __init__(
        self,
        backbone: str = "dlib_resnet_v1",
        layers: Optional[Sequence[str]] = None,
        granularity: str = "channel",
        threshold_mode: str = "per_layer",
        classifier: str = "mlp",
        hidden: Sequence[int] = (16, 16),
        target_fpr: float = 0.01,
        target_tpr: Optional[float] = None,
        validation_fraction: float = 0.25,
        max_epochs: int = 200,
        seed: int = 0,
        batch_size: int = 64,
        aligned: bool = False,
        upsample: int = 1,
        weak_face_score: float = WEAK_FACE_SCORE,
        detect_pixels: int = DETECT_PIXELS,
        device: str = "cpu",
    ):
        self.backbone = backbone
        self.layers = layers
        self.granularity = granularity
        self.threshold_mode = threshold_mode
        self.classifier = classifier
        self.hidden = hidden
        self.target_fpr = target_fpr
        self.target_tpr = target_tpr
        self.validation_fraction = validation_fraction
        self.max_epochs = max_epochs
        self.seed = seed
        self.batch_size = batch_size
        self.aligned = aligned
        self.upsample = upsample
        self.weak_face_score = weak_face_score
        self.detect_pixels = detect_pixels
        self.device = device

    _param_names = ("backbone", "layers", "granularity", "threshold_mode", "classifier", "hidden", "target_fpr",
                    "target_tpr", "validation_fraction", "max_epochs", "seed", "batch_size", "aligned", "upsample",
                    "weak_face_score", "detect_pixels", "device")

    # the settings a fitted model embodies (its tap, thresholds, classifier and operating threshold
    # were made with them): one changed after fit does not change the model, and save refuses it
    _fitted_param_names = ("backbone", "layers", "granularity", "threshold_mode", "classifier", "hidden",
                           "target_fpr", "target_tpr", "validation_fraction", "max_epochs", "seed")

    def _remember_fitted_params(self) -> None:
        self.fitted_params_ = {k: _frozen(getattr(self, k)) for k in self._fitted_param_names}

    def _check_fitted_params(self, what: str) -> None:
        was = getattr(self, "fitted_params_", None)
        if was is None:
            return
        changed = [f"{k} (fitted with {was[k]!r}, now {getattr(self, k)!r})"
                   for k in self._fitted_param_names if _frozen(getattr(self, k)) != was[k]]
        if changed:
            raise ValueError(f"{what}: {'; '.join(changed)}: changed after fit, which does not change the fitted "
                             f"model; fit again, or set {'it' if len(changed) == 1 else 'them'} back")

    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in self._param_names}

    def __repr__(self) -> str:
        return f"FakeSpotter({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    # -- helpers ---------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.classifier not in _CLASSIFIERS:
            raise ValueError(f"FakeSpotter: classifier must be one of {sorted(_CLASSIFIERS)}, got {self.classifier!r}")
        if not (_is_real(self.target_fpr) and 0.0 < self.target_fpr < 1.0):
            raise ValueError(f"FakeSpotter: target_fpr must be in (0, 1), got {self.target_fpr!r}")
        if self.target_tpr is not None and not (_is_real(self.target_tpr) and 0.0 < self.target_tpr <= 1.0):
            raise ValueError(f"FakeSpotter: target_tpr must be in (0, 1] or None, got {self.target_tpr!r}")
        check_weak_face_score(self.weak_face_score, "FakeSpotter")
        check_detect_pixels(self.detect_pixels, "FakeSpotter")
        if (isinstance(self.hidden, (str, bytes)) or not isinstance(self.hidden, Iterable)
                or not all(_is_int(h, 1) for h in self.hidden)):
            raise ValueError(f"FakeSpotter: hidden must be a sequence of layer widths (ints >= 1), "
                             f"e.g. (16, 16); got {self.hidden!r}")
        if not (_is_real(self.validation_fraction) and 0.0 < self.validation_fraction < 1.0):
            raise ValueError(f"FakeSpotter: validation_fraction must be in (0, 1) (images held out to pick the "
                             f"operating threshold), got {self.validation_fraction!r}")
        check_batch_size(self.batch_size, "FakeSpotter")
        for name, low in (("max_epochs", 1), ("seed", 0), ("upsample", 0)):
            if not _is_int(getattr(self, name), low):
                raise ValueError(f"FakeSpotter: {name} must be an int >= {low}, got {getattr(self, name)!r}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"FakeSpotter: threshold_mode must be 'per_layer' or 'per_neuron', got {self.threshold_mode!r}")
        from .scan import check_device

        check_device(self.device, "FakeSpotter")

    def _new_tap(self) -> Tap:
        bb = get_backbone(self.backbone)
        bb.module.to(self.device)
        return Tap(bb, self.layers, granularity=self.granularity)

    def _chips(self, data: Any, what: str, tap: Tap, files: Optional[List[Any]] = None
               ) -> Tuple["_Part", np.ndarray, int, int]:
        """(chips [M], image index [M], images, images without faces); the chips are those given,
        checked (uint8 [M, H, W, 3] or float32 [M, 3, H, W]), or the faces of images (uint8).
        The images given as file paths are appended to ``files`` when one is given."""
        if _is_chip_batch(data):
            x = _checked_chips(data, tap, what, self.batch_size)
            return _Part(x), np.arange(len(x)), len(x), 0
        images = as_image_list(data)
        if files is not None:
            files.extend(x for x in images if isinstance(x, (str, os.PathLike)))
        c = make_chips(images, aligned=self.aligned, size=tap, upsample=self.upsample,
                       weak_face_score=self.weak_face_score, detect_pixels=self.detect_pixels)
        return _Part(c.array), c.image_index, len(images), len(images) - len(set(c.image_index.tolist()))

    def _rows(self, part: "_Part", tap: Tap) -> torch.Tensor:
        """int64 [len(part), words]: the chips go to float32 on the device one batch at a time."""
        out = [features(x, tap, batch_size=self.batch_size).rows for x in part.batches(self.batch_size)]
        return torch.cat(out) if out else torch.zeros((0, tap.layout.total_words), dtype=torch.int64,
                                                      device=tap.thresholds.device)

    def _split(self, image_index: np.ndarray, n_images: int, rng: np.random.Generator) -> np.ndarray:
        """Boolean mask over chips: True = validation. Whole images go to one side."""
        order = rng.permutation(n_images)
        n_val = min(max(1, int(round(n_images * self.validation_fraction))), n_images - 1)
        val_images = np.zeros(n_images, dtype=bool)
        val_images[order[:n_val]] = True
        return val_images[image_index]

    # -- training --------------------------------------------------------------------------------
    def fit(self, real: Any, fake: Any, validation: Optional[Tuple[Any, Any]] = None,
            sources: Optional[Dict[str, Any]] = None, groups: Optional[Tuple[Any, Any]] = None,
            augment: Optional[Any] = None) -> "FakeSpotter":
        """Train on real and fake images (or chip batches).

        validation: optional ``(real_val, fake_val)``; else ``validation_fraction`` of each
        class's images with a face is held out. groups: ``(real_groups, fake_groups)``, one id
        per image (per chip for chip batches): a source photo, identity or video. The split never
        separates a group; an id found in both classes is one group (its fakes are held out
        with its reals).
        sources: free-form description of where the data came from (fake types, generators,
        packages), stored in the model file's training summary.
        augment: optional ``f(chips uint8 [N, H, W, 3], stream) -> chips`` (e.g.
        ``perturb.Augmenter``) applied to the training chips only, after the validation part is
        held out and before thresholds are calibrated; stream 0 for reals, 1 for fakes.

        Memory: chip batches are held as given (not copied) and the faces of images as uint8
        chips; chips go to float32 on the device ``batch_size`` at a time, as in the scoring
        methods (float32 chips are checked for range a batch at a time too).
        """
        self._check_params()
        created = _created()  # (a bad SOURCE_DATE_EPOCH is said before the work)
        tap = self._new_tap()
        files: List[Any] = []  # the image files it learns from: their fingerprints go in the model file
        xr, ir, nr, nr_missing = self._chips(real, "fit(real)", tap, files)
        xf, if_, nf, nf_missing = self._chips(fake, "fit(fake)", tap, files)
        # the units of the validation split, numbered from 0: the images with a face, or their groups (an
        # image without a face held out would leave its side of the split short)
        ur, uf = np.unique(ir, return_inverse=True)[1], np.unique(if_, return_inverse=True)[1]
        if groups is not None:
            gr, gf = _chip_groups(groups[0], nr, ir, "real"), _chip_groups(groups[1], nf, if_, "fake")
            ur, uf = np.unique(gr, return_inverse=True)[1], np.unique(gf, return_inverse=True)[1]
        sr, sf = int(ur.max(initial=-1)) + 1, int(uf.max(initial=-1)) + 1
        if len(xr) == 0 or len(xf) == 0:
            which = "real" if len(xr) == 0 else "fake"
            raise ValueError(f"FakeSpotter.fit: no face chips from the {which} inputs ({nr if which == 'real' else nf} images, no face found in any)")
        if validation is None:
            rng = np.random.default_rng(self.seed)
            vr, vf = self._split(ur, sr, rng), self._split(uf, sf, rng)
            if groups is not None:  # a group in both classes: its fakes go to the side of its reals
                side = dict(zip(gr.tolist(), vr.tolist()))
                vf = np.array([side.get(g, v) for g, v in zip(gf.tolist(), vf.tolist())], dtype=bool)
            if vr.all() or vf.all() or not vr.any() or not vf.any():
                which, units = ("real", sr) if vr.all() or not vr.any() else ("fake", sf)
                kind = (f"{units} group{'s' * (units != 1)} (the split keeps a group on one side: an image and its "
                        f"byte-identical copies in the CLI, and fakes with the reals of their group)"
                        if groups is not None else f"{units} image{'s' * (units != 1)} with a face")
                raise ValueError(f"FakeSpotter.fit: cannot hold out a validation part of the {which} class "
                                 f"(validation_fraction {self.validation_fraction:g}): its faces come from {kind}; "
                                 f"give more images or a validation set (validation=)")
            tr_r, va_r, tr_f, va_f = xr.subset(~vr), xr.subset(vr), xf.subset(~vf), xf.subset(vf)
        else:
            tr_r, tr_f = xr, xf
            va_r = self._chips(validation[0], "fit(validation real)", tap, files)[0]
            va_f = self._chips(validation[1], "fit(validation fake)", tap, files)[0]
            if len(va_r) == 0 or len(va_f) == 0:
                raise ValueError("FakeSpotter.fit: the validation set needs faces of both classes")

        if augment is not None:
            tr_r = _augmented(augment, tr_r, 0, tap, self.batch_size)
            tr_f = _augmented(augment, tr_f, 1, tap, self.batch_size)

        # Thresholds from the training chips of both classes (paper Eq. 1: calibration.py).
        calibrator = ThresholdCalibrator(tap, mode=self.threshold_mode)
        for part in (tr_r, tr_f):
            for x in part.batches(self.batch_size):
                calibrator.partial_fit(x)
        tap.set_thresholds(calibrator.thresholds_)

        rows_tr = torch.cat([self._rows(tr_r, tap), self._rows(tr_f, tap)])
        y_tr = torch.cat([torch.zeros(len(tr_r)), torch.ones(len(tr_f))]).to(torch.int64)
        rows_va = torch.cat([self._rows(va_r, tap), self._rows(va_f, tap)])
        y_va = torch.cat([torch.zeros(len(va_r)), torch.ones(len(va_f))]).to(torch.int64)

        clf = self._make_classifier().fit(rows_tr, y_tr, validation=(rows_va, y_va))
        s_va = clf.decision_function(rows_va).numpy()
        s_tr = clf.decision_function(rows_tr).numpy()
        op = _operating_threshold(s_va[y_va.numpy() == 0], s_va[y_va.numpy() == 1], self.target_fpr, self.target_tpr)
        ya = y_va.numpy()
        summary = {
            "created": created,
            "counts": {
                "train": {"real": len(tr_r), "fake": len(tr_f)},
                "validation": {"real": len(va_r), "fake": len(va_f)},
                "images": {"real": nr, "fake": nf},
                "images_without_faces": {"real": nr_missing, "fake": nf_missing},
            },
            "sources": sources or {},
            "seed": self.seed,
            "augmentation": _augment_summary(augment),
            "thresholds_images": int(calibrator.n_images_),
            "classifier_best_epoch": int(clf.best_epoch_),
            "metrics": {
                "train_auc": roc_auc(s_tr, y_tr.numpy()),
                "validation_auc": roc_auc(s_va, ya),
                "validation_accuracy_at_operating_threshold": float(np.mean((s_va > op["logit"]) == (ya == 1))),
            },
        }
        self.tap_ = tap
        self.thresholds_ = calibrator.thresholds_
        self.classifier_ = clf
        self.operating_threshold_ = op
        self.training_summary_ = summary
        self.training_images_ = artifact.image_fingerprints(files)
        self.model_id_ = None  # a new model: model_sha256() hashes what save would write
        self._remember_fitted_params()
        return self

    def _make_classifier(self):
        cls = _CLASSIFIERS[self.classifier]
        if cls is BitsetMLPClassifier:
            return cls(hidden=tuple(self.hidden), max_epochs=self.max_epochs, seed=self.seed)
        return cls(max_epochs=self.max_epochs, seed=self.seed)

    # -- scoring -----------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "classifier_"):
            raise NotFittedError("this FakeSpotter is not fitted yet; call fit(real, fake) or FakeSpotter.load(path)")

    def rows(self, X: Any) -> torch.Tensor:
        """Packed rows of a chip batch (or of the faces of images, in order)."""
        self._check_fitted()
        if _is_chip_batch(X):
            return self._chip_rows(X, "rows")
        return self._face_rows(X).collect().rows

    def _chip_rows(self, X: Any, what: str) -> torch.Tensor:
        X = _checked_chips(X, self.tap_, what, self.batch_size)
        return features(X, self.tap_, batch_size=self.batch_size).rows  # float32 a batch at a time

    def _face_rows(self, images: Any) -> FaceRows:
        return FaceRows(images, self.tap_, aligned=self.aligned, batch_size=self.batch_size,
                        upsample=self.upsample, weak_face_score=self.weak_face_score,
                        detect_pixels=self.detect_pixels)

    def decision_function(self, X: Any) -> torch.Tensor:
        """Logit of "fake": per row, per chip, or per image (max over its faces; NaN: no face).

        The classifier scores each row on its own: a chip's logit does not depend on the chips
        scored beside it, unless the backbone's float32 convolutions round one of its neuron
        bits differently at another batch size (rare)."""
        return self._decision(X, "decision_function")

    def _decision(self, X: Any, what: str) -> torch.Tensor:
        self._check_fitted()
        if _is_rows(X):
            return self.classifier_.decision_function(rows_tensor(X))
        if _is_chip_batch(X):
            return self.classifier_.decision_function(self._chip_rows(X, what))
        face_rows = self._face_rows(X)
        scored = [(i, self.classifier_.decision_function(rows)) for i, _, rows in face_rows]  # (a batch at a time:
        out = torch.full((face_rows.images,), float("nan"), dtype=torch.float32)  # no images nor rows kept)
        for index, per_face in scored:
            for i, s in zip(index.tolist(), per_face.tolist()):
                out[i] = s if math.isnan(out[i]) else max(float(out[i]), s)
        return out

    def predict_proba(self, X: Any) -> torch.Tensor:
        """float32 [N, 2]: P(real), P(fake) (NaN for images without a face)."""
        p = torch.sigmoid(self._decision(X, "predict_proba"))
        return torch.stack([1 - p, p], dim=1)

    def predict(self, X: Any) -> np.ndarray:
        """"real" / "fake" at the operating threshold (None for images without a face)."""
        s = self._decision(X, "predict").numpy()
        t = self.operating_threshold_["logit"]
        return np.array([None if math.isnan(v) else CLASSES[int(v > t)] for v in s], dtype=object)

    def explain(self, X: Any) -> Dict[str, Any]:
        """Per-layer mean neuron coverage of each row (packed rows, chips, or the faces of
        images), and each layer's share of the classifier's first-layer weight mass (which layers
        weigh most in the decision). For images, ``image_index`` gives the image of each row
        (an image without a face has none)."""
        self._check_fitted()
        index = None
        if _is_rows(X):
            rows = rows_tensor(X)
        elif _is_chip_batch(X):
            rows = self._chip_rows(X, "explain")
        else:
            f = self._face_rows(X).collect()
            rows, index = f.rows, f.image_index
        w = self.classifier_.first_layer_weight().abs().sum(dim=0)  # (columns of each layer's real features:
        share = torch.stack([w[s.word_offset * 64 : s.word_offset * 64 + s.features].sum()  # its padding bits are
                             for s in self.tap_.layout.layers])  # always 0, their weights untrained)
        share = share / share.sum().clamp_min(1e-30)
        out = {"layers": list(self.tap_.layers), "mnc": self.tap_.mnc(rows), "layer_weight_share": share}
        if index is not None:
            out["image_index"] = index
        return out

    # -- the model file ----------------------------------------------------------------------------
    def save(self, path: Union[str, Path], overwrite: bool = False) -> Path:
        """Write one safetensors model file (see ``artifact``). Never overwrites unless asked."""
        self._check_fitted()
        self._check_params()  # a setting changed after fit that load would refuse: refused now
        self._check_fitted_params("FakeSpotter.save")
        tap = self.tap_
        bb = tap.backbone
        tensors = {f"threshold.{i}": v.detach().reshape(-1).to(torch.float32)
                   for i, v in enumerate(self.thresholds_.values)}
        tensors.update(self.classifier_.state_tensors())
        if getattr(self, "training_images_", None) is not None:
            tensors[TRAINING_IMAGES] = self.training_images_.to("cpu", torch.int64).reshape(-1)
        meta = {
            "fakespotter_version": _version(),
            "torch_version": torch.__version__,
            "backbone": {"id": bb.id, "weights_sha256": bb.weights_sha256,
                         "preprocessing": bb.preprocessing.to_dict(), "input_shape": list(tap.input_shape)},
            "layers": list(tap.layers),
            "granularity": tap.granularity,
            "threshold_mode": self.thresholds_.mode,
            "row_words": tap.layout.total_words,
            "classifier": {"type": self.classifier, "params": _jsonable(self.classifier_.get_params())},
            "operating_threshold": self.operating_threshold_,
            "detector_params": _jsonable(self.get_params()),
            "training": self.training_summary_,
        }
        return artifact.write_model(path, tensors, meta, overwrite=overwrite)

    def to_bytes(self) -> bytes:
        """The model file's bytes (what :meth:`save` writes)."""
        with tempfile.TemporaryDirectory(prefix="fakespotter-") as d:
            return self.save(Path(d) / "model.fsm").read_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, device: str = "cpu") -> "FakeSpotter":
        """A detector from a model file's bytes, with every check of :meth:`load`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"FakeSpotter.from_bytes: expected a model file's bytes, got {type(data).__name__}"
                            + (" (FakeSpotter.load takes a path)" if isinstance(data, (str, os.PathLike)) else ""))
        with tempfile.TemporaryDirectory(prefix="fakespotter-") as d:
            path = Path(d) / "model.fsm"
            path.write_bytes(data)
            try:
                return cls.load(path, device=device)
            except artifact.ModelFileError as e:  # the temporary file means nothing to the caller
                raise artifact.ModelFileError(str(e).replace(str(path), "model bytes")) from None

    def model_sha256(self) -> str:
        """The sha256 of the model file this detector was loaded from, or (fitted here) of the
        file :meth:`save` would write; scan records carry it as ``model``."""
        self._check_fitted()
        if getattr(self, "model_id_", None) is None:
            self.model_id_ = hashlib.sha256(self.to_bytes()).hexdigest()
        return self.model_id_

    def __reduce_ex__(self, protocol: int) -> Any:
        """A fitted detector pickles as its model file (multiprocessing, Ray, joblib send it so):
        unpickling runs :meth:`from_bytes`, with every check of :meth:`load`."""
        if not hasattr(self, "tap_"):
            return super().__reduce_ex__(protocol)
        return (_from_pickled_model, (self.to_bytes(), str(self.device)))

    def __copy__(self) -> "FakeSpotter":
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: Dict[int, Any]) -> "FakeSpotter":
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            setattr(new, k, copy.deepcopy(v, memo))
        return new

    @classmethod
    def default(cls, device: str = "cpu") -> "FakeSpotter":
        """The embedded default detector (README, "Model card"). It uses the default backbone,
        whose weights are registry-fetched: ``python -m fakespotter.weights fetch``. It was
        trained on aligned chips, but images given to it are face-detected and aligned, as
        ``fakespotter scan`` does (set ``aligned = True`` to score already-aligned crops)."""
        det = cls.load(resolve_model(DEFAULT_MODEL), device=device)
        det.aligned = False
        return det

    @classmethod
    def load(cls, path: Union[str, Path], device: str = "cpu") -> "FakeSpotter":
        """Load a model file (the string ``"default"``: the embedded default detector, as
        :meth:`default` gives it; a file of that name is ``"./default"``); anything inconsistent is
        refused with a message naming it."""
        if is_default_model(path):
            return cls.default(device=device)
        from .scan import check_device

        device = check_device(device, "FakeSpotter.load")
        tensors, meta = artifact.read_model(path)
        try:
            bmeta = meta["backbone"]
            layers = meta["layers"]
            if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
                raise ValueError(f"layers must be a list of names, got {layers!r}"[:200])
            granularity = meta["granularity"]
            mode = meta["threshold_mode"]
            if mode not in THRESHOLD_MODES:
                raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {mode!r}")
            ctype = meta["classifier"]["type"]
            cparams = dict(meta["classifier"]["params"])
            op = dict(meta["operating_threshold"])
            params = dict(meta["detector_params"])
            words = int(meta["row_words"])
            training = meta.get("training") or {}
            if not isinstance(op["logit"], numbers.Real) or isinstance(op["logit"], bool) or not math.isfinite(op["logit"]):
                raise ValueError(f"the operating threshold's logit must be a finite number, got {op['logit']!r}")
            if not isinstance(training, dict) or not isinstance(bmeta, dict):
                raise ValueError("backbone and training must be mappings")
            n_thresholds_images = training.get("thresholds_images", 0)
            if not _is_int(n_thresholds_images, 0):
                raise ValueError(f"training.thresholds_images must be a count, got {n_thresholds_images!r}")
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise artifact.ModelFileError(f"{path}: metadata lacks or mangles a required field ({e!r})") from None
        if ctype not in _CLASSIFIERS:
            raise artifact.ModelFileError(f"{path}: unknown classifier type {ctype!r}")
        key = wanted = params.get("backbone", bmeta.get("id"))  # the registry key the detector was built from
        if key not in list_backbones() and bmeta.get("id") in list_backbones():  # registered by its id here
            key = params["backbone"] = bmeta["id"]
        try:
            bb = get_backbone(key)
        except (KeyError, ValueError, TypeError) as e:
            tried = f" (nor is its id {key!r} as registered here: {e})" if key != wanted else f" ({e})"
            raise artifact.ModelFileError(f"{path}: backbone {wanted!r} is not available here{tried}; install the "
                                          f"package that declares it under the entry-point group "
                                          f"fakespotter.backbones (command line, worker processes), or register it "
                                          f"with fakespotter.register_backbone before loading") from None
        if bb.id != bmeta.get("id"):
            raise artifact.ModelFileError(f"{path}: registered backbone {key!r} now gives backbone id {bb.id!r}, "
                                          f"the model was trained on {bmeta.get('id')!r}")
        want_pre = {"preprocessing": bb.preprocessing.to_dict(), "input_shape": list(bb.input_shape)}
        have_pre = {"preprocessing": bmeta.get("preprocessing"), "input_shape": bmeta.get("input_shape")}
        if json.loads(json.dumps(want_pre)) != have_pre:
            raise artifact.ModelFileError(f"{path}: trained with backbone {bb.id!r} preprocessing {have_pre}, but "
                                          f"the registered backbone uses {want_pre}; scores would not be comparable")
        if bmeta.get("weights_sha256") is None:  # written with a Backbone made without one, before they got one
            warnings.warn(f"{path}: the model file records no backbone weights sha256, so the weights of "
                          f"{bb.id!r} cannot be checked against those it was trained with", stacklevel=2)
        elif bb.weights_sha256 != bmeta.get("weights_sha256"):
            fix = ("python -m fakespotter.weights fetch restores the pinned weights" if bb.id == DEFAULT_BACKBONE
                   else f"register {key!r} with the weights it was trained with")
            raise artifact.ModelFileError(
                f"{path}: trained with backbone weights sha256 {bmeta.get('weights_sha256')}, but the "
                f"installed {bb.id} weights are {bb.weights_sha256}; the thresholds and classifier do not "
                f"fit them ({fix})"
            )
        names = [f"threshold.{i}" for i in range(len(layers))]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise artifact.ModelFileError(f"{path}: missing threshold tensors {missing}")
        unexpected = sorted(k for k in tensors if not (k in names or k == TRAINING_IMAGES or k.startswith("classifier.")))
        if unexpected:
            raise artifact.ModelFileError(f"{path}: unexpected tensors {unexpected}")
        seen = tensors.get(TRAINING_IMAGES)
        if seen is not None and (seen.dtype != torch.int64 or seen.dim() != 1):
            raise artifact.ModelFileError(f"{path}: {TRAINING_IMAGES} must be int64 [n], got {seen.dtype} {list(seen.shape)}")
        params["device"] = device
        det = cls(**{k: v for k, v in params.items() if k in cls._param_names})
        if not (det.layers is None and layers == list(bb.default_layers)):  # saving again keeps the bytes
            det.layers = layers
        if isinstance(det.hidden, list):  # JSON has no tuples
            det.hidden = tuple(det.hidden)
        if _is_int(det.batch_size, 1) and det.batch_size > MAX_BATCH_SIZE:  # (a file from before the limit: a
            det.batch_size = MAX_BATCH_SIZE                                   # setting of use, not of the model)
        try:
            det._check_params()
        except (ValueError, TypeError) as e:
            raise artifact.ModelFileError(f"{path}: detector_params: {e}") from None
        bb.module.to(device)
        try:
            tap = Tap(bb, layers, granularity=granularity)
        except ValueError as e:
            raise artifact.ModelFileError(f"{path}: {e}") from None
        if tap.layout.total_words != words:
            raise artifact.ModelFileError(f"{path}: rows of {words} words recorded, but these layers give {tap.layout.total_words}")
        values = []
        for n, slot in zip(names, tap.layout.layers):
            t = tensors[n]
            want = 1 if mode == "per_layer" else slot.features
            if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != want:
                raise artifact.ModelFileError(f"{path}: {n} (layer {slot.name}) must be float32 [{want}], got {t.dtype} {list(t.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise artifact.ModelFileError(f"{path}: {n} (layer {slot.name}) holds NaN or infinite thresholds")
            values.append(t)
        thresholds = Thresholds(backbone_id=bb.id, weights_sha256=bb.weights_sha256, layers=tuple(layers),
                                granularity=granularity, mode=mode,
                                n_images=n_thresholds_images, values=tuple(values))
        tap.set_thresholds(thresholds)
        try:
            clf = _CLASSIFIERS[ctype].from_state_tensors(
                {k: (tuple(v) if isinstance(v, list) else v) for k, v in cparams.items()}, tensors, words)
        except (ValueError, TypeError) as e:
            raise artifact.ModelFileError(f"{path}: {e}") from None
        made = det._make_classifier()  # what the detector's settings give: a refit, and save, use them
        if type(made) is not type(clf) or getattr(made, "hidden", ()) != clf.hidden:
            raise artifact.ModelFileError(f"{path}: detector_params (classifier {det.classifier!r}, hidden "
                                          f"{list(det.hidden)}) contradict the classifier stored ({ctype!r}, hidden "
                                          f"{list(clf.hidden)})")
        det.tap_ = tap
        det.thresholds_ = thresholds
        det.classifier_ = clf
        det.operating_threshold_ = op
        det.training_summary_ = training
        det.training_images_ = seen
        det.model_meta_ = meta
        det.model_id_ = artifact.file_sha256(path)
        det._remember_fitted_params()
        return det


def _frozen(v: Any) -> Any:
    """A setting as compared after fit: sequences as tuples (JSON gives lists)."""
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_rows(X: Any) -> bool:
    """Packed rows: int64 [N, words], a tensor or a numpy array (never an image: images are uint8
    or uint16)."""
    return isinstance(X, (torch.Tensor, np.ndarray)) and X.ndim == 2 and X.dtype in (torch.int64, np.int64)


def _from_pickled_model(data: bytes, device: str) -> FakeSpotter:
    return FakeSpotter.from_bytes(data, device=device)


class _Part:
    """The chips ``chips[index]`` of a fit, read a batch at a time; ``chips`` stays as given
    (uint8 [N, H, W, 3] or float32 [N, 3, H, W], numpy or torch): no whole float32 copy is made."""

    def __init__(self, chips: Any, index: Optional[np.ndarray] = None):
        self.chips = chips
        self.index = np.arange(len(chips)) if index is None else index

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, mask: np.ndarray) -> "_Part":
        return _Part(self.chips, self.index[mask])

    def batches(self, size: int) -> Iterator[Any]:
        for start in range(0, len(self.index), size):
            yield self.chips[self.index[start : start + size]]


def _checked_chips(chips: Any, tap: Tap, what: str, batch_size: int) -> Any:
    """``chips`` after every check of ``prepare_chips`` (its errors name ``what``), neither copied
    nor converted. Float32 values are checked a batch at a time, as :func:`features` checks them."""
    h, w = tap.preprocessing.size
    if isinstance(chips, (np.ndarray, torch.Tensor)):
        lib = torch if isinstance(chips, torch.Tensor) else np
        shape = tuple(chips.shape[1:])
        if chips.dtype == lib.uint8 and shape == (h, w, 3):
            return chips  # uint8 chips are never refused by value
        if chips.dtype == lib.float32 and shape == (3, h, w):
            for start in range(0, len(chips), batch_size):
                prepare_chips(chips[start : start + batch_size], tap, what)
            return chips
    prepare_chips(chips, tap, what)  # refuses any other type, dtype or shape before converting
    return chips


def _augmented(augment: Any, part: _Part, stream: int, tap: Tap, batch_size: int) -> _Part:
    """Apply ``augment`` to the chips of ``part`` as uint8 [N, H, W, 3] (float chips rounded)."""
    if len(part) == 0:
        return part
    def as_u8(x: Any) -> torch.Tensor:  # (float chips: one batch of float32 at a time)
        x = torch.as_tensor(x)
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1) if x.dtype == torch.float32 else x

    out = augment(torch.cat([as_u8(x) for x in part.batches(batch_size)]).cpu().numpy(), stream)
    return _Part(_checked_chips(np.asarray(out), tap, "fit(augment)", batch_size))


def _chip_groups(groups: Any, n_images: int, image_index: np.ndarray, what: str) -> np.ndarray:
    """The group id of each chip, as text (so 7 and "7" are one id across the classes)."""
    g = np.asarray(groups)
    if g.shape != (n_images,):
        raise ValueError(f"FakeSpotter.fit: {what} groups must have one id per image ({n_images}; one per chip "
                         f"for chip batches), got shape {g.shape}")
    return g.astype(str)[image_index]


def _created() -> str:
    """The training's time stamp (UTC): now, or ``SOURCE_DATE_EPOCH`` when set, the reproducible-
    builds convention, so that the same training gives a byte-identical model file."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        when = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else None
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {epoch!r}") from None
    return (when or datetime.datetime.now(datetime.timezone.utc)).isoformat(timespec="seconds")


def _augment_summary(augment: Any) -> Optional[Dict[str, Any]]:
    if augment is None:
        return None
    keys = ("fraction", "seed", "attacks")
    if all(hasattr(augment, k) for k in keys):
        return {"type": type(augment).__name__, **{k: getattr(augment, k) for k in keys}}
    return {"type": getattr(augment, "__name__", type(augment).__name__)}


def _version() -> str:
    from . import __version__

    return __version__


def _jsonable(d: dict) -> dict:
    """Settings as JSON values: tuples as lists, a torch.device as its name, numpy scalars as
    Python numbers."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, torch.device):
            return str(v)
        return v.item() if isinstance(v, np.generic) else v

    return {k: plain(v) for k, v in d.items()}
