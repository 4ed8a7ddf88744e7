"""``convscope scan [FOLDER]``: the top-k examples of every channel across a data set, with their projections."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from ..datasets import FolderImages, SampleImages, check_folder
from ..errors import ConvscopeError
from ..methods.deconv.choice import AUTO, PROJECTION_CHOICES
from ..methods.scan import DEFAULT_TOP, INDEX_FILE, STATE_FILE, default_layers, load_checkpoint, scan
from ..models import DEFAULT_MODEL
from ..precision import NUMBERS, resolve_precision
from ..sources import is_model_file
from ._common import (
    add_batch_size_arg,
    add_model_args,
    add_out_arg,
    add_precision_arg,
    add_ray_arg,
    check_out,
    load_from_args,
    non_negative_int,
    out_dir,
    parse_channels,
    parse_size,
    positive_int,
    ray_from_args,
)

EXAMPLES = """examples:
  convscope scan ~/data/val --model vgg16 --layers block3_conv3,block4_conv3,block5_conv3 --top 9 --out runs/scan
  convscope scan --samples --out runs/scan-samples          # built-in demonstration set, works offline
  convscope scan --out runs/scan --resume                   # continue an interrupted scan (same --model)"""


def _default_workers() -> int:
    # Readers compete with the forward pass for the cores; half of them is a fair split.
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "scan", help="top-k images of every channel across a data set, with their projections",
        description="Stream a folder of images (recursively: jpg, png, webp, bmp, tiff) through the model, keep the "
                    "top-k activations of every channel (one per image), then draw each channel's figure: projections "
                    "(deconvnet or guided backprop, see --method) beside the image patches, as in Zeiler & Fergus. Unreadable files are skipped and "
                    "listed. The state is checkpointed; --resume continues an interrupted scan.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default=None, help="folder of images, searched recursively")
    p.add_argument("--samples", action="store_true",
                   help="scan the built-in demonstration set (windows of scikit-image's photos; offline)")
    p.add_argument("--layers", default=None,
                   help="names, aliases or patterns (default: at stride 4, 8 and 16 the last of the narrowest "
                        "feature layers; VGG16: block3_conv3, block4_conv3, block5_conv3)")
    p.add_argument("--top", type=positive_int, default=None, help=f"examples per channel (default {DEFAULT_TOP})")
    p.add_argument("--size", default=None, help="analysis size N or HxW (default: the model's input size)")
    add_batch_size_arg(p, "images", 32)
    add_precision_arg(p, picture=False)
    p.set_defaults(precision=None)  # None: auto, or the checkpoint's on --resume
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help=f"image reader processes (default {_default_workers()} here; 0 reads in the main process)")
    p.add_argument("--checkpoint-every", type=positive_int, default=50, metavar="N", help="save the state every N batches")
    p.add_argument("--resume", action="store_true",
                   help=f"continue from {STATE_FILE} in --out; data options not given again (folder, --layers, --top, "
                        "--size, --limit) are taken from it; --model/--weights/--random must be given as before")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="scan only the first N images")
    p.add_argument("--channels", default=None,
                   help="channels to draw, e.g. 0-15 (default all; the index lists every channel)")
    p.add_argument("--method", default=AUTO, choices=PROJECTION_CHOICES,
                   help="backward rule at the rectifiers (default auto: the deconvnet on a model with max-pooling, "
                        "else guided backprop; the plain gradient on a layer where neither holds)")
    p.add_argument("--not-strict", dest="strict", action="store_false",
                   help="backpropagate nonlinearities without a deconvnet/guided rule (GELU, SiLU, gates) "
                        "plainly instead of refusing them, as captum does")
    p.add_argument("--no-render", action="store_true", help="write the index and arrays only, no figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_out_arg(p, "runs/scan")
    add_model_args(p)
    add_ray_arg(p, "the forward passes (shards of --batch-size images, one model per Ray actor)")
    p.set_defaults(func=run)


# Data options a resumed scan takes from its checkpoint when they are not given again. The model
# options never come from it: a checkpoint is only data, and must not choose the code that runs.
RESUMED_OPTIONS = ("folder", "samples", "limit", "layers", "top", "size", "precision")
MODEL_OPTIONS = ("model", "weights", "random", "seed")


def _model_identity(model, weights, random, seed=0) -> dict:
    """The model flags in a comparable form: the default spelled one way, files as absolute paths."""
    if model in (None, "", "default", DEFAULT_MODEL):
        model = DEFAULT_MODEL
    elif is_model_file(model):
        model = str(Path(model).expanduser().resolve())
    return {"model": model, "weights": str(Path(weights).expanduser().resolve()) if weights else None,
            "random": bool(random), "seed": int(seed or 0) if random else None}


def _flags(identity: dict) -> str:
    flags = [f"--model {identity['model']}"]
    if identity["weights"]:
        flags.append(f"--weights {identity['weights']}")
    if identity["random"]:
        flags.append(f"--random --seed {identity['seed']}")
    return " ".join(flags)


def _check_resumed_model(args, saved: dict, path: Path) -> None:
    """Refuse to resume with other model flags than the checkpoint's; load nothing it names."""
    theirs = _model_identity(*(saved.get(key) for key in MODEL_OPTIONS))
    mine = _model_identity(*(getattr(args, key) for key in MODEL_OPTIONS))
    if mine != theirs:
        raise ConvscopeError(
            f"cannot resume from {path}: it was scanned with {_flags(theirs)}, this run has {_flags(mine)}. "
            "A resumed scan loads only the model named by your own flags: give the same --model/--weights/"
            "--random/--seed again, or run without --resume to start afresh.")


def run(args) -> int:
    out = check_out(args.out)
    ray = ray_from_args(args)
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
        _check_resumed_model(args, saved, out / STATE_FILE)
    if args.samples == bool(args.folder):
        raise ConvscopeError("give a FOLDER of images or --samples (not both, not neither)")
    if args.channels:
        parse_channels(args.channels, 1 << 30)  # the syntax now; the range once the layers are known
    if args.folder:
        check_folder(args.folder)  # before the model loads; its images are listed once the size is known
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
        if not resume:
            images.require_readable(args.limit)
    catalogue = loaded.catalogue_at(images.size)
    layers = default_layers(catalogue) if args.layers is None else catalogue.resolve(args.layers)
    channels = None
    if args.channels:
        channels = parse_channels(args.channels, max((layer.channels for layer in layers), default=0))
    created = not out.exists()
    had_state = (out / STATE_FILE).exists()
    out_dir(args.out)  # created only once the model and the images are known to be good
    try:
        return _scan_and_write(args, loaded, images, layers, workers, resume, channels, out, ray)
    except BaseException:
        # An error (or Ctrl-C) before the first image leaves nothing behind; a partial state is kept to resume.
        if not _has_images(out):
            if created:
                shutil.rmtree(out, ignore_errors=True)
            elif not had_state:
                (out / STATE_FILE).unlink(missing_ok=True)
        raise


def _has_images(out: Path) -> bool:
    """Whether the checkpoint in ``out`` holds at least one scanned image (worth resuming)."""
    path = out / STATE_FILE
    if not path.exists():
        return False
    try:
        return int(load_checkpoint(path)["topk"]["images_seen"]) > 0
    except (ConvscopeError, KeyError, TypeError):  # an unreadable checkpoint is not worth keeping either
        return False


def _scan_and_write(args, loaded, images, layers, workers, resume, channels, out: Path, ray=None) -> int:
    meta = {key: getattr(args, key) for key in RESUMED_OPTIONS}
    meta.update(_model_identity(args.model, args.weights, args.random, args.seed))
    if args.folder:
        meta["folder"] = str(images.root.resolve())
    precision = resolve_precision(args.precision, loaded.device, purpose=NUMBERS, module=loaded.module)
    print(f"model: {loaded.title}")
    print(f"precision: {precision.describe()}")
    print(f"images: {len(images)} from {images.describe()['root']}" + (" (demonstration set)" if args.samples else ""))
    if ray is not None:
        print(f"ray: scanning on {ray.describe()}")
    result = scan(loaded, images, layers, top=args.top or DEFAULT_TOP, batch_size=args.batch_size,
                  workers=workers, checkpoint=out / STATE_FILE, checkpoint_every=args.checkpoint_every,
                  resume=resume, stop=args.limit, progress=not args.quiet, meta=meta, precision=precision, ray=ray)
    if result.images_scanned == 0:
        reasons = "; ".join(f"{images.path(i)}: {reason}" for i, reason in result.skipped[:3])
        raise ConvscopeError(f"no image could be read ({len(result.skipped)} skipped"
                             + (f", e.g. {reasons}" if reasons else "") + "); give a folder of readable images")
    print(f"scanned {result.images_scanned} images ({result.rate:.1f} images/s in this run); "
          f"skipped {len(result.skipped)}")
    for i, reason in result.skipped[:20]:
        print(f"  skipped {images.path(i)}: {reason}")
    if len(result.skipped) > 20:
        print(f"  ... and {len(result.skipped) - 20} more (all listed in {INDEX_FILE})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = result.save(out, method=None if args.no_render else args.method, channels=channels,
                            progress=not args.quiet, strict=args.strict)
    for warning in caught:
        print(f"warning: {warning.message}")
    for layer in index["layers"]:
        drawn = sum(unit["figure"] is not None for unit in layer["units"])
        shape = "x".join(map(str, layer["shape"]))
        print(f"  {layer['label']:<34} {shape:<12} {drawn:>4} figures in {out / layer['dir']}")
    print(f"index: {out / INDEX_FILE}")
    return 0
