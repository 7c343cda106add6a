"""Bitset classifiers: sklearn contract, learning, determinism, compact == float within bound."""

from __future__ import annotations

import math

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


# Tests from a mutation audit of classifier.py: each fails on a one-line change that no test caught.
@pytest.fixture(scope="module")
def small_fit():
    rows, y = synthetic(n=80, seed=7)
    return BitsetMLPClassifier(hidden=(8,), max_epochs=3).fit(rows, y), rows, y


# -- input checks
def test_rows_must_be_two_dimensional():
    """c09 (rows.dim() check dropped)."""
    rows, y = synthetic(n=40)
    with pytest.raises(ValueError, match="must be packed int64 rows of shape"):
        BitsetMLPClassifier(max_epochs=1).fit(rows.reshape(-1), y)


def test_rows_with_more_words_than_fitted_are_refused(small_fit):
    """c11 (!= -> <: only fewer words were refused)."""
    clf, rows, _ = small_fit
    wider = torch.cat([rows, rows[:, :1]], dim=1)
    with pytest.raises(ValueError, match=f"have {rows.shape[1] + 1} words per row; this classifier was fitted on {rows.shape[1]}"):
        clf.decision_function(wider)


def test_validation_rows_with_other_widths_are_refused():
    """c25 (validation rows not checked against the training width)."""
    rows, y = synthetic(n=40)
    with pytest.raises(ValueError, match="validation rows have 2 words per row"):
        BitsetMLPClassifier(max_epochs=1).fit(rows, y, validation=(rows[:, :2], y))


def test_a_validation_set_of_one_class_is_accepted():
    """c16 / c24 (need_both ignored or forced for validation labels)."""
    rows, y = synthetic(n=60)
    clf = BitsetMLPClassifier(hidden=(4,), max_epochs=2).fit(rows[:40], y[:40], validation=(rows[40:][y[40:] == 1], [1] * 10))
    assert len(clf.history_) == 2 and all(math.isfinite(v) for v in clf.history_)


def test_float_and_bool_labels_are_accepted():
    """c17 (labels not converted to int64: bincount/indexing fail on float labels)."""
    rows, y = synthetic(n=40)
    a = BitsetMLPClassifier(hidden=(4,), max_epochs=2).fit(rows, y)
    b = BitsetMLPClassifier(hidden=(4,), max_epochs=2).fit(rows, y.double())
    c = BitsetMLPClassifier(hidden=(4,), max_epochs=2).fit(rows, y.bool().numpy())
    assert torch.equal(a.decision_function(rows), b.decision_function(rows))
    assert torch.equal(a.decision_function(rows), c.decision_function(rows))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_validation_fraction_outside_0_1_is_refused(fraction):
    """c23 (0 and 1 accepted)."""
    rows, y = synthetic(n=40)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\)"):
        BitsetMLPClassifier(max_epochs=1, validation_fraction=fraction).fit(rows, y)


def test_validation_fraction_is_ignored_when_a_validation_set_is_given():
    """c22 (validation_fraction checked even with an explicit validation set)."""
    rows, y = synthetic(n=60)
    clf = BitsetMLPClassifier(hidden=(4,), max_epochs=2, validation_fraction=0.0).fit(
        rows[:40], y[:40], validation=(rows[40:], y[40:]))
    assert len(clf.history_) == 2


# -- split
@pytest.mark.parametrize("fraction, n0, n1, want", [
    (0.01, 20, 20, (1, 1)),     # c19: at least one validation row per class
    (0.99, 20, 20, (19, 19)),   # c20: at least one training row per class
    (0.2, 13, 7, (3, 1)),       # c18: rounded, not floored (2.6 -> 3, 1.4 -> 1)
])
def test_the_split_is_stratified_with_one_row_of_each_class_on_each_side(fraction, n0, n1, want):
    """c18 (round -> floor), c19 (min 1 validation row dropped), c20 (min 1 training row dropped)."""
    y = torch.cat([torch.zeros(n0, dtype=torch.int64), torch.ones(n1, dtype=torch.int64)])
    clf = BitsetMLPClassifier(validation_fraction=fraction)
    train, val = clf._split(len(y), y, torch.Generator().manual_seed(0))
    assert not (train & val).any() and (train | val).all()
    assert (int((y[val] == 0).sum()), int((y[val] == 1).sum())) == want


def test_a_tiny_validation_fraction_still_fits():
    """c19 end to end: no validation rows -> NaN losses -> best_state None."""
    rows, y = synthetic(n=40)
    clf = BitsetMLPClassifier(hidden=(4,), max_epochs=2, validation_fraction=0.01).fit(rows, y)
    assert math.isfinite(clf.validation_loss_)


# -- weights and losses
def test_validation_loss_is_the_class_weighted_mean():
    """c29 (/ len(w)), c30 (validation rows unweighted): imbalanced validation, balanced weights
    from imbalanced training counts."""
    rows, y = synthetic(n=200, seed=4)
    keep = torch.cat([torch.nonzero(y == 0).flatten()[:60], torch.nonzero(y == 1).flatten()[:20]])
    val_rows, val_y = synthetic(n=120, seed=5)
    vkeep = torch.cat([torch.nonzero(val_y == 0).flatten()[:50], torch.nonzero(val_y == 1).flatten()[:10]])
    clf = BitsetMLPClassifier(hidden=(8,), max_epochs=4).fit(rows[keep], y[keep], validation=(val_rows[vkeep], val_y[vkeep]))
    logits = clf.decision_function_float(val_rows[vkeep]).double()
    t = val_y[vkeep].double()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")
    w = torch.where(t == 1, 80 / (2 * 20), 80 / (2 * 60)).double()
    assert float((loss * w).sum() / w.sum()) == pytest.approx(clf.validation_loss_, rel=1e-5)


def test_training_loss_is_the_class_weighted_mean_of_each_batch(monkeypatch):
    """c28 (the batch loss divided by the row count instead of the weight sum): the first batch's
    gradient equals that of the weighted mean."""
    rows, y = synthetic(n=200, seed=4)
    keep = torch.cat([torch.nonzero(y == 0).flatten()[:60], torch.nonzero(y == 1).flatten()[:20]])
    rows, y = rows[keep], y[keep]
    seen = {}
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        if "grad" not in seen:
            seen["grad"] = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
            seen["params"] = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        return real_step(self, *a, **k)

    batches = []
    unpack = ops.unpack_bits
    monkeypatch.setattr(ops, "unpack_bits", lambda p, *a, **k: (batches.append(p.clone()), unpack(p, *a, **k))[1])
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    BitsetLogisticClassifier(max_epochs=1, batch_size=16).fit(rows, y, validation=(rows, y))  # (a whole-set batch has weight sum N)
    first = batches[0]
    assert len(first) == 16
    # the labels of the first batch: rows are unique here, so find each one
    index = {tuple(r.tolist()): i for i, r in enumerate(rows)}
    yb = y[[index[tuple(r.tolist())] for r in first]].double()
    w_, b_ = (t.double().requires_grad_() for t in seen["params"])
    logits = (unpack(first).double() @ w_.T + b_).squeeze(1)
    cw = torch.where(yb == 1, 80 / 40, 80 / 120).double()
    loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, yb, reduction="none") * cw).sum() / cw.sum()
    loss.backward()
    assert torch.allclose(seen["grad"][0].double(), w_.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(seen["grad"][1].double(), b_.grad, rtol=1e-4, atol=1e-7)


# -- early stopping
def test_a_flat_validation_loss_stops_after_patience_and_keeps_the_first_epoch():
    """c31 (<= best: ties move the best epoch), c33 (> patience: one epoch more), c34 (never stops).
    lr=0: the network never changes, so every epoch's validation loss is the same."""
    rows, y = synthetic(n=60)
    clf = BitsetMLPClassifier(hidden=(4,), lr=0.0, max_epochs=50, patience=3).fit(rows, y)
    assert len(set(clf.history_)) == 1
    assert clf.best_epoch_ == 0 and len(clf.history_) == 4


def test_early_stopping_on_scripted_validation_losses(monkeypatch):
    """c31 (<=: ties move the best epoch), c32 (min improvement 1e-2), c33 (> patience), c34 (never
    stops): the validation losses are scripted through _float_logits (every row's loss = target)."""
    rows, y = synthetic(n=60)
    val_rows, val_y = rows[40:], y[40:]
    script = iter([1.0, 0.995, 0.995, 0.995, 0.995] + [5.0] * 40)
    real = classifier_module._float_logits

    def scripted(net, x):
        out = real(net, x)
        z = math.log(math.expm1(next(script)))  # BCE(z, 0) = BCE(-z, 1) = softplus(z) = target
        return torch.where(val_y == 1, torch.full_like(out, -z), torch.full_like(out, z))

    monkeypatch.setattr(classifier_module, "_float_logits", scripted)
    clf = BitsetMLPClassifier(hidden=(4,), max_epochs=40, patience=3).fit(rows[:40], y[:40], validation=(val_rows, val_y))
    assert clf.best_epoch_ == 1 and len(clf.history_) == 5
    assert clf.validation_loss_ == pytest.approx(0.995, abs=1e-6)


def test_the_fitted_network_is_in_eval_mode(small_fit):
    """c36 (net.eval() after loading the best state dropped): dropout stays on in network_."""
    clf, rows, _ = small_fit
    assert not clf.network_.training
    assert torch.equal(clf.decision_function_float(rows), clf.decision_function_float(rows))


def test_the_last_short_batch_is_trained_on(monkeypatch):
    """c41 (range(0, len(order) - 1, bs)): a last batch of one row is skipped."""
    rows, y = synthetic(n=40)
    sizes = []
    unpack = ops.unpack_bits
    monkeypatch.setattr(ops, "unpack_bits", lambda p, *a, **k: (sizes.append(p.shape[0]), unpack(p, *a, **k))[1])
    BitsetMLPClassifier(hidden=(4,), max_epochs=1, batch_size=16).fit(rows[:33], y[:33], validation=(rows[33:], y[33:]))
    assert sizes == [16, 16, 1, 7]


# -- seeds and state
def test_the_seed_drives_the_split_and_the_shuffling(monkeypatch):
    """c38 (split/shuffle generator seeded with 0 whatever the seed)."""
    rows, y = synthetic(n=60)
    masks = []
    real_split = BitsetMLPClassifier._split
    monkeypatch.setattr(BitsetMLPClassifier, "_split", lambda self, *a: (lambda r: (masks.append(r[1]), r)[1])(real_split(self, *a)))
    BitsetMLPClassifier(hidden=(4,), max_epochs=1, seed=0).fit(rows, y)
    BitsetMLPClassifier(hidden=(4,), max_epochs=1, seed=1).fit(rows, y)
    BitsetMLPClassifier(hidden=(4,), max_epochs=1, seed=1).fit(rows, y)
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])


def test_the_seed_drives_the_initialisation():
    """c39 (_deterministic seeded with 0 whatever the seed): full batch, given validation set, so the
    seed reaches only the initial weights and the order of rows within the single batch."""
    rows, y = synthetic(n=60)
    fit = lambda seed: BitsetMLPClassifier(hidden=(4,), max_epochs=1, batch_size=1000, seed=seed).fit(
        rows[:40], y[:40], validation=(rows[40:], y[40:]))
    a, b = fit(0), fit(1)
    assert (a.first_layer_weight() - b.first_layer_weight()).abs().max() > 1e-2


def test_fit_leaves_the_callers_random_stream_and_determinism_setting():
    """c53 (rng state not restored), c54 (deterministic flag not restored)."""
    rows, y = synthetic(n=40)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    before = torch.are_deterministic_algorithms_enabled()
    BitsetMLPClassifier(hidden=(4,), max_epochs=1).fit(rows, y)
    assert torch.equal(torch.rand(3), want)
    assert torch.are_deterministic_algorithms_enabled() == before


def test_fit_keeps_the_callers_warn_only():
    """A fit restored use_deterministic_algorithms without its warn_only: the caller's own
    nondeterministic ops then raised where they had warned."""
    rows, y = synthetic(n=40)
    for setting in ((True, True), (True, False), (False, False)):
        torch.use_deterministic_algorithms(setting[0], warn_only=setting[1])
        try:
            BitsetMLPClassifier(hidden=(4,), max_epochs=1).fit(rows, y)
            assert (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled()) == setting
        finally:
            torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast_bf16"])
def test_fit_trains_the_same_network_whatever_the_callers_context(context):
    """Inside the caller's no_grad or inference_mode a fit failed (no gradient); inside a bf16
    autocast it trained another network, in bfloat16."""
    rows, y = synthetic(n=80)
    params = dict(hidden=(8,), max_epochs=3, seed=3)
    want = BitsetMLPClassifier(**params).fit(rows, y)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "autocast_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[context]
    with ctx():
        got = BitsetMLPClassifier(**params).fit(rows, y)
        assert torch.is_grad_enabled() == (context == "autocast_bf16")  # the caller's context is back
    assert got.history_ == want.history_
    assert torch.equal(got.decision_function(rows), want.decision_function(rows))
    for k, v in want.state_tensors().items():
        assert torch.equal(got.state_tensors()[k], v), k


def test_a_ctrl_c_during_a_fit_stays_a_keyboard_interrupt(monkeypatch):
    """Stopped inside one of torch's lazy imports, torch was left half-imported, the restore of
    the deterministic setting raised AttributeError, and the CLI printed a traceback, exit 1."""
    rows, y = synthetic(n=40)
    real = torch.use_deterministic_algorithms
    calls = []

    def half_imported(mode, warn_only=False):
        calls.append(mode)
        if len(calls) > 1:
            raise AttributeError("module 'sympy' has no attribute 'printing'")
        real(mode, warn_only=warn_only)

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "use_deterministic_algorithms", half_imported)
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            BitsetMLPClassifier(hidden=(4,), max_epochs=1).fit(rows, y)
    finally:
        real(False)
    assert calls == [True, False]


def test_from_state_tensors_leaves_the_callers_random_stream(small_fit):
    """c52 (fork_rng dropped)."""
    clf, rows, _ = small_fit
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    BitsetMLPClassifier.from_state_tensors(clf.get_params(), clf.state_tensors(), rows.shape[1])
    assert torch.equal(torch.rand(3), want)


def test_dropout_reaches_the_hidden_layers():
    """c60 (Dropout(0.0) whatever the parameter)."""
    net = BitsetMLPClassifier(hidden=(4, 3), dropout=0.3)._build(64)
    assert [m.p for m in net if isinstance(m, torch.nn.Dropout)] == [0.3, 0.3]


# -- outputs
def test_predict_proba_columns_are_real_then_fake(small_fit):
    """c44 (columns swapped)."""
    clf, rows, _ = small_fit
    p = clf.predict_proba(rows)
    assert torch.allclose(p[:, 1], torch.sigmoid(clf.decision_function(rows)))
    assert torch.equal((p[:, 1] > 0.5).to(torch.int64), clf.predict(rows))


def test_predict_is_strictly_above_the_threshold(small_fit):
    """c45 (> -> >=)."""
    clf, rows, _ = small_fit
    s = clf.decision_function(rows)
    t = float(s[0])
    assert clf.predict(rows, threshold=t)[0] == 0
    assert torch.equal(clf.predict(rows, threshold=t), (s > t).to(torch.int64))


def test_logits_are_float32_under_autocast(small_fit):
    """c58 (autocast on CPU not disabled): decision_function_float under a bf16 autocast."""
    clf, rows, _ = small_fit
    want = clf.decision_function_float(rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = clf.decision_function_float(rows)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_unsupported_tail_layers_are_refused():
    """c05 (the TypeError for an unknown layer dropped)."""
    tail = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Sigmoid(), torch.nn.Linear(4, 1))
    with pytest.raises(TypeError, match="classifier layer Sigmoid is not supported"):
        classifier_module._tail_logits(tail, torch.zeros(2, 4))


# -- from_state_tensors
@pytest.mark.parametrize("params, match", [
    (dict(hidden=(0,)), "hidden must be a list of layer widths >= 1"),        # c47
    (dict(hidden=(True,)), "hidden must be a list of layer widths >= 1"),     # c48
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),            # c49
])
def test_from_state_tensors_refuses_bad_params(small_fit, params, match):
    clf, rows, _ = small_fit
    tensors = clf.state_tensors()  # (the parameters are checked before the tensors)
    with pytest.raises(ValueError, match=match):
        BitsetMLPClassifier.from_state_tensors({**clf.get_params(), **params}, tensors, rows.shape[1])


def test_from_state_tensors_refuses_float64_and_non_finite(small_fit):
    """c50 (dtype check dropped), c51 (finiteness check dropped)."""
    clf, rows, _ = small_fit
    t = clf.state_tensors()
    with pytest.raises(ValueError, match=r"classifier tensor 0.bias has shape .*torch.float64"):
        BitsetMLPClassifier.from_state_tensors(clf.get_params(), {**t, "classifier.0.bias": t["classifier.0.bias"].double()}, rows.shape[1])
    bad = t["classifier.3.weight"].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="classifier tensor 3.weight holds NaN or infinite"):
        BitsetMLPClassifier.from_state_tensors(clf.get_params(), {**t, "classifier.3.weight": bad}, rows.shape[1])


def test_from_state_tensors_ignores_other_tensors(small_fit):
    """c56 (every tensor taken as the classifier's)."""
    clf, rows, _ = small_fit
    again = BitsetMLPClassifier.from_state_tensors(clf.get_params(), {**clf.state_tensors(), "threshold.0": torch.zeros(3)},
                                                   rows.shape[1])
    assert torch.equal(again.decision_function(rows), clf.decision_function(rows))


def test_state_tensors_are_copies(small_fit):
    """c59 (state_tensors returned the live parameters)."""
    clf, rows, _ = small_fit
    before = clf.decision_function_float(rows)
    for v in clf.state_tensors().values():
        v.zero_()
    assert torch.equal(clf.decision_function_float(rows), before)


@pytest.mark.parametrize("params, match", [
    (dict(max_epochs=0), "max_epochs must be an int >= 1, got 0"),
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(batch_size=2.5), "batch_size must be an int >= 1, got 2.5"),
    (dict(patience=-1), "patience must be an int >= 0, got -1"),
    (dict(seed=-1), "seed must be an int >= 0, got -1"),
    (dict(lr=float("nan")), "lr must be a finite number >= 0, got nan"),
    (dict(weight_decay=-1e-3), "weight_decay must be a finite number >= 0, got -0.001"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    (dict(hidden=(4, 0)), r"hidden must be a list of layer widths >= 1, got \(4, 0\)"),
    (dict(class_weight="auto"), "class_weight must be 'balanced' or None, got 'auto'"),
])
def test_fit_refuses_bad_parameters_by_name(params, match):
    """Before training: max_epochs=0 ended in load_state_dict(None), batch_size=0 in range()'s error."""
    rows, y = synthetic(n=40)
    with pytest.raises(ValueError, match=match):
        BitsetMLPClassifier(**params).fit(rows, y)
