"""Atomic file output: nothing is ever left half-written.

Every writer goes through :func:`atomic_path`, which hands out a temporary path in the
target's own folder (so the final ``os.replace`` is a same-filesystem rename) and only
renames it into place when the body finished without error.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["atomic_path", "save_png", "save_json", "save_npz", "ensure_dir"]


def ensure_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = _create_temp(path)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _create_temp(path: Path) -> str:
    """An empty new file beside ``path`` with the permissions a plain ``open()`` would give.

    ``os.open`` with mode 0o666 lets the kernel apply the process umask, so nothing reads or
    changes the umask here (``os.umask`` can only be read by setting it, which races with
    other threads creating files).
    """
    for _ in range(100):
        tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(6)}.part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        # compress_level 1: these are analysis images written by the hundred; zlib level 6
        # costs ~3x the time for ~10% smaller files.
        image.save(tmp, format="PNG", compress_level=1)
    return Path(path)


def save_json(data: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    return Path(path)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
