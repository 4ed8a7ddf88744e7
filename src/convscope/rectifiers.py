"""Backward rules at the rectifiers, one mechanism: deconvnet, guided backprop, gradient, redirected ReLU.

The three projection methods (Zeiler & Fergus 2013; Springenberg et al. 2014; Simonyan et al.
2013) differ only in what the backward pass does at a rectifier ``y = clamp(x, 0, high)``
(``high`` is ``inf`` for ReLU, 6 for ReLU6). With ``g`` the signal arriving from above:

=============  ==========================================  ======================================
method         backward at the rectifier                   reference
=============  ==========================================  ======================================
``deconvnet``  ``relu(g)``: the forward pass is ignored    Zeiler & Fergus, sec. 2.1 "Rectification"
``guided``     ``relu(g) * (0 < x < high)``                Springenberg et al., eq. (guided)
``gradient``   ``g * (0 < x < high)`` (plain autograd)     Simonyan et al., "saliency"
``redirected`` the plain gradient; where it is zero over    Lucid's ``redirected_relu_grad`` (Olah
               a whole image, ``g`` in the direction that   et al. 2017), for feature visualization
               brings ``x`` back into ``(0, high)``
=============  ==========================================  ======================================

Each rule is a :class:`Rule` value (:data:`DECONVNET`, :data:`GUIDED`, :data:`GRADIENT`,
:data:`REDIRECTED`) that also says how its maps are shown; a method name becomes a Rule once,
at the public call (:func:`resolve_projection`), and only the Rule travels further. A new rule
is one short subclass with a ``backward``.

For ReLU6 the forward mask is ``0 < x < 6``: the plain gradient of ``clamp(x, 0, 6)`` is zero
where the unit is saturated at either end, and guided backprop keeps that forward mask. The
deconvnet ignores the forward pass, so it is ``relu(g)`` for every rectifier. Everything else
in the backward pass is autograd: max-pooling passes the signal back through the recorded
switches (unpooling) and a convolution through its transposed filters, exactly the
deconvnet's other two steps (``tests/test_attribution.py`` proves both against an explicit
construction).

How the rule reaches every rectifier
------------------------------------
captum swaps the gradient of ``nn.ReLU`` *modules* only; a ``F.relu`` in ``forward``, an
``nn.ReLU6`` or a ``clamp(min=0)`` silently keeps the plain gradient. Here a
:class:`~torch.overrides.TorchFunctionMode` (:class:`RectifierMode`) is active during the
forward pass and replaces every relu-family call on the signal path by one autograd function
that carries the rule: ``nn.ReLU``/``nn.ReLU6`` modules (shared ones too, and in-place ones,
since they call ``F.relu``/``F.hardtanh``), timm's ``BatchNormAct2d``, ``F.relu``, ``F.relu_``,
``torch.relu``, ``Tensor.relu``, ``F.relu6``, ``F.hardtanh(x, 0, t)``, ``clamp``/``clip``/
``clamp_min`` with a lower bound of 0, and ``F.threshold(x, 0, 0)``.

Then :func:`audit_graph` walks the autograd graph from the layer back to the input and accepts
only operations whose backward is linear in the signal (convolution, linear, batch norm in
eval mode, pooling, padding, reshapes, sums, products with constants) and the rule's own
nodes. An in-place op on a view (``x[:, :k].sigmoid_()``) hides its own backward inside
autograd's ``CopySlices`` node; the mode records which op that was, and the audit judges the op,
not the wrapper (an unrecorded ``CopySlices`` counts as unknown). A rectifier the mode did not see (inside a TorchScript function or a custom autograd
function) always raises :class:`ConvscopeError`; so does, unless ``strict=False``,
a nonlinearity that has no deconvnet/guided rule (GELU, SiLU, sigmoid gates, ``maximum``,
``where``, a product of two signals, group/layer norm). Never a silently wrong answer.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConvscopeError, suggest

__all__ = [
    "Rule", "DECONVNET", "GUIDED", "GRADIENT", "REDIRECTED", "PROJECTIONS", "PROJECTION_NAMES",
    "resolve_projection", "RectifierMode", "backward_rule", "redirected_rectifiers", "redirected_clamp",
    "audit_graph", "check_scriptable",
]

# Names (without a trailing "_" for the in-place form) of torch functions that can be a rectifier.
_RECTIFIER_NAMES = frozenset({"relu", "relu6", "hardtanh", "clamp", "clip", "clamp_min", "threshold"})


def _plain(grad: torch.Tensor, y: torch.Tensor, low: float, high: float | None) -> torch.Tensor:
    """The ordinary gradient of ``clamp(x, low, high)``, by the fused kernels nn.ReLU / nn.ReLU6 use.

    ``y`` (the output) carries the forward mask: ``low < y < high`` exactly where ``low < x < high``,
    so rules need not keep the input alive (torch's own relu saves its result too).
    """
    if high is None:
        return torch.ops.aten.threshold_backward(grad, y, low)
    return torch.ops.aten.hardtanh_backward(grad, y, low, high)


class Rule:
    """What the backward pass does at a rectifier ``y = clamp(x, 0, high)``, and how its maps are shown.

    ``grad`` is the signal arriving from above, ``y`` the rectifier's output. A rule that
    ``intercepts`` nothing leaves autograd alone (the plain gradient).
    """

    name: ClassVar[str]
    title: ClassVar[str]  # for figures and pages
    display: ClassVar[Literal["signed", "magnitude"]] = "signed"  # magnitude: maps shown as |g| by default
    intercepts: ClassVar[bool] = True
    uses_forward: ClassVar[bool] = True  # False: the forward mask is ignored, nothing is saved
    audited: ClassVar[bool] = True  # the graph audit applies (projections); not for optimization aids

    def backward(self, grad: torch.Tensor, y: torch.Tensor | None, low: float, high: float | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<rule {self.name}>"

    def __reduce__(self):  # the module-level instances are singletons, also across processes
        return _rule_named, (self.name,)


class _Deconvnet(Rule):
    name, title = "deconvnet", "deconvnet"
    uses_forward = False

    def backward(self, grad, y, low, high):
        return grad.clamp(min=0)


class _Guided(Rule):
    name, title = "guided", "guided backprop"

    def backward(self, grad, y, low, high):
        return _plain(grad.clamp(min=0), y, low, high)


class _Gradient(Rule):
    name, title = "gradient", "gradient (saliency)"
    display = "magnitude"
    intercepts = False

    def backward(self, grad, y, low, high):
        return _plain(grad, y, low, high)


class _Redirected(Rule):
    """Lucid's redirected gradient, so units dead at the start of an optimization can come alive.

    A channel negative everywhere on the starting image sits behind a ReLU with zero gradient:
    plain gradient ascent never moves it. Per image (so an image's gradient never depends on the
    others in the batch), where the plain gradient through this rectifier is zero over the whole
    map, the signal passes in the direction that brings the input back into the active range.
    """

    name, title = "redirected", "redirected ReLU gradient"
    audited = False

    def backward(self, grad, y, low, high):
        plain = _plain(grad, y, low, high)
        if grad.dim() < 2:
            return plain
        # a reduction over the map's axes, not flatten(1), which copies a channels-last map
        blocked = plain.abs().amax(dim=tuple(range(1, plain.dim()))) == 0
        if not bool(blocked.any()):
            return plain
        idx = blocked.nonzero().squeeze(1)
        ys, gs = y[idx], grad[idx]
        # ``grad`` is d(loss)/d(output) for a loss that is minimised: grad > 0 pushes x down.
        wrong_way = (ys <= low) & (gs > 0)
        if high is not None:
            wrong_way |= (ys >= high) & (gs < 0)
        plain[idx] = gs.masked_fill(wrong_way, 0.0)
        return plain


DECONVNET: Rule = _Deconvnet()
GUIDED: Rule = _Guided()
GRADIENT: Rule = _Gradient()
REDIRECTED: Rule = _Redirected()
PROJECTIONS: tuple[Rule, ...] = (DECONVNET, GUIDED, GRADIENT)
PROJECTION_NAMES: tuple[str, ...] = tuple(rule.name for rule in PROJECTIONS)
_RULES = {rule.name: rule for rule in (*PROJECTIONS, REDIRECTED)}


def _rule_named(name: str) -> Rule:
    return _RULES[name]


def resolve_projection(method: str | Rule) -> Rule:
    """A projection method's :class:`Rule` from its name (or the Rule itself); the one place names are read."""
    if isinstance(method, Rule):
        return method
    for rule in PROJECTIONS:
        if method == rule.name:
            return rule
    raise ConvscopeError(f"unknown method {method!r}: use one of {', '.join(PROJECTION_NAMES)}."
                         f"{suggest(str(method), PROJECTION_NAMES)}")


class _RuleFunction(torch.autograd.Function):
    """``clamp(x, low, high)`` forward; the rule's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float | None, rule: Rule, inplace: bool = False):
        ctx.rule, ctx.low, ctx.high = rule, low, high
        if inplace:
            ctx.mark_dirty(x)
            y = x.clamp_(min=low, max=high)
        else:
            y = x.clamp(min=low, max=high)
        if rule.uses_forward:
            ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y = ctx.saved_tensors[0] if ctx.rule.uses_forward else None
        return ctx.rule.backward(grad, y, ctx.low, ctx.high), None, None, None, None


_RULE_NODE = f"{_RuleFunction.__name__}Backward"
_COPY_SLICES_KEY = "convscope_inplace_op"


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    return None


def _parse_rectifier(name: str, args: tuple, kwargs: dict):
    """``(x, low, high, inplace)`` when the call is a rectifier ``clamp(x, 0, high)``, else None."""
    name = name.lstrip("_")  # F.threshold is torch.nn.functional._threshold
    base = name.rstrip("_")
    inplace = name.endswith("_")
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    rest = args[1:]

    def arg(position: int, key: str, default=None):
        if key in kwargs:
            return kwargs[key]
        return rest[position] if len(rest) > position else default

    if base == "relu":
        low, high = 0.0, None
        inplace = inplace or bool(arg(0, "inplace", False))
    elif base == "relu6":
        low, high = 0.0, 6.0
        inplace = inplace or bool(arg(0, "inplace", False))
    elif base == "hardtanh":
        low, high = _number(arg(0, "min_val", -1.0)), _number(arg(1, "max_val", 1.0))
        inplace = inplace or bool(arg(2, "inplace", False))
        if high is None:
            return None
    elif base in ("clamp", "clip"):
        low, high_arg = _number(arg(0, "min")), arg(1, "max")
        high = _number(high_arg)
        if high_arg is not None and high is None:
            return None
    elif base == "clamp_min":
        low, high = _number(arg(0, "min")), None
    elif base == "threshold":
        if _number(arg(0, "threshold")) != 0.0 or _number(arg(1, "value")) != 0.0:
            return None
        low, high = 0.0, None
        inplace = inplace or bool(arg(2, "inplace", False))
    else:
        return None
    if not isinstance(x, torch.Tensor) or low != 0.0 or (high is not None and not high > 0.0):
        return None
    return x, low, high, inplace


def _kind(low: float, high: float | None) -> str:
    return "relu" if high is None else "relu6" if high == 6.0 else f"hardtanh(0, {high:g})"


class RectifierMode(TorchFunctionMode):
    """While active, every rectifier call on the signal path uses the backward of ``rule``.

    Only calls whose input requires grad while grad mode is on are replaced; anything else
    (constants, ``no_grad`` code) runs unchanged. ``counts`` counts the replaced calls by kind
    (``relu``, ``relu6``, ``hardtanh(0, t)``). Use it through :func:`backward_rule`.
    """

    def __init__(self, rule: Rule):
        super().__init__()
        self.rule = rule
        self.counts: Counter[str] = Counter()

    @property
    def replaced(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        # Only audited rules need to know what an in-place op on a view was (see audit_graph).
        target = args[0] if self.rule.audited and args and isinstance(args[0], torch.Tensor) else None
        before = _root_node(target)
        if name.strip("_") in _RECTIFIER_NAMES:
            parsed = _parse_rectifier(name, args, kwargs)
            if parsed is not None and parsed[0].requires_grad:
                x, low, high, inplace = parsed
                self.counts[_kind(low, high)] += 1
                # In-place calls stay in place (callers may keep using x), as torch's own relu_ does.
                result = _RuleFunction.apply(x, low, high, self.rule, inplace)
                _tag_copy_slices(target, before, _RULE_NODE)
                return result
        result = func(*args, **kwargs)
        _tag_copy_slices(target, before, _inplace_kind(name, args, kwargs))
        return result


def _root_node(tensor: torch.Tensor | None):
    """The grad_fn of the storage's owner: where autograd puts CopySlices for an in-place op on a view."""
    if tensor is None:
        return None
    root = tensor._base if tensor._is_view() else tensor
    return root.grad_fn


def _tag_copy_slices(target: torch.Tensor | None, before, kind: str) -> None:
    # An in-place op on a view hides its own backward inside a new CopySlices node, which
    # Python cannot open; the node's metadata keeps what that op was for audit_graph.
    node = _root_node(target)
    if node is not None and node is not before and type(node).__name__ == "CopySlices":
        node.metadata[_COPY_SLICES_KEY] = kind


# In-place ops whose backward is linear in the signal (a product only with constants).
_LINEAR_INPLACE = frozenset({"add", "sub", "mul", "div", "neg", "copy", "zero", "fill", "setitem",
                             "iadd", "isub", "imul", "itruediv", "index_copy", "index_add"})


def _inplace_kind(name: str, args: tuple, kwargs: dict) -> str:
    """``"linear"`` for an in-place op that is linear in the signal, else the op's name."""
    base = name.strip("_")
    signals = sum(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args[1:], *kwargs.values()))
    if base in ("mul", "imul", "div", "itruediv") and signals:
        return name  # a product or quotient of two signals
    return "linear" if base in _LINEAR_INPLACE else name


@contextlib.contextmanager
def backward_rule(rule: str | Rule) -> Iterator[RectifierMode | None]:
    """Apply ``rule`` to every rectifier of the forward passes run inside; removed on exit.

    A rule that intercepts nothing (:data:`GRADIENT`) yields ``None`` and leaves autograd alone.

    Example:
        >>> with backward_rule("guided"):
        ...     y = model(x.requires_grad_())
        >>> audit_graph(y, "guided")      # raises if some nonlinearity escaped the rule
        >>> y[0, 7].backward()            # x.grad is the guided-backprop projection
    """
    rule = rule if isinstance(rule, Rule) else _RULES.get(rule) or resolve_projection(rule)
    if not rule.intercepts:
        yield None
        return
    mode = RectifierMode(rule)
    with mode:
        yield mode


def redirected_rectifiers() -> RectifierMode:
    """Context manager: every ReLU/ReLU6 run inside it backpropagates Lucid's redirected gradient.

    Example:
        >>> with redirected_rectifiers() as mode:
        ...     loss = -model(x)[:, 3].sum()
        >>> loss.backward(); mode.counts
        Counter({'relu6': 33})
    """
    return RectifierMode(REDIRECTED)


def redirected_clamp(x: torch.Tensor, low: float = 0.0, high: float | None = None) -> torch.Tensor:
    """ReLU (``high=None``) or ReLU6 (``high=6``) with the redirected gradient."""
    return _RuleFunction.apply(x, low, high, REDIRECTED, False)

def check_scriptable(module: nn.Module, rule: Rule) -> None:
    """Refuse TorchScript modules: their layers cannot be hooked and their rectifiers are invisible."""
    for name, sub in module.named_modules():
        if isinstance(sub, torch.jit.ScriptModule):
            where = f" (submodule {name!r})" if name else ""
            raise ConvscopeError(
                f"the model is TorchScript{where}: convscope can neither hook its layers nor see its rectifiers "
                f"to apply the {rule.name} rule. Load the Python nn.Module instead."
            )


# Backward nodes whose signal path is linear given the forward pass (the pooling switches and
# batch-norm statistics of eval mode are fixed), named without their version suffix.
_LINEAR_NODES = frozenset({
    "AccumulateGrad", "Convolution", "ConvolutionBackwardOverrideable", "CudnnConvolution", "MkldnnConvolution",
    "SlowConv2D", "ConvDepthwise2D", "Addmm", "Mm", "Bmm", "Baddbmm", "Linear", "Matmul",
    "Add", "Sub", "Neg", "Sum", "Mean", "NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm",
    "NativeBatchNormLegitNoTraining", "BatchNormWithUpdate", "BatchNormNoUpdate",
    "MaxPool2DWithIndices", "MaxPool3DWithIndices", "MaxPool1DWithIndices", "AdaptiveMaxPool2D",
    "AdaptiveMaxPool1D", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "Max", "Amax",
    "View", "UnsafeView", "Reshape", "ReshapeAlias", "Permute", "Transpose", "T", "Expand", "Squeeze",
    "Unsqueeze", "Slice", "Select", "Index", "Cat", "Stack", "Split", "SplitWithSizes", "Unbind", "Clone",
    "ToCopy", "Copy", "CopyBackwards", "ConstantPadNd", "ReflectionPad2D", "ReplicationPad2D",
    "AsStrided", "Alias", "Flatten", "Narrow", "UpsampleNearest2D", "UpsampleBilinear2D", "PixelShuffle",
    "PixelUnshuffle", "Roll", "Flip", "Repeat", "Contiguous", "BackwardHookFunction", "Identity",
})
# A product is linear in the signal only when at most one operand carries it.
_PRODUCT_NODES = frozenset({"Mul", "Div"})
_RECTIFIER_NODES = frozenset({"Relu", "Hardtanh", "Clamp", "ClampMin", "Threshold"})


def _node_kind(node) -> str:
    name = type(node).__name__
    if name.startswith(_RULE_NODE):
        return "rule"
    if name == "CopySlices":
        # The in-place op it wraps was recorded by RectifierMode; an unrecorded one is unknown.
        wrapped = node.metadata.get(_COPY_SLICES_KEY)
        return "rule" if wrapped == _RULE_NODE else "linear" if wrapped == "linear" else "other"
    base = re.sub(r"(Backward\d*|\d+)$", "", name)
    base = re.sub(r"Backward$", "", base)
    if base in _LINEAR_NODES:
        return "linear"
    if base in _PRODUCT_NODES:
        signals = sum(fn is not None for fn, _ in node.next_functions)
        if base == "Div" and len(node.next_functions) > 1 and node.next_functions[1][0] is not None:
            return "other"  # the signal in a denominator
        return "linear" if signals <= 1 else "other"
    if base in _RECTIFIER_NODES:
        return "missed"
    return "other"


def _node_label(node) -> str:
    name = type(node).__name__
    if name == "CopySlices":
        wrapped = node.metadata.get(_COPY_SLICES_KEY)
        return f"CopySlices({wrapped or 'an in-place op on a view'})"
    return name


def audit_graph(output: torch.Tensor, rule: str | Rule, *, strict: bool = True) -> dict[str, int]:
    """Check that ``rule`` holds on the whole backward path of ``output``.

    Returns the count of node types backpropagated plainly without a rule (empty when all
    is covered; only non-empty with ``strict=False``). Raises :class:`ConvscopeError` for a
    rectifier that escaped the rule, and with ``strict`` for any other nonlinearity.
    """
    rule = resolve_projection(rule)
    if not (rule.intercepts and rule.audited) or output.grad_fn is None:
        return {}
    missed: Counter[str] = Counter()
    other: Counter[str] = Counter()
    rules = 0
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        kind = _node_kind(node)
        if kind == "missed":
            missed[type(node).__name__] += 1
        elif kind == "other":
            other[_node_label(node)] += 1
        elif kind == "rule":
            rules += 1
        stack.extend(fn for fn, _ in node.next_functions)
    if missed:
        names = ", ".join(f"{n} x{k}" for n, k in missed.items())
        raise ConvscopeError(
            f"the {rule.name} rule could not reach every rectifier: the backward path still has plain {names}. "
            "They were called in a way convscope cannot intercept (inside a TorchScript function or a custom "
            "autograd.Function). Use method 'gradient', or write those activations with nn.ReLU or F.relu."
        )
    if other and strict:
        names = ", ".join(f"{n} x{k}" for n, k in sorted(other.items()))
        raise ConvscopeError(
            f"the path to this layer goes through operations with no {rule.name} rule: {names}. Only ReLU-family "
            "rectifiers have a deconvnet/guided backward; these would be backpropagated plainly. Use method "
            "'gradient', or pass strict=False (CLI: --not-strict) to backpropagate them plainly, as captum does."
        )
    return dict(other)

