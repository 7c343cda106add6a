"""Backbone registry: the dlib default, torchvision-layout ResNet checkpoints, custom modules."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import fakespotter  # noqa: F401
from fakespotter import _safetensors
from fakespotter import weights as W
from fakespotter.backbones import (Backbone, Preprocessing, custom_backbone, get_backbone,
                                   list_backbones, list_layers, register_backbone)
from fakespotter.backbones import dlib_resnet as D
from fakespotter.backbones.resnet import (BasicBlock, Bottleneck, CheckpointError, load_resnet_checkpoint,
                                          read_state_dict, resnet, resnet_default_layers)
from fakespotter.taps import Tap

from tapnets import DLIB_NAME, FETCH_HINT, SMALL_SHAPE, dlib_cached, small_net

needs_dlib = pytest.mark.skipif(not dlib_cached(), reason=FETCH_HINT)


def test_builtin_ids():
    ids = list_backbones()
    assert {"dlib_resnet_v1", "resnet18", "resnet34", "resnet50"} <= set(ids)
    assert ids == sorted(ids)


def test_unknown_id_suggests():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet51'; did you mean 'resnet50'"):
        get_backbone("resnet51")


def test_register_backbone():
    def make(scale=1.0):
        return custom_backbone(small_net(), ["act"], (15, 13), id="test-small", scale=scale)

    register_backbone("test-small", make, "for a test", overwrite=True)
    try:
        assert "test-small" in list_backbones()
        b = get_backbone("test-small", scale=0.5)
        assert b.id == "test-small" and b.preprocessing.scale == 0.5
        with pytest.raises(ValueError, match="'test-small' is already registered"):
            register_backbone("test-small", make)
        register_backbone("bad", lambda: 3, overwrite=True)
        with pytest.raises(TypeError, match="the factory of 'bad' returned int, not a Backbone"):
            get_backbone("bad")
    finally:
        from fakespotter.backbones import registry

        registry._REGISTRY.pop("test-small", None)
        registry._REGISTRY.pop("bad", None)


@needs_dlib
def test_dlib_default_record():
    b = get_backbone()
    assert b.id == "dlib_resnet_v1"
    assert b.weights_sha256 == W.DEFAULT_WEIGHTS[DLIB_NAME].sha256
    assert b.default_layers == D.DEFAULT_LAYERS and b.input_shape == (3, 150, 150)
    assert b.preprocessing.is_identity
    m = b.module
    assert isinstance(m, D.DlibFaceResNet) and not m.training
    assert b.module is m  # built once


def test_dlib_corrupt_weights_name_file_and_refetch(tmp_path, monkeypatch):
    if not dlib_cached():
        pytest.skip(FETCH_HINT)
    copy = tmp_path / "weights" / DLIB_NAME
    copy.parent.mkdir()
    shutil.copy(W.weights_path(DLIB_NAME), copy)
    with open(copy, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path))
    with pytest.raises(W.WeightsHashError, match=rf"{DLIB_NAME}.*python -m fakespotter.weights fetch"):
        get_backbone().module


def test_dlib_missing_weights_say_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path))
    with pytest.raises(W.WeightsNotFoundError, match="python -m fakespotter.weights fetch"):
        get_backbone().module


# ----------------------------------------------------------------------------------------------
# torchvision-layout ResNet from a checkpoint


# A sample of torchvision.models.resnet18().state_dict() keys, and its size / parameter count.
TORCHVISION_KEYS_18 = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.1.bn2.running_var",
    "layer2.0.downsample.0.weight", "layer2.0.downsample.1.num_batches_tracked",
    "layer4.1.conv2.weight", "fc.weight", "fc.bias",
]


@pytest.mark.parametrize("arch,keys,params", [
    ("resnet18", 122, 11_689_512), ("resnet34", 218, 21_797_672), ("resnet50", 320, 25_557_032),
])
def test_resnet_matches_torchvision_state_dict(arch, keys, params):
    m = resnet(arch)
    sd = m.state_dict()
    assert len(sd) == keys and sum(p.numel() for p in m.parameters()) == params
    assert set(TORCHVISION_KEYS_18) - {"layer4.1.conv2.weight"} <= set(sd)
    if arch == "resnet50":
        assert "layer3.5.conv3.weight" in sd and sd["fc.weight"].shape == (1000, 2048)


def random_resnet18(seed=0, num_classes=10):
    torch.manual_seed(seed)
    m = resnet("resnet18", num_classes)
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.mark.parametrize("suffix, wrapper", [(".pth", "state_dict"), (".pth", "model_state_dict"),
                                             (".safetensors", None)])
def test_resnet_checkpoint_loads_and_taps(tmp_path, suffix, wrapper):
    ref = random_resnet18()
    path = tmp_path / f"r18{suffix}"
    if suffix == ".pth":  # a training checkpoint: the state_dict beside other things, DataParallel's names
        torch.save({"epoch": 3, "optimizer_state_dict": {"lr": 0.1},
                    wrapper: {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    else:
        _safetensors.save_file(ref.state_dict(), path)
    b = get_backbone("resnet18", checkpoint=path, input_size=64)
    assert b.id == "resnet18" and len(b.weights_sha256) == 64
    assert b.default_layers == resnet_default_layers("resnet18")
    assert b.preprocessing.scale == pytest.approx(1 / 255) and b.input_shape == (3, 64, 64)
    m = b.module
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))
    tap = Tap(b)
    assert [s.shape for s in tap.layout.layers][:2] == [(64, 32, 32), (64, 16, 16)]
    assert tap.layout.layers[-1].shape == (512, 1, 1)
    with torch.no_grad():
        rows = tap(b.preprocessing(x * 255))
    assert rows.shape == (2, tap.layout.total_words) and rows.any()


class Evil:
    """Stands for arbitrary pickled code: weights_only loading must refuse it."""


def test_resnet_checkpoint_errors(tmp_path):
    ref = random_resnet18()
    good = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), good)
    with pytest.raises(CheckpointError, match=r"r18.pth: not a resnet34 state_dict: missing keys "
                                              r"\[layer1.2.bn1.bias"):
        get_backbone("resnet34", checkpoint=good).module
    bad = tmp_path / "cut.pth"
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut.pth: cannot read checkpoint"):
        get_backbone("resnet18", checkpoint=bad).module
    with pytest.raises(CheckpointError, match=r"nothing.pth: checkpoint file not found"):
        get_backbone("resnet18", checkpoint=tmp_path / "nothing.pth")  # (said at once)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="odd.pth: not a resnet18 state_dict"):
        get_backbone("resnet18", checkpoint=tmp_path / "odd.pth").module
    for name, obj, kind in (("ints.pth", {"conv1.weight": 3}, "dict"), ("list.pth", [torch.zeros(2)], "list")):
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"{name}: expected a state_dict \(a mapping of names to tensors\), "
                                                  rf"got {kind}"):
            get_backbone("resnet18", checkpoint=tmp_path / name).module
    wide = dict(ref.state_dict(), **{"conv1.weight": torch.zeros(64, 3, 5, 5)})
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"wide.pth: resnet18 expects conv1.weight of shape \[64, 3, 7, 7\], "
                                              r"the file has \[64, 3, 5, 5\]"):
        get_backbone("resnet18", checkpoint=tmp_path / "wide.pth").module
    torch.save({"x": Evil()}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match=r"pickle.pth: holds pickled Python objects besides tensors \(it names "
                                              r"test_registry.Evil: .*save model.state_dict\(\)"):
        get_backbone("resnet18", checkpoint=tmp_path / "pickle.pth").module
    torch.save(ref, tmp_path / "whole.pth")  # the module itself, not its state_dict
    with pytest.raises(CheckpointError, match=r"whole.pth: holds pickled Python objects .*ResNet: a whole nn.Module"):
        get_backbone("resnet18", checkpoint=tmp_path / "whole.pth").module
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(CheckpointError, match=r"folder.pth: is a folder; give the checkpoint file's path"):
        get_backbone("resnet18", checkpoint=tmp_path / "folder.pth")
    from fakespotter._safetensors import save_file

    save_file(ref.state_dict(), tmp_path / "named.pt")  # safetensors under another suffix: read as such
    got = get_backbone("resnet18", checkpoint=tmp_path / "named.pt").module
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in got.state_dict().items())
    with pytest.raises(ValueError, match=r"backbone 'resnet50' has no weights of its own; give checkpoint=PATH"):
        get_backbone("resnet50")


def test_cli_backbone_without_weights_is_a_usage_error(tmp_path, capsys):
    from fakespotter.cli import main

    (tmp_path / "a.png").write_bytes(b"")
    rc = main(["calibrate", str(tmp_path), "--backbone", "resnet50", "--out", str(tmp_path / "t.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "backbone 'resnet50' has no weights of its own; give checkpoint=PATH" in err


# ----------------------------------------------------------------------------------------------
# custom modules and layer listing


def test_custom_backbone_record():
    net = small_net()
    b = custom_backbone(net, ["act", "block"], (15, 13))
    assert b.id == "custom:SmallNet" and b.module is net and b.input_shape == (3, 15, 13)
    assert b.weights_sha256 == custom_backbone(small_net(), ["act"], (15, 13)).weights_sha256
    assert b.weights_sha256 != custom_backbone(small_net(seed=1), ["act"], (15, 13)).weights_sha256
    assert isinstance(b, Backbone)
    with pytest.raises(TypeError, match="module must be an nn.Module, got int"):
        custom_backbone(3, ["a"], 8)


def test_preprocessing():
    p = Preprocessing(size=(4, 4), scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0),
                      channel_order="BGR")
    x = torch.zeros(1, 3, 4, 4)
    x[:, 0] = 255.0
    y = p(x)
    # BGR: the red 255 lands in channel 2 -> (1 - 0.5) / 1; zeros -> -0.5 / std
    assert y[0, 2].eq(0.5).all() and y[0, 0].eq(-1.0).all() and y[0, 1].eq(-2.0).all()
    assert Preprocessing.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="channel_order must be 'RGB' or 'BGR', got 'RGBA'"):
        Preprocessing(channel_order="RGBA")


def test_list_layers_names_types_shapes_calls():
    info = {i.name: i for i in list_layers(small_net(), input_shape=SMALL_SHAPE)}
    assert list(info)[:3] == ["stem", "act", "block"]
    assert info["stem"].type == "Conv2d" and info["stem"].output_shape == (70, 7, 6)
    assert info["stem"].features == {"channel": 70, "element": 70 * 7 * 6}
    assert info["fc"].output_shape == (65,) and info["head"].calls == 1
    plain = list_layers(small_net())
    assert plain[0].output_shape is None and plain[0].calls == 0


@needs_dlib
def test_list_layers_of_the_default_backbone():
    info = {i.name: i for i in list_layers(get_backbone())}
    for name in D.DEFAULT_LAYERS:
        assert info[name].calls == 1
    assert info["layer4.0.relu_out"].output_shape == (256, 4, 4)
    assert info["fc"].output_shape == (128,)


def test_a_model_whose_registered_backbone_is_missing_names_it(tmp_path, monkeypatch):
    """A detector built on a backbone registered under a name of one's own, loaded where that
    name is not registered: the error named only the backbone's id (a built-in here), which
    needs a checkpoint, not the name to register."""
    from fakespotter.backbones import registry as R
    from fakespotter.artifact import ModelFileError
    from fakespotter.detector import FakeSpotter

    path = tmp_path / "r18.safetensors"
    _safetensors.save_file(random_resnet18().state_dict(), path)
    register_backbone("test-myres", lambda: get_backbone("resnet18", checkpoint=path, input_size=64),
                      "for a test", overwrite=True)
    try:
        rng = np.random.default_rng(0)
        chips = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
        det = FakeSpotter(backbone="test-myres", hidden=(4,), max_epochs=1).fit(chips[:4], chips[4:])
        det.save(tmp_path / "m.fsm")
    finally:
        monkeypatch.delitem(R._REGISTRY, "test-myres")
    with pytest.raises(ModelFileError, match=r"backbone 'test-myres' is not available here \(nor is its id "
                                             r"'resnet18' as registered here: .*no weights of its own"):
        FakeSpotter.load(tmp_path / "m.fsm")


def test_a_state_dict_with_a_tensor_named_model_is_not_taken_for_a_wrapper(tmp_path):
    path = tmp_path / "flat.pt"
    torch.save({"model": torch.ones(2), "other": torch.zeros(1)}, path)
    got = read_state_dict(path)
    assert sorted(got) == ["model", "other"] and torch.equal(got["model"], torch.ones(2))
    torch.save({"epoch": 3, "model": {"a": torch.ones(1)}}, path)
    assert list(read_state_dict(path)) == ["a"]


@pytest.mark.parametrize("block, inplanes, planes", [(BasicBlock, 8, 8), (Bottleneck, 32, 8)])
def test_a_residual_blocks_output_is_post_relu(block, inplanes, planes):
    torch.manual_seed(0)
    b = block(inplanes, planes).eval()
    x = torch.randn(2, inplanes, 5, 5)
    with torch.no_grad():
        y = b(x)
        pre = b.bn2(b.conv2(b.relu1(b.bn1(b.conv1(x))))) if block is BasicBlock else \
            b.bn3(b.conv3(b.relu2(b.bn2(b.conv2(b.relu1(b.bn1(b.conv1(x))))))))
    assert (pre + x).min() < 0 and torch.equal(y, torch.relu(pre + x))


def test_a_checkpoint_without_fc_loads_as_a_feature_extractor(tmp_path):
    torch.manual_seed(0)
    ref = resnet("resnet18", 0).eval()
    path = tmp_path / "nofc.pth"
    torch.save(ref.state_dict(), path)
    m = load_resnet_checkpoint(path, "resnet18")
    assert "fc.weight" not in m.state_dict() and m.feature_dim == 512
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        got = m(x)
        assert got.shape == (1, 512) and torch.equal(got, ref(x))
