"""Autograd functions whose backward pass is an LRP rule in gradient form (``R = a * g``).

The forward of each is the original computation, so the model's output is unchanged; only the backward
differs from the plain gradient. Every backward follows the precision policy of :mod:`lrp.engine.precision`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..errors import RuleError
from ..rules import stabilize
from .precision import no_autocast, restore, to_working, working_dtype
from . import values

Tensor = torch.Tensor


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0 (relevance at an exact zero cannot be carried as ``a * g``)."""
    return (num / den).masked_fill_(den == 0, 0.0)


class LayerFunction(torch.autograd.Function):
    """A dense or convolution layer; backward: the rule the composite chose (see ``lrp.rules``). The layer's
    output is not saved here: the rule reads ``record.held`` (see ``LayerRecord``), released as soon as the
    layer's backward has run. The input is saved unless the rule, already known during the forward, says it
    does not read it (``LayerRule.needs_input``: epsilon and LRP-0 on dense layers)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, weight: Tensor, bias: Any, record: Any) -> Tensor:
        z = record.op.forward(a, weight, bias)
        ctx.record, ctx.dtype, ctx.device_type = record, a.dtype, a.device.type
        rule = record.early_rule
        ctx.keeps_input = rule is None or rule.needs_input(record.op)
        if ctx.keeps_input:
            ctx.save_for_backward(a)
        return z

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        a = ctx.saved_tensors[0] if ctx.keeps_input else None
        record = ctx.record
        z = record.held_output()
        dtype = working_dtype(a, z, g, record.weight)
        with no_autocast(ctx.device_type), values.watched():  # a rule of the user's may read values
            g_a = record.propagation.layer_backward(record, None if a is None else to_working(a, dtype),
                                                    to_working(z, dtype), to_working(g, dtype))
        return (None if g_a is None else restore(g_a, ctx.dtype)), None, None, None


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
    """Elementwise non-linearity ``y = f(x)`` with the identity rule ``R_x = R_y``: ``g_x = g_y y / x``. Only
    ``x`` is saved (as for the gradient); ``y / x`` is recomputed in the working dtype in the backward, by
    ``ratio(x)`` where the op has one written out (SiLU: ``sigmoid(x)``), else as ``f(x) / x`` (0 at 0)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, compute: Callable[[Tensor], Tensor],
                ratio: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        ctx.compute, ctx.ratio = compute, ratio
        ctx.save_for_backward(x)
        return compute(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        (x,) = ctx.saved_tensors
        dtype = working_dtype(x, g)
        with torch.no_grad(), no_autocast(x.device.type):
            x_ = to_working(x, dtype)
            if ctx.ratio is not None:
                g_x = ctx.ratio(x_).mul_(to_working(g, dtype))
            else:
                g_x = _safe_ratio(to_working(g, dtype) * to_working(ctx.compute(x_), dtype), x_)
        return restore(g_x, x.dtype), None, None


class MaxAsAveragePoolFunction(torch.autograd.Function):
    """Max-pooling whose relevance is redistributed as by average pooling over the same windows:
    ``R_i = sum_k x_i R_k / sum_{j in k} x_j``, i.e. ``g_x = avgpool^T (g y / s(avgpool(x)))``; ``y`` is
    recomputed in the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, compute: Callable[[Tensor], Tensor],
                average: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.compute, ctx.average = compute, average
        ctx.save_for_backward(x)
        return compute(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        (x,) = ctx.saved_tensors
        dtype = working_dtype(x, g)
        with torch.enable_grad(), no_autocast(x.device.type):
            x_ = to_working(x.detach(), dtype).requires_grad_(True)
            with torch.no_grad():
                y = ctx.compute(x_.detach())
            mean = ctx.average(x_)
            u = to_working(g, dtype) * y / stabilize(mean.detach(), 1e-12)
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
        with no_autocast(x.device.type), values.watched():  # a rule of the user's may read values
            x_, y_ = to_working(x, dtype), to_working(y, dtype)
            relevance_in = ctx.rule.relevance(x_, y_, to_working(g, dtype) * y_)
            if relevance_in.shape != x.shape:
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
    ``R_x = x (R_y - y sum_j R_y_j)``, which in gradient form is the softmax's own gradient and needs only
    ``y``; elsewhere (e.g. at the output of a classifier) the identity rule ``R_x = R_y``, which also needs the
    input, kept by ``record`` (a ``SoftmaxRecord``) until the softmax turns out to be attention."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, compute: Callable[[Tensor], Tensor], record: Any) -> Tensor:
        y = compute(x)
        ctx.dim, ctx.record, ctx.dtype = dim, record, x.dtype
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        (y,) = ctx.saved_tensors
        record = ctx.record
        x = record.input()
        dtype = working_dtype(x, y, g)
        with no_autocast(y.device.type):
            g, y_ = to_working(g, dtype), to_working(y, dtype)
            if record.attention or x is None:  # y (g - sum(g y)): the softmax's gradient, computed fused
                g_x = torch.ops.aten._softmax_backward_data(g, y_, ctx.dim, y_.dtype)
            else:
                g_x = _safe_ratio(g * y_, to_working(x, dtype))
        return restore(g_x, ctx.dtype), None, None, None


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
