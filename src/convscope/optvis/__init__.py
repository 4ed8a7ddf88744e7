"""Optimization-based visualization, one idea per module.

* :mod:`.objectives`: what to maximize (channel, neuron, layer, class logit, penalties), composable.
* :mod:`.param`: image parameterizations returning ``(params, image_f)`` (FFT + decorrelated colour, pixels, the post's gray + noise).
* :mod:`.transforms`: per-image random pad, jitter, scale, rotation, chained by ``compose``.
* :mod:`.redirect`: the redirected ReLU/ReLU6 gradient for units dead at the start.
* :mod:`.engine`: the batched, chunked, seeded optimization loop and the recipes.

The user-facing functions are in :mod:`convscope.features`.
"""

from . import objectives, param, transforms
from .engine import RECIPES, Levers, Optimized, Recipe, make_recipe, optimize
from .objectives import Objective, channel, class_logit, diversity, l2, layer, neuron, total_variation
from .redirect import redirected_rectifiers

__all__ = [
    "RECIPES", "Levers", "Objective", "Optimized", "Recipe", "channel", "class_logit", "diversity", "l2",
    "layer", "make_recipe", "neuron", "objectives", "optimize", "param", "redirected_rectifiers",
    "total_variation", "transforms",
]
