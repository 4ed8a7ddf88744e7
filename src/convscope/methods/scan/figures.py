"""The scan's pictures: one Zeiler & Fergus figure per channel, projections beside image patches."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ... import render
from ...errors import ConvscopeError
from ...layers import LayerInfo
from ...rectifiers import DECONVNET, Rule, resolve_projection
from ..deconv import Unit, project_units, render_projection_pair

if TYPE_CHECKING:
    from .result import Example, ScanResult

__all__ = ["channel_figure", "render_channels", "relative_drift", "DRIFT_TOLERANCE"]

DRIFT_TOLERANCE = 0.01  # relative to the channel's top value


def relative_drift(examples: Sequence[Example], values: Sequence[float | None]) -> list[float]:
    """How far each re-run value is from the scanned one, relative to the channel's top value.

    ``values`` align with ``examples``; ``None`` (an example whose image could not be read again) is skipped.
    """
    if not examples:
        return []
    scale = max(abs(examples[0].value), 1e-6)
    return [abs(v - e.value) / scale for v, e in zip(values, examples) if v is not None]


def _tile_frame(layer: LayerInfo, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Tile frame in image pixels: the receptive field, at most the image."""
    rf_h, rf_w = (math.ceil(v) for v in (layer.rf_size or image_hw))
    return min(rf_h, image_hw[0]), min(rf_w, image_hw[1])


def _place(crop: Image.Image, example: Example, layer: LayerInfo, frame: tuple[int, int], scale: float) -> np.ndarray:
    """``crop`` (the clipped box) on a white tile that stands for the whole receptive field."""
    frame_h, frame_w = frame
    tile = Image.new("RGB", (max(1, round(frame_w * scale)), max(1, round(frame_h * scale))), render.BACKGROUND)
    top, left, bottom, right = example.box
    full_top, full_left, _, _ = layer.box(example.row, example.col)
    off_y = min(max(top - full_top, 0), frame_h - (bottom - top))
    off_x = min(max(left - full_left, 0), frame_w - (right - left))
    size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR if scale >= 1 else Image.LANCZOS
    tile.paste(crop.convert("RGB").resize(size, resample), (round(off_x * scale), round(off_y * scale)))
    return np.asarray(tile)


def _corner_label(tile: np.ndarray, text: str) -> np.ndarray:
    image = Image.fromarray(tile)
    draw = ImageDraw.Draw(image)
    font = render.font(11)
    left, top, right, bottom = draw.textbbox((2, 1), text, font=font)
    draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def channel_figure(
    layer: LayerInfo,
    channel: int,
    examples: Sequence[Example],
    pairs: Sequence[tuple[Image.Image, Image.Image]],
    *,
    image_hw: tuple[int, int],
    rule: Rule = DECONVNET,
    images_scanned: int | None = None,
    model_title: str = "",
    tile_px: int | None = None,
) -> Image.Image:
    """The Zeiler & Fergus figure for one channel: projections (left) beside patches (right).

    Args:
        examples: the channel's top examples, strongest first.
        pairs: ``(projection, patch)`` PIL crops of each example's clipped box, as made by
            :func:`convscope.methods.deconv.render_projection_pair`.
        rule: the projection's backward rule, named in the title.
        tile_px: tile side in pixels (default: the receptive field, between 64 and 128).

    Each tile stands for the unit's whole receptive field (at most the image): a box clipped
    at the image border sits where it belongs and the rest stays white. Values go in the
    top-left corner of each patch.
    """
    frame = _tile_frame(layer, image_hw)
    side = tile_px or min(128, max(64, max(frame)))
    scale = side / max(frame)
    cols = max(1, math.ceil(math.sqrt(max(len(examples), 1))))
    proj_tiles, patch_tiles = [], []
    for example, (proj, patch) in zip(examples, pairs):
        proj_tiles.append(_place(proj, example, layer, frame, scale))
        patch_tiles.append(_corner_label(_place(patch, example, layer, frame, scale), f"{example.value:.3g}"))
    if not proj_tiles:
        blank = np.full((side, side, 3), 255, np.uint8)
        proj_tiles, patch_tiles = [blank], [blank]
    left = Image.fromarray(render.tile(np.stack(proj_tiles), cols, sep=2))
    right = Image.fromarray(render.tile(np.stack(patch_tiles), cols, sep=2))
    sheets = render.stack_horizontal([left, right], gap=10)
    rf = "x".join(str(math.ceil(v)) for v in (layer.rf_size or image_hw))
    seen = f" of {images_scanned} images" if images_scanned is not None else ""
    lines = [f"{layer.label}  channel {channel}", f"top {len(examples)}{seen}; {model_title}",
             f"left: {rule.name} projections (gray = 0, each stretched to its own max |v|)",
             f"right: image patches, receptive field {rf} px (white: outside the image)"]
    # The default PIL font has no em dash or multiplication sign.
    lines = [line.replace("\u2014", "-").replace("\u00d7", "x") for line in lines]
    font = render.font(12)
    width = max(sheets.width, max(int(font.getlength(line)) + 10 for line in lines))
    return render.stack_vertical([render.title_strip(width, lines, size=12), sheets])


def render_channels(
    result: ScanResult,
    layer: str | LayerInfo,
    channels: Iterable[int] | None = None,
    *,
    method: str | Rule = DECONVNET,
    batch_size: int | None = None,
    units_per_chunk: int = 144,
    on_figure: Callable[[int, Image.Image, list[Example], list[float]], None] | None = None,
    progress: bool = True,
    strict: bool = True,
) -> dict[int, list[float]]:
    """Project every top example of ``channels`` back to pixels and draw each channel's figure.

    Only the top-k images are read again, a chunk of channels at a time (about
    ``units_per_chunk`` units per :func:`convscope.methods.deconv.project_units` call, which batches
    internally). ``on_figure(channel, figure, examples, rerun_values)`` receives each figure.
    A re-run value more than 1 % (of the channel's top value) off the recorded one raises a
    warning: the preprocessing or the weights changed since the scan. Every rule's maps are
    drawn signed (gray = 0), the gradient's too.

    Args:
        method: ``"deconvnet"`` (Zeiler & Fergus), ``"guided"`` or ``"gradient"``, or its Rule.
        strict: False backpropagates nonlinearities without a rule plainly instead of refusing them.

    Returns:
        ``channel -> re-run values``, one per example of the channel (``None`` where its image could not
        be read again).
    """
    rule = resolve_projection(method)
    layer = result.layer(layer)
    model, pre = result.model, result.model.preprocessing
    channels = list(range(layer.channels)) if channels is None else list(channels)
    per_chunk = max(1, units_per_chunk // result.topk.k)
    rerun: dict[int, list[float]] = {}
    drifted, worst = 0, 0.0
    bar = tqdm(total=len(channels), unit="ch", desc=f"render {layer.alias or layer.name}", disable=not progress,
               leave=False, dynamic_ncols=True)
    try:
        for first in range(0, len(channels), per_chunk):
            chunk = channels[first:first + per_chunk]
            found = {c: result.examples(layer, c) for c in chunk}
            photos = _load_photos(result, sorted({e.image for c in chunk for e in found[c]}))
            examples = {c: [e for e in found[c] if e.image in photos] for c in chunk}
            slot = {i: j for j, i in enumerate(sorted(photos))}
            units = [Unit(channel=c, row=e.row, col=e.col, image_index=slot[e.image])
                     for c in chunk for e in examples[c]]
            if units:
                x = pre.to_tensor([photos[i] for i in sorted(photos)], model.device)
                proj = project_units(model, x, layer, units, method=rule, batch_size=batch_size, strict=strict)
            at = 0
            for c in chunk:
                mine = examples[c]
                values = [float(v) for v in proj.values[at:at + len(mine)]] if mine else []
                pairs = [render_projection_pair(proj.maps[at + j], photos[e.image], e.box) for j, e in enumerate(mine)]
                at += len(mine)
                # Aligned with all of the channel's examples: None where the image could not be read again.
                by_rank = {e.rank: v for e, v in zip(mine, values)}
                rerun[c] = [by_rank.get(e.rank) for e in found[c]]
                off = relative_drift(found[c], rerun[c])
                drifted += sum(o > DRIFT_TOLERANCE for o in off)
                worst = max(worst, *off) if off else worst
                if on_figure is not None:
                    figure = channel_figure(layer, c, mine, pairs, image_hw=result.images.size, rule=rule,
                                            images_scanned=result.images_scanned, model_title=model.title)
                    on_figure(c, figure, mine, values)
                bar.update(1)
    finally:
        bar.close()
    if drifted:
        warnings.warn(f"{layer.label}: {drifted} re-run activations differ from the scan by more than "
                      f"{DRIFT_TOLERANCE:.0%} (worst {worst:.1%}); did the preprocessing or the weights change?",
                      stacklevel=2)
    return rerun


def _load_photos(result: ScanResult, ids: list[int]) -> dict[int, np.ndarray]:
    """The images still readable, by id; a warning for each one that no longer is."""
    photos = {}
    for i in ids:
        try:
            photos[i] = result.images.load(i)
        except ConvscopeError as err:
            warnings.warn(f"image {result.images.path(i)} can no longer be read ({err}); "
                          "its examples are left out of the figures", stacklevel=3)
    return photos
