import numpy as np
import pytest
from PIL import Image

from convscope.errors import ConvscopeError
from convscope.images import load_image


def test_grayscale_rgba_and_16_bit(tmp_path):
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (4, 16, 3) and (out[..., 0] == gray).all()

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest transparent → white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]

    deep = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    out = load_image(tmp_path / "d.png")
    assert out[0, 1].tolist() == [255] * 3 and out[1, 0, 0] == 128


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° when displayed
    image.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").shape == (4, 2, 3)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ConvscopeError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ConvscopeError, match="not an image"):
        load_image(tmp_path / "notes.jpg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvscopeError, match="cannot read"):
        load_image(tmp_path / "cut.jpg")
