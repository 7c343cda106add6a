"""backbones/registry.py edge cases, from a mutation audit: preprocessing checks, freezing,
hashes, entry points, list_layers.

Cheap: small modules, a dummy checkpoint file that is hashed but never read, fake entry points.
"""

from __future__ import annotations

import hashlib
import importlib.metadata

import pytest
import torch
from torch import nn

from fakespotter.backbones import registry as R
from fakespotter.backbones import (Backbone, LayerInfo, Preprocessing, custom_backbone, get_backbone,
                                   list_backbones, list_layers, register_backbone, state_dict_sha256)


class Tiny(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


@pytest.fixture
def reg(monkeypatch):
    """A private registry (built-ins kept), entry points not yet listed; undone after the test."""
    monkeypatch.setattr(R, "_REGISTRY", dict(R._REGISTRY))
    monkeypatch.setattr(R, "_from_plugins", set())
    monkeypatch.setattr(R, "_plugins_loaded", False)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    return R


# ---------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("size", [(0, 4), (4, 0), (1.5, 4), (4,), (-1, 4)])
def test_preprocessing_refuses_a_size_that_is_not_two_positive_ints(size):
    with pytest.raises(ValueError, match="size must be"):
        Preprocessing(size=size)
    assert Preprocessing(size=(1, 1)).input_shape == (3, 1, 1)


@pytest.mark.parametrize("kw", [{"std": (1.0, 0.0, 1.0)}, {"std": (1.0, 1.0)}, {"mean": (0.0,) * 4}])
def test_preprocessing_refuses_a_zero_std_or_wrong_lengths(kw):
    with pytest.raises(ValueError, match="mean and std need 3 entries, std non-zero"):
        Preprocessing(**kw)


def test_a_scale_alone_is_not_the_identity():
    p = Preprocessing(size=(2, 2), scale=0.5)
    assert not p.is_identity
    assert torch.equal(p(torch.full((1, 3, 2, 2), 4.0)), torch.full((1, 3, 2, 2), 2.0))


def test_a_bgr_preprocessing_is_not_the_identity_but_only_flips():
    p = Preprocessing(size=(1, 1), channel_order="BGR")
    assert not p.is_identity and Preprocessing(size=(1, 1)).is_identity
    x = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    assert p(x).view(3).tolist() == [3.0, 2.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Backbone.module, custom_backbone


def test_custom_backbone_freezes_the_module_at_once():
    net = Tiny().train()
    custom_backbone(net, ["act"], 8)  # (.module not accessed)
    assert not net.training and not net.bn.training
    assert not any(p.requires_grad for p in net.parameters())


def test_a_backbone_built_lazily_is_frozen():
    b = Backbone(id="t", factory=lambda: Tiny().train(), preprocessing=Preprocessing(size=(8, 8)),
                 default_layers=("act",))
    m = b.module
    assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_building_a_module_leaves_the_callers_torch_stream_alone():
    b = Backbone(id="t", factory=lambda: nn.Linear(16, 16), preprocessing=Preprocessing(size=(8, 8)),
                 default_layers=())
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    b.module
    assert torch.equal(torch.rand(4), want)


def test_custom_backbone_keeps_a_given_weights_sha256():
    sha = "ab" * 32
    assert custom_backbone(Tiny(), ["act"], 8, weights_sha256=sha).weights_sha256 == sha
    assert custom_backbone(Tiny(), ["act"], 8).weights_sha256 == state_dict_sha256(Tiny())


# ---------------------------------------------------------------------------------------------
# state_dict_sha256


class Buf(nn.Module):
    def __init__(self, t):
        super().__init__()
        self.register_buffer("b", t)


def test_state_dict_sha256_covers_dtypes_and_scalars():
    # same name, shape and bytes (all zero), other dtype
    assert state_dict_sha256(Buf(torch.zeros(2, dtype=torch.float32))) != \
        state_dict_sha256(Buf(torch.zeros(2, dtype=torch.int32)))
    one, two = state_dict_sha256(Buf(torch.tensor(1))), state_dict_sha256(Buf(torch.tensor(2)))
    assert one != two and one == state_dict_sha256(Buf(torch.tensor(1)))


# ---------------------------------------------------------------------------------------------
# the registry and entry points


def test_register_backbone_refuses_an_empty_or_non_str_id(reg):
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="id must be a non-empty str"):
            register_backbone(bad, lambda: None)
    assert "" not in reg._REGISTRY


def test_list_backbones_is_sorted_whatever_the_registration_order(reg):
    register_backbone("aaa-test", lambda: None)
    ids = list_backbones()
    assert ids[0] == "aaa-test" and ids == sorted(ids)


def test_an_unknown_id_suggests_up_to_three(reg):
    with pytest.raises(ValueError) as e:
        get_backbone("resnet5")
    hint = str(e.value).split("(registered")[0]
    assert all(f"'resnet{n}'" in hint for n in (18, 34, 50)), hint


def test_a_registered_backbone_without_a_sha_gets_its_state_dicts_and_one_with_keeps_it(reg):
    pre = Preprocessing(size=(8, 8))
    register_backbone("t-none", lambda: Backbone(id="t-none", factory=Tiny, preprocessing=pre, default_layers=()))
    register_backbone("t-sha", lambda: Backbone(id="t-sha", factory=Tiny, preprocessing=pre, default_layers=(),
                                                 weights_sha256="cd" * 32))
    assert get_backbone("t-none").weights_sha256 == state_dict_sha256(Tiny())
    assert get_backbone("t-sha").weights_sha256 == "cd" * 32


def test_code_that_took_over_an_entry_points_id_is_refused_a_second_time(reg):
    reg._REGISTRY["t-plug"] = (lambda: None, "x (entry point)")
    reg._from_plugins.add("t-plug")
    register_backbone("t-plug", lambda: None)  # code wins over an entry point
    with pytest.raises(ValueError, match="'t-plug' is already registered"):
        register_backbone("t-plug", lambda: None)  # but not over code


class FakeEP:
    def __init__(self, name, factory=None):
        self.name, self.value, self._factory = name, f"fake_{name}:make", factory

    def load(self):
        if self._factory is None:
            raise ImportError("no module named fake")
        return self._factory


def tiny_backbone(id):
    return lambda **kw: custom_backbone(Tiny(), ["act"], 8, id=id)


def test_entry_points_are_found_by_get_backbone_and_do_not_replace_code(reg, monkeypatch):
    register_backbone("t-code", tiny_backbone("from-code"))
    eps = [FakeEP("t-code", tiny_backbone("from-ep")), FakeEP("t-ep", tiny_backbone("t-ep")), FakeEP("t-broken")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: eps)
    assert get_backbone("t-ep").id == "t-ep"  # (no list_backbones first)
    assert get_backbone("t-code").id == "from-code"
    with pytest.raises(ValueError, match=r"'t-broken' comes from the entry point 'fake_t-broken:make'.*ImportError"):
        get_backbone("t-broken")
    register_backbone("t-ep", tiny_backbone("taken"))  # code may take over an entry point's id
    assert get_backbone("t-ep").id == "taken"


# ---------------------------------------------------------------------------------------------
# torchvision-layout ResNet factory (the checkpoint is hashed at get_backbone, read only on .module)


def test_resnet_factory_record(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"not read until .module")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    b = get_backbone("resnet18", checkpoint=path, input_size=48, layers=["layer1", "layer2"],
                     mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0))
    assert b.input_shape == (3, 48, 48) and b.default_layers == ("layer1", "layer2")
    p = b.preprocessing
    assert p.scale == pytest.approx(1 / 255) and p.mean == (0.1, 0.2, 0.3) and p.std == (1.0, 2.0, 4.0)
    assert b.weights_sha256 == sha
    assert get_backbone("resnet18", checkpoint=path, input_size=(32, 40)).input_shape == (3, 32, 40)


# ---------------------------------------------------------------------------------------------
# list_layers, LayerInfo


def test_layer_info_features_of_a_scalar_or_unknown_output():
    assert LayerInfo("x", "T", ()).features is None and LayerInfo("x", "T").features is None
    assert LayerInfo("x", "T", (2, 3)).features == {"channel": 2, "element": 6}


def test_list_layers_takes_an_input_shape_for_a_backbone_too():
    b = custom_backbone(Tiny(), ["act"], 8)
    info = {i.name: i for i in list_layers(b, input_shape=(3, 5, 6))}
    assert info["conv"].output_shape == (4, 5, 6)
    assert {i.name: i for i in list_layers(b)}["conv"].output_shape == (4, 8, 8)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.once = nn.Identity()

    def forward(self, x):
        return self.once(self.act(self.act(x)))


def test_list_layers_counts_calls():
    info = {i.name: i for i in list_layers(Twice(), input_shape=(3, 2, 2))}
    assert info["act"].calls == 2 and info["once"].calls == 1
