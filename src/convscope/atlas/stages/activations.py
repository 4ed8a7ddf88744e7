"""The activations stage: per layer, each photo's channel grid and strongest-channel overlay, each
visualised channel's heat map on each photo, and every channel's peak and sparsity on the photos."""

from __future__ import annotations

import time

import numpy as np
from PIL import Image
from tqdm import tqdm

from ... import render
from ...layers import LayerInfo
from ...methods.activations import ActivationResult
from ..context import BuildContext, Stage
from ..store import sig_figures

__all__ = ["ActivationsStage", "MAP_BUDGET_BYTES", "HEAT_SIDE", "heat_image", "heat_rows"]

# Feature maps held in memory at once by the activations stage (all photos of a group of layers).
MAP_BUDGET_BYTES = 384 * 2**20
# A channel's heat maps are stored at the feature map's own resolution, at most this many pixels on
# the longer side, coloured, all photos' in one lossless WebP row per channel (a few hundred bytes
# to a few KB); the page lays each over its shared photo (the browser's smooth upscaling and 50%
# opacity reproduce render.overlay_heatmap), instead of one blended photo per channel and photo
# (~20 KB each).
HEAT_SIDE = 56


def heat_image(heat: np.ndarray, low: float, high: float, cmap: str) -> Image.Image:
    """``heat (h, w)`` scaled by ``low..high``, shrunk to :data:`HEAT_SIDE` (bilinear), coloured by ``cmap``."""
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    gray = Image.fromarray(np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if max(gray.size) > HEAT_SIDE:
        ratio = HEAT_SIDE / max(gray.size)
        gray = gray.resize((max(1, round(gray.width * ratio)), max(1, round(gray.height * ratio))), Image.BILINEAR)
    return Image.fromarray(render.colorize(np.asarray(gray, dtype=np.float32) / 255.0, cmap))


def heat_rows(stack: list[np.ndarray], channels: list[int], low: np.ndarray, high: np.ndarray, cmap: str,
              pad: int = 1) -> tuple[np.ndarray, list[list[int]]]:
    """Each channel's heat maps over all photos as one row, for all ``channels`` at once.

    The same pictures as :func:`heat_image` per channel and photo laid out by
    :func:`~convscope.atlas.store.pack_row` (edge-framed by ``pad``), computed per photo for all
    channels together: one scaling, one colour lookup and one framing per photo and layer.
    Returns ``rows (len(channels), H, W, 3)`` uint8 and each photo's box in a row.
    """
    index = np.asarray(channels, dtype=np.int64)
    low, high = np.asarray(low, np.float64)[index], np.asarray(high, np.float64)[index]
    span = np.where(high > low, high - low, 1.0).astype(np.float32)[:, None, None]
    flat = (high <= low)[:, None, None]
    lut = render.lut(cmap)
    tiles = []
    for maps in stack:
        scaled = np.where(flat, np.float32(0.0), (maps[index] - low.astype(np.float32)[:, None, None]) / span)
        gray = np.clip(scaled * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8)
        if max(gray.shape[1:]) > HEAT_SIDE:  # a few shallow layers: PIL's filter, as heat_image uses
            ratio = HEAT_SIDE / max(gray.shape[1:])
            size = (max(1, round(gray.shape[2] * ratio)), max(1, round(gray.shape[1] * ratio)))
            gray = np.stack([np.asarray(Image.fromarray(g).resize(size, Image.BILINEAR)) for g in gray])
        # colorize(gray / 255) looks up exactly the index gray
        tiles.append(np.pad(lut[gray], ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge"))
    height = max(t.shape[1] for t in tiles)
    rows = np.zeros((len(index), height, sum(t.shape[2] for t in tiles), 3), np.uint8)
    boxes, x = [], 0
    for t in tiles:
        rows[:, :t.shape[1], x:x + t.shape[2]] = t
        boxes.append([pad, x + pad, t.shape[1] - pad, x + t.shape[2] - pad])
        x += t.shape[2]
    return rows, boxes


def _grid_columns(channels: int, height: int, width: int) -> int:
    """Columns that make a grid of ``channels`` tiles roughly 16:9."""
    return max(1, min(channels, round(np.sqrt(channels * (16 / 9) * height / max(width, 1)))))


class ActivationsStage(Stage):
    """Grids, overlays and per-channel heat maps of each layer on each photo, and channel peaks.

    ``silent`` in the record lists the channels never above zero on any photo.
    """

    name = "activations"
    version = 3  # 3: heat maps laid over the photo, WebP, sparsity

    def settings(self, ctx, layer):
        return {"photos": ctx.photos_key, "cmap": ctx.settings.cmap}

    def run(self, ctx, layers):
        bar = ctx.bar(self.name, len(layers) * len(ctx.photos), "map")
        with bar:
            for group in self._groups(ctx, layers):
                start = time.perf_counter()
                maps: dict[str, list[np.ndarray]] = {layer.name: [] for layer in group}
                for photo in ctx.photos:
                    for name, layer_map in ctx.feature_maps(photo, group).items():
                        maps[name].append(layer_map)
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
        # Sparsity: the share of positions, over all photos, where the channel is at or below zero.
        at_or_below = np.stack([(m.reshape(count, -1) <= 0).sum(axis=1) for m in stack]).sum(axis=0)
        sparsity = at_or_below / sum(m[0].size for m in stack)
        # One scale per channel, shared by all photos, so the photos can be compared. It starts at 0
        # when the channel fires at all: the overlay shows where it fires, and a signed (linear)
        # layer's negative values would otherwise tint the whole photo. The page states the scale.
        raw_low, scale_high = lows.min(axis=0), peaks.max(axis=0)
        scale_low = np.where(scale_high > 0, np.maximum(raw_low, 0.0), raw_low)
        photos: dict[str, dict] = {}
        index = np.asarray(channels, dtype=np.int64)
        for i, (photo, maps) in enumerate(zip(ctx.photos, stack)):
            title = f"{layer.label} on {photo.name}"
            cols = _grid_columns(count, *maps.shape[1:])
            grid = render.channel_grid(maps, cols=cols, cmap="viridis", title=title, min_tile=8)
            result = ActivationResult(photo.rgb, [layer], {layer.name: maps}, ctx.loaded.title)
            entry = {
                "grid": ctx.picture(ctx.data_path(self.name, layer, f"{photo.slug}_grid.png"), grid),
                "overlay": ctx.picture(ctx.data_path(self.name, layer, f"{photo.slug}_top.webp"),
                                       result.overlay(layer, top=min(6, count), cmap=cmap), fmt="webp"),
                "channels": {},
            }
            width = maps.shape[2]
            argmax = maps.reshape(count, -1)[index].argmax(axis=1) if len(index) else index
            rows, cols = (argmax // width).tolist(), (argmax % width).tolist()
            for k, c in enumerate(channels):
                entry["channels"][str(c)] = {"peak": float(f"{peaks[i, c]:.4g}"), "argmax": [rows[k], cols[k]]}
            photos[photo.slug] = entry
            bar.update(1)
        strips = {}
        if channels:
            heat, boxes = heat_rows(stack, channels, scale_low, scale_high, cmap)
            for k, c in enumerate(channels):
                strips[str(c)] = ctx.picture(ctx.data_path(self.name, layer, f"c{c:04d}_heat.webp"), heat[k],
                                             fmt="webp", lossless=True, screen_width=10**6)
                for photo, box in zip(ctx.photos, boxes):
                    photos[photo.slug]["channels"][str(c)]["cell"] = box
        silent = np.flatnonzero((peaks <= 0).all(axis=0))
        return {
            "photos": photos,
            "heat": strips,
            "photo_order": [p.slug for p in ctx.photos],
            "peaks": [sig_figures(row) for row in peaks],
            "means": [sig_figures(row) for row in means],
            "scale": {str(c): sig_figures([scale_low[c], scale_high[c], raw_low[c]]) for c in channels},
            "silent": [int(c) for c in silent],
            "sparsity": sig_figures(sparsity, 3),
            "num_channels": count,
        }
