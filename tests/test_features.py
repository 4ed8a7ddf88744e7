"""Feature visualization end to end: real weights, batching, dead channels, hooks, errors, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import convscope
from convscope.cli.main import main
from convscope.errors import ConvscopeError
from convscope.hooks import StopForward, frozen, recording
from convscope.methods.features import DEAD_THRESHOLD, figures, make_recipe, visualize, visualize_features
from convscope.methods.features.objectives import Objective, channel
from convscope.rectifiers import redirected_rectifiers

from .conftest import model_state

MIDDLE = "blocks.3.1.bn1"  # EfficientNet-Lite0, block 3 of 0..6: 480 channels, ReLU6 output


@pytest.fixture(scope="module")
def middle_run(default_model, photos):
    before = model_state(default_model.module)
    result = visualize_features(default_model, MIDDLE, [1], steps=64, size=48, seed=0, photos=photos)
    return result, before


def test_a_middle_channel_rises_and_beats_the_photos(middle_run, default_model):
    result, before = middle_run
    record = result.records[0]
    assert record["start"] > 0.01
    assert record["objective"] >= 5 * record["start"]  # after 64 steps, at least 5x the start
    # beats the channel on the sample photos: its mean (same objective) and its strongest unit
    assert record["ratio"] > 1.0 and record["objective"] > record["photo_best"]
    assert record["peak"] > record["photo_peak"]
    assert not record["dead"]
    assert result.images.shape == (1, 48, 48, 3) and result.images.dtype == np.uint8
    assert result.history.shape == (64, 1)
    assert model_state(default_model.module) == before


def test_element_i_depends_only_on_image_i(default_model):
    """The gradient of element i's objective with respect to image j != i is exactly zero."""
    module = default_model.module
    x = torch.rand(3, 3, 40, 40, requires_grad=True)
    with frozen(module), recording(module, [MIDDLE], detach=False, clone=False, stop_after_last=True) as store, \
            redirected_rectifiers():
        with pytest.raises(StopForward):
            module(default_model.preprocessing.normalize(x))
        values = channel(MIDDLE, [1, 2, 5])({MIDDLE: store[MIDDLE]})
    for i in range(3):
        (grad,) = torch.autograd.grad(values[i], x, retain_graph=True)
        others = [j for j in range(3) if j != i]
        assert grad[others].abs().sum() == 0
        assert grad[i].abs().sum() > 0


def test_a_channel_is_the_same_alone_or_in_a_batch_of_16(default_model, photos):
    layer, steps = "blocks.1.1.bn1", 18  # 16 steps with the redirected gradient, then plain
    batch = visualize_features(default_model, layer, list(range(16)), steps=steps, size=32, seed=3, photos=photos,
                               max_batch=16)
    alone = visualize_features(default_model, layer, [9], steps=steps, size=32, seed=3, photos=photos)
    assert batch.chunk_size == 16 and alone.chunk_size == 1
    assert np.abs(batch.images[9].astype(int) - alone.images[0].astype(int)).max() <= 1
    assert batch.records[9]["objective"] == pytest.approx(alone.records[0]["objective"], rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(batch.history[:, 9], alone.history[:, 0], rtol=1e-4, atol=1e-5)
    # and the seed matters
    other = visualize_features(default_model, layer, [9], steps=2, size=32, seed=4, photos=photos)
    assert not np.array_equal(other.images[0], alone.images[0])


class _Tiny(nn.Module):
    """conv(3->3) + ReLU + classifier. Channel 0 random (alive); channel 1 all-zero weights and
    bias -1 (dead: zero on every photo, no gradient can lift it); channel 2 positive weights,
    bias -1: negative on a gray start, so plain gradients are zero there."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 10)
        with torch.no_grad():
            self.conv.weight[1] = 0.0
            self.conv.bias[1] = -1.0
            self.conv.weight[2] = 0.1
            self.conv.bias[2] = -1.0

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def test_dead_channels_are_flagged_and_counted(photos):
    model = _Tiny()
    before = model_state(model)
    result = visualize_features(model, "relu", steps=24, size=32, photos=photos)
    dead = [r["dead"] for r in result.records]
    assert dead == [False, True, False]
    assert result.dead_count == 1 and result.dead_channels == [1]
    assert result.records[1]["photo_peak"] == 0.0 and result.records[1]["objective"] == 0.0
    assert result.to_dict()["dead"] == 1 and result.to_dict()["dead_channels"] == [1]
    assert model_state(model) == before


class _Scaled(nn.Module):
    """conv(3->4) + ReLU, every weight and bias times ``scale``; channel 3 zero weights and bias -1
    (truly zero after the ReLU). With ``all_zero`` every channel is so."""

    def __init__(self, scale: float, all_zero: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.mul_(scale)
            self.conv.bias.mul_(scale)
            dead = slice(None) if all_zero else 3
            self.conv.weight[dead] = 0.0
            self.conv.bias[dead] = -1.0

    def forward(self, x):
        return self.relu(self.conv(x)).mean((2, 3))


def test_dead_is_relative_to_the_layer_scale(photos):
    """A layer at 1e-6 is small, not dead; its truly zero channel still is."""
    result = visualize_features(_Scaled(1e-6), "relu", steps=8, size=24, photos=photos)
    records = result.records
    # the old absolute test (never above 1e-3) would have called every channel dead here
    assert all(r["photo_magnitude"] < 1e-3 and r["objective"] < 1e-3 for r in records)
    assert [r["dead"] for r in records] == [False, False, False, True]
    assert records[3]["photo_magnitude"] == 0.0 and records[3]["objective"] == 0.0
    index = result.to_dict()
    assert 1e-8 < index["layer_scale"] < 1e-4 and index["dead_fraction"] == 1e-3
    assert index["dead_limit"] == pytest.approx(1e-3 * index["layer_scale"], rel=1e-5)
    assert all(r["photo_magnitude"] > index["dead_limit"] and r["objective"] > 0 for r in records[:3])
    assert "0.001 x the layer's scale" in figures.dead_definition(result)


def test_a_layer_zero_on_every_photo_falls_back_to_the_absolute_floor(photos):
    result = visualize_features(_Scaled(1.0, all_zero=True), "relu", steps=4, size=24, photos=photos)
    assert result.dead_count == 4 and result.layer_scale == 0.0
    assert result.to_dict()["dead_limit"] == DEAD_THRESHOLD
    assert "zero on every sample photo" in figures.dead_definition(result)


def test_the_redirected_gradient_revives_a_unit_dead_at_the_start(photos):
    model = _Tiny()
    lucid = make_recipe("lucid", steps=24, size=32)
    plain = visualize_features(model, "relu", [2], recipe=replace(lucid, redirect_steps=0), photos=photos)
    redirected = visualize_features(model, "relu", [2], recipe=lucid, photos=photos)
    assert plain.records[0]["start"] == 0.0 and plain.records[0]["objective"] == 0.0  # stuck at zero
    assert redirected.records[0]["objective"] > 0.01


def test_post_recipe_reproduces_the_plain_ascent(default_model, photos):
    result = visualize_features(default_model, "bn1", [0, 1], recipe="post", steps=10, size=32, photos=photos)
    assert result.recipe.param == "gray" and result.recipe.optimizer == "rms_ascent"
    for record in result.records:
        assert record["objective"] > record["start"]
    # shown with the post's deprocess: mean 0.5, std 0.1 of 255
    assert abs(result.images.mean() - 127.5) < 3 and abs(result.images.std() - 25.5) < 3


def test_composed_objectives_and_layer_objective(photos):
    model = _Tiny()
    both = visualize(model, channel("relu", 0) + 0.5 * channel("relu", 2), steps=4, size=24)
    assert both.images.shape == (1, 24, 24, 3) and both.records[0]["objective"] > both.records[0]["start"]
    dream = visualize_features(model, "relu", objective="layer", steps=4, size=24, photos=photos)
    assert len(dream) == 1 and dream.records[0]["objective"] > dream.records[0]["start"]
    neuron = visualize_features(model, "relu", [0], objective="neuron", steps=4, size=24, photos=photos)
    assert neuron.records[0]["objective"] > neuron.records[0]["start"]


def test_chunks_follow_the_memory_budget(default_model, photos):
    from convscope.methods.features.engine import estimate_bytes_per_image

    catalogue = default_model.catalogue
    shallow, deep = catalogue.get("blocks.1.1.bn1"), catalogue.get(MIDDLE)
    assert estimate_bytes_per_image(default_model, [shallow], (64, 64)) < estimate_bytes_per_image(
        default_model, [deep], (64, 64)) < estimate_bytes_per_image(default_model, [deep], (64, 64), full=True)
    model = _Tiny()
    whole = visualize_features(model, "relu", steps=3, size=24, photos=photos)
    split = visualize_features(model, "relu", steps=3, size=24, photos=photos, memory_budget=1)
    capped = visualize_features(model, "relu", steps=3, size=24, photos=photos, max_batch=2)
    assert (whole.chunk_size, split.chunk_size, capped.chunk_size) == (3, 1, 2)
    assert np.abs(whole.images.astype(int) - split.images.astype(int)).max() <= 1


def test_variants_with_diversity(photos, tmp_path):
    result = visualize_features(_Tiny(), "relu", [0], variants=2, diversity=1.0, steps=4, size=24, photos=photos)
    assert [(r["channel"], r["variant"]) for r in result.records] == [(0, 0), (0, 1)]
    assert not np.array_equal(result.images[0], result.images[1])
    assert result.filenames() == ["ch0000.png", "ch0000_v1.png"]
    index = result.save(tmp_path)
    assert index["count"] == 2 and (tmp_path / "ch0000_v1.png").exists()


def test_class_objective_uses_the_scores_before_a_softmax():
    from convscope.methods.features.engine import logits_layer, optimize
    from convscope.methods.features.objectives import class_logit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5), nn.Softmax(dim=1))
    loaded = convscope.as_loaded(model)
    assert logits_layer(loaded).name == "4"
    assert logits_layer(convscope.as_loaded(_Tiny())) is None
    run = optimize(loaded, lambda units: class_logit(units), [2], recipe=make_recipe("lucid", steps=3, size=24))
    with torch.no_grad():
        scores = model[:5](loaded.preprocessing.normalize(torch.from_numpy(run.images)))
    assert run.final[0] == pytest.approx(float(scores[0, 2]), abs=1e-5)


def test_model_left_untouched_and_no_hook_even_on_error(default_model):
    module = default_model.module
    module.train()
    before = model_state(module)
    broken = Objective(lambda acts: acts[MIDDLE].mean(), [MIDDLE], "not per element")
    with pytest.raises(ConvscopeError, match="one value per batch element"):
        visualize(default_model, broken, steps=2, size=24)
    assert model_state(module) == before
    assert not torch.overrides._get_current_function_mode_stack()
    module.eval()


def test_bad_channel_and_layer_give_clear_errors(default_model):
    with pytest.raises(ConvscopeError, match=r"channel 480 is out of range: layer .* has channels 0\.\.479"):
        visualize_features(default_model, MIDDLE, [3, 480])
    with pytest.raises(ConvscopeError, match="Did you mean"):
        visualize_features(default_model, "blocks.3.1.bn", [0])
    with pytest.raises(ConvscopeError, match="unknown recipe"):
        visualize_features(default_model, MIDDLE, [0], recipe="fancy")


@pytest.mark.parametrize("argv,message", [
    (["--layer", "blocks.3.1.bn9"], "unknown layer"),
    (["--layer", MIDDLE, "--channels", "0,999"], "channel 999 is out of range"),
    (["--objective", "class:5000"], "class 5000 is out of range"),
    (["--objective", "chanel", "--layer", MIDDLE], "unknown objective"),
    (["--objective", "channel"], "needs --layer"),
    (["--layer", MIDDLE, "--memory", "lots"], "--memory: 'lots' is not a size"),
])
def test_cli_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main(["features", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_cli_writes_pngs_sheet_and_index(tmp_path, capsys):
    out = tmp_path / "feat"
    assert main(["features", "--layer", "bn1", "--channels", "0-2", "--steps", "2", "--size", "32",
                 "--out", str(out)]) == 0
    index = json.loads((out / "features.json").read_text())
    assert index["layers"][0]["layer"] == "bn1" and index["layers"][0]["count"] == 3
    layer_index = json.loads((out / "bn1" / "features.json").read_text())
    assert [r["channel"] for r in layer_index["records"]] == [0, 1, 2]
    for record in layer_index["records"]:
        assert (out / "bn1" / record["png"]).exists()
        assert {"objective", "ratio", "dead", "photo_best"} <= set(record)
    assert (out / "bn1" / "sheet.png").exists()
    assert not list(out.rglob("*.part"))
    assert "dead" in capsys.readouterr().out


def test_cli_class_objective(tmp_path):
    out = tmp_path / "cls"
    assert main(["features", "--objective", "class:281", "--steps", "2", "--size", "32", "--out", str(out)]) == 0
    index = json.loads((out / "classes" / "features.json").read_text())
    assert index["records"][0]["class"] == 281 and index["records"][0]["class_name"] == "tabby"
    assert (out / "classes" / "class0281.png").exists()


def test_public_api_is_exported():
    assert {"visualize_features", "visualize_classes", "visualize", "FeatureResult"} <= set(convscope.__all__)


@pytest.mark.parametrize("name, grow", [("lucid", 14), ("fast", 0)])
def test_the_recipe_border_sets_the_size_the_model_sees(photos, name, grow):
    """The transforms' gray border: lucid's 12 pixels make a 24-px image 38 px; fast's 5 keep it 24."""
    model = _Scaled(1.0)
    seen = []
    hook = model.conv.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        visualize_features(model, "relu", [0], recipe=name, steps=6, size=24, photos=photos)
    finally:
        hook.remove()
    # the optimization steps are the most frequent forward passes (the photos and scoring run once)
    assert max(set(seen), key=seen.count) == (24 + grow, 24 + grow)


def test_max_scale_spreads_the_transform_scales_and_reaches_the_optimizer():
    """``max_scale`` gives 11 scales from the recipe's smallest to it, and the optimizer samples them:
    a wider spread changes the images of the same seed."""
    recipe = make_recipe("fast", steps=4, size=32, max_scale=1.3)
    assert recipe.scales[0] == pytest.approx(0.9) and recipe.scales[-1] == pytest.approx(1.3)
    assert len(recipe.scales) == 11 and list(recipe.scales) == sorted(recipe.scales)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    torch.manual_seed(0)
    model[0].reset_parameters()
    plain = visualize_features(model, "1", [0, 1], recipe=make_recipe("fast", steps=4, size=32), precision="fp32")
    wide = visualize_features(model, "1", [0, 1], recipe=recipe, precision="fp32")
    assert not np.array_equal(plain.images, wide.images)
    assert wide.to_dict()["recipe"]["scales"][-1] == pytest.approx(1.3)
