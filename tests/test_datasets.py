"""Image sets: folder listing, the skip-and-report collate, the sample set, the cover resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import convscope
from convscope.datasets import (
    MIN_SIDE,
    FolderImages,
    SampleImages,
    TensorImages,
    collate_images,
    fit_cover,
)
from convscope.methods.scan import scan


def _photo(seed: int, size=(40, 60)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture
def messy_folder(tmp_path):
    """Five good images in several formats and folders, and five bad files."""
    root = tmp_path / "data"
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir()
    (root / ".hidden").mkdir()
    Image.fromarray(_photo(0)).save(root / "cats" / "a.png")
    Image.fromarray(_photo(1)).save(root / "cats" / "deep" / "b.JPG", quality=90)
    Image.fromarray(_photo(2)).save(root / "dogs" / "c.webp")
    Image.fromarray(_photo(3)).save(root / "dogs" / "d.bmp")
    Image.fromarray(_photo(4)[..., 0]).save(root / "e.tiff")                    # grayscale
    good = ["cats/a.png", "cats/deep/b.JPG", "dogs/c.webp", "dogs/d.bmp", "e.tiff"]
    jpeg = root / "dogs" / "corrupt.jpg"                                         # truncated JPEG
    Image.fromarray(_photo(5, (64, 64))).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    (root / "empty.png").write_bytes(b"")                                       # empty
    (root / "notes.jpg").write_text("this is not an image\n")                   # non-image
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(root / "pixel.png")     # 1 pixel
    Image.fromarray(_photo(6, (4, 90))).save(root / "sliver.png")               # too thin
    (root / "readme.txt").write_text("ignored: not an image extension")
    Image.fromarray(_photo(7)).save(root / ".hidden" / "x.png")                 # hidden: ignored
    bad = ["dogs/corrupt.jpg", "empty.png", "notes.jpg", "pixel.png", "sliver.png"]
    return root, good, bad


def _tiny_model() -> convscope.LoadedModel:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU())
    return convscope.as_loaded(net)


def test_folder_lists_images_recursively_in_sorted_order(messy_folder):
    root, good, bad = messy_folder
    images = FolderImages(root, size=(32, 32))
    assert sorted(images.files) == sorted(good + bad)
    # depth first, names sorted, files of a folder before its sub-folders; hidden and .txt left out
    assert images.files == ["e.tiff", "empty.png", "notes.jpg", "pixel.png", "sliver.png", "cats/a.png",
                            "cats/deep/b.JPG", "dogs/c.webp", "dogs/corrupt.jpg", "dogs/d.bmp"]
    again = FolderImages(root, size=(32, 32))
    assert again.files == images.files and again.fingerprint == images.fingerprint
    (root / "new.png").write_bytes((root / "cats" / "a.png").read_bytes())
    assert FolderImages(root, size=(32, 32)).fingerprint != images.fingerprint


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_reported_and_the_scan_finishes(messy_folder, workers):
    root, good, bad = messy_folder
    images = FolderImages(root, size=(32, 32))
    loaded = _tiny_model()
    result = scan(loaded, images, "1,4", top=3, batch_size=4, workers=workers, progress=False)
    assert result.images_scanned == len(good)
    skipped = {images.path(i): reason for i, reason in result.skipped}
    assert sorted(skipped) == sorted(bad)
    assert "too small" in skipped["pixel.png"] and "too small" in skipped["sliver.png"]
    assert "not an image" in skipped["notes.jpg"] and "not an image" in skipped["empty.png"]
    assert skipped["dogs/corrupt.jpg"]
    good_ids = {images.files.index(p) for p in good}
    for name in ("1", "4"):
        assert set(result.topk.images[name].flatten().tolist()) <= good_ids


def test_collate_stacks_good_items_and_lists_bad_ones():
    a, b = torch.zeros(8, 8, 3, dtype=torch.uint8), torch.ones(8, 8, 3, dtype=torch.uint8)
    pixels, ids, skipped = collate_images([(3, a, ""), (4, None, "corrupt"), (5, b, "")])
    assert pixels.shape == (2, 8, 8, 3) and ids.tolist() == [3, 5] and skipped == [(4, "corrupt")]
    pixels, ids, skipped = collate_images([(0, None, "empty"), (1, None, "bad")])
    assert pixels.shape[0] == 0 and ids.numel() == 0 and len(skipped) == 2


def test_every_image_comes_out_at_the_analysis_size(messy_folder):
    root, good, _ = messy_folder
    images = FolderImages(root, size=(48, 40))
    for path in good:
        i, pixels, reason = images[images.files.index(path)]
        assert reason == "" and pixels.shape == (48, 40, 3) and pixels.dtype == torch.uint8
    # load() gives exactly the item the scan saw (the render step relies on it)
    i = images.files.index("cats/a.png")
    assert np.array_equal(images.load(i), images[i][1].numpy())


def test_fit_cover_keeps_aspect_and_centres():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 100:200] = 255                          # a white middle third
    out = fit_cover(image, (50, 50))
    assert out.shape == (50, 50, 3)
    assert out[:, 2:-2].min() >= 250                 # the centre crop is white (edges blur in the resize)
    assert np.array_equal(fit_cover(image, (100, 300)), image)


def test_folder_errors_are_user_errors(tmp_path):
    with pytest.raises(convscope.ConvscopeError, match="not found"):
        FolderImages(tmp_path / "missing")
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(convscope.ConvscopeError, match="no image files"):
        FolderImages(tmp_path)
    with pytest.raises(convscope.ConvscopeError, match="got a file"):
        FolderImages(tmp_path / "only.txt")


def test_sample_set_is_offline_deterministic_and_varied():
    images = SampleImages((64, 64), limit=None)
    assert 400 < len(images) < 700
    again = SampleImages((64, 64))
    assert images.windows == again.windows and images.fingerprint == again.fingerprint
    paths = [images.path(i) for i in range(len(images))]
    assert len(set(paths)) == len(paths) and all(p.startswith("skimage:") for p in paths)
    # a prefix already mixes photos
    first = {images.path(i).split("[")[0] for i in range(20)}
    assert len(first) == 20
    i, pixels, reason = images[0]
    assert reason == "" and pixels.shape == (64, 64, 3) and pixels.dtype == torch.uint8
    assert "demonstration" in images.describe()["note"]
    assert len(SampleImages((64, 64), limit=10)) == 10
    assert MIN_SIDE > 1


def test_tensor_images_round_trip():
    pixels = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    images = TensorImages(pixels)
    assert len(images) == 5 and images.size == (16, 16)
    assert torch.equal(images[2][1], pixels[2]) and np.array_equal(images.load(2), pixels[2].numpy())
    with pytest.raises(convscope.ConvscopeError):
        TensorImages(torch.zeros(5, 16, 16))
