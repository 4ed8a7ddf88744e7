"""Benchmark: feature visualization, convscope vs lucent (torch-lucent), side by side in one process.

Task (issue 3): the default model (EfficientNet-Lite0, real weights), one middle layer,
16 channels, 128x128, 256 steps. lucent runs on its defaults as its README shows, one
``render_vis`` call per channel, with two necessary changes, both printed:

* ``preprocess=False`` plus this model's own scaling ([-1, 1]) as the last transform:
  lucent's built-in preprocessing is torchvision's ImageNet mean/std, wrong for this model;
* the forward hooks that ``render_vis`` leaves on every submodule are removed after each
  call (otherwise every call adds ~250 more and slows the next).

Both tools' final images are scored by one evaluator: the channel's mean activation on the
128x128 image, with the model's preprocessing and no transforms.

Then each of our speed levers is switched off on its own (on fewer channels and steps; a
step costs the same all along, so seconds per channel scale with steps), to show what it
contributes: stop the forward pass at the layer, frozen weights, optimize at the asked
size (lucent upsamples to 224), and batching.

Usage:
    python benchmarks/features.py                               # the full task (long on 2 shared cores)
    python benchmarks/features.py --steps 64 --lucent-channels 2 --lever-steps 16
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import convscope  # noqa: E402
from convscope.capture import capture  # noqa: E402
from convscope.methods.features.engine import Levers, make_recipe, optimize  # noqa: E402
from convscope.methods.features.objectives import channel  # noqa: E402


class Clock:
    """Wall and CPU seconds since creation. CPU time (``process_time``) is what a run costs on a
    machine shared with other jobs; with one thread it is close to the wall time of an idle machine."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def per(self, n: int) -> tuple[float, float]:
        return (time.perf_counter() - self.wall) / n, (time.process_time() - self.cpu) / n


def evaluate(loaded, layer: str, images01: np.ndarray, channels: list[int]) -> np.ndarray:
    """Channel means of ``images01 (N, 3, H, W)`` in [0, 1], no transforms."""
    x = loaded.preprocessing.normalize(torch.from_numpy(np.ascontiguousarray(images01)).float())
    maps = capture(loaded.module, x, [layer])[layer]
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
    parser.add_argument("--skip-lucent-frozen", action="store_true")
    parser.add_argument("--skip-levers", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's). On a machine shared with other jobs, 1 avoids "
                             "OpenMP oversubscription, which otherwise slows every run 10x or more")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    loaded = convscope.load_model(device="cpu")
    _ = loaded.catalogue  # build once, outside the timings
    channels = list(range(args.channels))
    lucent_channels = channels[: args.lucent_channels or args.channels]
    print(f"feature visualization: {loaded.title}, layer {args.layer}, {args.channels} channels, "
          f"{args.size}x{args.size}, {args.steps} steps; CPU, {torch.get_num_threads()} threads")
    print("lucent: render_vis(model, 'layer:ch') per channel, its standard transforms and 224 upsampling; "
          "preprocess=False + this model's [-1, 1] scaling; leftover hooks removed after each call")
    print("(machine shared with other jobs: times are noisy)\n")

    # warm-up: first calls pay one-time costs (allocator, oneDNN primitives)
    run_ours(loaded, args.layer, channels[:2], 2, args.size)
    run_lucent(loaded, args.layer, channels[:1], 2, args.size, freeze=True)

    print(f"{'tool':<44} {'wall s/ch':>10} {'CPU s/ch':>10} {'objective':>10}  (mean over channels; n)", flush=True)

    def row(name, sec, obj):
        print(f"{name:<44} {sec[0]:>10.2f} {sec[1]:>10.2f} {obj.mean():>10.3f}  (n={len(obj)})", flush=True)

    # Rounds alternate the tools (lucent on one channel, then ours on a share of the 16, ...),
    # so a change in the machine's load hits both alike.
    k = len(lucent_channels)
    shares = [channels[i * len(channels) // k:(i + 1) * len(channels) // k] for i in range(k)]
    totals = {"lucent": np.zeros(2), "frozen": np.zeros(2), "ours": np.zeros(2)}
    images = {"lucent": [], "frozen": [], "ours": []}
    chunk = 0
    for i, c in enumerate(lucent_channels):
        sec, img = run_lucent(loaded, args.layer, [c], args.steps, args.size, freeze=False)
        totals["lucent"] += sec
        images["lucent"].append(img)
        sec, img, chunk = run_ours(loaded, args.layer, shares[i], args.steps, args.size)
        totals["ours"] += np.asarray(sec) * len(shares[i])
        images["ours"].append(img)
        if not args.skip_lucent_frozen:
            sec, img = run_lucent(loaded, args.layer, [c], args.steps, args.size, freeze=True)
            totals["frozen"] += sec
            images["frozen"].append(img)
    lucent_s = totals["lucent"] / k
    lucent_obj = evaluate(loaded, args.layer, np.concatenate(images["lucent"]), lucent_channels)
    row("lucent, one render_vis per channel", lucent_s, lucent_obj)
    if not args.skip_lucent_frozen:
        row("lucent, weights frozen", totals["frozen"] / k,
            evaluate(loaded, args.layer, np.concatenate(images["frozen"]), lucent_channels))
    ours_s = totals["ours"] / len(channels)
    ours_obj = evaluate(loaded, args.layer, np.concatenate(images["ours"]), channels)
    row(f"convscope (all levers, chunks of {chunk})", ours_s, ours_obj)

    common = len(lucent_channels)
    print(f"\nspeed-up over lucent's per-channel use: {lucent_s[0] / ours_s[0]:.1f}x wall, "
          f"{lucent_s[1] / ours_s[1]:.1f}x CPU time (target >= 5x)")
    print(f"objective, ours / lucent on the same {common} channels: "
          f"{ours_obj[:common].mean():.3f} / {lucent_obj.mean():.3f} = {ours_obj[:common].mean() / lucent_obj.mean():.2f} "
          f"(ours higher on {int((ours_obj[:common] >= lucent_obj).sum())} of {common})", flush=True)

    if args.skip_levers:
        return 0
    # levers, each switched off alone; the same share of redirected-gradient steps as the full run
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
    for name, levers, max_batch in variants:
        (wall, cpu), _, _ = run_ours(loaded, args.layer, lever_channels, steps, args.size, levers, max_batch, redirect)
        wall, cpu = wall * scale, cpu * scale
        base = base or cpu
        print(f"  {name:<46} {wall:>8.2f} / {cpu:>6.2f}   x{cpu / base:.2f} the CPU time of all levers", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
