"""The photos record: the photos as the model sees them, the top-5 predictions and evolution strips."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from ...errors import ConvscopeError
from ...methods.activations import ActivationResult, predict
from ..context import BuildContext
from ..store import make_key, read_json, record_files, write_record

__all__ = ["build_photos"]


def build_photos(ctx: BuildContext) -> dict:
    """Photos as the model sees them, predictions and evolution strips (``records/photos.json``).

    The record is reused (and marked ``_reused``) when its key and files are current.
    """
    path = ctx.out / "records" / "photos.json"
    key = make_key(stage="photos", version=1, photos=ctx.photos_key, layers=[layer.name for layer in ctx.layers],
                   **ctx.model_key_parts())
    record = read_json(path)
    if ctx.current(record, key):
        record["_reused"] = True
        return record
    entries = []
    prediction_error = None
    for photo in tqdm(ctx.photos, desc=f"{'photos':<11}", unit="photo", disable=not ctx.progress):
        entry: dict[str, Any] = {"name": photo.name, "slug": photo.slug, "source": photo.source,
                                 "size": list(photo.rgb.shape[:2]),
                                 "image": ctx.picture(f"data/photos/{photo.slug}.jpg", photo.rgb, fmt="jpeg")}
        try:
            entry["predictions"] = predict(ctx.loaded, photo.rgb) if prediction_error is None else None
        except ConvscopeError as err:  # not a classifier: the atlas still works, without predictions
            prediction_error, entry["predictions"] = str(err), None
        result = ActivationResult(photo.rgb, ctx.layers, ctx.feature_maps(photo, ctx.layers), ctx.loaded.title)
        entry["evolution"] = ctx.picture(f"data/photos/{photo.slug}_evolution.png", result.evolution())
        entries.append(entry)
    data = {"photos": entries, "prediction_error": prediction_error}
    record = {"stage": "photos", "key": key, **data, "files": record_files(data)}
    write_record(path, record)
    return record
