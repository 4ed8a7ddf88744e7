"""Occlusion maps drawn over the photo: probability, top class (with a legend), feature map, and the sheet.

Each map cell is drawn centred on its occluder's centre, one stride wide, so the colours sit
where the occluder was; the white square in the top-left corner shows the occluder's size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from ... import render

if TYPE_CHECKING:
    from .result import OcclusionResult

__all__ = ["probability_image", "activity_image", "label_image", "sheet"]


def _scale(res: OcclusionResult) -> int:
    """Draw small images bigger, so the maps stay readable (224 px -> 448)."""
    return max(1, round(320 / min(res.image.shape[:2])))


def _photo(res: OcclusionResult) -> np.ndarray:
    scale = _scale(res)
    if scale == 1:
        return res.image
    height, width = res.image.shape[:2]
    return np.asarray(Image.fromarray(res.image).resize((width * scale, height * scale), Image.BICUBIC))


def _cell_region(res: OcclusionResult) -> tuple[int, int, int, int]:
    """Photo box (top, left, height, width) spanned by the occluder centres +- stride/2."""
    scale = _scale(res)
    rows, cols = res.shape
    top = round((res.patch - res.stride) / 2 * scale)
    left = round((res.patch - res.stride) / 2 * scale)
    return top, left, rows * res.stride * scale, cols * res.stride * scale


def _overlay(res: OcclusionResult, values: np.ndarray, cmap: str, low: float, high: float, alpha: float = 0.55,
             resample=Image.BILINEAR, colors: np.ndarray | None = None) -> Image.Image:
    """``values (rows, cols)`` drawn over the photo, each cell centred on its occluder's centre."""
    photo = _photo(res).astype(np.float32)
    top, left, height, width = _cell_region(res)
    if colors is None:
        span = high - low if high > low else 1.0
        scaled = ((values.astype(np.float32) - low) / span)
        big = np.asarray(Image.fromarray(scaled, mode="F").resize((width, height), resample))
        tinted = render.colorize(np.clip(big, 0, 1), cmap).astype(np.float32)
    else:
        index = np.asarray(Image.fromarray(values.astype(np.int32), mode="I").resize((width, height), Image.NEAREST))
        tinted = colors[index].astype(np.float32)
    # clip the tinted block to the photo
    h0, w0 = max(0, -top), max(0, -left)
    h1 = min(height, photo.shape[0] - top)
    w1 = min(width, photo.shape[1] - left)
    region = photo[top + h0:top + h1, left + w0:left + w1]
    photo[top + h0:top + h1, left + w0:left + w1] = (1 - alpha) * region + alpha * tinted[h0:h1, w0:w1]
    out = Image.fromarray(np.clip(photo + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    scale = _scale(res)
    # the occluder's size, drawn at its first position
    draw.rectangle([0, 0, res.patch * scale - 1, res.patch * scale - 1], outline=(255, 255, 255))
    return out


def _panel(picture: Image.Image, lines: list[str], bar: Image.Image | None = None) -> Image.Image:
    body = render.stack_horizontal([picture, bar]) if bar is not None else picture
    text = max(int(render.font(12).getlength(line)) for line in lines) + 10
    return render.stack_vertical([render.title_strip(max(body.width, text), lines, size=12), body])


def _legend(rows: list[tuple[np.ndarray, str]], height: int) -> Image.Image:
    width = 12 + max((len(text) for _, text in rows), default=10) * 7
    image = Image.new("RGB", (width, max(height, 18 * len(rows) + 6)), render.BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, (color, text) in enumerate(rows):
        y = 4 + i * 18
        draw.rectangle([6, y, 18, y + 12], fill=tuple(int(v) for v in color), outline=(0, 0, 0))
        draw.text((24, y), text, fill=(0, 0, 0), font=render.font(11))
    return image


def _map_image(res: OcclusionResult, values: np.ndarray, cmap: str, heading: str, unoccluded: str) -> Image.Image:
    """``values`` over the photo with a colour bar spanning their own min..max."""
    low, high = float(values.min()), float(values.max())
    picture = _overlay(res, values, cmap, low, high)
    return _panel(picture, [heading, f"unoccluded: {unoccluded}; colour scale {low:.3g} .. {high:.3g}"],
                  render.colorbar(picture.height, low, high, cmap))


def probability_image(res: OcclusionResult, cmap: str = "jet") -> Image.Image:
    """The target-class probability map over the photo, with a colour bar (its own min..max)."""
    return _map_image(res, res.probability, cmap, f"p({res.target_name}) with the occluder centred at each point",
                      f"{res.base_probability:.3f}")


def activity_image(res: OcclusionResult, cmap: str = "viridis") -> Image.Image:
    """The chosen feature map's mean activation map over the photo, with a colour bar."""
    return _map_image(res, res.activity, cmap,
                      f"{res.layer.alias or res.layer.name} ch {res.channel}: mean activation vs occluder",
                      f"{res.base_activity:.3g}")


def label_image(res: OcclusionResult, max_classes: int = 12) -> Image.Image:
    """The most probable class at each occluder position, with a legend (share of positions)."""
    classes, counts = np.unique(res.labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    classes, counts = classes[order], counts[order]
    shown = classes[:max_classes]
    palette = (render.lut("tab20")[np.linspace(0, 255, 20).astype(int)]).astype(np.uint8)
    colors = np.empty((len(shown) + 1, 3), np.uint8)
    colors[:len(shown)] = palette[np.arange(len(shown)) * 2 % 20 + np.arange(len(shown)) * 2 // 20]
    colors[len(shown)] = (128, 128, 128)  # every class beyond the legend
    index = np.full(res.labels.shape, len(shown), np.int32)
    for i, cls in enumerate(shown):
        index[res.labels == cls] = i
    picture = _overlay(res, index, "tab20", 0, 1, alpha=0.6, colors=colors)
    total = res.labels.size
    rows = [(colors[i], f"{res.class_name(int(c))}{' (unoccluded)' if c == res.base_label else ''}: "
                       f"{counts[i] / total:.0%}") for i, c in enumerate(shown)]
    if len(classes) > len(shown):
        rows.append((colors[-1], f"{len(classes) - len(shown)} other classes: {counts[len(shown):].sum() / total:.0%}"))
    legend = _legend(rows, picture.height)
    noun = "class" if len(classes) == 1 else "classes"
    return _panel(picture, ["most probable class with the occluder centred at each point",
                            f"{len(classes)} {noun}; share of positions in the legend"], legend)


def sheet(res: OcclusionResult) -> Image.Image:
    """Photo, probability map, label map and feature map side by side, under one title."""
    photo = Image.fromarray(_photo(res))
    photo_panel = _panel(photo, [f"input {res.image.shape[1]}x{res.image.shape[0]}",
                                 f"patch {res.patch} px (white square), stride {res.stride}, {res.fill} fill"])
    row = render.stack_horizontal([photo_panel, probability_image(res), label_image(res), activity_image(res)], gap=8)
    strip = render.title_strip(row.width, [
        f"occlusion sensitivity · {res.model_title}",
        f"{res.shape[0]}x{res.shape[1]} occluder positions · {res.method} · {res.seconds:.1f} s",
    ])
    return render.stack_vertical([strip, row])
