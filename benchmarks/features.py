"""Benchmark: feature visualization, convscope vs lucent (torch-lucent), side by side in one process.

Task (issue 3): the default model (EfficientNet-Lite0, real weights), one middle layer,
16 channels, 128x128, 256 steps. lucent runs on its defaults as its README shows, one
``render_vis`` call per channel, with two necessary changes, both printed:

* ``preprocess=False`` plus this model's own scaling ([-1, 1]) as the last transform:
  lucent's built-in preprocessing is torchvision's ImageNet mean/std, wrong for this model;
* the forward hooks that ``render_vis`` leaves on every submodule are removed after each
  call (otherwise every call adds ~250 more and slows the next).

The headline compares with lucent on a model whose weights are frozen (``requires_grad``
off), which is what a careful lucent user runs; lucent on the model as loaded (weight
gradients computed and thrown away) is printed beside it.

Both tools' final images are scored by one evaluator (``score``): the channel's mean
activation, under the model's preprocessing and no transforms, at 128 px (the image size)
and at 224 px (bilinearly upsampled as lucent does while it optimizes: its images were
optimized at 224, ours at 128).

convscope runs as a user would for speed: ``--recipe fast`` (its own step count, with a
warm-up and cosine decay and a small transform border; ``--recipe lucid`` gives its 256
constant-rate steps) and ``--precision auto`` (bf16 autocast only on hardware with native
bf16, channels-last inputs only where they are faster); its plain lucid recipe at 256 steps
in float32 is printed beside it. Times are CPU seconds per channel at one thread by default
(``--threads``): on a machine shared with other jobs that is what a run costs, and the issue's
target (>= 10x lucent with frozen weights) was stated at one thread.

Then:

* the step-time table: one forward + input-gradient step of the default model to ``blocks.3``,
  batch 8, 128 px, in fp32, channels-last, bf16 autocast and both (bf16 is emulated, and slow,
  on CPUs without native bf16: the header says which this machine is);
* the recipes at equal time: the objective (same evaluator) each recipe reaches after a
  number of steps, with the seconds per channel it took;
* each of our speed levers switched off on its own (on fewer channels and steps; a step costs
  the same all along, so seconds per channel scale with steps): stop the forward pass at the
  layer, frozen weights, optimize at the asked size (lucent upsamples to 224), and batching.

Usage:
    python benchmarks/features.py                               # the full task, lucent on 8 of the 16 channels
    python benchmarks/features.py --lucent-channels 16          # lucent on all 16 (about 6 min more)
    python benchmarks/features.py --quick                       # smoke run
    python benchmarks/features.py --layer blocks.5.1.bn1 --fast-steps 32,48,80 --skip-levers --skip-step-table
                                                                # the objective at fewer steps on a deep layer
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import warnings
from dataclasses import replace

import _machine
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import convscope  # noqa: E402
from convscope.hooks import StopForward, capture, frozen, recording  # noqa: E402
from convscope.methods.features.engine import CPU_MAX_CHUNK, Levers, Recipe, make_recipe, optimize  # noqa: E402
from convscope.methods.features.objectives import channel  # noqa: E402
from convscope.precision import FP32, PICTURE, Precision, resolve_precision  # noqa: E402


class Clock:
    """Wall and CPU seconds since creation. CPU time (``process_time``) is what a run costs on a
    machine shared with other jobs; with one thread it is close to the wall time of an idle machine."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def per(self, n: int) -> tuple[float, float]:
        return (time.perf_counter() - self.wall) / n, (time.process_time() - self.cpu) / n


def score(loaded, layer: str, images01: np.ndarray, channels: list[int], size: int) -> np.ndarray:
    """The channel objective of each image: channel ``channels[i]``'s mean activation on image ``i``.

    The one evaluator for both tools. ``images01 (N, 3, H, W)`` in [0, 1] are resized to
    ``size`` with the bilinear upsampling lucent applies while it optimizes, then get the
    model's own preprocessing; no robustness transforms.
    """
    x = torch.from_numpy(np.ascontiguousarray(images01)).float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    maps = capture(loaded.module, loaded.preprocessing.normalize(x), [layer])[layer]
    return maps[torch.arange(len(channels)), torch.as_tensor(channels)].flatten(1).mean(1).numpy()


def run_lucent(loaded, layer: str, channels: list[int], steps: int, size: int, freeze: bool) -> tuple[float, np.ndarray]:
    from lucent.optvis import param, render, transform

    model = copy.deepcopy(loaded.module).eval()
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    pre = loaded.preprocessing
    transforms = list(transform.standard_transforms) + [pre.normalize]
    lucent_layer = layer.replace(".", "_")
    images = []
    clock = Clock()
    for c in channels:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = render.render_vis(model, f"{lucent_layer}:{c}", param_f=lambda: param.image(size),
                                    transforms=transforms, preprocess=False, thresholds=(steps,),
                                    show_image=False, progress=False)
        images.append(out[-1][0].transpose(2, 0, 1))
        for m in model.modules():  # render_vis leaves a hook on every submodule
            m._forward_hooks.clear()
    return clock.per(len(channels)), np.stack(images)


def run_ours(loaded, layer: str, channels: list[int], steps: int | None, size: int, levers: Levers | None = None,
             max_batch: int | None = None, redirect_steps: int | None = None, recipe: str | Recipe = "lucid",
             precision: Precision = FP32) -> tuple[float, np.ndarray, int]:
    chosen = make_recipe(recipe, steps=steps, size=size)
    if redirect_steps is not None:
        chosen = replace(chosen, redirect_steps=redirect_steps)
    clock = Clock()
    result = optimize(loaded, lambda units: channel(layer, units), channels, recipe=chosen, seed=0,
                      levers=levers, max_batch=max_batch, precision=precision)
    return clock.per(len(channels)), result.images, result.chunk_size


SCORE_SIZES = (128, 224)
# The step-time table measured on an idle 2-core AMD EPYC with AVX-512 BF16 (issue 12), in ms:
# the basis of the projection for machines with native bf16.
ISSUE_STEP_MS = {"fp32": 69.0, "channels_last": 44.0, "bf16 autocast": 43.0, "channels_last and bf16": 31.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="blocks.3.1.bn1")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--steps", type=int, default=256, help="lucent's steps, and convscope's lucid recipe's")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--recipe", default="fast", choices=("lucid", "fast"),
                        help="convscope's recipe in the headline (default fast, at its own step count)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="convscope's precision in the headline (default auto)")
    parser.add_argument("--lucent-channels", type=int, default=8,
                        help="run lucent on the first K channels only (seconds are per channel; default 8, "
                             "0 for all)")
    parser.add_argument("--lever-channels", type=int, default=4)
    parser.add_argument("--lever-steps", type=int, default=32)
    parser.add_argument("--skip-lucent-unfrozen", action="store_true",
                        help="skip lucent on the model as loaded (the headline uses frozen weights)")
    parser.add_argument("--skip-levers", action="store_true")
    parser.add_argument("--skip-step-table", action="store_true")
    parser.add_argument("--skip-recipes", action="store_true")
    parser.add_argument("--fast-steps", type=lambda v: tuple(int(n) for n in v.split(",")), default=(64, 80, 96, 128),
                        help="step counts of the fast recipe in the recipe table (comma-separated; default 64,80,96,128)")
    parser.add_argument("--recipe-channels", type=int, default=8,
                        help="channels of the recipe table (the first N, compared with lucent's on the same ones)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1; 0 for torch's default). On a machine shared with other "
                             "jobs, 1 avoids OpenMP oversubscription, which otherwise slows every run 10x or more")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 channels, 32 steps, lucent on 2, levers on 2 channels x 8 steps")
    args = parser.parse_args()
    ours_steps = None  # the recipe's own
    if args.quick:
        args.channels, args.steps, args.lucent_channels, args.lever_channels, args.lever_steps = 4, 32, 2, 2, 8
        args.recipe_channels = 2
        ours_steps = 24
    if args.threads:
        torch.set_num_threads(args.threads)

    _machine.header("benchmark: feature visualization, convscope vs lucent")
    torch.manual_seed(0)
    loaded = convscope.load_model(device="cpu")
    _ = loaded.catalogue  # build once, outside the timings
    precision = resolve_precision(args.precision, loaded.device, purpose=PICTURE, module=loaded.module)
    recipe = make_recipe(args.recipe, steps=ours_steps if args.recipe == "fast" else args.steps)
    channels = list(range(args.channels))
    lucent_channels = channels[: args.lucent_channels or args.channels]
    print(f"feature visualization: {loaded.title}, layer {args.layer}, {args.channels} channels, "
          f"{args.size}x{args.size}; lucent on {len(lucent_channels)} of them")
    print(f"convscope: recipe {recipe.name}, {recipe.steps} steps, precision {precision.describe()}; "
          f"beside it lucid at {args.steps} steps in fp32")
    print(f"lucent: {args.steps} steps, render_vis(model, 'layer:ch') per channel, its standard transforms and 224 "
          "upsampling; preprocess=False + this model's [-1, 1] scaling; leftover hooks removed after each call")
    print("objective: one evaluator for all, the channel's mean activation at 128 px and at 224 px (bilinear "
          "upsampling, as lucent optimizes), the model's preprocessing, no transforms\n")

    # warm-up: first calls pay one-time costs (allocator, oneDNN primitives)
    run_ours(loaded, args.layer, channels[:2], 2, args.size, precision=precision)
    run_ours(loaded, args.layer, channels[:2], 2, args.size)
    run_lucent(loaded, args.layer, channels[:1], 2, args.size, freeze=True)

    # Rounds alternate the tools (lucent on one channel, then ours on a group of channels, ...), so a
    # change in the machine's load hits both alike. Ours runs in groups of a full chunk, as a user's
    # call on all the channels would (smaller groups would make smaller chunks, each step dearer).
    tools = ["frozen", "ours", "plain"] + ([] if args.skip_lucent_unfrozen else ["lucent"])
    k = len(lucent_channels)
    groups = min(k, -(-len(channels) // CPU_MAX_CHUNK))
    parts = [channels[j * len(channels) // groups:(j + 1) * len(channels) // groups] for j in range(groups)]
    shares = [sum((parts[j] for j in range(groups) if j * k // groups == i), []) for i in range(k)]
    totals = {tool: np.zeros(2) for tool in tools}
    images = {tool: [] for tool in tools}
    chunk = 0
    for i, c in enumerate(lucent_channels):
        sec, img = run_lucent(loaded, args.layer, [c], args.steps, args.size, freeze=True)
        totals["frozen"] += sec
        images["frozen"].append(img)
        if shares[i]:
            sec, img, chunk = run_ours(loaded, args.layer, shares[i], recipe.steps, args.size, recipe=recipe,
                                       precision=precision)
            totals["ours"] += np.asarray(sec) * len(shares[i])
            images["ours"].append(img)
            sec, img, _ = run_ours(loaded, args.layer, shares[i], args.steps, args.size)
            totals["plain"] += np.asarray(sec) * len(shares[i])
            images["plain"].append(img)
        if "lucent" in tools:
            sec, img = run_lucent(loaded, args.layer, [c], args.steps, args.size, freeze=False)
            totals["lucent"] += sec
            images["lucent"].append(img)
    mine = ("ours", "plain")
    seconds = {tool: totals[tool] / (len(channels) if tool in mine else k) for tool in tools}
    scores = {tool: {size: score(loaded, args.layer, np.concatenate(images[tool]),
                                 channels if tool in mine else lucent_channels, size) for size in SCORE_SIZES}
              for tool in tools}
    names = {"frozen": "lucent, weights frozen (headline)", "lucent": "lucent, model as loaded (weight grads)",
             "ours": f"convscope {recipe.name} {recipe.steps}, {precision.name}"
                     f"{' channels-last' if precision.channels_last else ''} (chunks of {chunk})",
             "plain": f"convscope lucid {args.steps}, fp32 default layout"}

    print(f"{'tool':<50} {'wall s/ch':>10} {'CPU s/ch':>9} {'obj@128':>8} {'obj@224':>8}  (means over channels)")
    for tool in ("frozen", "lucent", "plain", "ours"):
        if tool in tools:
            n = len(scores[tool][128])
            print(f"{names[tool]:<50} {seconds[tool][0]:>10.2f} {seconds[tool][1]:>9.2f} "
                  f"{scores[tool][128].mean():>8.3f} {scores[tool][224].mean():>8.3f}  (n={n})", flush=True)

    ours_s, frozen_s, plain_s = seconds["ours"], seconds["frozen"], seconds["plain"]
    print(f"\nspeed-up over lucent with frozen weights: {frozen_s[0] / ours_s[0]:.1f}x wall, "
          f"{frozen_s[1] / ours_s[1]:.1f}x CPU time (target >= 10x); convscope lucid {args.steps} fp32: "
          f"{frozen_s[1] / plain_s[1]:.1f}x CPU time")
    if "lucent" in tools:
        print(f"speed-up over lucent on the model as loaded: {seconds['lucent'][0] / ours_s[0]:.1f}x wall, "
              f"{seconds['lucent'][1] / ours_s[1]:.1f}x CPU time")
    objective = []
    for size in SCORE_SIZES:
        ours, theirs = scores["ours"][size][:k], scores["frozen"][size]
        objective.append(f"{ours.mean() / theirs.mean():.2f} at {size} px ({int((ours >= theirs).sum())} of {k} "
                         "channels higher)")
        print(f"objective at {size} px, ours / lucent frozen on the same {k} channels: {ours.mean():.3f} / "
              f"{theirs.mean():.3f} = {ours.mean() / theirs.mean():.2f} (ours higher on {int((ours >= theirs).sum())} "
              f"of {k})", flush=True)
    result = (f"convscope ({recipe.name} {recipe.steps}, {precision.name}"
              f"{'+channels-last' if precision.channels_last else ''}) {frozen_s[1] / ours_s[1]:.1f}x lucent with "
              f"frozen weights in CPU time at {torch.get_num_threads()} thread(s) ({frozen_s[0] / ours_s[0]:.1f}x "
              f"wall); objective ours/lucent {', '.join(objective)}")

    if not args.skip_step_table:
        table = step_table(loaded, batch=2 if args.quick else 8, repeats=3 if args.quick else 12)
        chosen = {(False, False): "fp32", (False, True): "channels_last", (True, False): "bf16 autocast",
                  (True, True): "channels_last and bf16"}[(precision.name == "bf16", precision.channels_last)]
        here = table["fp32"] / table[chosen]
        there = ISSUE_STEP_MS["fp32"] / ISSUE_STEP_MS["channels_last and bf16"]
        projected = frozen_s[1] / ours_s[1] * there / here
        print(f"PROJECTION, not a measurement: the headline ran {chosen} here, {here:.2f}x fp32's step. On the "
              f"AVX-512 BF16 machine of the issue, auto takes channels-last and bf16 at {there:.2f}x fp32's step "
              f"({ISSUE_STEP_MS['fp32']:.0f} -> {ISSUE_STEP_MS['channels_last and bf16']:.0f} ms); if lucent and "
              f"the rest scale as here, that is {projected:.1f}x lucent frozen (CPU time)")
        result += f"; projected with native bf16: {projected:.1f}x"
    if not args.skip_recipes:
        rows = recipes_at_equal_time(loaded, args, precision, scores["frozen"])
        m = min(args.recipe_channels, k)
        for size in SCORE_SIZES:
            theirs = scores["frozen"][size][:m].mean()
            fit = [(cpu, label) for label, cpu, objs in rows if objs[size][:m].mean() >= theirs]
            if fit:
                cpu, label = min(fit)
                print(f"cheapest row at an objective >= lucent frozen's at {size} px (on the same {m} channels): "
                      f"{label}, {cpu:.2f} CPU s/ch = {frozen_s[1] / cpu:.1f}x lucent frozen")
                result += f"; >= lucent's objective at {size} px from {label}: {frozen_s[1] / cpu:.1f}x"
            else:
                print(f"no row reaches lucent frozen's objective at {size} px ({theirs:.3f}) on the same {m} channels")
    if not args.skip_levers:
        levers(loaded, args, channels)
    _machine.footer(result)
    return 0


def step_table(loaded, batch: int = 8, size: int = 128, layer: str = "blocks.3", repeats: int = 12) -> dict[str, float]:
    """Milliseconds of one forward + input-gradient step to ``layer`` (median), per precision and layout."""
    settings = {"fp32": Precision("fp32", False), "channels_last": Precision("fp32", True),
                "bf16 autocast": Precision("bf16", False), "channels_last and bf16": Precision("bf16", True)}
    row = loaded.catalogue.get(layer)
    module = loaded.module
    x0 = torch.rand(batch, 3, size, size)
    table = {}
    print(f"\nstep time: forward + input gradient of the default model to {layer}, batch {batch}, {size} px "
          f"(median of {repeats})")
    with frozen(module), recording(module, [row], detach=False, stop_after_last=True) as store:
        for name, setting in settings.items():
            times = []
            for _ in range(repeats + 2):
                x = x0.clone().requires_grad_(True)
                t = time.perf_counter()
                with setting.autocast(), contextlib.suppress(StopForward):
                    module(setting.input(loaded.preprocessing.normalize(x)))
                store[row.name].float().mean().backward()
                times.append(time.perf_counter() - t)
            table[name] = float(np.median(times[2:]) * 1000)
            print(f"  {name:<24} {table[name]:>7.1f} ms   ({table['fp32'] / table[name]:.2f}x fp32)", flush=True)
    return table


def recipe_grid(quick: bool, fast_steps: tuple[int, ...] = (64, 80, 96, 128)) -> list[tuple[str, Recipe]]:
    """The recipe table's rows: the fast recipe at several step counts, and each of its changes
    over the previous fast recipe undone on its own (at 80 steps)."""
    fast = make_recipe("fast")
    if quick:
        return [("lucid 16", make_recipe("lucid", steps=16)), ("fast 16", make_recipe("fast", steps=16)),
                ("fast 16, border 12", replace(fast, steps=16, pad=12))]
    previous = replace(fast, steps=192, lr=0.1, warmup=0.1, pad=12, redirect_steps=12)
    upscale = tuple(float(v) for v in np.linspace(0.9, 1.3, 11))
    return [("lucid 256", make_recipe("lucid")),
            *[(f"fast {n}", make_recipe("fast", steps=n)) for n in fast_steps],
            ("fast 80, border 12 (142 px)", replace(fast, pad=12)),
            ("fast 80, warm-up 10%", replace(fast, warmup=0.1)),
            ("fast 80, scales 0.9-1.3", replace(fast, scales=upscale)),
            ("previous fast: 192, lr 0.1, warm-up 10%, border 12", previous)]


def recipes_at_equal_time(loaded, args, precision: Precision, lucent: dict) -> list[tuple[str, float, dict]]:
    """The objective each recipe reaches, and what its steps cost per channel; ``lucent``: lucent
    frozen's objective per channel ``{size: array}`` on (at least) the same first channels.

    Returns ``(label, CPU s per channel, {size: objective per channel})`` rows."""
    chans = list(range(min(args.recipe_channels, len(lucent[128]))))
    print(f"\nrecipes ({len(chans)} channels of {args.layer}, precision {precision.describe()}); "
          "objective by the one evaluator:")
    print(f"  {'recipe':<52} {'CPU s/ch':>9} {'obj@128':>8} {'obj@224':>8}   ratio to lucent frozen at 128 / 224 px "
          "(channels higher)")
    rows = []
    for label, recipe in recipe_grid(args.quick, args.fast_steps):
        (_, cpu), images, _ = run_ours(loaded, args.layer, chans, recipe.steps, args.size, recipe=recipe,
                                       precision=precision)
        objs = {size: score(loaded, args.layer, images, chans, size) for size in SCORE_SIZES}
        ratios = [f"{objs[px].mean() / lucent[px][:len(chans)].mean():.3f} "
                  f"({int((objs[px] >= lucent[px][:len(chans)]).sum())}/{len(chans)})" for px in SCORE_SIZES]
        print(f"  {label:<52} {cpu:>9.2f} {objs[128].mean():>8.3f} {objs[224].mean():>8.3f}   {' / '.join(ratios)}",
              flush=True)
        rows.append((label, cpu, objs))
    return rows


def levers(loaded, args, channels: list[int]) -> None:
    """Each of our levers switched off alone; the same share of redirected-gradient steps as the full run."""
    lever_channels = channels[: args.lever_channels]
    steps = args.lever_steps
    scale = args.steps / steps
    redirect = round(make_recipe("lucid").redirect_steps * steps / args.steps)
    variants = [
        ("all levers", Levers(), None),
        ("without stopping at the layer (full forward)", Levers(stop_forward=False), None),
        ("without frozen weights (weight gradients)", Levers(freeze=False), None),
        ("at 224x224 like lucent (upsampled)", Levers(upsample_to=224), None),
        ("without batching (one channel per run)", Levers(), 1),
        ("none of the four", Levers(stop_forward=False, freeze=False, upsample_to=224), 1),
    ]
    print(f"\nlevers ({len(lever_channels)} channels, {steps} steps, scaled to {args.steps} steps; "
          f"{'wall':>6} / CPU s per channel):")
    base = None
    for name, lever, max_batch in variants:
        (wall, cpu), _, _ = run_ours(loaded, args.layer, lever_channels, steps, args.size, lever, max_batch, redirect)
        wall, cpu = wall * scale, cpu * scale
        base = base or cpu
        print(f"  {name:<46} {wall:>8.2f} / {cpu:>6.2f}   x{cpu / base:.2f} the CPU time of all levers", flush=True)


if __name__ == "__main__":
    sys.exit(main())
