"""Which outputs of the forward are known to be >= 0, so that layer rules can skip looking for negative inputs
(z+, alpha-beta and gamma have a faster form for inputs >= 0). The tables are in ``optable``
(``NONNEGATIVE_OUTPUT``, ``KEEPS_SIGN``, ``SUBTRACT``, ``DIVISION``)."""

from __future__ import annotations

import numbers
from typing import Any, Callable

import torch

from . import optable, values
from .trees import tensors

Tensor = torch.Tensor
Known = Callable[[Tensor], bool]  # whether an input-dependent tensor is known to be >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _nonnegative_number(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, numbers.Real) and float(value) >= 0)  # NaN is not


def known_nonnegative(t: Tensor, known: Known) -> bool:
    """An input-dependent tensor is >= 0 if the ops that made it say so (``known``); any other tensor (a
    constant, parameter or buffer: fixed during explain) if its values are."""
    if t.requires_grad:
        return known(t)
    if t.dtype == torch.bool:
        return True
    if t.is_complex():
        return False
    return values.read((t >= 0).all())  # NaN is not >= 0


def output_nonnegative(name: str, args: tuple, kwargs: dict, known: Known) -> bool:
    """Whether the output of op ``name`` (out-of-place name) is >= 0: always (``NONNEGATIVE_OUTPUT``), or
    because every operand that is a value is (``KEEPS_SIGN``, and the checks of their own for differences and
    ratios). Cheap checks first: the values of constants are only looked at when every input-dependent
    operand is already known to be >= 0."""
    if name in optable.NONNEGATIVE_OUTPUT:
        return True
    if name in optable.SUBTRACT or name in optable.DIVISION:
        return _difference_or_ratio_nonnegative(name, args, kwargs, known)
    spec = optable.KEEPS_SIGN.get(name)
    if spec is None:
        return False
    operand_spec, number_spec = spec
    values: list[Any]
    if number_spec == optable.ALL:
        values = [v for v in (*args, *kwargs.values()) if isinstance(v, numbers.Number)]
    else:
        values = [args[i] if len(args) > i else kwargs.get(key) for i, key in number_spec]
    if not all(v is None or _nonnegative_number(v) for v in values):
        return False
    if name in ("interpolate", "upsample"):
        mode = args[3] if len(args) > 3 else kwargs.get("mode", "nearest")
        if mode not in optable.RESAMPLING_KEEPS_SIGN:
            return False
    if operand_spec == optable.FIRST:
        data = args[0] if args else kwargs.get("input", kwargs.get("self"))
        operands = [data] if isinstance(data, Tensor) else []
    else:
        operands = tensors((args, kwargs))
    if not operands or not all(known(t) for t in operands if t.requires_grad):
        return False
    return all(known_nonnegative(t, known) for t in operands if not t.requires_grad)


def _difference_or_ratio_nonnegative(name: str, args: tuple, kwargs: dict, known: Known) -> bool:
    """``x - alpha y`` is >= 0 when ``x >= 0`` and ``alpha y <= 0``; ``x / y`` when ``x >= 0`` and ``y > 0``."""
    x = args[0] if args else kwargs.get("input")
    y: Any = args[1] if len(args) > 1 else kwargs.get("other")
    if not (isinstance(x, Tensor) and x.requires_grad and known(x)):
        return False
    if name in optable.DIVISION:
        if _is_number(y):
            return y > 0
        return isinstance(y, Tensor) and not y.requires_grad and not y.is_complex() and values.read((y > 0).all())
    alpha: Any = kwargs.get("alpha", 1)
    if not _is_number(alpha):
        return False
    if alpha == 0:
        return True
    if _is_number(y):
        return alpha * y <= 0
    if not isinstance(y, Tensor) or y.is_complex():
        return False
    if alpha < 0:
        return known_nonnegative(y, known)
    return not y.requires_grad and (y.dtype == torch.bool or values.read((y <= 0).all()))
