"""The whole depth profile of the default model at its default settings, timed (target: <= 3 minutes on 2 cores).

Runs :func:`convscope.profile_model` on EfficientNet-Lite0 (real weights): every feature layer,
the sample photos and 96 sample windows, the dead test, both transfer probes against random
init, and projection trust at 6 layers with the cascade; prints the time of each part, the
per-method verdicts and the total. Also writes ``profile.png`` (the README's picture) with
``--out``.

(Not ``profile.py``: run from ``benchmarks/``, that name would shadow the standard library's
``profile`` module, which torch imports.)

Usage:
    python benchmarks/depth_profile.py [--out docs]       # full
    python benchmarks/depth_profile.py --quick            # smoke run: 6 layers, small probes
    python benchmarks/depth_profile.py --validate [LAYER] # the cheap dead test against the full one on a deep layer
"""

from __future__ import annotations

import argparse
import time

import _machine
import torch

import convscope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 layers, small probe sets, 16 scan images")
    parser.add_argument("--out", default=None, help="save the profile (png, md, csv, json) here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--validate", nargs="?", const="blocks.5.2.bn2", default=None, metavar="LAYER",
                        help="instead: the cheap dead test against the full one (256 steps at 128 px) on LAYER's "
                             "silent channels (default blocks.5.2.bn2; minutes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _machine.header("depth profile of the default model (convscope profile)")
    loaded = convscope.load_model(device="cpu")
    if args.validate:
        validate_dead(loaded, args.validate)
        return
    layers = None
    options = {}
    if args.quick:
        features = loaded.catalogue.features
        layers = [features[i].name for i in range(0, len(features), max(1, len(features) // 6))][:6]
        options = {"scan_limit": 16, "far_per_class": 10, "near_per_photo": 10, "trust_layers": 3}
    start = time.perf_counter()
    result = convscope.profile_model(loaded, layers, **options)
    seconds = time.perf_counter() - start
    print(f"layers: {len(result.layers)}; seconds per part:")
    for part, spent in result.seconds.items():
        print(f"  {part:<10} {spent:7.1f} s")
    for name, info in result.methods().items():
        median = info["median_spearman"]
        if median is None:
            print(f"  {name:<10} n/a: {info['verdict']}")
        else:
            print(f"  {name:<10} median Spearman {median:.2f} (edge map {info['edge_spearman']}, chance "
                  f"{info['chance_spearman']}): {info['verdict'].split(':')[0]}")
    if result.far is not None:
        for task in (result.far, result.near):
            gain = task.trained.mean(axis=1) - task.random.mean(axis=1)
            print(f"  {task.task}: trained - random init, mean over folds, shallow to deep: "
                  f"{' '.join(f'{g:+.2f}' for g in gain)}")
    dead = sum(len(result.activity[layer.name].dead) for layer in result.layers)
    silent = sum(len(result.activity[layer.name].silent) for layer in result.layers)
    print(f"  silent channels {silent}, dead {dead}")
    if args.out:
        index = result.save(args.out)
        print(f"wrote {', '.join(index['files'].values())} to {args.out}")
    parts = ", ".join(f"{part} {spent:.0f}" for part, spent in result.seconds.items())
    _machine.footer(f"profile of {len(result.layers)} layers in {seconds:.1f} s ({parts}) "
                    f"({'quick' if args.quick else 'full'}; target <= 180 s on an idle 2-core machine)")


def validate_dead(loaded: convscope.LoadedModel, name: str) -> None:
    """The profile's dead verdict (its defaults) against feature visualization's full recipe, channel by channel."""
    from convscope.datasets import SampleImages
    from convscope.images import sample_photos
    from convscope.methods.profile import DEFAULTS, engine

    layer = loaded.catalogue.get(name)
    photos = sample_photos()
    scan = SampleImages(tuple(loaded.preprocessing.input_size), loaded.preprocessing.resample,
                        limit=DEFAULTS["scan_limit"])
    acts, _ = engine.activity(loaded, [layer], photos, scan, limit=DEFAULTS["scan_limit"])
    silent = acts[name].silent
    start = time.perf_counter()
    cheap = engine.dead_channels(loaded, [layer], acts, steps=DEFAULTS["dead_steps"], size=DEFAULTS["dead_size"],
                                 seed=0)[name]
    cheap_s = time.perf_counter() - start
    start = time.perf_counter()
    full = convscope.visualize_features(loaded, layer, silent, photos=photos, max_batch=len(silent),
                                        memory_budget=1 << 40).dead_channels if silent else []
    full_s = time.perf_counter() - start
    print(f"{name}: {len(silent)} silent; cheap ({DEFAULTS['dead_steps']} steps at {DEFAULTS['dead_size']} px, "
          f"{cheap_s:.0f} s): {len(cheap)} dead {cheap}")
    print(f"  full (256 steps at 128 px, {full_s:.0f} s): {len(full)} dead {full}")
    agree = sorted(cheap) == sorted(full)
    _machine.footer(f"dead test at {name}: cheap {len(cheap)} vs full {len(full)} dead of {len(silent)} silent; "
                    f"{'equal' if agree else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
