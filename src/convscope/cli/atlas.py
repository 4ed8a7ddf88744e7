"""``convscope atlas``: build (or bring up to date) the browsable HTML atlas of a model."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import NamedTuple

from ..atlas import STAGE_NAMES, AtlasSettings, build_atlas
from ..atlas import plan as atlas_plan
from ..atlas.context import ATLAS_RECIPE, collect_photos
from ..atlas.driver import atlas_layers, check_settings
from ..datasets import FolderImages
from ..errors import ConvscopeError
from ..images import IMAGE_EXTENSIONS, load_image
from ..methods.features import make_recipe
from ..precision import PICTURE, resolve_precision
from ._common import (
    add_max_side_arg,
    add_model_args,
    add_out_arg,
    add_precision_arg,
    add_ray_arg,
    check_image,
    check_out,
    load_from_args,
    model_short_side,
    out_dir,
    positive_float,
    positive_int,
    print_json,
    ray_from_args,
)


def channel_count(text: str) -> int | None:
    """``all`` (None: every channel) or a whole number of channels per layer."""
    if text.strip().lower() == "all":
        return None
    return positive_int(text)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "atlas", help="build a browsable HTML atlas: model, layer and channel pages",
        description="Stages: activations, features, scan, deconv, pages. Each stage's results are cached by "
                    "model, weights, layer and settings; re-running reuses them, and an interrupted build "
                    "resumes where it stopped. Open OUT/index.html, or run `convscope serve OUT`.",
        epilog="Examples:\n  convscope atlas --budget 2            # every layer; as many channels as fit 2 hours\n"
               "  convscope atlas --yes                 # every channel of every layer, however long\n"
               "  convscope atlas --model vgg19 --images ~/photos --channels-per-layer 16 --steps 128",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="photo files or folders (default: scikit-image's sample photos)")
    p.add_argument("--photos", type=positive_int, default=8, metavar="N", help="use at most N photos (default 8)")
    p.add_argument("--layers", default=None, help="names, aliases or patterns (default: every conv after its activation)")
    p.add_argument("--channels", "--channels-per-layer", dest="channels_per_layer", type=channel_count,
                   default=None, metavar="all|N",
                   help="channel pages, feature visualizations and projections for every channel of each layer "
                        "(all, the default) or its first N")
    p.add_argument("--budget", type=positive_float, default=None, metavar="HOURS",
                   help="fit the build into HOURS of projected time: every layer keeps its first N channels with "
                        "the largest N that fits (narrow layers come out whole); if one channel per layer is too "
                        "much, an evenly spaced subset of the layers")
    p.add_argument("--yes", action="store_true",
                   help=f"build even when the projected time is over {atlas_plan.CONFIRM_HOURS:g} h")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="feature-visualization steps (default: the recipe's, 80 for fast, 256 for lucid)")
    p.add_argument("--size", type=positive_int, default=128, metavar="PX", help="feature-visualization image size (default 128)")
    p.add_argument("--recipe", default=None, choices=("lucid", "fast", "post"),
                   help="feature-visualization recipe: fast (default: lucent's objective in 80 "
                        "steps instead of 256), lucid or post")
    add_precision_arg(p, picture=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=positive_int, default=9, help="examples per channel from the scan and deconvnet (default 9)")
    p.add_argument("--projections", type=positive_int, default=None, metavar="N",
                   help="with a scan: projections per channel, for its strongest N examples (default: all of --top); "
                        "the others show their patch alone. Projections are a third of a whole-model build")
    p.add_argument("--scan", default=None, metavar="DIR",
                   help="folder of images for the dataset scan, or 'samples' for the built-in sample set "
                        "(default: no scan; the deconvnet then projects the photos' strongest units)")
    p.add_argument("--scan-limit", type=positive_int, default=None, metavar="N", help="scan only the first N images")
    p.add_argument("--deconv-method", default="auto", choices=("auto", "deconvnet", "guided", "gradient"),
                   help="projection of the top units: auto = the deconvnet for models with max-pooling, else "
                        "guided backprop (without max-pooling the deconvnet does not depend on the image); "
                        "per layer, the plain gradient where the rule does not hold (e.g. Hardswish or GELU "
                        "on the path), and the pages say why")
    p.add_argument("--not-strict", dest="strict", action="store_false",
                   help="backpropagate nonlinearities without a deconvnet/guided rule (GELU, Hardswish, gates) "
                        "plainly under the rule instead of using the plain gradient on those layers")
    p.add_argument("--profile", action="store_true",
                   help="also build the depth profile (dead channels, transfer probes, projection trust) for the "
                        "model page, as `convscope profile` does on the atlas's layers (minutes on a CPU)")
    p.add_argument("--skip", default="", metavar="STAGES",
                   help=f"comma-separated stages not to run: {', '.join(STAGE_NAMES)}")
    p.add_argument("--json", action="store_true", help="print the per-stage report as JSON")
    add_max_side_arg(p)
    add_out_arg(p, "runs/atlas")
    add_model_args(p)
    add_ray_arg(p, "the feature visualizations (chunks of channels) and the scan")
    p.set_defaults(func=run)


def settings_from_args(args) -> AtlasSettings:
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    steps = args.steps or make_recipe(args.recipe or ATLAS_RECIPE).steps
    settings = AtlasSettings(layers=args.layers, channels_per_layer=args.channels_per_layer, steps=steps,
                             feature_size=args.size, recipe=args.recipe, seed=args.seed, top=args.top,
                             projections=args.projections,
                             max_photos=args.photos, scan_images=args.scan, skip=skip,
                             deconv_method=args.deconv_method, scan_limit=args.scan_limit,
                             strict=args.strict, precision=args.precision, profile=args.profile)
    check_settings(settings)
    return settings


def check_sources(args) -> dict:
    """Refuse missing photos and an unusable --scan folder before the model loads or --out exists.

    Returns the photo files named directly, read: ``{name: RGB}``.
    """
    named = {}
    for item in args.images or ():
        path = Path(item).expanduser()
        if path.is_dir():
            if not any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in path.rglob("*")):
                raise ConvscopeError(f"--images {item}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        else:
            named[item] = check_image(load_image(path), item, max_side=None)
    if args.scan_limit is not None and args.scan is None:
        raise ConvscopeError("--scan-limit limits the scan of --scan DIR (or --scan samples); give --scan too")
    if args.scan is not None and args.scan != "samples":
        if not Path(args.scan).expanduser().is_dir():
            raise ConvscopeError(f"--scan {args.scan}: not a folder (or use --scan samples for the built-in set)")
        FolderImages(args.scan).require_readable(args.scan_limit)
    return named


class _Calibration(NamedTuple):
    rates: dict
    seconds: float             # spent calibrating now (0 when cached)
    source: str                # where the rates came from, in words
    photos: int
    unsaved_key: str | None    # a fresh calibration's key, saved once the atlas folder exists; None when cached


def _calibration(args, loaded, layers, settings: AtlasSettings) -> _Calibration:
    """This machine's measured rates: cached in ``--out``, or measured now.

    Runs before any Ray session: a local cluster's first workers import torch as they start, and
    measured alongside them the rates would be this machine's shared with them. Nothing is written
    here: a refused build leaves no folder behind.
    """
    photos = {name: rgb for name, _, rgb in collect_photos(args.images, settings.max_photos)}
    key = atlas_plan.calibration_key(loaded, layers, settings, photos)
    rates = atlas_plan.load_calibration(Path(args.out).expanduser(), key)
    if rates is not None:
        return _Calibration(rates, 0.0, "from the calibration cached in --out", len(photos), None)
    print(f"calibrating: a few feature-visualization steps and projections on up to "
          f"{atlas_plan.CALIBRATION_LAYERS} layers ...", flush=True)
    start = time.perf_counter()
    rates = atlas_plan.calibrate(loaded, layers, settings, photos)
    seconds = time.perf_counter() - start
    return _Calibration(rates, seconds, f"from {seconds:.0f} s of calibration", len(photos), key)


def _plan(args, layers, settings: AtlasSettings, calibration: _Calibration, executor=None) -> AtlasSettings:
    """Print the projected time and size; fit ``--budget``, or refuse a long build without ``--yes``.

    ``calibration`` is :func:`_calibration`'s value. With a Ray ``executor`` the features and deconv
    stages are projected at the pool's rate (:meth:`~convscope.distributed.RayExecutor.speedup`), and
    ``--budget`` and ``--yes`` go by that.
    """
    rates, seconds, source, photos, _ = calibration
    pool = {}
    if executor is not None:
        local = atlas_plan.plan_atlas(layers, settings, rates, photos, seconds)
        print(f"projection: {local.describe()}")
        speedup, where = executor.speedup()
        pool = {"speedup": speedup, "where": where}
    plan = atlas_plan.plan_atlas(layers, settings, rates, photos, seconds, **pool)
    print(f"projection: {plan.describe()}; {source} (earlier results in --out are reused and not counted)")
    if args.budget is not None:
        if plan.hours > args.budget:
            plan = atlas_plan.fit_budget(layers, settings, rates, photos, args.budget, **pool)
            print(f"budget {args.budget:g} h: {plan.describe()}")
        return plan.settings
    if plan.hours > atlas_plan.CONFIRM_HOURS and not args.yes:
        raise ConvscopeError(
            f"this atlas is projected to take {plan.hours:.1f} h (over {atlas_plan.CONFIRM_HOURS:g} h): "
            "pass --yes to build it all, --budget HOURS to choose layers and channels that fit, or fewer --steps "
            "and --projections (with --scan) for every channel in less time")
    return settings


def run(args) -> int:
    settings = settings_from_args(args)
    ray = ray_from_args(args)
    check_out(args.out)
    named = check_sources(args)
    loaded = load_from_args(args)
    for item, image in named.items():  # the photos are fitted to the model's input size: shorter side
        check_image(image, item, args.max_side, None, model_short_side(loaded))
    layers = atlas_layers(loaded, settings.layers)
    print(f"model: {loaded.title}")
    precision = resolve_precision(settings.precision, loaded.device, purpose=PICTURE, module=loaded.module)
    print(f"precision: {precision.describe()} for the feature visualization"
          + ("; exact fp32 for the scan and the projections" if settings.precision == "auto" else ""))
    calibration = _calibration(args, loaded, layers, settings)
    with contextlib.ExitStack() as stack:
        executor = None
        if ray is not None:
            from ..distributed import RayExecutor

            # one connection and one actor pool for every stage that runs on the cluster
            executor = stack.enter_context(RayExecutor(ray))
        settings = _plan(args, layers, settings, calibration, executor)
        out = out_dir(args.out)
        if calibration.unsaved_key is not None:
            atlas_plan.save_calibration(out, calibration.unsaved_key, calibration.rates, calibration.seconds)
        layers = atlas_layers(loaded, settings.layers)
        channels = sum(len(settings.channels(layer)) for layer in layers)
        examples = ("projections" if settings.projected() == settings.top
                    else f"examples, the strongest {settings.projected()} with projections")
        print(f"plan: {len(layers)} layers, {channels} channels with pages, feature visualizations ({settings.steps} "
              f"steps at {settings.feature_size} px) and top-{settings.top} {examples}; valid results in {out} are "
              "reused")
        if ray is not None:
            print(f"ray: the scan, feature visualizations and projections run on {ray.describe()}; "
                  "files are written here")
        build = build_atlas(loaded, args.images, out, settings, executor=executor)
    if args.json:
        print_json({"index": str(build.index.resolve()), "stages": build.stages})
        return 0
    print("\n".join(build.summary_lines()))
    print(f"atlas: {build.index.resolve()}")
    print(f"serve it with: convscope serve {out}")
    return 0
