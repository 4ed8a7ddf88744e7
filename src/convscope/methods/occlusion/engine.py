"""The occlusion loop: occluded copies in chunks, run incrementally or plainly, spot-checked.

The call (:func:`convscope.methods.occlusion.occlusion`) resolves its options into the values
defined here (a :class:`Fill`, a :class:`Method`, a :class:`~convscope.layers.LayerInfo`) and
hands them to :func:`run_copies`, which returns the raw logits and activity of every copy.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm import tqdm

from ...errors import ConvscopeError
from ...hooks import recording
from ...layers import Catalogue, LayerInfo
from .incremental import Patch, Unsupported, incremental_forward, window

__all__ = ["Fill", "Method", "FILLS", "METHODS", "INCREMENTAL", "PLAIN", "resolve_fill", "resolve_method",
           "occluder_grid", "batch_size_for", "Occluder", "Copies", "run_copies", "incremental_chunk",
           "plain_chunk", "spot_check", "channel_means"]


@dataclass(frozen=True)
class Fill:
    """What the occluder shows: ``picture(rgb, patch)`` is an ``(H, W, 3)`` float32 image in [0, 1]."""

    name: str
    picture: Callable[[np.ndarray, int], np.ndarray]


def _gray(rgb: np.ndarray, patch: int) -> np.ndarray:
    return np.full(rgb.shape, 0.5, np.float32)


def _mean(rgb: np.ndarray, patch: int) -> np.ndarray:
    return np.broadcast_to(rgb.reshape(-1, 3).mean(axis=0) / 255.0, rgb.shape).astype(np.float32)


def _blur(rgb: np.ndarray, patch: int) -> np.ndarray:
    # sigma = patch/4: the blurred square keeps colour but no detail at the occluder's scale
    blurred = Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius=patch / 4))
    return np.asarray(blurred, dtype=np.float32) / 255.0


FILLS = {fill.name: fill for fill in (Fill("gray", _gray), Fill("mean", _mean), Fill("blur", _blur))}


@dataclass(frozen=True)
class Method:
    """How the occluded copies run: reusing the unoccluded pass (``incremental``) or in full.

    ``cpu_batch`` caps the automatic batch on a CPU: bigger batches run slower per copy there
    (caches); these were the fastest on a 2-core EPYC.
    """

    name: str
    incremental: bool
    cpu_batch: int


INCREMENTAL = Method("incremental", incremental=True, cpu_batch=32)
PLAIN = Method("plain", incremental=False, cpu_batch=8)
METHODS = {method.name: method for method in (INCREMENTAL, PLAIN)}


def _choose(options: dict, value, what: str):
    if isinstance(value, str) and value in options:
        return options[value]
    if any(value is option for option in options.values()):
        return value
    raise ConvscopeError(f"unknown {what} {value!r}: use one of {', '.join(options)}")


def resolve_fill(fill: str | Fill) -> Fill:
    """A :class:`Fill` from its name (``gray``, ``mean``, ``blur``) or itself."""
    return _choose(FILLS, fill, "fill")


def resolve_method(method: str | Method) -> Method:
    """A :class:`Method` from its name (``incremental``, ``plain``) or itself."""
    return _choose(METHODS, method, "method")


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


def batch_size_for(catalogue: Catalogue, x0: torch.Tensor, memory_budget: int, method: Method) -> int:
    """Copies per forward pass within ``memory_budget`` bytes.

    Each copy is counted as a few of the largest activation maps at the input size of
    ``catalogue`` (a safe estimate).
    """
    height, width = x0.shape[-2:]
    largest = max((math.prod(layer.shape) for layer in catalogue), default=3 * height * width)
    per_copy = int(max(largest, 3 * height * width) * x0.element_size() * 4)
    batch = max(1, int(memory_budget // per_copy))
    return min(batch, method.cpu_batch) if x0.device.type == "cpu" else batch


def channel_means(maps: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C)`` spatial means; ``(B, C)`` stays as it is."""
    return maps.flatten(2).mean(2) if maps.dim() > 2 else maps.flatten(1)


class Occluder:
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


@dataclass
class Copies:
    """What :func:`run_copies` measured: one row per occluded copy, in the occluder's order.

    Attributes:
        logits: ``(copies, classes)`` on the CPU.
        activity: ``(copies,)`` the chosen channel's mean activation.
        method: ``"incremental"``, ``"plain"``, or the plain fallback with its reason.
        seconds: wall time of the occluded passes.
        incremental: what the incremental engine did (see :func:`trace_summary`).
    """

    logits: torch.Tensor
    activity: torch.Tensor
    method: str
    seconds: float
    incremental: dict


def run_copies(module: torch.nn.Module, occluder: Occluder, layer: LayerInfo, channel: int, method: Method,
               batch_size: int, *, keep: torch.dtype, check: bool = True, progress: bool = False) -> Copies:
    """Run every occluded copy in chunks of ``batch_size`` (under the caller's ``frozen`` and ``no_grad``).

    With ``method.incremental`` each chunk runs through the incremental engine; ``check``
    compares three copies with the plain forward (the first chunk's first and last, the very
    last one). An unsupported op or a failed check turns that chunk and the rest plain, with a
    warning and the reason in ``Copies.method``.
    """
    x0 = occluder.x0
    total = len(occluder)
    logits = activity = None
    incremental, used, trace = method.incremental, method.name, None
    start = time.perf_counter()
    chunks = [slice(i, min(i + batch_size, total)) for i in range(0, total, batch_size)]
    bar = tqdm(total=total, desc=f"occlusion ({method.name})", unit="copy", disable=not progress, leave=False)
    try:
        for k, sl in enumerate(chunks):
            if incremental:
                try:
                    out, acts, chunk_trace = incremental_chunk(module, x0, occluder.patches(sl), layer, channel)
                    if check and k in (0, len(chunks) - 1):
                        spot_check(module, occluder, sl, layer, channel, out, acts, first=k == 0)
                    trace = _merge_trace(trace, chunk_trace, sl.stop - sl.start)
                except Unsupported as err:
                    incremental, used = False, f"plain (incremental inference fell back: {err})"
                    warnings.warn(f"occlusion: {used}", stacklevel=3)
            if not incremental:
                out, acts = plain_chunk(module, occluder.images(sl), layer, channel)
            if logits is None:
                logits = torch.empty(total, out.shape[-1], dtype=keep)
                activity = torch.empty(total, dtype=keep)
            logits[sl] = out.to(keep).cpu()
            activity[sl] = acts.to(keep).cpu()
            bar.update(sl.stop - sl.start)
    finally:
        bar.close()
    return Copies(logits, activity, used, time.perf_counter() - start, trace_summary(trace))


def incremental_chunk(module, x0, edits: Patch, layer: LayerInfo, channel: int):
    """Logits and the channel's mean activation of the copies in ``edits``, and the engine's trace."""
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
        acts = channel_means(mode.full(recorded))[:, channel]
    return out, acts, mode.trace


def plain_chunk(module, images: torch.Tensor, layer: LayerInfo, channel: int):
    """Logits and the channel's mean activation of ``images``, by the ordinary forward."""
    with recording(module, [layer]) as store:
        out = module(images)
    return out, channel_means(store[layer.name])[:, channel]


def spot_check(module, occluder: Occluder, sl: slice, layer: LayerInfo, channel: int,
               out: torch.Tensor, acts: torch.Tensor, first: bool = False) -> None:
    """Compare the chunk's last copy (and, for the first chunk, its first) with the plain forward.

    Raise Unsupported if off.
    """
    picks = torch.tensor([0, sl.stop - sl.start - 1] if first else [sl.stop - sl.start - 1]).unique()
    images = occluder.images(sl)[picks.to(occluder.x0.device)]
    ref, ref_acts = plain_chunk(module, images, layer, channel)
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


def trace_summary(total: dict | None) -> dict:
    """Convolution work done incrementally, as a fraction of the plain forward's, and what ran in full."""
    if not total:
        return {}
    return {"conv_mac_fraction": round(total["done"] / total["full"], 4) if total["full"] else 1.0,
            "copies": total["copies"], "ops_without_rule": total["ops_without_rule"],
            "ops_on_full_maps": total["ops_on_full_maps"]}
