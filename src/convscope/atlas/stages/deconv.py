"""The deconv stage: per layer, projections beside their patches for the top-k units of each
visualised channel: the scan's, or the strongest unit on each photo when no scan was built."""

from __future__ import annotations

import time

import numpy as np

from ...methods.deconv import Unit, project_units, render_projection_pair, strongest_units
from ...models import LoadedModel
from ...rectifiers import DECONVNET, GUIDED, PROJECTION_NAMES, Rule, resolve_projection
from ..context import Stage
from ..store import Picture, read_json

__all__ = ["DeconvStage", "DECONV_METHODS", "projection_method"]

DECONV_METHODS = ("auto", *PROJECTION_NAMES)

# How the channel pages name each method's projections.
_SHOWN = {"deconvnet": "deconvnet projection (Zeiler & Fergus)", "guided": "guided-backprop projection",
          "gradient": "gradient (saliency)"}


def projection_method(loaded: LoadedModel, requested: str | Rule) -> Rule:
    """The projection rule the stage uses on ``loaded`` for ``settings.deconv_method``.

    ``"auto"`` is the deconvnet for a model with max-pooling, else guided backprop.
    """
    if requested == "auto":
        return DECONVNET if _has_max_pooling(loaded) else GUIDED
    return resolve_projection(requested)


def _has_max_pooling(loaded: LoadedModel) -> bool:
    return any(layer.type.startswith(("MaxPool", "AdaptiveMaxPool")) for layer in loaded.catalogue)


# Distinct images per project_units call (they are batched inside; this bounds the memory).
DECONV_IMAGES = 32


class DeconvStage(Stage):
    """Projections beside their patches for each visualised channel's top units.

    With a scan, the units are the scan's top-k examples. Without one, each photo's strongest
    unit of the channel, strongest photos first.

    The method (``settings.deconv_method``, see :func:`projection_method`): ``"auto"`` takes
    Zeiler & Fergus's deconvnet when the model has max-pooling, and guided backprop otherwise.
    Why: the deconvnet's rectifier rule ignores the forward pass, so in a network without
    max-pooling switches (EfficientNet, most modern nets) a unit's deconvnet projection is the
    same for every image, only shifted with the unit's position. Guided backprop keeps the
    forward masks. A unit whose guided (or gradient) projection is all zero, as at the cap of a
    ReLU6 (where the forward mask is closed by definition), is shown with the deconvnet instead,
    and the page says so.
    """

    name = "deconv"
    version = 2

    def settings(self, ctx, layer):
        scan = ctx.keys.get(("scan", layer.name)) if ctx.record("scan", layer) else None
        # Without a scan the units are the photos' strongest, read from the activations record.
        acts = None if scan else ctx.keys.get(("activations", layer.name))
        rule = projection_method(ctx.loaded, ctx.settings.deconv_method)
        return {"top": ctx.settings.top, "method": rule.name, "scan": scan, "activations": acts}

    def run(self, ctx, layers):
        rule = projection_method(ctx.loaded, ctx.settings.deconv_method)
        total = sum(len(ctx.channels(layer)) for layer in layers)
        bar = ctx.bar(self.name, total, "ch")
        with bar:
            for layer in layers:
                start = time.perf_counter()
                scan = ctx.record("scan", layer)
                if scan is not None:
                    data = self._from_scan(ctx, layer, rule, scan, bar)
                else:
                    data = self._from_photos(ctx, layer, rule, bar)
                data["method"] = rule.name
                data["description"] = f"{data['description']} {self._method_note(ctx, rule)}"
                ctx.save_record(self, layer, data, seconds=time.perf_counter() - start)

    @staticmethod
    def _method_note(ctx, rule: Rule) -> str:
        note = (f"Each {_SHOWN[rule.name]}, gray for zero and stretched symmetrically, is cropped to the unit's "
                "receptive field, like the image patch beside it.")
        if rule is DECONVNET and not _has_max_pooling(ctx.loaded):
            note += (" This model has no max-pooling, so the deconvnet's projection of a unit does not depend on "
                     "the image (its rectifier rule ignores the forward pass): use guided backprop for "
                     "image-specific projections.")
        elif rule is not DECONVNET:
            if ctx.settings.deconv_method == "auto":
                note += (" Guided backprop, not the deconvnet: this model has no max-pooling, so the deconvnet's "
                         "projection would be the same for every image.")
            note += (" Where a unit sits at its activation's cap (ReLU6 = 6) the guided projection is zero by "
                     "definition; such units are shown with the deconvnet and marked.")
        return note

    @staticmethod
    def _project(ctx, layer, rule: Rule, pixels: list[np.ndarray], units):
        """Projections with ``rule``; all-zero ones redone with the deconvnet (``fallback``)."""
        x = ctx.tensor(pixels)
        proj = project_units(ctx.loaded, x, layer, units, method=rule)
        fallback = np.zeros(len(units), dtype=bool)
        if rule is not DECONVNET and len(units):
            fallback = np.abs(proj.maps).reshape(len(units), -1).max(axis=1) == 0
            if fallback.any():
                redo = [units[i] for i in np.flatnonzero(fallback)]
                again = project_units(ctx.loaded, x, layer, redo, method=DECONVNET)
                proj.maps[fallback] = again.maps
        return proj, fallback

    def _projection_picture(self, ctx, layer, name, projection, photo, box) -> Picture:
        image, _ = render_projection_pair(projection, photo, box)
        return ctx.picture(ctx.data_path(self.name, layer, name), image)

    def _from_scan(self, ctx, layer, rule: Rule, scan: dict, bar) -> dict:
        images = ctx.image_set()
        per_channel = {c: [dict(e) for e in entries] for c, entries in scan["per_channel"].items()}
        channels = sorted(per_channel, key=int)
        # Chunks of channels whose examples come from at most DECONV_IMAGES distinct images.
        chunks, current, ids = [], [], set()
        for c in channels:
            mine = {e["image_id"] for e in per_channel[c]}
            if current and len(ids | mine) > DECONV_IMAGES:
                chunks.append(current)
                current, ids = [], set()
            current.append(c)
            ids |= mine
        if current:
            chunks.append(current)
        drift = 0.0
        for chunk in chunks:
            order = sorted({e["image_id"] for c in chunk for e in per_channel[c]})
            slot = {image_id: i for i, image_id in enumerate(order)}
            pixels = [images.load(image_id) for image_id in order]
            units = [Unit(int(c), e["row"], e["col"], slot[e["image_id"]]) for c in chunk for e in per_channel[c]]
            if units:
                proj, fallback = self._project(ctx, layer, rule, pixels, units)
                at = 0
                for c in chunk:
                    for e in per_channel[c]:
                        e["projection"] = self._projection_picture(
                            ctx, layer, f"c{int(c):04d}_{e['rank']}.png", proj.maps[at], pixels[slot[e["image_id"]]],
                            e["box"])
                        e["fallback"] = bool(fallback[at])
                        e["rerun_value"] = float(f"{float(proj.values[at]):.4g}")
                        scale = max(abs(per_channel[c][0]["value"]), 1e-6)
                        drift = max(drift, abs(e["rerun_value"] - e["value"]) / scale)
                        at += 1
            bar.update(len(chunk))
        return {"per_channel": per_channel, "from": "scan", "max_drift": drift,
                "description": scan.get("description", "")}

    def _from_photos(self, ctx, layer, rule: Rule, bar) -> dict:
        acts = ctx.record("activations", layer)
        channels = ctx.channels(layer)
        candidates: dict[int, list[dict]] = {c: [] for c in channels}
        photos_record = read_json(ctx.out / "records" / "photos.json") or {}
        photo_pics = {p["slug"]: p["image"] for p in photos_record.get("photos", [])}
        for photo in ctx.photos:
            if acts is not None:
                entry = acts["photos"][photo.slug]["channels"]
                units = [Unit(c, *entry[str(c)]["argmax"]) for c in channels]
            else:
                units = strongest_units(ctx.loaded, ctx.tensor(photo.rgb), layer, channels)
            proj, fallback = self._project(ctx, layer, rule, [photo.rgb], units)
            for i, unit in enumerate(units):
                box = [int(v) for v in proj.boxes[i]]
                top, left, bottom, right = box
                candidates[unit.channel].append({
                    "value": float(f"{float(proj.values[i]):.4g}"), "image": photo.name, "row": unit.row,
                    "col": unit.col, "box": box, "clipped": bool(proj.clipped[i]), "fallback": bool(fallback[i]),
                    "image_size": list(photo.rgb.shape[:2]),
                    "source": photo_pics.get(photo.slug) or ctx.picture(f"data/photos/{photo.slug}.jpg", photo.rgb,
                                                                         fmt="jpeg"),
                    "patch": ctx.picture(ctx.data_path(self.name, layer, f"c{unit.channel:04d}_{photo.slug}_patch.png"),
                                         photo.rgb[top:bottom, left:right]),
                    "projection": self._projection_picture(
                        ctx, layer, f"c{unit.channel:04d}_{photo.slug}.png", proj.maps[i], photo.rgb, box),
                })
        per_channel = {}
        for c in channels:
            ranked = sorted(candidates[c], key=lambda e: -e["value"])[:ctx.settings.top]
            per_channel[str(c)] = [{**e, "rank": k} for k, e in enumerate(ranked)]
            bar.update(1)
        return {"per_channel": per_channel, "from": "photos",
                "description": "No dataset scan in this atlas: the channel's strongest unit on each photo, "
                               "strongest first."}
