"""Occlusion maps on the real default model: what they show, their shapes, and exactness of the fast path."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from convscope import ConvscopeError, LoadedModel
from convscope.cli.main import main
from convscope.methods.occlusion import engine, occluder_grid, occlusion

from .conftest import model_state

pytestmark = pytest.mark.usefixtures("one_thread")


# Label maps are argmaxes of float32 probabilities computed in other batch shapes or by another
# method (agreeing to ~1e-6): two classes within TIE of each other may swap, nothing else.
TIE = 1e-4


def _assert_labels_match(model, photo, kwargs, got, want):
    """Equal label maps, except where the two labels' probabilities are within TIE (checked by a rerun)."""
    np.testing.assert_allclose(got.label_probability, want.label_probability, atol=1e-5)
    for r, c in zip(*np.nonzero(got.labels != want.labels)):
        a, b = int(got.labels[r, c]), int(want.labels[r, c])
        pa, pb = (occlusion(model, photo, target=t, method="plain", **kwargs).probability[r, c] for t in (a, b))
        assert abs(pa - pb) <= TIE, f"labels differ at {(r, c)}: {a} vs {b}, probabilities {pa:.6f} vs {pb:.6f}"


def test_occluding_the_head_lowers_the_cat_probability_more_than_a_background_corner(default_model, photos):
    before = model_state(default_model.module)
    res = occlusion(default_model, photos["chelsea"], patch=96, stride=64)   # 3x3 positions at 0, 64, 128
    assert model_state(default_model.module) == before
    assert "cat" in res.target_name.lower() and res.target == res.base_label
    head = res.probability[1, 1]     # the occluder over both eyes and the nose
    corner = res.probability[0, 2]   # top-right corner: mostly the blurred background
    assert head < res.base_probability - 0.05
    assert head < corner - 0.05, (head, corner)
    assert res.method == "incremental"


@pytest.mark.parametrize("size, patch, stride, shape", [
    ((64, 96), 16, 16, (4, 6)),      # exact tiling
    ((64, 96), 24, 16, (4, 6)),      # the last row and column are cut off by the border
    ((64, 96), 64, 8, (1, 5)),       # the patch fills the height
])
def test_map_shapes_follow_patch_and_stride(default_model, photos, size, patch, stride, shape):
    res = occlusion(default_model, photos["coffee"], patch=patch, stride=stride, size=size)
    assert res.image.shape[:2] == size
    for name in ("probability", "labels", "label_probability", "activity"):
        assert getattr(res, name).shape == shape, name
    assert list(res.tops) == list(range(0, shape[0] * stride, stride))
    assert list(res.lefts) == list(range(0, shape[1] * stride, stride))
    data = res.to_dict()
    assert np.array(data["probability"]).shape == shape and np.array(data["activity"]).shape == shape
    assert data["map_shape"] == list(shape)


def test_batched_equals_unbatched(default_model, photos):
    kwargs = dict(patch=48, stride=24, size=(96, 96))
    one = occlusion(default_model, photos["astronaut"], batch_size=1, **kwargs)
    many = occlusion(default_model, photos["astronaut"], batch_size=4, **kwargs)   # 9 copies: 3 uneven chunks
    plain_one = occlusion(default_model, photos["astronaut"], method="plain", batch_size=1, **kwargs)
    plain_many = occlusion(default_model, photos["astronaut"], method="plain", batch_size=9, **kwargs)
    for res in (many, plain_one, plain_many):
        # float32: batch size changes the convolution kernels' summation order, nothing more
        np.testing.assert_allclose(res.probability, one.probability, atol=1e-5)
        np.testing.assert_allclose(res.activity, one.activity, rtol=1e-4, atol=1e-5)
        _assert_labels_match(default_model, photos["astronaut"], kwargs, res, one)


def test_incremental_equals_plain_in_float32_at_224(default_model, photos):
    kwargs = dict(patch=32, stride=48)           # 5x5 positions, corners and edges included
    fast = occlusion(default_model, photos["chelsea"], **kwargs)
    plain = occlusion(default_model, photos["chelsea"], method="plain", **kwargs)
    assert fast.method == "incremental" and plain.method == "plain"
    np.testing.assert_allclose(fast.probability, plain.probability, atol=1e-5)
    np.testing.assert_allclose(fast.activity, plain.activity, rtol=1e-4, atol=1e-4)
    _assert_labels_match(default_model, photos["chelsea"], kwargs, fast, plain)
    # it really skipped work: TF-"same" pads, depthwise and strided convs all ran incrementally
    assert fast.incremental["conv_mac_fraction"] < 0.75
    assert fast.incremental["ops_without_rule"] == {}


def test_incremental_is_exact_in_float64(default_model, photos):
    """The proof of exactness: in float64 the incremental maps equal the plain occluded forward to ~1e-15."""
    module = copy.deepcopy(default_model.module).double()
    model64 = LoadedModel(module, "efficientnet_lite0 float64", default_model.weights, default_model.preprocessing,
                          default_model.class_names)
    kwargs = dict(patch=24, stride=16, size=(64, 80), fill="blur")   # 4x5 positions, last row and column cut off
    fast = occlusion(model64, photos["chelsea"], **kwargs)
    plain = occlusion(model64, photos["chelsea"], method="plain", **kwargs)
    assert fast.probability.dtype == np.float64 and fast.method == "incremental"
    assert np.abs(fast.probability - plain.probability).max() < 1e-12
    assert np.abs(fast.activity - plain.activity).max() < 1e-10
    assert np.array_equal(fast.labels, plain.labels)   # float64, 1e-12 apart: a tie closer than that is not expected


def test_fills_and_target_and_feature_choice(default_model, photos):
    base = dict(patch=56, stride=56)
    gray = occlusion(default_model, photos["chelsea"], **base)
    for fill in ("mean", "blur"):
        other = occlusion(default_model, photos["chelsea"], fill=fill, **base)
        assert other.base_probability == pytest.approx(gray.base_probability)
        assert not np.allclose(other.probability, gray.probability)
    tabby = occlusion(default_model, photos["chelsea"], target="tabby", layer="blocks.5.0.bn2", channel=3, **base)
    assert tabby.target_name == "tabby" and tabby.target == 281
    assert tabby.layer.name == "blocks.5.0.bn2" and tabby.channel == 3
    assert gray.layer.name == default_model.catalogue.features[-1].name   # default: the deepest feature layer


def test_bad_input_gives_clear_errors(default_model, photos):
    before = model_state(default_model.module)
    with pytest.raises(ConvscopeError, match="larger than the image"):
        occlusion(default_model, photos["chelsea"], patch=300)
    with pytest.raises(ConvscopeError, match="fill"):
        occlusion(default_model, photos["chelsea"], fill="pink")
    with pytest.raises(ConvscopeError, match="Did you mean"):
        occlusion(default_model, photos["chelsea"], patch=112, stride=112, target="tabby cta")
    with pytest.raises(ConvscopeError, match="channel 5000 is out of range"):
        occlusion(default_model, photos["chelsea"], patch=112, stride=112, channel=5000)
    with pytest.raises(ConvscopeError, match="at least 1"):
        occluder_grid(224, 224, 32, 0)
    assert model_state(default_model.module) == before


class _ReadsBatchSize(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(y.view(y.size(0), -1))


def test_unsupported_model_falls_back_to_plain_and_says_so(photos):
    torch.manual_seed(0)
    module = _ReadsBatchSize()
    before = model_state(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = occlusion(module, photos["coffee"], patch=16, stride=16, size=(32, 32))
    plain = occlusion(module, photos["coffee"], patch=16, stride=16, size=(32, 32), method="plain")
    assert res.method.startswith("plain (incremental inference fell back")
    assert any("fell back" in str(w.message) for w in caught)
    np.testing.assert_allclose(res.probability, plain.probability, atol=1e-6)
    assert model_state(module) == before


@pytest.mark.parametrize("wrong_chunk, caught", [(1, True), (5, True), (3, False)])
def test_the_spot_check_compares_the_first_and_last_chunks(default_model, photos, monkeypatch, wrong_chunk, caught):
    """An incremental result gone wrong in the first or last chunk is caught, and runs plainly from there."""
    real = engine.incremental_chunk
    calls = {"n": 0}

    def wrong_once(*args):
        calls["n"] += 1
        out, acts, trace = real(*args)
        return (out + 5.0, acts, trace) if calls["n"] == wrong_chunk else (out, acts, trace)

    kwargs = dict(patch=32, stride=32, size=(96, 96), batch_size=2)           # 3x3 copies in 5 chunks
    monkeypatch.setattr(engine, "incremental_chunk", wrong_once)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        res = occlusion(default_model, photos["chelsea"], **kwargs)
    assert res.method.startswith("plain (incremental inference fell back: spot check") == caught
    assert any("spot check" in str(w.message) for w in warned) == caught
    if caught:
        plain = occlusion(default_model, photos["chelsea"], method="plain", **kwargs)
        np.testing.assert_allclose(res.probability, plain.probability, atol=1e-5)


def test_drawings(default_model, photos):
    res = occlusion(default_model, photos["chelsea"], patch=96, stride=64)
    for picture in (res.probability_image(), res.label_image(), res.activity_image(), res.sheet()):
        assert isinstance(picture, Image.Image) and picture.width > res.image.shape[1]


def test_cli_writes_maps_and_pictures(tmp_path, photos, capsys):
    photo = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(photo)
    out = tmp_path / "occ"
    assert main(["occlusion", str(photo), "--patch", "96", "--stride", "64", "--out", str(out)]) == 0
    data = json.loads((out / "occlusion.json").read_text())
    assert np.array(data["probability"]).shape == (3, 3) and np.array(data["labels"]).shape == (3, 3)
    for name in data["files"].values():
        assert (out / name).exists()
    assert "target:" in capsys.readouterr().out
    assert main(["occlusion", str(photo), "--patch", "500", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "larger than the image" in err and "Traceback" not in err


def test_save_writes_the_maps_pictures_and_json_index(default_model, photos, tmp_path):
    res = occlusion(default_model, photos["chelsea"], patch=112, stride=112)     # 2x2 positions
    index = res.save(tmp_path / "occ", stem="cat")
    assert sorted(p.name for p in (tmp_path / "occ").iterdir()) == [
        "cat.json", "cat.png", "cat_activity.png", "cat_labels.png", "cat_probability.png"]
    assert index["files"] == {"json": "cat.json", "sheet": "cat.png", "probability": "cat_probability.png",
                              "labels": "cat_labels.png", "activity": "cat_activity.png"}
    assert json.loads((tmp_path / "occ" / "cat.json").read_text()) == json.loads(json.dumps(index))
    assert {k: v for k, v in index.items() if k != "files"} == res.to_dict()
    assert Image.open(tmp_path / "occ" / "cat.png").size == res.sheet().size
