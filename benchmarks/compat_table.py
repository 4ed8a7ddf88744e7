"""The README's model compatibility table, as observed: feature layers, receptive fields, projections.

For each architecture of the breadth matrix (tests/test_breadth.py), random-init (seed 0) at a
small input (64 px; 80 for Inception v3): the number of default feature layers and one of them
(the middle one), the receptive-field status of those layers (how many have an exact box, a
"global" field or an "unknown" one), and the projection the atlas chooses (``--deconv-method
auto``) for each of them, with the reason of the first fallback.

Run: .venv/bin/python benchmarks/compat_table.py            (prints the markdown table)
Quick smoke run: .venv/bin/python benchmarks/compat_table.py --quick   (two models)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path

import _machine

import convscope
from convscope.atlas.stages.deconv import choose_projection

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.test_breadth:FunctionalNet

MODELS = [
    "resnet18", "densenet121", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "inception_v3",
    "googlenet", "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x1_0", "timm:resnet18d",
    "timm:convnext_nano", "tests.test_breadth:FunctionalNet",
]


def row(spec: str) -> str:
    loaded = convscope.load_model(spec, random=True, seed=0, device="cpu")
    size = 80 if spec == "inception_v3" else 64
    loaded = dataclasses.replace(loaded, preprocessing=dataclasses.replace(loaded.preprocessing,
                                                                           input_size=(size, size)))
    features = [layer for layer in loaded.catalogue.features if layer.is_spatial]
    fields = Counter(layer.field for layer in features)
    rf = ", ".join(f"{fields[k]} {k}" for k in ("box", "global", "unknown") if fields[k])
    rules: Counter[str] = Counter()
    reason = None
    for layer in features:
        rule, why = choose_projection(loaded, layer, "auto")
        rules[rule.name] += 1
        reason = reason or why
    projections = ", ".join(f"{name} {count}" for name, count in rules.items())
    if reason:
        projections += f" (first fallback: {reason})"
    name = "user module (F.relu, F.max_pool2d, add, cat)" if spec.startswith("tests.") else spec
    example = features[len(features) // 2].name
    return f"| `{name}` | {len(features)}, e.g. `{example}` | {rf} | {projections} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two models only (a smoke run)")
    args = parser.parse_args()
    _machine.header("compatibility table: the breadth matrix's architectures, random init, small input")
    models = ["resnet18", "tests.test_breadth:FunctionalNet"] if args.quick else MODELS
    start = time.perf_counter()
    print("| architecture | feature layers | receptive fields | projection per feature layer (atlas, auto) |")
    print("|---|---|---|---|")
    for spec in models:
        print(row(spec), flush=True)
    seconds = time.perf_counter() - start
    _machine.footer(f"{len(models)} architectures tabulated in {seconds:.1f} s")


if __name__ == "__main__":
    main()
