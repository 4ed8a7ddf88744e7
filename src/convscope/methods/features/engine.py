"""The optimization loop: many images at once, one objective value per image, by gradient ascent.

:func:`optimize` runs one batched optimization per chunk of elements. Per step: the
parameterization gives images in [0, 1]; the recipe's random transforms move them; the
model's own preprocessing (``Preprocessing.normalize``) runs inside the differentiable chain;
the forward pass stops right after the deepest layer the objective reads; the sum of the
per-image objectives is back-propagated to the images only (parameters frozen).

What makes it fast (each lever is measured in ``benchmarks/features.py``):

* the forward pass stops at the target layer (``recording(..., stop_after_last=True)``);
* the weights are frozen, so autograd computes no weight gradients;
* the image is optimized at the size asked for (lucent upsamples to 224 first);
* one chunk holds many channels, sized by a memory budget (it pays most on a GPU; on a CPU
  it saves per-call overhead, up to :data:`CPU_MAX_CHUNK` images);
* the precision (:mod:`convscope.precision`): channels-last inputs, and bf16 autocast of the
  forward pass where the hardware computes bf16 natively;
* the ``"fast"`` recipe reaches lucent's objective in 80 steps instead of 256, on images that
  are not padded beyond the asked size (see :data:`RECIPES`).

Element ``i`` of a batch sees only its own image, its own random draws (seeded from
``(seed, unit, variant)``) and its own Adam state, so the batch gives each channel the same
result as a run alone, up to float rounding.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ...errors import ConvscopeError
from ...hooks import StopForward, frozen, recording
from ...layers import LayerInfo
from ...models import LoadedModel
from ...precision import FP32, Precision
from ...rectifiers import redirected_rectifiers
from . import param as param_mod
from .objectives import INPUT, LOGITS, Objective, diversity, l2, total_variation
from .transforms import LUCID_SCALES, fused_standard

__all__ = ["Recipe", "RECIPES", "make_recipe", "optimize", "Optimized", "Levers", "estimate_bytes_per_image",
           "logits_layer", "resolve_layers"]


@dataclass(frozen=True)
class Recipe:
    """How to optimize: parameterization, transforms, optimizer, step count and size.

    Attributes:
        name: ``"lucid"``, ``"fast"`` or ``"post"``.
        steps: optimization steps.
        size: image size ``(H, W)`` that is optimized (and saved).
        lr: Adam's learning rate (lucid) or the step per RMS-normalised gradient (post, 0..1 units).
        param: ``"fft"`` (1/f spectrum), ``"pixel"``, or ``"gray"`` (the post's gray + noise, raw pixels).
        decorrelate: mix colours through Lucid's colour-correlation matrix before the sigmoid.
        transforms: apply Lucid's standard pad/jitter/scale/rotate each step.
        optimizer: ``"adam"`` or ``"rms_ascent"`` (``x += lr * g / rms(g)``, the post's update).
        redirect_steps: steps at the start with the redirected ReLU gradient (0 = never).
        tv, l2, diversity: weights of the optional penalty and diversity terms.
        schedule: ``"constant"`` learning rate, or ``"cosine"``: a linear warm-up over the first
            ``warmup`` fraction of the steps, then a cosine decay to zero at the last step.
        pad: gray border of the transforms, per side; the transformed image is ``size + 2 * pad - 10``
            pixels per axis (12, Lucid's, gives ``size + 14``).
        scales: the transforms' scale factors, drawn per step (default Lucid's 0.9-1.1).
    """

    name: str
    steps: int
    size: tuple[int, int]
    lr: float
    param: str
    decorrelate: bool
    transforms: bool
    optimizer: str
    redirect_steps: int
    tv: float = 0.0
    l2: float = 0.0
    diversity: float = 0.0
    schedule: str = "constant"
    warmup: float = 0.0
    pad: int = 12
    scales: tuple[float, ...] = LUCID_SCALES

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``."""
        if self.schedule == "constant":
            return self.lr
        warmup = round(self.warmup * self.steps)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        span = max(self.steps - warmup, 1)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))

    def as_dict(self) -> dict:
        data = asdict(self)
        data["size"] = list(self.size)
        data["scales"] = list(self.scales)
        return data


RECIPES: dict[str, Recipe] = {
    # Olah et al., "Feature Visualization" (Distill 2017), with lucent's defaults: 1/f FFT image,
    # decorrelated colour, sigmoid, standard transforms, Adam at 0.05.
    "lucid": Recipe("lucid", steps=256, size=(128, 128), lr=0.05, param="fft", decorrelate=True,
                    transforms=True, optimizer="adam", redirect_steps=16),
    # "lucid" at under a third of the cost: 80 steps instead of 256, Adam at 0.15 with a linear
    # warm-up over the first 30% of the steps and a cosine decay to zero (the image settles on its
    # optimum instead of jittering around it at a constant rate), and a 5-pixel gray border instead
    # of 12, so the transformed image is the asked size (128) instead of 142: 0.81x the pixels per
    # step. Measured with one evaluator at 128 px (the channel's mean activation, no transforms),
    # as a ratio to lucent's objective after its 256 steps (frozen weights, optimized at 224 px), on
    # 8 channels of blocks.3.1.bn1 (benchmarks/features.py, recipe table; objectives are
    # deterministic for a seed): the previous fast recipe (192 steps, lr 0.1, warm-up 10%, border
    # 12) 1.14x; at 96 steps, border 12 -> 5: 0.996x -> 1.008x (a border of 4, smaller than the
    # jitter, fell to 0.94x at 80 steps); at 80 steps with border 5, warm-up 10% -> 30%: 1.01x ->
    # 1.06x (lr 0.1) and 1.07x at lr 0.15 (6 of 8 channels higher); lr 0.1-0.3 moves little; 64
    # steps 1.01x (3 of 8 higher), 96 steps 1.08x. On 4 channels of blocks.5.1.bn1 80 steps gave
    # 1.46x (3 of 4). At 224 px lucent's images stay ahead (0.65x): they were optimized there.
    # Scales up to 1.3 in the transforms (robustness to upsampling) lift that to 0.70-0.72x but
    # drop the 128-px objective below lucent's, so they are an option (``scales``), not the default.
    # A coarse-to-fine size schedule (the first quarter at half size) was dropped: 81% of the
    # objective for 0.8x the time.
    "fast": Recipe("fast", steps=80, size=(128, 128), lr=0.15, param="fft", decorrelate=True,
                   transforms=True, optimizer="adam", redirect_steps=5, schedule="cosine", warmup=0.3, pad=5),
    # The post (after Chollet's "visualizing what convnets learn"): gray + noise, 40 steps of
    # x += g / rms(g) with step 1 in 0..255 units, 150x150, nothing else.
    "post": Recipe("post", steps=40, size=(150, 150), lr=1.0 / 255.0, param="gray", decorrelate=False,
                   transforms=False, optimizer="rms_ascent", redirect_steps=0),
}


def make_recipe(name: str | Recipe = "lucid", *, steps: int | None = None, size: int | tuple[int, int] | None = None,
                lr: float | None = None, tv: float | None = None, l2: float | None = None,
                diversity: float | None = None, max_scale: float | None = None) -> Recipe:
    """A named recipe with some settings overridden (``None`` keeps the recipe's value).

    ``max_scale`` spreads the transforms' scales evenly from the recipe's smallest to it (11 of
    them, as Lucid's 0.9-1.1): above 1.1 the images hold up better when shown upsampled, at some
    cost to the objective at their own size (``benchmarks/features.py``, recipe table).
    """
    if isinstance(name, Recipe):
        base = name
    else:
        if name not in RECIPES:
            raise ConvscopeError(f"unknown recipe {name!r}: use {' or '.join(RECIPES)}")
        base = RECIPES[name]
    changes: dict = {}
    if steps is not None:
        if steps < 1:
            raise ConvscopeError(f"steps must be at least 1, got {steps}")
        changes["steps"] = int(steps)
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
        if min(size) < 8:
            raise ConvscopeError(f"size {size} is too small: use at least 8 pixels")
        changes["size"] = size
    if max_scale is not None:
        low = min(base.scales)
        if not max_scale > low:
            raise ConvscopeError(f"max scale must be above the recipe's smallest scale {low:g}, got {max_scale:g}")
        changes["scales"] = tuple(float(v) for v in np.linspace(low, max_scale, 11))
    for key, value in (("lr", lr), ("tv", tv), ("l2", l2), ("diversity", diversity)):
        if value is not None:
            changes[key] = float(value)
    return replace(base, **changes)


@dataclass
class Levers:
    """Switches for the speed levers, for ``benchmarks/features.py`` only; defaults are the fast path."""

    stop_forward: bool = True
    freeze: bool = True
    upsample_to: int | None = None


@dataclass
class Optimized:
    """Result of :func:`optimize`, one row per element.

    Attributes:
        images: ``(N, 3, H, W)`` float32, the optimized images (lucid: in (0, 1); post: raw pixels).
        start, final: ``(N,)`` the objective on the starting and the final image (no transforms).
        history: ``(steps, N)`` the objective at each step, under that step's transforms.
        redirected: rectifier calls caught by the redirected-gradient mode, by kind.
        chunk_size: elements per optimization.
        seconds: wall time.
    """

    images: np.ndarray
    start: np.ndarray
    final: np.ndarray
    history: np.ndarray
    redirected: Counter = field(default_factory=Counter)
    chunk_size: int = 0
    seconds: float = 0.0


def estimate_bytes_per_image(loaded: LoadedModel, layers: Sequence[LayerInfo], size: tuple[int, int],
                             full: bool = False, value_bytes: int = 4) -> int:
    """Rough memory for one image's forward + backward up to ``layers`` at ``size``.

    Sums the outputs of every module that runs before the deepest layer (from the catalogue,
    scaled from the model's input size to ``size``), times 3 for saved tensors and gradients.
    Conservative: a container's output is counted along with its last child's. ``value_bytes``
    is 2 under bf16/fp16 autocast, whose activations are half the size.
    """
    catalogue = loaded.catalogue
    last = len(catalogue.layers) - 1 if full or not layers else max(layer.index for layer in layers)
    base_h, base_w = catalogue.input_size
    scale = (size[0] * size[1]) / float(base_h * base_w)
    total = 0.0
    for row in catalogue.layers[: last + 1]:
        numel = math.prod(row.shape) if row.shape else 0
        total += numel * (scale if len(row.shape) == 3 else 1.0)
    return int(total * value_bytes * 3) + 3 * size[0] * size[1] * 4 * 8


# On a CPU a bigger chunk saves only Python overhead, and past ~8 images of 142x142 the
# activations fall out of cache: 16 per chunk measured ~1.4x slower per image than 8 on
# one core of this project's machines (benchmarks/features.py). Deep layers (blocks.5.1.bn1
# and bn2 at 7x7) measured the same: 8 per chunk as fast as 4, 16 and 32 1.1-1.2x slower per
# image; so one cap for every layer. GPUs take what fits.
CPU_MAX_CHUNK = 8


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 * 1024 ** 3


@contextlib.contextmanager
def _eval_keep_grad(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode with trainable weights (lucent's situation); weight ``.grad`` restored after."""
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.grad) for p in module.parameters()]
    try:
        module.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, grad in grads:
            p.grad = grad


def logits_layer(loaded: LoadedModel) -> LayerInfo | None:
    """The layer that gives the class scores when the model ends in a softmax, else None.

    Class objectives maximize the score *before* any softmax (a softmax output rises just as
    well by pushing the other classes down). None means the model's output is that score.
    """
    rows = loaded.catalogue.layers
    soft = [i for i, row in enumerate(rows) if row.type in ("Softmax", "LogSoftmax")]
    if not soft or any(row.kind != "block" for row in rows[soft[-1] + 1:]):
        return None
    before = rows[soft[-1] - 1] if soft[-1] > 0 else None
    if before is None or before.kind == "block" or before.shape != rows[soft[-1]].shape:
        return None
    return before


def resolve_layers(loaded: LoadedModel, objective: Objective) -> dict[str, LayerInfo]:
    """``name used by the objective -> LayerInfo``; :data:`LOGITS` maps to the pre-softmax layer if any."""
    catalogue = loaded.catalogue
    rows = {name: catalogue.get(name) for name in objective.layers if name != LOGITS}
    if LOGITS in objective.layers:
        pre_softmax = logits_layer(loaded)
        if pre_softmax is not None:
            rows[LOGITS] = pre_softmax
    return rows


def _parameterize(recipe: Recipe, batch: int, rng: param_mod.ElementRNG, device):
    height, width = recipe.size
    if recipe.param == "gray":
        return param_mod.gray_noise_image(height, width, batch=batch, rng=rng, device=device)
    if recipe.param in ("fft", "pixel"):
        return param_mod.image(height, width, batch=batch, fft=recipe.param == "fft",
                               decorrelate=recipe.decorrelate, rng=rng, device=device)
    raise ConvscopeError(f"unknown parameterization {recipe.param!r}: use fft, pixel or gray")


def optimize(
    loaded: LoadedModel,
    objective_for: Callable[[list[int]], Objective],
    units: Sequence[int],
    *,
    recipe: Recipe,
    seed: int = 0,
    variants: int = 1,
    memory_budget: int | None = None,
    max_batch: int | None = None,
    progress: bool = False,
    desc: str = "features",
    levers: Levers | None = None,
    precision: Precision = FP32,
) -> Optimized:
    """Maximize ``objective_for(units_of_chunk)`` for every element, in chunks.

    Args:
        loaded: the model with its preprocessing.
        objective_for: builds the objective of one chunk from its elements' units; element ``i``
            of the chunk is unit ``units_of_chunk[i]`` (e.g. ``lambda u: channel(layer, u)``).
        units: one entry per image to make (a channel, a class); each is made ``variants`` times.
        recipe: see :class:`Recipe` and :func:`make_recipe`.
        seed: makes the run deterministic; element ``(unit, variant)`` draws from its own
            generator seeded by ``(seed, unit, variant)``.
        variants: images per unit, consecutive; with ``recipe.diversity > 0`` they push apart.
        memory_budget: bytes for one chunk's forward and backward (default: 2 GiB on a CPU,
            half the free memory on a GPU); ``max_batch`` caps the chunk size (default on a
            CPU: :data:`CPU_MAX_CHUNK`).
        levers: benchmark switches (:class:`Levers`).
        precision: a resolved :class:`~convscope.precision.Precision` for the optimization's
            forward and backward passes. The start and final objectives are always evaluated
            in float32, so records compare across precisions.

    Shape:
        returns ``images (len(units) * variants, 3, H, W)``.
    """
    levers = levers or Levers()
    module, device = loaded.module, loaded.device
    keys = [(int(u), v) for u in units for v in range(variants)]
    element_units = [u for u, _ in keys]
    n = len(keys)
    if n == 0:
        raise ConvscopeError("nothing to optimize: the list of channels/units is empty")
    probe = objective_for(element_units[: max(variants, 1)])
    layer_rows = resolve_layers(loaded, probe)
    needs_logits = LOGITS in probe.layers and LOGITS not in layer_rows  # the model's own output
    if not layer_rows and not needs_logits:
        raise ConvscopeError(f"objective {probe.name} reads no layer of the model")
    layer_names = [name for name in layer_rows if name != LOGITS]

    work_size = recipe.size
    if recipe.transforms:
        grow = 2 * recipe.pad - 10  # fused_standard: pad on each side, crops of 8 - 1 and 4 - 1 pixels
        work_size = (recipe.size[0] + grow, recipe.size[1] + grow)
    if levers.upsample_to:
        work_size = (levers.upsample_to, levers.upsample_to)
    per_image = estimate_bytes_per_image(loaded, list(layer_rows.values()), work_size,
                                         full=needs_logits or not levers.stop_forward,
                                         value_bytes=4 if precision.dtype is None else 2)
    budget = memory_budget or _default_budget(device)
    chunk = max(1, budget // max(per_image, 1))
    if max_batch:
        chunk = min(chunk, max_batch)
    elif device.type == "cpu":
        chunk = min(chunk, CPU_MAX_CHUNK)
    chunk = max(variants, chunk // variants * variants)
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)

    rng_all = param_mod.ElementRNG(seed, keys)
    transform = fused_standard(pad_width=recipe.pad, scales=recipe.scales) if recipe.transforms else None
    stop = levers.stop_forward and not needs_logits
    recorded = list(dict.fromkeys(layer_rows.values()))
    # a recorded output must survive in-place ops further on only if the forward continues
    clone = len(recorded) > 1 or not stop

    images, starts, finals, histories = [], [], [], []
    redirected: Counter = Counter()
    t0 = time.perf_counter()
    guard = frozen(module) if levers.freeze else _eval_keep_grad(module)
    with guard, torch.enable_grad(), recording(module, recorded, detach=False, clone=clone,
                                                stop_after_last=stop) as store, \
            tqdm(total=recipe.steps * n_chunks, desc=desc, unit="step", disable=not progress, leave=False) as bar:

        def activations_of(x01: torch.Tensor, rng: param_mod.ElementRNG | None) -> dict[str, torch.Tensor]:
            """The objective's inputs for images ``x01``: transformed and at ``precision`` while
            optimizing (``rng`` given), plain and in float32 when scoring (``rng`` None)."""
            x = x01
            if rng is not None and transform is not None:
                x = transform(x, rng)
            if levers.upsample_to and rng is not None:
                x = F.interpolate(x, size=(levers.upsample_to,) * 2, mode="bilinear", align_corners=True)
            out = None
            autocast = precision.autocast() if rng is not None else contextlib.nullcontext()
            try:
                with autocast:
                    out = module(precision.input(loaded.preprocessing.normalize(x)))
            except StopForward:
                pass
            acts: dict[str, torch.Tensor] = {INPUT: x01}
            for key, row in layer_rows.items():
                if row.name not in store:
                    raise ConvscopeError(f"layer {row.label} did not run in the forward pass at size "
                                         f"{tuple(x.shape[-2:])}; try a larger size")
                acts[key] = store[row.name].float()  # objectives sum in float32 under autocast too
            if needs_logits:
                if not isinstance(out, torch.Tensor):
                    raise ConvscopeError("the model's output is not a tensor of class scores; the class objective needs one")
                acts[LOGITS] = out.float()
            return acts

        for c, begin in enumerate(range(0, n, chunk)):
            end = min(begin + chunk, n)
            bar.set_description(f"{desc} chunk {c + 1}/{n_chunks}")
            rng = rng_all.subset(slice(begin, end))
            main = objective_for(element_units[begin:end])
            total = main
            if recipe.diversity:
                layer_name = next(iter(layer_names), None)
                if layer_name is None:
                    raise ConvscopeError("the diversity term needs an objective that reads a layer")
                total = total + recipe.diversity * diversity(layer_name, group_size=variants)
            if recipe.tv:
                total = total - recipe.tv * total_variation()
            if recipe.l2:
                total = total - recipe.l2 * l2()
            params, image_f = _parameterize(recipe, end - begin, rng, device)
            with torch.no_grad():
                starts.append(main(activations_of(image_f(), None)).float().cpu())
            optimizer = torch.optim.Adam(params, lr=recipe.lr) if recipe.optimizer == "adam" else None
            history = torch.zeros(recipe.steps, end - begin)
            for step in range(recipe.steps):
                if optimizer is not None and recipe.schedule != "constant":
                    for group in optimizer.param_groups:
                        group["lr"] = recipe.lr_at(step)
                mode = redirected_rectifiers() if step < recipe.redirect_steps else contextlib.nullcontext()
                with mode:
                    acts = activations_of(image_f(), rng)
                    values = main(acts)
                    score = values if total is main else total(acts)
                (-score.sum()).backward()
                if step < recipe.redirect_steps:
                    redirected.update(mode.counts)
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    _rms_ascent_step(params, recipe.lr_at(step))
                history[step] = values.detach().float().cpu()
                bar.update(1)
            with torch.no_grad():
                final_image = image_f().detach()
                finals.append(main(activations_of(final_image, None)).float().cpu())
            images.append(final_image.float().cpu())
            histories.append(history)
    return Optimized(
        images=torch.cat(images).numpy(), start=torch.cat(starts).numpy(), final=torch.cat(finals).numpy(),
        history=torch.cat(histories, dim=1).numpy(), redirected=redirected, chunk_size=chunk,
        seconds=time.perf_counter() - t0,
    )


@torch.no_grad()
def _rms_ascent_step(params: list[torch.Tensor], lr: float) -> None:
    """The post's update, per image: ``x += lr * g / (rms(g) + 1e-5)`` for the objective's gradient g."""
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        rms = grad.pow(2).flatten(1).mean(1).sqrt().view(-1, *([1] * (grad.dim() - 1)))
        p.sub_(lr * grad / (rms + 1e-5))  # grad is of -objective: subtracting it ascends
        p.grad = None
