"""Redirected rectifier gradients, so units that are dead at the start can come alive.

A channel that is negative everywhere on the starting image sits behind a ReLU with zero
gradient: plain gradient ascent never moves it. Lucid's fix (``redirected_relu_grad``,
used for the first 16 steps) lets the gradient through a rectifier that blocks it, but only
in the direction that brings the input back into the active range, and only for an image
whose gradient through that rectifier is otherwise zero everywhere. ReLU6 gets the same
rule at both ends (below 0 and above 6).

:func:`redirected_rectifiers` applies the rule to every ReLU and ReLU6 that runs inside it:
modules (``nn.ReLU``, ``nn.ReLU6``, timm's ``BatchNormAct2d`` activation) and functional calls
(``F.relu``, ``torch.relu``, ``Tensor.relu``, ``F.relu6``, ``F.hardtanh(x, 0, 6)``), in-place or not.
It is a :class:`~torch.overrides.TorchFunctionMode`: nothing is attached to the model, and
leaving the block restores normal behaviour. Rectifiers written as ``clamp(min=0)`` or in
compiled code (TorchScript) are not seen; :attr:`RedirectedRectifiers.counts` tells which
were.

The decision is per batch element (Lucid takes the norm per element), so an image's gradient
never depends on the other images in the batch.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["redirected_rectifiers", "RedirectedRectifiers", "redirected_clamp"]


class _RedirectedClamp(torch.autograd.Function):
    """``clamp(x, low, high)`` forward; Lucid's redirected gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.low, ctx.high = low, high
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        # the ordinary gradient, by the same fused kernels nn.ReLU / nn.ReLU6 use
        if ctx.high is None:
            plain = torch.ops.aten.threshold_backward(grad, x, ctx.low)
        else:
            plain = torch.ops.aten.hardtanh_backward(grad, x, ctx.low, ctx.high)
        if grad.dim() < 2:
            return plain, None, None
        # Per image: the redirected gradient only where the plain one is zero over the whole map.
        blocked_images = torch.count_nonzero(plain.flatten(1), dim=1) == 0
        if not bool(blocked_images.any()):
            return plain, None, None
        idx = blocked_images.nonzero().squeeze(1)
        xs, gs = x[idx], grad[idx]
        # ``grad`` is d(loss)/d(output) for a loss that is minimised: grad > 0 pushes x down.
        wrong_way = (xs <= ctx.low) & (gs > 0)
        if ctx.high is not None:
            wrong_way |= (xs >= ctx.high) & (gs < 0)
        plain[idx] = gs.masked_fill(wrong_way, 0.0)
        return plain, None, None


def redirected_clamp(x: torch.Tensor, low: float = 0.0, high: float | None = None) -> torch.Tensor:
    """ReLU (``high=None``) or ReLU6 (``high=6``) with the redirected gradient."""
    return _RedirectedClamp.apply(x, low, high)


class RedirectedRectifiers(TorchFunctionMode):
    """The mode behind :func:`redirected_rectifiers`; ``counts`` records each rectifier call it caught."""

    _RELU = {F.relu, torch.relu, torch.Tensor.relu}
    _RELU_INPLACE = {torch.relu_, torch.Tensor.relu_, getattr(F, "relu_", None)} - {None}
    _HARDTANH = {F.hardtanh, getattr(F, "hardtanh_", None)} - {None}

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._RELU:
            return self._apply("relu", args[0], 0.0, None, explicit_inplace=False)
        if func in self._RELU_INPLACE:
            return self._apply("relu", args[0], 0.0, None, explicit_inplace=True)
        if func is F.relu6:
            return self._apply("relu6", args[0], 0.0, 6.0, explicit_inplace=False)
        if func in self._HARDTANH:
            low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
            if low == 0.0:  # hardtanh(0, t) is a rectifier: nn.ReLU6 is hardtanh(0, 6)
                kind = "relu6" if high == 6.0 else f"hardtanh(0, {high:g})"
                return self._apply(kind, args[0], 0.0, float(high), explicit_inplace=func is not F.hardtanh)
        return func(*args, **kwargs)

    def _apply(self, kind: str, x: torch.Tensor, low: float, high: float | None, explicit_inplace: bool):
        self.counts[kind] += 1
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x.clamp_(low, high) if explicit_inplace else x.clamp(low, high)
        if explicit_inplace:
            # ``x.relu_()`` may be called for its side effect: write the result back into x,
            # from a copy so the rule still sees the values before the write.
            return x.copy_(redirected_clamp(x.clone(), low, high))
        # ``inplace=True`` as an argument (nn.ReLU(inplace=True), timm's activations) is honoured
        # out of place: those callers use the returned tensor.
        return redirected_clamp(x, low, high)


def redirected_rectifiers() -> RedirectedRectifiers:
    """Context manager: every ReLU/ReLU6 run inside it back-propagates Lucid's redirected gradient.

    Example:
        >>> with redirected_rectifiers() as mode:
        ...     loss = -model(x)[:, 3].sum()
        >>> loss.backward(); mode.counts
        Counter({'relu6': 33})
    """
    return RedirectedRectifiers()
