"""The scan's state: per layer and channel, the k strongest examples over the images seen so far.

The ranking is a total order (value descending, then image id ascending), so folding batches in
any grouping and merging shards in any order give the same state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ...errors import ConvscopeError

__all__ = ["TopK", "EMPTY"]

EMPTY = torch.iinfo(torch.int64).max  # image id of an unused slot: sorts after every real id


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
