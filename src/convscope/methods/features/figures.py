"""The feature-visualization sheet: every synthesized image in a grid, captioned with what it reached."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ... import render

if TYPE_CHECKING:
    from .result import FeatureResult

__all__ = ["unit_label", "caption", "dead_definition", "feature_sheet"]


def unit_label(record: dict) -> str:
    if "channel" in record:
        return f"ch {record['channel']}"
    if "class" in record:
        return f"class {record['class']}"
    return f"#{record['index']}"


def caption(record: dict) -> str:
    """``ch 3 x2.7``: the unit and its objective / best-photo ratio (or DEAD, or the raw value)."""
    head = unit_label(record)
    if record["dead"]:
        return f"{head} DEAD"
    if record["ratio"] is not None:
        return f"{head} x{record['ratio']:.1f}"
    if record["photo_best"] is not None:  # the photos never raise this objective above zero
        return f"{head} {record['objective']:.2g}/0"
    return f"{head} {record['objective']:.3g}"


def dead_definition(result: FeatureResult) -> str:
    """How the sheet's ``dead`` was decided: the relative limit and the layer's scale it used."""
    if result.layer_scale:
        return (f"dead = max |activation| on the photos and objective reached both <= {result.dead_limit:.2g}: "
                f"{result.dead_fraction:g} x the layer's scale {result.layer_scale:.2g} "
                "(median of the firing channels' max |activation|)")
    return (f"dead = zero on every sample photo (as is the whole layer) and objective reached <= "
            f"{result.dead_threshold:g}")


def feature_sheet(result: FeatureResult, cols: int = 8, min_tile: int = 96) -> Image.Image:
    """All images of ``result`` in a grid under a title strip that states the recipe and the dead count."""
    tiles = []
    for i, record in enumerate(result.records):
        im = result.image(i)
        if im.width < min_tile:
            factor = -(-min_tile // im.width)
            im = im.resize((im.width * factor, im.height * factor), Image.NEAREST)
        if record["dead"]:  # dim dead channels: their image is noise, not a feature
            im = Image.blend(im, Image.new("RGB", im.size, (128, 128, 128)), 0.6)
        tiles.append(np.asarray(render.label_image(im, caption(record), size=12)))
    grid = Image.fromarray(render.tile(np.stack(tiles), cols, sep=2))
    recipe = result.recipe
    height, width = recipe.size
    what = result.layer.label if result.layer else "classes"
    # the default PIL font has no em dash (the RANDOM INIT marker uses one)
    title = result.model_title.replace("\u2014", "-").replace("\u00d7", "x")
    lines = [
        f"{what} - feature visualization - {title}",
        f"recipe {recipe.name}: {recipe.steps} steps at {height}x{width}, seed {result.seed}, "
        f"objective {result.objective}",
        "x = objective reached / best value of the same objective on the sample photos; "
        "a/0 = reached a, photos 0",
    ]
    if result.objective in ("channel", "neuron"):
        lines.append(f"{result.dead_count} of {len(result.records)} dead; dead tiles dimmed")
        lines.append(dead_definition(result))
    # the strip is at least as wide as its text, even for a sheet of one image
    return render.stack_vertical([render.title_strip(max(grid.width, 720), lines), grid])
