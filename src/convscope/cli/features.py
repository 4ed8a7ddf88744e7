"""``convscope features``: what each filter wants to see, synthesized by gradient ascent."""

from __future__ import annotations

import time

from ..errors import ConvscopeError
from ..methods.features import FeatureSet, join_results, visualize_classes, visualize_features
from ..methods.features.engine import make_recipe
from ..methods.features.objectives import parse_objective
from ..precision import PICTURE, resolve_precision
from ._common import (
    add_batch_size_arg,
    add_memory_arg,
    add_model_args,
    add_out_arg,
    add_precision_arg,
    add_ray_arg,
    check_out,
    load_from_args,
    non_negative_float,
    out_dir,
    parse_channels,
    parse_size,
    positive_float,
    positive_int,
    ray_from_args,
)

EPILOG = """Examples:
  convscope features --model vgg16 --layer block3_conv3 --channels 0-63 --out runs/vgg-b3
  convscope features --model vgg19 --random --layer block1_conv2 --recipe post
  convscope features --objective class:281 --steps 512          # what the model thinks a tabby cat looks like
  convscope features --layer blocks.3.1.bn1 --channels 0-15 --steps 128 --size 96
"""


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "features", help="synthesize the image each channel responds to most (feature visualization)",
        description="One image per channel, optimized from noise by gradient ascent, all channels of a layer in "
                    "one batched optimization; one PNG per channel, a sheet per layer and features.json. "
                    "Channels that never exceed 0.1% of their layer's scale (the median over its firing channels of "
                    "their max |activation| on the photos), on any sample photo or by the optimization, are "
                    "reported dead.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", default=None,
                   help="layer names, aliases or patterns, comma-separated (see `convscope layers`)")
    p.add_argument("--channels", default=None, help="e.g. 0-63 or 3,7,12, or 'all' (default: the first 16)")
    p.add_argument("--objective", default="channel",
                   help="channel (mean of the channel, default), neuron (its centre unit), layer (DeepDream L2 of "
                        "the whole layer) or class:N[,M] (a class logit; no --layer)")
    p.add_argument("--recipe", default="lucid", choices=("lucid", "fast", "post"),
                   help="lucid: FFT + decorrelated colour + transforms + Adam (default); fast: lucid in 80 "
                        "steps (warm-up + cosine decay of a higher learning rate, a smaller border); "
                        "post: the blog post's plain gradient ascent from gray noise")
    p.add_argument("--steps", type=positive_int, default=None, help="default 256 (lucid), 80 (fast) or 40 (post)")
    p.add_argument("--size", default=None, help="N or HxW; default 128 (lucid) or 150 (post)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0)")
    p.add_argument("--max-scale", type=positive_float, default=None, metavar="S",
                   help="largest scale of the random transforms (default 1.1, Lucid's); e.g. 1.3 gives images "
                        "that hold up better when upsampled, at some cost to the objective at their own size")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default 0.05 lucid, 1/255 post)")
    p.add_argument("--variants", type=positive_int, default=1, help="images per channel (use with --diversity)")
    p.add_argument("--diversity", type=non_negative_float, default=None, help="weight of the diversity term between variants")
    p.add_argument("--tv", type=non_negative_float, default=None, help="weight of a total-variation penalty")
    p.add_argument("--l2", type=non_negative_float, default=None, help="weight of an L2 penalty")
    add_precision_arg(p, picture=True)
    add_memory_arg(p, "each chunk of channels optimized together")
    add_batch_size_arg(p, "channels")
    p.add_argument("--cols", type=positive_int, default=8, help="tiles per row on the sheet")
    add_out_arg(p, "runs/features")
    add_model_args(p)
    add_ray_arg(p, "chunks of channels (16 per Ray task, or --batch-size)")
    p.set_defaults(func=run)


def _channels(text: str | None, count: int) -> list[int]:
    if text is None:
        return list(range(min(16, count)))
    if text.strip().lower() == "all":
        return list(range(count))
    chosen = parse_channels(text, count)
    if not chosen:
        raise ConvscopeError(f"no channels in {text!r}")
    return chosen


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# Channels per Ray work unit without --batch-size: small enough to spread a layer over many workers.
RAY_CHUNK = 16


def visualize_unit(loaded, unit: tuple[str, list[int]], options: dict):
    """One Ray work unit: a chunk of one layer's channels (a module-level function: it is pickled)."""
    layer, channels = unit
    return visualize_features(loaded, layer, channels, **options)


def _on_ray(ray, loaded, plans, kind: str, common: dict) -> list:
    """Each layer's channels in chunks on a Ray pool; per layer, the chunks joined in channel order."""
    from tqdm import tqdm

    from ..distributed import RayExecutor

    size = common.get("max_batch") or RAY_CHUNK
    units = [(layer.name, channels[i:i + size]) for layer, channels in plans for i in range(0, len(channels), size)]
    labels = {layer.name: layer.label for layer, _ in plans}
    parts: dict[tuple[str, int], object] = {}
    began = time.perf_counter()
    print(f"ray: {len(units)} chunks of up to {size} channels on {ray.describe()}")
    with tqdm(total=sum(len(c) for _, c in units), unit="ch", desc="features (ray)", dynamic_ncols=True) as bar:
        for (name, channels), result in RayExecutor(ray).map(loaded, visualize_unit, units,
                                                             {**common, "objective": kind}):
            parts[(name, channels[0])] = result
            bar.update(len(channels))
    seconds = time.perf_counter() - began
    total = sum(len(channels) for _, channels in plans)
    results = []
    for layer, channels in plans:   # the wall time, shared out by channels: the chunks ran side by side
        chunks = [parts[(layer.name, channels[i])] for i in range(0, len(channels), size)]
        results.append((labels[layer.name], join_results(chunks), seconds * len(channels) / total))
    return results


def run(args) -> int:
    check_out(args.out)
    ray = ray_from_args(args)
    kind, classes = parse_objective(args.objective)
    if ray is not None and kind not in ("channel", "neuron"):
        raise ConvscopeError(f"--ray fans out chunks of channels; --objective {args.objective} is one optimization: "
                             "run it without --ray")
    size = parse_size(args.size)
    if isinstance(size, int):
        size = (size, size)
    # resolved here, once, so a bad value stops before the model loads; then it travels as a value
    recipe = make_recipe(args.recipe, max_scale=args.max_scale) if args.max_scale is not None else args.recipe
    if args.channels is not None and args.channels.strip().lower() != "all":
        parse_channels(args.channels, 1 << 30)  # the syntax now; the range once the layer is known
    if kind == "class" and args.layer:
        raise ConvscopeError("--objective class:N maximizes a class logit at the model's output; drop --layer")
    if kind != "class" and not args.layer:
        raise ConvscopeError(f"--objective {kind} needs --layer (see `convscope layers`), e.g. --layer blocks.3.1.bn1")
    loaded = load_from_args(args)
    if kind == "class":
        names = loaded.class_names or []
        bad = [c for c in classes if names and not 0 <= c < len(names)]
        if bad:
            raise ConvscopeError(f"class {bad[0]} is out of range: this model has classes 0..{len(names) - 1}")
        plans = []
    else:
        layers = loaded.catalogue.resolve(args.layer)
        plans = [(layer, _channels(args.channels, layer.channels) if kind != "layer" else None) for layer in layers]
    common = dict(recipe=recipe, steps=args.steps, size=size, seed=args.seed, lr=args.lr,
                  variants=args.variants, diversity=args.diversity, tv=args.tv, l2=args.l2,
                  memory_budget=args.memory, max_batch=args.batch_size, progress=True)
    common["precision"] = resolve_precision(args.precision, loaded.device, purpose=PICTURE, module=loaded.module)
    print(f"model: {loaded.title}")
    print(f"precision: {common['precision'].describe()}")
    results = []
    if kind == "class":
        t0 = time.perf_counter()
        result = visualize_classes(loaded, classes, **common)
        results.append(("classes", result, time.perf_counter() - t0))
    elif ray is not None:
        results = _on_ray(ray, loaded, plans, kind, {**common, "progress": False})
    else:
        for layer, channels in plans:
            t0 = time.perf_counter()
            result = visualize_features(loaded, layer, channels, objective=kind, **common)
            results.append((layer.label, result, time.perf_counter() - t0))
    out = out_dir(args.out)
    FeatureSet([result for _, result, _ in results], loaded.describe(), args.objective).save(out, cols=args.cols)
    for label, result, seconds in results:
        ratios = [r["ratio"] for r in result.records if r["ratio"] is not None]
        ratio = f"median x{sorted(ratios)[len(ratios) // 2]:.2f} of the best photo" if ratios else "no photo reference"
        dead = f"; dead {result.dead_count}/{len(result)}" if kind in ("channel", "neuron") else ""
        print(f"  {label}: {_plural(len(result), 'image')} in {seconds:.1f}s ({seconds / len(result):.2f}s each, "
              f"chunks of {result.chunk_size}); {ratio}{dead}")
    total = sum(len(r) for _, r, _ in results)
    print(f"wrote {_plural(total, 'image')}, {_plural(len(results), 'sheet')} and features.json to {out}")
    return 0
