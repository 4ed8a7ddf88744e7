"""The atlas's projection and budget: calibration, the budget policy, and the CLI's --yes/--budget."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from convscope.atlas import AtlasSettings
from convscope.atlas import plan as atlas_plan
from convscope.atlas.driver import atlas_layers
from convscope.atlas.plan import LayerRate, fit_budget, plan_atlas
from convscope.cli import atlas as cli_atlas
from convscope.cli.main import main
from convscope.models import as_loaded

LAYERS = "bn1,blocks.0.0.bn2,blocks.1.1.bn3,blocks.3.2.bn3,bn2"  # 32, 16, 24, 80 and 1280 channels
SLOW = LayerRate(step=0.01, fixed=0.5, projection=0.05, feature_bytes=8000.0)


@pytest.fixture
def layers(default_model):
    return atlas_layers(default_model, LAYERS)


def test_the_default_is_every_channel_and_the_plan_counts_them(layers):
    rates = {layer.name: SLOW for layer in layers}
    settings = AtlasSettings()
    plan = plan_atlas(layers, settings, rates, photos=8)
    assert plan.channels == {layer.name: layer.channels for layer in layers}
    # steps x 0.01 s per channel, 0.5 s per chunk of 16, 8 projections (one per photo) x 0.05 s
    bn2 = 1280 * (settings.steps * 0.01 + 8 * 0.05) + 80 * 0.5
    assert plan.seconds["bn2"] == pytest.approx(bn2)
    assert plan.total_bytes / plan.total_channels < 60 * 1024


def test_a_budget_keeps_every_layer_with_the_widest_cap_that_fits(layers):
    rates = {layer.name: SLOW for layer in layers}
    settings = AtlasSettings(steps=192)  # about 0.9 h for every channel: half an hour must cut bn2
    plan = fit_budget(layers, settings, rates, photos=8, hours=0.5)
    cap = plan.settings.channels_per_layer
    assert plan.hours <= 0.5 and 24 <= cap < 1280
    assert plan.channels == {layer.name: min(layer.channels, cap) for layer in layers}  # narrow layers whole
    wider = plan_atlas(layers, AtlasSettings(steps=192, channels_per_layer=cap + 1), rates, 8)
    assert wider.hours > 0.5                                                            # the widest cap that fits
    whole = fit_budget(layers, settings, rates, photos=8, hours=100)
    assert whole.settings == settings and whole.total_channels == sum(layer.channels for layer in layers)


def test_a_pool_of_workers_divides_the_heavy_stages_and_the_budget_goes_by_it(layers):
    rates = {layer.name: SLOW for layer in layers}
    settings = AtlasSettings(steps=192)
    alone = plan_atlas(layers, settings, rates, photos=8)
    pooled = plan_atlas(layers, settings, rates, photos=8, speedup=4.0, where="on 4 Ray workers")
    assert pooled.hours == pytest.approx(alone.hours / 4) and pooled.total_bytes == alone.total_bytes
    assert "on 4 Ray workers" in pooled.describe() and "on this machine" in alone.describe()
    # half an hour cuts bn2 on this machine, not on four of them
    assert fit_budget(layers, settings, rates, photos=8, hours=0.5).total_channels < alone.total_channels
    assert fit_budget(layers, settings, rates, photos=8, hours=0.5, speedup=4.0).settings == settings


def test_fewer_projections_are_charged_fewer_projections(layers):
    rates = {layer.name: SLOW for layer in layers}
    scanned = AtlasSettings(scan_images="some/folder")
    nine = plan_atlas(layers, scanned, rates, photos=8)
    three = plan_atlas(layers, replace(scanned, projections=3), rates, photos=8)
    assert three.stage_seconds["deconv"] == pytest.approx(nine.stage_seconds["deconv"] / 3)
    assert three.stage_seconds["features"] == pytest.approx(nine.stage_seconds["features"])


def test_a_tiny_budget_thins_the_layers_evenly(layers):
    rates = {layer.name: LayerRate(step=1.0, fixed=0.0, projection=0.0, feature_bytes=1.0) for layer in layers}
    settings = AtlasSettings()
    plan = fit_budget(layers, settings, rates, photos=8, hours=3 * settings.steps / 3600)  # three channels' worth
    assert [layer.name for layer in plan.layers] == ["bn1", "blocks.1.1.bn3", "bn2"]   # first, middle, last
    assert plan.total_channels == 3 and plan.settings.layers == "bn1,blocks.1.1.bn3,bn2"


def test_calibration_measures_this_machine():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 20, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 4))
    loaded = as_loaded(net)
    layers = atlas_layers(loaded, None)
    settings = AtlasSettings(steps=8, feature_size=32, top=2)
    rates = atlas_plan.calibrate(loaded, layers, settings)
    assert set(rates) == {layer.name for layer in layers}
    for rate in rates.values():
        # step and fixed come from a difference of two timings: >= 0 (clamped); a projection always takes time
        assert rate.step >= 0 and rate.fixed >= 0 and rate.projection > 0 and rate.feature_bytes > 50
    plan = plan_atlas(layers, settings, rates, photos=3)
    assert plan.total_channels == 26 and 0 < plan.hours < 0.1
    assert "26 channels" in plan.describe()


def test_cli_asks_for_yes_above_an_hour_and_fits_a_budget(tmp_path, capsys, monkeypatch):
    slower = LayerRate(step=0.05, fixed=0.5, projection=0.05, feature_bytes=8000.0)   # about 1.8 h in all
    monkeypatch.setattr(atlas_plan, "calibrate", lambda loaded, layers, settings, photos: {
        layer.name: slower for layer in layers})
    out = tmp_path / "atlas"
    assert main(["atlas", "--layers", LAYERS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--yes" in err and "--budget" in err and "projected" in err
    assert not out.exists()                                          # refused before anything was written

    built = []

    def fake_build(loaded, images, folder, settings, **_):
        built.append(settings)
        raise SystemExit(0)
    monkeypatch.setattr(cli_atlas, "build_atlas", fake_build)
    with pytest.raises(SystemExit):
        main(["atlas", "--layers", LAYERS, "--out", str(out), "--budget", "0.5"])
    assert 24 <= built[0].channels_per_layer < 1280
    assert "budget 0.5 h:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["atlas", "--layers", LAYERS, "--out", str(out), "--yes"])
    assert built[1].channels_per_layer is None                       # every channel
    with pytest.raises(SystemExit):
        main(["atlas", "--layers", LAYERS, "--out", str(out), "--channels", "4"])   # 0.2 h: no --yes needed
    assert built[2].channels_per_layer == 4


def test_skipped_stages_are_not_calibrated_and_cost_nothing(default_model, layers):
    settings = AtlasSettings(skip=("features", "deconv"))
    rates = atlas_plan.calibrate(default_model, layers[:1], settings)
    assert rates["bn1"] == LayerRate(0.0, 0.0, 0.0, 0.0)
    assert plan_atlas(layers[:1], settings, rates, photos=8).seconds == {"bn1": 0.0}


def test_rates_between_sampled_layers_are_interpolated_by_position(layers):
    shallow = LayerRate(step=0.01, fixed=0.2, projection=0.01, feature_bytes=4000.0)
    deep = LayerRate(step=0.03, fixed=0.6, projection=0.05, feature_bytes=8000.0)
    rates = atlas_plan._interpolate(layers, [0, 4], {"bn1": shallow, "bn2": deep})
    assert rates["bn1"] == shallow and rates["bn2"] == deep
    middle = rates["blocks.1.1.bn3"]                                   # position 2 of 0..4: halfway
    assert middle.step == pytest.approx(0.02) and middle.projection == pytest.approx(0.03)
    assert rates["blocks.0.0.bn2"].fixed == pytest.approx(0.3)         # a quarter of the way
    one = atlas_plan._interpolate(layers, [4], {"bn2": deep})          # one sample: every layer takes its rates
    assert set(one.values()) == {deep}


def test_cli_caches_the_calibration_in_the_atlas_folder(tmp_path, capsys, monkeypatch):
    calls = []
    quick = LayerRate(step=1e-5, fixed=0.01, projection=0.001, feature_bytes=8000.0)

    def fake_calibrate(loaded, layers, settings, photos):
        calls.append(settings)
        return {layer.name: quick for layer in layers}

    def fake_build(loaded, images, folder, settings, **_):
        raise SystemExit(0)
    monkeypatch.setattr(atlas_plan, "calibrate", fake_calibrate)
    monkeypatch.setattr(cli_atlas, "build_atlas", fake_build)
    out = tmp_path / "atlas"
    for _ in range(2):
        with pytest.raises(SystemExit):
            main(["atlas", "--layers", LAYERS, "--out", str(out)])
    assert len(calls) == 1 and (out / atlas_plan.CALIBRATION_FILE).is_file()
    printed = capsys.readouterr().out
    assert printed.count("calibrating:") == 1 and "cached in --out" in printed
    assert printed.count("projection:") == 2                            # printed before any work, both times
    with pytest.raises(SystemExit):                                      # other settings: measured again
        main(["atlas", "--layers", LAYERS, "--out", str(out), "--size", "64"])
    assert len(calls) == 2


def test_cli_calibrates_before_ray_starts_and_plans_at_the_pools_rate(tmp_path, capsys, monkeypatch):
    """A local cluster's first workers import torch as they start: calibrated beside them, this
    machine's rates would be measured on a shared machine."""
    pytest.importorskip("ray")
    from convscope import distributed

    events = []
    slower = LayerRate(step=0.05, fixed=0.5, projection=0.05, feature_bytes=8000.0)   # about 1.8 h here

    def fake_calibrate(loaded, layers, settings, photos):
        events.append("calibrate")
        return {layer.name: slower for layer in layers}

    class FakePool:
        def __init__(self, target):
            pass

        def __enter__(self):
            events.append("ray started")
            return self

        def __exit__(self, *exc):
            events.append("ray stopped")

        def speedup(self):
            return 4.0, "on 4 Ray workers"

    def fake_build(loaded, images, folder, settings, executor=None, **_):
        events.append(("build", settings.channels_per_layer, type(executor).__name__))
        raise SystemExit(0)

    monkeypatch.setattr(atlas_plan, "calibrate", fake_calibrate)
    monkeypatch.setattr(distributed, "RayExecutor", FakePool)
    monkeypatch.setattr(cli_atlas, "build_atlas", fake_build)
    with pytest.raises(SystemExit):
        main(["atlas", "--layers", LAYERS, "--out", str(tmp_path / "atlas"), "--ray", "auto"])
    # 1.8 h here, under half an hour on the pool: every channel, no --yes needed
    assert events == ["calibrate", "ray started", ("build", None, "FakePool"), "ray stopped"]
    printed = capsys.readouterr().out
    assert printed.count("projection:") == 2 and "on 4 Ray workers" in printed
