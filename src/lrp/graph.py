"""Capture of the operations a model's forward actually runs, with the module each one runs in.

A :class:`Trace` intercepts every torch function during one eager forward (``TorchFunctionMode``), so
functional ops (``torch.flatten``, ``+``, ``torch.cat``, ``F.relu``), a module called twice, weights shared
by two calls and data-dependent control flow are all seen as they happen. Forward hooks on every module,
removed again when the trace ends, keep the stack of modules an op runs in. Each op is classified by
``lrp.optable``; layer ops, BatchNorm and elementwise non-linearities are replaced by the autograd
functions of ``lrp.functions``, whose backward is the LRP rule. Rules are chosen after the forward has run,
when the whole sequence of layers (and which BatchNorm follows which layer) is known.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import optable
from .composites import Composite, LayerInfo, module_rule_for
from .errors import RuleError, UnsupportedOperationError
from . import attention
from .functions import (BatchNormFunction, IdentityRuleFunction, LayerFunction, LinearizedFunction,
                        MaxAsAveragePoolFunction, ModuleRuleFunction, ScaleGradientFunction, SoftmaxFunction)
from .layers import LinearOp, make_linear_op
from .rules import Epsilon, LayerContext, LayerRule

Tensor = torch.Tensor
_CONV_MODULES = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _map(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple (e.g. torch.return_types)
        return type(obj)(*(_map(item, fn) for item in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(item, fn) for item in obj)
    if isinstance(obj, dict):
        return {key: _map(value, fn) for key, value in obj.items()}
    return obj


def _needs_grad(obj: Any) -> bool:
    return any(t.requires_grad for t in _tensors(obj))


_NO_GRADIENT = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout,
                torch.memory_format)


def _gradient_free(obj: Any) -> bool:
    """Whether ``obj`` (an op's result) certainly carries no gradient: tensors that need none, numbers, shapes,
    dtypes, ... (so the op only looked at its operands: ``x.shape``, ``x.dim()``, ``x.detach()``). Anything else
    (an iterator over a tensor, an object lrp does not know) may, and counts as a use of the operands."""
    if isinstance(obj, Tensor):
        return not obj.requires_grad
    if isinstance(obj, (list, tuple)):
        return all(_gradient_free(item) for item in obj)
    if isinstance(obj, dict):
        return all(_gradient_free(item) for item in obj.values())
    return isinstance(obj, _NO_GRADIENT)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _nonnegative_number(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, numbers.Real) and float(value) >= 0)  # NaN is not


def _frozen(value: Any) -> Any:
    """A hashable form of an op parameter (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    return value


def _op_key(op: LinearOp) -> tuple:
    """Everything that defines a linear op's map besides its weights: kind, dimensions, stride, padding,
    dilation, groups, output padding (whatever fields ``LinearOp`` compares)."""
    return tuple(_frozen(getattr(op, f.name)) for f in dataclasses.fields(op) if f.compare)


@dataclass(eq=False)
class BatchNormRecord:
    name: str
    module: Optional[torch.nn.Module]
    scale: Tensor
    shift: Tensor
    broadcast_shape: tuple
    producer: Optional["LayerRecord"]  # the layer whose output this BatchNorm normalises, if any
    fused: bool = False


@dataclass(eq=False)
class SoftmaxRecord:
    attention: bool = False  # its output is multiplied with another activation


@dataclass(eq=False)
class LayerRecord:
    """One call of a dense/convolution layer."""

    trace: "Trace"
    index: int
    name: str
    module: Optional[torch.nn.Module]
    op: LinearOp
    weight: Tensor
    bias: Optional[Tensor]
    input_id: int
    reads_input: bool
    replay: Optional[Callable[[Tensor], Tensor]] = None
    root: Optional[Tensor] = None  # the relevance root the layer input re-indexes (for input rules)
    batch_first: bool = True  # False inside decomposed ops, whose tensors may put the batch elsewhere
    nonnegative_input: bool = False
    uses: int = 0
    bn: Optional[BatchNormRecord] = None
    rule: Optional[LayerRule] = None
    total: Optional[Tensor] = None  # per-sample relevance summed at the layer output
    relevance: Optional[Tensor] = None  # relevance at the layer output (record_layers=True)
    _effective: Optional[tuple] = None

    @property
    def kind(self) -> str:
        return self.op.kind

    def effective_params(self) -> tuple[Tensor, Optional[Tensor]]:
        """Weight and bias of the layer with a following BatchNorm merged in: ``W' = s W``, ``b' = s b + t``."""
        if self.bn is None:
            return self.weight, self.bias
        if self._effective is None:
            s, t = self.bn.scale, self.bn.shift
            w = self.weight * s.reshape((-1,) + (1,) * (self.weight.ndim - 1))
            b = t if self.bias is None else self.bias * s + t
            self._effective = (w, b)
        return self._effective

    def effective_output(self, z: Tensor) -> Tensor:
        if self.bn is None:
            return z
        shape = self.op.scale_shape(z)
        return torch.addcmul(self.bn.shift.reshape(shape), z, self.bn.scale.reshape(shape))


class _Mode(TorchFunctionMode):
    def __init__(self, trace: "Trace"):
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.trace.dispatch(func, args, kwargs or {})


_SIGNATURES: dict = {}


def _signature(func: Callable) -> Optional[inspect.Signature]:
    if func not in _SIGNATURES:
        try:
            _SIGNATURES[func] = inspect.signature(func)
        except (TypeError, ValueError):
            _SIGNATURES[func] = None
    return _SIGNATURES[func]


def _identity(t: Tensor) -> Tensor:
    return t


def _decomposed(replacement: Callable) -> Callable:
    """Handler that runs ``replacement`` (plain torch ops) instead of a fused op, with every step captured."""
    def run(trace: "Trace", func: Callable, args: tuple, kwargs: dict) -> Any:
        if not _needs_grad((args, kwargs)):
            return func(*args, **kwargs)
        trace.decomposing += 1
        try:
            with _Mode(trace):
                return replacement(*args, **kwargs)
        finally:
            trace.decomposing -= 1
    return run


class Trace:
    """State of one ``explain`` call: the forward's layer records and the backward's results."""

    _SPECIAL: dict[str, Callable[..., Any]]  # op name -> handler of an op with a rule of its own (set below)

    def __init__(self, model: torch.nn.Module, composite: Composite, x: Tensor, record_layers: bool):
        self.model = model
        self.composite = composite
        self.x = x
        self.record_layers = record_layers
        self.layers: list[LayerRecord] = []
        self.batchnorms: list[BatchNormRecord] = []
        self.produced: dict[int, LayerRecord] = {}
        # tensors that are re-indexings of a relevance root (the input, or embedding vectors of token ids):
        # id -> (tensor, replay from the root, root)
        self.routed: dict[int, tuple[Tensor, Callable[[Tensor], Tensor], Tensor]] = {}
        if x.is_floating_point():
            self.routed[id(x)] = (x, _identity, x)
        # an image: channels plus 2 or 3 spatial dimensions (what the "pixels" position key needs)
        self.image_input = x.is_floating_point() and x.ndim in (4, 5)
        self.stale: dict[int, tuple[Tensor, Tensor]] = {}
        self.stack: list[tuple[str, torch.nn.Module, Any, Any]] = []
        self.names = {module: name for name, module in model.named_modules()}
        self.calls: dict[str, int] = {}
        self.opaque = 0
        self.trusted = 0
        self.decomposing = 0
        self.direct: dict[int, Tensor] = {}  # id(root) -> relevance given to it directly by input rules
        self.nonnegative: dict[int, Tensor] = {}  # tensors known to be >= 0 by how they were made
        self.gates: dict[int, Tensor] = {}  # outputs of sigmoid-like activations (and their re-indexings)
        self.softmaxes: dict[int, tuple[Tensor, SoftmaxRecord]] = {}
        # outputs of possible output heads (sigmoid, softmax / log-softmax over dim 1 of a 2-D input) and their
        # pure reshapes: id -> (tensor, head kind, the head's input)
        self.heads: dict[int, tuple[Tensor, str, Tensor]] = {}
        self.token_leaves: list[Tensor] = []  # embedding outputs when the model input is token ids
        self._cache: dict = {}
        self._keep: list = []  # tensors whose ids are used as keys

    # ------------------------------------------------------------------ capture
    def capture(self) -> "_Capture":
        return _Capture(self)

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        rule = None if (self.opaque or self.trusted) else module_rule_for(module, self.composite)
        name = self.names.get(module, type(module).__name__)
        self.stack.append((name, module, rule, (args, kwargs)))
        if rule is not None:
            if rule.opaque:
                self.opaque += 1
            else:
                self.trusted += 1

    def _post_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        result = self._module_rule(module, output)
        if module is self.model:  # relevance starts at the model's output: a use of it
            final = self._fresh(output if result is None else result)
            self._consume((final, getattr(final, "logits", None)))
        return result

    def _module_rule(self, module: torch.nn.Module, output: Any) -> Any:
        name, _, rule, call_args = self.stack.pop()
        if rule is None:
            return None
        if not rule.opaque:
            self.trusted -= 1
            return None
        self.opaque -= 1
        if self.opaque or output is None:
            return None
        inputs = [t for t in _tensors(self._fresh(call_args)) if t.requires_grad]
        if not inputs:
            return None
        if len(inputs) > 1 or not isinstance(output, Tensor):
            raise RuleError(f"{rule!r} registered for module '{name}' ({type(module).__name__}) needs a module with "
                            f"one input that depends on the model input and one tensor output; this call has "
                            f"{len(inputs)} such inputs and returns {type(output).__name__}")
        self._consume(inputs)  # the ops inside ran without gradient: the rule is the input's one use here
        return ModuleRuleFunction.apply(inputs[0], output.detach(), rule, name)

    def where(self) -> str:
        if not self.stack:
            return "the model's forward"
        name, module, _, _ = self.stack[-1]
        return f"module '{name or '<model>'}' ({type(module).__name__})"

    # ------------------------------------------------------------------ dispatch
    def _fresh(self, obj: Any) -> Any:
        """Replace tensors that an in-place op (run out of place here) has superseded by their new value."""
        if not self.stale:
            return obj

        def latest(t: Tensor) -> Tensor:
            while id(t) in self.stale:
                t = self.stale[id(t)][1]
            return t
        return _map(obj, latest)

    def dispatch(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Every torch function the forward calls comes here. What the op does to the relevance is up to its
        handler; what it does to the bookkeeping is done here, once, for every op and every handler: it counts as
        a use of its operands (BatchNorm merging needs to know that a layer output feeds nothing else) and its
        output may be known to be >= 0."""
        args, kwargs = self._fresh(args), self._fresh(kwargs)
        if self.opaque:  # inside a module with an opaque rule: no gradient (the rule's input is counted there)
            with torch.no_grad():
                return func(*args, **kwargs)
        name = optable.op_name(func)
        out = func(*args, **kwargs) if self.trusted else self._handle(name, func, args, kwargs)
        if name == "__setitem__" or not _gradient_free(out):
            self._consume((args, kwargs))
        if self.trusted or not _needs_grad(out):
            return out
        name = optable.out_of_place(name)  # ``relu_``, ``x += y`` are run out of place, as ``relu``, ``x + y``
        if name in optable.NONNEGATIVE_OUTPUT or self._keeps_nonnegative(name, args, kwargs):
            for t in _tensors(out):
                if t.is_floating_point():
                    self.nonnegative[id(t)] = t
        return out

    def _handle(self, name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
        if name in optable.LAYERS:
            return self._layer(name, func, args, kwargs)
        if name == optable.BATCHNORM:
            return self._batch_norm(func, args, kwargs)
        special = self._SPECIAL.get(name)
        if special is not None:
            return special(self, func, args, kwargs)
        if name in optable.INPLACE_DUNDER or (name.endswith("_") and not name.startswith("__")
                                              and name not in optable.KEEP_INPLACE) or name == "__setitem__":
            return self._inplace(func, name, args, kwargs)
        source = None
        if kwargs.get("inplace") or (name in _POSITIONAL_INPLACE and len(args) > 1):
            args, kwargs, source = self._without_inplace(func, args, kwargs)
        out = self._compute(name, func, args, kwargs)
        if source is not None and out is not source:
            self.stale[id(source)] = (source, out)
        return out

    def _compute(self, name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
        grad_args = [t for t in _tensors((args, kwargs)) if t.requires_grad]
        if not grad_args:
            return func(*args, **kwargs)
        if name in optable.IDENTITY and len(grad_args) == 1 and args and args[0] is grad_args[0]:
            rest = args[1:]
            out = IdentityRuleFunction.apply(args[0], lambda t: func(t, *rest, **kwargs))
            if name in optable.GATES:
                self.gates[id(out)] = out
            if name in optable.HEADS:
                self._mark_head(name, args[0], args[1] if len(args) > 1 else kwargs.get("dim"), out)
            return out
        if name in optable.MAXPOOL and self.composite.maxpool == "average":
            return self._max_as_average(name, func, args, kwargs)
        if name in optable.PRODUCT and len(grad_args) > 1:
            return self._product(name, func, args, kwargs, grad_args)
        out = func(*args, **kwargs)
        if not _needs_grad(out):
            return out
        if name in optable.GRADIENT:
            if name in optable.ROUTE:
                self._mark_routed(func, args, kwargs, out, grad_args)
                self._follow(grad_args, out)
            if name in optable.RESHAPE and len(grad_args) == 1 and id(grad_args[0]) in self.heads \
                    and isinstance(out, Tensor):
                _, kind, head_input = self.heads[id(grad_args[0])]
                self.heads[id(out)] = (out, kind, head_input)
            return out
        if name in optable.PRODUCT:
            return out
        if name in optable.DIVISION and len(grad_args) == 1 and args and args[0] is grad_args[0]:
            return out
        raise self._unsupported(name, grad_args)

    def _product(self, name: str, func: Callable, args: tuple, kwargs: dict, grad_args: list) -> Any:
        """A product of activations: a gate (sigmoid-like factor) passes all relevance to the signal; otherwise
        the AttnLRP uniform rule gives each of the k factors 1/k of the product's relevance."""
        weights = [t for t in grad_args if id(t) in self.softmaxes]
        for t in weights:
            self.softmaxes[id(t)][1].attention = True
        if weights and self.composite.attention == "cp":
            # CP-LRP: attention weights are held fixed, relevance flows through the values only
            held = {id(t) for t in weights}
            free = [t for t in grad_args if id(t) not in held]
            out = func(*_map(args, lambda t: t.detach() if id(t) in held else t),
                       **_map(kwargs, lambda t: t.detach() if id(t) in held else t))
            return out if len(free) <= 1 else ScaleGradientFunction.apply(out, 1.0 / len(free))
        if name in optable.ELEMENTWISE_PRODUCT and len(grad_args) == 2:
            gates = [t for t in grad_args if id(t) in self.gates]
            if len(gates) == 1:
                gate = gates[0]
                return func(*_map(args, lambda t: t.detach() if t is gate else t),
                            **_map(kwargs, lambda t: t.detach() if t is gate else t))
        out = func(*args, **kwargs)
        return ScaleGradientFunction.apply(out, 1.0 / len(grad_args))

    def _unsupported(self, name: str, grad_args: list) -> UnsupportedOperationError:
        detail = ""
        if name in optable.DIVISION:
            detail = " Here the divisor depends on the input, so it is not a linear map of the input."
        return UnsupportedOperationError(
            f"lrp has no relevance rule for torch op '{name}' called in {self.where()}.{detail} Explaining past it "
            f"would give a silently wrong heatmap. Ways out: if the op sits in a module of your own, register a rule "
            f"for that module type with lrp.register_module_rule(YourModule, lrp.rules.Pass()) (elementwise: "
            f"relevance passes through) or lrp.rules.Gradient() (linear or piecewise-linear through zero), or "
            f"subclass lrp.rules.ModuleRule.")

    def _consume(self, obj: Any) -> None:
        """Count a use of each input-dependent tensor in ``obj``; a BatchNorm is merged into the layer before it
        only if the layer's output has exactly one use, the BatchNorm. Called for every op (``dispatch``), for
        the input of a module rule and for the model's output (where relevance starts): nothing else consumes
        a tensor."""
        for t in _tensors(obj):
            if t.requires_grad:
                record = self.produced.get(id(t))
                if record is not None:
                    record.uses += 1

    # ------------------------------------------------------------------ signs
    def _known_nonnegative(self, t: Tensor) -> bool:
        """An input-dependent tensor is >= 0 if the ops that made it say so; any other tensor (a constant,
        parameter or buffer: fixed during explain) if its values are."""
        if t.requires_grad:
            return id(t) in self.nonnegative
        if t.dtype == torch.bool:
            return True
        if t.is_complex():
            return False
        return bool((t >= 0).all())  # NaN is not >= 0

    def _keeps_nonnegative(self, name: str, args: tuple, kwargs: dict) -> bool:
        """Whether the output of op ``name`` is >= 0 because every operand that is a value is (see
        ``optable.KEEPS_SIGN``). Cheap checks first: the values of constants are only looked at when every
        input-dependent operand is already known to be >= 0."""
        if name in optable.SUBTRACT or name in optable.DIVISION:
            return self._difference_or_ratio_nonnegative(name, args, kwargs)
        spec = optable.KEEPS_SIGN.get(name)
        if spec is None:
            return False
        tensors, numbers_ = spec
        values: list[Any]
        if numbers_ == optable.ALL:
            values = [v for v in (*args, *kwargs.values()) if isinstance(v, numbers.Number)]
        else:
            values = [args[i] if len(args) > i else kwargs.get(key) for i, key in numbers_]
        if not all(v is None or _nonnegative_number(v) for v in values):
            return False
        if name in ("interpolate", "upsample"):
            mode = args[3] if len(args) > 3 else kwargs.get("mode", "nearest")
            if mode not in optable.RESAMPLING_KEEPS_SIGN:
                return False
        if tensors == optable.FIRST:
            first = args[0] if args else kwargs.get("input", kwargs.get("self"))
            operands = [first] if isinstance(first, Tensor) else []
        else:
            operands = list(_tensors((args, kwargs)))
        if not operands or not all(self._known_nonnegative(t) for t in operands if t.requires_grad):
            return False
        return all(self._known_nonnegative(t) for t in operands if not t.requires_grad)

    def _difference_or_ratio_nonnegative(self, name: str, args: tuple, kwargs: dict) -> bool:
        """``x - alpha y`` is >= 0 when ``x >= 0`` and ``alpha y <= 0``; ``x / y`` when ``x >= 0`` and ``y > 0``."""
        x = args[0] if args else kwargs.get("input")
        y: Any = args[1] if len(args) > 1 else kwargs.get("other")
        if not (isinstance(x, Tensor) and x.requires_grad and self._known_nonnegative(x)):
            return False
        if name in optable.DIVISION:
            if _is_number(y):
                return y > 0
            return isinstance(y, Tensor) and not y.requires_grad and not y.is_complex() and bool((y > 0).all())
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
            return self._known_nonnegative(y)
        return not y.requires_grad and (y.dtype == torch.bool or bool((y <= 0).all()))

    def _follow(self, grad_args: list, out: Any) -> None:
        """Gates and attention weights stay what they are through reshapes, expansions and dropout."""
        if len(grad_args) != 1:
            return
        source = id(grad_args[0])
        if source in self.gates:
            for t in _tensors(out):
                self.gates[id(t)] = t
        if source in self.softmaxes:
            for t in _tensors(out):
                self.softmaxes[id(t)] = (t, self.softmaxes[source][1])

    def _mark_head(self, name: str, x: Tensor, dim: Any, out: Tensor) -> None:
        """Remember ``out`` as a possible output head: any sigmoid; a softmax or log-softmax only over the class
        dimension of a (batch, classes) input (a softmax elsewhere, e.g. inside attention, is no head)."""
        if name != "sigmoid":
            if dim is None:  # F.softmax's implicit dimension: 1 for a 2-D input
                dim = 0 if x.ndim in (0, 1, 3) else 1
            if x.ndim != 2 or dim not in (1, -1):
                return
        self.heads[id(out)] = (out, name, x)

    def head_of(self, out: Tensor) -> Optional[tuple[str, Tensor]]:
        """``(kind, logits)`` when the model output ``out`` is a head's output (or a pure reshape of it);
        ``logits``, the head's input reshaped like ``out``, is still part of the autograd graph."""
        entry = self.heads.get(id(out))
        if entry is None or entry[0] is not out:
            return None
        _, kind, head_input = entry
        if kind != "sigmoid" and (out.ndim != 2 or head_input.shape != out.shape):
            return None  # a softmax head only when the output is (batch, classes)
        return kind, head_input.reshape(out.shape)

    def _mark_routed(self, func: Callable, args: tuple, kwargs: dict, out: Any, grad_args: list) -> None:
        """Remember how to re-derive ``out`` from the model input when it is a re-indexing of it."""
        if not all(id(t) in self.routed for t in grad_args):
            return
        roots = {id(self.routed[id(t)][2]) for t in grad_args}
        if len(roots) != 1:
            return
        root = self.routed[id(grad_args[0])][2]
        replays = {id(t): self.routed[id(t)][1] for t in grad_args}

        def replay_all(xs: Tensor) -> Any:
            def swap(t: Tensor) -> Tensor:
                return replays[id(t)](xs) if id(t) in replays else t.detach()
            return func(*_map(args, swap), **_map(kwargs, swap))

        outputs = list(_tensors(out))
        for i, t in enumerate(outputs):
            if isinstance(out, Tensor):
                self.routed[id(t)] = (t, replay_all, root)
            else:
                def nth(xs: Tensor, i: int = i) -> Tensor:
                    return list(_tensors(replay_all(xs)))[i]
                self.routed[id(t)] = (t, nth, root)

    def _without_inplace(self, func: Callable, args: tuple, kwargs: dict) -> tuple:
        """Rewrite ``f(x, inplace=True)`` as ``f(x, inplace=False)``; later uses of ``x`` see the result."""
        source = next(iter(_tensors(args)), None)
        if source is None or not source.requires_grad:
            return args, kwargs, None
        signature = _signature(func)
        if signature is None:
            return args, {**kwargs, "inplace": False}, source
        bound = signature.bind(*args, **kwargs)
        if not bound.arguments.get("inplace"):
            return args, kwargs, None
        bound.arguments["inplace"] = False
        return tuple(bound.args), dict(bound.kwargs), source

    def _inplace(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        target = args[0] if args else None
        if not _needs_grad((args, kwargs)) or not isinstance(target, Tensor):
            return func(*args, **kwargs)
        if name == "__setitem__":
            new = target.clone()
            new.__setitem__(*args[1:], **kwargs)
            self.stale[id(target)] = (target, new)
            return None
        plain = optable.INPLACE_DUNDER.get(name, name.rstrip("_"))
        out_of_place = getattr(torch.Tensor, plain, None)
        if out_of_place is None or target._base is not None:
            raise UnsupportedOperationError(
                f"in-place op '{name}' in {self.where()} writes into "
                f"{'a view of ' if target._base is not None else ''}a tensor that depends on the input; lrp "
                f"cannot follow it. Write it out of place (e.g. 'y = x.{plain}(...)' instead of 'x.{name}(...)').")
        new = self._handle(optable.op_name(out_of_place), out_of_place, args, kwargs)
        if new is not target:
            self.stale[id(target)] = (target, new)
        return new

    # ------------------------------------------------------------------ special ops
    def _layer_name(self, op_name: str) -> tuple[str, Optional[torch.nn.Module]]:
        if self.stack:
            path, module, _, _ = self.stack[-1]
        else:
            path, module = "", None
        base = path if isinstance(module, _CONV_MODULES) else f"{path}:{op_name}" if path else op_name
        count = self.calls.get(base, 0)
        self.calls[base] = count + 1
        return (base if count == 0 else f"{base}#{count}"), module

    def _layer(self, name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
        op, a, weight, bias = make_linear_op(name, args, kwargs)
        if not (isinstance(a, Tensor) and a.requires_grad):
            if _needs_grad((weight, bias)):
                raise self._unsupported(name, [weight])
            return func(*args, **kwargs)
        if _needs_grad((weight, bias)):
            raise UnsupportedOperationError(
                f"'{name}' in {self.where()} uses weights computed from the input (a dynamic or hyper-network "
                f"layer); lrp's layer rules need fixed weights. Register a lrp.rules.ModuleRule for the module.")
        layer_name, module = self._layer_name(name)
        routed = self.routed.get(id(a))
        record = LayerRecord(self, len(self.layers), layer_name, module, op, weight, bias, id(a),
                             reads_input=routed is not None, replay=routed[1] if routed else None,
                             root=routed[2] if routed else None)
        record.batch_first = not self.decomposing
        record.nonnegative_input = id(a) in self.nonnegative
        self.layers.append(record)
        z = LayerFunction.apply(a, weight, bias, record)
        self.produced[id(z)] = record
        self._keep.append(z)
        return z

    def _batch_norm(self, func: Callable, args: tuple, kwargs: dict) -> Any:
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
                f"BatchNorm in {self.where()} normalises with the statistics of the batch (training mode or no "
                f"running statistics), so one sample's relevance would depend on the others. Call explain with "
                f"eval_mode=True (the default) on a model whose BatchNorm layers track running statistics.")
        var, mean = bound["running_var"], bound["running_mean"]
        weight = bound["weight"] if bound["weight"] is not None else torch.ones_like(var)
        bias = bound["bias"] if bound["bias"] is not None else torch.zeros_like(mean)
        scale = weight / torch.sqrt(var + bound["eps"])
        shift = bias - mean * scale
        name = self.stack[-1][0] if self.stack else "batch_norm"
        module = self.stack[-1][1] if self.stack else None
        record = BatchNormRecord(name, module, scale.detach(), shift.detach(),
                                 (-1,) + (1,) * (x.ndim - 2), self.produced.get(id(x)))
        self.batchnorms.append(record)
        return BatchNormFunction.apply(x, lambda t: func(t, *args[1:], **kwargs), record)

    def _max_as_average(self, name: str, func: Callable, args: tuple, kwargs: dict) -> Any:
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
                    f"maxpool='average' cannot treat the dilated max-pooling in {self.where()} as average pooling; "
                    f"use the default maxpool='max' (winner-take-all)")
            pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]

            def average(t: Tensor) -> Tensor:
                return pool(t, p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"], True)
        values = MaxAsAveragePoolFunction.apply(x, lambda t: _first(func(t, *args[1:], **kwargs)), average)
        if name.endswith("with_indices") or kwargs.get("return_indices"):
            return values, func(x.detach(), *args[1:], **kwargs)[1]
        return values

    # ------------------------------------------------------------------ ops with a rule of their own
    def _input_of(self, args: tuple, kwargs: dict, key: str = "input") -> Optional[Tensor]:
        x = args[0] if args else kwargs.get(key)
        return x if isinstance(x, Tensor) and x.requires_grad else None

    def _only_input_needs_grad(self, x: Tensor, args: tuple, kwargs: dict, what: str) -> None:
        others = [t for t in _tensors((args, kwargs)) if t.requires_grad and t is not x]
        if others:
            raise UnsupportedOperationError(
                f"{what} in {self.where()} has parameters computed from the input; lrp supports it with fixed "
                f"parameters only")

    def _softmax(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        x = self._input_of(args, kwargs)
        if x is None:
            return func(*args, **kwargs)
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is None:
            dim = -1
        record = SoftmaxRecord()
        out = SoftmaxFunction.apply(x, dim, lambda t: func(t, *args[1:], **kwargs), record)
        self.softmaxes[id(out)] = (out, record)
        self._mark_head("softmax", x, dim, out)
        return out

    def _linearized(self, func: Callable, args: tuple, kwargs: dict, linear: Callable[[Tensor], Tensor],
                    what: str) -> Any:
        x = self._input_of(args, kwargs)
        if x is None:
            return func(*args, **kwargs)
        self._only_input_needs_grad(x, args, kwargs, what)
        return LinearizedFunction.apply(x, lambda t: func(t, *args[1:], **kwargs), linear)

    def _layer_norm(self, func: Callable, args: tuple, kwargs: dict) -> Any:
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
        return self._linearized(func, args, kwargs, linear, "LayerNorm")

    def _rms_norm(self, func: Callable, args: tuple, kwargs: dict) -> Any:
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
        return self._linearized(func, args, kwargs, linear, "RMSNorm")

    def _grouped_norm(self, x: Tensor, groups: int, weight: Optional[Tensor], eps: float) -> Callable:
        n = x.shape[0]
        grouped = x.detach().reshape(n, groups, -1)
        std = torch.sqrt(grouped.var(-1, unbiased=False, keepdim=True) + eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)

        def linear(t: Tensor) -> Tensor:
            g = t.reshape(n, groups, -1)
            y = ((g - g.mean(-1, keepdim=True)) / std).reshape(t.shape)
            return y * weight.reshape(shape) if weight is not None else y
        return linear

    def _group_norm(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """GroupNorm with its per-group standard deviations held fixed."""
        p = {"weight": None, "eps": 1e-5, **dict(zip(("input", "num_groups", "weight", "bias", "eps"), args)),
             **kwargs}
        if not isinstance(p["input"], Tensor):
            return func(*args, **kwargs)
        linear = self._grouped_norm(p["input"], p["num_groups"], p["weight"], p["eps"])
        return self._linearized(func, args, kwargs, linear, "GroupNorm")

    def _instance_norm(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        keys = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
        p = {"weight": None, "use_input_stats": True, "eps": 1e-5, **dict(zip(keys, args)), **kwargs}
        x = p["input"]
        if not isinstance(x, Tensor) or not p["use_input_stats"]:
            return func(*args, **kwargs)  # fixed statistics: an affine map, LRP-0 = gradient
        linear = self._grouped_norm(x, x.shape[1], p["weight"], p["eps"])
        return self._linearized(func, args, kwargs, linear, "InstanceNorm")

    def _normalize(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``x / ||x||`` with the norm held fixed (a linear map of x, as for the other normalisations)."""
        p = {"p": 2.0, "dim": 1, "eps": 1e-12, **dict(zip(("input", "p", "dim", "eps"), args)), **kwargs}
        x = p["input"]
        if not isinstance(x, Tensor):
            return func(*args, **kwargs)
        norm = x.detach().norm(p["p"], p["dim"], keepdim=True).clamp_min(p["eps"])
        return self._linearized(func, args, kwargs, lambda t: t / norm, "F.normalize")

    def _embedding(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """With token ids as the model input, the embedding vectors become the leaves relevance flows to."""
        ids = args[0] if args else kwargs.get("input")
        out = func(*args, **kwargs)
        if ids is self.x and not self.x.is_floating_point():
            leaf = out.detach().requires_grad_(True)
            self.token_leaves.append(leaf)
            self.routed[id(leaf)] = (leaf, _identity, leaf)
            return leaf
        if _needs_grad(out):
            raise self._unsupported("embedding", [t for t in _tensors(args) if t.requires_grad])
        return out

    # ------------------------------------------------------------------ between forward and backward
    def finalize(self) -> None:
        """Merge BatchNorms into the layers before them and choose every layer's rule."""
        for bn in self.batchnorms:
            layer = bn.producer
            if (layer is not None and layer.uses == 1 and layer.bn is None and layer.kind in ("linear", "conv")
                    and (layer.kind == "conv" or len(bn.broadcast_shape) == 1)):
                layer.bn, bn.fused = bn, True
        count = len(self.layers)
        positions = self.composite.by_position
        key = "pixels" if "pixels" in positions and self.image_input else "first" if "first" in positions else None
        if (self.layers and key is not None and self.x.is_floating_point()
                and not any(layer.reads_input for layer in self.layers)):
            warnings.warn(
                f"the composite's first-layer rule {positions[key]!r} applies to layers that read "
                f"the model input, but in this model the input passes through other ops first (e.g. a normalisation "
                f"inside forward), so no layer gets it; the other rules apply. Move preprocessing out of the model "
                f"to use input rules.", stacklevel=4)
        for layer in self.layers:
            info = LayerInfo(layer.name, layer.module, layer.kind, layer.index, count, layer.reads_input,
                             self.image_input)
            layer.rule = self.composite.rule_for(info)
            if layer.rule.direct and not layer.reads_input:
                raise RuleError(
                    f"the composite gives layer '{layer.name}' the rule {layer.rule!r}, which assigns relevance "
                    f"to the layer's input regardless of its values and so must read the model input directly "
                    f"(through reshapes or indexing at most); this layer reads the output of other ops. Move input "
                    f"preprocessing out of the model, or use a composite without an input rule (e.g. "
                    f"'epsilon-plus' instead of 'epsilon-plus-flat').")

    def release(self) -> None:
        """Drop every tensor and record this trace holds. Autograd nodes keep records alive and records keep the
        trace, so without this the activations of each call would stay in memory."""
        for layer in self.layers:
            layer.trace = None  # type: ignore[assignment]  # released: the record is not used again
            layer.replay = layer.root = None
            layer._effective = None
            layer.bn = None  # layer <-> BatchNorm record is a reference cycle: break it, so refcounts free both
        for bn in self.batchnorms:
            bn.producer = None
        for container in (self.layers, self.batchnorms, self._keep, self.token_leaves):
            container.clear()
        for mapping in (self.produced, self.routed, self.stale, self.gates, self.softmaxes, self.heads, self._cache,
                        self.direct, self.nonnegative):
            mapping.clear()
        self.stack.clear()

    # ------------------------------------------------------------------ backward
    def _cached(self, key: tuple, owners: tuple, make: Callable[[], Tensor]) -> Tensor:
        """A weight-derived tensor, built once per call and shared by the layer calls whose ``key`` is equal.
        ``owners`` (the tensors whose ids are in the key) stay alive with the entry, so no id is reused."""
        if key not in self._cache:
            self._cache[key] = (owners, make())
        return self._cache[key][1]

    def layer_backward(self, layer: LayerRecord, a: Tensor, z: Tensor, g: Tensor) -> Optional[Tensor]:
        weight, bias = layer.effective_params()
        z = layer.effective_output(z)
        rule = layer.rule
        assert rule is not None, "finalize() chooses every layer's rule before the backward"
        # what a cached tensor may depend on: the weights (a merged BatchNorm included), the op's parameters
        # (stride, padding, dilation, groups, ...: the flat count, the w^2 sum and the z^B offset depend on
        # them), the rule and its parameters, the shape of one input sample, the dtype and the device; never
        # the input's values. Layer calls that agree on all of it (a module called twice) share the tensors.
        base = (id(weight), id(bias), _op_key(layer.op), id(rule), tuple(a.shape[1:]), a.dtype, a.device)
        owners = (weight, bias, rule)
        ctx = LayerContext(layer.op, a, z, weight, bias,
                           lambda key, make: self._cached(base + (key,), owners, make), layer.nonnegative_input)
        needs_relevance = self.record_layers or not (isinstance(rule, Epsilon) and rule.epsilon == 0.0)
        relevance_out = z * g if needs_relevance else None
        n = self.x.shape[0]
        if layer.batch_first and z.shape[0] == n:
            layer.total = (relevance_out.reshape(n, -1).sum(1) if relevance_out is not None
                           else torch.einsum("ni,ni->n", z.reshape(n, -1), g.reshape(n, -1)))
        else:  # the batch is not the first dimension here (e.g. inside attention): one total for the batch
            layer.total = relevance_out.sum() if relevance_out is not None else torch.vdot(z.flatten(), g.flatten())
        if self.record_layers:
            layer.relevance = relevance_out
        result = rule.backward(ctx, g, relevance_out)  # type: ignore[arg-type]  # None only for LRP-0 (unused)
        if not rule.direct:
            return result
        self._add_direct(layer, result)
        return None

    def _add_direct(self, layer: LayerRecord, relevance: Tensor) -> None:
        root, replay = layer.root, layer.replay
        assert root is not None and replay is not None, "an input rule's layer reads the model input"
        if layer.input_id == id(root):
            r_root = relevance
        else:
            with torch.enable_grad():
                shadow = root.detach().requires_grad_(True)
                (r_root,) = torch.autograd.grad(replay(shadow), shadow, relevance)
        key = id(root)
        self.direct[key] = r_root if key not in self.direct else self.direct[key] + r_root


Trace._SPECIAL = {
    "softmax": Trace._softmax,
    "layer_norm": Trace._layer_norm,
    "rms_norm": Trace._rms_norm,
    "group_norm": Trace._group_norm,
    "instance_norm": Trace._instance_norm,
    "normalize": Trace._normalize,
    "embedding": Trace._embedding,
    "scaled_dot_product_attention": _decomposed(attention.scaled_dot_product_attention),
    "multi_head_attention_forward": _decomposed(attention.multi_head_attention_forward),
}

_POSITIONAL_INPLACE = frozenset("relu relu6 elu selu celu leaky_relu hardtanh threshold rrelu dropout dropout1d "
                                "dropout2d dropout3d alpha_dropout feature_alpha_dropout silu hardswish mish".split())


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Capture:
    """Context manager: module hooks and the function mode, all removed on exit (also on error)."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.handles: list = []
        self.mode: Optional[_Mode] = None

    def __enter__(self) -> Trace:
        trace = self.trace
        try:
            for module in trace.model.modules():
                self.handles.append(module.register_forward_pre_hook(trace._pre_hook, with_kwargs=True))
                self.handles.append(module.register_forward_hook(trace._post_hook, with_kwargs=True,
                                                                 always_call=True))
            self.mode = _Mode(trace)
            self.mode.__enter__()
        except BaseException:
            self._remove()
            raise
        return trace

    def _remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.mode is not None:
                self.mode.__exit__(*exc)
        finally:
            self._remove()
