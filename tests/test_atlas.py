"""The atlas: page generation from records, links, images, escaping, caching and resuming."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope
from convscope.atlas import AtlasSettings, Stage, build_atlas, render_site
from convscope.atlas.stages import ActivationsStage
from convscope.atlas.stages.features import SPRITE_TILE
from convscope.atlas.store import slugify, unique_slugs
from convscope.cli.main import main
from convscope.serve import start_server

from .conftest import model_state

SMALL = AtlasSettings(layers="bn1,blocks.2.0.bn2,blocks.5.0.bn3", channels_per_layer=3, steps=8,
                      feature_size=48, top=3)
# Tests of the build machinery run only the cheap stages.
CHEAP = ("features", "scan", "deconv")
EVIL = '<script>alert("x")</script>'


class _Links(HTMLParser):
    """Every URL a page refers to, and its visible text."""

    def __init__(self):
        super().__init__()
        self.urls: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.urls.append((tag, value))
            elif name == "style" and value:  # sprites, heat maps and patches are CSS backgrounds
                self.urls.extend(("img", url) for url in re.findall(r"url\('([^']*)'\)", value))

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def check_site(out: Path) -> dict[str, int]:
    """Assert that every link and picture of every page resolves to a file; count them."""
    counts = {"pages": 0, "images": 0, "links": 0}
    for page in sorted(out.rglob("*.html")):
        counts["pages"] += 1
        for tag, url in parse_page(page).urls:
            parts = urlsplit(url)
            assert not parts.scheme or parts.scheme == "data", f"{page}: external URL {url!r} (no CDN, no network)"
            assert not url.startswith("//"), f"{page}: external URL {url!r}"
            if parts.scheme == "data" or not parts.path:
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.is_file(), f"{page.relative_to(out)}: <{tag}> {url!r} does not resolve"
            assert out.resolve() in target.parents, f"{page}: {url!r} points outside the atlas"
            if tag == "img" or target.suffix in (".png", ".jpg", ".webp"):
                counts["images"] += 1
                with Image.open(target) as im:
                    im.verify()
            else:
                counts["links"] += 1
    return counts


@pytest.fixture
def one_photo(photos):
    return {"coffee": photos["coffee"]}


@pytest.fixture(scope="module")
def small_atlas(default_model, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    before = model_state(default_model.module)
    build = build_atlas(default_model, photos, out, SMALL, progress=False)
    assert model_state(default_model.module) == before
    return build


def test_every_link_and_picture_resolves(small_atlas):
    counts = check_site(small_atlas.out)
    # index + 3 layer pages + 3 channel pages each
    assert counts["pages"] == 1 + 3 + 3 * 3
    assert counts["images"] > 30


def test_model_page_has_weights_preprocessing_layers_and_predictions(small_atlas):
    page = parse_page(small_atlas.index)
    text = " ".join(page.text)
    assert "efficientnet_lite0" in text and "ImageNet" in text
    assert "scaled to [-1, 1]" in text
    assert "Egyptian cat" in text and "espresso" in text      # real weights, real predictions
    layer_links = list(dict.fromkeys(url for tag, url in page.urls if tag == "a" and url.startswith("L/")))
    assert layer_links == ["L/bn1/index.html", "L/blocks.2.0.bn2/index.html", "L/blocks.5.0.bn3/index.html"]
    manifest = json.loads((small_atlas.out / "atlas.json").read_text())
    assert [layer["channels"] for layer in manifest["layers"]] == [32, 144, 192]


def test_layer_and_channel_pages_link_their_neighbours(small_atlas):
    out = small_atlas.out
    layer = (out / "L/blocks.2.0.bn2/index.html").read_text()
    assert '<link rel="prev" href="../../L/bn1/index.html">' in layer
    assert '<link rel="next" href="../../L/blocks.5.0.bn3/index.html">' in layer
    assert all(f'href="{c}.html"' in layer for c in range(3))       # clickable channel tiles
    first, middle, last = ((out / f"L/blocks.2.0.bn2/{c}.html").read_text() for c in range(3))
    assert 'rel="prev"' not in first and '<link rel="next" href="1.html">' in first
    assert '<link rel="prev" href="0.html">' in middle and '<link rel="next" href="2.html">' in middle
    assert 'rel="next"' not in last
    # the channel's activation on each photo, all on one stated scale
    assert middle.count('class="overlay"') == 3
    assert "One colour scale for this channel on all photos" in middle


def test_activation_record_holds_true_peaks(small_atlas, default_model, photos):
    record = json.loads((small_atlas.out / "records/activations/blocks.2.0.bn2.json").read_text())
    result = convscope.activations(default_model, photos["coffee"], "blocks.2.0.bn2")
    peaks = result["blocks.2.0.bn2"].reshape(144, -1).max(axis=1)
    assert record["photo_order"] == ["chelsea", "astronaut", "coffee"]
    np.testing.assert_allclose(record["peaks"][2], peaks, rtol=1e-3, atol=1e-4)
    assert record["silent"] == [int(c) for c in np.flatnonzero(np.max(record["peaks"], axis=0) <= 0)]


def test_search_index_lists_layers_and_channel_pages(small_atlas):
    text = (small_atlas.out / "search-index.js").read_text()
    assert text.startswith("window.ATLAS_INDEX = ")
    index = json.loads(text.removeprefix("window.ATLAS_INDEX = ").rstrip().rstrip(";"))
    assert [layer["slug"] for layer in index["layers"]] == ["bn1", "blocks.2.0.bn2", "blocks.5.0.bn3"]
    assert index["layers"][1]["channels"] == [[0, 2]] and index["layers"][1]["count"] == 144


def test_rebuild_reuses_every_record(small_atlas, default_model, photos):
    out = small_atlas.out
    records = sorted((out / "records").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in records}
    build = build_atlas(default_model, photos, out, SMALL, progress=False)
    assert build.stages["activations"]["built"] == 0 and build.stages["activations"]["reused"] == 3
    assert build.stages["photos"]["reused"] == 1
    assert {p: p.stat().st_mtime_ns for p in records} == stamps


def test_a_changed_setting_rebuilds_only_what_it_changes(default_model, one_photo, tmp_path):
    settings = AtlasSettings(layers="blocks.5.0.bn3,blocks.6.0.bn3", channels_per_layer=2, skip=CHEAP)
    build_atlas(default_model, one_photo, tmp_path, settings, progress=False)
    again = build_atlas(default_model, one_photo, tmp_path, replace(settings, cmap="magma"),
                        progress=False)
    assert again.stages["activations"]["built"] == 2
    assert again.stages["photos"]["reused"] == 1


def test_a_crash_loses_only_the_layer_in_progress(default_model, one_photo, tmp_path, monkeypatch):
    settings = AtlasSettings(layers="blocks.4.2.bn3,blocks.5.0.bn3,blocks.6.0.bn3", channels_per_layer=2, skip=CHEAP)
    original = ActivationsStage._render_layer
    calls = []

    def crash_on_second(self, ctx, layer, stack, bar):
        calls.append(layer.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, ctx, layer, stack, bar)

    monkeypatch.setattr(ActivationsStage, "_render_layer", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_atlas(default_model, one_photo, tmp_path, settings, progress=False)
    assert [p.name for p in (tmp_path / "records/activations").glob("*.json")] == ["blocks.4.2.bn3.json"]
    assert not list(tmp_path.rglob("*.part"))                    # atomic writes leave no half files
    monkeypatch.setattr(ActivationsStage, "_render_layer", original)
    build = build_atlas(default_model, one_photo, tmp_path, settings, progress=False)
    assert build.stages["activations"] | {"seconds": 0} == {
        "status": "built", "built": 2, "reused": 1, "seconds": 0, "channels_built": 4}
    check_site(tmp_path)


def test_a_missing_record_file_is_rebuilt(default_model, one_photo, tmp_path):
    settings = AtlasSettings(layers="blocks.6.0.bn3", channels_per_layer=2, skip=CHEAP)
    build_atlas(default_model, one_photo, tmp_path, settings, progress=False)
    next((tmp_path / "data/activations/blocks.6.0.bn3").glob("*_heat.webp")).unlink()
    build = build_atlas(default_model, one_photo, tmp_path, settings, progress=False)
    assert build.stages["activations"]["built"] == 1
    check_site(tmp_path)


# ------------------------------------------------------------------------------ untrusted names

class _EvilNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.add_module(EVIL, nn.ReLU())
        self.add_module("a\"b'<i>&amp;", nn.Conv2d(4, 3, 3, padding=1, stride=2))
        self.act = nn.ReLU()
        self.head = nn.Linear(3, 5)

    def forward(self, x):
        x = self.act(getattr(self, "a\"b'<i>&amp;")(getattr(self, EVIL)(self.conv(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_layer_and_file_names_are_escaped(tmp_path):
    torch.manual_seed(0)
    net = _EvilNet()
    net.train()
    before = model_state(net)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    evil_file = '<img src=x onerror=alert(1)>.png'
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / evil_file)
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(folder / "plain.png")
    out = tmp_path / "atlas"
    build = build_atlas(net, folder, out, AtlasSettings(channels_per_layer=2, steps=4, feature_size=32, top=2),
                        progress=False)
    assert model_state(net) == before and net.training

    manifest = json.loads((out / "atlas.json").read_text())
    names = [layer["name"] for layer in manifest["layers"]]
    assert names == [EVIL, "act"]
    for layer in manifest["layers"]:
        assert set(layer["slug"]) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    pages = {p: p.read_text() for p in out.rglob("*.html")}
    assert len(pages) == 1 + 2 + 2 * 2
    for path, html in pages.items():
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert "<i>" not in html, path
    layer_page = pages[out / "L" / manifest["layers"][0]["slug"] / "index.html"]
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in layer_page
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in pages[build.index]
    search = (out / "search-index.js").read_text()
    assert "<" not in search and ">" not in search and "\\u003cscript\\u003e" in search
    check_site(out)


def test_slugs_are_safe_and_unique():
    assert slugify("blocks.3.1.bn2") == "blocks.3.1.bn2"
    assert slugify("..") != slugify(".") and not slugify("..").startswith(".")
    assert slugify("layer1.0.relu@2") != slugify("layer1.0.relu_2")
    assert len(set(unique_slugs(["A", "a", "a"]))) == 3
    assert len({s.lower() for s in unique_slugs(["Conv", "conv"])}) == 2


# ------------------------------------------------------------------------------ records from other stages

def _fake_picture(ctx, rel, value):
    return ctx.picture(rel, np.full((16, 16, 3), value, np.uint8))


class _FakeFeatures(Stage):
    name = "features"

    def run(self, ctx, layers):
        for layer in layers:
            per_channel = {str(c): {"image": _fake_picture(ctx, ctx.data_path(self.name, layer, f"c{c}.png"), 40 * c),
                                    "objective": 1.5 * c, "ratio": 2.0, "dead": c == 1}
                           for c in ctx.channels(layer)}
            ctx.save_record(self, layer, {"per_channel": per_channel, "recipe": "fake", "steps": 1})


class _FakeDeconv(Stage):
    name = "deconv"

    def run(self, ctx, layers):
        for layer in layers:
            per_channel = {}
            for c in ctx.channels(layer):
                per_channel[str(c)] = [{
                    "value": 9.5 - k, "image": f"{EVIL}{k}.jpg", "box": [0, 0, 8, 8], "clipped": k == 0,
                    "projection": _fake_picture(ctx, ctx.data_path(self.name, layer, f"c{c}_{k}p.png"), 128),
                    "patch": _fake_picture(ctx, ctx.data_path(self.name, layer, f"c{c}_{k}t.png"), 200),
                    "source": _fake_picture(ctx, ctx.data_path(self.name, layer, f"c{c}_{k}s.jpg"), 90),
                } for k in range(3)]
            ctx.save_record(self, layer, {"per_channel": per_channel, "description": "fake projections"})


class _Missing(Stage):
    name = "scan"

    def unavailable(self, ctx):
        return "no scan <here>"


def test_pages_show_whatever_records_the_stages_left(default_model, one_photo, tmp_path):
    stages = [ActivationsStage(), _FakeFeatures(), _Missing(), _FakeDeconv()]
    settings = AtlasSettings(layers="blocks.5.0.bn3,blocks.6.0.bn3", channels_per_layer=3)
    build = build_atlas(default_model, one_photo, tmp_path, settings, stages=stages, progress=False)
    assert build.stages["scan"] == {"status": "unavailable", "reason": "no scan <here>"}
    check_site(tmp_path)
    index = build.index.read_text()
    assert index.count("1 of 3") == 2                           # dead channels per layer in the table
    assert "no scan &lt;here&gt;" in index
    layer = (tmp_path / "L/blocks.5.0.bn3/index.html").read_text()
    assert "1 of 3 visualised channels" in layer and 'class="tile dead' in layer
    dead = (tmp_path / "L/blocks.5.0.bn3/1.html").read_text()
    alive = (tmp_path / "L/blocks.5.0.bn3/2.html").read_text()
    assert 'id="dead-flag"' in dead and 'id="dead-flag"' not in alive
    assert "Top 3 deconvnet projections beside their patches" in alive
    assert alive.count('class="example"') == 3 and ">9.5<" in alive and "clipped" in alive
    assert "&lt;script&gt;" in alive and "<script>alert" not in alive

    # the page generator reads only records: re-rendering alone gives the same site
    before = {p: p.read_text() for p in tmp_path.rglob("*.html")}
    render_site(tmp_path, progress=False)
    assert {p: p.read_text() for p in tmp_path.rglob("*.html")} == before


def test_non_spatial_layers_and_bad_skips_are_user_errors(default_model, photos, tmp_path):
    with pytest.raises(convscope.ConvscopeError, match="feature maps"):
        build_atlas(default_model, photos, tmp_path, AtlasSettings(layers="classifier"), progress=False)
    with pytest.raises(convscope.ConvscopeError, match="unknown stage"):
        build_atlas(default_model, photos, tmp_path, AtlasSettings(skip=("featurez",)), progress=False)


# ------------------------------------------------------------------------------ CLI and server

def test_cli_atlas_and_serve_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["atlas", "--layers", "blocks.6.0.bn3", "--channels-per-layer", "1", "--photos", "1", "--out", str(out),
                 "--skip", "features,deconv", "--json"]) == 0
    printed = capsys.readouterr().out
    assert "plan: 1 layers, 1 channels" in printed
    report = json.loads(printed[printed.index("\n{") + 1:])
    assert Path(report["index"]).is_file() and report["stages"]["activations"]["built"] == 1
    assert main(["atlas", "--skip", "nope", "--out", str(out)]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 2
    assert "has no index.html" in capsys.readouterr().err


def test_server_listens_on_loopback_only(small_atlas):
    server = start_server(small_atlas.out, port=0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as response:
            assert response.status == 200 and b"efficientnet_lite0" in response.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/atlas.js", timeout=10) as response:
            assert "javascript" in response.headers["Content-Type"]
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------ the real stages

@pytest.fixture(scope="module")
def scan_folder(photos, tmp_path_factory):
    """A small image set for the scan: 4 crops of each sample photo."""
    folder = tmp_path_factory.mktemp("scan-set")
    for name, rgb in photos.items():
        h, w = rgb.shape[:2]
        for i, (top, left) in enumerate([(0, 0), (0, w // 3), (h // 3, 0), (h // 3, w // 3)]):
            Image.fromarray(rgb[top:top + 2 * h // 3, left:left + 2 * w // 3]).save(folder / f"{name}_{i}.png")
    return folder


FULL = AtlasSettings(layers="blocks.1.0.bn2,blocks.4.0.bn1", channels_per_layer=2, steps=16, feature_size=48,
                     top=4)


@pytest.fixture(scope="module")
def full_atlas(default_model, photos, scan_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full-atlas")
    settings = replace(FULL, scan_images=str(scan_folder))
    before = model_state(default_model.module)
    build = build_atlas(default_model, photos, out, settings, progress=False)
    assert model_state(default_model.module) == before
    return build, settings


def _record(out: Path, stage: str, slug: str) -> dict:
    return json.loads((out / "records" / stage / f"{slug}.json").read_text())


def test_all_stages_build_and_every_page_resolves(full_atlas):
    build, _ = full_atlas
    assert {name: info["status"] for name, info in build.stages.items()} == {
        "photos": "built", "activations": "built", "features": "built", "scan": "built", "deconv": "built",
        "pages": "built"}
    check_site(build.out)
    page = (build.out / "L/blocks.4.0.bn1/1.html").read_text()
    # no max-pooling in this model: "auto" projects with guided backprop, and the page says why
    assert "Top 4 guided-backprop projections beside their patches" in page
    assert "no max-pooling" in page
    assert _record(build.out, "deconv", "blocks.4.0.bn1")["method"] == "guided"
    assert page.count('class="example"') == 4 and page.count('class="rf"') == 4
    assert 'class="zoom feature"' in page


def test_feature_records_rise_and_flag_dead(full_atlas):
    build, _ = full_atlas
    for slug in ("blocks.1.0.bn2", "blocks.4.0.bn1"):
        record = _record(build.out, "features", slug)
        assert sorted(record["per_channel"], key=int) == ["0", "1"]
        for entry in record["per_channel"].values():
            assert isinstance(entry["dead"], bool)
            if not entry["dead"]:
                assert entry["objective"] > entry["start"]      # the optimization raised the channel
        assert [p["full"].rsplit("/", 1)[1] for p in record["sprites"]] == ["sprite0.webp"]
        with Image.open(build.out / record["sprites"][0]["full"]) as sprite:
            assert sprite.size == (2 * SPRITE_TILE, SPRITE_TILE)           # one tile per channel, in order
        assert [record["per_channel"][c]["tile"] for c in ("0", "1")] == [[0, 0, 0], [0, SPRITE_TILE, 0]]


def test_scan_and_deconv_records_agree(full_atlas, scan_folder):
    build, _ = full_atlas
    scan = _record(build.out, "scan", "blocks.4.0.bn1")
    deconv = _record(build.out, "deconv", "blocks.4.0.bn1")
    assert scan["images_scanned"] == 12 and deconv["from"] == "scan"
    for c, examples in scan["per_channel"].items():
        values = [e["value"] for e in examples]
        assert values == sorted(values, reverse=True) and len(examples) == 4
        assert len({e["image_id"] for e in examples}) == 4                 # one maximum per image
        for e in examples:
            top, left, bottom, right = e["box"]
            assert 0 <= top < bottom <= e["image_size"][0] and 0 <= left < right <= e["image_size"][1]
            assert "patch" not in e                                        # cropped from the source on the page
        projected = deconv["per_channel"][c]
        with Image.open(build.out / projected[0]["projection"]["full"]) as row:  # one row of the channel's top 4
            boxes = [e["projection"]["cell"] for e in projected]
            assert row.size == (boxes[-1][3] + 1, max(b[2] for b in boxes) + 1)
        for e in projected:
            top, left, bottom, right = e["box"]
            b = e["projection"]["cell"]
            assert (b[2] - b[0]) * (right - left) == pytest.approx((b[3] - b[1]) * (bottom - top), rel=0.05)
        assert [e["image_id"] for e in projected] == [e["image_id"] for e in examples]
        np.testing.assert_allclose([e["rerun_value"] for e in projected], values, rtol=2e-3, atol=1e-3)


def test_fewer_projections_keep_every_example_and_project_the_strongest(full_atlas, default_model, photos,
                                                                        tmp_path):
    """--projections N: all of the scan's top examples stay on the page (patches); the strongest N get projections."""
    build, settings = full_atlas
    out = tmp_path / "atlas"
    shutil.copytree(build.out, out)
    fewer = replace(settings, projections=1)
    again = build_atlas(default_model, photos, out, fewer, progress=False)
    assert again.stages["deconv"]["built"] == 2
    scan = _record(out, "scan", "blocks.4.0.bn1")
    deconv = _record(out, "deconv", "blocks.4.0.bn1")
    for c, examples in deconv["per_channel"].items():
        assert [e["image_id"] for e in examples] == [e["image_id"] for e in scan["per_channel"][c]]   # all 4 kept
        assert "projection" in examples[0] and all("projection" not in e for e in examples[1:])
        with Image.open(out / examples[0]["projection"]["full"]) as row:                 # a row of one projection
            cell = examples[0]["projection"]["cell"]
            assert row.size == (cell[3] + 1, cell[2] + 1)
    check_site(out)
    page = (out / "L/blocks.4.0.bn1/1.html").read_text()
    assert "Top 4 patches, the strongest 1 with guided-backprop projections" in page
    assert page.count('class="example"') == 4 and page.count('class="zoom proj"') == 1
    assert page.count('class="zoom patch"') == 4
    assert "top 4 (1 projected)" in (out / "index.html").read_text()
    again = build_atlas(default_model, photos, out, replace(fewer, projections=None), progress=False)
    assert again.stages["deconv"]["built"] == 2                                      # all projected again
    assert all("projection" in e for e in _record(out, "deconv", "blocks.4.0.bn1")["per_channel"]["0"])


def test_deconv_without_a_scan_projects_the_photos_strongest_units(default_model, one_photo, tmp_path):
    settings = AtlasSettings(layers="blocks.2.0.bn2", channels_per_layer=3, top=9, skip=("features",))
    build = build_atlas(default_model, one_photo, tmp_path, settings, progress=False)
    assert build.stages["scan"]["status"] == "unavailable" and "--scan" in build.stages["scan"]["reason"]
    from convscope.methods.deconv import Unit, project_units

    photo_rgb = default_model.preprocessing.fit(one_photo["coffee"])
    acts = _record(tmp_path, "activations", "blocks.2.0.bn2")
    deconv = _record(tmp_path, "deconv", "blocks.2.0.bn2")
    assert deconv["from"] == "photos"
    assert deconv["method"] == "guided"                                     # no max-pooling in this model
    for c in range(3):
        (example,) = deconv["per_channel"][str(c)]                          # one photo, one unit
        assert example["value"] == pytest.approx(acts["peaks"][0][c], rel=1e-3)
        assert [example["row"], example["col"]] == acts["photos"]["coffee"]["channels"][str(c)]["argmax"]
        # a zero guided projection (always so at the ReLU6 cap, where the forward mask is closed)
        # is shown with the deconvnet and marked
        guided = project_units(default_model, default_model.preprocessing.to_tensor(photo_rgb), "blocks.2.0.bn2",
                               [Unit(c, example["row"], example["col"])], method="guided")
        assert example["fallback"] == (not np.abs(guided.maps).any())
        assert example["fallback"] or example["value"] < 6.0
        with Image.open(tmp_path / example["projection"]["full"]) as im:
            assert np.ptp(np.asarray(im)) > 0                               # never a blank gray tile
    assert any(e["fallback"] for entries in deconv["per_channel"].values() for e in entries)
    check_site(tmp_path)


def test_a_changed_budget_rebuilds_only_the_stages_it_touches(full_atlas, default_model, photos):
    build, settings = full_atlas
    fewer_steps = replace(settings, steps=12)
    again = build_atlas(default_model, photos, build.out, fewer_steps, progress=False)
    built = {name: info.get("built") for name, info in again.stages.items()}
    assert built == {"photos": 0, "activations": 0, "features": 2, "scan": 0, "deconv": 0, "pages": 1}
    again = build_atlas(default_model, photos, build.out, replace(fewer_steps, top=3),
                        progress=False)
    built = {name: info.get("built") for name, info in again.stages.items()}
    assert built == {"photos": 0, "activations": 0, "features": 0, "scan": 2, "deconv": 2, "pages": 1}
    check_site(build.out)


def test_vgg_aliases_reach_the_table_and_the_search(vgg16, one_photo, tmp_path):
    settings = AtlasSettings(layers="block1_conv2,block5_conv3", channels_per_layer=1, skip=CHEAP)
    build = build_atlas(vgg16, one_photo, tmp_path, settings, progress=False)
    index = build.index.read_text()
    assert "RANDOM INIT" in index
    assert '<a href="L/features.3/index.html">block1_conv2</a>' in index
    search = json.loads((tmp_path / "search-index.js").read_text().removeprefix("window.ATLAS_INDEX = ")
                        .rstrip().rstrip(";"))
    assert [(layer["alias"], layer["name"]) for layer in search["layers"]] == [
        ("block1_conv2", "features.3"), ("block5_conv3", "features.29")]
    layer = (tmp_path / "L/features.29/index.html").read_text()
    assert "block5_conv3" in layer and "features.29" in layer
    check_site(tmp_path)


def test_scan_photos_are_not_reused_across_image_sets(default_model, one_photo, tmp_path):
    """Two scan sets with the same file names (so the same image ids) but other pixels: no stale photo."""
    sets = []
    for n, seed in enumerate((1, 2)):
        folder = tmp_path / f"set{n}"
        folder.mkdir()
        rng = np.random.default_rng(seed)
        for i in range(3):
            colour = rng.integers(0, 256, 3)
            Image.fromarray(np.broadcast_to(colour, (32, 32, 3)).astype(np.uint8)).save(folder / f"img{i}.png")
        sets.append(folder)
    out = tmp_path / "atlas"
    settings = AtlasSettings(layers="blocks.1.0.bn2", channels_per_layer=1, top=2, skip=("features", "deconv", "activations"))
    for folder in sets:
        build = build_atlas(default_model, one_photo, out, replace(settings, scan_images=str(folder)), progress=False)
        assert build.stages["scan"]["built"] == 1
        from convscope.datasets import FolderImages

        images = FolderImages(folder, tuple(default_model.preprocessing.input_size))
        for example in _record(out, "scan", "blocks.1.0.bn2")["per_channel"]["0"]:
            with Image.open(out / example["source"]["full"]) as shown:
                want = images.load(example["image_id"])
                assert np.abs(np.asarray(shown).astype(int) - want.astype(int)).mean() < 4, example["source"]


def test_heat_rows_for_all_channels_are_the_per_channel_pictures_packed():
    from convscope.atlas.stages.activations import heat_image, heat_rows
    from convscope.atlas.store import pack_row

    rng = np.random.default_rng(0)
    for shape in ((5, 9, 13), (5, 112, 168)):   # small maps, and maps shrunk to HEAT_SIDE
        stack = [rng.normal(size=shape).astype(np.float32), rng.normal(size=(shape[0], shape[2], shape[1])).astype(np.float32)]
        stack[1][3] = 0.25                         # a flat channel on one photo
        low = np.minimum(stack[0].min(axis=(1, 2)), stack[1].min(axis=(1, 2)))
        high = np.maximum(stack[0].max(axis=(1, 2)), stack[1].max(axis=(1, 2)))
        low[2] = high[2] = 1.0                     # a channel with no range: all zero
        channels = [0, 2, 3, 4]
        rows, boxes = heat_rows(stack, channels, low, high, "jet")
        for k, c in enumerate(channels):
            row, expected = pack_row([heat_image(m[c], float(low[c]), float(high[c]), "jet") for m in stack])
            assert boxes == expected and np.array_equal(rows[k], np.asarray(row))   # the very same computation


def test_deconv_stage_checks_crops_against_the_scan_values(default_model, photos, monkeypatch, tmp_path):
    """The stage skips the engine's whole-image check of each crop and checks the scan's values
    instead: the same projections, and a crop that disagrees is still recomputed on the whole image."""
    import convscope.methods.deconv.engine as deconv_engine
    from convscope.atlas.context import BuildContext
    from convscope.atlas.stages.deconv import project_with_fallback
    from convscope.methods.deconv import Unit, project_units, strongest_units
    from convscope.precision import FP32
    from convscope.rectifiers import GUIDED

    layer = default_model.catalogue.get("blocks.2.0.bn2")
    ctx = BuildContext(default_model, tmp_path, AtlasSettings(), [layer], [], progress=False)
    cat = default_model.preprocessing.fit(photos["chelsea"])
    pixels = [cat, np.ascontiguousarray(cat[:, ::-1])]
    x = ctx.tensor(pixels)
    units = [Unit(u.channel, u.row, u.col, b) for b in range(2)
             for u in strongest_units(default_model, x[b:b + 1], layer, channels=range(4))]
    checked = project_units(default_model, x, layer, units, method=GUIDED)      # the engine's own check
    assert checked.strategy == "crop"
    scales = np.full(len(units), float(np.abs(checked.values).max()), np.float32)
    proj, _ = project_with_fallback(default_model, layer, GUIDED, False, pixels, units, strict=True, precision=FP32,
                                    expected=(checked.values, scales))
    np.testing.assert_allclose(proj.maps, checked.maps, rtol=1e-5, atol=1e-6 * np.abs(checked.maps).max())

    plan_of = deconv_engine._crop_plan

    def shifted(layer, boxes, hw):                                  # crops off the stride grid: wrong values
        plan = plan_of(layer, boxes, hw)
        plan.offsets = [(t - 2 if t >= 2 else t + 2, left) for t, left in plan.offsets]
        return plan
    monkeypatch.setattr(deconv_engine, "_crop_plan", shifted)
    with pytest.warns(UserWarning, match="disagreed between their receptive-field crop and the scan"):
        wrong, _ = project_with_fallback(default_model, layer, GUIDED, False, pixels, units, strict=True,
                                         precision=FP32, expected=(checked.values, scales))
    np.testing.assert_allclose(wrong.maps, checked.maps, rtol=1e-5, atol=1e-6 * np.abs(checked.maps).max())
    np.testing.assert_allclose(wrong.values, checked.values, rtol=1e-5, atol=1e-6)
