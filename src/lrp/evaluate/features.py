"""Features and regions of an input batch: what a metric ranks, removes or compares.

An input ``(N, C, *spatial)`` has one feature per spatial position (its channels are ranked and removed
together, their relevance summed); a 2-D input ``(N, F)`` has ``F`` features. Regions are non-overlapping
patches of features.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

import torch

Tensor = torch.Tensor
PatchSpec = Union[int, tuple]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def finite(relevance: Any) -> Tensor:
    """``relevance`` as a tensor; ``ValueError`` where it holds NaN or infinity, which would be ranked, compared
    and scored as if they were numbers (NaN as the lowest or as no relevance at all)."""
    relevance = torch.as_tensor(relevance)
    if relevance.is_floating_point() and not bool(relevance.isfinite().all()):
        bad = int((~relevance.isfinite()).sum())
        raise ValueError(f"the relevance holds {bad} values that are not finite (NaN or infinity): an explanation "
                         f"of a model that overflowed cannot be scored; leave those samples out")
    return relevance


def feature_relevance(relevance: Tensor, x_shape: Sequence[int]) -> Tensor:
    """Relevance per feature, ``(N, *spatial)`` (channels summed), for inputs shaped ``x_shape``."""
    relevance = finite(relevance)
    n = x_shape[0]
    if len(x_shape) < 2:
        raise ValueError(f"inputs must be a batch (N, features) or (N, C, ...); got shape {tuple(x_shape)}")
    if len(x_shape) == 2:
        if tuple(relevance.shape) != tuple(x_shape):
            raise ValueError(f"relevance has shape {tuple(relevance.shape)}; expected the input's {tuple(x_shape)}")
        return relevance
    spatial = tuple(x_shape[2:])
    if tuple(relevance.shape) == (n, *spatial):
        return relevance
    if relevance.ndim == len(x_shape) and relevance.shape[0] == n and tuple(relevance.shape[2:]) == spatial \
            and relevance.shape[1] in (1, x_shape[1]):
        return relevance.sum(1)
    raise ValueError(f"relevance has shape {tuple(relevance.shape)}; expected the input's {tuple(x_shape)}, one "
                     f"channel {(n, 1, *spatial)}, or {(n, *spatial)}")


class Regions:
    """Non-overlapping patches over the features of inputs shaped like ``x``."""

    def __init__(self, x: Tensor, patch: PatchSpec = 1) -> None:
        if x.ndim < 2:
            raise ValueError(f"inputs must be a batch (N, features) or (N, C, ...); got shape {tuple(x.shape)}")
        self.batch = x.shape[0]
        self.has_channels = x.ndim >= 3
        self.channels = x.shape[1] if self.has_channels else 1
        self.spatial = tuple(x.shape[2:] if self.has_channels else x.shape[1:])
        patch = (patch,) * len(self.spatial) if isinstance(patch, int) else tuple(patch)
        if len(patch) != len(self.spatial) or any(not isinstance(p, int) or p < 1 for p in patch):
            raise ValueError(f"patch must be a positive int or {len(self.spatial)} positive ints (one per spatial "
                             f"dimension of {self.spatial}); got {patch}")
        bad = [(s, p) for s, p in zip(self.spatial, patch) if s % p]
        if bad:
            s, p = bad[0]
            raise ValueError(f"patch {patch} does not divide the input's spatial size {self.spatial}: {s} is not a "
                             f"multiple of {p}; patch sizes that divide {s}: {_divisors(s)}")
        self.patch = patch
        self.grid = tuple(s // p for s, p in zip(self.spatial, patch))
        self.count = math.prod(self.grid)
        self.size = math.prod(patch)

    def scores(self, relevance: Tensor) -> Tensor:
        """Relevance summed per region: ``(N, count)``."""
        r = feature_relevance(relevance, (self.batch, self.channels, *self.spatial) if self.has_channels
                              else (self.batch, *self.spatial))
        shape = [r.shape[0]]
        for g, p in zip(self.grid, self.patch):
            shape += [g, p]
        r = r.reshape(shape)
        return r.sum(dim=tuple(range(2, len(shape), 2))).reshape(r.shape[0], self.count)

    def expand(self, values: Tensor) -> Tensor:
        """Region values ``(B, count)`` spread to features: ``(B, 1, *spatial)`` (``(B, F)`` for 2-D inputs)."""
        v = values.reshape(values.shape[0], *self.grid)
        for dim, p in enumerate(self.patch, start=1):
            if p > 1:
                v = v.repeat_interleave(p, dim=dim)
        return v[:, None] if self.has_channels else v
