"""What a full atlas costs: per-stage rates measured on a budget build, extrapolated to every channel.

Builds the atlas of a model (default VGG19; real weights when cached, else random init, which
costs the same) over the sample photos with a small budget: every layer, ``--channels`` channels
per layer, ``--steps`` feature-visualization steps, a scan of ``--scan-images`` windows of the
built-in sample set. Each stage's record holds the seconds it spent per layer, so the rates are
per layer: seconds per channel-step of feature visualization, per projection of the deconvnet,
per photo and channel of the activation overlays, per image of the scan, per page.

Then prints what the full atlas would cost: every channel of every conv layer, 256 steps at
128 px, top 9 from a scan of ``--full-scan`` images, ``--full-photos`` photos. All times are wall
times (``perf_counter``) on this machine with torch's threads, so the totals are wall hours,
not CPU-hours.

No peer tool builds such an atlas offline: OpenAI Microscope is a precomputed website for 8
fixed models, and Lucid/lucent render one channel per call (see benchmarks/features.py for
that side-by-side). This script only reports our own rates.

Run: python benchmarks/atlas.py [--model vgg19] [--channels 2] [--steps 32]
Quick smoke run: python benchmarks/atlas.py --quick
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _machine
import numpy as np
import torch
from PIL import Image

import convscope
from convscope import render
from convscope.atlas import AtlasSettings, build_atlas
from convscope.atlas.store import save_picture
from convscope.images import sample_photos


def load(spec: str) -> convscope.LoadedModel:
    try:
        return convscope.load_model(spec, device="cpu")
    except convscope.ConvscopeError:
        print(f"(no cached weights for {spec}: random init; the cost is the same)")
        return convscope.load_model(spec, random=True, device="cpu")


def overlay_rate(photo: np.ndarray, maps: np.ndarray, out: Path, n: int = 40) -> float:
    """Seconds per channel overlay (heat map over a photo, JPEG)."""
    start = time.perf_counter()
    for i in range(n):
        save_picture(out, f"bench/o{i}.jpg", render.overlay_heatmap(photo, maps[i % len(maps)], low=0, high=1),
                     fmt="jpeg")
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg19")
    parser.add_argument("--channels", type=int, default=2, help="channels per layer in the measured build")
    parser.add_argument("--steps", type=int, default=32, help="feature-visualization steps in the measured build")
    parser.add_argument("--scan-images", type=int, default=32, help="images scanned in the measured build")
    parser.add_argument("--full-steps", type=int, default=256)
    parser.add_argument("--full-photos", type=int, default=8)
    parser.add_argument("--full-scan", type=int, default=10_000)
    parser.add_argument("--out", default=None, help="keep the measured atlas here (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 channel per layer, 8 steps, 8 scanned images")
    args = parser.parse_args()
    if args.quick:
        args.channels, args.steps, args.scan_images = 1, 8, 8
    _machine.header("benchmark: what a full atlas costs (wall time, extrapolated)")

    loaded = load(args.model)
    photos = sample_photos()
    layers = loaded.catalogue.features
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        scan_dir = out / "scan-set"
        scan_dir.mkdir(parents=True, exist_ok=True)
        from convscope.datasets import SampleImages

        windows = SampleImages(loaded.preprocessing.input_size)
        for i in range(min(args.scan_images, len(windows))):
            Image.fromarray(windows.load(i)).save(scan_dir / f"w{i:04d}.png")
        settings = AtlasSettings(channels_per_layer=args.channels, steps=args.steps, feature_size=128, top=9,
                                 scan_images=str(scan_dir))
        start = time.perf_counter()
        build = build_atlas(loaded, photos, out / "atlas", settings)
        wall = time.perf_counter() - start
        manifest = json.loads((build.out / "atlas.json").read_text())
        slugs = {layer["name"]: layer["slug"] for layer in manifest["layers"]}
        records = {stage: {} for stage in ("activations", "features", "deconv")}
        for stage in records:
            for layer in layers:
                path = build.out / "records" / stage / f"{slugs[layer.name]}.json"
                if path.is_file():
                    records[stage][layer.name] = json.loads(path.read_text())
        acts = convscope.activations(loaded, photos["chelsea"], layers[0].name)
        per_overlay = overlay_rate(acts.image, acts[layers[0].name][: 8], out)

    stages = build.stages
    pages = 1 + sum(1 + min(args.channels, layer.channels) for layer in layers)
    per_page = stages["pages"]["seconds"] / pages
    scan_rate = args.scan_images / max(stages["scan"]["seconds"], 1e-9)
    photos_n, full_photos = len(photos), args.full_photos
    print(f"\nmeasured on {loaded.title}: {len(layers)} layers, {args.channels} channels each, {args.steps} steps, "
          f"{photos_n} photos, scan of {args.scan_images} images; wall {wall:.0f} s")
    print("per-stage seconds (measured build):", {k: v.get("seconds") for k, v in stages.items()})
    print(f"overlay (heat map + JPEG) per photo and channel: {per_overlay * 1e3:.1f} ms; page: {per_page * 1e3:.1f} ms; "
          f"scan: {scan_rate:.1f} images/s")

    header = f"{'layer':<16} {'C':>5} {'grids s':>8} {'features s/ch':>14} {'deconv s/ch':>12} {'full h':>7}"
    print(f"\nfull atlas, per layer (every channel, {args.full_steps} steps, top 9, {full_photos} photos; "
          "'full h' in wall hours):")
    print(header)
    total = {"activations": 0.0, "features": 0.0, "deconv": 0.0}
    for layer in layers:
        c = layer.channels
        visualised = min(args.channels, c)
        act = records["activations"][layer.name]["seconds"]
        overlays = visualised * photos_n * per_overlay
        grids_per_photo = max(act - overlays, 0.0) / photos_n
        full_act = grids_per_photo * full_photos + c * full_photos * per_overlay
        feat = records["features"].get(layer.name, {}).get("seconds") or 0.0
        feat_per_channel = feat / visualised * args.full_steps / args.steps
        dec = records["deconv"].get(layer.name, {}).get("seconds") or 0.0
        dec_per_channel = dec / visualised
        total["activations"] += full_act
        total["features"] += feat_per_channel * c
        total["deconv"] += dec_per_channel * c
        hours = (full_act + (feat_per_channel + dec_per_channel) * c) / 3600
        print(f"{layer.alias or layer.name:<16} {c:>5} {grids_per_photo:>8.2f} {feat_per_channel:>14.2f} "
              f"{dec_per_channel:>12.3f} {hours:>7.2f}")
    channels = sum(layer.channels for layer in layers)
    total["scan"] = args.full_scan / scan_rate
    total["pages"] = (1 + len(layers) + channels) * per_page
    print(f"\nfull {args.model} atlas: {channels} channels, {len(layers)} layers, {1 + len(layers) + channels} pages")
    for name, seconds in total.items():
        print(f"  {name:<12} {seconds / 3600:8.2f} wall hours")
    hours = sum(total.values()) / 3600
    share = total["features"] / max(sum(total.values()), 1e-9)
    print(f"  {'total':<12} {hours:8.2f} wall hours   (this machine, CPU, {torch.get_num_threads()} threads; "
          f"scan of {args.full_scan} images)")
    _machine.footer(f"full {args.model} atlas ({channels} channels, {args.full_steps} steps at 128 px, "
                    f"{args.full_scan}-image scan): {hours:.1f} wall hours on this machine, {share:.0%} feature "
                    f"visualization (extrapolated from {args.channels} channel(s)/layer x {args.steps} steps)")


if __name__ == "__main__":
    main()
