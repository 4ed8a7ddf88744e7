"""Dataset scan: the k strongest examples of every channel over a whole image set.

This is Zeiler & Fergus's figure 2: for each feature map, the 9 images (over a data set) in
which it fires hardest, each shown as the deconvnet projection of that one activation beside
the image patch it came from. Then one can say "layer 2 finds textures, layer 4 dog faces".

1. **Scan.** Images stream from an :class:`~convscope.datasets.ImageSet` through DataLoader
   workers in batches; one batched forward pass per batch records the tracked layers and
   stops right after the deepest one. Each batch is folded into a :class:`TopK`, which keeps,
   per layer and channel, the k best ``(value, image, position)``, at most one per image
   (the image's maximum over the map). The fold is a few tensor ops over all channels at
   once; the state is ``layers x channels x k`` and does not grow with the data set.
2. **Checkpoint.** The state is written atomically every N batches (and when interrupted);
   ``resume=True`` continues from it and gives exactly the uninterrupted result.
3. **Render.** Only the top-k images of each channel are read again, and the deconvnet
   (:func:`convscope.methods.deconv.project_units`) projects each recorded unit back to
   pixels. The re-run's activation is checked against the recorded one (a mismatch means the
   preprocessing or the weights drifted). Each channel gets one figure: a 3x3 sheet of
   projections beside a 3x3 sheet of the matching receptive-field patches.

The ranking is a total order: value descending, then image id ascending. So the result does
not depend on batch order or how a data set is split: :meth:`TopK.merge` is associative,
commutative and idempotent (overlapping shards count each image once), and shards scanned on
different machines (``start``/``stop``) merge to the single-machine result. Batch size enters
only through the floats: a forward pass in another batch shape may round the last bits
differently, which can swap two images whose values are that close.

Limits: one maximum per image per channel means an image with two strong separate spots
shows only the stronger. Ties (common where activations saturate, like ReLU6 at 6.0) go to
the lower image id, so which tied images appear depends on the data set's order.

The room: :func:`scan` (the call, here), :mod:`.topk` (:class:`TopK`), :mod:`.engine` (the loop,
checkpoints, resume checks), :mod:`.result` (:class:`ScanResult`, which saves itself, the
``scan.json`` schema and :func:`read_scan`) and :mod:`.figures` (the channel figures).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...datasets import ImageSet
from ...errors import ConvscopeError
from ...layers import LayerInfo
from ...models import LoadedModel, as_loaded
from ...precision import NUMBERS, Precision, resolve_precision
from ...selection import stage_outputs as default_layers
from .engine import STATE_FILE, Checkpoint, fold, load_checkpoint, resume_from, run_identity
from .figures import channel_figure, render_channels
from .result import INDEX_FILE, MANIFEST_FILE, Example, ScanResult, read_scan
from .topk import EMPTY, TopK

if TYPE_CHECKING:
    from ...distributed import RayTarget

__all__ = [
    "TopK", "EMPTY", "Example", "ScanResult", "scan", "default_layers", "load_checkpoint", "render_channels",
    "channel_figure", "read_scan", "DEFAULT_TOP", "STATE_FILE", "INDEX_FILE", "MANIFEST_FILE",
]

DEFAULT_TOP = 9


def scan(
    model: LoadedModel | torch.nn.Module,
    images: ImageSet,
    layers: str | LayerInfo | Sequence[str | LayerInfo] | None = None,
    *,
    top: int = DEFAULT_TOP,
    batch_size: int = 32,
    workers: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    start: int = 0,
    stop: int | None = None,
    progress: bool = True,
    meta: dict | None = None,
    precision: str | Precision = "auto",
    ray: RayTarget | None = None,
) -> ScanResult:
    """Find the ``top`` strongest examples of every channel of ``layers`` over ``images``.

    Args:
        model: a :class:`LoadedModel` (or an ``nn.Module`` with ImageNet preprocessing); left untouched.
        images: an :class:`~convscope.datasets.ImageSet` (folder, sample set, tensors).
        layers: names, aliases or patterns (see :meth:`Catalogue.resolve`), or LayerInfo rows;
            default :func:`~convscope.selection.stage_outputs`. The forward pass stops after the deepest one.
        top: k, the examples kept per channel (one per image).
        batch_size, workers: the DataLoader's batch size and number of reader processes.
        checkpoint: file for the state, written atomically every ``checkpoint_every`` batches,
            when interrupted (Ctrl-C or an error) and at the end.
        resume: continue from ``checkpoint``; the model, layers, k and image set must match.
            The checkpoint's batch size is used, so the result is bit-identical to an
            uninterrupted scan.
        start, stop: scan only items ``start..stop`` (ids stay global): a shard whose
            :class:`TopK` merges with the others'.
        meta: JSON-ready notes kept in the checkpoint (the CLI keeps its options there).
        precision: ``"auto"`` (float32, exact values), ``"fp32"``, or ``"bf16"``/``"fp16"``
            autocast of the forward pass (faster where the hardware has them; values rounded).
            Part of a checkpoint's identity: a resumed scan keeps its precision.
        ray: run the model on a Ray cluster (:func:`convscope.distributed.parse_ray`): the items
            are cut into shards of ``batch_size`` and scanned by a pool of actors; the driver
            merges their partial states in order, so checkpoints and ``resume`` work as locally
            and the result equals the local one (up to float rounding in another process).

    Returns:
        a :class:`ScanResult`; ``.save(folder)`` draws the figures and writes the run.

    Example:
        >>> from convscope.datasets import FolderImages
        >>> model = load_model("vgg16")
        >>> images = FolderImages("~/data/val", model.preprocessing.input_size)
        >>> result = scan(model, images, "block3_conv3,block4_conv3,block5_conv3", checkpoint="runs/s/scan_state.pt")
    """
    loaded = as_loaded(model)
    catalogue = loaded.catalogue_at(images.size)  # the boxes of the size the images are scanned at
    if layers is None:
        chosen = default_layers(catalogue)
    else:
        spec = [layers] if isinstance(layers, LayerInfo) else layers
        chosen = catalogue.resolve(spec if isinstance(spec, str) else
                                   [layer.name if isinstance(layer, LayerInfo) else layer for layer in spec])
    if not chosen:
        raise ConvscopeError("no layer to scan; name some with --layers (`convscope layers` lists them)")
    flat = [layer for layer in chosen if not layer.is_spatial]
    if flat:
        raise ConvscopeError(f"layer {flat[0].label} has shape {flat[0].shape}; a scan needs feature maps (C, H, W)")
    names = [layer.name for layer in chosen]
    if batch_size < 1 or checkpoint_every < 1:
        raise ConvscopeError("--batch-size and --checkpoint-every must be at least 1")
    stop = len(images) if stop is None else min(int(stop), len(images))
    if not 0 <= start <= stop:
        raise ConvscopeError(f"bad range {start}..{stop} for {len(images)} images")

    device = loaded.device
    chosen_precision = resolve_precision(precision, device, purpose=NUMBERS, module=loaded.module)
    identity = run_identity(loaded, names, top, images, start, stop, chosen_precision)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    topk = TopK.empty(top, {layer.name: layer.channels for layer in chosen}, device)
    skipped: list[tuple[int, str]] = []
    cursor = start
    if resume and checkpoint is not None and checkpoint.exists():
        # the checkpoint's batch size: the same batch boundaries give bit-identical results
        topk, skipped, cursor, batch_size = resume_from(checkpoint, identity, device)
    elif resume and checkpoint is not None:
        warnings.warn(f"no checkpoint at {checkpoint}; starting a new scan", stacklevel=2)
    saver = None if checkpoint is None else Checkpoint(checkpoint, identity, meta or {}, batch_size)
    if ray is not None:
        from ...distributed import scan_shards

        scanned, seconds = scan_shards(ray, loaded, images, names, topk, skipped, start=start, cursor=cursor,
                                       stop=stop, batch_size=batch_size, checkpoint=saver,
                                       checkpoint_every=checkpoint_every, progress=progress,
                                       precision=chosen_precision)
    else:
        scanned, seconds = fold(loaded, images, names, topk, skipped, start=start, cursor=cursor, stop=stop,
                                batch_size=batch_size, workers=workers, checkpoint=saver,
                                checkpoint_every=checkpoint_every, progress=progress, precision=chosen_precision)
    return ScanResult(loaded, chosen, topk, images, skipped, seconds, scanned / seconds if seconds > 0 else 0.0,
                      chosen_precision)
