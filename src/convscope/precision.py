"""Numeric precision and memory layout of a model's forward and backward passes.

A request (``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``) is resolved once, where a public call
starts, into a :class:`Precision`: the autocast dtype (None: plain float32), whether inputs go in
the channels-last memory format, and why. The engines only apply it.

Two purposes resolve ``"auto"`` differently:

* :data:`PICTURE`, an optimization whose result is an image (feature visualization): bf16
  autocast on CUDA devices that support it and on CPUs with native bf16 instructions
  (AVX-512 BF16 or AMX); plain float32 elsewhere, because a CPU without them emulates bf16 and
  runs it several times *slower* (about 7x slower per step on an AVX2 EPYC: the step-time
  table of ``benchmarks/features.py``). Channels-last is used where the model has a 2-D
  convolution *and* the device runs NHWC convolutions faster (:func:`channels_last_pays`):
  CUDA (cuDNN) and x86 CPUs with AVX2 or AVX-512 (oneDNN's NHWC kernels: 44 ms against 69 ms
  per step of the default model at batch 8 on an AVX-512 EPYC; 1.55x the default layout's step
  and 1.32x the whole 80-step optimization at two threads on an idle AVX2 EPYC).
* :data:`NUMBERS`, where users compare values (activations, attributions, scan values): ``"auto"``
  is plain float32 in the default layout, exactly as without this option; bf16 or fp16 only on
  request (and then channels-last too, as the values are no longer exact anyway).

Channels-last is applied to the *input* only (:meth:`Precision.input`): convolutions propagate
the format of their input, so the whole network runs NHWC while the user's model, its
parameters and their memory format stay untouched.

Example:
    >>> p = resolve_precision("auto", torch.device("cpu"), purpose=PICTURE)
    >>> p.describe()
    'fp32, channels-last (auto: this CPU has no native bf16, which would be emulated; ...)'
    >>> with p.autocast():
    ...     out = model(p.input(x))
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConvscopeError

__all__ = ["Precision", "PRECISIONS", "PICTURE", "NUMBERS", "FP32", "resolve_precision", "native_bf16",
           "channels_last_pays"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PICTURE = "picture"
NUMBERS = "numbers"

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a forward/backward pass runs.

    Attributes:
        name: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the autocast dtype of convolutions and matmuls
            (``"fp32"``: no autocast).
        channels_last: inputs go in NHWC memory format.
        device_type: ``"cpu"`` or ``"cuda"``, for :func:`torch.autocast`.
        requested: what was asked (``"auto"`` or a name).
        reason: why, when ``"auto"`` chose.
    """

    name: str = "fp32"
    channels_last: bool = False
    device_type: str = "cpu"
    requested: str = "fp32"
    reason: str = ""

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES[self.name]

    @property
    def exact(self) -> bool:
        """Plain float32 in the default layout: results equal a run without this option."""
        return self.name == "fp32" and not self.channels_last

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`dtype` on :attr:`device_type`, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory format the network should run in (a no-op unless channels-last)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def describe(self) -> str:
        text = self.name + (", channels-last" if self.channels_last else "")
        if self.requested == "auto":
            text += f" (auto: {self.reason})" if self.reason else " (auto)"
        return text

    def as_dict(self) -> dict:
        return {"name": self.name, "channels_last": self.channels_last, "requested": self.requested,
                "reason": self.reason}


FP32 = Precision()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Does ``device`` compute in bf16 natively (not emulated through float32)?"""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        try:
            caps = capabilities()
            return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
        except Exception:  # a build without the query: fall back to the kernel's flags
            pass
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def channels_last_pays(device: torch.device | str = "cpu") -> bool:
    """Do 2-D convolutions on ``device`` run faster with NHWC (channels-last) inputs?

    Yes on CUDA and on x86 CPUs with AVX2 or AVX-512, where oneDNN's NHWC kernels were measured
    faster for the default model (1.6x the step on AVX-512; on an idle AVX2 EPYC 1.55x the step,
    1.03x the whole optimization at one thread, 1.32x at two); no on other CPUs (older x86, ARM),
    which were not measured: the default layout is the safe choice there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # a build without the query: the default layout is the safe choice
        return False
    return capability.startswith(("AVX512", "AVX2")) or native_bf16(device)


def _has_conv2d(module: torch.nn.Module | None) -> bool:
    if module is None:
        return True
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def resolve_precision(request: str | Precision | None, device: torch.device | str, *, purpose: str = PICTURE,
                      module: torch.nn.Module | None = None) -> Precision:
    """The :class:`Precision` for ``request`` on ``device`` (see the module docstring for ``"auto"``).

    Args:
        request: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``, a :class:`Precision` (returned
            as is) or None (``"auto"``).
        device: where the model runs.
        purpose: :data:`PICTURE` or :data:`NUMBERS`.
        module: the model, to see whether it has 2-D convolutions (channels-last helps only those).
    """
    if isinstance(request, Precision):
        return request
    request = "auto" if request is None else str(request).lower()
    if request not in PRECISIONS:
        raise ConvscopeError(f"unknown precision {request!r}: use {', '.join(PRECISIONS)}")
    if purpose not in (PICTURE, NUMBERS):
        raise ValueError(f"purpose must be {PICTURE!r} or {NUMBERS!r}, got {purpose!r}")
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    if device.type not in ("cpu", "cuda") and request != "fp32" and request != "auto":
        raise ConvscopeError(f"--precision {request} is supported on cpu and cuda devices, not {device.type}")
    convs = _has_conv2d(module)
    if request == "auto":
        if purpose == NUMBERS or device.type not in ("cpu", "cuda"):
            return Precision("fp32", False, kind, "auto", "exact values by default; bf16 on request")
        native = native_bf16(device)
        where = "this GPU" if kind == "cuda" else "this CPU"
        name = "bf16" if native else "fp32"
        reason = f"{where} has native bf16" if native else f"{where} has no native bf16, which would be emulated"
        channels_last = convs and channels_last_pays(device)
        if channels_last:
            reason += "; channels-last for the convolutions"
        elif convs:
            reason += f"; the default layout (channels-last is not known to pay on {where})"
        return Precision(name, channels_last, kind, "auto", reason)
    # an explicit fp32 keeps the values exact for numbers, and takes the faster layout for pictures
    channels_last = convs and (request != "fp32" or (purpose == PICTURE and channels_last_pays(device)))
    return Precision(request, channels_last, kind, request, "")
