"""The Results own their files: ``.save`` writes what the CLI writes and returns the index it wrote."""

from __future__ import annotations

import json

from PIL import Image

from convscope.cli.main import main
from convscope.methods.activations import activations
from convscope.methods.features import FeatureSet, visualize_features


def files(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def on_disk(index: dict) -> dict:
    """The index as its JSON file holds it (tuples become lists)."""
    return json.loads(json.dumps(index))


def test_activation_result_save_writes_the_cli_files(default_model, photos, tmp_path, capsys):
    cat = tmp_path / "chelsea.png"
    Image.fromarray(photos["chelsea"]).save(cat)
    assert main(["activations", str(cat), "--layers", "bn1,blocks.1.0.bn1", "--size", "48", "--overlay",
                 "--save-npz", "--out", str(tmp_path / "cli")]) == 0
    result = activations(default_model, photos["chelsea"], "bn1,blocks.1.0.bn1", size=48)
    index = result.save(tmp_path / "api", overlay=True, save_npz=True)
    assert files(tmp_path / "api") == files(tmp_path / "cli") == {
        "bn1.png", "bn1_overlay.png", "blocks.1.0.bn1.png", "blocks.1.0.bn1_overlay.png", "evolution.png",
        "activations.npz", "activations.json"}
    assert on_disk(index) == json.loads((tmp_path / "api" / "activations.json").read_text())
    assert on_disk(index) == json.loads((tmp_path / "cli" / "activations.json").read_text())
    plain = result.to_dict()
    assert "grid" not in plain["layers"][0] and plain["layers"][0]["captured_shape"] == index["layers"][0][
        "captured_shape"]


def test_feature_set_save_writes_the_cli_files(default_model, tmp_path, capsys):
    assert main(["features", "--layer", "bn1", "--channels", "0-1", "--steps", "2", "--size", "32",
                 "--out", str(tmp_path / "cli")]) == 0
    result = visualize_features(default_model, "bn1", [0, 1], steps=2, size=32)
    layer_index = result.save(tmp_path / "single")
    assert files(tmp_path / "single") == {"ch0000.png", "ch0001.png", "sheet.png", "features.json"}
    assert on_disk(layer_index) == json.loads((tmp_path / "single" / "features.json").read_text())
    index = FeatureSet([result], default_model.describe(), "channel").save(tmp_path / "api")
    assert files(tmp_path / "api") == files(tmp_path / "cli") == {
        "features.json", "bn1/features.json", "bn1/sheet.png", "bn1/ch0000.png", "bn1/ch0001.png"}
    assert on_disk(index) == json.loads((tmp_path / "api" / "features.json").read_text())
    assert on_disk(index) == json.loads((tmp_path / "cli" / "features.json").read_text())
    cli_records = json.loads((tmp_path / "cli" / "bn1" / "features.json").read_text())["records"]
    assert [r["png"] for r in cli_records] == [r["png"] for r in layer_index["records"]]
    assert [r["channel"] for r in result.to_dict()["records"]] == [0, 1]
