"""``convscope profile``: one row per feature layer: geometry, activity and dead channels, transfer probes,
projection trust."""

from __future__ import annotations

import argparse

from ..datasets import FolderImages, check_folder
from ..errors import ConvscopeError
from ..methods.profile import DEFAULTS, profile_model
from ._common import add_model_args, add_out_arg, check_out, load_from_args, out_dir, positive_int

EPILOG = """examples:
  convscope profile                                   # the default model, built-in photos and sample windows
  convscope profile --model vgg19 --random --layers 'block*_conv1' --out runs/profile-vgg19
  convscope profile --images ~/data/val --limit 500   # the activity columns over your own images
  convscope profile --no-probes --no-trust            # geometry, activity and dead channels only"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="a depth profile: RF, sparsity, dead channels, transfer probes and projection trust per layer",
        description="One row per feature layer, shallow to deep: receptive field and stride; sparsity, silent and "
                    "dead channels over the sample photos and a scan set (dead: silent on every image and not "
                    "raised by a short feature visualization); linear-probe accuracy on a far task (8x8 digits) and "
                    "a near task (upright vs upside-down photo patches), trained vs random init; and how far "
                    "deconvnet, guided backprop and the gradient can be trusted (Spearman between their maps on "
                    "the trained and the randomized model, Adebayo et al. 2018). Writes profile.md, profile.csv, "
                    "profile.png and profile.json.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=None,
                   help="names, aliases or patterns (default: every feature layer, shallow to deep)")
    p.add_argument("--images", default=None, metavar="FOLDER",
                   help="scan set for the activity columns: a folder of images, searched recursively "
                        "(default: the built-in sample windows)")
    p.add_argument("--samples", action="store_true", help="use the built-in sample windows as the scan set (default)")
    p.add_argument("--limit", type=positive_int, default=DEFAULTS["scan_limit"], metavar="N",
                   help=f"scan-set images read (default {DEFAULTS['scan_limit']})")
    p.add_argument("--folds", type=positive_int, default=DEFAULTS["folds"], help="cross-validation folds of the probes")
    p.add_argument("--dead-steps", type=positive_int, default=DEFAULTS["dead_steps"],
                   help="optimization steps that try to raise each silent channel")
    p.add_argument("--no-probes", dest="probes", action="store_false", help="skip the transfer probes")
    p.add_argument("--no-trust", dest="trust", action="store_false", help="skip the projection-trust columns")
    p.add_argument("--seed", type=int, default=0,
                   help="the random-init baseline, the probe folds and tasks, the optimization (and --random)")
    add_out_arg(p, "runs/profile")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.images and args.samples:
        raise ConvscopeError("give either --images FOLDER or --samples, not both")
    if args.folds < 2:
        raise ConvscopeError(f"--folds must be at least 2 for cross-validation, got {args.folds}")
    check_out(args.out)
    if args.images:
        check_folder(args.images)  # before the model loads; its images are listed once the size is known
    loaded = load_from_args(args)
    images = None
    if args.images:
        images = FolderImages(args.images, tuple(loaded.preprocessing.input_size), loaded.preprocessing.resample)
        images.require_readable(args.limit)
    layers = loaded.catalogue.resolve(args.layers) if args.layers else None
    result = profile_model(loaded, layers, images=images, scan_limit=args.limit, seed=args.seed, folds=args.folds,
                           dead_steps=args.dead_steps, probes=args.probes, trust=args.trust, progress=True)
    out = out_dir(args.out)
    index = result.save(out)
    print(result.table())
    print(f"wrote {', '.join(index['files'].values())} to {out}")
    return 0
