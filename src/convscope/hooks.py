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

Activations called as functions inside a module's ``forward`` (``F.relu``, ``F.gelu``,
``torch.relu``, ``x.relu_()``, ...) are layers too: the k-th call (from 0) of activation ``fn``
made directly by module ``M``'s ``forward`` during one forward pass is named ``M.fn@fn`` for
k = 0 and ``M.fn@fn<k>`` after (``Conv2d_1a_3x3.relu@fn``, ``block.relu@fn1``), counted over all
calls of ``M``; ``relu@fn`` is a call made by the root model's own ``forward``. "Directly"
means no submodule was running at the time, so ``nn.ReLU``'s own ``F.relu`` belongs to that
``nn.ReLU``. Such rows are recorded by a
:class:`~torch.overrides.TorchFunctionMode` that is pushed when the model's forward starts,
after any rule mode the caller entered, so it sees the value that mode returns.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConvscopeError, suggest

__all__ = [
    "frozen", "recording", "capture", "StopForward", "Recorded", "LayerRef", "named_layers", "parse_layer_name",
    "FUNCTIONAL_ACTIVATIONS", "functional_activation", "functional_row", "parse_functional_row", "ModuleStack",
    "channels_first",
]

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


# Activations (not gates: sigmoid/hardsigmoid outputs are excluded) that get a row when called as a function.
FUNCTIONAL_ACTIVATIONS = frozenset({
    "relu", "relu6", "leaky_relu", "gelu", "silu", "hardswish", "mish", "elu", "selu", "celu",
})
_FUNCTIONAL_ROW = re.compile(r"^(?:(?P<module>.+)\.)?(?P<fn>[a-z0-9_]+)@fn(?P<k>\d*)$")


def functional_activation(func) -> str | None:
    """``"relu"`` for ``F.relu``, ``F.relu_``, ``torch.relu``, ``Tensor.relu_``...; None for any other op."""
    name = getattr(func, "__name__", "").strip("_")
    return name if name in FUNCTIONAL_ACTIVATIONS else None


def functional_row(module: str, fn: str, k: int) -> str:
    """The row name of the k-th call of activation ``fn`` made by module ``module`` ("" for the root)."""
    return f"{module + '.' if module else ''}{fn}@fn{k if k else ''}"


def parse_functional_row(name: str) -> tuple[str, str, int] | None:
    """``"b.relu@fn1"`` -> ``("b", "relu", 1)``; None for a module's row."""
    match = _FUNCTIONAL_ROW.match(name)
    if match is None or match["fn"] not in FUNCTIONAL_ACTIVATIONS:
        return None
    return match["module"] or "", match["fn"], int(match["k"] or 0)


class ModuleStack:
    """Which module's ``forward`` is running now (``top``: its qualified name, "" for the root).

    Pre/post hooks on every module keep the stack; post hooks are ``always_call`` so an
    exception (``StopForward``) unwinds it. ``remove()`` takes every hook off.
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]):
        self.names: list[str] = []
        self.handles = []
        for name, module in [("", model), *modules.items()]:
            self.handles.append(module.register_forward_pre_hook(self._push(name)))
            self.handles.append(module.register_forward_hook(self._pop, always_call=True))

    def _push(self, name: str):
        def hook(_module, _inputs):
            self.names.append(name)
        return hook

    def _pop(self, _module, _inputs, _output):
        if self.names:
            self.names.pop()

    @property
    def top(self) -> str | None:
        return self.names[-1] if self.names else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _FunctionalCalls(TorchFunctionMode):
    """Reports every functional activation call with the module that made it and its output."""

    def __init__(self, stack: ModuleStack, report):
        super().__init__()
        self.stack, self.report = stack, report

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fn = functional_activation(func)
        if fn is not None and isinstance(out, torch.Tensor) and self.stack.top is not None:
            self.report(self.stack.top, fn, out)
        return out


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
    functional: dict[tuple[str, str, int], str] = {}
    for name in names:
        parsed = parse_functional_row(name)
        if parsed is not None and (parsed[0] == "" or parsed[0] in modules):
            functional[parsed] = name
            continue
        module_name, call = parse_layer_name(name)
        if module_name not in modules:
            raise ConvscopeError(
                f"unknown layer {name!r}.{suggest(module_name, modules)} "
                "Run `convscope layers` to list the names."
            )
        wanted.setdefault(module_name, {})[call] = name
    store = Recorded()
    calls: dict = {}

    def reset(_module, _inputs):
        calls.clear()
        store.clear()

    def keep(name: str, output: torch.Tensor) -> None:
        output = channels_first(model, output)
        value = output.detach() if detach else output
        store[name] = value.clone() if clone else value
        store.versions[name] = store[name]._version
        if stop_after_last and len(store) == len(set(names)):
            raise StopForward

    def make_hook(module_name: str):
        def hook(_module, _inputs, output):
            call = calls.get(module_name, 0)
            calls[module_name] = call + 1
            name = wanted[module_name].get(call)
            if name is not None and isinstance(output, torch.Tensor):
                keep(name, output)
        return hook

    def report(module_name: str, fn: str, output: torch.Tensor) -> None:
        key = (module_name, fn)
        k = calls.get(key, 0)
        calls[key] = k + 1
        name = functional.get((module_name, fn, k))
        if name is not None:
            keep(name, output)

    handles = [model.register_forward_pre_hook(reset)]
    stack = None
    try:
        for module_name in wanted:
            handles.append(modules[module_name].register_forward_hook(make_hook(module_name)))
        if functional:
            stack = ModuleStack(model, modules)
            mode = _FunctionalCalls(stack, report)
            # Pushed inside the forward, so it is the innermost mode: a rule mode the caller
            # entered (backward_rule) has already replaced the call when it reports the output.
            def enter(_module, _inputs):
                mode.__enter__()  # returns the mode, which a pre-hook must not (it would replace the input)

            def leave(_module, _inputs, _output):
                mode.__exit__(None, None, None)

            handles.append(model.register_forward_pre_hook(enter))
            handles.append(model.register_forward_hook(leave, always_call=True))
        yield store
    finally:
        for handle in handles:
            handle.remove()
        if stack is not None:
            stack.remove()


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
