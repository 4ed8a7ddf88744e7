"""Ray: the distributed scan and atlas equal the local ones, survive a dying worker, and stop clearly
when no worker is left. One local 2-CPU cluster serves the whole run (``ray_cluster`` in conftest)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.atlas import AtlasSettings, build_atlas
from convscope.cli.main import main
from convscope.datasets import FolderImages
from convscope.distributed import LocalExecutor, RayExecutor, RayTarget
from convscope.errors import ConvscopeError
from convscope.images import sample_photos
from convscope.methods.features import visualize_features
from convscope.methods.scan import scan

pytest.importorskip("ray")

# Two whole layers of the default model: 16 and 24 channels, three work units of up to 16 channels.
LAYERS = "blocks.0.0.bn2,blocks.1.0.bn3"
SETTINGS = AtlasSettings(layers=LAYERS, steps=4, feature_size=32, max_photos=2, skip=("deconv",))
PHOTOS = {name: rgb for name, rgb in list(sample_photos().items())[:2]}

pytestmark = [pytest.mark.usefixtures("one_thread")]   # the local runs then do the workers' arithmetic


@pytest.fixture(scope="module", autouse=True)
def _pickle_by_value(ray_cluster):
    """The fault-injecting wrappers below travel to the workers by value (tests/ is not on their path)."""
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray_cluster.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_atlas(default_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("atlas-local")
    build_atlas(default_model, PHOTOS, out, SETTINGS, progress=False)
    return out


def _features(out: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted((out / "records" / "features").glob("*.json"))}


def _assert_same_atlas(mine: Path, reference: Path) -> None:
    """The same feature records (every channel of both layers), the images within 1/255."""
    ours, theirs = _features(mine), _features(reference)
    assert sorted(ours) == sorted(theirs) == ["blocks.0.0.bn2", "blocks.1.0.bn3"]
    for slug, record in theirs.items():
        got = ours[slug]
        assert got["key"] == record["key"] and got["channels"] == record["channels"]
        assert list(got["per_channel"]) == list(record["per_channel"]) == [str(c) for c in record["channels"]]
        for c, entry in record["per_channel"].items():
            other = got["per_channel"][c]
            assert other["dead"] == entry["dead"] and other["image"] == entry["image"]
            for field in ("objective", "start", "ratio", "photo_best"):
                if entry[field] is None:
                    assert other[field] is None
                else:
                    assert other[field] == pytest.approx(entry[field], rel=1e-3, abs=1e-6), (slug, c, field)
            a = np.asarray(Image.open(mine / entry["image"]["full"]), dtype=np.int16)
            b = np.asarray(Image.open(reference / entry["image"]["full"]), dtype=np.int16)
            assert np.abs(a - b).max() <= 1, (slug, c)
    assert len(theirs["blocks.0.0.bn2"]["per_channel"]) == 16 and len(theirs["blocks.1.0.bn3"]["per_channel"]) == 24


@pytest.mark.slow
def test_scan_on_ray_equals_local(default_model, ray_cluster, tmp_path):
    for i, (name, rgb) in enumerate(sample_photos().items()):
        Image.fromarray(rgb).save(tmp_path / f"{i:02d}-{name}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    images = FolderImages(tmp_path, (64, 64), default_model.preprocessing.resample)
    local = scan(default_model, images, LAYERS, top=3, batch_size=4, progress=False)
    import ray.data  # noqa: F401  (importing Ray Data sets its logger's level: set ours after)

    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        ray = scan(default_model, images, LAYERS, top=3, batch_size=4, progress=False,
                   ray=RayTarget(workers=2, threads=1))
        assert logger.level == logging.INFO   # quiet during the scan only
    finally:
        logger.setLevel(level)
    assert ray.images_scanned == local.images_scanned == len(images) - 1
    assert ray.skipped == local.skipped and len(local.skipped) == 1
    for name in local.topk.layers:
        assert torch.equal(ray.topk.images[name], local.topk.images[name])
        assert torch.equal(ray.topk.positions[name], local.topk.positions[name])
        torch.testing.assert_close(ray.topk.values[name], local.topk.values[name], rtol=1e-5, atol=1e-6)
    assert ray.topk.seen == local.topk.seen


@pytest.mark.slow
def test_atlas_on_ray_equals_local(default_model, ray_cluster, local_atlas, tmp_path):
    """Every channel of two whole layers, through the CLI's --ray on the local cluster."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, rgb in PHOTOS.items():
        Image.fromarray(rgb).save(photos / f"{name}.png")
    # The photos' names are part of the records' key: give the same names as the local build's.
    out = tmp_path / "atlas"
    build_ray = build_atlas(default_model, PHOTOS, out, SETTINGS, progress=False,
                            executor=RayExecutor(RayTarget(workers=2, threads=1)))
    assert build_ray.stages["features"]["built"] == 2
    _assert_same_atlas(out, local_atlas)
    cli_out = tmp_path / "cli"
    assert main(["atlas", "--layers", LAYERS, "--steps", "4", "--size", "32", "--images", str(photos),
                 "--photos", "2", "--skip", "deconv,activations", "--ray", "auto", "--ray-workers", "2",
                 "--out", str(cli_out), "--json"]) == 0
    assert len(list((cli_out / "data" / "features").rglob("c*.webp"))) == 40
    # `convscope features --ray`: two chunks of 8 channels on two workers, joined as one layer's result.
    features_out = tmp_path / "features"
    assert main(["features", "--layer", "blocks.0.0.bn2", "--channels", "all", "--steps", "2", "--size", "32",
                 "--batch-size", "8", "--ray", "auto", "--ray-workers", "2", "--out", str(features_out)]) == 0
    local = visualize_features(default_model, "blocks.0.0.bn2", steps=2, size=32, max_batch=8)
    entry = json.loads((features_out / "features.json").read_text())["layers"][0]
    assert entry["count"] == 16 and entry["dead_channels"] == local.dead_channels


@pytest.mark.slow
def test_atlas_projections_on_ray_equal_local(default_model, ray_cluster, tmp_path):
    """The deconv stage fans its chunks out too: with a scan, every channel's top projections come
    back from the actors equal to a local build's (one executor, one pool, for scan and projections)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, rgb in enumerate(list(sample_photos().values())[:3]):
        Image.fromarray(rgb).save(folder / f"{i}.png")
        Image.fromarray(np.ascontiguousarray(rgb[:, ::-1])).save(folder / f"{i}m.png")
    settings = AtlasSettings(layers="blocks.0.0.bn2,blocks.2.0.bn3", top=3, scan_images=str(folder), max_photos=1,
                             skip=("features", "activations"))
    photos = dict(list(PHOTOS.items())[:1])
    build_atlas(default_model, photos, tmp_path / "local", settings, progress=False)
    with RayExecutor(RayTarget(workers=2, threads=1)) as executor:
        build = build_atlas(default_model, photos, tmp_path / "ray", settings, progress=False, executor=executor)
    assert build.stages["deconv"]["built"] == 2
    for slug in ("blocks.0.0.bn2", "blocks.2.0.bn3"):
        local, ray = (json.loads((tmp_path / kind / "records" / "deconv" / f"{slug}.json").read_text())
                      for kind in ("local", "ray"))
        channels, others = local["per_channel"], ray["per_channel"]
        assert sorted(channels, key=int) == sorted(others, key=int) and len(channels) in (16, 40)
        for c, entries in channels.items():
            assert [(e["image_id"], e["row"], e["col"], e["fallback"]) for e in entries] == \
                   [(e["image_id"], e["row"], e["col"], e["fallback"]) for e in others[c]]
            assert [e["rerun_value"] for e in entries] == pytest.approx([e["rerun_value"] for e in others[c]],
                                                                       rel=1e-3, abs=1e-5)
        rows = sorted((tmp_path / "local" / "data" / "deconv" / slug).glob("c*.webp"))
        assert len(rows) == len(channels)
        for row in rows:
            mine = np.asarray(Image.open(row).convert("RGB"), np.int16)
            theirs = np.asarray(Image.open(tmp_path / "ray" / "data" / "deconv" / slug / row.name).convert("RGB"),
                                np.int16)
            assert mine.shape == theirs.shape and np.abs(mine - theirs).max() <= 2


def test_the_atlas_scan_stage_scans_through_the_executor(default_model, tmp_path):
    """The scan stage asks the build's executor to scan (a RayExecutor scans on its cluster)."""
    calls = []

    class Recording(LocalExecutor):
        def scan(self, loaded, images, layers, **options):
            calls.append(list(layers))
            return super().scan(loaded, images, layers, **options)

    folder = tmp_path / "images"
    folder.mkdir()
    for i, rgb in enumerate(list(PHOTOS.values()) * 2):
        Image.fromarray(rgb[:64, :64]).save(folder / f"{i}.png")
    settings = AtlasSettings(layers="blocks.1.0.bn2", channels_per_layer=1, top=2, scan_images=str(folder),
                             skip=("features", "deconv", "activations"))
    build = build_atlas(default_model, PHOTOS, tmp_path / "atlas", settings, progress=False, executor=Recording())
    assert calls == [["blocks.1.0.bn2"]] and build.stages["scan"]["built"] == 1


class _KillWorker:
    """Work that kills its own worker process (a crash, an OOM kill) under a condition, else works."""

    def __init__(self, work, marker: str, always: bool):
        self.work, self.marker, self.always = work, marker, always

    def __call__(self, loaded, unit, shared):
        marks = Path(self.marker)
        calls = int(marks.read_text()) if marks.exists() else 0
        marks.write_text(str(calls + 1))
        if (calls == 1) or (self.always and calls >= 1):   # the second unit run, or every one after the first
            os.kill(os.getpid(), signal.SIGKILL)
        return self.work(loaded, unit, shared)


class _Killing(RayExecutor):
    def __init__(self, marker: Path, always: bool, **kwargs):
        super().__init__(RayTarget(workers=1, threads=1), **kwargs)
        self.marker, self.always = str(marker), always

    def map(self, loaded, work, units, shared=None):
        return super().map(loaded, _KillWorker(work, self.marker, self.always), units, shared)


@pytest.mark.slow
def test_a_dying_worker_is_retried_and_the_atlas_is_unchanged(default_model, ray_cluster, local_atlas, tmp_path):
    marker = tmp_path / "calls"
    out = tmp_path / "atlas"
    build_atlas(default_model, PHOTOS, out, SETTINGS, progress=False, executor=_Killing(marker, always=False))
    assert int(marker.read_text()) == 4        # three units, one of them run twice: its worker died mid-unit
    _assert_same_atlas(out, local_atlas)


@pytest.mark.slow
def test_no_worker_left_is_a_clear_error_and_keeps_what_was_done(default_model, ray_cluster, local_atlas, tmp_path):
    out = tmp_path / "atlas"
    with pytest.raises(ConvscopeError, match=r"no Ray worker is left .* 1 of 3 work units are done and kept"):
        build_atlas(default_model, PHOTOS, out, SETTINGS, progress=False,
                    executor=_Killing(tmp_path / "calls", always=True, restarts=1))
    # The first unit is the whole first layer (16 channels): its record is written, the second layer's is not.
    records = sorted(p.name for p in (out / "records" / "features").glob("*.json"))
    assert records == ["blocks.0.0.bn2.json"]
    # A local run resumes: it reuses the unit done on Ray and builds the rest.
    written = (out / "data" / "features" / "blocks.0.0.bn2" / "c0000.webp").stat().st_mtime_ns
    build_atlas(default_model, PHOTOS, out, SETTINGS, progress=False)
    assert (out / "data" / "features" / "blocks.0.0.bn2" / "c0000.webp").stat().st_mtime_ns == written
    _assert_same_atlas(out, local_atlas)


def _pid(loaded, unit, shared):
    return os.getpid()


def test_an_executor_in_a_with_block_keeps_its_actors_between_calls(default_model, ray_cluster):
    """An atlas's stages share one pool: its actors (and their loaded models) serve every map;
    a bare executor lets its actors go after each call."""
    target = RayTarget(workers=2, threads=1)
    with RayExecutor(target) as executor:
        first = {pid for _, pid in executor.map(default_model, _pid, range(6))}
        second = {pid for _, pid in executor.map(default_model, _pid, range(6))}
        assert len(first) == 2 and first == second and os.getpid() not in first
        assert ray_cluster.is_initialized()
        assert executor.speedup(local_threads=1)[0] == 2.0 and "2 Ray workers x 1 thread" in executor.speedup(1)[1]
    bare = RayExecutor(target)
    again = {pid for _, pid in bare.map(default_model, _pid, range(6))}
    assert len(again) == 2 and again.isdisjoint(first)
    assert ray_cluster.is_initialized()   # a cluster the executor did not start is left running


def test_a_local_cluster_preloads_the_heavy_imports():
    from convscope.distributed import PRELOAD_MODULES, local_cluster_options

    options = local_cluster_options(num_cpus=2)
    assert options["num_cpus"] == 2 and options["_node_ip_address"] == "127.0.0.1"
    assert options["_system_config"]["preload_python_modules"] == [
        name for name in PRELOAD_MODULES if name != "timm" or importlib.util.find_spec("timm")]
    assert "torch" in PRELOAD_MODULES and "convscope" in PRELOAD_MODULES


def test_ray_flags_are_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["scan", "--samples", "--ray", "nohost", "--out", str(out)]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["features", "--objective", "class:1", "--ray", "auto", "--out", str(out)]) == 2
    assert "without --ray" in capsys.readouterr().err
    assert main(["scan", "--samples", "--ray-workers", "2", "--out", str(out)]) == 2
    assert "--ray auto" in capsys.readouterr().err
    assert not out.exists()


def test_an_unreachable_cluster_fails_fast(tmp_path):
    with pytest.raises(ConvscopeError, match="no Ray cluster answers at 127.0.0.1:9"):
        with RayTarget("127.0.0.1:9").session():
            pass


def test_without_ray_the_flag_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now fails as if it were not installed
    assert main(["scan", "--samples", "--ray", "auto", "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'convscope[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_keras_model_is_rebuilt_on_each_worker_and_gives_the_local_images(ray_cluster):
    """A Keras network travels as its load arguments, not pickled (a VGG19 is 80 MB of weights per
    actor); each worker's seeded rebuild passes the fingerprint check and optimizes the local images."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("Keras is not installed")
    from convscope.cli.features import visualize_unit
    from convscope.distributed import model_payload
    from convscope.sources import load_model

    loaded = load_model("keras:VGG19", random=True, seed=0, device="cpu")
    payload = model_payload(loaded)
    assert "model" not in payload and payload["source"]["spec"] == "keras:VGG19" and payload["source"]["random"]
    options = {"steps": 2, "size": 32, "max_batch": 4, "progress": False}
    units = [("block1_conv2", [0, 1, 2, 3]), ("block1_conv2", [4, 5, 6, 7])]
    results = dict((tuple(u[1]), r) for u, r in RayExecutor(RayTarget(workers=2, threads=1)).map(
        loaded, visualize_unit, units, options))
    local = visualize_features(loaded, "block1_conv2", list(range(8)), **options)
    ray_images = np.concatenate([results[(0, 1, 2, 3)].images, results[(4, 5, 6, 7)].images])
    assert np.abs(ray_images.astype(np.int16) - local.images.astype(np.int16)).max() <= 1
