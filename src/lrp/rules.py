"""Propagation rules for linear layers (dense and convolution), written as modified gradients.

Notation: a layer computes ``z = W a + b``; ``R = z * g`` is the relevance of its output, where ``g`` is
the modified gradient that arrives from above. A rule returns ``g_a`` with ``R_a = a * g_a`` (most rules),
or the input relevance ``R_a`` itself (``direct`` rules, which do not scale with ``a`` and are only used
where the layer reads the model input). ``W+ = max(W, 0)``, ``W- = min(W, 0)``, ``a+``/``a-`` likewise,
and ``s(t) = t + eps * sign(t)`` (``sign(0) = +1``) is the stabilised denominator. Each formula is the one
Zennit 0.5.1 implements, so both tools agree; the fast paths below only reorder the algebra so that each
modified weight is built once per call and no forward pass is repeated needlessly.

Precision: rules compute in float32 for float16/bfloat16 layers (float64 stays float64; see
:func:`lrp.engine.precision.working_dtype`): :class:`LayerContext` casts the layer's input, output, weight and bias,
so every stabilised denominator (``s(z)``, ``s(z+)``, the sums of flat, w^2 and z^B) is accumulated and
divided in float32, where ``eps = 1e-6`` neither underflows (as it would in float16) nor is lost to rounding
(as it is next to values above ~1e-4 in bfloat16). ``lrp.engine.functions.LayerFunction`` casts the result back.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from .engine import values
from .engine.precision import to_working, working_dtype
from .engine.layers import LinearOp

Tensor = torch.Tensor
Bound = Union[float, Tensor]


def stabilize(t: Tensor, eps: float) -> Tensor:
    """``t + eps * sign(t)`` with ``sign(+0) = +1`` (and ``sign(-0) = -1``): a denominator that is never zero."""
    return t.abs().add_(eps).copysign_(t)  # elementwise arithmetic: several times faster than torch.where on CPUs


def _divide(relevance: Tensor, den: Tensor) -> Tensor:
    """``relevance / den``, overwriting the temporary ``den``."""
    return den.reciprocal_().mul_(relevance)


class LayerContext:
    """What a rule sees of one layer call: the op, its input ``a`` (absent for rules whose
    :meth:`LayerRule.needs_input` says they do not read it), its output ``z`` (bias and a merged BatchNorm
    included), the weights, a per-call cache of weight-derived tensors, and whether the input is known to be
    >= 0 (e.g. a ReLU output: no need to look)."""

    def __init__(self, op: LinearOp, a: Optional[Tensor], z: Tensor, weight: Tensor, bias: Optional[Tensor],
                 cache: Callable[[Any, Callable[[], Any]], Any], nonnegative: bool = False, rectified: bool = False):
        """Bring the layer to the working dtype (float32 for half-precision layers; see the module docstring);
        the cast weights are cached like the other weight-derived tensors. ``rectified``: ``z`` is the ReLU of
        the output, so the relevance ``R = z g`` is 0 wherever the output is <= 0."""
        self.op, self.nonnegative, self.rectified = op, nonnegative, rectified
        dtype = working_dtype(a, z, weight, bias)
        self.cache: Callable[[Any, Callable[[], Any]], Any] = lambda key, make: cache((key, dtype), make)
        self._a = None if a is None else to_working(a, dtype)
        self.z = to_working(z, dtype)
        self.weight, self.bias = weight, bias
        if weight.dtype != dtype:
            self.weight = self.cache("weight", lambda: weight.to(dtype))
        if bias is not None and bias.dtype != dtype:
            self.bias = self.cache("bias", lambda: bias.to(dtype))

    @property
    def a(self) -> Tensor:
        if self._a is None:
            raise RuntimeError("this rule reads the layer input, but its needs_input() said it does not, so the "
                               "input was not kept; make needs_input() return True")
        return self._a

    def fwd(self, a: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return self.op.forward(a, weight, bias)

    def vjp(self, u: Tensor, weight: Tensor) -> Tensor:
        return self.op.vjp(u, weight, self._a)

    def pos(self) -> Tensor:
        return self.cache("W+", lambda: self.weight.clamp(min=0))

    def neg(self) -> Tensor:
        return self.cache("W-", lambda: self.weight.clamp(max=0))

    def bias_out(self, bias: Optional[Tensor]) -> Union[Tensor, float]:
        """``bias`` shaped to broadcast against the output (0 when absent)."""
        if bias is None:
            return 0.0
        return bias.reshape(self.op.scale_shape(self.z))

    def b_pos(self) -> Union[Tensor, float]:
        return 0.0 if self.bias is None else self.bias_out(self.bias.clamp(min=0))

    def b_neg(self) -> Union[Tensor, float]:
        return 0.0 if self.bias is None else self.bias_out(self.bias.clamp(max=0))

    def has_negative_input(self) -> bool:
        return not self.nonnegative and values.read(self.a.amin() < 0)


class LayerRule:
    """Base class of the rules for linear layers."""

    #: True for rules whose input relevance does not factor as ``a * g`` (flat, w-square, z^B)
    direct: bool = False

    def needs_input(self, op: LinearOp) -> bool:
        """Whether the backward reads the layer input ``ctx.a`` (if not, the forward need not keep it)."""
        return True

    def builds_from_weights(self) -> bool:
        """Whether the backward builds tensors from the weights (``ctx.cache``): ``lrp.Explainer`` keeps those
        between calls, after checking the weights they came from."""
        return True

    def reads_relevance(self) -> bool:
        """Whether :meth:`backward` reads ``R`` (if not, it is not computed unless the layers' relevance is
        recorded)."""
        return True

    def sees_rectified_output(self) -> bool:
        """Whether the rule may be given ``relu(z)`` for ``z`` when a ReLU is the layer's only consumer: true when
        every term of its result carries a factor ``R`` or ``g`` (both 0 where ``z <= 0`` then) and no
        denominator can be 0 (``stabilize``), as for each rule defined in this module. A subclass that
        overrides :meth:`backward` gets the raw output (which costs memory)."""
        return type(self).backward.__module__ == __name__

    def backward(self, ctx: LayerContext, g: Tensor, R: Tensor) -> Tensor:  # pragma: no cover - interface
        """``g``: modified gradient at the output; ``R = z * g``: its relevance (not to be modified)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={_shown(v)}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def _shown(value: Any) -> str:
    """A rule's parameter as its repr shows it; a tensor by shape and dtype, not its values: reading them would make
    them part of what an ``lrp.Explainer`` recording checks (a guard) rather than an input of its program."""
    if isinstance(value, Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return repr(value)


class Epsilon(LayerRule):
    """LRP-epsilon: ``R_i = a_i sum_j w_ij R_j / s(z_j)``, i.e. ``g_a = W^T (g |z| / (|z| + eps))``."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = float(epsilon)

    def needs_input(self, op: LinearOp) -> bool:
        # W^T u needs no input (a convolution's takes its shape from it); a subclass with a backward of its own
        # may read it
        return op.kind != "linear" or type(self).backward is not Epsilon.backward

    def builds_from_weights(self) -> bool:
        return type(self).backward is not Epsilon.backward  # W^T u with the weights as they are

    def reads_relevance(self) -> bool:
        return type(self).backward is not Epsilon.backward

    def backward(self, ctx: LayerContext, g: Tensor, R: Tensor) -> Tensor:
        # R / s(z) = g z / (z + eps sign(z)) = g |z| / (|z| + eps): fewer passes over the output, and no R
        if self.epsilon == 0.0:
            return ctx.vjp(g, ctx.weight)
        size = ctx.z if ctx.rectified else ctx.z.abs()  # rectified: z >= 0
        den = size + self.epsilon
        ratio = torch.div(size, den, out=den)
        return ctx.vjp(ratio.mul_(g), ctx.weight)


class LRP0(Epsilon):
    """LRP-0: ``R_i = a_i sum_j w_ij R_j / z_j``; with ``R = z g`` this is exactly the gradient."""

    def __init__(self):
        super().__init__(0.0)

    def __repr__(self) -> str:
        return "LRP0()"


class ZPlus(LayerRule):
    """LRP-z+ (alpha=1, beta=0): ``R_i = sum_j (a+_i w+_ij + a-_i w-_ij) R_j / s(z+_j)``,
    ``z+ = W+ a+ + W- a- + b+``."""

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = float(stabilizer)

    def backward(self, ctx: LayerContext, g: Tensor, R: Tensor) -> Tensor:
        a, P, eps = ctx.a, ctx.pos(), self.stabilizer
        if not ctx.has_negative_input():  # z+ >= 0, so s(z+) = z+ + eps: the convolution adds eps as its bias
            shifted_bias = ctx.cache(("b+ +eps", eps), lambda: _plus(ctx.bias, eps, ctx))
            den = ctx.fwd(a, P, shifted_bias)
            return ctx.vjp(torch.div(R, den, out=den), P)
        b_pos = ctx.cache("b+", lambda: None if ctx.bias is None else ctx.bias.clamp(min=0))
        zp = ctx.fwd(a.clamp(min=0), P, b_pos).add_(ctx.fwd(a.clamp(max=0), ctx.neg()))
        u = _divide(R, zp.add_(eps))
        return torch.where(a >= 0, ctx.vjp(u, P), ctx.vjp(u, ctx.neg()))


def _plus(bias: Optional[Tensor], eps: float, ctx: LayerContext) -> Tensor:
    """``max(bias, 0) + eps`` per output unit (a bias of ``eps`` when the layer has none)."""
    if bias is None:
        units = ctx.z.shape[-1] if ctx.op.kind == "linear" else ctx.z.shape[1]
        return torch.full((units,), eps, dtype=ctx.z.dtype, device=ctx.z.device)
    return bias.clamp(min=0) + eps


class AlphaBeta(LayerRule):
    """LRP-alpha-beta: ``R_i = sum_j (alpha (a+ w+ + a- w-)_ij / s(z+_j) - beta (a+ w- + a- w+)_ij / s(z-_j)) R_j``,
    ``z+ = W+ a+ + W- a- + b+``, ``z- = W- a+ + W+ a- + b-``; ``alpha - beta = 1`` conserves."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if alpha < 0 or beta < 0:
            raise ValueError(f"AlphaBeta needs alpha >= 0 and beta >= 0, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    def backward(self, ctx: LayerContext, g: Tensor, R: Tensor) -> Tensor:
        a, z, P, W = ctx.a, ctx.z, ctx.pos(), ctx.weight
        alpha, beta, eps = self.alpha, self.beta, self.stabilizer
        b_pos = ctx.cache("b+", lambda: None if ctx.bias is None else ctx.bias.clamp(min=0))
        if not ctx.has_negative_input():
            # z+ = W+ a + b+ >= 0 and z- = z - z+ <= 0 (as b = b+ + b-)
            zp = ctx.fwd(a, P, b_pos)
            v = _divide(R, stabilize(z - zp, eps))
            u = _divide(R, zp.add_(eps))
            return ctx.vjp(u.mul_(alpha).add_(v, alpha=beta), P).sub_(ctx.vjp(v, W), alpha=beta)
        ap, an = a.clamp(min=0), a.clamp(max=0)
        wa_p = ctx.fwd(ap, W)
        wa_n = z - ctx.bias_out(ctx.bias) - wa_p
        pa_p, pa_n = ctx.fwd(ap, P), ctx.fwd(an, P)
        u = R / stabilize(pa_p + (wa_n - pa_n) + ctx.b_pos(), eps)
        v = R / stabilize((wa_p - pa_p) + pa_n + ctx.b_neg(), eps)
        A = ctx.vjp(alpha * u + beta * v, P)
        return torch.where(a >= 0, A - beta * ctx.vjp(v, W), alpha * ctx.vjp(u, W) - A)


class Gamma(LayerRule):
    """LRP-gamma (generalised to signed inputs and outputs, as in Zennit):
    for ``z_j > 0``: ``R_i = sum_j (a+_i (w + gamma w+)_ij + a-_i (w + gamma w-)_ij) R_j / s(z^pos_j)``,
    for ``z_j < 0``: the same with ``w+`` and ``w-`` swapped; ``z^pos``/``z^neg`` are the matching sums,
    with the bias ``b + gamma b+`` (resp. ``b + gamma b-``)."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6):
        self.gamma, self.stabilizer = float(gamma), float(stabilizer)

    def backward(self, ctx: LayerContext, g: Tensor, R: Tensor) -> Tensor:
        a, z, P, W = ctx.a, ctx.z, ctx.pos(), ctx.weight
        gamma, eps = self.gamma, self.stabilizer
        b_pos = ctx.cache("b+", lambda: None if ctx.bias is None else ctx.bias.clamp(min=0))
        if not ctx.has_negative_input():
            # with a >= 0: z^pos = z + gamma (W+ a + b+) > 0 where z > 0, z^neg = z + gamma (z - W+ a - b+) < 0
            # where z < 0; w holds R / s(z^pos) where z > 0 and R / s(z^neg) elsewhere (R = 0 where z = 0)
            pab = ctx.fwd(a, P, b_pos)
            if ctx.rectified:  # R = 0 where z <= 0: only z^pos, and W^T u + gamma W+^T u = (W + gamma W+)^T u
                den = pab.mul_(gamma).add_(z).add_(eps)
                return ctx.vjp(_divide(R, den), ctx.cache(("W+gamma W+", gamma), lambda: W + gamma * P))
            sign = torch.sign(z)  # arithmetic instead of masks: bool tensors cost a conversion each on CPUs
            den = torch.addcmul(pab.mul_(sign), z, 1.0 - sign, value=0.5)  # W+ a + b+, or z - (W+ a + b+)
            w = _divide(R, stabilize(den.mul_(gamma).add_(z), eps))  # den has the sign of z (R = 0 at z = 0)
            # u = w [z > 0], v = w [z < 0];  W^T (u + (1 + gamma) v) + gamma W+^T (u - v)
            out = ctx.vjp(w * sign, P).mul_(gamma)
            return out.add_(ctx.vjp(w.mul_(sign.mul_(-gamma / 2).add_(1 + gamma / 2)), W))
        positive = z > 0
        ap, an = a.clamp(min=0), a.clamp(max=0)
        wa_p = ctx.fwd(ap, W)
        wa_n = z - ctx.bias_out(ctx.bias) - wa_p
        pa_p, pa_n = ctx.fwd(ap, P), ctx.fwd(an, P)
        b = ctx.bias_out(ctx.bias)
        den_pos = wa_p + gamma * pa_p + b + gamma * ctx.b_pos() + wa_n + gamma * (wa_n - pa_n)
        den_neg = wa_p + gamma * (wa_p - pa_p) + b + gamma * ctx.b_neg() + wa_n + gamma * pa_n
        u = R * positive / stabilize(den_pos, eps)
        v = R * (z < 0) / stabilize(den_neg, eps)
        X, Y, Q = ctx.vjp(u, W), ctx.vjp(v, W), ctx.vjp(u - v, P)
        return torch.where(a >= 0, X + (1 + gamma) * Y + gamma * Q, (1 + gamma) * X + Y - gamma * Q)


def _ones_input(ctx: LayerContext) -> Tensor:
    return torch.ones((1,) + tuple(ctx.a.shape[1:]), dtype=ctx.a.dtype, device=ctx.a.device)


class Flat(LayerRule):
    """LRP-flat: ``R_i = sum_j R_j / s(n_j)``, ``n_j`` the number of inputs unit ``j`` sees."""

    direct = True

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = float(stabilizer)

    def backward(self, ctx: LayerContext, g: Tensor, R: Tensor) -> Tensor:
        ones_w = ctx.cache("ones", lambda: torch.ones_like(ctx.weight))
        count = ctx.cache("flat_count", lambda: ctx.fwd(_ones_input(ctx), ones_w))
        return ctx.vjp(R / stabilize(count, self.stabilizer), ones_w)


class WSquare(LayerRule):
    """LRP-w^2: ``R_i = sum_j w_ij^2 R_j / s(sum_i w_ij^2 + b_j^2)``."""

    direct = True

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = float(stabilizer)

    def backward(self, ctx: LayerContext, g: Tensor, R: Tensor) -> Tensor:
        w2 = ctx.cache("W^2", lambda: ctx.weight ** 2)
        b2 = None if ctx.bias is None else ctx.bias ** 2
        den = ctx.cache("w2_den", lambda: ctx.fwd(_ones_input(ctx), w2, b2))
        return ctx.vjp(R / stabilize(den, self.stabilizer), w2)


class ZBox(LayerRule):
    """LRP-z^B for inputs bounded by ``low <= a <= high``:
    ``R_i = sum_j (a_i w_ij - l_i w+_ij - h_i w-_ij) R_j / s(sum_i a_i w_ij - l_i w+_ij - h_i w-_ij)``.
    ``low``/``high``: scalars, one value per input channel, or tensors that broadcast to the input."""

    direct = True

    def __init__(self, low: Bound, high: Bound, stabilizer: float = 1e-6):
        self.low, self.high, self.stabilizer = low, high, float(stabilizer)

    def _bound(self, value: Bound, ctx: LayerContext) -> Tensor:
        a = ctx.a
        t = torch.as_tensor(value, dtype=a.dtype, device=a.device)
        if t.ndim == 1 and t.numel() == ctx.op.channel_shape(a)[0] and t.numel() > 1:
            t = t.reshape(ctx.op.channel_shape(a))
        try:
            return t.expand((1,) + tuple(a.shape[1:])) if t.ndim < a.ndim else t.expand_as(a)
        except RuntimeError as exc:
            from .errors import RuleError
            raise RuleError(
                f"ZBox bound of shape {tuple(t.shape)} does not broadcast to the layer input of shape "
                f"{tuple(a.shape)}; pass a scalar, one value per input channel ({ctx.op.channel_shape(a)[0]}), "
                f"or a tensor that broadcasts to the input") from exc

    def backward(self, ctx: LayerContext, g: Tensor, R: Tensor) -> Tensor:
        P, N, W = ctx.pos(), ctx.neg(), ctx.weight
        low = self._bound(self.low, ctx)
        high = self._bound(self.high, ctx)
        offset = ctx.cache("zbox_offset", lambda: ctx.fwd(low, P) + ctx.fwd(high, N))
        u = R / stabilize(ctx.z - ctx.bias_out(ctx.bias) - offset, self.stabilizer)
        return ctx.a * ctx.vjp(u, W) - low * ctx.vjp(u, P) - high * ctx.vjp(u, N)


# --------------------------------------------------------------------------- module rules


class ModuleRule:
    """A rule for a whole module of the user's own type, registered with :func:`lrp.register_module_rule`.

    Subclass and implement :meth:`relevance`; the module's inner operations are then not inspected.
    """

    #: False: the module runs as usual and its inner ops are trusted to be gradient-exact (see Gradient)
    opaque: bool = True

    def relevance(self, inputs: Tensor, output: Tensor, relevance: Tensor) -> Tensor:
        """Map the relevance of ``output`` to relevance of ``inputs`` (same shape as ``inputs``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Pass(ModuleRule):
    """Identity rule for elementwise modules: ``R_in = R_out`` (input and output of the same shape)."""

    def relevance(self, inputs: Tensor, output: Tensor, relevance: Tensor) -> Tensor:
        if inputs.shape != output.shape:
            from .errors import RuleError
            raise RuleError(f"Pass needs a module whose output has its input's shape; got {tuple(inputs.shape)} "
                            f"-> {tuple(output.shape)}")
        return relevance


class Gradient(ModuleRule):
    """Treat the module as one whose ops are all linear or piecewise linear through the origin, so that
    the plain gradient is its LRP-0 rule: its inner ops are run without being checked."""

    opaque = False

    def relevance(self, inputs: Tensor, output: Tensor, relevance: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError("Gradient is applied by running the module's ops as they are")

