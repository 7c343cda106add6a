"""Taps: rows equal the reference twin on hooked activations, in every execution mode."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch import nn

import fakespotter  # noqa: F401
from fakespotter import reference
from fakespotter.backbones import custom_backbone, get_backbone
from fakespotter.backbones import dlib_resnet as D
from fakespotter.calibration import ThresholdCalibrator
from fakespotter.taps import Tap, exact_float32, export_tap, load_script_tap, script_tap

from tapnets import (FETCH_HINT, SMALL_LAYERS, SMALL_SHAPE, dlib_cached, hook_activations,
                     small_chips, small_net)

needs_dlib = pytest.mark.skipif(not dlib_cached(), reason=FETCH_HINT)


def reference_rows(module, tap, x):
    """The expected row: reference.threshold_pack_into of hook-captured activations (on x's device)."""
    acts = hook_activations(module, tap.layers, x)
    out = torch.zeros((x.shape[0], tap.layout.total_words), dtype=torch.int64, device=x.device)
    for slot, thr in zip(tap.layout.layers, tap.layer_thresholds()):
        reference.threshold_pack_into(acts[slot.name], thr, tap.granularity, out, slot.word_offset)
    return out


def calibrated(tap, x, mode):
    tap.set_thresholds(ThresholdCalibrator(tap, mode=mode).fit([x]).thresholds_)
    return tap


def five_modes(tap, x, tmp_path, compile_backend="aot_eager"):
    """Rows from eager, compile, export (+ save/load), script (+ save/load)."""
    with torch.no_grad():
        rows = {"eager": tap(x)}
        rows["compile"] = torch.compile(tap, backend=compile_backend, fullgraph=True)(x)
        program = export_tap(tap)
        rows["export"] = program.module()(x)
        torch.export.save(program, tmp_path / "tap.pt2")
        rows["export_loaded"] = torch.export.load(tmp_path / "tap.pt2").module()(x)
        scripted = script_tap(tap)
        rows["script"] = scripted(x)
        scripted.save(str(tmp_path / "tap.ts"))
        rows["script_loaded"] = load_script_tap(tmp_path / "tap.ts")(x)
    return rows


# ----------------------------------------------------------------------------------------------
# small random CNN (always runs)


@pytest.mark.parametrize("granularity", ["channel", "element"])
@pytest.mark.parametrize("mode", ["per_layer", "per_neuron"])
def test_rows_equal_reference_on_hooked_activations(granularity, mode):
    net = small_net()
    x = small_chips(9)
    tap = calibrated(Tap(net, SMALL_LAYERS, granularity=granularity, input_shape=SMALL_SHAPE),
                     x, mode)
    with torch.no_grad():
        rows = tap(x)
    assert torch.equal(rows, reference_rows(net, tap, x))
    bits = reference.unpack_bits(rows, 0, rows.shape[1] * 64).float().mean().item()
    assert 0.05 < bits < 0.95  # neither all off nor all on (a no-op tap would fail)


def test_layout_is_cumulative_and_padding_is_zero():
    tap = Tap(small_net(), SMALL_LAYERS, granularity="element", input_shape=SMALL_SHAPE,
              thresholds=-1e9)  # every neuron fires: padding bits must still be 0
    slots = tap.layout.layers
    assert [s.name for s in slots] == SMALL_LAYERS
    assert [s.shape for s in slots] == [(70, 7, 6), (70, 7, 6), (70, 7, 6), (70, 7, 6), (65,)]
    offset = 0
    for s in slots:
        assert s.word_offset == offset and s.words == -(-s.features // 64)
        offset += s.words
    assert tap.layout.total_words == offset
    with torch.no_grad():
        rows = tap(small_chips(3))
    for s in slots:
        bits = reference.unpack_bits(rows, s.word_offset, s.words * 64)
        assert bits[:, : s.features].all() and not bits[:, s.features:].any()


def test_channel_layout_and_mnc_from_popcount():
    net = small_net()
    x = small_chips(5)
    tap = calibrated(Tap(net, SMALL_LAYERS, input_shape=SMALL_SHAPE), x, "per_layer")
    assert [s.features for s in tap.layout.layers] == [70, 70, 70, 70, 65]
    assert [s.word_offset for s in tap.layout.layers] == [0, 2, 4, 6, 8]
    with torch.no_grad():
        rows = tap(x)
    m = tap.mnc(rows)
    assert m.shape == (5, 5) and m.dtype == torch.float32
    for j, s in enumerate(tap.layout.layers):
        bits = reference.unpack_bits(rows, s.word_offset, s.features)
        assert torch.equal(m[:, j], bits.sum(1).float() / s.features)
    with pytest.raises(ValueError, match=r"Tap.mnc: rows must be \[N, 10\], got \[5, 3\]"):
        tap.mnc(rows[:, :3])


def test_five_execution_modes_identical_small(tmp_path):
    net = small_net()
    x = small_chips(6)
    for granularity in ("channel", "element"):
        tap = calibrated(Tap(net, SMALL_LAYERS, granularity=granularity, input_shape=SMALL_SHAPE),
                         x, "per_neuron")
        rows = five_modes(tap, x, tmp_path)
        expected = reference_rows(net, tap, x)
        for mode, r in rows.items():
            assert torch.equal(r, expected), (granularity, mode)


@pytest.mark.slow  # inductor compiles C++: ~20 s on 2 cores
def test_inductor_compile_small():
    net = small_net()
    x = small_chips(4)
    tap = calibrated(Tap(net, SMALL_LAYERS, input_shape=SMALL_SHAPE), x, "per_layer")
    with torch.no_grad():
        assert torch.equal(torch.compile(tap)(x), tap(x))


def test_exported_program_has_dynamic_batch(tmp_path):
    tap = calibrated(Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE), small_chips(4),
                     "per_layer")
    loaded = torch.export.load(_save(export_tap(tap), tmp_path)).module()
    for n in (1, 2, 7):
        x = small_chips(n, seed=n)
        with torch.no_grad():
            assert torch.equal(loaded(x), tap(x))


def _save(program, tmp_path):
    path = tmp_path / "t.pt2"
    torch.export.save(program, path)
    return path


def test_unused_tail_is_not_computed():
    tap = Tap(small_net(), ["act"], input_shape=SMALL_SHAPE)
    code = tap.net.code
    assert "head" not in code and "fc" not in code and "block" not in code
    assert code.count("torch.ops.fakespotter.threshold_pack_into(") == 1


def test_packs_follow_the_first_consumer_unless_it_could_write_in_place():
    """A pack runs after its activation's first consumer (so that torch.compile lays the activation
    out for that consumer and does not copy it for the pack), but never after one that may write
    into it: the rows still equal the twin on the activations as the hooks saw them."""
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    code = tap.net.code
    assert code.index("block_conv = self.block.conv(act)") < code.index("threshold_pack_into(act,")

    class Consumers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
            self.relu = nn.ReLU(inplace=True)
            self.d, self.e, self.f = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.relu(self.a(x - 128.0))           # monitored a: its consumer writes into it
            z = self.b(y).clamp_(min=0.5)              # monitored b: a method in place
            w = torch.nn.functional.relu(self.c(z), inplace=True)  # monitored c: a function in place
            v = torch.nn.functional.hardtanh(self.d(w), 0.0, 2.0, True)  # monitored d: in place, by position
            return self.f(self.e(v))

    net = Consumers().eval()
    x = small_chips(3)
    layers = ["a", "b", "c", "d", "e", "f"]
    for granularity in ("channel", "element"):
        tap = calibrated(Tap(net, layers, granularity=granularity, input_shape=SMALL_SHAPE), x, "per_neuron")
        with torch.no_grad():
            assert torch.equal(tap(x), reference_rows(net, tap, x)), granularity


def test_a_pack_is_not_moved_past_an_in_place_write_through_another_name():
    """A monitored module that hands back its input (nn.Identity as a tap point, Dropout in eval,
    a Flatten view) shares that input's storage: an in-place op on the input between the module and
    its first consumer changed the activation before it was packed (post-ReLU bits for a pre-ReLU
    layer, where calibration saw the pre-ReLU values)."""

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.hook, self.drop, self.flat = nn.Identity(), nn.Dropout(0.1), nn.Flatten(2)
            self.relu = nn.ReLU(inplace=True)
            self.head = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x - 128.0)
            feat, kept, flat = self.hook(y), self.drop(y), self.flat(y)  # all three are y's storage
            out = self.relu(y)  # in place on y
            return self.head(feat + kept + flat.view_as(y) + out)

    net = Aliased().eval()
    x = small_chips(4)
    for granularity in ("channel", "element"):
        tap = calibrated(Tap(net, ["hook", "drop", "flat", "head"], granularity=granularity, input_shape=SMALL_SHAPE),
                         x, "per_layer")
        with torch.no_grad():
            assert torch.equal(tap(x), reference_rows(net, tap, x)), granularity


class Recorder(nn.Module):
    """Identity that remembers a weak reference to its output."""

    refs: list = []

    def forward(self, x):
        y = x * 1.0
        Recorder.refs.append(weakref.ref(y))
        return y


class Check(nn.Module):
    """Counts the recorded activations still alive when it runs."""

    alive: list = []

    def forward(self, x):
        Check.alive.append(sum(r() is not None for r in Recorder.refs))
        return x


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(4))
        self.recs = nn.ModuleList(Recorder() for _ in range(4))
        self.check = Check()

    def forward(self, x):
        for conv, rec in zip(self.convs, self.recs):
            x = rec(conv(x))
        return self.check(x)


def test_activations_are_dropped_as_soon_as_packed():
    net = Chain().eval()
    backbone = custom_backbone(net, [f"recs.{i}" for i in range(4)] + ["check"], (8, 8),
                               leaf_modules=(Recorder, Check))
    tap = Tap(backbone)
    Recorder.refs.clear()
    Check.alive.clear()
    with torch.no_grad():
        tap(torch.rand(2, 3, 8, 8))
    # when the last module runs only its own input (the last recorded activation) is alive
    assert len(Recorder.refs) == 4 and Check.alive == [1]


def test_backbone_is_frozen_and_shared():
    net = small_net()
    net.train()
    tap = Tap(net, SMALL_LAYERS, input_shape=SMALL_SHAPE)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert tap.net.stem.weight is net.stem.weight


def test_backbone_switched_back_to_training_is_refused():
    """BatchNorm in training mode normalizes with each batch's statistics, dropout drops: a tap on a
    module put back into train() would give other bits silently."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                        nn.Flatten(), nn.Linear(8 * 13 * 11, 4)).eval()
    x = small_chips(4)
    tap = Tap(net, ["2", "5"], input_shape=SMALL_SHAPE)
    rows = tap(x)
    for make_training in (net.train, tap.train, lambda: net[1].train()):
        make_training()
        with pytest.raises(RuntimeError, match=r"training mode \((0, )?1\b.*\.eval\(\)"):
            tap(x)
        with pytest.raises(RuntimeError, match="training mode"):
            tap.capture(x, lambda i, a: None)
        tap.eval()  # the tap shares the module's layers: this puts them back
        assert not net[1].training and torch.equal(tap(x), rows)


def test_compiled_scripted_and_exported_taps_refuse_training_mode(tmp_path):
    """The other execution modes refuse it too: a compiled tap used to retrace the backbone in
    training mode (other bits, and BatchNorm's running statistics overwritten), a scripted one
    to run it so."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()), nn.Dropout(0.5)).eval()
    net[1][0].running_mean.fill_(0.3)
    x = small_chips(4)
    tap = Tap(net, ["1.1", "2"], granularity="element", thresholds=0.3, input_shape=SMALL_SHAPE)
    rows = tap(x)
    with torch.no_grad():
        compiled = torch.compile(tap, backend="aot_eager")
        assert torch.equal(compiled(x), rows)
        scripted = script_tap(tap)
        scripted.save(str(tmp_path / "tap.ts"))
        loaded = load_script_tap(tmp_path / "tap.ts")
        exported = export_tap(tap).module()
        stats = net[1][0].running_mean.clone()
        for make_training in (net.train, tap.train, lambda: net[1][0].train()):
            make_training()
            with pytest.raises(RuntimeError, match="training mode"):
                compiled(x)
            tap.eval()
            assert torch.equal(compiled(x), rows)
        tap.train()
        net.eval()  # the backbone back in eval mode is all that counts, scripted too
        assert torch.equal(compiled(x), rows) and torch.equal(script_tap(tap)(x), rows)
        assert torch.equal(net[1][0].running_mean, stats)
        for m in (scripted, loaded, getattr(scripted.net, "1")):
            m.train()
            with pytest.raises(torch.jit.Error, match="training mode.*eval"):
                scripted(x) if m is not loaded else loaded(x)
            m.eval()
        assert torch.equal(scripted(x), rows) and torch.equal(loaded(x), rows)
        with pytest.raises(NotImplementedError):  # torch's own refusal: the program is frozen in eval mode
            exported.train()


def test_unknown_layer_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown layer 'block.rellu'.*close matches: 'block.relu'"):
        Tap(small_net(), ["stem", "block.rellu"], input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match=r"unknown layer 'zzz' in SmallNet; no close match"):
        Tap(small_net(), ["zzz"], input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match=r"layers listed more than once: \['act'\]"):
        Tap(small_net(), ["act", "act"], input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match="granularity must be 'channel' or 'element', got 'pixel'"):
        Tap(small_net(), ["act"], granularity="pixel", input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match=r"pass layers=\[...\] and input_shape"):
        Tap(small_net())


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(self.relu(x)))


def test_module_called_twice_is_refused():
    with pytest.raises(ValueError, match=r"layer 'relu' is called 2 times per forward pass"):
        Tap(Twice(), ["relu"], input_shape=(3, 4, 4))
    Tap(Twice(), ["conv"], input_shape=(3, 4, 4))  # a module called once is fine


def test_wrong_input_shape_is_refused():
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match=r"Tap: expected input \[N, 3, 15, 13\], got \[2, 3, 15, 14\]"):
        tap(torch.zeros(2, 3, 15, 14))
    with pytest.raises(TypeError, match=r"Tap: expected a floating-point input \(tap.prepare\(chips\) gives"):
        tap(torch.zeros(2, 3, 15, 13, dtype=torch.uint8))


def test_thresholds_forms():
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    tap.set_thresholds([0.1, 0.2, 0.3, 0.4, 0.5])
    assert tap.threshold_mode == "per_layer" and tap.thresholds.tolist() == pytest.approx(
        [0.1, 0.2, 0.3, 0.4, 0.5])
    per = [torch.full((s.features,), float(i)) for i, s in enumerate(tap.layout.layers)]
    tap.set_thresholds(per)
    assert tap.threshold_mode == "per_neuron" and tap.thresholds.numel() == 70 * 4 + 65
    assert torch.equal(tap.layer_thresholds()[4], per[4])
    with pytest.raises(ValueError, match=r"layer 'fc' needs 1 threshold or 65 \(one per channel\), got 3"):
        tap.set_thresholds([0.0, 0.0, 0.0, 0.0, torch.zeros(3)])
    with pytest.raises(ValueError, match="expected 5 entries"):
        tap.set_thresholds([0.0, 0.0])
    # a tensor: one value per layer, or one for all; a scalar number too
    for given, want in ((torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), [0.1, 0.2, 0.3, 0.4, 0.5]),
                        (torch.tensor(0.25), [0.25] * 5), (torch.tensor([0.75]), [0.75] * 5), (2, [2.0] * 5)):
        tap.set_thresholds(given)
        assert tap.threshold_mode == "per_layer" and tap.thresholds.tolist() == pytest.approx(want), given
    with pytest.raises(ValueError, match="expected 5 entries"):
        tap.set_thresholds(torch.zeros(1, 5))


def test_a_tap_built_in_inference_mode_takes_new_thresholds_outside_it():
    """Its thresholds buffer was an inference tensor: set_thresholds' in-place copy raised torch's
    "Inplace update to inference tensor outside InferenceMode"."""
    with torch.inference_mode():
        tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    x = small_chips(4)
    script = script_tap(tap)  # shares the buffer: a new value reaches it
    for value in (0.25, [0.1, 0.2, 0.3, 0.4, 0.5]):
        tap.set_thresholds(value)
        with torch.no_grad():
            want = reference_rows(tap.backbone.module, tap, x)
            assert torch.equal(tap(x), want) and torch.equal(script(x), want)
    assert tap.thresholds.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


# ----------------------------------------------------------------------------------------------
# the real dlib backbone


@pytest.fixture(scope="module")
def dlib_backbone():
    if not dlib_cached():
        pytest.skip(FETCH_HINT)
    return get_backbone()


def face_like_chips(n):
    """Smooth random images 0..255 (more face-like statistics than white noise)."""
    g = torch.Generator().manual_seed(5)
    low = torch.rand((n, 3, 10, 10), generator=g) * 255
    return torch.nn.functional.interpolate(low, size=(150, 150), mode="bilinear",
                                           align_corners=False)


@needs_dlib
def test_dlib_thresholds_do_not_depend_on_the_batches_given(dlib_backbone):
    """The backbone's activations change in their last bits with the forward's batch size (batch
    1 against 10 moved float32 thresholds by up to 5 ULP); the calibrator's forwards are all of
    forward_batch chips, whatever the batches it is given."""
    x = face_like_chips(19)
    tap = Tap(dlib_backbone, granularity="channel")
    fits = [ThresholdCalibrator(tap).fit(x[i:i + b] for i in range(0, len(x), b)) for b in (1, 3, 10, 19)]
    for other in fits[1:]:
        assert other.layer_means_.tobytes() == fits[0].layer_means_.tobytes()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(other.neuron_means_, fits[0].neuron_means_))
    for bad in (0, 4097, 2.0):
        with pytest.raises(ValueError, match=rf"forward_batch must be an int from 1 to 4096, got {bad!r}"):
            ThresholdCalibrator(tap, forward_batch=bad).partial_fit(x[:1])
    one = ThresholdCalibrator(tap, forward_batch=np.int64(16)).fit(x[i:i + 1] for i in range(len(x)))
    assert one.layer_means_.tobytes() == fits[0].layer_means_.tobytes()


@needs_dlib
@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_dlib_rows_equal_reference(dlib_backbone, granularity):
    x = face_like_chips(3)
    tap = calibrated(Tap(dlib_backbone, granularity=granularity), x, "per_layer")
    assert tap.layers == list(D.DEFAULT_LAYERS) and len(tap.layers) == 30
    with torch.no_grad():
        rows = tap(x)
    assert torch.equal(rows, reference_rows(dlib_backbone.module, tap, x))
    m = tap.mnc(rows).numpy()
    assert ((m > 0) & (m < 1)).mean() > 0.5


@needs_dlib
def test_dlib_five_execution_modes(dlib_backbone, tmp_path):
    x = face_like_chips(2)
    tap = calibrated(Tap(dlib_backbone), x, "per_neuron")
    rows = five_modes(tap, x, tmp_path)
    expected = reference_rows(dlib_backbone.module, tap, x)
    for mode, r in rows.items():
        assert torch.equal(r, expected), mode


@needs_dlib
@pytest.mark.slow
def test_dlib_inductor_compile(dlib_backbone):
    x = face_like_chips(2)
    for granularity in ("channel", "element"):
        tap = calibrated(Tap(dlib_backbone, granularity=granularity), x, "per_layer")
        with torch.no_grad():
            assert torch.equal(torch.compile(tap)(x), tap(x)), granularity


@needs_dlib
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # (inductor's own)
def test_dlib_inductor_keeps_the_eager_rows_with_the_eager_layout(dlib_backbone):
    """Default inductor moved 3 bits of 8.7 million in element granularity on real chips (its
    channels_last convolutions round differently, as an eager channels_last input does); with
    layout_optimization off, as the README says, its rows are the eager ones."""
    import shutil

    from fakespotter import samples
    from fakespotter.features import prepare_chips
    from fakespotter.weights import WeightsError

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor needs a C++ compiler on a CPU")
    try:
        chips, _, _ = samples.sample_chips(12, 12, seed=0)
    except (WeightsError, OSError) as e:
        pytest.skip(f"sample data unavailable ({e})")
    tap = Tap(dlib_backbone, granularity="element")
    x = prepare_chips(chips, tap, "test")
    tap.set_thresholds(ThresholdCalibrator(tap, mode="per_neuron").fit([x[:10]]).thresholds_)
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            compiled = torch.compile(tap, options={"layout_optimization": False})
            assert torch.equal(compiled(tap.prepare(x[10:])), tap(tap.prepare(x[10:])))
    finally:
        torch._dynamo.reset()


def test_numpy_packbits_view_of_a_row():
    """A row viewed as bytes is numpy.packbits of the unpacked bits (little bit order)."""
    tap = Tap(small_net(), SMALL_LAYERS, granularity="element", input_shape=SMALL_SHAPE)
    x = small_chips(2)
    with torch.no_grad():
        rows = tap(x)
    bits = reference.unpack_bits(rows, 0, rows.shape[1] * 64).numpy()
    assert np.array_equal(rows.numpy().view(np.uint8), np.packbits(bits, axis=1, bitorder="little"))


def test_exact_float32_turns_tf32_off_and_restores_the_settings():
    """IEEE float32 convolutions and matmuls inside, the caller's settings back after, whether
    the caller used torch's legacy TF32 flags, the new fp32_precision settings, or neither."""
    import subprocess
    import sys

    code = """
import sys, torch
from fakespotter.taps import exact_float32
conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
how = sys.argv[1]
if how == "legacy":
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
elif how == "new":
    conv.fp32_precision = mm.fp32_precision = "tf32"
before = conv.fp32_precision, mm.fp32_precision
with exact_float32():
    assert (conv.fp32_precision, mm.fp32_precision) == ("ieee", "ieee")
assert (conv.fp32_precision, mm.fp32_precision) == before
try:
    with exact_float32():
        raise KeyError("inside")
except KeyError:
    pass
assert (conv.fp32_precision, mm.fp32_precision) == before
if how == "legacy":
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
print("ok", how, before)
"""
    for how in ("default", "legacy", "new"):  # a fresh process each: torch remembers which API was used
        r = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("ok"), (how, r.stdout, r.stderr[-2000:])


def test_fakespotter_forwards_run_in_exact_float32(tmp_path):
    """features() (both paths), calibration and the scanner run the backbone with TF32 off, so
    that a GPU gives the CPU's rows; a direct tap call follows torch's setting."""
    from fakespotter.features import features
    from fakespotter.scan import _Forward

    net = small_net()
    tap = Tap(net, SMALL_LAYERS, input_shape=SMALL_SHAPE)
    seen = []
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_pre_hook(lambda m, i: seen.append(torch.backends.cudnn.conv.fp32_precision))
    saved = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        x = small_chips(3)
        features(x, tap)
        ThresholdCalibrator(tap).fit([x])
        det = type("Det", (), {"tap_": tap, "classifier_": type("C", (), {
            "decision_function": staticmethod(lambda rows: torch.zeros(len(rows)))})()})()
        _Forward(det, "cpu", 2).run(np.zeros((1, 15, 13, 3), dtype=np.uint8))
        assert seen == ["ieee", "ieee", "ieee"]
        with torch.no_grad():
            tap(x)
        assert seen[-1] == "tf32"
    finally:
        torch.backends.cudnn.conv.fp32_precision = saved


def test_exact_float32_blocks_overlapping_in_threads_restore_the_callers_settings():
    """Thread A enters, B enters, A leaves (B still inside: still IEEE), B leaves: the caller's
    setting is back. Saving and restoring per block would leave IEEE on for good."""
    import threading

    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    conv.fp32_precision = "tf32"
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with exact_float32():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with exact_float32():
            b_in.set()
            a_out.wait(10)
            seen["b inside, after a left"] = conv.fp32_precision

    try:
        threads = [threading.Thread(target=f) for f in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert seen == {"b inside, after a left": "ieee"} and conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision = saved


def test_capture_runs_in_several_threads_at_once():
    """Two threads capturing on one tap at the same time each get their own activations."""
    import threading

    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    xs = [small_chips(2), small_chips(2) + 1]
    want = []
    for x in xs:
        got = []
        tap.capture(x, lambda i, a, got=got: got.append((i, a.clone())))
        want.append(got)
    barrier = threading.Barrier(2, timeout=10)
    results = [[], []]

    def run(k):
        def fn(i, a):
            if i == 0:
                barrier.wait()  # both threads are inside capture now
            results[k].append((i, a.clone()))
        tap.capture(xs[k], fn)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for k in (0, 1):
        assert [i for i, _ in results[k]] == [i for i, _ in want[k]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(results[k], want[k]))


def test_taps_built_in_several_threads_while_another_runs_the_module():
    """torch.fx patches nn.Module.__call__ process-wide while it traces: taps built in two
    threads at once restored each other's patch wrongly and left one in place, so that every
    module call of the process failed ("module is not installed as a submodule"); and a module
    run in another thread during a trace went into the trace."""
    import copy
    import threading

    net = small_net()
    x = small_chips(4)
    want = Tap(net, SMALL_LAYERS, input_shape=SMALL_SHAPE)(x)
    errors, stop = [], threading.Event()

    nets = [[copy.deepcopy(net) for _ in range(15)] for _ in range(4)]  # (seeding in threads would race)

    def build(mine):
        try:
            for other in mine:
                tap = Tap(other, SMALL_LAYERS, input_shape=SMALL_SHAPE)
                assert torch.equal(tap(x), want)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def run():
        tap = Tap(net, SMALL_LAYERS, input_shape=SMALL_SHAPE)
        try:
            while not stop.is_set():
                assert torch.equal(tap(x), want)
                with torch.no_grad():
                    net(x)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    runner = threading.Thread(target=run)
    runner.start()
    builders = [threading.Thread(target=build, args=(mine,)) for mine in nets]
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    stop.set()
    runner.join()
    assert not errors, errors[:3]
    nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8))  # no patch left behind


class Scaled(nn.Module):
    """A forward with an optional second argument (only the first is required) around the small
    net, whose monitored layers sit inside user modules."""

    def __init__(self):
        super().__init__()
        self.net = small_net()

    def forward(self, x, scale: float = 1.0):
        return self.net(x * scale)


def test_leaf_types_make_only_their_modules_leaves_and_optional_arguments_are_allowed():
    """``leaf_modules`` of a type the net does not use changes nothing (the monitored layers
    inside user modules are still traced into); a forward with an optional argument builds."""
    net = Scaled().eval()
    layers = [f"net.{n}" for n in SMALL_LAYERS]
    x = small_chips(3)
    plain = Tap(custom_backbone(net, layers, SMALL_SHAPE[1:]))
    leafy = Tap(custom_backbone(net, layers, SMALL_SHAPE[1:], leaf_modules=[nn.Dropout]))
    with torch.no_grad():
        assert torch.equal(plain(x), leafy(x))
        assert torch.equal(plain(x), Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)(x))


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


class LogNet(nn.Module):
    """A layer that gives NaN (log of negatives), and one whose output is 1-d (no batch axis)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.log = Log()
        self.flat = nn.Flatten(0)

    def forward(self, x):
        y = self.log(self.conv(x))
        return y, self.flat(y)


def test_layers_that_give_nan_build_and_a_layer_without_a_batch_axis_is_refused():
    torch.manual_seed(0)
    net = LogNet().eval()
    with torch.no_grad():
        assert net(small_chips(1)[:, :, :15, :13])[0].isnan().any()
    tap = Tap(custom_backbone(net, ["log"], (15, 13)))  # (the probe's NaN agree with the hooks' NaN)
    assert tap.layout.layers[0].features == 4
    with pytest.raises(ValueError, match=r"Tap: layer 'flat' must output a tensor \[N, C, ...\] or \[N, D\], got "
                                         r"Tensor\[\d+\]"):
        Tap(custom_backbone(net, ["flat"], (15, 13)))
