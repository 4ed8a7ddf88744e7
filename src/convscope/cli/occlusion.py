"""``convscope occlusion IMAGE``: class-probability, label and feature-map maps as an occluder slides."""

from __future__ import annotations

import argparse

from ..methods.occlusion import FILLS, METHODS, occlusion
from ._common import (
    add_batch_size_arg,
    add_max_side_arg,
    add_memory_arg,
    add_model_args,
    add_out_arg,
    check_out,
    image_arg,
    model_for_image,
    non_negative_int,
    out_dir,
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
    add_batch_size_arg(p, "occluded copies")
    add_memory_arg(p, "each forward pass (sets the automatic --batch-size)", "1GB")
    add_max_side_arg(p)
    add_out_arg(p, "runs/occlusion")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_out(args.out)
    image, size = image_arg(args)
    loaded = model_for_image(args, image, size)
    result = occlusion(loaded, image, patch=args.patch, stride=args.stride, fill=args.fill, target=args.target,
                       layer=args.layer, channel=args.channel, size=size, method=args.method,
                       batch_size=args.batch_size, memory_budget=args.memory, progress=True)
    out = out_dir(args.out)
    index = result.save(out)
    print(f"model: {loaded.title}")
    for line in result.summary_lines():
        print(f"  {line}")
    print(f"wrote {', '.join(index['files'].values())} to {out}")
    return 0
