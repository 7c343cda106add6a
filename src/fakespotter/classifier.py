"""Classifiers on packed activation rows (paper §3.3 trains a shallow network on the neurons'
activation; here it reads the packed bits, and its size and training are our choices).

Both follow the scikit-learn estimator contract: ``__init__`` only stores parameters, ``fit``
validates, sets trailing-underscore attributes and returns ``self``; inference checks that the
estimator is fitted. Inputs are packed int64 rows ``[N, W]`` (bit ``i`` = feature ``i``), labels
are 0 (real) and 1 (fake).

Training unpacks the bits to floats (PyTorch, seeded, deterministic on CPU). Inference never
unpacks: the first dense layer runs on the packed words through :func:`fakespotter.ops.bitset_linear`
(exact integer arithmetic on weights quantized per output to a power-of-two step; the error
against the float weights is at most ``k * scale / 2`` for a row with ``k`` bits set, see
:func:`fakespotter.ops.quantize_linear`), and the small layers after it row by row in float64,
rounded to float32 at the end: a row's logit is the same whatever other rows share its call
(a float32 matrix product rounds differently with the number of rows).
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import ops
from .reference import WORD_BITS

__all__ = ["BitsetMLPClassifier", "BitsetLogisticClassifier", "NotFittedError"]


@contextlib.contextmanager
def _plain_float32() -> Iterator[None]:
    """No autograd and no autocast: logits are ordinary float32 tensors whatever the caller's
    context (a mixed-precision pipeline around the detector, inference mode or not)."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


_UNPACK_BYTES = 1 << 27  # float32 bits unpacked at once by _float_logits


_TAIL_ELEMENTS = 1 << 22  # float64 products held at once by _tail_logits (32 MiB)


def _tail_logits(tail: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """The layers after the first (Linear, ReLU, Dropout in eval) on ``h`` float32 [N, H] -> float32
    [N]. Each row is computed on its own, in float64 with products summed in a fixed order, so its
    logit does not depend on N or on the other rows (BLAS picks its kernel, and so its rounding,
    by the matrix shape and alignment). Rows go in blocks of at most ``_TAIL_ELEMENTS`` products
    of the widest layer: ~0.2 s per 200k rows for the default (16, 16), ~4 s for (64, 64), ~40 s for
    (256, 256) (a float32 matrix product: 0.01-0.5 s)."""
    def block(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        for layer in tail:
            if isinstance(layer, nn.Linear):
                x = (x.unsqueeze(1) * layer.weight.double()).sum(-1) + layer.bias.double()
            elif isinstance(layer, nn.ReLU):
                x = x.clamp_min(0)
            elif not isinstance(layer, nn.Dropout):
                raise TypeError(f"classifier layer {type(layer).__name__} is not supported")
        return x.to(torch.float32).squeeze(1)

    widest = max([layer.weight.numel() for layer in tail if isinstance(layer, nn.Linear)] + [1])
    rows = max(1, _TAIL_ELEMENTS // widest)
    if h.shape[0] <= rows:
        return block(h)
    return torch.cat([block(h[i:i + rows]) for i in range(0, h.shape[0], rows)])


def _float_logits(net: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """``net`` on the unpacked float bits of ``rows``, in blocks of at most ``_UNPACK_BYTES``."""
    step = max(1, _UNPACK_BYTES // (4 * WORD_BITS * max(1, rows.shape[1])))
    if rows.shape[0] <= step:
        return net(ops.unpack_bits(rows).float()).squeeze(1)
    return torch.cat([net(ops.unpack_bits(rows[i : i + step]).float()).squeeze(1)
                      for i in range(0, rows.shape[0], step)])


class NotFittedError(ValueError, AttributeError):
    """The estimator is used before ``fit``."""


def _check_rows(rows, name: str = "rows", words: Optional[int] = None) -> torch.Tensor:
    if not isinstance(rows, torch.Tensor):
        rows = torch.as_tensor(np.asarray(rows))
    if rows.dtype != torch.int64 or rows.dim() != 2:
        raise ValueError(f"{name} must be packed int64 rows of shape [N, words], got {rows.dtype} of shape {list(rows.shape)}")
    if words is not None and rows.shape[1] != words:
        raise ValueError(f"{name} have {rows.shape[1]} words per row; this classifier was fitted on {words}")
    return rows.cpu()  # the classifier lives on the CPU; rows may come from a tap on a GPU


def _check_labels(y, n: int, need_both: bool = True) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y)).reshape(-1)
    if y.numel() != n:
        raise ValueError(f"y has {y.numel()} labels for {n} rows")
    values = set(torch.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"y must hold 0 (real) and 1 (fake), got values {sorted(values)}")
    if need_both and len(values) < 2:
        raise ValueError(f"y holds only class {values.pop()}: training needs both real (0) and fake (1) rows")
    return y.to(torch.int64)


class BitsetMLPClassifier:
    """A shallow network on activation bits, in the paper's spirit: dense layers with ReLU and
    dropout (widths, dropout, AdamW, class weights and early stopping are this implementation's
    choices, not the paper's).

    Args:
        hidden: widths of the hidden layers (``()`` gives logistic regression).
        dropout: dropout probability after each hidden layer (training only).
        lr, weight_decay: AdamW parameters.
        max_epochs: upper bound on training epochs.
        batch_size: rows per optimisation step.
        validation_fraction: share of the training rows held out for early stopping when no
            explicit validation set is given (stratified, seeded).
        patience: epochs without a lower validation loss before training stops.
        class_weight: ``"balanced"`` weighs each class by the inverse of its frequency;
            ``None`` weighs every row alike.
        seed: seeds the split, the initialisation, dropout and the shuffling.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (16, 16),
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 200,
        batch_size: int = 64,
        validation_fraction: float = 0.2,
        patience: int = 15,
        class_weight: Optional[str] = "balanced",
        seed: int = 0,
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed

    # -- scikit-learn plumbing ------------------------------------------------------------
    _param_names = ("hidden", "dropout", "lr", "weight_decay", "max_epochs", "batch_size",
                    "validation_fraction", "patience", "class_weight", "seed")

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names}

    def set_params(self, **params) -> "BitsetMLPClassifier":
        for name, value in params.items():
            if name not in self._param_names:
                raise ValueError(f"unknown parameter {name!r}; valid: {', '.join(self._param_names)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- training ----------------------------------------------------------------------------
    def _build(self, inputs: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        width = inputs
        for h in self.hidden:
            layers += [nn.Linear(width, int(h), dtype=torch.float32), nn.ReLU(), nn.Dropout(self.dropout)]
            width = int(h)
        layers.append(nn.Linear(width, 1, dtype=torch.float32))  # (whatever torch's default dtype)
        return nn.Sequential(*layers)

    def _check_params(self) -> None:
        """A ValueError naming the first parameter that training (or a model file) cannot use."""
        def whole(v: Any, low: int) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low

        def number(v: Any) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.hidden, (tuple, list)) or not all(whole(h, 1) for h in self.hidden):
            raise ValueError(f"classifier parameter hidden must be a list of layer widths >= 1, got {self.hidden!r}")
        if not (number(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"classifier parameter dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("lr", "weight_decay"):
            if not (number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"classifier parameter {name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name, low in (("max_epochs", 1), ("batch_size", 1), ("patience", 0), ("seed", 0)):
            if not whole(getattr(self, name), low):
                raise ValueError(f"classifier parameter {name} must be an int >= {low}, got {getattr(self, name)!r}")
        if self.class_weight not in ("balanced", None):
            raise ValueError(f"classifier parameter class_weight must be 'balanced' or None, got {self.class_weight!r}")

    def _split(self, n: int, y: torch.Tensor, generator: torch.Generator):
        val = torch.zeros(n, dtype=torch.bool)
        for cls in (0, 1):
            idx = torch.nonzero(y == cls).flatten()
            idx = idx[torch.randperm(idx.numel(), generator=generator)]
            take = int(round(idx.numel() * self.validation_fraction))
            take = min(max(take, 1), idx.numel() - 1)
            val[idx[:take]] = True
        return ~val, val

    def fit(self, rows, y, validation: Optional[tuple] = None) -> "BitsetMLPClassifier":
        """Fit on packed rows ``[N, W]`` and labels ``y`` (0 real, 1 fake).

        ``validation=(rows_val, y_val)`` gives the early-stopping set; otherwise
        ``validation_fraction`` of the rows are held out (stratified).
        """
        self._check_params()
        rows = _check_rows(rows)
        y = _check_labels(y, rows.shape[0])
        if not 0.0 < self.validation_fraction < 1.0 and validation is None:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        words = rows.shape[1]
        generator = torch.Generator().manual_seed(self.seed)
        if validation is None:
            train_mask, val_mask = self._split(rows.shape[0], y, generator)
            x_tr, y_tr, x_va, y_va = rows[train_mask], y[train_mask], rows[val_mask], y[val_mask]
        else:
            x_tr, y_tr = rows, y
            x_va = _check_rows(validation[0], "validation rows", words)
            y_va = _check_labels(validation[1], x_va.shape[0], need_both=False)
        # Bits are unpacked one batch at a time (a float32 per bit: an element row unpacks to
        # ~2.5 MB), to the values the whole unpacked matrix would hold.
        t_tr, t_va = y_tr.float(), y_va.float()

        counts = torch.bincount(y_tr, minlength=2).double()
        if self.class_weight == "balanced":
            class_w = (counts.sum() / (2 * counts.clamp_min(1))).float()
        else:
            class_w = torch.ones(2)

        with _training(self.seed):
            net = self._build(words * WORD_BITS)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            loss_fn = nn.BCEWithLogitsLoss(reduction="none")
            best_loss, best_state, best_epoch, history = math.inf, None, 0, []
            for epoch in range(self.max_epochs):
                net.train()
                order = torch.randperm(x_tr.shape[0], generator=generator)
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    logits = net(ops.unpack_bits(x_tr[idx]).float()).squeeze(1)
                    loss = (loss_fn(logits, t_tr[idx]) * class_w[y_tr[idx]]).sum() / class_w[y_tr[idx]].sum()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                net.eval()
                with torch.no_grad():
                    v = loss_fn(_float_logits(net, x_va), t_va)
                    w = class_w[y_va]
                    val_loss = float((v * w).sum() / w.sum())
                history.append(val_loss)
                if val_loss < best_loss - 1e-6:
                    best_loss, best_state, best_epoch = val_loss, copy.deepcopy(net.state_dict()), epoch
                elif epoch - best_epoch >= self.patience:
                    break
        net.load_state_dict(best_state)
        net.eval()
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = words * WORD_BITS
        self.n_words_in_ = words
        self.best_epoch_ = best_epoch
        self.validation_loss_ = best_loss
        self.history_ = history
        self._set_network(net)
        return self

    # -- inference -----------------------------------------------------------------------------
    def _set_network(self, net: nn.Sequential) -> None:
        self.network_ = net
        first = net[0]
        q, scale = ops.quantize_linear(first.weight.detach())
        self.table_ = ops.bitset_table(q)
        self.scale_ = scale
        self.bias_ = first.bias.detach().clone()
        self._tail = net[1:]

    def _check_fitted(self) -> None:
        if not hasattr(self, "network_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(rows, y) first")

    def decision_function(self, rows) -> torch.Tensor:
        """Logit of "fake" per row (float32 [N]), first layer on the packed words."""
        self._check_fitted()
        rows = _check_rows(rows, words=self.n_words_in_)
        with _plain_float32():
            h = ops.bitset_linear(rows, self.table_, self.scale_, self.bias_)
            return _tail_logits(self._tail, h)

    def decision_function_float(self, rows) -> torch.Tensor:
        """The same logits through unpacked float bits and the float weights (for checking)."""
        self._check_fitted()
        rows = _check_rows(rows, words=self.n_words_in_)
        with _plain_float32():
            return _float_logits(self.network_, rows)

    def predict_proba(self, rows) -> torch.Tensor:
        """float32 [N, 2]: P(real), P(fake)."""
        p = torch.sigmoid(self.decision_function(rows))
        return torch.stack([1 - p, p], dim=1)

    def predict(self, rows, threshold: float = 0.0) -> torch.Tensor:
        """0 (real) or 1 (fake) per row: decision_function > threshold."""
        return (self.decision_function(rows) > threshold).to(torch.int64)

    def first_layer_weight(self) -> torch.Tensor:
        """float32 [hidden or 1, features]: the weights the bits meet (for explanations)."""
        self._check_fitted()
        return self.network_[0].weight.detach()

    # -- serialisation (tensors only; see artifact.py) -------------------------------------------
    def state_tensors(self) -> dict:
        self._check_fitted()
        return {f"classifier.{k}": v.detach().clone().contiguous() for k, v in self.network_.state_dict().items()}

    @classmethod
    def from_state_tensors(cls, params: dict, tensors: dict, words: int) -> "BitsetMLPClassifier":
        est = cls(**params)
        est._check_params()
        hidden = est.hidden
        # the shapes _build gives (Linear, ReLU, Dropout per hidden layer, then the output Linear), checked
        # before anything is built: the widths come from the file, and a mangled one could ask for terabytes
        widths = [words * WORD_BITS, *hidden, 1]
        expected = {}
        for i, (w_in, w_out) in enumerate(zip(widths, widths[1:])):
            expected[f"{3 * i}.weight"], expected[f"{3 * i}.bias"] = (w_out, w_in), (w_out,)
        state = {k[len("classifier."):]: v for k, v in tensors.items() if k.startswith("classifier.")}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"classifier tensors do not match its parameters: missing {missing}, unexpected {unexpected}")
        for k, shape in expected.items():
            if tuple(state[k].shape) != shape or state[k].dtype != torch.float32:
                raise ValueError(f"classifier tensor {k} has shape {list(state[k].shape)} ({state[k].dtype}), expected "
                                 f"{list(shape)} ({torch.float32})")
            if not bool(torch.isfinite(state[k]).all()):
                raise ValueError(f"classifier tensor {k} holds NaN or infinite values")
        with torch.random.fork_rng(devices=[]):  # (random init, replaced: the caller's torch stream stays put)
            net = est._build(words * WORD_BITS)
        net.load_state_dict(state)
        net.eval()
        est.classes_ = np.array([0, 1])
        est.n_features_in_ = words * WORD_BITS
        est.n_words_in_ = words
        est._set_network(net)
        return est


class BitsetLogisticClassifier(BitsetMLPClassifier):
    """Logistic regression on activation bits (a single dense layer)."""

    def __init__(self, lr: float = 1e-2, weight_decay: float = 1e-3, max_epochs: int = 300, batch_size: int = 64,
                 validation_fraction: float = 0.2, patience: int = 20, class_weight: Optional[str] = "balanced", seed: int = 0):
        super().__init__(hidden=(), dropout=0.0, lr=lr, weight_decay=weight_decay, max_epochs=max_epochs,
                         batch_size=batch_size, validation_fraction=validation_fraction, patience=patience,
                         class_weight=class_weight, seed=seed)

    _param_names = ("lr", "weight_decay", "max_epochs", "batch_size", "validation_fraction", "patience",
                    "class_weight", "seed")


@contextlib.contextmanager
def _training(seed: int) -> Iterator[None]:
    """What a fit needs whatever the caller set around it, all restored after: seeded,
    deterministic torch (the caller's generator state, and its deterministic setting with its
    ``warn_only``, come back), gradients (also inside the caller's ``no_grad`` or
    ``inference_mode``), and float32 (a caller's autocast would train another network)."""
    import torch._inductor.config  # noqa: F401 - (use_deterministic_algorithms' import, before any change)

    rng = torch.get_rng_state()
    det = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()

    def restore() -> None:
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
        torch.set_rng_state(rng)

    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False), \
                torch.autocast("cuda", enabled=False):
            torch.manual_seed(seed)
            torch.use_deterministic_algorithms(True)
            yield
    except BaseException:
        # A Ctrl-C in the middle of one of torch's lazy imports leaves it half-imported: a restore
        # that fails then must not take the place of the KeyboardInterrupt.
        with contextlib.suppress(Exception):
            restore()
        raise
    restore()
