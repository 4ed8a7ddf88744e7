"""The activations stage: per layer, each photo's channel grid and strongest-channel overlay, each
visualised channel's heat map over each photo, and every channel's peak per photo."""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from ... import render
from ...layers import LayerInfo
from ...methods.activations import ActivationResult
from ..context import BuildContext, Stage
from ..store import sig_figures

__all__ = ["ActivationsStage", "MAP_BUDGET_BYTES"]

# Feature maps held in memory at once by the activations stage (all photos of a group of layers).
MAP_BUDGET_BYTES = 384 * 2**20


def _grid_columns(channels: int, height: int, width: int) -> int:
    """Columns that make a grid of ``channels`` tiles roughly 16:9."""
    return max(1, min(channels, round(np.sqrt(channels * (16 / 9) * height / max(width, 1)))))


class ActivationsStage(Stage):
    """Grids, overlays and per-channel heat maps of each layer on each photo, and channel peaks.

    ``silent`` in the record lists the channels never above zero on any photo.
    """

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
            "peaks": [sig_figures(row) for row in peaks],
            "means": [sig_figures(row) for row in means],
            "scale": {str(c): sig_figures([scale_low[c], scale_high[c], raw_low[c]]) for c in channels},
            "silent": [int(c) for c in silent],
            "num_channels": count,
        }
