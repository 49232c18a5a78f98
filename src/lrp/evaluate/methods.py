"""Turning a method spec (a composite name, a baseline name, an :class:`lrp.Composite`, a function, or
relevance computed beforehand) into a function ``(model, x, target) -> relevance``."""

from __future__ import annotations

from typing import Callable, Union

import torch

from ..baselines import METHODS as BASELINES
from ..composites import COMPOSITES, Composite, composite
from ..explain import Explanation, explain

Tensor = torch.Tensor
# the LRP composites ``lrp evaluate`` and its benchmarks compare by default, with every baseline: those that differ
# on the layers of a CNN
EVALUATE_COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-box", "layered", "epsilon-alpha2-beta1", "lrp0")
MethodSpec = Union[str, Composite, Callable[..., object], Tensor]
Method = Callable[[torch.nn.Module, Tensor, object], Tensor]


def method_name(spec: MethodSpec) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Tensor):
        return "relevance"
    if isinstance(spec, Composite):
        return spec.name
    return getattr(spec, "__name__", type(spec).__name__)


def resolve_method(spec: MethodSpec) -> Method:
    """A function returning the relevance (shaped like ``x``) that ``spec`` assigns to ``model(x)``."""
    fn: Callable[..., object]  # returns relevance or an Explanation
    if isinstance(spec, str):
        if spec in BASELINES:
            fn = BASELINES[spec]
        elif spec.lower().replace("_", "-") in COMPOSITES:
            comp = composite(spec)
            fn = lambda model, x, target: explain(model, x, target, comp)  # noqa: E731
        else:
            raise ValueError(f"unknown method {spec!r}; give a composite ({', '.join(COMPOSITES)}), a baseline "
                             f"({', '.join(BASELINES)}), an lrp.Composite, or a function (model, x, target) -> "
                             f"relevance")
    elif isinstance(spec, Composite):
        fn = lambda model, x, target: explain(model, x, target, spec)  # noqa: E731
    elif isinstance(spec, Tensor):  # computed beforehand, for the same inputs
        fn = lambda model, x, target: spec  # noqa: E731
    elif callable(spec):
        fn = spec
    else:
        raise TypeError(f"a method must be a name, an lrp.Composite or a function; got {type(spec).__name__}")

    def relevance(model: torch.nn.Module, x: Tensor, target: object) -> Tensor:
        if isinstance(x, (tuple, list)):
            raise TypeError(f"lrp.evaluate scores models with one input; got {len(x)} inputs. Explain a model with "
                            f"several inputs with lrp.explain(model, (x1, x2)) and score each input's relevance "
                            f"yourself")
        result = fn(model, x, target)
        r = result.relevance if isinstance(result, Explanation) else result
        if not isinstance(r, Tensor) or tuple(r.shape) != tuple(x.shape):
            got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ValueError(f"method {method_name(spec)!r} returned relevance {got}; expected a tensor shaped "
                             f"like the input {tuple(x.shape)}")
        return r.detach()

    return relevance
