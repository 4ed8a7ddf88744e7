"""``convscope probe [FOLDER | --samples]``: linear-probe accuracy by depth, pretrained vs random init."""

from __future__ import annotations

import argparse

from ..errors import ConvscopeError
from ..methods.probe import check_dataset, image_folder, lfw_faces, probe
from ._common import (
    add_batch_size_arg,
    add_model_args,
    add_out_arg,
    check_out,
    load_from_args,
    out_dir,
    parse_size,
    positive_int,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe", help="how well each layer's pooled features separate labelled images (pretrained vs random init)",
        description="For each layer: per-channel spatial mean and max of the feature maps, a standardised "
                    "logistic regression, stratified k-fold cross-validation with a fixed seed. The same for "
                    "the architecture at random init, so the value of pretraining shows.",
        epilog="Examples:\n  convscope probe --samples                      # scikit-image lfw_subset: faces vs non-faces\n"
               "  convscope probe ~/data/pets --out runs/probe    # one sub-folder per class",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default=None, help="a folder with one sub-folder of images per class")
    p.add_argument("--samples", action="store_true",
                   help="use the built-in set: scikit-image lfw_subset, 100 faces vs 100 non-faces (25x25)")
    p.add_argument("--layers", default=None,
                   help="names, aliases or patterns (default: 8 feature layers spread over the depth)")
    p.add_argument("--folds", type=positive_int, default=5, help="stratified cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="fixes folds, classifier and the random-init baseline")
    p.add_argument("--size", default=None, help="N (square) or HxW fed to the model (default: the model's input size)")
    add_batch_size_arg(p, "images", 16)
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline")
    add_out_arg(p, "runs/probe")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.folder and args.samples:
        raise ConvscopeError("give either a folder or --samples, not both")
    if not args.folder and not args.samples:
        raise ConvscopeError("give a folder with one sub-folder per class, or --samples for the built-in set")
    if args.folds < 2:
        raise ConvscopeError(f"--folds must be at least 2 for cross-validation, got {args.folds}")
    check_out(args.out)
    size = parse_size(args.size)
    # The images are read and checked before the model loads: a bad set costs nothing.
    dataset = lfw_faces() if args.samples else image_folder(args.folder)
    check_dataset(dataset, args.folds)
    loaded = load_from_args(args)
    result = probe(loaded, dataset, args.layers, folds=args.folds, seed=args.seed,
                   size=size, baseline=not args.no_baseline, batch_size=args.batch_size, progress=True)
    out = out_dir(args.out)
    index = result.save(out)
    print(f"model: {loaded.title}")
    print(result.table())
    print(f"wrote {', '.join(index['files'].values())} to {out}")
    return 0
