"""Which projection rule to use: the ``auto`` rule, one definition for deconv, scan and the atlas.

``"auto"`` is Zeiler & Fergus's deconvnet for a model with max-pooling, guided backprop
otherwise: the deconvnet's rectifier rule ignores the forward pass, so without max-pooling
switches a unit's deconvnet projection is the same picture for every image (only shifted with
the unit's position). Guided backprop keeps the forward masks. Both rules are defined only for
ReLU-family rectifiers; where another nonlinearity (Hardswish, GELU, SiLU, a gate) lies on a
layer's path, the plain gradient is used instead and the reason says so.
"""

from __future__ import annotations

import contextlib
import re

import torch

from ...errors import ConvscopeError
from ...hooks import StopForward, frozen, recording
from ...layers import LayerInfo
from ...models import LoadedModel
from ...rectifiers import (
    DECONVNET,
    GRADIENT,
    GUIDED,
    PROJECTION_NAMES,
    Rule,
    audit_graph,
    backward_rule,
    resolve_projection,
)

__all__ = ["AUTO", "PROJECTION_CHOICES", "projection_method", "choose_projection", "has_max_pooling"]

AUTO = "auto"
# What --method / method= accept where a single projection rule is used.
PROJECTION_CHOICES = (AUTO, *PROJECTION_NAMES)

_RULE_LABELS = {"deconvnet": "the deconvnet", "guided": "guided backprop"}


def has_max_pooling(loaded: LoadedModel) -> bool:
    """Whether ``loaded`` has max-pooling, whose switches make the deconvnet's projection image-specific:
    any max-pooling op (an ``nn.MaxPool2d``'s or a functional ``F.max_pool2d``) the catalogue's trace saw."""
    return loaded.catalogue.max_pooling


def projection_method(loaded: LoadedModel, requested: str | Rule = AUTO) -> Rule:
    """``requested`` as a Rule; ``"auto"`` is the deconvnet for a model with max-pooling, else guided backprop."""
    if requested == AUTO:
        return DECONVNET if has_max_pooling(loaded) else GUIDED
    return resolve_projection(requested)


def choose_projection(loaded: LoadedModel, layer: LayerInfo, requested: str | Rule = AUTO, *,
                      strict: bool = True) -> tuple[Rule, str | None]:
    """The projection rule for ``layer``, and why it is not the requested one (None when it is).

    ``requested`` is resolved as in :func:`projection_method`. The deconvnet and guided rules are
    defined only for ReLU-family rectifiers: one small forward pass to ``layer`` under the rule,
    audited with :func:`~convscope.rectifiers.audit_graph`, finds any other nonlinearity on the
    path. There the plain gradient (:data:`GRADIENT`) is used instead, with the reason, e.g.
    ``"Hardswish on the path; guided backprop undefined there"``. With ``strict=False`` such
    nonlinearities are backpropagated plainly under the rule instead (the reason says so).
    """
    rule = projection_method(loaded, requested)
    if rule is GRADIENT or not rule.intercepts:
        return rule, None
    return _audit_choice(loaded, layer, rule, strict)


def _audit_choice(loaded: LoadedModel, layer: LayerInfo, rule: Rule, strict: bool) -> tuple[Rule, str | None]:
    label = _RULE_LABELS.get(rule.name, rule.name)
    size = loaded.preprocessing.input_size
    x = torch.randn((1, 3, *size), generator=torch.Generator().manual_seed(0)).to(loaded.device)
    try:
        with frozen(loaded.module), torch.enable_grad():
            x.requires_grad_(True)
            with recording(loaded.module, [layer.name], clone=True, detach=False, stop_after_last=True) as store:
                with backward_rule(rule), contextlib.suppress(StopForward):
                    loaded.module(x)
            output = store.get(layer.name) if layer.name in store else None
            if output is None or output.grad_fn is None:
                return rule, None  # project_units reports it
            other = audit_graph(output, rule, strict=False)
    except ConvscopeError:  # a rectifier the rule cannot reach (TorchScript, a custom autograd.Function)
        return GRADIENT, f"a rectifier on the path that the {rule.name} rule cannot reach; {label} undefined there"
    if not other:
        return rule, None
    names = ", ".join(sorted({_op_name(n) for n in other}))
    if not strict:
        return rule, f"{names} on the path, backpropagated plainly (--not-strict); {label} elsewhere"
    return GRADIENT, f"{names} on the path; {label} undefined there"


def _op_name(node: str) -> str:
    """``HardswishBackward0`` -> ``Hardswish``; ``CopySlices(...)`` kept."""
    return re.sub(r"Backward\d*$", "", node)
