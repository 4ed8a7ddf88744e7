"""Objectives: values against hand computations, the algebra, per-element channels, parsing."""

from __future__ import annotations

import pytest
import torch

from convscope.errors import ConvscopeError
from convscope.methods.features import objectives as obj


@pytest.fixture
def acts():
    torch.manual_seed(0)
    return {
        "conv": torch.randn(3, 4, 5, 6),
        obj.LOGITS: torch.randn(3, 10),
        obj.INPUT: torch.rand(3, 3, 8, 8),
    }


def test_channel_is_the_mean_of_one_channel_per_element(acts):
    t = acts["conv"]
    assert torch.allclose(obj.channel("conv", 2)(acts), t[:, 2].mean((1, 2)))
    per_element = obj.channel("conv", [0, 3, 1])(acts)
    expected = torch.stack([t[0, 0].mean(), t[1, 3].mean(), t[2, 1].mean()])
    assert torch.allclose(per_element, expected)
    assert obj.channel("conv", 2).layers == ("conv",)


def test_neuron_defaults_to_the_centre(acts):
    t = acts["conv"]  # 5x6 map: centre row 2, col 3
    assert torch.allclose(obj.neuron("conv", 1)(acts), t[:, 1, 2, 3])
    assert torch.allclose(obj.neuron("conv", 1, x=0, y=4)(acts), t[:, 1, 4, 0])
    with pytest.raises(ConvscopeError, match="outside"):
        obj.neuron("conv", 1, x=9)(acts)


def test_layer_class_and_penalties(acts):
    t, x = acts["conv"], acts[obj.INPUT]
    assert torch.allclose(obj.layer("conv")(acts), t.pow(2).mean((1, 2, 3)))
    assert torch.allclose(obj.class_logit([4, 0, 9])(acts), acts[obj.LOGITS][[0, 1, 2], [4, 0, 9]])
    assert obj.class_logit(3).layers == (obj.LOGITS,)
    tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
    assert torch.allclose(obj.total_variation()(acts), tv)
    assert torch.allclose(obj.l2()(acts), (x - 0.5).pow(2).mean((1, 2, 3)))
    assert obj.total_variation().layers == ()


def test_algebra_composes(acts):
    a, b = obj.channel("conv", 0), obj.channel("conv", 1)
    va, vb = a(acts), b(acts)
    assert torch.allclose((a + 0.5 * b)(acts), va + 0.5 * vb)
    assert torch.allclose((a - b)(acts), va - vb)
    assert torch.allclose((-a)(acts), -va)
    assert torch.allclose((a * b)(acts), va * vb)
    assert torch.allclose((a / 4)(acts), va / 4)
    assert torch.allclose((1 - a)(acts), 1 - va)
    assert torch.allclose((a + 2)(acts), va + 2)
    assert torch.allclose(sum([a, b])(acts), va + vb)
    combined = a + obj.class_logit(2) - 0.1 * obj.total_variation()
    assert set(combined.layers) == {"conv", obj.LOGITS}
    assert "channel(conv, 0)" in combined.name


def test_a_new_objective_is_one_short_function(acts):
    def channel_max(layer, n):
        return obj.Objective(lambda a: obj.pick(a[layer], n).amax((-2, -1)), [layer], f"channel_max({n})")

    assert torch.allclose(channel_max("conv", 3)(acts), acts["conv"][:, 3].amax((1, 2)))


def test_objectives_must_give_one_value_per_element(acts):
    scalar = obj.Objective(lambda a: a["conv"].mean(), ["conv"], "scalar")
    with pytest.raises(ConvscopeError, match="one value per batch element"):
        scalar(acts)
    with pytest.raises(ConvscopeError, match="one per element"):
        obj.channel("conv", [0, 1])(acts)


def test_diversity_pushes_apart_and_respects_groups():
    same = torch.ones(4, 2, 3, 3)
    same[:, 1] = 2.0
    value = obj.diversity("l")({"l": same})
    assert torch.allclose(value, torch.full((4,), -1.0))  # identical Gram matrices: similarity 1
    assert torch.allclose(obj.diversity("l", group_size=1)({"l": same}), torch.zeros(4))
    # with groups of 2, element 0's value depends on element 1 only, never on 2 or 3
    x = torch.rand(4, 2, 3, 3, requires_grad=True)
    v = obj.diversity("l", group_size=2)({"l": x})
    (grad,) = torch.autograd.grad(v[0], x)
    assert grad[2:].abs().sum() == 0 and grad[1].abs().sum() > 0


def test_parse_objective():
    assert obj.parse_objective("channel") == ("channel", None)
    assert obj.parse_objective("class:281") == ("class", [281])
    assert obj.parse_objective("class:281,285") == ("class", [281, 285])
    with pytest.raises(ConvscopeError, match="Did you mean: channel"):
        obj.parse_objective("chanel")
    with pytest.raises(ConvscopeError, match="class:N"):
        obj.parse_objective("class:")
