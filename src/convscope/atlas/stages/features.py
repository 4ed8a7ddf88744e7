"""The features stage: per layer, the feature visualization of each visualised channel, with its
objective and ``dead`` flag (:func:`convscope.visualize_features`), and a sheet of them all."""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from ... import render
from ...layers import LayerInfo
from ...methods.features import visualize_features
from ...precision import PICTURE
from ..context import ATLAS_RECIPE, BuildContext, Stage
from ..store import Picture, read_json, record_files, sig_figure, write_record

__all__ = ["FeaturesStage", "FEATURE_CHUNK"]

# Channels optimized per call of visualize_features: a crash loses at most one such chunk.
FEATURE_CHUNK = 16


class FeaturesStage(Stage):
    """Feature visualization of each visualised channel, with its ``dead`` flag.

    The dead test and the ratio use the atlas photos as the reference photos. Channels are
    optimized in chunks of :data:`FEATURE_CHUNK`, each cached on its own (a channel's image does
    not depend on which channels share its batch), so an interrupted layer resumes mid-way.
    """

    name = "features"
    version = 2  # 2: "dead" relative to the layer's scale

    def settings(self, ctx, layer):
        s = ctx.settings
        # the recipe by name: None has meant "lucid" before it meant "fast"
        recipe = s.recipe if s.recipe is not None else ATLAS_RECIPE
        return {"steps": s.steps, "size": s.feature_size, "recipe": recipe, "seed": s.seed,
                "photos": ctx.photos_key, **ctx.precision_key(ctx.precision(PICTURE))}

    def run(self, ctx, layers):
        bar = ctx.bar(self.name, sum(len(ctx.channels(layer)) for layer in layers), "ch")
        with bar:
            for layer in layers:
                start = time.perf_counter()
                key = ctx.key(self, layer)
                per_channel: dict[str, dict] = {}
                parts = []
                recipe = None
                channels = ctx.channels(layer)
                for first in range(0, len(channels), FEATURE_CHUNK):
                    chunk = channels[first:first + FEATURE_CHUNK]
                    part = ctx.record_path(self.name, layer).with_suffix(f".part{first}.json")
                    parts.append(part)
                    cached = read_json(part) or {}
                    if ctx.current(cached, key, record_files(cached.get("per_channel"))):
                        done, recipe = cached["per_channel"], cached.get("recipe")
                    else:
                        bar.set_postfix_str(f"{layer.alias or layer.name} {chunk[0]}-{chunk[-1]}", refresh=True)
                        done, recipe = self._visualize(ctx, layer, chunk)
                        write_record(part, {"key": key, "recipe": recipe, "per_channel": done})
                    per_channel.update(done)
                    bar.update(len(chunk))
                s = ctx.settings
                ctx.save_record(self, layer, {
                    "per_channel": per_channel, "sheet": self._sheet(ctx, layer, per_channel, recipe),
                    "recipe": recipe, "steps": s.steps, "size": s.feature_size, "seed": s.seed,
                    "precision": ctx.precision(PICTURE).as_dict(),
                    "dead": sorted(int(c) for c, v in per_channel.items() if v["dead"]),
                }, seconds=time.perf_counter() - start)
                for part in parts:
                    part.unlink(missing_ok=True)

    def _visualize(self, ctx: BuildContext, layer: LayerInfo, chunk: list[int]) -> tuple[dict[str, dict], str]:
        """The entries of one chunk of channels, their images written, and the recipe's name."""
        s = ctx.settings
        result = visualize_features(ctx.loaded, layer, chunk, recipe=s.recipe or ATLAS_RECIPE, steps=s.steps,
                                    size=s.feature_size, seed=s.seed, photos={p.slug: p.rgb for p in ctx.photos},
                                    precision=ctx.precision(PICTURE))
        done = {}
        for image, rec in zip(result.images, result.records):
            c = int(rec["channel"])
            done[str(c)] = {
                "image": ctx.picture(ctx.data_path(self.name, layer, f"c{c:04d}.png"), image),
                "objective": sig_figure(rec.get("objective")), "start": sig_figure(rec.get("start")),
                "ratio": sig_figure(rec.get("ratio")), "photo_best": sig_figure(rec.get("photo_best")),
                "dead": bool(rec.get("dead")),
            }
        return done, result.recipe.name

    @staticmethod
    def _sheet(ctx: BuildContext, layer: LayerInfo, per_channel: dict[str, dict], recipe: str | None) -> Picture:
        """All visualised channels of the layer as one picture, labelled with their numbers."""
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
