"""What an atlas will cost, before it starts, and a budget that chooses what to build.

**Time** comes from a calibration on this machine with the build's own settings: on up to
:data:`CALIBRATION_LAYERS` of the chosen layers, spread over depth (the first, the last and
the middle), one chunk of channels (as the features stage optimizes them) is visualized, after
one warm-up step, for :data:`CALIBRATION_SHORT` and for :data:`CALIBRATION_STEPS` steps: the
difference gives the steady seconds per step, the rest of the short run the fixed cost of a chunk
(the photos' reference pass and the final scoring); and a few units are projected after a
warm-up projection, one unit and then several units of one image: the difference gives the
seconds of one backward pass per unit, the rest the forward pass the deconv stage runs per image.
A projection is charged both (its unit's backward and a whole forward: with a scan, a channel's
top examples mostly come from different images). A layer between two sampled layers takes rates
interpolated linearly by its position between them (cost grows with depth, so neither
neighbour's rate is right); a layer after the last sampled one (only with one sample) takes that
one's. A layer's time is then its chunks x (steps x seconds per step + fixed cost) plus its
projections (``top`` per channel from a scan, or ``projections`` of them, else one per photo); the activations and pages
stages, a few per cent of a build, are left out.

A calibration is cached in the atlas folder (:func:`load_calibration`, :func:`save_calibration`),
keyed by the model, the layers, the settings it depends on, the photos and this machine (host,
processor, threads, torch), so a second ``convscope atlas`` into the same folder prints its
projection at once.

**Size** is per channel: the calibration's own feature images encoded as the atlas stores
them, plus :data:`BYTES_PER_EXAMPLE` per projection, :data:`BYTES_PER_PHOTO` per heat map and
:data:`BYTES_PER_PAGE` for the channel page and records (averages measured by
``benchmarks/atlas.py`` on the default model).

**Budget** (:func:`fit_budget`): every chosen layer keeps its first ``N`` channels, with the
largest ``N`` whose projected time fits; so layers up to ``N`` channels wide come out whole and
wider ones show their first ``N``. When even one channel per layer does not fit, the layers are
thinned to an evenly spaced subset (keeping the first and the last) that does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .._io import save_json
from .._version import __version__
from ..layers import LayerInfo
from ..methods.deconv import Unit, project_units
from ..methods.features import visualize_features
from ..models import LoadedModel, fingerprint
from ..precision import PICTURE, resolve_precision
from .context import AtlasSettings
from .stages.deconv import projection_method
from .stages.features import FEATURE_CHUNK, FEATURE_QUALITY, FeaturesStage
from .store import make_key, read_json

__all__ = ["AtlasPlan", "LayerRate", "calibrate", "plan_atlas", "fit_budget", "CONFIRM_HOURS", "calibration_key",
           "load_calibration", "save_calibration"]

CALIBRATION_LAYERS = 3
CALIBRATION_SHORT = 2
CALIBRATION_STEPS = 6
CALIBRATION_UNITS = 4
# Bump when the calibration measures differently: cached calibrations with another version are redone.
CALIBRATION_VERSION = 2
CALIBRATION_FILE = "records/calibration.json"
# Above this projected time `convscope atlas` asks for --yes (or --budget).
CONFIRM_HOURS = 1.0
# Bytes per projection, per heat map (one photo) and per channel page with its share of the records.
BYTES_PER_EXAMPLE = 2_600
BYTES_PER_PHOTO = 700
BYTES_PER_PAGE = 10_000


@dataclass(frozen=True)
class LayerRate:
    """Measured costs on one layer: seconds per optimization step and channel, fixed seconds per
    chunk, seconds per projected unit, and the stored bytes of one feature image."""

    step: float
    fixed: float
    projection: float
    feature_bytes: float


@dataclass
class AtlasPlan:
    """The projected cost of an atlas: per layer, channels, seconds and bytes."""

    settings: AtlasSettings
    layers: list[LayerInfo]
    channels: dict[str, int]
    seconds: dict[str, float]
    bytes: dict[str, float]
    calibration_seconds: float = 0.0
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # the total per stage
    where: str = "on this machine"  # or a Ray cluster's share of the work (see plan_atlas's ``speedup``)

    @property
    def hours(self) -> float:
        return sum(self.seconds.values()) / 3600

    @property
    def total_channels(self) -> int:
        return sum(self.channels.values())

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def describe(self) -> str:
        whole = sum(self.channels[layer.name] == layer.channels for layer in self.layers)
        return (f"{len(self.layers)} layers ({whole} whole), {self.total_channels} channels: projected "
                f"{_duration(self.hours)} and {_size(self.total_bytes)} "
                f"(~{self.total_bytes / max(self.total_channels, 1) / 1024:.0f} KB per channel) {self.where}")


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f} MB" if nbytes < 2**30 else f"{nbytes / 2**30:.1f} GB"


def _spread(count: int, keep: int) -> list[int]:
    """``keep`` indices of ``range(count)`` evenly spread, the first and the last included."""
    if keep >= count:
        return list(range(count))
    if keep == 1:
        return [count - 1]
    return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)})


def calibrate(loaded: LoadedModel, layers: list[LayerInfo], settings: AtlasSettings,
              photos: dict[str, np.ndarray] | None = None, samples: int = CALIBRATION_LAYERS) -> dict[str, LayerRate]:
    """:class:`LayerRate` for every layer in ``layers``, measured on ``samples`` of them (see the module notes).

    Stages in ``settings.skip`` are not measured and cost nothing.
    """
    positions = _spread(len(layers), samples)
    sampled = [layers[i] for i in positions]
    rule = projection_method(loaded, settings.deconv_method)
    measured: dict[str, LayerRate] = {}
    for layer in sampled:
        step = fixed = feature_bytes = projection = 0.0
        if "features" not in settings.skip:
            chunk = list(range(min(FEATURE_CHUNK, layer.channels)))
            options = {**FeaturesStage.options(settings),
                       "precision": resolve_precision(settings.precision, loaded.device, purpose=PICTURE,
                                                      module=loaded.module)}
            # The first optimization steps are many times slower than the others (allocations, kernel
            # selection): after a warm-up step, a short and a longer run; their difference is the
            # steady per-step cost, and what the short run spent beyond its steps the fixed cost.
            visualize_features(loaded, layer, chunk, photos=photos, **{**options, "steps": 1})
            times = []
            for steps in (CALIBRATION_SHORT, CALIBRATION_STEPS):
                start = time.perf_counter()
                result = visualize_features(loaded, layer, chunk, photos=photos, **{**options, "steps": steps})
                times.append(time.perf_counter() - start)
            per_step = max((times[1] - times[0]) / (CALIBRATION_STEPS - CALIBRATION_SHORT), 0.0)
            fixed = max(times[0] - CALIBRATION_SHORT * per_step, 0.0)
            step = per_step / len(chunk)
            sizes = []
            for image in result.images:
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="WEBP", quality=FEATURE_QUALITY)
                sizes.append(buffer.tell())
            feature_bytes = float(np.mean(sizes))
        if "deconv" not in settings.skip:
            # with a scan the deconv stage checks crops against the scan's values, not a forward pass of its own
            projection = _projection_rate(loaded, layer, rule, photos, check_crops=settings.scan_images is None)
        measured[layer.name] = LayerRate(step, fixed, projection, feature_bytes)
    return _interpolate(layers, positions, measured)


def _interpolate(layers: list[LayerInfo], positions: list[int], measured: dict[str, LayerRate]) -> dict[str, LayerRate]:
    """Every layer's rates: linear by position between the sampled layers around it, the last one's after it."""
    rates = {}
    for i, layer in enumerate(layers):
        after = next((p for p in positions if p >= i), positions[-1])
        before = max((p for p in positions if p <= i), default=after)
        low, high = measured[layers[before].name], measured[layers[after].name]
        t = 0.0 if after == before else (i - before) / (after - before)
        rates[layer.name] = LayerRate(*((1 - t) * a + t * b for a, b in
                                        zip(dataclasses.astuple(low), dataclasses.astuple(high))))
    return rates


def _projection_rate(loaded: LoadedModel, layer: LayerInfo, rule, photos: dict[str, np.ndarray] | None,
                     check_crops: bool = True) -> float:
    """Seconds per projected unit on ``layer`` that shares its image's forward pass with no other unit
    (see the module notes)."""
    size = loaded.preprocessing.input_size
    if photos:
        x = loaded.preprocessing.to_tensor(loaded.fit(next(iter(photos.values()))), loaded.device)
    else:
        x = torch.rand((1, 3, *size), generator=torch.Generator().manual_seed(0)).to(loaded.device)
    units = [Unit(c % layer.channels, 0, 0) for c in range(CALIBRATION_UNITS)]
    project_units(loaded, x, layer, units[:1], method=rule, strict=False)  # warm-up, as for the features
    times = []
    for count in (1, len(units)):
        start = time.perf_counter()
        project_units(loaded, x, layer, units[:count], method=rule, strict=False, check_crops=check_crops)
        times.append(time.perf_counter() - start)
    # one unit: a forward and a backward pass; the further units of the same image: a backward each
    backward = max((times[1] - times[0]) / (len(units) - 1), 0.0)
    return max(times[0], backward)


def calibration_key(loaded: LoadedModel, layers: list[LayerInfo], settings: AtlasSettings,
                    photos: dict[str, np.ndarray] | None, samples: int = CALIBRATION_LAYERS) -> str:
    """What a calibration depends on: the model, the layers, the settings it measures with, the
    photos, and this machine (a calibration from another machine or thread count says nothing here)."""
    measured = {k: v for k, v in settings.as_dict().items()
                if k in ("feature_size", "recipe", "seed", "skip", "deconv_method", "strict", "precision")}
    measured["scan"] = settings.scan_images is not None
    digest = [(name, str(rgb.shape), hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest())
              for name, rgb in (photos or {}).items()]
    machine = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(loaded.device)}
    return make_key(version=CALIBRATION_VERSION, convscope=__version__, fingerprint=fingerprint(loaded.module),
                    preprocessing=loaded.preprocessing.as_dict(), layers=[layer.name for layer in layers],
                    settings=measured, photos=digest, samples=samples, machine=machine)


def load_calibration(out, key: str) -> dict[str, LayerRate] | None:
    """The rates cached in the atlas folder ``out`` under ``key``, or None (none, stale or unreadable)."""
    record = read_json(Path(out) / CALIBRATION_FILE) if out is not None else None
    if not record or record.get("key") != key:
        return None
    try:
        return {name: LayerRate(**rate) for name, rate in record["rates"].items()}
    except (KeyError, TypeError):
        return None


def save_calibration(out, key: str, rates: dict[str, LayerRate], seconds: float = 0.0) -> None:
    """Cache ``rates`` in the atlas folder ``out`` (which must exist) under ``key``."""
    save_json({"key": key, "seconds": seconds, "rates": {name: dataclasses.asdict(rate) for name, rate in rates.items()}},
              Path(out) / CALIBRATION_FILE)


def plan_atlas(layers: list[LayerInfo], settings: AtlasSettings, rates: dict[str, LayerRate], photos: int,
               calibration_seconds: float = 0.0, speedup: float = 1.0, where: str = "on this machine") -> AtlasPlan:
    """The projected time and size of building ``layers`` with ``settings`` at the measured ``rates``.

    ``speedup``: how many times this machine's rate the workers run the features and deconv stages
    at (a Ray cluster's CPUs over this process's threads, :meth:`RayExecutor.speedup
    <convscope.distributed.RayExecutor.speedup>`); ``where`` says so in :meth:`AtlasPlan.describe`.
    """
    channels, seconds, sizes = {}, {}, {}
    stages = {"features": 0.0, "deconv": 0.0}
    examples = settings.projected() if settings.scan_images is not None else min(settings.top, photos)
    for layer in layers:
        rate = rates[layer.name]
        n = len(settings.channels(layer))
        chunks = math.ceil(n / FEATURE_CHUNK)
        channels[layer.name] = n
        features = (rate.step * settings.steps * n + rate.fixed * chunks) / speedup
        deconv = rate.projection * examples * n / speedup
        seconds[layer.name] = features + deconv
        stages["features"] += features
        stages["deconv"] += deconv
        shown = examples if "deconv" not in settings.skip else 0
        sizes[layer.name] = n * (rate.feature_bytes + BYTES_PER_EXAMPLE * shown + BYTES_PER_PHOTO * photos
                                 + BYTES_PER_PAGE)
    return AtlasPlan(settings, list(layers), channels, seconds, sizes, calibration_seconds, stages, where)


def fit_budget(layers: list[LayerInfo], settings: AtlasSettings, rates: dict[str, LayerRate], photos: int,
               hours: float, speedup: float = 1.0, where: str = "on this machine") -> AtlasPlan:
    """The plan that fits ``hours`` (see the module notes): the widest per-layer channel cap, then fewer layers."""
    def plan(chosen, cap):
        return plan_atlas(chosen, replace(settings, channels_per_layer=cap, full_layers=(),
                                          layers=",".join(layer.name for layer in chosen)), rates, photos,
                          speedup=speedup, where=where)

    full = plan_atlas(layers, settings, rates, photos, speedup=speedup, where=where)
    if full.hours <= hours:
        return full
    widest = max(layer.channels for layer in layers)
    low, high = 1, widest
    if plan(layers, 1).hours <= hours:
        while low < high:  # the largest cap that fits
            mid = (low + high + 1) // 2
            low, high = (mid, high) if plan(layers, mid).hours <= hours else (low, mid - 1)
        return plan(layers, low)
    for keep in range(len(layers) - 1, 0, -1):
        chosen = [layers[i] for i in _spread(len(layers), keep)]
        if plan(chosen, 1).hours <= hours:
            return plan(chosen, 1)
    return plan(layers[-1:], 1)
