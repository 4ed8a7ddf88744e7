"""What the atlas stages share: the settings, the photos, the build context and the stage contract.

Each stage leaves files plus one small JSON record per layer. A record carries a key: a hash of
the model fingerprint (architecture and weights), the preprocessing, the layer, the stage's
settings, its code version and the keys of what it depends on. A record whose key matches and
whose files all exist is reused; anything else is rebuilt. Every file is written atomically and
a record is written only after its files, so a crash loses at most the layer in progress, and a
re-run picks up where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm import tqdm

from ..datasets import MIN_SIDE, FolderImages, SampleImages
from ..distributed import LocalExecutor
from ..errors import ConvscopeError
from ..hooks import capture
from ..images import IMAGE_EXTENSIONS, ImageSource, load_image, sample_photos
from ..layers import LayerInfo
from ..models import LoadedModel, fingerprint
from ..precision import Precision, resolve_precision
from .store import Picture, make_key, read_json, record_files, save_picture, unique_slugs, write_record

# The atlas's default feature-visualization recipe: "fast" reaches lucent's objective at the
# image size (measured, benchmarks/features.py) in 80 steps instead of 256.
ATLAS_RECIPE = "fast"

__all__ = ["ATLAS_RECIPE", "AtlasSettings", "AtlasBuild", "BuildContext", "Photo", "Stage", "collect_photos"]


@dataclass(frozen=True)
class AtlasSettings:
    """What to build, and the budget.

    Attributes:
        layers: names, aliases or patterns (see :meth:`Catalogue.resolve`); None = every conv
            layer after its activation.
        channels_per_layer: how many channels per layer get a channel page, a feature
            visualization and projections (the first N); None = all (the default: the whole layer).
        full_layers: names or aliases of layers shown whole whatever ``channels_per_layer`` says.
        steps: optimization steps of the feature visualization (default: the default recipe's).
        feature_size: side of the feature-visualization images, in pixels.
        recipe: feature-visualization recipe (``"lucid"``, ``"fast"`` or ``"post"``), None for
            :data:`ATLAS_RECIPE`.
        seed: seed of the feature visualization.
        top: examples per channel from the scan and the deconvnet.
        projections: with a scan, how many of a channel's ``top`` examples (the strongest) get a
            projection; the others show their patch alone. None: all of them. Projections are a
            third of a whole-model build's time (``benchmarks/atlas.py``), the patches nearly free.
        max_photos: photos taken from ``images`` (sorted by path).
        scan_images: folder the scan stage streams; ``"samples"`` for the built-in sample set;
            None to scan nothing (the deconv stage then projects the photos' strongest units).
        scan_limit: scan only the first N images of the set (None: all).
        skip: stages not to run; records they already have with a matching key are still shown.
        cmap: colour map of the heat-map overlays.
        deconv_method: ``"auto"`` (the deconvnet for models with max-pooling, else guided
            backprop; see :class:`~convscope.atlas.stages.deconv.DeconvStage`), ``"deconvnet"``,
            ``"guided"`` or ``"gradient"``. Chosen per layer: where the rule does not hold (a
            nonlinearity other than a ReLU on the path) the plain gradient, with the reason.
        strict: False backpropagates nonlinearities without a deconvnet/guided rule (GELU,
            Hardswish, gates) plainly under the rule, instead of using the plain gradient there.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:mod:`convscope.precision`).
            ``"auto"`` lets the feature visualization use bf16 where the hardware has it and
            keeps the scan and the projections in exact float32; a named precision applies to all.
        profile: also build the model's depth profile (:func:`convscope.profile_model`: dead
            channels, transfer probes, projection trust) for the model page; minutes on a CPU.
    """

    layers: str | None = None
    channels_per_layer: int | None = None
    full_layers: tuple[str, ...] = ()
    steps: int = 80  # RECIPES[ATLAS_RECIPE].steps
    feature_size: int = 128
    recipe: str | None = None
    seed: int = 0
    top: int = 9
    projections: int | None = None
    max_photos: int = 8
    scan_images: str | None = None
    skip: tuple[str, ...] = ()
    cmap: str = "jet"
    deconv_method: str = "auto"
    scan_limit: int | None = None
    strict: bool = True
    precision: str = "auto"
    profile: bool = False

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def projected(self) -> int:
        """How many of a channel's scan examples get a projection (``check_settings`` keeps it within ``top``)."""
        return self.top if self.projections is None else self.projections

    def channels(self, layer: LayerInfo) -> list[int]:
        """The channels of ``layer`` that get pages: the first ``channels_per_layer``, or all of a full layer."""
        count = layer.channels
        whole = layer.name in self.full_layers or (layer.alias is not None and layer.alias in self.full_layers)
        if self.channels_per_layer is not None and not whole:
            count = min(count, self.channels_per_layer)
        return list(range(count))


@dataclass
class Photo:
    """One photo of the atlas: its (untrusted) display name, file slug, source and pixels."""

    name: str
    slug: str
    source: str
    rgb: np.ndarray  # (H, W, 3) uint8, resized for the model (shorter side = input size)

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.rgb.tobytes() + str(self.rgb.shape).encode()).hexdigest()[:16]


@dataclass
class AtlasBuild:
    """What a build did: where the site is, and per stage what was built, reused or missing."""

    out: Path
    index: Path
    stages: dict[str, dict]

    def summary_lines(self) -> list[str]:
        lines = []
        for name, info in self.stages.items():
            status = info["status"]
            if status == "unavailable":
                lines.append(f"  {name:<12} unavailable: {info['reason']}")
                continue
            detail = f"{info.get('built', 0)} built, {info.get('reused', 0)} reused"
            if status == "skipped":
                detail = f"skipped ({info.get('reused', 0)} layers kept from earlier builds)"
            lines.append(f"  {name:<12} {detail}, {info.get('seconds', 0.0):.1f} s")
        return lines


class BuildContext:
    """Everything a stage needs: the model, the layers, the photos, the output folder and the cache."""

    def __init__(self, loaded: LoadedModel, out: Path, settings: AtlasSettings, layers: list[LayerInfo],
                 photos: list[Photo], progress: bool = True, executor=None):
        self.loaded = loaded
        # Where the heavy work units run: this process, or a Ray cluster (convscope.distributed).
        # Results come back to this process, which writes every file and record.
        self.executor = executor if executor is not None else LocalExecutor()
        self.out = out
        self.settings = settings
        self.layers = layers
        self.photos = photos
        self.progress = progress
        self.fingerprint = fingerprint(loaded.module)
        self.slugs = dict(zip((layer.name for layer in layers), unique_slugs([layer.name for layer in layers])))
        self.keys: dict[tuple[str, str], str] = {}
        self.photos_key = make_key(photos=[(p.name, p.digest) for p in photos])
        self.sources: dict[str, Picture] = {}  # shared source-image pictures already written this build
        self.projections: dict[str, tuple] = {}  # layer -> (Rule, reason), audited once per build
        self._image_set = None  # the scan's image set, made once

    # ------------------------------------------------------------------ naming
    def slug(self, layer: LayerInfo) -> str:
        return self.slugs[layer.name]

    def channels(self, layer: LayerInfo) -> list[int]:
        """The channels that get pages (see :meth:`AtlasSettings.channels`)."""
        return self.settings.channels(layer)

    def precision(self, purpose: str) -> Precision:
        """The settings' precision resolved for ``purpose`` (:data:`~convscope.precision.PICTURE`
        for the feature visualization, :data:`~convscope.precision.NUMBERS` for values)."""
        return resolve_precision(self.settings.precision, self.loaded.device, purpose=purpose,
                                 module=self.loaded.module)

    @staticmethod
    def precision_key(precision: Precision) -> dict:
        """The precision's part of a stage's settings: nothing for exact float32, so records
        built before the option keep their keys."""
        return {} if precision.exact else {"precision": [precision.name, precision.channels_last]}

    def data_path(self, stage: str, layer: LayerInfo, name: str) -> str:
        return f"data/{stage}/{self.slug(layer)}/{name}"

    def record_path(self, stage: str, layer: LayerInfo) -> Path:
        return self.out / "records" / stage / f"{self.slug(layer)}.json"

    def picture(self, rel: str, image, fmt: str = "png", **options) -> Picture:
        """Write a picture of the atlas (see :func:`~convscope.atlas.store.save_picture` for ``options``)."""
        return save_picture(self.out, rel, image, fmt=fmt, **options)

    # ------------------------------------------------------------------ inputs
    def tensor(self, pixels: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """Photos (one or a list of RGB arrays) as the model's input batch."""
        return self.loaded.preprocessing.to_tensor(pixels, self.loaded.device)

    def feature_maps(self, photo: Photo, layers: list[LayerInfo]) -> dict[str, np.ndarray]:
        """``{layer name: (C, H, W) float32 map}`` of ``layers`` on one photo, from one forward pass."""
        outputs = capture(self.loaded.module, self.tensor(photo.rgb), layers)
        return {layer.name: outputs[layer.name][0].float().cpu().numpy() for layer in layers}

    def image_set(self):
        """The scan's image set for ``settings.scan_images`` (None when no scan was asked for)."""
        spec = self.settings.scan_images
        if spec is None:
            return None
        if self._image_set is None:
            pre = self.loaded.preprocessing
            size = tuple(pre.input_size)
            if str(spec) == "samples":
                self._image_set = SampleImages(size, pre.resample)
            elif not Path(spec).is_dir():
                raise ConvscopeError(f"--scan {spec}: not a folder (or use --scan samples for the built-in set)")
            else:
                self._image_set = FolderImages(spec, size, pre.resample)
        return self._image_set

    # ------------------------------------------------------------------ cache
    def model_key_parts(self) -> dict:
        return {"fingerprint": self.fingerprint, "preprocessing": self.loaded.preprocessing.as_dict()}

    def key(self, stage: Stage, layer: LayerInfo) -> str:
        """The cache key of ``stage`` for ``layer`` (computed once, when the stage starts)."""
        cached = self.keys.get((stage.name, layer.name))
        if cached is None:
            cached = make_key(stage=stage.name, version=stage.version, layer=layer.name,
                              channels=self.channels(layer), settings=stage.settings(self, layer),
                              **self.model_key_parts())
            self.keys[(stage.name, layer.name)] = cached
        return cached

    def current(self, record: dict | None, key: str, files: list[str] | None = None) -> bool:
        """Whether ``record`` was made with ``key`` and all its files (default: its ``files``) exist."""
        if not record or record.get("key") != key:
            return False
        return all((self.out / rel).is_file() for rel in (record.get("files", []) if files is None else files))

    def valid_record(self, stage: str, layer: LayerInfo, key: str) -> dict | None:
        """The record of ``stage`` for ``layer`` if it has ``key`` and all its files exist."""
        record = read_json(self.record_path(stage, layer))
        return record if self.current(record, key) else None

    def record(self, stage: str, layer: LayerInfo) -> dict | None:
        """The current record of an earlier stage for ``layer`` (None when it has none)."""
        key = self.keys.get((stage, layer.name))
        return self.valid_record(stage, layer, key) if key else None

    def save_record(self, stage: Stage, layer: LayerInfo, data: dict, seconds: float | None = None) -> dict:
        """Write a layer's record, after its files: the record is what marks the work as done."""
        record = {"stage": stage.name, "version": stage.version, "key": self.key(stage, layer),
                  "layer": layer.name, "slug": self.slug(layer), "channels": self.channels(layer),
                  "seconds": seconds, **data}
        record["files"] = record_files(data)
        write_record(self.record_path(stage.name, layer), record)
        return record

    def bar(self, stage: str, total: int, unit: str) -> tqdm:
        return tqdm(total=total, desc=f"{stage:<11}", unit=unit, disable=not self.progress, leave=True,
                    dynamic_ncols=True)


class Stage:
    """One producer of the atlas. Subclasses set ``name`` and implement :meth:`run`.

    A stage builds the layers it is given (those without a valid record) and calls
    :meth:`BuildContext.save_record` once per layer when that layer's files are written.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def unavailable(self, ctx: BuildContext) -> str | None:
        """Why this stage has nothing to work on in this build (the pages say so), or None."""
        return None

    def settings(self, ctx: BuildContext, layer: LayerInfo) -> dict:
        """Everything besides model, layer and channels that changes this stage's output."""
        return {}

    def run(self, ctx: BuildContext, layers: list[LayerInfo]) -> None:
        raise NotImplementedError


def collect_photos(images: ImageSource | Iterable[ImageSource] | dict | None, max_photos: int = 8) -> list[tuple[str, str, np.ndarray]]:
    """``(display name, source, RGB)`` for the atlas photos.

    ``images`` is None (scikit-image's sample photos), a ``{name: image}`` dict, or paths of
    files and folders (folders are searched recursively, sorted; unreadable files in a folder
    are skipped with a warning, an unreadable file named directly is an error).
    """
    if images is None:
        return [(name, f"sample:{name}", rgb) for name, rgb in sample_photos().items()][:max_photos]
    if isinstance(images, dict):
        return [(str(name), str(name), load_image(image)) for name, image in images.items()][:max_photos]
    if isinstance(images, (str, Path)) or not isinstance(images, Iterable):
        images = [images]
    found: list[tuple[str, str, np.ndarray]] = []
    for item in images:
        if len(found) >= max_photos:
            break
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            files = sorted(p for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                raise ConvscopeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {item}")
            for path in files:
                if len(found) >= max_photos:
                    break
                rgb, reason = _read_photo(path)
                if rgb is None:
                    tqdm.write(f"warning: skipped {path}: {reason}")
                    continue
                found.append((path.name, str(path), rgb))
        elif isinstance(item, (str, Path)):
            found.append((Path(item).name, str(item), load_image(item)))
        else:
            found.append((f"image{len(found)}", f"array {len(found)}", load_image(item)))
    if not found:
        raise ConvscopeError("no readable photos for the atlas; pass image files or a folder with --images")
    return found


def _read_photo(path: Path) -> tuple[np.ndarray | None, str]:
    """A photo found in a folder, or None and why it is not usable (unreadable, or too small)."""
    try:
        rgb = load_image(path)
    except ConvscopeError as err:
        return None, str(err)
    if min(rgb.shape[:2]) < MIN_SIDE:
        return None, f"{rgb.shape[1]}x{rgb.shape[0]} px, under {MIN_SIDE} px on a side"
    return rgb, ""
