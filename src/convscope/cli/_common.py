"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConvscopeError
from ..images import load_image
from ..models import LoadedModel
from ..precision import PRECISIONS
from ..sources import load_model, preprocessing_changes


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help="default: EfficientNet-Lite0 with ImageNet weights (offline). Or a torchvision name "
                            "(vgg19, resnet50, ...), timm:NAME, a .pt file, package.module:factory, "
                            "keras:NAME (keras.applications, e.g. keras:VGG19; keras:VGG19+top with the "
                            "classifier) or a saved .keras model")
    group.add_argument("--weights", default=None, metavar="PATH",
                       help="load this local state dict (a Keras model: a .h5, .weights.h5 or .keras file)")
    group.add_argument("--random", action="store_true", help="random weights (architecture only); outputs say so")
    if not any("--seed" in action.option_strings for action in parser._actions):
        group.add_argument("--seed", type=int, default=0, help="seed of the --random initialisation (default 0)")
    group.add_argument("--trust-file", action="store_true",
                       help="allow unpickling a model file (runs code from it; only for files you trust)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto uses CUDA when present")
    group.add_argument("--input-size", type=_input_size, default=None, metavar="N|HxW",
                       help="the input size the model takes (default: the model's own; 224 for a .pt file or "
                            "factory), e.g. 32 for a CIFAR network")
    group.add_argument("--mean", type=_channel_values("mean"), default=None, metavar="R,G,B",
                       help="per-channel mean of a [0, 1] image subtracted before the model (default: the model's "
                            "own; ImageNet's for a .pt file or factory)")
    group.add_argument("--std", type=_channel_values("std"), default=None, metavar="R,G,B",
                       help="per-channel std the image is divided by after --mean (e.g. 0.5,0.5,0.5 with --mean "
                            "0.5,0.5,0.5 for inputs in [-1, 1])")


def _input_size(text: str) -> tuple[int, int]:
    """``--input-size N`` or ``HxW``, checked as ``load_model`` checks it (before anything loads)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        size = tuple(int(p) for p in parts) * (2 if len(parts) == 1 else 1)
        return preprocessing_changes(input_size=size)["input_size"]
    except (ValueError, ConvscopeError):
        raise argparse.ArgumentTypeError(f"{text!r}: give one side or HxW of at least 8 pixels (e.g. 32 or 32x32)") from None


def _channel_values(name: str):
    """An argparse type for ``--mean``/``--std``: three numbers, checked as ``load_model`` checks them."""
    def parse(text: str) -> tuple[float, float, float]:
        try:
            return preprocessing_changes(**{name: tuple(float(v) for v in text.split(","))})[name]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give three numbers, per RGB channel (e.g. 0.5,0.5,0.5)") from None
        except ConvscopeError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    return load_model(args.model, weights=args.weights, random=args.random, seed=args.seed,
                      trust_file=args.trust_file, device=args.device, input_size=getattr(args, "input_size", None),
                      mean=getattr(args, "mean", None), std=getattr(args, "std", None))


def add_ray_arg(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("Ray (pip install 'convscope[ray]')")
    group.add_argument("--ray", default=None, metavar="auto|HOST:PORT",
                       help=f"run {what} on a Ray cluster: auto joins the cluster in RAY_ADDRESS or starts a local "
                            "one; HOST:PORT joins the cluster whose head is there (`ray start --head`)")
    group.add_argument("--ray-workers", type=positive_int, default=None, metavar="N",
                       help="Ray actors, each with its own copy of the model and the cluster's CPUs / N torch threads "
                            "(default: one per GPU, else as many as give each the torch threads of a local run, "
                            "which keeps the results bit-equal to a local run's; more, thinner workers may be "
                            "faster, and differ from a local run by float rounding)")


def ray_from_args(args: argparse.Namespace):
    """The :class:`~convscope.distributed.RayTarget` of ``--ray`` (None without it); Ray must be installed."""
    if getattr(args, "ray", None) is None:
        if getattr(args, "ray_workers", None) is not None:
            raise ConvscopeError("--ray-workers sizes the Ray pool; give --ray auto (or --ray HOST:PORT) too")
        return None
    from ..distributed import parse_ray

    return parse_ray(args.ray, workers=args.ray_workers)


def add_out_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--out", default=default, metavar="DIR", help=f"output folder, created if needed (default {default})")


# argparse ``type=`` checks: a bad number is refused while parsing, before any model is loaded.

def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _bounded(kind: type, what: str, ok, rule: str):
    """An argparse ``type=`` that parses ``kind`` and refuses values for which ``ok(value)`` is false."""
    def parse(text: str):
        value = _number(text, kind, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


positive_int = _bounded(int, "a whole number", lambda v: v >= 1, "at least 1")
non_negative_int = _bounded(int, "a whole number", lambda v: v >= 0, "0 or more")
positive_float = _bounded(float, "a finite number", lambda v: v > 0, "greater than 0")
non_negative_float = _bounded(float, "a finite number", lambda v: v >= 0, "0 or more")


def port_number(text: str) -> int:
    value = _number(text, int, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535 (or 0 for any free port), got {value}")
    return value


def memory_size(text: str) -> int:
    """``"512MB"`` / ``"4GB"`` / ``"300"`` (MB) → bytes: the one spelling of every ``--memory`` option."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 512MB or 4GB")
    value, unit = float(match.group(1)), match.group(2) or "m"
    size = int(value * 1024 ** "kmgt".index(unit) * 1024)
    if size < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is too small: give at least 1MB")
    return size


def add_batch_size_arg(parser: argparse.ArgumentParser, what: str, default: int | None = None) -> None:
    """``--batch-size``: the one spelling of "how many per forward pass" in every command."""
    shown = "automatic" if default is None else str(default)
    parser.add_argument("--batch-size", type=positive_int, default=default, metavar="N",
                        help=f"{what} per forward pass (default: {shown})")


def add_memory_arg(parser: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """``--memory SIZE``: the one spelling of a memory budget in every command."""
    parser.add_argument("--memory", type=memory_size, default=memory_size(default) if default else None,
                        metavar="SIZE", help=f"memory budget for {what}, e.g. 512MB or 2GB "
                                             f"(default: {default or 'automatic'})")


def add_precision_arg(parser: argparse.ArgumentParser, picture: bool) -> None:
    """``--precision``: the one spelling of the numeric precision in every command.

    ``picture``: the command optimizes an image, where ``auto`` may choose bf16 and channels-last;
    elsewhere ``auto`` keeps exact float32 values (see :mod:`convscope.precision`).
    """
    if picture:
        rule = ("auto: bf16 autocast where the CPU or GPU computes bf16 natively, else fp32; channels-last for "
                "convolutional models")
    else:
        rule = "auto: fp32, exact values; bf16/fp16 autocast on request, faster where the hardware has them, values rounded"
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help=f"numeric precision ({rule})")


def check_out(path: str | os.PathLike) -> Path:
    """Refuse an ``--out`` that cannot become a writable folder; create nothing.

    Called before any work, so that a typo in ``--out`` costs nothing. The nearest existing
    ancestor must be a folder we can create entries in: tried for real with a temporary
    folder, since permission bits say nothing about read-only mounts, /proc or /sys (and
    root passes every ``os.access`` test).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConvscopeError(f"--out {path} is a file, not a folder; give a folder path (created if needed)")
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConvscopeError(f"--out {path}: {ancestor} is a file, so no folder can be made under it; "
                             "choose another --out")
    try:
        probe = tempfile.mkdtemp(prefix=".convscope-write-test-", dir=ancestor)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConvscopeError(f"--out {path}: cannot write in {ancestor} ({reason}); choose a writable --out folder") from None
    os.rmdir(probe)
    return path


MIN_SIDE = 8  # as the scan: smaller images hold too little for any layer past the first


def check_image(image, source, max_side: int | None, size=None, default_short: int | None = None):
    """Refuse an image too small to analyse, or whose model input would exceed ``max_side``.

    ``size`` is the parsed ``--size`` (None, the shorter side, or ``(H, W)``); ``default_short``
    the shorter side used when ``size`` is None (None: not known yet, checked later). Returns
    ``image``.
    """
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ConvscopeError(f"image {source} is {width}x{height} px; convscope needs at least {MIN_SIDE} px on "
                             "each side: use a larger image")
    shape = fitted_shape((height, width), size, default_short)
    if max_side is not None and shape is not None and max(shape) > max_side:
        raise ConvscopeError(f"image {source} ({width}x{height} px) would become a {shape[1]}x{shape[0]} model "
                             f"input, longer than --max-side {max_side}; crop it, give --size HxW, or raise "
                             "--max-side")
    return image


def fitted_shape(shape: tuple[int, int], size, default_short: int | None) -> tuple[int, int] | None:
    """The ``(H, W)`` that :meth:`Preprocessing.fit` gives an image of ``shape`` (None if not known yet)."""
    if isinstance(size, tuple):
        return size
    short = size if size is not None else default_short
    if short is None:
        return None
    height, width = shape
    scale = short / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


DEFAULT_MAX_SIDE = 2048


def image_arg(args: argparse.Namespace) -> tuple[np.ndarray, int | tuple[int, int] | None]:
    """``(image, size)`` of a one-photo command, both checked before any model is loaded."""
    size = parse_size(args.size)
    return check_image(load_image(args.image), args.image, args.max_side, size), size


def model_for_image(args: argparse.Namespace, image: np.ndarray, size) -> LoadedModel:
    """The model of ``args``, and the image checked again at the model's own input size."""
    loaded = load_from_args(args)
    check_image(image, args.image, args.max_side, size, model_short_side(loaded))
    return loaded


def add_max_side_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-side", type=positive_int, default=DEFAULT_MAX_SIDE, metavar="PX",
                        help=f"refuse a model input longer than this, e.g. from a very long, thin image "
                             f"(default {DEFAULT_MAX_SIDE}; raise it to allow larger)")


def parse_size(text: str | None) -> int | tuple[int, int] | None:
    """``"224"`` → 224 (shorter side); ``"200x300"`` → (200, 300) as (H, W)."""
    if text is None:
        return None
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            size = (int(h), int(w))
            if min(size) < 1:
                raise ValueError
            return size
        value = int(text)
        if value < 1:
            raise ValueError
        return value
    except ValueError:
        raise ConvscopeError(f"bad --size {text!r}: use N (shorter side) or HxW, e.g. 200x300") from None


def parse_channels(text: str | None, channels: int) -> list[int] | None:
    """``"0-7,12"`` → [0..7, 12], checked against the layer's channel count."""
    if text is None:
        return None
    chosen: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part.lstrip("-"):
                lo, hi = (int(v) for v in part.split("-", 1))
                if lo > hi:
                    raise ConvscopeError(f"bad channel range {part!r} in {text!r}: write the lower end first, "
                                         f"e.g. {hi}-{lo}")
                chosen.extend(range(lo, hi + 1))
            else:
                chosen.append(int(part))
    except ValueError:
        raise ConvscopeError(f"bad channel list {text!r}: use e.g. 0-63 or 3,7,12") from None
    if not chosen:
        raise ConvscopeError(f"no channels in {text!r}: use e.g. 0-63 or 3,7,12")
    bad = [c for c in chosen if not 0 <= c < channels]
    if bad:
        raise ConvscopeError(f"channel {bad[0]} is out of range: this layer has channels 0..{channels - 1}")
    return list(dict.fromkeys(chosen))


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


def out_dir(path: str) -> Path:
    """Create ``--out`` (checked earlier by :func:`check_out`) when the outputs are ready to be written."""
    path = check_out(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_short_side(loaded: LoadedModel) -> int:
    return min(loaded.preprocessing.input_size)
