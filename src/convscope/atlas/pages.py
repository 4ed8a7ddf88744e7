"""The atlas pages: static HTML rendered with Jinja2 from ``atlas.json`` and the stage records only.

Layout of the site (every link relative, so it opens from ``file://`` and from any server)::

    index.html                   model page: name, weights, preprocessing, layer table, predictions
    L/<layer>/index.html         layer page: every channel as a sprite tile, a sortable channel table,
                                 activation grid and overlay per photo
    L/<layer>/<channel>.html     channel page: feature viz, top-k projections and patches, overlays
    search-index.js              the names the search box knows (layers, aliases, channel pages)
    static/atlas.css, atlas.js   shipped with convscope; no CDN, no network

Names of layers and photos are untrusted: autoescaping is on for every template, URLs are built
only from slugs (``[A-Za-z0-9._-]``), and the search index is JSON with ``<``, ``>`` and ``&``
escaped.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from tqdm import tqdm

from .._io import atomic_path
from ..errors import ConvscopeError
from .store import read_json

__all__ = ["render_site", "STAGE_TITLES"]

STAGE_TITLES = {
    "activations": "Activations on the photos",
    "features": "Feature visualization",
    "scan": "Dataset scan",
    "deconv": "Deconvnet projections",
}


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("convscope.atlas", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["num"] = _format_number
    env.filters["rf"] = _format_field
    env.filters["shape"] = lambda shape: " x ".join(str(v) for v in shape)
    return env


def _format_number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def _format_field(layer: dict) -> str:
    if layer.get("global_field"):
        return "whole image"
    size = layer.get("rf_size")
    if not size:
        return "unknown"
    a, b = (int(v) if float(v).is_integer() else v for v in size)
    return f"{a} px" if a == b else f"{a}x{b} px"


def _js_json(data: Any) -> str:
    """JSON safe to place in a script: no ``</script>``, no HTML specials, no line separators."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class _Site:
    """``atlas.json`` and its records, read once, shaped for the templates."""

    def __init__(self, out: Path):
        self.out = out
        manifest = read_json(out / "atlas.json")
        if manifest is None:
            raise ConvscopeError(f"{out} holds no atlas (atlas.json is missing); build one with `convscope atlas`")
        self.manifest = manifest
        self.layers: list[dict] = manifest["layers"]
        self.stages: dict[str, dict] = manifest["stages"]
        self.photos: list[dict] = (read_json(out / manifest["photos"]) or {}).get("photos", [])
        photos_record = read_json(out / manifest["photos"]) or {}
        self.prediction_error = photos_record.get("prediction_error")
        self.records: dict[tuple[str, str], dict | None] = {}
        self.profile = read_json(out / manifest["profile"]) if manifest.get("profile") else None

    def record(self, stage: str, slug: str) -> dict | None:
        if (stage, slug) not in self.records:
            rel = self.stages.get(stage, {}).get("records", {}).get(slug)
            self.records[(stage, slug)] = read_json(self.out / rel) if rel else None
        return self.records[(stage, slug)]

    def stage_note(self, stage: str) -> str:
        """Why a layer has nothing from ``stage``, in words for the page."""
        info = self.stages.get(stage)
        if info is None:
            return "this stage was not part of the build"
        if info["status"] == "unavailable":
            return info["reason"]
        if info["status"] == "skipped":
            return f"skipped in this build (--skip {stage})"
        return "not built for this layer"

    def layer_summary(self, layer: dict) -> dict:
        slug = layer["slug"]
        acts = self.record("activations", slug)
        feats = self.record("features", slug)
        dead = None
        if feats:
            per_channel = feats.get("per_channel", {})
            dead = sum(bool(v.get("dead")) for v in per_channel.values())
        return {
            "silent": len(acts["silent"]) if acts else None,
            "dead": dead,
            "dead_of": len(feats.get("per_channel", {})) if feats else None,
        }


def _page_url(slug: str, channel: int | None = None) -> str:
    return f"L/{slug}/index.html" if channel is None else f"L/{slug}/{channel}.html"


def render_site(out: str | Path, *, progress: bool = True) -> Path:
    """Render every page of the atlas in ``out`` from its records; returns the path of index.html."""
    out = Path(out)
    site = _Site(out)
    env = _environment()
    _copy_static(out)
    _write_search_index(site)
    common = {"model": site.manifest["model"], "version": site.manifest.get("convscope", "?"), "stage_titles": STAGE_TITLES,
              "settings": site.manifest["settings"], "profile": site.profile}

    pages = 1 + sum(1 + len(layer["visualised"]) for layer in site.layers)
    bar = tqdm(total=pages, desc=f"{'pages':<11}", unit="page", disable=not progress, dynamic_ncols=True)
    with bar:
        rows = [{**layer, "url": _page_url(layer["slug"]), **site.layer_summary(layer)} for layer in site.layers]
        stages = [{"name": name, "title": STAGE_TITLES.get(name, name), **info, "records": len(info.get("records", {}))}
                  for name, info in site.stages.items()]
        html = env.get_template("model.html.j2").render(
            root="", title=site.manifest["model"]["title"], rows=rows, photos=site.photos, stages=stages,
            prediction_error=site.prediction_error, prev_url=None, prev_label=None,
            next_url=_page_url(rows[0]["slug"]) if rows else None, next_label=rows[0]["label"] if rows else None,
            up_url=None, **common)
        _write_text(out / "index.html", html)
        bar.update(1)
        for i in range(len(site.layers)):
            _render_layer(env, site, i, common, bar)
    return out / "index.html"


def _render_layer(env: Environment, site: _Site, i: int, common: dict, bar: tqdm) -> None:
    layer = site.layers[i]
    slug = layer["slug"]
    prev_layer = site.layers[i - 1] if i > 0 else None
    next_layer = site.layers[i + 1] if i + 1 < len(site.layers) else None
    acts = site.record("activations", slug)
    feats = site.record("features", slug)
    scan = site.record("scan", slug)
    deconv = site.record("deconv", slug)
    photos = _photo_views(site, acts)
    visualised = layer["visualised"]
    root = "../../"
    tiles = _tiles(site, acts, feats, visualised, root)
    summary = site.layer_summary(layer)
    html = env.get_template("layer.html.j2").render(
        root=root, title=layer["label"], layer=layer, tiles=tiles, photos=photos, acts=acts, feats=feats, deconv=deconv,
        summary=summary, notes={name: site.stage_note(name) for name in STAGE_TITLES},
        prev_url=root + _page_url(prev_layer["slug"]) if prev_layer else None,
        next_url=root + _page_url(next_layer["slug"]) if next_layer else None,
        prev_label=prev_layer["label"] if prev_layer else None,
        next_label=next_layer["label"] if next_layer else None,
        up_url=root + "index.html", **common)
    _write_text(site.out / _page_url(slug), html)
    bar.update(1)

    for j, c in enumerate(visualised):
        feature = (feats or {}).get("per_channel", {}).get(str(c))
        examples = [{**ex, "crop": _crop(ex, root), "cell": _projection(ex, root)}
                    for ex in _examples(scan, deconv, c)]
        strip = (acts or {}).get("heat", {}).get(str(c))
        overlays = []
        for photo in photos:
            channel = photo["acts"]["channels"].get(str(c)) if photo["acts"] else None
            if channel:
                overlays.append({"photo": photo, **channel, "heat": _heat_style(strip, channel.get("cell"), root)})
        scale = (acts or {}).get("scale", {}).get(str(c))
        html = env.get_template("channel.html.j2").render(
            root=root, title=f"{layer['label']} : {c}", layer=layer, channel=c, feature=feature,
            examples=examples, overlays=overlays, scale=scale,
            silent=acts is not None and c in acts["silent"], acts=acts, scan=scan, deconv=deconv, feats=feats,
            notes={name: site.stage_note(name) for name in STAGE_TITLES},
            prev_url=f"{visualised[j - 1]}.html" if j > 0 else None,
            next_url=f"{visualised[j + 1]}.html" if j + 1 < len(visualised) else None,
            prev_label=f"channel {visualised[j - 1]}" if j > 0 else None,
            next_label=f"channel {visualised[j + 1]}" if j + 1 < len(visualised) else None,
            up_url="index.html", **common)
        _write_text(site.out / _page_url(slug, c), html)
        bar.update(1)


def _photo_views(site: _Site, acts: dict | None) -> list[dict]:
    views = []
    for photo in site.photos:
        entry = (acts or {}).get("photos", {}).get(photo["slug"])
        views.append({**photo, "acts": entry})
    return views


def _tiles(site: _Site, acts: dict | None, feats: dict | None, visualised: list[int], root: str) -> list[dict]:
    """One entry per visualised channel for the layer page's grid and table.

    With feature visualizations a tile is a cut of a sprite sheet (``sprite``, ``x``, ``y``), so a
    layer of any width costs a handful of pictures; without them the channel's heat map over the
    photo where it peaks (lazily loaded).
    """
    sprites = (feats or {}).get("sprites") or []
    sparsity = (acts or {}).get("sparsity") or []
    silent = set((acts or {}).get("silent", []))
    photos = {p["slug"]: p for p in site.photos}
    tiles = []
    for c in visualised:
        feature = (feats or {}).get("per_channel", {}).get(str(c))
        tile = feature.get("tile") if feature else None
        entry = {"channel": c, "url": f"{c}.html", "feature": feature, "silent": acts is not None and c in silent,
                 "dead": bool(feature and feature.get("dead")),
                 "sparsity": sparsity[c] if c < len(sparsity) else None, "sprite": None, "heat": None}
        if tile and tile[0] < len(sprites):
            entry.update(sprite=root + sprites[tile[0]]["src"], x=tile[1], y=tile[2])
        elif acts:
            entry["heat"] = _strongest_heat(acts, photos, c, root)
        tiles.append(entry)
    return tiles


def _strongest_heat(acts: dict, photos: dict[str, dict], channel: int, root: str) -> dict | None:
    """The heat map of ``channel`` on the photo where it peaks, with that photo (a tile without a feature viz)."""
    best, best_peak = None, None
    strip = acts.get("heat", {}).get(str(channel))
    for slug, entry in acts["photos"].items():
        item = entry["channels"].get(str(channel))
        style = _heat_style(strip, item.get("cell") if item else None, root)
        if style and slug in photos and (best_peak is None or item["peak"] > best_peak):
            best, best_peak = {"style": style, "photo": photos[slug]["image"]}, item["peak"]
    return best


# The side (CSS px) of the square the channel page shows a projection and its patch in.
EXAMPLE_SIDE = 104


def _cell_style(url: str, size: tuple[int, int], box) -> str:
    """CSS that shows the ``box`` (top, left, bottom, right) of a picture of ``size`` (height, width)
    filling its element: the picture as the background, scaled and shifted (percentages, so a
    screen-sized copy of the picture works the same)."""
    h, w = size
    top, left, bottom, right = box
    bh, bw = bottom - top, right - left
    x = 100 * left / (w - bw) if w > bw else 0.0
    y = 100 * top / (h - bh) if h > bh else 0.0
    return (f"background-image:url('{url}');background-size:{_pct(100 * w / bw)} {_pct(100 * h / bh)};"
            f"background-position:{_pct(x)} {_pct(y)}")


def _pct(value: float) -> str:
    """A percentage to 1/100 %: finer than a pixel at any size the pages show."""
    return f"{value:.2f}".rstrip("0").rstrip(".") + "%"


def _fitted(box, side: int = EXAMPLE_SIDE) -> str:
    """Width and height that fit ``box``'s shape into a ``side`` square."""
    bh, bw = box[2] - box[0], box[3] - box[1]
    width, height = (side, max(1, round(side * bh / bw))) if bw >= bh else (max(1, round(side * bw / bh)), side)
    return f"width:{width}px;height:{height}px;"


def _crop(example: dict, root: str) -> dict | None:
    """How the page cuts an example's patch (its receptive field) out of its source image."""
    source, size, box = example.get("source"), example.get("image_size"), example.get("box")
    if not source or not size or not box:
        return None
    h, w = size
    box = [max(int(box[0]), 0), max(int(box[1]), 0), min(int(box[2]), h), min(int(box[3]), w)]
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return {"style": _fitted(box) + _cell_style(root + source["src"], (h, w), box), "href": source["full"]}


def _projection(example: dict, root: str) -> dict | None:
    """How the page shows an example's projection: its cell of the channel's row of projections."""
    picture = example.get("projection")
    if not picture or "cell" not in picture:
        return None
    box = picture["cell"]
    return {"style": _fitted(box) + _cell_style(root + picture["src"], (picture["height"], picture["width"]), box),
            "href": picture["full"]}


def _heat_style(strip: dict | None, cell, root: str) -> str | None:
    """CSS that lays one photo's heat map (its ``cell`` of the channel's row) over the whole photo."""
    if not strip or not cell:
        return None
    return _cell_style(root + strip["src"], (strip["height"], strip["width"]), cell)


def _examples(scan: dict | None, deconv: dict | None, channel: int) -> list[dict]:
    """The channel's top examples: deconvnet projection, patch, value and source, best first.

    The deconv record (projections of the scan's top units, or of the photos' strongest units)
    already holds patches; without it the scan's patches are shown alone.
    """
    if deconv and str(channel) in deconv.get("per_channel", {}):
        return deconv["per_channel"][str(channel)]
    if scan and str(channel) in scan.get("per_channel", {}):
        return scan["per_channel"][str(channel)]
    return []


def _ranges(channels: list[int]) -> list[list[int]]:
    """Sorted channels as ``[first, last]`` runs: a layer with every channel is one pair, not 1,280 numbers."""
    runs: list[list[int]] = []
    for c in sorted(channels):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return runs


def _write_search_index(site: _Site) -> None:
    index = {"layers": [{"name": layer["name"], "alias": layer.get("alias"), "slug": layer["slug"],
                         "channels": _ranges(layer["visualised"]), "visualised": len(layer["visualised"]),
                         "count": layer["channels"]} for layer in site.layers]}
    _write_text(site.out / "search-index.js", f"window.ATLAS_INDEX = {_js_json(index)};\n")


def _copy_static(out: Path) -> None:
    target = out / "static"
    target.mkdir(parents=True, exist_ok=True)
    for item in resources.files("convscope.atlas").joinpath("static").iterdir():
        if item.is_file():
            with resources.as_file(item) as source, atomic_path(target / item.name) as tmp:
                shutil.copyfile(source, tmp)
