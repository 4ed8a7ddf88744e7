"""``convscope occlusion IMAGE``: class-probability, label and feature-map maps as an occluder slides."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .._io import save_json, save_png
from ..images import load_image
from ..methods.occlusion import FILLS, METHODS, OcclusionResult, occlusion
from ._common import (
    add_max_side_arg,
    add_model_args,
    add_out_arg,
    check_image,
    check_out,
    load_from_args,
    model_short_side,
    non_negative_int,
    out_dir,
    parse_size,
    positive_float,
    positive_int,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "occlusion", help="slide an occluder over a photo: maps of class probability, top class and a feature map",
        description="Zeiler & Fergus occlusion sensitivity. For each occluder position: the probability of the "
                    "target class (default: the top class), the most probable class, and the mean activation of "
                    "one feature map (default: the strongest channel of the deepest feature layer). Exact "
                    "incremental inference recomputes only what each occluder changes.",
        epilog="Examples:\n  convscope occlusion photo.jpg --patch 32 --stride 8\n"
               "  convscope occlusion photo.jpg --model vgg16 --layer block5_conv3 --channel 17 --out runs/occ",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image")
    p.add_argument("--patch", type=positive_int, default=32, help="occluder side in pixels (default 32)")
    p.add_argument("--stride", type=positive_int, default=8, help="occluder step in pixels (default 8)")
    p.add_argument("--fill", default="gray", choices=FILLS,
                   help="gray (as in the paper), mean (the photo's mean colour) or blur (default gray)")
    p.add_argument("--target", default=None, help="class index or name to map (default: the top class)")
    p.add_argument("--layer", default=None, help="feature layer for the activity map (default: the deepest)")
    p.add_argument("--channel", type=non_negative_int, default=None, help="its channel (default: the strongest on the photo)")
    p.add_argument("--size", default=None, help="N (shorter side) or HxW; default the model's input size")
    p.add_argument("--method", default="incremental", choices=METHODS,
                   help="incremental (exact, faster) or plain batched inference")
    p.add_argument("--batch", type=positive_int, default=None, help="occluded copies per forward pass (default: automatic)")
    p.add_argument("--memory-mb", type=positive_float, default=1024, help="memory budget per forward pass (default 1024)")
    add_max_side_arg(p)
    add_out_arg(p, "runs/occlusion")
    add_model_args(p)
    p.set_defaults(func=run)


def write_occlusion_outputs(result: OcclusionResult, out: Path, stem: str = "occlusion") -> dict:
    """Write the JSON (raw maps) and the pictures for one result; return the file names."""
    files = {"json": f"{stem}.json", "sheet": f"{stem}.png", "probability": f"{stem}_probability.png",
             "labels": f"{stem}_labels.png", "activity": f"{stem}_activity.png"}
    save_png(result.sheet(), out / files["sheet"])
    save_png(result.probability_image(), out / files["probability"])
    save_png(result.label_image(), out / files["labels"])
    save_png(result.activity_image(), out / files["activity"])
    save_json({**result.as_dict(), "files": files}, out / files["json"])
    return files


def summary_lines(result: OcclusionResult) -> list[str]:
    i, j = np.unravel_index(int(result.probability.argmin()), result.shape)
    lines = [
        f"target: {result.target_name} (class {result.target}); unoccluded p = {result.base_probability:.3f}",
        f"{result.shape[0]}x{result.shape[1]} positions (patch {result.patch}, stride {result.stride}, "
        f"{result.fill} fill): p from {result.probability.min():.3f} (occluder at top {result.tops[i]}, "
        f"left {result.lefts[j]}) to {result.probability.max():.3f}",
        f"top class changes at {np.mean(result.labels != result.base_label):.0%} of positions",
        f"feature map: {result.layer.label} channel {result.channel}, mean activation "
        f"{result.activity.min():.3g} .. {result.activity.max():.3g} (unoccluded {result.base_activity:.3g})",
    ]
    method = result.method
    if result.incremental:
        method += f" (convolution work: {result.incremental['conv_mac_fraction']:.0%} of the plain forward's)"
    lines.append(f"{method}; {result.seconds:.1f} s")
    return lines


def run(args) -> int:
    check_out(args.out)
    size = parse_size(args.size)
    image = check_image(load_image(args.image), args.image, args.max_side, size)
    loaded = load_from_args(args)
    check_image(image, args.image, args.max_side, size, model_short_side(loaded))
    target = args.target
    result = occlusion(loaded, image, patch=args.patch, stride=args.stride, fill=args.fill, target=target,
                       layer=args.layer, channel=args.channel, size=size, method=args.method,
                       batch_size=args.batch, memory_mb=args.memory_mb, progress=True)
    out = out_dir(args.out)
    files = write_occlusion_outputs(result, out)
    print(f"model: {loaded.title}")
    for line in summary_lines(result):
        print(f"  {line}")
    print(f"wrote {', '.join(files.values())} to {out}")
    return 0
