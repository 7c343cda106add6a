"""Threshold calibration: brute-force float64 means, exact batch-size independence, save/load."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
import struct

import numpy as np
import pytest
import torch
from torch import nn

import fakespotter  # noqa: F401
from fakespotter import _safetensors
from fakespotter.backbones import custom_backbone
from fakespotter.calibration import ThresholdCalibrator, Thresholds, neuron_values
from fakespotter.taps import Tap

from tapnets import SMALL_LAYERS, SMALL_SHAPE, hook_activations, small_chips, small_net

N = 11


def brute_force(net, layers, granularity, x):
    """Per-layer and per-neuron means with math.fsum over all float32 neuron values."""
    acts = hook_activations(net, layers, x)
    layer, neuron = [], []
    for name in layers:
        v = neuron_values(acts[name], granularity).numpy().astype(np.float64)  # [N, F]
        layer.append(math.fsum(v.ravel()) / v.size)
        neuron.append(np.array([math.fsum(col) / v.shape[0] for col in v.T]))
    return np.array(layer), neuron


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_means_equal_brute_force_float64(granularity):
    net = small_net()
    x = small_chips(N)
    tap = Tap(net, SMALL_LAYERS, granularity=granularity, input_shape=SMALL_SHAPE)
    cal = ThresholdCalibrator(tap, forward_batch=N).fit([x])  # (the brute force's one forward of N)
    # (in the calibrator's memory layout, that of the scanner's chips: it sets the activations' last bits)
    layer, neuron = brute_force(net, SMALL_LAYERS, granularity, x.contiguous(memory_format=torch.channels_last))
    assert cal.n_images_ == N
    assert rel_err(cal.layer_means_, layer) <= 1e-12
    for got, want in zip(cal.neuron_means_, neuron):
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-12
    t = cal.thresholds_
    assert t.mode == "per_layer" and t.n_images == N and t.granularity == granularity
    assert [v.item() for v in t.values] == [np.float32(m) for m in cal.layer_means_]
    pn = cal.to_thresholds("per_neuron")
    assert all(torch.equal(v, torch.from_numpy(m.astype(np.float32)))
               for v, m in zip(pn.values, cal.neuron_means_))


class Elementwise(nn.Module):
    """Only per-sample elementwise ops and pooling: activations do not depend on the batching.

    (oneDNN convolutions and GEMMs may round differently for different batch sizes, so a real
    backbone's activations, and hence its means, can differ in the last bits between batchings;
    this network isolates the calibrator's own accumulation.)
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.linspace(-1.0, 2.0, 70).view(1, 70, 1, 1))
        self.a = nn.Tanh()
        self.b = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.c = nn.ReLU()

    def forward(self, x):
        x = self.a((x / 64.0 - 2.0).repeat(1, 24, 1, 1)[:, :70] * self.w)
        return self.c(self.pool(self.b(x - 0.1)) - 0.05)


@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_identical_for_any_batching(granularity):
    layers = ["a", "b", "pool", "c"]
    x = small_chips(N)
    tap = Tap(Elementwise(), layers, granularity=granularity, input_shape=SMALL_SHAPE)
    results = []
    for bs in (1, 3, 7, N):
        cal = ThresholdCalibrator(tap, mode="per_neuron")
        cal.fit(x[i:i + bs] for i in range(0, N, bs))
        results.append(cal)
    first = results[0]
    layer, neuron = brute_force(tap.backbone.module, layers, granularity, x)
    assert rel_err(first.layer_means_, layer) <= 1e-12
    for other in results[1:]:
        assert first.layer_means_.tobytes() == other.layer_means_.tobytes()
        for a, b in zip(first.neuron_means_, other.neuron_means_):
            assert a.tobytes() == b.tobytes()
        for a, b in zip(first.thresholds_.values, other.thresholds_.values):
            assert torch.equal(a, b)
    # partial_fit accumulates the same way, uint8 chips (array or tensor) included
    u8 = x.round().to(torch.uint8).permute(0, 2, 3, 1)
    cal_a = ThresholdCalibrator(tap).partial_fit(u8[:4]).partial_fit(u8[4:5]).partial_fit(u8[5:])
    cal_b = ThresholdCalibrator(tap).fit([u8.numpy()])
    assert cal_a.layer_means_.tobytes() == cal_b.layer_means_.tobytes()
    assert cal_a.n_images_ == cal_b.n_images_ == N


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_means_of_a_real_cnn_do_not_depend_on_batching_beyond_its_activations():
    """Where small_net's activations are batch-invariant (oneDNN off; torch's plain CPU
    convolution on the machines seen here, not on every build), so are the means."""
    net = small_net()
    x = small_chips(N)
    tap = Tap(net, ["stem", "act", "block"], input_shape=SMALL_SHAPE)
    with torch.backends.mkldnn.flags(enabled=False):
        singles = [hook_activations(net, tap.layers, x[i:i + 1]) for i in range(N)]
        batched = hook_activations(net, tap.layers, x)
        if not all(torch.equal(torch.cat([s[n] for s in singles]), batched[n]) for n in tap.layers):
            pytest.skip(f"this torch ({torch.__version__}) computes small_net's activations differently "
                        f"one at a time than batched: nothing batch-invariant to compare")
        one = ThresholdCalibrator(tap).fit(x[i:i + 1] for i in range(N))
        every = ThresholdCalibrator(tap).fit([x])
    assert one.layer_means_.tobytes() == every.layer_means_.tobytes()


class Passthrough(nn.Module):
    """The monitored layer outputs the (scaled) input: neuron values are chosen by the test."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Identity()

    def forward(self, x):
        return self.layer(x * 1.0)


class Fixed(Passthrough):
    """The monitored layer outputs fixed values, whatever the (0..255) chip."""

    def __init__(self, values):
        super().__init__()
        self.register_buffer("values", values)

    def forward(self, x):
        return self.layer(x * 0.0 + self.values)


def test_per_layer_sum_is_exact_under_cancellation():
    # values where a float64 running sum loses the small terms: 1e30 + 1 - 1e30 ...; 1e-40 is a
    # float32 subnormal
    vals = torch.tensor([1e30, 1.0, -1e30, 3.0, 1e-40, -2.0], dtype=torch.float32)
    tap = Tap(custom_backbone(Fixed(vals.reshape(1, 3, 1, 2)), ["layer"], (1, 2)), granularity="element")
    chips = torch.full((1, 3, 1, 2), 7.0)
    cal = ThresholdCalibrator(tap).fit([chips, chips])  # two identical images
    exact = sum(Fraction(v) for v in vals.tolist()) * 2 / 12
    assert cal.layer_means_[0] == float(exact)
    naive = 0.0
    for v in vals.tolist() * 2:
        naive += v
    assert naive / 12 != float(exact)  # a float64 running sum would be wrong here


class Overflow(Passthrough):
    """Finite chips, activations that overflow float32."""

    def forward(self, x):
        return self.layer(x * 1e30 * 1e30)


def test_non_finite_activations_are_refused():
    tap = Tap(custom_backbone(Overflow(), ["layer"], (2, 2)))
    chips = torch.zeros(1, 3, 2, 2)
    chips[0, 1, 0, 0] = 1.0
    with pytest.raises(ValueError, match=r"non-finite activations in layers \['layer'\]"):
        ThresholdCalibrator(tap).partial_fit(chips)
    chips[0, 1, 0, 0] = float("nan")  # non-finite chips are refused before the backbone runs
    with pytest.raises(ValueError, match="float32 chips hold NaN or infinite values"):
        ThresholdCalibrator(tap).partial_fit(chips)


class OverflowBelow(nn.Module):
    """Two monitored layers: the first always finite, the second overflows on bright chips."""

    def __init__(self):
        super().__init__()
        self.first = nn.Identity()
        self.second = nn.Identity()

    def forward(self, x):
        a = self.first(x * 1.0)
        return self.second(a * torch.where(a > 100, 1e38, 1.0) * 10)


def test_a_refused_batch_leaves_the_calibrator_as_it_was():
    for mode in ("per_layer", "per_neuron"):
        tap = Tap(custom_backbone(OverflowBelow(), ["first", "second"], (2, 2)), granularity="element")
        g = torch.Generator().manual_seed(3)
        good = [torch.rand(2, 3, 2, 2, generator=g) * 100 for _ in range(2)]
        bright = good[0] + 150
        cal = ThresholdCalibrator(tap, mode=mode).partial_fit(good[0])
        with pytest.raises(ValueError, match=r"non-finite activations in layers \['second'\].*this batch was not added"):
            cal.partial_fit(bright)  # the first layer ran (and was finite) before the second overflowed
        cal.partial_fit(good[1])
        clean = ThresholdCalibrator(tap, mode=mode).fit(good)
        assert cal.n_images_ == 4 and all(torch.equal(a, b) for a, b in zip(cal.thresholds_.values,
                                                                            clean.thresholds_.values))
        assert cal.layer_means_.tobytes() == clean.layer_means_.tobytes()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(cal.neuron_means_, clean.neuron_means_))


def test_estimator_contract_and_errors():
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    cal = ThresholdCalibrator(tap, mode="per_neuron")
    assert not hasattr(cal, "thresholds_")  # __init__ only stores parameters
    with pytest.raises(ValueError, match="not fitted yet"):
        cal.to_thresholds()
    with pytest.raises(ValueError, match="no images in the calibration batches"):
        ThresholdCalibrator(tap).fit([])
    for one in (small_chips(2), small_chips(2).numpy()):  # (iterated, a batch gives single chips)
        with pytest.raises(TypeError, match=r"fit takes an iterable of chip batches .*got one batch, shape "
                                            r"\[2, 3, 15, 13\]: pass \[chips\]"):
            ThresholdCalibrator(tap).fit(one)
    with pytest.raises(ValueError, match="mode must be 'per_layer' or 'per_neuron', got 'median'"):
        ThresholdCalibrator(tap, mode="median").fit([small_chips(2)])
    with pytest.raises(ValueError, match=r"chips must be 15x13 .*got 15x14"):
        ThresholdCalibrator(tap).partial_fit(torch.zeros(2, 3, 15, 14))
    with pytest.raises(TypeError, match="got dtype float64"):
        ThresholdCalibrator(tap).partial_fit(torch.zeros(2, 3, 15, 13, dtype=torch.float64))
    assert cal.fit([small_chips(3)]) is cal and cal.thresholds_.mode == "per_neuron"


def test_save_load_roundtrip(tmp_path):
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    cal = ThresholdCalibrator(tap).fit([small_chips(5)])
    for mode in ("per_layer", "per_neuron"):
        t = cal.to_thresholds(mode)
        path = tmp_path / f"{mode}.safetensors"
        t.save(path)
        u = Thresholds.load(path)
        assert (u.backbone_id, u.weights_sha256, u.layers, u.granularity, u.mode, u.n_images) == (
            t.backbone_id, t.weights_sha256, t.layers, t.granularity, t.mode, t.n_images)
        assert all(torch.equal(a, b) for a, b in zip(t.values, u.values))
        tap.set_thresholds(u)
        assert tap.threshold_mode == mode
    assert b"pickle" not in path.read_bytes()[:8]
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"per_neuron.safetensors already exists; pass overwrite=True"):
        cal.to_thresholds("per_layer").save(path)
    assert path.read_bytes() == before
    cal.to_thresholds("per_layer").save(path, overwrite=True)
    assert Thresholds.load(path).mode == "per_layer"


def test_file_is_standard_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    t = ThresholdCalibrator(tap, mode="per_neuron").fit([small_chips(3)]).thresholds_
    t.save(tmp_path / "t.safetensors")
    loaded = safetensors.load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(loaded["threshold.fc"], t.values[-1])


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    t = ThresholdCalibrator(tap).fit([small_chips(3)]).thresholds_
    path = tmp_path / "t.safetensors"
    t.save(path)
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-3])
    with pytest.raises(ValueError, match=r"short.safetensors: not a valid safetensors file: tensor"):
        Thresholds.load(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10" * 40)
    with pytest.raises(ValueError, match=r"junk.safetensors: not a valid safetensors file: header length"):
        Thresholds.load(tmp_path / "junk.safetensors")
    _safetensors.save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors", {"format": "x"})
    with pytest.raises(ValueError, match="other.safetensors: not a fakespotter thresholds file"):
        Thresholds.load(tmp_path / "other.safetensors")
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["version"] = "99"
    head = json.dumps(header).encode()
    (tmp_path / "v99.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n:])
    with pytest.raises(ValueError, match="version '99' is not supported"):
        Thresholds.load(tmp_path / "v99.safetensors")


def test_bad_values_in_valid_metadata_are_refused_naming_the_file(tmp_path):
    """Hand-edited or foreign metadata: a ValueError naming the file, never a TypeError or a
    file taken with a number for a layer name, a negative count or a NaN threshold."""
    from dataclasses import replace

    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    t = ThresholdCalibrator(tap).fit([small_chips(3)]).thresholds_
    path = tmp_path / "t.safetensors"
    t.save(path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    for key, value, said in (("layers", "123", "'layers' must be a list of distinct layer names, got '123'"),
                             ("layers", "[1]", "'layers' must be a list of distinct layer names"),
                             ("layers", "[]", "'layers' must be a list of distinct layer names"),
                             ("n_images", "abc", "'n_images' must be a count, got 'abc'"),
                             ("n_images", "-5", "'n_images' must be a count, got '-5'"),
                             ("mode", "median", "mode must be one of"),
                             ("granularity", "pixel", "granularity must be 'channel' or 'element'")):
        header = json.loads(data[8:8 + n])
        header["__metadata__"][key] = value
        head = json.dumps(header).encode()
        bad = tmp_path / f"{key}.safetensors"
        bad.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n:])
        with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: .*{re.escape(said)}"):
            Thresholds.load(bad)
    nan = replace(t, values=(torch.tensor([float("nan")]),) + t.values[1:])
    nan.save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=f"nan.safetensors: threshold.{t.layers[0]} holds NaN or infinite values"):
        Thresholds.load(tmp_path / "nan.safetensors")


def test_a_huge_foreign_file_is_refused_from_its_header(tmp_path):
    """The header is read and checked before the rest: a 64 GiB (sparse) file that is not ours
    is refused at once, not read into memory first."""
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 16) + b"not JSON at all.")
        f.truncate(1 << 36)
    with pytest.raises(ValueError, match=r"huge.safetensors: not a valid safetensors file: header is not JSON"):
        Thresholds.load(path)


def test_saved_files_get_the_mode_the_umask_gives(tmp_path):
    """(a temporary file from mkstemp, renamed into place, made every output 0600)"""
    import os
    import stat

    t = ThresholdCalibrator(Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)).fit([small_chips(2)]).thresholds_
    path = tmp_path / "t.safetensors"
    old = os.umask(0o022)
    try:
        t.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o002)
        t.save(path, overwrite=True)  # replaced: the new file's mode
        assert stat.S_IMODE(path.stat().st_mode) == 0o664
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_thresholds_for_another_backbone_or_layers_are_refused():
    x = small_chips(3)
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    t = ThresholdCalibrator(tap).fit([x]).thresholds_
    fewer = Tap(small_net(), SMALL_LAYERS[:3], input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match=r"the thresholds are for another layer list than the tap's: calibrated for backbone "
                                         r"'custom:SmallNet'.*layers \['stem', 'act', 'block.relu', 'block', 'fc'\], "
                                         r"they cannot be used by a tap of .*layers \['stem', 'act', 'block.relu'\]"):
        fewer.set_thresholds(t)
    other_weights = Tap(small_net(seed=3), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match=r"the thresholds are for another set of backbone weights.*weights sha256 [0-9a-f]{12}.*"
                                         r"cannot be used"):
        other_weights.set_thresholds(t)
    element = Tap(small_net(), SMALL_LAYERS, granularity="element", input_shape=SMALL_SHAPE)
    with pytest.raises(ValueError, match="the thresholds are for another granularity.*channel granularity.*cannot be used by a "
                                         "tap of.*element"):
        element.set_thresholds(t)
    renamed = Tap(custom_backbone(small_net(), SMALL_LAYERS, (15, 13), id="my-net"))
    with pytest.raises(ValueError, match="the thresholds are for another backbone than.*backbone 'custom:SmallNet'.*backbone 'my-net'"):
        renamed.set_thresholds(t)
    for bad in (None, {"stem": 1.0}, "0.5"):
        with pytest.raises(TypeError, match=f"Tap.set_thresholds: expected a Thresholds, a number, a tensor or one "
                                            f"entry per layer \\(5\\), got {type(bad).__name__}"):
            tap.set_thresholds(bad)
    Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE, thresholds=t)  # same: accepted


def test_channel_values_of_any_spatial_rank_are_the_channel_means():
    """[N, C, L] and [N, C, H, 1] activations have a spatial size > 1: one mean per channel,
    the same for both shapes; [N, D] and [N, C, 1, 1] are their own values."""
    a = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    v = neuron_values(a, "channel")
    assert v.shape == (2, 3) and torch.equal(v, neuron_values(a.unsqueeze(-1), "channel"))
    assert torch.allclose(v, a.double().mean(-1).float(), rtol=0, atol=1e-6)
    assert torch.equal(neuron_values(a[:, :, :1].unsqueeze(-1), "channel"), a[:, :, 0])
    assert neuron_values(a, "element").shape == (2, 15)


def test_a_first_batch_of_one_image_or_none():
    """One image is a batch like any other; an empty batch adds nothing and fits nothing.
    (Elementwise: activations that do not depend on the batching.)"""
    layers = ["a", "b", "pool", "c"]
    net = Elementwise()
    tap = Tap(net, layers, input_shape=SMALL_SHAPE)
    x = small_chips(3)
    cal = ThresholdCalibrator(tap).partial_fit(x[:0])
    assert cal.n_images_ == 0 and not hasattr(cal, "thresholds_")
    cal.partial_fit(x[:1])
    layer, _ = brute_force(net, layers, "channel", x[:1])
    assert cal.n_images_ == 1 and cal.thresholds_.n_images == 1 and rel_err(cal.layer_means_, layer) <= 1e-12
    cal.partial_fit(x[1:])
    layer, _ = brute_force(net, layers, "channel", x)
    assert cal.n_images_ == 3 and rel_err(cal.layer_means_, layer) <= 1e-12


def test_thresholds_of_another_dtype_or_shape_are_refused(tmp_path):
    import dataclasses

    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    t = ThresholdCalibrator(tap, mode="per_neuron").fit([small_chips(3)]).thresholds_
    t.save(tmp_path / "t.safetensors")
    tensors, meta = _safetensors.load_file(tmp_path / "t.safetensors")
    name = f"threshold.{SMALL_LAYERS[0]}"
    for what, value in (("float64", tensors[name].double()), ("2-d", tensors[name].reshape(1, -1))):
        _safetensors.save_file({**tensors, name: value}, tmp_path / f"{what}.safetensors", meta)
        with pytest.raises(ValueError, match=rf"{what}.safetensors: {name} must be float32 \[k\], got"):
            Thresholds.load(tmp_path / f"{what}.safetensors")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.mode = "per_layer"


def test_a_refit_starts_afresh_and_every_forward_has_forward_batch_chips(monkeypatch):
    """fit() forgets what an earlier fit saw (scikit-learn's contract; partial_fit is the one
    that adds up); every backbone forward gets exactly forward_batch chips, the last one
    padded, however the batches are cut (a real backbone's last bits depend on it)."""
    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    a, b = small_chips(3, seed=1), small_chips(5, seed=2)
    cal = ThresholdCalibrator(tap, mode="per_neuron").fit([a])
    cal.fit([b])
    fresh = ThresholdCalibrator(tap, mode="per_neuron").fit([b])
    assert cal.n_images_ == 5 and cal.layer_means_.tobytes() == fresh.layer_means_.tobytes()
    assert all(torch.equal(x, y) for x, y in zip(cal.thresholds_.values, fresh.thresholds_.values))
    seen = []
    capture = Tap.capture

    def counted(self, x, *args, **kw):
        seen.append(int(x.shape[0]))
        return capture(self, x, *args, **kw)

    monkeypatch.setattr(Tap, "capture", counted)
    cal = ThresholdCalibrator(tap, forward_batch=4).fit([small_chips(5), small_chips(3), small_chips(1)])
    assert seen == [4, 4, 4, 4] and cal.n_images_ == 9  # 5: 4, then 1 padded; 3 padded; 1 padded
    for bad in (0, True, 4097, 2.5):
        with pytest.raises(ValueError, match=f"forward_batch must be an int from 1 to 4096, got {bad!r}"):
            ThresholdCalibrator(tap, forward_batch=bad).fit([small_chips(2)])


def test_per_layer_thresholds_hold_one_value_a_layer(tmp_path):
    """Thresholds labelled per_layer with per-neuron values would be taken by a tap as per-neuron:
    refused when built, and when loaded from a file that says so."""
    from dataclasses import replace

    tap = Tap(small_net(), SMALL_LAYERS, input_shape=SMALL_SHAPE)
    t = ThresholdCalibrator(tap, mode="per_neuron").fit([small_chips(3)]).thresholds_
    first = next(n for n, v in zip(t.layers, t.values) if v.numel() > 1)
    with pytest.raises(ValueError, match=f"per_layer threshold.{first} has"):
        replace(t, mode="per_layer")
    path = tmp_path / "t.safetensors"
    t.save(path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["mode"] = "per_layer"
    head = json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n:])
    with pytest.raises(ValueError, match=f"bad.safetensors: Thresholds: per_layer threshold.{first} has"):
        Thresholds.load(tmp_path / "bad.safetensors")
