"""Where atlas files go, how they are named, and how a record proves it is still valid.

Every stage writes pictures under ``OUT/data/<stage>/<layer-slug>/`` and one small JSON record
per layer under ``OUT/records/<stage>/<layer-slug>.json``. A record carries the key it was made
with (a hash of the model fingerprint, the layer, the stage's settings and its code version) and
lists every file it refers to, so a later build can tell a valid record from a stale or
half-made one without opening the pictures.

Names of layers and photos come from the user's model and folders and are not trusted: file
names are slugs (``[A-Za-z0-9._-]`` plus a hash when anything was replaced), and the pages
escape every name they print.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._io import atomic_path, save_png

__all__ = ["slugify", "unique_slugs", "make_key", "save_picture", "pack_row", "record_files",
           "read_json", "Picture", "sig_figure", "sig_figures"]

# A picture as the pages see it: the file to show ("src", possibly a smaller copy sized for the
# screen), the full-resolution file ("full") and the shown size in pixels.
Picture = dict[str, Any]

# Pictures wider than this get a smaller JPEG copy for the page; the full PNG opens on click.
SCREEN_WIDTH = 1100

# WebP quality of the atlas's per-channel pictures (feature visualizations, projections, heat
# maps, sprites): they are written by the ten thousand, so their bytes decide the atlas's size.
# 80 keeps them visually indistinguishable at display size at a fraction of a PNG's bytes.
WEBP_QUALITY = 80

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slugify(name: str, max_len: int = 60) -> str:
    """A file-name-safe, stable version of ``name``; a short hash is added when anything changed.

    Example:
        >>> slugify("blocks.3.1.bn2")
        'blocks.3.1.bn2'
        >>> slugify("<script>alert(1)</script>")  # doctest: +ELLIPSIS
        'script_alert_1_script-...'
    """
    slug = _UNSAFE.sub("_", name).strip("_").lstrip(".")[:max_len]
    if slug != name or not slug:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:6]
        slug = f"{slug or 'x'}-{digest}"
    return slug


def unique_slugs(names: list[str]) -> list[str]:
    """Slugs for ``names`` that are unique even case-insensitively (for case-folding file systems)."""
    seen: set[str] = set()
    out = []
    for i, name in enumerate(names):
        slug = slugify(name)
        if slug.lower() in seen:
            slug = f"{slug}-{i}"
        seen.add(slug.lower())
        out.append(slug)
    return out




def make_key(**parts: Any) -> str:
    """A stable hash of JSON-able ``parts`` (stage, version, model, layer, settings, ...)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def save_picture(out: Path, rel: str, image: Image.Image | np.ndarray, *, fmt: str = "png",
                 screen_width: int = SCREEN_WIDTH, max_side: int | None = None,
                 quality: int = WEBP_QUALITY, lossless: bool = False) -> Picture:
    """Write ``image`` to ``out/rel`` atomically; add a screen-sized JPEG when it is wide.

    ``fmt="webp"`` (lossy at ``quality``, or ``lossless``) suits the per-channel pictures, ``"jpeg"`` photo-like
    pictures, PNG grids with sharp tiles and anything that must stay exact. ``max_side`` first
    shrinks the picture to the size it is shown at (never enlarges it).
    Returns the :data:`Picture` the pages use.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode not in ("RGB", "L", "P"):
        image = image.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                            Image.LANCZOS)
    if fmt == "png":
        save_png(image, out / rel)  # palette grids stay palette PNGs: a third of the bytes
    elif fmt == "webp":
        with atomic_path(out / rel) as tmp:
            image.convert("RGB").save(tmp, format="WEBP", quality=quality, lossless=lossless, method=4)
    else:
        _save_jpeg(image, out / rel)
    picture: Picture = {"src": rel, "full": rel, "width": image.width, "height": image.height}
    if image.width > screen_width:
        small_rel = str(Path(rel).with_suffix("")) + ".screen.jpg"
        height = max(1, round(image.height * screen_width / image.width))
        _save_jpeg(image.convert("RGB").resize((screen_width, height), Image.BILINEAR, reducing_gap=2.0),
                   out / small_rel)
        picture.update(src=small_rel, width=screen_width, height=height)
    return picture


def pack_row(images: list[Image.Image], pad: int = 1, fill: tuple[int, int, int] | None = None,
             ) -> tuple[Image.Image, list[list[int]]]:
    """``images`` side by side in one picture, each framed by ``pad`` pixels; and each one's box in it.

    A page shows one image of the row by scaling and shifting the row as a CSS background. The
    frame keeps a neighbour from bleeding into the edge when the browser smooths the scaled row:
    it repeats the image's own edge pixels (``fill=None``) or is ``fill``.
    Boxes are ``[top, left, bottom, right]`` in pixels of the row.
    """
    height = max(im.height for im in images) + 2 * pad
    width = sum(im.width + 2 * pad for im in images)
    row = Image.new("RGB", (width, height), fill or (0, 0, 0))
    boxes, x = [], 0
    for im in images:
        pixels = np.asarray(im.convert("RGB"))
        if fill is None:
            framed = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        else:
            framed = np.empty((im.height + 2 * pad, im.width + 2 * pad, 3), np.uint8)
            framed[...] = fill
            framed[pad:pad + im.height, pad:pad + im.width] = pixels
        row.paste(Image.fromarray(framed), (x, 0))
        boxes.append([pad, x + pad, pad + im.height, x + pad + im.width])
        x += framed.shape[1]
    return row, boxes


def _save_jpeg(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.convert("RGB").save(tmp, format="JPEG", quality=88)


def iter_pictures(data: Any) -> Iterator[Picture]:
    """Every :data:`Picture` inside a record (any nesting of dicts and lists)."""
    if isinstance(data, dict):
        if "src" in data and "full" in data:
            yield data
            return
        for value in data.values():
            yield from iter_pictures(value)
    elif isinstance(data, list):
        for value in data:
            yield from iter_pictures(value)


def record_files(data: Any) -> list[str]:
    """The relative paths of all files a record refers to."""
    files: dict[str, None] = {}
    for picture in iter_pictures(data):
        files[picture["src"]] = None
        files[picture["full"]] = None
    return list(files)


def read_json(path: Path) -> dict | None:
    """A JSON file's contents, or None when it is missing or unreadable (a record to rebuild)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_record(path: Path, record: dict) -> None:
    """Write a record atomically, compact: a whole-model atlas holds a few KB of records per channel."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, separators=(",", ":")))


def sig_figures(values: Any, digits: int = 4) -> list[float]:
    """Floats rounded to ``digits`` significant digits, for small JSON records."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64).ravel()]


def sig_figure(value: Any) -> float | None:
    """One number rounded to 4 significant digits (None stays None)."""
    return None if value is None else float(f"{float(value):.4g}")
