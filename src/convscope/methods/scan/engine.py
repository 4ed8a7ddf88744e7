"""The scanning loop: batches through the model into a :class:`~.topk.TopK`, checkpoints, resume checks.

One batched forward pass per batch records the tracked layers and stops right after the
deepest one. The state is written atomically every N batches, when the loop is interrupted
(Ctrl-C or an error) and at the end; a resumed scan must have the same identity (weights,
preprocessing, layers, k, image set and range) and reuses the checkpoint's batch size, so it
repeats the very batches of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..._io import atomic_path
from ...datasets import ImageSet
from ...errors import ConvscopeError
from ...hooks import StopForward, frozen, recording
from ...models import LoadedModel, fingerprint
from ...precision import FP32, Precision
from ...weights import refused_global
from .topk import TopK

__all__ = ["STATE_FILE", "Checkpoint", "load_checkpoint", "run_identity", "resume_from", "fold", "fold_batch"]

STATE_FILE = "scan_state.pt"
STATE_FORMAT = "convscope.scan-state/1"


def load_checkpoint(path: str | Path) -> dict:
    """Read a scan checkpoint (tensors only; no code is unpickled)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's own message would advise weights_only=False, i.e. running code from the file: never.
        raise ConvscopeError(f"cannot read the scan checkpoint {path} ({type(err).__name__}{refused_global(err)}): "
                             "a checkpoint holds only tensors and numbers. Delete it and start afresh "
                             "(without --resume).") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConvscopeError(f"{path} is not a convscope scan checkpoint")
    return state


def _save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


@dataclass
class Checkpoint:
    """Where the state goes, and what is saved with it: the run's identity, notes, batch size."""

    path: Path
    identity: dict
    meta: dict
    batch_size: int

    def save(self, state: TopK, next_index: int, skipped: list[tuple[int, str]]) -> None:
        _save_checkpoint(self.path, {
            "format": STATE_FORMAT, **self.identity, "meta": self.meta, "next": next_index,
            "stop": self.identity["stop"], "batch_size": self.batch_size,
            "skipped": [[i, r] for i, r in skipped], "topk": state.state_dict()})


def run_identity(loaded: LoadedModel, names: list[str], top: int, images: ImageSet, start: int, stop: int,
                 precision: Precision = FP32) -> dict:
    """What a resumed scan must share with the checkpoint it continues."""
    pre = loaded.preprocessing
    return {"model": fingerprint(loaded.module), "model_title": loaded.title, "layers": names,
            "top": int(top), "source": images.describe(), "image_size": list(images.size), "start": int(start),
            "stop": int(stop), "preprocessing": _preprocessing_identity(pre), "precision": _precision_identity(precision)}


def _precision_identity(precision: Precision) -> list:
    return [precision.name, precision.channels_last]


def _preprocessing_identity(pre) -> list:
    """What the scan does to pixels besides the size: resampling filter and normalisation."""
    return [pre.interpolation, [float(m) for m in pre.mean], [float(s) for s in pre.std]]


def _check_same(saved: dict, identity: dict, path: Path) -> None:
    what = {"model": "model weights", "preprocessing": "preprocessing (mean, std, interpolation)",
            "layers": "layers", "top": "--top", "source": "image set", "image_size": "image size",
            "start": "start", "stop": "end of the range (--limit)", "precision": "precision (--precision)"}
    for key, label in what.items():
        # a checkpoint from before --precision was scanned in plain float32
        default = _precision_identity(FP32) if key == "precision" else None
        mine, theirs = identity[key], saved.get(key, default)
        if key == "source":
            mine, theirs = mine.get("fingerprint"), (theirs or {}).get("fingerprint")
        if mine != theirs:
            hint = (" (a random init differs on every load unless seeded)" if key == "model" else
                    " (files were added, removed or changed)" if key == "source" else "")
            raise ConvscopeError(f"cannot resume from {path}: the {label} differ from the checkpoint's{hint}. "
                                 "Run with the same settings, or without --resume to start afresh.")


def resume_from(path: Path, identity: dict,
                device: torch.device) -> tuple[TopK, list[tuple[int, str]], int, int]:
    """The checkpoint's state, skipped files, next item and batch size, once its identity matches."""
    saved = load_checkpoint(path)
    _check_same(saved, identity, path)
    skipped = [(int(i), str(r)) for i, r in saved["skipped"]]
    return TopK.from_state_dict(saved["topk"], device), skipped, int(saved["next"]), int(saved["batch_size"])


def _modified_in_place(module: torch.nn.Module, names: list[str], size: tuple[int, int],
                       device: torch.device) -> bool:
    """Does an in-place op later in the network change a recorded output (``out += identity``)?

    One forward of a blank image tells: only then must the scan copy the maps it records
    (a copy costs about as much as a conv layer); otherwise it reads them where they are.
    """
    with recording(module, names, clone=False, stop_after_last=True) as probe:
        with contextlib.suppress(StopForward):
            module(torch.zeros(1, 3, *size, device=device))
        return bool(probe.modified())


def fold_batch(loaded: LoadedModel, store, names: list[str], topk: TopK, pixels: torch.Tensor, ids,
               *, copied: bool, precision: Precision = FP32) -> None:
    """One batch of uint8 ``pixels`` (B, H, W, 3) through the model under ``recording(...)``'s
    ``store``, its maps folded into ``topk`` in float32 (the local scan and each Ray actor call this)."""
    x = pixels.to(loaded.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    with contextlib.suppress(StopForward), precision.autocast():
        loaded.module(precision.input(loaded.preprocessing.normalize(x)))
    missing = [n for n in names if n not in store]
    if missing:
        raise ConvscopeError(f"layers {missing} did not run in the forward pass")
    if not copied and store.modified():
        raise ConvscopeError(f"layers {store.modified()} were changed in place during the "
                             "forward pass although the first one left them alone")
    topk.update({n: store[n].float() for n in names}, ids)


def fold(
    loaded: LoadedModel,
    images: ImageSet,
    names: list[str],
    topk: TopK,
    skipped: list[tuple[int, str]],
    *,
    start: int,
    cursor: int,
    stop: int,
    batch_size: int,
    workers: int,
    checkpoint: Checkpoint | None,
    checkpoint_every: int,
    progress: bool,
    precision: Precision = FP32,
) -> tuple[int, float]:
    """Fold items ``cursor..stop`` into ``topk`` (appending unreadable ones to ``skipped``).

    The forward pass runs at ``precision``; the recorded maps are folded in float32.

    Returns:
        ``(images scanned, seconds)`` of this run.
    """
    module, device = loaded.module, loaded.device
    loader = images.loader(batch_size, workers, cursor, stop, pin_memory=device.type == "cuda")
    done = (topk.copy(), cursor, len(skipped))  # the last consistent state, replaced in one assignment

    def save(state: TopK, next_index: int, n_skipped: int) -> None:
        checkpoint.save(state, next_index, skipped[:n_skipped])

    bar = tqdm(total=stop - start, initial=cursor - start, unit="img", desc="scan", disable=not progress,
               dynamic_ncols=True, smoothing=0.05)
    began, scanned = time.perf_counter(), 0
    try:
        with frozen(module), torch.no_grad():
            copy = _modified_in_place(module, names, images.size, device)
            with recording(module, names, clone=copy, stop_after_last=True) as store:
                for batch, (pixels, ids, bad) in enumerate(loader, start=1):
                    skipped.extend((int(i), reason) for i, reason in bad)
                    if len(ids):
                        fold_batch(loaded, store, names, topk, pixels, ids, copied=copy, precision=precision)
                    cursor += len(ids) + len(bad)
                    scanned += len(ids)
                    done = (topk.copy(), cursor, len(skipped))
                    bar.update(len(ids) + len(bad))
                    if bad:
                        bar.set_postfix(skipped=len(skipped), refresh=False)
                    if checkpoint is not None and batch % checkpoint_every == 0:
                        save(*done)
    except BaseException as error:
        if checkpoint is not None:
            try:
                save(*done)
            except Exception as save_error:     # the scan's own error stays the one raised
                note = (f"convscope: the checkpoint {checkpoint.path} could not be saved after this error "
                        f"({type(save_error).__name__}: {save_error}); the last periodic checkpoint, if any, "
                        "is what --resume will continue from")
                if hasattr(error, "add_note"):
                    error.add_note(note)
                warnings.warn(note, stacklevel=3)
        raise
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    if checkpoint is not None:
        save(*done)
    return scanned, seconds
