import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope
from convscope.errors import ConvscopeError
from convscope.layers import build_catalogue

VGG19_ALIASES = [f"block{b}_conv{c}" for b, n in zip(range(1, 6), (2, 2, 4, 4, 4)) for c in range(1, n + 1)]


def test_vgg19_has_16_conv_features_with_keras_aliases(vgg19):
    features = vgg19.catalogue.features
    assert [f.alias for f in features] == VGG19_ALIASES
    assert all(f.type == "ReLU" for f in features)  # Keras conv outputs include the activation
    assert vgg19.catalogue["block1_conv2"].name == "features.3"
    assert [vgg19.catalogue[f"block{b}_pool"].name for b in range(1, 6)] == [
        "features.4", "features.9", "features.18", "features.27", "features.36"]


def test_vgg19_block1_conv2_at_200x300_as_in_the_post(vgg19):
    x = torch.zeros(1, 3, 200, 300)
    out = convscope.capture(vgg19.module, x, ["features.3"])
    assert tuple(out["features.3"].shape) == (1, 64, 200, 300)
    result = convscope.activations(vgg19, torch.rand(200, 300, 3).numpy(), "block1_conv2", size=(200, 300))
    assert result["block1_conv2"].shape == (64, 200, 300)


def test_vgg_strides_and_receptive_fields(vgg19):
    cat = vgg19.catalogue
    assert cat["block1_conv1"].rf_size == (3, 3)
    assert cat["block3_conv1"].stride == (4, 4) and cat["block3_conv1"].rf_size == (24, 24)
    assert cat["block5_conv4"].stride == (16, 16) and cat["block5_conv4"].rf_size == (252, 252)


def test_resolve_patterns_aliases_and_names(vgg19):
    cat = vgg19.catalogue
    assert [layer.alias for layer in cat.resolve("block3_*")] == [
        "block3_conv1", "block3_conv2", "block3_conv3", "block3_conv4", "block3_pool"]
    assert len(cat.resolve("features.*")) == 37
    assert [layer.name for layer in cat.resolve("features.0,block1_conv1")] == ["features.0", "features.1"]
    with pytest.raises(ConvscopeError, match="block1_conv2"):
        cat.resolve("block1_cnv2")
    with pytest.raises(ConvscopeError, match="no layer matches"):
        cat.resolve("block9_*")


def test_default_model_features_are_post_activation(default_model):
    cat = default_model.catalogue
    features = cat.features
    assert features[0].name == "bn1" and features[0].type == "BatchNormAct2d"
    assert len(features) == 49  # stem + 16 blocks (2 or 3 convs each) + head
    assert features[-1].name == "bn2" and features[-1].shape == (1280, 7, 7)


def test_shared_module_gets_one_row_per_call():
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    cat = build_catalogue(model)
    names = [layer.name for layer in cat]
    assert "layer1.0.relu" in names and "layer1.0.relu@1" in names
    out = convscope.capture(model, torch.randn(1, 3, 64, 64), ["layer1.0.relu", "layer1.0.relu@1"])
    assert not torch.equal(out["layer1.0.relu"], out["layer1.0.relu@1"])


class _LinearNet(nn.Module):
    """No rectifiers, so the input gradient is non-zero exactly on the receptive field."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 5, stride=2, padding=2)
        self.conv3 = nn.Conv2d(4, 4, 3, dilation=2)

    def forward(self, x):
        x = self.conv2(self.pool(self.conv1(x)))
        x = F.pad(x, (1, 0, 1, 0))  # TF-"same"-style explicit padding
        return self.conv3(x)


@pytest.mark.parametrize("layer_name", ["conv1", "pool", "conv2", "conv3"])
@pytest.mark.parametrize("unit", [(0, 0), (3, 5), (6, 2)])
def test_receptive_field_box_is_the_gradient_support(layer_name, unit):
    torch.manual_seed(0)
    model = _LinearNet()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_().add_(0.05)  # positive weights: no accidental cancellation inside the field
    size = (48, 40)
    cat = build_catalogue(model, size)
    layer = cat[layer_name]
    row, col = (min(unit[0], layer.shape[1] - 1), min(unit[1], layer.shape[2] - 1))
    x = torch.zeros(1, 3, *size, requires_grad=True)
    with convscope.recording(model, [layer_name], detach=False, clone=False) as store:
        model(x)
    out = store[layer_name]
    out[0, 0, row, col].backward()
    support = x.grad[0].abs().sum(0).nonzero()
    top, left = support.min(0).values.tolist()
    bottom, right = (support.max(0).values + 1).tolist()
    assert layer.box(row, col, size) == (top, left, bottom, right)


def _gradient_support(model, name, size, row, col):
    """Bounding box (top, left, bottom, right) and pixel fraction of the input gradient of unit (row, col)."""
    x = torch.zeros(1, 3, *size, dtype=torch.float64)
    x.normal_(generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    with convscope.recording(model, [name], detach=False, clone=False) as store:
        model(x)
    store[name][0, :, row, col].sum().backward()
    mask = x.grad[0].abs().sum(0) > 0
    support = mask.nonzero()
    top, left = support.min(0).values.tolist()
    bottom, right = (support.max(0).values + 1).tolist()
    return (top, left, bottom, right), mask.double().mean().item()


@pytest.mark.parametrize("model_name", ["regnet_y_400mf", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny"])
def test_listed_field_holds_the_gradient_support(model_name):
    import copy

    loaded = convscope.load_model(model_name, random=True)
    size = (64, 64)
    cat = build_catalogue(loaded.module, size)
    model = copy.deepcopy(loaded.module).double().eval()  # never the user's module in place
    features = cat.features
    picks = [features[i] for i in (0, 1, len(features) // 3, len(features) // 2, -1)]
    fields = {layer.field for layer in features}
    assert "box" in fields and ("global" in fields) == (model_name != "convnext_tiny")  # squeeze-excite is global
    for layer in picks:
        row, col = layer.shape[1] // 2, layer.shape[2] // 2
        (top, left, bottom, right), fraction = _gradient_support(model, layer.name, size, row, col)
        if layer.field == "box":
            btop, bleft, bbottom, bright = layer.box(row, col, size)
            assert btop <= top and bleft <= left and bottom <= bbottom and right <= bright, layer.name
        elif layer.field == "global":
            assert layer.box(row, col, size) == (0, 0, *size)
            assert fraction > 0.9, (layer.name, fraction)


def test_plain_conv_chain_box_is_tight():
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    model = make_layers(cfgs["A"]).double().eval()  # VGG11's convolutional part
    size = (64, 64)
    cat = build_catalogue(model, size)
    for layer in cat.features[:6]:
        assert layer.field == "box"
        row, col = layer.shape[1] // 2, layer.shape[2] // 2
        support, _ = _gradient_support(model, layer.name, size, row, col)
        box = layer.box(row, col, size)
        for a in range(2):
            assert box[a] <= support[a] and support[a + 2] <= box[a + 2]
            stride = layer.stride[a]
            assert (box[a + 2] - box[a]) - (support[a + 2] - support[a]) <= stride, layer.name


@pytest.mark.parametrize("model_name", ["regnet_y_400mf", "efficientnet_b0", "mobilenet_v3_small"])
def test_squeeze_excite_gates_are_not_feature_layers(model_name):
    cat = build_catalogue(convscope.load_model(model_name, random=True).module, (64, 64))
    assert not [layer.name for layer in cat.features if layer.shape[1:] == (1, 1)]
    assert not [layer.name for layer in cat.features if ".se." in layer.name or "scale_activation" in layer.name]
    gates = [layer for layer in cat if layer.is_spatial and layer.shape[1:] == (1, 1)]
    assert gates and all(layer.field == "global" for layer in gates)


def test_unknown_ops_never_give_a_smaller_box():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            shifted = torch.roll(y, 5, dims=-1)  # not followed: unknown
            z = self.conv2(y + shifted)
            gate = z.mean((2, 3), keepdim=True).sigmoid()
            return z, z * gate

    model = Odd()
    tracer_cat = build_catalogue(model, (16, 16))
    assert tracer_cat["conv"].field == "box"
    assert tracer_cat["conv2"].field == "unknown"  # the residual add with an unknown branch stays unknown
    with pytest.raises(ConvscopeError, match="unknown"):
        tracer_cat["conv2"].box(0, 0)
