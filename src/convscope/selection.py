"""Which layers a method looks at when the user names none: the layer-selection policies, in one place.

Every policy takes a :class:`~convscope.layers.Catalogue` (traced at the input size in use) and
returns rows in forward order. Feature layers are each conv's output after its norm and
activation (:attr:`Catalogue.features`).
"""

from __future__ import annotations

import numpy as np

from .errors import ConvscopeError
from .layers import Catalogue, LayerInfo

__all__ = ["stage_outputs", "spread"]


def stage_outputs(catalogue: Catalogue) -> list[LayerInfo]:
    """At stride 4, 8 and 16, the last of the narrowest feature layers (the dataset scan's default).

    That is each stage's output in VGG-like nets (VGG16: block3_conv3, block4_conv3,
    block5_conv3) and in inverted-residual nets (EfficientNet-Lite0: blocks.1.1.bn3,
    blocks.2.1.bn3, blocks.3.2.bn3, not the wide ReLU6 expansions, whose saturation at 6 makes
    ties of most top lists), and it keeps the number of figures modest. Falls back to three
    feature layers spread over the depth when the strides differ.
    """
    features = [f for f in catalogue.features if f.is_spatial]
    chosen = []
    for stride in (4, 8, 16):
        at = [f for f in features if f.stride and f.stride[0] == stride]
        if at:
            narrowest = min(f.channels for f in at)
            chosen.append([f for f in at if f.channels == narrowest][-1])
    if len(chosen) == 3:
        return chosen
    if not features:
        raise ConvscopeError("this model has no spatial feature layer to scan; name layers with --layers")
    picks = sorted({round(i * (len(features) - 1) / 3) for i in (1, 2, 3)})
    return [features[i] for i in picks]


def spread(catalogue: Catalogue, count: int = 8) -> list[LayerInfo]:
    """``count`` feature layers spread evenly over the depth, first and last included (the probe's default)."""
    feats = catalogue.features
    if not feats:
        raise ConvscopeError("this model has no convolutional feature layer; pass layers explicitly")
    picks = np.unique(np.linspace(0, len(feats) - 1, min(count, len(feats))).round().astype(int))
    return [feats[i] for i in picks]
