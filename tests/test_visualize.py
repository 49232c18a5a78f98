"""Heatmaps: colour conventions and shapes."""

import numpy as np
import pytest
import torch
from PIL import Image

import lrp
from lrp.visualize import channel_grid, colorize, heatmap, is_multiband, overlay


def test_diverging_colours_positive_red_negative_blue_zero_white():
    rgb = colorize(np.array([-1.0, 0.0, 1.0]), "bwr")
    assert rgb.tolist() == [[0, 0, 255], [255, 255, 255], [255, 0, 0]]


def test_heatmap_is_symmetric_and_sums_channels():
    r = torch.zeros(3, 4, 5)
    r[:, 0, 0] = 1.0   # summed over channels: +3
    r[0, 1, 1] = -3.0  # -3: same magnitude, opposite colour
    img = np.asarray(heatmap(r))
    assert img.shape == (4, 5, 3)
    assert img[0, 0].tolist() == [255, 0, 0] and img[1, 1].tolist() == [0, 0, 255]
    assert img[2, 2].tolist() == [255, 255, 255]


def test_heatmap_resize_rgb_and_errors():
    r = torch.randn(1, 3, 8, 8)
    assert heatmap(r, size=(32, 32)).size == (32, 32)
    assert np.asarray(heatmap(r, channels="rgb")).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="unknown colour map"):
        heatmap(r, cmap="nope")
    with pytest.raises(ValueError, match="not an image"):
        heatmap(torch.randn(2, 2, 3, 8, 8))


def test_overlay_keeps_image_where_relevance_is_zero():
    image = torch.rand(1, 8, 8)
    r = torch.zeros(1, 8, 8)
    r[0, 0, 0] = 1.0
    gray = np.round(((image[0] - image.min()) / (image.max() - image.min())).numpy() * 255)
    # the plain blend of earlier versions: exactly the grayscale image where relevance is zero
    out = np.asarray(overlay(image, r, alpha=0.6, gamma=1, stretch=None, base_range=None)).astype(int)
    assert abs(out[3, 3, 0] - gray[3, 3]) <= 1
    assert out[0, 0, 0] > out[0, 0, 2]  # red over the relevant pixel
    # default: the image, lightened (an increasing map of its gray values into a light range), stays gray
    out = np.asarray(overlay(image, r)).astype(int)
    rest = np.ones((8, 8), bool)
    rest[0, 0] = False
    assert (out[rest, 0] == out[rest, 1]).all() and (out[rest, 1] == out[rest, 2]).all()
    order = np.argsort(image[0].numpy()[rest], kind="stable")
    assert (np.diff(out[rest, 0][order]) >= 0).all()
    assert out[rest, 0].min() >= 0.25 * 255 and out[rest, 0].max() > out[rest, 0].min() + 100
    assert out[0, 0, 0] - out[0, 0, 1] >= 120  # clearly red


def _blob_picture(background: float, blob: float, size: int = 64) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    picture = Image.fromarray(np.round(np.where(inside, blob, background) * 255).astype(np.uint8))
    # smooth relevance on part of the picture: a positive bump on the blob's right, a weaker negative one
    # on its lower left, nothing elsewhere
    bump = lambda cy, cx, s: np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))  # noqa: E731
    relevance = bump(28, 44, 5) - 0.7 * bump(44, 20, 5)
    relevance[np.abs(relevance) < 1e-3] = 0.0
    return picture, inside, relevance


@pytest.mark.parametrize("background, blob", [(0.0, 0.1), (0.02, 0.08), (0.97, 0.3)])
def test_overlay_is_visible_on_dark_and_light_pictures(background, blob):
    """Issue 11: over a dark picture (an MRI scan: black, a dim brain) the heatmap used to vanish."""
    picture, inside, relevance = _blob_picture(background, blob)
    out = np.asarray(overlay(picture, torch.tensor(relevance)[None])).astype(int)
    r = relevance / np.abs(relevance).max()
    top = r >= 0.5  # the most relevant pixels, down to half the peak
    assert top.sum() > 20
    assert (out[top, 0] - out[top, 1]).min() >= 80  # clearly red
    negative = r <= -0.5
    assert (out[negative, 2] - out[negative, 0]).min() >= 60  # clearly blue
    rest = r == 0  # the least relevant pixels show the picture's structure, lightened
    shade = out[..., 0]
    blob_shade, background_shade = shade[rest & inside].mean(), shade[rest & ~inside].mean()
    assert abs(blob_shade - background_shade) >= 100
    assert (blob_shade > background_shade) == (blob > background)
    assert shade[rest].min() >= 60  # nothing stays black, so colours show everywhere


def test_overlay_checks_its_options():
    with pytest.raises(ValueError, match="alpha"):
        overlay(torch.rand(1, 4, 4), torch.rand(1, 4, 4), alpha=2.0)
    with pytest.raises(ValueError, match="gamma"):
        overlay(torch.rand(1, 4, 4), torch.rand(1, 4, 4), gamma=0)
    with pytest.raises(ValueError, match="differ in size"):
        overlay(torch.rand(1, 4, 4), torch.rand(1, 5, 4))
    flat = np.asarray(overlay(torch.full((1, 4, 4), 0.5), torch.zeros(1, 4, 4)))  # constant picture, no relevance
    assert len(np.unique(flat)) == 1


def _bands(n: int = 30, size: int = 25) -> np.ndarray:
    """Band k is k + 1 at one pixel, -(k + 1) / 2 at another: each band's tile is recognisable."""
    r = np.zeros((n, size, size))
    for k in range(n):
        r[k, 3, 5] = k + 1.0
        r[k, 20, 10] = -(k + 1.0) / 2
    return r


def _check_tiles(grid: Image.Image, r: np.ndarray, columns: int, scale: int) -> None:
    bands, h, w = r.shape
    tiles = grid.info["tiles"]
    assert len(tiles) == bands
    assert all(right - left == w * scale and bottom - top == h * scale for left, top, right, bottom in tiles)
    lefts = sorted({t[0] for t in tiles})
    tops = sorted({t[1] for t in tiles})
    assert len(lefts) == columns and len(tops) == int(np.ceil(bands / columns))
    for k, (left, top, right, bottom) in enumerate(tiles):  # row by row, in band order
        assert (left, top) == (lefts[k % columns], tops[k // columns])
    assert all(right <= grid.width and bottom <= grid.height for _, _, right, bottom in tiles)
    vmax = np.abs(r).max()
    assert grid.info["vmax"] == pytest.approx(vmax)
    image = np.asarray(grid)
    for k, (left, top, right, bottom) in enumerate(tiles):
        expected = colorize(np.clip(r[k] / vmax, -1, 1), "bwr").repeat(scale, 0).repeat(scale, 1)
        assert (image[top:bottom, left:right] == expected).all()


def test_channel_grid_one_labelled_tile_per_band():
    r = _bands()
    grid = channel_grid(r)
    _check_tiles(grid, r, columns=6, scale=4)  # 30 bands: 6 columns, 5 rows
    _check_tiles(channel_grid(torch.tensor(r), columns=10, scale=2), r, columns=10, scale=2)
    assert len(channel_grid(r[:7]).info["tiles"]) == 7


def test_channel_grid_cube_sums_channels_one_tile_per_band():
    r = _bands()
    _check_tiles(channel_grid(r[None]), r, columns=6, scale=4)  # (1, D, H, W) of a Conv3d model
    _check_tiles(channel_grid(torch.tensor(r)[None, None]), r, columns=6, scale=4)  # with a batch axis of 1
    cube = np.stack([0.25 * r, 0.75 * r])  # (C, D, H, W): summed over C
    _check_tiles(channel_grid(cube), r, columns=6, scale=4)
    # the caller says which axis holds the bands: here C, summed over D
    per_channel = channel_grid(cube, axis=0)
    _check_tiles(per_channel, cube.sum(1), columns=2, scale=4)
    with pytest.raises(ValueError, match="axis"):
        channel_grid(r, axis=-1)
    with pytest.raises(ValueError, match="axis"):
        channel_grid(r, axis=1)
    with pytest.raises(ValueError, match="batch axis"):
        channel_grid(torch.tensor(r)[None, None], axis=0)
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(C, D, H, W\)"):
        channel_grid(r[0])


def test_channel_grid_labels_are_drawn_above_each_tile():
    r = _bands()
    labelled, plain = channel_grid(r), channel_grid(r, labels=False)
    image, bare = np.asarray(labelled).astype(int), np.asarray(plain).astype(int)
    label_area = lambda img, box: img[box[1] - 12:box[1] - 1, box[0]:box[2]]  # noqa: E731
    strips = [label_area(image, box) for box in labelled.info["tiles"]]
    for k, strip in enumerate(strips):
        assert strip.shape[0] == 11
        assert (strip.sum(-1) < 3 * 128).sum() >= 10, f"no dark text above tile {k}"
        assert (strip == 255).mean() > 0.5  # dark text on white, readable
    assert all(not np.array_equal(strips[k], strips[k + 1]) for k in range(len(strips) - 1))
    # without labels the tiles sit where the labels were: that area now holds tile colours, not text
    first = labelled.info["tiles"][0]
    assert plain.info["tiles"][0][1] < first[1]
    assert not np.array_equal(label_area(image, first), bare[first[1] - 12:first[1] - 1, first[0]:first[2]])
    assert plain.height < labelled.height
    # own labels, e.g. wavelengths; cells widen to fit them
    named = channel_grid(r[:4], labels=["450 nm", "550 nm", "650 nm", "750 nm"], scale=1)
    lefts = [box[0] for box in named.info["tiles"]]
    assert lefts[1] - lefts[0] > 25 + 2
    with pytest.raises(ValueError, match="one label per band"):
        channel_grid(r, labels=["a", "b"])


def test_channel_grid_shares_one_symmetric_scale_and_shows_it():
    r = np.zeros((2, 5, 5))
    r[0, 2, 2], r[1, 2, 2] = 2.0, 1.0  # band 1: half of band 0
    r[0, 0, 0] = -2.0
    grid = channel_grid(r, colorbar=True)
    image = np.asarray(grid).astype(int)
    (l0, t0, _, _), (l1, t1, _, _) = grid.info["tiles"]
    full, half = image[t0 + 2 * 4 + 1, l0 + 2 * 4 + 1], image[t1 + 2 * 4 + 1, l1 + 2 * 4 + 1]
    assert full.tolist() == [255, 0, 0]
    assert half[0] == 255 and half[1] > full[1] + 100  # paler: the same scale
    assert image[t0 + 1, l0 + 1].tolist() == [0, 0, 255]  # symmetric: -2 is full blue
    assert grid.info["vmax"] == 2.0
    # the colour bar under the tiles runs from blue through white to red
    below = max(box[3] for box in grid.info["tiles"])
    bar = image[below + 1:]
    assert (bar[..., 2] - bar[..., 0] > 200).any() and (bar[..., 0] - bar[..., 2] > 200).any()
    assert channel_grid(r, colorbar=False).height < grid.height
    assert channel_grid(r, vmax=4.0).info["vmax"] == 4.0


@pytest.mark.parametrize("shape, expected", [
    ((30, 25, 25), True), ((4, 8, 8), True), ((3, 224, 224), False), ((1, 28, 28), False), ((28, 28), False),
    ((1, 30, 25, 25), True), ((2, 30, 25, 25), True), ((1, 1, 30, 25, 25), True), ((1, 1, 25, 25), False),
    ((10,), False),
])
def test_is_multiband(shape, expected):
    assert is_multiband(shape) is expected
    assert is_multiband(torch.Size(shape)) is expected
    assert is_multiband(np.zeros(shape)) is expected

