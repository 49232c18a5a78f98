"""Attribution methods to compare LRP against, with the interface of :func:`lrp.explain`.

Each function takes ``(model, x, target=None, **options)`` and returns an :class:`lrp.Explanation` whose
``relevance`` has the shape of ``x``; the explained score is the target's output (its logit), as for LRP.

- ``gradient``: ``dS/dx``
- ``gradient_x_input``: ``x * dS/dx``
- ``integrated_gradients``: ``(x - x0) * mean_k dS/dx(x0 + a_k (x - x0))``, ``a_k`` the midpoints of
  ``steps`` equal intervals of ``[0, 1]`` (Sundararajan et al. 2017; sums to ``S(x) - S(x0)`` as steps grow)
- ``smoothgrad``: ``mean_k dS/dx(x + e_k)``, ``e_k ~ N(0, (noise * (max x - min x))^2)`` (Smilkov et al. 2017)
- ``occlusion``: ``S(x) - S(x with the patch set to value)``, shared equally by the patch's elements
  (Zeiler and Fergus 2014)
- ``random``: relevance drawn from ``N(0, 1)``, the floor any method must beat
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from .errors import LRPError
from .explain import Explanation
from .engine import TargetSpec, class_targets, frozen, model_lock, model_output

Tensor = torch.Tensor


def _check(model: torch.nn.Module, x: Tensor) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise LRPError(f"x must be a batch with at least one sample along dimension 0, got shape {tuple(x.shape)}")


def target_scores(out: Tensor, idx: Optional[Tensor]) -> Tensor:
    """The explained score per sample: the target's output (or the single output of a one-score model)."""
    return out if idx is None else out.gather(1, idx[:, None])[:, 0]


def _result(x: Tensor, out: Tensor, idx: Optional[Tensor], relevance: Tensor) -> Explanation:
    start = out if idx is None else torch.zeros_like(out).scatter_(1, idx[:, None], target_scores(out, idx)[:, None])
    return Explanation(relevance.detach(), out, idx, start, {}, {})


def _gradients(model: torch.nn.Module, inputs: Tensor, idx: Optional[Tensor], repeat: int) -> Tensor:
    """dS/dx at ``inputs``: ``repeat`` stacked copies of the batch, each explained for ``idx``."""
    leaf = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model_output(model(leaf))
        scores = target_scores(out, None if idx is None else idx.repeat(repeat))
        (grad,) = torch.autograd.grad(scores.sum(), leaf)
    return grad


def _gradient_method(name: str, combine: Callable[..., Tensor], **defaults):
    def method(model: torch.nn.Module, x: Tensor, target: TargetSpec = None, **options) -> Explanation:
        _check(model, x)
        unknown = set(options) - set(defaults)
        if unknown:
            raise TypeError(f"{name}() got unexpected options {sorted(unknown)}; it takes {sorted(defaults)}")
        opts = {**defaults, **options}
        if opts.get("batch_size", 1) < 1:
            raise ValueError(f"{name}() needs batch_size >= 1, got {opts['batch_size']}")
        with model_lock(model), frozen(model):
            with torch.no_grad():
                out = model_output(model(x)).detach()
            idx = class_targets(out, target)
            relevance = combine(lambda inputs, repeat=1: _gradients(model, inputs, idx, repeat), x, **opts)
        return _result(x, out, idx, relevance)

    method.__name__ = name
    return method


def _plain(grad, x):
    return grad(x)


def _times_input(grad, x):
    return x * grad(x)


def _integrated(grad, x, *, baseline: Union[float, Tensor] = 0.0, steps: int = 32, batch_size: int = 8):
    if steps < 1:
        raise ValueError(f"integrated_gradients needs steps >= 1, got {steps}")
    x0 = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    total = torch.zeros_like(x)
    for chunk in alphas.split(max(1, batch_size)):
        a = chunk.view(-1, *([1] * x.ndim))
        path = (x0 + a * (x - x0)).reshape(-1, *x.shape[1:])
        total += grad(path, len(chunk)).view(len(chunk), *x.shape).sum(0)
    return (x - x0) * total / steps


def _smooth(grad, x, *, samples: int = 16, noise: float = 0.1, seed: int = 0, batch_size: int = 8):
    if samples < 1:
        raise ValueError(f"smoothgrad needs samples >= 1, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    flat = x.reshape(x.shape[0], -1)
    sigma = (noise * (flat.max(1).values - flat.min(1).values)).view(-1, *([1] * (x.ndim - 1)))
    total = torch.zeros_like(x)
    for start in range(0, samples, max(1, batch_size)):
        k = min(batch_size, samples - start)
        eps = torch.randn((k, *x.shape), generator=gen, dtype=x.dtype).to(x.device) * sigma
        total += grad((x + eps).reshape(-1, *x.shape[1:]), k).view(k, *x.shape).sum(0)
    return total / samples


gradient = _gradient_method("gradient", _plain)
gradient_x_input = _gradient_method("gradient_x_input", _times_input)
integrated_gradients = _gradient_method("integrated_gradients", _integrated, baseline=0.0, steps=32, batch_size=8)
smoothgrad = _gradient_method("smoothgrad", _smooth, samples=16, noise=0.1, seed=0, batch_size=8)


def occlusion(model: torch.nn.Module, x: Tensor, target: TargetSpec = None, *, patch: Union[int, tuple] = 4,
              value: float = 0.0, batch_size: int = 256) -> Explanation:
    """Occlusion: each non-overlapping patch (all channels) gets ``S(x) - S(x with the patch = value)``,
    shared equally by its elements. ``patch`` must divide the spatial size."""
    from .evaluate.features import Regions

    _check(model, x)
    if batch_size < 1:
        raise ValueError(f"occlusion() needs batch_size >= 1, got {batch_size}")
    regions = Regions(x, patch)
    with model_lock(model), frozen(model), torch.no_grad():
        out = model_output(model(x)).detach()
        idx = class_targets(out, target)
        base = target_scores(out, idx)
        pairs = [(n, r) for n in range(x.shape[0]) for r in range(regions.count)]
        drops = torch.zeros(x.shape[0], regions.count, dtype=out.dtype, device=x.device)
        for start in range(0, len(pairs), batch_size):
            n_idx, r_idx = (torch.tensor(v, device=x.device) for v in zip(*pairs[start:start + batch_size]))
            mask = regions.expand(torch.nn.functional.one_hot(r_idx, regions.count).bool())
            occluded = torch.where(mask, torch.as_tensor(value, dtype=x.dtype, device=x.device), x[n_idx])
            scores = target_scores(model_output(model(occluded)), None if idx is None else idx[n_idx])
            drops[n_idx, r_idx] = base[n_idx] - scores
    relevance = regions.expand(drops / (regions.size * regions.channels)).to(x.dtype).expand_as(x)
    return _result(x, out, idx, relevance.contiguous())


def random(model: torch.nn.Module, x: Tensor, target: TargetSpec = None, *, seed: int = 0) -> Explanation:
    """Relevance drawn from N(0, 1), independent of the model: the floor for every metric."""
    _check(model, x)
    with model_lock(model), frozen(model), torch.no_grad():
        out = model_output(model(x)).detach()
    idx = class_targets(out, target)
    gen = torch.Generator().manual_seed(seed)
    relevance = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    return _result(x, out, idx, relevance)


METHODS: dict[str, Callable[..., Explanation]] = {
    "gradient": gradient,
    "gradient-x-input": gradient_x_input,
    "integrated-gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "occlusion": occlusion,
    "random": random,
}
