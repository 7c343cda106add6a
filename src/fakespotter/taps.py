"""Taps: run a backbone and pack its monitored layers into one row of bits.

A :class:`Tap` wraps a backbone and a list of monitored layers (qualified module names). Its
``forward(x)`` returns ``int64 [N, layout.total_words]``: each layer's activation is thresholded
and packed by ``fakespotter::threshold_pack_into`` into its slot of one preallocated row while
the forward still holds it (right after the first operation that uses it), so the tap keeps no
float activation alive longer than the bare forward does, and none outlives the forward pass.

How the intermediates are reached: the backbone is traced once with ``torch.fx`` (a tracer that
records the output node of every call of a monitored module), a pack node is inserted after
each of those nodes' first user (after the node itself when that user would only run for it),
and everything after the last pack is removed. The result is an
ordinary ``GraphModule`` (plain Python code, no hooks) that shares the backbone's parameters, so
the same ``Tap`` runs eagerly, under ``torch.compile``, ``torch.export`` (:func:`export_tap`)
and ``torch.jit.script`` (:func:`script_tap`), with bit-identical rows. (Inductor, the default
``torch.compile`` backend, may run convolutions channels_last, which round differently: a few
bits in millions move in ``element`` granularity. ``torch.compile(tap, options={"layout_optimization":
False})`` keeps the eager layout, and gave the eager rows here.) Backbones whose forward
has shape-dependent Python (e.g. dlib's zero-padding ``add``) name those helpers in
``trace_functions``; they are then called, not traced into.

Row layout (``Tap.layout``): layers in the order given; layer ``l`` occupies words
``[word_offset_l, word_offset_l + ceil(features_l / 64))``; offsets are cumulative. Within a
layer the bit layout is that of ``csrc/bitpack.h``. Mean neuron coverage of layer ``l`` is
``layer_popcount(row, word_offset_l, words_l) / features_l`` (:meth:`Tap.mnc`).

Thresholds live in one float32 buffer ``thresholds``: one value per layer (``per_layer``, paper
Eq. 1) or one per neuron of every layer in layout order (``per_neuron``).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._errors import first_line
from .backbones.registry import Backbone, custom_backbone, identified
from .ops import layer_popcount, num_words

__all__ = [
    "GRANULARITIES",
    "LayerSlot",
    "TapLayout",
    "Tap",
    "script_tap",
    "load_script_tap",
    "export_tap",
    "exact_float32",
]

GRANULARITIES = ("channel", "element")
THRESHOLD_MODES = ("per_layer", "per_neuron")


@dataclass(frozen=True)
class LayerSlot:
    """One monitored layer's place in the packed row.

    shape: the activation's shape without the batch dim, e.g. (C, H, W) or (D,).
    features: neurons (C in channel granularity, C * H * W in element granularity).
    """

    name: str
    shape: Tuple[int, ...]
    features: int
    word_offset: int
    words: int


@dataclass(frozen=True)
class TapLayout:
    """Where each monitored layer's bits are in a packed row."""

    granularity: str
    layers: Tuple[LayerSlot, ...]
    total_words: int

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.layers)

    @property
    def total_features(self) -> int:
        return sum(s.features for s in self.layers)

    def __getitem__(self, name: str) -> LayerSlot:
        for s in self.layers:
            if s.name == name:
                return s
        raise KeyError(name)

    def bytes_per_row(self) -> int:
        return 8 * self.total_words


def _default_trace_functions() -> Tuple[Callable[..., Any], ...]:
    from .backbones.dlib_resnet import dlib_add

    return (dlib_add,)


def _check_layers(module: nn.Module, layers: Sequence[str], what: str = "Tap") -> List[str]:
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise TypeError(f"{what}: layers must be a sequence of qualified module names, got {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"{what}: at least one layer must be monitored")
    names = [n for n, _ in module.named_modules() if n]
    known = set(names)
    for n in layers:
        if n not in known:
            close = difflib.get_close_matches(n, names, n=5, cutoff=0.5)
            hint = (f"; close matches: {', '.join(repr(c) for c in close)}" if close
                    else "; no close match")
            raise ValueError(
                f"{what}: unknown layer {n!r} in {type(module).__name__}{hint} "
                f"(fakespotter.backbones.list_layers(module) lists all {len(names)})"
            )
    dup = sorted({n for n in layers if layers.count(n) > 1})
    if dup:
        raise ValueError(f"{what}: layers listed more than once: {dup}")
    return layers


# torch.fx traces by patching nn.Module.__call__ and __getattr__ process-wide for the length of the
# trace. Two traces at once (taps built in two threads) restored each other's patches wrongly and
# left one in place, breaking every module call of the process; so one trace at a time, and
# module calls from other threads meanwhile (a detector scoring) go through unrecorded.
_TRACE_LOCK = threading.RLock()


class _LayerTracer(fx.Tracer):
    """Records the output node of every call of a monitored module."""

    def __init__(self, monitored: Sequence[str], trace_functions: Sequence[Callable[..., Any]],
                 leaf_modules: Sequence[type]) -> None:
        super().__init__(autowrap_functions=tuple(trace_functions))
        self.monitored = set(monitored)
        self.leaf_types = tuple(leaf_modules)
        self.outputs: Dict[str, List[fx.Node]] = {}
        self._thread: Optional[int] = None

    def trace(self, root: Any, concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
        with _TRACE_LOCK:
            self._thread = threading.get_ident()
            try:
                return super().trace(root, concrete_args)
            finally:
                self._thread = None

    def _other_thread(self) -> bool:
        return threading.get_ident() != self._thread

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        if self._other_thread():  # (another thread's module, or the same module run eagerly there)
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Tuple[Any, ...],
                    kwargs: Dict[str, Any]) -> Any:
        if self._other_thread():
            return forward(*args, **kwargs)
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        if name in self.monitored:
            if not isinstance(out, fx.Proxy):
                raise ValueError(f"Tap: layer {name!r} does not return a tensor")
            self.outputs.setdefault(name, []).append(out.node)
        return out


def _resolve(root: nn.Module, qualname: str) -> Any:
    obj: Any = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _trace(backbone: Backbone, module: nn.Module, layers: Sequence[str]
           ) -> Tuple[fx.Graph, Dict[str, fx.Node], fx.Node]:
    """FX graph of the backbone, the output node of each monitored layer, the input node."""
    tracer = _LayerTracer(layers, (*_default_trace_functions(), *backbone.trace_functions),
                          backbone.leaf_modules)
    params = list(inspect.signature(module.forward).parameters.values())
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) != 1:
        raise ValueError(f"Tap: the backbone's forward must take exactly one required tensor "
                         f"argument; {type(module).__name__}.forward takes "
                         f"{[p.name for p in params]}")
    concrete = {p.name: p.default for p in params
                if p.default is not inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:
        graph = tracer.trace(module, concrete_args=concrete or None)
    except (fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as e:
        raise ValueError(
            f"Tap: cannot trace {type(module).__name__} with torch.fx ({type(e).__name__}: {first_line(e)}). "
            f"Name the shape-dependent helper functions it calls in trace_functions=, or the "
            f"module types to treat as opaque in leaf_modules= (see custom_backbone)"
        ) from e
    nodes: Dict[str, fx.Node] = {}
    for name in layers:
        found = tracer.outputs.get(name, [])
        if not found:
            raise ValueError(
                f"Tap: layer {name!r} is not called in {type(module).__name__}.forward as traced "
                f"(it is unused, or inside a module treated as a leaf); monitor a module that runs"
            )
        if len(found) > 1:
            raise ValueError(
                f"Tap: layer {name!r} is called {len(found)} times per forward pass, so it has no "
                f"single activation; monitor a module that is called once (give each use its "
                f"own module)"
            )
        nodes[name] = found[0]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    return graph, nodes, inputs[0]


def _finish(graph: fx.Graph, module: nn.Module, extra: Dict[str, nn.Module], last: fx.Node,
            result: Any) -> fx.GraphModule:
    """Drop everything after ``last``, return ``result``, build a GraphModule sharing weights."""
    order = list(graph.nodes)
    output = next(n for n in order if n.op == "output")
    output.args = (result,)
    for n in reversed(order[order.index(last) + 1:]):
        if n.op != "output":
            graph.erase_node(n)
    for n in graph.nodes:
        n.type = None  # annotations such as `_Tensor_` are not TorchScript types
    graph.lint()
    targets: Dict[str, Any] = dict(extra)
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and n.target not in targets:
            targets[n.target] = _resolve(module, n.target)
    gm = fx.GraphModule(targets, graph, class_name="TappedBackbone")
    _others_in_eval(gm, module)
    return gm


def _others_in_eval(gm: nn.Module, module: nn.Module) -> None:
    """Put the modules of ``gm`` that are not ``module``'s (fx's holders of dotted names, the
    sink) in eval mode: only the backbone's modes count (``Tap._refuse_training``)."""
    own = {id(m) for m in module.modules()}
    for m in gm.modules():
        if id(m) not in own:
            m.training = False


class _Sink(nn.Module):
    """Hands an activation to a Python callback (the eager-only capture graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.fns: Dict[int, Callable[[int, Tensor], None]] = {}  # by thread: captures may run in several

    def forward(self, x: Tensor, index: int) -> None:
        fn = self.fns.get(threading.get_ident())
        if fn is not None:
            fn(index, x)


def _capture_graph(backbone: Backbone, module: nn.Module, layers: Sequence[str]
                   ) -> Tuple[fx.GraphModule, _Sink]:
    graph, nodes, _ = _trace(backbone, module, layers)
    sink = _Sink()
    calls = []
    for i, name in enumerate(layers):
        with graph.inserting_after(nodes[name]):
            calls.append(graph.call_module("fs_sink", (nodes[name], i)))
    order = {n: k for k, n in enumerate(graph.nodes)}
    last = max(calls, key=order.__getitem__)
    return _finish(graph, module, {"fs_sink": sink}, last, None), sink


def _pack_graph(backbone: Backbone, module: nn.Module, layout: TapLayout,
                threshold_spans: Sequence[Tuple[int, int]]) -> fx.GraphModule:
    """forward(x, thresholds) -> int64 [N, total_words]: each layer packed after its first user."""
    names = layout.names
    graph, nodes, x = _trace(backbone, module, names)
    with graph.inserting_after(x):
        thresholds = graph.placeholder("fs_thresholds")
    with graph.inserting_after(thresholds):
        rows = graph.call_method("size", (x, 0))
    with graph.inserting_after(rows):
        device = graph.call_function(getattr, (x, "device"))
    with graph.inserting_after(device):
        out = graph.call_function(torch.zeros, ((rows, layout.total_words),),
                                  {"dtype": torch.int64, "device": device})
    traced = list(graph.nodes)
    order = {n: k for k, n in enumerate(traced)}
    end = max(order[nodes[name]] for name in names)  # what runs after the last layer is cut
    packs = []
    for slot, (t_off, t_len) in zip(layout.layers, threshold_spans):
        node = nodes[slot.name]
        # after the activation's first consumer when that runs anyway: then inductor lays the
        # activation out for that consumer (channels_last for a convolution) and hands the pack
        # (tagged flexible_layout) the same buffer; packed first, it was given a contiguous copy
        # of its own, an extra write of every monitored activation. Eagerly it makes no
        # difference: the activation lives until its last consumer either way.
        # Only when nothing up to that consumer can write in place: not the consumer, and not a
        # node in between, which may write into the activation's storage through another name (a
        # monitored module that hands back its input, nn.Identity, feeds a later in-place ReLU).
        first = min(node.users, key=order.__getitem__, default=None)
        movable = first is not None and order[first] < end and not any(
            n.op in ("call_module", "call_method", "call_function") and not _reads_only(n, module)
            for n in traced[order[node] + 1 : order[first] + 1])
        after = first if movable else node
        with graph.inserting_after(after):
            thr = graph.call_method("narrow", (thresholds, 0, t_off, t_len))
        with graph.inserting_after(thr):
            packs.append(graph.call_function(
                torch.ops.fakespotter.threshold_pack_into,
                (node, thr, layout.granularity, out, slot.word_offset),
            ))
    order = {n: k for k, n in enumerate(graph.nodes)}
    last = max(packs, key=order.__getitem__)
    return _finish(graph, module, {}, last, out)


def _reads_only(node: fx.Node, module: nn.Module) -> bool:
    """Whether ``node`` surely leaves its inputs as they were: a torch.nn module, or a torch
    function or method, that is not in place (``relu_``, ``inplace=True`` by name or position,
    ``out=``; torch.fx records ``x += y`` as an ``add``). Anything else (a user's own module or
    function) might write into an activation before it is packed."""
    target = node.target
    if node.op == "call_module":
        m = _resolve(module, str(target))
        return type(m).__module__.startswith("torch.nn.") and not getattr(m, "inplace", False)
    if node.op == "call_method":
        return not str(target).endswith("_")
    if (node.op != "call_function" or getattr(target, "__name__", "_").endswith("_")
            or getattr(target, "__module__", None) not in ("_operator", "torch", "torch.functional",
                                                            "torch.nn.functional")):
        return False
    try:
        bound = inspect.signature(target).bind(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):  # a builtin without a signature: no inplace argument either
        bound = dict(node.kwargs)
    return not bound.get("inplace", False) and "out" not in bound


def _describe(ids: Tuple[str, Optional[str]], layers: Sequence[str], granularity: str) -> str:
    sha = f" (weights sha256 {ids[1][:12]}...)" if ids[1] else ""
    return f"backbone {ids[0]!r}{sha}, {granularity} granularity, layers {list(layers)}"


class Tap(nn.Module):
    """A frozen backbone whose forward returns the packed bits of its monitored layers.

    Args:
        backbone: a :class:`~fakespotter.backbones.Backbone` (its default layers, input shape
            and id are used), or any ``nn.Module`` (then ``layers`` and ``input_shape`` are
            required; see :func:`~fakespotter.backbones.custom_backbone` for tracing hints).
        layers: qualified module names, checked against ``named_modules()``.
        granularity: ``"channel"`` (default; a neuron per channel, valued by its spatial mean)
            or ``"element"`` (every element of the activation is a neuron).
        thresholds: a ``Thresholds`` from calibration, one float for every layer, one float per
            layer, or one tensor per layer (1 value or one per neuron). Default 0.0.
        input_shape: (C, H, W) of one input, for a plain ``nn.Module``.

    The backbone is shared, not copied, and frozen (eval mode, ``requires_grad=False``): with
    gradients on, autograd would keep every activation alive until the end of the forward pass.
    Being shared, its submodules' forward hooks also run inside an eager tap, and the tap (eager,
    compiled or scripted, and :meth:`capture`) raises RuntimeError once the module or the tap is
    put back into ``train()``; an exported program refuses ``train()`` itself.

    forward(x (Tensor[N, *input_shape], the module's input)) -> Tensor[N, layout.total_words]
    int64.
    """

    __jit_ignored_attributes__ = ["layout", "preprocessing", "backbone", "_aux", "input_dtype"]

    def __init__(self, backbone: Union[Backbone, nn.Module],
                 layers: Optional[Sequence[str]] = None, *, granularity: str = "channel",
                 thresholds: Any = 0.0, input_shape: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"Tap: granularity must be 'channel' or 'element', got {granularity!r}")
        if isinstance(backbone, nn.Module):
            if layers is None or input_shape is None:
                raise ValueError("Tap: for a plain nn.Module pass layers=[...] and "
                                 "input_shape=(C, H, W) (or build a Backbone with custom_backbone)")
            if len(input_shape) != 3 or input_shape[0] != 3:
                raise ValueError(f"Tap: input_shape must be (3, H, W), got {tuple(input_shape)}")
            backbone = custom_backbone(backbone, layers, tuple(input_shape[1:]))
        elif not isinstance(backbone, Backbone):
            raise TypeError(f"Tap: backbone must be a Backbone or nn.Module, "
                            f"got {type(backbone).__name__}")
        backbone = identified(backbone)
        module = backbone.module
        module.eval()
        module.requires_grad_(False)
        self.layers = _check_layers(
            module, backbone.default_layers if layers is None else layers)
        self.backbone = backbone
        self.backbone_id = backbone.id
        self.weights_sha256 = backbone.weights_sha256
        self.granularity = granularity
        self.preprocessing = backbone.preprocessing
        self.input_shape = [int(s) for s in backbone.input_shape]
        self._aux = {}
        p = next((t for t in module.parameters() if t.is_floating_point()), None)
        self.input_dtype = torch.float32 if p is None else p.dtype  # what prepare() gives the module
        self.layout = self._compute_layout(module)
        self._verify_trace(module)
        self.threshold_mode = "per_layer"
        self.register_buffer("thresholds", torch.zeros(len(self.layers), dtype=torch.float32,
                                                       device=self._device()))
        self.net = _pack_graph(backbone, module, self.layout, self._threshold_spans())
        self.set_thresholds(thresholds)

    # -- construction helpers ----------------------------------------------------------------

    def _device(self) -> torch.device:
        for t in self.backbone.module.parameters():
            return t.device
        for t in self.backbone.module.buffers():
            return t.device
        return torch.device("cpu")

    def _capture_net(self) -> Tuple[fx.GraphModule, _Sink]:
        if "capture" not in self._aux:
            self._aux["capture"] = _capture_graph(self.backbone, self.backbone.module, self.layers)
        return self._aux["capture"]

    def _compute_layout(self, module: nn.Module) -> TapLayout:
        shapes: Dict[int, Tuple[int, ...]] = {}

        def record(i: int, a: Any) -> None:
            if not isinstance(a, Tensor) or a.dim() < 2:
                raise ValueError(f"Tap: layer {self.layers[i]!r} must output a tensor [N, C, ...] "
                                 f"or [N, D], got {type(a).__name__}"
                                 f"{list(a.shape) if isinstance(a, Tensor) else ''}")
            if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"Tap: layer {self.layers[i]!r} outputs {a.dtype}; the packer takes "
                                 f"float32, float16 or bfloat16 activations (convert the backbone, "
                                 f"e.g. module.float())")
            shapes[i] = tuple(int(s) for s in a.shape[1:])

        x = torch.zeros((1, *self.input_shape), device=self._device(), dtype=self.input_dtype)
        try:
            self.capture(x, record)
        except RuntimeError as e:  # torch's own words: an input too small for the network, ...
            if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                raise
            raise ValueError(f"Tap: {type(module).__name__} fails on a probe input of the backbone's input "
                             f"shape {list(x.shape)} ({x.dtype}): {first_line(e)}") from e
        slots = []
        offset = 0
        for i, name in enumerate(self.layers):
            shape = shapes[i]
            features = shape[0] if self.granularity == "channel" else math.prod(shape)
            words = num_words(features)
            slots.append(LayerSlot(name, shape, features, offset, words))
            offset += words
        return TapLayout(self.granularity, tuple(slots), offset)

    def _verify_trace(self, module: nn.Module) -> None:
        """The traced graph must compute what the module computes: torch.fx records in-place
        Python operators (``y *= s``, ``x += f(x)``) as out-of-place ones, so a tensor aliased
        before such an operator (a view, ``identity = x``) no longer sees the write, and later
        layers differ from the module's. Compared on one random probe, against forward hooks."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn((2, *self.input_shape), generator=g).to(device=self._device(), dtype=self.input_dtype)
        mods = dict(module.named_modules())
        hooked: Dict[str, Tensor] = {}

        class _Seen(Exception):
            pass

        def hook(n: str) -> Callable[..., None]:
            def fn(_m: nn.Module, _i: Any, o: Any) -> None:
                hooked[n] = o.detach().clone()
                if len(hooked) == len(self.layers):
                    raise _Seen  # the rest of the forward (a head that may not take this size) is not needed
            return fn

        handles = [mods[n].register_forward_hook(hook(n)) for n in self.layers]
        try:
            with torch.no_grad(), exact_float32():
                module(x)
        except _Seen:
            pass
        finally:
            for h in handles:
                h.remove()
        bad: List[str] = []

        def check(i: int, a: Tensor) -> None:  # (close, not equal: a GPU's reductions need not repeat bit for bit)
            if not torch.allclose(a, hooked[self.layers[i]], rtol=1e-4, atol=1e-5, equal_nan=True):
                bad.append(self.layers[i])

        self.capture(x, check)
        if bad:
            raise ValueError(
                f"Tap: the traced forward of {type(module).__name__} does not reproduce its layers "
                f"{bad}: an in-place operator such as `y *= s` or `x += f(x)` on a tensor that is "
                f"also referenced elsewhere (torch.fx records it out of place: rewrite it out of "
                f"place, or put it inside a module named in leaf_modules=), or randomness in the "
                f"forward in eval mode (rows would not repeat either)")

    def _threshold_spans(self) -> List[Tuple[int, int]]:
        if self.threshold_mode == "per_layer":
            return [(i, 1) for i in range(len(self.layers))]
        spans, offset = [], 0
        for s in self.layout.layers:
            spans.append((offset, s.features))
            offset += s.features
        return spans

    # -- thresholds ----------------------------------------------------------------------------

    def set_thresholds(self, thresholds: Any) -> None:
        """Replace the thresholds (see the class docstring for the accepted forms).

        A ``Thresholds`` object must come from the same backbone id, weights, granularity and
        layer list, else ``ValueError`` naming both. Changing between per-layer and per-neuron
        rebuilds the packing graph: compile / export / script the tap after this call.
        """
        from .calibration import Thresholds

        L = len(self.layers)
        if isinstance(thresholds, Thresholds):
            mine = ((self.backbone_id, self.weights_sha256), self.layers, self.granularity)
            theirs = ((thresholds.backbone_id, thresholds.weights_sha256),
                      list(thresholds.layers), thresholds.granularity)
            same_weights = (mine[0][0] == theirs[0][0] and (
                mine[0][1] is None or theirs[0][1] is None or mine[0][1] == theirs[0][1]))
            if not same_weights or mine[1] != theirs[1] or mine[2] != theirs[2]:
                differ = [what for what, bad in (
                    ("backbone" if mine[0][0] != theirs[0][0] else "set of backbone weights", not same_weights),
                    ("layer list", mine[1] != theirs[1]), ("granularity", mine[2] != theirs[2])) if bad]
                raise ValueError(
                    f"Tap.set_thresholds: the thresholds are for another {' and '.join(differ)} than the tap's: "
                    f"calibrated for {_describe(*theirs)}, they cannot be used by a tap of {_describe(*mine)}"
                )
            values: List[Tensor] = list(thresholds.values)
        elif isinstance(thresholds, (int, float)):
            values = [torch.tensor([float(thresholds)])] * L
        elif isinstance(thresholds, Tensor) and thresholds.dim() <= 1 and thresholds.numel() in (1, L):
            values = [v.reshape(1) for v in thresholds.reshape(-1).expand(L)]
        else:
            if thresholds is None or isinstance(thresholds, (str, bytes, dict)) or not hasattr(thresholds, "__iter__"):
                raise TypeError(f"Tap.set_thresholds: expected a Thresholds, a number, a tensor or one entry per "
                                f"layer ({L}), got {type(thresholds).__name__}")
            values = [torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in thresholds]
            if len(values) != L:
                raise ValueError(f"Tap.set_thresholds: expected {L} entries (one per layer), "
                                 f"got {len(values)}")
        per_neuron = any(v.numel() != 1 for v in values)
        flat = []
        for v, slot in zip(values, self.layout.layers):
            v = v.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
            if v.numel() not in (1, slot.features):
                raise ValueError(
                    f"Tap.set_thresholds: layer {slot.name!r} needs 1 threshold or "
                    f"{slot.features} (one per {self.granularity}), got {v.numel()}"
                )
            flat.append(v.expand(slot.features) if per_neuron else v)
        mode = "per_neuron" if per_neuron else "per_layer"
        buf = torch.cat(flat).to(self.thresholds.device)
        if mode != self.threshold_mode:
            self.threshold_mode = mode
            self.net = _pack_graph(self.backbone, self.backbone.module, self.layout,
                                   self._threshold_spans())
            self.thresholds = buf
        else:  # in place: exported and scripted taps share the buffer (one made in inference mode, too)
            with torch.no_grad(), torch.inference_mode(self.thresholds.is_inference()):
                self.thresholds.copy_(buf)

    def layer_thresholds(self) -> List[Tensor]:
        """The thresholds of each layer: float32 [1] (per layer) or [features] (per neuron)."""
        return [self.thresholds.narrow(0, o, n) for o, n in self._threshold_spans()]

    # -- running -------------------------------------------------------------------------------

    def prepare(self, x: Tensor) -> Tensor:
        """Chips (float RGB 0..255, ``[N, 3, H, W]``) as the module's input: the backbone's
        preprocessing, in the dtype of the module's weights (float16 or bfloat16 ones too)."""
        return self.preprocessing(x).to(self.input_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != len(self.input_shape) + 1 or list(x.shape[1:]) != self.input_shape:
            raise ValueError("Tap: expected input [N, " + ", ".join(
                [str(s) for s in self.input_shape]) + "], got " + str(list(x.shape)))
        if not x.is_floating_point():
            raise TypeError("Tap: expected a floating-point input (tap.prepare(chips) gives the module's dtype and "
                            "preprocessing), got an integer or bool tensor")
        if torch.jit.is_scripting():
            self._refuse_training()
        elif torch.compiler.is_compiling():
            self._refuse_training()
        else:
            self._check_frozen(self.net, "pack")
        return self.net(x, self.thresholds)

    def train(self, mode: bool = True) -> "Tap":
        """``nn.Module.train``; the packing graph's own modules stay in eval mode (a later
        ``module.eval()`` puts the tap back in order)."""
        super().train(mode)
        _others_in_eval(self.net, self.backbone.module)
        return self

    def _refuse_training(self) -> None:
        """:meth:`_check_frozen` in a form TorchScript and torch.compile take (without the names):
        the packing graph holds the backbone's modules and, in eval mode, nothing else's."""
        for m in self.net.modules():
            if m.training:
                raise RuntimeError("Tap: the backbone " + self.backbone_id + " is in training mode; a tap "
                                   "monitors a frozen network (in training mode BatchNorm and dropout change "
                                   "the bits): call .eval() on the module or the tap first")

    @torch.jit.unused
    def _check_frozen(self, net: nn.Module, role: str) -> None:
        """Refuse a backbone switched back to training mode (``module.train()`` or ``tap.train()``
        after the tap was built): its BatchNorm would normalize with each batch's statistics and
        its dropout would drop activations, and the bits would change silently."""
        seen = self._aux.setdefault("modules", {})  # per role (pack, capture): the backbone's modules its graph calls
        if role not in seen or seen[role][0] is not net:  # (set_thresholds builds a new packing graph)
            own = {id(m) for m in self.backbone.module.modules()}
            seen[role] = (net, [(n, m) for n, m in net.named_modules() if id(m) in own])
        modules = seen[role][1]
        if not any(m.training for _, m in modules):
            return
        names = [n for n, m in modules if m.training]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise RuntimeError(f"Tap: the backbone {self.backbone_id!r} is in training mode ({', '.join(names[:3])}{more}: "
                           f"training=True); a tap monitors a frozen network (in training mode BatchNorm and dropout "
                           f"change the bits): call .eval() on the module or the tap first")

    def capture(self, x: Tensor, fn: Callable[[int, Tensor], None]) -> None:
        """Eager only: run the backbone on ``x``, calling ``fn(layer_index, activation)`` for each
        monitored layer as soon as its activation exists (in execution order)."""
        net, sink = self._capture_net()
        self._check_frozen(net, "capture")
        sink.fns[threading.get_ident()] = fn
        try:
            with torch.no_grad(), exact_float32():
                net(x)
        finally:
            del sink.fns[threading.get_ident()]

    def mnc(self, rows: Tensor) -> Tensor:
        """Mean neuron coverage (paper Eq. 2) per layer: float32 [N, L] from packed rows [N, W]."""
        if rows.dim() != 2 or rows.shape[1] != self.layout.total_words:
            raise ValueError(f"Tap.mnc: rows must be [N, {self.layout.total_words}], "
                             f"got {list(rows.shape)}")
        cols = [layer_popcount(rows, s.word_offset, s.words).to(torch.float32) / s.features
                for s in self.layout.layers]
        if not cols:
            return rows.new_zeros((rows.shape[0], 0), dtype=torch.float32)
        return torch.stack(cols, dim=1)

    def __repr__(self) -> str:  # the traced backbone's module tree is not useful here
        return (f"Tap(backbone={self.backbone_id!r}, granularity={self.granularity!r}, "
                f"layers={len(self.layers)}, words={self.layout.total_words}, "
                f"thresholds={self.threshold_mode})")


_exact_lock = threading.Lock()
_exact_depth = 0  # exact_float32 blocks running now, in any thread
_exact_saved: Tuple[str, str] = ("", "")


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Run CUDA convolutions and matrix products in IEEE float32 inside the block, with autocast
    off (a caller's ``torch.autocast`` would change the bits): torch lets
    cuDNN use TF32 (a 10-bit mantissa) for float32 convolutions by default on Ampere and later
    GPUs. fakespotter's own forwards (:func:`~fakespotter.features.features`, calibration, the
    scanner) run inside this, so that a GPU gives the CPU's bits up to rounding: measured on an
    H100 over 512 chips, identical rows with TF32 off; with it on 0.02% of the bits and logits by
    up to 0.15 differed, for no measurable speed (on other chips, TF32 off, one bit in a million
    differed: benchmarks/RESULTS.md). Calling a ``Tap`` directly
    follows torch's global settings. The previous settings are restored when the last block
    running (in any thread) exits.

    Uses torch's ``fp32_precision`` settings (torch >= 2.9): torch refuses to read the legacy
    ``allow_tf32`` flags once a program has set the new ones, so this never touches them."""
    global _exact_depth, _exact_saved
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    with _exact_lock:  # the settings are the process's: blocks in several threads share one save
        if _exact_depth == 0:
            _exact_saved = conv.fp32_precision, matmul.fp32_precision
            conv.fp32_precision = matmul.fp32_precision = "ieee"
        _exact_depth += 1
    try:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        with _exact_lock:
            _exact_depth -= 1
            if _exact_depth == 0:
                conv.fp32_precision, matmul.fp32_precision = _exact_saved


@contextlib.contextmanager
def _no_torchscript_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
        yield


def script_tap(tap: Tap) -> torch.jit.ScriptModule:
    """``torch.jit.script(tap)``, with TorchScript's deprecation warnings silenced here only.

    TorchScript is deprecated from torch 2.13; this stays as a compatibility export. The
    returned module gives the same rows as ``tap`` and saves with ``.save(path)``
    (``import fakespotter`` before ``torch.jit.load`` so the ops are registered).
    """
    with _no_torchscript_warnings():
        return torch.jit.script(tap)


def load_script_tap(path: Any, map_location: Any = None) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of a saved :func:`script_tap`, with the deprecation warnings silenced."""
    with _no_torchscript_warnings():
        return torch.jit.load(str(path), map_location=map_location)


def export_tap(tap: Tap, example: Optional[Tensor] = None, dynamic_batch: bool = True
               ) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of a tap, with a dynamic batch dimension by default.

    Save with ``torch.export.save(program, path)``; load with ``torch.export.load(path)``
    after ``import fakespotter``, and call ``.module()(x)``.
    """
    if example is None:
        p = next(iter(tap.parameters()), None)
        example = torch.zeros((2, *tap.input_shape), device=tap.thresholds.device,
                              dtype=p.dtype if p is not None else torch.float32)
    dynamic = None
    if dynamic_batch:
        dynamic = {"x": {0: torch.export.Dim("batch", min=1)}}
    with torch.no_grad():
        return torch.export.export(tap, (example,), dynamic_shapes=dynamic)
