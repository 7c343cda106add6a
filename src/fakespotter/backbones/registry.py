"""Backbones: a module plus what it needs around it (preprocessing, default layers, identity).

A :class:`Backbone` is the record the rest of fakespotter works with: the (frozen) module, how
a face chip becomes the module's input, which layers are monitored by default, and an ``id``
with the sha256 of its weights, so that thresholds and models calibrated on one backbone are
refused by another.

Built in:

* ``"dlib_resnet_v1"`` (the default): dlib's face-recognition ResNet v1, weights from the
  registry-pinned cache (``python -m fakespotter.weights fetch``), hash-checked on load.
* ``"resnet18"``, ``"resnet34"``, ``"resnet50"``: torchvision-layout ResNets from a local
  checkpoint (``get_backbone("resnet50", checkpoint="model.pth")``), read without pickle code
  execution.

Anything else: :func:`custom_backbone` (any ``nn.Module`` plus layer names), or
:func:`register_backbone` to make a factory available by id.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

__all__ = [
    "DEFAULT_BACKBONE",
    "Preprocessing",
    "Backbone",
    "LayerInfo",
    "get_backbone",
    "register_backbone",
    "list_backbones",
    "list_layers",
    "custom_backbone",
    "state_dict_sha256",
]

DEFAULT_BACKBONE = "dlib_resnet_v1"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB face chip with values 0..255 becomes the backbone's input.

    ``input = (chip * scale - mean[c]) / std[c]``, as float32 ``[N, 3, H, W]`` (``size`` is
    ``(H, W)``); ``channel_order="BGR"`` reverses the channels first. The dlib backbone takes
    the chip as is (``scale=1, mean=0, std=1``: the module normalises internally).
    """

    size: Tuple[int, int] = (150, 150)
    scale: float = 1.0
    mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "RGB"
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(int(s) != s or s < 1 for s in self.size):
            raise ValueError(f"Preprocessing: size must be (H, W) positive ints, got {self.size!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"Preprocessing: channel_order must be 'RGB' or 'BGR', "
                             f"got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ValueError(f"Preprocessing: mean and std need 3 entries, std non-zero; got "
                             f"mean={self.mean!r}, std={self.std!r}")

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one input of the module."""
        return (3, int(self.size[0]), int(self.size[1]))

    @property
    def is_identity(self) -> bool:
        return (self.scale == 1.0 and tuple(self.mean) == (0.0, 0.0, 0.0)
                and tuple(self.std) == (1.0, 1.0, 1.0) and self.channel_order == "RGB")

    def __call__(self, chips: torch.Tensor) -> torch.Tensor:
        """float32 RGB chips 0..255 [N, 3, H, W] -> the module's input [N, 3, H, W]."""
        if self.channel_order == "BGR":
            chips = chips.flip(1)
        if self.is_identity:
            return chips
        mean = torch.tensor(self.mean, dtype=chips.dtype, device=chips.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=chips.dtype, device=chips.device).view(1, 3, 1, 1)
        return (chips * self.scale - mean) / std

    def to_dict(self) -> Dict[str, Any]:
        return {"size": list(self.size), "scale": self.scale, "mean": list(self.mean),
                "std": list(self.std), "channel_order": self.channel_order}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Preprocessing":
        return cls(size=tuple(d["size"]), scale=float(d["scale"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), channel_order=d["channel_order"])


@dataclass(frozen=True, eq=False)
class Backbone:
    """A frozen backbone module and everything needed to tap it.

    id: stable name (``"dlib_resnet_v1"``, ``"resnet50"``, ``"custom:MyNet"``).
    weights_sha256: sha256 of the weights file (or of the state_dict, for in-memory modules);
        thresholds and models record it and are refused by a backbone with other weights.
    factory: builds the module (loading and checking its weights); called once, on first use
        of :attr:`module`.
    trace_functions / leaf_modules: hints for the tap's FX tracer (functions it must not trace
        into, e.g. shape-dependent helpers; module types it must treat as opaque calls).
    """

    id: str
    factory: Callable[[], nn.Module]
    preprocessing: Preprocessing
    default_layers: Tuple[str, ...]
    weights_sha256: Optional[str] = None
    description: str = ""
    trace_functions: Tuple[Callable[..., Any], ...] = ()
    leaf_modules: Tuple[type, ...] = ()
    _cache: Dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def module(self) -> nn.Module:
        """The module, in eval mode with ``requires_grad=False`` (built on first access)."""
        if "module" not in self._cache:
            with torch.random.fork_rng(devices=[]):  # (a module's random init, then its weights: the caller's
                m = self.factory()                    # seeded torch stream stays where it was)
            m.eval()
            m.requires_grad_(False)
            self._cache["module"] = m
        return self._cache["module"]

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return self.preprocessing.input_shape

    def __repr__(self) -> str:
        sha = (self.weights_sha256 or "?")[:12]
        return (f"Backbone(id={self.id!r}, weights_sha256={sha}..., input={list(self.input_shape)}, "
                f"{len(self.default_layers)} default layers)")


# ----------------------------------------------------------------------------------------------
# registry

_Factory = Callable[..., Backbone]
_REGISTRY: Dict[str, Tuple[_Factory, str]] = {}
_from_plugins: Set[str] = set()  # ids registered from entry points


def register_backbone(id: str, factory: _Factory, description: str = "",
                      overwrite: bool = False) -> None:
    """Make ``get_backbone(id, **kwargs)`` call ``factory(**kwargs)``, which returns a Backbone."""
    if not isinstance(id, str) or not id:
        raise ValueError(f"register_backbone: id must be a non-empty str, got {id!r}")
    if id in _REGISTRY and not overwrite and id not in _from_plugins:  # (code wins over an entry point)
        raise ValueError(f"register_backbone: {id!r} is already registered (pass overwrite=True)")
    _REGISTRY[id] = (factory, description)
    _from_plugins.discard(id)


ENTRY_POINT_GROUP = "fakespotter.backbones"
_plugins_loaded = False


def _load_plugins() -> None:
    """Register, once, the backbones that installed packages declare under the entry-point group
    ``fakespotter.backbones`` (name: the id; value: ``module:function``, a factory returning a
    Backbone): the command line, worker processes and Ray actors find them by id as they find
    the built-in ones. An id registered in code first keeps its factory. The modules are
    imported only when their backbone is asked for."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import warnings
    from importlib.metadata import entry_points

    try:
        found = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception as e:  # another package's damaged metadata must not break the built-in backbones
        warnings.warn(f"fakespotter: cannot list the {ENTRY_POINT_GROUP} entry points of the installed "
                      f"packages ({type(e).__name__}: {e}); only backbones registered in code are known")
        return
    for ep in found:
        if ep.name and ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = (_plugin_factory(ep), f"{ep.value} (entry point)")
            _from_plugins.add(ep.name)


def _plugin_factory(ep: Any) -> _Factory:
    def make(**kwargs: Any) -> Backbone:
        try:
            factory = ep.load()
        except Exception as e:
            raise ValueError(f"get_backbone: backbone {ep.name!r} comes from the entry point {ep.value!r} "
                             f"(group {ENTRY_POINT_GROUP}), which cannot be loaded: {type(e).__name__}: {e}") from e
        return factory(**kwargs)

    return make


def list_backbones() -> List[str]:
    """Ids of the registered backbones (with those installed packages declare as entry points),
    sorted; the default is ``DEFAULT_BACKBONE``."""
    _load_plugins()
    return sorted(_REGISTRY)


def get_backbone(id: str = DEFAULT_BACKBONE, **kwargs: Any) -> Backbone:
    """The registered backbone ``id`` (or one an installed package declares under the entry-point
    group ``fakespotter.backbones``); ``kwargs`` go to its factory (e.g. ``checkpoint=``)."""
    _load_plugins()
    if id not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(id, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"get_backbone: unknown backbone {id!r}{hint} "
                         f"(registered: {', '.join(list_backbones())})")
    factory, _ = _REGISTRY[id]
    backbone = factory(**kwargs)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"get_backbone: the factory of {id!r} returned {type(backbone).__name__}, "
                        f"not a Backbone")
    return identified(backbone)


def identified(backbone: Backbone) -> Backbone:
    """``backbone``, with the sha256 of its weights: one made without ``weights_sha256`` gets
    its module's :func:`state_dict_sha256` (building the module), so that thresholds and models
    record the weights they fit and are refused by other weights."""
    if backbone.weights_sha256 is None:
        object.__setattr__(backbone, "weights_sha256", state_dict_sha256(backbone.module))
    return backbone


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state_dict: names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dim() else
                     t.reshape(1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dlib_resnet_v1() -> Backbone:
    from fakespotter.weights import DEFAULT_WEIGHTS

    from . import dlib_resnet as D

    return Backbone(
        id="dlib_resnet_v1",
        factory=D.load_dlib_resnet,
        preprocessing=Preprocessing(
            size=(D.INPUT_SIZE, D.INPUT_SIZE),
            description="float32 RGB 0..255 [N, 3, 150, 150] dlib chips (size 150, padding "
                        "0.25); the module subtracts dlib's channel means and divides by 256",
        ),
        default_layers=D.DEFAULT_LAYERS,
        weights_sha256=DEFAULT_WEIGHTS[D.WEIGHTS_NAME].sha256,
        description="dlib face-recognition ResNet v1 (29 conv, 128-d descriptor), CC0",
        trace_functions=(D.dlib_add,),
    )


def _resnet_factory(arch: str) -> _Factory:
    def make(checkpoint: Union[str, Path, None] = None, input_size: Union[int, Tuple[int, int]] = 224,
             mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
             layers: Optional[Sequence[str]] = None) -> Backbone:
        from .resnet import check_checkpoint_path, resnet_default_layers

        if checkpoint is None:
            raise ValueError(f"get_backbone: backbone {arch!r} has no weights of its own; give checkpoint=PATH, a "
                             f"state_dict of a torchvision-layout {arch} (safetensors, or a torch file read with "
                             f"weights_only), e.g. get_backbone({arch!r}, checkpoint='model.safetensors')")
        path = check_checkpoint_path(checkpoint)  # (said now, not when the module is first used)
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        sha = _file_sha256(path)
        return Backbone(
            id=arch,
            factory=lambda: _load_unchanged(path, arch, sha),
            preprocessing=Preprocessing(
                size=size, scale=1.0 / 255.0, mean=tuple(mean), std=tuple(std),
                description=f"RGB / 255, normalised by mean {tuple(mean)} and std {tuple(std)}",
            ),
            default_layers=tuple(layers) if layers is not None else resnet_default_layers(arch),
            weights_sha256=sha,
            description=f"torchvision-layout {arch} from {path}",
        )

    return make


def _load_unchanged(path: Path, arch: str, sha: Optional[str]) -> nn.Module:
    from .resnet import CheckpointError, load_resnet_checkpoint

    module = load_resnet_checkpoint(path, arch)
    if sha is None or _file_sha256(path) != sha:
        raise CheckpointError(f"{path}: the checkpoint changed (or was not a file) between "
                              f"get_backbone and loading; its recorded sha256 would not be that "
                              f"of the weights loaded; call get_backbone again")
    return module


def custom_backbone(module: nn.Module, layers: Sequence[str],
                    input_size: Union[int, Tuple[int, int]], *, id: Optional[str] = None,
                    scale: float = 1.0, mean: Sequence[float] = (0.0, 0.0, 0.0),
                    std: Sequence[float] = (1.0, 1.0, 1.0), channel_order: str = "RGB",
                    weights_sha256: Optional[str] = None,
                    trace_functions: Sequence[Callable[..., Any]] = (),
                    leaf_modules: Sequence[type] = ()) -> Backbone:
    """Any ``nn.Module`` taking ``[N, 3, H, W]`` images, monitored at ``layers``.

    id defaults to ``"custom:<class name>"``; weights_sha256 to :func:`state_dict_sha256` of the
    module. The module is put in eval mode with ``requires_grad=False`` (shared, not copied).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"custom_backbone: module must be an nn.Module, got {type(module).__name__}")
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    backbone = Backbone(
        id=id or f"custom:{type(module).__name__}",
        factory=lambda: module,
        preprocessing=Preprocessing(size=size, scale=scale, mean=tuple(mean), std=tuple(std),
                                    channel_order=channel_order),
        default_layers=tuple(layers),
        weights_sha256=weights_sha256 or state_dict_sha256(module),
        description=f"user module {type(module).__name__}",
        trace_functions=tuple(trace_functions),
        leaf_modules=tuple(leaf_modules),
    )
    backbone.module  # freeze now  # noqa: B018
    return backbone


register_backbone(DEFAULT_BACKBONE, _dlib_resnet_v1,
                  "dlib face-recognition ResNet v1 (default; registry-pinned weights)")
for _arch in ("resnet18", "resnet34", "resnet50"):
    register_backbone(_arch, _resnet_factory(_arch),
                      f"torchvision-layout {_arch} from a local checkpoint (checkpoint=PATH)")


# ----------------------------------------------------------------------------------------------
# layer listing


@dataclass(frozen=True)
class LayerInfo:
    """One module of a backbone: qualified name, type, and output shape (without N) if known."""

    name: str
    type: str
    output_shape: Optional[Tuple[int, ...]] = None
    calls: int = 0  # times it ran in one forward pass (0: not run, or shapes not computed)

    @property
    def features(self) -> Optional[Dict[str, int]]:
        """Neurons per granularity, when the output shape is known."""
        if self.output_shape is None or not self.output_shape:
            return None
        return {"channel": self.output_shape[0], "element": math.prod(self.output_shape)}


def list_layers(backbone: Union[Backbone, nn.Module],
                input_shape: Optional[Sequence[int]] = None) -> List[LayerInfo]:
    """Every submodule by qualified name (the names taps accept), in ``named_modules`` order.

    Output shapes come from one forward pass of a batch of one zero input, with forward hooks
    that are removed afterwards; they are computed when the input shape is known (a Backbone,
    or ``input_shape`` = (C, H, W)). A module run more than once per forward reports its last
    shape and its call count (taps refuse such modules).
    """
    if isinstance(backbone, Backbone):
        module = backbone.module
        input_shape = input_shape or backbone.input_shape
    elif isinstance(backbone, nn.Module):
        module = backbone
    else:
        raise TypeError(f"list_layers: expected a Backbone or nn.Module, got {type(backbone).__name__}")
    names = [(n, m) for n, m in module.named_modules() if n]
    shapes: Dict[str, Tuple[int, ...]] = {}
    calls: Dict[str, int] = {}
    if input_shape is not None:
        handles = []
        # probe in eval mode: in training mode BatchNorm would update the caller's running
        # statistics (changing its weights and their sha256) and refuse a batch of one
        training = {m: m.training for m in module.modules()}

        def hook(name: str) -> Callable[..., None]:
            def fn(_m: nn.Module, _i: Any, out: Any) -> None:
                calls[name] = calls.get(name, 0) + 1
                if isinstance(out, torch.Tensor):
                    shapes[name] = tuple(out.shape[1:])
            return fn

        try:
            for n, m in names:
                handles.append(m.register_forward_hook(hook(n)))
            p = next(iter(module.parameters()), None)
            x = torch.zeros((1, *input_shape), dtype=p.dtype if p is not None else torch.float32,
                            device=p.device if p is not None else "cpu")
            module.eval()
            with torch.no_grad():
                module(x)
        finally:
            for h in handles:
                h.remove()
            for m, t in training.items():
                m.training = t
    return [LayerInfo(n, type(m).__name__, shapes.get(n), calls.get(n, 0)) for n, m in names]
