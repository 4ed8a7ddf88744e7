"""``convscope demo``: the main job on the embedded default model and scikit-image's photos.

The main job is the atlas (:mod:`convscope.atlas`): browsable model, layer and channel pages with
predictions, feature-map grids and overlays, evolution strips, feature visualizations, the
dataset scan of the sample set and deconvnet projections. Each step is one function taking
``(loaded, photos, out)``. The atlas step's budget (:data:`DEMO_SETTINGS` on :data:`DEMO_LAYERS`)
keeps the whole demo to a few minutes on 2 CPU cores; re-running reuses what is built.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .. import render
from .._io import save_json, save_png
from ..atlas import AtlasSettings, build_atlas
from ..images import sample_photos
from ..methods.activations import activations, predict
from ..methods.deconv import deconv
from ..methods.features import visualize_features
from ..sources import load_model
from ._common import add_out_arg, out_dir

# The atlas budget of the demo: every channel of the narrowest stage output (blocks.0.0.bn2, 16
# channels, shallow, so cheap to visualize), 6 channels of each other layer, short feature
# visualizations, a scan of 256 windows of the built-in sample set, on DEMO_LAYERS, and the depth
# profile of those layers (dead channels, transfer probes, projection trust) on the model page.
DEMO_FULL_LAYERS = ("blocks.0.0.bn2",)
DEMO_SETTINGS = AtlasSettings(channels_per_layer=6, full_layers=DEMO_FULL_LAYERS, steps=64, feature_size=96, top=9,
                              scan_images="samples", scan_limit=256, profile=True)
# The default model's stem, the output of each of its 7 stages, and its head. The stage outputs
# are linear bottlenecks (conv + BN, no ReLU6): their strongest units are not tied at the cap of 6,
# so the scan's top 9 are distinct and guided backprop is not zero there (the deconv and scan
# steps take such layers for the same reasons).
DEMO_LAYERS = ("bn1", "blocks.0.0.bn2", "blocks.1.1.bn3", "blocks.2.1.bn3", "blocks.3.2.bn3", "blocks.4.2.bn3",
               "blocks.5.3.bn3", "blocks.6.0.bn3", "bn2")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build the atlas of the default model over the sample photos (offline)",
                              description="Predictions, feature-map grids, overlays and evolution strips for "
                                          "scikit-image's chelsea, astronaut and coffee photos; feature sheets, "
                                          "deconvnet / guided backprop / gradient sheets and a sample-set scan "
                                          "for a few layers; then the atlas of the stem, each stage's output and "
                                          "the head (feature visualizations, the sample-set scan, projections, "
                                          "and the depth profile on the model page); occlusion maps "
                                          "for chelsea and linear probes by depth on lfw_subset, "
                                          "whose index.html it prints.",
                              epilog="Example: convscope demo --out runs/demo")
    add_out_arg(p, "runs/demo")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=run)


def step_predict(loaded, photos, out: Path) -> None:
    preds = {name: predict(loaded, photo) for name, photo in photos.items()}
    save_json({"model": loaded.describe(), "predictions": preds}, out / "predictions.json")
    for name, top in preds.items():
        print(f"  {name:<10} → {top[0]['name']} ({top[0]['probability']:.2f})")


def step_activations(loaded, photos, out: Path) -> None:
    for name, photo in photos.items():
        result = activations(loaded, photo)
        result.save(out / "activations" / name, overlay=True, progress=True)
        save_png(result.evolution(), out / f"evolution_{name}.png")
    print(f"  feature-map grids: {out / 'activations'}")


# A middle and a deep layer of the default model for the deconv step: the outputs of the linear
# bottlenecks (conv + BN, no activation). At the blocks' ReLU6 outputs the strongest units sit at
# the cap of 6, where guided backprop and the gradient are zero by definition (see
# convscope.rectifiers); the sheet would show the deconvnet alone.
DEMO_DECONV_LAYERS = ("blocks.3.0.bn3", "blocks.6.0.bn3")


def step_deconv(loaded, photos, out: Path) -> None:
    photo = photos.get("chelsea", next(iter(photos.values())))
    for name in DEMO_DECONV_LAYERS:
        if name not in loaded.catalogue:
            continue
        result = deconv(loaded, photo, name, top=8, method="all")
        index = result.save(out / "deconv" / name)
        print(f"  deconv {name}: {len(result.units)} units ({index['strategy']['deconvnet']}) -> "
              f"{out / 'deconv' / name / index['files']['sheet']}")


# The scan step: stride-4, -8 and -16 layers of the default model whose deconvnet projections are
# quick (receptive fields up to 83 px), 8 channels each, over 128 windows of the sample set.
DEMO_SCAN_LAYERS = "blocks.1.1.bn3,blocks.2.1.bn3,blocks.3.0.bn3"
DEMO_SCAN_IMAGES = 128
DEMO_SCAN_CHANNELS = range(8)


def step_scan(loaded, photos, out: Path) -> None:
    from ..datasets import SampleImages
    from ..methods.scan import scan

    images = SampleImages(loaded.preprocessing.input_size, loaded.preprocessing.resample, limit=DEMO_SCAN_IMAGES)
    result = scan(loaded, images, DEMO_SCAN_LAYERS, top=9, batch_size=32, progress=False)
    result.save(out / "scan", channels=DEMO_SCAN_CHANNELS, progress=False)
    print(f"  dataset scan: top 9 of {result.images_scanned} sample windows for channels 0-7 of "
          f"{DEMO_SCAN_LAYERS.replace(',', ', ')}: {out / 'scan'}")


# A shallow, a middle and a deep layer of the default model, a few channels each; modest
# settings keep this step near a minute on 2 cores (`convscope features` has the full recipe).
DEMO_FEATURE_LAYERS = ("blocks.1.0.bn1", "blocks.3.1.bn1", "blocks.5.3.bn1")
DEMO_FEATURE_CHANNELS = range(6)
DEMO_FEATURE_STEPS = 64
DEMO_FEATURE_SIZE = 64


def step_features(loaded, photos, out: Path) -> None:
    sheets, index = [], []
    for name in DEMO_FEATURE_LAYERS:
        if name not in loaded.catalogue:
            continue
        result = visualize_features(loaded, name, list(DEMO_FEATURE_CHANNELS), steps=DEMO_FEATURE_STEPS,
                                    size=DEMO_FEATURE_SIZE, photos=photos, progress=True)
        entry = result.save(out / "features" / name.replace("/", "_"), cols=len(DEMO_FEATURE_CHANNELS))
        index.append({"layer": name, "folder": f"features/{name}", "dead": entry["dead"], "count": entry["count"]})
        sheets.append(result.sheet(cols=len(DEMO_FEATURE_CHANNELS)))
        print(f"  features {name}: {entry['count']} channels, {entry['dead']} dead, "
              f"median x{entry['median_ratio'] or 0:.1f} of the best photo ({result.seconds:.0f}s)")
    if sheets:
        save_png(render.stack_vertical(sheets), out / "features_sheet.png")
        save_json({"model": loaded.describe(), "layers": index}, out / "features" / "features.json")
        print(f"  feature sheet, shallow to deep: {out / 'features_sheet.png'}")


def step_occlusion(loaded, photos, out: Path) -> None:
    from ..methods.occlusion import occlusion

    # stride 16 keeps the demo quick (169 positions); `convscope occlusion` defaults to stride 8
    result = occlusion(loaded, photos["chelsea"], patch=32, stride=16, progress=True)
    result.save(out / "occlusion", stem="chelsea")
    for line in result.summary_lines():
        print(f"  occlusion: {line}")
    print(f"  occlusion maps: {out / 'occlusion'}")


def step_probe(loaded, photos, out: Path) -> None:
    from ..methods.probe import probe
    from ..selection import spread

    # Cheap settings: 64x64 inputs and 5 layers; `convscope probe --samples` runs the full-size version.
    layers = [layer.name for layer in spread(loaded.catalogue, 5)]
    result = probe(loaded, None, layers, folds=5, seed=0, size=64, progress=True)
    result.save(out / "probe")
    print("  " + result.table().replace("\n", "\n  "))
    print(f"  probe table and plot: {out / 'probe'}")


def demo_layers(loaded) -> list[str]:
    """:data:`DEMO_LAYERS`, or every 4th conv layer of a model that lacks them."""
    if all(name in loaded.catalogue for name in DEMO_LAYERS):
        return list(DEMO_LAYERS)
    features = [layer.name for layer in loaded.catalogue.features if layer.is_spatial]
    return features[::4] + ([features[-1]] if features and (len(features) - 1) % 4 else [])


def step_atlas(loaded, photos, out: Path) -> None:
    settings = replace(DEMO_SETTINGS, layers=",".join(demo_layers(loaded)))
    build = build_atlas(loaded, photos, out / "atlas", settings)
    print("\n".join(build.summary_lines()))


STEPS = [step_predict, step_activations, step_features, step_deconv, step_scan, step_occlusion, step_probe, step_atlas]


def run(args) -> int:
    out = out_dir(args.out)
    loaded = load_model(device=args.device)
    photos = sample_photos()
    print(f"model: {loaded.title}")
    for step in STEPS:
        step(loaded, photos, out)
    print(f"demo output: {out.resolve()}")
    print(f"atlas: {(out / 'atlas' / 'index.html').resolve()}")
    return 0
