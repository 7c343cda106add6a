"""Tap edges on the small test nets: argument checks, where packs sit in the graph, thresholds
per layer and their updates, layout totals. From a mutation audit of taps.py: each test fails on
the one-line change its docstring names ("catches"), which no other test caught."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fakespotter  # noqa: F401
from fakespotter import reference
from fakespotter.taps import Tap

from tapnets import SMALL_LAYERS, SMALL_SHAPE, hook_activations, small_chips, small_net


def reference_rows(module, tap, x):
    acts = hook_activations(module, tap.layers, x)
    out = torch.zeros((x.shape[0], tap.layout.total_words), dtype=torch.int64)
    for slot, thr in zip(tap.layout.layers, tap.layer_thresholds()):
        reference.threshold_pack_into(acts[slot.name], thr, tap.granularity, out, slot.word_offset)
    return out


def test_layers_argument_validation():
    """Catches: drop `isinstance(layers, str)`, drop `if not layers`,
    root '' counted as a layer name."""
    with pytest.raises(TypeError, match="layers must be a sequence of qualified module names"):
        Tap(small_net(), "stem", input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match="at least one layer must be monitored"):
        Tap(small_net(), [], input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match=r"unknown layer '' in SmallNet"):
        Tap(small_net(), [""], input_shape=SMALL_SHAPE)


def test_close_matches_lists_several_and_looser_ones():
    """Catches: get_close_matches n=5 -> n=1, cutoff 0.5 -> 0.95."""
    with pytest.raises(ValueError, match=r"close matches: 'block\.conv', 'block\.out', 'block'"):
        Tap(small_net(), ["block.con"], input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match=r"unknown layer 'stm'.*close matches: 'stem'"):
        Tap(small_net(), ["stm"], input_shape=SMALL_SHAPE)


class _TwoArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, *xs):
        return self.conv(xs[0])


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.spare = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)


def test_forward_signature_and_unused_layer_are_named():
    """Catches: `len(required) != 1` -> `> 1`; drop `if not found`."""
    with pytest.raises(ValueError, match="must take exactly one required tensor argument"):
        Tap(_TwoArgs(), ["conv"], input_shape=(3, 4, 4))
    with pytest.raises(ValueError, match=r"layer 'spare' is not called in _Unused.forward"):
        Tap(_Unused(), ["conv", "spare"], input_shape=(3, 4, 4))


def test_plain_module_input_shape_is_checked():
    """Catches: drop `input_shape[0] != 3` / `len(input_shape) != 3`."""
    for bad in ((1, 15, 13), (3, 15), (3, 15, 13, 1)):
        with pytest.raises(ValueError, match=r"input_shape must be \(3, H, W\)"):
            Tap(small_net(), SMALL_LAYERS, input_shape=bad)


class _InPlaceFunctions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x):
        y = torch.relu_(self.a(x - 128.0))                    # monitored a: a torch function in place
        z = self.b(y)
        w = torch.sigmoid(z, out=z)                           # monitored b: written through out=
        return self.c(w * 2.0 - 1.0)


def test_packs_are_not_moved_past_in_place_torch_functions_or_out():
    """Catches: drop the `name.endswith('_')` check for call_function and the `"out" not in
    bound` check: the pack moved after the write, so it packed post-ReLU / post-sigmoid."""
    net = _InPlaceFunctions().eval()
    x = small_chips(3)
    for granularity in ("channel", "element"):
        tap = Tap(net, ["a", "b", "c"], granularity=granularity, input_shape=SMALL_SHAPE, thresholds=0.3)
        with torch.no_grad():
            assert torch.equal(tap(x), reference_rows(net, tap, x)), granularity


def test_a_pack_follows_the_first_consumer_not_a_later_one():
    """Catches: `min(node.users)` -> `max`: 'act' has two consumers (block.conv, the residual
    add); its pack belongs right after the first."""
    code = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE).net.code
    lines = code.splitlines()
    pack = next(i for i, l in enumerate(lines) if "threshold_pack_into(act," in l)
    conv = next(i for i, l in enumerate(lines) if "self.block.conv(act)" in l)
    add = next(i for i, l in enumerate(lines) if "+ act" in l or "add(" in l and "act" in l)
    assert conv < pack < add, code


def test_per_layer_thresholds_reach_their_own_layer():
    """Catches: per-layer spans `(i, 1)` -> `(0, 1)`: every layer thresholded with layer 0's
    value; layer_thresholds() and the rows must use each layer's own value."""
    net = small_net()
    tap = Tap(net, SMALL_LAYERS, input_shape=SMALL_SHAPE)
    values = [0.1, 0.2, 0.3, 0.4, 0.5]
    tap.set_thresholds(values)
    assert [t.item() for t in tap.layer_thresholds()] == pytest.approx(values)
    x = small_chips(3)
    acts = hook_activations(net, tap.layers, x)
    want = torch.zeros((3, tap.layout.total_words), dtype=torch.int64)
    for slot, v in zip(tap.layout.layers, values):
        reference.threshold_pack_into(acts[slot.name], torch.tensor([v]), "channel", want, slot.word_offset)
    with torch.no_grad():
        assert torch.equal(tap(x), want)


def test_set_thresholds_refuses_strings_and_wrong_length_tensors():
    """Catches: `numel() in (1, L)` -> `>= 1` (the str/dict refusal is also caught by
    test_calibration::test_thresholds_for_another_backbone_or_layers_are_refused)."""
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    for bad in ("0.5", b"01234", {"stem": 0.0}):
        with pytest.raises(TypeError, match="expected a Thresholds, a number, a tensor"):
            tap.set_thresholds(bad)
    with pytest.raises(ValueError, match="expected 5 entries"):
        tap.set_thresholds(torch.zeros(3))


def test_mixed_per_layer_and_per_neuron_entries_become_per_neuron():
    """Catches: `per_neuron = any(...)` -> `all(...)`."""
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    tap.set_thresholds([0.5, 0.0, 0.0, 0.0, torch.arange(65.0)])
    assert tap.threshold_mode == "per_neuron" and tap.thresholds.numel() == 70 * 4 + 65
    lt = tap.layer_thresholds()
    assert torch.equal(lt[0], torch.full((70,), 0.5)) and torch.equal(lt[4], torch.arange(65.0))


class _SlightlyAliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 8)

    def forward(self, x):
        y = self.pool(self.conv(x))
        z = y.flatten(1)
        y *= 1.01  # a 1% change that torch.fx's out-of-place record misses
        return self.fc(z)


def test_a_slightly_different_traced_graph_is_refused():
    """Catches: _verify_trace tolerance rtol=1e-4, atol=1e-5 -> 1e-1."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"does not reproduce its layers \['fc'\]"):
        Tap(_SlightlyAliased().eval(), ["fc"], input_shape=(3, 8, 8))


def test_same_mode_thresholds_update_the_buffer_in_place():
    """Catches: `if mode != self.threshold_mode` -> `if True`: a same-mode update must write
    into the registered buffer (a scripted / exported tap holds that tensor), not replace it."""
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    buf, net = tap.thresholds, tap.net
    tap.set_thresholds([0.1, 0.2, 0.3, 0.4, 0.5])
    assert tap.thresholds is buf and tap.net is net
    assert buf.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_thresholds_without_a_weights_sha_are_accepted():
    """Catches: drop `theirs[0][1] is None or`: Thresholds that record no weights sha (older
    files) match any weights of the same backbone id."""
    import dataclasses
    from fakespotter.calibration import ThresholdCalibrator
    tap, x = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE), small_chips(4)
    thr = ThresholdCalibrator(tap, mode="per_layer").fit([x]).thresholds_
    assert tap.weights_sha256 is not None
    tap.set_thresholds(dataclasses.replace(thr, weights_sha256=None))
    assert torch.equal(tap.thresholds, torch.cat(list(thr.values)))


def test_layout_totals():
    """Catches: bytes_per_row 8 * words -> 4 * words; total_features summing words."""
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE, granularity="element")
    lay = tap.layout
    assert lay.bytes_per_row() == 8 * lay.total_words == tap(small_chips(1)).element_size() * tap(small_chips(1)).shape[1]
    assert lay.total_features == sum(s.features for s in lay.layers) == 70 * 7 * 6 * 4 + 65


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.a(x), self.b(x)


class _PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = _Pair()

    def forward(self, x):
        a, b = self.pair(x)
        return a + b


def test_a_layer_returning_a_tuple_is_named():
    """Catches: drop `if not isinstance(out, fx.Proxy)` in _LayerTracer.call_module."""
    with pytest.raises(ValueError, match=r"layer 'pair' does not return a tensor"):
        Tap(_PairNet(), ["pair"], input_shape=(3, 4, 4))
    Tap(_PairNet(), ["pair.a"], input_shape=(3, 4, 4))


def test_training_mode_message_counts_the_rest():
    """Catches: the ' and N more' suffix dropped."""
    net = small_net()
    tap = Tap(net, SMALL_LAYERS, input_shape=SMALL_SHAPE)
    net.train()
    with pytest.raises(RuntimeError, match=r"training mode \(\w[\w.]*, \w[\w.]*, \w[\w.]* and \d+ more: training=True\)"):
        tap(small_chips(1))


def test_capture_leaves_no_callback_behind():
    """Catches: `del sink.fns[...]` dropped after capture: the callback (and what it holds)
    stayed referenced by the tap for good."""
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    seen = []
    tap.capture(small_chips(1), lambda i, a: seen.append(i))
    assert seen == [0, 1, 2, 3, 4]
    assert tap._aux["capture"][1].fns == {}
