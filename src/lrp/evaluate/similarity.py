"""Similarity of two heatmaps per sample (relevance shaped like the input; channels summed first).

- ``spearman``: Pearson correlation of the ranks (ties get their average rank); 1 = same ordering
- ``ssim``: structural similarity (Wang et al. 2004) of 2-D heatmaps (at least 3x3), 7x7 uniform windows, ``K1=0.01``,
  ``K2=0.03``, data range ``max(a, b) - min(a, b)``, averaged over the windows that fit
- ``relative_l2``: ``||b - a|| / ||a||``; 0 = identical
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .features import feature_relevance

Tensor = torch.Tensor


def _features(a) -> Tensor:
    a = torch.as_tensor(a).detach()
    return feature_relevance(a, a.shape).cpu().double()


def _pair(a, b) -> tuple[Tensor, Tensor]:
    """Both heatmaps' features in float64 on the CPU, wherever each was computed (one may be on a GPU, the other
    on the CPU): the metrics are small reductions, and NumPy takes their results."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"heatmaps to compare must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    return _features(a), _features(b)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 along the last axis; tied values share their average rank."""
    values = np.asarray(values)
    out = np.empty(values.shape, dtype=np.float64)
    for row, target in zip(values.reshape(-1, values.shape[-1]), out.reshape(-1, values.shape[-1])):
        order = np.argsort(row, kind="stable")
        ordered = row[order]
        new = np.r_[True, ordered[1:] != ordered[:-1]]
        starts = np.flatnonzero(new)
        ends = np.r_[starts[1:], len(row)]
        target[order] = ((starts + ends - 1) / 2.0)[np.cumsum(new) - 1]
    return out


def spearman(a: Tensor, b: Tensor) -> np.ndarray:
    """Spearman rank correlation per sample; ``nan`` where a heatmap is constant."""
    a, b = _pair(a, b)
    ra = average_ranks(a.reshape(a.shape[0], -1).cpu().numpy())
    rb = average_ranks(b.reshape(b.shape[0], -1).cpu().numpy())
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denom = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(1) / denom, np.nan)


def ssim(a: Tensor, b: Tensor, window: int = 7) -> np.ndarray:
    """Structural similarity per sample of 2-D heatmaps (inputs ``(N, C, H, W)``)."""
    a, b = _pair(a, b)
    if a.ndim != 3:
        raise ValueError(f"ssim compares 2-D heatmaps (inputs shaped (N, C, H, W)); these have "
                         f"{a.ndim - 1} feature dimension(s)")
    win = min(window, a.shape[1], a.shape[2])
    win -= 1 - win % 2  # odd
    if win < 3:
        raise ValueError(f"ssim needs heatmaps of at least 3x3 features; these are {a.shape[1]}x{a.shape[2]}")
    flat = torch.stack([a, b]).reshape(2, a.shape[0], -1)
    data_range = flat.max(2).values.max(0).values - flat.min(2).values.min(0).values
    c1 = ((0.01 * data_range) ** 2).view(-1, 1, 1, 1)
    c2 = ((0.03 * data_range) ** 2).view(-1, 1, 1, 1)
    a, b = a[:, None], b[:, None]
    mean = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731
    mu_a, mu_b = mean(a), mean(b)
    norm = win * win / (win * win - 1)  # sample covariance
    var_a = norm * (mean(a * a) - mu_a ** 2)
    var_b = norm * (mean(b * b) - mu_b ** 2)
    cov = norm * (mean(a * b) - mu_a * mu_b)
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    same = (data_range == 0)  # two equal constant heatmaps
    return torch.where(same, torch.ones_like(data_range), s.mean((1, 2, 3))).cpu().numpy()


def relative_l2(a: Tensor, b: Tensor) -> np.ndarray:
    """``||b - a|| / ||a||`` per sample (``a`` is the reference)."""
    a, b = _pair(a, b)
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((b - a).norm(dim=1) / a.norm(dim=1)).cpu().numpy()


SIMILARITIES = {"spearman": spearman, "ssim": ssim, "relative_l2": relative_l2}
