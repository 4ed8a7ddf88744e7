import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope
from convscope.errors import ConvscopeError
from convscope.hooks import frozen, recording

from .conftest import model_state


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_capture_leaves_no_hook_and_restores_modes(vgg19):
    module = vgg19.module
    module.train()
    module.features[0].weight.requires_grad_(False)
    before = model_state(module)
    try:
        convscope.capture(module, torch.randn(1, 3, 32, 32), ["features.1", "features.3"])
        assert model_state(module) == before
    finally:
        module.eval()
        module.features[0].weight.requires_grad_(True)


def test_hooks_removed_and_state_restored_when_forward_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _Boom()).train()
    before = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        convscope.capture(model, torch.randn(1, 3, 8, 8), ["0", "1"], stop_after_last=False)
    assert model_state(model) == before
    assert model.training


def test_inplace_relu_does_not_corrupt_captured_conv_output(vgg19):
    x = torch.randn(1, 3, 32, 32)
    out = convscope.capture(vgg19.module, x, ["features.0", "features.1"])
    expected = vgg19.module.features[0](x)
    assert (expected < 0).any()  # the conv output has negatives that the in-place ReLU would zero
    torch.testing.assert_close(out["features.0"], expected)
    torch.testing.assert_close(out["features.1"], expected.clamp(min=0))


def test_one_forward_stops_after_the_last_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _Boom())
    out = convscope.capture(model, torch.randn(1, 3, 8, 8), ["1"])  # never reaches _Boom
    assert out["1"].shape == (1, 4, 6, 6)


def test_frozen_restores_exact_previous_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].train()
    model[1].eval()
    model[1].weight.requires_grad_(False)
    before = model_state(model)
    with frozen(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
    assert model_state(model) == before


def test_recording_unknown_layer_suggests():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ConvscopeError, match="Did you mean"):
        with recording(model, ["00"]):
            pass


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        y = F.relu(self.conv(x))
        z = F.gelu(self.conv(x))
        return self.act(y).relu_() + z  # nn.ReLU's own F.relu is that module's row, not ours


def test_functional_activation_rows_are_recorded_per_caller_and_call():
    from convscope.layers import build_catalogue

    torch.manual_seed(0)
    model = _Functional().eval()
    x = torch.randn(1, 3, 8, 8)
    names = [layer.name for layer in build_catalogue(model, (8, 8))]
    assert [n for n in names if "@fn" in n] == ["relu@fn", "gelu@fn", "relu@fn1"]
    assert names.count("act") == 1  # a leaf module's own call is folded into its row
    before = model_state(model)
    out = convscope.capture(model, x, ["relu@fn", "gelu@fn", "relu@fn1"])
    conv = model.conv(x)
    torch.testing.assert_close(out["relu@fn"], conv.clamp(min=0))
    torch.testing.assert_close(out["gelu@fn"], F.gelu(conv))
    torch.testing.assert_close(out["relu@fn1"], conv.clamp(min=0))
    assert model_state(model) == before
    assert torch._C._len_torch_function_stack() == 0  # the mode left with the forward (it stopped early)
    with pytest.raises(ConvscopeError, match="unknown layer"):
        convscope.capture(model, x, ["nothere.relu@fn"])


def test_functional_rows_see_the_rule_of_the_callers_mode():
    from convscope.rectifiers import backward_rule

    torch.manual_seed(0)
    model = _Functional().eval()
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    with recording(model, ["relu@fn"], detach=False, clone=False) as store, backward_rule("deconvnet") as mode:
        model(x)
    assert mode.counts["relu"] == 3 and "RuleFunction" in type(store["relu@fn"].grad_fn).__name__
