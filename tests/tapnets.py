"""Small networks and helpers shared by the tap, calibration and features tests."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from fakespotter import weights as W

DLIB_NAME = "dlib_face_recognition_resnet_model_v1.dat"
FETCH_HINT = "dlib weights not cached: run `python -m fakespotter.weights fetch`"


def dlib_cached() -> bool:
    try:
        W.weights_path(DLIB_NAME)
        return True
    except W.WeightsError:
        return False


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.relu(self.conv(x)) + x)


class SmallNet(nn.Module):
    """Random CNN with a residual block, odd spatial sizes, 70 channels (crosses a word) and a
    tail after the last monitored layer. Input [N, 3, 15, 13]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 70, 3, stride=2)
        self.act = nn.ReLU()
        self.block = Block(70)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(70, 65)
        self.head = nn.Linear(65, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.act(self.stem(x / 64.0 - 2.0)))
        return self.head(torch.tanh(self.fc(torch.flatten(self.pool(x), 1))))


SMALL_SHAPE = (3, 15, 13)
SMALL_LAYERS = ["stem", "act", "block.relu", "block", "fc"]


def small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet().eval()


class PooledNet(nn.Module):
    """conv -> batch norm -> ReLU -> global pool -> linear (8 channels, 6 outputs), seeded; any
    input size. The small backbone of the detector tests (monitored layers ``POOLED_LAYERS``)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.act(self.bn(self.conv(x)))), 1))


POOLED_LAYERS = ("act", "pool", "fc")


def small_chips(n: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SMALL_SHAPE), generator=g) * 255


def hook_activations(module: nn.Module, layers: Sequence[str], x: Tensor) -> Dict[str, Tensor]:
    """Activations of ``layers`` captured with plain forward hooks (removed afterwards)."""
    found: Dict[str, List[Tensor]] = {n: [] for n in layers}
    mods = dict(module.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: found[n].append(o.detach().clone()))
               for n in layers]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    assert all(len(v) == 1 for v in found.values())
    return {n: v[0] for n, v in found.items()}
