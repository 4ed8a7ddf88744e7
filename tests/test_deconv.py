"""Unit selection, batching strategies, receptive-field boxes, pictures and the ``convscope deconv`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope
import convscope.methods.deconv.engine as deconv_engine  # noqa: E402
from convscope.cli.main import main
from convscope.errors import ConvscopeError
from convscope.methods.deconv import (
    Projections,
    Unit,
    project_units,
    render_projection_pair,
    strongest_units,
    top_positions,
)

from .conftest import model_state


def _close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    scale = max(float(np.abs(expected).max()), 1e-12)
    err = float(np.abs(actual - expected).max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"


@pytest.fixture(scope="module")
def vgg_x(photos, vgg16):
    x, _ = vgg16.tensor(photos["astronaut"], (112, 112))
    return x


@pytest.fixture(scope="module")
def cat(default_model, photos):
    """The cat at the default model's size: 224 x 337, so TF-same padding differs between the axes."""
    return default_model.tensor(photos["chelsea"])


# --------------------------------------------------------------------------- strategies agree


def test_crops_equal_the_whole_image_for_interior_and_border_units(vgg16, vgg_x):
    layer = "block3_conv3"                                   # 28x28 map, RF 40, stride 4
    units = [Unit(3, 14, 14), Unit(5, 0, 0), Unit(7, 27, 27), Unit(9, 0, 20), Unit(11, 27, 3)]
    units += strongest_units(vgg16, vgg_x, layer, channels=[1, 2])
    crop = project_units(vgg16, vgg_x, layer, units, method="deconvnet", strategy="crop")
    full = project_units(vgg16, vgg_x, layer, units, method="deconvnet", strategy="full")
    assert crop.strategy == "crop" and full.strategy == "full"
    assert crop.clipped[:5] == [False, True, True, True, True]
    _close(crop.maps, full.maps)
    np.testing.assert_allclose(crop.values, full.values, rtol=1e-5, atol=1e-6)
    unchecked = project_units(vgg16, vgg_x, layer, units, method="deconvnet", strategy="crop", check_crops=False)
    np.testing.assert_array_equal(unchecked.maps, crop.maps)   # the same crop batches: the very same computation
    np.testing.assert_allclose(unchecked.values, full.values, rtol=1e-5, atol=1e-6)


def test_crops_equal_the_whole_image_on_the_default_model(default_model, cat):
    x, _ = cat
    layer = "blocks.2.1.bn2"                                 # RF 67, stride 8
    _, _, height, width = convscope.capture(default_model.module, x, [layer])[layer].shape
    assert (height, width) == (28, 43)
    last_row, last_col = height - 1, width - 1
    units = [Unit(4, 14, 20), Unit(8, 0, 0), Unit(12, last_row, last_col), Unit(16, 0, last_col),
             Unit(20, last_row, 0), Unit(24, 13, last_col - 1)]
    for method in ("deconvnet", "guided"):
        crop = project_units(default_model, x, layer, units, method=method, strategy="crop")
        full = project_units(default_model, x, layer, units, method=method, strategy="full")
        _close(crop.maps, full.maps, rel=1e-4)


def test_shared_forward_equals_the_whole_image_for_deep_units(vgg16, vgg_x):
    layer = "block5_conv3"                                   # RF 196 > 112: every unit sees the whole image
    units = strongest_units(vgg16, vgg_x, layer, channels=[0, 1, 2]) + [Unit(4, 0, 0), Unit(4, 6, 6)]
    shared = project_units(vgg16, vgg_x, layer, units, method="guided")
    assert shared.strategy == "shared"
    full = project_units(vgg16, vgg_x, layer, units, method="guided", strategy="full")
    _close(shared.maps, full.maps)


def test_batched_equals_one_at_a_time(vgg16, vgg_x):
    x2 = torch.cat([vgg_x, vgg_x.flip(-1)])
    for layer in ("block2_conv2", "block5_conv1"):
        units = strongest_units(vgg16, x2, layer, channels=[0, 3, 6])
        units += strongest_units(vgg16, x2, layer, channels=[2, 5], image_index=1)
        batched = project_units(vgg16, x2, layer, units, method="deconvnet", batch_size=4)
        for k, u in enumerate(units):
            single = project_units(vgg16, x2, layer, [u], method="deconvnet", batch_size=1)
            _close(batched.maps[k], single.maps[0])
            assert batched.values[k] == pytest.approx(single.values[0], rel=1e-5)


def test_a_wrong_crop_is_caught_and_recomputed(vgg16, vgg_x, monkeypatch):
    """The safety net: crop values are checked against the whole image, never trusted blindly."""
    plan_of = deconv_engine._crop_plan

    def shifted(layer, boxes, hw):
        plan = plan_of(layer, boxes, hw)
        plan.offsets = [(t - 2 if t >= 2 else t + 2, left) for t, left in plan.offsets]  # off the stride grid
        return plan

    units = strongest_units(vgg16, vgg_x, "block3_conv1", channels=[3, 5])
    monkeypatch.setattr(deconv_engine, "_crop_plan", shifted)
    with pytest.warns(UserWarning, match="recomputed on the whole image"):
        p = project_units(vgg16, vgg_x, "block3_conv1", units, method="deconvnet")
    assert p.strategy == "crop+shared"
    monkeypatch.undo()
    full = project_units(vgg16, vgg_x, "block3_conv1", units, method="deconvnet", strategy="full")
    _close(p.maps, full.maps)


# --------------------------------------------------------------------------- boxes


class PositiveNet(nn.Module):
    """Positive weights and inputs: every unit is active, so the gradient fills the receptive field."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(4, 4, 3)
        torch.manual_seed(0)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2, self.conv3):
                conv.weight.uniform_(0.1, 1.0)
                conv.bias.uniform_(0.1, 1.0)

    def forward(self, x):
        return self.conv3(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))))


def test_receptive_field_boxes_match_the_gradient_support():
    net = PositiveNet().eval()
    x = torch.rand(1, 3, 40, 36) + 0.1
    loaded = convscope.as_loaded(net)
    layer = loaded.catalogue.get("conv3")
    assert layer.rf_size == (15.0, 15.0) and layer.stride == (4.0, 4.0)   # 3, 5, 7, 15
    units = [Unit(0, 3, 3), Unit(1, 0, 0), Unit(2, 7, 6), Unit(3, 0, 6), Unit(0, 7, 0)]
    p = project_units(net, x, "conv3", units, method="gradient")
    for k in range(len(units)):
        support = np.abs(p.maps[k]).max(axis=-1) > 0
        rows, cols = np.nonzero(support)
        top, left, bottom, right = p.boxes[k]
        assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (top, left, bottom, right)
        assert support[top:bottom, left:right].all()
    assert p.clipped == [False, True, True, True, True]


# --------------------------------------------------------------------------- the contract


def test_projections_contract(default_model, cat):
    x, rgb = cat
    before = model_state(default_model.module)
    units = strongest_units(default_model, x, "blocks.3.0.bn3", top=3)
    p = project_units(default_model, x, "blocks.3.0.bn3", units, method="guided")
    assert isinstance(p, Projections) and p.units == units
    assert p.values.dtype == np.float32 and p.values.shape == (3,)
    assert p.maps.dtype == np.float32 and p.maps.shape == (3, 224, 337, 3)
    assert len(p.boxes) == len(p.clipped) == 3
    recorded = convscope.capture(default_model.module, x, ["blocks.3.0.bn3"])["blocks.3.0.bn3"][0]
    for u, v in zip(p.units, p.values):
        assert v == pytest.approx(float(recorded[u.channel, u.row, u.col]), rel=1e-4, abs=1e-5)
    for k, (top, left, bottom, right) in enumerate(p.boxes):
        assert 0 <= top < bottom <= 224 and 0 <= left < right <= 337
        outside = p.maps[k].copy()
        outside[top:bottom, left:right] = 0
        assert not outside.any()
    assert model_state(default_model.module) == before
    assert json.dumps(p.as_records())
    proj, patch = render_projection_pair(p.maps[0], rgb, p.boxes[0])
    assert proj.size == patch.size == (p.boxes[0][3] - p.boxes[0][1], p.boxes[0][2] - p.boxes[0][0])


def test_bad_requests_are_clear_errors(vgg16, vgg_x):
    with pytest.raises(ConvscopeError, match="unknown method"):
        project_units(vgg16, vgg_x, "block1_conv1", [Unit(0, 0, 0)], method="lrp")
    with pytest.raises(ConvscopeError, match="outside layer"):
        project_units(vgg16, vgg_x, "block4_conv1", [Unit(0, 14, 0)])
    with pytest.raises(ConvscopeError, match="refers to image 1"):
        project_units(vgg16, vgg_x, "block1_conv1", [Unit(0, 0, 0, image_index=1)])
    with pytest.raises(ConvscopeError, match=r"\(B, 3, H, W\)"):
        project_units(vgg16, vgg_x[0], "block1_conv1", [Unit(0, 0, 0)])
    with pytest.raises(ConvscopeError, match="Did you mean"):
        project_units(vgg16, vgg_x, "block4_conv9", [Unit(0, 0, 0)])
    with pytest.raises(ConvscopeError, match="out of range"):
        strongest_units(vgg16, vgg_x, "block1_conv1", channels=[64])


def test_unit_selection(vgg16, vgg_x):
    name = vgg16.catalogue.get("block3_conv1").name
    maps = convscope.capture(vgg16.module, vgg_x, [name])[name][0]
    units = strongest_units(vgg16, vgg_x, "block3_conv1", channels=[4, 2])
    assert [u.channel for u in units] == [4, 2]
    for u in units:
        assert float(maps[u.channel, u.row, u.col]) == float(maps[u.channel].max())
    top = strongest_units(vgg16, vgg_x, "block3_conv1", top=5)
    peaks = [float(maps[u.channel].max()) for u in top]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] == float(maps.max())
    positions = top_positions(vgg16, vgg_x, "block3_conv1", 7, 4)
    values = [float(maps[7, u.row, u.col]) for u in positions]
    assert values == sorted(values, reverse=True) and values[0] == float(maps[7].max())
    assert len({(u.row, u.col) for u in positions}) == 4


# --------------------------------------------------------------------------- pictures


def test_render_pair_gray_for_zero_and_symmetric_stretch():
    projection = np.zeros((10, 12, 3), np.float32)
    projection[3, 4] = [2.0, -1.0, 0.0]
    photo = np.full((10, 12, 3), 200, np.uint8)
    proj, patch = render_projection_pair(projection, photo, (2, 3, 6, 9))
    assert proj.size == patch.size == (6, 4)
    a = np.asarray(proj)
    assert a[1, 1].tolist() == [255, 64, 128]            # +max → 255, -max/2 → 64, zero → 128
    assert (a[0] == 128).all()
    assert (np.asarray(patch) == 200).all()
    mag, _ = render_projection_pair(projection, photo, (2, 3, 6, 9), absolute=True)
    assert np.asarray(mag)[1, 1].tolist() == [255, 255, 255] and np.asarray(mag)[0, 0].tolist() == [0, 0, 0]


def test_deconv_result_sheets(default_model, photos):
    res = convscope.deconv(default_model, photos["coffee"], "blocks.2.1.bn3", top=3, method="all", size=96)
    assert list(res.projections) == ["deconvnet", "guided", "gradient"]
    assert all(p.units == res.units for p in res.projections.values())
    sheet = res.sheet(tile=48)
    whole = res.whole("guided", tile=64)
    assert isinstance(sheet, Image.Image) and sheet.width > 4 * 48 and isinstance(whole, Image.Image)
    index = res.to_dict()
    assert index["methods"] == ["deconvnet", "guided", "gradient"] and len(index["units"]) == 3
    with pytest.raises(ConvscopeError, match="exactly one channel"):
        convscope.deconv(default_model, photos["coffee"], "blocks.2.1.bn3", top=2, positions=3, size=96)
    one = convscope.deconv(default_model, photos["coffee"], "blocks.2.1.bn3", top=1, positions=3, size=96)
    assert len({u.channel for u in one.units}) == 1 and len(one.units) == 3


def test_cli_deconv_writes_sheets_index_and_arrays(tmp_path, photos, capsys):
    photo = tmp_path / "coffee.png"
    Image.fromarray(photos["coffee"]).save(photo)
    out = tmp_path / "out"
    code = main(["deconv", str(photo), "--layer", "blocks.2.1.bn3", "--top", "3", "--method", "all",
                 "--size", "96", "--save-npz", "--out", str(out)])
    assert code == 0
    index = json.loads((out / "deconv.json").read_text())
    assert index["methods"] == ["deconvnet", "guided", "gradient"] and len(index["units"]) == 3
    for name in index["files"].values():
        assert (out / name).exists(), name
    arrays = np.load(out / index["arrays"])
    assert arrays["guided"].shape == (3, 96, 144, 3) and arrays["values"].shape == (3,)
    assert "blocks.2.1.bn3" in capsys.readouterr().out
    code = main(["deconv", str(photo), "--layer", "blocks.2.1.bn9", "--out", str(out)])
    assert code == 2 and "Did you mean" in capsys.readouterr().err
