"""A depth profile: one row per feature layer, shallow to deep, that measures the post's conclusion.

The blog post ends on two claims, shallow features are generic and deep ones task-specific, and
deep layers hold filters that never respond. :func:`profile_model` measures both across a whole
model, and checks how far each projection method can be trusted:

* **Geometry**: receptive-field size and cumulative stride (from the layer catalogue).
* **Activity** on the sample photos and a scan set (the built-in sample windows, or a folder):
  the share of zero activations, the share of channels silent on every image (never above the
  dead limit), and the share of **dead** channels, over every channel of the layer. Dead uses
  feature visualization's definition (:data:`~convscope.methods.features.DEAD_FRACTION`: relative
  to the layer's scale on the photos): a silent channel that a short batched optimization
  (every layer's silent channels in one batch, the forward stopped at the deepest of them) cannot
  raise above the limit either.
* **Transfer probes** on two tasks that ship offline and do not saturate, each against the same
  architecture at random initialisation, mean ± std over stratified folds: a far task,
  scikit-learn's 8x8 digits (:func:`~convscope.methods.probe.digits`), and a near task of natural
  images, upright vs upside-down photo patches (:func:`~convscope.methods.probe.orientation`).
  The probe is a ridge classifier on each layer's pooled features (:data:`~convscope.methods.probe.RIDGE`).
* **Projection trust**: Adebayo et al.'s cascading randomization ("Sanity Checks for Saliency
  Maps", NeurIPS 2018). For deconvnet, guided backprop and the gradient, each layer's strongest
  units on the sample photos are projected on the trained model and on the model with every
  weight they depend on randomized, and the two maps (|v| inside the receptive field) are
  compared by Spearman rank correlation. The cascade itself (top block randomized first, then
  down to the stem) is traced at the deepest layer. Inside a receptive field much of that
  correlation is the field's footprint, which any photo shares, so two reference points on the
  same units calibrate it: the randomized model's map of the same unit on *another* photo
  (chance: footprint without the photo), and a plain edge detector's map of the photo (an
  image-only map). A method is flagged "insensitive to the weights" (:func:`insensitive`) when
  its randomized maps are closer to the trained maps on the same photo than on another photo
  (one-sided Wilcoxon signed-rank test over the units): what survives randomization is the photo.
  The deconvnet is not measured on a model without max-pooling: there its
  projection ignores the image (see :func:`~convscope.methods.deconv.choice.projection_method`).

Randomized models are deep copies; the user's model is never changed.

Example:
    >>> res = convscope.profile_model(convscope.load_model())
    >>> print(res.table())
    >>> res.save("runs/profile")
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...datasets import FolderImages, ImageSet, SampleImages
from ...errors import ConvscopeError
from ...hooks import capture
from ...images import sample_photos
from ...layers import LayerInfo
from ...models import LoadedModel, as_loaded
from ...rectifiers import DECONVNET, PROJECTIONS, Rule
from ..deconv.choice import has_max_pooling
from ..features import DEAD_FRACTION, DEAD_THRESHOLD
from ..probe import digits, orientation, random_init_like
from . import engine
from .result import ProfileResult, insensitive

__all__ = ["profile_model", "ProfileResult", "insensitive", "DEFAULTS"]

# Default settings, sized so the whole profile of the default model fits in a few minutes on two cores.
DEFAULTS = {
    "scan_limit": 96,          # scan-set images read for the activity columns
    # The short optimization of silent channels (all its steps with the redirected ReLU gradient).
    # 64 px gives a stride-32 layer a 2x2 map; at 32 px (a 1x1 map, padding-dominated) the verdict
    # called twice as many of blocks.5.2.bn2's silent channels dead as at 64 px (31 vs 12 of 41);
    # 8 steps at 64 px: 14, in a third of 16 steps' time (benchmarks/depth_profile.py --validate).
    # Against the full recipe (256 steps at 128 px): equal on the stem (4 of 4 silent), one too many
    # at blocks.3.1.bn2 (6 vs 5 of 6): a cheap "dead" is an upper bound.
    "dead_steps": 8,
    "dead_size": 64,
    "far_per_class": 30,       # digits per class (10 classes)
    "far_size": 64,            # digits upsampled to this
    "near_per_photo": 24,      # orientation patches per photo (10 photos)
    "near_size": 96,
    "folds": 5,
    "trust_units": 1,          # strongest units per photo for the projection-trust columns
    "trust_layers": 6,         # layers spread over the depth that get them (None: every layer)
}


def profile_model(
    model: LoadedModel | torch.nn.Module,
    layers: str | Sequence[str | LayerInfo] | None = None,
    *,
    images: ImageSet | str | Path | None = None,
    scan_limit: int | None = DEFAULTS["scan_limit"],
    photos: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    folds: int = DEFAULTS["folds"],
    dead_steps: int = DEFAULTS["dead_steps"],
    dead_size: int = DEFAULTS["dead_size"],
    far_per_class: int = DEFAULTS["far_per_class"],
    far_size: int = DEFAULTS["far_size"],
    near_per_photo: int = DEFAULTS["near_per_photo"],
    near_size: int = DEFAULTS["near_size"],
    trust_units: int = DEFAULTS["trust_units"],
    trust_layers: int | None = DEFAULTS["trust_layers"],
    probes: bool = True,
    trust: bool = True,
    progress: bool = False,
) -> ProfileResult:
    """One row per feature layer: geometry, activity and dead channels, transfer probes, projection trust.

    Args:
        model: a :class:`LoadedModel` or ``nn.Module``; never changed (randomized models are copies).
        layers: names, aliases or patterns (or rows); default every feature layer, shallow to deep.
        images: the scan set for the activity columns: an :class:`ImageSet`, a folder, or None for
            the built-in sample windows; ``scan_limit`` images are read (None: all).
        photos: the reference photos (default the sample photos): the dead test's scale, and the
            projection-trust units.
        seed: the random-init model, the probe folds and tasks, and the optimization.
        folds: stratified cross-validation folds of the probes.
        dead_steps, dead_size: the short optimization that tries to raise each silent channel.
        far_per_class, far_size: the digits task (per class, and the size fed to the model).
        near_per_photo, near_size: the orientation task (patches per photo, and the size).
        trust_units: strongest units per photo compared under randomization.
        trust_layers: how many layers, spread evenly over the depth (first and last included), get
            the projection-trust columns (each costs one backward pass per unit, method and model);
            None: every layer.
        probes, trust: measure the probe and projection-trust columns (both on by default).

    Returns:
        :class:`ProfileResult` (``.table()``, ``.plot()``, ``.save(folder)``).
    """
    loaded = as_loaded(model)
    for name, value, least in (("folds", folds, 2), ("dead_steps", dead_steps, 1), ("dead_size", dead_size, 16),
                               ("far_per_class", far_per_class, folds), ("far_size", far_size, 16),
                               ("near_per_photo", near_per_photo, folds), ("near_size", near_size, 16),
                               ("trust_units", trust_units, 1)):
        if int(value) < least:
            raise ConvscopeError(f"{name} must be at least {least} (got {value})")
    catalogue = loaded.catalogue
    if layers is None:
        chosen = [layer for layer in catalogue.features if layer.is_spatial]
    else:
        spec = layers if isinstance(layers, str) else [layer.name if isinstance(layer, LayerInfo) else layer
                                                         for layer in layers]
        chosen = catalogue.resolve(spec)
    if not chosen:
        raise ConvscopeError("no feature layer to profile; name some with --layers (`convscope layers` lists them)")
    flat = [layer for layer in chosen if not layer.is_spatial]
    if flat:
        raise ConvscopeError(f"layer {flat[0].label} has shape {flat[0].shape}; a profile needs feature maps (C, H, W)")
    size = tuple(loaded.preprocessing.input_size)
    if images is None:
        scan_set: ImageSet = SampleImages(size, loaded.preprocessing.resample, limit=scan_limit)
    elif isinstance(images, ImageSet):
        scan_set = images
    else:
        scan_set = FolderImages(images, size, loaded.preprocessing.resample)
        scan_set.require_readable(scan_limit)
    photos = sample_photos() if photos is None else photos
    timings: dict[str, float] = {}
    steps = ["activity", "dead"] + (["probes"] if probes else []) + (["trust"] if trust else [])
    bar = tqdm(total=len(steps), desc="profile", unit="part", disable=not progress, leave=False)

    def done(part: str, start: float) -> None:
        timings[part] = round(time.perf_counter() - start, 2)
        bar.update(1)

    with bar:
        start = time.perf_counter()
        acts, scanned = engine.activity(loaded, chosen, photos, scan_set, limit=scan_limit)
        done("activity", start)

        start = time.perf_counter()
        for name, dead in engine.dead_channels(loaded, chosen, acts, steps=dead_steps, size=dead_size,
                                               seed=seed).items():
            acts[name].dead = dead
        done("dead", start)

        # A model that is itself random init with this seed would be its own baseline.
        baseline_seed = seed + 1 if loaded.random_init and loaded.seed == seed else seed
        random_model = random_init_like(loaded, baseline_seed) if probes or trust else None
        far = near = None
        if probes:
            start = time.perf_counter()
            far = engine.transfer(loaded, random_model, chosen, digits(far_per_class, seed), (far_size, far_size),
                                  folds=folds, seed=seed)
            near = engine.transfer(loaded, random_model, chosen, orientation(near_per_photo, seed),
                                   (near_size, near_size), folds=folds, seed=seed)
            done("probes", start)

        trust_scores, groups, not_measured = [], [], {}
        if trust:
            start = time.perf_counter()
            picks = np.unique(np.linspace(0, len(chosen) - 1, min(trust_layers or len(chosen), len(chosen)))
                              .round().astype(int))
            trust_scores, groups, not_measured = _trust(loaded, random_model, [chosen[i] for i in picks], photos,
                                                        trust_units)
            done("trust", start)

    return ProfileResult(
        layers=chosen, activity=acts, far=far, near=near, trust=trust_scores, cascade_steps=[g[0] for g in groups],
        not_measured=not_measured, model_title=loaded.title, model=loaded.describe(),
        scan_set=scan_set.describe(), scan_images=scanned, photos=list(photos), seed=seed,
        settings={"folds": folds, "dead_steps": dead_steps, "dead_size": dead_size, "dead_fraction": DEAD_FRACTION,
                  "dead_threshold": DEAD_THRESHOLD, "far_per_class": far_per_class, "far_size": far_size,
                  "near_per_photo": near_per_photo, "near_size": near_size, "trust_units": trust_units,
                  "trust_layers": trust_layers,
                  "scan_limit": scan_limit, "baseline_seed": baseline_seed if probes or trust else None},
        seconds=timings)


def _trust(loaded: LoadedModel, random_model: LoadedModel, layers: list[LayerInfo], photos: dict[str, np.ndarray],
           per_photo: int) -> tuple[list[engine.TrustScores], list[tuple[str, list[str]]], dict[str, str]]:
    """Spearman of each method's maps, trained vs randomized, at every layer; the cascade at the deepest."""
    size = tuple(loaded.preprocessing.input_size)
    pre = loaded.preprocessing
    # Photos at the model's input size, so one batch holds them all (the same pixels for every model).
    pixels = [pre.fit(photo, size) for photo in photos.values()]
    x = pre.to_tensor(pixels, loaded.device)
    edges = engine.edge_maps(pixels)
    outputs = capture(loaded.module, x, layers)
    baseline = capture(random_model.module, x, [random_model.catalogue.get(layer.name) for layer in layers])
    # Units that fire in both models: a unit at zero in the randomized model has no map to compare.
    units = {layer.name: engine.strongest_unsaturated(outputs[layer.name], per_photo, baseline[layer.name] > 0)
             for layer in layers}
    rules: list[Rule] = []
    not_measured: dict[str, str] = {}
    for rule in PROJECTIONS:
        if rule is DECONVNET and not has_max_pooling(loaded):
            not_measured[rule.name] = ("not applicable: the model has no max-pooling, so the deconvnet's projection "
                                       "does not depend on the image (no switches); auto uses guided backprop")
        else:
            rules.append(rule)
    scores = {rule.name: engine.TrustScores(rule) for rule in rules}
    reference: dict[tuple[str, str], list[np.ndarray]] = {}
    for layer in layers:
        if not units[layer.name]:
            for rule in rules:
                scores[rule.name].reasons[layer.name] = "no unit fires on the photos"
            continue
        chosen = units[layer.name]
        # The same units on another photo ride along in the randomized model's pass (one more
        # backward each): how close its maps come to the trained ones without sharing the photo.
        others = engine.on_other_photos(chosen, len(x)) if len(x) > 1 else []
        for rule in rules:
            try:
                ref, boxes = engine.project_maps(loaded, x, layer, chosen, rule)
            except ConvscopeError as err:
                scores[rule.name].reasons[layer.name] = str(err)
                continue
            reference[rule.name, layer.name] = ref
            maps, _ = engine.project_maps(random_model, x, random_model.catalogue.get(layer.name), chosen + others,
                                          rule)
            score = scores[rule.name]
            score.layers[layer.name] = engine.projection_similarity(ref, maps[:len(chosen)])
            score.edge[layer.name] = engine.projection_similarity(ref, engine.edges_shown(edges, chosen, boxes))
            if others:
                score.chance[layer.name] = engine.projection_similarity(ref, maps[len(chosen):])
    groups = engine.cascade_groups(loaded)
    deepest = layers[-1]
    measured = [rule for rule in rules if (rule.name, deepest.name) in reference]
    # No blocks when the weights are not held by the modules the catalogue names (a Keras model's
    # variables live in its layers): then there is no cascade, only the full randomization.
    if measured and groups:
        done: list[str] = []
        rows = {rule.name: [] for rule in measured}
        for label, modules in groups:
            done.extend(modules)
            step = engine.randomized(loaded, random_model, done, f"randomized down to {label}")
            row = step.catalogue.get(deepest.name)
            for rule in measured:
                maps, _ = engine.project_maps(step, x, row, units[deepest.name], rule)
                rows[rule.name].append(engine.projection_similarity(reference[rule.name, deepest.name], maps))
            del step
        for rule in measured:
            scores[rule.name].cascade = np.stack(rows[rule.name])
    return [scores[rule.name] for rule in rules], groups, not_measured

