"""The :class:`LoadedModel` that carries a network with its preprocessing, class names and provenance.

Models come from :func:`convscope.sources.load_model` (the default model, torchvision, timm, a
file, a factory) or from :func:`as_loaded` around the user's own ``nn.Module``; weights files
are read by :mod:`convscope.weights`, which never runs code from a file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import ConvscopeError
from .images import ImageSource, load_image
from .layers import Catalogue, build_catalogue

__all__ = ["Preprocessing", "LoadedModel", "as_loaded", "resolve_device", "imagenet_classes", "fingerprint", "guess_classes",
           "DEFAULT_MODEL"]


DEFAULT_MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: size, normalisation, and the eval crop.

    ``normalize`` is differentiable, so feature visualisation runs it inside the graph.
    ``mean`` and ``std`` are per RGB channel of a [0, 1] image; ``channel_order="BGR"`` then
    reverses the channels (Keras's 'caffe' mode for VGG and ResNet). ``mode`` names a
    convention the numbers come from, for the description.
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    mode: str | None = None

    @property
    def description(self) -> str:
        if self.mode:
            norm = self.mode
        elif self.mean == (0.5, 0.5, 0.5) and self.std == (0.5, 0.5, 0.5):
            norm = "scaled to [-1, 1]"
        else:
            norm = f"mean {tuple(round(m, 3) for m in self.mean)}, std {tuple(round(s, 3) for s in self.std)}"
        return f"{self.input_size[0]}×{self.input_size[1]} {self.channel_order}, {norm}, {self.interpolation} resize"

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
        x = (x01 - mean) / std
        return x.flip(1) if self.channel_order == "BGR" else x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input scale → ``(B, 3, H, W)`` RGB in [0, 1]."""
        if self.channel_order == "BGR":
            x = x.flip(1)
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
        out = {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
               "crop_pct": self.crop_pct, "interpolation": self.interpolation, "description": self.description}
        if self.channel_order != "RGB":  # only then, so caches keyed on an RGB model's dict stay valid
            out["channel_order"] = self.channel_order
        return out


@dataclass
class LoadedModel:
    """A network plus what it needs to be used: preprocessing, class names, provenance."""

    module: nn.Module
    name: str
    weights: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    class_names: list[str] | None = None
    random_init: bool = False
    seed: int | None = None  # of the initialisation, when random_init
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The arguments of :func:`~convscope.sources.load_model` that made it (None for a user's own
    # module): how a worker on another machine loads the very same network.
    source: dict | None = field(default=None, compare=False)

    _catalogues: dict[tuple[int, int], Catalogue] = field(default_factory=dict, init=False, repr=False, compare=False)
    # Does the network run only at its input size (a classifier on a fixed-size map)? Per input size.
    _fixed: dict[tuple[int, int], bool] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def catalogue(self) -> Catalogue:
        """The layer catalogue traced at the model's input size."""
        return self.catalogue_at(self.preprocessing.input_size)

    def takes_only_its_input_size(self) -> bool:
        """Whether the network fails on a picture of another shape than its input size (one plain
        forward pass of a wider picture, once per input size): then :meth:`fit` centre-crops."""
        size = tuple(int(v) for v in self.preprocessing.input_size)
        if size not in self._fixed:
            from .hooks import StopForward, frozen

            wider = torch.zeros(1, 3, size[0], size[1] + max(8, size[1] // 4), device=self.device,
                                dtype=next((p.dtype for p in self.module.parameters() if p.is_floating_point()),
                                           torch.float32))
            try:
                with frozen(self.module), torch.no_grad():
                    self.module(wider)
                self._fixed[size] = False
            except StopForward:   # a caller's recording stopped it: it ran as far as anyone needs here
                return False
            except (RuntimeError, ValueError, ConvscopeError):   # a shape error; Keras's input-spec check
                self._fixed[size] = True
        return self._fixed[size]

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
                if size == tuple(self.preprocessing.input_size):
                    # decided now, while no analysis holds hooks on the model (fit asks later)
                    self.takes_only_its_input_size()
            except RuntimeError as err:
                if "ScriptModule" in str(err):
                    raise ConvscopeError(
                        "this is a TorchScript module, and convscope reads layers through forward hooks, which "
                        "TorchScript does not run: load the nn.Module itself (package.module:factory with "
                        "--weights STATE_DICT, or a pickled module with --trust-file)") from None
                raise ConvscopeError(
                    f"the model cannot run on a {size[0]}x{size[1]} image: {str(err)[:200]}. If it takes another "
                    "input size (a classifier on a fixed-size map), give it: --input-size N or HxW on the command "
                    "line, Preprocessing(input_size=...) in Python") from None
        return self._catalogues[size]

    @property
    def title(self) -> str:
        """Name and weights, with a loud marker when the weights are random."""
        if not self.random_init:
            return f"{self.name} ({self.weights})"
        seed = f" seed {self.seed}" if self.seed is not None else ""
        return f"{self.name} [RANDOM INIT{seed} - not trained]"

    def fit(self, image: np.ndarray, size: int | tuple[int, int] | None = None) -> np.ndarray:
        """:meth:`Preprocessing.fit`, for a network that takes only its input size too.

        The whole picture, shorter side ``size`` (default the input size), runs through a fully
        convolutional network; one with a classifier on a fixed-size map (a CIFAR network, say)
        cannot take it, and gets the classification transform instead (:meth:`Preprocessing.eval_crop`:
        the centre of the picture at the input size). ``(H, W)`` is taken as asked.
        """
        rgb = self.preprocessing.fit(image, size)
        if isinstance(size, tuple) or rgb.shape[:2] == tuple(self.preprocessing.input_size):
            return rgb
        return self.preprocessing.eval_crop(image) if self.takes_only_its_input_size() else rgb

    def tensor(self, image: ImageSource, size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Load, resize (see :meth:`fit`) and normalise one image: ``(x, rgb_uint8)``."""
        rgb = self.fit(load_image(image), size)
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


def as_loaded(model: LoadedModel | nn.Module, preprocessing: Preprocessing | None = None) -> LoadedModel:
    """Wrap a user's ``nn.Module`` (ImageNet preprocessing unless given) without touching it.

    Unlike :func:`load_model`, this neither moves the module nor changes its mode: every
    analysis puts it in eval mode only for its own duration (:func:`convscope.hooks.frozen`).
    """
    if isinstance(model, LoadedModel):
        return model
    if _is_keras(model):
        from .keras import as_loaded_keras

        return as_loaded_keras(model, preprocessing)
    if not isinstance(model, nn.Module):
        raise ConvscopeError(f"expected an nn.Module or LoadedModel, got {type(model).__name__}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return LoadedModel(model, type(model).__name__, "user module", preprocessing or Preprocessing(),
                       guess_classes(model), device=device)


def _is_keras(model) -> bool:
    """Is ``model`` a Keras object (on any backend)? Asked without importing Keras."""
    return any(cls.__module__.split(".")[0] == "keras" for cls in type(model).__mro__)


def guess_classes(module: nn.Module) -> list[str] | None:
    classifier = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if classifier and classifier[-1].out_features == 1000:
        return imagenet_classes()
    return None
