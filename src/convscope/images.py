"""Reading photos of any kind into RGB arrays, and the built-in sample photos.

Handles any size and mode: RGB, grayscale, palette, RGBA (composited on white), 16-bit and
32-bit integer or float images (scaled by their full range), and EXIF orientation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConvscopeError

__all__ = ["load_image", "sample_photos", "to_rgb8", "ImageSource", "IMAGE_EXTENSIONS", "resize"]

ImageSource = str | os.PathLike | Image.Image | np.ndarray

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

SAMPLE_PHOTO_NAMES = ("chelsea", "astronaut", "coffee")


def load_image(source: ImageSource) -> np.ndarray:
    """Return ``source`` as an ``(H, W, 3)`` uint8 RGB array.

    ``source`` is a path, a PIL image, or an array (``H×W``, ``H×W×3`` or ``H×W×4``; uint8,
    uint16 or float in [0, 1]). Raises :class:`ConvscopeError` for a missing or unreadable file.

    Example:
        >>> load_image("photo.jpg").shape
        (480, 640, 3)
    """
    if isinstance(source, np.ndarray):
        return to_rgb8(source)
    if isinstance(source, Image.Image):
        return _pil_to_rgb8(source)
    path = Path(source)
    if not path.exists():
        raise ConvscopeError(f"image not found: {path}")
    if path.is_dir():
        raise ConvscopeError(f"expected an image file but got a folder: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not later
            im = ImageOps.exif_transpose(im)
            return _pil_to_rgb8(im)
    except UnidentifiedImageError:
        raise ConvscopeError(f"not an image file (cannot identify its format): {path}") from None
    except Image.DecompressionBombError as err:
        # Not an OSError: PIL refuses to decode an image far larger than any photo (a zip bomb).
        raise ConvscopeError(f"image {path} is too large to decode safely ({err}); "
                             "downscale it first") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ConvscopeError(f"cannot read image {path}: {err}") from None


def _pil_to_rgb8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_rgb8(np.asarray(im))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB")).copy()


def to_rgb8(array: np.ndarray) -> np.ndarray:
    """Any gray, RGB or RGBA array (uint8, uint16, bool or float in [0, 1]) as (H, W, 3) uint8."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ConvscopeError(f"expected an image array of shape H×W, H×W×3 or H×W×4, got {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ConvscopeError(f"empty image of shape {array.shape}")
    if array.dtype == np.uint8:
        scaled = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        scaled = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.integer):
        # 32-bit integer images (PIL mode "I") rarely use the full range: scale by their max.
        top = max(float(array.max()), 1.0)
        scaled = array.astype(np.float32) / (65535.0 if top <= 65535 else top)
    else:
        scaled = array.astype(np.float32)
        if scaled.max(initial=0.0) > 1.0:
            scaled = scaled / 255.0
    if scaled.shape[-1] == 4:
        alpha = scaled[..., 3:]
        scaled = scaled[..., :3] * alpha + (1.0 - alpha)
    if scaled.shape[-1] == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def resize(image: np.ndarray, size: tuple[int, int], resample: int = Image.BILINEAR) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 array to ``size = (H, W)``."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def sample_photos(names: tuple[str, ...] = SAMPLE_PHOTO_NAMES) -> dict[str, np.ndarray]:
    """scikit-image's bundled photos (works offline): ``{"chelsea": array, ...}``."""
    from skimage import data

    photos = {}
    for name in names:
        loader = getattr(data, name, None)
        if loader is None:
            raise ConvscopeError(f"scikit-image has no sample photo named {name!r}")
        photos[name] = to_rgb8(loader())
    return photos
