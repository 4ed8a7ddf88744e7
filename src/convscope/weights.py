"""Model and weights files, read without running code from them.

A file's kind is told from its container alone (a TorchScript archive, a ``torch.save`` zip, a
legacy pickle, a damaged file, or no PyTorch file at all), pickles are inspected with
``pickletools`` (which executes nothing), and state dicts load with ``weights_only=True``. Errors
say what the file is and what convscope accepts, never "re-run with ``weights_only=False``".
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from .errors import ConvscopeError

__all__ = ["torch_file_kind", "KIND_TEXT", "refused_global", "safe_load", "load_state_dict", "unpickle_module",
           "map_state_dict_by_order"]


def torch_file_kind(path: Path) -> str:
    """What ``path`` holds, from its container alone (nothing is unpickled).

    ``"torchscript"`` (a ``torch.jit.save`` archive: code and constants), ``"torch-save"`` (a
    ``torch.save`` zip archive, whose ``data.pkl`` may hold tensors or any pickled object),
    ``"pickle"`` (a bare pickle stream, also ``torch.save``'s legacy format), ``"damaged"`` (one of
    the last two whose pickle does not parse) or ``"unknown"``.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                    return "torchscript"
                data = [n for n in names if n.endswith("data.pkl")]
                if not data:
                    return "unknown"
                return "torch-save" if _parses_as_pickle(archive.read(data[0])) else "damaged"
        with open(path, "rb") as file:
            head = file.read(2)
            if head == b"PK":
                return "damaged"  # a zip archive without its directory: cut short
            if not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
                return "unknown"
            file.seek(0)
            return "pickle" if _parses_as_pickle(file) else "damaged"
    except (OSError, zipfile.BadZipFile) as err:
        raise ConvscopeError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None


def _parses_as_pickle(data: bytes | BinaryIO) -> bool:
    """Is there one complete pickle at the start? Read opcode by opcode, nothing is executed."""
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception:  # a truncated or corrupt stream; genops raises ValueError and others
        return False
    return True


KIND_TEXT = {"torchscript": "a TorchScript archive", "torch-save": "a torch.save archive",
              "pickle": "a pickle", "damaged": "a damaged or truncated torch.save file",
              "unknown": "not a PyTorch file (neither TorchScript nor torch.save)"}


def refused_global(err: Exception) -> str:
    """The Python name a weights_only load refused, as ``" (it names builtins.open)"``, or ``""``."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f" (it names {match.group(1)})" if match else ""


def safe_load(path: Path, what: str):
    """``torch.load(weights_only=True)`` with an error that says what the file is and what is accepted."""
    kind = torch_file_kind(path)
    if kind == "torchscript":
        raise ConvscopeError(f"{path} is a TorchScript archive, not {what}; pass it as --model {path}")
    if kind in ("unknown", "damaged"):
        raise ConvscopeError(f"{path} is {KIND_TEXT[kind]}; {what} is a file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConvscopeError(
            f"{path} pickles Python objects beyond tensors{refused_global(err)}; convscope never unpickles "
            f"them for {what}, which must hold only tensors: save it with torch.save(model.state_dict(), PATH)"
        ) from None
    except Exception as err:
        raise ConvscopeError(f"{path} is {KIND_TEXT[kind]} that cannot be read ({type(err).__name__}); "
                             "it may be truncated or damaged") from None


def load_state_dict(module: nn.Module, path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.is_file():
        raise ConvscopeError(f"weights file not found: {path}")
    state = safe_load(path, "a state dict for --weights")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConvscopeError(f"{path} does not hold a state dict (found {type(state).__name__}); "
                             "save one with torch.save(model.state_dict(), PATH)")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConvscopeError(
            f"weights in {path} do not fit this architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConvscopeError(f"weights in {path}: {key!r} holds a {type(value).__name__}, not a tensor")
        if value.shape != expected[key].shape:
            raise ConvscopeError(
                f"weights in {path} do not fit this architecture: {key!r} has shape {tuple(value.shape)} in the "
                f"file but {tuple(expected[key].shape)} in the model"
            )
    try:
        module.load_state_dict(state)
    except RuntimeError as err:  # e.g. a dtype that cannot be copied
        first = str(err).strip().splitlines()[-1].strip()[:200]
        raise ConvscopeError(f"weights in {path} do not fit this architecture: {first}") from None


def map_state_dict_by_order(source: dict, target: dict) -> dict:
    """Copy ``source`` tensors onto ``target`` keys position by position, checking every shape.

    Different implementations of one architecture name their parameters differently but
    register them in the same order; the shape check catches any drift.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ConvscopeError(f"state dict has {len(src)} tensors but the model expects {len(dst)}")
    mapped = dict(target)
    for (src_key, value), dst_key in zip(src, dst):
        if tuple(value.shape) != tuple(target[dst_key].shape):
            raise ConvscopeError(f"shape mismatch mapping {src_key} {tuple(value.shape)} onto {dst_key} {tuple(target[dst_key].shape)}")
        mapped[dst_key] = value
    return mapped


def unpickle_module(path: Path, kind: str, trust_file: bool) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_file:
            raise ConvscopeError(
                f"{path} is {KIND_TEXT[kind]} of Python objects{refused_global(err)}. Unpickling runs code "
                "from the file, so it is only loaded with --trust-file (use it only for files you made or trust)"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ConvscopeError(f"cannot unpickle {path} ({type(err).__name__}: {str(err)[:160]})") from None
    except Exception as err:
        raise ConvscopeError(f"{path} is {KIND_TEXT[kind]} that cannot be read ({type(err).__name__}); "
                             "it may be truncated or damaged") from None
    if not isinstance(obj, nn.Module):
        what = "a state dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ConvscopeError(
            f"{path} holds {what}, not a model. A state dict goes with --weights "
            "together with the architecture: --model ARCH --weights FILE."
        )
    return obj
