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

Then each of our speed levers is switched off on its own (on fewer channels and steps; a
step costs the same all along, so seconds per channel scale with steps), to show what it
contributes: stop the forward pass at the layer, frozen weights, optimize at the asked
size (lucent upsamples to 224), and batching.

Usage:
    python benchmarks/features.py                               # the full task (about 14 min on 2 idle cores)
    python benchmarks/features.py --lucent-channels 8           # lucent on 8 of the 16 channels (about 8 min)
    python benchmarks/features.py --quick                       # smoke run
"""

from __future__ import annotations

import argparse
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
from convscope.hooks import capture  # noqa: E402
from convscope.methods.features.engine import Levers, make_recipe, optimize  # noqa: E402
from convscope.methods.features.objectives import channel  # noqa: E402


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


def run_ours(loaded, layer: str, channels: list[int], steps: int, size: int, levers: Levers | None = None,
             max_batch: int | None = None, redirect_steps: int | None = None) -> tuple[float, np.ndarray, int]:
    recipe = make_recipe("lucid", steps=steps, size=size)
    if redirect_steps is not None:
        recipe = replace(recipe, redirect_steps=redirect_steps)
    clock = Clock()
    result = optimize(loaded, lambda units: channel(layer, units), channels, recipe=recipe, seed=0,
                      levers=levers, max_batch=max_batch)
    return clock.per(len(channels)), result.images, result.chunk_size


SCORE_SIZES = (128, 224)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="blocks.3.1.bn1")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--lucent-channels", type=int, default=None,
                        help="run lucent on the first K channels only (seconds are per channel; default all)")
    parser.add_argument("--lever-channels", type=int, default=4)
    parser.add_argument("--lever-steps", type=int, default=32)
    parser.add_argument("--skip-lucent-unfrozen", action="store_true",
                        help="skip lucent on the model as loaded (the headline uses frozen weights)")
    parser.add_argument("--skip-levers", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's). On a machine shared with other jobs, 1 avoids "
                             "OpenMP oversubscription, which otherwise slows every run 10x or more")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 channels, 32 steps, lucent on 2, levers on 2 channels x 8 steps")
    args = parser.parse_args()
    if args.quick:
        args.channels, args.steps, args.lucent_channels, args.lever_channels, args.lever_steps = 4, 32, 2, 2, 8
    if args.threads:
        torch.set_num_threads(args.threads)

    _machine.header("benchmark: feature visualization, convscope vs lucent")
    torch.manual_seed(0)
    loaded = convscope.load_model(device="cpu")
    _ = loaded.catalogue  # build once, outside the timings
    channels = list(range(args.channels))
    lucent_channels = channels[: args.lucent_channels or args.channels]
    print(f"feature visualization: {loaded.title}, layer {args.layer}, {args.channels} channels, "
          f"{args.size}x{args.size}, {args.steps} steps; lucent on {len(lucent_channels)} of them")
    print("lucent: render_vis(model, 'layer:ch') per channel, its standard transforms and 224 upsampling; "
          "preprocess=False + this model's [-1, 1] scaling; leftover hooks removed after each call")
    print("objective: one evaluator for all, the channel's mean activation at 128 px and at 224 px (bilinear "
          "upsampling, as lucent optimizes), the model's preprocessing, no transforms\n")

    # warm-up: first calls pay one-time costs (allocator, oneDNN primitives)
    run_ours(loaded, args.layer, channels[:2], 2, args.size)
    run_lucent(loaded, args.layer, channels[:1], 2, args.size, freeze=True)

    # Rounds alternate the tools (lucent on one channel, then ours on a share of the channels, ...),
    # so a change in the machine's load hits both alike.
    tools = ["frozen", "ours"] + ([] if args.skip_lucent_unfrozen else ["lucent"])
    k = len(lucent_channels)
    shares = [channels[i * len(channels) // k:(i + 1) * len(channels) // k] for i in range(k)]
    totals = {tool: np.zeros(2) for tool in tools}
    images = {tool: [] for tool in tools}
    chunk = 0
    for i, c in enumerate(lucent_channels):
        sec, img = run_lucent(loaded, args.layer, [c], args.steps, args.size, freeze=True)
        totals["frozen"] += sec
        images["frozen"].append(img)
        sec, img, chunk = run_ours(loaded, args.layer, shares[i], args.steps, args.size)
        totals["ours"] += np.asarray(sec) * len(shares[i])
        images["ours"].append(img)
        if "lucent" in tools:
            sec, img = run_lucent(loaded, args.layer, [c], args.steps, args.size, freeze=False)
            totals["lucent"] += sec
            images["lucent"].append(img)
    seconds = {tool: totals[tool] / (len(channels) if tool == "ours" else k) for tool in tools}
    scores = {tool: {size: score(loaded, args.layer, np.concatenate(images[tool]),
                                 channels if tool == "ours" else lucent_channels, size) for size in SCORE_SIZES}
              for tool in tools}
    names = {"frozen": "lucent, weights frozen (headline)", "lucent": "lucent, model as loaded (weight grads)",
             "ours": f"convscope (all levers, chunks of {chunk})"}

    print(f"{'tool':<42} {'wall s/ch':>10} {'CPU s/ch':>9} {'obj@128':>8} {'obj@224':>8}  (means over channels)")
    for tool in ("frozen", "lucent", "ours"):
        if tool in tools:
            n = len(scores[tool][128])
            print(f"{names[tool]:<42} {seconds[tool][0]:>10.2f} {seconds[tool][1]:>9.2f} "
                  f"{scores[tool][128].mean():>8.3f} {scores[tool][224].mean():>8.3f}  (n={n})", flush=True)

    ours_s, frozen_s = seconds["ours"], seconds["frozen"]
    print(f"\nspeed-up over lucent with frozen weights: {frozen_s[0] / ours_s[0]:.1f}x wall, "
          f"{frozen_s[1] / ours_s[1]:.1f}x CPU time (target >= 5x)")
    if "lucent" in tools:
        print(f"speed-up over lucent on the model as loaded: {seconds['lucent'][0] / ours_s[0]:.1f}x wall, "
              f"{seconds['lucent'][1] / ours_s[1]:.1f}x CPU time")
    objective = []
    for size in SCORE_SIZES:
        ours, theirs = scores["ours"][size][:k], scores["frozen"][size]
        objective.append(f"{ours.mean() / theirs.mean():.2f} at {size} px")
        print(f"objective at {size} px, ours / lucent frozen on the same {k} channels: {ours.mean():.3f} / "
              f"{theirs.mean():.3f} = {ours.mean() / theirs.mean():.2f} (ours higher on {int((ours >= theirs).sum())} "
              f"of {k})", flush=True)
    result = (f"convscope {frozen_s[0] / ours_s[0]:.1f}x faster (wall) than lucent with frozen weights, "
              f"{frozen_s[1] / ours_s[1]:.1f}x CPU time; objective ours/lucent {', '.join(objective)}")

    if not args.skip_levers:
        levers(loaded, args, channels)
    _machine.footer(result)
    return 0


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
