"""Feature maps: every requested layer's output for one photo, from one forward pass.

Push a photo through the network and look at what each layer outputs (edges and colours
early, textures next, parts deep). :func:`activations` returns arrays; :class:`ActivationResult` draws them
(grids, heat-map overlays, the shallow-to-deep evolution strip) as PIL images, which a
Jupyter notebook shows inline, and :meth:`ActivationResult.save` writes them as PNGs with a JSON index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import render
from .._io import save_json, save_png
from .._io import save_npz as write_npz
from ..errors import ConvscopeError
from ..hooks import capture, frozen
from ..images import ImageSource, load_image
from ..layers import LayerInfo
from ..models import LoadedModel, as_loaded

__all__ = ["ActivationResult", "activations", "predict"]


@dataclass
class ActivationResult:
    """Feature maps of one image.

    Attributes:
        image: the RGB uint8 ``(H, W, 3)`` image as fed to the model (after resizing).
        layers: the captured layers, shallow to deep.
        maps: ``name -> (C, h, w)`` float32 arrays.
        model_title: model name and weights (says RANDOM INIT when so).
    """

    image: np.ndarray
    layers: list[LayerInfo]
    maps: dict[str, np.ndarray]
    model_title: str

    def __getitem__(self, name: str) -> np.ndarray:
        return self.maps[self.layer(name).name]

    def layer(self, name: str | LayerInfo) -> LayerInfo:
        if isinstance(name, LayerInfo):
            return name
        for layer in self.layers:
            if name in (layer.name, layer.alias):
                return layer
        raise ConvscopeError(f"layer {name!r} was not captured; captured: {[layer.label for layer in self.layers]}")

    def strongest_channels(self, name: str | LayerInfo, k: int = 6) -> np.ndarray:
        """Indices of the ``k`` channels with the highest peak activation, strongest first."""
        maps = self[self.layer(name).name]
        peaks = maps.reshape(maps.shape[0], -1).max(axis=1)
        return np.argsort(-peaks, kind="stable")[:k]

    def grid(self, name: str | LayerInfo, *, cols: int = 16, cmap: str = "viridis", scale: str = "channel") -> Image.Image:
        """All channels of one layer as one picture (see :func:`convscope.render.channel_grid`)."""
        layer = self.layer(name)
        maps = self.maps[layer.name]
        return render.channel_grid(maps, cols=cols, cmap=cmap, scale=scale,
                                   title=f"{layer.label} · {layer.type} · {self.model_title}", min_tile=8)

    def overlay(self, name: str | LayerInfo, *, top: int = 6, cmap: str = "jet", alpha: float = 0.5) -> Image.Image:
        """The ``top`` strongest channels, each upsampled as a heat map over the photo."""
        layer = self.layer(name)
        maps = self.maps[layer.name]
        tiles = []
        for c in self.strongest_channels(layer, top):
            heat = maps[c]
            tiles.append(render.label_image(
                render.overlay_heatmap(self.image, heat, cmap=cmap, alpha=alpha),
                f"ch {c}: peak {heat.max():.3g}"))
        row = render.stack_horizontal(tiles, gap=4)
        strip = render.title_strip(row.width, [
            f"{layer.label}: {len(tiles)} strongest channels over the photo",
            "each heat map scaled to its own min..max",
        ])
        return render.stack_vertical([strip, row])

    def evolution(self, *, height: int = 128, cmap: str = "viridis", per_row: int = 10) -> Image.Image:
        """Shallow to deep: the photo, then each layer's most active channel, ``per_row`` to a row."""
        photo = Image.fromarray(self.image)
        photo = photo.resize((max(1, round(photo.width * height / photo.height)), height), Image.BILINEAR)
        tiles = [render.label_image(photo, "input")]
        for layer in self.layers:
            maps = self.maps[layer.name]
            if maps.ndim != 3:
                continue
            c = int(maps.reshape(maps.shape[0], -1).mean(axis=1).argmax())
            scaled, _, _ = render.normalize_channels(maps[c:c + 1])
            tile_img = Image.fromarray(render.colorize(scaled[0], cmap))
            width = max(1, round(tile_img.width * height / tile_img.height))
            tile_img = tile_img.resize((width, height), Image.NEAREST)
            tiles.append(render.label_image(tile_img, f"{layer.alias or layer.name} ch{c}", size=10))
        rows = [render.stack_horizontal(tiles[i:i + per_row], gap=4) for i in range(0, len(tiles), per_row)]
        body = render.stack_vertical(rows)
        strip = render.title_strip(body.width, [
            f"shallow -> deep: the most active channel of each layer · {self.model_title}",
            "each tile scaled to its own min..max"])
        return render.stack_vertical([strip, body])

    def to_dict(self) -> dict:
        """Model, image size and each captured layer (its catalogue entry and the captured shape); no arrays."""
        return {"model": self.model_title, "image_size": list(self.image.shape[:2]),
                "layers": [{**layer.as_dict(), "captured_shape": list(self.maps[layer.name].shape)}
                           for layer in self.layers]}

    def save(self, folder: str | os.PathLike, *, cols: int = 16, cmap: str = "viridis", scale: str = "channel",
             overlay: bool = False, save_npz: bool = False, progress: bool = False) -> dict:
        """Write one grid per layer (``<alias>.png``; ``<alias>_overlay.png`` with ``overlay``),
        ``evolution.png``, ``activations.npz`` with ``save_npz``, and ``activations.json`` last;
        return the index."""
        folder = Path(folder)
        index = self.to_dict()
        for layer, entry in tqdm(list(zip(self.layers, index["layers"])), desc="grids", unit="layer",
                                 disable=not progress, leave=False):
            stem = (layer.alias or layer.name).replace("/", "_")
            entry["grid"] = f"{stem}.png"
            save_png(self.grid(layer, cols=cols, cmap=cmap, scale=scale), folder / entry["grid"])
            if overlay:
                entry["overlay"] = f"{stem}_overlay.png"
                save_png(self.overlay(layer), folder / entry["overlay"])
        save_png(self.evolution(), folder / "evolution.png")
        index["evolution"] = "evolution.png"
        if save_npz:
            write_npz(folder / "activations.npz", **{layer.name: self.maps[layer.name] for layer in self.layers})
            index["arrays"] = "activations.npz"
        save_json(index, folder / "activations.json")
        return index


def activations(
    model: LoadedModel | torch.nn.Module,
    image: ImageSource,
    layers: str | list[str] | None = None,
    *,
    size: int | tuple[int, int] | None = None,
) -> ActivationResult:
    """Capture ``layers`` (default: every conv's output after its activation) for one image.

    Args:
        model: a :class:`LoadedModel` (from :func:`convscope.load_model`) or any ``nn.Module``.
        image: path, PIL image or array.
        layers: names, aliases or patterns, as in :meth:`Catalogue.resolve`.
        size: shorter side, or ``(H, W)``; default the model's input size (aspect kept).

    Example:
        >>> res = convscope.activations(convscope.load_model("vgg19", random=True), "andrew.jpg",
        ...                             layers="block1_conv2", size=(200, 300))
        >>> res["block1_conv2"].shape
        (64, 200, 300)
    """
    loaded = as_loaded(model)
    chosen = loaded.catalogue.resolve(layers)
    x, rgb = loaded.tensor(image, size)
    outputs = capture(loaded.module, x, chosen)
    maps = {layer.name: outputs[layer.name][0].float().cpu().numpy() for layer in chosen}
    return ActivationResult(rgb, chosen, maps, loaded.title)


def predict(model: LoadedModel | torch.nn.Module, image: ImageSource, top: int = 5) -> list[dict]:
    """Top-``top`` classes for ``image``: ``[{"index", "name", "probability"}, ...]``.

    The whole photo is resized to the model's input size (no crop), as in the blog post.
    """
    loaded = as_loaded(model)
    rgb = loaded.preprocessing.fit(load_image(image), loaded.preprocessing.input_size)
    x = loaded.preprocessing.to_tensor(rgb, loaded.device)
    with frozen(loaded.module), torch.no_grad():
        logits = loaded.module(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ConvscopeError("this model does not end in class scores (B, classes); predict needs a classifier")
    probs = logits.float().softmax(-1)[0]
    values, indices = probs.topk(min(top, probs.numel()))
    names = loaded.class_names or []
    return [{"index": int(i), "name": names[i] if i < len(names) else f"class {int(i)}", "probability": float(v)}
            for v, i in zip(values, indices)]
