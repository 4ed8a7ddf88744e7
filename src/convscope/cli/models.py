"""``convscope models [PATTERN]``: the model names ``--model`` accepts."""

from __future__ import annotations

from ..models import DEFAULT_MODEL
from ..sources import list_models


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the model names --model accepts (torchvision; timm with --timm)",
                              description="Names for --model: the default and torchvision's classification "
                                          "models; with --timm also timm's (as timm:NAME). A .pt file or "
                                          "package.module:factory works too; --keras lists keras:NAME.",
                              epilog="Example: convscope models 'resnet*' --timm")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'vgg*' (default: all)")
    p.add_argument("--timm", action="store_true", help="also list timm's models, as timm:NAME")
    p.add_argument("--keras", action="store_true", help="also list keras.applications models, as keras:NAME")
    p.set_defaults(func=run)


def run(args) -> int:
    names = list_models(args.pattern)
    if args.timm:
        import timm

        names += [f"timm:{name}" for name in timm.list_models(args.pattern)]
    if args.keras:
        import fnmatch

        from ..keras import application_names

        names += [f"keras:{name}" for name in application_names() if fnmatch.fnmatch(name, args.pattern)]
    for name in names:
        print(f"{name}  (default)" if name == DEFAULT_MODEL else name)
    if not names:
        print(f"no model matches {args.pattern!r}" + ("" if args.timm else "; add --timm to search timm's too"))
    return 0
