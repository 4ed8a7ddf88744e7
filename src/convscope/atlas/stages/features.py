"""The features stage: per layer, the feature visualization of each visualised channel, with its
objective and ``dead`` flag (:func:`convscope.visualize_features`), and sprite sheets of them all."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ...layers import LayerInfo
from ...methods.features import visualize_features
from ...methods.features.engine import make_recipe
from ...models import LoadedModel
from ...precision import PICTURE, Precision
from ..context import ATLAS_RECIPE, BuildContext, Stage
from ..store import Picture, read_json, record_files, sig_figure, write_record

__all__ = ["FeaturesStage", "FEATURE_CHUNK", "FEATURE_QUALITY", "SPRITE_TILE", "SPRITE_COLS", "SPRITE_ROWS",
           "FeatureUnit", "FeatureJob", "visualize_chunk"]

# Channels optimized per call of visualize_features (one work unit): a crash loses at most one such chunk.
FEATURE_CHUNK = 16
# WebP quality of a channel's feature visualization: the channel page's main picture.
FEATURE_QUALITY = 90
# The layer page shows every channel as a tile of a sprite sheet: SPRITE_COLS x SPRITE_ROWS tiles of
# SPRITE_TILE px per sheet, so a layer of 1,280 channels is 5 pictures, not 1,280.
SPRITE_TILE = 64
SPRITE_COLS = 16
SPRITE_ROWS = 16


@dataclass(frozen=True)
class FeatureUnit:
    """One work unit: a chunk of a layer's channels; ``first`` is its offset in the layer's list."""

    layer: str
    channels: list[int]
    first: int


@dataclass(frozen=True)
class FeatureJob:
    """What every unit of a build shares: the recipe, its budget and the reference photos."""

    recipe: str
    steps: int
    size: int
    seed: int
    photos: dict[str, np.ndarray]
    precision: Precision


def visualize_chunk(loaded: LoadedModel, unit: FeatureUnit, job: FeatureJob) -> tuple[np.ndarray, list[dict], str]:
    """``(images, records, recipe name)`` of one unit: runs wherever the executor puts it."""
    result = visualize_features(loaded, unit.layer, unit.channels, recipe=job.recipe, steps=job.steps,
                                size=job.size, seed=job.seed, photos=job.photos, precision=job.precision)
    return result.images, result.records, result.recipe.name


class FeaturesStage(Stage):
    """Feature visualization of each visualised channel, with its ``dead`` flag.

    The dead test and the ratio use the atlas photos as the reference photos. Channels are
    optimized in chunks of :data:`FEATURE_CHUNK`, each cached on its own (a channel's image does
    not depend on which channels share its batch), so an interrupted layer resumes mid-way.
    """

    name = "features"
    version = 3  # 2: "dead" relative to the layer's scale; 3: WebP images and sprite sheets

    def settings(self, ctx, layer):
        s = ctx.settings
        # the recipe by its values, not its name: a named recipe is re-tuned between releases
        recipe = make_recipe(s.recipe if s.recipe is not None else ATLAS_RECIPE, steps=s.steps,
                             size=s.feature_size).as_dict()
        return {"steps": s.steps, "size": s.feature_size, "recipe": recipe, "seed": s.seed,
                "photos": ctx.photos_key, **ctx.precision_key(ctx.precision(PICTURE))}

    def run(self, ctx, layers):
        """Every chunk without a valid part record goes to ``ctx.executor``; each result is written
        (images, then the chunk's part record) as it arrives, and a layer's record once all its
        chunks are in, so an interrupted build, local or distributed, resumes from the chunks done."""
        bar = ctx.bar(self.name, sum(len(ctx.channels(layer)) for layer in layers), "ch")
        by_name = {layer.name: layer for layer in layers}
        seconds = {layer.name: 0.0 for layer in layers}
        per_channel: dict[str, dict[str, dict]] = {layer.name: {} for layer in layers}
        recipes: dict[str, str | None] = {layer.name: None for layer in layers}
        parts: dict[str, list] = {layer.name: [] for layer in layers}
        waiting: dict[str, int] = {layer.name: 0 for layer in layers}
        todo: list[FeatureUnit] = []
        with bar:
            for layer in layers:
                key = ctx.key(self, layer)
                channels = ctx.channels(layer)
                for first in range(0, len(channels), FEATURE_CHUNK):
                    chunk = channels[first:first + FEATURE_CHUNK]
                    part = self._part_path(ctx, layer, first)
                    parts[layer.name].append(part)
                    cached = read_json(part) or {}
                    if ctx.current(cached, key, record_files(cached.get("per_channel"))):
                        per_channel[layer.name].update(cached["per_channel"])
                        recipes[layer.name] = cached.get("recipe")
                        bar.update(len(chunk))
                    else:
                        todo.append(FeatureUnit(layer.name, chunk, first))
                        waiting[layer.name] += 1
            for layer in layers:
                if not waiting[layer.name]:
                    self._finish(ctx, layer, per_channel[layer.name], recipes[layer.name], parts[layer.name], 0.0)
            s = ctx.settings
            job = FeatureJob(**self.options(s), photos={p.slug: p.rgb for p in ctx.photos},
                             precision=ctx.precision(PICTURE))
            last = time.perf_counter()
            for unit, (images, records, recipe) in ctx.executor.map(ctx.loaded, visualize_chunk, todo, job):
                layer = by_name[unit.layer]
                bar.set_postfix_str(f"{layer.alias or layer.name} {unit.channels[0]}-{unit.channels[-1]}",
                                    refresh=False)
                done = self._write(ctx, layer, images, records)
                write_record(self._part_path(ctx, layer, unit.first),
                             {"key": ctx.key(self, layer), "recipe": recipe, "per_channel": done})
                per_channel[layer.name].update(done)
                recipes[layer.name] = recipe
                bar.update(len(unit.channels))
                seconds[layer.name] += time.perf_counter() - last   # the wait for this unit and its writing
                waiting[layer.name] -= 1
                if not waiting[layer.name]:
                    self._finish(ctx, layer, per_channel[layer.name], recipe, parts[layer.name], seconds[layer.name])
                last = time.perf_counter()

    @staticmethod
    def options(settings) -> dict:
        """The keyword arguments of :func:`visualize_features` for ``settings`` (the calibration uses them too)."""
        return {"recipe": settings.recipe or ATLAS_RECIPE, "steps": settings.steps, "size": settings.feature_size,
                "seed": settings.seed}

    def _part_path(self, ctx: BuildContext, layer: LayerInfo, first: int):
        return ctx.record_path(self.name, layer).with_suffix(f".part{first}.json")

    def _finish(self, ctx: BuildContext, layer: LayerInfo, per_channel: dict[str, dict], recipe: str | None,
                parts: list, seconds: float) -> None:
        """The layer's record (and sheet) from all its chunks; the part records are then redundant."""
        s = ctx.settings
        ordered = {c: per_channel[c] for c in sorted(per_channel, key=int)}
        ctx.save_record(self, layer, {
            "per_channel": ordered, "sprites": self._sprites(ctx, layer, ordered),
            "recipe": recipe, "steps": s.steps, "size": s.feature_size, "seed": s.seed,
            "precision": ctx.precision(PICTURE).as_dict(),
            "dead": sorted(int(c) for c, v in ordered.items() if v["dead"]),
        }, seconds=seconds)
        for part in parts:
            part.unlink(missing_ok=True)

    def _write(self, ctx: BuildContext, layer: LayerInfo, images: np.ndarray, records: list[dict]) -> dict[str, dict]:
        """The entries of one chunk of channels, their images written."""
        done = {}
        for image, rec in zip(images, records):
            c = int(rec["channel"])
            done[str(c)] = {
                "image": ctx.picture(ctx.data_path(self.name, layer, f"c{c:04d}.webp"), image, fmt="webp",
                                     quality=FEATURE_QUALITY),
                "objective": sig_figure(rec.get("objective")), "start": sig_figure(rec.get("start")),
                "ratio": sig_figure(rec.get("ratio")), "photo_best": sig_figure(rec.get("photo_best")),
                "dead": bool(rec.get("dead")),
            }
        return done

    @staticmethod
    def _sprites(ctx: BuildContext, layer: LayerInfo, per_channel: dict[str, dict]) -> list[Picture]:
        """Sprite sheets of the layer's feature visualizations, :data:`SPRITE_TILE` px tiles in channel order.

        Each channel's entry gets ``tile = [sheet, x, y]``, its sheet and its tile's pixel offset.
        """
        per_sheet = SPRITE_COLS * SPRITE_ROWS
        order = sorted(per_channel, key=int)
        sheets = []
        for first in range(0, len(order), per_sheet):
            chunk = order[first:first + per_sheet]
            cols = min(SPRITE_COLS, len(chunk))
            rows = -(-len(chunk) // cols)
            sheet = Image.new("RGB", (cols * SPRITE_TILE, rows * SPRITE_TILE), (204, 204, 204))
            for i, c in enumerate(chunk):
                with Image.open(ctx.out / per_channel[c]["image"]["full"]) as im:
                    tile = im.convert("RGB").resize((SPRITE_TILE, SPRITE_TILE), Image.LANCZOS)
                x, y = (i % cols) * SPRITE_TILE, (i // cols) * SPRITE_TILE
                sheet.paste(tile, (x, y))
                per_channel[c]["tile"] = [len(sheets), x, y]
            sheets.append(ctx.picture(ctx.data_path("features", layer, f"sprite{len(sheets)}.webp"), sheet, fmt="webp"))
        return sheets
