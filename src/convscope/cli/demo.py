"""``convscope demo``: the main job on the embedded default model and scikit-image's photos.

The main job is the atlas (:mod:`convscope.atlas`): predictions, feature-map grids, overlays and
evolution strips, feature visualizations, deconvnet projections and the dataset scan, as
browsable pages. Each step is one function taking ``(loaded, photos, out)``; the atlas step's
budget (:data:`DEMO_SETTINGS`) keeps the whole demo to a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from .._io import save_json
from ..activations import predict
from ..atlas import AtlasSettings, build_atlas
from ..images import sample_photos
from ..models import load_model
from ._common import add_out_arg, out_dir

# The demo's budget: every conv layer of the default model, the first 6 channels of each.
DEMO_SETTINGS = AtlasSettings(layers=None, channels_per_layer=6, steps=64, feature_size=96, top=9, scan_images="samples")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build the atlas of the default model over the sample photos (offline)",
                              description="Predictions, then the atlas (model, layer and channel pages: "
                                          "feature-map grids and overlays, evolution strips, and every other "
                                          "stage installed) for scikit-image's chelsea, astronaut and coffee "
                                          "photos. Re-running reuses what is already built.",
                              epilog="Example: convscope demo --out runs/demo")
    add_out_arg(p, "runs/demo")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=run)


def step_predict(loaded, photos, out: Path) -> None:
    preds = {name: predict(loaded, photo) for name, photo in photos.items()}
    save_json({"model": loaded.describe(), "predictions": preds}, out / "predictions.json")
    for name, top in preds.items():
        print(f"  {name:<10} → {top[0]['name']} ({top[0]['probability']:.2f})")


def step_atlas(loaded, photos, out: Path) -> None:
    build = build_atlas(loaded, photos, out / "atlas", DEMO_SETTINGS)
    print("\n".join(build.summary_lines()))
    print(f"atlas: {build.index.resolve()}")


STEPS = [step_predict, step_atlas]


def run(args) -> int:
    out = out_dir(args.out)
    loaded = load_model(device=args.device)
    photos = sample_photos()
    print(f"model: {loaded.title}")
    for step in STEPS:
        step(loaded, photos, out)
    print(f"demo output: {out.resolve()}")
    print(f"open: {(out / 'atlas' / 'index.html').resolve()}")
    return 0
