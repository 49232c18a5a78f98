"""Precision policy of the backward: the rules never compute in half precision.

A backward runs with autocast off (for the device of its tensors) and in :func:`working_dtype` (float32 for
float16/bfloat16 tensors, float64 stays float64), and casts its result back to the dtype of the input it
belongs to, clamped to that dtype's finite range. So a model under ``torch.autocast`` or held in
bfloat16/float16 gets the same rules as in float32, and the result does not depend on whether the autograd
engine propagates the autocast state to the thread that runs the backward (on CUDA it does not, and
mixed-dtype convolutions in a rule would fail).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

Tensor = torch.Tensor


def working_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype relevance is computed in: float64 if any floating-point tensor given is float64, else float32
    (float16 and bfloat16 lack the range and precision for the rules' sums and stabilised divisions)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def to_working(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)


def restore(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` cast to ``dtype`` (the dtype autograd expects), clamped to its finite range when ``dtype`` is
    narrower: a modified gradient too large for float16 becomes its largest value, not ``inf`` (whose product
    with a zero activation would be ``nan``)."""
    if t.dtype == dtype:
        return t
    if t.is_floating_point() and torch.finfo(dtype).max < torch.finfo(t.dtype).max:
        big = torch.finfo(dtype).max
        t = t.clamp(-big, big)
    return t.to(dtype)


@contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Autocast off for ``device_type`` (taken from the tensors; nothing to do where autocast does not exist)."""
    try:
        context = torch.autocast(device_type, enabled=False)
    except (RuntimeError, ValueError, AssertionError):  # a device type without autocast (e.g. "meta")
        yield
        return
    with context:
        yield
