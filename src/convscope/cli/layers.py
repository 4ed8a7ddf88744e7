"""``convscope layers``: the layer catalogue."""

from __future__ import annotations

from ._common import add_model_args, load_from_args, print_json


def register(subparsers) -> None:
    p = subparsers.add_parser("layers", help="list layers: names, aliases, shapes, strides, receptive fields",
                              description="The layer catalogue, traced at the model's input size. "
                                          "Rows marked * are the default feature layers (each conv after its activation).",
                              epilog="Example: convscope layers --model vgg19 --random --filter 'block3_*'")
    p.add_argument("--all", action="store_true", help="include pass-through modules (Identity, Dropout)")
    p.add_argument("--filter", default=None, metavar="PATTERN", help="names, aliases or patterns, e.g. 'block3_*'")
    p.add_argument("--json", action="store_true")
    add_model_args(p)
    p.set_defaults(func=run)


def _fmt(pair) -> str:
    if pair is None:
        return "-"
    a, b = (int(v) if float(v).is_integer() else v for v in pair)
    return str(a) if a == b else f"{a}x{b}"


def run(args) -> int:
    loaded = load_from_args(args)
    catalogue = loaded.catalogue
    rows = catalogue.resolve(args.filter) if args.filter else [
        layer for layer in catalogue if args.all or layer.kind != "pass"]
    if args.json:
        print_json({"model": loaded.describe(), "layers": [layer.as_dict() for layer in rows]})
        return 0
    print(f"model: {loaded.title}; input {loaded.preprocessing.description}")
    header = f"  {'name':<28} {'alias':<14} {'type':<16} {'output':<16} {'stride':>6} {'RF':>7}"
    print(header)
    for layer in rows:
        mark = "*" if layer.is_feature else " "
        shape = "×".join(str(v) for v in layer.shape)
        rf = _fmt(layer.rf_size) if layer.field == "box" else layer.field  # "global" or "unknown", never "-"
        print(f"{mark} {layer.name:<28} {layer.alias or '':<14} {layer.type:<16} {shape:<16} {_fmt(layer.stride):>6} {rf:>7}")
    print(f"{len(rows)} layers; {sum(layer.is_feature for layer in rows)} feature layers (*)")
    return 0
