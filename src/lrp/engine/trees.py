"""Walking the nested arguments and results of torch calls (tensors in tuples, lists, dicts)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

Tensor = torch.Tensor

_NO_GRADIENT = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout,
                torch.memory_format)


def tensors(obj: Any) -> list[Tensor]:
    """Every tensor in ``obj``, depth first (a list: cheaper than a generator for the few operands of an op)."""
    if isinstance(obj, Tensor):
        return [obj]
    found: list[Tensor] = []
    if isinstance(obj, (list, tuple, dict)):
        _collect(obj, found)
    return found


def _collect(obj: Any, found: list[Tensor]) -> None:
    for item in (obj.values() if isinstance(obj, dict) else obj):
        if isinstance(item, Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple, dict)):
            _collect(item, found)


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``obj`` with every tensor ``t`` replaced by ``fn(t)`` (containers rebuilt, namedtuples kept)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple (e.g. torch.return_types)
        return type(obj)(*(map_tensors(item, fn) for item in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(item, fn) for item in obj)
    if isinstance(obj, dict):
        return {key: map_tensors(value, fn) for key, value in obj.items()}
    return obj


def needs_grad(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return obj.requires_grad
    return any(t.requires_grad for t in tensors(obj))


def grad_tensors(obj: Any) -> list[Tensor]:
    """The tensors in ``obj`` that depend on the model input (need a gradient)."""
    return [t for t in tensors(obj) if t.requires_grad]


def gradient_free(obj: Any) -> bool:
    """Whether ``obj`` (an op's result) certainly carries no gradient: tensors that need none, numbers, shapes,
    dtypes, ... (so the op only looked at its operands: ``x.shape``, ``x.dim()``, ``x.detach()``). Anything else
    (an iterator over a tensor, an object lrp does not know) may, and counts as a use of the operands."""
    if isinstance(obj, Tensor):
        return not obj.requires_grad
    if isinstance(obj, (list, tuple)):
        return all(gradient_free(item) for item in obj)
    if isinstance(obj, dict):
        return all(gradient_free(item) for item in obj.values())
    return isinstance(obj, _NO_GRADIENT)


def first(out: Any) -> Tensor:
    """The first element of a tuple result (values of ``max_pool(..., return_indices=True)``), or ``out``."""
    return out[0] if isinstance(out, tuple) else out


_SIGNATURES: dict = {}


def signature(func: Callable) -> Optional[inspect.Signature]:
    """``inspect.signature(func)``, cached; ``None`` for builtins without one."""
    if func not in _SIGNATURES:
        try:
            _SIGNATURES[func] = inspect.signature(func)
        except (TypeError, ValueError):
            _SIGNATURES[func] = None
    return _SIGNATURES[func]
