"""Objectives for feature visualization: small callables that add and scale.

An :class:`Objective` maps the activations of one forward pass to **one value per batch
element**, shape ``(B,)``. The optimizer maximizes their sum, so element ``i`` is pushed
only by its own value: as long as each value reads only its own image (true for every
objective here except :func:`diversity`, which is meant to couple images), a batch of
channels optimizes exactly like the channels one at a time.

Objectives compose: ``channel("blocks.3.1.bn1", 7) + 0.5 * channel("blocks.3.1.bn1", 9)``,
``-objective``, ``objective - 1e-3 * total_variation()``, and ``a * b`` (element-wise product).

A new objective is one short function that reads ``acts[layer]`` and returns ``(B,)``::

    def channel_max(layer, n):
        "The strongest unit of channel n."
        return Objective(lambda acts: pick(acts[layer], n).amax((-2, -1)), [layer], f"channel_max({n})")

``acts`` holds every layer an objective names, plus ``acts[INPUT]`` (the image in [0, 1]
before the transforms, for penalties) and ``acts[LOGITS]`` (the model's output).
Where an argument such as the channel ``n`` is a sequence, element ``i`` uses ``n[i]``;
that is how one batch holds one channel per element.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ...errors import ConvscopeError

__all__ = [
    "Objective", "INPUT", "LOGITS", "pick", "channel", "neuron", "layer", "class_logit",
    "total_variation", "l2", "diversity", "parse_objective",
]

INPUT = "input"
LOGITS = "logits"

Acts = Mapping[str, torch.Tensor]
Units = int | Sequence[int] | torch.Tensor


class Objective:
    """A differentiable score per batch element.

    Args:
        fn: ``acts -> (B,)`` tensor.
        layers: the names ``fn`` reads from ``acts`` (layer names or aliases, or :data:`LOGITS`);
            the forward pass stops right after the deepest of them.
        name: a readable description, kept in records.
    """

    def __init__(self, fn: Callable[[Acts], torch.Tensor], layers: Sequence[str] = (), name: str = "objective"):
        self.fn = fn
        self.layers = tuple(dict.fromkeys(str(name_) for name_ in layers))
        self.name = name

    def __call__(self, acts: Acts) -> torch.Tensor:
        value = self.fn(acts)
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            raise ConvscopeError(f"objective {self.name} must return one value per batch element, shape (B,); "
                                 f"got {getattr(value, 'shape', type(value).__name__)}")
        return value

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    # -- algebra: objectives and plain numbers -------------------------------------------------

    def _combine(self, other, op: Callable, symbol: str) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda acts: op(self(acts), other(acts)), self.layers + other.layers,
                             f"({self.name} {symbol} {other.name})")
        if isinstance(other, int | float):
            return Objective(lambda acts: op(self(acts), other), self.layers, f"({self.name} {symbol} {other:g})")
        return NotImplemented

    def __add__(self, other):
        return self._combine(other, torch.add, "+")

    def __radd__(self, other):
        return self if isinstance(other, int | float) and other == 0 else self._combine(other, torch.add, "+")

    def __sub__(self, other):
        return self._combine(other, torch.sub, "-")

    def __rsub__(self, other):
        return (-self)._combine(other, torch.add, "+")

    def __neg__(self) -> Objective:
        return Objective(lambda acts: -self(acts), self.layers, f"-{self.name}")

    def __mul__(self, other):
        return self._combine(other, torch.mul, "*")

    def __rmul__(self, other):
        if isinstance(other, int | float):
            return Objective(lambda acts: other * self(acts), self.layers, f"{other:g} * {self.name}")
        return NotImplemented

    def __truediv__(self, other):
        if isinstance(other, int | float):
            return self * (1.0 / other)
        return NotImplemented


def pick(t: torch.Tensor, n: Units) -> torch.Tensor:
    """Channel ``n`` of ``t (B, C, ...)``: one index for all elements, or one per element.

    Shape:
        t: ``(B, C, *rest)``; returns ``(B, *rest)``.
    """
    if isinstance(n, int):
        return t[:, n]
    index = torch.as_tensor(n, device=t.device, dtype=torch.long).reshape(-1)
    if index.numel() != t.shape[0]:
        raise ConvscopeError(f"{index.numel()} channel indices for a batch of {t.shape[0]}: give one per element")
    return t[torch.arange(t.shape[0], device=t.device), index]


def _spatial(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dim() != 4:
        raise ConvscopeError(f"{what} needs a spatial layer (B, C, H, W); this layer gives shape {tuple(t.shape)}")
    return t


def channel(layer: str, n: Units) -> Objective:
    """The mean of channel ``n`` over all positions (the default objective)."""
    return Objective(lambda acts: pick(acts[layer], n).flatten(1).mean(1), [layer], f"channel({layer}, {_fmt(n)})")


def neuron(layer: str, n: Units, x: int | None = None, y: int | None = None) -> Objective:
    """Channel ``n`` at one position, the centre by default (rounded down for even sizes)."""
    def value(acts):
        t = _spatial(acts[layer], "the neuron objective")
        height, width = t.shape[-2:]
        row = height // 2 if y is None else y
        col = width // 2 if x is None else x
        if not (0 <= row < height and 0 <= col < width):
            raise ConvscopeError(f"neuron position (x={col}, y={row}) is outside this {height}x{width} map")
        return pick(t[:, :, row, col], n)
    return Objective(value, [layer], f"neuron({layer}, {_fmt(n)})")


def layer(name: str) -> Objective:
    """The mean square of the whole layer: DeepDream's L2 objective."""
    return Objective(lambda acts: acts[name].pow(2).flatten(1).mean(1), [name], f"layer({name})")


def class_logit(n: Units) -> Objective:
    """The logit of class ``n``, before any softmax: the class model of Simonyan et al. (2014)."""
    def value(acts):
        logits = acts[LOGITS]
        if logits.dim() != 2:
            raise ConvscopeError(f"the class objective needs a model that outputs (B, classes); got {tuple(logits.shape)}")
        return pick(logits, n)
    return Objective(value, [LOGITS], f"class_logit({_fmt(n)})")


def total_variation() -> Objective:
    """Mean absolute difference between neighbouring pixels of the image (subtract it to smooth)."""
    def value(acts):
        x = acts[INPUT]
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
        return dx + dy
    return Objective(value, [], "total_variation")


def l2(center: float = 0.5) -> Objective:
    """Mean square distance of the image from mid-gray (subtract it to keep colours moderate)."""
    return Objective(lambda acts: (acts[INPUT] - center).pow(2).flatten(1).mean(1), [], "l2")


def diversity(layer: str, group_size: int | None = None) -> Objective:
    """Minus the mean cosine similarity of each image's Gram matrix to the others' (Lucid's diversity).

    Unlike every other objective this **couples** batch elements, on purpose: adding it pushes
    images apart. ``group_size`` limits the coupling to consecutive groups (elements ``0..k-1``,
    ``k..2k-1``, ...), so several images of one channel differ from each other without ever
    seeing the other channels. A group of one contributes zero.
    """
    def value(acts):
        t = _spatial(acts[layer], "the diversity objective")
        batch, chans = t.shape[:2]
        flat = t.reshape(batch, chans, -1)
        gram = torch.bmm(flat, flat.transpose(1, 2)).reshape(batch, -1)
        gram = torch.nn.functional.normalize(gram, dim=1)
        sim = gram @ gram.T
        size = group_size or batch
        groups = torch.arange(batch, device=t.device) // size
        same = (groups[:, None] == groups[None, :]) & ~torch.eye(batch, dtype=torch.bool, device=t.device)
        others = same.sum(1).clamp(min=1)
        return -(sim * same).sum(1) / others
    return Objective(value, [layer], f"diversity({layer})")


def _fmt(n: Units) -> str:
    if isinstance(n, int):
        return str(n)
    values = torch.as_tensor(n).reshape(-1).tolist()
    return str(values[0]) if len(values) == 1 else f"[{values[0]}..{values[-1]}] x{len(values)}"


def parse_objective(text: str) -> tuple[str, list[int] | None]:
    """CLI form → ``(kind, units)``: ``channel``, ``neuron``, ``layer`` or ``class:281,285`` (units given)."""
    kind, _, rest = text.strip().partition(":")
    kind = kind.lower()
    kinds = ("channel", "neuron", "layer", "class")
    if kind not in kinds:
        from ...errors import suggest

        raise ConvscopeError(f"unknown objective {text!r}.{suggest(kind, kinds)} Use channel, neuron, layer or class:N.")
    if kind == "class":
        try:
            units = [int(v) for v in rest.split(",") if v.strip()]
        except ValueError:
            units = []
        if not units:
            raise ConvscopeError(f"bad objective {text!r}: write class:N with a class index, e.g. class:281")
        return kind, units
    if rest:
        raise ConvscopeError(f"bad objective {text!r}: {kind} takes no ':' argument; choose channels with --channels")
    return kind, None
