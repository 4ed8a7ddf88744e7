"""The layer catalogue: every layer's name, alias, output shape, stride and receptive field.

The catalogue is built once per model by tracing one forward pass at the model's input
size. Module hooks give each layer's output; a :class:`~torch.overrides.TorchFunctionMode`
watches every tensor operation so that the receptive field is propagated through the real
dataflow (convolutions, pooling, explicit ``F.pad`` as in TF-"same" models, residual adds)
instead of being guessed from the module tree. Layers are addressed by qualified module
name; a module called more than once per forward (a shared ``ReLU``) gets one row per
call, the k-th call named ``name@k`` for k > 0. An activation called as a function inside a
module's ``forward`` (``F.relu`` in Inception's ``BasicConv2d``) gets a row of its own,
``module.relu@fn`` (see :mod:`convscope.hooks` for the naming), unless it is the whole of a
leaf module (``nn.ReLU``, timm's ``GELU``), whose row it already is.

Grids, crops, deconvnet boxes, scans and the atlas all read this one description, as
timm's ``FeatureInfo`` is read by its feature extractors.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConvscopeError, suggest
from .hooks import (
    ModuleStack,
    channels_first,
    frozen,
    functional_activation,
    functional_row,
    named_layers,
    parse_layer_name,
)

__all__ = ["LayerInfo", "Catalogue", "build_catalogue", "parse_layer_name", "named_layers"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
ACT_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
PASS_TYPES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class _Field:
    """Receptive field of a 2-D map, per axis (height, width), in input pixels.

    Unit ``i`` along an axis sees input pixels ``start + i*jump`` to
    ``start + i*jump + size - 1`` (``start`` is negative where padding reaches outside).
    ``global_`` marks a map whose units see the whole input (after global pooling, or
    multiplied by a squeeze-excite gate); ``unknown`` one that depends on the input in a way
    the tracer does not model (any box could be too small, so none is given). ``axes`` are
    the (height, width) dimensions as negative indices: ``(-3, -2)`` for channels-last.
    """

    jump: tuple[float, float] = (1.0, 1.0)
    size: tuple[float, float] = (1.0, 1.0)
    start: tuple[float, float] = (0.0, 0.0)
    global_: bool = False
    unknown: bool = False
    axes: tuple[int, int] = (-2, -1)

    def window(self, kernel, stride, padding, dilation) -> _Field:
        kernel, stride, padding, dilation = (_pair(v) for v in (kernel, stride, padding, dilation))
        jump = tuple(j * s for j, s in zip(self.jump, stride))
        size = tuple(z + (d * (k - 1)) * j for z, k, d, j in zip(self.size, kernel, dilation, self.jump))
        start = tuple(s0 - p * j for s0, p, j in zip(self.start, padding, self.jump))
        return _Field(jump, size, start, self.global_, self.unknown, self.axes)

    def pad(self, top: int, left: int) -> _Field:
        start = (self.start[0] - top * self.jump[0], self.start[1] - left * self.jump[1])
        return _Field(self.jump, self.size, start, self.global_, self.unknown, self.axes)

    @staticmethod
    def union(fields: list[_Field]) -> _Field:
        """The field of an elementwise op on these fields: any global input makes it global, any
        unknown one unknown; otherwise the smallest box holding every input's box."""
        if any(f.global_ for f in fields):
            return _GLOBAL
        if any(f.unknown for f in fields):
            return _UNKNOWN
        if len(fields) == 1:
            return fields[0]
        if len({(f.jump, f.axes) for f in fields}) > 1:  # no single box per unit holds both
            return _UNKNOWN
        start = tuple(min(f.start[a] for f in fields) for a in range(2))
        end = tuple(max(f.start[a] + f.size[a] for f in fields) for a in range(2))
        size = tuple(e - s for e, s in zip(end, start))
        return _Field(fields[0].jump, size, start, axes=fields[0].axes)


_GLOBAL = _Field(global_=True)
_UNKNOWN = _Field(unknown=True)

# Ops with a ``dim`` argument: a reduction over a spatial dimension makes every unit see the
# whole image; a reordering along one (sort, flip, roll, cumsum) is not followed.
_REDUCTIONS = frozenset({
    "sum", "mean", "amax", "amin", "max", "min", "std", "var", "var_mean", "std_mean", "logsumexp", "norm",
    "prod", "median", "nansum", "nanmean", "softmax", "log_softmax", "argmax", "argmin", "all", "any", "normalize",
})
_REORDERINGS = frozenset({
    "sort", "argsort", "topk", "flip", "roll", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp",
})
_SPATIAL_MIXERS = frozenset({"group_norm", "instance_norm"})  # normalise over space: every unit sees all


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int | float):
        return (int(value), int(value))
    value = tuple(int(v) for v in value)
    return value * 2 if len(value) == 1 else value[-2:]


@dataclass(frozen=True)
class LayerInfo:
    """One row of the catalogue: a layer's output at the model's input size.

    Attributes:
        name: qualified module name (``features.3``), with ``@k`` for the k-th call of a reused module.
        alias: a friendlier name (Keras-style ``block1_conv2`` for plain VGG-like nets), or None.
        type: the module's class name.
        shape: output shape without the batch dimension, e.g. ``(64, 224, 224)``.
        stride: cumulative stride (input pixels per output unit), per axis; None if unknown.
        rf_size: receptive-field size in input pixels, per axis; None if unknown.
        rf_start: input coordinate of the first pixel unit (0, 0) sees (negative inside padding).
        kind: ``conv``, ``act``, ``norm``, ``pool``, ``linear``, ``block`` or ``other``.
        is_feature: True for the layers drawn by default: each convolution's output after
            its normalisation and activation (what Keras calls a conv layer's output).
        index: position in execution order.
        global_field: every unit depends on the whole image (after global pooling or a
            squeeze-excite gate); ``rf_size`` is then None and the box is the whole image.
            A layer with neither a box nor ``global_field`` has an unknown field (``field`` says which).
    """

    name: str
    alias: str | None
    type: str
    shape: tuple[int, ...]
    stride: tuple[float, float] | None
    rf_size: tuple[float, float] | None
    rf_start: tuple[float, float] | None
    kind: str
    is_feature: bool
    index: int
    global_field: bool = False

    @property
    def channels(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def is_spatial(self) -> bool:
        return len(self.shape) == 3

    @property
    def field(self) -> str:
        """``"box"`` (exact ``rf_size``/``rf_start``), ``"global"`` (the whole image) or ``"unknown"``."""
        if self.global_field:
            return "global"
        return "unknown" if self.rf_size is None or self.stride is None or self.rf_start is None else "box"

    @property
    def label(self) -> str:
        return f"{self.alias} ({self.name})" if self.alias else self.name

    @property
    def module_name(self) -> str:
        return parse_layer_name(self.name)[0]

    @property
    def call(self) -> int:
        return parse_layer_name(self.name)[1]

    def box(self, row: int, col: int, image_hw: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
        """Input-pixel box ``(top, left, bottom, right)`` (bottom/right exclusive) seen by unit (row, col).

        With ``image_hw`` the box is clipped to the image; see :meth:`box_clipped` to know whether it was.
        A global field's box is the whole image (``image_hw`` is then required).
        """
        if self.global_field and image_hw is not None:
            return (0, 0, image_hw[0], image_hw[1])
        if self.rf_size is None or self.stride is None or self.rf_start is None:
            raise ConvscopeError(f"the receptive field of layer {self.name} is unknown (an operation convscope cannot follow)")
        top = self.rf_start[0] + row * self.stride[0]
        left = self.rf_start[1] + col * self.stride[1]
        box = (top, left, top + self.rf_size[0], left + self.rf_size[1])
        box = tuple(int(math.floor(v)) if i < 2 else int(math.ceil(v)) for i, v in enumerate(box))
        if image_hw is not None:
            height, width = image_hw
            box = (max(box[0], 0), max(box[1], 0), min(box[2], height), min(box[3], width))
        return box

    def box_clipped(self, row: int, col: int, image_hw: tuple[int, int]) -> bool:
        if self.global_field:
            return True
        return self.box(row, col) != self.box(row, col, image_hw)

    def as_dict(self) -> dict:
        return {
            "name": self.name, "alias": self.alias, "type": self.type, "shape": list(self.shape),
            "channels": self.channels, "stride": self.stride, "rf_size": self.rf_size,
            "rf_start": self.rf_start, "field": self.field, "kind": self.kind, "is_feature": self.is_feature,
        }


@dataclass
class Catalogue:
    """All layers of a model in execution order, with name, alias and pattern lookup."""

    layers: list[LayerInfo]
    input_size: tuple[int, int]
    # A max-pooling op ran in the traced forward pass (an nn.MaxPool2d or a functional F.max_pool2d):
    # its switches make the deconvnet's projections image-specific.
    max_pooling: bool = False
    _by_name: dict[str, LayerInfo] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {}
        for layer in self.layers:
            self._by_name[layer.name] = layer
            if layer.alias:
                self._by_name[layer.alias] = layer

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerInfo:
        return self.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def features(self) -> list[LayerInfo]:
        """The default layers: each conv's output after its norm and activation."""
        return [layer for layer in self.layers if layer.is_feature]

    def get(self, name: str) -> LayerInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConvscopeError(
                f"unknown layer {name!r}.{suggest(name, self._by_name)} "
                "Run `convscope layers` to list the names and aliases."
            ) from None

    def resolve(self, spec: str | Iterable[str] | None) -> list[LayerInfo]:
        """Layers named by ``spec``: names, aliases and ``fnmatch`` patterns, comma-separated.

        ``None`` (or ``"features"``) gives the default feature layers. Order follows execution.

        Example:
            >>> cat.resolve("block3_*,features.0")
        """
        if spec is None:
            return self.features
        parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
        chosen: dict[str, LayerInfo] = {}
        for part in filter(None, parts):
            if part in ("features", "default"):
                matches = self.features
            elif any(ch in part for ch in "*?["):
                matches = [
                    layer for layer in self.layers
                    if fnmatch.fnmatchcase(layer.name, part) or (layer.alias and fnmatch.fnmatchcase(layer.alias, part))
                ]
                if not matches:
                    raise ConvscopeError(f"no layer matches the pattern {part!r}. Run `convscope layers` to list the names.")
            else:
                matches = [self.get(part)]
            for layer in matches:
                chosen[layer.name] = layer
        return sorted(chosen.values(), key=lambda layer: layer.index)

    def next_feature(self, layer: LayerInfo, offset: int = 1) -> LayerInfo | None:
        feats = self.features
        names = [f.name for f in feats]
        if layer.name not in names:
            return None
        i = names.index(layer.name) + offset
        return feats[i] if 0 <= i < len(feats) else None


class _FieldTracer(TorchFunctionMode):
    """Propagates receptive fields through every torch operation of one forward pass."""

    def __init__(self, input_tensor: torch.Tensor, on_activation=None):
        super().__init__()
        self.fields: dict[int, _Field] = {id(input_tensor): _Field()}
        self.keep: list[torch.Tensor] = [input_tensor]  # hold references so ids stay unique
        self.saw_merge = False
        self.saw_max_pool = False
        self.on_activation = on_activation  # called with (func, output) for a functional activation

    def field_of(self, tensor) -> _Field | None:
        return self.fields.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if "max_pool" in getattr(func, "__name__", ""):   # F.max_pool2d, its _with_indices, adaptive_max_pool2d
            self.saw_max_pool = True
        try:
            self._propagate(func, args, kwargs, out)
        except Exception:  # an op we cannot follow must never break the forward
            pass
        if self.on_activation is not None and isinstance(out, torch.Tensor):
            self.on_activation(func, out)
        return out

    def _propagate(self, func, args, kwargs, out) -> None:
        name = getattr(func, "__name__", "")
        if name == "__setitem__":  # x[...] = y writes y's dependency into x
            out = args[0]
        outputs = [o for o in (out if isinstance(out, tuple | list) else (out,)) if isinstance(o, torch.Tensor)]
        if not outputs:
            return
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list | tuple) for t in a if isinstance(t, torch.Tensor)]
        tracked = [t for t in tensors if id(t) in self.fields]
        if not tracked:
            return  # constants and parameters: no dependency on the input
        known = [self.fields[id(t)] for t in tracked]
        if len({id(f) for f in known}) > 1:
            self.saw_merge = True
        try:
            result = self._rule(name, args, kwargs, tracked, known, outputs[0])
        except Exception:  # an op we cannot follow: its outputs depend on the input in an unknown way
            result = _UNKNOWN
        for o in outputs:
            self.fields[id(o)] = result
            self.keep.append(o)

    @staticmethod
    def _rule(name, args, kwargs, tracked, known, out) -> _Field:
        if any(f.global_ or f.unknown for f in known):
            return _Field.union(known)
        source = tracked[0]
        field_in = known[0]
        standard = field_in.axes == (-2, -1) and source.dim() >= 3 and len(known) == 1
        if name == "conv2d" and standard:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            stride = _arg(args, kwargs, 3, "stride", 1)
            padding = _arg(args, kwargs, 4, "padding", 0)
            dilation = _arg(args, kwargs, 5, "dilation", 1)
            kernel = tuple(weight.shape[-2:])
            if isinstance(padding, str):
                padding = (0, 0) if padding == "valid" else tuple(
                    (d * (k - 1)) // 2 for k, d in zip(kernel, _pair(dilation)))
            return field_in.window(kernel, stride, padding, dilation)
        if ("max_pool2d" in name or name == "avg_pool2d") and standard:
            kernel = _arg(args, kwargs, 1, "kernel_size", None)
            stride = _arg(args, kwargs, 2, "stride", None) or kernel
            padding = _arg(args, kwargs, 3, "padding", 0)
            dilation = _arg(args, kwargs, 4, "dilation", 1) if "max" in name else 1
            return field_in.window(kernel, stride, padding, dilation)
        if name == "pad" and standard:
            pads = _arg(args, kwargs, 1, "pad", (0, 0))
            left = pads[0] if len(pads) > 0 else 0
            top = pads[2] if len(pads) > 2 else 0
            return field_in.pad(top, left)
        if name in ("permute", "transpose", "swapaxes", "swapdims") and len(known) == 1:
            n = source.dim()
            order = list(range(n))
            if name == "permute":
                dims = kwargs.get("dims", args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:])
                order = [int(d) % n for d in dims]
            else:
                d0, d1 = (int(d) % n for d in args[1:3])
                order[d0], order[d1] = order[d1], order[d0]
            axes = tuple(order.index(a % n) - n for a in field_in.axes)
            return _Field(field_in.jump, field_in.size, field_in.start, axes=axes)
        if name == "layer_norm":  # normalises the trailing dims: per position unless they include space
            ndims = len(_arg(args, kwargs, 1, "normalized_shape", ()))
            return _GLOBAL if any(a >= -ndims for a in field_in.axes) else field_in
        if name == "linear":  # mixes the last dimension
            return _GLOBAL if -1 in field_in.axes else field_in
        if name in _SPATIAL_MIXERS:
            return _GLOBAL
        if (name in _REDUCTIONS or name in _REORDERINGS) and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
            position = 2 if name in ("topk", "roll", "norm", "normalize") else 1
            dims = kwargs.get("dim", kwargs.get("dims", _arg(args, kwargs, position, "dim", None)))
            if dims is None:
                dims = (-1,) if name in ("sort", "argsort", "topk", "softmax", "log_softmax") else range(source.dim())
            dims = (dims,) if isinstance(dims, int) else tuple(dims)
            n = source.dim()
            if any(int(d) % n - n in field_in.axes for d in dims):
                return _GLOBAL if name in _REDUCTIONS else _UNKNOWN
        if ("conv" in name or "pool" in name or "fold" in name) and "adaptive" not in name:
            return _UNKNOWN  # a windowed op we cannot place (channels-last, input-dependent weights, 1-D/3-D)
        # Anything else is taken as elementwise (activations, norms over channels, residual adds,
        # broadcast multiplies, channel slicing) when every input's map has the output's size.
        result = _Field.union(known)
        if out.dim() < 3:
            return _GLOBAL  # space collapsed (flatten, pooling to a vector)
        spatial_out = tuple(out.shape[a] for a in result.axes) if not result.unknown else None
        if spatial_out is not None and all(
                t.dim() >= -min(f.axes) and tuple(t.shape[a] for a in f.axes) == spatial_out
                for t, f in zip(tracked, known)):
            return result
        # A resampling or reduction we do not model: global if it collapsed space, otherwise unknown.
        if spatial_out == (1, 1):
            return _GLOBAL
        return _UNKNOWN


def _arg(args, kwargs, position, key, default):
    if key in kwargs:
        return kwargs[key]
    return args[position] if len(args) > position else default


def _kind(module: nn.Module) -> str:
    if isinstance(module, CONV_TYPES):
        return "conv"
    if isinstance(module, ACT_TYPES):
        return "act"
    if isinstance(module, NORM_TYPES):
        return "norm"
    if isinstance(module, POOL_TYPES):
        return "pool"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, PASS_TYPES):
        return "pass"
    return "block" if len(list(module.children())) else "other"


@torch.no_grad()
def build_catalogue(model: nn.Module, input_size: tuple[int, int] = (224, 224), device: torch.device | str = "cpu") -> Catalogue:
    """Trace one forward pass of ``model`` at ``input_size = (H, W)`` and describe every layer.

    The model is left as it was (mode, hooks); see :func:`convscope.hooks.frozen`.
    """

    records: list[tuple[str, nn.Module | str, torch.Tensor]] = []  # module, or the caller's name for a call
    calls: dict = {}

    def make_hook(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                k = calls.get(name, 0)
                calls[name] = k + 1
                # turned inside the trace, so the tracer follows the permute to the (C, H, W) axes
                records.append((name if k == 0 else f"{name}@{k}", module, channels_first(model, output)))
        return hook

    def on_activation(func, output):
        fn, caller = functional_activation(func), stack.top
        if fn is None or caller is None or own_names:  # a model that names its layers (Keras) lists only those
            return
        k = calls.get((caller, fn), 0)
        calls[(caller, fn)] = k + 1
        records.append((functional_row(caller, fn, k), caller, output))

    own_names = hasattr(model, "convscope_layers")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, 3, *input_size, device=device, dtype=dtype)  # a float64 model gets a float64 probe
    handles = []
    modules = named_layers(model)
    with frozen(model):
        stack = ModuleStack(model, modules)
        try:
            for name, module in modules.items():
                handles.append(module.register_forward_hook(make_hook(name)))
            with _FieldTracer(x, on_activation) as tracer:
                model(x)
        finally:
            stack.remove()
            for h in handles:
                h.remove()

    records, activation_modules = _fold_activation_modules(records, modules)
    kind_of = getattr(model, "convscope_kind", None) or _kind
    layers, ids = [], []
    for index, (name, module, output) in enumerate(records):
        f = tracer.fields.get(id(output), _UNKNOWN)
        exact = not (f.global_ or f.unknown) and f.axes == (-2, -1) and output.dim() >= 3
        functional = isinstance(module, str)
        layers.append(LayerInfo(
            name=name, alias=None, type=f"F.{name.rpartition('.')[2].partition('@')[0]}" if functional
            else type(module).__name__, shape=tuple(output.shape[1:]),
            stride=f.jump if exact else None,
            rf_size=f.size if exact else None,
            rf_start=f.start if exact else None,
            kind="act" if functional or module in activation_modules else kind_of(module),
            is_feature=False, index=index,
            global_field=f.global_,
        ))
        ids.append(id(output))
    layers = _mark_features(layers, ids)
    if not tracer.saw_merge and not hasattr(model, "convscope_layers"):  # own names need no alias
        layers = _keras_aliases(layers)
    return Catalogue(layers, tuple(input_size), tracer.saw_max_pool)


def _fold_activation_modules(records: list, modules: dict[str, nn.Module]) -> tuple[list, set[nn.Module]]:
    """Drop the call rows that are a leaf module's whole output; those modules are activations.

    ``nn.ReLU`` and timm's ``GELU`` are leaf modules whose ``forward`` is one activation call:
    their own row already holds it.
    """
    outputs: dict[str, set[int]] = {}
    for name, module, output in records:
        if not isinstance(module, str) and not any(True for _ in module.children()):
            outputs.setdefault(parse_layer_name(name)[0], set()).add(id(output))
    kept, folded = [], set()
    for name, module, output in records:
        if isinstance(module, str) and id(output) in outputs.get(module, ()):
            folded.add(modules[module])
            continue
        kept.append((name, module, output))
    return kept, folded


def _mark_features(layers: list[LayerInfo], ids: list[int] | None = None) -> list[LayerInfo]:
    """Mark each conv's representative: its output after the norm and activation that follow it.

    Walks the completion order of modules and functional activation calls: after a conv,
    norms (timm's ``BatchNormAct2d`` is a norm that applies its activation itself, and
    completes after its children), activations (modules or ``F.relu``-style calls) and
    pass-through modules extend the chain, and so does a container whose output is the very
    tensor the chain ends on (``ids``: each row's output tensor id), as timm's stem
    ``Sequential`` before its ``bn1``/``act1``; anything else ends it. A 1x1 map that sees the
    whole image (a squeeze-excite gate vector) is not a feature layer.
    """
    chosen: set[str] = set()
    i = 0
    while i < len(layers):
        layer = layers[i]
        if layer.kind != "conv" or not layer.is_spatial:
            i += 1
            continue
        representative = layer
        j = i + 1
        while j < len(layers):
            nxt = layers[j]
            if nxt.kind in ("norm", "act", "pass") and nxt.shape == layer.shape:
                if nxt.kind != "pass":
                    representative = nxt
            elif not (ids is not None and nxt.kind in ("block", "other") and ids[j] == ids[j - 1]):
                break
            j += 1
        if not (representative.global_field and representative.shape[1:] == (1, 1)):
            chosen.add(representative.name)
        i = j
    return [_replace(layer, is_feature=layer.name in chosen) for layer in layers]


def _keras_aliases(layers: list[LayerInfo]) -> list[LayerInfo]:
    """Keras-style names (``block1_conv1`` … ``block5_pool``) for plain conv/pool chains like VGG.

    Only applied when the trace saw no merge of two branches (no residual adds), so the
    block numbering (one block per max-pool) means what it means in Keras.
    """
    block, conv, out = 1, 0, []
    saw_pool = False
    for layer in layers:
        alias = None
        if layer.is_feature:
            conv += 1
            alias = f"block{block}_conv{conv}"
        elif layer.kind == "pool" and layer.type.startswith("MaxPool"):
            alias = f"block{block}_pool"
            block, conv, saw_pool = block + 1, 0, True
        out.append(_replace(layer, alias=alias))
    return out if saw_pool else layers


def _replace(layer: LayerInfo, **changes) -> LayerInfo:
    from dataclasses import replace

    return replace(layer, **changes)


# ---------------------------------------------------------------------- layer-selection policies
