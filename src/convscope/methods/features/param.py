"""Image parameterizations: what the optimizer changes, and how that becomes an image.

Each returns ``(params, image_f)`` as in Lucid and lucent: ``params`` go to the optimizer,
``image_f()`` gives the current ``(B, 3, H, W)`` image. :func:`image` (the Lucid recipe)
gives values in (0, 1); :func:`gray_noise_image` (the post's recipe) gives raw pixels that
may leave [0, 1], as they did in the post.

Every random draw can come from one ``torch.Generator`` per batch element, so element ``i``
starts the same way whether it is optimized alone or in a batch (see :class:`ElementRNG`).

Shape:
    ``image_f()``: ``(B, 3, H, W)``, float32, on ``device``.

Example:
    >>> params, image_f = image(128, batch=4)
    >>> torch.optim.Adam(params, lr=0.05); image_f().shape
    torch.Size([4, 3, 128, 128])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "ElementRNG", "pixel_image", "fft_image", "to_valid_rgb", "image", "gray_noise_image",
    "COLOR_CORRELATION_SVD_SQRT",
]

ImageFn = Callable[[], torch.Tensor]

# Square root of the colour correlation of ImageNet images, from Lucid
# (lucid/optvis/param/color.py). Mixing channels with it makes the optimizer work in a
# decorrelated colour space, which keeps colours natural.
COLOR_CORRELATION_SVD_SQRT = np.asarray(
    [[0.26, 0.09, 0.02],
     [0.27, 0.00, -0.05],
     [0.27, -0.09, 0.03]], dtype=np.float32)
_COLOR_NORMALIZED = COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0))

# Lucid divides the FFT image by this; larger values start less saturated.
FFT_MAGIC = 4.0


class ElementRNG:
    """One ``torch.Generator`` per batch element, seeded from ``(seed, key)``.

    Every random number an element uses (initial image, jitter, scale, rotation) comes from
    its own generator, so its run depends only on its seed and key (e.g. the channel), never
    on which other elements share the batch.
    """

    def __init__(self, seed: int, keys: Sequence[Sequence[int] | int]):
        self.generators = []
        for key in keys:
            key = [key] if isinstance(key, int) else list(key)
            state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) & 0xFFFFFFFF for k in key)])
            self.generators.append(torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1)))

    def __len__(self) -> int:
        return len(self.generators)

    def subset(self, index: slice) -> ElementRNG:
        sub = ElementRNG.__new__(ElementRNG)
        sub.generators = self.generators[index]
        return sub

    def randn(self, *shape: int) -> torch.Tensor:
        """``(B, *shape)`` standard normal, element ``i`` from generator ``i`` (on the CPU)."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators])

    def integers(self, high: int) -> torch.Tensor:
        """``(B,)`` integers in ``[0, high)``."""
        return torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators])

    def choice(self, values: Sequence[float]) -> torch.Tensor:
        """``(B,)`` values drawn uniformly from ``values``."""
        table = torch.as_tensor(values, dtype=torch.float32)
        return table[self.integers(len(table))]


def _noise(shape: tuple[int, ...], rng: ElementRNG | None) -> torch.Tensor:
    if rng is None:
        return torch.randn(shape)
    if len(rng) != shape[0]:
        raise ValueError(f"{len(rng)} generators for a batch of {shape[0]}")
    return rng.randn(*shape[1:])


def pixel_image(shape: tuple[int, int, int, int], sd: float = 0.01, *, rng: ElementRNG | None = None,
                device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], ImageFn]:
    """Plain pixels, unconstrained (pass through :func:`to_valid_rgb` for a sigmoid)."""
    tensor = (_noise(shape, rng) * sd).to(device).requires_grad_(True)
    return [tensor], lambda: tensor


def rfft2d_freqs(height: int, width: int) -> np.ndarray:
    """Frequency magnitude of each coefficient of a real 2-D FFT, shape ``(H, W // 2 + 1)``."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def fft_image(shape: tuple[int, int, int, int], sd: float = 0.01, decay_power: float = 1.0, *,
              rng: ElementRNG | None = None, device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], ImageFn]:
    """The image as a spectrum, each frequency scaled by 1/f (Olah et al. 2017).

    The optimizer then takes equal steps in every frequency of a natural-image-like
    spectrum, instead of the high-frequency-heavy steps of plain pixels.
    """
    batch, channels, height, width = shape
    freqs = rfft2d_freqs(height, width)
    spectrum = (_noise((batch, channels, *freqs.shape, 2), rng) * sd).to(device).requires_grad_(True)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(height, width)) ** decay_power
    scale_t = torch.tensor(scale, dtype=torch.float32, device=device)[None, None]

    def image_f() -> torch.Tensor:
        coeffs = torch.view_as_complex(spectrum) * scale_t
        return torch.fft.irfft2(coeffs, s=(height, width), norm="ortho") / FFT_MAGIC

    return [spectrum], image_f


def _decorrelate_color(x: torch.Tensor) -> torch.Tensor:
    """Per pixel, ``rgb = M @ v`` with Lucid's normalized colour matrix (a 1x1 convolution)."""
    matrix = torch.as_tensor(_COLOR_NORMALIZED, dtype=x.dtype, device=x.device)
    return torch.nn.functional.conv2d(x, matrix[:, :, None, None])


def to_valid_rgb(image_f: ImageFn, decorrelate: bool = True) -> ImageFn:
    """Map an unconstrained image into (0, 1): optional colour decorrelation, then a sigmoid."""
    def inner() -> torch.Tensor:
        x = image_f()
        if decorrelate:
            x = _decorrelate_color(x)
        return torch.sigmoid(x)
    return inner


def image(height: int, width: int | None = None, *, batch: int = 1, fft: bool = True, decorrelate: bool = True,
          sd: float = 0.01, decay_power: float = 1.0, rng: ElementRNG | None = None,
          device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], ImageFn]:
    """The Lucid parameterization: FFT with 1/f scaling, decorrelated colour, sigmoid into (0, 1)."""
    shape = (batch, 3, height, width or height)
    if fft:
        params, image_f = fft_image(shape, sd, decay_power, rng=rng, device=device)
    else:
        params, image_f = pixel_image(shape, sd, rng=rng, device=device)
    return params, to_valid_rgb(image_f, decorrelate)


def gray_noise_image(height: int, width: int | None = None, *, batch: int = 1, noise: float = 20 / 255,
                     rng: ElementRNG | None = None, device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], ImageFn]:
    """The post's start: mid-gray plus uniform noise, ``128 + U(0, 20)`` in 0..255 units.

    Raw pixels, not clamped: the post lets them drift and only rescales for display.
    """
    shape = (batch, 3, height, width or height)
    uniform = torch.rand(shape) if rng is None else rng.rand(*shape[1:])
    tensor = (128 / 255 + noise * uniform).to(device).requires_grad_(True)
    return [tensor], lambda: tensor
