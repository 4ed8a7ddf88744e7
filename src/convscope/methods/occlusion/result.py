"""The occlusion maps of one image, with what made them, their pictures and their files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..._io import save_json, save_png
from ...layers import LayerInfo
from . import figures

__all__ = ["OcclusionResult"]


@dataclass
class OcclusionResult:
    """The three occlusion maps of one image, with what made them.

    Attributes:
        image: the RGB uint8 ``(H, W, 3)`` image as fed to the model.
        patch, stride, fill: the occluder; map cell ``(i, j)`` is the occluder with top-left
            corner ``(tops[i], lefts[j])``.
        target, target_name: the class whose probability is mapped.
        probability: ``(rows, cols)`` probability of the target class with the occluder there.
        labels: ``(rows, cols)`` the most probable class index there.
        label_probability: ``(rows, cols)`` that class's probability.
        activity: ``(rows, cols)`` mean activation of ``layer`` channel ``channel``.
        base_probability, base_label, base_activity: the same for the unoccluded image.
        method: ``"incremental"``, ``"plain"``, or the plain fallback with its reason.
        seconds: wall time of the occluded passes.
        incremental: what the incremental engine did (conv work fraction, materialised ops).
    """

    image: np.ndarray
    patch: int
    stride: int
    fill: str
    tops: np.ndarray
    lefts: np.ndarray
    target: int
    target_name: str
    probability: np.ndarray
    labels: np.ndarray
    label_probability: np.ndarray
    activity: np.ndarray
    layer: LayerInfo
    channel: int
    base_probability: float
    base_label: int
    base_activity: float
    class_names: list[str] | None
    model_title: str
    method: str
    seconds: float
    incremental: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.probability.shape

    def class_name(self, index: int) -> str:
        names = self.class_names or []
        return names[index] if 0 <= index < len(names) else f"class {index}"

    def probability_image(self, cmap: str = "jet") -> Image.Image:
        """The target-class probability map over the photo, with a colour bar (its own min..max)."""
        return figures.probability_image(self, cmap)

    def activity_image(self, cmap: str = "viridis") -> Image.Image:
        """The chosen feature map's mean activation map over the photo, with a colour bar."""
        return figures.activity_image(self, cmap)

    def label_image(self, max_classes: int = 12) -> Image.Image:
        """The most probable class at each occluder position, with a legend (share of positions)."""
        return figures.label_image(self, max_classes)

    def sheet(self) -> Image.Image:
        """Photo, probability map, label map and feature map side by side, under one title."""
        return figures.sheet(self)

    def summary_lines(self) -> list[str]:
        """A few lines for the terminal: target, range of the maps, top-class changes, method and time."""
        i, j = np.unravel_index(int(self.probability.argmin()), self.shape)
        lines = [
            f"target: {self.target_name}{'' if self.target_name == f'class {self.target}' else f' (class {self.target})'}; "
            f"unoccluded p = {self.base_probability:.3f}",
            f"{self.shape[0]}x{self.shape[1]} positions (patch {self.patch}, stride {self.stride}, "
            f"{self.fill} fill): p from {self.probability.min():.3f} (occluder at top {self.tops[i]}, "
            f"left {self.lefts[j]}) to {self.probability.max():.3f}",
            f"top class changes at {np.mean(self.labels != self.base_label):.0%} of positions",
            f"feature map: {self.layer.label} channel {self.channel}, mean activation "
            f"{self.activity.min():.3g} .. {self.activity.max():.3g} (unoccluded {self.base_activity:.3g})",
        ]
        method = self.method
        if self.incremental:
            method += f" (convolution work: {self.incremental['conv_mac_fraction']:.0%} of the plain forward's)"
        lines.append(f"{method}; {self.seconds:.1f} s")
        return lines

    def to_dict(self) -> dict:
        """Parameters and the raw maps (nested lists, row-major), for the JSON output."""
        return {
            "model": self.model_title, "image_size": list(self.image.shape[:2]),
            "patch": self.patch, "stride": self.stride, "fill": self.fill,
            "tops": self.tops.tolist(), "lefts": self.lefts.tolist(), "map_shape": list(self.shape),
            "target": self.target, "target_name": self.target_name,
            "base_probability": self.base_probability, "base_label": self.base_label,
            "base_label_name": self.class_name(self.base_label),
            "layer": self.layer.name, "layer_alias": self.layer.alias, "channel": self.channel,
            "base_activity": self.base_activity,
            "method": self.method, "seconds": round(self.seconds, 3), "incremental": self.incremental,
            "probability": self.probability.tolist(),
            "labels": self.labels.tolist(),
            "label_names": {int(c): self.class_name(int(c)) for c in np.unique(self.labels)},
            "label_probability": self.label_probability.tolist(),
            "activity": self.activity.tolist(),
        }

    def save(self, folder: str | os.PathLike, stem: str = "occlusion") -> dict:
        """Write the sheet, the three maps as pictures and ``{stem}.json`` (last) into ``folder``.

        Returns the JSON index: :meth:`to_dict` plus ``files``, the names written.
        """
        folder = Path(folder)
        files = {"json": f"{stem}.json", "sheet": f"{stem}.png", "probability": f"{stem}_probability.png",
                 "labels": f"{stem}_labels.png", "activity": f"{stem}_activity.png"}
        save_png(self.sheet(), folder / files["sheet"])
        save_png(self.probability_image(), folder / files["probability"])
        save_png(self.label_image(), folder / files["labels"])
        save_png(self.activity_image(), folder / files["activity"])
        index = {**self.to_dict(), "files": files}
        save_json(index, folder / files["json"])
        return index
