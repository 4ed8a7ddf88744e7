"""The profile record: the model's depth profile (:func:`convscope.profile_model`) for the model page,
and each projection method's trust verdict, which the channel pages link to."""

from __future__ import annotations

from tqdm import tqdm

from ...methods.profile import DEFAULTS, profile_model
from ..context import BuildContext
from ..store import make_key, read_json, record_files, write_record

__all__ = ["build_profile", "PROFILE_VERSION"]

PROFILE_VERSION = 1


def build_profile(ctx: BuildContext) -> dict:
    """The depth profile of the atlas's layers (``records/profile.json``, ``data/profile/``).

    The scan set is the atlas's (``settings.scan_images``; the sample windows when it has none),
    the photos are the atlas's; reused while the model, layers, photos and settings are unchanged.
    """
    path = ctx.out / "records" / "profile.json"
    limit = ctx.settings.scan_limit or DEFAULTS["scan_limit"]
    key = make_key(stage="profile", version=PROFILE_VERSION, photos=ctx.photos_key, seed=ctx.settings.seed,
                   layers=[layer.name for layer in ctx.layers], scan=ctx.settings.scan_images, limit=limit,
                   **ctx.model_key_parts())
    record = read_json(path)
    if ctx.current(record, key):
        return record
    with tqdm(total=1, desc=f"{'profile':<11}", unit="model", disable=not ctx.progress) as bar:
        result = profile_model(ctx.loaded, ctx.layers, images=ctx.image_set(), scan_limit=limit,
                               photos={photo.name: photo.rgb for photo in ctx.photos}, seed=ctx.settings.seed)
        bar.update(1)
    index = result.to_dict()
    data = {"plot": ctx.picture("data/profile/profile.png", result.plot()), "table": result.table(),
            "methods": index["methods"], "layers": index["layers"], "probes": index["probes"],
            "cascade_layer": index["cascade_layer"], "cascade_steps": index["cascade_steps"],
            "trust_test": index["trust_test"], "scan_images": index["scan_images"],
            "settings": index["settings"]}
    record = {"stage": "profile", "key": key, **data, "files": record_files(data)}
    write_record(path, record)
    return record
