"""Feature visualization: the image each filter wants to see, by gradient ascent from noise.

:func:`visualize_features` optimizes one image per channel of a
layer, all channels in one batched optimization (see :mod:`convscope.methods.features.engine`), and
says honestly which channels are **dead**: never above a small fraction (:data:`DEAD_FRACTION`)
of the layer's typical activation on the sample photos *and* not raised above that same limit
by the optimization. The post saw such channels in deep layers as pure noise images; here they
are flagged and counted instead. "Dead" is relative to the layer's scale, so a random-init net
whose layers sit at 1e-8 is not called dead for being small.

Three recipes:

* ``"lucid"`` (default), after Olah et al., "Feature Visualization" (Distill 2017): a 1/f
  FFT image with decorrelated colour and a sigmoid, random pad/jitter/scale/rotation each
  step, Adam, and redirected ReLU gradients for the first 16 steps.
* ``"fast"``: ``"lucid"`` in 80 steps, with a warm-up and a cosine decay of a higher learning
  rate and a smaller transform border; it reaches lucent's 256-step objective at the image size
  (``benchmarks/features.py``, "recipes at equal time").
* ``"post"``: the blog post's plain method (Chollet's notebook): gray plus small noise,
  40 steps of ``x += g / rms(g)`` on raw pixels, shown after the post's contrast stretch.
  One deliberate difference: the model's own preprocessing runs on the pixels (the notebook
  fed raw 0..255 values to a VGG16 that expects mean-subtracted BGR).

Each record compares the objective reached with the same objective's best value over the
sample photos (``convscope.images.sample_photos()``, each at the model's input size).
The calls return a :class:`FeatureResult` (:mod:`convscope.methods.features.result`), which
draws the sheet and saves one PNG per image, the sheet and a JSON index.

Example:
    >>> lm = convscope.load_model()
    >>> res = convscope.visualize_features(lm, "blocks.3.1.bn1", [0, 5, 7], steps=128, size=96)
    >>> res.images.shape, res.records[0]["ratio"], res.dead_count
    ((3, 96, 96, 3), 2.7, 0)
    >>> res.sheet().save("sheet.png")
    >>> res.save("runs/features/blocks.3.1.bn1")["dead"]
    0
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from ...errors import ConvscopeError
from ...hooks import StopForward, capture, frozen, recording
from ...images import sample_photos
from ...layers import LayerInfo
from ...models import LoadedModel, as_loaded
from ...precision import PICTURE, Precision, resolve_precision
from . import objectives as obj
from .engine import Optimized, Recipe, make_recipe, optimize, resolve_layers
from .result import DEAD_FRACTION, DEAD_THRESHOLD, FeatureResult, FeatureSet, dead_limit, layer_scale

__all__ = ["FeatureResult", "FeatureSet", "visualize_features", "join_results", "visualize_classes", "visualize",
           "DEAD_THRESHOLD", "DEAD_FRACTION", "make_recipe", "Recipe", "layer_scale", "dead_limit"]


def _to_uint8(images: np.ndarray, recipe: Recipe) -> np.ndarray:
    """``(N, 3, H, W)`` float → ``(N, H, W, 3)`` uint8."""
    x = images.transpose(0, 2, 3, 1).astype(np.float32)
    if recipe.param == "gray":
        # The post's deprocess_image: centre, scale to std 0.1, shift to 0.5, clip.
        x = x - x.mean(axis=(1, 2, 3), keepdims=True)
        x = x / (x.std(axis=(1, 2, 3), keepdims=True) + 1e-5) * 0.1 + 0.5
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@torch.no_grad()
def _photo_stats(loaded: LoadedModel, objective: obj.Objective, n: int, peak_layer: LayerInfo | None,
                 channels: Sequence[int] | None, photos: dict[str, np.ndarray] | None):
    """Over the photos: the best value of ``objective`` (N elements); per element's channel, the
    strongest unit and the largest magnitude (zero means the channel never fired); and the layer's
    scale (see :data:`DEAD_FRACTION`), from every channel of ``peak_layer`` in the same forward passes."""
    photos = sample_photos() if photos is None else photos
    rows = resolve_layers(loaded, objective)
    if peak_layer is not None:
        rows.setdefault(peak_layer.name, peak_layer)
    needs_logits = obj.LOGITS in objective.layers and obj.LOGITS not in rows
    best = np.full(n, -np.inf, dtype=np.float64)
    track = peak_layer is not None and channels is not None
    peak = np.full(n, -np.inf, dtype=np.float64) if track else None
    layer_magnitude = None  # every channel's largest |activation| so far
    recorded = list(dict.fromkeys(rows.values()))
    with frozen(loaded.module), recording(loaded.module, recorded, stop_after_last=not needs_logits) as store:
        for photo in photos.values():
            x, _ = loaded.tensor(photo, min(loaded.preprocessing.input_size))
            out = None
            with contextlib.suppress(StopForward):
                out = loaded.module(x)
            acts = {key: store[row.name].expand(n, *store[row.name].shape[1:]) for key, row in rows.items()}
            acts[obj.INPUT] = loaded.preprocessing.denormalize(x).expand(n, *x.shape[1:])
            if needs_logits:
                acts[obj.LOGITS] = out.expand(n, *out.shape[1:])
            best = np.maximum(best, objective(acts).double().cpu().numpy())
            if track:
                maps = store[peak_layer.name][0].double().cpu()
                maps = maps.flatten(1) if maps.dim() > 1 else maps[:, None]
                chosen = maps[torch.as_tensor(list(channels))]
                peak = np.maximum(peak, chosen.amax(1).numpy())
                largest = maps.abs().amax(1).numpy()
                layer_magnitude = largest if layer_magnitude is None else np.maximum(layer_magnitude, largest)
    if layer_magnitude is None:
        return best, peak, (np.zeros(n, dtype=np.float64) if track else None), None
    return best, peak, layer_magnitude[list(channels)], layer_scale(layer_magnitude)


@torch.no_grad()
def _image_peaks(loaded: LoadedModel, row: LayerInfo, images: np.ndarray, channels: list[int]) -> np.ndarray:
    """Each synthesized image's strongest unit in its own channel (no transforms)."""
    peaks = []
    for begin in range(0, len(images), 64):
        x = torch.from_numpy(images[begin:begin + 64]).to(loaded.device)
        maps = capture(loaded.module, loaded.preprocessing.normalize(x), [row])[row.name]
        chans = torch.as_tensor(channels[begin:begin + 64], device=maps.device)
        peaks.append(maps[torch.arange(len(x), device=maps.device), chans].flatten(1).amax(1).double().cpu())
    return torch.cat(peaks).numpy()


def _value(x: float) -> float:
    """A record's value: 6 decimals, or 6 significant figures below 1e-3 (a layer at 1e-8 is not 0)."""
    x = float(x)
    return float(f"{x:.6g}") if abs(x) < 1e-3 else round(x, 6)


def _records(run: Optimized, units: list[int], variants: int, key: str, best: np.ndarray,
             photo_stats: tuple | None, dead_limit: float, names: list[str] | None = None,
             image_peak: np.ndarray | None = None) -> list[dict]:
    peak, magnitude = photo_stats if photo_stats is not None else (None, None)
    records = []
    for i in range(len(run.final)):
        unit = units[i // variants]
        final = float(run.final[i])
        photo_best = float(best[i])
        record = {key: int(unit)} if key else {"index": int(unit)}
        if names is not None and key == "class":
            record["class_name"] = names[unit] if unit < len(names) else None
        record.update({
            "variant": i % variants,
            "objective": _value(final),
            "start": _value(run.start[i]),
            "photo_best": _value(photo_best),
            "ratio": round(final / photo_best, 4) if photo_best > 0 else None,
            "peak": _value(image_peak[i]) if image_peak is not None else None,
            "photo_peak": _value(peak[i]) if peak is not None else None,
            "photo_magnitude": _value(magnitude[i]) if magnitude is not None else None,
            # dead: never above the limit (relative to the layer's scale) on any photo, and the
            # optimization could not lift it above the limit either
            "dead": bool(magnitude is not None and magnitude[i] <= dead_limit and final <= dead_limit),
        })
        records.append(record)
    return records


def visualize_features(
    model: LoadedModel | torch.nn.Module,
    layer: str | LayerInfo,
    channels: Sequence[int] | None = None,
    *,
    objective: str = "channel",
    recipe: str | Recipe = "lucid",
    steps: int | None = None,
    size: int | tuple[int, int] | None = None,
    seed: int = 0,
    lr: float | None = None,
    variants: int = 1,
    diversity: float | None = None,
    tv: float | None = None,
    l2: float | None = None,
    dead_threshold: float = DEAD_THRESHOLD,
    dead_fraction: float = DEAD_FRACTION,
    memory_budget: int | None = None,
    max_batch: int | None = None,
    photos: dict[str, np.ndarray] | None = None,
    progress: bool = False,
    precision: str | Precision = "auto",
) -> FeatureResult:
    """One synthesized image per channel of ``layer``, all channels optimized together.

    Args:
        model: a :class:`LoadedModel` or any ``nn.Module`` (wrapped with ImageNet preprocessing).
        layer: name, alias or :class:`LayerInfo` (see ``convscope layers``).
        channels: channel indices; default every channel of the layer.
        objective: ``"channel"`` (mean of the channel), ``"neuron"`` (its centre unit) or
            ``"layer"`` (DeepDream's mean square of the whole layer; one image, channels ignored).
        recipe: ``"lucid"`` (default), ``"fast"`` or ``"post"``; ``steps``, ``size``, ``lr``
            override it (lucid: 256 steps at 128x128; fast: 80; post: 40 steps at 150x150).
        seed: the same seed gives the same images; a channel's image does not depend on
            which other channels are optimized with it.
        variants: images per channel; with ``diversity > 0`` they are pushed apart (Lucid's diversity).
        tv, l2: weights of total-variation and L2 penalties on the image.
        dead_fraction: a channel is dead when neither the photos nor the optimization take it
            above this fraction of the layer's scale (see :data:`DEAD_FRACTION`).
        dead_threshold: the absolute floor for a layer that is zero on every photo (:data:`DEAD_THRESHOLD`).
        memory_budget: bytes per chunk (default 2 GiB on a CPU, half the free GPU memory);
            ``max_batch`` caps the chunk size.
        photos: reference photos for the ratio and the dead test (default the sample photos).
        precision: ``"auto"`` (bf16 autocast where the hardware has native bf16, else float32;
            channels-last for convolutional models; see :mod:`convscope.precision`), ``"fp32"``,
            ``"bf16"``, ``"fp16"`` or a resolved :class:`~convscope.precision.Precision`.

    Returns:
        :class:`FeatureResult` with ``images (N, H, W, 3)`` uint8 and one record per image.

    Example:
        >>> res = visualize_features(convscope.load_model(), "blocks.3.1.bn1", range(8), steps=128)
        >>> res.save("runs/features/blocks.3.1.bn1")
    """
    loaded = as_loaded(model)
    row = layer if isinstance(layer, LayerInfo) else loaded.catalogue.get(str(layer))
    if objective not in ("channel", "neuron", "layer"):
        raise ConvscopeError(f"unknown objective {objective!r} for a layer: use channel, neuron or layer "
                             "(class objectives: visualize_classes)")
    if variants < 1:
        raise ConvscopeError(f"variants must be at least 1, got {variants}")
    chosen_recipe = make_recipe(recipe, steps=steps, size=size, lr=lr, tv=tv, l2=l2, diversity=diversity)
    chosen_precision = resolve_precision(precision, loaded.device, purpose=PICTURE, module=loaded.module)
    name = row.name
    if objective == "layer":
        units = [0]
        key = "index"

        def objective_for(_units):
            return obj.layer(name)
        peak_layer = None
    else:
        if not row.shape:
            raise ConvscopeError(f"layer {row.label} has no channels")
        count = row.channels
        units = list(range(count)) if channels is None else [int(c) for c in channels]
        bad = [c for c in units if not 0 <= c < count]
        if bad:
            raise ConvscopeError(f"channel {bad[0]} is out of range: layer {row.label} has channels 0..{count - 1}")
        if not units:
            raise ConvscopeError("no channels given")
        if objective == "neuron" and not row.is_spatial:
            raise ConvscopeError(f"the neuron objective needs a spatial layer; {row.label} has shape {row.shape}")
        make = obj.channel if objective == "channel" else obj.neuron
        key = "channel"

        def objective_for(chunk_units):
            return make(name, list(chunk_units))
        peak_layer = row
    run = optimize(loaded, objective_for, units, recipe=chosen_recipe, seed=seed, variants=variants,
                   memory_budget=memory_budget, max_batch=max_batch, progress=progress,
                   desc=f"features {row.alias or row.name}", precision=chosen_precision)
    element_units = [u for u in units for _ in range(variants)]
    best, peak, magnitude, scale = _photo_stats(loaded, objective_for(element_units), len(element_units),
                                                peak_layer, element_units if peak_layer is not None else None,
                                                photos)
    image_peak = None
    if peak_layer is not None and row.is_spatial:
        image_peak = _image_peaks(loaded, row, run.images, element_units)
    stats = (peak, magnitude) if peak is not None else None
    result = FeatureResult(_to_uint8(run.images, chosen_recipe), [], row, objective, chosen_recipe, seed,
                           loaded.title, dead_threshold, run.seconds, run.chunk_size, run.history,
                           dead_fraction=dead_fraction, layer_scale=scale, precision=chosen_precision)
    result.records = _records(run, units, variants, key, best, stats, result.dead_limit, image_peak=image_peak)
    return result


def join_results(parts: Sequence[FeatureResult]) -> FeatureResult:
    """One layer's result from results over disjoint chunks of its channels (in the given order).

    A channel's image, objective and dead flag do not depend on the chunk it was optimized in
    (per-channel seeds; the layer's scale is taken over all its channels), so the joined result
    is the one a single call would give; ``seconds`` is the sum of the parts' times.
    """
    if not parts:
        raise ConvscopeError("no results to join")
    first = parts[0]
    histories = [p.history for p in parts if p.history is not None]
    return dataclasses.replace(
        first, images=np.concatenate([p.images for p in parts]), records=[r for p in parts for r in p.records],
        seconds=sum(p.seconds for p in parts), chunk_size=max(p.chunk_size for p in parts),
        history=np.concatenate(histories, axis=1) if len(histories) == len(parts) else None)


def visualize_classes(
    model: LoadedModel | torch.nn.Module,
    classes: Sequence[int],
    *,
    recipe: str | Recipe = "lucid",
    steps: int | None = None,
    size: int | tuple[int, int] | None = None,
    seed: int = 0,
    lr: float | None = None,
    variants: int = 1,
    diversity: float | None = None,
    tv: float | None = None,
    l2: float | None = None,
    memory_budget: int | None = None,
    max_batch: int | None = None,
    photos: dict[str, np.ndarray] | None = None,
    progress: bool = False,
    precision: str | Precision = "auto",
) -> FeatureResult:
    """One image per class, maximizing its logit (before any softmax): Simonyan et al.'s class model.

    Example:
        >>> visualize_classes(convscope.load_model(), [281], steps=512).image(0)   # tabby cat
    """
    loaded = as_loaded(model)
    classes = [int(c) for c in classes]
    if not classes:
        raise ConvscopeError("no classes given")
    count = len(loaded.class_names) if loaded.class_names else None
    if count is not None:
        bad = [c for c in classes if not 0 <= c < count]
        if bad:
            raise ConvscopeError(f"class {bad[0]} is out of range: this model has classes 0..{count - 1}")
    if diversity:
        raise ConvscopeError("the diversity term reads a layer; use it with visualize_features")
    chosen_recipe = make_recipe(recipe, steps=steps, size=size, lr=lr, tv=tv, l2=l2)
    chosen_precision = resolve_precision(precision, loaded.device, purpose=PICTURE, module=loaded.module)

    def objective_for(units):
        return obj.class_logit(list(units))
    run = optimize(loaded, objective_for, classes, recipe=chosen_recipe, seed=seed, variants=variants,
                   memory_budget=memory_budget, max_batch=max_batch, progress=progress, desc="classes",
                   precision=chosen_precision)
    element_units = [u for u in classes for _ in range(variants)]
    best, _, _, _ = _photo_stats(loaded, objective_for(element_units), len(element_units), None, None, photos)
    records = _records(run, classes, variants, "class", best, None, DEAD_THRESHOLD, loaded.class_names)
    return FeatureResult(_to_uint8(run.images, chosen_recipe), records, None, "class", chosen_recipe, seed,
                         loaded.title, DEAD_THRESHOLD, run.seconds, run.chunk_size, run.history,
                         precision=chosen_precision)


def visualize(
    model: LoadedModel | torch.nn.Module,
    objective: obj.Objective,
    *,
    n: int = 1,
    recipe: str | Recipe = "lucid",
    steps: int | None = None,
    size: int | tuple[int, int] | None = None,
    seed: int = 0,
    lr: float | None = None,
    progress: bool = False,
    precision: str | Precision = "auto",
) -> FeatureResult:
    """Maximize any :class:`~convscope.methods.features.objectives.Objective` for a batch of ``n`` images.

    Objectives compose, e.g. ``channel(l, 3) + 0.5 * channel(l, 9) - 1e-2 * total_variation()``.
    The ``n`` images (different seeds) are optimized in one batch.

    Example:
        >>> from convscope.methods.features.objectives import channel
        >>> visualize(lm, channel("blocks.3.1.bn1", 3) + channel("blocks.3.1.bn1", 9)).image(0)
    """
    loaded = as_loaded(model)
    if not isinstance(objective, obj.Objective):
        raise ConvscopeError(f"expected an Objective, got {type(objective).__name__}")
    chosen_recipe = make_recipe(recipe, steps=steps, size=size, lr=lr)
    chosen_precision = resolve_precision(precision, loaded.device, purpose=PICTURE, module=loaded.module)
    run = optimize(loaded, lambda _units: objective, list(range(n)), recipe=chosen_recipe, seed=seed,
                   max_batch=n, memory_budget=1 << 62, progress=progress, desc="visualize",
                   precision=chosen_precision)
    records = [{"index": i, "variant": 0, "objective": _value(run.final[i]),
                "start": _value(run.start[i]), "photo_best": None, "ratio": None,
                "peak": None, "photo_peak": None, "photo_magnitude": None, "dead": False} for i in range(n)]
    return FeatureResult(_to_uint8(run.images, chosen_recipe), records, None, objective.name, chosen_recipe,
                         seed, loaded.title, DEAD_THRESHOLD, run.seconds, run.chunk_size, run.history,
                         precision=chosen_precision)
