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

import numpy as np
import torch

from ...errors import ConvscopeError, suggest
from ...hooks import frozen, recording
from ...images import ImageSource, load_image
from ...layers import Catalogue, LayerInfo
from ...models import LoadedModel, as_loaded
from .engine import (
    FILLS,
    INCREMENTAL,
    METHODS,
    PLAIN,
    Fill,
    Method,
    Occluder,
    batch_size_for,
    channel_means,
    occluder_grid,
    resolve_fill,
    resolve_method,
    run_copies,
)
from .result import OcclusionResult

__all__ = ["OcclusionResult", "occlusion", "occluder_grid", "FILLS", "METHODS", "Fill", "Method", "INCREMENTAL",
           "PLAIN"]


def occlusion(
    model: LoadedModel | torch.nn.Module,
    image: ImageSource,
    *,
    patch: int = 32,
    stride: int = 8,
    fill: str | Fill = "gray",
    target: int | str | None = None,
    layer: str | LayerInfo | None = None,
    channel: int | None = None,
    size: int | tuple[int, int] | None = None,
    method: str | Method = "incremental",
    batch_size: int | None = None,
    memory_budget: int = 1 << 30,
    check: bool = True,
    progress: bool = False,
) -> OcclusionResult:
    """Slide a ``patch`` x ``patch`` occluder over ``image`` and map what the network does.

    Args:
        model: a :class:`LoadedModel` or an ``nn.Module`` classifier (``(B, classes)`` output).
        image: path, PIL image or array.
        patch, stride: occluder side and step in input pixels.
        fill: ``"gray"`` (mid-gray, as in Zeiler & Fergus), ``"mean"`` (the photo's mean
            colour) or ``"blur"`` (the photo blurred with sigma = patch / 4), or a :class:`Fill`.
        target: class index or name whose probability is mapped; default the top class.
        layer: feature layer for the activity map; default the deepest feature layer.
        channel: its channel; default the one with the highest peak on the unoccluded image.
        size: image size fed to the model: ``(H, W)`` or the shorter side; default the
            model's input size (the whole photo, squeezed, as ``predict`` does).
        method: ``"incremental"`` (exact reuse of the unoccluded pass) or ``"plain"``, or a
            :class:`Method`.
        batch_size: copies per forward pass; default from ``memory_budget``.
        memory_budget: bytes per forward pass, for the default ``batch_size`` (1 GiB).
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
    loaded = as_loaded(model)
    method, fill = resolve_method(method), resolve_fill(fill)
    pre = loaded.preprocessing
    rgb = pre.fit(load_image(image), size if size is not None else pre.input_size)
    height, width = rgb.shape[:2]
    tops, lefts = occluder_grid(height, width, patch, stride)
    catalogue = loaded.catalogue_at((height, width))
    chosen = _resolve_layer(catalogue, layer)
    module = loaded.module
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x0 = pre.to_tensor(rgb, loaded.device).to(dtype)
    fill_img = pre.normalize(torch.from_numpy(np.ascontiguousarray(fill.picture(rgb, patch)))
                             .permute(2, 0, 1)[None].to(loaded.device, dtype))

    with frozen(module), torch.no_grad():
        with recording(module, [chosen]) as store:
            logits0 = module(x0)
        if not isinstance(logits0, torch.Tensor) or logits0.dim() != 2:
            raise ConvscopeError("this model does not end in class scores (B, classes); occlusion needs a classifier")
        if chosen.name not in store:
            raise ConvscopeError(f"layer {chosen.name} did not run in the forward pass")
        means0 = channel_means(store[chosen.name])[0]
        peaks0 = store[chosen.name][0].flatten(1).amax(1) if store[chosen.name].dim() > 2 else means0
        if channel is None:
            channel = int(peaks0.argmax())
        elif not 0 <= channel < means0.numel():
            raise ConvscopeError(f"channel {channel} is out of range: {chosen.label} has channels 0..{means0.numel() - 1}")
        target_index = _resolve_target(target, loaded.class_names, logits0[0])
        probs0 = logits0.float().softmax(-1)[0]

        occluder = Occluder(x0, fill_img, tops, lefts, patch)
        if batch_size is None:
            batch_size = batch_size_for(catalogue, x0, memory_budget, method)
        batch_size = max(1, min(int(batch_size), len(occluder)))
        keep = torch.float64 if dtype == torch.float64 else torch.float32
        copies = run_copies(module, occluder, chosen, channel, method, batch_size, keep=keep, check=check,
                            progress=progress)

    probs = copies.logits.softmax(-1)
    rows, cols = len(tops), len(lefts)
    label_p, labels = probs.max(-1)
    names = loaded.class_names
    return OcclusionResult(
        image=rgb, patch=patch, stride=stride, fill=fill.name, tops=tops, lefts=lefts,
        target=target_index,
        target_name=names[target_index] if names and target_index < len(names) else f"class {target_index}",
        probability=probs[:, target_index].reshape(rows, cols).numpy(),
        labels=labels.reshape(rows, cols).numpy().astype(np.int64),
        label_probability=label_p.reshape(rows, cols).numpy(),
        activity=copies.activity.reshape(rows, cols).numpy(),
        layer=chosen, channel=channel,
        base_probability=float(probs0[target_index]), base_label=int(probs0.argmax()),
        base_activity=float(means0[channel]),
        class_names=names, model_title=loaded.title, method=copies.method, seconds=copies.seconds,
        incremental=copies.incremental,
    )


def _resolve_layer(catalogue: Catalogue, layer: str | LayerInfo | None) -> LayerInfo:
    """The one layer for the activity map, from the catalogue at the input size used."""
    if isinstance(layer, LayerInfo):
        return catalogue.get(layer.name)
    if layer is None:
        feats = catalogue.features
        if not feats:
            raise ConvscopeError("this model has no convolutional feature layer; pass --layer NAME")
        return feats[-1]
    found = catalogue.resolve(layer)
    if len(found) != 1:
        raise ConvscopeError(f"--layer {layer!r} names {len(found)} layers; name exactly one")
    return found[0]


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
