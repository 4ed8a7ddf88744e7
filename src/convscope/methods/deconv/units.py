"""Which units to project: each channel's strongest unit, or a channel's strongest positions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...errors import ConvscopeError
from ...hooks import capture
from ...layers import LayerInfo
from ...models import LoadedModel, as_loaded
from .engine import spatial_layer
from .result import Unit

__all__ = ["strongest_units", "top_positions"]


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
    info = spatial_layer(loaded, layer, (int(images.shape[2]), int(images.shape[3])))
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
    info = spatial_layer(loaded, layer, (int(images.shape[2]), int(images.shape[3])))
    maps = _layer_map(loaded, images, info, image_index)
    if not 0 <= channel < maps.shape[0]:
        raise ConvscopeError(f"channel {channel} is out of range: layer {info.label} has channels 0..{maps.shape[0] - 1}")
    flat = maps[channel].reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)[:max(0, n)]
    width = maps.shape[2]
    return [Unit(channel, int(p) // width, int(p) % width, image_index) for p in order.tolist()]
