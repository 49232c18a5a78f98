"""Attribution methods to compare LRP against, with the interface of :func:`lrp.explain`.

Each function takes ``(model, x, target=None, **options)`` and returns an :class:`lrp.Explanation` whose
``relevance`` has the shape of ``x``; the explained score ``S`` is the target's output (its logit), as for LRP.

- ``gradient``: ``dS/dx``
- ``gradient_x_input``: ``x * dS/dx``
- ``integrated_gradients``: ``(x - x0) * mean_k dS/dx(x0 + a_k (x - x0))``, ``a_k`` the midpoints of
  ``steps`` equal intervals of ``[0, 1]`` (Sundararajan et al. 2017; sums to ``S(x) - S(x0)`` as steps grow)
- ``smoothgrad``: ``mean_k dS/dx(x + e_k)``, ``e_k ~ N(0, (noise * (max x - min x))^2)`` per sample
  (Smilkov et al. 2017)
- ``occlusion``: ``S(x) - S(x with the patch set to value)``, shared equally by the patch's elements
  (Zeiler and Fergus 2014)
- ``random``: relevance drawn from ``N(0, 1)``, the floor any method must beat

Several inputs: like :func:`lrp.explain`, a model ``model(x1, x2, ...)`` takes them as a tuple or list, ``x =
(x1, x2)``, all with the same batch size, and ``relevance`` is then a tuple shaped like the inputs. Every
floating-point input is differentiated or perturbed together: the gradients are taken for each of them at once,
integrated gradients follows one path ``x0_i + a (x_i - x0_i)`` for all of them (``baseline``: a number or
tensor for all, or a tuple with one per input), smoothgrad adds noise to each with ``sigma`` from that input's
own range, and occlusion occludes each in turn, patch by patch (``patch`` must tile each of them), the others
held as they are. Integer inputs (token ids) are held fixed: a gradient is not defined for an id, so they get
zero relevance (``random`` alone, which ignores the model, draws relevance for them too). Errors name the input
(``input 1 of 2``, counting from 0 as :func:`lrp.explain` does).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .errors import LRPError
from .explain import Explanation, check_batch
from .engine import TargetSpec, class_targets, frozen, model_lock, model_output

Tensor = torch.Tensor
Inputs = Union[Tensor, Sequence[Tensor]]
Gradients = Callable[..., list[Tensor]]  # (inputs, repeat=1) -> dS/dx per input (zeros for ids)


def _check(model: object, x: object) -> Tensor:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise LRPError(f"x must be a batch with at least one sample along dimension 0, got shape {tuple(x.shape)}")
    return x


def _inputs(model: torch.nn.Module, x: Inputs) -> list[Tensor]:
    """The model's inputs as a list: one floating-point tensor, or several tensors (floating-point or integer ids,
    at least one floating-point) with one batch size; checked, naming the input that is wrong."""
    if not isinstance(x, (tuple, list)):
        return [_check(model, x)]
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not x:
        raise LRPError(f"x is an empty {type(x).__name__}: give the model's inputs, one tensor each")
    for k, t in enumerate(x):
        name = f"input {k} of {len(x)}"
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be a floating-point tensor or integer token ids, got {t.dtype}")
        check_batch(name, t, x[0])
    if not any(t.is_floating_point() for t in x):
        raise TypeError(f"none of the {len(x)} inputs is floating-point ({', '.join(str(t.dtype) for t in x)}): "
                        f"these methods differentiate or perturb floating-point inputs and hold integer ids fixed")
    return list(x)


def _dtype(x: Tensor, xs: Sequence[Tensor]) -> torch.dtype:
    """The dtype of ``x``'s relevance: its own, or for integer ids that of the first floating-point input."""
    return x.dtype if x.is_floating_point() else next(t.dtype for t in xs if t.is_floating_point())


def _zeros(x: Tensor, xs: Sequence[Tensor]) -> Tensor:
    """Zero relevance for the input ``x`` (integer ids: in the dtype of the first floating-point input)."""
    return torch.zeros(x.shape, dtype=_dtype(x, xs), device=x.device)


def target_scores(out: Tensor, idx: Optional[Tensor]) -> Tensor:
    """The explained score per sample: the target's output (or the single output of a one-score model)."""
    return out if idx is None else out.gather(1, idx[:, None])[:, 0]


def _result(x: Inputs, out: Tensor, idx: Optional[Tensor], relevance: list[Tensor]) -> Explanation:
    start = out if idx is None else torch.zeros_like(out).scatter_(1, idx[:, None], target_scores(out, idx)[:, None])
    kept = tuple(r.detach() for r in relevance) if isinstance(x, (tuple, list)) else relevance[0].detach()
    return Explanation(kept, out, idx, start, {}, {})  # type: ignore[arg-type]  # a tuple for several inputs


def _gradients(model: torch.nn.Module, inputs: list[Tensor], idx: Optional[Tensor], repeat: int) -> list[Tensor]:
    """dS/dx_i at ``inputs`` for each floating-point input (zeros for ids): ``repeat`` stacked copies of the
    batch, each explained for ``idx``."""
    leaves = [t.detach().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    floats = [leaf for leaf in leaves if leaf.is_floating_point()]
    with torch.enable_grad():
        out = model_output(model(*leaves))
        scores = target_scores(out, None if idx is None else idx.repeat(repeat))
        grads = iter(torch.autograd.grad(scores.sum(), floats, allow_unused=len(leaves) > 1))
    found = [next(grads) if leaf.is_floating_point() else None for leaf in leaves]
    return [g if g is not None else _zeros(leaf, leaves) for g, leaf in zip(found, leaves)]


def _summed_gradients(grad: Gradients, xs: list[Tensor], count: int, batch_size: int,
                      point: Callable[[int, Tensor, int, int], Tensor]) -> list[Tensor]:
    """``sum_{j < count} dS/dx_i(p_j)`` per input, ``batch_size`` points per pass; ``point(i, x_i, start, k)`` gives
    points ``start .. start + k - 1`` of floating-point input ``i``, ``(k, *x_i.shape)``; ids are repeated."""
    totals = [_zeros(x, xs) for x in xs]
    step = max(1, batch_size)
    for start in range(0, count, step):
        k = min(step, count - start)
        points = [point(i, x, start, k).reshape(-1, *x.shape[1:]) if x.is_floating_point()
                  else x.repeat(k, *([1] * (x.ndim - 1))) for i, x in enumerate(xs)]
        for x, total, g in zip(xs, totals, grad(points, k)):
            if x.is_floating_point():
                total += g.view(k, *x.shape).sum(0)
    return totals


def _gradient_method(name: str, combine: Callable[..., list[Tensor]], **defaults):
    def method(model: torch.nn.Module, x: Inputs, target: TargetSpec = None, **options) -> Explanation:
        xs = _inputs(model, x)
        unknown = set(options) - set(defaults)
        if unknown:
            raise TypeError(f"{name}() got unexpected options {sorted(unknown)}; it takes {sorted(defaults)}")
        opts = {**defaults, **options}
        if opts.get("batch_size", 1) < 1:
            raise ValueError(f"{name}() needs batch_size >= 1, got {opts['batch_size']}")
        with model_lock(model), frozen(model):
            with torch.no_grad():
                out = model_output(model(*xs)).detach()
            idx = class_targets(out, target)
            relevance = combine(lambda inputs, repeat=1: _gradients(model, inputs, idx, repeat), xs, **opts)
        return _result(x, out, idx, relevance)

    method.__name__ = name
    return method


def _plain(grad: Gradients, xs: list[Tensor]) -> list[Tensor]:
    return grad(xs)


def _times_input(grad: Gradients, xs: list[Tensor]) -> list[Tensor]:
    return [x * g if x.is_floating_point() else g for x, g in zip(xs, grad(xs))]


def _starts(baseline: Union[float, Tensor, Sequence], xs: list[Tensor]) -> list[Optional[Tensor]]:
    """``x0`` per floating-point input: one baseline for all, or (several inputs) a sequence with one per input."""
    given = list(baseline) if isinstance(baseline, (tuple, list)) and len(xs) > 1 else [baseline] * len(xs)
    if len(given) != len(xs):
        raise ValueError(f"integrated_gradients got {len(given)} baselines for {len(xs)} inputs; give one number "
                         f"or tensor for all, or one per input")
    return [torch.as_tensor(b, dtype=x.dtype, device=x.device).expand_as(x) if x.is_floating_point() else None
            for b, x in zip(given, xs)]


def _integrated(grad: Gradients, xs: list[Tensor], *, baseline: Union[float, Tensor, Sequence] = 0.0,
                steps: int = 32, batch_size: int = 8) -> list[Tensor]:
    if steps < 1:
        raise ValueError(f"integrated_gradients needs steps >= 1, got {steps}")
    x0s = _starts(baseline, xs)

    def path(i: int, x: Tensor, start: int, k: int) -> Tensor:
        x0 = x0s[i]
        assert x0 is not None
        a = ((torch.arange(start, start + k, dtype=x.dtype, device=x.device) + 0.5) / steps).view(-1, *([1] * x.ndim))
        return x0 + a * (x - x0)

    totals = _summed_gradients(grad, xs, steps, batch_size, path)
    return [(x - x0) * total / steps if x0 is not None else total for x, x0, total in zip(xs, x0s, totals)]


def _smooth(grad: Gradients, xs: list[Tensor], *, samples: int = 16, noise: float = 0.1, seed: int = 0,
            batch_size: int = 8) -> list[Tensor]:
    if samples < 1:
        raise ValueError(f"smoothgrad needs samples >= 1, got {samples}")
    gen = torch.Generator().manual_seed(seed)

    def noisy(i: int, x: Tensor, start: int, k: int) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        sigma = (noise * (flat.max(1).values - flat.min(1).values)).view(-1, *([1] * (x.ndim - 1)))
        return x + torch.randn((k, *x.shape), generator=gen, dtype=x.dtype).to(x.device) * sigma

    totals = _summed_gradients(grad, xs, samples, batch_size, noisy)
    return [total / samples if x.is_floating_point() else total for x, total in zip(xs, totals)]


gradient = _gradient_method("gradient", _plain)
gradient_x_input = _gradient_method("gradient_x_input", _times_input)
integrated_gradients = _gradient_method("integrated_gradients", _integrated, baseline=0.0, steps=32, batch_size=8)
smoothgrad = _gradient_method("smoothgrad", _smooth, samples=16, noise=0.1, seed=0, batch_size=8)


def _occlude(model: torch.nn.Module, xs: list[Tensor], i: int, patch: Union[int, tuple], value: float,
             idx: Optional[Tensor], base: Tensor, batch_size: int) -> Tensor:
    """Occlusion relevance of input ``i``: per patch, ``S(x) - S(x with the patch of input i = value)`` (the
    other inputs as they are), shared equally by the patch's elements."""
    from .evaluate.features import Regions

    x = xs[i]
    try:
        regions = Regions(x, patch)
    except ValueError as exc:
        raise ValueError(f"input {i} of {len(xs)}: {exc}" if len(xs) > 1 else str(exc)) from None
    pairs = [(n, r) for n in range(x.shape[0]) for r in range(regions.count)]
    drops = torch.zeros(x.shape[0], regions.count, dtype=base.dtype, device=x.device)
    fill = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    for start in range(0, len(pairs), batch_size):
        n_idx, r_idx = (torch.tensor(v, device=x.device) for v in zip(*pairs[start:start + batch_size]))
        mask = regions.expand(torch.nn.functional.one_hot(r_idx, regions.count).bool())
        inputs = [torch.where(mask, fill, t[n_idx]) if j == i else t[n_idx] for j, t in enumerate(xs)]
        scores = target_scores(model_output(model(*inputs)), None if idx is None else idx[n_idx])
        drops[n_idx, r_idx] = base[n_idx] - scores
    return regions.expand(drops / (regions.size * regions.channels)).to(x.dtype).expand_as(x).contiguous()


def occlusion(model: torch.nn.Module, x: Inputs, target: TargetSpec = None, *, patch: Union[int, tuple] = 4,
              value: float = 0.0, batch_size: int = 256) -> Explanation:
    """Occlusion: each non-overlapping patch (all channels) gets ``S(x) - S(x with the patch = value)``,
    shared equally by its elements. ``patch`` must divide the spatial size. With several inputs each
    floating-point input is occluded in turn, the others held; integer ids get zero relevance."""
    xs = _inputs(model, x)
    if batch_size < 1:
        raise ValueError(f"occlusion() needs batch_size >= 1, got {batch_size}")
    with model_lock(model), frozen(model), torch.no_grad():
        out = model_output(model(*xs)).detach()
        idx = class_targets(out, target)
        base = target_scores(out, idx)
        relevance = [_occlude(model, xs, i, patch, value, idx, base, batch_size) if t.is_floating_point()
                     else _zeros(t, xs) for i, t in enumerate(xs)]
    return _result(x, out, idx, relevance)


def random(model: torch.nn.Module, x: Inputs, target: TargetSpec = None, *, seed: int = 0) -> Explanation:
    """Relevance drawn from N(0, 1), independent of the model: the floor for every metric (for every input,
    integer ids included)."""
    xs = _inputs(model, x)
    with model_lock(model), frozen(model), torch.no_grad():
        out = model_output(model(*xs)).detach()
    idx = class_targets(out, target)
    gen = torch.Generator().manual_seed(seed)
    relevance = [torch.randn(t.shape, generator=gen, dtype=_dtype(t, xs)).to(t.device) for t in xs]
    return _result(x, out, idx, relevance)


METHODS: dict[str, Callable[..., Explanation]] = {
    "gradient": gradient,
    "gradient-x-input": gradient_x_input,
    "integrated-gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "occlusion": occlusion,
    "random": random,
}
