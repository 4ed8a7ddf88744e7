"""The redirected ReLU/ReLU6 gradient against hand-computed values, and its reach and removal."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convscope.rectifiers import redirected_clamp, redirected_rectifiers

from .conftest import model_state


def _grad(fn, x, upstream):
    x = x.clone().requires_grad_(True)
    fn(x).backward(upstream)
    return x.grad


def test_plain_gradient_while_any_unit_of_the_image_passes():
    x = torch.tensor([[-1.0, 2.0, 7.0, 3.0]])
    up = torch.tensor([[-1.0, -1.0, -1.0, 1.0]])  # d(loss)/d(out); -1 = "raise this unit"
    assert torch.equal(_grad(lambda t: redirected_clamp(t, 0.0, 6.0), x, up), torch.tensor([[0.0, -1.0, 0.0, 1.0]]))


def test_redirected_gradient_for_an_image_blocked_everywhere():
    # image 0: every unit below 0 or above 6, so the plain ReLU6 gradient is zero everywhere
    # image 1: one unit passes, so it keeps the plain gradient
    x = torch.tensor([[-1.0, -2.0, 7.0, 8.0], [-1.0, 2.0, 7.0, -3.0]])
    up = torch.tensor([[-1.0, 1.0, 1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]])
    grad = _grad(lambda t: redirected_clamp(t, 0.0, 6.0), x, up)
    # -1 at x=-1 raises it back toward the range: kept; +1 at x=-2 would push lower: zeroed;
    # +1 at x=7 lowers it toward the range: kept; -1 at x=8 would push higher: zeroed.
    assert torch.equal(grad[0], torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(grad[1], torch.tensor([0.0, -1.0, 0.0, 0.0]))
    relu = _grad(lambda t: redirected_clamp(t, 0.0, None), torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, 1.0]]))
    assert torch.equal(relu, torch.tensor([[-1.0, 0.0]]))


def test_catches_modules_functional_and_inplace_rectifiers():
    x0 = torch.full((1, 3), -1.0)
    up = torch.full((1, 3), -1.0)
    calls = {
        "nn.ReLU6(inplace)": lambda t: nn.ReLU6(inplace=True)(t * 1),
        "nn.ReLU(inplace)": lambda t: nn.ReLU(inplace=True)(t * 1),
        "F.relu": F.relu,
        "torch.relu": torch.relu,
        "Tensor.relu": lambda t: t.relu(),
        "Tensor.relu_": lambda t: (t * 1).relu_(),
        "F.relu6": F.relu6,
        "F.hardtanh(0, 6)": lambda t: F.hardtanh(t, 0.0, 6.0),
    }
    for name, fn in calls.items():
        assert _grad(fn, x0, up).abs().sum() == 0, name  # normal behaviour outside the block
        with redirected_rectifiers() as mode:
            x = x0.clone().requires_grad_(True)
            out = fn(x)
        assert torch.equal(out.detach(), torch.zeros(1, 3)), name
        out.backward(up)
        assert torch.equal(x.grad, -torch.ones(1, 3)), name
        assert sum(mode.counts.values()) == 1, name
    # a hardtanh that is not a rectifier is left alone
    with redirected_rectifiers() as mode:
        F.hardtanh(x0)
    assert not mode.counts


def test_covers_the_default_models_relu6_and_leaves_nothing_behind(default_model):
    module = default_model.module
    before = model_state(module)
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    with redirected_rectifiers() as mode:
        out = module(default_model.preprocessing.normalize(x))
    out[0, 3].backward()
    assert mode.counts["relu6"] >= 30  # every BatchNormAct2d's ReLU6 in EfficientNet-Lite0
    assert model_state(module) == before
    assert not any(isinstance(t, type(mode)) for t in torch.overrides._get_current_function_mode_stack())
