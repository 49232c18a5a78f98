"""Autograd functions whose backward pass is an LRP rule in gradient form (``R = a * g``).

The forward of each is the original computation, so the model's output is unchanged; only the backward
differs from the plain gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Tensor = torch.Tensor


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
        g_a = ctx.record.trace.layer_backward(ctx.record, a, z, g)
        return g_a, None, None, None


class BatchNormFunction(torch.autograd.Function):
    """BatchNorm with fixed statistics, ``y = s x + t``. Merged into the layer before it, its backward is the
    identity (the layer's rule sees the merged map); otherwise it is a linear map with bias (LRP-0: ``s g``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, compute: Callable[[Tensor], Tensor], record: Any) -> Tensor:
        ctx.record = record
        return compute(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        record = ctx.record
        if record.fused:
            return g, None, None
        return g * record.scale.reshape(record.broadcast_shape), None, None


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
        return _safe_ratio(g * y, x), None


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
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            mean = ctx.average(x_)
            (g_x,) = torch.autograd.grad(mean, x_, g * y / stabilize(mean.detach(), 1e-12))
        return g_x, None, None


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
        relevance_in = ctx.rule.relevance(x, y, g * y)
        if relevance_in.shape != x.shape:
            from .errors import RuleError
            raise RuleError(f"{ctx.rule!r} for module '{ctx.name}' returned relevance of shape "
                            f"{tuple(relevance_in.shape)}; the module input has shape {tuple(x.shape)}")
        return _safe_ratio(relevance_in, x), None, None, None


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
        if ctx.record.attention:
            return y * (g - (g * y).sum(ctx.dim, keepdim=True)), None, None, None
        return _safe_ratio(g * y, x), None, None, None


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
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            (g_x,) = torch.autograd.grad(ctx.linear(x_), x_, g)
        return g_x, None, None
