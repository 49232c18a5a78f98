"""Heatmaps: colour conventions and shapes."""

import numpy as np
import pytest
import torch

import lrp
from lrp.visualize import colorize, heatmap, overlay


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
    out = np.asarray(overlay(image, r)).astype(int)
    gray = np.round(((image[0] - image.min()) / (image.max() - image.min())).numpy() * 255)
    assert abs(out[3, 3, 0] - gray[3, 3]) <= 1
    assert out[0, 0, 0] > out[0, 0, 2]  # red over the relevant pixel
