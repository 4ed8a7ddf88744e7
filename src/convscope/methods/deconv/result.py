"""What a projection returns: the units, their maps, and the Result that draws and saves itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..._io import save_json, save_npz, save_png
from ...layers import LayerInfo
from ...precision import FP32, Precision
from ...rectifiers import DECONVNET, Rule
from .figures import projection_sheet, render_projection_pair, whole_image_sheet

__all__ = ["Unit", "Projections", "DeconvResult", "Box"]

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Unit:
    """One unit of a layer: ``channel`` at map position (``row``, ``col``) for image ``image_index``."""

    channel: int
    row: int
    col: int
    image_index: int = 0


@dataclass
class Projections:
    """Projections of units of one layer back to input pixels.

    Attributes:
        units: the projected units.
        values: ``(N,)`` float32, each unit's activation in the plain forward pass.
        maps: ``(N, H, W, 3)`` float32, the signed projection in input pixel space (full image
            size, model-normalised units; zero outside the unit's receptive field).
        boxes: receptive-field box ``(top, left, bottom, right)`` per unit (bottom/right
            exclusive), clipped to the image.
        clipped: True where the box was clipped at the image border.
        rule: the backward rule (:data:`~convscope.rectifiers.DECONVNET`, ``GUIDED`` or ``GRADIENT``).
        layer: the layer's name.
        strategy: how the maps were batched (``crop``, ``shared``, ``full``, or a mix).
        precision: the :class:`~convscope.precision.Precision` of the forward and backward passes.
    """

    units: list[Unit]
    values: np.ndarray
    maps: np.ndarray
    boxes: list[Box]
    clipped: list[bool]
    rule: Rule = DECONVNET
    layer: str = ""
    strategy: str = ""
    precision: Precision = FP32

    def __len__(self) -> int:
        return len(self.units)

    @property
    def method(self) -> str:
        return self.rule.name

    def pair(self, i: int, photo: np.ndarray, *, signed: bool = False) -> tuple[Image.Image, Image.Image]:
        """:func:`~convscope.methods.deconv.figures.render_projection_pair` for unit ``i``, shown as the rule says."""
        absolute = self.rule.display == "magnitude" and not signed
        return render_projection_pair(self.maps[i], photo, self.boxes[i], absolute=absolute)

    def as_records(self) -> list[dict]:
        """One JSON-ready dict per unit: channel, row, col, image, value, box, clipped."""
        return [
            {"channel": u.channel, "row": u.row, "col": u.col, "image_index": u.image_index,
             "value": float(v), "box": list(b), "clipped": bool(c)}
            for u, v, b, c in zip(self.units, self.values, self.boxes, self.clipped)
        ]


@dataclass
class DeconvResult:
    """Projections of units of one layer for one photo, by one or more methods.

    Attributes:
        image: the RGB uint8 ``(H, W, 3)`` image as fed to the model.
        layer: the layer (its row traced at this image size).
        projections: ``method -> Projections`` (same units in the same order for every method).
        model_title: model name and weights (says RANDOM INIT when so).
    """

    image: np.ndarray
    layer: LayerInfo
    projections: dict[str, Projections]
    model_title: str
    notes: list[str] = field(default_factory=list)

    @property
    def units(self) -> list[Unit]:
        return next(iter(self.projections.values())).units

    def _title(self) -> str:
        return f"{self.layer.label} · {self.model_title}"

    def sheet(self, *, signed: bool = False, tile: int | None = None, cols: int | None = None) -> Image.Image:
        """All methods side by side for every unit, each beside its patch (a PIL image)."""
        return projection_sheet(self.image, list(self.projections.values()), title=self._title(),
                                signed=signed, tile=tile, cols=cols)

    def whole(self, method: str | None = None, *, signed: bool = False, tile: int = 160) -> Image.Image:
        """The whole-image projections of one method (default: the first)."""
        method = method or next(iter(self.projections))
        return whole_image_sheet(self.image, self.projections[method], title=self._title(), signed=signed, tile=tile)

    def to_dict(self) -> dict:
        """A JSON-ready description: layer, methods, and each unit's value and box."""
        first = next(iter(self.projections.values()))
        return {
            "model": self.model_title, "image_size": list(self.image.shape[:2]), "layer": self.layer.as_dict(),
            "methods": list(self.projections), "strategy": {m: p.strategy for m, p in self.projections.items()},
            "space": "gradient of the unit w.r.t. the model-normalised input, for a signal of 1 at the unit",
            "units": first.as_records(), "notes": list(self.notes), "precision": first.precision.as_dict(),
        }

    def save(self, folder: str | Path, *, signed: bool = False, tile: int | None = None, cols: int | None = None,
             save_arrays: bool = False) -> dict:
        """Write the sheet, one whole-image sheet per method, ``deconv.json`` last (and the arrays); return the index."""
        folder = Path(folder)
        stem = (self.layer.alias or self.layer.name).replace("/", "_")
        methods = list(self.projections)
        label = "all" if len(methods) > 1 else methods[0]
        files = {"sheet": f"{stem}_{label}.png"}
        save_png(self.sheet(signed=signed, tile=tile, cols=cols), folder / files["sheet"])
        for method in methods:
            files[f"whole_{method}"] = f"{stem}_{method}_whole.png"
            save_png(self.whole(method, signed=signed), folder / files[f"whole_{method}"])
        index = {**self.to_dict(), "files": files}
        if save_arrays:
            first = self.projections[methods[0]]
            index["arrays"] = f"{stem}_projections.npz"
            save_npz(folder / index["arrays"],
                     units=np.array([[u.channel, u.row, u.col, u.image_index] for u in first.units],
                                    np.int64).reshape(-1, 4),
                     values=first.values, boxes=np.array(first.boxes, np.int64).reshape(-1, 4),
                     clipped=np.array(first.clipped, bool), image=self.image,
                     **{m: p.maps for m, p in self.projections.items()})
        save_json(index, folder / "deconv.json")
        return index
