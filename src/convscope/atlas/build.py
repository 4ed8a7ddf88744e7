"""Building an atlas: cached, incremental stages that each leave files plus a small JSON record.

The build runs these producers in order, then the page generator:

* **photos**: the photos as the model sees them, the top-5 predictions, and the shallow-to-deep
  evolution strip of each photo (``records/photos.json``);
* **activations**: per layer, each photo's channel grid and strongest-channel overlay, each
  visualised channel's heat map over each photo (one scale per channel, shared by the photos),
  and every channel's peak per photo (``silent`` = never above zero);
* **features**: per layer, the feature visualization of each visualised channel with its
  objective and ``dead`` flag (issue 3's :func:`convscope.visualize_features`);
* **scan**: per layer, the top-k images of each channel over a data set (issue 5);
* **deconv**: per layer, deconvnet projections beside their patches for the top-k units of each
  channel: the scan's, or the strongest unit on each photo when no scan was built (issue 4);
* **pages**: :func:`convscope.atlas.pages.render_site`, which reads only ``atlas.json`` and the
  records.

Each record carries a key: a hash of the model fingerprint (architecture and weights), the
preprocessing, the layer, the stage's settings, its code version and the keys of what it
depends on. A record whose key matches and whose files all exist is reused; anything else is
rebuilt. Every file is written atomically and a record is written only after its files, so a
crash loses at most the layer in progress, and a re-run picks up where it stopped.
A stage whose code is not installed is reported as unavailable and its part of the pages says so.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from .. import render
from .._io import ensure_dir, save_json
from .._version import __version__
from ..capture import capture
from ..datasets import MIN_SIDE
from ..errors import ConvscopeError
from ..images import IMAGE_EXTENSIONS, ImageSource, load_image, sample_photos
from ..layers import LayerInfo
from ..methods.activations import ActivationResult, predict
from ..models import LoadedModel, as_loaded, fingerprint
from .store import (
    SCREEN_WIDTH,
    Picture,
    make_key,
    read_json,
    record_files,
    save_picture,
    unique_slugs,
    write_record,
)

__all__ = ["AtlasSettings", "AtlasBuild", "BuildContext", "Photo", "Stage", "STAGES", "STAGE_NAMES",
           "build_atlas", "collect_photos"]

# Feature maps held in memory at once by the activations stage (all photos of a group of layers).
MAP_BUDGET_BYTES = 384 * 2**20


@dataclass(frozen=True)
class AtlasSettings:
    """What to build, and the budget.

    Attributes:
        layers: names, aliases or patterns (see :meth:`Catalogue.resolve`); None = every conv
            layer after its activation.
        channels_per_layer: how many channels per layer get a channel page, a feature
            visualization and projections (the first N); None = all.
        steps: optimization steps of the feature visualization.
        feature_size: side of the feature-visualization images, in pixels.
        recipe: feature-visualization recipe (issue 3), None for its default.
        seed: seed of the feature visualization.
        top: examples per channel from the scan and the deconvnet.
        max_photos: photos taken from ``images`` (sorted by path).
        scan_images: folder the scan stage streams; ``"samples"`` for the built-in sample set;
            None to scan nothing (the deconv stage then projects the photos' strongest units).
        scan_limit: scan only the first N images of the set (None: all).
        skip: stages not to run; records they already have with a matching key are still shown.
        cmap: colour map of the heat-map overlays.
        deconv_method: ``"auto"`` (the deconvnet for models with max-pooling, else guided
            backprop; see :class:`DeconvStage`), ``"deconvnet"``, ``"guided"`` or ``"gradient"``.
    """

    layers: str | None = None
    channels_per_layer: int | None = None
    steps: int = 256
    feature_size: int = 128
    recipe: str | None = None
    seed: int = 0
    top: int = 9
    max_photos: int = 8
    scan_images: str | None = None
    skip: tuple[str, ...] = ()
    cmap: str = "jet"
    deconv_method: str = "auto"
    scan_limit: int | None = None

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class Photo:
    """One photo of the atlas: its (untrusted) display name, file slug, source and pixels."""

    name: str
    slug: str
    source: str
    rgb: np.ndarray  # (H, W, 3) uint8, resized for the model (shorter side = input size)

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.rgb.tobytes() + str(self.rgb.shape).encode()).hexdigest()[:16]


@dataclass
class AtlasBuild:
    """What a build did: where the site is, and per stage what was built, reused or missing."""

    out: Path
    index: Path
    stages: dict[str, dict]

    def summary_lines(self) -> list[str]:
        lines = []
        for name, info in self.stages.items():
            status = info["status"]
            if status == "unavailable":
                lines.append(f"  {name:<12} unavailable: {info['reason']}")
                continue
            detail = f"{info.get('built', 0)} built, {info.get('reused', 0)} reused"
            if status == "skipped":
                detail = f"skipped ({info.get('reused', 0)} layers kept from earlier builds)"
            lines.append(f"  {name:<12} {detail}, {info.get('seconds', 0.0):.1f} s")
        return lines


class BuildContext:
    """Everything a stage needs: the model, the layers, the photos, the output folder and the cache."""

    def __init__(self, loaded: LoadedModel, out: Path, settings: AtlasSettings, layers: list[LayerInfo],
                 photos: list[Photo], progress: bool = True):
        self.loaded = loaded
        self.out = out
        self.settings = settings
        self.layers = layers
        self.photos = photos
        self.progress = progress
        self.fingerprint = fingerprint(loaded.module)
        self.slugs = dict(zip((layer.name for layer in layers), unique_slugs([layer.name for layer in layers])))
        self.keys: dict[tuple[str, str], str] = {}
        self.photos_key = make_key(photos=[(p.name, p.digest) for p in photos])
        self.sources: dict[str, Picture] = {}  # shared source-image pictures already written this build
        self.scan_set = None  # the scan stage's ImageSet, made once

    # ------------------------------------------------------------------ naming
    def slug(self, layer: LayerInfo) -> str:
        return self.slugs[layer.name]

    def channels(self, layer: LayerInfo) -> list[int]:
        """The channels that get pages: the first ``channels_per_layer``."""
        count = layer.channels
        if self.settings.channels_per_layer is not None:
            count = min(count, self.settings.channels_per_layer)
        return list(range(count))

    def data_path(self, stage: str, layer: LayerInfo, name: str) -> str:
        return f"data/{stage}/{self.slug(layer)}/{name}"

    def record_path(self, stage: str, layer: LayerInfo) -> Path:
        return self.out / "records" / stage / f"{self.slug(layer)}.json"

    def picture(self, rel: str, image, fmt: str = "png") -> Picture:
        return save_picture(self.out, rel, image, fmt=fmt)

    # ------------------------------------------------------------------ cache
    def model_key_parts(self) -> dict:
        return {"fingerprint": self.fingerprint, "preprocessing": self.loaded.preprocessing.as_dict()}

    def key(self, stage: Stage, layer: LayerInfo) -> str:
        """The cache key of ``stage`` for ``layer`` (computed once, when the stage starts)."""
        cached = self.keys.get((stage.name, layer.name))
        if cached is None:
            cached = make_key(stage=stage.name, version=stage.version, layer=layer.name,
                              channels=self.channels(layer), settings=stage.settings(self, layer),
                              **self.model_key_parts())
            self.keys[(stage.name, layer.name)] = cached
        return cached

    def valid_record(self, stage: str, layer: LayerInfo, key: str) -> dict | None:
        """The record of ``stage`` for ``layer`` if it has ``key`` and all its files exist."""
        record = read_json(self.record_path(stage, layer))
        if not record or record.get("key") != key:
            return None
        if not all((self.out / rel).is_file() for rel in record.get("files", [])):
            return None
        return record

    def record(self, stage: str, layer: LayerInfo) -> dict | None:
        """The current record of an earlier stage for ``layer`` (None when it has none)."""
        key = self.keys.get((stage, layer.name))
        return self.valid_record(stage, layer, key) if key else None

    def save_record(self, stage: Stage, layer: LayerInfo, data: dict, seconds: float | None = None) -> dict:
        """Write a layer's record, after its files: the record is what marks the work as done."""
        record = {"stage": stage.name, "version": stage.version, "key": self.key(stage, layer),
                  "layer": layer.name, "slug": self.slug(layer), "channels": self.channels(layer),
                  "seconds": seconds, **data}
        record["files"] = record_files(data)
        write_record(self.record_path(stage.name, layer), record)
        return record

    def bar(self, stage: str, total: int, unit: str) -> tqdm:
        return tqdm(total=total, desc=f"{stage:<11}", unit=unit, disable=not self.progress, leave=True,
                    dynamic_ncols=True)


class Stage:
    """One producer of the atlas. Subclasses set ``name`` and implement :meth:`run`.

    A stage builds the layers it is given (those without a valid record) and calls
    :meth:`BuildContext.save_record` once per layer when that layer's files are written.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def unavailable(self, ctx: BuildContext) -> str | None:
        """Why this stage cannot run here (its code is not installed, nothing to work on), or None."""
        return None

    def settings(self, ctx: BuildContext, layer: LayerInfo) -> dict:
        """Everything besides model, layer and channels that changes this stage's output."""
        return {}

    def run(self, ctx: BuildContext, layers: list[LayerInfo]) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------- photos

def collect_photos(images: ImageSource | Iterable[ImageSource] | dict | None, max_photos: int = 8) -> list[tuple[str, str, np.ndarray]]:
    """``(display name, source, RGB)`` for the atlas photos.

    ``images`` is None (scikit-image's sample photos), a ``{name: image}`` dict, or paths of
    files and folders (folders are searched recursively, sorted; unreadable files in a folder
    are skipped with a warning, an unreadable file named directly is an error).
    """
    if images is None:
        return [(name, f"sample:{name}", rgb) for name, rgb in sample_photos().items()][:max_photos]
    if isinstance(images, dict):
        return [(str(name), str(name), load_image(image)) for name, image in images.items()][:max_photos]
    if isinstance(images, (str, Path)) or not isinstance(images, Iterable):
        images = [images]
    found: list[tuple[str, str, np.ndarray]] = []
    for item in images:
        if len(found) >= max_photos:
            break
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            files = sorted(p for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                raise ConvscopeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {item}")
            for path in files:
                if len(found) >= max_photos:
                    break
                try:
                    rgb = load_image(path)
                except ConvscopeError as err:
                    tqdm.write(f"warning: skipped {path}: {err}")
                    continue
                if min(rgb.shape[:2]) < MIN_SIDE:
                    tqdm.write(f"warning: skipped {path}: {rgb.shape[1]}x{rgb.shape[0]} px, under {MIN_SIDE} px on a side")
                    continue
                found.append((path.name, str(path), rgb))
        elif isinstance(item, (str, Path)):
            found.append((Path(item).name, str(item), load_image(item)))
        else:
            found.append((f"image{len(found)}", f"array {len(found)}", load_image(item)))
    if not found:
        raise ConvscopeError("no readable photos for the atlas; pass image files or a folder with --images")
    return found


def build_photos(ctx: BuildContext) -> dict:
    """Photos as the model sees them, predictions and evolution strips (``records/photos.json``)."""
    path = ctx.out / "records" / "photos.json"
    key = make_key(stage="photos", version=1, photos=ctx.photos_key, layers=[layer.name for layer in ctx.layers],
                   **ctx.model_key_parts())
    record = read_json(path)
    if record and record.get("key") == key and all((ctx.out / f).is_file() for f in record.get("files", [])):
        record["_reused"] = True
        return record
    entries = []
    prediction_error = None
    for photo in tqdm(ctx.photos, desc=f"{'photos':<11}", unit="photo", disable=not ctx.progress):
        entry: dict[str, Any] = {"name": photo.name, "slug": photo.slug, "source": photo.source,
                                 "size": list(photo.rgb.shape[:2]),
                                 "image": ctx.picture(f"data/photos/{photo.slug}.jpg", photo.rgb, fmt="jpeg")}
        try:
            entry["predictions"] = predict(ctx.loaded, photo.rgb) if prediction_error is None else None
        except ConvscopeError as err:  # not a classifier: the atlas still works, without predictions
            prediction_error, entry["predictions"] = str(err), None
        x = ctx.loaded.preprocessing.to_tensor(photo.rgb, ctx.loaded.device)
        outputs = capture(ctx.loaded.module, x, ctx.layers)
        maps = {layer.name: outputs[layer.name][0].float().cpu().numpy() for layer in ctx.layers}
        del outputs
        result = ActivationResult(photo.rgb, ctx.layers, maps, ctx.loaded.title)
        entry["evolution"] = ctx.picture(f"data/photos/{photo.slug}_evolution.png", result.evolution())
        entries.append(entry)
    data = {"photos": entries, "prediction_error": prediction_error}
    record = {"stage": "photos", "key": key, **data, "files": record_files(data)}
    write_record(path, record)
    return record


# ---------------------------------------------------------------------------------- activations

def _grid_columns(channels: int, height: int, width: int) -> int:
    """Columns that make a grid of ``channels`` tiles roughly 16:9."""
    return max(1, min(channels, round(np.sqrt(channels * (16 / 9) * height / max(width, 1)))))


def _sig(values: np.ndarray, digits: int = 4) -> list[float]:
    """Floats rounded to ``digits`` significant digits, for small JSON records."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64).ravel()]


class ActivationsStage(Stage):
    """Grids, overlays and per-channel heat maps of each layer on each photo, and channel peaks."""

    name = "activations"
    version = 2

    def settings(self, ctx, layer):
        return {"photos": ctx.photos_key, "cmap": ctx.settings.cmap}

    def run(self, ctx, layers):
        bar = ctx.bar(self.name, len(layers) * len(ctx.photos), "map")
        with bar:
            for group in self._groups(ctx, layers):
                start = time.perf_counter()
                maps: dict[str, list[np.ndarray]] = {layer.name: [] for layer in group}
                for photo in ctx.photos:
                    x = ctx.loaded.preprocessing.to_tensor(photo.rgb, ctx.loaded.device)
                    outputs = capture(ctx.loaded.module, x, group)
                    for layer in group:
                        maps[layer.name].append(outputs[layer.name][0].float().cpu().numpy())
                    del outputs
                forward = (time.perf_counter() - start) / len(group)
                for layer in group:
                    start = time.perf_counter()
                    data = self._render_layer(ctx, layer, maps.pop(layer.name), bar)
                    ctx.save_record(self, layer, data, seconds=forward + time.perf_counter() - start)

    @staticmethod
    def _groups(ctx: BuildContext, layers: list[LayerInfo]) -> list[list[LayerInfo]]:
        """Layers in execution order, grouped so one group's maps of all photos fit the budget."""
        area = sum(p.rgb.shape[0] * p.rgb.shape[1] for p in ctx.photos)
        input_area = ctx.loaded.preprocessing.input_size[0] * ctx.loaded.preprocessing.input_size[1]
        groups: list[list[LayerInfo]] = []
        used = MAP_BUDGET_BYTES + 1
        for layer in layers:
            size = 4 * int(np.prod(layer.shape)) * area / input_area
            if used + size > MAP_BUDGET_BYTES and (not groups or groups[-1]):
                groups.append([])
                used = 0
            groups[-1].append(layer)
            used += size
        return [g for g in groups if g]

    def _render_layer(self, ctx: BuildContext, layer: LayerInfo, stack: list[np.ndarray], bar: tqdm) -> dict:
        cmap = ctx.settings.cmap
        channels = ctx.channels(layer)
        count = stack[0].shape[0]
        peaks = np.stack([m.reshape(count, -1).max(axis=1) for m in stack])   # (photos, C)
        lows = np.stack([m.reshape(count, -1).min(axis=1) for m in stack])
        means = np.stack([m.reshape(count, -1).mean(axis=1) for m in stack])
        # One scale per channel, shared by all photos, so the photos can be compared. It starts at 0
        # when the channel fires at all: the overlay shows where it fires, and a signed (linear)
        # layer's negative values would otherwise tint the whole photo. The page states the scale.
        raw_low, scale_high = lows.min(axis=0), peaks.max(axis=0)
        scale_low = np.where(scale_high > 0, np.maximum(raw_low, 0.0), raw_low)
        photos: dict[str, dict] = {}
        for i, (photo, maps) in enumerate(zip(ctx.photos, stack)):
            title = f"{layer.label} on {photo.name}"
            cols = _grid_columns(count, *maps.shape[1:])
            grid = render.channel_grid(maps, cols=cols, cmap="viridis", title=title, min_tile=8)
            result = ActivationResult(photo.rgb, [layer], {layer.name: maps}, ctx.loaded.title)
            entry = {
                "grid": ctx.picture(ctx.data_path(self.name, layer, f"{photo.slug}_grid.png"), grid),
                "overlay": ctx.picture(ctx.data_path(self.name, layer, f"{photo.slug}_top.jpg"),
                                       result.overlay(layer, top=min(6, count), cmap=cmap), fmt="jpeg"),
                "channels": {},
            }
            for c in channels:
                heat = render.overlay_heatmap(photo.rgb, maps[c], cmap=cmap, low=float(scale_low[c]),
                                              high=float(scale_high[c]))
                position = np.unravel_index(int(maps[c].argmax()), maps[c].shape)
                entry["channels"][str(c)] = {
                    "overlay": ctx.picture(ctx.data_path(self.name, layer, f"{photo.slug}/c{c:04d}.jpg"), heat,
                                           fmt="jpeg"),
                    "peak": float(f"{peaks[i, c]:.4g}"),
                    "argmax": [int(position[0]), int(position[1])],
                }
            photos[photo.slug] = entry
            bar.update(1)
        silent = np.flatnonzero((peaks <= 0).all(axis=0))
        return {
            "photos": photos,
            "photo_order": [p.slug for p in ctx.photos],
            "peaks": [_sig(row) for row in peaks],
            "means": [_sig(row) for row in means],
            "scale": {str(c): _sig([scale_low[c], scale_high[c], raw_low[c]]) for c in channels},
            "silent": [int(c) for c in silent],
            "num_channels": count,
        }


# ---------------------------------------------------------------------------------- features

# Channels optimized per call of visualize_features: a crash loses at most one such chunk.
FEATURE_CHUNK = 16


class FeaturesStage(Stage):
    """Feature visualization of each visualised channel (issue 3), with its ``dead`` flag.

    The dead test and the ratio use the atlas photos as the reference photos. Channels are
    optimized in chunks of :data:`FEATURE_CHUNK`, each cached on its own (a channel's image does
    not depend on which channels share its batch), so an interrupted layer resumes mid-way.
    """

    name = "features"
    version = 1

    def unavailable(self, ctx):
        try:
            from ..methods.features import visualize_features  # noqa: F401
        except ImportError:
            return "feature visualization (issue 3) is not part of this convscope yet"
        return None

    def settings(self, ctx, layer):
        s = ctx.settings
        return {"steps": s.steps, "size": s.feature_size, "recipe": s.recipe, "seed": s.seed,
                "photos": ctx.photos_key}

    def run(self, ctx, layers):
        from ..methods.features import visualize_features

        photos = {p.slug: p.rgb for p in ctx.photos}
        s = ctx.settings
        bar = ctx.bar(self.name, sum(len(ctx.channels(layer)) for layer in layers), "ch")
        with bar:
            for layer in layers:
                start = time.perf_counter()
                key = ctx.key(self, layer)
                channels = ctx.channels(layer)
                per_channel: dict[str, dict] = {}
                parts = []
                recipe = None
                for first in range(0, len(channels), FEATURE_CHUNK):
                    chunk = channels[first:first + FEATURE_CHUNK]
                    part = ctx.record_path(self.name, layer).with_suffix(f".part{first}.json")
                    parts.append(part)
                    cached = read_json(part)
                    if (cached and cached.get("key") == key
                            and all((ctx.out / f).is_file() for f in record_files(cached["per_channel"]))):
                        per_channel.update(cached["per_channel"])
                        recipe = cached.get("recipe")
                        bar.update(len(chunk))
                        continue
                    bar.set_postfix_str(f"{layer.alias or layer.name} {chunk[0]}-{chunk[-1]}", refresh=True)
                    result = visualize_features(ctx.loaded, layer, chunk, recipe=s.recipe or "lucid", steps=s.steps,
                                                size=s.feature_size, seed=s.seed, photos=photos)
                    recipe = result.recipe.name if hasattr(result.recipe, "name") else str(s.recipe or "lucid")
                    done = {}
                    for image, rec in zip(result.images, result.records):
                        c = int(rec["channel"])
                        done[str(c)] = {
                            "image": ctx.picture(ctx.data_path(self.name, layer, f"c{c:04d}.png"), image),
                            "objective": _sig1(rec.get("objective")), "start": _sig1(rec.get("start")),
                            "ratio": _sig1(rec.get("ratio")), "photo_best": _sig1(rec.get("photo_best")),
                            "dead": bool(rec.get("dead")),
                        }
                    write_record(part, {"key": key, "recipe": recipe, "per_channel": done})
                    per_channel.update(done)
                    bar.update(len(chunk))
                sheet = self._sheet(ctx, layer, per_channel, recipe)
                ctx.save_record(self, layer, {
                    "per_channel": per_channel, "sheet": sheet, "recipe": recipe, "steps": s.steps,
                    "size": s.feature_size, "seed": s.seed,
                    "dead": sorted(int(c) for c, v in per_channel.items() if v["dead"]),
                }, seconds=time.perf_counter() - start)
                for part in parts:
                    part.unlink(missing_ok=True)

    @staticmethod
    def _sheet(ctx: BuildContext, layer: LayerInfo, per_channel: dict[str, dict], recipe: str | None) -> Picture:
        """All visualised channels of the layer as one picture, labelled with their numbers."""
        from PIL import Image

        tiles = []
        for c in sorted(per_channel, key=int):
            entry = per_channel[c]
            with Image.open(ctx.out / entry["image"]["full"]) as im:
                tile = im.convert("RGB")
            tiles.append(render.label_image(tile, f"{c} dead" if entry["dead"] else c, size=11))
        width = max(t.width for t in tiles)
        height = max(t.height for t in tiles)
        stack = np.stack([np.asarray(t.resize((width, height))) for t in tiles])
        grid = Image.fromarray(render.tile(stack, cols=min(8, len(tiles)), sep=2, sep_value=(255, 255, 255)))
        strip = render.title_strip(grid.width, [f"{layer.label}: feature visualization, {recipe} recipe",
                                                ctx.loaded.title])
        return ctx.picture(ctx.data_path("features", layer, "sheet.png"), render.stack_vertical([strip, grid]))


def _sig1(value: Any) -> float | None:
    return None if value is None else float(f"{float(value):.4g}")


# ---------------------------------------------------------------------------------- scan

def _scan_images(ctx: BuildContext):
    """The scan's image set for ``settings.scan_images`` (None when no scan was asked for)."""
    from ..datasets import FolderImages, SampleImages

    spec = ctx.settings.scan_images
    if spec is None:
        return None
    if ctx.scan_set is None:
        pre = ctx.loaded.preprocessing
        size = tuple(pre.input_size)
        if str(spec) == "samples":
            ctx.scan_set = SampleImages(size, pre.resample)
        elif not Path(spec).is_dir():
            raise ConvscopeError(f"--scan {spec}: not a folder (or use --scan samples for the built-in set)")
        else:
            ctx.scan_set = FolderImages(spec, size, pre.resample)
    return ctx.scan_set


def _source_picture(ctx: BuildContext, kind: str, image_id: str, pixels: np.ndarray) -> Picture:
    """One shared copy per source image (``data/<kind>-images/``), written the first time it is needed.

    The file is named by the pixels' digest (which covers the image set and the input size)
    and the picture settings, so a later build with another image set or size never shows
    an earlier build's photo that happens to have the same id.
    """
    digest = hashlib.sha1(pixels.tobytes() + f"{pixels.shape}|jpeg|{SCREEN_WIDTH}".encode()).hexdigest()[:16]
    rel = f"data/{kind}-images/{image_id}-{digest}.jpg"
    cached = ctx.sources.get(rel)
    if cached is None:
        height, width = pixels.shape[:2]
        small_rel = rel[:-len(".jpg")] + ".screen.jpg"
        if (ctx.out / rel).is_file() and (width <= SCREEN_WIDTH or (ctx.out / small_rel).is_file()):
            cached = {"src": rel, "full": rel, "width": width, "height": height}
            if width > SCREEN_WIDTH:
                cached.update(src=small_rel, width=SCREEN_WIDTH, height=max(1, round(height * SCREEN_WIDTH / width)))
        else:
            cached = ctx.picture(rel, pixels, fmt="jpeg")
        ctx.sources[rel] = cached
    return cached


class ScanStage(Stage):
    """The top-k images of each channel over a data set (issue 5), with their patches.

    One streaming pass over the image set serves every layer that needs it; the scan's own
    checkpoint makes an interrupted pass resumable.
    """

    name = "scan"
    version = 1

    def unavailable(self, ctx):
        if ctx.settings.scan_images is None:
            return "no image set to scan was given (--scan DIR, or --scan samples for the built-in set)"
        try:
            from ..datasets import FolderImages  # noqa: F401
            from ..methods.scan import scan  # noqa: F401
        except ImportError:
            return "the dataset scan (issue 5) is not part of this convscope yet"
        return None

    def settings(self, ctx, layer):
        images = _scan_images(ctx)
        return {"images": images.describe(), "top": ctx.settings.top, "limit": ctx.settings.scan_limit}

    def run(self, ctx, layers):
        from ..methods.scan import scan as scan_images

        images = _scan_images(ctx)
        keys = sorted(ctx.key(self, layer) for layer in layers)
        checkpoint = ctx.out / "records" / self.name / f"state-{make_key(keys=keys)}.pt"
        start = time.perf_counter()
        result = scan_images(ctx.loaded, images, [layer.name for layer in layers], top=ctx.settings.top,
                             checkpoint=checkpoint, resume=checkpoint.exists(), stop=ctx.settings.scan_limit,
                             progress=ctx.progress)
        if result.images_scanned == 0:
            checkpoint.unlink(missing_ok=True)
            raise ConvscopeError(f"the scan read no image ({len(result.skipped)} skipped as unreadable); "
                                 "give --scan a folder of readable images")
        per_layer = (time.perf_counter() - start) / len(layers)
        source = images.describe()
        described = source.get("root") if source.get("kind") == "folder" else "the built-in sample set"
        load = functools.lru_cache(maxsize=64)(images.load)  # the top images recur across channels
        for layer in layers:
            start = time.perf_counter()
            per_channel = {}
            for c in ctx.channels(layer):
                entries = []
                for example in result.examples(layer, c):
                    pixels = load(example.image)
                    top, left, bottom, right = example.box
                    entries.append({
                        "rank": example.rank, "image_id": example.image, "image": example.path,
                        "value": float(f"{example.value:.4g}"), "row": example.row, "col": example.col,
                        "box": list(example.box), "clipped": bool(example.clipped),
                        "image_size": list(images.size),
                        "source": _source_picture(ctx, self.name, str(example.image), pixels),
                        "patch": ctx.picture(ctx.data_path(self.name, layer, f"c{c:04d}_{example.rank}.png"),
                                             pixels[top:bottom, left:right]),
                    })
                per_channel[str(c)] = entries
            ctx.save_record(self, layer, {
                "per_channel": per_channel, "images_scanned": result.images_scanned,
                "skipped": len(result.skipped), "top": ctx.settings.top,
                "description": f"The {ctx.settings.top} images (of {result.images_scanned} scanned from "
                               f"{described}) where the channel fires hardest, one maximum per image.",
            }, seconds=per_layer + time.perf_counter() - start)
        checkpoint.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- deconv

# Distinct images per project_units call (they are batched inside; this bounds the memory).
DECONV_IMAGES = 32


DECONV_METHODS = ("auto", "deconvnet", "guided", "gradient")


def _has_max_pooling(loaded: LoadedModel) -> bool:
    return any(layer.type.startswith(("MaxPool", "AdaptiveMaxPool")) for layer in loaded.catalogue)


class DeconvStage(Stage):
    """Projections beside their patches for each visualised channel's top units (issue 4).

    With a scan, the units are the scan's top-k examples. Without one, each photo's strongest
    unit of the channel, strongest photos first.

    The method (``settings.deconv_method``): ``"auto"`` takes Zeiler & Fergus's deconvnet when
    the model has max-pooling, and guided backprop otherwise. Why: the deconvnet's rectifier rule
    ignores the forward pass, so in a network without max-pooling switches (EfficientNet, most
    modern nets) a unit's deconvnet projection is the same for every image, only shifted with the
    unit's position. Guided backprop keeps the forward masks. A unit whose guided (or gradient)
    projection is all zero, as at the cap of a ReLU6 (where the forward mask is closed by
    definition), is shown with the deconvnet instead, and the page says so.
    """

    name = "deconv"
    version = 2

    def unavailable(self, ctx):
        try:
            from ..methods.deconv import Unit, project_units, render_projection_pair  # noqa: F401
        except ImportError:
            return "the deconvnet (issue 4) is not part of this convscope yet"
        return None

    @staticmethod
    def method(ctx: BuildContext) -> str:
        method = ctx.settings.deconv_method
        if method not in DECONV_METHODS:
            raise ConvscopeError(f"unknown projection method {method!r}; use one of {', '.join(DECONV_METHODS)}")
        if method == "auto":
            return "deconvnet" if _has_max_pooling(ctx.loaded) else "guided"
        return method

    def settings(self, ctx, layer):
        scan = ctx.keys.get(("scan", layer.name)) if ctx.record("scan", layer) else None
        # Without a scan the units are the photos' strongest, read from the activations record.
        acts = None if scan else ctx.keys.get(("activations", layer.name))
        return {"top": ctx.settings.top, "method": self.method(ctx), "scan": scan, "activations": acts}

    def run(self, ctx, layers):
        total = sum(len(ctx.channels(layer)) for layer in layers)
        bar = ctx.bar(self.name, total, "ch")
        with bar:
            for layer in layers:
                start = time.perf_counter()
                scan = ctx.record("scan", layer)
                if scan is not None:
                    data = self._from_scan(ctx, layer, scan, bar)
                else:
                    data = self._from_photos(ctx, layer, bar)
                data["method"] = self.method(ctx)
                data["description"] = f"{data['description']} {self._method_note(ctx)}"
                ctx.save_record(self, layer, data, seconds=time.perf_counter() - start)

    def _method_note(self, ctx) -> str:
        method = self.method(ctx)
        shown = {"deconvnet": "deconvnet projection (Zeiler & Fergus)", "guided": "guided-backprop projection",
                 "gradient": "gradient (saliency)"}[method]
        note = (f"Each {shown}, gray for zero and stretched symmetrically, is cropped to the unit's receptive "
                "field, like the image patch beside it.")
        if method == "deconvnet" and not _has_max_pooling(ctx.loaded):
            note += (" This model has no max-pooling, so the deconvnet's projection of a unit does not depend on "
                     "the image (its rectifier rule ignores the forward pass): use guided backprop for "
                     "image-specific projections.")
        elif method != "deconvnet":
            if ctx.settings.deconv_method == "auto":
                note += (" Guided backprop, not the deconvnet: this model has no max-pooling, so the deconvnet's "
                         "projection would be the same for every image.")
            note += (" Where a unit sits at its activation's cap (ReLU6 = 6) the guided projection is zero by "
                     "definition; such units are shown with the deconvnet and marked.")
        return note

    def _project(self, ctx, layer, pixels: list[np.ndarray], units):
        """Projections with the stage's method; all-zero ones redone with the deconvnet (``fallback``)."""
        from ..methods.deconv import project_units

        method = self.method(ctx)
        x = ctx.loaded.preprocessing.to_tensor(pixels, ctx.loaded.device)
        proj = project_units(ctx.loaded, x, layer, units, method=method)
        fallback = np.zeros(len(units), dtype=bool)
        if method != "deconvnet" and len(units):
            fallback = np.abs(proj.maps).reshape(len(units), -1).max(axis=1) == 0
            if fallback.any():
                redo = [units[i] for i in np.flatnonzero(fallback)]
                again = project_units(ctx.loaded, x, layer, redo, method="deconvnet")
                proj.maps[fallback] = again.maps
        return proj, fallback

    def _projection_picture(self, ctx, layer, name, projection, photo, box) -> Picture:
        from ..methods.deconv import render_projection_pair

        image, _ = render_projection_pair(projection, photo, box)
        return ctx.picture(ctx.data_path(self.name, layer, name), image)

    def _from_scan(self, ctx, layer, scan: dict, bar) -> dict:
        from ..methods.deconv import Unit

        images = _scan_images(ctx)
        per_channel = {c: [dict(e) for e in entries] for c, entries in scan["per_channel"].items()}
        channels = sorted(per_channel, key=int)
        # Chunks of channels whose examples come from at most DECONV_IMAGES distinct images.
        chunks, current, ids = [], [], set()
        for c in channels:
            mine = {e["image_id"] for e in per_channel[c]}
            if current and len(ids | mine) > DECONV_IMAGES:
                chunks.append(current)
                current, ids = [], set()
            current.append(c)
            ids |= mine
        if current:
            chunks.append(current)
        drift = 0.0
        for chunk in chunks:
            order = sorted({e["image_id"] for c in chunk for e in per_channel[c]})
            slot = {image_id: i for i, image_id in enumerate(order)}
            pixels = [images.load(image_id) for image_id in order]
            units = [Unit(int(c), e["row"], e["col"], slot[e["image_id"]]) for c in chunk for e in per_channel[c]]
            if units:
                proj, fallback = self._project(ctx, layer, pixels, units)
                at = 0
                for c in chunk:
                    for e in per_channel[c]:
                        e["projection"] = self._projection_picture(
                            ctx, layer, f"c{int(c):04d}_{e['rank']}.png", proj.maps[at], pixels[slot[e["image_id"]]],
                            e["box"])
                        e["fallback"] = bool(fallback[at])
                        e["rerun_value"] = float(f"{float(proj.values[at]):.4g}")
                        scale = max(abs(per_channel[c][0]["value"]), 1e-6)
                        drift = max(drift, abs(e["rerun_value"] - e["value"]) / scale)
                        at += 1
            bar.update(len(chunk))
        return {"per_channel": per_channel, "from": "scan", "max_drift": drift,
                "description": scan.get("description", "")}

    def _from_photos(self, ctx, layer, bar) -> dict:
        from ..methods.deconv import Unit

        acts = ctx.record("activations", layer)
        channels = ctx.channels(layer)
        candidates: dict[int, list[dict]] = {c: [] for c in channels}
        photos_record = read_json(ctx.out / "records" / "photos.json") or {}
        photo_pics = {p["slug"]: p["image"] for p in photos_record.get("photos", [])}
        for photo in ctx.photos:
            if acts is not None:
                entry = acts["photos"][photo.slug]["channels"]
                units = [Unit(c, *entry[str(c)]["argmax"]) for c in channels]
            else:
                from ..methods.deconv import strongest_units

                x = ctx.loaded.preprocessing.to_tensor(photo.rgb, ctx.loaded.device)
                units = strongest_units(ctx.loaded, x, layer, channels)
            proj, fallback = self._project(ctx, layer, [photo.rgb], units)
            for i, unit in enumerate(units):
                box = [int(v) for v in proj.boxes[i]]
                top, left, bottom, right = box
                candidates[unit.channel].append({
                    "value": float(f"{float(proj.values[i]):.4g}"), "image": photo.name, "row": unit.row,
                    "col": unit.col, "box": box, "clipped": bool(proj.clipped[i]), "fallback": bool(fallback[i]),
                    "image_size": list(photo.rgb.shape[:2]),
                    "source": photo_pics.get(photo.slug) or ctx.picture(f"data/photos/{photo.slug}.jpg", photo.rgb,
                                                                         fmt="jpeg"),
                    "patch": ctx.picture(ctx.data_path(self.name, layer, f"c{unit.channel:04d}_{photo.slug}_patch.png"),
                                         photo.rgb[top:bottom, left:right]),
                    "projection": self._projection_picture(
                        ctx, layer, f"c{unit.channel:04d}_{photo.slug}.png", proj.maps[i], photo.rgb, box),
                })
        per_channel = {}
        for c in channels:
            ranked = sorted(candidates[c], key=lambda e: -e["value"])[:ctx.settings.top]
            per_channel[str(c)] = [{**e, "rank": k} for k, e in enumerate(ranked)]
            bar.update(1)
        return {"per_channel": per_channel, "from": "photos",
                "description": "No dataset scan in this atlas: the channel's strongest unit on each photo, "
                               "strongest first."}


STAGES: list[Stage] = [ActivationsStage(), FeaturesStage(), ScanStage(), DeconvStage()]
STAGE_NAMES = tuple(stage.name for stage in STAGES)


# ---------------------------------------------------------------------------------- driver

def _atlas_layers(loaded: LoadedModel, spec: str | Sequence[str] | None) -> list[LayerInfo]:
    layers = loaded.catalogue.resolve(spec)
    flat = [layer for layer in layers if not layer.is_spatial]
    if flat:
        raise ConvscopeError(
            f"the atlas shows feature maps (C, H, W); layer {flat[0].label} has shape {flat[0].shape}. "
            "Choose convolutional layers (`convscope layers` marks the default ones with *).")
    if not layers:
        raise ConvscopeError("no layers to show; pass --layers")
    return layers


def build_atlas(
    model: LoadedModel | torch.nn.Module,
    images: ImageSource | Iterable[ImageSource] | dict | None = None,
    out: str | Path = "runs/atlas",
    settings: AtlasSettings | None = None,
    *,
    progress: bool = True,
    stages: Sequence[Stage] | None = None,
) -> AtlasBuild:
    """Build (or bring up to date) the atlas of ``model`` over ``images`` in ``out``.

    Args:
        model: a :class:`LoadedModel` or any ``nn.Module`` (left untouched).
        images: photo files, folders, a ``{name: image}`` dict, or None for the sample photos.
        out: output folder; records from an earlier build there are reused when still valid.
        settings: what to build and the budget (:class:`AtlasSettings`).
        stages: the producers to run (default :data:`STAGES`), for tests and extensions.

    Returns:
        an :class:`AtlasBuild` with the path of ``index.html`` and what each stage did.

    Example:
        >>> build = build_atlas(load_model(), out="runs/atlas",
        ...                     settings=AtlasSettings(layers="blocks.2.*", channels_per_layer=8))
        >>> build.index
        PosixPath('runs/atlas/index.html')
    """
    from .pages import render_site

    settings = settings or AtlasSettings()
    unknown = [name for name in settings.skip if name not in STAGE_NAMES]
    if unknown:
        raise ConvscopeError(f"unknown stage {unknown[0]!r} to skip; stages are {', '.join(STAGE_NAMES)}")
    loaded = as_loaded(model)
    out = ensure_dir(out)
    layers = _atlas_layers(loaded, settings.layers)
    found = collect_photos(images, settings.max_photos)
    slugs = unique_slugs([name for name, _, _ in found])
    photos = [Photo(name, slug, source, loaded.preprocessing.fit(rgb)) for (name, source, rgb), slug in zip(found, slugs)]
    ctx = BuildContext(loaded, out, settings, layers, photos, progress)

    photos_record = build_photos(ctx)
    report: dict[str, dict] = {"photos": {"status": "built", "built": int(not photos_record.get("_reused")),
                                          "reused": int(bool(photos_record.get("_reused")))}}
    manifest_stages: dict[str, dict] = {}
    for stage in stages if stages is not None else STAGES:
        reason = stage.unavailable(ctx)
        if reason:
            report[stage.name] = {"status": "unavailable", "reason": reason}
            manifest_stages[stage.name] = {**report[stage.name], "records": {}}
            continue
        keys = {layer.name: ctx.key(stage, layer) for layer in layers}
        todo = [layer for layer in layers if ctx.valid_record(stage.name, layer, keys[layer.name]) is None]
        skipped = stage.name in settings.skip
        start = time.perf_counter()
        if todo and not skipped:
            stage.run(ctx, todo)
        seconds = time.perf_counter() - start
        done = {layer.name for layer in layers if ctx.valid_record(stage.name, layer, keys[layer.name])}
        built = sum(layer.name in done for layer in todo) if not skipped else 0
        info = {"status": "skipped" if skipped else "built", "built": built, "reused": len(done) - built,
                "seconds": round(seconds, 2),
                "channels_built": sum(len(ctx.channels(layer)) for layer in todo if layer.name in done)}
        report[stage.name] = info
        manifest_stages[stage.name] = {**info, "records": {
            ctx.slug(layer): f"records/{stage.name}/{ctx.slug(layer)}.json" for layer in layers if layer.name in done}}

    manifest = {
        "convscope": __version__,
        "model": {**loaded.describe(), "fingerprint": ctx.fingerprint},
        "settings": settings.as_dict(),
        "layers": [{**layer.as_dict(), "slug": ctx.slug(layer), "label": layer.label,
                    "global_field": layer.global_field, "visualised": ctx.channels(layer)} for layer in layers],
        "photos": "records/photos.json",
        "stages": manifest_stages,
    }
    save_json(manifest, out / "atlas.json")
    start = time.perf_counter()
    index = render_site(out, progress=progress)
    report["pages"] = {"status": "built", "built": 1, "reused": 0, "seconds": round(time.perf_counter() - start, 2)}
    return AtlasBuild(out, index, report)


def stage_report(build: AtlasBuild) -> dict[str, Any]:
    """The JSON-able per-stage report (for ``--json`` and tests)."""
    return {name: dict(info) for name, info in build.stages.items()}

