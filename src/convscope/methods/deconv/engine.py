"""The projection engine: receptive-field crops, shared forward passes, or the whole image per unit.

See the package docstring for why units are batched this way.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ...errors import ConvscopeError
from ...hooks import StopForward, capture, frozen, recording
from ...layers import LayerInfo
from ...models import LoadedModel, as_loaded
from ...precision import FP32, NUMBERS, Precision, resolve_precision
from ...rectifiers import Rule, audit_graph, backward_rule, check_scriptable, resolve_projection
from .result import Box, Projections, Unit

__all__ = ["project_units", "spatial_layer", "STRATEGIES", "CROP_AREA_LIMIT", "BATCH_PIXELS"]

STRATEGIES = ("auto", "crop", "shared", "full")

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



def spatial_layer(loaded: LoadedModel, layer: str | LayerInfo, hw: tuple[int, int]) -> LayerInfo:
    """``layer``'s row traced at image size ``hw``; refused unless its output is a ``(C, h, w)`` map."""
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


def _check_batch_independent(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.running_mean is None:
            raise ConvscopeError(
                f"{name} is a batch norm without running statistics: in eval mode it normalises over the batch, "
                "so a unit's projection would depend on the other images and crops. Not supported."
            )


def _layer_output(module: nn.Module, x: torch.Tensor, layer: str, rule: Rule, strict: bool,
                  precision: Precision = FP32) -> torch.Tensor:
    """Forward ``x`` (which requires grad) to ``layer`` with ``rule`` at the rectifiers; the output with its graph."""
    with recording(module, [layer], clone=True, detach=False, stop_after_last=True) as store:
        with backward_rule(rule), contextlib.suppress(StopForward), precision.autocast():
            module(precision.input(x))
    if layer not in store:
        raise ConvscopeError(f"layer {layer} did not run in the forward pass")
    output = store[layer]
    if output.grad_fn is None:
        raise ConvscopeError(f"layer {layer} does not depend on the input through differentiable operations")
    other = audit_graph(output, rule, strict=strict)
    if other:
        names = ", ".join(sorted(other))
        warnings.warn(f"strict=False: backpropagated plainly through {names} (no {rule.name} rule there)", stacklevel=4)
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


def _project_crops(module, x, layer, units, plan: _CropPlan, rule, strict, batch_size, maps, progress,
                   precision: Precision = FP32):
    """Per-unit crops, batched. Returns each unit's value as computed on its crop."""
    sh, sw = plan.size
    values = np.zeros(len(units), np.float32)
    chunks = range(0, len(units), batch_size)
    for start in tqdm(chunks, desc=f"{rule.name} crops", unit="batch", disable=not progress, leave=False):
        idx = list(range(start, min(start + batch_size, len(units))))
        crops = torch.stack([
            x[units[i].image_index, :, plan.offsets[i][0]:plan.offsets[i][0] + sh, plan.offsets[i][1]:plan.offsets[i][1] + sw]
            for i in idx
        ]).detach().requires_grad_(True)
        output = _layer_output(module, crops, layer, rule, strict, precision)
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


def _project_shared(module, x, layer, units, indices, rule, strict, images_per_pass, maps, values, progress,
                    precision: Precision = FP32):
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
    bar = tqdm(total=len(indices), desc=f"{rule.name} shared", unit="unit", disable=not progress, leave=False)
    for start in range(0, len(images), images_per_pass):
        group = images[start:start + images_per_pass]
        xb = x[group].detach().requires_grad_(True)
        output = _layer_output(module, xb, layer, rule, strict, precision)
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


def _project_full(module, x, layer, units, indices, rule, strict, maps, values, progress,
                  precision: Precision = FP32):
    """The reference: one whole-image forward and backward per unit."""
    for i in tqdm(indices, desc=f"{rule.name} full", unit="unit", disable=not progress, leave=False):
        u = units[i]
        xb = x[u.image_index:u.image_index + 1].detach().requires_grad_(True)
        output = _layer_output(module, xb, layer, rule, strict, precision)
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
    method: str | Rule = "deconvnet",
    batch_size: int | None = None,
    strategy: str = "auto",
    strict: bool = True,
    check_crops: bool = True,
    progress: bool = False,
    precision: str | Precision = "auto",
) -> Projections:
    """Project each unit of ``layer`` back to input pixels with ``method``'s backward rule.

    Args:
        model: a :class:`LoadedModel` or any ``nn.Module`` (left exactly as it was: mode,
            ``requires_grad``, hooks).
        images: normalised input batch ``(B, 3, H, W)``, e.g. from ``loaded.tensor(photo)``.
        layer: name, alias or :class:`LayerInfo` of a layer with a ``(C, h, w)`` output.
        units: the units; ``image_index`` picks the image of ``images``.
        method: a :class:`~convscope.rectifiers.Rule` or its name: ``"deconvnet"``, ``"guided"`` or
            ``"gradient"`` (signed; take ``abs`` to show saliency).
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
        precision: ``"auto"`` (float32, exact), ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast of the
            forward and backward passes (faster where the hardware has them; maps and crop values
            rounded accordingly), or a resolved :class:`~convscope.precision.Precision`.

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
    rule = resolve_projection(method)
    chosen = resolve_precision(precision, loaded.device, purpose=NUMBERS, module=loaded.module)
    if strategy not in STRATEGIES:
        raise ConvscopeError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConvscopeError(f"images must be a normalised tensor of shape (B, 3, H, W), got {shape}")
    units = [u if isinstance(u, Unit) else Unit(*u) for u in units]
    check_scriptable(loaded.module, rule)
    hw = (int(images.shape[2]), int(images.shape[3]))
    info = spatial_layer(loaded, layer, hw)
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
            crop_values = _project_crops(module, x, info.name, units, plan, rule, strict, budget, maps, progress,
                                         chosen)
            if check_crops:
                values[:], scales = _plain_values(module, x, info.name, units)
                bad = _disagree(crop_values, values, scales, units, 1e-3 if chosen.dtype is None else 3e-2)
            else:
                values[:] = crop_values
                bad = [i for i in range(n) if not np.isfinite(crop_values[i])]
            if bad:
                warnings.warn(
                    f"{len(bad)} of {n} units of {info.label} disagreed between their receptive-field crop and the "
                    "whole image (a layer geometry convscope did not follow); recomputed on the whole image",
                    stacklevel=2)
                used.append("shared")
                _project_shared(module, x, info.name, units, bad, rule, strict,
                                batch_size or max(1, _batch_pixels(x.device) // (hw[0] * hw[1])), maps, values, progress,
                                chosen)
        elif n and strategy == "full":
            used.append("full")
            _project_full(module, x, info.name, units, list(range(n)), rule, strict, maps, values, progress, chosen)
        elif n:
            used.append("shared")
            budget = batch_size or max(1, _batch_pixels(x.device) // (hw[0] * hw[1]))
            _project_shared(module, x, info.name, units, list(range(n)), rule, strict, budget, maps, values, progress,
                            chosen)
    out = np.ascontiguousarray(maps.permute(0, 2, 3, 1).numpy())
    if not np.isfinite(out).all():
        raise ConvscopeError("the projection contains NaN or infinity; check the input image and the model weights")
    return Projections(units, values, out, boxes, clipped, rule, info.name, "+".join(used), chosen)


def _plain_values(module: nn.Module, x: torch.Tensor, layer: str, units: list[Unit]) -> tuple[np.ndarray, dict[int, float]]:
    """Each unit's activation in one plain whole-image forward pass, and each image's max |activation|."""
    needed = sorted({u.image_index for u in units})
    with torch.no_grad():
        output = capture(module, x[needed], [layer])[layer]
    row = {b: k for k, b in enumerate(needed)}
    picked = torch.stack([output[row[u.image_index], u.channel, u.row, u.col] for u in units])
    scales = {b: float(output[row[b]].abs().max()) for b in needed}
    return picked.float().cpu().numpy(), scales


def _disagree(crop_values: np.ndarray, values: np.ndarray, scales: dict[int, float], units: list[Unit],
              relative: float = 1e-3) -> list[int]:
    """Units whose crop value differs from the whole-image value beyond rounding (``relative``:
    float32 noise, or the coarser rounding of a bf16/fp16 crop against the float32 whole image)."""
    bad = []
    for i, u in enumerate(units):
        tol = relative * (abs(float(values[i])) + 1e-2 * scales[u.image_index]) + 1e-6
        if not abs(float(crop_values[i]) - float(values[i])) <= tol:  # NaN: not computed on its crop
            bad.append(i)
    return bad
