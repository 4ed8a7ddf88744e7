"""Backward rules for the rectifiers: deconvnet, guided backprop and the plain gradient, one mechanism.

The three projection methods (Zeiler & Fergus 2013; Springenberg et al. 2014; Simonyan et al.
2013) differ only in what the backward pass does at a rectifier ``y = clamp(x, 0, high)``
(``high`` is ``inf`` for ReLU, 6 for ReLU6). With ``g`` the signal arriving from above:

=============  ==========================================  ======================================
method         backward at the rectifier                   reference
=============  ==========================================  ======================================
``deconvnet``  ``relu(g)``: the forward pass is ignored    Zeiler & Fergus, sec. 2.1 "Rectification"
``guided``     ``relu(g) * (0 < x < high)``                Springenberg et al., eq. (guided)
``gradient``   ``g * (0 < x < high)`` (plain autograd)     Simonyan et al., "saliency"
=============  ==========================================  ======================================

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
:class:`~torch.overrides.TorchFunctionMode` (:class:`RectifierRule`) is active during the
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
from typing import Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConvscopeError

__all__ = [
    "METHODS", "Method", "RectifierRule", "RuleFunction", "backward_rule", "audit_graph", "check_scriptable",
]

Method = Literal["deconvnet", "guided", "gradient"]
METHODS: tuple[str, ...] = ("deconvnet", "guided", "gradient")

# Names (without a trailing "_" for the in-place form) of torch functions that can be a rectifier.
_RECTIFIER_NAMES = frozenset({"relu", "relu6", "hardtanh", "clamp", "clip", "clamp_min", "threshold"})


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConvscopeError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return method


class RuleFunction(torch.autograd.Function):
    """``clamp(x, low, high)`` forward; the backward of ``rule`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float | None, rule: str, inplace: bool = False) -> torch.Tensor:
        ctx.rule, ctx.low, ctx.high = rule, low, high
        if inplace:
            ctx.mark_dirty(x)
            y = x.clamp_(min=low, max=high)
        else:
            y = x.clamp(min=low, max=high)
        if rule != "deconvnet":
            # The output carries the forward mask: low < y < high exactly where low < x < high.
            # (torch's own relu saves its result too.)
            ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.rule == "deconvnet":
            return grad.clamp(min=0), None, None, None, None
        (y,) = ctx.saved_tensors
        signal = grad.clamp(min=0) if ctx.rule == "guided" else grad
        # torch's fused backward kernels apply the mask: zero where y <= low (or y >= high)
        if ctx.high is None:
            out = torch.ops.aten.threshold_backward(signal, y, ctx.low)
        else:
            out = torch.ops.aten.hardtanh_backward(signal, y, ctx.low, ctx.high)
        return out, None, None, None, None


_RULE_NODE = f"{RuleFunction.__name__}Backward"
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


class RectifierRule(TorchFunctionMode):
    """While active, every rectifier call on the signal path uses the backward of ``rule``.

    Only calls whose input requires grad while grad mode is on are replaced; anything else
    (constants, ``no_grad`` code) runs unchanged. ``replaced`` counts the replaced calls.
    Use it through :func:`backward_rule`.
    """

    def __init__(self, rule: str):
        super().__init__()
        self.rule = check_method(rule)
        self.replaced = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        before = _root_node(target)
        if name.strip("_") in _RECTIFIER_NAMES:
            parsed = _parse_rectifier(name, args, kwargs)
            if parsed is not None and parsed[0].requires_grad:
                x, low, high, inplace = parsed
                self.replaced += 1
                # In-place calls stay in place (callers may keep using x), as torch's own relu_ does.
                result = RuleFunction.apply(x, low, high, self.rule, inplace)
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
def backward_rule(rule: str) -> Iterator[RectifierRule]:
    """Apply ``rule`` to every rectifier of the forward passes run inside; removed on exit.

    Example:
        >>> with backward_rule("guided"):
        ...     y = model(x.requires_grad_())
        >>> audit_graph(y)                # raises if some nonlinearity escaped the rule
        >>> y[0, 7].backward()            # x.grad is the guided-backprop projection
    """
    mode = RectifierRule(rule)
    with mode:
        yield mode


def check_scriptable(module: nn.Module, method: str) -> None:
    """Refuse TorchScript modules: their layers cannot be hooked and their rectifiers are invisible."""
    for name, sub in module.named_modules():
        if isinstance(sub, torch.jit.ScriptModule):
            where = f" (submodule {name!r})" if name else ""
            raise ConvscopeError(
                f"the model is TorchScript{where}: convscope can neither hook its layers nor see its rectifiers "
                f"to apply the {method} rule. Load the Python nn.Module instead."
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
        # The in-place op it wraps was recorded by RectifierRule; an unrecorded one is unknown.
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


def audit_graph(output: torch.Tensor, method: str, *, strict: bool = True) -> dict[str, int]:
    """Check that ``method``'s rule holds on the whole backward path of ``output``.

    Returns the count of node types backpropagated plainly without a rule (empty when all
    is covered; only non-empty with ``strict=False``). Raises :class:`ConvscopeError` for a
    rectifier that escaped the rule, and with ``strict`` for any other nonlinearity.
    """
    if method == "gradient" or output.grad_fn is None:
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
            f"the {method} rule could not reach every rectifier: the backward path still has plain {names}. "
            "They were called in a way convscope cannot intercept (inside a TorchScript function or a custom "
            "autograd.Function). Use method 'gradient', or write those activations with nn.ReLU or F.relu."
        )
    if other and strict:
        names = ", ".join(f"{n} x{k}" for n, k in sorted(other.items()))
        raise ConvscopeError(
            f"the path to this layer goes through operations with no {method} rule: {names}. Only ReLU-family "
            "rectifiers have a deconvnet/guided backward; these would be backpropagated plainly. Use method "
            "'gradient', or pass strict=False (CLI: --not-strict) to backpropagate them plainly, as captum does."
        )
    return dict(other)

