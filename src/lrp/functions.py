"""Autograd functions whose backward pass is an LRP rule in gradient form (``R = a * g``).

The forward of each is the original computation, so the model's output is unchanged; only the backward
differs from the plain gradient.

Precision: a backward never computes in half precision. It runs with autocast off (for the device of its
tensors) and in :func:`working_dtype` (float32 for float16/bfloat16 tensors, float64 stays float64), and
casts its result back to the dtype of the input it belongs to, clamped to that dtype's finite range. So a
model under ``torch.autocast`` or held in bfloat16/float16 gets the same rules as in float32, and the result
does not depend on whether the autograd engine propagates the autocast state to the thread that runs the
backward (on CUDA it does not, and mixed-dtype convolutions in a rule would fail).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

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


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0 (relevance at an exact zero cannot be carried as ``a * g``)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


class LayerFunction(torch.autograd.Function):
    """A dense or convolution layer; backward: the rule the composite chose (see ``lrp.rules``)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, weight: Tensor, bias: Any, record: Any) -> Tensor:
        z = record.op.forward(a, weight, bias)
        ctx.record = record
        ctx.save_for_backward(a, z)
        return z

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        a, z = ctx.saved_tensors
        record = ctx.record
        dtype = working_dtype(a, z, g, record.weight)
        with no_autocast(a.device.type):
            g_a = record.trace.layer_backward(record, to_working(a, dtype), to_working(z, dtype),
                                              to_working(g, dtype))
        return (None if g_a is None else restore(g_a, a.dtype)), None, None, None


class BatchNormFunction(torch.autograd.Function):
    """BatchNorm with fixed statistics, ``y = s x + t``. Merged into the layer before it, its backward is the
    identity (the layer's rule sees the merged map); otherwise it is a linear map with bias (LRP-0: ``s g``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, compute: Callable[[Tensor], Tensor], record: Any) -> Tensor:
        ctx.record, ctx.dtype = record, x.dtype
        return compute(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        record = ctx.record
        if record.fused:
            return restore(g, ctx.dtype), None, None
        dtype = working_dtype(g, record.scale)
        scale = to_working(record.scale, dtype).reshape(record.broadcast_shape)
        return restore(to_working(g, dtype) * scale, ctx.dtype), None, None


class IdentityRuleFunction(torch.autograd.Function):
    """Elementwise non-linearity ``y = f(x)`` with the identity rule ``R_x = R_y``: ``g_x = g_y y / x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        y = compute(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        x, y = ctx.saved_tensors
        dtype = working_dtype(x, y, g)
        with no_autocast(x.device.type):
            g_x = _safe_ratio(to_working(g, dtype) * to_working(y, dtype), to_working(x, dtype))
        return restore(g_x, x.dtype), None


class MaxAsAveragePoolFunction(torch.autograd.Function):
    """Max-pooling whose relevance is redistributed as by average pooling over the same windows:
    ``R_i = sum_k x_i R_k / sum_{j in k} x_j``, i.e. ``g_x = avgpool^T (g y / s(avgpool(x)))``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, compute: Callable[[Tensor], Tensor],
                average: Callable[[Tensor], Tensor]) -> Tensor:
        y = compute(x)
        ctx.average = average
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        from .rules import stabilize
        x, y = ctx.saved_tensors
        dtype = working_dtype(x, y, g)
        with torch.enable_grad(), no_autocast(x.device.type):
            x_ = to_working(x.detach(), dtype).requires_grad_(True)
            mean = ctx.average(x_)
            u = to_working(g, dtype) * to_working(y, dtype) / stabilize(mean.detach(), 1e-12)
            (g_x,) = torch.autograd.grad(mean, x_, u)
        return restore(g_x, x.dtype), None, None


class ModuleRuleFunction(torch.autograd.Function):
    """A user module with a registered :class:`lrp.rules.ModuleRule`: ``R_in = rule(x, y, R_out)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, rule: Any, name: str) -> Tensor:
        ctx.rule, ctx.name = rule, name
        ctx.save_for_backward(x, y)
        return y.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        x, y = ctx.saved_tensors
        dtype = working_dtype(x, y, g)
        with no_autocast(x.device.type):
            x_, y_ = to_working(x, dtype), to_working(y, dtype)
            relevance_in = ctx.rule.relevance(x_, y_, to_working(g, dtype) * y_)
            if relevance_in.shape != x.shape:
                from .errors import RuleError
                raise RuleError(f"{ctx.rule!r} for module '{ctx.name}' returned relevance of shape "
                                f"{tuple(relevance_in.shape)}; the module input has shape {tuple(x.shape)}")
            g_x = _safe_ratio(to_working(relevance_in, dtype), x_)
        return restore(g_x, x.dtype), None, None, None


class ScaleGradientFunction(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``. After a product of ``k`` activations
    it implements the AttnLRP uniform rule: each factor receives ``1/k`` of the product's relevance."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        return g * ctx.factor, None


class SoftmaxFunction(torch.autograd.Function):
    """Softmax. Inside attention (its output multiplies another activation) the AttnLRP rule
    ``R_x = x (R_y - y sum_j R_y_j)``, which in gradient form is the softmax's own gradient; elsewhere (e.g. at
    the output of a classifier) the identity rule ``R_x = R_y``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, compute: Callable[[Tensor], Tensor], record: Any) -> Tensor:
        y = compute(x)
        ctx.dim, ctx.record = dim, record
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        x, y = ctx.saved_tensors
        dtype = working_dtype(x, y, g)
        with no_autocast(x.device.type):
            g, y_ = to_working(g, dtype), to_working(y, dtype)
            if ctx.record.attention:
                g_x = y_ * (g - (g * y_).sum(ctx.dim, keepdim=True))
            else:
                g_x = _safe_ratio(g * y_, to_working(x, dtype))
        return restore(g_x, x.dtype), None, None, None


class LinearizedFunction(torch.autograd.Function):
    """An op whose relevance rule is the gradient of a linearised version of it (``linear(x)``, e.g. a
    normalisation with its statistics held fixed, as AttnLRP treats LayerNorm); forward is the op itself."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, compute: Callable[[Tensor], Tensor],
                linear: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.linear = linear
        ctx.save_for_backward(x)
        return compute(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        (x,) = ctx.saved_tensors
        dtype = working_dtype(x, g)
        with torch.enable_grad(), no_autocast(x.device.type):
            x_ = to_working(x.detach(), dtype).requires_grad_(True)
            y = ctx.linear(x_)
            (g_x,) = torch.autograd.grad(y, x_, g.to(y.dtype))
        return restore(g_x, x.dtype), None, None
