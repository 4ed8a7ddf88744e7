"""Dataset scan: the k strongest examples of every channel over a whole image set.

This is Zeiler & Fergus's figure 2: for each feature map, the 9 images (over a data set) in
which it fires hardest, each shown as the deconvnet projection of that one activation beside
the image patch it came from. Then one can say "layer 2 finds textures, layer 4 dog faces".

How it works:

1. **Scan.** Images stream from an :class:`~convscope.datasets.ImageSet` through DataLoader
   workers in batches; one batched forward pass per batch records the tracked layers and
   stops right after the deepest one. Each batch is folded into a :class:`TopK`, which keeps,
   per layer and channel, the k best ``(value, image, position)``, at most one per image
   (the image's maximum over the map). The fold is a few tensor ops over all channels at
   once; the state is ``layers x channels x k`` and does not grow with the data set.
2. **Checkpoint.** The state is written atomically every N batches (and when interrupted);
   ``resume=True`` continues from it and gives exactly the uninterrupted result.
3. **Render.** Only the top-k images of each channel are read again, in batches, and the
   deconvnet (:func:`convscope.methods.deconv.project_units`) projects each recorded unit back to
   pixels. The re-run's activation is checked against the recorded one (a mismatch means the
   preprocessing or the weights drifted). Each channel gets one figure: a 3x3 sheet of
   projections beside a 3x3 sheet of the matching receptive-field patches, both cropped to
   the same boxes, values in the corner.

The ranking is a total order: value descending, then image id ascending. So the result does
not depend on batch order or how a data set is split: :meth:`TopK.merge` is associative,
commutative and idempotent (overlapping shards count each image once), and shards scanned on
different machines (``start``/``stop``) merge to the single-machine result. Batch size enters
only through the floats: a forward pass in another batch shape may round the last bits
differently, which can swap two images whose values are that close.

Output folder (``write_scan``):

* ``scan.json``: the index (schema below).
* ``topk.npz``: the raw state, arrays ``{layer}/values``, ``{layer}/images``, ``{layer}/positions``.
* ``run.json``: the run's manifest, written last: every file above and below with its size and
  sha256. :func:`read_scan` reads a run only through it, so a run cut short by a crash (or two
  runs' files mixed in one folder) is refused rather than read half old, half new.
* ``scan_state.pt``: the checkpoint (``--resume``).
* ``{layer}/c{channel:04d}.png``: one figure per rendered channel (``{layer}`` is the alias
  when there is one, else the module name).

``scan.json`` schema (format ``convscope.scan/1``)::

    {
      "format": "convscope.scan/1",
      "model": {...},                   # LoadedModel.describe(): name, weights, title, preprocessing
      "source": {"kind": "folder" | "samples" | "tensor", "root": str, "count": int, "fingerprint": str},
      "image_size": [H, W],             # every image was resized to cover this and centre-cropped
      "top": 9,                         # k
      "images_scanned": int,            # images that were read and passed through the model
      "skipped": [{"id": int, "path": str, "reason": str}],   # unreadable, corrupt, empty, tiny files
      "method": "deconvnet" | "guided" | "gradient" | null,   # null when nothing was rendered
      "images": {"<id>": {"path": str}},                      # only the images that appear below;
                                        # path is relative to source.root (folder) or skimage:NAME[t:b,l:r]
      "layers": [{
        "name": str, "alias": str | null, "label": str, "type": str,
        "shape": [C, h, w],             # the scanned map's shape at image_size
        "stride": [sy, sx], "rf_size": [ry, rx],
        "dir": str,                     # folder of this layer's figures
        "units": [{                     # one per channel, channel order
          "channel": int,
          "figure": str | null,         # path relative to the output folder; null if not rendered
          "examples": [{                # strongest first; fewer than k if fewer images were scanned
            "rank": int, "image": int, "value": float,
            "row": int, "col": int,     # the unit in the (h, w) map
            "box": [top, left, bottom, right],   # receptive field in image_size pixels, clipped,
            "clipped": bool,                     # bottom/right exclusive; clipped at the border?
            "rerun_value": float | null          # the value when re-run for rendering
          }]
        }]
      }],
      "drift": {"units": int, "max_relative": float}   # re-run values off by more than 1 %
    }

Limits: one maximum per image per channel means an image with two strong separate spots
shows only the stronger. Ties (common where activations saturate, like ReLU6 at 6.0) go to
the lower image id, so which tied images appear depends on the data set's order.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from ... import render
from ..._io import atomic_path, save_json, save_npz, save_png
from ...capture import StopForward, frozen, recording
from ...datasets import ImageSet
from ...errors import ConvscopeError
from ...layers import Catalogue, LayerInfo
from ...models import LoadedModel, as_loaded, fingerprint
from ..deconv import Unit, project_units, render_projection_pair

__all__ = [
    "TopK", "Example", "ScanResult", "scan", "default_layers", "load_checkpoint", "write_scan",
    "render_channels", "channel_figure", "read_scan", "DEFAULT_TOP", "STATE_FILE", "INDEX_FILE", "MANIFEST_FILE",
]

DEFAULT_TOP = 9
STATE_FILE = "scan_state.pt"
INDEX_FILE = "scan.json"
ARRAYS_FILE = "topk.npz"
MANIFEST_FILE = "run.json"
RUN_FORMAT = "convscope.scan-run/1"
FORMAT = "convscope.scan/1"
STATE_FORMAT = "convscope.scan-state/1"
EMPTY = torch.iinfo(torch.int64).max  # image id of an unused slot: sorts after every real id
DRIFT_TOLERANCE = 0.01  # relative to the channel's top value


# --------------------------------------------------------------------------- top-k state


def _rank(values: torch.Tensor, images: torch.Tensor, positions: torch.Tensor, k: int,
          dedupe: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the first ``k`` of ``(C, N)`` candidates by value descending, then image id ascending.

    Two stable sorts (secondary key first) give the lexicographic order for every channel at
    once. With ``dedupe``, an image that appears more than once (merged from overlapping
    shards) keeps only its strongest entry, even if the copies' values differ in the last bits
    (the same image scanned in another batch shape).
    """
    if dedupe:
        order = torch.argsort(values, dim=1, descending=True, stable=True)
        values, images, positions = values.gather(1, order), images.gather(1, order), positions.gather(1, order)
        order = torch.argsort(images, dim=1, stable=True)      # grouped by image, strongest first in each group
        values, images, positions = values.gather(1, order), images.gather(1, order), positions.gather(1, order)
        repeat = torch.zeros_like(images, dtype=torch.bool)
        repeat[:, 1:] = (images[:, 1:] == images[:, :-1]) & (images[:, 1:] != EMPTY)
        values = values.masked_fill(repeat, -math.inf)
        images = images.masked_fill(repeat, EMPTY)
        positions = positions.masked_fill(repeat, -1)
        return _rank(values, images, positions, k)
    order = torch.argsort(images, dim=1, stable=True)
    values, images, positions = values.gather(1, order), images.gather(1, order), positions.gather(1, order)
    order = torch.argsort(values, dim=1, descending=True, stable=True)
    values, images, positions = values.gather(1, order), images.gather(1, order), positions.gather(1, order)
    return values[:, :k], images[:, :k], positions[:, :k]


def _ranges(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted disjoint ``[first, end)`` ranges covering ``ids``."""
    out: list[list[int]] = []
    for i in sorted(set(ids)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def _union(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for first, end in sorted([*a, *b]):
        if out and first <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([first, end])
    return [(x, y) for x, y in out]


def _count(ranges: Sequence[tuple[int, int]]) -> int:
    return sum(end - first for first, end in ranges)


class TopK:
    """Per layer and channel, the ``k`` strongest ``(value, image, position)``, one per image.

    Attributes, per layer name:
        values: ``(C, k)`` float32, strongest first; ``-inf`` in unused slots.
        images: ``(C, k)`` int64 image ids; :data:`EMPTY` in unused slots.
        positions: ``(C, k)`` int64 flat index ``row * w + col`` into the ``(h, w)`` map; -1 unused.
        map_sizes: ``(h, w)`` of the layer's map (known after the first batch).
        images_seen: how many distinct images were folded in.
        seen: the ids folded in, as sorted disjoint ``[first, end)`` ranges (a scan's ids are
            consecutive, so this stays a handful of pairs); ``None`` when unknown (a state built
            by hand from arrays).

    The order is total (value descending, then image id ascending), so :meth:`update` and
    :meth:`merge` give the same state whatever the batching or the order of shards; ids must
    be global (the same id is the same image in every shard). Shards may overlap (a retried
    shard): an image is counted and ranked once, so ``a.merge(a)`` equals ``a``. Memory is
    ``layers x channels x k x 20`` bytes plus the ranges of ids seen.

    Example:
        >>> state = TopK.empty(9, {"features.15": 256})
        >>> state.update({"features.15": acts}, torch.arange(32))     # acts (32, 256, 56, 56)
        >>> whole = shard_a.merge(shard_b)                             # e.g. from two Ray workers
    """

    def __init__(self, k: int, values: dict[str, torch.Tensor], images: dict[str, torch.Tensor],
                 positions: dict[str, torch.Tensor], map_sizes: dict[str, tuple[int, int] | None],
                 images_seen: int = 0, seen: Sequence[tuple[int, int]] | None = None):
        self.k = int(k)
        self.values, self.images, self.positions = values, images, positions
        self.map_sizes = map_sizes
        self.seen = None if seen is None else [(int(a), int(b)) for a, b in seen]
        self.images_seen = int(images_seen) if self.seen is None else _count(self.seen)

    @classmethod
    def empty(cls, k: int, channels: dict[str, int], device: str | torch.device = "cpu") -> TopK:
        """A state with no image yet: ``channels`` maps each layer name to its channel count."""
        if k < 1:
            raise ConvscopeError(f"--top must be at least 1, got {k}")
        return cls(
            k,
            {n: torch.full((c, k), -math.inf, device=device) for n, c in channels.items()},
            {n: torch.full((c, k), EMPTY, dtype=torch.int64, device=device) for n, c in channels.items()},
            {n: torch.full((c, k), -1, dtype=torch.int64, device=device) for n, c in channels.items()},
            {n: None for n in channels},
            seen=[],
        )

    @property
    def layers(self) -> list[str]:
        return list(self.values)

    def copy(self) -> TopK:
        """A snapshot; :meth:`update` replaces tensors rather than writing into them, so this is cheap."""
        return TopK(self.k, dict(self.values), dict(self.images), dict(self.positions),
                    dict(self.map_sizes), self.images_seen, self.seen)

    def update(self, maps: dict[str, torch.Tensor], image_ids: torch.Tensor) -> None:
        """Fold one batch in: ``maps[name]`` is ``(B, C, h, w)``, ``image_ids`` ``(B,)`` int64.

        Each image contributes its maximum over the map per channel (the first position in
        row-major order on ties). The new tensors are committed together after all layers are
        computed, so an interrupted update leaves the previous state whole.
        """
        ids = image_ids.to(dtype=torch.int64)
        new_values, new_images, new_positions, sizes = {}, {}, {}, dict(self.map_sizes)
        for name in self.values:
            acts = maps[name]
            if acts.dim() != 4:
                raise ConvscopeError(f"layer {name} gave shape {tuple(acts.shape)}; a scan needs (B, C, h, w) maps")
            batch, channels = acts.shape[:2]
            if channels != self.values[name].shape[0] or batch != ids.numel():
                raise ConvscopeError(f"layer {name}: got {batch} images x {channels} channels for "
                                     f"{ids.numel()} ids and {self.values[name].shape[0]} channels")
            size = (int(acts.shape[2]), int(acts.shape[3]))
            if sizes[name] not in (None, size):
                raise ConvscopeError(f"layer {name}: map size changed from {sizes[name]} to {size} between batches")
            sizes[name] = size
            peak, where = acts.flatten(2).max(dim=2)                    # (B, C) each
            peak = peak.float().t()
            peak = torch.where(torch.isnan(peak), -math.inf, peak)    # a NaN never ranks
            candidates = ids.to(peak.device).view(1, -1).expand(channels, -1)
            new_values[name], new_images[name], new_positions[name] = _rank(
                torch.cat([self.values[name], peak], dim=1),
                torch.cat([self.images[name], candidates], dim=1),
                torch.cat([self.positions[name], where.t()], dim=1),
                self.k,
            )
        self.values, self.images, self.positions, self.map_sizes = new_values, new_images, new_positions, sizes
        if self.seen is None:
            self.images_seen += int(ids.numel())
        else:
            self.seen = _union(self.seen, _ranges(ids.cpu().tolist()))
            self.images_seen = _count(self.seen)

    def merge(self, other: TopK) -> TopK:
        """The state of the union of two image sets (associative, commutative and idempotent).

        An image in both (overlapping or retried shards) is ranked once, with its stronger
        entry, and counted once in ``images_seen``. A state without its ranges of ids
        (``seen is None``) cannot tell overlap apart: merging it refuses when the two
        states' examples share an image, and otherwise adds the counts.
        """
        if self.k != other.k or self.layers != other.layers:
            raise ConvscopeError(f"cannot merge scans with different k or layers: k {self.k} vs {other.k}, "
                                 f"layers {self.layers} vs {other.layers}")
        values, images, positions, sizes = {}, {}, {}, {}
        for name in self.layers:
            if self.values[name].shape[0] != other.values[name].shape[0]:
                raise ConvscopeError(f"cannot merge: layer {name} has {self.values[name].shape[0]} vs "
                                     f"{other.values[name].shape[0]} channels")
            mine, theirs = self.map_sizes[name], other.map_sizes[name]
            if mine is not None and theirs is not None and tuple(mine) != tuple(theirs):
                raise ConvscopeError(f"cannot merge: layer {name} was scanned at map sizes {mine} and {theirs}")
            sizes[name] = mine if mine is not None else theirs
            device = self.values[name].device
            values[name], images[name], positions[name] = _rank(
                torch.cat([self.values[name], other.values[name].to(device)], dim=1),
                torch.cat([self.images[name], other.images[name].to(device)], dim=1),
                torch.cat([self.positions[name], other.positions[name].to(device)], dim=1),
                self.k, dedupe=True,
            )
        if self.seen is not None and other.seen is not None:
            return TopK(self.k, values, images, positions, sizes, seen=_union(self.seen, other.seen))
        shared = set()
        for name in self.layers:
            mine, theirs = self.images[name].unique().tolist(), other.images[name].unique().tolist()
            shared |= (set(mine) & set(theirs)) - {EMPTY}
        if shared:
            raise ConvscopeError(f"cannot merge: both scans hold image {min(shared)} but one of them does not record "
                                 "which ids it covered, so images_seen would count it twice. Merge scans "
                                 "made by convscope.scan (they record their ids).")
        return TopK(self.k, values, images, positions, sizes, self.images_seen + other.images_seen)

    def to(self, device: str | torch.device) -> TopK:
        move = lambda d: {n: t.to(device) for n, t in d.items()}  # noqa: E731
        return TopK(self.k, move(self.values), move(self.images), move(self.positions),
                    dict(self.map_sizes), self.images_seen, self.seen)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (independent of the number of images)."""
        return sum(t.numel() * t.element_size()
                   for d in (self.values, self.images, self.positions) for t in d.values())

    def equal(self, other: TopK) -> bool:
        """Exactly the same state (values bit for bit)."""
        return (self.k == other.k and self.layers == other.layers and self.images_seen == other.images_seen
                and (self.seen is None or other.seen is None or self.seen == other.seen)
                and all(torch.equal(a[n].cpu(), b[n].cpu()) for n in self.layers
                        for a, b in ((self.values, other.values), (self.images, other.images),
                                     (self.positions, other.positions))))

    def state_dict(self) -> dict:
        return {"k": self.k, "images_seen": self.images_seen,
                "seen": None if self.seen is None else torch.tensor(self.seen, dtype=torch.int64).view(-1, 2),
                "layers": {
            n: {"values": self.values[n].cpu(), "images": self.images[n].cpu(),
                "positions": self.positions[n].cpu(),
                "map_size": list(self.map_sizes[n]) if self.map_sizes[n] else None}
            for n in self.layers}}

    @classmethod
    def from_state_dict(cls, state: dict, device: str | torch.device = "cpu") -> TopK:
        layers = state["layers"]
        return cls(state["k"], {n: v["values"].to(device) for n, v in layers.items()},
                   {n: v["images"].to(device) for n, v in layers.items()},
                   {n: v["positions"].to(device) for n, v in layers.items()},
                   {n: tuple(v["map_size"]) if v["map_size"] else None for n, v in layers.items()},
                   state["images_seen"], None if state.get("seen") is None else state["seen"].tolist())

    def arrays(self) -> dict[str, np.ndarray]:
        """``{layer}/values``, ``{layer}/images`` (-1 for unused), ``{layer}/positions`` as numpy arrays."""
        out = {}
        for n in self.layers:
            out[f"{n}/values"] = self.values[n].cpu().numpy()
            images = self.images[n].cpu()
            out[f"{n}/images"] = torch.where(images == EMPTY, -1, images).numpy()
            out[f"{n}/positions"] = self.positions[n].cpu().numpy()
        return out


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class Example:
    """One of a channel's top examples: where in which image, and how strong."""

    rank: int
    image: int
    path: str
    value: float
    row: int
    col: int
    box: tuple[int, int, int, int]
    clipped: bool


@dataclass
class ScanResult:
    """What a scan found: the model, the tracked layers, the top-k state and the image set.

    Example:
        >>> result = scan(model, SampleImages(), "block3_conv3")
        >>> [e.path for e in result.examples("block3_conv3", 7)]
    """

    model: LoadedModel
    layers: list[LayerInfo]
    topk: TopK
    images: ImageSet
    skipped: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    rate: float = 0.0

    def layer(self, name: str | LayerInfo) -> LayerInfo:
        if isinstance(name, LayerInfo):
            name = name.name
        for layer in self.layers:
            if name in (layer.name, layer.alias):
                return layer
        raise ConvscopeError(f"layer {name!r} was not scanned; scanned: {[layer.label for layer in self.layers]}")

    def examples(self, layer: str | LayerInfo, channel: int) -> list[Example]:
        """The channel's top examples, strongest first (fewer than k when fewer images were scanned)."""
        layer = self.layer(layer)
        values = self.topk.values[layer.name][channel].tolist()
        images = self.topk.images[layer.name][channel].tolist()
        positions = self.topk.positions[layer.name][channel].tolist()
        _, width = self.topk.map_sizes[layer.name] or (1, 1)
        image_hw = self.images.size
        out = []
        for rank, (value, image, position) in enumerate(zip(values, images, positions)):
            if image == EMPTY:
                break
            row, col = divmod(position, width)
            out.append(Example(rank, image, self.images.path(image), value, row, col,
                               layer.box(row, col, image_hw), layer.box_clipped(row, col, image_hw)))
        return out

    @property
    def images_scanned(self) -> int:
        return self.topk.images_seen

    def figure(self, layer: str | LayerInfo, channel: int, *, method: str = "deconvnet") -> Image.Image:
        """One channel's figure: its top examples' projections beside their image patches.

        Example:
            >>> result.figure("blocks.3.2.bn3", 5)       # shows inline in Jupyter
        """
        figures: list[Image.Image] = []
        render_channels(self, layer, [channel], method=method, progress=False,
                        on_figure=lambda _c, figure, _e, _v: figures.append(figure))
        return figures[0]


def default_layers(catalogue: Catalogue) -> list[LayerInfo]:
    """At stride 4, 8 and 16, the last of the narrowest feature layers.

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




def load_checkpoint(path: str | Path) -> dict:
    """Read a scan checkpoint (tensors only; no code is unpickled)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConvscopeError(f"cannot read the scan checkpoint {path}: {err}. Delete it and start afresh "
                             "(without --resume).") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConvscopeError(f"{path} is not a convscope scan checkpoint")
    return state


def _save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def scan(
    model: LoadedModel | torch.nn.Module,
    images: ImageSet,
    layers: str | Sequence[str | LayerInfo] | None = None,
    *,
    top: int = DEFAULT_TOP,
    batch_size: int = 32,
    workers: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    start: int = 0,
    stop: int | None = None,
    progress: bool = True,
    meta: dict | None = None,
) -> ScanResult:
    """Find the ``top`` strongest examples of every channel of ``layers`` over ``images``.

    Args:
        model: a :class:`LoadedModel` (or an ``nn.Module`` with ImageNet preprocessing); left untouched.
        images: an :class:`~convscope.datasets.ImageSet` (folder, sample set, tensors).
        layers: names, aliases or patterns (see :meth:`Catalogue.resolve`); default
            :func:`default_layers`. The forward pass stops after the deepest one.
        top: k, the examples kept per channel (one per image).
        batch_size, workers: the DataLoader's batch size and number of reader processes.
        checkpoint: file for the state, written atomically every ``checkpoint_every`` batches,
            when interrupted (Ctrl-C or an error) and at the end.
        resume: continue from ``checkpoint``; the model, layers, k and image set must match.
            The checkpoint's batch size is used, so the result is bit-identical to an
            uninterrupted scan.
        start, stop: scan only items ``start..stop`` (ids stay global): a shard whose
            :class:`TopK` merges with the others'.
        meta: JSON-ready notes kept in the checkpoint (the CLI keeps its options there).

    Returns:
        a :class:`ScanResult`.

    Example:
        >>> from convscope.datasets import FolderImages
        >>> model = load_model("vgg16")
        >>> images = FolderImages("~/data/val", model.preprocessing.input_size)
        >>> result = scan(model, images, "block3_conv3,block4_conv3,block5_conv3", checkpoint="runs/s/scan_state.pt")
    """
    loaded = as_loaded(model)
    module, pre = loaded.module, loaded.preprocessing
    catalogue = loaded.catalogue_at(images.size)
    chosen = default_layers(catalogue) if layers is None else catalogue.resolve(layers)
    if not chosen:
        raise ConvscopeError("no layer to scan; name some with --layers (`convscope layers` lists them)")
    flat = [layer for layer in chosen if not layer.is_spatial]
    if flat:
        raise ConvscopeError(f"layer {flat[0].label} has shape {flat[0].shape}; a scan needs feature maps (C, H, W)")
    names = [layer.name for layer in chosen]
    if batch_size < 1 or checkpoint_every < 1:
        raise ConvscopeError("--batch-size and --checkpoint-every must be at least 1")
    stop = len(images) if stop is None else min(int(stop), len(images))
    if not 0 <= start <= stop:
        raise ConvscopeError(f"bad range {start}..{stop} for {len(images)} images")

    device = loaded.device
    source = images.describe()
    identity = {"model": fingerprint(module), "model_title": loaded.title, "layers": names,
                "top": int(top), "source": source, "image_size": list(images.size), "start": int(start),
                "stop": int(stop), "preprocessing": _preprocessing_identity(pre)}
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    topk = TopK.empty(top, {layer.name: layer.channels for layer in chosen}, device)
    skipped: list[tuple[int, str]] = []
    cursor = start
    if resume and checkpoint is not None and checkpoint.exists():
        saved = load_checkpoint(checkpoint)
        _check_same(saved, identity, checkpoint)
        topk = TopK.from_state_dict(saved["topk"], device)
        skipped = [(int(i), str(r)) for i, r in saved["skipped"]]
        cursor = int(saved["next"])
        batch_size = int(saved["batch_size"])  # same batch boundaries: bit-identical results
    elif resume and checkpoint is not None:
        warnings.warn(f"no checkpoint at {checkpoint}; starting a new scan", stacklevel=2)

    def payload(state: TopK, next_index: int, n_skipped: int) -> dict:
        return {"format": STATE_FORMAT, **identity, "meta": meta or {}, "next": next_index, "stop": stop,
                "batch_size": batch_size,
                "skipped": [[i, r] for i, r in skipped[:n_skipped]], "topk": state.state_dict()}

    loader = images.loader(batch_size, workers, cursor, stop, pin_memory=device.type == "cuda")
    done = (topk.copy(), cursor, len(skipped))  # the last consistent state, replaced in one assignment
    bar = tqdm(total=stop - start, initial=cursor - start, unit="img", desc="scan", disable=not progress,
               dynamic_ncols=True, smoothing=0.05)
    began, scanned = time.perf_counter(), 0
    try:
        with frozen(module), torch.no_grad():
            copy = _modified_in_place(module, names, images.size, device)
            with recording(module, names, clone=copy, stop_after_last=True) as store:
                for batch, (pixels, ids, bad) in enumerate(loader, start=1):
                    skipped.extend((int(i), reason) for i, reason in bad)
                    if len(ids):
                        x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
                        with contextlib.suppress(StopForward):
                            module(pre.normalize(x))
                        missing = [n for n in names if n not in store]
                        if missing:
                            raise ConvscopeError(f"layers {missing} did not run in the forward pass")
                        if not copy and store.modified():
                            raise ConvscopeError(f"layers {store.modified()} were changed in place during the "
                                                 "forward pass although the first one left them alone")
                        topk.update({n: store[n] for n in names}, ids)
                    cursor += len(ids) + len(bad)
                    scanned += len(ids)
                    done = (topk.copy(), cursor, len(skipped))
                    bar.update(len(ids) + len(bad))
                    if bad:
                        bar.set_postfix(skipped=len(skipped), refresh=False)
                    if checkpoint is not None and batch % checkpoint_every == 0:
                        _save_checkpoint(checkpoint, payload(*done))
    except BaseException as error:
        if checkpoint is not None:
            try:
                _save_checkpoint(checkpoint, payload(*done))
            except Exception as save_error:     # the scan's own error stays the one raised
                note = (f"convscope: the checkpoint {checkpoint} could not be saved after this error "
                        f"({type(save_error).__name__}: {save_error}); the last periodic checkpoint, if any, "
                        "is what --resume will continue from")
                if hasattr(error, "add_note"):
                    error.add_note(note)
                warnings.warn(note, stacklevel=2)
        raise
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    if checkpoint is not None:
        _save_checkpoint(checkpoint, payload(*done))
    return ScanResult(loaded, chosen, topk, images, skipped, seconds, scanned / seconds if seconds > 0 else 0.0)


def _modified_in_place(module: torch.nn.Module, names: list[str], size: tuple[int, int],
                       device: torch.device) -> bool:
    """Does an in-place op later in the network change a recorded output (``out += identity``)?

    One forward of a blank image tells: only then must the scan copy the maps it records
    (a copy costs about as much as a conv layer); otherwise it reads them where they are.
    """
    with recording(module, names, clone=False, stop_after_last=True) as probe:
        with contextlib.suppress(StopForward):
            module(torch.zeros(1, 3, *size, device=device))
        return bool(probe.modified())


def _preprocessing_identity(pre) -> list:
    """What the scan does to pixels besides the size: resampling filter and normalisation."""
    return [pre.interpolation, [float(m) for m in pre.mean], [float(s) for s in pre.std]]


def _check_same(saved: dict, identity: dict, path: Path) -> None:
    what = {"model": "model weights", "preprocessing": "preprocessing (mean, std, interpolation)",
            "layers": "layers", "top": "--top", "source": "image set", "image_size": "image size",
            "start": "start", "stop": "end of the range (--limit)"}
    for key, label in what.items():
        mine, theirs = identity[key], saved.get(key)
        if key == "source":
            mine, theirs = mine.get("fingerprint"), (theirs or {}).get("fingerprint")
        if mine != theirs:
            hint = (" (a random init differs on every load unless seeded)" if key == "model" else
                    " (files were added, removed or changed)" if key == "source" else "")
            raise ConvscopeError(f"cannot resume from {path}: the {label} differ from the checkpoint's{hint}. "
                                 "Run with the same settings, or without --resume to start afresh.")


# --------------------------------------------------------------------------- rendering


def _tile_frame(layer: LayerInfo, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Tile frame in image pixels: the receptive field, at most the image."""
    rf_h, rf_w = (math.ceil(v) for v in (layer.rf_size or image_hw))
    return min(rf_h, image_hw[0]), min(rf_w, image_hw[1])


def _place(crop: Image.Image, example: Example, layer: LayerInfo, frame: tuple[int, int], scale: float) -> np.ndarray:
    """``crop`` (the clipped box) on a white tile that stands for the whole receptive field."""
    frame_h, frame_w = frame
    tile = Image.new("RGB", (max(1, round(frame_w * scale)), max(1, round(frame_h * scale))), render.BACKGROUND)
    top, left, bottom, right = example.box
    full_top, full_left, _, _ = layer.box(example.row, example.col)
    off_y = min(max(top - full_top, 0), frame_h - (bottom - top))
    off_x = min(max(left - full_left, 0), frame_w - (right - left))
    size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR if scale >= 1 else Image.LANCZOS
    tile.paste(crop.convert("RGB").resize(size, resample), (round(off_x * scale), round(off_y * scale)))
    return np.asarray(tile)


def _corner_label(tile: np.ndarray, text: str) -> np.ndarray:
    image = Image.fromarray(tile)
    draw = ImageDraw.Draw(image)
    font = render.font(11)
    left, top, right, bottom = draw.textbbox((2, 1), text, font=font)
    draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def channel_figure(
    layer: LayerInfo,
    channel: int,
    examples: Sequence[Example],
    pairs: Sequence[tuple[Image.Image, Image.Image]],
    *,
    image_hw: tuple[int, int],
    method: str = "deconvnet",
    images_scanned: int | None = None,
    model_title: str = "",
    tile_px: int | None = None,
) -> Image.Image:
    """The Zeiler & Fergus figure for one channel: projections (left) beside patches (right).

    Args:
        examples: the channel's top examples, strongest first.
        pairs: ``(projection, patch)`` PIL crops of each example's clipped box, as made by
            :func:`convscope.methods.deconv.render_projection_pair`.
        tile_px: tile side in pixels (default: the receptive field, between 64 and 128).

    Each tile stands for the unit's whole receptive field (at most the image): a box clipped
    at the image border sits where it belongs and the rest stays white. Values go in the
    top-left corner of each patch.
    """
    frame = _tile_frame(layer, image_hw)
    side = tile_px or min(128, max(64, max(frame)))
    scale = side / max(frame)
    cols = max(1, math.ceil(math.sqrt(max(len(examples), 1))))
    proj_tiles, patch_tiles = [], []
    for example, (proj, patch) in zip(examples, pairs):
        proj_tiles.append(_place(proj, example, layer, frame, scale))
        patch_tiles.append(_corner_label(_place(patch, example, layer, frame, scale), f"{example.value:.3g}"))
    if not proj_tiles:
        blank = np.full((side, side, 3), 255, np.uint8)
        proj_tiles, patch_tiles = [blank], [blank]
    left = Image.fromarray(render.tile(np.stack(proj_tiles), cols, sep=2))
    right = Image.fromarray(render.tile(np.stack(patch_tiles), cols, sep=2))
    sheets = render.stack_horizontal([left, right], gap=10)
    rf = "x".join(str(math.ceil(v)) for v in (layer.rf_size or image_hw))
    seen = f" of {images_scanned} images" if images_scanned is not None else ""
    lines = [f"{layer.label}  channel {channel}", f"top {len(examples)}{seen}; {model_title}",
             f"left: {method} projections (gray = 0, each stretched to its own max |v|)",
             f"right: image patches, receptive field {rf} px (white: outside the image)"]
    # The default PIL font has no em dash or multiplication sign.
    lines = [line.replace("\u2014", "-").replace("\u00d7", "x") for line in lines]
    font = render.font(12)
    width = max(sheets.width, max(int(font.getlength(line)) + 10 for line in lines))
    return render.stack_vertical([render.title_strip(width, lines, size=12), sheets])


def render_channels(
    result: ScanResult,
    layer: str | LayerInfo,
    channels: Iterable[int] | None = None,
    *,
    method: str = "deconvnet",
    batch_size: int | None = None,
    units_per_chunk: int = 144,
    on_figure: Callable[[int, Image.Image, list[Example], list[float]], None] | None = None,
    progress: bool = True,
) -> dict[int, list[float]]:
    """Project every top example of ``channels`` with the deconvnet and draw each channel's figure.

    Only the top-k images are read again, a chunk of channels at a time (about
    ``units_per_chunk`` units per :func:`convscope.methods.deconv.project_units` call, which batches
    internally). ``on_figure(channel, figure, examples, rerun_values)`` receives each figure.
    A re-run value more than 1 % (of the channel's top value) off the recorded one raises a
    warning: the preprocessing or the weights changed since the scan.

    Returns:
        ``channel -> re-run values`` (in example order).
    """
    layer = result.layer(layer)
    model, pre = result.model, result.model.preprocessing
    channels = list(range(layer.channels)) if channels is None else list(channels)
    per_chunk = max(1, units_per_chunk // result.topk.k)
    rerun: dict[int, list[float]] = {}
    drifted, worst = 0, 0.0
    bar = tqdm(total=len(channels), unit="ch", desc=f"render {layer.alias or layer.name}", disable=not progress,
               leave=False, dynamic_ncols=True)
    try:
        for first in range(0, len(channels), per_chunk):
            chunk = channels[first:first + per_chunk]
            examples = {c: result.examples(layer, c) for c in chunk}
            ids = sorted({e.image for c in chunk for e in examples[c]})
            photos = {}
            for i in ids:
                try:
                    photos[i] = result.images.load(i)
                except ConvscopeError as err:
                    warnings.warn(f"image {result.images.path(i)} can no longer be read ({err}); "
                                  "its examples are left out of the figures", stacklevel=2)
            for c in chunk:
                examples[c] = [e for e in examples[c] if e.image in photos]
            slot = {i: j for j, i in enumerate(sorted(photos))}
            units = [Unit(channel=c, row=e.row, col=e.col, image_index=slot[e.image])
                     for c in chunk for e in examples[c]]
            if units:
                x = pre.to_tensor([photos[i] for i in sorted(photos)], model.device)
                proj = project_units(model, x, layer, units, method=method, batch_size=batch_size)
            at = 0
            for c in chunk:
                mine = examples[c]
                values = [float(v) for v in proj.values[at:at + len(mine)]] if mine else []
                pairs = [render_projection_pair(proj.maps[at + j], photos[e.image], e.box) for j, e in enumerate(mine)]
                at += len(mine)
                if mine:
                    scale = max(abs(mine[0].value), 1e-6)
                    off = [abs(v - e.value) / scale for v, e in zip(values, mine)]
                    drifted += sum(o > DRIFT_TOLERANCE for o in off)
                    worst = max(worst, *off)
                rerun[c] = values
                if on_figure is not None:
                    figure = channel_figure(layer, c, mine, pairs, image_hw=result.images.size, method=method,
                                            images_scanned=result.images_scanned, model_title=model.title)
                    on_figure(c, figure, mine, values)
                bar.update(1)
    finally:
        bar.close()
    if drifted:
        warnings.warn(f"{layer.label}: {drifted} re-run activations differ from the scan by more than "
                      f"{DRIFT_TOLERANCE:.0%} (worst {worst:.1%}); did the preprocessing or the weights change?",
                      stacklevel=2)
    return rerun


def _layer_dir(layer: LayerInfo) -> str:
    return (layer.alias or layer.name).replace("/", "_").replace("@", "_call")


def write_scan(
    result: ScanResult,
    out: str | Path,
    *,
    channels: Sequence[int] | dict[str, Sequence[int]] | None = None,
    method: str | None = "deconvnet",
    batch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the figures, ``topk.npz``, the ``scan.json`` index (schema in the module docstring), then ``run.json``.

    Any earlier manifest is removed first and the new one is written after every other file,
    so until this returns the folder reads as an incomplete run (see :func:`read_scan`).

    Args:
        channels: channels to render: one list for every layer (channels beyond a layer's
            count are ignored) or ``{layer name: list}``; default all.
        method: ``"deconvnet"`` (Zeiler & Fergus), ``"guided"`` or ``"gradient"``; ``None``
            writes the index and arrays without figures.
        batch_size: passed to :func:`convscope.methods.deconv.project_units` (default: its own budget).

    Returns:
        the index dict.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    save_npz(out / ARRAYS_FILE, **result.topk.arrays())
    written = [ARRAYS_FILE]
    referenced: set[int] = set()
    index_layers = []
    drift_units, drift_max = 0, 0.0
    for layer in result.layers:
        folder = _layer_dir(layer)
        if isinstance(channels, dict):
            wanted = channels.get(layer.name, channels.get(layer.alias or "", None))
        else:
            wanted = channels
        wanted = list(range(layer.channels)) if wanted is None else [c for c in wanted if 0 <= c < layer.channels]
        figures: dict[int, str] = {}
        rerun: dict[int, list[float]] = {}
        if method is not None and wanted:
            def keep(channel, figure, _examples, _values, folder=folder, figures=figures):
                rel = f"{folder}/c{channel:04d}.png"
                save_png(figure, out / rel)
                figures[channel] = rel
                written.append(rel)
            rerun = render_channels(result, layer, wanted, method=method, batch_size=batch_size,
                                    on_figure=keep, progress=progress)
        units = []
        for c in range(layer.channels):
            examples = result.examples(layer, c)
            values = rerun.get(c, [])
            entries = []
            for j, e in enumerate(examples):
                referenced.add(e.image)
                rerun_value = values[j] if j < len(values) else None
                if rerun_value is not None:
                    off = abs(rerun_value - e.value) / max(abs(examples[0].value), 1e-6)
                    drift_units += off > DRIFT_TOLERANCE
                    drift_max = max(drift_max, off)
                entries.append({"rank": e.rank, "image": e.image, "value": e.value, "row": e.row, "col": e.col,
                                "box": list(e.box), "clipped": e.clipped, "rerun_value": rerun_value})
            units.append({"channel": c, "figure": figures.get(c), "examples": entries})
        map_size = result.topk.map_sizes[layer.name]
        index_layers.append({
            "name": layer.name, "alias": layer.alias, "label": layer.label, "type": layer.type,
            "shape": [layer.channels, *(map_size or layer.shape[1:])], "stride": layer.stride,
            "rf_size": layer.rf_size, "dir": folder, "units": units,
        })
    index = {
        "format": FORMAT,
        "model": result.model.describe(),
        "source": result.images.describe(),
        "image_size": list(result.images.size),
        "top": result.topk.k,
        "images_scanned": result.images_scanned,
        "skipped": [{"id": i, "path": result.images.path(i), "reason": r} for i, r in result.skipped],
        "method": method,
        "images": {str(i): {"path": result.images.path(i)} for i in sorted(referenced)},
        "layers": index_layers,
        "drift": {"units": int(drift_units), "max_relative": float(drift_max)},
        "arrays": ARRAYS_FILE,
    }
    save_json(index, out / INDEX_FILE)
    written.append(INDEX_FILE)
    save_json({"format": RUN_FORMAT, "files": {rel: _file_entry(out / rel) for rel in written}}, out / MANIFEST_FILE)
    return index


def _file_entry(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def read_scan(out: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The ``scan.json`` index and the ``topk.npz`` arrays of a run :func:`write_scan` finished.

    Goes through ``run.json``: every file it lists must be there with the listed size and
    sha256, else the run is refused with a :class:`ConvscopeError`.
    """
    out = Path(out)
    rerun = f"write it again with `convscope scan ... --out {out}` (add --resume to reuse its checkpoint)"
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise ConvscopeError(f"{out} holds no complete scan run (no {MANIFEST_FILE}): it was interrupted or is "
                             f"still being written; {rerun}") from None
    except (OSError, ValueError) as err:
        raise ConvscopeError(f"cannot read {out / MANIFEST_FILE}: {err}; {rerun}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT or \
            not isinstance(manifest.get("files"), dict):
        raise ConvscopeError(f"{out / MANIFEST_FILE} is not a convscope scan manifest ({RUN_FORMAT}); {rerun}")
    files = manifest["files"]
    for rel in (INDEX_FILE, ARRAYS_FILE):
        if rel not in files:
            raise ConvscopeError(f"{out / MANIFEST_FILE} does not list {rel}; {rerun}")
    data = {}
    for rel, want in files.items():
        try:
            # the index and arrays are checked in the very bytes that are then parsed
            blob = (out / rel).read_bytes()
        except FileNotFoundError:
            raise ConvscopeError(f"incomplete scan run in {out}: {rel} is missing; {rerun}") from None
        if want != {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}:
            raise ConvscopeError(f"inconsistent scan run in {out}: {rel} changed after the run was written "
                                 f"(size or sha256 differ from {MANIFEST_FILE}); {rerun}")
        if rel in (INDEX_FILE, ARRAYS_FILE):
            data[rel] = blob
    index = json.loads(data[INDEX_FILE])
    with np.load(io.BytesIO(data[ARRAYS_FILE]), allow_pickle=False) as arrays:
        return index, {name: arrays[name] for name in arrays.files}
