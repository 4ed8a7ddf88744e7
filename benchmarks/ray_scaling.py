"""Benchmark: what Ray costs on one machine, and what it projects for a whole-model atlas on many.

The same work three ways, on the default model (EfficientNet-Lite0, real weights):

  local        this process, torch using every core (the plain `convscope atlas` / `scan`);
  ray x1       one Ray actor with every core's worth of torch threads;
  ray x2       two Ray actors with one thread each (2 cores: the pool `--ray auto` makes here).

Work: (a) the atlas's feature-visualization units (chunks of 16 channels of whole layers,
`convscope.atlas.stages.features.visualize_chunk`), (b) a dataset scan of JPEG files (the sample
set's windows, with their mirror images, written to a temporary folder: a real scan reads files).
The Ray times include starting the actors and loading one model per actor (a user waits for that
too), not the one-off `ray.init` (printed separately; the cluster is the one `--ray auto` starts, whose
first worker processes import torch, timm and convscope as they start: the benchmark waits for the
machine to settle before timing anything, and only the first pool finds those workers). Overhead = ray x2 time / local time - 1;
target <= 15% at 2 workers on 2 cores. The results are checked: the same image ids and values
within float tolerance for the scan, images within 1/255 and objectives within 1e-3 for features.

The scan runs at two lengths (local and ray x2), which splits Ray's overhead into a fixed start-up
cost (seconds once per run: actor processes, imports, model loads, Ray Data's start) and a steady
per-image cost: a straight line t = fixed + n * per_image through the two MEASURED points of each.
The overhead of a whole-model scan (the atlas scans 10,000 images by default) is then PROJECTED
from the two lines, and printed as such. The ray x1 scan runs first on the cluster, so it alone
pays Ray Data's own helper actors (started once per cluster; `--ray auto` starts a cluster per run).

The features run at two step counts too (fixed start-up and steady per-step overhead).

The full run then MEASURES Ray's overhead on the atlas's own work: every channel of two whole layers
(blocks.3.0.bn3 and blocks.4.0.bn3: 192 channels, 12 units of 16) at the atlas's defaults (its
recipe, steps, size and precision), local against ray x2, a few minutes each: a unit of the real
work, not the ~10-s probe above, whose start-up dominates. From its per-channel time it projects the whole
default model (21,008 channels) over 1, 4, 16 and 64 machines like this one. That is a PROJECTION:
that layer pair's per-channel time (mid-depth layers; the deepest cost more, benchmarks/atlas.py weighs every layer),
divided by the machines, times the Ray efficiency measured on that work; it ignores the network and
the head's writing (a few hundred kB per unit).

Run:  .venv/bin/python benchmarks/ray_scaling.py            (full, about 15 min on an idle 2-core machine)
      .venv/bin/python benchmarks/ray_scaling.py --quick    (smoke, about 2 min)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _machine
import numpy as np
import torch
from PIL import Image

import convscope
from convscope.atlas import AtlasSettings
from convscope.atlas.context import ATLAS_RECIPE
from convscope.atlas.stages.features import FEATURE_CHUNK, FeatureJob, FeatureUnit, visualize_chunk
from convscope.datasets import FolderImages, SampleImages
from convscope.distributed import LocalExecutor, RayExecutor, RayTarget, local_cluster_options
from convscope.images import sample_photos
from convscope.methods.scan import scan
from convscope.precision import FP32, PICTURE, resolve_precision

WHOLE_MODEL_CHANNELS = 21_008
WHOLE_SCAN_IMAGES = 10_000   # the atlas's default --scan-limit
ATLAS_WORK_LAYERS = ["blocks.3.0.bn3", "blocks.4.0.bn3"]   # 80 + 112 channels: 12 units of 16


def feature_units(loaded, layers: list[str]) -> list[FeatureUnit]:
    units = []
    for name in layers:
        count = loaded.catalogue.get(name).channels
        units += [FeatureUnit(name, list(range(first, min(first + FEATURE_CHUNK, count))), first)
                  for first in range(0, count, FEATURE_CHUNK)]
    return units


def run_features(executor, loaded, units, job) -> tuple[float, dict]:
    began = time.perf_counter()
    out = {(u.layer, u.first): result for u, result in executor.map(loaded, visualize_chunk, units, job)}
    return time.perf_counter() - began, out


def compare_features(a: dict, b: dict) -> tuple[int, float]:
    """Largest pixel difference and largest relative objective difference over every channel."""
    pixels, objective = 0, 0.0
    for key, (images, records, _) in a.items():
        other_images, other_records, _ = b[key]
        pixels = max(pixels, int(np.abs(images.astype(np.int16) - other_images.astype(np.int16)).max()))
        for r, s in zip(records, other_records):
            objective = max(objective, abs(r["objective"] - s["objective"]) / max(abs(r["objective"]), 1e-9))
    return pixels, objective


def write_images(folder: Path, count: int) -> None:
    """``count`` JPEG files of 256 px: the sample set's windows, then their mirror images."""
    windows = SampleImages((256, 256))
    for i in range(count):
        rgb = windows.load(i % len(windows))
        flip = (i // len(windows)) % 4
        rgb = rgb[:, ::-1] if flip & 1 else rgb
        rgb = rgb[::-1] if flip & 2 else rgb
        Image.fromarray(np.ascontiguousarray(rgb)).save(folder / f"{i:05d}.jpg", quality=90)


def timed_scan(loaded, images, **options):
    began = time.perf_counter()
    result = scan(loaded, images, top=9, batch_size=32, progress=False, **options)
    return time.perf_counter() - began, result


def line(short: tuple[int, float], long: tuple[int, float]) -> tuple[float, float]:
    """``(fixed seconds, seconds per image)`` of the straight line through two (images, seconds) points."""
    (n0, t0), (n1, t1) = short, long
    per_image = (t1 - t0) / (n1 - n0)
    return t0 - n0 * per_image, per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a smaller unit set and scan")
    args = parser.parse_args()
    _machine.header("convscope benchmark: Ray on one machine (local vs 1 and 2 Ray workers)")
    import ray

    cores = os.cpu_count() or 2
    torch.set_num_threads(cores)
    loaded = convscope.load_model(device="cpu")
    if args.quick:
        layers, steps, size, lengths = ["blocks.0.0.bn2", "blocks.1.0.bn3"], 8, 48, (64, 192)
    else:
        layers, steps, size, lengths = ["blocks.0.0.bn2", "blocks.1.0.bn3", "blocks.2.0.bn3"], 32, 64, (256, 1024)
    units = feature_units(loaded, layers)
    channels = sum(len(u.channels) for u in units)
    photos = dict(list(sample_photos().items())[:4])
    job = FeatureJob("lucid", steps, size, 0, photos, FP32)
    folder = tempfile.TemporaryDirectory(prefix="convscope-ray-scan-")
    write_images(Path(folder.name), lengths[1])
    images = FolderImages(folder.name, loaded.preprocessing.input_size, loaded.preprocessing.resample)
    print(f"features: {len(units)} units, {channels} channels of {', '.join(layers)}, {steps} steps at {size} px")
    print(f"scan: {lengths[1]} JPEG files (256 px) at 224 px, the default layers, batch 32; local and ray x2 also "
          f"over the first {lengths[0]} (for the fixed / per-image split)")

    began = time.perf_counter()
    ray.init(**local_cluster_options(num_cpus=cores))   # the cluster `--ray auto` starts (workers preload torch)
    print(f"ray.init (a local cluster, once): {time.perf_counter() - began:.1f} s; its first workers' imports "
          f"done {_machine.settle():.0f} s later (waited: nothing else runs during a timing)")
    try:
        rows = {}
        local_t, local_f = run_features(LocalExecutor(), loaded, units, job)
        long_job = FeatureJob("lucid", 4 * steps, size, 0, photos, FP32)
        local_long, _ = run_features(LocalExecutor(), loaded, units, long_job)
        local_short, _ = timed_scan(loaded, images, stop=lengths[0])
        local_s, local_scan = timed_scan(loaded, images)
        rows["local"] = (local_t, local_s, "", "")
        for workers in (1, 2):
            target = RayTarget(workers=workers, threads=max(1, cores // workers))
            t, f = run_features(RayExecutor(target), loaded, units, job)
            if workers == 2:
                ray_long, _ = run_features(RayExecutor(target), loaded, units, long_job)
                ray_short, _ = timed_scan(loaded, images, stop=lengths[0], ray=target)
            s, result = timed_scan(loaded, images, ray=target)
            pixels, objective = compare_features(local_f, f)
            same_ids = all(torch.equal(result.topk.images[n], local_scan.topk.images[n])
                           for n in local_scan.topk.layers)
            worst = max(float((result.topk.values[n] - local_scan.topk.values[n]).abs().max())
                        for n in local_scan.topk.layers)
            rows[f"ray x{workers}"] = (t, s, f"pixels <= {pixels}/255, objective rel {objective:.1e}",
                                       f"ids {'identical' if same_ids else 'DIFFER'}, values max |diff| {worst:.1e}")
        print(f"\n{'run':<8} {'features s':>11} {'ch/s':>7} {'scan s':>8} {'img/s':>7}  check vs local")
        for name, (t, s, fcheck, scheck) in rows.items():
            print(f"{name:<8} {t:>11.1f} {channels / t:>7.2f} {s:>8.1f} {lengths[1] / s:>7.1f}  {fcheck}; {scheck}")
        f_over = rows["ray x2"][0] / local_t - 1
        s_over = rows["ray x2"][1] / local_s - 1
        print(f"\nRay overhead at 2 workers, MEASURED: features {f_over:+.0%}; scan of {lengths[1]} images {s_over:+.0%}"
              " (target <= +15%)")
        long_over = ray_long / local_long - 1

        f_local = line((steps, local_t), (4 * steps, local_long))
        f_ray = line((steps, rows["ray x2"][0]), (4 * steps, ray_long))
        f_steady = f_ray[1] / f_local[1] - 1
        print(f"features, MEASURED at {steps} and {4 * steps} steps: local {local_t:.1f} s and {local_long:.1f} s, "
              f"ray x2 {rows['ray x2'][0]:.1f} s and {ray_long:.1f} s (overhead at {4 * steps} steps {long_over:+.0%})")
        print(f"  Ray's overhead: fixed start-up {f_ray[0] - f_local[0]:+.1f} s once per run; steady "
              f"{f_steady:+.0%} per step (what a long run such as a whole-model atlas pays)")
        local_fixed, local_per = line((lengths[0], local_short), (lengths[1], local_s))
        ray_fixed, ray_per = line((lengths[0], ray_short), (lengths[1], rows["ray x2"][1]))
        print(f"scan, MEASURED at {lengths[0]} and {lengths[1]} images: local {local_short:.1f} s and {local_s:.1f} s, "
              f"ray x2 {ray_short:.1f} s and {rows['ray x2'][1]:.1f} s")
        print(f"  straight lines through them: local {local_fixed:.1f} s + {1000 * local_per:.1f} ms/image, "
              f"ray x2 {ray_fixed:.1f} s + {1000 * ray_per:.1f} ms/image")
        fixed, per_image = ray_fixed - local_fixed, ray_per - local_per
        print("  (the ray x2 runs find Ray Data's helper actors started by the ray x1 scan: once per cluster)")
        print(f"  Ray's overhead: fixed start-up {fixed:+.1f} s once per run; steady {1000 * per_image:+.2f} ms/image "
              f"({ray_per / local_per - 1:+.0%} per image)")
        whole = (ray_fixed + WHOLE_SCAN_IMAGES * ray_per) / (local_fixed + WHOLE_SCAN_IMAGES * local_per) - 1
        print(f"  PROJECTED for a {WHOLE_SCAN_IMAGES:,}-image scan (the atlas default; from the two lines, not run): "
              f"local {local_fixed + WHOLE_SCAN_IMAGES * local_per:.0f} s, ray x2 "
              f"{ray_fixed + WHOLE_SCAN_IMAGES * ray_per:.0f} s, overhead {whole:+.0%}")

        projection = ""
        if not args.quick:
            defaults = AtlasSettings()
            precision = resolve_precision(defaults.precision, "cpu", purpose=PICTURE, module=loaded.module)
            atlas_job = FeatureJob(ATLAS_RECIPE, defaults.steps, defaults.feature_size, 0, photos, precision)
            atlas_units = feature_units(loaded, ATLAS_WORK_LAYERS)
            atlas_channels = sum(len(u.channels) for u in atlas_units)
            atlas_local, atlas_f = run_features(LocalExecutor(), loaded, atlas_units, atlas_job)
            atlas_ray, atlas_rf = run_features(RayExecutor(RayTarget(workers=2, threads=max(1, cores // 2))),
                                               loaded, atlas_units, atlas_job)
            pixels, objective = compare_features(atlas_f, atlas_rf)
            atlas_over = atlas_ray / atlas_local - 1
            per_channel = atlas_local / atlas_channels
            print(f"\natlas work, MEASURED: every channel of {', '.join(ATLAS_WORK_LAYERS)} ({atlas_channels} channels, "
                  f"{len(atlas_units)} units; {ATLAS_RECIPE} recipe, {defaults.steps} steps at {defaults.feature_size} px, "
                  f"{precision.describe()}): local {atlas_local:.1f} s, ray x2 {atlas_ray:.1f} s -> Ray overhead "
                  f"{atlas_over:+.0%} (target <= +15%); pixels <= {pixels}/255, objective rel {objective:.1e}")
            # at most 1: one-thread actors beating a two-thread process is this machine's arithmetic,
            # not a gain to carry to a cluster
            efficiency = min(1.0, atlas_local / atlas_ray)
            print(f"PROJECTION for the whole default model ({WHOLE_MODEL_CHANNELS:,} channels) at {per_channel:.2f} s "
                  f"per channel, machines like this one, Ray efficiency {efficiency:.2f} (measured on that work), "
                  "features only (projections add about half again, deep layers cost more: benchmarks/atlas.py):")
            print(f"{'machines':>9} {'hours':>8}")
            for machines in (1, 4, 16, 64):
                hours = WHOLE_MODEL_CHANNELS * per_channel / machines / efficiency / 3600
                print(f"{machines:>9} {hours:>8.2f}")
            projection = f"; atlas work ({atlas_channels} channels, {atlas_local:.0f} s local) {atlas_over:+.0%} measured"
        identical = all("DIFFER" not in row[3] for row in rows.values())
    finally:
        ray.shutdown()
        folder.cleanup()
    _machine.footer(f"Ray overhead at 2 workers on {cores} cores: features {f_over:+.0%} measured "
                    f"({f_steady:+.0%} steady per step); scan of {lengths[1]} images "
                    f"{s_over:+.0%} measured (fixed {fixed:+.1f} s, {1000 * per_image:+.2f} ms/image), "
                    f"{whole:+.0%} projected at {WHOLE_SCAN_IMAGES:,} images (target <= +15%); "
                    f"scan ids {'identical' if identical else 'DIFFER'}{projection}")

if __name__ == "__main__":
    main()
