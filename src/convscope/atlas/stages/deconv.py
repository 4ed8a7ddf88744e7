"""The deconv stage: per layer, projections beside their patches for the top-k units of each
visualised channel: the scan's, or the strongest unit on each photo when no scan was built."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ...layers import LayerInfo
from ...methods.deconv import Unit, project_units, render_projection_pair, strongest_units
from ...methods.deconv.choice import PROJECTION_CHOICES, choose_projection, has_max_pooling, projection_method
from ...models import LoadedModel
from ...precision import NUMBERS, Precision
from ...rectifiers import DECONVNET, GRADIENT, Rule, resolve_projection
from ..context import Stage
from ..store import pack_row, read_json

__all__ = ["DeconvStage", "DECONV_METHODS", "choose_projection", "projection_method", "ProjectionJob",
           "ProjectionChunk", "project_chunk", "project_with_fallback"]

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


@dataclass(frozen=True)
class ProjectionJob:
    """What every chunk of one layer's projections shares: sent once to each worker."""

    layer: LayerInfo
    rule: str            # the projection rule's name (resolved where the chunk runs)
    redo: bool           # all-zero projections redone with the deconvnet
    strict: bool
    precision: Precision
    images: object       # the scan's image set (``load(image_id)``)


@dataclass(frozen=True)
class ProjectionChunk:
    """One work unit: the top units of a few channels, over at most :data:`DECONV_IMAGES` images.

    ``units`` are ``channels``' scan entries in order; ``units[i].image_index`` indexes ``image_ids``;
    ``expected`` and ``scales`` are the scan's value of each unit and of its channel's strongest unit
    (the crops are checked against them)."""

    channels: list[str]
    image_ids: list[int]
    units: list[Unit]
    boxes: list[list[int]]
    expected: np.ndarray
    scales: np.ndarray


def project_with_fallback(loaded: LoadedModel, layer: LayerInfo, rule: Rule, redo: bool, pixels: list[np.ndarray],
                          units: list[Unit], *, strict: bool, precision: Precision, expected=None):
    """Projections with ``rule``; with ``redo``, all-zero ones redone with the deconvnet (``fallback``).

    ``expected``: ``(values, scales)`` the units had when they were found (the scan's), each
    with its channel's scale. A receptive-field crop's value is then checked against it
    instead of against a whole-image forward pass of its own (``check_crops``), and a crop
    that disagrees (a layer geometry convscope did not follow) is projected on the whole image.
    """
    x = loaded.preprocessing.to_tensor(pixels, loaded.device)
    proj = project_units(loaded, x, layer, units, method=rule, strict=strict, precision=precision,
                         check_crops=expected is None)
    if expected is not None and len(units):
        values, scales = expected
        relative = 2e-3 if precision.exact else 3e-2
        bad = ~(np.abs(proj.values - values) <= relative * (np.abs(values) + 1e-2 * scales) + 1e-6)
        if bad.any():
            warnings.warn(f"{int(bad.sum())} of {len(units)} units of {layer.label} disagreed between their "
                          "receptive-field crop and the scan; recomputed on the whole image", stacklevel=2)
            again = project_units(loaded, x, layer, [units[i] for i in np.flatnonzero(bad)], method=rule,
                                  strict=strict, precision=precision, strategy="shared")
            proj.maps[bad] = again.maps
            proj.values[bad] = again.values
    fallback = np.zeros(len(units), dtype=bool)
    if redo and rule is not DECONVNET and len(units):
        fallback = np.abs(proj.maps).reshape(len(units), -1).max(axis=1) == 0
        if fallback.any():
            zeros = [units[i] for i in np.flatnonzero(fallback)]
            again = project_units(loaded, x, layer, zeros, method=DECONVNET, strict=strict,
                                  precision=precision, check_crops=expected is None)
            proj.maps[fallback] = again.maps
    return proj, fallback


def projection_image(projection: np.ndarray, photo: np.ndarray, box) -> Image.Image:
    """The projection cropped to ``box``, shrunk to at most :data:`PROJECTION_SIDE` px."""
    image, _ = render_projection_pair(projection, photo, box)
    if max(image.size) > PROJECTION_SIDE:
        ratio = PROJECTION_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))),
                             Image.LANCZOS)
    return image


def project_chunk(loaded: LoadedModel, chunk: ProjectionChunk, job: ProjectionJob
                  ) -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    """``(display-size projection images, fallback flags, values)`` of a chunk's units: runs wherever
    the executor puts it (this process, or a Ray actor with its own copy of the model)."""
    pixels = [job.images.load(image_id) for image_id in chunk.image_ids]
    proj, fallback = project_with_fallback(loaded, job.layer, resolve_projection(job.rule), job.redo, pixels,
                                           chunk.units, strict=job.strict, precision=job.precision,
                                           expected=(chunk.expected, chunk.scales))
    pictures = [projection_image(proj.maps[i], pixels[unit.image_index], box)
                for i, (unit, box) in enumerate(zip(chunk.units, chunk.boxes))]
    return pictures, fallback, proj.values


def _scan_chunks(per_channel: dict[str, list[dict]]) -> list[ProjectionChunk]:
    """The scan's top units cut into chunks of whole channels whose examples come from at most
    :data:`DECONV_IMAGES` distinct images and number at most :data:`DECONV_UNITS` (the units of one
    image share its forward pass)."""
    groups, current, ids, count = [], [], set(), 0
    for c in sorted(per_channel, key=int):
        mine = {e["image_id"] for e in per_channel[c]}
        if current and (len(ids | mine) > DECONV_IMAGES or count + len(per_channel[c]) > DECONV_UNITS):
            groups.append(current)
            current, ids, count = [], set(), 0
        current.append(c)
        ids |= mine
        count += len(per_channel[c])
    if current:
        groups.append(current)
    chunks = []
    for channels in groups:
        entries = [(c, e) for c in channels for e in per_channel[c]]
        order = sorted({e["image_id"] for _, e in entries})
        slot = {image_id: i for i, image_id in enumerate(order)}
        chunks.append(ProjectionChunk(
            channels=channels,
            image_ids=order,
            units=[Unit(int(c), e["row"], e["col"], slot[e["image_id"]]) for c, e in entries],
            boxes=[e["box"] for _, e in entries],
            expected=np.array([e["value"] for _, e in entries], np.float32),
            scales=np.array([abs(per_channel[c][0]["value"]) for c, _ in entries], np.float32)))
    return chunks


class DeconvStage(Stage):
    """Projections beside their patches for each visualised channel's top units.

    With a scan, the units are the scan's top-k examples, projected in chunks of whole channels
    (:func:`project_chunk`) on the build's executor: in this process, or on a Ray actor pool. Without
    one, each photo's strongest unit of the channel, strongest photos first, in this process.

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
        # fewer projections than examples only change the key when asked for (earlier atlases stay valid)
        fewer = {"projected": ctx.settings.projected()} if scan and ctx.settings.projected() < ctx.settings.top else {}
        return {"top": ctx.settings.top, **fewer, "method": rule.name, "reason": reason, "strict": ctx.settings.strict,
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

    def _save_row(self, ctx, layer, channel: int, entries: list[dict]) -> None:
        """Write the channel's projections (``entries[i]["projection"]``, images) as one row; each entry's
        ``projection`` becomes that row's :data:`Picture` plus its ``cell`` in it."""
        row, boxes = pack_row([e["projection"] for e in entries], fill=(128, 128, 128))
        picture = ctx.picture(ctx.data_path(self.name, layer, f"c{channel:04d}.webp"), row, fmt="webp",
                              screen_width=10**6)
        for entry, box in zip(entries, boxes):
            entry["projection"] = {**picture, "cell": box}

    def _from_scan(self, ctx, layer, rule: Rule, redo: bool, scan: dict, bar) -> dict:
        per_channel = {c: [dict(e) for e in entries] for c, entries in scan["per_channel"].items()}
        # the strongest `projected` examples of each channel get a projection; the rest keep their patch
        count = ctx.settings.projected()
        projected = {c: entries[:count] for c, entries in per_channel.items()}
        job = ProjectionJob(layer, rule.name, redo, ctx.settings.strict, ctx.precision(NUMBERS), ctx.image_set())
        drift = 0.0
        # Chunks run on the build's executor (here, or a Ray actor pool) and come back as they finish.
        for chunk, (pictures, fallback, values) in ctx.executor.map(ctx.loaded, project_chunk,
                                                                    _scan_chunks(projected), job):
            at = 0
            for c in chunk.channels:
                scale = max(abs(per_channel[c][0]["value"]), 1e-6) if per_channel[c] else 1.0
                for e in projected[c]:
                    e["projection"] = pictures[at]
                    e["fallback"] = bool(fallback[at])
                    e["rerun_value"] = float(f"{float(values[at]):.4g}")
                    drift = max(drift, abs(e["rerun_value"] - e["value"]) / scale)
                    at += 1
                if projected[c]:
                    self._save_row(ctx, layer, int(c), projected[c])
            bar.update(len(chunk.channels))
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
                proj, fallback = project_with_fallback(ctx.loaded, layer, rule, redo, [photo.rgb], units,
                                                       strict=ctx.settings.strict, precision=ctx.precision(NUMBERS))
                for i, unit in enumerate(units):
                    box = [int(v) for v in proj.boxes[i]]
                    candidates[unit.channel].append({
                        "value": float(f"{float(proj.values[i]):.4g}"), "image": photo.name, "row": unit.row,
                        "col": unit.col, "box": box, "clipped": bool(proj.clipped[i]), "fallback": bool(fallback[i]),
                        "image_size": list(photo.rgb.shape[:2]),
                        "source": photo_pics.get(photo.slug) or ctx.picture(f"data/photos/{photo.slug}.jpg",
                                                                             photo.rgb, fmt="jpeg"),
                        "projection": projection_image(proj.maps[i], photo.rgb, box),
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
