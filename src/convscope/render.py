"""Pictures from arrays: channel grids, heat-map overlays, strips and sheets, all without pyplot.

Everything here is vectorised numpy on whole stacks of channels; a grid is one pad and
one reshape, not a per-channel loop. Colour maps come from matplotlib's lookup tables.
Scaling is always stated on the picture: per-channel scaling says so in the title strip,
and a shared scale gets a colour bar.

Channel grids are palette ("P" mode) images: one byte per pixel instead of three makes
them faster to build and to encode as PNG and ~3x smaller, with 253 colour-map levels
(``.convert("RGB")`` gives pixels).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "colorize", "normalize_channels", "tile", "channel_grid", "title_strip", "stack_vertical",
    "stack_horizontal", "overlay_heatmap", "colorbar", "label_image", "signed_to_gray", "font", "palette",
    "quantize", "palette_image", "lut",
]

SEPARATOR_COLOR = (32, 32, 32)
BACKGROUND = (255, 255, 255)

# Palette layout of grid images: colour-map levels, then the three fixed colours.
LEVELS = 253
SEPARATOR_INDEX, BACKGROUND_INDEX, TEXT_INDEX = 253, 254, 255


@lru_cache(maxsize=16)
def palette(cmap: str = "viridis") -> list[int]:
    """A 256-entry PIL palette: ``LEVELS`` colour-map steps, then separator, background, text."""
    table = lut(cmap)[np.linspace(0, 255, LEVELS).round().astype(int)]
    fixed = np.array([SEPARATOR_COLOR, BACKGROUND, (0, 0, 0)], np.uint8)
    return np.concatenate([table, fixed]).reshape(-1).tolist()


def quantize(values01: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → palette indices ``0 .. LEVELS-1`` (uint8)."""
    return np.clip(np.nan_to_num(values01) * (LEVELS - 1) + 0.5, 0, LEVELS - 1).astype(np.uint8)


def palette_image(indices: np.ndarray, cmap: str = "viridis") -> Image.Image:
    image = Image.fromarray(indices, "P")
    image.putpalette(palette(cmap))
    return image


@lru_cache(maxsize=16)
def lut(cmap: str) -> np.ndarray:
    """The 256-entry RGB table of a matplotlib colormap, as float in [0, 1]."""
    import matplotlib

    try:
        table = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3]
    except KeyError:
        from .errors import ConvscopeError, suggest

        raise ConvscopeError(f"unknown colormap {cmap!r}.{suggest(cmap, list(matplotlib.colormaps))}") from None
    return (table * 255.0 + 0.5).astype(np.uint8)


@lru_cache(maxsize=8)
def font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def colorize(values01: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Values in [0, 1] of any shape → uint8 RGB of shape ``(..., 3)``."""
    index = np.clip(np.nan_to_num(values01) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return lut(cmap)[index]


def normalize_channels(maps: np.ndarray, mode: str = "channel") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale ``(C, H, W)`` maps into [0, 1].

    ``mode="channel"`` scales each channel by its own min..max (a flat channel becomes 0);
    ``mode="layer"`` uses one min..max for all. Returns ``(scaled, lows, highs)`` per channel.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if mode == "layer":
        lows = np.full(maps.shape[0], maps.min(initial=0.0) if maps.size else 0.0, np.float32)
        highs = np.full(maps.shape[0], maps.max(initial=0.0) if maps.size else 0.0, np.float32)
    elif mode == "channel":
        flat = maps.reshape(maps.shape[0], -1)
        lows, highs = flat.min(axis=1), flat.max(axis=1)
    else:
        from .errors import ConvscopeError

        raise ConvscopeError(f"unknown scaling {mode!r}: use 'channel' or 'layer'")
    span = np.where(highs > lows, highs - lows, 1.0)
    scaled = (maps - lows[:, None, None]) / span[:, None, None]
    return scaled, lows, highs


def tile(tiles: np.ndarray, cols: int, sep: int = 1, sep_value=SEPARATOR_COLOR, background=BACKGROUND) -> np.ndarray:
    """Lay ``(N, H, W[, C])`` tiles out row-major in ``cols`` columns with ``sep``-pixel separators.

    One pad and one reshape: tile ``i`` lands at row ``i // cols``, column ``i % cols``,
    its top-left pixel at ``(row * (H + sep) + sep, col * (W + sep) + sep)``.
    """
    squeeze = tiles.ndim == 3
    if squeeze:
        tiles = tiles[..., None]
    n, h, w, c = tiles.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    padded = np.empty((rows * cols, h + sep, w + sep, c), dtype=tiles.dtype)
    padded[...] = np.asarray(sep_value, dtype=tiles.dtype)
    padded[:n, sep:, sep:] = tiles
    if n < rows * cols:
        padded[n:, sep:, sep:] = np.asarray(background, dtype=tiles.dtype)
    grid = padded.reshape(rows, cols, h + sep, w + sep, c).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * (h + sep), cols * (w + sep), c)
    # close the right and bottom edges with a separator line too
    out = np.empty((grid.shape[0] + sep, grid.shape[1] + sep, c), dtype=tiles.dtype)
    out[...] = np.asarray(sep_value, dtype=tiles.dtype)
    out[: grid.shape[0], : grid.shape[1]] = grid
    return out[..., 0] if squeeze else out


def title_strip(width: int, lines: list[str], size: int = 14, cmap: str | None = None) -> Image.Image:
    """A white strip at least ``width`` pixels wide holding ``lines`` of text (a palette image when ``cmap``).

    The strip widens to its longest line: a narrow grid must not cut its own title.
    """
    line_height = size + 4
    text_width = max((int(font(size).getlength(line)) + 8 for line in lines), default=0)
    shape = (max(width, text_width, 1), line_height * len(lines) + 6)
    if cmap:
        strip = Image.new("P", shape, BACKGROUND_INDEX)
        strip.putpalette(palette(cmap))
        ink = TEXT_INDEX
    else:
        strip, ink = Image.new("RGB", shape, BACKGROUND), (0, 0, 0)
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * line_height), line, fill=ink, font=font(size))
    return strip


def _canvas(images: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """A blank canvas in the first image's mode (keeping a shared palette), else RGB."""
    first = images[0]
    if first.mode == "P" and all(im.mode == "P" for im in images):
        canvas = Image.new("P", size, BACKGROUND_INDEX)
        canvas.putpalette(first.getpalette())
        return canvas
    return Image.new("RGB", size, BACKGROUND)


def stack_vertical(images: list[Image.Image]) -> Image.Image:
    out = _canvas(images, (max(im.width for im in images), sum(im.height for im in images)))
    y = 0
    for im in images:
        out.paste(im if out.mode == im.mode else im.convert(out.mode), (0, y))
        y += im.height
    return out


def stack_horizontal(images: list[Image.Image], gap: int = 0) -> Image.Image:
    height = max(im.height for im in images)
    out = _canvas(images, (sum(im.width for im in images) + gap * (len(images) - 1), height))
    x = 0
    for im in images:
        out.paste(im if out.mode == im.mode else im.convert(out.mode), (x, 0))
        x += im.width + gap
    return out


def channel_grid(
    maps: np.ndarray,
    *,
    cols: int = 16,
    cmap: str = "viridis",
    scale: str = "channel",
    title: str | None = None,
    sep: int = 1,
    min_tile: int = 0,
) -> Image.Image:
    """All channels of one layer as one palette image, at native resolution.

    Args:
        maps: ``(C, H, W)`` activations of one image.
        cols: tiles per row.
        scale: ``"channel"`` (each tile by its own min..max, stated in the strip) or
            ``"layer"`` (one scale, with a colour bar).
        min_tile: upsample tiles (nearest) to at least this many pixels, for tiny deep maps.

    Example:
        >>> channel_grid(np.random.rand(64, 56, 56), title="block2_conv2").save("grid.png")
    """
    maps = np.asarray(maps, dtype=np.float32)
    scaled, lows, highs = normalize_channels(maps, scale)
    if min_tile and maps.shape[1] < min_tile:
        factor = -(-min_tile // maps.shape[1])
        scaled = scaled.repeat(factor, axis=1).repeat(factor, axis=2)
    indices = tile(quantize(scaled), cols, sep, SEPARATOR_INDEX, BACKGROUND_INDEX)
    grid = palette_image(indices, cmap)
    c, h, w = maps.shape
    # Two text lines, not three: rendering a line of text costs as much as building the grid itself.
    shape = f"{c} channels x {h}x{w}"
    if scale == "channel":
        lines = [title or "", f"{shape}; each tile scaled to its own min..max; raw range {lows.min():.3g} .. {highs.max():.3g}"]
        return stack_vertical([title_strip(grid.width, lines, cmap=cmap), grid])
    lines = [title or "", f"{shape}; one scale for all tiles: {lows[0]:.3g} .. {highs[0]:.3g}"]
    bar = colorbar(grid.height, float(lows[0]), float(highs[0]), cmap)
    body = stack_horizontal([grid.convert("RGB"), bar])
    return stack_vertical([title_strip(body.width, lines), body])


def colorbar(height: int, low: float, high: float, cmap: str = "viridis", width: int = 16) -> Image.Image:
    """A vertical colour bar with its end values, high at the top."""
    height = max(height, 40)
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(width, axis=1)
    bar = Image.fromarray(colorize(ramp, cmap))
    labels = Image.new("RGB", (64, height), BACKGROUND)
    draw = ImageDraw.Draw(labels)
    draw.text((3, 0), f"{high:.3g}", fill=(0, 0, 0), font=font(11))
    draw.text((3, height - 13), f"{low:.3g}", fill=(0, 0, 0), font=font(11))
    return stack_horizontal([Image.new("RGB", (4, height), BACKGROUND), bar, labels])


def overlay_heatmap(
    photo: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet",
    low: float | None = None, high: float | None = None,
) -> Image.Image:
    """Draw ``heat (h, w)`` upsampled (bilinear) over ``photo (H, W, 3)``.

    The heat map is scaled by ``low..high`` (default: its own min..max).
    """
    heat = np.asarray(heat, dtype=np.float32)
    low = float(heat.min()) if low is None else low
    high = float(heat.max()) if high is None else high
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    big = Image.fromarray(np.clip(scaled * 255.0, 0, 255).astype(np.uint8)).resize(
        (photo.shape[1], photo.shape[0]), Image.BILINEAR)
    colored = colorize(np.asarray(big, dtype=np.float32) / 255.0, cmap).astype(np.float32)
    blended = (1 - alpha) * photo.astype(np.float32) + alpha * colored
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def label_image(image: Image.Image, text: str, size: int = 12) -> Image.Image:
    """``image`` with a caption strip above it."""
    return stack_vertical([title_strip(image.width, [text], size), image])


def signed_to_gray(values: np.ndarray, bound: float | None = None) -> np.ndarray:
    """Signed ``(..., H, W[, 3])`` values → uint8 with gray (128) for zero, stretched symmetrically.

    The Zeiler & Fergus display: ``bound`` (default max |v|) maps to 0 and 255.
    """
    values = np.asarray(values, dtype=np.float32)
    bound = float(np.abs(values).max()) if bound is None else bound
    scaled = 0.5 + 0.5 * values / bound if bound > 0 else np.full_like(values, 0.5)
    return np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)
