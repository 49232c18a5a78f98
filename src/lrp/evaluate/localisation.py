"""Localisation against ground-truth masks (channels of the relevance summed first).

- pointing game (Zhang et al. 2018): 1 if a feature of maximal relevance lies in the mask (or within
  ``tolerance`` features of it), else 0; ``nan`` for a constant heatmap, which points nowhere
- relevance mass accuracy (Arras et al. 2022): ``sum_{i in mask} R_i+ / sum_i R_i+`` (positive relevance)
- relevance rank accuracy (Arras et al. 2022): of the ``K = |mask|`` most relevant features, the fraction in
  the mask; ``nan`` for a constant heatmap
"""

from __future__ import annotations

import numpy as np
import torch

from .features import feature_relevance, finite

Tensor = torch.Tensor


def _prepare(relevance, mask) -> tuple[Tensor, Tensor]:
    relevance = finite(relevance).detach()
    mask = torch.as_tensor(mask).to(relevance.device)
    n = relevance.shape[0]
    if relevance.ndim >= 3:
        spatial = tuple(relevance.shape[2:])
        r = feature_relevance(relevance, relevance.shape)
    else:
        spatial, r = tuple(relevance.shape[1:]), relevance
    shapes = [(n, *spatial), (n, 1, *spatial), spatial]
    if tuple(mask.shape) not in shapes:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; for relevance shaped {tuple(relevance.shape)} it "
                         f"must be one of {', '.join(str(s) for s in shapes)} (one value per feature)")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean or hold only 0 and 1")
        mask = mask.bool()
    mask = mask.reshape(-1, *spatial).expand(n, *spatial)
    empty = (~mask.reshape(n, -1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"the mask of sample {empty[0]} is empty ({len(empty)} empty masks in all); every "
                         f"sample needs at least one feature in its mask")
    return r.detach().cpu().double(), mask.cpu()


def pointing_game(relevance: Tensor, mask: Tensor, tolerance: int = 0) -> np.ndarray:
    """1.0 where a maximally relevant feature lies in the mask dilated by ``tolerance``, else 0.0."""
    r, mask = _prepare(relevance, mask)
    if tolerance:
        if mask.ndim - 1 not in (1, 2, 3):
            raise ValueError("tolerance needs 1 to 3 spatial dimensions")
        pool = getattr(torch.nn.functional, f"max_pool{mask.ndim - 1}d")
        mask = pool(mask[:, None].float(), 2 * tolerance + 1, stride=1, padding=tolerance)[:, 0].bool()
    flat = r.reshape(r.shape[0], -1)
    top = flat == flat.max(1, keepdim=True).values
    hit = (top & mask.reshape(r.shape[0], -1)).any(1).double()
    return torch.where(top.all(1), torch.full_like(hit, float("nan")), hit).numpy()


def relevance_mass_accuracy(relevance: Tensor, mask: Tensor) -> np.ndarray:
    """Share of the positive relevance that falls inside the mask; ``nan`` without positive relevance."""
    r, mask = _prepare(relevance, mask)
    positive = r.clamp(min=0).reshape(r.shape[0], -1)
    inside = (positive * mask.reshape(r.shape[0], -1)).sum(1)
    total = positive.sum(1)
    return torch.where(total > 0, inside / total, torch.full_like(total, float("nan"))).cpu().numpy()


def relevance_rank_accuracy(relevance: Tensor, mask: Tensor) -> np.ndarray:
    """Fraction of the ``|mask|`` most relevant features that lie in the mask."""
    r, mask = _prepare(relevance, mask)
    flat, m = r.reshape(r.shape[0], -1), mask.reshape(r.shape[0], -1)
    k = m.sum(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranked = m.gather(1, order)
    in_top = ranked & (torch.arange(flat.shape[1], device=flat.device)[None] < k[:, None])
    accuracy = in_top.sum(1).double() / k
    constant = (flat == flat[:, :1]).all(1)  # no ranking to speak of
    return torch.where(constant, torch.full_like(accuracy, float("nan")), accuracy).numpy()
