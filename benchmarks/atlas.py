"""What a whole-model atlas costs: time and bytes per channel, measured here, projected to every channel.

The atlas's own default settings (``AtlasSettings()``: every channel, its default steps, size,
recipe and whatever else a build uses by default) are what is projected, for the default model
(EfficientNet-Lite0) unless ``--model`` says otherwise. Two measurements:

1. **A budget build** of every default layer, ``--channels`` channels each, ``--steps`` steps, a
   scan of ``--scan-images`` windows of the built-in sample set, over the 3 sample photos. Its
   files give the bytes: per channel (feature image, sprite share, heat-map row, projection row,
   channel page, records) and per layer (photo grids, overlays, layer page), and its stage
   records give the seconds of the cheap stages (scan, pages) and of the activations stage per
   layer at its few channels.
2. **The activations stage on every channel** of the calibration's layers (3 photos): with (1)
   it splits that stage into a cost per layer (forward passes, grids, overlays) and a cost per
   channel (heat maps), each scaled to the photos of the projection.
3. **The atlas's calibration** (:func:`convscope.atlas.plan.calibrate`, the same one
   ``convscope atlas`` prints its projection from) on ``--samples`` layers spread over depth:
   seconds per feature-visualization step and channel, fixed seconds per chunk, seconds per
   projection. Every stage is projected and printed in hours: features, deconv, activations,
   scan, pages and the calibration itself (once; ``convscope atlas`` caches it).

The projection: every channel of every default layer, with the default steps, top 9 from a
scan of ``--full-scan`` images, ``--full-photos`` photos. Heat maps and per-layer photo files
scale with the photos; scan source images with min(scan, channels x 9). Times are wall times on
this machine with torch's threads. Bytes are apparent sizes; "on disk" rounds each file up to
4 KiB blocks (most file systems). From the same calibration it also projects lighter builds,
``--steps N --projections K`` (every channel keeps its top 9 examples, the strongest K projected):
their time only; their quality is ``benchmarks/features.py --fast-steps``'s to measure.

Run: python benchmarks/atlas.py [--model default] [--channels 2] [--steps 32]
Quick smoke run: python benchmarks/atlas.py --quick
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import _machine
import torch
from PIL import Image

import convscope
from convscope.atlas import AtlasSettings, build_atlas
from convscope.atlas import plan as atlas_plan
from convscope.atlas.driver import atlas_layers
from convscope.atlas.stages import ActivationsStage
from convscope.images import sample_photos

BLOCK = 4096
_PER_CHANNEL = re.compile(r"^(data/(features|activations|deconv)/[^/]+/c\d{4}(_heat)?\.webp|L/[^/]+/\d+\.html)$")


def load(spec: str) -> convscope.LoadedModel:
    if spec == "default":
        return convscope.load_model(device="cpu")
    try:
        return convscope.load_model(spec, device="cpu")
    except convscope.ConvscopeError:
        print(f"(no cached weights for {spec}: random init; the cost is the same)")
        return convscope.load_model(spec, random=True, device="cpu")


def on_disk(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def measure_files(out: Path, slugs: list[str]) -> dict:
    """Bytes of the built atlas by kind: per channel, per layer (per photo), scan sources, the rest."""
    kinds = {"feature": [0, 0], "heat": [0, 0], "projections": [0, 0], "page": [0, 0], "sprite": [0, 0],
             "records": [0, 0], "layer": [0, 0], "scan": [0, 0], "shared": [0, 0]}
    for path in out.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(out).as_posix()
        size = path.stat().st_size
        if _PER_CHANNEL.match(rel):
            kind = ("heat" if rel.endswith("_heat.webp") else "page" if rel.endswith(".html") else
                    "feature" if rel.startswith("data/features/") else "projections")
        elif "/sprite" in rel:
            kind = "sprite"
        elif rel.startswith("records/") and not rel.startswith("records/activations/") and any(
                rel.endswith(f"/{slug}.json") for slug in slugs):
            kind = "records"  # the activations record holds every channel's peaks already: per layer
        elif rel.startswith("records/activations/"):
            kind = "layer"
        elif rel.startswith("data/scan-images/"):
            kind = "scan"
        elif any(f"/{slug}/" in rel for slug in slugs):
            kind = "layer"
        else:
            kind = "shared"
        kinds[kind][0] += size
        kinds[kind][1] += on_disk(size)
    scan_files = sum(1 for _ in (out / "data/scan-images").glob("*")) if (out / "data/scan-images").is_dir() else 0
    return {"kinds": kinds, "scan_files": scan_files}


# (steps, projections) of the lighter builds projected beside the default (80 steps, 9 projections).
LIGHTER = [(80, 9), (80, 3), (48, 9), (48, 3), (32, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--channels", type=int, default=2, help="channels per layer in the measured build")
    parser.add_argument("--steps", type=int, default=32, help="feature-visualization steps in the measured build")
    parser.add_argument("--scan-images", type=int, default=32, help="images scanned in the measured build")
    parser.add_argument("--samples", type=int, default=6, help="layers the calibration measures")
    parser.add_argument("--full-photos", type=int, default=8)
    parser.add_argument("--full-scan", type=int, default=10_000)
    parser.add_argument("--out", default=None, help="keep the measured atlas here (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 channel per layer, 8 steps, 8 scanned "
                                                             "images, 2 calibration layers")
    args = parser.parse_args()
    if args.quick:
        args.channels, args.steps, args.scan_images, args.samples = 1, 8, 8, 2
    _machine.header("benchmark: what a whole-model atlas costs (wall time and bytes, measured and projected)")

    loaded = load(args.model)
    defaults = AtlasSettings()
    photos = sample_photos()
    layers = atlas_layers(loaded, defaults.layers)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        scan_dir = out / "scan-set"
        scan_dir.mkdir(parents=True, exist_ok=True)
        from convscope.datasets import SampleImages

        windows = SampleImages(loaded.preprocessing.input_size)
        for i in range(min(args.scan_images, len(windows))):
            Image.fromarray(windows.load(i)).save(scan_dir / f"w{i:04d}.png")
        settings = replace(defaults, channels_per_layer=args.channels, steps=args.steps, scan_images=str(scan_dir))
        start = time.perf_counter()
        build = build_atlas(loaded, photos, out / "atlas", settings)
        wall = time.perf_counter() - start
        manifest = json.loads((build.out / "atlas.json").read_text())
        slugs = [layer["slug"] for layer in manifest["layers"]]
        files = measure_files(build.out, slugs)
        built_channels = sum(len(layer["visualised"]) for layer in manifest["layers"])

        # The activations stage on every channel of the calibration's layers, against their
        # per-layer cost in the measured build: the cost per channel (heat maps).
        sampled = [layers[i] for i in atlas_plan._spread(len(layers), args.samples)]
        whole = replace(settings, channels_per_layer=None, layers=",".join(layer.name for layer in sampled))
        acts_out = out / "activations-whole"
        build_atlas(loaded, photos, acts_out, whole, stages=[ActivationsStage()], progress=False)
        acts_layer = {layer["slug"]: json.loads((build.out / "records/activations" / f"{layer['slug']}.json")
                                                .read_text())["seconds"] for layer in manifest["layers"]}
        acts_whole = {layer["slug"]: json.loads((acts_out / "records/activations" / f"{layer['slug']}.json")
                                                .read_text())["seconds"]
                      for layer in json.loads((acts_out / "atlas.json").read_text())["layers"]}
        built_per_layer = {layer["slug"]: len(layer["visualised"]) for layer in manifest["layers"]}
        extra = sum(layer.channels - built_per_layer[slug] for layer, slug in zip(sampled, acts_whole))
        per_heat_channel = max(sum(acts_whole[slug] - acts_layer[slug] for slug in acts_whole), 0.0) / max(extra, 1)

        start = time.perf_counter()
        # as for the projected atlas: with a scan (the deconv stage then checks crops against its values)
        rates = atlas_plan.calibrate(loaded, layers, replace(defaults, scan_images="(full scan)"), photos,
                                     samples=args.samples)
        calibration = time.perf_counter() - start

    stages = build.stages
    photos_n, full_photos = len(photos), args.full_photos
    full_settings = replace(defaults, scan_images="(full scan)")
    plan = atlas_plan.plan_atlas(layers, full_settings, rates, full_photos)
    channels = plan.total_channels
    print(f"\nmeasured build on {loaded.title}: {len(layers)} layers, {args.channels} channel(s) each "
          f"({built_channels} channels), {args.steps} steps, {photos_n} photos, scan of {args.scan_images} images; "
          f"wall {wall:.0f} s")
    print("per-stage seconds (measured build):", {k: v.get("seconds") for k, v in stages.items()})
    print(f"calibration ({args.samples} layers, {atlas_plan.CALIBRATION_STEPS} steps each): {calibration:.0f} s")

    # --- time
    total = dict(plan.stage_seconds)                                # features, deconv: from the calibration
    pages = 1 + len(layers) + built_channels
    per_page = stages["pages"]["seconds"] / pages
    # the activations stage: per layer (forward passes, grids, overlays) and per channel (heat maps), both per photo
    print(f"activations stage: {sum(acts_layer.values()):.1f} s for {len(layers)} layers at {args.channels} "
          f"channel(s), {per_heat_channel * 1000:.1f} ms per further channel (every channel of "
          f"{len(sampled)} layers), {photos_n} photos")
    total["activations"] = (sum(acts_layer.values()) + per_heat_channel * (channels - built_channels)) \
        * full_photos / photos_n
    total["scan"] = args.full_scan * stages["scan"]["seconds"] / max(args.scan_images, 1)
    total["pages"] = (1 + len(layers) + channels) * per_page
    total["calibration"] = calibration * atlas_plan.CALIBRATION_LAYERS / args.samples   # once: it is cached
    hours = sum(total.values()) / 3600
    print(f"\nwhole {args.model} atlas: {channels} channels, {len(layers)} layers, {defaults.steps} steps at "
          f"{defaults.feature_size} px (the atlas's defaults), {full_photos} photos, top {defaults.top} "
          f"of a {args.full_scan}-image scan")
    header = f"{'layer':<18} {'C':>5} {'s/step/ch':>10} {'fixed s':>8} {'s/proj':>7} {'hours':>6}"
    print(header)
    for layer in layers:
        rate = rates[layer.name]
        print(f"{layer.alias or layer.name:<18} {layer.channels:>5} {rate.step:>10.4f} {rate.fixed:>8.2f} "
              f"{rate.projection:>7.3f} {plan.seconds[layer.name] / 3600:>6.2f}")
    for name, seconds in total.items():
        print(f"  {name:<18} {seconds / 3600:8.2f} wall hours")
    print(f"  {'total':<18} {hours:8.2f} wall hours (projected; this machine, CPU, {torch.get_num_threads()} threads)")

    # Lighter builds from the same calibration (its rates are per step and per projection): what
    # `--steps N --projections K` would cost (every channel still shows its top 9 examples; the
    # strongest K get projections). Their quality is measured apart (benchmarks/features.py
    # --fast-steps; README), not here.
    other = total["activations"] + total["scan"] + total["pages"] + total["calibration"]
    print(f"\nlighter whole atlases, same calibration (`convscope atlas --yes --steps N --projections K`: top "
          f"{defaults.top} examples per channel, the strongest K projected; activations, scan, pages: "
          f"{other / 3600:.2f} h as above):")
    print(f"{'steps':>6} {'proj':>5} {'features h':>11} {'deconv h':>9} {'total h':>8}")
    lighter = {}
    for steps, projections in LIGHTER:
        light = atlas_plan.plan_atlas(layers, replace(full_settings, steps=steps, projections=projections), rates,
                                      full_photos)
        stage = light.stage_seconds
        lighter[(steps, projections)] = (stage["features"] + stage["deconv"] + other) / 3600
        print(f"{steps:>6} {projections:>5} {stage['features'] / 3600:>11.2f} {stage['deconv'] / 3600:>9.2f} "
              f"{lighter[(steps, projections)]:>8.2f}")

    # --- bytes
    kinds = files["kinds"]
    full_bytes = [0.0, 0.0]
    # per channel and kind, for the whole atlas: heat maps scale with the photos
    scale = {"heat": full_photos / photos_n}
    per_kind = {k: kinds[k][0] * scale.get(k, 1.0) / built_channels / 1024
                for k in ("feature", "heat", "projections", "page", "sprite", "records")}
    for i in (0, 1):
        per_channel = sum(kinds[k][i] * scale.get(k, 1.0) for k in per_kind) / built_channels
        per_layer = kinds["layer"][i] * full_photos / photos_n
        scan = kinds["scan"][i] / max(files["scan_files"], 1) * min(args.full_scan, channels * defaults.top)
        full_bytes[i] = per_channel * channels + per_layer + scan + kinds["shared"][i]
    measured = sum(v[0] for v in kinds.values())
    print(f"\nbytes: the measured build holds {measured / 2**20:.1f} MB for {built_channels} channels; by kind (KB): "
          + ", ".join(f"{k} {v[0] / 1024:.0f}" for k, v in kinds.items()))
    apparent, disk = (b / channels / 1024 for b in full_bytes)
    print("whole atlas, KB per channel by kind: " + ", ".join(f"{k} {v:.1f}" for k, v in per_kind.items())
          + f", per-layer files {full_bytes[0] and (kinds['layer'][0] * full_photos / photos_n) / channels / 1024:.1f}"
          + f", scan images {kinds['scan'][0] / max(files['scan_files'], 1) * min(args.full_scan, channels * defaults.top) / channels / 1024:.1f}")
    print(f"whole atlas: {full_bytes[0] / 2**30:.2f} GB, {apparent:.1f} KB per channel "
          f"({full_bytes[1] / 2**30:.2f} GB, {disk:.1f} KB per channel on disk in 4 KiB blocks)")
    per_stage = ", ".join(f"{name} {seconds / 3600:.2f}" for name, seconds in total.items())
    _machine.footer(f"whole {args.model} atlas ({channels} channels, {defaults.steps} steps at {defaults.feature_size} px, "
                    f"{args.full_scan}-image scan): {hours:.1f} wall hours projected on this machine ({per_stage} h), "
                    f"{apparent:.0f} KB per channel ({disk:.0f} KB on disk); lighter: "
                    + ", ".join(f"--steps {n} --projections {k} {h:.1f} h" for (n, k), h in lighter.items()))


if __name__ == "__main__":
    main()
