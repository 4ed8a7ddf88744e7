"""``convscope predict IMAGE``: top-5 classes, proof that the weights are real."""

from __future__ import annotations

from ..images import load_image
from ..methods.activations import predict
from ._common import add_model_args, check_image, load_from_args, positive_int, print_json


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="top-k classes for images",
                              description="Top-k classes for each image.",
                              epilog="Example: convscope predict photo.jpg --top 5")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    # Every image is read and checked before the model is loaded: a bad one costs nothing.
    images = {path: check_image(load_image(path), path, max_side=None) for path in args.images}
    loaded = load_from_args(args)
    results = {path: predict(loaded, image, args.top) for path, image in images.items()}
    if args.json:
        print_json({"model": loaded.describe(), "predictions": results})
        return 0
    print(f"model: {loaded.title}")
    for path, preds in results.items():
        print(path)
        for rank, pred in enumerate(preds, 1):
            print(f"  {rank}. {pred['name']:<28} {pred['probability']:.3f}  (class {pred['index']})")
    return 0
