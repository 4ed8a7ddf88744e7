"""Precision and memory layout: what "auto" picks, bf16 against fp32, the model left untouched, the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import convscope
from convscope import precision as precision_mod
from convscope.cli.main import main
from convscope.errors import ConvscopeError
from convscope.methods.deconv import deconv
from convscope.methods.features import make_recipe, visualize_features
from convscope.precision import FP32, NUMBERS, PICTURE, Precision, resolve_precision

from .conftest import model_state

MIDDLE = "blocks.3.1.bn1"


def _small_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.ReLU()).eval()


@pytest.mark.parametrize("native, name", [(True, "bf16"), (False, "fp32")])
@pytest.mark.parametrize("nhwc", [True, False])
def test_auto_for_pictures_is_bf16_only_where_native(monkeypatch, native, name, nhwc):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device="cpu": native)
    monkeypatch.setattr(precision_mod, "channels_last_pays", lambda device="cpu": nhwc)
    chosen = resolve_precision("auto", "cpu", purpose=PICTURE, module=_small_conv())
    assert chosen.name == name and chosen.channels_last == nhwc and chosen.requested == "auto"
    assert ("native bf16" in chosen.reason) and (("no native" in chosen.reason) != native)
    assert ("channels-last for the convolutions" in chosen.reason) == nhwc
    # an explicit fp32 for pictures takes the same layout; for numbers the exact default one
    assert resolve_precision("fp32", "cpu", purpose=PICTURE, module=_small_conv()).channels_last == nhwc
    # a model without 2-D convolutions gains nothing from channels-last
    assert not resolve_precision("auto", "cpu", purpose=PICTURE, module=nn.Linear(4, 4)).channels_last


def test_auto_for_numbers_is_exact_fp32_and_named_precisions_apply(monkeypatch):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device="cpu": True)
    model = _small_conv()
    assert resolve_precision("auto", "cpu", purpose=NUMBERS, module=model).exact
    assert resolve_precision("fp32", "cpu", purpose=NUMBERS, module=model).exact
    bf16 = resolve_precision("bf16", "cpu", purpose=NUMBERS, module=model)
    assert bf16.dtype == torch.bfloat16 and bf16.channels_last and not bf16.exact
    assert resolve_precision("fp16", "cpu", purpose=PICTURE, module=model).dtype == torch.float16
    given = Precision("bf16", False, "cpu", "bf16")
    assert resolve_precision(given, "cpu") is given
    with pytest.raises(ConvscopeError, match="unknown precision 'bf17'"):
        resolve_precision("bf17", "cpu")


def test_the_machine_is_described_honestly():
    """native_bf16 agrees with the CPU's own flags (AVX-512 BF16 or AMX), where Linux lists them."""
    flags = precision_mod._cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    assert precision_mod.native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)


@pytest.mark.parametrize("capability, pays", [("AVX2", True), ("DEFAULT", False), ("AVX512", True)])
def test_channels_last_pays_on_avx2_and_avx512_cpus_not_older_ones(monkeypatch, capability, pays):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device="cpu": False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert precision_mod.channels_last_pays("cpu") == pays
    assert precision_mod.channels_last_pays("meta") is False
    chosen = resolve_precision("auto", "cpu", purpose=PICTURE, module=_small_conv())
    assert chosen.channels_last == pays and ("default layout" in chosen.reason) != pays


def test_channels_last_leaves_the_model_as_it_was():
    """Channels-last goes on the input only: parameters keep their values, strides and identity."""
    model = _small_conv()
    before = [(p, p.detach().clone(), p.stride()) for p in model.parameters()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    state = model_state(model)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    chosen = Precision("fp32", True, "cpu", "fp32")
    result = visualize_features(model, "5", [0, 3], steps=3, size=16, precision=chosen)
    assert result.precision is chosen and result.to_dict()["precision"]["channels_last"] is True
    after = list(model.parameters())
    assert [p for p, _, _ in before] == after
    for p, value, stride in before:
        assert torch.equal(p, value) and p.stride() == stride and p.is_contiguous()
    for b, value in buffers:
        assert torch.equal(b, value)
    assert model_state(model) == state
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_channels_last_gives_the_same_values_as_the_default_layout():
    """The layout changes the order of the sums only: outputs agree to float32 rounding."""
    model = _small_conv()
    x = torch.rand(2, 3, 20, 20)
    layout = Precision("fp32", True, "cpu", "fp32")
    with torch.no_grad():
        torch.testing.assert_close(model(layout.input(x)), model(x), rtol=1e-5, atol=1e-5)


def test_bf16_reaches_the_objectives_of_fp32(default_model, one_thread):
    """bf16 autocast (emulated on CPUs without native bf16, only slower there) ends within 5% of fp32
    on the same channels and seed (the objectives evaluated in float32), and its images are sound."""
    runs = {}
    for name in ("fp32", "bf16"):
        runs[name] = visualize_features(default_model, MIDDLE, [1, 2, 5], steps=24, size=40, seed=0,
                                        precision=name)
    fp32 = np.array([r["objective"] for r in runs["fp32"].records])
    bf16 = np.array([r["objective"] for r in runs["bf16"].records])
    starts = np.array([r["start"] for r in runs["fp32"].records])
    assert (fp32 > 2 * starts).all()  # the optimization did something to compare
    # the mean over the channels within 5%; each channel within 10% (two optimizations from one
    # start drift apart step by step, bf16 rounding or not)
    assert abs(bf16.mean() - fp32.mean()) <= 0.05 * fp32.mean()
    assert np.all(np.abs(bf16 - fp32) <= 0.10 * np.abs(fp32))
    images = runs["bf16"].images
    assert images.dtype == np.uint8 and images.shape == (3, 40, 40, 3)
    assert all(images[i].std() > 5 for i in range(3))  # not blank or saturated flat
    assert runs["bf16"].to_dict()["precision"]["name"] == "bf16"
    assert np.isfinite(runs["bf16"].history).all()


def test_deconv_auto_is_exact_and_bf16_is_close(default_model):
    photo = convscope.images.sample_photos()["chelsea"]
    kwargs = dict(channels=[0, 1, 2], size=64, method="guided")
    plain = deconv(default_model, photo, "blocks.2.0.bn1", precision="fp32", **kwargs)
    auto = deconv(default_model, photo, "blocks.2.0.bn1", **kwargs)
    half = deconv(default_model, photo, "blocks.2.0.bn1", precision="bf16", **kwargs)
    assert np.array_equal(auto.projections["guided"].maps, plain.projections["guided"].maps)
    assert auto.to_dict()["precision"]["name"] == "fp32" and half.to_dict()["precision"]["name"] == "bf16"
    # the values come from the float32 whole-image check; bf16 rounds the maps (and flips guided
    # masks where a pre-activation is near zero): about 20% of the norm here, so bf16 is opt-in
    np.testing.assert_array_equal(half.projections["guided"].values, plain.projections["guided"].values)
    a, b = plain.projections["guided"].maps.reshape(3, -1), half.projections["guided"].maps.reshape(3, -1)
    live = np.linalg.norm(a, axis=1) > 0
    assert live.sum() >= 2 and not b[~live].any()
    cosine = (a * b).sum(1)[live] / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))[live]
    assert (cosine > 0.95).all()


def test_fast_recipe_schedule():
    from convscope.atlas.context import ATLAS_RECIPE, AtlasSettings

    fast = make_recipe("fast")
    assert fast.steps == 80 and fast.steps < make_recipe("lucid").steps / 3
    assert AtlasSettings().steps == make_recipe(ATLAS_RECIPE).steps  # the atlas's default follows the recipe
    assert fast.pad == 5 and make_recipe("lucid").pad == 12      # the border: 128 -> 128 and 142 pixels
    warm = round(fast.warmup * fast.steps)
    assert fast.lr_at(0) == pytest.approx(fast.lr / warm)
    assert fast.lr_at(warm) == pytest.approx(fast.lr)
    assert fast.lr_at(fast.steps - 1) < 0.01 * fast.lr
    lrs = [fast.lr_at(s) for s in range(warm, fast.steps)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert make_recipe("lucid").lr_at(100) == make_recipe("lucid").lr
    longer = make_recipe("fast", steps=400)  # the warm-up is a fraction of the steps
    end = round(longer.warmup * 400) - 1
    assert longer.lr_at(end) == pytest.approx(longer.lr) and longer.lr_at(end - 1) < longer.lr


def test_cli_says_which_precision(tmp_path, capsys):
    out = tmp_path / "f"
    assert main(["features", "--layer", "blocks.1.0.bn1", "--channels", "0-1", "--steps", "2", "--size", "32",
                 "--precision", "fp32", "--recipe", "fast", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    layout = ", channels-last" if precision_mod.channels_last_pays("cpu") else ""
    assert f"precision: fp32{layout}" in printed and (layout or "channels-last" not in printed)
    index = json.loads((out / "features.json").read_text())
    assert index["precision"]["name"] == "fp32" and index["recipe"]["name"] == "fast"
    code = main(["features", "--layer", "blocks.1.0.bn1", "--precision", "fp64", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert code == 2 and "--precision" in err and "Traceback" not in err and not (tmp_path / "g").exists()


def test_default_precision_is_fp32_for_engines_called_directly():
    assert FP32.exact and FP32.autocast().__class__.__name__ == "nullcontext"


def test_atlas_stages_key_on_the_precision(default_model, tmp_path):
    """A named precision reaches every stage's cache key; exact fp32 keeps the keys of older builds."""
    from convscope.atlas.context import AtlasSettings, BuildContext
    from convscope.atlas.stages.deconv import DeconvStage
    from convscope.atlas.stages.features import FeaturesStage

    layer = default_model.catalogue.get("blocks.1.0.bn1")
    contexts = {name: BuildContext(default_model, tmp_path, AtlasSettings(precision=name), [layer], [],
                                   progress=False) for name in ("auto", "fp32", "bf16")}
    assert contexts["bf16"].precision(NUMBERS).name == "bf16"
    assert contexts["auto"].precision(NUMBERS).exact
    features = {name: FeaturesStage().settings(ctx, layer) for name, ctx in contexts.items()}
    assert features["bf16"]["precision"] == ["bf16", True]
    assert features["bf16"] != features["fp32"]
    deconv_keys = {name: DeconvStage().settings(ctx, layer) for name, ctx in contexts.items()}
    assert "precision" not in deconv_keys["auto"] and deconv_keys["bf16"]["precision"] == ["bf16", True]


def test_scan_bf16_on_request_and_resume_keeps_the_precision(tmp_path):
    """The scan's auto is exact fp32; bf16 finds the same strongest images up to rounding, says so in
    scan.json, and a checkpoint resumes only at its own precision."""
    from convscope.datasets import TensorImages
    from convscope.methods.scan import scan

    torch.manual_seed(0)
    loaded = convscope.as_loaded(_small_conv())
    pixels = torch.randint(0, 256, (12, 24, 24, 3), dtype=torch.uint8)
    images = TensorImages(pixels)
    plain = scan(loaded, images, "5", top=3, batch_size=4, progress=False, precision="fp32")
    auto = scan(loaded, images, "5", top=3, batch_size=4, progress=False)
    assert auto.topk.equal(plain.topk) and auto.to_dict()["precision"]["name"] == "fp32"
    checkpoint = tmp_path / "state.pt"
    half = scan(loaded, images, "5", top=3, batch_size=4, progress=False, precision="bf16", checkpoint=checkpoint)
    assert half.to_dict()["precision"]["name"] == "bf16"
    top, values = plain.topk.values["5"], half.topk.values["5"]
    torch.testing.assert_close(values, top, rtol=0.03, atol=0.03 * float(top.abs().max()))
    with pytest.raises(ConvscopeError, match="precision"):
        scan(loaded, images, "5", top=3, batch_size=4, progress=False, precision="fp32", checkpoint=checkpoint,
             resume=True)
