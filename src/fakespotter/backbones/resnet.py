"""ResNet-18/34/50 whose ``state_dict`` keys are torchvision's, loaded from a user's checkpoint.

fakespotter does not depend on torchvision; this is a small re-statement of
``torchvision.models.resnet`` (v1.5: the stride of a bottleneck is on its 3x3 convolution) with
the same parameter and buffer names, so a checkpoint saved from a torchvision ResNet (or a
face-recognition network fine-tuned from one) loads with ``strict=True``.

One difference that does not change the ``state_dict``: every ReLU is its own module
(``relu1``, ``relu2``, ``relu3`` in a block) instead of one ``relu`` called several times, so
each post-ReLU output has a name a tap can monitor; ReLUs are not in-place.

Checkpoints are read without pickle code execution: ``torch.load(weights_only=True)`` for
``.pt``/``.pth`` files, the safetensors format for ``.safetensors`` files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

__all__ = [
    "RESNET_ARCHS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet",
    "resnet_default_layers",
    "load_resnet_checkpoint",
    "read_state_dict",
    "CheckpointError",
]


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the architecture; names the file."""


def check_checkpoint_path(path: Union[str, Path]) -> Path:
    """``path`` as a Path, or :class:`CheckpointError` when it is a folder or not there."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give the checkpoint file's path")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return path


class BasicBlock(nn.Module):
    """relu2(bn2(conv2(relu1(bn1(conv1(x))))) + downsample(x)); x [N, C_in, H, W]."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision v1.5) -> 1x1 (x4 channels), plus the skip."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu3 = nn.ReLU()
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.downsample(x))


#: architecture name -> (block type, units per stage)
RESNET_ARCHS: Dict[str, Tuple[Type[nn.Module], Tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """torchvision-layout ResNet. x (Tensor[N, 3, H, W], normalised) -> Tensor[N, num_classes].

    ``num_classes=0`` drops ``fc`` (the output is the pooled [N, 512 * expansion] feature).
    """

    def __init__(self, block: Type[nn.Module], units: Tuple[int, ...], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), units)):
            stride = 1 if i == 0 else 2
            expansion = block.expansion  # type: ignore[attr-defined]
            downsample = None
            if stride != 1 or inplanes != planes * expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * expansion),
                )
            blocks: List[nn.Module] = [block(inplanes, planes, stride, downsample)]
            inplanes = planes * expansion
            blocks += [block(inplanes, planes) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_dim = inplanes

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(arch: str, num_classes: int = 1000) -> ResNet:
    """An untrained ``resnet18`` / ``resnet34`` / ``resnet50``."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"resnet: unknown architecture {arch!r}; known: {sorted(RESNET_ARCHS)}")
    block, units = RESNET_ARCHS[arch]
    return ResNet(block, units, num_classes)


def resnet_default_layers(arch: str) -> Tuple[str, ...]:
    """The stem's ReLU, every residual block's output (post-ReLU) and the pooled feature."""
    _, units = RESNET_ARCHS[arch]
    names = ["relu"]
    for i, n in enumerate(units):
        names += [f"layer{i + 1}.{j}" for j in range(n)]
    names.append("avgpool")
    return tuple(names)


def read_state_dict(path: Union[str, Path]) -> Dict[str, Tensor]:
    """Tensors of a checkpoint file, without executing code from it.

    Safetensors files (recognised by their header, whatever their name) are read as such;
    anything else with ``torch.load(weights_only=True)``. A ``{"state_dict": ...}`` /
    ``{"model_state_dict": ...}`` / ``{"model": ...}`` wrapper (with an epoch, an optimizer's
    state, ... beside it) and a ``module.`` prefix (DataParallel) are removed.
    """
    import pickle

    path = check_checkpoint_path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if path.suffix == ".safetensors" or head[8:9] == b"{":  # (an 8-byte header length, then JSON)
            from fakespotter._safetensors import load_file

            obj: object = load_file(path)[0]
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:  # weights_only refused an object (or the file is damaged)
        import re

        name = re.search(r"GLOBAL ([\w.]+)", str(e))
        if name is None:  # not a pickle torch reads (damaged, a git-lfs pointer, another format)
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise CheckpointError(f"{path}: cannot read checkpoint: not a torch checkpoint, or a damaged one"
                                  f"{f' ({why.group(1).strip()})' if why else ''}") from None
        raise CheckpointError(f"{path}: holds pickled Python objects besides tensors (it names {name.group(1)}: "
                              f"a whole nn.Module?), which are not loaded, as loading them would run code "
                              f"from the file; save model.state_dict() with torch.save, or a safetensors "
                              f"file") from None
    except Exception as e:  # torch raises several types for a corrupt file
        raise CheckpointError(f"{path}: cannot read checkpoint: {type(e).__name__}: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):  # (Lightning, PyTorch's tutorials, timm/DeiT)
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors), "
                              f"got {type(obj).__name__}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_resnet_checkpoint(path: Union[str, Path], arch: str) -> ResNet:
    """A torchvision-style ResNet with weights from ``path``, in eval mode, frozen.

    The number of classes is taken from ``fc.weight`` (no ``fc`` in the file: the pooled
    feature is the output). Missing, unexpected or mis-shaped tensors raise ``CheckpointError``
    naming the file and the keys.
    """
    state = read_state_dict(path)
    num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0
    model = resnet(arch, num_classes)
    expected = model.state_dict()
    # num_batches_tracked (added in torch 0.4.1) is absent from older checkpoints, e.g. the
    # original torchvision ImageNet weights; torch's own strict load accepts that (it is only
    # read in training with momentum=None), so do the same
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        def show(keys: List[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")

        raise CheckpointError(
            f"{path}: not a {arch} state_dict: missing keys [{show(missing)}], "
            f"unexpected keys [{show(unexpected)}]"
        )
    for k, v in expected.items():
        if k not in state:
            continue
        if not state[k].is_floating_point() and v.is_floating_point():
            raise CheckpointError(f"{path}: {k} is {state[k].dtype}, expected floating point weights")
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: {arch} expects {k} of shape {list(v.shape)}, "
                                  f"the file has {list(state[k].shape)}")
    model.load_state_dict(state, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model
