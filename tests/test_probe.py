"""Transfer probes: pretrained features beat random-init ones, results are seeded, bad sets are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from convscope import ConvscopeError
from convscope.cli.main import main
from convscope.methods.probe import ProbeDataset, image_folder, lfw_faces, probe, random_init_like

from .conftest import model_state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_builtin_set_is_lfw_faces_vs_nonfaces():
    data = lfw_faces()
    assert len(data) == 200 and data.counts == {"non-face": 100, "face": 100}
    assert data.images[0].shape == (25, 25, 3) and data.images[0].dtype == np.uint8


def test_pretrained_beats_random_init_on_the_builtin_set(default_model):
    # 64x64 inputs keep the test fast; the full-size run is `convscope probe --samples`.
    before = model_state(default_model.module)
    res = probe(default_model, None, "bn1,blocks.4.1.bn1,blocks.5.0.bn2", size=64, folds=5, seed=0)
    assert model_state(default_model.module) == before
    assert res.accuracy.shape == (3, 5) and res.baseline.shape == (3, 5) and res.n_images == 200
    assert "RANDOM INIT" in res.baseline_title
    gain = res.accuracy.mean(1) - res.baseline.mean(1)
    best = int(gain.argmax())
    assert best > 0 and gain[best] >= 0.05, gain                       # a deep layer, by a clear margin
    assert (res.accuracy[best] >= res.baseline[best]).all()            # in every fold, not one lucky split
    assert gain[best] > res.baseline[best].std(ddof=1)
    assert gain[0] < gain[best] - 0.03                                 # the first layer is generic: little gain
    assert res.shapes[0] == (32, 32, 32)                               # shapes at the probe's input size
    table = res.table()
    assert "blocks.5.0.bn2" in table and "±" in table and "200 images" in table


def _small_set(n: int = 20) -> ProbeDataset:
    data = lfw_faces()
    keep = list(range(n)) + list(range(100, 100 + n))
    return ProbeDataset([data.images[i] for i in keep], data.labels[keep], data.class_names, "lfw small")


def test_results_are_deterministic_for_the_seed(default_model):
    kwargs = dict(layers="blocks.2.1.bn3", size=32, folds=4, seed=3)
    first = probe(default_model, _small_set(), **kwargs)
    second = probe(default_model, _small_set(), **kwargs)
    assert np.array_equal(first.accuracy, second.accuracy)
    assert np.array_equal(first.baseline, second.baseline)
    assert first.to_dict() == second.to_dict()


def test_random_init_copy_is_seeded_and_leaves_the_model_alone(default_model):
    before = model_state(default_model.module)
    weights = default_model.module.conv_stem.weight.clone()
    a, b = random_init_like(default_model, seed=1), random_init_like(default_model, seed=1)
    c = random_init_like(default_model, seed=2)
    assert torch.equal(a.module.conv_stem.weight, b.module.conv_stem.weight)
    assert not torch.equal(a.module.conv_stem.weight, c.module.conv_stem.weight)
    assert a.random_init and "RANDOM INIT" in a.title
    assert torch.equal(default_model.module.conv_stem.weight, weights)
    assert model_state(default_model.module) == before


def _write_class(folder, name, photo, count):
    (folder / name).mkdir(parents=True)
    for i in range(count):
        crop = photo[i * 10:i * 10 + 64, i * 10:i * 10 + 64]
        Image.fromarray(crop).save(folder / name / f"{i}.png")


def test_bad_sets_give_clear_errors(tmp_path, default_model, photos):
    with pytest.raises(ConvscopeError, match="not found"):
        image_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvscopeError, match="no images found"):
        image_folder(empty)
    (empty / "cats").mkdir()                                           # a class folder without images
    with pytest.raises(ConvscopeError, match="no images found"):
        image_folder(empty)
    one = tmp_path / "one"
    _write_class(one, "cats", photos["chelsea"], 3)
    with pytest.raises(ConvscopeError, match="only one class"):
        image_folder(one)
    few = tmp_path / "few"
    _write_class(few, "cats", photos["chelsea"], 3)
    _write_class(few, "cups", photos["coffee"], 3)
    with pytest.raises(ConvscopeError, match="needs at least 5 per class"):
        probe(default_model, few, "bn1", folds=5)
    with pytest.raises(ConvscopeError, match="at least 2"):
        probe(default_model, few, "bn1", folds=1)


def test_cli_on_a_folder_writes_table_plot_and_json(tmp_path, photos, capsys):
    data = tmp_path / "data"
    _write_class(data, "cats", photos["chelsea"], 4)
    _write_class(data, "cups", photos["coffee"], 4)
    out = tmp_path / "out"
    code = main(["probe", str(data), "--layers", "bn1", "--folds", "2", "--size", "32", "--no-baseline",
                 "--out", str(out)])
    assert code == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["n_images"] == 8 and result["class_counts"] == {"cats": 4, "cups": 4}
    assert len(result["layers"][0]["accuracy_folds"]) == 2
    assert (out / "probe.png").exists() and "bn1" in (out / "probe.txt").read_text()
    assert "cats 4" in capsys.readouterr().out
    assert main(["probe", "--out", str(out)]) == 2
    assert "--samples" in capsys.readouterr().err
    assert main(["probe", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_save_writes_plot_table_and_json_index(default_model, tmp_path):
    res = probe(default_model, _small_set(6), "bn1", size=32, folds=2, baseline=False)
    index = res.save(tmp_path / "probe")
    assert sorted(p.name for p in (tmp_path / "probe").iterdir()) == ["probe.json", "probe.png", "probe.txt"]
    assert index["files"] == {"json": "probe.json", "plot": "probe.png", "table": "probe.txt"}
    assert json.loads((tmp_path / "probe" / "probe.json").read_text()) == index
    assert {k: v for k, v in index.items() if k != "files"} == res.to_dict()
    assert (tmp_path / "probe" / "probe.txt").read_text() == res.table() + "\n"
    assert Image.open(tmp_path / "probe" / "probe.png").size == res.plot().size
