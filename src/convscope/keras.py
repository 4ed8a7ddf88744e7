"""Keras 3 models, run on Keras's torch backend.

Under ``KERAS_BACKEND=torch`` every Keras layer is a ``torch.nn.Module``: forward hooks fire,
autograd reaches the input, and Keras's ops are torch functions, so the receptive-field tracer
and the rectifier rules see them as they see a PyTorch model. What differs is packed here:

* :class:`KerasNet` wraps a Keras model as the ``nn.Module`` convscope drives. It takes the
  ``(B, 3, H, W)`` tensor every method feeds and hands Keras ``(B, H, W, 3)`` (once, at the
  input); its layers are ``model.layers`` by Keras name, nested models flattened as
  ``outer/inner``; its ``channels_last`` flag tells :func:`convscope.hooks.channels_first` to turn
  each captured map to ``(C, H, W)``.
* :func:`load_keras` opens ``keras:NAME`` (any ``keras.applications`` model; ``NAME+top`` with the
  classifier) and saved ``.keras`` files (``safe_mode=True``). Weights come from ``--weights``,
  else from Keras's own cache (``~/.keras/models``), else ``--random`` (seeded).
* :func:`application_preprocessing` reads an application's own ``preprocess_input`` ('caffe',
  'tf', 'torch' or none) off a probe, into a :class:`~convscope.models.Preprocessing`.

The backend is chosen before Keras is first imported; a Keras already imported with another
backend cannot be switched, and that is refused with what to do.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ConvscopeError, suggest
from .models import LoadedModel, Preprocessing, imagenet_classes

__all__ = ["import_keras", "KerasNet", "load_keras", "as_loaded_keras", "application_preprocessing",
           "application_names", "SEPARATOR", "WEIGHT_SUFFIXES"]

SEPARATOR = "/"  # between a nested model's name and its layer's, as in Keras's variable paths
WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".keras")
_TOP = "+top"

# The input size each application was trained at, where it is not 224 (its default_size).
_TRAINED_SIZE = {
    "InceptionV3": 299, "InceptionResNetV2": 299, "Xception": 299, "NASNetLarge": 331,
    "EfficientNetB1": 240, "EfficientNetB2": 260, "EfficientNetB3": 300, "EfficientNetB4": 380,
    "EfficientNetB5": 456, "EfficientNetB6": 528, "EfficientNetB7": 600, "EfficientNetV2B1": 240,
    "EfficientNetV2B2": 260, "EfficientNetV2B3": 300, "EfficientNetV2S": 384, "EfficientNetV2M": 480,
    "EfficientNetV2L": 480,
}


def import_keras():
    """The ``keras`` module on its torch backend, importing it with that backend if it is not yet."""
    module = sys.modules.get("keras")
    if module is None:
        os.environ["KERAS_BACKEND"] = "torch"  # read once, at Keras's first import
        try:
            import keras as module
        except ImportError:
            raise ConvscopeError("Keras models need Keras 3: pip install 'convscope[keras]'") from None
    version = getattr(module, "__version__", None)
    if version is None:  # e.g. a script named keras.py shadowing the package
        raise ConvscopeError(f"the module 'keras' ({getattr(module, '__file__', '?')}) is not Keras; rename it")
    if int(version.split(".")[0]) < 3:
        raise ConvscopeError(f"Keras {version} is installed; convscope needs Keras 3 (pip install 'convscope[keras]')")
    backend = module.backend.backend()
    if backend != "torch":
        raise ConvscopeError(
            f"Keras was already imported with the {backend!r} backend, and a backend cannot change once "
            "Keras is imported. convscope runs Keras models on the torch backend: set KERAS_BACKEND=torch "
            "before importing keras (or let convscope import it first)"
        )
    return module


class KerasNet(nn.Module):
    """A Keras model as the ``nn.Module`` convscope drives: ``(B, 3, H, W)`` in, layers by Keras name.

    The Keras model is held, not changed: the wrapper adds the layout conversion at the input
    and names the layers; hooks, modes and gradients act on the Keras layers themselves.
    """

    def __init__(self, model):
        super().__init__()
        self.keras_model = model
        keras = import_keras()
        self.channels_last = keras.config.image_data_format() == "channels_last"
        self._device = keras.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        # Keras moves inputs to its default device (CUDA when there is one); run where x is.
        with self._device(str(x.device)):
            try:
                out = self.keras_model(x)
            except ValueError as err:  # Keras's input-spec check: the model was built for one size
                if "is incompatible with the layer" not in str(err):
                    raise
                raise ConvscopeError(
                    f"the Keras model {self.keras_model.name} takes inputs of shape {self.keras_model.input_shape} "
                    f"only, not {tuple(x.shape)}: pass that size (--size HxW), or build the model with "
                    "Input((None, None, 3))") from None
        if isinstance(out, list | tuple):
            out = out[0]
        if self.channels_last and out.dim() == 4:
            out = out.permute(0, 3, 1, 2)
        return out

    def reinitialized(self, seed: int = 0) -> KerasNet:
        """The same architecture, freshly initialised by its own Keras initialisers (seeded)."""
        keras = import_keras()
        param = next(self.parameters(), None)
        with keras.device(str(param.device) if param is not None else "cpu"), _seeded(keras, seed):
            return KerasNet(keras.models.clone_model(self.keras_model))

    def convscope_layers(self) -> dict[str, nn.Module]:
        """``model.layers`` by name (input layers left out), nested models' layers as ``outer/inner``."""
        keras = import_keras()

        def walk(model, prefix: str):
            for layer in model.layers:
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                yield prefix + layer.name, layer
                if isinstance(layer, keras.Model):
                    yield from walk(layer, prefix + layer.name + SEPARATOR)

        return dict(walk(self.keras_model, ""))

    @staticmethod
    def convscope_kind(layer) -> str:
        """The catalogue's kind of a Keras layer (``conv``, ``norm``, ``act``, ``pool``, ``linear``, ...)."""
        keras = import_keras()
        kl = keras.layers
        if isinstance(layer, kl.Conv1D | kl.Conv2D | kl.Conv3D | kl.DepthwiseConv2D | kl.SeparableConv2D):
            return "conv"
        if isinstance(layer, kl.BatchNormalization | kl.LayerNormalization | kl.GroupNormalization):
            return "norm"
        if isinstance(layer, kl.Activation | kl.ReLU | kl.LeakyReLU | kl.PReLU | kl.ELU | kl.Softmax):
            return "act"
        if isinstance(layer, kl.MaxPooling2D | kl.AveragePooling2D | kl.GlobalAveragePooling2D
                      | kl.GlobalMaxPooling2D):
            return "pool"
        if isinstance(layer, kl.Dense):
            return "linear"
        if isinstance(layer, kl.Dropout | kl.SpatialDropout2D | kl.Identity):
            return "pass"
        return "block" if isinstance(layer, keras.Model) else "other"


def application_names() -> list[str]:
    """The model names of ``keras.applications`` (``VGG19``, ``ResNet50``, ...)."""
    keras = import_keras()
    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and callable(getattr(keras.applications, n)))


def application_preprocessing(name: str, input_size: tuple[int, int]) -> Preprocessing:
    """An application's own ``preprocess_input``, read off a probe as mean, std and channel order.

    ``preprocess_input`` is affine per channel, possibly reordering them: three pure-colour
    pixels and a black one give the scale, offset and source channel of each output channel.
    'caffe' (VGG, ResNet): BGR, 0-255 minus the ImageNet mean; 'tf': [-1, 1]; 'torch': ImageNet
    mean and std; models that rescale inside (EfficientNet, ConvNeXt) take plain 0-255.
    """
    keras = import_keras()
    fn = getattr(sys.modules[getattr(keras.applications, name).__module__], "preprocess_input", None)
    probe = np.zeros((1, 1, 4, 3), dtype="float32")
    probe[0, 0, 1:] = 255.0 * np.eye(3, dtype="float32")
    out = np.asarray(fn(probe.copy()) if fn else probe, dtype="float64")[0, 0]
    offset, response = out[0], (out[1:] - out[0]).T  # response[c_out, c_in] to a [0, 1] input of 1
    source = np.abs(response).argmax(axis=1)
    scale = response[np.arange(3), source]
    if sorted(source) != [0, 1, 2] or not np.allclose(np.abs(response).sum(axis=1), np.abs(scale)):
        raise ConvscopeError(f"keras.applications.{name}'s preprocess_input is not a per-channel affine map")
    order = "BGR" if list(source) == [2, 1, 0] else "RGB"
    if order == "RGB" and list(source) != [0, 1, 2]:
        raise ConvscopeError(f"keras.applications.{name}'s preprocess_input reorders channels as {list(source)}")
    mean, std = np.zeros(3), np.zeros(3)
    mean[source], std[source] = -offset / scale + 0.0, 1.0 / scale  # out_c = (x[src c] - mean) / std
    mode = {
        (True, "BGR"): "Keras 'caffe' mode: 0-255, ImageNet mean subtracted",
    }.get((np.allclose(std, 1 / 255), order))
    if mode is None:
        if np.allclose(mean, 0.5) and np.allclose(std, 0.5):
            mode = "Keras 'tf' mode: scaled to [-1, 1]"
        elif np.allclose(mean, (0.485, 0.456, 0.406)) and np.allclose(std, (0.229, 0.224, 0.225)):
            mode = "Keras 'torch' mode: ImageNet mean and std"
        elif np.allclose(mean, 0) and np.allclose(std, 1 / 255):
            mode = "0-255 (the model rescales inside)"
        else:
            mode = f"mean {tuple(round(float(m), 3) for m in mean)}, std {tuple(round(float(s), 3) for s in std)}"
    return Preprocessing(tuple(input_size), tuple(float(m) for m in mean), tuple(float(s) for s in std),
                         channel_order=order, mode=mode)


@contextlib.contextmanager
def _seeded(keras, seed: int):
    """Keras's initialisers seeded with ``seed``; Python's, NumPy's, torch's and Keras's RNG restored after."""
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR
    from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED

    saved = (random.getstate(), np.random.get_state(), global_state.get_global_attribute(GLOBAL_RANDOM_SEED),
             global_state.get_global_attribute(GLOBAL_SEED_GENERATOR))
    with torch.random.fork_rng(devices=[]):
        keras.utils.set_random_seed(int(seed))
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            global_state.set_global_attribute(GLOBAL_RANDOM_SEED, saved[2])
            global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, saved[3])


@contextlib.contextmanager
def _cache_only(missing: list[str]):
    """Keras's ``get_file`` as the applications call it, noting the cache path it looks at first.

    A cached file loads as Keras would load it (hash checked); a missing one is fetched as Keras
    would, and the path lands in ``missing`` so a failed download can name it.
    """
    from keras.src.utils import file_utils

    original = file_utils.get_file

    def get_file(fname=None, origin=None, *args, cache_subdir="datasets", cache_dir=None, **kwargs):
        base = os.path.expanduser(cache_dir or _keras_home())
        if not os.access(base, os.W_OK):  # where get_file itself falls back to
            base = os.path.join("/tmp", ".keras")
        path = os.path.join(base, cache_subdir, fname or os.path.basename(origin or ""))
        if not os.path.exists(path):
            missing.append(path)
        return original(fname, origin, *args, cache_subdir=cache_subdir, cache_dir=cache_dir, **kwargs)

    file_utils.get_file = get_file
    try:
        yield
    finally:
        file_utils.get_file = original


def _keras_home() -> str:
    from keras.src.backend import config

    return config.keras_home()


def load_keras(spec: str, *, weights=None, random_init: bool = False, seed: int = 0,
               device: torch.device | str = "cpu") -> LoadedModel:
    """``keras:NAME`` / ``keras:NAME+top`` or a saved ``.keras`` file, as a :class:`LoadedModel`.

    ``NAME`` is a ``keras.applications`` model, built without its classifier (as the post
    builds VGG19: any input size) unless ``+top``; with the top its last layer gives logits
    (``classifier_activation=None``), as a torchvision classifier does. Weights: ``weights``
    (a ``.h5``, ``.weights.h5`` or ``.keras`` file), else ImageNet from Keras's cache, else
    ``random_init`` (seeded by ``seed``). The global RNG states (Python, NumPy, torch, Keras) are
    left as they were.
    """
    keras = import_keras()
    device = torch.device(device)
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise ConvscopeError(f"weights file not found: {weights}")
        if not weights.name.endswith(WEIGHT_SUFFIXES):
            raise ConvscopeError(f"--weights {weights}: a Keras model takes a {', '.join(WEIGHT_SUFFIXES)} file")
    # Building runs Keras's initialisers (drawing from Python's RNG) even before weights load over them.
    with keras.device(str(device)), _seeded(keras, seed):
        if not spec.startswith("keras:"):
            loaded = _load_saved(keras, Path(spec))
        else:
            loaded = _load_application(keras, spec[len("keras:"):], weights, random_init, seed)
        if weights is not None:
            try:
                loaded.module.keras_model.load_weights(str(weights))
            except Exception as err:
                raise ConvscopeError(f"cannot load {weights} into {loaded.name}: {type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
            loaded.weights, loaded.random_init = f"file {weights}", False
    if loaded.random_init:
        loaded.seed = seed
    loaded.device = device
    return loaded


def _load_application(keras, name: str, weights, random_init: bool, seed: int) -> LoadedModel:
    top = name.endswith(_TOP)
    name = name[: -len(_TOP)] if top else name
    names = application_names()
    if name not in names:
        raise ConvscopeError(f"unknown Keras application {name!r}.{suggest(name, names)} "
                             f"keras:NAME takes a keras.applications name ({', '.join(names[:6])}, ...), "
                             "keras:NAME+top with the classifier.")
    build = getattr(keras.applications, name)
    kwargs = {"include_top": top}
    if top and "classifier_activation" in inspect.signature(build).parameters:
        kwargs["classifier_activation"] = None
    pretrained = weights is None and not random_init
    missing: list[str] = []
    try:
        if pretrained:
            with _cache_only(missing):
                model = build(weights="imagenet", **kwargs)
        else:
            model = build(weights=None, **kwargs)
    except Exception as err:
        if pretrained and missing:
            raise ConvscopeError(
                f"no ImageNet weights for keras:{name}{_TOP if top else ''}: Keras looks for {missing[0]} and could "
                f"not download it ({type(err).__name__}). Pass the file with --weights FILE "
                "(.h5, .weights.h5 or .keras), put it at that path, or use --random"
            ) from None
        raise ConvscopeError(f"keras.applications.{name} cannot be built: {type(err).__name__}: {str(err)[:200]}") from None
    size = tuple(model.input_shape[1:3]) if None not in model.input_shape[1:3] else (_TRAINED_SIZE.get(name, 224),) * 2
    pre = application_preprocessing(name, size)
    label = "random init" if random_init else f"Keras ImageNet ({name})"
    classes = imagenet_classes() if top else None
    return LoadedModel(KerasNet(model), f"keras:{name}{_TOP if top else ''}", label, pre, classes, random_init)


def _load_saved(keras, path: Path) -> LoadedModel:
    if not path.is_file():
        raise ConvscopeError(f"model file not found: {path}")
    try:
        model = keras.saving.load_model(str(path), safe_mode=True, compile=False)
    except Exception as err:
        text = str(err).splitlines()[0][:240] if str(err) else type(err).__name__
        hint = (" It needs code convscope will not run from a file (safe_mode): a Lambda layer or a custom "
                "object. Build the model in Python and pass it to convscope.as_loaded()."
                if "safe_mode" in str(err) or "custom" in str(err).lower() or "Could not locate" in str(err) else "")
        raise ConvscopeError(f"cannot load the Keras model {path}: {text}.{hint}") from None
    loaded = as_loaded_keras(model)
    loaded.name, loaded.weights = path.stem, f"Keras model {path.name}"
    return loaded


def as_loaded_keras(model, preprocessing: Preprocessing | None = None) -> LoadedModel:
    """Wrap a Keras model (ImageNet RGB preprocessing unless given), leaving it as it is."""
    keras = import_keras()
    if not isinstance(model, keras.Model):
        raise ConvscopeError(f"expected a keras.Model, got {type(model).__name__}")
    try:
        shape = tuple(model.input_shape)
    except Exception:  # a subclassed model that was never built
        raise ConvscopeError("the Keras model has no input shape yet: build it (call it once) first") from None
    if len(shape) != 4:
        raise ConvscopeError(f"convscope opens image models; this Keras model takes inputs of shape {shape}")
    net = KerasNet(model)
    hw = shape[1:3] if net.channels_last else shape[2:4]
    size = tuple(hw) if None not in hw else (224, 224)
    pre = preprocessing or Preprocessing(size)
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = model.output_shape
    classes = imagenet_classes() if isinstance(out, tuple) and len(out) == 2 and out[-1] == 1000 else None
    return LoadedModel(net, model.name, "Keras model", pre, classes, device=device)
