"""Hooks, always inside context managers, and the guard that leaves the user's model untouched.

* :func:`frozen` puts a model in eval mode with frozen parameters and restores every
  module's mode and every parameter's ``requires_grad`` on exit, error or not.
* :func:`recording` hooks the requested layers, yields a dict that fills on each forward,
  and removes every hook on exit. Outputs are cloned when recorded, so a later in-place
  op (``ReLU(inplace=True)`` after a conv) cannot corrupt them, and the forward pass can
  stop right after the last requested layer, which saves the rest of the network.
* :func:`capture` is the one-call form: one forward pass, every requested layer. It
  records without copying and checks each tensor's version counter afterwards; only if an
  in-place op did touch a recorded output (``out += identity`` in a ResNet block) does it
  run a second pass that copies those layers. Copies cost as much as a conv layer here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConvscopeError, suggest

__all__ = ["frozen", "recording", "capture", "StopForward", "Recorded", "LayerRef", "named_layers", "parse_layer_name",
           "channels_first"]

LayerRef = Any  # a qualified name, or anything with a ``.name`` (a catalogue row)


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The addressable layers of ``model``: qualified name -> module, without the root.

    The one place that enumerates a model's layers, for the catalogue and for every hook.
    PyTorch models use ``named_modules()``. A model that names its own layers (the Keras
    wrapper, :class:`convscope.keras.KerasNet`: ``model.layers`` by ``layer.name``) provides
    ``convscope_layers()``.
    """
    own = getattr(model, "convscope_layers", None)
    if callable(own):
        return dict(own())
    return {name: module for name, module in model.named_modules() if name}


def channels_first(model: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """A layer's output as ``(B, C, H, W)``: the one place channels-last maps (Keras) are turned.

    A model whose layers compute channels-last says so with ``channels_last = True``; its 4-D
    outputs become a permuted view (same storage and version counter, differentiable).
    """
    if getattr(model, "channels_last", False) and output.dim() == 4:
        return output.permute(0, 3, 1, 2)
    return output


def parse_layer_name(name: str) -> tuple[str, int]:
    """``"layer1.0.relu@2"`` → ``("layer1.0.relu", 2)``; a plain name is call 0."""
    module, sep, call = name.partition("@")
    if sep and call.isdigit():
        return module, int(call)
    return name, 0


class Recorded(dict):
    """``name -> tensor`` as recorded, plus each tensor's autograd version at that moment."""

    def __init__(self):
        super().__init__()
        self.versions: dict[str, int] = {}

    def modified(self) -> list[str]:
        """Names whose tensor was changed in place after it was recorded."""
        return [name for name, tensor in self.items() if tensor._version != self.versions[name]]


class StopForward(Exception):
    """Raised by a hook to end the forward pass once every requested layer is recorded."""


@contextlib.contextmanager
def frozen(model: nn.Module, train: bool = False) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` inside; the exact previous state restored after."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.train(train)
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


def _names(layers: Iterable[LayerRef]) -> list[str]:
    return [str(getattr(layer, "name", layer)) for layer in layers]


@contextlib.contextmanager
def recording(
    model: nn.Module,
    layers: Sequence[LayerRef],
    *,
    clone: bool = True,
    detach: bool = True,
    stop_after_last: bool = False,
) -> Iterator[Recorded]:
    """Record the outputs of ``layers`` on every forward pass of ``model``.

    Args:
        layers: qualified names (``features.3``, ``layer1.0.relu@2`` for the third call of a
            reused module) or :class:`LayerInfo` rows.
        clone: copy each output, so in-place ops later in the network cannot change it.
        detach: record without autograd history (set False to backprop from a recorded output).
        stop_after_last: raise :class:`StopForward` once all are recorded; catch it around
            the forward call (``capture`` does).

    Yields:
        a :class:`Recorded` dict ``name -> tensor (B, C, H, W)``, refilled on each forward.

    Example:
        >>> with recording(model, ["features.1"]) as out:
        ...     model(x)
        >>> out["features.1"].shape
    """
    names = _names(layers)
    modules = named_layers(model)
    wanted: dict[str, dict[int, str]] = {}
    for name in names:
        module_name, call = parse_layer_name(name)
        if module_name not in modules:
            raise ConvscopeError(
                f"unknown layer {name!r}.{suggest(module_name, modules)} "
                "Run `convscope layers` to list the names."
            )
        wanted.setdefault(module_name, {})[call] = name
    store = Recorded()
    calls: dict[str, int] = {}

    def reset(_module, _inputs):
        calls.clear()
        store.clear()

    def make_hook(module_name: str):
        def hook(_module, _inputs, output):
            call = calls.get(module_name, 0)
            calls[module_name] = call + 1
            name = wanted[module_name].get(call)
            if name is None or not isinstance(output, torch.Tensor):
                return
            output = channels_first(model, output)
            value = output.detach() if detach else output
            store[name] = value.clone() if clone else value
            store.versions[name] = store[name]._version
            if stop_after_last and len(store) == len(names):
                raise StopForward
        return hook

    handles = [model.register_forward_pre_hook(reset)]
    try:
        for module_name in wanted:
            handles.append(modules[module_name].register_forward_hook(make_hook(module_name)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[LayerRef],
    *,
    stop_after_last: bool = True,
) -> dict[str, torch.Tensor]:
    """One forward pass of ``x`` through ``model``; the outputs of all ``layers``.

    The model runs in eval mode without weight gradients and is restored afterwards.

    Shape:
        x: ``(B, 3, H, W)`` already normalised for the model; outputs ``(B, C, h, w)``.
    """
    names = _names(layers)
    with frozen(model), torch.no_grad():
        with recording(model, names, clone=False, stop_after_last=stop_after_last) as store:
            with contextlib.suppress(StopForward):
                model(x)
            outputs, stale = dict(store), store.modified()
        if stale:
            with recording(model, stale, clone=True, stop_after_last=stop_after_last) as store:
                with contextlib.suppress(StopForward):
                    model(x)
                outputs.update(store)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ConvscopeError(f"layers {missing} did not run in the forward pass (not reached for this input?)")
    return outputs
