"""dlib's face-recognition ResNet v1 in PyTorch, loaded from dlib's own ``.dat`` file.

The network is ``anet_type`` of dlib's ``examples/dnn_face_recognition_ex.cpp``
(``dlib_face_recognition_resnet_model_v1.dat``): a 150x150 RGB aligned face chip in, a 128-d
descriptor out (two faces are the same person when the L2 distance is below 0.6).

Architecture (input to output; dlib's template names in brackets)::

    input      (x - [122.782, 117.001, 104.298]) / 256                 [input_rgb_image_sized<150>]
    stem       conv 7x7/2 (32) -> affine -> relu -> max_pool 3x3/2       150 -> 72 -> 35
    layer1     3 x unit(32)                                 35x35      [alevel4]
    layer2     unit_down(64)  + 3 x unit(64)                17x17      [alevel3]
    layer3     unit_down(128) + 2 x unit(128)               8x8        [alevel2]
    layer4     unit_down(256) + 2 x unit(256)               4x4 (!)    [alevel1]
    layer5     unit_down(256)                               2x2        [alevel0]
    avgpool    mean over H, W                                          [avg_pool_everything]
    fc         linear 256 -> 128, no bias                              [fc_no_bias<128>]

    unit(N)       relu(add(block(x, stride 1), x))                     [ares]
    unit_down(N)  relu(add(block(x, stride 2), avg_pool 2x2/2 (x)))    [ares_down]
    block         conv 3x3 -> affine -> relu -> conv 3x3/1 (pad 1) -> affine

dlib pads a convolution or pooling by ``size // 2`` only when its stride is 1, so the stride-2
convolutions and poolings have no padding.  dlib's ``add`` of two tensors of different shape
zero-pads both to the element-wise larger shape (channels and the bottom/right of H, W): the
skip path of a down unit has half the channels of the block output, and in ``layer4.0`` the
block output is 3x3 while the pooled skip is 4x4 (so the layer4 and layer5 activations are
4x4 and 2x2).  ``affine`` is dlib's inference-time batch norm: ``gamma[c] * x + beta[c]``.

Every ReLU is a distinct submodule; ``DEFAULT_LAYERS`` lists their qualified names (29 of them,
one per convolution stage and one per residual add) plus ``"fc"``, the descriptor.

The ``.dat`` file is parsed with ``struct``/``numpy`` only (no code execution).  Layout, from
dlib's ``dnn/core.h``, ``layers.h``, ``input.h``, ``loss.h``, ``cuda/tensor.h`` and
``serialize.h``:

* integers: a control byte (bit 7: negative; low 4 bits: number of bytes that follow), then
  that many little-endian magnitude bytes; floats and doubles: two such integers, mantissa
  (int64) then exponent (int16), value = mantissa * 2**exponent; bools: ASCII ``'0'``/``'1'``;
  strings: an integer length then the bytes; tensors: version 2, four integers
  (n, k, nr, nc), then n*k*nr*nc little-endian float32; alias tensors: version 1 and the
  four integers.
* a network nests: the loss layer writes its version, its details, then its sub-network; an
  ``add_layer`` writes its version, then its *whole sub-network*, then its own details and
  state (three bools and cached tensors); tag and skip layers write a version and their
  sub-network.  So the file holds the version headers from the output down to the input
  layer, and then the layer details from the input up to the last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_LAYERS",
    "DESCRIPTOR_LAYER",
    "INPUT_SIZE",
    "DlibFormatError",
    "DlibFaceResNet",
    "Affine",
    "ResidualUnit",
    "dlib_add",
    "parse_dlib_resnet",
    "load_dlib_resnet",
]

INPUT_SIZE = 150
WEIGHTS_NAME = "dlib_face_recognition_resnet_model_v1.dat"

# (stage name, channels, number of units, first unit downsamples) in input-to-output order
_STAGES: Tuple[Tuple[str, int, int, bool], ...] = (
    ("layer1", 32, 3, False),  # dlib alevel4
    ("layer2", 64, 4, True),  # dlib alevel3
    ("layer3", 128, 3, True),  # dlib alevel2
    ("layer4", 256, 3, True),  # dlib alevel1
    ("layer5", 256, 1, True),  # dlib alevel0
)


def _default_layers() -> Tuple[str, ...]:
    names = ["relu1"]
    for stage, _, units, _ in _STAGES:
        for i in range(units):
            names += [f"{stage}.{i}.relu1", f"{stage}.{i}.relu_out"]
    names.append("fc")
    return tuple(names)


#: Qualified module names of every post-ReLU output (input to output) and the descriptor.
DEFAULT_LAYERS: Tuple[str, ...] = _default_layers()
DESCRIPTOR_LAYER = "fc"


class DlibFormatError(ValueError):
    """The file is not the dlib network this port expects; names the file and byte offset."""


# ----------------------------------------------------------------------------------------------
# low-level reader


class _Reader:
    """Cursor over the bytes of a dlib-serialized file; every error names file and offset."""

    def __init__(self, data: bytes, path: str) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, what: str, at: Optional[int] = None) -> DlibFormatError:
        where = self.pos if at is None else at
        return DlibFormatError(
            f"{self.path}: at byte offset {where}: {what} (not dlib's face-recognition ResNet "
            f"v1 file, or a corrupt copy; re-fetch it with `python -m fakespotter.weights "
            f"fetch --force`)"
        )

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"unexpected end of file reading {what} ({n} bytes wanted, "
                            f"{len(self.data) - self.pos} left)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def integer(self, what: str, signed: bool = True, max_bytes: int = 8) -> int:
        at = self.pos
        ctrl = self.take(1, what)[0]
        if ctrl & 0x70:
            raise self.fail(f"bad integer control byte 0x{ctrl:02x} for {what}", at)
        size = ctrl & 0x0F
        negative = bool(ctrl & 0x80)
        if size == 0 or size > max_bytes or (negative and not signed):
            raise self.fail(f"bad integer control byte 0x{ctrl:02x} for {what}", at)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if negative else value

    def expect_int(self, expected: Sequence[int], what: str) -> int:
        at = self.pos
        value = self.integer(what)
        if value not in expected:
            raise self.fail(f"{what}: expected one of {list(expected)}, found {value}", at)
        return value

    def boolean(self, what: str) -> bool:
        at = self.pos
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            raise self.fail(f"{what}: expected bool '0' or '1', found byte {ch!r}", at)
        return ch == b"1"

    def string(self, what: str, max_len: int = 256) -> str:
        at = self.pos
        n = self.integer(what, signed=False)
        if n > max_len:
            raise self.fail(f"{what}: implausible string length {n}", at)
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"{what}: non-ASCII string {raw!r}", at) from None

    def expect_string(self, expected: Sequence[str], what: str) -> str:
        at = self.pos
        value = self.string(what)
        if value not in expected:
            raise self.fail(f"{what}: expected {' or '.join(map(repr, expected))}, "
                            f"found {value!r}", at)
        return value

    def real(self, what: str) -> float:
        at = self.pos
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.fail(f"{what}: old ASCII float encoding is not supported", at)
        mantissa = self.integer(what + " (mantissa)")
        exponent = self.integer(what + " (exponent)", max_bytes=2)
        if exponent == 32000:
            return math.inf
        if exponent == 32001:
            return -math.inf
        if exponent == 32002:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def shape4(self, what: str) -> Tuple[int, int, int, int]:
        dims = tuple(self.integer(f"{what} dim {i}") for i in range(4))
        if any(d < 0 for d in dims):
            raise self.fail(f"{what}: negative dimension in {dims}")
        return dims  # type: ignore[return-value]

    def tensor(self, what: str) -> np.ndarray:
        self.expect_int((2,), f"{what} tensor version")
        shape = self.shape4(what)
        count = shape[0] * shape[1] * shape[2] * shape[3]
        raw = self.take(4 * count, f"{what} data ({count} float32)")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias_tensor(self, what: str) -> Tuple[int, int, int, int]:
        self.expect_int((1,), f"{what} alias_tensor version")
        return self.shape4(what)

    def skip_tensor(self, what: str) -> None:
        """Read a tensor of training state (cached output, gradients) and drop it."""
        self.tensor(what)


# ----------------------------------------------------------------------------------------------
# the expected layer stack


@dataclass(frozen=True)
class _Spec:
    """One entry of the dlib layer stack, listed from the output down to the input."""

    kind: str  # "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc", "tag", "skip"
    name: str  # qualified name of the matching PyTorch module ("" for tag / skip / add_prev)
    args: Tuple[int, ...] = ()  # con: (filters, nr, nc, stride); pools: (nr, nc, stride)


def _unit_specs(prefix: str, channels: int, down: bool) -> List[_Spec]:
    """An ``ares`` / ``ares_down`` unit from its output down to its input (dlib nesting order)."""
    stride = 2 if down else 1
    specs = [_Spec("relu", f"{prefix}.relu_out"), _Spec("add_prev", "")]
    if down:
        specs += [_Spec("avg_pool", f"{prefix}.skip_pool", (2, 2, 2)), _Spec("skip", ""),
                  _Spec("tag", "")]
    specs += [
        _Spec("affine", f"{prefix}.affine2"),
        _Spec("con", f"{prefix}.conv2", (channels, 3, 3, 1)),
        _Spec("relu", f"{prefix}.relu1"),
        _Spec("affine", f"{prefix}.affine1"),
        _Spec("con", f"{prefix}.conv1", (channels, 3, 3, stride)),
        _Spec("tag", ""),
    ]
    return specs


def _network_specs() -> List[_Spec]:
    """The whole ``anet_type`` below the loss layer, output first, input layer excluded."""
    specs = [_Spec("fc", "fc", (128,)), _Spec("avg_pool", "avgpool", (0, 0, 1))]
    for stage, channels, units, down in reversed(_STAGES):
        for i in reversed(range(units)):
            specs += _unit_specs(f"{stage}.{i}", channels, down and i == 0)
    specs += [
        _Spec("max_pool", "maxpool", (3, 3, 2)),
        _Spec("relu", "relu1"),
        _Spec("affine", "affine1"),
        _Spec("con", "conv1", (32, 7, 7, 2)),
    ]
    return specs


@dataclass
class DlibResNetParams:
    """What ``parse_dlib_resnet`` reads: numpy weights keyed by PyTorch module name."""

    input_mean: Tuple[float, float, float]
    input_size: Tuple[int, int]
    conv: Dict[str, Tuple[np.ndarray, np.ndarray, int, int]] = field(default_factory=dict)
    affine: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    fc: Optional[np.ndarray] = None  # [128, 256], PyTorch (out, in) layout
    loss: Dict[str, float] = field(default_factory=dict)


def _read_details(r: _Reader, spec: _Spec, out: DlibResNetParams,
                  in_channels: int) -> int:
    """Read one layer's details; returns its output channel count."""
    what = f"layer {spec.name or spec.kind} ({spec.kind})"
    at = r.pos
    if spec.kind == "con":
        filters, nr, nc, stride = spec.args
        pad = 0 if stride != 1 else nr // 2
        version = r.expect_string(("con_4", "con_5", "con_6"), f"{what} version")
        params = r.tensor(f"{what} params")
        found = (r.integer(f"{what} num_filters"), r.integer(f"{what} nr"),
                 r.integer(f"{what} nc"), r.integer(f"{what} stride_y"),
                 r.integer(f"{what} stride_x"), r.integer(f"{what} padding_y"),
                 r.integer(f"{what} padding_x"))
        if found != (filters, nr, nc, stride, stride, pad, pad):
            raise r.fail(f"{what}: expected (num_filters, nr, nc, stride_y, stride_x, padding_y, "
                         f"padding_x) = {(filters, nr, nc, stride, stride, pad, pad)}, "
                         f"found {found}", at)
        fshape = r.alias_tensor(f"{what} filters")
        bshape = r.alias_tensor(f"{what} biases")
        for m in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
            r.real(f"{what} {m}_multiplier")
        use_bias = True
        if version in ("con_5", "con_6"):
            use_bias = r.boolean(f"{what} use_bias")
        if version == "con_6" and r.boolean(f"{what} use_relu"):
            raise r.fail(f"{what}: fused conv+relu (use_relu) is not supported", at)
        if fshape != (filters, in_channels, nr, nc):
            raise r.fail(f"{what}: expected filters of shape {(filters, in_channels, nr, nc)}, "
                         f"found {fshape}", at)
        nweights = filters * in_channels * nr * nc
        nbias = filters if use_bias else 0
        if use_bias and bshape != (1, filters, 1, 1):
            raise r.fail(f"{what}: expected biases of shape {(1, filters, 1, 1)}, "
                         f"found {bshape}", at)
        if params.size != nweights + nbias:
            raise r.fail(f"{what}: expected {nweights + nbias} parameters, "
                         f"found {params.size}", at)
        flat = params.reshape(-1)
        weight = flat[:nweights].reshape(filters, in_channels, nr, nc)
        bias = flat[nweights:] if use_bias else np.zeros(filters, np.float32)
        out.conv[spec.name] = (weight, bias, stride, pad)
        return filters
    if spec.kind == "affine":
        version = r.string(f"{what} version")
        if version in ("bn_con2", "bn_fc2"):
            raise r.fail(f"{what}: found a training-time batch-norm layer ({version}); "
                         f"expected the inference-time affine layer", at)
        if version not in ("affine_", "affine_2"):
            raise r.fail(f"{what} version: expected 'affine_' or 'affine_2', found {version!r}",
                         at)
        params = r.tensor(f"{what} params")
        gshape = r.alias_tensor(f"{what} gamma")
        bshape = r.alias_tensor(f"{what} beta")
        mode = r.integer(f"{what} mode")
        if version == "affine_2" and r.boolean(f"{what} disabled"):
            raise r.fail(f"{what}: disabled affine layers are not supported", at)
        if mode != 0:
            raise r.fail(f"{what}: expected per-channel mode (CONV_MODE = 0), found {mode}", at)
        c = in_channels
        if gshape != (1, c, 1, 1) or bshape != (1, c, 1, 1) or params.size != 2 * c:
            raise r.fail(f"{what}: expected gamma and beta of shape (1, {c}, 1, 1) and "
                         f"{2 * c} parameters, found {gshape}, {bshape}, {params.size}", at)
        flat = params.reshape(-1)
        out.affine[spec.name] = (flat[:c].copy(), flat[c:].copy())
        return in_channels
    if spec.kind == "relu":
        version = r.expect_string(("relu_", "relu_2"), f"{what} version")
        if version == "relu_2" and r.boolean(f"{what} disabled"):
            raise r.fail(f"{what}: disabled relu layers are not supported", at)
        return in_channels
    if spec.kind in ("max_pool", "avg_pool"):
        nr, nc, stride = spec.args
        pad = 0 if stride != 1 else nr // 2
        r.expect_string((f"{spec.kind}_2",), f"{what} version")
        found = tuple(r.integer(f"{what} {f}") for f in
                      ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"))
        if found != (nr, nc, stride, stride, pad, pad):
            raise r.fail(f"{what}: expected (nr, nc, stride_y, stride_x, padding_y, padding_x) "
                         f"= {(nr, nc, stride, stride, pad, pad)}, found {found}", at)
        return in_channels
    if spec.kind == "add_prev":
        r.expect_string(("add_prev_",), f"{what} version")
        return in_channels  # the caller tracks channel counts across the residual
    if spec.kind == "fc":
        (outputs,) = spec.args
        version = r.expect_string(("fc_2", "fc_3"), f"{what} version")
        found = (r.integer(f"{what} num_outputs", signed=False),
                 r.integer(f"{what} num_inputs", signed=False))
        if found != (outputs, in_channels):
            raise r.fail(f"{what}: expected (num_outputs, num_inputs) = "
                         f"{(outputs, in_channels)}, found {found}", at)
        params = r.tensor(f"{what} params")
        wshape = r.alias_tensor(f"{what} weights")
        r.alias_tensor(f"{what} biases")
        bias_mode = r.integer(f"{what} bias_mode")
        if bias_mode != 1:
            raise r.fail(f"{what}: expected FC_NO_BIAS (1), found bias_mode {bias_mode}", at)
        for m in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
            r.real(f"{what} {m}_multiplier")
        if version == "fc_3":
            r.boolean(f"{what} use_bias")
        if wshape != (in_channels, outputs, 1, 1) or params.size != in_channels * outputs:
            raise r.fail(f"{what}: expected weights of shape {(in_channels, outputs, 1, 1)}, "
                         f"found {wshape} with {params.size} parameters", at)
        # dlib computes x @ W with W of shape [inputs, outputs]; nn.Linear wants [out, in]
        out.fc = np.ascontiguousarray(params.reshape(in_channels, outputs).T)
        return outputs
    raise AssertionError(f"unhandled layer kind {spec.kind}")  # a bug in _network_specs


def _read_layer_state(r: _Reader, spec: _Spec, version: int, innermost: bool) -> None:
    """The training state an add_layer writes after its details; read and discarded."""
    what = f"layer {spec.name or spec.kind}"
    r.boolean(f"{what} this_layer_setup_called")
    r.boolean(f"{what} gradient_input_is_stale")
    r.boolean(f"{what} get_output_and_gradient_input_disabled")
    r.skip_tensor(f"{what} x_grad")
    r.skip_tensor(f"{what} cached_output")
    if innermost:
        r.skip_tensor(f"{what} grad_final")
        if version >= 3:
            r.integer(f"{what} sample_expansion_factor", signed=False)
    elif version >= 2:
        r.skip_tensor(f"{what} params_grad")


def parse_dlib_resnet(path: Union[str, Path]) -> DlibResNetParams:
    """Parse dlib's ``dlib_face_recognition_resnet_model_v1.dat`` into numpy weights.

    The file is checked against the exact ``anet_type`` architecture; anything unexpected
    raises ``DlibFormatError`` naming the file and the byte offset.
    """
    path = Path(path)
    r = _Reader(path.read_bytes(), str(path))

    r.expect_int((1,), "loss layer version")
    loss_version = r.expect_string(("loss_metric_", "loss_metric_2"), "loss layer type")
    loss: Dict[str, float] = {}
    if loss_version == "loss_metric_2":
        loss = {"margin": r.real("loss margin"), "distance_threshold": r.real("loss dist_thresh")}

    # Going in: one version header per layer, output first.
    specs = _network_specs()
    pending: List[Tuple[_Spec, int]] = []
    for i, spec in enumerate(specs):
        innermost = i == len(specs) - 1
        if spec.kind in ("tag", "skip"):
            r.expect_int((1,), f"{spec.kind} layer version")
        elif innermost:
            pending.append((spec, r.expect_int((2, 3), "input-side add_layer version")))
        else:
            pending.append((spec, r.expect_int((1, 2), f"add_layer version of {spec.name or spec.kind}")))

    r.expect_string(("input_rgb_image_sized",), "input layer type")
    mean = (r.real("input avg_red"), r.real("input avg_green"), r.real("input avg_blue"))
    size = (r.integer("input nr", signed=False), r.integer("input nc", signed=False))
    if size != (INPUT_SIZE, INPUT_SIZE):
        raise r.fail(f"input size: expected {(INPUT_SIZE, INPUT_SIZE)}, found {size}")
    out = DlibResNetParams(input_mean=mean, input_size=size, loss=loss)

    # Coming out: details of each add_layer, input first.  Track channels through residuals:
    # a unit's output has max(block channels, skip channels) channels.
    channels = 3
    unit_input = channels
    for depth, (spec, version) in enumerate(reversed(pending)):
        if spec.kind == "con" and spec.name.endswith(".conv1"):
            unit_input = channels
        if spec.kind == "add_prev":
            _read_details(r, spec, out, channels)
            channels = max(channels, unit_input)
        else:
            channels = _read_details(r, spec, out, channels)
        _read_layer_state(r, spec, version, innermost=depth == 0)

    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} unexpected trailing bytes after the network")
    return out


# ----------------------------------------------------------------------------------------------
# the PyTorch module


class Affine(nn.Module):
    """dlib's ``affine`` layer (inference-time batch norm): ``y = weight[c] * x + bias[c]``.

    x (Tensor[N, C, H, W]) -> Tensor[N, C, H, W]
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def dlib_add(a: Tensor, b: Tensor) -> Tensor:
    """dlib's ``add`` of two [N, C, H, W] tensors: zero-pad both to the larger C, H, W, then add.

    Padding goes at the end of each dimension (extra channels, bottom rows, right columns).
    """
    c = max(a.shape[1], b.shape[1])
    h = max(a.shape[2], b.shape[2])
    w = max(a.shape[3], b.shape[3])
    a = F.pad(a, [0, w - a.shape[3], 0, h - a.shape[2], 0, c - a.shape[1]])
    b = F.pad(b, [0, w - b.shape[3], 0, h - b.shape[2], 0, c - b.shape[1]])
    return a + b


class ResidualUnit(nn.Module):
    """dlib's ``ares`` (``downsample=False``) or ``ares_down`` (``downsample=True``) unit.

    x (Tensor[N, C_in, H, W]) -> Tensor[N, max(C_in, channels), H', W'] with
    ``relu_out(dlib_add(block(x), skip(x)))``; ``skip`` is the identity, or a 2x2/2 average
    pool when downsampling.
    """

    def __init__(self, in_channels: int, channels: int, downsample: bool) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 0 if downsample else 1)
        self.affine1 = Affine(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.affine2 = Affine(channels)
        self.skip_pool = nn.AvgPool2d(2, 2) if downsample else nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.affine2(self.conv2(self.relu1(self.affine1(self.conv1(x)))))
        return self.relu_out(dlib_add(y, self.skip_pool(x)))


class GlobalAvgPool(nn.Module):
    """Mean over H and W: Tensor[N, C, H, W] -> Tensor[N, C]."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class DlibFaceResNet(nn.Module):
    """dlib's face-recognition ResNet v1 (``anet_type``).

    x (Tensor[N, 3, 150, 150]): RGB face chips as floats in 0..255 (dlib ``get_face_chip``,
    size 150, padding 0.25); the module subtracts dlib's channel means and divides by 256.
    Returns Tensor[N, 128], the face descriptor (not normalised; same-person threshold 0.6 on
    the L2 distance).
    """

    def __init__(self, input_mean: Sequence[float] = (122.782, 117.001, 104.298)) -> None:
        super().__init__()
        self.register_buffer(
            "input_mean", torch.tensor(list(input_mean), dtype=torch.float32).view(1, 3, 1, 1)
        )
        self.conv1 = nn.Conv2d(3, 32, 7, 2, 0)
        self.affine1 = Affine(32)
        self.relu1 = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2)
        in_channels = 32
        for stage, channels, units, down in _STAGES:
            blocks = []
            for i in range(units):
                blocks.append(ResidualUnit(in_channels, channels, down and i == 0))
                in_channels = max(in_channels, channels)
            self.add_module(stage, nn.Sequential(*blocks))
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(in_channels, 128, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.input_mean) / 256.0
        x = self.maxpool(self.relu1(self.affine1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.layer5(x)
        return self.fc(self.avgpool(x))

    @classmethod
    def from_params(cls, params: DlibResNetParams) -> "DlibFaceResNet":
        """Build the module from ``parse_dlib_resnet`` output (every tensor must be present)."""
        model = cls(params.input_mean)
        modules = dict(model.named_modules())
        expected_conv = {n for n, m in modules.items() if isinstance(m, nn.Conv2d)}
        expected_affine = {n for n, m in modules.items() if isinstance(m, Affine)}
        if set(params.conv) != expected_conv or set(params.affine) != expected_affine:
            raise ValueError("DlibFaceResNet.from_params: parsed layers do not match the module")
        if params.fc is None:
            raise ValueError("DlibFaceResNet.from_params: no fc weights parsed")
        with torch.no_grad():
            for name, (weight, bias, stride, pad) in params.conv.items():
                conv = modules[name]
                if (conv.stride[0], conv.padding[0]) != (stride, pad):  # type: ignore[index]
                    raise ValueError(f"DlibFaceResNet.from_params: {name}: stride/padding "
                                     f"{(stride, pad)} differ from the module's")
                conv.weight.copy_(torch.from_numpy(weight))  # type: ignore[union-attr]
                conv.bias.copy_(torch.from_numpy(bias))  # type: ignore[union-attr]
            for name, (gamma, beta) in params.affine.items():
                modules[name].weight.copy_(torch.from_numpy(gamma))  # type: ignore[union-attr]
                modules[name].bias.copy_(torch.from_numpy(beta))  # type: ignore[union-attr]
            model.fc.weight.copy_(torch.from_numpy(params.fc))
        return model


def load_dlib_resnet(path: Optional[Union[str, Path]] = None) -> DlibFaceResNet:
    """Load dlib's face-recognition ResNet v1 from its ``.dat`` file, in eval mode, frozen.

    ``path`` defaults to the verified cached copy (``fakespotter.weights.weights_path``), which
    raises a clear error with the fetch command when it is missing or corrupt.  An explicit
    ``path`` is validated structurally by the parser but not hash-checked.
    """
    if path is None:
        from fakespotter.weights import weights_path

        path = weights_path(WEIGHTS_NAME)
    model = DlibFaceResNet.from_params(parse_dlib_resnet(path)).float()  # (float32 whatever torch's default dtype)
    model.eval()
    model.requires_grad_(False)
    return model
