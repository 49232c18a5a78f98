"""Perturbation curves: pixel flipping and region perturbation (Bach et al. 2015; Samek et al. 2017).

Regions (single features for ``patch=1``) are removed in the order of their relevance, most relevant first
(``"morf"``) or least relevant first (``"lerf"``), in ``steps`` equal parts; after step ``k`` the first
``round(k * R / steps)`` of the ``R`` regions hold the replacement value. The curve is the explained score
``f_k`` at each step, ``k = 0..steps``, and

    AOPC = 1 / (steps + 1) * sum_k (f_0 - f_k)      (larger: the ranking finds what the model uses, for MoRF)
    AUC  = integral of f over the fraction removed (trapezoids on [0, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..baselines import target_scores
from ..engine import TargetSpec, class_targets, frozen, model_lock, model_output
from .features import PatchSpec, Regions

Tensor = torch.Tensor
Score = Union[str, Callable[[Tensor, Optional[Tensor]], Tensor]]


# --------------------------------------------------------------------------- replacement values

@dataclass(frozen=True)
class Blur:
    """Replace with a Gaussian-blurred copy of the input (per channel, over the spatial dimensions)."""

    sigma: float = 2.0

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim < 3:
            raise ValueError(f"blur needs inputs with spatial dimensions (N, C, ...); got shape {tuple(x.shape)}")
        radius = max(1, math.ceil(3 * self.sigma))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-0.5 * (t / self.sigma) ** 2)
        kernel = kernel / kernel.sum()
        out = x
        for dim in range(2, x.ndim):  # separable: one 1-D pass per spatial dimension
            moved = out.movedim(dim, -1)
            flat = moved.reshape(-1, 1, moved.shape[-1])
            padded = torch.nn.functional.pad(flat, (radius, radius), mode="replicate")
            blurred = torch.nn.functional.conv1d(padded, kernel.view(1, 1, -1))
            out = blurred.reshape(moved.shape).movedim(-1, dim)
        return out


@dataclass(frozen=True)
class Uniform:
    """Replace with uniform noise in ``[low, high]`` (default: each sample's own value range)."""

    low: Optional[float] = None
    high: Optional[float] = None
    seed: int = 0

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        shape = (-1,) + (1,) * (x.ndim - 1)
        low = flat.min(1).values.view(shape) if self.low is None else self.low
        high = flat.max(1).values.view(shape) if self.high is None else self.high
        gen = torch.Generator().manual_seed(self.seed)
        return low + (high - low) * torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)


def _zero(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def _channel_mean(x: Tensor) -> Tensor:
    dims = tuple(range(2, x.ndim)) if x.ndim >= 3 else (1,)
    return x.mean(dim=dims, keepdim=True).expand_as(x)


REPLACEMENTS: dict[str, Callable[[Tensor], Tensor]] = {
    "zero": _zero, "mean": _channel_mean, "blur": Blur(), "uniform": Uniform(),
}
Replacement = Union[str, float, Tensor, Callable[[Tensor], Tensor]]


def replacement_values(x: Tensor, replace: Replacement) -> Tensor:
    """What removed features become: a name in :data:`REPLACEMENTS`, a number, a tensor like ``x``, or a
    callable ``x -> tensor like x``."""
    if isinstance(replace, str):
        if replace not in REPLACEMENTS:
            raise ValueError(f"unknown replacement {replace!r}; choose one of {sorted(REPLACEMENTS)}, a number, a "
                             f"tensor shaped like the input, or a callable x -> tensor shaped like x")
        values = REPLACEMENTS[replace](x)
    elif isinstance(replace, (int, float)) and not isinstance(replace, bool):
        values = torch.full_like(x, float(replace))
    elif isinstance(replace, Tensor):
        values = replace
    elif callable(replace):
        values = replace(x)
        if not isinstance(values, Tensor):
            raise ValueError(f"the replacement callable returned {type(values).__name__}; it must return a tensor "
                             f"shaped like its input {tuple(x.shape)}")
    else:
        raise ValueError(f"replace must be a name {sorted(REPLACEMENTS)}, a number, a tensor or a callable; "
                         f"got {type(replace).__name__}")
    if tuple(values.shape) != tuple(x.shape):
        try:
            values = values.expand_as(x)
        except RuntimeError:
            raise ValueError(f"the replacement values have shape {tuple(values.shape)}; they must have (or "
                             f"broadcast to) the input's shape {tuple(x.shape)}") from None
    return values.to(device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------- scores and curves

def _score_fn(score: Score) -> Callable[[Tensor, Optional[Tensor]], Tensor]:
    if callable(score):
        return score
    if score == "logit":
        return target_scores
    if score == "probability":
        def probability(out: Tensor, idx: Optional[Tensor]) -> Tensor:
            if out.ndim != 2 or out.shape[1] < 2:  # softmax over one class is 1 whatever is removed
                raise ValueError(f"score='probability' needs an output shaped (batch, classes) with two classes or "
                                 f"more; this model returns {tuple(out.shape)}: use score='logit' or a callable")
            return target_scores(torch.softmax(out, 1), idx)
        return probability
    raise ValueError(f"score must be 'logit', 'probability' or a callable (output, target) -> scores; got {score!r}")


@dataclass
class PerturbationCurve:
    """Scores ``(N, steps + 1)`` of each sample after each step; ``fractions`` of regions removed."""

    fractions: np.ndarray
    scores: np.ndarray
    order: str
    target: Optional[np.ndarray]

    @property
    def mean(self) -> np.ndarray:
        """The curve averaged over samples."""
        return self.scores.mean(0)

    @property
    def aopc(self) -> np.ndarray:
        """Area over the perturbation curve per sample: ``mean_k (f_0 - f_k)``."""
        return (self.scores[:, :1] - self.scores).mean(1)

    @property
    def auc(self) -> np.ndarray:
        """Area under the curve per sample, over the fraction removed."""
        widths = np.diff(self.fractions)
        return ((self.scores[:, 1:] + self.scores[:, :-1]) * 0.5 * widths).sum(1)


def class_scores(model: torch.nn.Module, x: Tensor, out: Tensor) -> Tensor:
    """``out``, unless it is one logit per sample through a final sigmoid: ``explain`` reads such a model as a
    binary classifier (class 0 explained from ``-z``), while the perturbation would track the sigmoid's output, so
    the two would not match; ``ValueError`` then names the way out."""
    if out.ndim == 2 and out.shape[1] >= 2 or out.ndim > 2:
        return out
    from ..explain import explain
    if explain(model, x[:1], composite="epsilon").head == "sigmoid":
        raise ValueError(f"evaluation tracks the explained class's score; this model gives one score per sample "
                         f"{tuple(out.shape)} through a sigmoid, which lrp explains as a binary classifier (class 1 "
                         f"from the logit z, class 0 from -z). Evaluate a wrapper whose forward returns the two "
                         f"classes' logits, torch.cat([-z, z], 1)")
    return out


def perturbation_curve(
    model: torch.nn.Module,
    x: Tensor,
    relevance: Tensor,
    target: TargetSpec = None,
    *,
    order: str = "morf",
    steps: Optional[int] = None,
    patch: PatchSpec = 1,
    replace: Replacement = "zero",
    score: Score = "logit",
    batch_size: int = 256,
) -> PerturbationCurve:
    """Remove regions of ``x`` in the order of ``relevance`` and record the target's score after each step.

    Args:
        model: the model the relevance explains; run in eval mode without gradients, restored afterwards.
        x: inputs ``(N, C, *spatial)`` or ``(N, F)``.
        relevance: shaped like ``x``, with one channel, or ``(N, *spatial)``; channels are summed.
        target: the class whose score is tracked (default: the prediction on ``x``), fixed for all steps.
        order: ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first).
        steps: number of perturbation steps (default: one per region, at most 100).
        patch: region size (``1``: pixel flipping; ``k`` or a tuple: region perturbation); must divide the
            spatial size.
        replace: ``"zero"``, ``"mean"`` (per channel), ``"blur"``, ``"uniform"``, a number, a tensor like ``x``,
            :class:`Blur`/:class:`Uniform` with options, or a callable ``x -> tensor like x``.
        score: ``"logit"`` (the explained output), ``"probability"`` (softmax), or ``(output, target) -> (B,)``.
        batch_size: perturbed inputs per forward pass (samples and steps are batched together).
    """
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' (most relevant first) or 'lerf' (least relevant first), got {order!r}")
    regions = Regions(x, patch)
    ranking = regions.scores(torch.as_tensor(relevance).to(x.device))
    if steps is None:
        steps = min(regions.count, 100)
    if not 1 <= steps <= regions.count:
        raise ValueError(f"steps must be between 1 and the number of regions ({regions.count} for patch "
                         f"{regions.patch} on {regions.spatial}); got {steps}")
    values = replacement_values(x, replace)
    score_of = _score_fn(score)
    # rank of each region: 0 is removed first
    sort = torch.argsort(ranking, dim=1, descending=(order == "morf"), stable=True)
    rank = torch.empty_like(sort).scatter_(1, sort, torch.arange(regions.count, device=x.device).expand_as(sort))
    counts = torch.tensor([round(k * regions.count / steps) for k in range(steps + 1)], device=x.device)

    n = x.shape[0]
    scores = torch.empty(n, steps + 1, dtype=torch.float64)
    with model_lock(model), frozen(model), torch.no_grad():
        out = class_scores(model, x, model_output(model(x)))
        idx = class_targets(out, target)
        scores[:, 0] = score_of(out, idx).double().cpu()
        pairs = torch.cartesian_prod(torch.arange(n), torch.arange(1, steps + 1)).to(x.device)
        for chunk in pairs.split(max(1, batch_size)):
            s, k = chunk[:, 0], chunk[:, 1]
            removed = regions.expand(rank[s] < counts[k][:, None])
            perturbed = torch.where(removed, values[s], x[s])
            result = score_of(model_output(model(perturbed)), None if idx is None else idx[s])
            scores[s.cpu(), k.cpu()] = result.double().cpu()
    fractions = counts.cpu().numpy() / regions.count
    return PerturbationCurve(fractions, scores.numpy(), order, None if idx is None else idx.cpu().numpy())
