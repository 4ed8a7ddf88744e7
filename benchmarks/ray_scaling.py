"""Benchmark: what Ray costs on one machine, and what it projects for a whole-model atlas on many.

The same work three ways, on the default model (EfficientNet-Lite0, real weights):

  local        this process, torch using every core (the plain `convscope atlas` / `scan`);
  ray x1       one Ray actor with every core's worth of torch threads;
  ray x2       two Ray actors with one thread each (2 cores: the pool `--ray auto` makes here).

Work: (a) the atlas's feature-visualization units (chunks of 16 channels of whole layers,
`convscope.atlas.stages.features.visualize_chunk`), (b) a dataset scan of the built-in sample set.
The Ray times include starting the actors and loading one model per actor (a user waits for that
too), not the one-off `ray.init` (printed separately). Overhead = ray x2 time / local time - 1;
target <= 15% at 2 workers on 2 cores. The results are checked: the same image ids and values
within float tolerance for the scan, images within 1/255 and objectives within 1e-3 for features.

The full run also times one unit at the atlas's default budget (16 channels, 256 steps at 128 px)
and projects the whole default model (21,008 channels) over 1, 4, 16 and 64 machines like this
one. That is a PROJECTION: per-unit time measured here, divided by the machines, times the
measured Ray efficiency at 2 workers; it ignores the network and the head's writing (a few
hundred kB per unit).

Run:  .venv/bin/python benchmarks/ray_scaling.py            (full, about 10 min on an idle 2-core machine)
      .venv/bin/python benchmarks/ray_scaling.py --quick    (smoke, about 2 min)
"""

from __future__ import annotations

import argparse
import os
import time

import _machine
import numpy as np
import torch

import convscope
from convscope.atlas.stages.features import FEATURE_CHUNK, FeatureJob, FeatureUnit, visualize_chunk
from convscope.datasets import SampleImages
from convscope.distributed import LocalExecutor, RayExecutor, RayTarget
from convscope.images import sample_photos
from convscope.methods.scan import scan

WHOLE_MODEL_CHANNELS = 21_008


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
        layers, steps, size, scan_images = ["blocks.0.0.bn2", "blocks.1.0.bn3"], 8, 48, 64
    else:
        layers, steps, size, scan_images = ["blocks.0.0.bn2", "blocks.1.0.bn3", "blocks.2.0.bn3"], 32, 64, 256
    units = feature_units(loaded, layers)
    channels = sum(len(u.channels) for u in units)
    photos = dict(list(sample_photos().items())[:4])
    job = FeatureJob("lucid", steps, size, 0, photos)
    images = SampleImages(loaded.preprocessing.input_size, loaded.preprocessing.resample, limit=scan_images)
    print(f"features: {len(units)} units, {channels} channels of {', '.join(layers)}, {steps} steps at {size} px")
    print(f"scan: {len(images)} sample images at 224 px, the default layers, batch 32")

    began = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    print(f"ray.init (a local cluster, once): {time.perf_counter() - began:.1f} s")
    try:
        rows = {}
        local_t, local_f = run_features(LocalExecutor(), loaded, units, job)
        local_s0 = time.perf_counter()
        local_scan = scan(loaded, images, top=9, batch_size=32, progress=False)
        local_s = time.perf_counter() - local_s0
        rows["local"] = (local_t, local_s, "", "")
        for workers in (1, 2):
            target = RayTarget(workers=workers, threads=max(1, cores // workers))
            t, f = run_features(RayExecutor(target), loaded, units, job)
            s0 = time.perf_counter()
            result = scan(loaded, images, top=9, batch_size=32, progress=False, ray=target)
            s = time.perf_counter() - s0
            pixels, objective = compare_features(local_f, f)
            same_ids = all(torch.equal(result.topk.images[n], local_scan.topk.images[n])
                           for n in local_scan.topk.layers)
            worst = max(float((result.topk.values[n] - local_scan.topk.values[n]).abs().max())
                        for n in local_scan.topk.layers)
            rows[f"ray x{workers}"] = (t, s, f"pixels <= {pixels}/255, objective rel {objective:.1e}",
                                       f"ids {'identical' if same_ids else 'DIFFER'}, values max |diff| {worst:.1e}")
        print(f"\n{'run':<8} {'features s':>11} {'ch/s':>7} {'scan s':>8} {'img/s':>7}  check vs local")
        for name, (t, s, fcheck, scheck) in rows.items():
            print(f"{name:<8} {t:>11.1f} {channels / t:>7.2f} {s:>8.1f} {len(images) / s:>7.1f}  {fcheck}; {scheck}")
        f_over = rows["ray x2"][0] / local_t - 1
        s_over = rows["ray x2"][1] / local_s - 1
        print(f"\nRay overhead at 2 workers: features {f_over:+.0%}, scan {s_over:+.0%} (target <= +15%)")

        projection = ""
        if not args.quick:
            unit = FeatureUnit(layers[-1], list(range(FEATURE_CHUNK)), 0)
            began = time.perf_counter()
            visualize_chunk(loaded, unit, FeatureJob("lucid", 256, 128, 0, photos))
            per_channel = (time.perf_counter() - began) / FEATURE_CHUNK
            efficiency = local_t / rows["ray x2"][0]
            print(f"\natlas default budget (256 steps at 128 px), measured locally: {per_channel:.2f} s per channel")
            print(f"PROJECTION for the whole default model ({WHOLE_MODEL_CHANNELS:,} channels), machines like this "
                  f"one, Ray efficiency {efficiency:.2f} (measured above):")
            print(f"{'machines':>9} {'hours':>8}")
            for machines in (1, 4, 16, 64):
                hours = WHOLE_MODEL_CHANNELS * per_channel / machines / efficiency / 3600
                print(f"{machines:>9} {hours:>8.2f}")
            projection = f"; {per_channel:.2f} s/channel at the atlas default -> whole model on 64 machines " \
                         f"{WHOLE_MODEL_CHANNELS * per_channel / 64 / efficiency / 3600:.2f} h (projection)"
        identical = all("DIFFER" not in row[3] for row in rows.values())
    finally:
        ray.shutdown()
    _machine.footer(f"Ray overhead at 2 workers on {cores} cores: features {f_over:+.0%}, scan {s_over:+.0%} "
                    f"(target <= +15%); scan ids {'identical' if identical else 'DIFFER'}{projection}")


if __name__ == "__main__":
    main()
