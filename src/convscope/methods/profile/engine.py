"""The measurements of a depth profile: activity and dead channels, transfer probes, projection trust.

Each function takes values (a :class:`LoadedModel`, :class:`LayerInfo` rows, Rules) resolved by
:func:`convscope.methods.profile.profile_model` and returns plain numbers and arrays.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...datasets import ImageSet
from ...errors import ConvscopeError
from ...hooks import capture
from ...layers import LayerInfo
from ...models import LoadedModel
from ...precision import PICTURE, resolve_precision
from ...rectifiers import Rule
from ..deconv import Unit, project_units
from ..features import DEAD_FRACTION, DEAD_THRESHOLD, dead_limit, layer_scale
from ..features import objectives as obj
from ..features.engine import make_recipe, optimize
from ..probe import RIDGE, Classifier, ProbeDataset, cross_validate, pooled_features

__all__ = ["LayerActivity", "activity", "dead_channels", "ProbeScores", "transfer", "cascade_groups",
           "randomized", "strongest_unsaturated", "projection_similarity", "TrustScores", "edge_maps",
           "on_other_photos", "project_maps", "edges_shown"]


# ------------------------------------------------------------------------------------------ activity

@dataclass
class LayerActivity:
    """One layer's activity over the photos and the scan set.

    Attributes:
        zeros, total: activations exactly zero, and all activations seen.
        magnitude: ``(C,)`` each channel's largest |activation| over the photos and the scan set.
        photo_magnitude: ``(C,)`` the same over the photos alone (they set the layer's scale, as in
            feature visualization's dead test).
        scale, limit: the layer's scale (:func:`~convscope.methods.features.layer_scale`) and the
            dead test's limit (:func:`~convscope.methods.features.dead_limit`).
        dead: channels that are silent and that a short optimization could not raise (filled by
            :func:`dead_channels`).
    """

    zeros: int
    total: int
    magnitude: np.ndarray
    photo_magnitude: np.ndarray
    scale: float = 0.0
    limit: float = DEAD_THRESHOLD
    dead: list[int] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return len(self.magnitude)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    @property
    def silent(self) -> list[int]:
        """Channels whose |activation| never exceeds the limit on any photo or scan-set image."""
        return [int(c) for c in np.flatnonzero(self.magnitude <= self.limit)]


class _Tally:
    """Running zero counts and per-channel largest |activation| of several layers."""

    def __init__(self, layers: Sequence[LayerInfo]):
        self.names = [layer.name for layer in layers]
        self.zeros = dict.fromkeys(self.names, 0)
        self.total = dict.fromkeys(self.names, 0)
        self.magnitude: dict[str, torch.Tensor | None] = dict.fromkeys(self.names)

    def add(self, outputs: dict[str, torch.Tensor]) -> None:
        for name in self.names:
            out = outputs[name]
            self.zeros[name] += int((out == 0).sum())
            self.total[name] += out.numel()
            flat = out.abs().transpose(0, 1).reshape(out.shape[1], -1).amax(1).double().cpu()
            seen = self.magnitude[name]
            self.magnitude[name] = flat if seen is None else torch.maximum(seen, flat)


@torch.no_grad()
def activity(loaded: LoadedModel, layers: Sequence[LayerInfo], photos: dict[str, np.ndarray],
             images: ImageSet | None, *, limit: int | None = None, fraction: float = DEAD_FRACTION,
             threshold: float = DEAD_THRESHOLD, batch_size: int = 16) -> tuple[dict[str, LayerActivity], int]:
    """Sparsity and per-channel magnitudes of ``layers`` over ``photos`` (each at the model's input
    size, aspect kept, as feature visualization's dead test sees them) and over ``images``.

    Returns ``({layer name: LayerActivity}, images read from the scan set)``.
    """
    photo_tally, scan_tally = _Tally(layers), _Tally(layers)
    side = min(loaded.preprocessing.input_size)
    for photo in photos.values():
        x, _ = loaded.tensor(photo, side)
        photo_tally.add(capture(loaded.module, x, layers))
    seen = 0
    if images is not None:
        pre = loaded.preprocessing
        for pixels, _ids, _skipped in images.loader(batch_size=batch_size, stop=limit):
            if not len(pixels):
                continue
            x = pre.normalize(pixels.to(loaded.device).permute(0, 3, 1, 2).float().div_(255.0))
            scan_tally.add(capture(loaded.module, x, layers))
            seen += len(pixels)
    result = {}
    for layer in layers:
        name = layer.name
        photo_mag = photo_tally.magnitude[name].numpy()
        magnitude = photo_mag if scan_tally.magnitude[name] is None else np.maximum(
            photo_mag, scan_tally.magnitude[name].numpy())
        scale = layer_scale(photo_mag)
        result[name] = LayerActivity(photo_tally.zeros[name] + scan_tally.zeros[name],
                                     photo_tally.total[name] + scan_tally.total[name], magnitude, photo_mag,
                                     scale, dead_limit(scale, fraction, threshold))
    return result, seen


# A channel's optimization key: its layer's position in the catalogue and its index, so its seeds
# (and so its verdict) do not depend on which other channels share the batch.
_KEY_SHIFT = 1 << 16


def _silent_objective(rows: dict[int, LayerInfo], keys: Sequence[int]) -> obj.Objective:
    """Element ``i`` scores the mean of its own channel (key ``keys[i]``) in its own layer: the
    feature-visualization channel objective, for channels of several layers in one batch."""
    keys = [int(k) for k in keys]
    positions = [k // _KEY_SHIFT for k in keys]
    # Per layer of the chunk, once: which elements read it and their channels in it.
    groups = []
    for position in dict.fromkeys(positions):
        members = [i for i, p in enumerate(positions) if p == position]
        groups.append((rows[position].name, torch.as_tensor(members),
                       torch.as_tensor([keys[i] % _KEY_SHIFT for i in members])))

    def value(acts):
        total = None
        for name, members, chans in groups:
            t = acts[name]
            means = t[members.to(t.device), chans.to(t.device)].flatten(1).mean(1)
            part = torch.zeros(len(keys), dtype=means.dtype, device=means.device).index_copy(
                0, members.to(means.device), means)
            total = part if total is None else total + part
        return total

    # Every layer is named, whichever the chunk reads: the optimizer records the layers that its
    # first element's objective names.
    return obj.Objective(value, [row.name for row in rows.values()], f"silent channels of {len(groups)} layers")


def dead_channels(loaded: LoadedModel, layers: Sequence[LayerInfo], activity: dict[str, LayerActivity], *,
                  steps: int, size: int, seed: int, recipe: str = "lucid") -> dict[str, list[int]]:
    """Of each layer's silent channels, those a short feature visualization cannot raise above the limit.

    Every silent channel of every layer is optimized in **one** batch (feature visualization's
    ``recipe`` for ``steps`` at ``size`` px, each image scored by its own channel's mean; the
    forward stops at the deepest layer that holds one), and a channel is dead when its objective
    on the final image stays at or under its layer's limit (``activity[name].limit``), as in
    :func:`~convscope.methods.features.visualize_features`'s verdict.

    Returns ``{layer name: dead channels}`` (every layer, empty lists included).
    """
    positions = {layer.name: int(layer.index) for layer in layers}
    rows = {positions[layer.name]: layer for layer in layers if activity[layer.name].silent}
    keys = [positions[layer.name] * _KEY_SHIFT + c for layer in layers for c in activity[layer.name].silent]
    dead: dict[str, list[int]] = {layer.name: [] for layer in layers}
    if not keys:
        return dead
    precision = resolve_precision("auto", loaded.device, purpose=PICTURE, module=loaded.module)
    run = optimize(loaded, lambda chunk: _silent_objective(rows, chunk), keys,
                   recipe=make_recipe(recipe, steps=steps, size=size), seed=seed, max_batch=len(keys),
                   memory_budget=1 << 40, precision=precision)
    for key, final in zip(keys, run.final):
        layer = rows[key // _KEY_SHIFT]
        if float(final) <= activity[layer.name].limit:
            dead[layer.name].append(key % _KEY_SHIFT)
    return dead


# ------------------------------------------------------------------------------------------ probes

@dataclass
class ProbeScores:
    """Cross-validated accuracy per layer on one task: ``(layers, folds)`` trained and random init."""

    task: str
    size: tuple[int, int]
    chance: float
    n_images: int
    folds: int
    trained: np.ndarray
    random: np.ndarray


def transfer(loaded: LoadedModel, random_model: LoadedModel, layers: Sequence[LayerInfo], task: ProbeDataset,
             size: tuple[int, int], *, folds: int, seed: int, classifier: Classifier = RIDGE,
             batch_size: int = 32) -> ProbeScores:
    """Linear-probe accuracy of every layer on ``task``, trained weights and random init, same folds."""
    trained_rows = [loaded.catalogue_at(size).get(layer.name) for layer in layers]
    random_rows = [random_model.catalogue_at(size).get(layer.name) for layer in layers]
    feats, _ = pooled_features(loaded, task.images, trained_rows, size, batch_size)
    base, _ = pooled_features(random_model, task.images, random_rows, size, batch_size)
    counts = task.counts
    return ProbeScores(task.name, size, max(counts.values()) / len(task), len(task), folds,
                       cross_validate(feats, task.labels, folds, seed, classifier),
                       cross_validate(base, task.labels, folds, seed, classifier))


# ------------------------------------------------------------------------------------------ trust

def cascade_groups(loaded: LoadedModel) -> list[tuple[str, list[str]]]:
    """The model's weights in blocks, top first: ``[(label, module names)]``.

    A block is a run of layers at one cumulative stride (VGG's ``block1``..``block5``; an
    EfficientNet's stages at strides 2..32), and everything after the last feature layer is the
    ``head``. Only modules that hold parameters or buffers themselves are listed.
    """
    catalogue = loaded.catalogue
    features = catalogue.features
    if not features:
        raise ConvscopeError("this model has no feature layer to profile")
    last = features[-1].index
    modules = dict(loaded.module.named_modules())
    groups: list[tuple[str, list[str]]] = []
    for row in catalogue.layers:
        name = row.module_name
        module = modules.get(name)
        if module is None or row.kind == "block" or row.call:
            continue
        if not any(True for _ in module.parameters(recurse=False)) and not any(True for _ in module.buffers(recurse=False)):
            continue
        if row.index > last:
            label = "head"
        elif row.stride is None:
            label = groups[-1][0] if groups else "stem"
        else:
            label = f"stride {int(row.stride[0]) if float(row.stride[0]).is_integer() else row.stride[0]}"
        if groups and groups[-1][0] == label:
            groups[-1][1].append(name)
        else:
            groups.append((label, [name]))
    if groups and groups[0][0] != "head":
        groups[0] = (f"{groups[0][0]} (stem)", groups[0][1])
    return groups[::-1]


def randomized(loaded: LoadedModel, random_model: LoadedModel, modules: Sequence[str], label: str) -> LoadedModel:
    """A deep copy of ``loaded`` whose ``modules`` hold ``random_model``'s weights and buffers."""
    module = copy.deepcopy(loaded.module)
    wanted = set(modules)
    own = module.state_dict()
    source = random_model.module.state_dict()
    for key in own:
        if key.rpartition(".")[0] in wanted and key in source:
            own[key] = source[key].clone()
    module.load_state_dict(own)
    return LoadedModel(module, loaded.name, f"{loaded.weights}, {label}", loaded.preprocessing, loaded.class_names,
                       random_init=True, seed=random_model.seed, device=loaded.device)


@torch.no_grad()
def strongest_unsaturated(outputs: torch.Tensor, per_image: int, allowed: torch.Tensor | None = None) -> list[Unit]:
    """Each image's ``per_image`` strongest units, one per channel, skipping a saturation plateau.

    A unit at its activation's cap (ReLU6 = 6) has a closed forward mask, so its guided and
    gradient maps are zero by definition: where an image's top value is shared by several units
    (a plateau), those units are passed over; so are units where ``allowed`` (same shape) is False.
    """
    batch, channels = outputs.shape[:2]
    flat = outputs.float().reshape(batch, channels, -1)
    top = flat.amax(dim=(1, 2), keepdim=True)
    plateau = (flat == top).sum(dim=(1, 2), keepdim=True) > 1
    skip = plateau & (flat == top)
    if allowed is not None:
        skip = skip | ~allowed.reshape(batch, channels, -1)
    masked = torch.where(skip, torch.full_like(flat, -torch.inf), flat)
    peaks, where = masked.max(dim=2)
    width = outputs.shape[3]
    units = []
    for b in range(batch):
        best = torch.topk(peaks[b], min(per_image, channels)).indices.tolist()
        units.extend(Unit(int(c), int(where[b, c]) // width, int(where[b, c]) % width, b) for c in best
                     if torch.isfinite(peaks[b, c]) and peaks[b, c] > 0)
    return units


def _shown(maps: np.ndarray, boxes: Sequence[tuple[int, int, int, int]]) -> list[np.ndarray]:
    """Each map as compared: |v| summed over colour, inside the unit's receptive-field box."""
    return [np.abs(m[top:bottom, left:right]).sum(axis=-1).ravel()
            for m, (top, left, bottom, right) in zip(maps, boxes)]


def projection_similarity(reference: list[np.ndarray], other: list[np.ndarray]) -> np.ndarray:
    """Spearman rank correlation of each pair of maps; NaN where either map is constant (no map)."""
    from scipy.stats import spearmanr

    values = np.full(len(reference), np.nan)
    for i, (a, b) in enumerate(zip(reference, other)):
        if a.size > 1 and np.ptp(a) > 0 and np.ptp(b) > 0:
            values[i] = float(spearmanr(a, b).statistic)
    return values


def edge_maps(pixels: Sequence[np.ndarray]) -> list[np.ndarray]:
    """An image-only saliency map of each photo ``(H, W, 3)`` uint8: a plain edge detector, the
    Sobel gradient magnitude of its gray values, as ``(H, W, 1)`` (shaped like a projection)."""
    from scipy import ndimage

    maps = []
    for image in pixels:
        gray = np.asarray(image, dtype=np.float64).mean(axis=-1)
        maps.append(np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1))[..., None])
    return maps


def on_other_photos(units: Sequence[Unit], photos: int) -> list[Unit]:
    """Each unit's channel and position on the next photo: its map there shares the unit's
    receptive-field footprint and nothing of its photo (the chance level of the comparison)."""
    return [Unit(u.channel, u.row, u.col, (u.image_index + 1) % photos) for u in units]


@dataclass
class TrustScores:
    """Spearman correlations of one method's maps, trained vs randomized, per unit, and two
    reference points measured on the same units.

    Attributes:
        rule: the method.
        layers: ``{layer name: (units,) correlations}`` with every weight the units depend on
            randomized; a layer missing from it has ``reasons[layer]`` instead.
        chance: ``{layer name: (units,)}`` the trained map against the randomized model's map of
            the same unit on another photo: what the two share without the photo (the receptive
            field's footprint).
        edge: ``{layer name: (units,)}`` the trained map against a plain edge detector's map of
            the photo (:func:`edge_maps`): how close an image-only map, with no model at all, comes.
        cascade: ``(steps, units)`` correlations at the cascade's deepest layer, one row per step
            (top block randomized first, then down to the stem); None when not measured.
        reasons: why the method was not measured at a layer (the rule does not hold there).
    """

    rule: Rule
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    chance: dict[str, np.ndarray] = field(default_factory=dict)
    edge: dict[str, np.ndarray] = field(default_factory=dict)
    cascade: np.ndarray | None = None
    reasons: dict[str, str] = field(default_factory=dict)


def project_maps(loaded: LoadedModel, x: torch.Tensor, layer: LayerInfo, units: list[Unit],
                 rule: Rule) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    """The maps of ``units`` under ``rule`` (strict: a rule that does not hold raises), as compared,
    and their receptive-field boxes."""
    proj = project_units(loaded, x, layer, units, method=rule, strict=True)
    return _shown(proj.maps, proj.boxes), list(proj.boxes)


def edges_shown(edges: Sequence[np.ndarray], units: Sequence[Unit],
                boxes: Sequence[tuple[int, int, int, int]]) -> list[np.ndarray]:
    """The edge map of each unit's photo (:func:`edge_maps`), cut and flattened as its projection is."""
    return _shown([edges[u.image_index] for u in units], boxes)
