"""Project single units back to pixel space: deconvnet, guided backprop and saliency, batched.

After Zeiler & Fergus (2013): take a unit of a feature map (often the
strongest activation of a channel), set every other activation to zero, and map it back to
the input. The backward rule at each rectifier is the only thing that tells the three
methods apart (a :class:`~convscope.rectifiers.Rule`); pooling switches and transposed filters come
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

The room: :func:`deconv` (the one call, here), :mod:`.result` (:class:`Unit`, :class:`Projections`,
:class:`DeconvResult`, which saves itself), :mod:`.engine` (:func:`project_units`), :mod:`.units`
(which units to project) and :mod:`.figures` (the pictures).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ...errors import ConvscopeError
from ...images import ImageSource
from ...layers import LayerInfo
from ...models import LoadedModel, as_loaded
from ...precision import NUMBERS, Precision, resolve_precision
from ...rectifiers import PROJECTIONS, Rule, resolve_projection
from .choice import AUTO, PROJECTION_CHOICES, choose_projection, has_max_pooling, projection_method
from .engine import STRATEGIES, project_units, spatial_layer
from .figures import projection_sheet, render_projection_pair, whole_image_sheet
from .result import DeconvResult, Projections, Unit
from .units import strongest_units, top_positions

__all__ = [
    "Unit", "Projections", "DeconvResult", "project_units", "render_projection_pair", "strongest_units",
    "top_positions", "deconv", "projection_sheet", "whole_image_sheet", "STRATEGIES", "AUTO", "PROJECTION_CHOICES",
    "choose_projection", "projection_method", "has_max_pooling",
]


def deconv(
    model: LoadedModel | nn.Module,
    image: ImageSource,
    layer: str | LayerInfo,
    *,
    channels: Sequence[int] | range | None = None,
    top: int | None = None,
    positions: int | None = None,
    method: str | Rule | Sequence[str | Rule] = AUTO,
    size: int | tuple[int, int] | None = None,
    batch_size: int | None = None,
    strict: bool = True,
    progress: bool = False,
    precision: str | Precision = "auto",
) -> DeconvResult:
    """Project the strongest units of ``layer`` for one photo back to pixels.

    Args:
        channels: channels whose strongest unit is projected (default all).
        top: only the ``top`` channels with the highest peaks, strongest first.
        positions: instead, the ``positions`` strongest units of one channel (give one channel,
            or ``top=1`` for the strongest one).
        method: ``auto`` (default: the deconvnet on a model with max-pooling, else guided
            backprop, or the plain gradient where neither rule holds on the layer's path; see
            :func:`~convscope.methods.deconv.choice.choose_projection`), ``deconvnet``, ``guided``,
            ``gradient``, ``all``, or a list of them.
        size: shorter side, or ``(H, W)``; default the model's input size (aspect kept).
        precision: ``"auto"`` (float32, exact), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see
            :func:`project_units`).

    Example:
        >>> res = convscope.deconv(lm, "cat.jpg", "block4_conv1", channels=range(32), method="all")
        >>> res.sheet().save("block4_conv1.png")
    """
    loaded = as_loaded(model)
    chosen_precision = resolve_precision(precision, loaded.device, purpose=NUMBERS, module=loaded.module)
    x, rgb = loaded.tensor(image, size)
    info = spatial_layer(loaded, layer, (int(x.shape[2]), int(x.shape[3])))
    notes = []
    if method == "all":
        rules = list(PROJECTIONS)
    else:
        rules = []
        for m in [method] if isinstance(method, str | Rule) else method:
            if m == AUTO:
                rule, reason = choose_projection(loaded, info, AUTO, strict=strict)
                if reason:
                    notes.append(f"auto chose {rule.name} for {info.label}: {reason}")
                rules.append(rule)
            else:
                rules.append(resolve_projection(m))
        rules = list(dict.fromkeys(rules))
    if positions is not None:
        chosen = strongest_units(loaded, x, info, channels, top=top)
        if len(chosen) != 1:
            raise ConvscopeError(f"positions={positions} needs exactly one channel (got {len(chosen)}); "
                                 "give one channel, or top=1 for the strongest")
        units = top_positions(loaded, x, info, chosen[0].channel, positions)
    else:
        units = strongest_units(loaded, x, info, channels, top=top)
    projections = {rule.name: project_units(loaded, x, info, units, method=rule, batch_size=batch_size,
                                            strict=strict, progress=progress, precision=chosen_precision)
                   for rule in rules}
    if any(projections[rules[0].name].clipped):
        notes.append("some receptive fields reach past the image border; their boxes are clipped")
    for m, p in projections.items():
        zero = sum(not p.maps[i].any() for i in range(len(p)))
        if zero:
            notes.append(f"{zero} of {len(p)} {m} maps are all zero: a rectifier on the path passes nothing back "
                         "there (a ReLU6 unit saturated at 6, or a unit at 0, has no gradient; guided keeps that mask)")
    return DeconvResult(rgb, info, projections, loaded.title, notes)
