"""``convscope deconv IMAGE --layer L``: project units back to pixels, each beside its image patch."""

from __future__ import annotations

from ..errors import ConvscopeError
from ..methods.deconv import deconv
from ..methods.deconv.choice import AUTO, PROJECTION_CHOICES
from ..precision import NUMBERS, resolve_precision
from ._common import (
    add_batch_size_arg,
    add_max_side_arg,
    add_model_args,
    add_out_arg,
    add_precision_arg,
    check_out,
    image_arg,
    model_for_image,
    out_dir,
    parse_channels,
    positive_int,
)

EPILOG = """examples:
  convscope deconv photo.jpg --layer block4_conv1 --channels 0-31 --model vgg16
  convscope deconv photo.jpg --layer block5_conv3 --top 9 --method guided --model vgg16
  convscope deconv photo.jpg --layer features.28 --channels 7 --method all --model vgg16
  convscope deconv photo.jpg --layer blocks.3.0.bn3 --channels 5 --positions 8
"""


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "deconv", help="deconvnet / guided backprop / saliency: project units back to pixels",
        description="Take each chosen channel's strongest unit (or the strongest positions of one channel), "
                    "project it back to pixel space and draw it beside the image patch it sees (Zeiler & Fergus "
                    "2013). Writes a PNG sheet, whole-image sheets and a JSON index.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image")
    p.add_argument("--layer", required=True, help="name or alias (see `convscope layers`)")
    p.add_argument("--channels", default=None, help="channels whose strongest unit is projected, e.g. 0-31 or 3,7")
    p.add_argument("--top", type=positive_int, default=None,
                   help="the N channels with the highest peaks (default 16 when --channels is not given)")
    p.add_argument("--positions", type=positive_int, default=None, metavar="N",
                   help="instead, the N strongest positions of one channel (give one --channels, or --top 1)")
    p.add_argument("--method", default=AUTO, choices=(*PROJECTION_CHOICES, "all"),
                   help="backward rule at the rectifiers (default auto: the deconvnet on a model with max-pooling, "
                        "else guided backprop; the plain gradient on a layer where neither holds); 'all' draws the three side by side")
    p.add_argument("--signed", action="store_true", help="draw the gradient signed instead of as |gradient|")
    p.add_argument("--size", default=None, help="N (shorter side) or HxW; default the model's input size")
    p.add_argument("--tile", type=positive_int, default=None,
                   help="display size of the largest receptive-field box, px (default: its size, within 96..160)")
    p.add_argument("--cols", type=positive_int, default=None, help="cells per row of the sheet")
    add_batch_size_arg(p, "crops or images")
    add_precision_arg(p, picture=False)
    p.add_argument("--not-strict", dest="strict", action="store_false",
                   help="backpropagate nonlinearities without a rule (GELU, SiLU, gates) plainly instead of refusing")
    p.add_argument("--save-npz", action="store_true", help="keep the raw projections (LAYER_projections.npz)")
    add_max_side_arg(p)
    add_out_arg(p, "runs/deconv")
    add_model_args(p)
    p.set_defaults(func=run)



def run(args) -> int:
    check_out(args.out)
    if any(c in args.layer for c in "*?[,"):
        raise ConvscopeError(f"--layer takes one layer name or alias, not {args.layer!r}; list candidates with "
                             f"convscope layers --filter '{args.layer}'")
    image, size = image_arg(args)
    parse_channels(args.channels, 1 << 30)  # the syntax now; the range once the layer is known
    loaded = model_for_image(args, image, size)
    layer = loaded.catalogue.get(args.layer)
    channels = parse_channels(args.channels, layer.channels)
    top = args.top if args.top is not None or channels is not None else 16
    method = "all" if args.method == "all" else args.method
    precision = resolve_precision(args.precision, loaded.device, purpose=NUMBERS, module=loaded.module)
    result = deconv(loaded, image, layer, channels=channels, top=top, positions=args.positions,
                    method=method, size=size, batch_size=args.batch_size, strict=args.strict, progress=True,
                    precision=precision)
    out = out_dir(args.out)
    index = result.save(out, signed=args.signed, tile=args.tile, cols=args.cols, save_arrays=args.save_npz)
    print(f"model: {loaded.title}")
    print(f"precision: {precision.describe()}")
    strategies = ", ".join(f"{m} {s}" for m, s in index["strategy"].items())
    print(f"layer {result.layer.label}: {len(result.units)} units, image {result.image.shape[0]}x{result.image.shape[1]} "
          f"({strategies})")
    for record in index["units"][:20]:
        mark = " clipped" if record["clipped"] else ""
        print(f"  ch {record['channel']:>4} at ({record['row']},{record['col']})  value {record['value']:9.4g}  "
              f"box {tuple(record['box'])}{mark}")
    if len(index["units"]) > 20:
        print(f"  ... {len(index['units']) - 20} more in deconv.json")
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(index['files'].values())}{', ' + index['arrays'] if 'arrays' in index else ''} "
          f"and deconv.json to {out}")
    return 0
