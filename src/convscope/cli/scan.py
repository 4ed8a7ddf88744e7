"""``convscope scan [FOLDER]``: the top-k examples of every channel across a data set, with deconvnet projections."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..datasets import FolderImages, SampleImages
from ..errors import ConvscopeError
from ..methods.scan import DEFAULT_TOP, INDEX_FILE, STATE_FILE, load_checkpoint, scan, write_scan
from ._common import add_model_args, add_out_arg, load_from_args, out_dir, parse_channels, parse_size

EXAMPLES = """examples:
  convscope scan ~/data/val --model vgg16 --layers block3_conv3,block4_conv3,block5_conv3 --top 9 --out runs/scan
  convscope scan --samples --out runs/scan-samples          # built-in demonstration set, works offline
  convscope scan --out runs/scan --resume                   # continue an interrupted scan, same options"""


def _default_workers() -> int:
    # Readers compete with the forward pass for the cores; half of them is a fair split.
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "scan", help="top-k images of every channel across a data set, with deconvnet projections",
        description="Stream a folder of images (recursively: jpg, png, webp, bmp, tiff) through the model, keep the "
                    "top-k activations of every channel (one per image), then draw each channel's figure: deconvnet "
                    "projections beside the image patches, as in Zeiler & Fergus. Unreadable files are skipped and "
                    "listed. The state is checkpointed; --resume continues an interrupted scan.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default=None, help="folder of images, searched recursively")
    p.add_argument("--samples", action="store_true",
                   help="scan the built-in demonstration set (windows of scikit-image's photos; offline)")
    p.add_argument("--layers", default=None,
                   help="names, aliases or patterns (default: at stride 4, 8 and 16 the last of the narrowest "
                        "feature layers; VGG16: block3_conv3, block4_conv3, block5_conv3)")
    p.add_argument("--top", type=int, default=None, help=f"examples per channel (default {DEFAULT_TOP})")
    p.add_argument("--size", default=None, help="analysis size N or HxW (default: the model's input size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None,
                   help=f"image reader processes (default {_default_workers()} here; 0 reads in the main process)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="save the state every N batches")
    p.add_argument("--resume", action="store_true",
                   help=f"continue from {STATE_FILE} in --out; options not given again are taken from it")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="scan only the first N images")
    p.add_argument("--channels", default=None,
                   help="channels to draw, e.g. 0-15 (default all; the index lists every channel)")
    p.add_argument("--method", default="deconvnet", choices=("deconvnet", "guided", "gradient"),
                   help="projection method (deconvnet is Zeiler & Fergus's)")
    p.add_argument("--no-render", action="store_true", help="write the index and arrays only, no figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_out_arg(p, "runs/scan")
    add_model_args(p)
    p.set_defaults(func=run)


# Options a resumed scan takes from its checkpoint when they are not given again.
RESUMED_OPTIONS = ("folder", "samples", "limit", "layers", "top", "size", "model", "weights", "random")


def run(args) -> int:
    out = Path(args.out)
    resume = args.resume
    if resume and not (out / STATE_FILE).exists():
        print(f"note: no checkpoint {out / STATE_FILE} to resume; starting a new scan")
        resume = False
    if resume:
        saved = load_checkpoint(out / STATE_FILE).get("meta", {})
        given_source = args.folder is not None or args.samples
        for key in RESUMED_OPTIONS:
            if key in ("folder", "samples") and given_source:
                continue
            if getattr(args, key) in (None, False) and saved.get(key) not in (None, False):
                setattr(args, key, saved[key])
    if args.samples == bool(args.folder):
        raise ConvscopeError("give a FOLDER of images or --samples (not both, not neither)")
    if args.random:
        torch.manual_seed(0)  # a reproducible random init, so that --resume finds the same weights
    loaded = load_from_args(args)
    size = parse_size(args.size)
    if size is None:
        size = loaded.preprocessing.input_size
    elif isinstance(size, int):
        size = (size, size)
    resample = loaded.preprocessing.resample
    if args.samples:
        images = SampleImages(size, resample, limit=args.limit)
        workers = 0 if args.workers is None else args.workers  # decoded in memory already
    else:
        images = FolderImages(args.folder, size, resample)
        workers = _default_workers() if args.workers is None else args.workers
    out_dir(args.out)  # created only once the model and the images are known to be good
    meta = {key: getattr(args, key) for key in RESUMED_OPTIONS}
    if args.folder:
        meta["folder"] = str(images.root.resolve())
    print(f"model: {loaded.title}")
    print(f"images: {len(images)} from {images.describe()['root']}" + (" (demonstration set)" if args.samples else ""))
    result = scan(loaded, images, args.layers, top=args.top or DEFAULT_TOP, batch_size=args.batch_size,
                  workers=workers, checkpoint=out / STATE_FILE, checkpoint_every=args.checkpoint_every,
                  resume=resume, stop=args.limit, progress=not args.quiet, meta=meta)
    print(f"scanned {result.images_scanned} images ({result.rate:.1f} images/s in this run); "
          f"skipped {len(result.skipped)}")
    for i, reason in result.skipped[:20]:
        print(f"  skipped {images.path(i)}: {reason}")
    if len(result.skipped) > 20:
        print(f"  ... and {len(result.skipped) - 20} more (all listed in {INDEX_FILE})")
    channels = None
    if args.channels:
        channels = parse_channels(args.channels, max(layer.channels for layer in result.layers))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = write_scan(result, out, channels=channels, method=None if args.no_render else args.method,
                           progress=not args.quiet)
    for warning in caught:
        print(f"warning: {warning.message}")
    for layer in index["layers"]:
        drawn = sum(unit["figure"] is not None for unit in layer["units"])
        shape = "x".join(map(str, layer["shape"]))
        print(f"  {layer['label']:<34} {shape:<12} {drawn:>4} figures in {out / layer['dir']}")
    print(f"index: {out / INDEX_FILE}")
    return 0
