import numpy as np
import pytest

from convscope import render


def _slow_grid(tiles: np.ndarray, cols: int, sep: int) -> np.ndarray:
    """Reference: place each tile with explicit loops."""
    n, h, w, c = tiles.shape
    rows = -(-n // cols)
    out = np.zeros((rows * (h + sep) + sep, cols * (w + sep) + sep, c), tiles.dtype)
    out[...] = render.SEPARATOR_COLOR
    for i in range(rows * cols):
        r, q = divmod(i, cols)
        top, left = r * (h + sep) + sep, q * (w + sep) + sep
        out[top:top + h, left:left + w] = tiles[i] if i < n else render.BACKGROUND
    return out


@pytest.mark.parametrize("n, cols, sep", [(64, 16, 1), (13, 4, 2), (5, 8, 1), (1, 16, 0)])
def test_tile_places_every_channel_exactly(n, cols, sep):
    rng = np.random.default_rng(n)
    tiles = rng.integers(0, 255, size=(n, 7, 5, 3), dtype=np.uint8)
    expected = _slow_grid(tiles, min(cols, n), sep)
    np.testing.assert_array_equal(render.tile(tiles, cols, sep), expected)


def test_channel_grid_scales_each_channel_and_says_so():
    maps = np.stack([np.full((4, 4), 1.0), np.arange(16.0).reshape(4, 4) * 100])
    scaled, lows, highs = render.normalize_channels(maps)
    assert scaled[1].min() == 0 and scaled[1].max() == 1
    assert (scaled[0] == 0).all()  # a flat channel stays at the bottom of the scale
    np.testing.assert_array_equal(highs, [1.0, 1500.0])
    image = render.channel_grid(maps, cols=2, title="t")
    # tiles at native resolution (2 x 4 px + separators); the strip above may be wider, so that its text is whole
    body = np.asarray(image.convert("RGB"))[-(4 + 2):]
    assert (body[:, 2 * 5 + 1:] == render.BACKGROUND).all() and not (body[:, :2 * 5 + 1] == render.BACKGROUND).all()


def test_layer_scale_has_a_colour_bar():
    maps = np.random.default_rng(0).random((8, 120, 120))  # wider than the caption, so the grid sets the width
    per_channel = render.channel_grid(maps, cols=4, scale="channel")
    shared = render.channel_grid(maps, cols=4, scale="layer")
    assert shared.width > per_channel.width


def test_colorize_uses_the_colormap_ends():
    rgb = render.colorize(np.array([0.0, 1.0]), "gray")
    np.testing.assert_array_equal(rgb, [[0, 0, 0], [255, 255, 255]])


def test_signed_to_gray_is_gray_at_zero_and_symmetric():
    out = render.signed_to_gray(np.array([-2.0, 0.0, 1.0]))
    assert out.tolist() == [0, 128, 191]


def test_a_narrow_grid_keeps_its_whole_title():
    title = "tiny.layer · resnet18 [RANDOM INIT seed 0 - not trained]"
    grid = render.channel_grid(np.random.default_rng(0).random((2, 4, 4)).astype(np.float32), title=title)
    assert grid.width >= render.font(14).getlength(title)
