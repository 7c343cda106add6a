"""Backbones: the registry (:mod:`.registry`), dlib's face ResNet (:mod:`.dlib_resnet`) and a
torchvision-layout ResNet for user checkpoints (:mod:`.resnet`)."""

from .registry import (
    DEFAULT_BACKBONE,
    Backbone,
    LayerInfo,
    Preprocessing,
    custom_backbone,
    get_backbone,
    list_backbones,
    list_layers,
    register_backbone,
    state_dict_sha256,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "Backbone",
    "LayerInfo",
    "Preprocessing",
    "custom_backbone",
    "get_backbone",
    "list_backbones",
    "list_layers",
    "register_backbone",
    "state_dict_sha256",
]
