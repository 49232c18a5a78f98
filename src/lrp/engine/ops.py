"""The op registry: one entry per torch op name, saying how the op carries relevance.

:func:`handle` looks the op up and runs its entry; ``Trace.dispatch`` has already done the bookkeeping every
op shares. Entries for the families of ``optable`` (plain gradient, identity rule, products, division,
max-pooling) and the ops with a rule of their own (layers, BatchNorm, softmax, normalisations, embeddings,
fused attention) are registered below with :func:`register`. To support a new op, register one handler
``handler(trace, name, func, args, kwargs) -> output`` for its name; it runs only when an operand depends on
the model input (``own=True``: always, and it also handles ``inplace=True`` itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..composites import LayerInfo
from ..errors import UnsupportedOperationError
from . import attention, optable, recurrent
from .functions import (BatchNormFunction, IdentityRuleFunction, LayerFunction, LinearizedFunction,
                        MaxAsAveragePoolFunction, ScaleGradientFunction, SoftmaxFunction)
from .layers import make_linear_op
from .records import BatchNormRecord, LayerRecord, SoftmaxRecord
from .trees import first, grad_tensors, map_tensors, needs_grad, signature, tensors

if TYPE_CHECKING:
    from .capture import Trace

Tensor = torch.Tensor
Handler = Callable[["Trace", str, Callable, tuple, dict], Any]


@dataclass(frozen=True)
class Entry:
    handler: Handler
    own: bool = False  # runs also without input-dependent operands, and handles ``inplace=`` itself


REGISTRY: dict[str, Entry] = {}


def register(names: Any, *, own: bool = False) -> Callable[[Handler], Handler]:
    """Register ``handler`` for each op name in ``names`` (one name or an iterable of names)."""
    def add(handler: Handler) -> Handler:
        for name in ([names] if isinstance(names, str) else names):
            if name in REGISTRY:
                raise ValueError(f"op {name!r} is registered twice")
            REGISTRY[name] = Entry(handler, own)
        return handler
    return add


_POSITIONAL_INPLACE = frozenset("relu relu6 elu selu celu leaky_relu hardtanh threshold rrelu dropout dropout1d "
                                "dropout2d dropout3d alpha_dropout feature_alpha_dropout silu hardswish mish".split())


def handle(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Run op ``name`` during the capture, as its registry entry says."""
    entry = REGISTRY.get(name)
    if entry is not None and entry.own:
        return entry.handler(trace, name, func, args, kwargs)
    if name in optable.INPLACE_DUNDER or (name.endswith("_") and not name.startswith("__")
                                          and name not in optable.KEEP_INPLACE) or name == "__setitem__":
        return _inplace(trace, func, name, args, kwargs)
    source = None
    if kwargs.get("inplace") or (name in _POSITIONAL_INPLACE and len(args) > 1):
        args, kwargs, source = _without_inplace(func, args, kwargs)
    grad_args = grad_tensors((args, kwargs))
    if not grad_args:
        out = func(*args, **kwargs)
    elif entry is not None:
        out = entry.handler(trace, name, func, args, kwargs)
    else:
        out = func(*args, **kwargs)
        if needs_grad(out):
            raise unsupported(trace, name)
    if source is not None and out is not source:
        out = trace.supersede(source, out)
    return out


def unsupported(trace: "Trace", name: str, detail: str = "") -> UnsupportedOperationError:
    if name in optable.DIVISION and not detail:
        detail = " Here the divisor depends on the input, so it is not a linear map of the input."
    return UnsupportedOperationError(
        f"lrp has no relevance rule for torch op '{name}' called in {trace.where()}.{detail} Explaining past it "
        f"would give a silently wrong heatmap. Ways out: if the op sits in a module of your own, register a rule "
        f"for that module type with lrp.register_module_rule(YourModule, lrp.rules.Pass()) (elementwise: "
        f"relevance passes through) or lrp.rules.Gradient() (linear or piecewise-linear through zero), or "
        f"subclass lrp.rules.ModuleRule.")


# --------------------------------------------------------------------------- in place

def _without_inplace(func: Callable, args: tuple, kwargs: dict) -> tuple:
    """Rewrite ``f(x, inplace=True)`` as ``f(x, inplace=False)``; later uses of ``x`` see the result."""
    source = next(iter(tensors(args)), None)
    if source is None or not source.requires_grad:
        return args, kwargs, None
    sig = signature(func)
    if sig is None:
        return args, {**kwargs, "inplace": False}, source
    bound = sig.bind(*args, **kwargs)
    if not bound.arguments.get("inplace"):
        return args, kwargs, None
    bound.arguments["inplace"] = False
    return tuple(bound.args), dict(bound.kwargs), source


def _inplace(trace: "Trace", func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
    """An in-place op on an input-dependent tensor, run out of place (the result supersedes the target)."""
    target = args[0] if args else None
    if not needs_grad((args, kwargs)) or not isinstance(target, Tensor):
        return func(*args, **kwargs)
    if name == "__setitem__":
        new = target.clone()
        new.__setitem__(*args[1:], **kwargs)
        trace.supersede(target, new)
        return None
    plain = optable.INPLACE_DUNDER.get(name, name.rstrip("_"))
    out_of_place = getattr(torch.Tensor, plain, None)
    if out_of_place is None:
        raise UnsupportedOperationError(
            f"in-place op '{name}' in {trace.where()} writes into a tensor that depends on the input; lrp "
            f"cannot follow it. Write it out of place (e.g. 'y = x.{plain}(...)' instead of 'x.{name}(...)').")
    new = handle(trace, optable.op_name(out_of_place), out_of_place, args, kwargs)
    if new is not target:
        new = trace.supersede(target, new)
    return new


# --------------------------------------------------------------------------- the optable families

@register(optable.GRADIENT - optable.MAXPOOL)
def _gradient(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Re-indexing, linear and piecewise-linear ops: the gradient is their LRP rule."""
    out = func(*args, **kwargs)
    if not needs_grad(out):
        return out
    if name in optable.ROUTE:
        grad_args = grad_tensors((args, kwargs))
        trace.mark_routed(func, args, kwargs, out, grad_args)
        if len(grad_args) == 1:
            trace.follow(grad_args[0], out)
            if name in optable.RESHAPE and isinstance(out, Tensor):
                entry = trace.facts(grad_args[0])
                if entry is not None and entry.head is not None:
                    trace.note(out).head = entry.head
    elif name in optable.SUMS:  # attention weights plus a constant (a fixed positional attention) stay weights
        grad_args = grad_tensors((args, kwargs))
        if len(grad_args) == 1:
            trace.follow(grad_args[0], out, gate=False)
    return out


@register(optable.MAXPOOL)
def _max_pool(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Winner-take-all (the gradient), or with ``maxpool="average"`` relevance split as by average pooling."""
    if trace.composite.maxpool != "average":
        return func(*args, **kwargs)
    x = args[0]
    dims = int(name.split("pool")[1][0])
    pool: Callable[..., Tensor]
    if name.startswith("adaptive"):
        size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[dims - 1]

        def average(t: Tensor) -> Tensor:
            return pool(t, size)
    else:
        keys = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        p = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, **dict(zip(keys, args[1:])),
             **{k: v for k, v in kwargs.items() if k in keys}}
        if p["dilation"] not in (1, (1,) * dims, [1] * dims):
            raise UnsupportedOperationError(
                f"maxpool='average' cannot treat the dilated max-pooling in {trace.where()} as average pooling; "
                f"use the default maxpool='max' (winner-take-all)")
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]

        def average(t: Tensor) -> Tensor:
            return pool(t, p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"], True)
    values = MaxAsAveragePoolFunction.apply(x, lambda t: first(func(t, *args[1:], **kwargs)), average)
    if name.endswith("with_indices") or kwargs.get("return_indices"):
        return values, func(x.detach(), *args[1:], **kwargs)[1]
    return values


@register(optable.IDENTITY)
def _identity_rule(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Elementwise non-linearities: ``R_x = R_y``."""
    grad_args = grad_tensors((args, kwargs))
    if not (len(grad_args) == 1 and args and args[0] is grad_args[0]):
        out = func(*args, **kwargs)
        if needs_grad(out):
            raise unsupported(trace, name)  # e.g. clamp with bounds computed from the input
        return out
    rest = args[1:]
    out = IdentityRuleFunction.apply(args[0], lambda t: func(t, *rest, **kwargs), _ratio(name, rest, kwargs))
    if name in optable.GATES:
        trace.note(out).gate = True
    if name in optable.HEADS:
        trace.mark_head(name, args[0], args[1] if len(args) > 1 else kwargs.get("dim"), out)
    return out


_SQRT_HALF = 0.7071067811865476
_TANH_GELU = 0.7978845608028654  # sqrt(2 / pi)


def _ratio(name: str, rest: tuple, kwargs: dict) -> Optional[Callable[[Tensor], Tensor]]:
    """``f(x) / x`` written out for the identity rule's backward, for the activations of language models."""
    if name == "silu" and rest in ((), (False,)):  # F.silu(x, inplace) runs out of place here
        return torch.sigmoid
    if name == "gelu" and not rest:
        if kwargs.get("approximate", "none") == "tanh":
            return lambda t: torch.tanh(t.pow(3).mul_(0.044715).add_(t).mul_(_TANH_GELU)).add_(1.0).mul_(0.5)
        if kwargs.get("approximate", "none") == "none":
            return lambda t: torch.erf(t * _SQRT_HALF).add_(1.0).mul_(0.5)
    return None


@register(optable.PRODUCT)
def _product(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Linear in one input-dependent factor (the gradient). A product of activations: a gate (sigmoid-like
    factor) passes all relevance to the signal; otherwise the AttnLRP uniform rule gives each of the k
    factors 1/k of the product's relevance (CP-LRP: attention weights held fixed)."""
    grad_args = grad_tensors((args, kwargs))
    if len(grad_args) < 2:
        out = func(*args, **kwargs)
        if grad_args and name in optable.ELEMENTWISE_PRODUCT:  # attention weights scaled by a constant
            trace.follow(grad_args[0], out, gate=False)
        return out
    softmaxes = [(t, trace.facts(t)) for t in grad_args]
    weights = [t for t, entry in softmaxes if entry is not None and entry.softmax is not None]
    for t, entry in softmaxes:
        if entry is not None and entry.softmax is not None:
            entry.softmax.mark_attention()
    if weights and trace.composite.attention == "cp":
        held = {id(t) for t in weights}
        free = [t for t in grad_args if id(t) not in held]
        out = func(*map_tensors(args, lambda t: t.detach() if id(t) in held else t),
                   **map_tensors(kwargs, lambda t: t.detach() if id(t) in held else t))
        return out if len(free) <= 1 else ScaleGradientFunction.apply(out, 1.0 / len(free))
    if name in optable.ELEMENTWISE_PRODUCT and len(grad_args) == 2:
        gates = [t for t in grad_args if (entry := trace.facts(t)) is not None and entry.gate]
        if len(gates) == 1:
            gate = gates[0]
            return func(*map_tensors(args, lambda t: t.detach() if t is gate else t),
                        **map_tensors(kwargs, lambda t: t.detach() if t is gate else t))
    out = func(*args, **kwargs)
    return ScaleGradientFunction.apply(out, 1.0 / len(grad_args))


@register(optable.DIVISION)
def _division(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Division by a constant is linear (the gradient), and so is division by a reduced signal held fixed (a
    normalisation statistic: ``x / x.sum(-1, keepdim=True)``); another divisor that depends on the input has no
    rule."""
    if kwargs.get("rounding_mode") is not None:  # floor / trunc: piecewise constant, its gradient is 0
        raise unsupported(trace, name, f" With rounding_mode={kwargs['rounding_mode']!r} it is piecewise "
                                       f"constant: no relevance would pass.")
    divisor = args[1] if len(args) > 1 else kwargs.get("other")
    if isinstance(divisor, Tensor) and divisor.requires_grad and trace.is_reduced(divisor):
        fixed = divisor.detach()
        args = tuple(fixed if a is divisor else a for a in args)
        kwargs = {k: fixed if v is divisor else v for k, v in kwargs.items()}
        if not needs_grad((args, kwargs)):  # a constant over the reduced signal: a statistic of degree -1
            out = func(*args, **kwargs)
            trace.fix(out, "sum", moment=False, degree=-1.0)
            return out
    grad_args = grad_tensors((args, kwargs))
    out = func(*args, **kwargs)
    if len(grad_args) == 1 and args and args[0] is grad_args[0]:
        trace.follow(args[0], out, gate=False)  # attention weights renormalised (by a held-fixed sum) stay weights
        return out
    if not needs_grad(out):
        return out
    raise unsupported(trace, name)


@register(optable.MOMENT)
def _moment(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """A power or root of the signal (``x.pow(2)``, ``rsqrt(var + eps)``), computed without gradient: part of a
    normalisation statistic, held fixed. Of a reduced signal it is a statistic at once; otherwise it is a
    moment, which must be reduced (``mean``, ``sum``) before it meets the signal again (``Trace.dispatch``
    checks)."""
    x = args[0] if args else kwargs.get("input")
    grad_args = grad_tensors((args, kwargs))
    if not (isinstance(x, Tensor) and len(grad_args) == 1 and grad_args[0] is x):
        out = func(*args, **kwargs)
        if needs_grad(out):
            raise unsupported(trace, name)  # e.g. 2 ** x, x ** x
        return out
    fixed = x.detach()
    out = func(fixed, *args[1:], **{k: fixed if v is x else v for k, v in kwargs.items()})
    trace.fix(out, name, moment=not trace.is_reduced(x), degree=power_degree(name, args, kwargs, 1.0),
              source=trace.origin_of(x))
    return out


def power_degree(name: str, args: tuple, kwargs: dict, base: Optional[float]) -> Optional[float]:
    """How ``name(t)`` scales when ``t`` scales with degree ``base`` (``None``: not as a power)."""
    if base is None:
        return None
    if name in ("pow", "float_power"):
        exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
        return base * float(exponent) if isinstance(exponent, (int, float)) and not isinstance(exponent, bool) \
            else None
    return base * {"square": 2.0, "sqrt": 0.5, "rsqrt": -0.5, "reciprocal": -1.0}[name]


@register(optable.SPREAD)
def _spread(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Variance, standard deviation, norm of the signal: a normalisation statistic, held fixed."""
    out = func(*map_tensors(args, lambda t: t.detach()), **map_tensors(kwargs, lambda t: t.detach()))
    trace.fix(out, name, moment=False, degree=2.0 if name == "var" else 1.0)
    return out


@register(("var_mean", "std_mean"))
def _spread_and_mean(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``var_mean`` / ``std_mean`` (timm's LayerNorm2d): the spread a statistic held fixed, the mean the signal."""
    x = args[0] if args else kwargs.get("input")
    spread, mean = func(*args, **kwargs)
    spread = spread.detach()
    trace.fix(spread, name, moment=False, degree=2.0 if name == "var_mean" else 1.0)
    if isinstance(x, Tensor) and mean.numel() < x.numel():
        trace.note(mean).reduced = True
    return spread, mean


# --------------------------------------------------------------------------- layers and BatchNorm

@register(optable.LAYERS, own=True)
def _layer(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Dense and convolution layers: the composite's rule (chosen after the forward)."""
    op, a, weight, bias = make_linear_op(name, args, kwargs)
    if not (isinstance(a, Tensor) and a.requires_grad):
        if needs_grad((weight, bias)):
            raise unsupported(trace, name)
        return func(*args, **kwargs)
    if needs_grad((weight, bias)):
        loose = [t for t in (weight, bias) if isinstance(t, Tensor) and t.requires_grad and t.is_leaf]
        if loose:  # not computed from the input: a tensor the model holds outside its parameters and buffers
            raise UnsupportedOperationError(
                f"'{name}' in {trace.where()} uses a weight of shape {tuple(loose[0].shape)} that requires "
                f"gradients but is not among the model's parameters and buffers, which lrp freezes while it "
                f"explains: a module held in a plain list or dict, or a tensor attribute with requires_grad=True. "
                f"Register it (nn.ModuleList / nn.ModuleDict, an nn.Parameter attribute, register_buffer) or call "
                f".requires_grad_(False) on it")
        raise UnsupportedOperationError(
            f"'{name}' in {trace.where()} uses weights computed from the input (a dynamic or hyper-network "
            f"layer); lrp's layer rules need fixed weights. Register a lrp.rules.ModuleRule for the module.")
    layer_name, module = trace.layer_name(name)
    route = trace.route_of(a)
    record = LayerRecord(len(trace.layers), layer_name, module, op, weight, bias, id(a),
                         reads_input=route is not None, replay=route[0] if route else None,
                         root=route[1] if route else None,
                         reads_image=route is not None and id(route[1]) in trace.image_leaves,
                         first=route is not None and (trace.first_leaves is None or id(route[1]) in trace.first_leaves))
    record.batch_first = not trace.decomposing
    record.nonnegative_input = trace.is_nonnegative(a)
    record.input_spec = (tuple(a.shape[1:]), a.dtype, a.device)
    if trace.keep_less:
        record.early_rule = trace.composite.rule_before_count(
            LayerInfo(layer_name, module, op.kind, record.index, -1, record.first, record.reads_image))
    trace.layers.append(record)
    z = LayerFunction.apply(a, weight, bias, record)
    record.hold(z, "z")
    facts = trace.note(z)
    facts.producer, facts.stage = record, "z"
    return z


@register("addmm", own=True)
def _addmm(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``bias + x @ W`` (Hugging Face's ``Conv1D``, as in GPT-2): a dense layer with weight ``W^T``."""
    p = {"beta": 1, "alpha": 1, **dict(zip(("input", "mat1", "mat2"), args)), **kwargs}
    bias, x, w = p["input"], p["mat1"], p["mat2"]
    if (p["beta"] != 1 or p["alpha"] != 1 or not isinstance(x, Tensor) or not x.requires_grad
            or not isinstance(w, Tensor) or not isinstance(bias, Tensor) or bias.ndim != 1):
        out = func(*args, **kwargs)
        if needs_grad(out):
            raise unsupported(trace, name, " lrp reads addmm as a dense layer only in the form bias + x @ W, with "
                                           "a bias vector and fixed W (beta = alpha = 1).")
        return out
    return _layer(trace, "linear", F.linear, (x, w.t(), bias), {})


@register("addcmul")
def _addcmul(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``input + value * t1 * t2``: linear (the gradient) while ``t1`` and ``t2`` do not both depend on the input
    (timm's ``Affine``: ``addcmul(beta, alpha, x)``)."""
    p = dict(zip(("input", "tensor1", "tensor2"), args)) | kwargs
    factors = [t for t in (p.get("tensor1"), p.get("tensor2")) if isinstance(t, Tensor) and t.requires_grad]
    if len(factors) > 1:
        raise unsupported(trace, name, " Both factors depend on the input: a product of activations inside "
                                       "addcmul; write it as input + value * (t1 * t2).")
    return func(*args, **kwargs)


@register(optable.BATCHNORM, own=True)
def _batch_norm(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """BatchNorm with fixed statistics, ``s x + t``: merged into the layer before it when that layer's output
    feeds nothing else (decided after the forward), else a linear map (LRP-0)."""
    if func is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    else:
        names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
    bound = {"weight": None, "bias": None, "training": False, "eps": 1e-5, **dict(zip(names, args)), **kwargs}
    x = bound["input"]
    if not (isinstance(x, Tensor) and x.requires_grad):
        return func(*args, **kwargs)
    if bound["training"] or bound["running_mean"] is None:
        raise UnsupportedOperationError(
            f"BatchNorm in {trace.where()} normalises with the statistics of the batch (training mode or no "
            f"running statistics), so one sample's relevance would depend on the others. Call explain with "
            f"eval_mode=True (the default) on a model whose BatchNorm layers track running statistics.")
    var, mean = bound["running_var"], bound["running_mean"]
    weight = bound["weight"] if bound["weight"] is not None else torch.ones_like(var)
    bias = bound["bias"] if bound["bias"] is not None else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + bound["eps"])
    shift = bias - mean * scale
    bn_name = trace.stack[-1][0] if trace.stack else "batch_norm"
    module = trace.stack[-1][1] if trace.stack else None
    entry = trace.facts(x)
    producer = entry.producer if entry is not None and entry.stage == "z" else None
    record = BatchNormRecord(bn_name, module, scale.detach(), shift.detach(), (-1,) + (1,) * (x.ndim - 2),
                             producer, sources=(var, mean, bound["weight"], bound["bias"], float(bound["eps"])))
    trace.batchnorms.append(record)
    out = BatchNormFunction.apply(x, lambda t: func(t, *args[1:], **kwargs), record)
    if producer is not None and mergeable(producer, record):  # the layer output's first use: may be merged
        producer.bn_candidate = record
        if trace.keep_less:
            producer.hold(out, "bn")
            facts = trace.note(out)
            facts.producer, facts.stage = producer, "bn"
    return out


def mergeable(layer: LayerRecord, bn: BatchNormRecord) -> bool:
    """Whether ``bn`` can be merged into ``layer``: it is the first use of the layer's output (then ``uses`` is
    still 0: it is counted after the op) and normalises it per output unit. It is merged if the output has no
    other use by the end of the forward (a later use brings the raw output back: ``Trace.consume``)."""
    return (bn.producer is layer and layer.uses == 0 and layer.kind in ("linear", "conv")
            and (layer.kind == "conv" or len(bn.broadcast_shape) == 1))


# --------------------------------------------------------------------------- ops with a rule of their own

def _input_of(args: tuple, kwargs: dict, key: str = "input") -> Optional[Tensor]:
    x = args[0] if args else kwargs.get(key)
    return x if isinstance(x, Tensor) and x.requires_grad else None


@register("softmax", own=True)
def _softmax(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """The AttnLRP softmax rule inside attention, the identity rule elsewhere (see ``SoftmaxFunction``)."""
    x = _input_of(args, kwargs)
    if x is None:
        return func(*args, **kwargs)
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None:  # F.softmax's implicit dimension
        dim = 0 if x.ndim in (0, 1, 3) else 1
    record = SoftmaxRecord(x.detach())
    out = SoftmaxFunction.apply(x, dim, lambda t: func(t, *args[1:], **kwargs), record)
    trace.note(out).softmax = record
    trace.mark_head("softmax", x, dim, out)
    return out


def _linearized(trace: "Trace", func: Callable, args: tuple, kwargs: dict, linear: Callable[[Tensor], Tensor],
                what: str) -> Any:
    x = _input_of(args, kwargs)
    if x is None:
        return func(*args, **kwargs)
    if any(t is not x for t in grad_tensors((args, kwargs))):
        raise UnsupportedOperationError(
            f"{what} in {trace.where()} has parameters computed from the input; lrp supports it with fixed "
            f"parameters only")
    return LinearizedFunction.apply(x, lambda t: func(t, *args[1:], **kwargs), linear)


@register("layer_norm", own=True)
def _layer_norm(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """LayerNorm with its standard deviation held fixed (AttnLRP): ``(x - mean(x)) / std * w``."""
    p = {"weight": None, "eps": 1e-5, **dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args)),
         **kwargs}
    x = p["input"]
    dims = tuple(range(-len(tuple(p["normalized_shape"])), 0))
    if not isinstance(x, Tensor):
        return func(*args, **kwargs)
    std = torch.sqrt(x.detach().var(dims, unbiased=False, keepdim=True) + p["eps"])

    def linear(t: Tensor) -> Tensor:
        y = (t - t.mean(dims, keepdim=True)) / std
        return y * p["weight"] if p["weight"] is not None else y
    return _linearized(trace, func, args, kwargs, linear, "LayerNorm")


@register("rms_norm", own=True)
def _rms_norm(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """RMSNorm with its scale held fixed: ``x / rms * w``."""
    p = {"weight": None, "eps": None, **dict(zip(("input", "normalized_shape", "weight", "eps"), args)),
         **kwargs}
    x = p["input"]
    if not isinstance(x, Tensor):
        return func(*args, **kwargs)
    dims = tuple(range(-len(tuple(p["normalized_shape"])), 0))
    eps = p["eps"] if p["eps"] is not None else torch.finfo(x.dtype).eps
    rms = torch.sqrt(x.detach().pow(2).mean(dims, keepdim=True) + eps)

    def linear(t: Tensor) -> Tensor:
        return t / rms * p["weight"] if p["weight"] is not None else t / rms
    return _linearized(trace, func, args, kwargs, linear, "RMSNorm")


def _grouped_norm(x: Tensor, groups: int, weight: Optional[Tensor], eps: float) -> Callable[[Tensor], Tensor]:
    n = x.shape[0]
    grouped = x.detach().reshape(n, groups, -1)
    std = torch.sqrt(grouped.var(-1, unbiased=False, keepdim=True) + eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)

    def linear(t: Tensor) -> Tensor:
        g = t.reshape(n, groups, -1)
        y = ((g - g.mean(-1, keepdim=True)) / std).reshape(t.shape)
        return y * weight.reshape(shape) if weight is not None else y
    return linear


@register("group_norm", own=True)
def _group_norm(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """GroupNorm with its per-group standard deviations held fixed."""
    p = {"weight": None, "eps": 1e-5, **dict(zip(("input", "num_groups", "weight", "bias", "eps"), args)),
         **kwargs}
    if not isinstance(p["input"], Tensor):
        return func(*args, **kwargs)
    linear = _grouped_norm(p["input"], p["num_groups"], p["weight"], p["eps"])
    return _linearized(trace, func, args, kwargs, linear, "GroupNorm")


@register("instance_norm", own=True)
def _instance_norm(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """InstanceNorm with its per-instance statistics held fixed (fixed running statistics: an affine map)."""
    keys = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    p = {"weight": None, "use_input_stats": True, "eps": 1e-5, **dict(zip(keys, args)), **kwargs}
    x = p["input"]
    if not isinstance(x, Tensor) or not p["use_input_stats"]:
        return func(*args, **kwargs)  # fixed statistics: an affine map, LRP-0 = gradient
    linear = _grouped_norm(x, x.shape[1], p["weight"], p["eps"])
    return _linearized(trace, func, args, kwargs, linear, "InstanceNorm")


@register("normalize", own=True)
def _normalize(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``x / ||x||`` with the norm held fixed (a linear map of x, as for the other normalisations)."""
    p = {"p": 2.0, "dim": 1, "eps": 1e-12, **dict(zip(("input", "p", "dim", "eps"), args)), **kwargs}
    x = p["input"]
    if not isinstance(x, Tensor):
        return func(*args, **kwargs)
    norm = x.detach().norm(p["p"], p["dim"], keepdim=True).clamp_min(p["eps"])
    return _linearized(trace, func, args, kwargs, lambda t: t / norm, "F.normalize")


@register("embedding", own=True)
def _embedding(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """With token ids as the model input, the embedding vectors become the leaves relevance flows to."""
    ids = args[0] if args else kwargs.get("input")
    out = func(*args, **kwargs)
    positions = trace.positions_of(ids) if isinstance(ids, Tensor) and trace.has_ids else None
    entry = trace.facts(ids) if isinstance(ids, Tensor) and positions is None else None
    if entry is not None and entry.from_ids:
        raise UnsupportedOperationError(
            f"the embedding in {trace.where()} reads integers computed from the token ids in a way lrp cannot map "
            f"back to the input's positions (e.g. two ids combined); embed the ids themselves, re-indexed or "
            f"changed one by one (view, slicing, masked_fill, where, clamp), or pass the embeddings as a float "
            f"input")
    if positions is not None:  # the input's ids, or a re-indexing of them (``ids.view(-1, n)`` in GPT-2)
        leaf = out.detach().requires_grad_(True)
        trace.token_leaves.append(leaf)
        trace.token_positions.append(positions)
        trace.note(leaf).route = (lambda t: t, leaf)
        return leaf
    if needs_grad(out):
        raise unsupported(trace, "embedding")
    return out


def _decomposed(replacement: Callable) -> Handler:
    """Handler that runs ``replacement`` (plain torch ops) instead of a fused op, with every step captured."""
    def run(trace: "Trace", name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
        if not needs_grad((args, kwargs)):
            return func(*args, **kwargs)
        trace.decomposing += 1
        try:
            with trace.mode():
                return replacement(*args, **kwargs)
        finally:
            trace.decomposing -= 1
    return run


register("scaled_dot_product_attention", own=True)(_decomposed(attention.scaled_dot_product_attention))
register("multi_head_attention_forward", own=True)(_decomposed(attention.multi_head_attention_forward))
register("lstm", own=True)(_decomposed(recurrent.lstm))
register("gru", own=True)(_decomposed(recurrent.gru))
register("rnn_tanh", own=True)(_decomposed(recurrent.rnn(torch.tanh)))
register("rnn_relu", own=True)(_decomposed(recurrent.rnn(torch.relu)))
register("lstm_cell", own=True)(_decomposed(recurrent.lstm_cell))
register("gru_cell", own=True)(_decomposed(recurrent.gru_cell))
register("rnn_tanh_cell", own=True)(_decomposed(recurrent.rnn_cell(torch.tanh)))
register("rnn_relu_cell", own=True)(_decomposed(recurrent.rnn_cell(torch.relu)))
