"""Parameterizations and transforms: range, shape, gradients, per-element determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convscope.methods.features import param, transforms
from convscope.methods.features.param import ElementRNG


@pytest.mark.parametrize("height,width", [(64, 64), (37, 50), (50, 37)])
def test_fft_image_in_range_with_shape_and_gradients(height, width):
    params, image_f = param.image(height, width, batch=2, rng=ElementRNG(0, [0, 1]))
    img = image_f()
    assert img.shape == (2, 3, height, width)
    assert img.dtype == torch.float32
    assert float(img.detach().min()) > 0.0 and float(img.detach().max()) < 1.0
    # start near mid-gray: small noise through a sigmoid
    assert abs(float(img.detach().mean()) - 0.5) < 0.05
    img[0].sum().backward()
    (spectrum,) = params
    assert spectrum.grad is not None and spectrum.grad[0].abs().sum() > 0
    assert spectrum.grad[1].abs().sum() == 0  # image 0 is made from its own coefficients only


def test_fft_image_is_an_inverse_fft_with_1_over_f_scaling():
    (spectrum,), image_f = param.fft_image((1, 1, 8, 8), sd=0.0)
    with torch.no_grad():
        spectrum[0, 0, 0, 1, 0] = 1.0  # one horizontal frequency (1/8 cycles per pixel), real part
    raw = image_f().detach()[0, 0]
    # scale 1/f = 8; irfft2 (ortho) of one rfft coefficient gives 2 cos(2 pi x / 8) / 8; Lucid's /4 after
    x = torch.arange(8, dtype=torch.float32)
    expected = (8.0 * 2 * torch.cos(2 * np.pi * x / 8) / 8 / param.FFT_MAGIC).expand(8, 8)
    assert torch.allclose(raw, expected, atol=1e-5)


def test_decorrelated_colour_and_pixel_param():
    params, image_f = param.image(16, batch=1, fft=False, decorrelate=True, sd=0.0)
    assert torch.allclose(image_f(), torch.full((1, 3, 16, 16), 0.5))
    with torch.no_grad():
        params[0][:, 0] = 1.0  # the first decorrelated component is roughly luminance
    rgb = image_f()[0, :, 0, 0]
    assert (rgb > 0.5).all()


def test_gray_noise_start_matches_the_post():
    _, image_f = param.gray_noise_image(32, batch=2, rng=ElementRNG(3, [0, 1]))
    img = image_f().detach()
    assert float(img.min()) >= 128 / 255 and float(img.max()) <= 148 / 255


def test_each_element_draws_the_same_alone_or_in_a_batch():
    batch = ElementRNG(7, [(5, 0), (9, 0), (2, 0)])
    alone = ElementRNG(7, [(9, 0)])
    _, f_batch = param.image(20, batch=3, rng=batch)
    _, f_alone = param.image(20, batch=1, rng=alone)
    # The same draws, but batched FFT kernels may round differently from single ones (AVX-512 machines
    # differ in the last bit, ~6e-8 on values near 0.5): 1e-6 is ~16 ulp, far below the 1e-2 noise scale.
    torch.testing.assert_close(f_batch()[1], f_alone()[0], rtol=0, atol=1e-6)
    assert (f_batch()[0] - f_batch()[1]).abs().max() > 1e-3   # other elements draw other noise


def test_standard_transforms_size_and_per_element_independence():
    t = transforms.standard_transforms()
    x = torch.rand(3, 3, 40, 40)
    out = t(x, ElementRNG(0, [0, 1, 2]))
    assert out.shape == (3, 3, 54, 54)
    alone = t(x[2:3], ElementRNG(0, [2]))
    assert torch.allclose(out[2:3], alone, atol=1e-6)


@pytest.mark.parametrize("height,width", [(40, 40), (33, 47)])
def test_fused_standard_transforms_equal_the_separate_steps(height, width):
    x = torch.rand(4, 3, height, width)
    keys = [0, 1, 2, 3]
    fused = transforms.standard_transforms()(x, ElementRNG(5, keys))
    steps = transforms.compose(transforms.standard_sequence())(x, ElementRNG(5, keys))
    assert fused.shape == steps.shape == (4, 3, height + 14, width + 14)
    assert torch.allclose(fused, steps, atol=2e-5)
    # gradients flow back to the image through the one resampling
    y = x.clone().requires_grad_(True)
    transforms.standard_transforms()(y, ElementRNG(5, keys))[1].sum().backward()
    assert y.grad[1].abs().sum() > 0 and y.grad[0].abs().sum() == 0


def test_jitter_crops_at_drawn_offsets():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    rng = ElementRNG(1, [0, 1])
    out = transforms.jitter(3)(x, rng)
    assert out.shape == (2, 1, 4, 4)
    for b in range(2):  # every output is a 4x4 window of its own input
        windows = [x[b, 0, r:r + 4, c:c + 4] for r in range(3) for c in range(3)]
        assert any(torch.equal(out[b, 0], w) for w in windows)


def test_random_affine_identity_and_quarter_turn():
    x = torch.rand(1, 3, 9, 9)
    rng = ElementRNG(0, [0])
    assert torch.allclose(transforms.random_affine()(x, rng), x, atol=1e-6)
    turned = transforms.random_rotate([90.0])(x, rng)
    # a quarter turn of a square image is a rot90 (direction checked against torch.rot90)
    assert any(torch.allclose(turned, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, 3))
    zoomed = transforms.random_scale([2.0])(x, rng)
    assert torch.allclose(zoomed[..., 4, 4], x[..., 4, 4], atol=1e-6)  # the centre stays put
