"""Bitset classifiers: sklearn contract, learning, determinism, compact == float within bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakespotter import classifier as classifier_module
from fakespotter import ops
from fakespotter.classifier import BitsetLogisticClassifier, BitsetMLPClassifier, NotFittedError
from fakespotter.reference import pack_bits


def auc(scores, labels) -> float:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def synthetic(n=300, features=500, seed=0):
    """Fakes fire a hidden subset of neurons more often than reals."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    p = torch.full((n, features), 0.4)
    informative = torch.randperm(features, generator=g)[:40]
    p[:, informative] = torch.where(y[:, None] == 1, 0.65, 0.35)
    bits = torch.rand(n, features, generator=g) < p
    return pack_bits(bits), y


@pytest.mark.parametrize("cls", [BitsetMLPClassifier, BitsetLogisticClassifier])
def test_learns_and_is_deterministic(cls):
    rows, y = synthetic()
    tr, te = slice(0, 200), slice(200, 300)
    a = cls(max_epochs=60).fit(rows[tr], y[tr])
    b = cls(max_epochs=60).fit(rows[tr], y[tr])
    sa, sb = a.decision_function(rows[te]), b.decision_function(rows[te])
    assert torch.equal(sa, sb)
    assert auc(sa, y[te]) >= 0.9
    assert a.classes_.tolist() == [0, 1] and a.n_features_in_ == rows.shape[1] * 64
    proba = a.predict_proba(rows[te])
    assert proba.shape == (100, 2) and torch.allclose(proba.sum(1), torch.ones(100))
    assert set(a.predict(rows[te]).tolist()) <= {0, 1}


def test_compact_scores_equal_float_scores_within_bound():
    rows, y = synthetic(seed=1)
    clf = BitsetMLPClassifier(max_epochs=20).fit(rows, y)
    compact = clf.decision_function(rows)
    flt = clf.decision_function_float(rows)
    assert torch.allclose(compact, flt, rtol=1e-5, atol=1e-5)
    # first layer alone: exact bound k * scale / 2 against the float weights
    w = clf.network_[0].weight.detach().double()
    bits = ops.unpack_bits(rows).double()
    h = ops.bitset_linear(rows, clf.table_, clf.scale_, clf.bias_).double()
    want = bits @ w.T + clf.bias_.double()
    bound = bits.sum(1, keepdim=True) * clf.scale_.double() / 2 + want.abs() * 2**-24
    assert ((h - want).abs() <= bound).all()


@pytest.mark.parametrize("cls", [BitsetMLPClassifier, BitsetLogisticClassifier])
def test_a_rows_logit_does_not_depend_on_the_other_rows(cls, monkeypatch):
    """A scan's resumed or re-batched rows, and an API call with one image or many, give each row
    the same logit: float32 matrix products round differently with the number of rows."""
    rows, y = synthetic(n=300, seed=2)
    clf = cls(max_epochs=10).fit(rows, y)
    whole = clf.decision_function(rows)
    assert torch.equal(torch.cat([clf.decision_function(rows[i:i + 1]) for i in range(len(rows))]), whole)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    assert torch.equal(clf.decision_function(rows[perm]), whole[perm])
    monkeypatch.setattr(classifier_module, "_TAIL_ELEMENTS", 7 * 16 * 16)  # in blocks of 7 rows: the same logits
    assert torch.equal(clf.decision_function(rows), whole)
    # ... and they are the network's float logits (within the first layer's quantization bound)
    assert torch.allclose(whole, clf.decision_function_float(rows), rtol=1e-5, atol=1e-5)


def test_state_tensors_round_trip():
    rows, y = synthetic(seed=2)
    clf = BitsetMLPClassifier(hidden=(16,), max_epochs=10).fit(rows, y)
    again = BitsetMLPClassifier.from_state_tensors(clf.get_params(), clf.state_tensors(), rows.shape[1])
    assert torch.equal(again.decision_function(rows), clf.decision_function(rows))
    with pytest.raises(ValueError, match="classifier tensor 0.weight has shape"):
        BitsetMLPClassifier.from_state_tensors({**clf.get_params(), "hidden": (16,)}, clf.state_tensors(), rows.shape[1] + 1)
    with pytest.raises(ValueError, match="missing"):
        BitsetMLPClassifier.from_state_tensors({**clf.get_params(), "hidden": (16, 8)}, clf.state_tensors(), rows.shape[1])


def test_contract_and_errors():
    clf = BitsetMLPClassifier(hidden=(8,))
    assert clf.get_params()["hidden"] == (8,)
    assert "hidden=(8,)" in repr(clf)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        clf.decision_function(torch.zeros(2, 3, dtype=torch.int64))
    rows, y = synthetic(n=40)
    with pytest.raises(ValueError, match="training needs both real"):
        clf.fit(rows, torch.zeros(40))
    with pytest.raises(ValueError, match=r"y must hold 0 \(real\) and 1 \(fake\), got values \[0, 2\]"):
        clf.fit(rows, torch.arange(40) % 2 * 2)
    with pytest.raises(ValueError, match="y has 3 labels for 40 rows"):
        clf.fit(rows, [0, 1, 0])
    with pytest.raises(ValueError, match="must be packed int64 rows"):
        clf.fit(rows.float(), y)
    with pytest.raises(ValueError, match="unknown parameter 'depth'"):
        clf.set_params(depth=3)
    clf.set_params(max_epochs=3).fit(rows, y)
    with pytest.raises(ValueError, match="have 2 words per row; this classifier was fitted on 8"):
        clf.decision_function(rows[:, :2])


def test_fit_unpacks_a_batch_at_a_time(monkeypatch):
    """fit unpacks at most a training batch, or a block of validation rows, to floats at once
    (an element row unpacks to ~2.5 MB of float32); blocks change the validation losses by
    float rounding only."""
    rows, y = synthetic(n=200)
    unpacked, unpack = [], ops.unpack_bits
    monkeypatch.setattr(ops, "unpack_bits", lambda p, *a, **k: (unpacked.append(p.shape[0]), unpack(p, *a, **k))[1])
    whole = BitsetMLPClassifier(max_epochs=6, batch_size=16).fit(rows, y)
    assert max(unpacked) == 40 and sorted(set(unpacked)) == [16, 40]  # 160 training rows, 40 validation
    unpacked.clear()
    monkeypatch.setattr(classifier_module, "_UNPACK_BYTES", 7 * 4 * 64 * rows.shape[1])  # 7 rows a block
    blocks = BitsetMLPClassifier(max_epochs=6, batch_size=16).fit(rows, y)
    assert max(unpacked) == 16 and 7 in unpacked and 40 not in unpacked
    assert np.allclose(whole.history_, blocks.history_, rtol=1e-6, atol=0)
    assert torch.allclose(whole.decision_function(rows), blocks.decision_function(rows), rtol=1e-4, atol=1e-5)


def test_class_weights_help_imbalanced_data():
    rows, y = synthetic(n=400, seed=3)
    keep = torch.cat([torch.nonzero(y == 0).flatten(), torch.nonzero(y == 1).flatten()[:40]])
    clf = BitsetLogisticClassifier(max_epochs=80).fit(rows[keep], y[keep])
    test_rows, test_y = synthetic(n=200, seed=3)
    pred = clf.predict(test_rows)
    recall_fake = (pred[test_y == 1] == 1).float().mean().item()
    assert recall_fake > 0.6


@pytest.mark.parametrize("class_weight", ["balanced", None])
def test_the_fitted_network_is_the_best_epochs_on_a_given_validation_set(class_weight):
    """Early stopping keeps the epoch of least validation loss: the returned network's loss on
    the validation set is ``validation_loss_`` (and not the last epoch's, which is worse here:
    a small training set, over-fitted for as long as the patience allows)."""
    rows, y = synthetic(n=200, seed=4)
    val_rows, val_y = synthetic(n=120, seed=5)
    clf = BitsetMLPClassifier(max_epochs=40, patience=8, class_weight=class_weight).fit(
        rows[:60], y[:60], validation=(val_rows, val_y))
    assert clf.best_epoch_ < len(clf.history_) - 1 and clf.history_[-1] > clf.validation_loss_
    assert clf.validation_loss_ == min(clf.history_)
    logits = clf.decision_function_float(val_rows)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, val_y.float(), reduction="none")
    assert (y[:60] == 1).sum() == 30  # (balanced classes: "balanced" weighs every row 1 too)
    assert float(loss.mean()) == pytest.approx(clf.validation_loss_, rel=1e-5)
