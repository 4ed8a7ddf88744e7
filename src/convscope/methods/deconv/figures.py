"""Projections drawn beside their image patches, as in Zeiler & Fergus's figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from ... import render
from ...errors import ConvscopeError
from ...rectifiers import Rule

if TYPE_CHECKING:
    from .result import Projections

Box = tuple[int, int, int, int]

__all__ = ["render_projection_pair", "projection_sheet", "whole_image_sheet", "STRETCH_PERCENTILE"]


# The display stretch: ±(this percentile of |v| in the box) maps to 0 and 255. A few extreme
# pixels (common in guided backprop) would otherwise leave the rest of the map flat gray;
# the values beyond saturate. 100 gives the plain max.
STRETCH_PERCENTILE = 99.5


def render_projection_pair(
    projection: np.ndarray, photo: np.ndarray, box: Box, *, absolute: bool = False,
    percentile: float = STRETCH_PERCENTILE,
) -> tuple[Image.Image, Image.Image]:
    """The projection and the photo patch, both cropped to ``box``, as in Zeiler & Fergus's figures.

    Args:
        projection: ``(H, W, 3)`` signed projection (a row of :attr:`Projections.maps`).
        photo: ``(H, W, 3)`` uint8, the image the projection was computed on.
        box: ``(top, left, bottom, right)``, bottom/right exclusive.
        absolute: draw ``max_c |v|`` from black (0) to white (the saliency display) instead.
        percentile: the stretch bound, a percentile of ``|v|`` inside the box (100: the max).

    Returns:
        ``(projection_image, patch_image)``: PIL RGB images of the box's size. The projection
        is gray (128) where it is zero and stretched symmetrically: ``±bound`` reach 0 and 255.

    Example:
        >>> proj, patch = render_projection_pair(p.maps[0], rgb, p.boxes[0])
    """
    projection = np.asarray(projection, dtype=np.float32)
    photo = np.asarray(photo)
    if projection.ndim != 3 or projection.shape[-1] != 3 or photo.shape[:2] != projection.shape[:2]:
        raise ConvscopeError(f"projection {projection.shape} and photo {photo.shape} must both be (H, W, 3) of one size")
    top, left, bottom, right = (int(v) for v in box)
    top, left = max(top, 0), max(left, 0)
    bottom, right = min(bottom, photo.shape[0]), min(right, photo.shape[1])
    if bottom <= top or right <= left:
        raise ConvscopeError(f"empty box {box} for an image of {photo.shape[0]}x{photo.shape[1]}")
    crop = projection[top:bottom, left:right]
    if absolute:
        magnitude = np.abs(crop).max(axis=-1)
        peak = _bound(magnitude, percentile)
        gray = np.zeros_like(magnitude) if peak <= 0 else magnitude / peak
        proj = np.repeat((np.clip(gray, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
    else:
        proj = render.signed_to_gray(crop, _bound(crop, percentile))
    return Image.fromarray(proj), Image.fromarray(np.ascontiguousarray(photo[top:bottom, left:right]))


def _bound(values: np.ndarray, percentile: float) -> float:
    magnitude = np.abs(values)
    nonzero = magnitude[magnitude > 0]
    if not nonzero.size:
        return 0.0
    # the percentile of the nonzero values: a sparse map is not stretched by its zeros
    return float(np.percentile(nonzero, percentile)) if percentile < 100 else float(nonzero.max())


def _resize(image: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.NEAREST if factor >= 1 else Image.BILINEAR)


def _unit_label(p: Projections, i: int) -> str:
    u = p.units[i]
    text = f"ch {u.channel} ({u.row},{u.col}) {p.values[i]:.3g}"
    if u.image_index:
        text = f"img {u.image_index} " + text
    return text + (" clipped" if p.clipped[i] else "")


def _display_note(rules: Sequence[Rule], signed: bool) -> str:
    note = f"gray = 0; each projection stretched symmetrically to +-(its {STRETCH_PERCENTILE:g}th percentile of |v|)"
    for rule in rules:
        if rule.display == "magnitude" and not signed:
            note += f"; {rule.name} shown as max over RGB of |v|, black = 0"
    return note


def projection_sheet(
    photo: np.ndarray,
    projections: Projections | Sequence[Projections],
    *,
    title: str = "",
    signed: bool = False,
    tile: int | None = None,
    cols: int | None = None,
) -> Image.Image:
    """Each unit as a cell: its projection by each method, then the image patch, cropped to one box.

    Args:
        photo: ``(H, W, 3)`` uint8 image the projections were computed on.
        projections: one :class:`Projections`, or several of the same units (one per method).
        signed: show the gradient signed (like the others) instead of as ``|gradient|``.
        tile: display size in pixels of the largest box (default: the box's own size, kept
            between 96 and 160); every box of the sheet shares one scale.
    """
    group = list(projections) if isinstance(projections, list | tuple) else [projections]
    if not group or not len(group[0]):
        raise ConvscopeError("nothing to draw: no units were projected")
    ref = group[0]
    heights = [b[2] - b[0] for b in ref.boxes]
    widths = [b[3] - b[1] for b in ref.boxes]
    largest = max(max(heights), max(widths))
    factor = (tile or min(max(largest, 96), 160)) / largest
    slot_w, slot_h = math.ceil(max(widths) * factor), math.ceil(max(heights) * factor)
    gap = 2
    cells = []
    for i in range(len(ref)):
        images = [p.pair(i, photo, signed=signed)[0] for p in group]
        images.append(ref.pair(i, photo)[1])
        row = Image.new("RGB", (len(images) * slot_w + (len(images) - 1) * gap, slot_h), render.BACKGROUND)
        draw = ImageDraw.Draw(row)
        for k, im in enumerate(images):
            row.paste(_resize(im, factor), (k * (slot_w + gap), 0))
            if k < len(group) and not group[k].maps[i].any():
                draw.text((k * (slot_w + gap) + 3, 2), "all 0", fill=(200, 0, 0), font=render.font(11))
        cells.append(render.label_image(row, _unit_label(ref, i), size=11))
    cols = cols or max(1, min(len(cells), 1600 // (cells[0].width + 8)))
    rows = [render.stack_horizontal(cells[k:k + cols], gap=8) for k in range(0, len(cells), cols)]
    grid = render.stack_vertical([_pad(r, 8) for r in rows])
    methods = [p.method for p in group]
    box_note = f"box = receptive field, {max(heights)}x{max(widths)} px at most, clipped at the image border where marked"
    lines = [title, f"each cell: {' | '.join(methods)} | image patch; {box_note}", _display_note([p.rule for p in group], signed)]
    return render.stack_vertical([render.title_strip(grid.width, [ln for ln in lines if ln]), grid])


def _pad(image: Image.Image, bottom: int) -> Image.Image:
    out = Image.new("RGB", (image.width, image.height + bottom), render.BACKGROUND)
    out.paste(image, (0, 0))
    return out


def whole_image_sheet(
    photo: np.ndarray,
    projections: Projections,
    *,
    title: str = "",
    signed: bool = False,
    tile: int = 160,
    cols: int | None = None,
) -> Image.Image:
    """The whole-image version: the photo, then each unit's full projection with its box in red."""
    if not len(projections):
        raise ConvscopeError("nothing to draw: no units were projected")
    height, width = photo.shape[:2]
    factor = tile / max(height, width)
    absolute = projections.rule.display == "magnitude" and not signed
    tiles = []
    overview = _resize(Image.fromarray(np.ascontiguousarray(photo)), factor)
    draw = ImageDraw.Draw(overview)
    for box in projections.boxes:
        draw.rectangle(_scaled_box(box, factor), outline=(255, 0, 0))
    tiles.append(render.label_image(overview, "input and all boxes", size=11))
    for i in range(len(projections)):
        full, _ = render_projection_pair(projections.maps[i], photo, (0, 0, height, width), absolute=absolute)
        full = _resize(full, factor)
        ImageDraw.Draw(full).rectangle(_scaled_box(projections.boxes[i], factor), outline=(255, 0, 0))
        tiles.append(render.label_image(full, _unit_label(projections, i), size=11))
    cols = cols or max(1, min(len(tiles), 1600 // (tiles[0].width + 6)))
    rows = [render.stack_horizontal(tiles[k:k + cols], gap=6) for k in range(0, len(tiles), cols)]
    grid = render.stack_vertical([_pad(r, 6) for r in rows])
    lines = [title, f"{projections.method}: whole image, receptive-field box in red",
             _display_note([projections.rule], signed)]
    return render.stack_vertical([render.title_strip(grid.width, [ln for ln in lines if ln]), grid])


def _scaled_box(box: Box, factor: float) -> tuple[int, int, int, int]:
    top, left, bottom, right = box
    return (int(left * factor), int(top * factor), max(int(left * factor), math.ceil(right * factor) - 1),
            max(int(top * factor), math.ceil(bottom * factor) - 1))
