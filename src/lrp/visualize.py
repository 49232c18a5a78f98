"""Heatmaps: relevance as pictures (Pillow and NumPy; no plotting library needed).

Colour maps are symmetric around zero: with ``bwr`` positive relevance is red, negative blue and zero white.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

ArrayLike = Union[np.ndarray, torch.Tensor]

# anchor colours from the most negative (-1) to the most positive (+1) value, evenly spaced
COLORMAPS: dict[str, list[tuple[int, int, int]]] = {
    "bwr": [(0, 0, 255), (255, 255, 255), (255, 0, 0)],
    "seismic": [(0, 0, 77), (0, 0, 255), (255, 255, 255), (255, 0, 0), (128, 0, 0)],
    "coldnhot": [(0, 255, 255), (0, 0, 255), (0, 0, 0), (255, 0, 0), (255, 255, 0)],
    "gray": [(0, 0, 0), (128, 128, 128), (255, 255, 255)],
    "wred": [(255, 255, 255), (255, 255, 255), (255, 0, 0)],  # only positive relevance, on white
}


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def relevance_map(relevance: ArrayLike, channels: str = "sum") -> np.ndarray:
    """Reduce relevance to a 2D map: a single sample ``(C, H, W)``/``(1, C, H, W)`` is summed over channels
    (``channels="sum"``) or kept per colour channel (``channels="rgb"``, returns ``(H, W, C)``)."""
    r = _to_numpy(relevance)
    while r.ndim > 3 and r.shape[0] == 1:
        r = r[0]
    if r.ndim == 2:
        return r
    if r.ndim != 3:
        raise ValueError(f"relevance of shape {r.shape} is not an image; expected (H, W), (C, H, W) or (1, C, H, W)")
    if channels == "sum":
        return r.sum(0)
    if channels == "rgb":
        return np.moveaxis(r, 0, -1)
    raise ValueError(f"channels must be 'sum' or 'rgb', got {channels!r}")


def _scale(r: np.ndarray, vmax: Optional[float], percentile: float) -> np.ndarray:
    if vmax is None:
        magnitude = np.abs(r)
        vmax = float(np.percentile(magnitude, percentile)) if percentile < 100 else float(magnitude.max())
    if vmax <= 0 or not np.isfinite(vmax):
        return np.zeros_like(r)
    return np.clip(r / vmax, -1.0, 1.0)


def colorize(values: np.ndarray, cmap: str = "bwr") -> np.ndarray:
    """Map values in [-1, 1] to RGB uint8 with a named colour map."""
    if cmap not in COLORMAPS:
        raise ValueError(f"unknown colour map {cmap!r}; choose one of {', '.join(COLORMAPS)}")
    anchors = np.asarray(COLORMAPS[cmap], dtype=np.float64)
    positions = np.linspace(-1.0, 1.0, len(anchors))
    rgb = np.stack([np.interp(values, positions, anchors[:, k]) for k in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def heatmap(relevance: ArrayLike, cmap: str = "bwr", *, vmax: Optional[float] = None, percentile: float = 100.0,
            channels: str = "sum", size: Optional[tuple[int, int]] = None) -> Image.Image:
    """Relevance as an RGB image, scaled symmetrically so that ``+-vmax`` (default: the largest magnitude, or
    its ``percentile``) saturate the colour map. ``channels="rgb"`` shows each colour channel's relevance as
    that channel's intensity (positive only, on black). ``size`` resizes (width, height) with nearest pixels."""
    r = relevance_map(relevance, channels)
    if channels == "rgb":
        scaled = _scale(r, vmax, percentile)
        image = Image.fromarray(np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8))
    else:
        image = Image.fromarray(colorize(_scale(r, vmax, percentile), cmap))
    return image.resize(size, Image.NEAREST) if size else image


def _image_array(image: Union[Image.Image, ArrayLike]) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    a = _to_numpy(image)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def overlay(image: Union[Image.Image, ArrayLike], relevance: ArrayLike, cmap: str = "bwr", *,
            alpha: float = 0.6, vmax: Optional[float] = None, percentile: float = 100.0) -> Image.Image:
    """The heatmap blended over a grayscale version of ``image``; the heatmap's weight grows with |relevance|."""
    base = _image_array(image).mean(-1, keepdims=True)
    r = _scale(relevance_map(relevance), vmax, percentile)
    if r.shape != base.shape[:2]:
        raise ValueError(f"relevance map {r.shape} and image {base.shape[:2]} differ in size")
    colour = colorize(r, cmap).astype(np.float64) / 255.0
    weight = alpha * np.abs(r)[..., None]
    blended = (1 - weight) * base + weight * colour
    return Image.fromarray(np.round(blended * 255).astype(np.uint8))


def token_html(tokens: list[str], relevance: ArrayLike, cmap: str = "bwr", *, vmax: Optional[float] = None) -> str:
    """Tokens as HTML spans coloured by their relevance (red for, blue against), with the value on hover."""
    import html as _html

    r = _to_numpy(relevance).reshape(-1)
    if len(tokens) != len(r):
        raise ValueError(f"{len(tokens)} tokens but {len(r)} relevance values; give one value per token")
    colours = colorize(_scale(r, vmax, 100.0), cmap)
    spans = [
        f'<span title="{value:+.4g}" style="background-color: rgb({c[0]}, {c[1]}, {c[2]}); padding: 0 2px; '
        f'border-radius: 3px">{_html.escape(token)}</span>'
        for token, value, c in zip(tokens, r.tolist(), colours.tolist())
    ]
    return '<div style="line-height: 1.8; font-family: sans-serif">' + " ".join(spans) + "</div>"


def channel_grid(relevance: ArrayLike, cmap: str = "bwr", *, columns: Optional[int] = None, scale: int = 4,
                 vmax: Optional[float] = None, gap: int = 2) -> Image.Image:
    """One heatmap per channel (e.g. per spectral band) of a ``(C, H, W)`` relevance, on one shared colour
    scale so that bands can be compared; laid out in a grid, each map enlarged ``scale`` times."""
    r = _to_numpy(relevance)
    while r.ndim > 3 and r.shape[0] == 1:
        r = r[0]
    if r.ndim != 3:
        raise ValueError(f"channel_grid needs relevance shaped (C, H, W); got {r.shape}")
    c, h, w = r.shape
    columns = columns or int(np.ceil(np.sqrt(c)))
    rows = int(np.ceil(c / columns))
    scaled = _scale(r, vmax, 100.0)  # shared scale across channels
    grid = Image.new("RGB", (columns * (w * scale + gap) - gap, rows * (h * scale + gap) - gap), "white")
    for k in range(c):
        tile = Image.fromarray(colorize(scaled[k], cmap)).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, ((k % columns) * (w * scale + gap), (k // columns) * (h * scale + gap)))
    return grid
