"""Dataset scan: top-k against brute force (ties included), merge algebra, resume, memory, the CLI."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import convscope
from convscope.cli.main import main
from convscope.datasets import SampleImages, TensorImages
from convscope.hooks import capture
from convscope.methods.scan import EMPTY, TopK, default_layers, load_checkpoint, read_scan, scan
from convscope.methods.scan import engine as scan_engine
from convscope.methods.scan import result as scan_result

from .conftest import model_state

# ----------------------------------------------------------------- TopK on synthetic maps


def _brute_force(maps: torch.Tensor, ids: list[int], k: int):
    """Per channel: each image's maximum (first position on ties), sorted by (-value, id), first k."""
    n, c = maps.shape[:2]
    flat = maps.flatten(2)
    out_v, out_i, out_p = [], [], []
    for ch in range(c):
        rows = []
        for b in range(n):
            values = flat[b, ch].tolist()
            best = max(values)
            rows.append((-best, ids[b], values.index(best)))
        rows.sort()
        rows = rows[:k]
        pad = k - len(rows)
        out_v.append([-r[0] for r in rows] + [-math.inf] * pad)
        out_i.append([r[1] for r in rows] + [EMPTY] * pad)
        out_p.append([r[2] for r in rows] + [-1] * pad)
    return torch.tensor(out_v), torch.tensor(out_i), torch.tensor(out_p)


# Two float32 forwards of the same images in different batch shapes may differ in the last bits
# (measured ~1e-6 here; AVX-512 kernels differ from older ones): values are compared to TIE, and
# an image or position is required to match only where no rival is within TIE, so a near-tie
# may flip. Exact ties (ReLU6 at 6.0) are checked on their own.
TIE = 1e-4


def _assert_same_ranking(state: TopK, layer: str, maps: torch.Tensor, ids: list[int], min_checked: float = 0.5):
    """``state`` ranks ``maps`` like :func:`_brute_force`, up to near-ties; maps come from another batch shape."""
    k = state.k
    values, images, positions = _brute_force(maps, ids, k)
    torch.testing.assert_close(state.values[layer], values, rtol=1e-5, atol=1e-5)
    flat = maps.flatten(2)                                          # (N, C, h*w)
    peaks = flat.amax(dim=2)                                        # (N, C)
    second = flat.topk(2, dim=2).values[..., 1] if flat.shape[2] > 1 else torch.full_like(peaks, -math.inf)
    row_of = {image_id: b for b, image_id in enumerate(ids)}
    checked = total = 0
    for c in range(maps.shape[1]):
        for j in range(k):
            if images[c, j] == EMPTY:
                continue
            total += 1
            rivals = (peaks[:, c] - values[c, j]).abs() <= TIE
            if int(rivals.sum()) > 1:                               # another image within TIE: may swap
                continue
            checked += 1
            assert int(state.images[layer][c, j]) == int(images[c, j]), (layer, c, j)
            b = row_of[int(images[c, j])]
            if float(peaks[b, c] - second[b, c]) > TIE:             # a clear best position in that image
                assert int(state.positions[layer][c, j]) == int(positions[c, j]), (layer, c, j)
    assert checked >= min_checked * total, f"only {checked} of {total} ranks are clear of ties"


def _tied_maps(n=37, c=5, h=3, w=4, seed=0) -> torch.Tensor:
    """Small integer activations: many images tie on a channel, many positions tie in an image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (n, c, h, w), generator=g).float()


def _fold(maps: torch.Tensor, k: int, batch: int, ids=None, layer="a") -> TopK:
    ids = torch.arange(maps.shape[0]) if ids is None else torch.as_tensor(ids)
    state = TopK.empty(k, {layer: maps.shape[1]})
    for s in range(0, maps.shape[0], batch):
        state.update({layer: maps[s:s + batch]}, ids[s:s + batch])
    return state


@pytest.mark.parametrize("k", [1, 9, 50])
@pytest.mark.parametrize("batch", [1, 8, 37])
def test_topk_equals_brute_force_with_ties(k, batch):
    maps = _tied_maps()
    ids = list(range(100, 137))
    state = _fold(maps, k, batch, ids)
    values, images, positions = _brute_force(maps, ids, k)
    assert torch.equal(state.values["a"], values)
    assert torch.equal(state.images["a"], images)
    assert torch.equal(state.positions["a"], positions)
    assert state.images_seen == 37


def test_topk_is_independent_of_image_order():
    maps = _tied_maps()
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(3))
    shuffled = _fold(maps[perm], 9, 5, ids=perm)
    assert shuffled.equal(_fold(maps, 9, 37))


def test_each_channel_keeps_distinct_images():
    maps = _tied_maps(n=30)
    state = _fold(maps, 9, 4)
    for row in state.images["a"].tolist():
        assert len(set(row)) == len(row)


def test_nan_never_ranks():
    maps = _tied_maps(n=12)
    maps[3] = float("nan")
    state = _fold(maps, 12, 5)
    assert 3 == state.images["a"][:, -1].unique().item()        # last, below every real value
    assert torch.isinf(state.values["a"][:, -1]).all()


def test_merge_is_associative_commutative_and_idempotent():
    maps = _tied_maps(n=45, c=6)
    a, b, c = _fold(maps[:10], 9, 4), _fold(maps[10:30], 9, 7, ids=range(10, 30)), \
        _fold(maps[30:], 9, 3, ids=range(30, 45))
    whole = _fold(maps, 9, 45)
    assert a.merge(b).merge(c).equal(whole)
    assert a.merge(b.merge(c)).equal(whole)
    assert c.merge(a).merge(b).equal(whole)
    assert a.merge(b).equal(b.merge(a))
    assert a.merge(a).equal(a) and a.merge(a).images_seen == 10  # a retried shard counts once
    assert whole.merge(b).equal(whole)
    # overlapping shards: images 10..29 are in both, and counted once
    overlap = _fold(maps[:30], 9, 8).merge(_fold(maps[10:], 9, 6, ids=range(10, 45)))
    assert overlap.equal(whole) and overlap.images_seen == 45 and overlap.seen == [(0, 45)]
    with pytest.raises(convscope.ConvscopeError):
        a.merge(_fold(maps[:10], 5, 4))


def test_merge_of_states_without_their_ids_refuses_overlap():
    maps = _tied_maps(n=20, c=3)
    a, b = _fold(maps[:10], 4, 5), _fold(maps[10:], 4, 5, ids=range(10, 20))
    blind = lambda s: TopK(s.k, s.values, s.images, s.positions, s.map_sizes, s.images_seen)  # noqa: E731
    assert blind(a).seen is None and blind(a).merge(blind(b)).images_seen == 20
    with pytest.raises(convscope.ConvscopeError, match="twice"):
        blind(a).merge(blind(a))


def test_seen_ids_are_ranges():
    state = _fold(_tied_maps(n=12), 3, 5, ids=[0, 1, 2, 5, 6, 7, 8, 20, 21, 3, 4, 30])
    assert state.seen == [(0, 9), (20, 22), (30, 31)] and state.images_seen == 12


def test_state_size_does_not_grow_with_the_number_of_images():
    small = _fold(_tied_maps(n=9, c=64, h=8, w=8), 9, 9)
    large = _fold(_tied_maps(n=400, c=64, h=8, w=8), 9, 50)
    assert small.nbytes == large.nbytes == 64 * 9 * (4 + 8 + 8)
    assert large.images_seen == 400


def test_state_dict_round_trip():
    state = _fold(_tied_maps(), 9, 8)
    again = TopK.from_state_dict(state.state_dict())
    assert again.equal(state) and again.map_sizes == state.map_sizes and again.seen == state.seen == [(0, 37)]


# ----------------------------------------------------------------- scans with real models


@pytest.fixture(scope="module")
def small_samples() -> TensorImages:
    """40 windows of the sample set at 64x64: enough for ties and ranks, quick on the CPU."""
    images = SampleImages((64, 64), limit=40)
    pixels = torch.stack([images[i][1] for i in range(len(images))])
    return TensorImages(pixels, [images.path(i) for i in range(len(images))])


LAYERS = "blocks.1.1.bn3,blocks.2.1.bn3,blocks.3.0.bn1"


@pytest.fixture(scope="module")
def full_scan(default_model, small_samples):
    before = model_state(default_model.module)
    result = scan(default_model, small_samples, LAYERS, top=9, batch_size=8, progress=False)
    assert model_state(default_model.module) == before
    return result


def test_scan_equals_brute_force_on_the_default_model(default_model, small_samples, full_scan):
    result = full_scan
    x = default_model.preprocessing.to_tensor(list(small_samples.pixels.numpy()))
    maps = capture(default_model.module, x, [layer.name for layer in result.layers])   # batch 40, the scan's 8
    for layer in result.layers:
        _assert_same_ranking(result.topk, layer.name, maps[layer.name], list(range(40)))
        for c in range(layer.channels):
            examples = result.examples(layer, c)
            assert len({e.image for e in examples}) == len(examples) == 9
    # ReLU6 saturates: blocks.3.0.bn1 has ties at 6.0, broken by image id
    tied = result.topk.values["blocks.3.0.bn1"]
    rows = (tied[:, :2] == 6.0).all(dim=1)
    if rows.any():
        ids = result.topk.images["blocks.3.0.bn1"][rows]
        assert (ids[:, 0] < ids[:, 1]).all()


def test_examples_give_rows_columns_and_boxes(default_model, small_samples):
    result = scan(default_model, small_samples, "blocks.2.1.bn3", top=4, batch_size=40, progress=False)
    layer = result.layers[0]
    h, w = result.topk.map_sizes[layer.name]
    assert (h, w) == (8, 8)                                          # 64 / stride 8
    for e in result.examples(layer, 5):
        assert 0 <= e.row < h and 0 <= e.col < w
        assert e.box == layer.box(e.row, e.col, (64, 64))
        assert e.path == small_samples.path(e.image)


def test_default_layers(vgg16):
    assert [layer.alias for layer in default_layers(vgg16.catalogue)] == ["block3_conv3", "block4_conv3", "block5_conv3"]


def test_resume_after_an_interruption_gives_the_uninterrupted_result(default_model, small_samples, full_scan,
                                                                     tmp_path, monkeypatch):
    checkpoint = tmp_path / "state.pt"
    saves = []
    real_save = scan_engine._save_checkpoint

    def spy(path, payload):
        real_save(path, payload)
        saves.append(payload["next"])
        if payload["next"] == 16:                                   # the periodic save after batch 2
            shutil.copy(path, tmp_path / "periodic.pt")

    monkeypatch.setattr(scan_engine, "_save_checkpoint", spy)
    calls = {"n": 0}
    real_update = TopK.update

    def crash(self, maps, ids):                                     # dies while folding in batch 4
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        real_update(self, maps, ids)

    before = model_state(default_model.module)
    with monkeypatch.context() as patch:
        patch.setattr(TopK, "update", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            scan(default_model, small_samples, LAYERS, batch_size=8, checkpoint=checkpoint, checkpoint_every=2,
                 progress=False)
    assert model_state(default_model.module) == before              # no hook left by the scan
    assert saves == [16, 24]                                        # periodic, then the save on the crash
    assert load_checkpoint(checkpoint)["next"] == 24

    resumed = scan(default_model, small_samples, LAYERS, batch_size=8, checkpoint=checkpoint, resume=True,
                   progress=False)
    # bit for bit: the resumed scan repeats the very same batches (0-8, ..., 32-40) as the uninterrupted one
    assert resumed.topk.equal(full_scan.topk)

    # as if killed hard right after the periodic checkpoint: resume from that file instead
    shutil.copy(tmp_path / "periodic.pt", checkpoint)
    again = scan(default_model, small_samples, LAYERS, batch_size=32, checkpoint=checkpoint, resume=True,
                 progress=False)                                     # the checkpoint's batch size is used
    assert again.topk.equal(full_scan.topk)


def test_resume_refuses_a_different_setup(default_model, small_samples, tmp_path):
    checkpoint = tmp_path / "state.pt"
    scan(default_model, small_samples, "blocks.2.1.bn3", top=3, batch_size=20, checkpoint=checkpoint, progress=False)
    with pytest.raises(convscope.ConvscopeError, match="--top"):
        scan(default_model, small_samples, "blocks.2.1.bn3", top=4, checkpoint=checkpoint, resume=True, progress=False)
    other = TensorImages(small_samples.pixels.flip(0))
    with pytest.raises(convscope.ConvscopeError, match="image set"):
        scan(default_model, other, "blocks.2.1.bn3", top=3, checkpoint=checkpoint, resume=True, progress=False)


def test_shards_merge_to_the_whole_scan(default_model, small_samples, full_scan):
    whole = full_scan
    parts = [scan(default_model, small_samples, LAYERS, batch_size=8, start=s, stop=s + 16, progress=False)
             for s in (0, 16, 32)]
    merged = parts[2].topk.merge(parts[0].topk).merge(parts[1].topk)
    # bit for bit: the shards' batches of 8 are the whole scan's batches, the same computation
    assert merged.equal(whole.topk)


def test_scan_memory_is_flat_in_the_number_of_images(default_model, small_samples, full_scan):
    few = scan(default_model, TensorImages(small_samples.pixels[:8]), LAYERS, batch_size=8, progress=False)
    many = full_scan
    assert few.topk.nbytes == many.topk.nbytes
    assert few.images_scanned == 8 and many.images_scanned == 40


def test_save_writes_the_index_without_figures(default_model, small_samples, tmp_path):
    result = scan(default_model, small_samples, "blocks.1.1.bn3,blocks.2.1.bn3", top=9, batch_size=20, progress=False)
    index = result.save(tmp_path, method=None, progress=False)
    on_disk = json.loads((tmp_path / "scan.json").read_text())
    assert on_disk == json.loads(json.dumps(index))
    assert on_disk["format"] == "convscope.scan/1" and on_disk["top"] == 9 and on_disk["images_scanned"] == 40
    layer = on_disk["layers"][1]
    assert layer["name"] == "blocks.2.1.bn3" and layer["shape"] == [40, 8, 8] and len(layer["units"]) == 40
    example = layer["units"][3]["examples"][0]
    assert set(example) == {"rank", "image", "value", "row", "col", "box", "clipped", "rerun_value"}
    assert str(example["image"]) in on_disk["images"]
    assert on_disk["images"][str(example["image"])]["path"].startswith("skimage:")
    arrays = np.load(tmp_path / "topk.npz")
    assert np.array_equal(arrays["blocks.2.1.bn3/images"], result.topk.images["blocks.2.1.bn3"].numpy())


def test_to_dict_is_the_index_without_figures_and_a_bad_method_writes_nothing(full_scan, tmp_path):
    index = full_scan.save(tmp_path / "run", method=None, progress=False)
    assert full_scan.to_dict() == {key: value for key, value in index.items() if key != "arrays"}
    with pytest.raises(convscope.ConvscopeError, match="deconvnet"):
        full_scan.save(tmp_path / "typo", method="deconvnett", progress=False)
    assert not (tmp_path / "typo").exists()


def test_a_run_is_read_only_through_its_manifest(default_model, small_samples, tmp_path, monkeypatch):
    result = scan(default_model, small_samples, "blocks.2.1.bn3", top=3, batch_size=20, progress=False)
    result.save(tmp_path, channels=[1], progress=False)
    index, arrays = read_scan(tmp_path)
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert sorted(manifest["files"]) == ["blocks.2.1.bn3/c0001.png", "scan.json", "topk.npz"]
    assert index["top"] == 3 and arrays["blocks.2.1.bn3/images"].shape == (40, 3)

    # a second write dies after topk.npz and before scan.json: the arrays are new, the index old
    other = scan(default_model, small_samples, "blocks.2.1.bn3", top=5, batch_size=20, progress=False)
    real_save_json = scan_result.save_json

    def crash(data, path):
        if str(path).endswith("scan.json"):
            raise OSError("disk full")
        return real_save_json(data, path)

    with monkeypatch.context() as patch:
        patch.setattr(scan_result, "save_json", crash)
        with pytest.raises(OSError, match="disk full"):
            other.save(tmp_path, method=None, progress=False)
    assert json.loads((tmp_path / "scan.json").read_text())["top"] == 3
    assert np.load(tmp_path / "topk.npz")["blocks.2.1.bn3/images"].shape == (40, 5)
    with pytest.raises(convscope.ConvscopeError, match="no complete scan run"):
        read_scan(tmp_path)

    other.save(tmp_path, method=None, progress=False)
    assert read_scan(tmp_path)[0]["top"] == 5
    (tmp_path / "scan.json").write_text((tmp_path / "scan.json").read_text().replace('"top": 5', '"top": 6'))
    with pytest.raises(convscope.ConvscopeError, match="scan.json changed"):
        read_scan(tmp_path)


def test_a_failed_checkpoint_save_keeps_the_original_error(default_model, small_samples, tmp_path, monkeypatch):
    def fail_on_batch_2(self, maps, ids):
        raise RuntimeError("the scan's own error")

    def no_space(path, payload):
        raise OSError("no space left on device")

    monkeypatch.setattr(TopK, "update", fail_on_batch_2)
    monkeypatch.setattr(scan_engine, "_save_checkpoint", no_space)
    with pytest.warns(UserWarning, match="could not be saved"), \
            pytest.raises(RuntimeError, match="the scan's own error") as caught:
        scan(default_model, TensorImages(small_samples.pixels[:4]), "blocks.2.1.bn3", batch_size=2,
             checkpoint=tmp_path / "state.pt", progress=False)
    assert any("no space left on device" in note for note in getattr(caught.value, "__notes__", ["no space left on device"]))


def test_cli_scan_samples_without_render(tmp_path, capsys):
    out = tmp_path / "scan"
    rc = main(["scan", "--samples", "--limit", "24", "--size", "64", "--layers", "blocks.2.1.bn3", "--top", "4",
               "--no-render", "--quiet", "--resume", "--out", str(out)])     # nothing to resume: a new scan
    assert rc == 0
    text = capsys.readouterr().out
    assert "scanned 24 images" in text and "demonstration set" in text
    index = json.loads((out / "scan.json").read_text())
    assert index["images_scanned"] == 24 and (out / "scan_state.pt").exists()
    assert load_checkpoint(out / "scan_state.pt")["next"] == 24
    # --resume alone takes the source, layers, k and size from the checkpoint
    assert main(["scan", "--resume", "--no-render", "--quiet", "--out", str(out)]) == 0
    assert "scanned 24 images" in capsys.readouterr().out
    assert json.loads((out / "scan.json").read_text())["layers"] == index["layers"]


def test_cli_scan_user_errors(tmp_path, capsys):
    assert main(["scan", "--out", str(tmp_path)]) == 2
    assert "FOLDER" in capsys.readouterr().err
    assert main(["scan", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


class _InPlaceResidual(torch.nn.Module):
    """``out = conv2(x); out += x``: the recorded conv2 output is changed in place afterwards."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        out = self.conv2(x)
        out += x
        return self.head(out)


def test_scan_copies_maps_that_are_changed_in_place():
    torch.manual_seed(0)
    loaded = convscope.as_loaded(_InPlaceResidual())
    pixels = torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8)
    result = scan(loaded, TensorImages(pixels), "conv2", top=3, batch_size=5, progress=False)
    x = loaded.preprocessing.to_tensor(list(pixels.numpy()))
    maps = capture(loaded.module, x, ["conv2"])["conv2"]
    _assert_same_ranking(result.topk, "conv2", maps, list(range(12)))          # batches of 5 vs one of 12


def test_tiles_stand_for_the_whole_receptive_field(vgg16):
    from PIL import Image

    from convscope.methods.scan import Example, channel_figure
    from convscope.methods.scan.figures import _place

    layer = vgg16.catalogue.get("block3_conv3")                       # RF 40, stride 4, starts at -18
    photo = np.full((224, 224, 3), 90, np.uint8)
    corner = Example(0, 0, "a", 1.0, 0, 0, layer.box(0, 0, (224, 224)), True)
    inside = Example(1, 1, "b", 0.5, 20, 20, layer.box(20, 20, (224, 224)), False)
    assert corner.box == (0, 0, 22, 22) and inside.box == (62, 62, 102, 102)
    tiles = []
    for e in (corner, inside):
        t, left, b, r = e.box
        tiles.append(_place(Image.fromarray(photo[t:b, left:r]), e, layer, (40, 40), scale=2.0))
    assert tiles[0].shape == tiles[1].shape == (80, 80, 3)
    assert (tiles[0][:36, :36] == 255).all()                         # outside the image: white
    assert (tiles[0][36:, 36:] == 90).all()                          # the clipped box sits bottom-right
    assert (tiles[1] == 90).all()                                    # an unclipped box fills its tile
    crop = Image.fromarray(photo[62:102, 62:102])
    figure = channel_figure(layer, 7, [inside] * 9, [(crop, crop)] * 9, image_hw=(224, 224), images_scanned=100,
                            model_title="vgg16")
    assert figure.width >= 2 * (3 * 64 + 4) + 10 and figure.height > 3 * 64


# ----------------------------------------------------------------- rendering with the auto rule


@pytest.fixture(scope="module")
def rendered(default_model, small_samples, tmp_path_factory):
    """A scan of 40 windows at 64x64, two layers, rendered for three channels."""
    out = tmp_path_factory.mktemp("scan")
    result = scan(default_model, small_samples, "blocks.1.1.bn3,blocks.2.1.bn3", top=9, batch_size=20, progress=False)
    before = model_state(default_model.module)
    index = result.save(out, channels=[0, 5, 23], progress=False)
    assert model_state(default_model.module) == before
    return result, index, out


def test_figures_for_the_chosen_channels_and_rerun_values_match(rendered):
    from PIL import Image

    result, index, out = rendered
    # auto: no max-pooling in the default model, so guided backprop (the deconvnet would ignore the image)
    assert index["method"] == "guided"
    assert [layer["method"] for layer in index["layers"]] == ["guided", "guided"]
    for layer in index["layers"]:
        drawn = [u for u in layer["units"] if u["figure"]]
        assert [u["channel"] for u in drawn] == [0, 5, 23]
        for unit in drawn:
            figure = Image.open(out / unit["figure"])
            assert figure.width > 2 * 3 * 40 and figure.height > 3 * 40
            for e in unit["examples"]:
                assert e["rerun_value"] == pytest.approx(e["value"], rel=1e-3, abs=1e-4)
        assert all(e["rerun_value"] is None for u in layer["units"] if not u["figure"] for e in u["examples"])
    assert index["drift"]["units"] == 0


def test_projection_and_patch_share_the_box(rendered, default_model):
    from convscope.methods.deconv import Unit, project_units

    result, _, _ = rendered
    layer = result.layer("blocks.2.1.bn3")
    example = result.examples(layer, 5)[0]
    photo = result.images.load(example.image)
    x = default_model.preprocessing.to_tensor(photo)
    proj = project_units(default_model, x, layer, [Unit(5, example.row, example.col)])
    assert tuple(proj.boxes[0]) == example.box
    top, left, bottom, right = example.box
    outside = np.ones(proj.maps[0].shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert np.abs(proj.maps[0][outside]).max() == 0                   # nothing leaks out of the box
    assert np.abs(proj.maps[0][~outside]).max() > 0


def test_drift_between_scan_and_rerun_is_warned(rendered, tmp_path):
    result, _, _ = rendered
    name = "blocks.1.1.bn3"
    skewed = result.topk.copy()
    skewed.values = {**skewed.values, name: skewed.values[name] * 1.5}
    fake = convscope.ScanResult(result.model, result.layers[:1], TopK(
        skewed.k, {name: skewed.values[name]}, {name: skewed.images[name]}, {name: skewed.positions[name]},
        {name: skewed.map_sizes[name]}, skewed.images_seen), result.images)
    with pytest.warns(UserWarning, match="differ from the scan"):
        index = fake.save(tmp_path, channels=[0], progress=False)
    assert index["drift"]["units"] > 0


def test_rerun_values_stay_with_their_examples_when_an_image_is_gone(rendered, tmp_path, monkeypatch):
    """An image that cannot be read again leaves its examples' rerun_value empty; the others keep their own."""
    from convscope.errors import ConvscopeError

    result, _, _ = rendered
    name = "blocks.2.1.bn3"
    gone = result.examples(name, 5)[1].image  # the channel's second example: a misalignment would show
    load = result.images.load

    def load_but_one(i):
        if i == gone:
            raise ConvscopeError("deleted")
        return load(i)

    monkeypatch.setattr(result.images, "load", load_but_one)
    with pytest.warns(UserWarning, match="can no longer be read"):
        index = result.save(tmp_path, channels={name: [5]}, progress=False)
    unit = next(u for layer in index["layers"] if layer["name"] == name for u in layer["units"] if u["channel"] == 5)
    assert any(e["image"] == gone for e in unit["examples"])
    for e in unit["examples"]:
        if e["image"] == gone:
            assert e["rerun_value"] is None
        else:
            assert e["rerun_value"] == pytest.approx(e["value"], rel=1e-3, abs=1e-4)
