"""Image sets for dataset scans: a recursive folder stream, in-memory tensors, and a built-in sample set.

An image set is a ``torch.utils.data.Dataset`` whose item ``i`` is ``(i, image, reason)``:

* ``image`` is a ``uint8`` tensor ``(H, W, 3)`` at the set's one analysis size (so a batch
  stacks), or ``None`` when the file could not be used;
* ``reason`` says why (empty when the image is fine).

Items are decoded by DataLoader workers; :func:`collate_images` stacks the good ones and
hands the bad ones back, so a scan counts and lists unreadable, corrupt, empty, non-image
and tiny files and never dies on one. Every image is resized so that it covers the analysis
size and centre-cropped to it (the whole picture's aspect is kept, as in the
classification crop, without the crop margin); :meth:`ImageSet.load` gives exactly the
array the scan saw, so projections and patches are drawn on the same pixels.

* :class:`FolderImages`: every jpg, jpeg, png, webp, bmp, tif and tiff file below a folder,
  in sorted order (hidden files and folders skipped). Names, sizes and modification times are fingerprinted
  so a resumed scan can check it is reading the same set.
* :class:`SampleImages`: a small DEMONSTRATION set that works offline: windows cropped at
  three scales from twenty of scikit-image's bundled photos (cat, astronaut, coffee, rocket,
  Hubble deep field, camera man, coins, moon, retina, textures, text, a motorcycle, ...),
  about 530 images. It is far too small and too narrow to say what a network's features
  mean in general; use a real data set for that.
* :class:`TensorImages`: already decoded uint8 images held in memory (tests, benchmarks).

Example:
    >>> images = FolderImages("~/data/val", size=(224, 224))
    >>> loader = images.loader(batch_size=32, workers=4)
    >>> for pixels, ids, skipped in loader: ...
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import ConvscopeError
from .images import IMAGE_EXTENSIONS, load_image, to_rgb8

__all__ = [
    "ImageSet", "FolderImages", "SampleImages", "TensorImages", "collate_images", "fit_cover", "check_folder",
    "MIN_SIDE", "SAMPLE_SET_PHOTOS",
]

# Smaller than this on either side, an image says nothing at a 224-pixel analysis size (a
# 1-pixel "image" upsampled is one flat colour); such files are skipped and reported.
MIN_SIDE = 8

Item = tuple[int, "torch.Tensor | None", str]


def fit_cover(image: np.ndarray, size: tuple[int, int], resample: int = Image.BILINEAR) -> np.ndarray:
    """Resize ``image (h, w, 3)`` so it covers ``size = (H, W)``, then centre-crop to exactly ``size``."""
    height, width = image.shape[:2]
    target_h, target_w = size
    scale = max(target_h / height, target_w / width)
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return np.ascontiguousarray(image[top:top + target_h, left:left + target_w])


class ImageSet(Dataset):
    """Base class: ``len``, item ``i -> (i, uint8 (H, W, 3) tensor | None, reason)``, ``load``, ``path``.

    Subclasses implement :meth:`_read` (the raw RGB array of item ``i``, raising on failure),
    :meth:`path` and :meth:`describe`.
    """

    size: tuple[int, int]
    resample: int = Image.BILINEAR

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, index: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def path(self, index: int) -> str:  # pragma: no cover - abstract
        """A name for item ``index`` that a person can find again (file path relative to the root)."""
        raise NotImplementedError

    def describe(self) -> dict:  # pragma: no cover - abstract
        """``kind``, ``count``, ``fingerprint`` and where the images come from; goes into checkpoints and the index."""
        raise NotImplementedError

    def load(self, index: int) -> np.ndarray:
        """The ``(H, W, 3)`` uint8 array the scan saw for item ``index``; :class:`ConvscopeError` if unusable."""
        image = self._read(index)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ConvscopeError(f"decoded to an array of shape {image.shape} and type {image.dtype}")
        if min(image.shape[:2]) < MIN_SIDE:
            raise ConvscopeError(f"too small: {image.shape[1]}x{image.shape[0]} pixels (minimum {MIN_SIDE} on a side)")
        return fit_cover(image, self.size, self.resample)

    def require_readable(self, stop: int | None = None) -> int:
        """The index of the first usable item before ``stop``; :class:`ConvscopeError` naming the reasons if none is.

        Decodes only until one item reads, so it is cheap for any set that is not all broken.
        """
        reasons = []
        for index in range(min(len(self), len(self) if stop is None else stop)):
            item = self[index]
            if item[1] is not None:
                return index
            reasons.append(f"{self.path(index)}: {item[2]}")
        shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
        raise ConvscopeError(f"none of the {len(reasons)} images in {self.describe().get('root')} can be read "
                             f"({shown}); give a folder of readable images")

    def __getitem__(self, index: int) -> Item:
        try:
            image = self.load(index)
            return index, torch.from_numpy(image if image.flags.writeable else image.copy()), ""
        except ConvscopeError as err:
            return index, None, str(err)
        except Exception as err:  # any decoder failure (e.g. a decompression bomb) skips the file
            return index, None, f"{type(err).__name__}: {err}"

    def loader(self, batch_size: int = 32, workers: int = 0, start: int = 0, stop: int | None = None,
               pin_memory: bool = False) -> DataLoader:
        """Batches ``(pixels (B, H, W, 3) uint8, ids (B,) int64, skipped [(id, reason)])`` of items ``start..stop``, in order."""
        stop = len(self) if stop is None else min(stop, len(self))
        subset = Subset(self, range(start, stop))
        return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                          collate_fn=collate_images, pin_memory=pin_memory,
                          persistent_workers=False, worker_init_fn=_worker_init if workers else None)


def _worker_init(_worker_id: int) -> None:
    # Readers only decode; one torch thread each leaves the cores to the forward pass.
    torch.set_num_threads(1)


def collate_images(items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """Stack the usable images of a batch; list the unusable ones as ``(id, reason)``.

    A batch in which every image failed gives an empty ``(0, ...)`` pixel tensor.
    """
    good = [(i, image) for i, image, _ in items if image is not None]
    skipped = [(i, reason) for i, image, reason in items if image is None]
    if good:
        pixels = torch.stack([image for _, image in good])
    else:
        pixels = torch.zeros((0, 0, 0, 3), dtype=torch.uint8)
    ids = torch.tensor([i for i, _ in good], dtype=torch.int64)
    return pixels, ids, skipped


def check_folder(root: str | os.PathLike) -> Path:
    """``root`` as a path, if it is an existing folder (what a command checks before loading a model)."""
    path = Path(root).expanduser()
    if not path.exists():
        raise ConvscopeError(f"image folder not found: {path}")
    if not path.is_dir():
        raise ConvscopeError(f"expected a folder of images but got a file: {path} (give its folder)")
    return path


class FolderImages(ImageSet):
    """Every image file below ``root`` (recursive, sorted), resized to ``size = (H, W)``.

    Args:
        root: the folder.
        size: the analysis size; every image is resized to cover it and centre-cropped.
        resample: PIL resampling filter (use the model's, e.g. ``preprocessing.resample``).

    Raises:
        ConvscopeError: the folder does not exist or holds no image file.
    """

    def __init__(self, root: str | os.PathLike, size: tuple[int, int] = (224, 224),
                 resample: int = Image.BILINEAR):
        self.root = check_folder(root)
        self.size = (int(size[0]), int(size[1]))
        self.resample = resample
        self.files, self.fingerprint = _list_images(self.root)
        if not self.files:
            raise ConvscopeError(
                f"no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, index: int) -> np.ndarray:
        path = self.root / self.files[index]
        try:
            return load_image(path)
        except ConvscopeError as err:  # the reason is listed beside the path already
            raise ConvscopeError(str(err).replace(f": {path}", "").replace(f" {path}", "")) from None

    def path(self, index: int) -> str:
        return self.files[index]

    def describe(self) -> dict:
        return {"kind": "folder", "root": str(self.root.resolve()), "count": len(self.files),
                "fingerprint": self.fingerprint}


def _list_images(root: Path) -> tuple[list[str], str]:
    """Relative paths of the image files below ``root`` in sorted order, and a fingerprint of them.

    The fingerprint covers each name, size and modification time in nanoseconds, the test make
    and rsync use: a replaced file of the same size changes it, and no file has to be read
    (hashing the contents of a large data set would cost a pass over all of it).
    """
    files: list[str] = []
    digest = hashlib.sha1()
    stack = [Path()]
    while stack:
        rel = stack.pop()
        try:
            entries = sorted(os.scandir(root / rel), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable sub-folder holds nothing we can scan
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subdirs.append(rel / entry.name)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                path = (rel / entry.name).as_posix()
                try:
                    stat = entry.stat()
                    size, mtime = stat.st_size, stat.st_mtime_ns
                except OSError:
                    size = mtime = -1
                files.append(path)
                digest.update(f"{path}\0{size}\0{mtime}\n".encode())
        stack.extend(reversed(subdirs))  # depth-first, in name order
    return files, digest.hexdigest()


class TensorImages(ImageSet):
    """Decoded images held in memory: ``pixels (N, H, W, 3) uint8``; ``names`` optional."""

    def __init__(self, pixels: torch.Tensor | np.ndarray, names: Sequence[str] | None = None):
        pixels = torch.as_tensor(pixels)
        if pixels.dim() != 4 or pixels.shape[-1] != 3 or pixels.dtype != torch.uint8:
            raise ConvscopeError(f"expected uint8 images of shape (N, H, W, 3), got {tuple(pixels.shape)} {pixels.dtype}")
        self.pixels = pixels
        self.size = (int(pixels.shape[1]), int(pixels.shape[2]))
        self.names = list(names) if names is not None else [f"image {i}" for i in range(len(pixels))]
        digest = hashlib.sha1(str(tuple(pixels.shape)).encode())
        digest.update(pixels[:: max(1, len(pixels) // 64)].contiguous().numpy().tobytes())
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def __getitem__(self, index: int) -> Item:
        return index, self.pixels[index], ""

    def _read(self, index: int) -> np.ndarray:
        return self.pixels[index].numpy()

    def path(self, index: int) -> str:
        return self.names[index]

    def describe(self) -> dict:
        return {"kind": "tensor", "count": len(self), "fingerprint": self.fingerprint}


# Twenty photos bundled with scikit-image (no download): objects, a face, animals, scenes,
# microscopy, astronomy, textures and text, so that different channels have something to pick.
SAMPLE_SET_PHOTOS = (
    "chelsea", "astronaut", "coffee", "rocket", "hubble_deep_field", "camera", "coins", "moon",
    "page", "immunohistochemistry", "retina", "brick", "grass", "gravel", "colorwheel", "text",
    "clock", "stereo_motorcycle", "cell", "logo",
)
# Square windows: (side as a fraction of the photo's shorter side, positions per axis).
_SAMPLE_WINDOWS = ((1.0, 2), (0.6, 3), (0.35, 4))


class SampleImages(ImageSet):
    """The built-in demonstration set: square windows cropped from scikit-image's photos.

    Each photo gives windows at three scales (the whole shorter side, 60 % and 35 % of it) on
    a regular grid of positions; duplicates (a square photo's two full windows) are dropped.
    The set is deterministic, so item ids are stable across runs and a scan can resume.

    This is a small demonstration set (531 windows of 20 photos): enough to see a
    scan's figure, far too few to characterise a network's features.

    Args:
        size: the analysis size ``(H, W)``.
        limit: keep only the first ``limit`` windows (they are interleaved over photos and scales).
    """

    def __init__(self, size: tuple[int, int] = (224, 224), resample: int = Image.BILINEAR,
                 limit: int | None = None, photos: Sequence[str] = SAMPLE_SET_PHOTOS):
        self.size = (int(size[0]), int(size[1]))
        self.resample = resample
        self.photo_names = tuple(photos)
        self._photos: dict[str, np.ndarray] | None = None
        windows: list[list[tuple[str, int, int, int]]] = []
        for name in self.photo_names:
            height, width = self._photo(name).shape[:2]
            seen: set[tuple[int, int, int]] = set()
            mine = []
            for fraction, steps in _SAMPLE_WINDOWS:
                side = max(MIN_SIDE, round(min(height, width) * fraction))
                for top in np.linspace(0, height - side, steps).round().astype(int):
                    for left in np.linspace(0, width - side, steps).round().astype(int):
                        key = (int(top), int(left), side)
                        if key not in seen:
                            seen.add(key)
                            mine.append((name, *key))
            windows.append(mine)
        # Interleave photos (window 0 of every photo, then window 1, ...) so a prefix is varied.
        longest = max(len(w) for w in windows)
        self.windows = [w[j] for j in range(longest) for w in windows if j < len(w)]
        if limit is not None:
            self.windows = self.windows[:max(0, int(limit))]
        digest = hashlib.sha1(repr((self.windows, self.size)).encode())
        self.fingerprint = digest.hexdigest()

    def _photo(self, name: str) -> np.ndarray:
        if self._photos is None:
            self._photos = {}
        if name not in self._photos:
            from skimage import data

            loader = getattr(data, name, None)
            if loader is None:
                raise ConvscopeError(f"scikit-image has no sample photo named {name!r}")
            photo = loader()
            if isinstance(photo, tuple):  # stereo pairs come as (left, right, disparity)
                photo = photo[0]
            if photo.dtype == bool:
                photo = photo.astype(np.uint8) * 255
            self._photos[name] = to_rgb8(photo)
        return self._photos[name]

    def __getstate__(self) -> dict:
        # Workers reload the photos themselves rather than receive ~20 MB through a pipe.
        return {**self.__dict__, "_photos": None}

    def __len__(self) -> int:
        return len(self.windows)

    def _read(self, index: int) -> np.ndarray:
        name, top, left, side = self.windows[index]
        return self._photo(name)[top:top + side, left:left + side]

    def path(self, index: int) -> str:
        name, top, left, side = self.windows[index]
        return f"skimage:{name}[{top}:{top + side},{left}:{left + side}]"

    def describe(self) -> dict:
        return {"kind": "samples", "root": "scikit-image data (windows of bundled photos)",
                "count": len(self), "fingerprint": self.fingerprint,
                "note": "small demonstration set: windows of 20 photos, not a representative data set"}
