"""``convscope activations IMAGE``: feature-map grids, overlays and the evolution strip."""

from __future__ import annotations

from ..methods.activations import activations
from ._common import (
    add_max_side_arg,
    add_model_args,
    add_out_arg,
    check_out,
    image_arg,
    model_for_image,
    out_dir,
    positive_int,
)


def register(subparsers) -> None:
    p = subparsers.add_parser("activations", help="draw every channel of each layer as one grid image",
                              description="One forward pass; one grid PNG per layer, plus an evolution strip "
                                          "(and heat-map overlays with --overlay).",
                              epilog="Example: convscope activations andrew.jpg --model vgg19 --layers "
                                     "block1_conv2,block2_conv2 --size 200x300 --out runs/andrew")
    p.add_argument("image")
    p.add_argument("--layers", default=None, help="names, aliases or patterns (default: every conv after its activation)")
    p.add_argument("--size", default=None, help="N (shorter side) or HxW; default the model's input size")
    p.add_argument("--cols", type=positive_int, default=16, help="tiles per row of a grid (default 16)")
    p.add_argument("--cmap", default="viridis")
    p.add_argument("--scale", default="channel", choices=("channel", "layer"),
                   help="scale each tile by itself (stated on the image) or the whole layer (with a colour bar)")
    p.add_argument("--overlay", action="store_true", help="also draw the strongest channels over the photo")
    p.add_argument("--save-npz", action="store_true", help="keep the raw arrays")
    add_max_side_arg(p)
    add_out_arg(p, "runs/activations")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_out(args.out)
    image, size = image_arg(args)
    loaded = model_for_image(args, image, size)
    result = activations(loaded, image, args.layers, size=size)
    out = out_dir(args.out)
    result.save(out, cols=args.cols, cmap=args.cmap, scale=args.scale, overlay=args.overlay,
                save_npz=args.save_npz, progress=True)
    print(f"model: {loaded.title}")
    for layer in result.layers:
        print(f"  {layer.label:<34} {'×'.join(map(str, result.maps[layer.name].shape))}")
    print(f"wrote {len(result.layers)} grids and evolution.png to {out}")
    return 0
