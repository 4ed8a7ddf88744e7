"""The deconv stage: per layer, projections beside their patches for the top-k units of each
visualised channel: the scan's, or the strongest unit on each photo when no scan was built."""

from __future__ import annotations

import time
import warnings

import numpy as np
from PIL import Image

from ...methods.deconv import Unit, project_units, render_projection_pair, strongest_units
from ...methods.deconv.choice import PROJECTION_CHOICES, choose_projection, has_max_pooling, projection_method
from ...precision import NUMBERS
from ...rectifiers import (
    DECONVNET,
    GRADIENT,
    Rule,
)
from ..context import Stage
from ..store import pack_row, read_json

__all__ = ["DeconvStage", "DECONV_METHODS", "choose_projection", "projection_method"]

DECONV_METHODS = PROJECTION_CHOICES

# How the channel pages name each method's projections.
_SHOWN = {"deconvnet": "deconvnet projection (Zeiler & Fergus)", "guided": "guided-backprop projection",
          "gradient": "gradient (saliency)"}
_RULE_LABELS = {"deconvnet": "the deconvnet", "guided": "guided backprop"}


# Distinct images and units per project_units call. The units of one image share its forward
# pass there (the engine's "shared" strategy), so the more channels a call holds the fewer forward
# passes; the units bound the memory of the whole-image maps (a 224x224 map is 0.6 MB).
DECONV_IMAGES = 256
DECONV_UNITS = 256
# Projections are stored at the size the channel page shows them (longer side, px), a channel's
# top-k in one WebP row (see store.pack_row); the patch beside each one is not a file: the page
# crops it from the shared source image.
PROJECTION_SIDE = 112
# Channels whose projections on the photos are held in memory at once (without a scan).
PHOTO_CHUNK = 256


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

    The rule is checked per layer (:func:`choose_projection`): where a nonlinearity with no
    deconvnet/guided rule (Hardswish, GELU, a gate) lies on the path, the layer shows the plain
    gradient, and its record's ``reason`` (shown on its pages) says why; with
    ``settings.strict=False`` such nonlinearities are backpropagated plainly under the rule instead.
    """

    name = "deconv"
    version = 4  # 4: projections as display-size WebP, patches cropped from the source on the page

    def settings(self, ctx, layer):
        scan = ctx.keys.get(("scan", layer.name)) if ctx.record("scan", layer) else None
        # Without a scan the units are the photos' strongest, read from the activations record.
        acts = None if scan else ctx.keys.get(("activations", layer.name))
        rule, reason = self._projection(ctx, layer)
        return {"top": ctx.settings.top, "method": rule.name, "reason": reason, "strict": ctx.settings.strict,
                "scan": scan, "activations": acts, **ctx.precision_key(ctx.precision(NUMBERS))}

    @staticmethod
    def _projection(ctx, layer) -> tuple[Rule, str | None]:
        """:func:`choose_projection` for ``layer``, audited once per build (the key and the run both ask)."""
        if layer.name not in ctx.projections:
            ctx.projections[layer.name] = choose_projection(ctx.loaded, layer, ctx.settings.deconv_method,
                                                            strict=ctx.settings.strict)
        return ctx.projections[layer.name]

    def run(self, ctx, layers):
        total = sum(len(ctx.channels(layer)) for layer in layers)
        bar = ctx.bar(self.name, total, "ch")
        with bar:
            for layer in layers:
                start = time.perf_counter()
                rule, reason = self._projection(ctx, layer)
                # The deconvnet stands in for all-zero projections only where its rule holds.
                redo = rule is not DECONVNET and (reason is None or not ctx.settings.strict)
                scan = ctx.record("scan", layer)
                if scan is not None:
                    data = self._from_scan(ctx, layer, rule, redo, scan, bar)
                else:
                    data = self._from_photos(ctx, layer, rule, redo, bar)
                data["method"] = rule.name
                data["reason"] = reason
                data["description"] = f"{data['description']} {self._method_note(ctx, rule, reason, redo)}"
                ctx.save_record(self, layer, data, seconds=time.perf_counter() - start)

    @staticmethod
    def _method_note(ctx, rule: Rule, reason: str | None = None, redo: bool = True) -> str:
        note = (f"Each {_SHOWN[rule.name]}, gray for zero and stretched symmetrically, is cropped to the unit's "
                "receptive field, like the image patch beside it.")
        if reason is not None and rule is GRADIENT:
            # The reason itself is the record's "reason", shown on its own line.
            if ctx.settings.deconv_method != "auto":
                asked = projection_method(ctx.loaded, ctx.settings.deconv_method)
                note += (f" {_RULE_LABELS.get(asked.name, asked.name).capitalize()} was asked for; it holds only on "
                         "layers whose path has no nonlinearity but ReLUs, so this layer shows the plain gradient.")
            return note
        if rule is DECONVNET and not has_max_pooling(ctx.loaded):
            note += (" This model has no max-pooling, so the deconvnet's projection of a unit does not depend on "
                     "the image (its rectifier rule ignores the forward pass): use guided backprop for "
                     "image-specific projections.")
        elif rule is not DECONVNET:
            if ctx.settings.deconv_method == "auto":
                note += (" Guided backprop, not the deconvnet: this model has no max-pooling, so the deconvnet's "
                         "projection would be the same for every image.")
            if redo:
                note += (" Where a unit sits at its activation's cap (ReLU6 = 6) the guided projection is zero by "
                         "definition; such units are shown with the deconvnet and marked.")
        return note

    @staticmethod
    def _project(ctx, layer, rule: Rule, redo: bool, pixels: list[np.ndarray], units, expected=None):
        """Projections with ``rule``; with ``redo``, all-zero ones redone with the deconvnet (``fallback``).

        ``expected``: ``(values, scales)`` the units had when they were found (the scan's), each
        with its channel's scale. A receptive-field crop's value is then checked against it
        instead of against a whole-image forward pass of its own (``check_crops``), and a crop
        that disagrees (a layer geometry convscope did not follow) is projected on the whole image.
        """
        x = ctx.tensor(pixels)
        strict = ctx.settings.strict
        precision = ctx.precision(NUMBERS)
        proj = project_units(ctx.loaded, x, layer, units, method=rule, strict=strict, precision=precision,
                             check_crops=expected is None)
        if expected is not None and len(units):
            values, scales = expected
            relative = 2e-3 if precision.exact else 3e-2
            bad = ~(np.abs(proj.values - values) <= relative * (np.abs(values) + 1e-2 * scales) + 1e-6)
            if bad.any():
                warnings.warn(f"{int(bad.sum())} of {len(units)} units of {layer.label} disagreed between their "
                              "receptive-field crop and the scan; recomputed on the whole image", stacklevel=2)
                again = project_units(ctx.loaded, x, layer, [units[i] for i in np.flatnonzero(bad)], method=rule,
                                      strict=strict, precision=precision, strategy="shared")
                proj.maps[bad] = again.maps
                proj.values[bad] = again.values
        fallback = np.zeros(len(units), dtype=bool)
        if redo and rule is not DECONVNET and len(units):
            fallback = np.abs(proj.maps).reshape(len(units), -1).max(axis=1) == 0
            if fallback.any():
                zeros = [units[i] for i in np.flatnonzero(fallback)]
                again = project_units(ctx.loaded, x, layer, zeros, method=DECONVNET, strict=strict,
                                      precision=precision, check_crops=expected is None)
                proj.maps[fallback] = again.maps
        return proj, fallback

    @staticmethod
    def _projection_image(projection, photo, box) -> Image.Image:
        """The projection cropped to ``box``, shrunk to at most :data:`PROJECTION_SIDE` px."""
        image, _ = render_projection_pair(projection, photo, box)
        if max(image.size) > PROJECTION_SIDE:
            ratio = PROJECTION_SIDE / max(image.size)
            image = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))),
                                 Image.LANCZOS)
        return image

    def _save_row(self, ctx, layer, channel: int, entries: list[dict]) -> None:
        """Write the channel's projections (``entries[i]["projection"]``, images) as one row; each entry's
        ``projection`` becomes that row's :data:`Picture` plus its ``cell`` in it."""
        row, boxes = pack_row([e["projection"] for e in entries], fill=(128, 128, 128))
        picture = ctx.picture(ctx.data_path(self.name, layer, f"c{channel:04d}.webp"), row, fmt="webp",
                              screen_width=10**6)
        for entry, box in zip(entries, boxes):
            entry["projection"] = {**picture, "cell": box}

    def _from_scan(self, ctx, layer, rule: Rule, redo: bool, scan: dict, bar) -> dict:
        images = ctx.image_set()
        per_channel = {c: [dict(e) for e in entries] for c, entries in scan["per_channel"].items()}
        channels = sorted(per_channel, key=int)
        # Chunks of channels whose examples come from at most DECONV_IMAGES distinct images.
        chunks, current, ids = [], [], set()
        units = 0
        for c in channels:
            mine = {e["image_id"] for e in per_channel[c]}
            if current and (len(ids | mine) > DECONV_IMAGES or units + len(per_channel[c]) > DECONV_UNITS):
                chunks.append(current)
                current, ids, units = [], set(), 0
            current.append(c)
            ids |= mine
            units += len(per_channel[c])
        if current:
            chunks.append(current)
        drift = 0.0
        for chunk in chunks:
            order = sorted({e["image_id"] for c in chunk for e in per_channel[c]})
            slot = {image_id: i for i, image_id in enumerate(order)}
            pixels = [images.load(image_id) for image_id in order]
            units = [Unit(int(c), e["row"], e["col"], slot[e["image_id"]]) for c in chunk for e in per_channel[c]]
            if units:
                # The scan's values stand in for the engine's own whole-image check of each crop.
                expected = np.array([e["value"] for c in chunk for e in per_channel[c]], np.float32)
                scale = np.array([abs(per_channel[c][0]["value"]) for c in chunk for _ in per_channel[c]], np.float32)
                proj, fallback = self._project(ctx, layer, rule, redo, pixels, units, (expected, scale))
                at = 0
                for c in chunk:
                    for e in per_channel[c]:
                        e["projection"] = self._projection_image(proj.maps[at], pixels[slot[e["image_id"]]], e["box"])
                        e["fallback"] = bool(fallback[at])
                        e["rerun_value"] = float(f"{float(proj.values[at]):.4g}")
                        scale = max(abs(per_channel[c][0]["value"]), 1e-6)
                        drift = max(drift, abs(e["rerun_value"] - e["value"]) / scale)
                        at += 1
                for c in chunk:
                    if per_channel[c]:
                        self._save_row(ctx, layer, int(c), per_channel[c])
            bar.update(len(chunk))
        return {"per_channel": per_channel, "from": "scan", "max_drift": drift,
                "description": scan.get("description", "")}

    def _from_photos(self, ctx, layer, rule: Rule, redo: bool, bar) -> dict:
        acts = ctx.record("activations", layer)
        photos_record = read_json(ctx.out / "records" / "photos.json") or {}
        photo_pics = {p["slug"]: p["image"] for p in photos_record.get("photos", [])}
        all_channels = ctx.channels(layer)
        per_channel = {}
        for first in range(0, len(all_channels), PHOTO_CHUNK):
            channels = all_channels[first:first + PHOTO_CHUNK]
            candidates: dict[int, list[dict]] = {c: [] for c in channels}
            for photo in ctx.photos:
                if acts is not None:
                    entry = acts["photos"][photo.slug]["channels"]
                    units = [Unit(c, *entry[str(c)]["argmax"]) for c in channels]
                else:
                    units = strongest_units(ctx.loaded, ctx.tensor(photo.rgb), layer, channels)
                proj, fallback = self._project(ctx, layer, rule, redo, [photo.rgb], units)
                for i, unit in enumerate(units):
                    box = [int(v) for v in proj.boxes[i]]
                    candidates[unit.channel].append({
                        "value": float(f"{float(proj.values[i]):.4g}"), "image": photo.name, "row": unit.row,
                        "col": unit.col, "box": box, "clipped": bool(proj.clipped[i]), "fallback": bool(fallback[i]),
                        "image_size": list(photo.rgb.shape[:2]),
                        "source": photo_pics.get(photo.slug) or ctx.picture(f"data/photos/{photo.slug}.jpg",
                                                                             photo.rgb, fmt="jpeg"),
                        "projection": self._projection_image(proj.maps[i], photo.rgb, box),
                    })
            for c in channels:
                ranked = sorted(candidates.pop(c), key=lambda e: -e["value"])[:ctx.settings.top]
                entries = [{**e, "rank": k} for k, e in enumerate(ranked)]
                if entries:
                    self._save_row(ctx, layer, c, entries)
                per_channel[str(c)] = entries
                bar.update(1)
        return {"per_channel": per_channel, "from": "photos",
                "description": "No dataset scan in this atlas: the channel's strongest unit on each photo, "
                               "strongest first."}
