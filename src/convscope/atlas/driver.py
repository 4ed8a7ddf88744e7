"""Building an atlas: the photos record, then each stage on the layers whose records are stale,
then ``atlas.json`` and the pages.

A stage that has nothing to work on (the scan without an image set) is reported as unavailable
and its part of the pages says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import ensure_dir, save_json
from .._version import __version__
from ..errors import ConvscopeError
from ..images import ImageSource
from ..layers import LayerInfo
from ..models import LoadedModel, as_loaded
from ..rectifiers import resolve_projection
from .context import AtlasBuild, AtlasSettings, BuildContext, Photo, Stage, collect_photos
from .pages import render_site
from .stages import STAGE_NAMES, STAGES, build_photos
from .stages.profile import build_profile
from .store import unique_slugs

__all__ = ["atlas_layers", "build_atlas", "check_settings", "stage_report"]


def check_settings(settings: AtlasSettings) -> None:
    """Refuse settings no build can follow (an unknown stage to skip or projection method, projections
    without a scan or beyond ``top``) before any work."""
    unknown = [name for name in settings.skip if name not in STAGE_NAMES]
    if unknown:
        raise ConvscopeError(f"unknown stage {unknown[0]!r} to skip; stages are {', '.join(STAGE_NAMES)}")
    if settings.deconv_method != "auto":
        resolve_projection(settings.deconv_method)
    if settings.projections is not None:
        if settings.scan_images is None:
            raise ConvscopeError("--projections chooses which of the scan's top examples get a projection; give --scan "
                                 "too (without a scan each photo's strongest unit is projected)")
        if not 1 <= settings.projections <= settings.top:
            raise ConvscopeError(f"--projections {settings.projections}: give 1 to --top ({settings.top}) projections "
                                 "per channel")


def atlas_layers(loaded: LoadedModel, spec: str | Sequence[str] | None) -> list[LayerInfo]:
    """The layers an atlas of ``spec`` shows (see :meth:`Catalogue.resolve`); each must give (C, H, W) maps."""
    layers = loaded.catalogue.resolve(spec)
    flat = [layer for layer in layers if not layer.is_spatial]
    if flat:
        raise ConvscopeError(
            f"the atlas shows feature maps (C, H, W); layer {flat[0].label} has shape {flat[0].shape}. "
            "Choose convolutional layers (`convscope layers` marks the default ones with *).")
    if not layers:
        raise ConvscopeError("no layers to show; pass --layers")
    return layers


def build_atlas(
    model: LoadedModel | torch.nn.Module,
    images: ImageSource | Iterable[ImageSource] | dict | None = None,
    out: str | Path = "runs/atlas",
    settings: AtlasSettings | None = None,
    *,
    progress: bool = True,
    stages: Sequence[Stage] | None = None,
    executor=None,
) -> AtlasBuild:
    """Build (or bring up to date) the atlas of ``model`` over ``images`` in ``out``.

    Args:
        model: a :class:`LoadedModel` or any ``nn.Module`` (left untouched).
        images: photo files, folders, a ``{name: image}`` dict, or None for the sample photos.
        out: output folder; records from an earlier build there are reused when still valid.
        settings: what to build and the budget (:class:`AtlasSettings`).
        stages: the producers to run (default :data:`STAGES`), for tests and extensions.
        executor: where the feature visualizations run: None for this process, or a
            :class:`~convscope.distributed.RayExecutor` to fan them out over a Ray cluster
            (the scan stage then scans on the same cluster). Files and records are written
            here either way, so the atlas and its cache are the same.

    Returns:
        an :class:`AtlasBuild` with the path of ``index.html`` and what each stage did.

    Example:
        >>> build = build_atlas(load_model(), out="runs/atlas",
        ...                     settings=AtlasSettings(layers="blocks.2.*", channels_per_layer=8))
        >>> build.index
        PosixPath('runs/atlas/index.html')
    """
    settings = settings or AtlasSettings()
    check_settings(settings)
    loaded = as_loaded(model)
    layers = atlas_layers(loaded, settings.layers)
    found = collect_photos(images, settings.max_photos)
    out = ensure_dir(out)
    slugs = unique_slugs([name for name, _, _ in found])
    photos = [Photo(name, slug, source, loaded.fit(rgb)) for (name, source, rgb), slug in zip(found, slugs)]
    ctx = BuildContext(loaded, out, settings, layers, photos, progress, executor)

    photos_record = build_photos(ctx)
    reused = bool(photos_record.get("_reused"))
    report: dict[str, dict] = {"photos": {"status": "built", "built": int(not reused), "reused": int(reused)}}
    manifest_stages: dict[str, dict] = {}
    for stage in stages if stages is not None else STAGES:
        reason = stage.unavailable(ctx)
        if reason:
            report[stage.name] = {"status": "unavailable", "reason": reason}
            manifest_stages[stage.name] = {**report[stage.name], "records": {}}
            continue
        report[stage.name], done = _run_stage(ctx, stage)
        manifest_stages[stage.name] = {**report[stage.name], "records": {
            ctx.slug(layer): f"records/{stage.name}/{ctx.slug(layer)}.json" for layer in layers if layer.name in done}}

    manifest = _manifest(ctx, manifest_stages)
    if settings.profile:
        start = time.perf_counter()
        build_profile(ctx)
        manifest["profile"] = "records/profile.json"
        report["profile"] = {"status": "built", "built": 1, "reused": 0, "seconds": round(time.perf_counter() - start, 2)}
    save_json(manifest, out / "atlas.json")
    start = time.perf_counter()
    index = render_site(out, progress=progress)
    report["pages"] = {"status": "built", "built": 1, "reused": 0, "seconds": round(time.perf_counter() - start, 2)}
    return AtlasBuild(out, index, report)


def _run_stage(ctx: BuildContext, stage: Stage) -> tuple[dict, set[str]]:
    """Run ``stage`` on the layers without a valid record; its report and the layers it has records for."""
    layers = ctx.layers
    keys = {layer.name: ctx.key(stage, layer) for layer in layers}
    todo = [layer for layer in layers if ctx.valid_record(stage.name, layer, keys[layer.name]) is None]
    skipped = stage.name in ctx.settings.skip
    start = time.perf_counter()
    if todo and not skipped:
        stage.run(ctx, todo)
    seconds = time.perf_counter() - start
    done = {layer.name for layer in layers if ctx.valid_record(stage.name, layer, keys[layer.name])}
    built = sum(layer.name in done for layer in todo) if not skipped else 0
    info = {"status": "skipped" if skipped else "built", "built": built, "reused": len(done) - built,
            "seconds": round(seconds, 2),
            "channels_built": sum(len(ctx.channels(layer)) for layer in todo if layer.name in done)}
    return info, done


def _manifest(ctx: BuildContext, stages: dict[str, dict]) -> dict:
    """``atlas.json``: the model, the settings, the layers and where each stage's records are."""
    return {
        "convscope": __version__,
        "model": {**ctx.loaded.describe(), "fingerprint": ctx.fingerprint},
        "settings": ctx.settings.as_dict(),
        "layers": [{**layer.as_dict(), "slug": ctx.slug(layer), "label": layer.label,
                    "global_field": layer.global_field, "visualised": ctx.channels(layer)} for layer in ctx.layers],
        "photos": "records/photos.json",
        "stages": stages,
    }


def stage_report(build: AtlasBuild) -> dict[str, Any]:
    """The JSON-able per-stage report (for ``--json`` and tests)."""
    return {name: dict(info) for name, info in build.stages.items()}
