"""Occlusion maps: convscope (incremental and plain batched) versus captum's ``Occlusion``.

Task: the default model (EfficientNet-Lite0, real weights) on scikit-image's chelsea at
224x224, a 32-px gray occluder with stride 8 (25x25 = 625 positions), target = top class.

captum's ``Occlusion`` returns a pixel map: each pixel gets the mean, over the windows that
cover it, of ``p0 - p(occluded)``. To compare like with like, our per-position probability
map is turned into the same pixel map (same windows, same averaging), and the script
prints the largest absolute difference between the two.

Each method runs ``--repeats`` times (at least 3), interleaved; the best wall time is reported
(this machine may be shared: say so next to the figures), with the process CPU time beside it.

Usage:
    python benchmarks/occlusion.py [--threads 1] [--repeats 3] [--ppe 1,32]
    python benchmarks/occlusion.py --quick        # smoke run: stride 32 (7x7 positions), still 3 repeats
"""

from __future__ import annotations

import argparse
import time

import _machine
import numpy as np
import torch

import convscope
from convscope.methods.occlusion import occlusion


def ours_as_captum(res, height: int, width: int) -> np.ndarray:
    """Our probability map in captum's pixel form: mean of ``p0 - p`` over the windows covering each pixel."""
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    for i, top in enumerate(res.tops):
        for j, left in enumerate(res.lefts):
            total[top:top + res.patch, left:left + res.patch] += res.base_probability - res.probability[i, j]
            count[top:top + res.patch, left:left + res.patch] += 1
    return total / np.maximum(count, 1)


def run_captum(loaded, x0: torch.Tensor, fill: torch.Tensor, target: int, patch: int, stride: int, ppe: int):
    from captum.attr import Occlusion

    module = loaded.module

    def forward(x):
        return module(x).softmax(-1)

    with convscope.frozen(module), torch.no_grad():
        attr = Occlusion(forward).attribute(x0, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride),
                                            baselines=fill, target=target, perturbations_per_eval=ppe)
    return attr[0, 0].double().numpy()


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared, oversubscribed CPU, OpenMP barriers make "
                             "2 threads several times slower for every method; 0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every method, at least 3")
    parser.add_argument("--ppe", default="1,32", help="captum perturbations_per_eval values to time")
    parser.add_argument("--batch", type=int, default=None, help="our copies per forward pass (default: automatic)")
    parser.add_argument("--quick", action="store_true", help="smoke run: stride 32 (49 positions); repeats unchanged")
    args = parser.parse_args()
    if args.repeats < 3:
        # one run of a method on a shared machine says more about the neighbours than about the method
        parser.error("--repeats must be at least 3; use --quick for a cheaper run")
    if args.quick:
        args.stride = 32
    if args.threads:
        torch.set_num_threads(args.threads)
    _machine.header("benchmark: occlusion maps, convscope vs captum Occlusion")

    loaded = convscope.load_model(device="cpu")
    photo = convscope.sample_photos(("chelsea",))["chelsea"]
    size = (args.size, args.size)
    common = dict(patch=args.patch, stride=args.stride, size=size, batch_size=args.batch)
    warm = occlusion(loaded, photo, patch=args.patch, stride=max(args.stride, args.size // 2), size=size)  # warm-up
    rgb = loaded.preprocessing.fit(photo, size)
    x0 = loaded.preprocessing.to_tensor(rgb)
    gray = loaded.preprocessing.normalize(torch.full_like(x0, 0.5))
    target = warm.target

    runs: dict[str, list] = {}
    results: dict[str, object] = {}
    ppes = [int(v) for v in args.ppe.split(",") if v]
    for _ in range(args.repeats):
        for name, fn in [
            ("convscope incremental", lambda: occlusion(loaded, photo, method="incremental", **common)),
            ("convscope plain batched", lambda: occlusion(loaded, photo, method="plain", **common)),
            *[(f"captum Occlusion ppe={p}",
               (lambda p=p: run_captum(loaded, x0, gray, target, args.patch, args.stride, p))) for p in ppes],
        ]:
            out, wall, cpu = timed(fn)
            runs.setdefault(name, []).append((wall, cpu))
            results[name] = out

    ours = results["convscope incremental"]
    plain = results["convscope plain batched"]
    print(f"model: {loaded.title}; image chelsea {size[0]}x{size[1]}; patch {args.patch}, stride {args.stride}: "
          f"{ours.shape[0]}x{ours.shape[1]} = {ours.probability.size} occluded copies; target {ours.target_name}")
    print(f"torch threads: {torch.get_num_threads()}; best of {args.repeats} (wall), CPU time of that run")
    best = {name: min(times) for name, times in runs.items()}
    reference = best["convscope incremental"][0]
    print(f"{'method':<28} {'wall s':>8} {'cpu s':>8} {'wall vs ours':>13}")
    for name, (wall, cpu) in best.items():
        print(f"{name:<28} {wall:8.2f} {cpu:8.2f} {wall / reference:12.2f}x")
    print(f"incremental engine: {ours.method}; conv multiply-adds done: "
          f"{ours.incremental.get('conv_mac_fraction', 1.0):.1%} of the plain forward's")
    print(f"max |p| difference, incremental vs plain (per-position maps): "
          f"{np.abs(ours.probability - plain.probability).max():.2e}")
    ours_pixels = ours_as_captum(ours, *size)
    diffs = []
    for name in results:
        if name.startswith("captum"):
            diff = np.abs(ours_pixels - results[name]).max()
            diffs.append(diff)
            print(f"max |difference| vs {name} (pixel maps, captum's form): {diff:.2e}")
    captum = min((wall, name) for name, (wall, _) in best.items() if name.startswith("captum"))
    _machine.footer(f"convscope incremental {captum[0] / reference:.2f}x faster (wall, best of {args.repeats}) than the "
                    f"fastest captum run ({captum[1]}), plain batched {captum[0] / best['convscope plain batched'][0]:.2f}x; "
                    f"max |difference| {max(diffs):.1e}")


if __name__ == "__main__":
    main()
