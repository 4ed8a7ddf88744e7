"""The scan stage: per layer, the top-k images of each visualised channel over a data set
(:func:`convscope.scan`), with one shared copy of each source image (the pages crop the patches from it)."""

from __future__ import annotations

import functools
import hashlib
import time

import numpy as np

from ...errors import ConvscopeError
from ...precision import NUMBERS
from ..context import BuildContext, Stage
from ..store import SCREEN_WIDTH, Picture, make_key

__all__ = ["ScanStage"]


def _source_picture(ctx: BuildContext, kind: str, image_id: str, pixels: np.ndarray) -> Picture:
    """One shared copy per source image (``data/<kind>-images/``), written the first time it is needed.

    The file is named by the pixels' digest (which covers the image set and the input size)
    and the picture settings, so a later build with another image set or size never shows
    an earlier build's photo that happens to have the same id.
    """
    digest = hashlib.sha1(pixels.tobytes() + f"{pixels.shape}|webp|{SCREEN_WIDTH}".encode()).hexdigest()[:16]
    rel = f"data/{kind}-images/{image_id}-{digest}.webp"
    cached = ctx.sources.get(rel)
    if cached is None:
        height, width = pixels.shape[:2]
        small_rel = rel[:-len(".webp")] + ".screen.jpg"
        if (ctx.out / rel).is_file() and (width <= SCREEN_WIDTH or (ctx.out / small_rel).is_file()):
            cached = {"src": rel, "full": rel, "width": width, "height": height}
            if width > SCREEN_WIDTH:
                cached.update(src=small_rel, width=SCREEN_WIDTH, height=max(1, round(height * SCREEN_WIDTH / width)))
        else:
            cached = ctx.picture(rel, pixels, fmt="webp")
        ctx.sources[rel] = cached
    return cached


class ScanStage(Stage):
    """The top-k images of each channel over a data set, with their patches.

    One streaming pass over the image set serves every layer that needs it; the scan's own
    checkpoint makes an interrupted pass resumable.
    """

    name = "scan"
    version = 2  # 2: WebP sources; patches cropped from them on the page

    def unavailable(self, ctx):
        if ctx.settings.scan_images is None:
            return "no image set to scan was given (--scan DIR, or --scan samples for the built-in set)"
        return None

    def settings(self, ctx, layer):
        return {"images": ctx.image_set().describe(), "top": ctx.settings.top, "limit": ctx.settings.scan_limit,
                **ctx.precision_key(ctx.precision(NUMBERS))}

    def run(self, ctx, layers):
        images = ctx.image_set()
        keys = sorted(ctx.key(self, layer) for layer in layers)
        checkpoint = ctx.out / "records" / self.name / f"state-{make_key(keys=keys)}.pt"
        start = time.perf_counter()
        result = ctx.executor.scan(ctx.loaded, images, [layer.name for layer in layers], top=ctx.settings.top,
                                   checkpoint=checkpoint, resume=checkpoint.exists(), stop=ctx.settings.scan_limit,
                                   progress=ctx.progress, precision=ctx.precision(NUMBERS))
        if result.images_scanned == 0:
            checkpoint.unlink(missing_ok=True)
            raise ConvscopeError(f"the scan read no image ({len(result.skipped)} skipped as unreadable); "
                                 "give --scan a folder of readable images")
        per_layer = (time.perf_counter() - start) / len(layers)
        source = images.describe()
        described = source.get("root") if source.get("kind") == "folder" else "the built-in sample set"
        load = functools.lru_cache(maxsize=64)(images.load)  # the top images recur across channels
        for layer in layers:
            start = time.perf_counter()
            per_channel = {}
            for c in ctx.channels(layer):
                entries = []
                for example in result.examples(layer, c):
                    pixels = load(example.image)
                    entries.append({
                        "rank": example.rank, "image_id": example.image, "image": example.path,
                        "value": float(f"{example.value:.4g}"), "row": example.row, "col": example.col,
                        "box": list(example.box), "clipped": bool(example.clipped),
                        "image_size": list(images.size),
                        "source": _source_picture(ctx, self.name, str(example.image), pixels),
                    })
                per_channel[str(c)] = entries
            ctx.save_record(self, layer, {
                "per_channel": per_channel, "images_scanned": result.images_scanned,
                "skipped": len(result.skipped), "top": ctx.settings.top,
                "description": f"The {ctx.settings.top} images (of {result.images_scanned} scanned from "
                               f"{described}) where the channel fires hardest, one maximum per image.",
            }, seconds=per_layer + time.perf_counter() - start)
        checkpoint.unlink(missing_ok=True)
