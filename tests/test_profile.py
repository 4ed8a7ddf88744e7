"""The depth profile: the cheap dead test, probe determinism, projection trust, the auto rule's defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import convscope
from convscope.cli.main import main
from convscope.hooks import capture
from convscope.images import sample_photos
from convscope.methods.deconv import AUTO, choose_projection
from convscope.methods.probe import RIDGE, cross_validate, digits, orientation
from convscope.methods.profile import DEFAULTS, engine, profile_model
from convscope.rectifiers import GUIDED

from .conftest import model_state


def _photos() -> dict[str, np.ndarray]:
    return sample_photos()


def _blue_net(photos: dict[str, np.ndarray]) -> convscope.LoadedModel:
    """conv 3->4 + ReLU: channel 0 an ordinary filter, 1 truly dead (zero weights, negative bias),
    2 a blue detector whose bias keeps it at zero on every photo, 3 another filter."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU())
    loaded = convscope.as_loaded(net)
    with torch.no_grad():
        conv.weight[1].zero_()
        conv.bias[1] = -1.0
        conv.weight[2].zero_()
        conv.weight[2, 2] = 1.0         # blue ...
        conv.weight[2, :2] = -1.0       # ... minus red and green
        conv.bias[2] = 0.0
        side = min(loaded.preprocessing.input_size)
        peak = max(float(conv(loaded.tensor(p, side)[0])[0, 2].max()) for p in photos.values())
        most = float(conv(loaded.preprocessing.normalize(torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
                                                          .expand(1, 3, 8, 8)))[0, 2, 4, 4])
        assert peak < most  # no photo holds a 3x3 patch of pure blue
        conv.bias[2] = -peak  # zero on every photo; anything bluer than the bluest photo patch lifts it
    return loaded


def test_cheap_dead_test_equals_the_full_one():
    photos = _photos()
    loaded = _blue_net(photos)
    layer = loaded.catalogue.features[0]
    acts, _ = engine.activity(loaded, [layer], photos, None)
    act = acts[layer.name]
    assert act.silent == [1, 2]                      # both silent on every photo
    cheap = engine.dead_channels(loaded, [layer], acts, steps=DEFAULTS["dead_steps"], size=DEFAULTS["dead_size"],
                                 seed=0)[layer.name]
    full = convscope.visualize_features(loaded, layer, photos=photos, size=64)  # every channel, the full 256 steps
    # Both verdicts agree channel by channel: the firing channels 0 and 3 are never dead; the zero
    # channel is; the blue detector, zero on every photo, is not lifted by either optimization.
    assert cheap == full.dead_channels == [1, 2]
    assert full.dead_limit == pytest.approx(act.limit)


@pytest.mark.slow
def test_cheap_dead_test_equals_the_full_one_on_the_default_models_stem(default_model):
    """~50 s on a busy 2-core machine. Real weights: the stem's channels that are silent on the
    photos, and two that fire, under the cheap test at its defaults (in one batch with another
    layer's silent channels) and under feature visualization's full recipe (256 steps at 128 px):
    the same verdict channel by channel."""
    photos = _photos()
    layers = [default_model.catalogue.get(name) for name in ("bn1", "blocks.0.0.bn1")]
    acts, _ = engine.activity(default_model, layers, photos, None)
    stem = acts["bn1"]
    assert stem.silent                                  # the stem has channels silent on every photo
    cheap = engine.dead_channels(default_model, layers, acts, steps=DEFAULTS["dead_steps"], size=DEFAULTS["dead_size"],
                                 seed=0)
    firing = [int(c) for c in np.argsort(-stem.magnitude)[:2]]
    full = convscope.visualize_features(default_model, layers[0], stem.silent + firing, photos=photos,
                                        max_batch=len(stem.silent) + 2)
    assert full.dead_limit == pytest.approx(stem.limit)
    assert cheap["bn1"] == full.dead_channels
    assert not set(firing) & set(cheap["bn1"])


def test_profile_rows_and_files_on_a_small_net(tmp_path):
    photos = _photos()
    loaded = _blue_net(photos)
    before = model_state(loaded.module)
    res = profile_model(loaded, photos=photos, scan_limit=8, dead_steps=16, far_per_class=5, near_per_photo=6,
                        far_size=32, near_size=32, trust_units=1)
    assert model_state(loaded.module) == before
    (row,) = res.rows()
    assert row["rf"] == 3 and row["stride"] == 1 and row["dead_channels"] == [1, 2] and row["silent"] == 2
    assert 0.25 < row["sparsity"] < 1
    assert set(row["trust"]) == {"guided", "gradient"}  # no max-pooling: the deconvnet is not measured
    assert "no max-pooling" in res.methods()["deconvnet"]["verdict"]
    index = res.save(tmp_path)
    assert index["files"] == {"plot": "profile.png", "table": "profile.md", "csv": "profile.csv",
                              "json": "profile.json"}
    assert json.loads((tmp_path / "profile.json").read_text())["layers"][0]["dead"] == 2
    assert "| layer |" in (tmp_path / "profile.md").read_text()
    assert (tmp_path / "profile.csv").read_text().count("\n") == 2


def test_probe_tasks_and_accuracies_are_deterministic_for_a_seed():
    a, b = digits(8, seed=3), digits(8, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images)) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(np.stack(digits(8, seed=4).images), np.stack(a.images))
    near = orientation(4, seed=0)
    assert near.counts == {"upright": 20, "upside down": 20}
    net = convscope.as_loaded(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU()))
    random_model = convscope.methods.probe.random_init_like(net, 0)
    layers = net.catalogue_at((32, 32)).features
    first = engine.transfer(net, random_model, layers, a, (32, 32), folds=4, seed=0)
    again = engine.transfer(net, random_model, layers, b, (32, 32), folds=4, seed=0)
    assert np.array_equal(first.trained, again.trained) and np.array_equal(first.random, again.random)
    assert first.trained.shape == (2, 4) and 0 <= first.trained.min() <= first.trained.max() <= 1


def test_ridge_probe_separates_separable_features():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    X = rng.normal(size=(40, 30)) + labels[:, None] * 3.0
    noise = rng.normal(size=(40, 30))
    scores = cross_validate([X, noise], labels, 4, 0, RIDGE)
    assert scores[0].mean() == 1.0 and scores[1].mean() < 0.8


def test_cascade_blocks_top_first_and_randomized_copies_leave_the_model(default_model):
    groups = engine.cascade_groups(default_model)
    labels = [label for label, _ in groups]
    assert labels[0] == "head" and labels[-1].endswith("(stem)")
    assert labels[1:] == ["stride 32", "stride 16", "stride 8", "stride 4", "stride 2 (stem)"]
    assert "conv_stem" in groups[-1][1] and "classifier" in groups[0][1]
    before = model_state(default_model.module)
    random_model = convscope.methods.probe.random_init_like(default_model, 0)
    top = engine.randomized(default_model, random_model, groups[0][1] + groups[1][1], "top")
    assert model_state(default_model.module) == before
    own, theirs, mixed = (m.module.state_dict() for m in (default_model, random_model, top))
    assert torch.equal(mixed["classifier.weight"], theirs["classifier.weight"])
    assert torch.equal(mixed["conv_stem.weight"], own["conv_stem.weight"])


def test_strongest_unsaturated_skips_a_plateau():
    out = torch.zeros(1, 3, 4, 4)
    out[0, 0, 0, :2] = 6.0        # a ReLU6 plateau
    out[0, 1, 2, 3] = 5.0
    out[0, 2, 1, 1] = 4.0
    units = engine.strongest_unsaturated(out, 2)
    assert [(u.channel, u.row, u.col) for u in units] == [(1, 2, 3), (2, 1, 1)]


@pytest.mark.slow
def test_gradient_decorrelates_under_randomization_more_than_guided(default_model):
    """Adebayo et al.'s qualitative result, on real weights: guided backprop barely changes when the
    weights are randomized, the plain gradient does."""
    photos = _photos()
    layers = [default_model.catalogue.get(name) for name in ("blocks.2.1.bn3", "blocks.4.0.bn1", "blocks.5.3.bn3")]
    random_model = convscope.methods.probe.random_init_like(default_model, 0)
    pre = default_model.preprocessing
    x = pre.to_tensor([pre.fit(p, pre.input_size) for p in photos.values()])
    outputs = capture(default_model.module, x, layers)
    guided, gradient = [], []
    for layer in layers:
        units = engine.strongest_unsaturated(outputs[layer.name], 2)
        rows = random_model.catalogue.get(layer.name)
        for rule, into in ((GUIDED, guided), (convscope.rectifiers.GRADIENT, gradient)):
            ref, _ = engine.project_maps(default_model, x, layer, units, rule)
            other, _ = engine.project_maps(random_model, x, rows, units, rule)
            into.extend(engine.projection_similarity(ref, other))
    # measured 0.60 vs 0.75 (3 layers, 6 units each): inside a receptive field both |maps| keep the
    # field's centre-weighted footprint, so neither falls to 0 as the logit maps of the paper do
    assert np.nanmedian(gradient) < np.nanmedian(guided) - 0.1


def test_auto_is_the_default_of_deconv_and_scan(default_model, tmp_path):
    photo = _photos()["coffee"]
    res = convscope.deconv(default_model, photo, "blocks.2.1.bn3", top=2, size=96)
    assert list(res.projections) == ["guided"]      # no max-pooling in the default model
    assert choose_projection(default_model, res.layer, AUTO) == (GUIDED, None)


def test_profile_cli_refuses_bad_input_before_loading(tmp_path, capsys):
    assert main(["profile", "--images", str(tmp_path / "missing"), "--samples", "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_atlas_model_page_has_the_depth_profile_and_channel_pages_link_to_trust(tmp_path):
    from convscope.atlas import AtlasSettings, build_atlas

    photos = _photos()
    loaded = _blue_net(photos)
    settings = AtlasSettings(channels_per_layer=1, steps=4, feature_size=32, top=2, profile=True)
    build = build_atlas(loaded, photos, tmp_path, settings, progress=False)
    model_page = build.index.read_text()
    assert "Depth profile" in model_page and 'id="trust-guided"' in model_page
    assert "not applicable: the model has no max-pooling" in model_page
    channel_page = next((tmp_path / "L").glob("*/0.html")).read_text()
    assert 'index.html#trust-guided"' in channel_page
    record = json.loads((tmp_path / "records" / "profile.json").read_text())
    assert 1 in record["layers"][0]["dead_channels"] and 0 not in record["layers"][0]["dead_channels"]


@pytest.mark.slow
def test_profile_runs_on_vgg19_random_with_the_deconvnet_measured(vgg19):
    """~100 s on a busy 2-core machine: VGG19's random baseline and six cascade copies of 140M weights."""
    from dataclasses import replace

    small = replace(vgg19, preprocessing=replace(vgg19.preprocessing, input_size=(64, 64)))
    before = model_state(vgg19.module)
    res = profile_model(small, "block1_conv1,block3_conv1,block5_conv1", photos=_photos(), scan_limit=4,
                        dead_steps=4, far_per_class=5, near_per_photo=6, far_size=32, near_size=32, trust_layers=3)
    assert model_state(vgg19.module) == before
    assert res.settings["baseline_seed"] == 1            # a random-init model is not its own baseline
    assert [t.rule.name for t in res.trust] == ["deconvnet", "guided", "gradient"]   # max-pooling: switches
    assert res.cascade_steps == ["head", "stride 16", "stride 8", "stride 4", "stride 2", "stride 1 (stem)"]
    assert [row["rf"] for row in res.rows()] == [3, 24, 156]
    assert "RANDOM INIT" in res.table()


def test_trust_verdict_is_calibrated_by_the_same_units_on_another_photo():
    from convscope.methods.profile import insensitive

    rng = np.random.default_rng(0)
    footprint = 0.8 + 0.05 * rng.standard_normal(24)       # what any photo's map shares inside the field
    # maps that keep the photo after randomization: reliably above the other photo's level
    flag, p = insensitive(footprint + 0.1, footprint)
    assert flag is True and p < 0.05
    # maps that lost the photo: as close as another photo's map, however high the correlation itself
    flag, p = insensitive(footprint + 0.02 * rng.standard_normal(24), footprint)
    assert flag is False and p > 0.05
    assert insensitive(footprint[:3], footprint[:3] - 1) == (None, None)      # too few units to say
