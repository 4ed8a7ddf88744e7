"""What feature visualization returns: the images, one record per image, and the files they are saved as."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..._io import save_json, save_png
from ...layers import LayerInfo
from ...precision import FP32, Precision
from . import figures
from .engine import Recipe

__all__ = ["DEAD_FRACTION", "DEAD_THRESHOLD", "FeatureResult", "FeatureSet", "layer_scale", "dead_limit"]

# "Dead" is relative to the layer's scale: a channel is dead when its |activation| never exceeds
# DEAD_FRACTION x the layer's scale on any sample photo *and* the optimization cannot lift its
# objective above that same limit. The layer's scale is the median, over the layer's channels that
# fire on some photo, of each channel's largest |activation| on the photos (a random-init net's
# layers can sit at 1e-8, a trained one's at 1-10; an absolute limit calls every channel of the
# former dead). A median over the firing channels only: a sparse layer whose channels are mostly
# silent still has a scale.
DEAD_FRACTION = 1e-3
# The absolute floor, used only for a layer that is exactly zero on every photo (no scale):
# there a channel is dead when the optimization cannot lift its objective above this.
DEAD_THRESHOLD = 1e-3


def layer_scale(magnitudes: np.ndarray) -> float:
    """A layer's scale: the median, over its channels that fire (``> 0``), of each channel's largest
    |activation| on the photos (``magnitudes``, one per channel); 0.0 when none fires."""
    magnitudes = np.asarray(magnitudes, dtype=np.float64)
    firing = magnitudes[magnitudes > 0]
    return float(np.median(firing)) if firing.size else 0.0


def dead_limit(scale: float | None, fraction: float = DEAD_FRACTION, threshold: float = DEAD_THRESHOLD) -> float:
    """The limit of the dead test: ``fraction x scale``, or the absolute ``threshold`` when the layer
    has no scale (zero on every photo, or no layer)."""
    return fraction * scale if scale else threshold


@dataclass
class FeatureResult:
    """Synthesized images and what they reached.

    Attributes:
        images: ``(N, H, W, 3)`` uint8, one per record.
        records: one dict per image: ``channel`` (or ``class``), ``variant``, ``objective``
            (reached, on the image without transforms), ``start``, ``photo_best`` (the same
            objective's best over the sample photos), ``ratio`` (objective / photo_best, None
            when photo_best <= 0), ``peak`` (the channel's strongest unit on the image),
            ``photo_peak`` (the channel's strongest unit on any photo), ``photo_magnitude`` (its
            largest |activation| on any photo), ``dead`` (see :data:`DEAD_FRACTION`).
        layer: the layer (None for class objectives).
        objective: ``"channel"``, ``"neuron"``, ``"layer"``, ``"class"`` or a custom objective's name.
        recipe: the :class:`~convscope.methods.features.engine.Recipe` used.
        seed: the seed; the same seed gives the same images.
        model_title: model name and weights (says RANDOM INIT when so).
        dead_threshold: the absolute floor (:data:`DEAD_THRESHOLD`), used when the layer has no scale.
        dead_fraction: the relative limit (:data:`DEAD_FRACTION`).
        layer_scale: the layer's scale on the photos (None without a layer; 0.0 when the layer
            is zero on every photo).
        precision: the :class:`~convscope.precision.Precision` of the optimization (the
            objectives in the records are evaluated in float32 whatever it is).
    """

    images: np.ndarray
    records: list[dict]
    layer: LayerInfo | None
    objective: str
    recipe: Recipe
    seed: int
    model_title: str
    dead_threshold: float = DEAD_THRESHOLD
    seconds: float = 0.0
    chunk_size: int = 0
    history: np.ndarray | None = field(default=None, repr=False)
    dead_fraction: float = DEAD_FRACTION
    layer_scale: float | None = None
    precision: Precision = FP32

    @property
    def dead_limit(self) -> float:
        """The limit the dead test used: ``dead_fraction x layer_scale``, or the absolute floor
        when the layer has no scale (zero on every photo, or no layer)."""
        return dead_limit(self.layer_scale, self.dead_fraction, self.dead_threshold)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def dead_count(self) -> int:
        return sum(bool(r["dead"]) for r in self.records)

    @property
    def dead_channels(self) -> list[int]:
        return [r["channel"] for r in self.records if r["dead"] and "channel" in r]

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def settings(self) -> dict:
        """Everything that determines the images (a cache key for callers such as the atlas)."""
        return {"objective": self.objective, "layer": self.layer.name if self.layer else None,
                "recipe": self.recipe.as_dict(), "seed": self.seed, "model": self.model_title,
                "dead_threshold": self.dead_threshold, "dead_fraction": self.dead_fraction,
                "precision": self.precision.as_dict()}

    def _totals(self) -> dict:
        ratios = [r["ratio"] for r in self.records if r["ratio"] is not None]
        return {
            **self.settings(),
            "layer_info": self.layer.as_dict() if self.layer else None,
            "count": len(self.records), "dead": self.dead_count, "dead_channels": self.dead_channels,
            "layer_scale": None if self.layer_scale is None else float(f"{self.layer_scale:.6g}"),
            "dead_limit": float(f"{self.dead_limit:.6g}"),
            "median_ratio": float(np.median(ratios)) if ratios else None,
            "seconds": round(self.seconds, 2), "chunk_size": self.chunk_size,
        }

    def to_dict(self) -> dict:
        """The settings, the totals (count, dead, median ratio) and every record; no arrays."""
        return {**self._totals(), "records": [dict(r) for r in self.records]}

    def caption(self, i: int) -> str:
        return figures.caption(self.records[i])

    def sheet(self, cols: int = 8, min_tile: int = 96) -> Image.Image:
        """All images in a grid, each captioned with its channel and objective / best-photo ratio."""
        return figures.feature_sheet(self, cols=cols, min_tile=min_tile)

    def filenames(self) -> list[str]:
        names = []
        for r in self.records:
            if "channel" in r:
                stem = f"ch{r['channel']:04d}"
            elif "class" in r:
                stem = f"class{r['class']:04d}"
            else:
                stem = f"image{r['index']:03d}"
            names.append(f"{stem}_v{r['variant']}.png" if r.get("variant") else f"{stem}.png")
        return names

    def save(self, folder: str | os.PathLike, cols: int = 8) -> dict:
        """Write one PNG per image, ``sheet.png`` and ``features.json`` (last) into ``folder``; return the index."""
        folder = Path(folder)
        records = []
        for i, name in enumerate(self.filenames()):
            save_png(self.image(i), folder / name)
            records.append({**self.records[i], "png": name})
        save_png(self.sheet(cols=cols), folder / "sheet.png")
        index = {**self._totals(), "sheet": "sheet.png", "records": records}
        save_json(index, folder / "features.json")
        return index


@dataclass
class FeatureSet:
    """Feature visualizations of several layers (or of classes), saved side by side under one index.

    Attributes:
        results: one :class:`FeatureResult` per layer, or one for classes.
        model: the model's description (:meth:`LoadedModel.describe`).
        objective: the objective as asked for, e.g. ``"channel"`` or ``"class:281"``.
    """

    results: list[FeatureResult]
    model: dict
    objective: str

    @staticmethod
    def folder(result: FeatureResult) -> str:
        """The sub-folder a result is saved in: the layer's alias (or name), or ``classes``."""
        if result.layer is None:
            return "classes"
        return (result.layer.alias or result.layer.name).replace("/", "_")

    def _entry(self, result: FeatureResult) -> dict:
        stem = self.folder(result)
        if result.layer is None:
            return {"layer": None, "folder": stem, "sheet": f"{stem}/sheet.png", "count": len(result), "dead": 0}
        return {"layer": result.layer.name, "alias": result.layer.alias, "folder": stem,
                "sheet": f"{stem}/sheet.png", "count": len(result), "dead": result.dead_count,
                "dead_channels": result.dead_channels}

    def to_dict(self) -> dict:
        """The index: model, objective, one entry per layer (folder, sheet, counts), recipe and seed."""
        first = self.results[0]
        return {"model": self.model, "objective": self.objective,
                "layers": [self._entry(result) for result in self.results],
                "recipe": first.recipe.as_dict(), "seed": first.seed, "precision": first.precision.as_dict()}

    def save(self, folder: str | os.PathLike, cols: int = 8) -> dict:
        """Save each result in its sub-folder, then ``features.json`` indexing them; return the index."""
        folder = Path(folder)
        for result in self.results:
            result.save(folder / self.folder(result), cols=cols)
        index = self.to_dict()
        save_json(index, folder / "features.json")
        return index
