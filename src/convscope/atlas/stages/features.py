"""The features stage: per layer, the feature visualization of each visualised channel, with its
objective and ``dead`` flag (:func:`convscope.visualize_features`), and sprite sheets of them all."""

from __future__ import annotations

import time

from PIL import Image

from ...layers import LayerInfo
from ...methods.features import visualize_features
from ...precision import PICTURE
from ..context import ATLAS_RECIPE, BuildContext, Stage
from ..store import Picture, read_json, record_files, sig_figure, write_record

__all__ = ["FeaturesStage", "FEATURE_CHUNK", "FEATURE_QUALITY", "SPRITE_TILE", "SPRITE_COLS", "SPRITE_ROWS"]

# Channels optimized per call of visualize_features: a crash loses at most one such chunk.
FEATURE_CHUNK = 16
# WebP quality of a channel's feature visualization: the channel page's main picture.
FEATURE_QUALITY = 90
# The layer page shows every channel as a tile of a sprite sheet: SPRITE_COLS x SPRITE_ROWS tiles of
# SPRITE_TILE px per sheet, so a layer of 1,280 channels is 5 pictures, not 1,280.
SPRITE_TILE = 64
SPRITE_COLS = 16
SPRITE_ROWS = 16


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
                    "per_channel": per_channel, "sprites": self._sprites(ctx, layer, per_channel),
                    "recipe": recipe, "steps": s.steps, "size": s.feature_size, "seed": s.seed,
                    "precision": ctx.precision(PICTURE).as_dict(),
                    "dead": sorted(int(c) for c, v in per_channel.items() if v["dead"]),
                }, seconds=time.perf_counter() - start)
                for part in parts:
                    part.unlink(missing_ok=True)

    @staticmethod
    def options(settings) -> dict:
        """The keyword arguments of :func:`visualize_features` for ``settings`` (the calibration uses them too)."""
        return {"recipe": settings.recipe or ATLAS_RECIPE, "steps": settings.steps, "size": settings.feature_size,
                "seed": settings.seed}

    def _visualize(self, ctx: BuildContext, layer: LayerInfo, chunk: list[int]) -> tuple[dict[str, dict], str]:
        """The entries of one chunk of channels, their images written, and the recipe's name."""
        result = visualize_features(ctx.loaded, layer, chunk, photos={p.slug: p.rgb for p in ctx.photos},
                                    precision=ctx.precision(PICTURE), **self.options(ctx.settings))
        done = {}
        for image, rec in zip(result.images, result.records):
            c = int(rec["channel"])
            done[str(c)] = {
                "image": ctx.picture(ctx.data_path(self.name, layer, f"c{c:04d}.webp"), image, fmt="webp",
                                     quality=FEATURE_QUALITY),
                "objective": sig_figure(rec.get("objective")), "start": sig_figure(rec.get("start")),
                "ratio": sig_figure(rec.get("ratio")), "photo_best": sig_figure(rec.get("photo_best")),
                "dead": bool(rec.get("dead")),
            }
        return done, result.recipe.name

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
