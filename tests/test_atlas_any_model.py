"""The atlas on any CNN: the projection is chosen per layer, and --not-strict reaches every projecting command."""

from __future__ import annotations

import json

import pytest

import convscope
from convscope.atlas.stages.deconv import choose_projection
from convscope.cli.main import main
from convscope.rectifiers import DECONVNET, GRADIENT, GUIDED

BUDGET = ["--channels-per-layer", "2", "--steps", "4", "--size", "32", "--photos", "1", "--top", "2"]
MOBILE_LAYERS = "features.1.block.0.0,features.3.block.0.0"


@pytest.fixture(scope="module")
def convnext():
    return convscope.load_model("convnext_tiny", random=True, device="cpu")


def _deconv_records(out):
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "records" / "deconv").glob("*.json"))}


def test_mobilenet_v3_atlas_uses_the_gradient_and_says_why(tmp_path, capsys):
    out = tmp_path / "atlas"
    assert main(["atlas", "--model", "mobilenet_v3_small", "--random", "--layers", MOBILE_LAYERS, *BUDGET,
                 "--out", str(out)]) == 0
    records = _deconv_records(out)
    assert set(records) == {"features.1.block.0.0", "features.3.block.0.0"}
    for name, record in records.items():
        assert record["method"] == "gradient"
        assert "Hardswish" in record["reason"] and "on the path; guided backprop undefined" in record["reason"]
        layer_page = (out / "L" / name / "index.html").read_text()
        assert "plain gradient" in layer_page and record["reason"] in layer_page
        channel_page = (out / "L" / name / "0.html").read_text()
        assert f"Projection: the plain gradient; {record['reason']}" in channel_page


def test_atlas_not_strict_backpropagates_plainly_under_the_rule(tmp_path):
    out = tmp_path / "atlas"
    assert main(["atlas", "--model", "mobilenet_v3_small", "--random", "--layers", "features.1.block.0.0",
                 "--deconv-method", "guided", "--not-strict", "--skip", "features", *BUDGET, "--out", str(out)]) == 0
    record = _deconv_records(out)["features.1.block.0.0"]
    assert record["method"] == "guided" and "--not-strict" in record["reason"]


def test_convnext_layers_choose_their_projection(convnext):
    stem = convnext.catalogue["features.0.0"]
    block = convnext.catalogue["features.1.0.block.5"]
    assert choose_projection(convnext, stem, "auto") == (GUIDED, None)   # no max-pooling, a conv alone
    rule, reason = choose_projection(convnext, block, "auto")
    assert rule is GRADIENT and reason.startswith("Gelu") and "guided backprop undefined" in reason
    # An explicit guided is honoured where it holds and falls back elsewhere.
    assert choose_projection(convnext, stem, "guided") == (GUIDED, None)
    assert choose_projection(convnext, block, "guided")[0] is GRADIENT
    rule, reason = choose_projection(convnext, block, "guided", strict=False)
    assert rule is GUIDED and "backpropagated plainly" in reason
    assert choose_projection(convnext, block, "gradient") == (GRADIENT, None)


def test_relu_models_keep_their_rule(vgg16, default_model):
    layer = vgg16.catalogue.resolve("block3_conv3")[0]
    assert choose_projection(vgg16, layer, "auto") == (DECONVNET, None)
    assert choose_projection(vgg16, layer, "guided") == (GUIDED, None)
    layer = default_model.catalogue["blocks.2.0.bn2"]
    assert choose_projection(default_model, layer, "auto") == (GUIDED, None)


def test_scan_accepts_not_strict(tmp_path, capsys):
    common = ["scan", "--samples", "--limit", "4", "--size", "64", "--model", "mobilenet_v3_small", "--random",
              "--layers", "features.1.block.0.0", "--top", "2", "--channels", "0-1", "--method", "guided", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "strict")]) == 2
    assert "--not-strict" in capsys.readouterr().err
    assert main([*common, "--not-strict", "--out", str(tmp_path / "loose")]) == 0
    index = json.loads((tmp_path / "loose" / "scan.json").read_text())
    assert any(unit["figure"] for unit in index["layers"][0]["units"])


@pytest.mark.slow
def test_convnext_atlas_builds_with_default_projection(tmp_path):
    out = tmp_path / "atlas"
    layers = "features.0.0,features.1.1.block.0"
    assert main(["atlas", "--model", "convnext_tiny", "--random", "--layers", layers, *BUDGET, "--out", str(out)]) == 0
    records = {record["layer"]: record for record in _deconv_records(out).values()}
    assert records["features.0.0"]["method"] == "guided"
    block = records["features.1.1.block.0"]
    assert block["method"] == "gradient" and "guided backprop undefined" in block["reason"]
    for record in records.values():
        page = (out / "L" / record["slug"] / "index.html").read_text()
        label = {"guided": "guided backprop", "gradient": "plain gradient"}[record["method"]]
        assert f'class="projection">{label}' in page
