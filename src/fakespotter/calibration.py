"""Streaming threshold calibration (paper Eq. 1) and the ``Thresholds`` it produces.

For a tap with layers L and granularity g, over calibration images T:

* ``per_layer`` (paper Eq. 1): xi_l = mean of delta(n, t) over every neuron n of layer l and
  every image t;
* ``per_neuron``: xi_n = mean of delta(n, t) over the images.

delta(n, t) is the neuron value exactly as the native op defines it: in channel granularity
``float32(fixed-order float64 sum / S)`` (``reference._channel_means``), in element granularity
the float32 element. Thresholds are stored as float32 (the op compares in float32).

Batch-size independence, exactly:

* per-layer sums are *exact*: every float32 value is ``m * 2**(e - 24)`` with an integer
  ``|m| < 2**24`` (``torch.frexp``); the integers ``m`` are added into one int64 bin per
  exponent (integer addition is associative, so the order of the images, the batch boundaries
  and the threads do not matter), and the bins are moved into Python integers after every batch
  (no overflow). The mean is the exact rational sum / count, rounded once to float64.
* per-neuron sums are float64 additions of one image at a time, in image order: element-wise
  vector adds with no reduction, so every neuron's sum is the same sequential sum whatever the
  batching;
* the values themselves: a backbone's activations can change in their last bits with the
  forward's batch size (its convolutions' sums), so every forward is of ``forward_batch`` chips,
  the last padded, whatever the batches given, in the channels_last layout of the scanner's
  chips.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import reference
from .taps import Tap

__all__ = ["Thresholds", "ThresholdCalibrator", "neuron_values", "THRESHOLDS_FORMAT"]

THRESHOLDS_FORMAT = "fakespotter.thresholds"
THRESHOLDS_VERSION = 1
MODES = ("per_layer", "per_neuron")

# float32 exponents from torch.frexp (mantissa in [0.5, 1)): 2**-149 = 0.5 * 2**-148 ... 2**128
_EMIN, _EMAX = -148, 128
_MANT_BITS = 24


def neuron_values(activation: Tensor, granularity: str) -> Tensor:
    """float32 [N, neurons] values of one layer's activation [N, C, *spatial] or [N, D].

    The values the native op thresholds: channel means in the fixed float64 order (channel
    granularity, spatial size > 1) or the elements in C, H, W order.
    """
    n = activation.shape[0]
    spatial = 1
    for s in activation.shape[2:]:
        spatial *= s
    if granularity == "channel" and spatial != 1:
        return reference._channel_means(activation)
    return activation.to(torch.float32).reshape(n, -1)


@dataclass(frozen=True)
class Thresholds:
    """Calibrated thresholds for one (backbone, weights, layers, granularity).

    values: float32 per layer, shape [1] (``per_layer``) or [features] (``per_neuron``).
    """

    backbone_id: str
    weights_sha256: Optional[str]
    layers: Tuple[str, ...]
    granularity: str
    mode: str
    n_images: int
    values: Tuple[Tensor, ...]

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Thresholds: mode must be one of {MODES}, got {self.mode!r}")
        if self.granularity not in ("channel", "element"):
            raise ValueError(f"Thresholds: granularity must be 'channel' or 'element', "
                             f"got {self.granularity!r}")
        if len(self.values) != len(self.layers):
            raise ValueError(f"Thresholds: {len(self.layers)} layers but {len(self.values)} values")
        if self.mode == "per_layer":  # (else a tap would take them as per-neuron values)
            for n, v in zip(self.layers, self.values):
                if v.numel() != 1:
                    raise ValueError(f"Thresholds: per_layer threshold.{n} has {v.numel()} values")

    def save(self, path: Union[str, Path], overwrite: bool = False) -> None:
        """Write a safetensors file (tensors ``threshold.<layer>``, the rest as metadata),
        atomically; an existing file is kept (FileExistsError) unless ``overwrite=True``."""
        from ._safetensors import save_file

        meta = {
            "format": THRESHOLDS_FORMAT,
            "version": str(THRESHOLDS_VERSION),
            "backbone_id": self.backbone_id,
            "weights_sha256": self.weights_sha256 or "",
            "layers": json.dumps(list(self.layers)),
            "granularity": self.granularity,
            "mode": self.mode,
            "n_images": str(self.n_images),
        }
        if not overwrite and os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        save_file({f"threshold.{n}": v.to(torch.float32).reshape(-1)
                   for n, v in zip(self.layers, self.values)}, path, meta, replace=overwrite)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Thresholds":
        """Read a file written by :meth:`save`; anything unexpected raises ``ValueError``."""
        from ._safetensors import load_file

        tensors, meta = load_file(path)
        if meta.get("format") != THRESHOLDS_FORMAT:
            raise ValueError(f"{path}: not a fakespotter thresholds file "
                             f"(format {meta.get('format')!r})")
        if meta.get("version") != str(THRESHOLDS_VERSION):
            raise ValueError(f"{path}: thresholds format version {meta.get('version')!r} is not "
                             f"supported (this fakespotter reads version {THRESHOLDS_VERSION})")
        try:
            layers = json.loads(meta["layers"])
            fields = {k: meta[k] for k in ("backbone_id", "granularity", "mode", "n_images")}
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: thresholds metadata is incomplete ({e})") from None
        if (not isinstance(layers, list) or not layers or not all(isinstance(n, str) and n for n in layers)
                or len(set(layers)) != len(layers)):
            raise ValueError(f"{path}: thresholds metadata 'layers' must be a list of distinct layer names, "
                             f"got {meta['layers']!r}")
        layers = tuple(layers)
        if not fields["n_images"].isdigit():
            raise ValueError(f"{path}: thresholds metadata 'n_images' must be a count, got {fields['n_images']!r}")
        expected = {f"threshold.{n}" for n in layers}
        if set(tensors) != expected:
            raise ValueError(f"{path}: tensors {sorted(tensors)} do not match the layers "
                             f"{list(layers)}")
        values = []
        for n in layers:
            t = tensors[f"threshold.{n}"]
            if t.dtype != torch.float32 or t.dim() != 1:
                raise ValueError(f"{path}: threshold.{n} must be float32 [k], got {t.dtype} "
                                 f"{list(t.shape)}")
            if not bool(torch.isfinite(t).all()):  # (a NaN threshold turns every bit of its layer off)
                raise ValueError(f"{path}: threshold.{n} holds NaN or infinite values")
            values.append(t)
        try:
            return cls(backbone_id=fields["backbone_id"],
                       weights_sha256=meta.get("weights_sha256") or None, layers=layers,
                       granularity=fields["granularity"], mode=fields["mode"],
                       n_images=int(fields["n_images"]), values=tuple(values))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


class ThresholdCalibrator:
    """Estimate a tap's thresholds from a stream of chip batches (scikit-learn style).

    Args:
        tap: the :class:`~fakespotter.taps.Tap` whose backbone, layers and granularity are
            calibrated (its current thresholds are not used).
        mode: which thresholds ``thresholds_`` holds: ``"per_layer"`` (paper Eq. 1, default) or
            ``"per_neuron"``. Both are estimated; :meth:`to_thresholds` gives either.

        forward_batch: chips per backbone forward. Every forward has exactly this many (the
            last of a batch padded with black chips, left out of the means): a backbone's
            activations can change in their last bits with the forward's batch size, and so
            would the thresholds with the batches given. Default 16 (a partial_fit of one chip
            still costs one forward of 16).

    Attributes set by ``fit`` / ``partial_fit``:
        n_images_: images seen.
        layer_means_: float64 [L], mean of all neuron values of each layer (exactly rounded).
        neuron_means_: list of float64 [features_l], mean of each neuron.
        thresholds_: a :class:`Thresholds` in ``mode``.

    A chip batch is what ``features`` accepts as chips: uint8 [N, H, W, 3] (array or tensor)
    or float32 [N, 3, H, W] with values 0..255; the tap's preprocessing is applied.
    """

    def __init__(self, tap: Tap, mode: str = "per_layer", forward_batch: int = 16) -> None:
        self.tap = tap
        self.mode = mode
        self.forward_batch = forward_batch

    def _validate(self) -> None:
        if not isinstance(self.tap, Tap):
            raise TypeError(f"ThresholdCalibrator: tap must be a Tap, got {type(self.tap).__name__}")
        from .features import MAX_BATCH_SIZE

        fb = self.forward_batch
        if not isinstance(fb, numbers.Integral) or isinstance(fb, bool) or not 1 <= fb <= MAX_BATCH_SIZE:
            raise ValueError(f"ThresholdCalibrator: forward_batch must be an int from 1 to {MAX_BATCH_SIZE}, got {fb!r}")
        if self.mode not in MODES:
            raise ValueError(f"ThresholdCalibrator: mode must be 'per_layer' or 'per_neuron', "
                             f"got {self.mode!r}")

    def _reset(self) -> None:
        for a in ("n_images_", "layer_means_", "neuron_means_", "thresholds_", "_exact",
                  "_neuron_sums", "_counts"):
            if hasattr(self, a):
                delattr(self, a)

    def partial_fit(self, chips: Any, y: Any = None) -> "ThresholdCalibrator":
        """Add one batch of chips to the running sums; updates the fitted attributes."""
        from .features import prepare_chips

        self._validate()
        tap = self.tap
        x = prepare_chips(chips, tap, "ThresholdCalibrator.partial_fit")
        slots = tap.layout.layers
        if not hasattr(self, "_exact"):
            self.n_images_ = 0
            self._exact: List[List[int]] = [[0] * (_EMAX - _EMIN + 1) for _ in slots]
            self._neuron_sums: List[Tensor] = [
                torch.zeros(s.features, dtype=torch.float64, device=x.device) for s in slots]
        nbins = _EMAX - _EMIN + 1
        bins = torch.zeros((len(slots), nbins), dtype=torch.int64, device=x.device)
        finite = torch.ones(len(slots), dtype=torch.bool, device=x.device)
        # the batch's sums go to copies, kept only when every layer was finite: a refused batch
        # leaves the calibrator as it was (no half of it in some layers' sums)
        sums = [t.clone() for t in self._neuron_sums]

        n = 0  # the chips of the forward running (the rest of its rows are padding)

        def accumulate(i: int, activation: Tensor) -> None:
            v = neuron_values(activation[:n], tap.granularity)
            finite[i] &= torch.isfinite(v).all()  # (read once per batch, not once per layer and forward)
            mant, exp = torch.frexp(v.reshape(-1))
            ints = (mant * float(1 << _MANT_BITS)).to(torch.int64)
            bins[i].index_add_(0, exp.to(torch.int64) - _EMIN, ints)
            for row in v:  # one image at a time, in image order, onto the running sums
                sums[i] += row.to(torch.float64)

        fb = int(self.forward_batch)
        for start in range(0, x.shape[0], fb):
            part = x[start:start + fb]
            n = part.shape[0]
            if n < fb:  # (in prepare_chips' memory layout, as every forward: it sets the last bits too)
                part = torch.cat([part, part.new_zeros((fb - n,) + tuple(part.shape[1:]))]).contiguous(
                    memory_format=torch.channels_last)
            tap.capture(tap.prepare(part), accumulate)
        bad = [slot.name for slot, ok in zip(slots, finite.tolist()) if not ok]
        if bad:
            raise ValueError(f"ThresholdCalibrator.partial_fit: non-finite activations in layers "
                             f"{bad}; thresholds would be NaN (check the input chips); this batch was not "
                             f"added")
        self._neuron_sums = sums
        for acc, row in zip(self._exact, bins.tolist()):
            for k, v in enumerate(row):
                if v:
                    acc[k] += v
        self.n_images_ += int(x.shape[0])
        self._update()
        return self

    def fit(self, batches: Iterable[Any], y: Any = None) -> "ThresholdCalibrator":
        """Calibrate from scratch over an iterable of chip batches."""
        if isinstance(batches, (Tensor, np.ndarray)) and batches.ndim == 4:  # (iterated, it gives single chips)
            raise TypeError(f"ThresholdCalibrator.fit takes an iterable of chip batches (a list of them, a "
                            f"DataLoader); got one batch, shape {list(batches.shape)}: pass [chips]")
        self._validate()
        self._reset()
        for batch in batches:
            self.partial_fit(batch)
        if not getattr(self, "n_images_", 0):
            raise ValueError("ThresholdCalibrator.fit: no images in the calibration batches")
        return self

    def _update(self) -> None:
        n = self.n_images_
        if n == 0:
            return
        means = []
        for acc, slot in zip(self._exact, self.tap.layout.layers):
            total = sum(v << k for k, v in enumerate(acc))  # exact, in units of 2**(_EMIN - 24)
            means.append(float(Fraction(total, (1 << (_MANT_BITS - _EMIN)) * n * slot.features)))
        self.layer_means_ = np.array(means, dtype=np.float64)
        self.neuron_means_ = [(s / n).cpu().numpy() for s in self._neuron_sums]
        self.thresholds_ = self.to_thresholds(self.mode)

    def to_thresholds(self, mode: Optional[str] = None) -> Thresholds:
        """The fitted thresholds as ``per_layer`` or ``per_neuron`` (default: ``self.mode``)."""
        if not hasattr(self, "layer_means_"):
            raise ValueError("ThresholdCalibrator: not fitted yet; call fit or partial_fit first")
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"ThresholdCalibrator.to_thresholds: mode must be one of {MODES}, "
                             f"got {mode!r}")
        if mode == "per_layer":
            values = tuple(torch.tensor([m], dtype=torch.float32) for m in self.layer_means_)
        else:
            values = tuple(torch.from_numpy(m.astype(np.float32)) for m in self.neuron_means_)
        tap = self.tap
        return Thresholds(backbone_id=tap.backbone_id, weights_sha256=tap.weights_sha256,
                          layers=tuple(tap.layers), granularity=tap.granularity, mode=mode,
                          n_images=self.n_images_, values=values)
