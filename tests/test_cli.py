import json
import urllib.error

import pytest
import torch
from PIL import Image

from convscope.cli.main import main


@pytest.fixture()
def cat_jpg(tmp_path, photos):
    path = tmp_path / "chelsea.jpg"
    Image.fromarray(photos["chelsea"]).save(path)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_prints_egyptian_cat(cat_jpg, capsys):
    code, out, _ = run(["predict", cat_jpg], capsys)
    assert code == 0
    assert "1. Egyptian cat" in out


def test_layers_lists_vgg_aliases(capsys):
    code, out, _ = run(["layers", "--model", "vgg19", "--random", "--filter", "block1_*"], capsys)
    assert code == 0
    assert "block1_conv2" in out and "features.3" in out and "RANDOM INIT" in out


def test_activations_writes_grids_strip_and_index(cat_jpg, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run(["activations", cat_jpg, "--model", "vgg19", "--random", "--layers",
                        "block1_conv2,block2_conv2", "--size", "64x96", "--overlay", "--save-npz",
                        "--out", out_dir], capsys)
    assert code == 0
    index = json.loads((out_dir / "activations.json").read_text())
    assert [entry["alias"] for entry in index["layers"]] == ["block1_conv2", "block2_conv2"]
    assert index["layers"][0]["captured_shape"] == [64, 64, 96]
    for name in ("block1_conv2.png", "block1_conv2_overlay.png", "evolution.png", "activations.npz"):
        assert (out_dir / name).stat().st_size > 0
    assert Image.open(out_dir / "block1_conv2.png").width >= 16 * 96
    assert not list(out_dir.glob(".*.part"))


def _assert_clean_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convscope: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


@pytest.mark.parametrize("argv, needles", [
    (["layers", "--model", "vgg91"], ["unknown model", "vgg19"]),
    (["activations", "{cat}", "--model", "vgg19", "--random", "--layers", "block1_cnv2"], ["block1_conv2"]),
    (["activations", "{missing}", "--model", "vgg19", "--random"], ["not found"]),
    (["activations", "{text}", "--model", "vgg19", "--random"], ["not an image"]),
    (["activations", "{cut}", "--model", "vgg19", "--random"], ["cannot read"]),
    (["activations", "{cat}", "--size", "0"], ["--size"]),
])
def test_bad_input_is_one_line_exit_2_and_no_partial_output(argv, needles, cat_jpg, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("hello")
    data = cat_jpg.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    paths = {"cat": cat_jpg, "missing": tmp_path / "nope.jpg", "text": tmp_path / "notes.png",
             "cut": tmp_path / "cut.jpg"}
    out_dir = tmp_path / "out"
    argv = [a.format(**paths) for a in argv] + (["--out", str(out_dir)] if argv[0] == "activations" else [])
    code, _, err = run(argv, capsys)
    _assert_clean_error(code, err, *needles)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_offline_torchvision_without_weights(monkeypatch, cat_jpg, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    code, _, err = run(["predict", cat_jpg, "--model", "vgg16"], capsys)
    _assert_clean_error(code, err, "--weights", "--random")


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["activations", "--help"])
    assert "Example:" in capsys.readouterr().out
