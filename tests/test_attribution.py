"""The backward rules: hand-computed values, explicit Zeiler & Fergus constructions, captum, coverage.

Every expected value here is computed without the code under test: by hand, by an explicit
deconvnet (MaxUnpool2d with the recorded switches, relu, conv_transpose2d) written without
autograd, or by captum where captum is a valid reference (models that rectify with nn.ReLU).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope
from convscope.errors import ConvscopeError
from convscope.methods.deconv import Unit, project_units, strongest_units
from convscope.rectifiers import audit_graph, backward_rule

from .conftest import model_state

METHODS = ("deconvnet", "guided", "gradient")


def _close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    scale = max(float(np.abs(expected).max()), 1e-12)
    err = float(np.abs(actual - expected).max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"


# --------------------------------------------------------------------------- a tiny net by hand


class Tiny(nn.Module):
    """conv (1x1, 2 channels: x and -x) → relu → maxpool 2x2 → conv (1x2 kernel) → one output unit."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(2, 1, (1, 2), bias=False)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[0, 0] = 1.0
            self.conv1.weight[1, 0] = -1.0
            self.conv2.weight.copy_(torch.tensor([[[[1.0, -1.0]], [[-2.0, 4.0]]]]))

    def forward(self, x):
        return self.conv2(self.pool(self.relu(self.conv1(x))))


TINY_INPUT = [[1.0, -3.0, 1.0, 2.0], [2.0, 0.5, 0.5, 3.0]]
# By hand: conv1 gives ch0 = x, ch1 = -x. After relu and 2x2 pooling the switches are
# ch0: (1,0) and (1,3); ch1: (0,1) and (0,2) (the right window of ch1 is all zero: the first
# position wins). Pooled ch0 = [2, 3], ch1 = [3, 0]; output 1*2 - 1*3 - 2*3 + 4*0 = -7.
# Backward of a 1 at the output: pooled signal ch0 = [1, -1], ch1 = [-2, 4], unpooled to the
# switches. Pre-activations there: ch0 2 > 0, 3 > 0; ch1 3 > 0, -1 < 0.
#   gradient : ch0 (1,0)=1 (1,3)=-1; ch1 (0,1)=-2 (0,2)=0 (masked)
#   deconvnet: relu(signal): ch0 (1,0)=1; ch1 (0,2)=4
#   guided   : relu(signal) * mask: ch0 (1,0)=1 only
# conv1 backward: dx = signal_ch0 - signal_ch1.
TINY_EXPECTED = {
    "gradient": [[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, -1.0]],
    "deconvnet": [[0.0, 0.0, -4.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
    "guided": [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
}


@pytest.mark.parametrize("method", METHODS)
def test_tiny_net_matches_hand_computed_values(method):
    net = Tiny().eval()
    x = torch.tensor(TINY_INPUT)[None, None].requires_grad_(True)
    with backward_rule(method) if method != "gradient" else torch.enable_grad():
        y = net(x)
    assert float(y.detach()) == -7.0
    audit_graph(y, method)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad[0, 0].tolist() == TINY_EXPECTED[method]


@pytest.mark.parametrize("method", METHODS)
def test_tiny_net_through_project_units(method):
    net = Tiny(in_channels=3).eval()
    x = torch.zeros(1, 3, 2, 4)
    x[0, 0] = torch.tensor(TINY_INPUT)
    p = project_units(net, x, "conv2", [Unit(0, 0, 0)], method=method)
    assert p.values.tolist() == [-7.0]
    assert p.maps.shape == (1, 2, 4, 3)
    assert p.maps[0, :, :, 0].tolist() == TINY_EXPECTED[method]
    assert not p.maps[0, :, :, 1:].any()
    assert p.boxes == [(0, 0, 2, 4)] and p.clipped == [False]


def test_rule_on_relu6_uses_the_open_mask():
    """ReLU6: guided and gradient pass only where 0 < x < 6; the deconvnet ignores the forward pass."""
    x = torch.tensor([-1.0, 0.0, 3.0, 6.0, 7.0], requires_grad=True)
    signal = torch.tensor([1.0, 1.0, -2.0, 1.0, 1.0])
    expected = {"deconvnet": [1, 1, 0, 1, 1], "guided": [0, 0, 0, 0, 0], "gradient": [0, 0, -2, 0, 0]}
    for method, want in expected.items():
        with backward_rule(method):
            y = nn.ReLU6()(x)
        (grad,) = torch.autograd.grad(y, x, signal)
        assert grad.tolist() == want, method
    with backward_rule("guided"):
        y = F.relu6(x)
    (grad,) = torch.autograd.grad(y, x, torch.ones(5))
    assert grad.tolist() == [0, 0, 1, 0, 0]


# --------------------------------------------------------------------------- every rectifier


def _rule_reference(x: torch.Tensor, low: float, high: float | None, method: str) -> torch.Tensor:
    """An independent implementation of the rule: a clamp whose gradient a tensor hook rewrites."""
    mask = (x > low) & (x < high) if high is not None else x > low
    mask = mask.detach()
    passthrough = x - x.detach()  # zero forward, identity backward

    def rule(grad):
        if method == "deconvnet":
            return grad.clamp(min=0)
        if method == "guided":
            return grad.clamp(min=0) * mask
        return grad * mask

    if x.requires_grad:
        passthrough.register_hook(rule)
    return x.detach().clamp(min=low, max=high) + passthrough


class EveryRectifier(nn.Module):
    """Rectifiers written every way users write them; ``reference=method`` swaps in the test's own rule."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(12))
        self.shared = nn.ReLU()
        self.inplace = nn.ReLU(inplace=True)
        self.six = nn.ReLU6(inplace=True)
        self.out = nn.Identity()
        self.reference: str | None = None

    def act(self, x, how: str):
        if self.reference is not None:
            return _rule_reference(x, 0.0, 6.0 if how in ("relu6", "six", "hardtanh") else None, self.reference)
        return {
            "F.relu": lambda: F.relu(x), "torch.relu": lambda: torch.relu(x), "method": lambda: x.relu(),
            "clamp": lambda: x.clamp(min=0), "shared": lambda: self.shared(x), "inplace": lambda: self.inplace(x),
            "relu_": lambda: F.relu_(x), "six": lambda: self.six(x), "relu6": lambda: F.relu6(x),
            "hardtanh": lambda: F.hardtanh(x, 0.0, 6.0), "threshold": lambda: F.threshold(x, 0.0, 0.0),
            "clamp_min": lambda: torch.clamp_min(x, 0),
        }[how]()

    def forward(self, x):
        hows = ["F.relu", "torch.relu", "method", "clamp", "shared", "inplace", "relu_", "shared", "six",
                "relu6", "hardtanh", "threshold"]
        for conv, how in zip(self.convs, hows):
            x = self.act(conv(x) * 3.0, how)  # *3 so that some ReLU6 units saturate
        return self.out(x)


@pytest.fixture(scope="module")
def every_rectifier():
    torch.manual_seed(3)
    return EveryRectifier().eval()


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_functional_shared_and_inplace_rectifiers_get_the_rule(every_rectifier, method):
    net = every_rectifier
    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 12)
    units = strongest_units(net, x, "out", channels=[1, 2, 3])
    before = model_state(net)
    ours = project_units(net, x, "out", units, method=method)
    assert model_state(net) == before
    # The reference: same weights, every rectifier replaced by the test's own rule.
    reference = []
    for u in units:
        xr = x.clone().requires_grad_(True)
        net.reference = method
        try:
            h = net(xr)
        finally:
            net.reference = None
        (grad,) = torch.autograd.grad(h[0, u.channel, u.row, u.col], xr)
        reference.append(grad[0].permute(1, 2, 0).numpy())
    plain = project_units(net, x, "out", units, method="gradient")
    for k in range(len(units)):
        _close(ours.maps[k], reference[k])
        assert np.abs(ours.maps[k] - plain.maps[k]).max() > 1e-3 * np.abs(plain.maps[k]).max()


def test_rectifier_mode_counts_every_call(every_rectifier):
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    with backward_rule("deconvnet") as mode:
        y = every_rectifier(x)
    assert mode.replaced == 12
    audit_graph(y, "deconvnet")


class MaximumRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        h = self.conv(x)
        return torch.maximum(h, torch.zeros_like(h))


class OpsRelu(MaximumRelu):
    def forward(self, x):
        return torch.ops.aten.relu(self.conv(x))


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.jit.script is deprecated, and still what users' models use

    @torch.jit.script
    def scripted_relu(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class ScriptedFunctionRelu(MaximumRelu):
    def forward(self, x):
        return scripted_relu(self.conv(x))


class MyRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class CustomFunctionRelu(MaximumRelu):
    def forward(self, x):
        return MyRelu.apply(self.conv(x))


class GeluNet(MaximumRelu):
    def forward(self, x):
        return F.gelu(self.conv(x))


def test_torch_ops_relu_gets_the_rule():
    """At a unit the relu switched off, the gradient is 0 but the deconvnet passes relu(1) = 1."""
    net = Wrapped(OpsRelu()).eval()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 10, 10)
    out = convscope.capture(net, x, ["out"])["out"][0]
    c, r, q = (int(v) for v in (out == 0).nonzero()[0])
    unit = Unit(c, r, q)
    assert not project_units(net, x, "out", [unit], method="gradient").maps.any()
    deconvnet = project_units(net, x, "out", [unit], method="deconvnet")
    _close(deconvnet.maps, project_units(net, x, "inner.conv", [unit], method="gradient").maps)


def test_maximum_after_the_layer_is_not_on_the_path():
    """Only the path to the layer matters: a nonlinearity after it is never reached."""
    p = project_units(MaximumRelu().eval(), torch.randn(1, 3, 10, 10), "conv", [Unit(0, 1, 1)], method="guided")
    assert p.maps.any()


class Wrapped(nn.Module):
    """Names a net's output as a layer (``inner`` output) so refusals are tested on the real path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.out = nn.Identity()

    def forward(self, x):
        return self.out(self.inner(x))


@pytest.mark.parametrize("net_type, message", [
    (MaximumRelu, "MaximumBackward0"),
    (ScriptedFunctionRelu, "could not reach every rectifier: .* ReluBackward0"),
    (CustomFunctionRelu, "MyReluBackward"),
    (GeluNet, "GeluBackward0"),
])
def test_refusals_on_the_path(net_type, message):
    net = Wrapped(net_type()).eval()
    x = torch.randn(1, 3, 10, 10)
    before = model_state(net)
    for method in ("deconvnet", "guided"):
        with pytest.raises(ConvscopeError, match=message):
            project_units(net, x, "out", [Unit(0, 1, 1)], method=method)
    assert model_state(net) == before
    assert torch._C._len_torch_function_stack() == 0
    project_units(net, x, "out", [Unit(0, 1, 1)], method="gradient")


def test_not_strict_backpropagates_plainly_and_says_so():
    net = Wrapped(GeluNet()).eval()
    x = torch.randn(1, 3, 10, 10)
    with pytest.warns(UserWarning, match="GeluBackward0"):
        p = project_units(net, x, "out", [Unit(0, 1, 1)], method="deconvnet", strict=False)
    plain = project_units(net, x, "out", [Unit(0, 1, 1)], method="gradient")
    _close(p.maps, plain.maps)  # no rectifier on this path: the rule changes nothing


def test_torchscript_is_refused():
    net = torch.jit.script(Wrapped(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())).eval())
    with pytest.raises(ConvscopeError, match="TorchScript"):
        project_units(net, torch.randn(1, 3, 10, 10), "out", [Unit(0, 1, 1)], method="guided")


def _explode(grad):
    raise RuntimeError("boom")


class Boom(nn.Module):
    """Fails in the forward pass (where="forward") or the backward pass, only when projecting."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.relu(self.conv(x))
        if torch.is_grad_enabled() and h.requires_grad:   # not during the catalogue's trace
            if self.where == "forward":
                raise RuntimeError("boom")
            if self.where == "backward":
                h.register_hook(_explode)
        return self.head(h)


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("strategy", ["crop", "shared"])
def test_modes_and_hooks_removed_on_error_and_train_mode_kept(where, strategy):
    net = Boom(where).train()
    before = model_state(net)
    with pytest.raises(RuntimeError, match="boom"):
        project_units(net, torch.randn(1, 3, 10, 10), "head", [Unit(0, 1, 1)], method="guided", strategy=strategy)
    assert model_state(net) == before and net.training
    assert torch._C._len_torch_function_stack() == 0
    assert all(p.requires_grad for p in net.parameters())
    # and on success
    net.where = "nowhere"
    project_units(net, torch.randn(1, 3, 10, 10), "head", [Unit(0, 1, 1)], method="guided", strategy=strategy)
    assert model_state(net) == before and torch._C._len_torch_function_stack() == 0


# --------------------------------------------------------------------------- VGG16: explicit Zeiler & Fergus


def _zeiler_fergus(features: nn.Sequential, x: torch.Tensor, stop: int, unit: Unit, guided: bool = False) -> np.ndarray:
    """The deconvnet written out: record the switches, then unpool, rectify, transposed-filter.

    No autograd: a forward pass records pooling switches (and pre-activations for the
    guided variant), then the signal (1 at the unit, 0 elsewhere) goes down the layers.
    """
    with torch.no_grad():
        records = []
        h = x
        for module in list(features)[:stop + 1]:
            if isinstance(module, nn.MaxPool2d):
                size = h.shape[-2:]
                h, switches = F.max_pool2d(h, module.kernel_size, module.stride, module.padding, return_indices=True)
                records.append(("pool", module, (switches, size)))
            elif isinstance(module, nn.ReLU):
                records.append(("relu", module, h.clone()))
                h = F.relu(h)
            else:
                records.append(("conv", module, None))
                h = module(h)
        signal = torch.zeros_like(h)
        signal[0, unit.channel, unit.row, unit.col] = 1.0
        for kind, module, saved in reversed(records):
            if kind == "pool":
                switches, size = saved
                signal = nn.MaxUnpool2d(module.kernel_size, module.stride, module.padding)(signal, switches, output_size=size)
            elif kind == "relu":
                signal = F.relu(signal) * (saved > 0) if guided else F.relu(signal)
            else:
                signal = F.conv_transpose2d(signal, module.weight, stride=module.stride, padding=module.padding)
    return signal[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def vgg_input(photos, vgg16):
    x, _ = vgg16.tensor(photos["chelsea"], (112, 112))
    return x


@pytest.mark.parametrize("layer, index", [
    ("block1_conv2", 3), ("block2_pool", 9), ("block3_conv3", 15), ("block4_conv1", 18), ("block5_conv3", 29),
])
def test_vgg16_deconvnet_equals_explicit_zeiler_fergus(vgg16, vgg_input, layer, index):
    assert vgg16.catalogue.get(layer).name == f"features.{index}"
    units = strongest_units(vgg16, vgg_input, layer, channels=[0, 17])
    units.append(Unit(3, 0, 0))  # a corner unit, whatever its value
    for method, guided in (("deconvnet", False), ("guided", True)):
        p = project_units(vgg16, vgg_input, layer, units, method=method)
        for k, u in enumerate(units):
            expected = _zeiler_fergus(vgg16.module.features, vgg_input, index, u, guided=guided)
            if method == "deconvnet":
                assert np.abs(expected).max() > 0
            _close(p.maps[k], expected)


def test_vgg16_matches_captum(vgg16, vgg_input):
    captum_attr = pytest.importorskip("captum.attr")
    layer = vgg16.catalogue.get("block3_conv2")
    (unit,) = strongest_units(vgg16, vgg_input, layer, channels=[11])
    # captum's full backward hooks cannot wrap in-place ReLUs: give it a copy without them
    # (same weights; in-place or not changes nothing in the maths).
    model = copy.deepcopy(vgg16.module).eval()
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    target = dict(model.named_modules())[layer.name]
    selector = (unit.channel, unit.row, unit.col)
    for method, cls in (("guided", captum_attr.NeuronGuidedBackprop), ("deconvnet", captum_attr.NeuronDeconvolution)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = cls(model, target).attribute(vgg_input.clone(), neuron_selector=selector)
        ours = project_units(vgg16, vgg_input, layer, [unit], method=method)
        _close(ours.maps[0], theirs[0].permute(1, 2, 0).detach().numpy())


# --------------------------------------------------------------------------- the default model (ReLU6)


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps))[None, :, None, None]


def _bn(bn: nn.BatchNorm2d, h: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _explicit_lite0(module: nn.Module, x: torch.Tensor, unit: Unit, method: str) -> np.ndarray:
    """Stem → block0 → block1.0.bn1 of EfficientNet-Lite0, forward and backward by hand (no autograd).

    Path: pad (TF same) + conv 3x3/2, BN, ReLU6 | depthwise 3x3, BN, ReLU6 | 1x1 conv, BN |
    1x1 conv, BN, ReLU6 (the layer). Backward: the rule at each ReLU6, BN scales by
    weight/sqrt(var+eps), convolutions by conv_transpose2d with the same weights.
    """
    stem, bn1 = module.conv_stem, module.bn1
    block0, block1 = module.blocks[0][0], module.blocks[1][0]

    def rule(signal, pre):
        if method == "deconvnet":
            return F.relu(signal)
        mask = (pre > 0) & (pre < 6)
        return F.relu(signal) * mask if method == "guided" else signal * mask

    with torch.no_grad():
        pt, pb = _same_pads(x.shape[2], 3, 2)
        pl, pr = _same_pads(x.shape[3], 3, 2)
        padded = F.pad(x, (pl, pr, pt, pb))
        pre1 = _bn(bn1, F.conv2d(padded, stem.weight, stride=2))
        a1 = pre1.clamp(0, 6)
        dw = block0.conv_dw
        pre2 = _bn(block0.bn1, F.conv2d(a1, dw.weight, padding=dw.padding, groups=dw.groups))
        a2 = pre2.clamp(0, 6)
        b3 = _bn(block0.bn2, F.conv2d(a2, block0.conv_pw.weight))
        pre4 = _bn(block1.bn1, F.conv2d(b3, block1.conv_pw.weight))

        signal = torch.zeros_like(pre4)
        signal[0, unit.channel, unit.row, unit.col] = 1.0
        signal = rule(signal, pre4) * _bn_scale(block1.bn1)
        signal = F.conv_transpose2d(signal, block1.conv_pw.weight) * _bn_scale(block0.bn2)
        signal = rule(F.conv_transpose2d(signal, block0.conv_pw.weight), pre2) * _bn_scale(block0.bn1)
        signal = F.conv_transpose2d(signal, dw.weight, padding=dw.padding, groups=dw.groups)
        signal = rule(signal, pre1) * _bn_scale(bn1)
        out = F.conv_transpose2d(signal, stem.weight, stride=2)
        full = torch.zeros_like(padded)
        h, w = min(out.shape[2], padded.shape[2]), min(out.shape[3], padded.shape[3])
        full[..., :h, :w] = out[..., :h, :w]
        result = full[..., pt:pt + x.shape[2], pl:pl + x.shape[3]]
    return result[0].permute(1, 2, 0).numpy()


def test_default_model_relu6_rule_equals_explicit_construction(default_model, photos):
    assert isinstance(default_model.module.bn1.act, nn.ReLU6)
    x, _ = default_model.tensor(photos["chelsea"])        # 224 x 337: TF-same padding differs per axis
    layer = "blocks.1.0.bn1"
    assert pytest.approx(float(capture_max(default_model, x, layer))) == 6.0  # saturating units exist
    units = [Unit(5, 40, 60), Unit(11, 0, 0), Unit(30, 111, 168)]
    before = model_state(default_model.module)
    plain = project_units(default_model, x, layer, units, method="gradient")
    for method in METHODS:
        p = project_units(default_model, x, layer, units, method=method)
        for k, u in enumerate(units):
            _close(p.maps[k], _explicit_lite0(default_model.module, x, u, method), rel=1e-4)
        if method != "gradient":
            assert np.abs(p.maps - plain.maps).max() > 0.05 * np.abs(plain.maps).max(), method
    assert model_state(default_model.module) == before


def capture_max(loaded, x, layer):
    return convscope.capture(loaded.module, x, [layer])[layer].max()


def _active_unsaturated(loaded, x, layer: str, channel: int) -> Unit:
    """The strongest unit of ``channel`` below the ReLU6 cap (a saturated unit passes no gradient)."""
    maps = convscope.capture(loaded.module, x, [layer])[layer][0, channel]
    maps = torch.where(maps < 6, maps, torch.zeros_like(maps))
    r, q = divmod(int(maps.argmax()), maps.shape[1])
    assert maps[r, q] > 0
    return Unit(channel, r, q)


def test_captum_returns_the_plain_gradient_on_relu6(default_model, photos):
    """Why captum cannot be the reference on the default model: it hooks nn.ReLU only."""
    captum_attr = pytest.importorskip("captum.attr")
    x, _ = default_model.tensor(photos["chelsea"], (160, 160))
    layer = "blocks.2.0.bn2"
    target = dict(default_model.module.named_modules())[layer]
    unit = _active_unsaturated(default_model, x, layer, channel=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_attr.NeuronGuidedBackprop(default_model.module, target).attribute(
            x.clone(), neuron_selector=(unit.channel, unit.row, unit.col))
    theirs = theirs[0].permute(1, 2, 0).detach().numpy()
    plain = project_units(default_model, x, layer, [unit], method="gradient").maps[0]
    guided = project_units(default_model, x, layer, [unit], method="guided").maps[0]
    _close(theirs, plain, rel=1e-4)
    assert np.abs(guided - plain).max() > 0.05 * np.abs(plain).max()


class SliceInPlace(nn.Module):
    """An in-place op on a slice of the channels: autograd hides its backward inside CopySlices."""

    def __init__(self, op: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.op = op

    def forward(self, x):
        h = self.conv(x)
        if self.op == "sigmoid_":
            h[:, :2].sigmoid_()
        elif self.op == "tanh_":
            h[:, 2:].tanh_()
        elif self.op == "clamp_":
            h[:, 2:].clamp_(min=0)
        elif self.op == "relu_module":
            nn.ReLU(inplace=True)(h[:, :2])
        elif self.op == "mul_":
            h[:, :2].mul_(3.0)
        elif self.op == "mul_signal":
            h[:, :2].mul_(h[:, 2:].clone())
        elif self.op == "setitem":
            h[:, :2] = h[:, 2:] * 2.0
        return h


@pytest.mark.parametrize("op, message", [
    ("sigmoid_", r"CopySlices\(sigmoid_\)"),
    ("tanh_", r"CopySlices\(tanh_\)"),
    ("mul_signal", r"CopySlices\(mul_\)"),
])
def test_nonlinear_in_place_op_on_a_slice_is_refused(op, message):
    net = Wrapped(SliceInPlace(op)).eval()
    x = torch.randn(1, 3, 10, 10)
    for method in ("deconvnet", "guided"):
        with pytest.raises(ConvscopeError, match=message):
            project_units(net, x, "out", [Unit(0, 1, 1)], method=method)
    with pytest.warns(UserWarning, match="CopySlices"):
        project_units(net, x, "out", [Unit(0, 1, 1)], method="deconvnet", strict=False)


def test_copy_slices_outside_the_rule_mode_is_unknown():
    x = torch.randn(1, 3, 10, 10, requires_grad=True)
    h = x * 2.0
    h[:, :1].mul_(3.0)  # linear, but recorded by no RectifierRule: nothing says what CopySlices wraps
    with pytest.raises(ConvscopeError, match="an in-place op on a view"):
        audit_graph(h, "deconvnet")


@pytest.mark.parametrize("op", ["clamp_", "relu_module"])
def test_in_place_rectifier_on_a_slice_gets_the_rule(op):
    """``clamp_(min=0)`` and an in-place ReLU on some channels are rectifiers: the rule reaches them."""
    net = Wrapped(SliceInPlace(op)).eval()
    x = torch.randn(1, 3, 10, 10)
    channel = 3 if op == "clamp_" else 0
    out = convscope.capture(net, x, ["out"])["out"][0]
    r, q = (int(v) for v in (out[channel] == 0).nonzero()[0])
    unit = Unit(channel, r, q)  # switched off: gradient 0, deconvnet passes relu(1) = 1
    assert not project_units(net, x, "out", [unit], method="gradient").maps.any()
    _close(project_units(net, x, "out", [unit], method="deconvnet").maps,
           project_units(net, x, "inner.conv", [unit], method="gradient").maps)


@pytest.mark.parametrize("op", ["mul_", "setitem"])
def test_linear_in_place_op_on_a_slice_is_accepted(op):
    net = Wrapped(SliceInPlace(op)).eval()
    x = torch.randn(1, 3, 10, 10)
    p = project_units(net, x, "out", [Unit(0, 1, 1)], method="guided")
    _close(p.maps, project_units(net, x, "out", [Unit(0, 1, 1)], method="gradient").maps)
