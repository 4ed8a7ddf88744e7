"""Occlusion sensitivity (Zeiler & Fergus 2014, Fig. 7): which part of the image does the model use?

A square occluder slides over the image. For each position the network runs on the occluded
copy, and three maps are recorded:

* the probability of the target class (the true class if given, else the top class);
* the most probable class (a label map);
* the mean activation of one feature map, by default the strongest channel (highest peak
  on the unoccluded image) of the deepest feature layer.

All copies run batched, in chunks sized by a memory budget. By default they run
**incrementally** (:mod:`convscope.methods.occlusion.incremental`, after Nakandala et al., SIGMOD 2019): the
unoccluded pass runs once per chunk, and every layer recomputes only the box its occluder
can reach; layers where that box covers the whole map, and ops the engine has no rule for
(global pooling, the classifier), run on the full batch. The result is exact (the tests
compare it with the plain occluded forward: ~1e-6 in float32, ~1e-14 in float64). A spot
check in every run also runs three copies plainly and compares: the first and last of the
first chunk and the very last copy (the top-left and bottom-right corners, where padding and
cut-off windows differ most). It samples, it does not prove: a chunk in between is not
compared (on the CPU each compared copy costs about six incremental copies). If a compared
copy is off, that chunk and the rest fall back to the plain batched forward and
``result.method`` says so.

Occluder positions follow captum's ``Occlusion``: tops ``0, stride, 2*stride, ...`` until the
window reaches the far edge, the last one cut off by the border when ``stride`` does not
divide ``size - patch``. So the maps have ``ceil((H - patch) / stride) + 1`` rows.

Example:
    >>> res = convscope.occlusion(convscope.load_model(), "cat.jpg", patch=32, stride=8)
    >>> res.probability.shape, res.target_name
    ((25, 25), 'tabby')
    >>> res.sheet().save("occlusion.png")
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ... import render
from ...capture import frozen, recording
from ...errors import ConvscopeError, suggest
from ...images import ImageSource, load_image
from ...layers import LayerInfo
from ...models import LoadedModel, as_loaded
from .incremental import Patch, Unsupported, incremental_forward, window

__all__ = ["OcclusionResult", "occlusion", "occluder_grid", "FILLS"]

FILLS = ("gray", "mean", "blur")
METHODS = ("incremental", "plain")
CPU_BATCH = {"incremental": 32, "plain": 8}


def occluder_grid(height: int, width: int, patch: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Top and left edges of the occluder positions along each axis (captum's convention).

    Example:
        >>> occluder_grid(224, 224, 32, 8)[0][-3:]
        array([176, 184, 192])
    """
    if patch < 1 or stride < 1:
        raise ConvscopeError(f"patch and stride must be at least 1 (got patch {patch}, stride {stride})")
    if patch > min(height, width):
        raise ConvscopeError(
            f"the patch ({patch} px) is larger than the image ({height}x{width} px after resizing); "
            f"use --patch {min(height, width)} or less, or a larger --size")
    rows = np.arange(math.ceil((height - patch) / stride) + 1) * stride
    cols = np.arange(math.ceil((width - patch) / stride) + 1) * stride
    return rows, cols


@dataclass
class OcclusionResult:
    """The three occlusion maps of one image, with what made them.

    Attributes:
        image: the RGB uint8 ``(H, W, 3)`` image as fed to the model.
        patch, stride, fill: the occluder; map cell ``(i, j)`` is the occluder with top-left
            corner ``(tops[i], lefts[j])``.
        target, target_name: the class whose probability is mapped.
        probability: ``(rows, cols)`` probability of the target class with the occluder there.
        labels: ``(rows, cols)`` the most probable class index there.
        label_probability: ``(rows, cols)`` that class's probability.
        activity: ``(rows, cols)`` mean activation of ``layer`` channel ``channel``.
        base_probability, base_label, base_activity: the same for the unoccluded image.
        method: ``"incremental"``, ``"plain"``, or the plain fallback with its reason.
        seconds: wall time of the occluded passes.
        incremental: what the incremental engine did (conv work fraction, materialised ops).
    """

    image: np.ndarray
    patch: int
    stride: int
    fill: str
    tops: np.ndarray
    lefts: np.ndarray
    target: int
    target_name: str
    probability: np.ndarray
    labels: np.ndarray
    label_probability: np.ndarray
    activity: np.ndarray
    layer: LayerInfo
    channel: int
    base_probability: float
    base_label: int
    base_activity: float
    class_names: list[str] | None
    model_title: str
    method: str
    seconds: float
    incremental: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.probability.shape

    def class_name(self, index: int) -> str:
        names = self.class_names or []
        return names[index] if 0 <= index < len(names) else f"class {index}"

    # ------------------------------------------------------------------ drawings
    def _scale(self) -> int:
        """Draw small images bigger, so the maps stay readable (224 px -> 448)."""
        return max(1, round(320 / min(self.image.shape[:2])))

    def _photo(self) -> np.ndarray:
        scale = self._scale()
        if scale == 1:
            return self.image
        height, width = self.image.shape[:2]
        return np.asarray(Image.fromarray(self.image).resize((width * scale, height * scale), Image.BICUBIC))

    def _cell_region(self) -> tuple[int, int, int, int]:
        """Photo box (top, left, height, width) spanned by the occluder centres +- stride/2."""
        scale = self._scale()
        rows, cols = self.shape
        top = round((self.patch - self.stride) / 2 * scale)
        left = round((self.patch - self.stride) / 2 * scale)
        return top, left, rows * self.stride * scale, cols * self.stride * scale

    def _overlay(self, values: np.ndarray, cmap: str, low: float, high: float, alpha: float = 0.55,
                 resample=Image.BILINEAR, colors: np.ndarray | None = None) -> Image.Image:
        """``values (rows, cols)`` drawn over the photo, each cell centred on its occluder's centre."""
        photo = self._photo().astype(np.float32)
        top, left, height, width = self._cell_region()
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
        scale = self._scale()
        # the occluder's size, drawn at its first position
        draw.rectangle([0, 0, self.patch * scale - 1, self.patch * scale - 1], outline=(255, 255, 255))
        return out

    def _panel(self, picture: Image.Image, lines: list[str], bar: Image.Image | None = None) -> Image.Image:
        body = render.stack_horizontal([picture, bar]) if bar is not None else picture
        text = max(int(render.font(12).getlength(line)) for line in lines) + 10
        return render.stack_vertical([render.title_strip(max(body.width, text), lines, size=12), body])

    def probability_image(self, cmap: str = "jet") -> Image.Image:
        """The target-class probability map over the photo, with a colour bar (its own min..max)."""
        low, high = float(self.probability.min()), float(self.probability.max())
        picture = self._overlay(self.probability, cmap, low, high)
        return self._panel(picture, [
            f"p({self.target_name}) with the occluder centred at each point",
            f"unoccluded: {self.base_probability:.3f}; colour scale {low:.3g} .. {high:.3g}",
        ], render.colorbar(picture.height, low, high, cmap))

    def activity_image(self, cmap: str = "viridis") -> Image.Image:
        """The chosen feature map's mean activation map over the photo, with a colour bar."""
        low, high = float(self.activity.min()), float(self.activity.max())
        picture = self._overlay(self.activity, cmap, low, high)
        return self._panel(picture, [
            f"{self.layer.alias or self.layer.name} ch {self.channel}: mean activation vs occluder",
            f"unoccluded: {self.base_activity:.3g}; colour scale {low:.3g} .. {high:.3g}",
        ], render.colorbar(picture.height, low, high, cmap))

    def label_image(self, max_classes: int = 12) -> Image.Image:
        """The most probable class at each occluder position, with a legend (share of positions)."""
        classes, counts = np.unique(self.labels, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        classes, counts = classes[order], counts[order]
        shown = classes[:max_classes]
        palette = (render.lut("tab20")[np.linspace(0, 255, 20).astype(int)]).astype(np.uint8)
        colors = np.empty((len(shown) + 1, 3), np.uint8)
        colors[:len(shown)] = palette[np.arange(len(shown)) * 2 % 20 + np.arange(len(shown)) * 2 // 20]
        colors[len(shown)] = (128, 128, 128)  # every class beyond the legend
        index = np.full(self.labels.shape, len(shown), np.int32)
        for i, cls in enumerate(shown):
            index[self.labels == cls] = i
        picture = self._overlay(index, "tab20", 0, 1, alpha=0.6, colors=colors)
        total = self.labels.size
        rows = [(colors[i], f"{self.class_name(int(c))}{' (unoccluded)' if c == self.base_label else ''}: "
                           f"{counts[i] / total:.0%}") for i, c in enumerate(shown)]
        if len(classes) > len(shown):
            rows.append((colors[-1], f"{len(classes) - len(shown)} other classes: {counts[len(shown):].sum() / total:.0%}"))
        legend = _legend(rows, picture.height)
        noun = "class" if len(classes) == 1 else "classes"
        return self._panel(picture, ["most probable class with the occluder centred at each point",
                                     f"{len(classes)} {noun}; share of positions in the legend"], legend)

    def sheet(self) -> Image.Image:
        """Photo, probability map, label map and feature map side by side, under one title."""
        photo = Image.fromarray(self._photo())
        photo_panel = self._panel(photo, [f"input {self.image.shape[1]}x{self.image.shape[0]}",
                                          f"patch {self.patch} px (white square), stride {self.stride}, {self.fill} fill"])
        row = render.stack_horizontal([photo_panel, self.probability_image(), self.label_image(),
                                       self.activity_image()], gap=8)
        strip = render.title_strip(row.width, [
            f"occlusion sensitivity · {self.model_title}",
            f"{self.shape[0]}x{self.shape[1]} occluder positions · {self.method} · {self.seconds:.1f} s",
        ])
        return render.stack_vertical([strip, row])

    def as_dict(self) -> dict:
        """Parameters and the raw maps (nested lists, row-major), for the JSON output."""
        return {
            "model": self.model_title, "image_size": list(self.image.shape[:2]),
            "patch": self.patch, "stride": self.stride, "fill": self.fill,
            "tops": self.tops.tolist(), "lefts": self.lefts.tolist(), "map_shape": list(self.shape),
            "target": self.target, "target_name": self.target_name,
            "base_probability": self.base_probability, "base_label": self.base_label,
            "base_label_name": self.class_name(self.base_label),
            "layer": self.layer.name, "layer_alias": self.layer.alias, "channel": self.channel,
            "base_activity": self.base_activity,
            "method": self.method, "seconds": round(self.seconds, 3), "incremental": self.incremental,
            "probability": self.probability.tolist(),
            "labels": self.labels.tolist(),
            "label_names": {int(c): self.class_name(int(c)) for c in np.unique(self.labels)},
            "label_probability": self.label_probability.tolist(),
            "activity": self.activity.tolist(),
        }


def _legend(rows: list[tuple[np.ndarray, str]], height: int) -> Image.Image:
    width = 12 + max((len(text) for _, text in rows), default=10) * 7
    image = Image.new("RGB", (width, max(height, 18 * len(rows) + 6)), render.BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, (color, text) in enumerate(rows):
        y = 4 + i * 18
        draw.rectangle([6, y, 18, y + 12], fill=tuple(int(v) for v in color), outline=(0, 0, 0))
        draw.text((24, y), text, fill=(0, 0, 0), font=render.font(11))
    return image


# --------------------------------------------------------------------------- computation

def _fill_image(rgb: np.ndarray, fill: str, patch: int) -> np.ndarray:
    """The picture the occluder shows, in [0, 1]: mid-gray, the photo's mean colour, or a blur of it."""
    if fill == "gray":
        return np.full(rgb.shape, 0.5, np.float32)
    if fill == "mean":
        return np.broadcast_to(rgb.reshape(-1, 3).mean(axis=0) / 255.0, rgb.shape).astype(np.float32)
    if fill == "blur":
        # sigma = patch/4: the blurred square keeps colour but no detail at the occluder's scale
        blurred = Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius=patch / 4))
        return np.asarray(blurred, dtype=np.float32) / 255.0
    raise ConvscopeError(f"unknown fill {fill!r}: use one of {', '.join(FILLS)}")


def _resolve_target(target: int | str | None, class_names: list[str] | None, logits: torch.Tensor) -> int:
    classes = logits.shape[-1]
    if target is None:
        return int(logits.argmax())
    if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
        names = class_names or []
        lowered = [n.lower() for n in names]
        if target.lower() in lowered:
            return lowered.index(target.lower())
        raise ConvscopeError(f"unknown class {target!r}.{suggest(target, names)} "
                             "Give a class name or index (`convscope predict` shows both).")
    index = int(target)
    if not 0 <= index < classes:
        raise ConvscopeError(f"class index {index} is out of range: the model has classes 0..{classes - 1}")
    return index


def _channel_means(maps: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C)`` spatial means; ``(B, C)`` stays as it is."""
    return maps.flatten(2).mean(2) if maps.dim() > 2 else maps.flatten(1)


def _batch_bytes_per_copy(loaded: LoadedModel, size: tuple[int, int], itemsize: int) -> int:
    """A safe per-copy memory estimate: a few of the largest activation maps at this size."""
    base = loaded.preprocessing.input_size
    scale = (size[0] * size[1]) / (base[0] * base[1])
    largest = max((math.prod(layer.shape) for layer in loaded.catalogue), default=3 * size[0] * size[1])
    return int(max(largest * scale, 3 * size[0] * size[1]) * itemsize * 4)


class _Occluder:
    """Builds each chunk's occluded copies, two independent ways (a patch list and plain images)."""

    def __init__(self, x0: torch.Tensor, fill: torch.Tensor, tops: np.ndarray, lefts: np.ndarray, patch: int):
        self.x0, self.fillimg, self.patch = x0, fill, patch
        grid_t, grid_l = np.meshgrid(tops, lefts, indexing="ij")
        self.tops = torch.as_tensor(grid_t.ravel(), device=x0.device)
        self.lefts = torch.as_tensor(grid_l.ravel(), device=x0.device)

    def __len__(self) -> int:
        return int(self.tops.numel())

    def patches(self, sl: slice) -> Patch:
        """The occluded copies as patches: a patch-sized box per copy (slid inside at the border)."""
        height, width = self.x0.shape[-2:]
        top, left = self.tops[sl], self.lefts[sl]
        box_top, box_left = top.clamp(max=height - self.patch), left.clamp(max=width - self.patch)
        size = (self.patch, self.patch)
        image = window(self.x0, None, box_top, box_left, size)
        fill = window(self.fillimg, None, box_top, box_left, size)
        ar = torch.arange(self.patch, device=self.x0.device)
        rows = (box_top[:, None] + ar) >= top[:, None]   # a cut-off occluder covers part of its box
        cols = (box_left[:, None] + ar) >= left[:, None]
        covered = (rows[:, :, None] & cols[:, None, :])[:, None]
        values = torch.where(covered, fill, image).contiguous(memory_format=torch.channels_last)
        return Patch(values, box_top, box_left)

    def images(self, sl: slice) -> torch.Tensor:
        """The occluded copies in full: ``(B, 3, H, W)``."""
        height, width = self.x0.shape[-2:]
        top, left = self.tops[sl, None], self.lefts[sl, None]
        ys = torch.arange(height, device=self.x0.device)
        xs = torch.arange(width, device=self.x0.device)
        rows = (ys >= top) & (ys < top + self.patch)
        cols = (xs >= left) & (xs < left + self.patch)
        covered = (rows[:, :, None] & cols[:, None, :])[:, None]
        # channels-last: oneDNN runs batched convolutions ~30% faster on it (same values)
        return torch.where(covered, self.fillimg, self.x0).contiguous(memory_format=torch.channels_last)


def occlusion(
    model: LoadedModel | torch.nn.Module,
    image: ImageSource,
    *,
    patch: int = 32,
    stride: int = 8,
    fill: str = "gray",
    target: int | str | None = None,
    layer: str | LayerInfo | None = None,
    channel: int | None = None,
    size: int | tuple[int, int] | None = None,
    method: str = "incremental",
    batch_size: int | None = None,
    memory_mb: float = 1024,
    check: bool = True,
    progress: bool = False,
) -> OcclusionResult:
    """Slide a ``patch`` x ``patch`` occluder over ``image`` and map what the network does.

    Args:
        model: a :class:`LoadedModel` or an ``nn.Module`` classifier (``(B, classes)`` output).
        image: path, PIL image or array.
        patch, stride: occluder side and step in input pixels.
        fill: ``"gray"`` (mid-gray, as in Zeiler & Fergus), ``"mean"`` (the photo's mean
            colour) or ``"blur"`` (the photo blurred with sigma = patch / 4).
        target: class index or name whose probability is mapped; default the top class.
        layer: feature layer for the activity map; default the deepest feature layer.
        channel: its channel; default the one with the highest peak on the unoccluded image.
        size: image size fed to the model: ``(H, W)`` or the shorter side; default the
            model's input size (the whole photo, squeezed, as ``predict`` does).
        method: ``"incremental"`` (exact reuse of the unoccluded pass) or ``"plain"``.
        batch_size: copies per forward pass; default from ``memory_mb``.
        check: compare three copies (the first chunk's first and last, the last one) with the plain
            forward (incremental only).
        progress: show a progress bar.

    Shape:
        maps: ``(ceil((H - patch) / stride) + 1, ceil((W - patch) / stride) + 1)``.

    Example:
        >>> res = occlusion(convscope.load_model(), skimage.data.chelsea(), patch=48, stride=16)
        >>> res.probability.shape
        (12, 12)
    """
    from tqdm import tqdm

    loaded = as_loaded(model)
    if method not in METHODS:
        raise ConvscopeError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if fill not in FILLS:
        raise ConvscopeError(f"unknown fill {fill!r}: use one of {', '.join(FILLS)}")
    pre = loaded.preprocessing
    rgb = pre.fit(load_image(image), size if size is not None else pre.input_size)
    height, width = rgb.shape[:2]
    tops, lefts = occluder_grid(height, width, patch, stride)
    module = loaded.module
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x0 = pre.to_tensor(rgb, loaded.device).to(dtype)
    fill_img = pre.normalize(torch.from_numpy(np.ascontiguousarray(_fill_image(rgb, fill, patch)))
                             .permute(2, 0, 1)[None].to(loaded.device, dtype))
    chosen = _resolve_layer(loaded, layer)

    with frozen(module), torch.no_grad():
        with recording(module, [chosen]) as store:
            logits0 = module(x0)
        if not isinstance(logits0, torch.Tensor) or logits0.dim() != 2:
            raise ConvscopeError("this model does not end in class scores (B, classes); occlusion needs a classifier")
        if chosen.name not in store:
            raise ConvscopeError(f"layer {chosen.name} did not run in the forward pass")
        means0 = _channel_means(store[chosen.name])[0]
        peaks0 = store[chosen.name][0].flatten(1).amax(1) if store[chosen.name].dim() > 2 else means0
        if channel is None:
            channel = int(peaks0.argmax())
        elif not 0 <= channel < means0.numel():
            raise ConvscopeError(f"channel {channel} is out of range: {chosen.label} has channels 0..{means0.numel() - 1}")
        target_index = _resolve_target(target, loaded.class_names, logits0[0])
        probs0 = logits0.float().softmax(-1)[0]

        occluder = _Occluder(x0, fill_img, tops, lefts, patch)
        total = len(occluder)
        if batch_size is None:
            per_copy = _batch_bytes_per_copy(loaded, (height, width), x0.element_size())
            batch_size = max(1, int(memory_mb * 2**20 // per_copy))
            if x0.device.type == "cpu":
                # Bigger batches run slower per copy on CPU (caches); these were fastest on a 2-core EPYC.
                batch_size = min(batch_size, CPU_BATCH[method])
        batch_size = max(1, min(int(batch_size), total))

        keep = torch.float64 if dtype == torch.float64 else torch.float32
        logits = torch.empty(total, logits0.shape[-1], dtype=keep)
        activity = torch.empty(total, dtype=keep)
        used, trace = method, None
        start = time.perf_counter()
        chunks = [slice(i, min(i + batch_size, total)) for i in range(0, total, batch_size)]
        bar = tqdm(total=total, desc=f"occlusion ({method})", unit="copy", disable=not progress, leave=False)
        try:
            for k, sl in enumerate(chunks):
                if used == "incremental":
                    try:
                        out, acts, chunk_trace = _incremental_chunk(module, x0, occluder.patches(sl), chosen, channel)
                        if check and k in (0, len(chunks) - 1):
                            _spot_check(module, occluder, sl, chosen, channel, out, acts, first=k == 0)
                        trace = _merge_trace(trace, chunk_trace, sl.stop - sl.start)
                    except Unsupported as err:
                        used = f"plain (incremental inference fell back: {err})"
                        warnings.warn(f"occlusion: {used}", stacklevel=2)
                        out, acts = _plain_chunk(module, occluder.images(sl), chosen, channel)
                else:
                    out, acts = _plain_chunk(module, occluder.images(sl), chosen, channel)
                logits[sl] = out.to(keep).cpu()
                activity[sl] = acts.to(keep).cpu()
                bar.update(sl.stop - sl.start)
        finally:
            bar.close()
        seconds = time.perf_counter() - start

    probs = logits.softmax(-1)
    rows, cols = len(tops), len(lefts)
    label_p, labels = probs.max(-1)
    names = loaded.class_names
    return OcclusionResult(
        image=rgb, patch=patch, stride=stride, fill=fill, tops=tops, lefts=lefts,
        target=target_index,
        target_name=names[target_index] if names and target_index < len(names) else f"class {target_index}",
        probability=probs[:, target_index].reshape(rows, cols).numpy(),
        labels=labels.reshape(rows, cols).numpy().astype(np.int64),
        label_probability=label_p.reshape(rows, cols).numpy(),
        activity=activity.reshape(rows, cols).numpy(),
        layer=chosen, channel=channel,
        base_probability=float(probs0[target_index]), base_label=int(probs0.argmax()),
        base_activity=float(means0[channel]),
        class_names=names, model_title=loaded.title, method=used, seconds=seconds,
        incremental=_trace_summary(trace),
    )


def _resolve_layer(loaded: LoadedModel, layer: str | LayerInfo | None) -> LayerInfo:
    if isinstance(layer, LayerInfo):
        return layer
    if layer is None:
        feats = loaded.catalogue.features
        if not feats:
            raise ConvscopeError("this model has no convolutional feature layer; pass --layer NAME")
        return feats[-1]
    found = loaded.catalogue.resolve(layer)
    if len(found) != 1:
        raise ConvscopeError(f"--layer {layer!r} names {len(found)} layers; name exactly one")
    return found[0]


def _incremental_chunk(module, x0, edits: Patch, layer: LayerInfo, channel: int):
    with recording(module, [layer]) as store:
        out, mode = incremental_forward(module, x0, edits)
    recorded = store[layer.name]
    state = mode.state(recorded)
    if isinstance(state, Patch):
        # mean over the map = unoccluded mean + (patch - what it replaced) / map size
        base = recorded[:, channel:channel + 1]
        before = window(base, None, state.top, state.left, state.size)
        delta = (state.values[:, channel:channel + 1] - before).flatten(1).sum(1)
        acts = base.mean() + delta / (base.shape[-2] * base.shape[-1])
    else:
        acts = _channel_means(mode.full(recorded))[:, channel]
    return out, acts, mode.trace


def _plain_chunk(module, images: torch.Tensor, layer: LayerInfo, channel: int):
    with recording(module, [layer]) as store:
        out = module(images)
    return out, _channel_means(store[layer.name])[:, channel]


def _spot_check(module, occluder: _Occluder, sl: slice, layer: LayerInfo, channel: int,
                out: torch.Tensor, acts: torch.Tensor, first: bool = False) -> None:
    """Compare the chunk's last copy (and, for the first chunk, its first) with the plain forward.

    Raise Unsupported if off.
    """
    picks = torch.tensor([0, sl.stop - sl.start - 1] if first else [sl.stop - sl.start - 1]).unique()
    images = occluder.images(sl)[picks.to(occluder.x0.device)]
    ref, ref_acts = _plain_chunk(module, images, layer, channel)
    got, got_acts = out[picks.to(out.device)], acts[picks.to(acts.device)]
    tol = 1e-3 * max(1.0, float(ref.abs().max()))
    err = float((got - ref).abs().max())
    act_tol = 1e-3 * max(1.0, float(ref_acts.abs().max()))
    act_err = float((got_acts - ref_acts).abs().max())
    if not (err <= tol and act_err <= act_tol):
        raise Unsupported(f"spot check against the plain forward failed (max |diff| {err:.3g} logits, "
                          f"{act_err:.3g} activity)")


def _merge_trace(total: dict | None, trace, copies: int) -> dict:
    total = total or {"done": 0, "full": 0, "ops_without_rule": {}, "ops_on_full_maps": 0, "copies": 0}
    done, full = trace.conv_macs()
    total["done"] += done * copies
    total["full"] += full * copies
    total["copies"] += copies
    for name, count in trace.no_rule.items():
        total["ops_without_rule"][name] = max(total["ops_without_rule"].get(name, 0), count)
    total["ops_on_full_maps"] = max(total["ops_on_full_maps"], trace.full_map)
    return total


def _trace_summary(total: dict | None) -> dict:
    """Convolution work done incrementally, as a fraction of the plain forward's, and what ran in full."""
    if not total:
        return {}
    return {"conv_mac_fraction": round(total["done"] / total["full"], 4) if total["full"] else 1.0,
            "copies": total["copies"], "ops_without_rule": total["ops_without_rule"],
            "ops_on_full_maps": total["ops_on_full_maps"]}
