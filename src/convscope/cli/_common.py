"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConvscopeError
from ..models import LoadedModel, load_model


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help="default: EfficientNet-Lite0 with ImageNet weights (offline). Or a torchvision name "
                            "(vgg19, resnet50, ...), timm:NAME, a .pt file, or package.module:factory")
    group.add_argument("--weights", default=None, metavar="PATH", help="load this local state dict")
    group.add_argument("--random", action="store_true", help="random weights (architecture only); outputs say so")
    group.add_argument("--trust-file", action="store_true",
                       help="allow unpickling a model file (runs code from it; only for files you trust)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto uses CUDA when present")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    return load_model(args.model, weights=args.weights, random=args.random,
                      trust_file=args.trust_file, device=args.device)


def add_out_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--out", default=default, metavar="DIR", help=f"output folder, created if needed (default {default})")


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
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                chosen.extend(range(lo, hi + 1))
            else:
                chosen.append(int(part))
    except ValueError:
        raise ConvscopeError(f"bad channel list {text!r}: use e.g. 0-63 or 3,7,12") from None
    bad = [c for c in chosen if not 0 <= c < channels]
    if bad:
        raise ConvscopeError(f"channel {bad[0]} is out of range: this layer has channels 0..{channels - 1}")
    return list(dict.fromkeys(chosen))


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


def out_dir(path: str) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConvscopeError(f"--out {path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path
