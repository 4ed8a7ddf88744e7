"""The breadth matrix: every command on a dozen architectures, random-init (seeded) and small.

Each model is built once (a module-scoped parametrized fixture; pytest groups the tests by
model) at a small input size, and checked for:

* the post-activation rule: a default feature layer is its conv's output after the norm and
  the activation, whether the activation is a module or a call in ``forward``;
* the receptive-field property: the listed box holds the support of a unit's input gradient
  (float64), a "global" unit depends on almost every pixel, and the first layer's box is at
  most one stride larger than that support;
* every method runs on it (activations, deconv or its clear refusal, features, occlusion, a
  small atlas) and the seeded load gives the very same network twice.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope
from convscope.errors import ConvscopeError


class FunctionalNet(nn.Module):
    """A user's CNN written with functional calls: F.relu, F.max_pool2d, a residual add, torch.cat."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        y = torch.relu(self.conv2(x)) + x
        y = torch.cat([y, x], dim=1)
        y = self.conv3(y).relu_()
        return self.fc(y.mean((2, 3)))


USER = "tests.test_breadth:FunctionalNet"
SIZE = 64
# Only rectifiers (ReLU, ReLU6) on the path: the deconvnet holds; elsewhere it is refused.
RECTIFIED = {"resnet18", "densenet121", "mobilenet_v2", "inception_v3", "googlenet", "shufflenet_v2_x1_0",
             "timm:resnet18d", USER}
MODELS = [
    USER, "resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x1_0", "googlenet",
    "regnet_y_400mf", "efficientnet_b0", "timm:resnet18d", "timm:convnext_nano",
    pytest.param("densenet121", marks=pytest.mark.slow),
    pytest.param("inception_v3", marks=pytest.mark.slow),
    pytest.param("convnext_tiny", marks=pytest.mark.slow),
]
# The rows a default must be (or must not be), where the activation is easy to miss.
EXPECTED_DEFAULTS = {
    USER: (["relu@fn", "relu@fn1", "relu@fn2"], []),
    "timm:resnet18d": (["act1"], ["conv1.6"]),
    "timm:convnext_nano": (["stages.0.blocks.0.mlp.act"], ["stages.0.blocks.0.mlp.fc1"]),
    "googlenet": (["conv1.relu@fn", "inception3a.branch1.relu@fn"], ["conv1.bn", "inception3a.branch1.bn"]),
    "inception_v3": (["Conv2d_1a_3x3.relu@fn", "Mixed_5b.branch1x1.relu@fn"], ["Conv2d_1a_3x3.bn"]),
}
RECTIFIER_TYPES = {"ReLU", "ReLU6", "F.relu", "F.relu6"}


@pytest.fixture(scope="module", params=MODELS)
def net(request):
    """(spec, LoadedModel at a small input size); the input size is what the catalogue and atlas use."""
    spec = request.param
    loaded = convscope.load_model(spec, random=True, seed=0, device="cpu")
    size = 80 if spec == "inception_v3" else SIZE  # Inception v3 needs at least 75 pixels
    small = dataclasses.replace(loaded.preprocessing, input_size=(size, size))
    return spec, dataclasses.replace(loaded, preprocessing=small)


@pytest.fixture(scope="module")
def photo(photos):
    return photos["chelsea"]


def _defaults(loaded):
    return [layer.name for layer in loaded.catalogue.features]


def _picks(features):
    """The first feature layer and the last one of each stride: a few units per stage."""
    last_at = {}
    for layer in features:
        last_at[layer.stride or layer.name] = layer
    return list(dict.fromkeys([features[0], *last_at.values()]))


def test_default_layers_are_post_activation(net, photo):
    spec, loaded = net
    cat = loaded.catalogue
    names = _defaults(loaded)
    assert names
    wanted, unwanted = EXPECTED_DEFAULTS.get(spec, ([], []))
    assert set(wanted) <= set(names) and not set(unwanted) & set(names)
    if spec in ("googlenet", "inception_v3"):  # every conv is a BasicConv2d with F.relu in forward
        assert all(name.endswith(".relu@fn") for name in names)
    # No default row stops short of an activation that follows it on the same map.
    rows = cat.layers
    for layer in cat.features:
        nxt = next((r for r in rows[layer.index + 1:] if r.kind not in ("pass", "block")), None)
        if nxt is not None and nxt.shape == layer.shape:
            assert nxt.kind != "act", (layer.name, nxt.name)
    gates = [layer.name for layer in cat.features if layer.field == "global" and layer.shape[1:] == (1, 1)]
    assert not gates  # squeeze-excite gate vectors are not feature layers
    # The recorded values are the rectified ones (a call's row is its output, not its input).
    result = convscope.activations(loaded, photo, names, size=loaded.preprocessing.input_size)
    for layer in result.layers:
        if layer.type in RECTIFIER_TYPES:
            assert result.maps[layer.name].min() >= 0, layer.name


def _gradient_support(model, name, size, row, col, dtype):
    """Bounding box of the input gradient of unit (row, col) (None if dead) and its pixel fraction."""
    x = torch.randn(1, 3, *size, dtype=dtype, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    with convscope.recording(model, [name], detach=False, clone=False) as store:
        model(x)
    unit = store[name][0, :, row, col]
    # Random channel weights: a plain sum over a LayerNorm's channels is a constant.
    weights = torch.randn(unit.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    (unit * weights).sum().backward()
    mask = x.grad[0].abs().sum(0) > 0
    support = mask.nonzero()
    if not len(support):
        return None, 0.0
    box = (*support.min(0).values.tolist(), *(support.max(0).values + 1).tolist())
    return box, mask.double().mean().item()


def test_receptive_fields_hold_the_gradient_support(net):
    spec, loaded = net
    size = loaded.preprocessing.input_size
    cat = loaded.catalogue  # traced at the small input size
    # float64 leaves no rounding to hide a dependency; CPU depthwise convolutions in float64 are
    # about 50x slower, and float32 cannot create support outside the field, only lose some inside.
    depthwise = any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in loaded.module.modules())
    dtype = torch.float32 if depthwise else torch.float64
    model = copy.deepcopy(loaded.module).to(dtype).eval()  # never the user's module in place
    features = [layer for layer in cat.features if layer.is_spatial]
    assert features[0].field == "box"
    checked = 0
    for i, layer in enumerate(_picks(features)):
        row, col = layer.shape[1] // 2, layer.shape[2] // 2
        support, fraction = _gradient_support(model, layer.name, size, row, col, dtype)
        if support is None:  # a dead unit of a random network: nothing to compare
            continue
        checked += 1
        if layer.field == "box":
            box = layer.box(row, col, size)
            assert box[0] <= support[0] and box[1] <= support[1], layer.name
            assert support[2] <= box[2] and support[3] <= box[3], layer.name
            if i == 0:  # a conv (+ norm + activation) on the image: tight up to one stride
                for a in range(2):
                    slack = (box[a + 2] - box[a]) - (support[a + 2] - support[a])
                    assert slack <= layer.stride[a], (layer.name, box, support)
        elif layer.field == "global":
            assert layer.box(row, col, size) == (0, 0, *size)
            assert fraction > 0.9, (layer.name, fraction)
    assert checked >= 2


def test_every_method_runs(net, photo, tmp_path):
    spec, loaded = net
    size = loaded.preprocessing.input_size
    features = [layer for layer in loaded.catalogue.features if layer.is_spatial and layer.field != "unknown"]
    layer = features[len(features) // 2]

    if spec in RECTIFIED:
        res = convscope.deconv(loaded, photo, layer.name, channels=[0, 1], method="deconvnet", size=size)
        assert set(res.projections) == {"deconvnet"}
    else:
        with pytest.raises(ConvscopeError, match="no deconvnet rule") as refusal:
            convscope.deconv(loaded, photo, layer.name, channels=[0], method="deconvnet", size=size)
        assert "'gradient'" in str(refusal.value)
        res = convscope.deconv(loaded, photo, layer.name, channels=[0, 1], method="gradient", size=size)
    assert res.units and all(np.isfinite(p).all() for p in res.projections[next(iter(res.projections))].maps)

    feats = convscope.visualize_features(loaded, layer.name, [0], steps=2, size=size, photos={"chelsea": photo})
    assert feats.images.shape == (1, *size, 3) and np.isfinite(feats.records[0]["objective"])

    occ = convscope.occlusion(loaded, photo, patch=size[0] // 2, stride=size[0] // 2, layer=layer.name,
                              channel=0, size=size)
    assert occ.probability.shape == (2, 2) and np.isfinite(occ.activity).all()


def test_seeded_random_init_is_reproducible(net, photo):
    spec, loaded = net
    again = convscope.load_model(spec, random=True, seed=0, device="cpu")
    x, _ = loaded.tensor(photo, loaded.preprocessing.input_size)
    name = loaded.catalogue.features[-1].name
    first = convscope.capture(loaded.module, x, [name])[name]
    second = convscope.capture(again.module, x, [name])[name]
    assert torch.equal(first, second)  # the same network, the same computation


ATLAS_MODELS = {USER, "googlenet", "mobilenet_v3_small", "timm:convnext_nano"}


def test_small_atlas_builds_and_names_each_projection(net, photo, tmp_path):
    spec, loaded = net
    if spec not in ATLAS_MODELS:
        pytest.skip("the atlas runs on a few representatives (every command runs above)")
    features = [layer for layer in loaded.catalogue.features if layer.is_spatial]
    layers = f"{features[0].name},{features[len(features) // 2].name}"
    settings = convscope.AtlasSettings(layers=layers, channels_per_layer=1, steps=2, feature_size=32, top=1,
                                       max_photos=1)
    convscope.build_atlas(loaded, {"chelsea": photo}, tmp_path, settings, progress=False)
    records = [json.loads(p.read_text()) for p in (tmp_path / "records" / "deconv").glob("*.json")]
    assert {record["layer"] for record in records} == set(layers.split(","))
    for record in records:
        assert record["method"] in ("deconvnet", "guided", "gradient")
        assert (record["method"] == "gradient") == (spec not in RECTIFIED), record["layer"]
        page = (tmp_path / "L" / record["slug"] / "index.html").read_text()
        label = {"deconvnet": "deconvnet", "guided": "guided backprop", "gradient": "plain gradient"}[record["method"]]
        assert f'class="projection">{label}' in page


def test_the_readme_table_is_what_the_code_chooses(monkeypatch):
    """README's compatibility table is benchmarks/compat_table.py's output: a row that a change of the
    projection choice leaves stale fails here (checked on the quick models, seconds)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location("compat_table", root / "benchmarks" / "compat_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    readme = (root / "README.md").read_text()
    for model in ("resnet18", "mobilenet_v2", "efficientnet_b0", USER):
        row = table.row(model)
        assert row in readme, f"README's row for {model} is stale; benchmarks/compat_table.py prints:\n{row}"
