"""What a scan found, and the run folder it saves itself to.

:meth:`ScanResult.save` writes:

* ``topk.npz``: the raw state, arrays ``{layer}/values``, ``{layer}/images`` (-1: unused slot),
  ``{layer}/positions``;
* ``{layer}/c{channel:04d}.png``: one figure per rendered channel (``{layer}``: the alias when
  there is one, else the module name);
* ``scan.json``: the index (below);
* ``run.json`` last: the manifest, every file above with its size and sha256. :func:`read_scan`
  reads a run only through it, so a run cut short by a crash (or two runs' files mixed in one
  folder) is refused rather than read half old, half new.

The scan's checkpoint ``scan_state.pt`` (``--resume``) sits beside them in the CLI's folder.

``scan.json`` (format ``convscope.scan/1``)::

    {
      "format": "convscope.scan/1",
      "model": {...},                   # LoadedModel.describe()
      "source": {...},                  # ImageSet.describe(): kind, root, count, fingerprint
      "image_size": [H, W],             # every image was resized to cover this and centre-cropped
      "top": k, "images_scanned": int,
      "skipped": [{"id": int, "path": str, "reason": str}],   # unreadable, corrupt, empty, tiny files
      "method": "deconvnet" | "guided" | "gradient" | null,   # the rule asked for ("auto" resolved);
                                                              # null when nothing was rendered
      "images": {"<id>": {"path": str}},  # the images that appear below; path relative to
                                          # source.root (folder) or skimage:NAME[t:b,l:r]
      "layers": [{
        "name", "alias", "label", "type", "stride", "rf_size",
        "shape": [C, h, w],             # the scanned map's shape at image_size
        "dir": str,                     # folder of this layer's figures
        "method": str | null,           # the rule this layer's figures were drawn with (null: none drawn)
        "method_reason": str | null,    # why it is not the rule asked for (e.g. a GELU on the path)
        "units": [{                     # one per channel, channel order
          "channel": int,
          "figure": str | null,         # relative to the run folder; null if not rendered
          "examples": [{                # strongest first; fewer than k if fewer images were scanned
            "rank", "image", "value",
            "row", "col",               # the unit in the (h, w) map
            "box": [top, left, bottom, right],   # receptive field in image_size pixels, clipped,
            "clipped": bool,                     # bottom/right exclusive
            "rerun_value": float | null          # the value when re-run for rendering
          }]
        }]
      }],
      "drift": {"units": int, "max_relative": float},  # re-run values off by more than 1 %
      "arrays": "topk.npz"
    }
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..._io import save_json, save_npz, save_png
from ...datasets import ImageSet
from ...errors import ConvscopeError
from ...layers import LayerInfo
from ...models import LoadedModel
from ...precision import FP32, Precision
from ...rectifiers import Rule, resolve_projection
from ..deconv.choice import AUTO, choose_projection, projection_method
from .figures import DRIFT_TOLERANCE, relative_drift, render_channels
from .topk import EMPTY, TopK

__all__ = ["Example", "ScanResult", "read_scan", "INDEX_FILE", "ARRAYS_FILE", "MANIFEST_FILE", "FORMAT"]

INDEX_FILE = "scan.json"
ARRAYS_FILE = "topk.npz"
MANIFEST_FILE = "run.json"
RUN_FORMAT = "convscope.scan-run/1"
FORMAT = "convscope.scan/1"

Channels = Sequence[int] | dict[str, Sequence[int]] | None


@dataclass(frozen=True)
class Example:
    """One of a channel's top examples: where in which image, and how strong."""

    rank: int
    image: int
    path: str
    value: float
    row: int
    col: int
    box: tuple[int, int, int, int]
    clipped: bool


@dataclass
class ScanResult:
    """What a scan found: the model, the tracked layers, the top-k state and the image set.

    Example:
        >>> result = scan(model, SampleImages(), "block3_conv3")
        >>> [e.path for e in result.examples("block3_conv3", 7)]
        >>> result.save("runs/scan", channels=range(16))
    """

    model: LoadedModel
    layers: list[LayerInfo]
    topk: TopK
    images: ImageSet
    skipped: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    rate: float = 0.0
    precision: Precision = FP32

    def layer(self, name: str | LayerInfo) -> LayerInfo:
        if isinstance(name, LayerInfo):
            name = name.name
        for layer in self.layers:
            if name in (layer.name, layer.alias):
                return layer
        raise ConvscopeError(f"layer {name!r} was not scanned; scanned: {[layer.label for layer in self.layers]}")

    def examples(self, layer: str | LayerInfo, channel: int) -> list[Example]:
        """The channel's top examples, strongest first (fewer than k when fewer images were scanned)."""
        layer = self.layer(layer)
        values = self.topk.values[layer.name][channel].tolist()
        images = self.topk.images[layer.name][channel].tolist()
        positions = self.topk.positions[layer.name][channel].tolist()
        _, width = self.topk.map_sizes[layer.name] or (1, 1)
        image_hw = self.images.size
        out = []
        for rank, (value, image, position) in enumerate(zip(values, images, positions)):
            if image == EMPTY:
                break
            row, col = divmod(position, width)
            out.append(Example(rank, image, self.images.path(image), value, row, col,
                               layer.box(row, col, image_hw), layer.box_clipped(row, col, image_hw)))
        return out

    @property
    def images_scanned(self) -> int:
        return self.topk.images_seen

    def figure(self, layer: str | LayerInfo, channel: int, *, method: str | Rule = AUTO) -> Image.Image:
        """One channel's figure: its top examples' projections beside their image patches.

        ``method="auto"`` (default) is the deconvnet on a model with max-pooling, else guided
        backprop, or the plain gradient where neither rule holds on the layer's path
        (:func:`~convscope.methods.deconv.choice.choose_projection`); the figure's title names it.

        Example:
            >>> result.figure("blocks.3.2.bn3", 5)       # shows inline in Jupyter
        """
        figures: list[Image.Image] = []
        row = self.layer(layer)
        rule = choose_projection(self.model, row, AUTO)[0] if method == AUTO else resolve_projection(method)
        render_channels(self, row, [channel], method=rule, progress=False,
                        on_figure=lambda _c, figure, _e, _v: figures.append(figure))
        return figures[0]

    def to_dict(self) -> dict:
        """The ``scan.json`` record without figures (``method`` and every ``rerun_value`` null)."""
        return self._record(None, {})

    def save(
        self,
        folder: str | Path,
        *,
        method: str | Rule | None = AUTO,
        channels: Channels = None,
        batch_size: int | None = None,
        progress: bool = True,
        strict: bool = True,
    ) -> dict:
        """Write the figures, ``topk.npz``, ``scan.json`` (schema in the module docstring), then ``run.json``.

        Any earlier manifest is removed first and the new one is written after every other file,
        so until this returns the folder reads as an incomplete run (see :func:`read_scan`).

        Args:
            method: ``"auto"`` (default: the deconvnet on a model with max-pooling, else guided
                backprop; per layer the plain gradient where neither rule holds, see
                :func:`~convscope.methods.deconv.choice.choose_projection`), ``"deconvnet"`` (Zeiler &
                Fergus), ``"guided"`` or ``"gradient"`` (or its Rule); ``None`` writes the index and
                arrays without figures.
            channels: channels to render: one list for every layer (channels beyond a layer's
                count are ignored) or ``{layer name: list}``; default all.
            batch_size: passed to :func:`convscope.methods.deconv.project_units` (default: its own budget).
            strict: False backpropagates nonlinearities without a rule (GELU, SiLU, gates)
                plainly instead of refusing them (see :func:`convscope.rectifiers.audit_graph`).

        Returns:
            the index dict.
        """
        rule = None if method is None else (projection_method(self.model, method) if method == AUTO
                                             else resolve_projection(method))
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        save_npz(out / ARRAYS_FILE, **self.topk.arrays())
        written = [ARRAYS_FILE]
        drawn: dict[str, tuple[dict[int, str], dict[int, list[float]]]] = {}
        chosen: dict[str, tuple[Rule, str | None]] = {}
        for layer in self.layers:
            wanted = _wanted(channels, layer)
            if rule is None or not wanted:
                continue
            layer_rule, reason = (choose_projection(self.model, layer, AUTO, strict=strict) if method == AUTO
                                  else (rule, None))
            chosen[layer.name] = (layer_rule, reason)
            figures: dict[int, str] = {}

            def keep(channel, figure, _examples, _values, folder=_layer_dir(layer), figures=figures):
                rel = f"{folder}/c{channel:04d}.png"
                save_png(figure, out / rel)
                figures[channel] = rel
                written.append(rel)

            rerun = render_channels(self, layer, wanted, method=layer_rule, batch_size=batch_size, on_figure=keep,
                                    progress=progress, strict=strict)
            drawn[layer.name] = (figures, rerun)
        index = {**self._record(rule, drawn, chosen), "arrays": ARRAYS_FILE}
        save_json(index, out / INDEX_FILE)
        written.append(INDEX_FILE)
        save_json({"format": RUN_FORMAT, "files": {rel: _file_entry(out / rel) for rel in written}},
                  out / MANIFEST_FILE)
        return index

    def _record(self, rule: Rule | None, drawn: dict[str, tuple[dict[int, str], dict[int, list[float]]]],
                chosen: dict[str, tuple[Rule, str | None]] | None = None) -> dict:
        """The index; ``drawn`` gives per layer name the figures' paths and the re-run values by channel,
        ``chosen`` the rule each layer's figures were drawn with and why it is not ``rule`` (or None)."""
        chosen = chosen or {}
        referenced: set[int] = set()
        layers = []
        drift_units, drift_max = 0, 0.0
        for layer in self.layers:
            figures, rerun = drawn.get(layer.name, ({}, {}))
            units = []
            for c in range(layer.channels):
                examples = self.examples(layer, c)
                values = rerun.get(c, [])
                off = relative_drift(examples, values)
                drift_units += sum(o > DRIFT_TOLERANCE for o in off)
                drift_max = max(drift_max, *off) if off else drift_max
                referenced.update(e.image for e in examples)
                entries = [{"rank": e.rank, "image": e.image, "value": e.value, "row": e.row, "col": e.col,
                            "box": list(e.box), "clipped": e.clipped,
                            "rerun_value": values[j] if j < len(values) else None}
                           for j, e in enumerate(examples)]
                units.append({"channel": c, "figure": figures.get(c), "examples": entries})
            map_size = self.topk.map_sizes[layer.name]
            layers.append({
                "name": layer.name, "alias": layer.alias, "label": layer.label, "type": layer.type,
                "shape": [layer.channels, *(map_size or layer.shape[1:])], "stride": layer.stride,
                "rf_size": layer.rf_size, "dir": _layer_dir(layer), "units": units,
                "method": chosen[layer.name][0].name if layer.name in chosen else None,
                "method_reason": chosen[layer.name][1] if layer.name in chosen else None,
            })
        return {
            "format": FORMAT,
            "model": self.model.describe(),
            "source": self.images.describe(),
            "image_size": list(self.images.size),
            "top": self.topk.k,
            "images_scanned": self.images_scanned,
            "skipped": [{"id": i, "path": self.images.path(i), "reason": r} for i, r in self.skipped],
            "method": None if rule is None else rule.name,
            "images": {str(i): {"path": self.images.path(i)} for i in sorted(referenced)},
            "layers": layers,
            "drift": {"units": int(drift_units), "max_relative": float(drift_max)},
            "precision": self.precision.as_dict(),
        }


def _wanted(channels: Channels, layer: LayerInfo) -> list[int]:
    """The channels of ``layer`` to render."""
    if isinstance(channels, dict):
        wanted = channels.get(layer.name, channels.get(layer.alias or "", None))
    else:
        wanted = channels
    return list(range(layer.channels)) if wanted is None else [c for c in wanted if 0 <= c < layer.channels]


def _layer_dir(layer: LayerInfo) -> str:
    return (layer.alias or layer.name).replace("/", "_").replace("@", "_call")


def _file_entry(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def read_scan(out: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The ``scan.json`` index and the ``topk.npz`` arrays of a run :meth:`ScanResult.save` finished.

    Goes through ``run.json``: every file it lists must be there with the listed size and
    sha256, else the run is refused with a :class:`ConvscopeError`.
    """
    out = Path(out)
    rerun = f"write it again with `convscope scan ... --out {out}` (add --resume to reuse its checkpoint)"
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise ConvscopeError(f"{out} holds no complete scan run (no {MANIFEST_FILE}): it was interrupted or is "
                             f"still being written; {rerun}") from None
    except (OSError, ValueError) as err:
        raise ConvscopeError(f"cannot read {out / MANIFEST_FILE}: {err}; {rerun}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT or \
            not isinstance(manifest.get("files"), dict):
        raise ConvscopeError(f"{out / MANIFEST_FILE} is not a convscope scan manifest ({RUN_FORMAT}); {rerun}")
    files = manifest["files"]
    for rel in (INDEX_FILE, ARRAYS_FILE):
        if rel not in files:
            raise ConvscopeError(f"{out / MANIFEST_FILE} does not list {rel}; {rerun}")
    data = {}
    for rel, want in files.items():
        try:
            # the index and arrays are checked in the very bytes that are then parsed
            blob = (out / rel).read_bytes()
        except FileNotFoundError:
            raise ConvscopeError(f"incomplete scan run in {out}: {rel} is missing; {rerun}") from None
        if want != {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}:
            raise ConvscopeError(f"inconsistent scan run in {out}: {rel} changed after the run was written "
                                 f"(size or sha256 differ from {MANIFEST_FILE}); {rerun}")
        if rel in (INDEX_FILE, ARRAYS_FILE):
            data[rel] = blob
    index = json.loads(data[INDEX_FILE])
    with np.load(io.BytesIO(data[ARRAYS_FILE]), allow_pickle=False) as arrays:
        return index, {name: arrays[name] for name in arrays.files}
