"""``convscope demo``: the main job on the embedded default model and scikit-image's photos.

Each step is one function taking ``(loaded, photos, out)``; later features append steps.
"""

from __future__ import annotations

from pathlib import Path

from .._io import save_json, save_png
from ..activations import activations, predict
from ..images import sample_photos
from ..models import load_model
from ._common import add_out_arg, out_dir
from .activations import write_activation_outputs
from .occlusion import summary_lines, write_occlusion_outputs
from .probe import write_probe_outputs


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the main job on the default model and sample photos (offline)",
                              description="Predictions, feature-map grids, overlays and evolution strips for "
                                          "scikit-image's chelsea, astronaut and coffee photos; occlusion maps for "
                                          "chelsea; linear probes by depth on scikit-image's lfw_subset.",
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
        write_activation_outputs(result, out / "activations" / name, overlay=True)
        save_png(result.evolution(), out / f"evolution_{name}.png")
    print(f"  feature-map grids: {out / 'activations'}")


def step_occlusion(loaded, photos, out: Path) -> None:
    from ..occlusion import occlusion

    # stride 16 keeps the demo quick (169 positions); `convscope occlusion` defaults to stride 8
    result = occlusion(loaded, photos["chelsea"], patch=32, stride=16, progress=True)
    write_occlusion_outputs(result, out / "occlusion", stem="chelsea")
    for line in summary_lines(result):
        print(f"  occlusion: {line}")
    print(f"  occlusion maps: {out / 'occlusion'}")


def step_probe(loaded, photos, out: Path) -> None:
    from ..probe import default_layers, probe

    # Cheap settings: 64x64 inputs and 5 layers; `convscope probe --samples` runs the full-size version.
    layers = [layer.name for layer in default_layers(loaded, 5)]
    result = probe(loaded, None, layers, folds=5, seed=0, size=64, progress=True)
    write_probe_outputs(result, out / "probe")
    print("  " + result.table().replace("\n", "\n  "))
    print(f"  probe table and plot: {out / 'probe'}")


STEPS = [step_predict, step_activations, step_occlusion, step_probe]


def run(args) -> int:
    out = out_dir(args.out)
    loaded = load_model(device=args.device)
    photos = sample_photos()
    print(f"model: {loaded.title}")
    for step in STEPS:
        step(loaded, photos, out)
    print(f"demo output: {out.resolve()}")
    return 0
