"""Project single units back to pixel space: deconvnet, guided backprop and saliency, batched.

Part 3 of the mission, after Zeiler & Fergus (2013): take a unit of a feature map (often the
strongest activation of a channel), set every other activation to zero, and map it back to
the input. The backward rule at each rectifier is the only thing that tells the three
methods apart (:mod:`convscope.rectifiers`); pooling switches and transposed filters come
from autograd.

Every map is the backward signal for a signal of 1 at the unit (as captum's neuron methods
and the saliency map compute it). Zeiler & Fergus feed the activation itself; multiply by
``values`` for their scale. The rules are positively homogeneous, so the picture is the same.
Maps live in the model's (normalised) input space.

Batching, and why it is done this way
-------------------------------------
Three strategies compute exactly the same maps (``tests/test_deconv.py`` checks it):

* ``"crop"``, for shallow and middle layers: each unit runs on its own receptive-field crop,
  and the crops go through the network in batches. A crop starts at a multiple of the
  layer's cumulative stride ``J`` and its size is congruent to the image size modulo ``J``, so
  every intermediate map lines up with the full-image one and even TF-"same" padding (which
  depends on the input size) is what it is on the whole image. Crops are clipped at the image
  edge, never zero-padded: a border unit gets a crop that touches the edge, so the network's
  own padding applies there. Measured on VGG19 conv4_1: 80x80 crops batched were 4x faster
  than captum, and repeating the whole image per unit was *slower* than captum.
* ``"shared"``, for deep layers whose crop would be most of the image: one forward pass per
  image (several images per pass), then one backward pass per unit on the retained graph,
  serving one unit of every image of the pass at once.
* ``"full"``: one forward and one backward on the whole image per unit. The slow reference.

``"auto"`` takes ``"crop"`` when a crop is at most half the image area, else ``"shared"``.
The crop strategy also checks each crop's unit value against the plain full-image forward
pass; a unit that disagrees (a layer geometry convscope got wrong) is recomputed with
``"shared"`` and a warning says so.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

from ... import render
from ...capture import StopForward, capture, frozen, recording
from ...errors import ConvscopeError
from ...images import ImageSource
from ...layers import LayerInfo
from ...models import LoadedModel, as_loaded
from ...rectifiers import METHODS, audit_graph, backward_rule, check_method, check_scriptable

__all__ = [
    "Unit", "Projections", "DeconvResult", "project_units", "render_projection_pair", "strongest_units",
    "top_positions", "deconv", "projection_sheet", "whole_image_sheet", "STRATEGIES",
]

STRATEGIES = ("auto", "crop", "shared", "full")
Box = tuple[int, int, int, int]

# "auto" crops when a crop is at most this fraction of the image area. Above it, the
# per-unit forward passes on big crops cost more than one shared forward pass plus batched
# backward passes (benchmarks/deconv.py measures both).
CROP_AREA_LIMIT = 0.5
# Default work per batch, in input pixels. On the CPU about one 224x224 image's worth: measured
# (benchmarks/deconv.py), batches of 4-8 small crops ran up to 2x faster per crop than batches
# of 64, whose activations no longer stay in cache; on a GPU, bigger batches fill the device.
BATCH_PIXELS = {"cpu": 224 * 224, "cuda": 32 * 224 * 224}


def _batch_pixels(device: torch.device) -> int:
    return BATCH_PIXELS.get(torch.device(device).type, BATCH_PIXELS["cpu"])


@dataclass(frozen=True)
class Unit:
    """One unit of a layer: ``channel`` at map position (``row``, ``col``) for image ``image_index``."""

    channel: int
    row: int
    col: int
    image_index: int = 0


@dataclass
class Projections:
    """Projections of units of one layer back to input pixels.

    Attributes:
        units: the projected units.
        values: ``(N,)`` float32, each unit's activation in the plain forward pass.
        maps: ``(N, H, W, 3)`` float32, the signed projection in input pixel space (full image
            size, model-normalised units; zero outside the unit's receptive field).
        boxes: receptive-field box ``(top, left, bottom, right)`` per unit (bottom/right
            exclusive), clipped to the image.
        clipped: True where the box was clipped at the image border.
        method: ``deconvnet``, ``guided`` or ``gradient``.
        layer: the layer's name.
        strategy: how the maps were batched (``crop``, ``shared``, ``full``, or a mix).
    """

    units: list[Unit]
    values: np.ndarray
    maps: np.ndarray
    boxes: list[Box]
    clipped: list[bool]
    method: str = "deconvnet"
    layer: str = ""
    strategy: str = ""

    def __len__(self) -> int:
        return len(self.units)

    def pair(self, i: int, photo: np.ndarray, *, absolute: bool = False) -> tuple[Image.Image, Image.Image]:
        """:func:`render_projection_pair` for unit ``i``."""
        return render_projection_pair(self.maps[i], photo, self.boxes[i], absolute=absolute)

    def as_records(self) -> list[dict]:
        """One JSON-ready dict per unit: channel, row, col, image, value, box, clipped."""
        return [
            {"channel": u.channel, "row": u.row, "col": u.col, "image_index": u.image_index,
             "value": float(v), "box": list(b), "clipped": bool(c)}
            for u, v, b, c in zip(self.units, self.values, self.boxes, self.clipped)
        ]


# --------------------------------------------------------------------------- geometry

def _resolve_layer(loaded: LoadedModel, layer: str | LayerInfo, hw: tuple[int, int]) -> LayerInfo:
    name = layer.name if isinstance(layer, LayerInfo) else str(layer)
    sized = loaded.catalogue_at(hw)
    if isinstance(layer, LayerInfo) and name not in sized:
        raise ConvscopeError(f"layer {name} does not run on a {hw[0]}x{hw[1]} image")
    info = sized.get(name)
    if not info.is_spatial:
        raise ConvscopeError(f"layer {info.label} has output shape {info.shape}; deconv needs a (C, H, W) feature map")
    return info


def _integral_stride(layer: LayerInfo) -> tuple[int, int] | None:
    if layer.stride is None or layer.rf_size is None or layer.global_field:
        return None
    if not all(float(s).is_integer() and s >= 1 for s in layer.stride):
        return None
    return int(layer.stride[0]), int(layer.stride[1])


@dataclass
class _CropPlan:
    size: tuple[int, int]                  # crop (height, width)
    offsets: list[tuple[int, int]]         # per unit, top-left of its crop (multiples of the stride)
    stride: tuple[int, int]

    def area_fraction(self, hw: tuple[int, int]) -> float:
        return self.size[0] * self.size[1] / (hw[0] * hw[1])


def _crop_plan(layer: LayerInfo, boxes: list[Box], hw: tuple[int, int]) -> _CropPlan | None:
    """One crop size for all units, and each unit's aligned crop offset (see the module docstring)."""
    stride = _integral_stride(layer)
    if stride is None or not boxes:
        return None
    size = []
    for axis in range(2):
        jump, extent = stride[axis], hw[axis]
        need = max(box[axis + 2] - (box[axis] // jump) * jump for box in boxes)
        # smallest size >= need that is congruent to the image size modulo the stride
        size.append(min(need + (extent - need) % jump, extent))
    offsets = []
    for box in boxes:
        offset = tuple(min((box[a] // stride[a]) * stride[a], hw[a] - size[a]) for a in range(2))
        if any(offset[a] > box[a] or offset[a] + size[a] < box[a + 2] for a in range(2)):
            return None  # cannot happen for a consistent geometry; fall back to the whole image
        offsets.append(offset)
    return _CropPlan((size[0], size[1]), offsets, stride)


# --------------------------------------------------------------------------- the engine


def _check_batch_independent(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.running_mean is None:
            raise ConvscopeError(
                f"{name} is a batch norm without running statistics: in eval mode it normalises over the batch, "
                "so a unit's projection would depend on the other images and crops. Not supported."
            )


def _layer_output(module: nn.Module, x: torch.Tensor, layer: str, method: str, strict: bool) -> torch.Tensor:
    """Forward ``x`` (which requires grad) to ``layer`` with ``method``'s rule; the output with its graph."""
    rule = backward_rule(method) if method != "gradient" else contextlib.nullcontext()
    with recording(module, [layer], clone=True, detach=False, stop_after_last=True) as store:
        with rule, contextlib.suppress(StopForward):
            module(x)
    if layer not in store:
        raise ConvscopeError(f"layer {layer} did not run in the forward pass")
    output = store[layer]
    if output.grad_fn is None:
        raise ConvscopeError(f"layer {layer} does not depend on the input through differentiable operations")
    other = audit_graph(output, method, strict=strict)
    if other:
        names = ", ".join(sorted(other))
        warnings.warn(f"strict=False: backpropagated plainly through {names} (no {method} rule there)", stacklevel=4)
    return output


def _seeds(shape: tuple[int, ...], positions: list[tuple[int, int, int, int]], dtype, device) -> torch.Tensor:
    """Zeros of ``shape`` (N, C, h, w) with a 1 at each ``(n, c, row, col)``."""
    seeds = torch.zeros(shape, dtype=dtype, device=device)
    if positions:
        idx = torch.tensor(positions, device=device).T
        seeds[idx[0], idx[1], idx[2], idx[3]] = 1.0
    return seeds


def _check_positions(output: torch.Tensor, positions: list[tuple[int, int, int, int]]) -> None:
    _, channels, height, width = output.shape
    for _, c, r, q in positions:
        if not (0 <= c < channels and 0 <= r < height and 0 <= q < width):
            raise ConvscopeError(f"unit (channel {c}, row {r}, col {q}) is outside the layer's map {channels}x{height}x{width}")


def _project_crops(module, x, layer, units, plan: _CropPlan, method, strict, batch_size, maps, progress):
    """Per-unit crops, batched. Returns each unit's value as computed on its crop."""
    sh, sw = plan.size
    values = np.zeros(len(units), np.float32)
    chunks = range(0, len(units), batch_size)
    for start in tqdm(chunks, desc=f"{method} crops", unit="batch", disable=not progress, leave=False):
        idx = list(range(start, min(start + batch_size, len(units))))
        crops = torch.stack([
            x[units[i].image_index, :, plan.offsets[i][0]:plan.offsets[i][0] + sh, plan.offsets[i][1]:plan.offsets[i][1] + sw]
            for i in idx
        ]).detach().requires_grad_(True)
        output = _layer_output(module, crops, layer, method, strict)
        positions = [(k, units[i].channel, units[i].row - plan.offsets[i][0] // plan.stride[0],
                      units[i].col - plan.offsets[i][1] // plan.stride[1]) for k, i in enumerate(idx)]
        # A position outside the crop's map means a geometry convscope got wrong: leave it to
        # the value check (NaN never agrees), which recomputes it on the whole image.
        inside = [k for k, (_, _, r, q) in enumerate(positions) if 0 <= r < output.shape[2] and 0 <= q < output.shape[3]]
        values[idx] = np.nan
        if not inside:
            continue
        positions = [positions[k] for k in inside]
        (grad,) = torch.autograd.grad(output, crops, _seeds(output.shape, positions, output.dtype, output.device))
        picked = output.detach()[tuple(torch.tensor(positions, device=output.device).T)]
        values[[idx[k] for k in inside]] = picked.float().cpu().numpy()
        grad = grad.float().cpu()
        for k in inside:
            top, left = plan.offsets[idx[k]]
            maps[idx[k], :, top:top + sh, left:left + sw] = grad[k]
    return values


def _project_shared(module, x, layer, units, indices, method, strict, images_per_pass, maps, values, progress):
    """One forward pass per group of images, then one backward pass per round of units.

    Round k holds unit k of every image in the group: the images are independent batch
    elements, so one backward pass serves one unit of each. The units of one image take one
    backward pass each on the retained graph. Measured on the CPU (benchmarks/deconv.py):
    a vmap-batched backward (``is_grads_batched``) was about 2x *slower* per unit than this
    loop, as convolution and batch-norm backward fall back to a per-sample loop under vmap,
    and a real batch of repeated images costs a forward pass per unit and ran no faster
    per image than batch 1.
    """
    by_image: dict[int, list[int]] = {}
    for i in indices:
        by_image.setdefault(units[i].image_index, []).append(i)
    images = sorted(by_image)
    bar = tqdm(total=len(indices), desc=f"{method} shared", unit="unit", disable=not progress, leave=False)
    for start in range(0, len(images), images_per_pass):
        group = images[start:start + images_per_pass]
        xb = x[group].detach().requires_grad_(True)
        output = _layer_output(module, xb, layer, method, strict)
        rounds = max(len(by_image[b]) for b in group)
        for k in range(rounds):
            chunk = [(j, by_image[b][k]) for j, b in enumerate(group) if k < len(by_image[b])]
            positions = [(j, units[i].channel, units[i].row, units[i].col) for j, i in chunk]
            _check_positions(output, positions)
            seeds = _seeds(output.shape, positions, output.dtype, output.device)
            (grad,) = torch.autograd.grad(output, xb, seeds, retain_graph=k + 1 < rounds)
            grad = grad.float().cpu()
            for (j, i), position in zip(chunk, positions):
                maps[i] = grad[j]
                values[i] = float(output.detach()[position])
            bar.update(len(chunk))
    bar.close()


def _project_full(module, x, layer, units, indices, method, strict, maps, values, progress):
    """The reference: one whole-image forward and backward per unit."""
    for i in tqdm(indices, desc=f"{method} full", unit="unit", disable=not progress, leave=False):
        u = units[i]
        xb = x[u.image_index:u.image_index + 1].detach().requires_grad_(True)
        output = _layer_output(module, xb, layer, method, strict)
        _check_positions(output, [(0, u.channel, u.row, u.col)])
        (grad,) = torch.autograd.grad(output, xb, _seeds(output.shape, [(0, u.channel, u.row, u.col)],
                                                        output.dtype, output.device))
        maps[i] = grad[0].float().cpu()
        values[i] = float(output.detach()[0, u.channel, u.row, u.col])


def project_units(
    model: LoadedModel | nn.Module,
    images: torch.Tensor,
    layer: str | LayerInfo,
    units: Sequence[Unit],
    *,
    method: str = "deconvnet",
    batch_size: int | None = None,
    strategy: str = "auto",
    strict: bool = True,
    check_crops: bool = True,
    progress: bool = False,
) -> Projections:
    """Project each unit of ``layer`` back to input pixels with ``method``'s backward rule.

    Args:
        model: a :class:`LoadedModel` or any ``nn.Module`` (left exactly as it was: mode,
            ``requires_grad``, hooks).
        images: normalised input batch ``(B, 3, H, W)``, e.g. from ``loaded.tensor(photo)``.
        layer: name, alias or :class:`LayerInfo` of a layer with a ``(C, h, w)`` output.
        units: the units; ``image_index`` picks the image of ``images``.
        method: ``"deconvnet"``, ``"guided"`` or ``"gradient"`` (signed; take ``abs`` to show saliency).
        batch_size: crops per batch (``crop``), or images per forward pass (``shared``);
            default about one 224x224 image's worth of pixels on the CPU (:data:`BATCH_PIXELS`).
        strategy: ``"auto"``, ``"crop"``, ``"shared"`` or ``"full"`` (module docstring); all give the same maps.
        strict: refuse nonlinearities without a rule (GELU, SiLU, gates) instead of
            backpropagating them plainly; see :func:`convscope.rectifiers.audit_graph`.
        check_crops: compare each crop's unit value with a plain whole-image forward pass and
            recompute disagreeing units on the whole image. With False, ``values`` come from
            the crops; a caller that compares them with values it recorded itself (the dataset
            scan does) keeps the same safety net and saves one whole-image forward pass per image.
        progress: show a tqdm bar.

    Shape:
        images ``(B, 3, H, W)`` → ``Projections.maps`` ``(N, H, W, 3)``.

    Example:
        >>> lm = convscope.load_model("vgg16", random=True)
        >>> x, rgb = lm.tensor("cat.jpg", (224, 224))
        >>> units = convscope.strongest_units(lm, x, "block4_conv1", channels=range(64))
        >>> p = convscope.project_units(lm, x, "block4_conv1", units, method="guided")
        >>> proj_img, patch_img = convscope.render_projection_pair(p.maps[0], rgb, p.boxes[0])
    """
    loaded = as_loaded(model)
    method = check_method(method)
    if strategy not in STRATEGIES:
        raise ConvscopeError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConvscopeError(f"images must be a normalised tensor of shape (B, 3, H, W), got {shape}")
    units = [u if isinstance(u, Unit) else Unit(*u) for u in units]
    check_scriptable(loaded.module, method)
    hw = (int(images.shape[2]), int(images.shape[3]))
    info = _resolve_layer(loaded, layer, hw)
    for u in units:
        if not 0 <= u.image_index < images.shape[0]:
            raise ConvscopeError(f"unit {u} refers to image {u.image_index}, but {images.shape[0]} images were given")
        if not (0 <= u.channel < info.shape[0] and 0 <= u.row < info.shape[1] and 0 <= u.col < info.shape[2]):
            raise ConvscopeError(f"unit {u} is outside layer {info.label}, whose map is "
                                 f"{info.shape[0]}x{info.shape[1]}x{info.shape[2]} for a {hw[0]}x{hw[1]} image")
    module = loaded.module
    _check_batch_independent(module)

    boxes, clipped = [], []
    for u in units:
        if info.rf_size is not None and info.stride is not None and not info.global_field:
            boxes.append(info.box(u.row, u.col, hw))
            clipped.append(info.box_clipped(u.row, u.col, hw))
        else:  # the receptive field is unknown or global: the unit sees the whole image
            boxes.append((0, 0, hw[0], hw[1]))
            clipped.append(True)

    n = len(units)
    maps = torch.zeros((n, 3, *hw), dtype=torch.float32)
    values = np.zeros(n, np.float32)
    x = images.detach().to(loaded.device)
    plan = _crop_plan(info, boxes, hw) if strategy in ("auto", "crop") and n else None
    if strategy == "crop" and plan is None and n:
        raise ConvscopeError(f"layer {info.label} has no known receptive field to crop (use strategy 'shared')")
    use_crops = plan is not None and (strategy == "crop" or plan.area_fraction(hw) <= CROP_AREA_LIMIT)
    used = []
    with frozen(module), torch.enable_grad():
        if n and use_crops:
            used.append("crop")
            budget = batch_size or max(1, _batch_pixels(x.device) // (plan.size[0] * plan.size[1]))
            crop_values = _project_crops(module, x, info.name, units, plan, method, strict, budget, maps, progress)
            if check_crops:
                values[:], scales = _plain_values(module, x, info.name, units)
                bad = _disagree(crop_values, values, scales, units)
            else:
                values[:] = crop_values
                bad = [i for i in range(n) if not np.isfinite(crop_values[i])]
            if bad:
                warnings.warn(
                    f"{len(bad)} of {n} units of {info.label} disagreed between their receptive-field crop and the "
                    "whole image (a layer geometry convscope did not follow); recomputed on the whole image",
                    stacklevel=2)
                used.append("shared")
                _project_shared(module, x, info.name, units, bad, method, strict,
                                batch_size or max(1, _batch_pixels(x.device) // (hw[0] * hw[1])), maps, values, progress)
        elif n and strategy == "full":
            used.append("full")
            _project_full(module, x, info.name, units, list(range(n)), method, strict, maps, values, progress)
        elif n:
            used.append("shared")
            budget = batch_size or max(1, _batch_pixels(x.device) // (hw[0] * hw[1]))
            _project_shared(module, x, info.name, units, list(range(n)), method, strict, budget, maps, values, progress)
    out = np.ascontiguousarray(maps.permute(0, 2, 3, 1).numpy())
    if not np.isfinite(out).all():
        raise ConvscopeError("the projection contains NaN or infinity; check the input image and the model weights")
    return Projections(units, values, out, boxes, clipped, method, info.name, "+".join(used))


def _plain_values(module: nn.Module, x: torch.Tensor, layer: str, units: list[Unit]) -> tuple[np.ndarray, dict[int, float]]:
    """Each unit's activation in one plain whole-image forward pass, and each image's max |activation|."""
    needed = sorted({u.image_index for u in units})
    with torch.no_grad():
        output = capture(module, x[needed], [layer])[layer]
    row = {b: k for k, b in enumerate(needed)}
    picked = torch.stack([output[row[u.image_index], u.channel, u.row, u.col] for u in units])
    scales = {b: float(output[row[b]].abs().max()) for b in needed}
    return picked.float().cpu().numpy(), scales


def _disagree(crop_values: np.ndarray, values: np.ndarray, scales: dict[int, float], units: list[Unit]) -> list[int]:
    """Units whose crop value differs from the whole-image value beyond float noise."""
    bad = []
    for i, u in enumerate(units):
        tol = 1e-3 * (abs(float(values[i])) + 1e-2 * scales[u.image_index]) + 1e-6
        if not abs(float(crop_values[i]) - float(values[i])) <= tol:  # NaN: not computed on its crop
            bad.append(i)
    return bad


# --------------------------------------------------------------------------- choosing units


def _layer_map(loaded: LoadedModel, images: torch.Tensor, info: LayerInfo, image_index: int) -> torch.Tensor:
    if not 0 <= image_index < images.shape[0]:
        raise ConvscopeError(f"image_index {image_index} is out of range for {images.shape[0]} images")
    x = images[image_index:image_index + 1].to(loaded.device)
    return capture(loaded.module, x, [info.name])[info.name][0].float()


def strongest_units(
    model: LoadedModel | nn.Module,
    images: torch.Tensor,
    layer: str | LayerInfo,
    channels: Sequence[int] | range | None = None,
    *,
    top: int | None = None,
    image_index: int = 0,
) -> list[Unit]:
    """Each channel's strongest unit (its maximum activation) in image ``image_index``.

    Args:
        channels: the channels to take (default all), in this order.
        top: keep only the ``top`` channels with the highest peaks, strongest first.

    Example:
        >>> strongest_units(lm, x, "block5_conv3", top=9)      # the 9 strongest channels
    """
    loaded = as_loaded(model)
    info = _resolve_layer(loaded, layer, (int(images.shape[2]), int(images.shape[3])))
    maps = _layer_map(loaded, images, info, image_index)
    chosen = list(range(maps.shape[0])) if channels is None else [int(c) for c in channels]
    bad = [c for c in chosen if not 0 <= c < maps.shape[0]]
    if bad:
        raise ConvscopeError(f"channel {bad[0]} is out of range: layer {info.label} has channels 0..{maps.shape[0] - 1}")
    if not chosen:
        return []
    peaks, where = maps[chosen].reshape(len(chosen), -1).max(dim=1)
    width = maps.shape[2]
    units = [Unit(c, int(p) // width, int(p) % width, image_index) for c, p in zip(chosen, where.tolist())]
    if top is not None:
        order = sorted(range(len(units)), key=lambda k: -float(peaks[k]))[:max(0, top)]
        units = [units[k] for k in order]
    return units


def top_positions(
    model: LoadedModel | nn.Module,
    images: torch.Tensor,
    layer: str | LayerInfo,
    channel: int,
    n: int,
    *,
    image_index: int = 0,
) -> list[Unit]:
    """The ``n`` positions of ``channel`` with the highest activations, strongest first."""
    loaded = as_loaded(model)
    info = _resolve_layer(loaded, layer, (int(images.shape[2]), int(images.shape[3])))
    maps = _layer_map(loaded, images, info, image_index)
    if not 0 <= channel < maps.shape[0]:
        raise ConvscopeError(f"channel {channel} is out of range: layer {info.label} has channels 0..{maps.shape[0] - 1}")
    flat = maps[channel].reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)[:max(0, n)]
    width = maps.shape[2]
    return [Unit(channel, int(p) // width, int(p) % width, image_index) for p in order.tolist()]


# --------------------------------------------------------------------------- pictures


# The display stretch: ±(this percentile of |v| in the box) maps to 0 and 255. A few extreme
# pixels (common in guided backprop) would otherwise leave the rest of the map flat gray;
# the values beyond saturate. 100 gives the plain max.
STRETCH_PERCENTILE = 99.5


def render_projection_pair(
    projection: np.ndarray, photo: np.ndarray, box: Box, *, absolute: bool = False,
    percentile: float = STRETCH_PERCENTILE,
) -> tuple[Image.Image, Image.Image]:
    """The projection and the photo patch, both cropped to ``box``, as in Zeiler & Fergus's figures.

    Args:
        projection: ``(H, W, 3)`` signed projection (a row of :attr:`Projections.maps`).
        photo: ``(H, W, 3)`` uint8, the image the projection was computed on.
        box: ``(top, left, bottom, right)``, bottom/right exclusive.
        absolute: draw ``max_c |v|`` from black (0) to white (the saliency display) instead.
        percentile: the stretch bound, a percentile of ``|v|`` inside the box (100: the max).

    Returns:
        ``(projection_image, patch_image)``: PIL RGB images of the box's size. The projection
        is gray (128) where it is zero and stretched symmetrically: ``±bound`` reach 0 and 255.

    Example:
        >>> proj, patch = render_projection_pair(p.maps[0], rgb, p.boxes[0])
    """
    projection = np.asarray(projection, dtype=np.float32)
    photo = np.asarray(photo)
    if projection.ndim != 3 or projection.shape[-1] != 3 or photo.shape[:2] != projection.shape[:2]:
        raise ConvscopeError(f"projection {projection.shape} and photo {photo.shape} must both be (H, W, 3) of one size")
    top, left, bottom, right = (int(v) for v in box)
    top, left = max(top, 0), max(left, 0)
    bottom, right = min(bottom, photo.shape[0]), min(right, photo.shape[1])
    if bottom <= top or right <= left:
        raise ConvscopeError(f"empty box {box} for an image of {photo.shape[0]}x{photo.shape[1]}")
    crop = projection[top:bottom, left:right]
    if absolute:
        magnitude = np.abs(crop).max(axis=-1)
        peak = _bound(magnitude, percentile)
        gray = np.zeros_like(magnitude) if peak <= 0 else magnitude / peak
        proj = np.repeat((np.clip(gray, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
    else:
        proj = render.signed_to_gray(crop, _bound(crop, percentile))
    return Image.fromarray(proj), Image.fromarray(np.ascontiguousarray(photo[top:bottom, left:right]))


def _bound(values: np.ndarray, percentile: float) -> float:
    magnitude = np.abs(values)
    nonzero = magnitude[magnitude > 0]
    if not nonzero.size:
        return 0.0
    # the percentile of the nonzero values: a sparse map is not stretched by its zeros
    return float(np.percentile(nonzero, percentile)) if percentile < 100 else float(nonzero.max())


def _resize(image: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.NEAREST if factor >= 1 else Image.BILINEAR)


def _unit_label(p: Projections, i: int) -> str:
    u = p.units[i]
    text = f"ch {u.channel} ({u.row},{u.col}) {p.values[i]:.3g}"
    if u.image_index:
        text = f"img {u.image_index} " + text
    return text + (" clipped" if p.clipped[i] else "")


def _display_note(methods: Sequence[str], signed: bool) -> str:
    note = f"gray = 0; each projection stretched symmetrically to +-(its {STRETCH_PERCENTILE:g}th percentile of |v|)"
    if "gradient" in methods and not signed:
        note += "; gradient shown as max over RGB of |v|, black = 0"
    return note


def projection_sheet(
    photo: np.ndarray,
    projections: Projections | Sequence[Projections],
    *,
    title: str = "",
    signed: bool = False,
    tile: int | None = None,
    cols: int | None = None,
) -> Image.Image:
    """Each unit as a cell: its projection by each method, then the image patch, cropped to one box.

    Args:
        photo: ``(H, W, 3)`` uint8 image the projections were computed on.
        projections: one :class:`Projections`, or several of the same units (one per method).
        signed: show the gradient signed (like the others) instead of as ``|gradient|``.
        tile: display size in pixels of the largest box (default: the box's own size, kept
            between 96 and 160); every box of the sheet shares one scale.
    """
    group = [projections] if isinstance(projections, Projections) else list(projections)
    if not group or not len(group[0]):
        raise ConvscopeError("nothing to draw: no units were projected")
    ref = group[0]
    heights = [b[2] - b[0] for b in ref.boxes]
    widths = [b[3] - b[1] for b in ref.boxes]
    largest = max(max(heights), max(widths))
    factor = (tile or min(max(largest, 96), 160)) / largest
    slot_w, slot_h = math.ceil(max(widths) * factor), math.ceil(max(heights) * factor)
    gap = 2
    cells = []
    for i in range(len(ref)):
        images = [p.pair(i, photo, absolute=p.method == "gradient" and not signed)[0] for p in group]
        images.append(ref.pair(i, photo)[1])
        row = Image.new("RGB", (len(images) * slot_w + (len(images) - 1) * gap, slot_h), render.BACKGROUND)
        draw = ImageDraw.Draw(row)
        for k, im in enumerate(images):
            row.paste(_resize(im, factor), (k * (slot_w + gap), 0))
            if k < len(group) and not group[k].maps[i].any():
                draw.text((k * (slot_w + gap) + 3, 2), "all 0", fill=(200, 0, 0), font=render.font(11))
        cells.append(render.label_image(row, _unit_label(ref, i), size=11))
    cols = cols or max(1, min(len(cells), 1600 // (cells[0].width + 8)))
    rows = [render.stack_horizontal(cells[k:k + cols], gap=8) for k in range(0, len(cells), cols)]
    grid = render.stack_vertical([_pad(r, 8) for r in rows])
    methods = [p.method for p in group]
    box_note = f"box = receptive field, {max(heights)}x{max(widths)} px at most, clipped at the image border where marked"
    lines = [title, f"each cell: {' | '.join(methods)} | image patch; {box_note}", _display_note(methods, signed)]
    return render.stack_vertical([render.title_strip(grid.width, [ln for ln in lines if ln]), grid])


def _pad(image: Image.Image, bottom: int) -> Image.Image:
    out = Image.new("RGB", (image.width, image.height + bottom), render.BACKGROUND)
    out.paste(image, (0, 0))
    return out


def whole_image_sheet(
    photo: np.ndarray,
    projections: Projections,
    *,
    title: str = "",
    signed: bool = False,
    tile: int = 160,
    cols: int | None = None,
) -> Image.Image:
    """The whole-image version: the photo, then each unit's full projection with its box in red."""
    if not len(projections):
        raise ConvscopeError("nothing to draw: no units were projected")
    height, width = photo.shape[:2]
    factor = tile / max(height, width)
    absolute = projections.method == "gradient" and not signed
    tiles = []
    overview = _resize(Image.fromarray(np.ascontiguousarray(photo)), factor)
    draw = ImageDraw.Draw(overview)
    for box in projections.boxes:
        draw.rectangle(_scaled_box(box, factor), outline=(255, 0, 0))
    tiles.append(render.label_image(overview, "input and all boxes", size=11))
    for i in range(len(projections)):
        full, _ = render_projection_pair(projections.maps[i], photo, (0, 0, height, width), absolute=absolute)
        full = _resize(full, factor)
        ImageDraw.Draw(full).rectangle(_scaled_box(projections.boxes[i], factor), outline=(255, 0, 0))
        tiles.append(render.label_image(full, _unit_label(projections, i), size=11))
    cols = cols or max(1, min(len(tiles), 1600 // (tiles[0].width + 6)))
    rows = [render.stack_horizontal(tiles[k:k + cols], gap=6) for k in range(0, len(tiles), cols)]
    grid = render.stack_vertical([_pad(r, 6) for r in rows])
    lines = [title, f"{projections.method}: whole image, receptive-field box in red",
             _display_note([projections.method], signed)]
    return render.stack_vertical([render.title_strip(grid.width, [ln for ln in lines if ln]), grid])


def _scaled_box(box: Box, factor: float) -> tuple[int, int, int, int]:
    top, left, bottom, right = box
    return (int(left * factor), int(top * factor), max(int(left * factor), math.ceil(right * factor) - 1),
            max(int(top * factor), math.ceil(bottom * factor) - 1))


# --------------------------------------------------------------------------- one call


@dataclass
class DeconvResult:
    """Projections of units of one layer for one photo, by one or more methods.

    Attributes:
        image: the RGB uint8 ``(H, W, 3)`` image as fed to the model.
        layer: the layer (its row traced at this image size).
        projections: ``method -> Projections`` (same units in the same order for every method).
        model_title: model name and weights (says RANDOM INIT when so).
    """

    image: np.ndarray
    layer: LayerInfo
    projections: dict[str, Projections]
    model_title: str
    notes: list[str] = field(default_factory=list)

    @property
    def units(self) -> list[Unit]:
        return next(iter(self.projections.values())).units

    def _title(self) -> str:
        return f"{self.layer.label} · {self.model_title}"

    def sheet(self, *, signed: bool = False, tile: int | None = None, cols: int | None = None) -> Image.Image:
        """All methods side by side for every unit, each beside its patch (a PIL image)."""
        return projection_sheet(self.image, list(self.projections.values()), title=self._title(),
                                signed=signed, tile=tile, cols=cols)

    def whole(self, method: str | None = None, *, signed: bool = False, tile: int = 160) -> Image.Image:
        """The whole-image projections of one method (default: the first)."""
        method = method or next(iter(self.projections))
        return whole_image_sheet(self.image, self.projections[method], title=self._title(), signed=signed, tile=tile)

    def index(self) -> dict:
        """A JSON-ready description: layer, methods, and each unit's value and box."""
        first = next(iter(self.projections.values()))
        return {
            "model": self.model_title, "image_size": list(self.image.shape[:2]), "layer": self.layer.as_dict(),
            "methods": list(self.projections), "strategy": {m: p.strategy for m, p in self.projections.items()},
            "space": "gradient of the unit w.r.t. the model-normalised input, for a signal of 1 at the unit",
            "units": first.as_records(), "notes": list(self.notes),
        }


def deconv(
    model: LoadedModel | nn.Module,
    image: ImageSource,
    layer: str | LayerInfo,
    *,
    channels: Sequence[int] | range | None = None,
    top: int | None = None,
    positions: int | None = None,
    method: str | Sequence[str] = "deconvnet",
    size: int | tuple[int, int] | None = None,
    batch_size: int | None = None,
    strict: bool = True,
    progress: bool = False,
) -> DeconvResult:
    """Project the strongest units of ``layer`` for one photo back to pixels.

    Args:
        channels: channels whose strongest unit is projected (default all).
        top: only the ``top`` channels with the highest peaks, strongest first.
        positions: instead, the ``positions`` strongest units of one channel (give one channel,
            or ``top=1`` for the strongest one).
        method: ``deconvnet``, ``guided``, ``gradient``, ``all``, or a list of them.
        size: shorter side, or ``(H, W)``; default the model's input size (aspect kept).

    Example:
        >>> res = convscope.deconv(lm, "cat.jpg", "block4_conv1", channels=range(32), method="all")
        >>> res.sheet().save("block4_conv1.png")
    """
    loaded = as_loaded(model)
    methods = list(METHODS) if method == "all" else [method] if isinstance(method, str) else list(method)
    for m in methods:
        check_method(m)
    x, rgb = loaded.tensor(image, size)
    info = _resolve_layer(loaded, layer, (int(x.shape[2]), int(x.shape[3])))
    if positions is not None:
        chosen = strongest_units(loaded, x, info, channels, top=top)
        if len(chosen) != 1:
            raise ConvscopeError(f"positions={positions} needs exactly one channel (got {len(chosen)}); "
                                 "give one channel, or top=1 for the strongest")
        units = top_positions(loaded, x, info, chosen[0].channel, positions)
    else:
        units = strongest_units(loaded, x, info, channels, top=top)
    projections = {m: project_units(loaded, x, info, units, method=m, batch_size=batch_size, strict=strict,
                                    progress=progress) for m in methods}
    notes = []
    if any(projections[methods[0]].clipped):
        notes.append("some receptive fields reach past the image border; their boxes are clipped")
    for m, p in projections.items():
        zero = sum(not p.maps[i].any() for i in range(len(p)))
        if zero:
            notes.append(f"{zero} of {len(p)} {m} maps are all zero: a rectifier on the path passes nothing back "
                         "there (a ReLU6 unit saturated at 6, or a unit at 0, has no gradient; guided keeps that mask)")
    return DeconvResult(rgb, info, projections, loaded.title, notes)
