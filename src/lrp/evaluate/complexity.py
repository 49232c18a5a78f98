"""Complexity of a heatmap, from the magnitudes ``|R_i|`` of its features.

Relevance is shaped like the input, ``(N, C, *spatial)`` (channels summed first) or ``(N, F)``.

- sparseness (Gini index; Chalasani et al. 2020): ``sum_i (2i - n - 1) a_(i) / (n sum_i a_i)`` with ``a``
  sorted ascending; 0 for a constant heatmap, near 1 when one feature holds everything.
- entropy (Bhatt et al. 2020): ``-sum_i p_i log p_i`` with ``p_i = |R_i| / sum_j |R_j|``; ``log n`` for a
  constant heatmap, 0 when one feature holds everything.
"""

from __future__ import annotations

import numpy as np
import torch

from .features import feature_relevance

Tensor = torch.Tensor


def _magnitudes(relevance) -> np.ndarray:
    relevance = torch.as_tensor(relevance)
    r = feature_relevance(relevance, relevance.shape)
    return r.detach().abs().double().reshape(r.shape[0], -1).cpu().numpy()


def sparseness(relevance: Tensor) -> np.ndarray:
    """Gini index of ``|R|`` per sample; ``nan`` for an all-zero heatmap."""
    a = np.sort(_magnitudes(relevance), axis=1)
    n = a.shape[1]
    weights = 2 * np.arange(1, n + 1) - n - 1
    total = a.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weights * a).sum(1) / (n * total), np.nan)


def entropy(relevance: Tensor) -> np.ndarray:
    """Shannon entropy (nats) of ``|R|`` normalised to sum 1, per sample; ``nan`` for an all-zero heatmap."""
    a = _magnitudes(relevance)
    total = a.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = a / total
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        return np.where(total[:, 0] > 0, -terms.sum(1), np.nan)
