"""Bringing one's own backbone: what an audit found wrong with custom modules, ResNet
checkpoints and detectors built on them (each test failed before its fix)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from fakespotter import Backbone, FakeSpotter, Preprocessing, Tap, custom_backbone, get_backbone, register_backbone
from fakespotter import reference as ref
from fakespotter.artifact import ModelFileError
from fakespotter.backbones.registry import _REGISTRY, list_layers
from fakespotter.backbones.resnet import CheckpointError, resnet
from tapnets import POOLED_LAYERS, PooledNet


class SmallNet(PooledNet):
    """(the class name gives the ids custom_backbone derives: "custom:SmallNet")"""


LAYERS = POOLED_LAYERS


def small(seed: int = 0, mean=(0.5, 0.5, 0.5), size: int = 32, id: str = "small") -> Backbone:
    return custom_backbone(SmallNet(seed), LAYERS, size, id=id, scale=1 / 255, mean=mean, std=(0.25,) * 3)


def chips(size: int, n: int = 24, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    real = rng.integers(0, 120, (n, size, size, 3), dtype=np.uint8)
    fake = rng.integers(100, 256, (n, size, size, 3), dtype=np.uint8)
    return real, fake


@pytest.fixture
def registry():
    """Registrations made by a test are undone after it."""
    before = dict(_REGISTRY)
    yield register_backbone
    _REGISTRY.clear()
    _REGISTRY.update(before)


def fitted(backbone_id: str) -> FakeSpotter:
    real, fake = chips(get_backbone(backbone_id).input_shape[1])
    return FakeSpotter(backbone=backbone_id, aligned=True, hidden=(4,), max_epochs=3).fit(real, fake)


def test_resnet_checkpoint_without_num_batches_tracked_loads(tmp_path):
    """Checkpoints saved before torch 0.4.1 (the first torchvision ImageNet weights among them)
    have no num_batches_tracked buffers; torch's own strict load accepts them."""
    state = {k: v for k, v in resnet("resnet18", 10).state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    tap = Tap(get_backbone("resnet18", checkpoint=str(tmp_path / "old.pt"), input_size=64), granularity="channel")
    assert tap(torch.zeros(1, 3, 64, 64)).shape[0] == 1
    state["fc.weight"] = state["fc.weight"].long()
    torch.save(state, tmp_path / "int.pt")
    with pytest.raises(CheckpointError, match=r"int\.pt: fc\.weight is torch\.int64, expected floating point"):
        get_backbone("resnet18", checkpoint=str(tmp_path / "int.pt"), input_size=64).module


def test_a_missing_checkpoint_is_said_by_get_backbone(tmp_path):
    """Not when the module is first used (a Tap, a fit), as "the checkpoint changed"."""
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint file not found"):
        get_backbone("resnet18", checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match=r"is a folder; give the checkpoint file's path"):
        get_backbone("resnet18", checkpoint=tmp_path)


def test_a_checkpoint_replaced_after_get_backbone_is_refused(tmp_path):
    torch.manual_seed(0)
    torch.save(resnet("resnet18").state_dict(), tmp_path / "w.pt")
    bb = get_backbone("resnet18", checkpoint=str(tmp_path / "w.pt"), input_size=64)  # hashed now, read later
    torch.manual_seed(1)
    torch.save(resnet("resnet18").state_dict(), tmp_path / "w.pt")  # a training job's next epoch
    with pytest.raises(CheckpointError, match="the checkpoint changed"):
        Tap(bb)


class Aliased(nn.Module):
    """An in-place operator on a tensor that a view still refers to: torch.fx records it out of
    place, so the traced graph's fc input would miss the write."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 8)

    def forward(self, x):
        y = self.pool(self.conv(x))
        z = y.flatten(1)  # a view of y
        y *= -3.0  # z sees this in eager mode
        return self.fc(z)


def test_a_traced_graph_that_differs_from_the_module_is_refused():
    with pytest.raises(ValueError, match=r"does not reproduce its layers \['fc'\].*in-place operator"):
        Tap(Aliased().eval(), ["fc"], input_shape=(3, 8, 8), granularity="element")
    # the layers before the in-place operator are still right, and taps of them are built
    tap = Tap(Aliased().eval(), ["conv"], input_shape=(3, 8, 8), granularity="element")
    m, x, acts = tap.backbone.module, torch.randn(2, 3, 8, 8), {}
    m.conv.register_forward_hook(lambda _m, _i, o: acts.__setitem__("conv", o.detach().clone()))
    with torch.no_grad():
        m(x)
    assert torch.equal(tap(x), ref.threshold_pack(acts["conv"], torch.tensor([0.0]), "element"))


def test_a_float64_module_is_refused_when_the_tap_is_built():
    with pytest.raises(ValueError, match=r"layer 'act' outputs torch\.float64.*module\.float\(\)"):
        Tap(SmallNet().double(), ["act"], input_shape=(3, 32, 32))


def test_list_layers_leaves_a_training_modules_statistics_alone():
    m = SmallNet()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    infos = {i.name: i for i in list_layers(m, input_shape=(3, 32, 32))}
    assert infos["act"].output_shape == (8, 16, 16)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert m.training and m.bn.training


def test_a_backbone_made_without_a_sha_gets_its_state_dicts(registry):
    def plain(seed):
        return Backbone(id="plain", factory=lambda: SmallNet(seed), preprocessing=Preprocessing(size=(32, 32)),
                        default_layers=LAYERS)

    registry("plain", lambda: plain(0))
    det = fitted("plain")
    assert det.tap_.weights_sha256 == get_backbone("plain").weights_sha256 is not None
    data = det.to_bytes()
    registry("plain", lambda: plain(1), overwrite=True)  # other weights under the same id
    with pytest.raises(ModelFileError, match=r"trained with backbone weights sha256 .*register 'plain' with the "
                                             r"weights it was trained with"):
        FakeSpotter.from_bytes(data)


def test_a_model_on_a_backbone_registered_under_another_name_loads(registry, tmp_path):
    """The registry key (what FakeSpotter(backbone=) names) need not be the Backbone's id: a
    ResNet checkpoint is registered under a name of one's own."""
    torch.manual_seed(0)
    torch.save(resnet("resnet18").state_dict(), tmp_path / "r18.pt")
    registry("my-r18", lambda: get_backbone("resnet18", checkpoint=str(tmp_path / "r18.pt"), input_size=64))
    registry("small-as", lambda: small(id="custom:SmallNet"))
    for name in ("my-r18", "small-as"):
        det = fitted(name)
        again = FakeSpotter.from_bytes(det.to_bytes())
        real, _ = chips(again.tap_.input_shape[1], 4, seed=1)
        assert torch.equal(again.decision_function(real), det.decision_function(real))
    registry("small-as", lambda: small(id="custom:Other"), overwrite=True)
    with pytest.raises(ModelFileError, match=r"now gives backbone id 'custom:Other'"):
        FakeSpotter.from_bytes(det.to_bytes())


@pytest.mark.parametrize("change", [{"mean": (0.0, 0.0, 0.0)}, {"size": 48}], ids=["mean", "input-size"])
def test_a_model_is_refused_by_a_backbone_with_other_preprocessing(registry, change):
    registry("small", lambda: small())
    data = fitted("small").to_bytes()
    registry("small", lambda: small(**change), overwrite=True)  # same weights
    with pytest.raises(ModelFileError, match="preprocessing"):
        FakeSpotter.from_bytes(data)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_a_half_precision_module_works_through_features_calibration_and_the_detector(registry, dtype):
    """The chips' preprocessing gave float32, which a float16 or bfloat16 module's first conv
    refused with torch's dtype error; the rows equal the twin on the module's own activations."""
    registry("half", lambda: custom_backbone(SmallNet().to(dtype), LAYERS, 32, id="half", scale=1 / 255))
    det = fitted("half")
    real, _ = chips(32, 4, seed=2)
    assert det.decision_function(real).shape == (4,)
    tap = det.tap_
    x = tap.prepare(torch.from_numpy(real).permute(0, 3, 1, 2).float())
    assert x.dtype == dtype
    acts = {}
    m = tap.backbone.module
    m.act.register_forward_hook(lambda _m, _i, o: acts.__setitem__("act", o.detach().clone()))
    with torch.no_grad():
        m(x)
    slot = tap.layout.layers[0]
    want = ref.threshold_pack(acts["act"], tap.layer_thresholds()[0], tap.granularity)
    assert torch.equal(tap(x)[:, slot.word_offset:slot.word_offset + slot.words], want)


def test_an_input_size_the_module_cannot_take_is_named():
    class NeedsRoom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 7)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match=r"NeedsRoom fails on a probe input of the backbone's input shape "
                                         r"\[1, 3, 4, 4\] \(torch.float32\): .*[Kk]ernel size"):
        Tap(NeedsRoom(), ["conv"], input_shape=(3, 4, 4))


def test_a_probe_failure_without_a_message_is_named_by_its_type():
    class Refuses(nn.Module):  # opaque to the trace: it runs on the probe, and fails there
        def forward(self, x):
            raise RuntimeError()  # (before the monitored layer: a graph cut after it would skip it)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gate = nn.Conv2d(3, 4, 3), Refuses()

        def forward(self, x):
            return self.conv(self.gate(x))

    bb = custom_backbone(Net(), ["conv"], (8, 8), leaf_modules=[Refuses])
    with pytest.raises(ValueError, match=r"Net fails on a probe input of the backbone's input shape "
                                         r"\[1, 3, 8, 8\] \(torch.float32\): RuntimeError$"):
        Tap(bb)


def test_a_trace_failure_is_said_in_one_line():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            raise TypeError("\n  no tracing here\n(more detail)")

    with pytest.raises(ValueError) as info:
        Tap(Untraceable(), ["conv"], input_shape=(3, 8, 8))
    msg = str(info.value)
    assert "cannot trace Untraceable with torch.fx (TypeError: no tracing here). Name the" in msg
    assert "\n" not in msg and "more detail" not in msg


def test_info_shows_a_model_whose_backbone_is_not_registered_here(registry, tmp_path, capsys):
    from fakespotter.cli import main

    registry("small", lambda: small())
    fitted("small").save(tmp_path / "m.fsm")
    assert main(["info", str(tmp_path / "m.fsm")]) == 0
    assert "note:" not in capsys.readouterr().out  # registered: checked by loading
    del _REGISTRY["small"]  # as in another process
    assert main(["info", str(tmp_path / "m.fsm")]) == 0
    out = capsys.readouterr().out
    assert "note: not checked against its backbone: 'small' is not registered here" in out
    assert "backbone: small (weights sha256 " in out and "layers: 3 (act ... fc)" in out


def test_a_tap_of_early_layers_does_not_run_a_head_that_cannot_take_the_input():
    """The trace check stops where the last monitored layer has run, as the tap does: a fixed
    classifier head sized for another input is never reached."""
    class FixedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4 * 224 * 224, 10)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).flatten(1))

    tap = Tap(FixedHead(), ["act"], input_shape=(3, 16, 16), granularity="element")
    assert tap(torch.zeros(2, 3, 16, 16)).shape == (2, 16)


def test_a_model_that_records_no_weights_sha_loads_with_a_warning(registry, tmp_path):
    """Files written before a Backbone made without a sha got its state_dict's record none."""
    from fakespotter.artifact import read_model, write_model

    registry("small", lambda: small())
    fitted("small").save(tmp_path / "m.fsm")
    tensors, meta = read_model(tmp_path / "m.fsm")
    meta["backbone"]["weights_sha256"] = None
    write_model(tmp_path / "old.fsm", tensors, meta)
    with pytest.warns(UserWarning, match="records no backbone weights sha256"):
        FakeSpotter.load(tmp_path / "old.fsm")


def test_a_model_loads_where_only_its_backbone_id_is_registered(registry, tmp_path):
    registry("my-key", lambda: small(id="custom:SmallNet"))
    fitted("my-key").save(tmp_path / "m.fsm")
    del _REGISTRY["my-key"]
    registry("custom:SmallNet", lambda: small(id="custom:SmallNet"))
    assert FakeSpotter.load(tmp_path / "m.fsm").tap_.backbone_id == "custom:SmallNet"


@pytest.mark.parametrize("content", [b"\x80\x02garbage" * 40, b"version https://git-lfs.github.com/spec/v1\n"
                                     b"oid sha256:" + b"0" * 64 + b"\nsize 46830571\n"], ids=["damaged", "lfs-pointer"])
def test_a_file_torch_cannot_unpickle_is_not_called_a_pickled_module(tmp_path, content):
    (tmp_path / "w.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"w.pth: cannot read checkpoint: not a torch checkpoint, or a damaged one"):
        get_backbone("resnet18", checkpoint=str(tmp_path / "w.pth"), input_size=64).module


PLUGIN = """
import torch
from torch import nn
from fakespotter import custom_backbone


class PlugNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


def plugnet(**kwargs):
    return custom_backbone(PlugNet(), ["act"], 32, id="plugnet", scale=1 / 255)
"""


def plugin_package(root, value="plugnet_pkg:plugnet"):
    """An installed distribution that declares a backbone as an entry point."""
    (root / "plugnet_pkg.py").write_text(PLUGIN)
    info = root / "plugnet_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugnet-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fakespotter.backbones]\nplugnet = {value}\nbroken = nowhere:nothing\n")
    return root


def test_installed_packages_declare_backbones_as_entry_points(registry, tmp_path, monkeypatch):
    """The command line (and every process) finds a package's backbone by id, as it finds the
    built-in ones; a broken entry point is named when its backbone is asked for."""
    import subprocess
    import sys

    from fakespotter.backbones import registry as R

    monkeypatch.syspath_prepend(str(plugin_package(tmp_path)))
    monkeypatch.setattr(R, "_plugins_loaded", False)
    monkeypatch.setattr(R, "_from_plugins", set())
    assert {"plugnet", "broken", "dlib_resnet_v1"} <= set(R.list_backbones())
    assert get_backbone("plugnet").id == "plugnet"
    with pytest.raises(ValueError, match=r"backbone 'broken' comes from the entry point 'nowhere:nothing' "
                                         r"\(group fakespotter.backbones\), which cannot be loaded"):
        get_backbone("broken")
    det = fitted("plugnet")
    det.save(tmp_path / "m.fsm")
    registry("plugnet", lambda: small(), overwrite=False)  # code may take over an entry point's id
    assert get_backbone("plugnet").id == "small"
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "fakespotter", "info", str(tmp_path / "m.fsm")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "backbone: plugnet" in run.stdout and "note:" not in run.stdout, run.stderr


def test_damaged_package_metadata_leaves_the_built_in_backbones(registry, monkeypatch):
    import importlib.metadata

    from fakespotter.backbones import registry as R

    def broken(**kwargs):
        raise ValueError("a damaged entry_points.txt")

    monkeypatch.setattr(importlib.metadata, "entry_points", broken)
    monkeypatch.setattr(R, "_plugins_loaded", False)
    with pytest.warns(UserWarning, match="cannot list the fakespotter.backbones entry points"):
        assert "dlib_resnet_v1" in R.list_backbones()
