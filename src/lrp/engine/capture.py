"""Capture: the operations a model's forward actually runs, with the module each one runs in.

A :class:`Trace` intercepts every torch function during one eager forward (``TorchFunctionMode``), so
functional ops (``torch.flatten``, ``+``, ``torch.cat``, ``F.relu``), a module called twice, weights shared
by two calls and data-dependent control flow are all seen as they happen. Forward hooks on every module,
removed again when the capture ends, keep the stack of modules an op runs in. :meth:`Trace.dispatch` does the
bookkeeping every op shares (in-place results, uses of layer outputs, signs) and hands the op to its entry in
the op registry (``lrp.engine.ops``), which replaces layer ops, BatchNorm and non-linearities by the autograd
functions of ``lrp.engine.functions``. What the capture learns about a tensor is one :class:`TensorFacts`.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.overrides import TorchFunctionMode

from ..composites import Composite, module_rule_for
from ..errors import RuleError, UnsupportedOperationError
from . import keras, ops, optable, signs, ssm, values
from .functions import ModuleRuleFunction
from .records import BatchNormRecord, LayerRecord, TensorFacts
from .trees import gradient_free, map_tensors, needs_grad, tensors

Tensor = torch.Tensor
_CONV_MODULES = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)


def _identity(t: Tensor) -> Tensor:
    return t


class _Mode(TorchFunctionMode):
    def __init__(self, trace: "Trace"):
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.trace.dispatch(func, args, kwargs or {})


class Trace:
    """What one forward under :meth:`capture` ran: its layer and BatchNorm calls and the facts about its
    tensors."""

    #: keep less for the backward: a merged BatchNorm's or a ReLU's output stands in for a layer output, dense
    #: layers under epsilon keep no input (``False``: the plain way, kept as the tests' reference)
    keep_less = True

    def __init__(self, model: torch.nn.Module, composite: Composite, x: Union[Tensor, Sequence[Tensor]]):
        self.model = model
        self.composite = composite
        self.inputs: list[Tensor] = [x] if isinstance(x, Tensor) else list(x)  # the model's inputs, in order
        self.x = self.inputs[0]  # the first: its first dimension is the batch
        self.has_ids = any(not t.is_floating_point() for t in self.inputs)  # token ids among the inputs
        # the float inputs that are images (channels and 2 or 3 spatial dimensions): what "pixels" rules read
        self.image_leaves = {id(t) for t in self.inputs if t.is_floating_point() and t.ndim in (4, 5)}
        # "first" layers for the composite (input rules such as z^B, whose bounds are one input's value range):
        # with one input, every layer that reads it (for token ids: the layers after the embedding); with several
        # inputs and float ones among them, the layers reading an image input, or, without images, a float input
        # (never the layers after an embedding: they read vectors the model made, not values of an input)
        floats = {id(t) for t in self.inputs if t.is_floating_point()}
        self.first_leaves = (self.image_leaves or floats) if len(self.inputs) > 1 and floats else None
        self.layers: list[LayerRecord] = []
        self.batchnorms: list[BatchNormRecord] = []
        self.known: dict[int, TensorFacts] = {}
        self.replaced: set[int] = set()  # ids of tensors an in-place op (run out of place) has superseded
        self.views: dict[int, list] = {}  # family -> weak references to the views of input-dependent tensors in it
        self.families: dict[int, tuple] = {}  # ``_cdata`` -> (weak reference to the tensor, its family)
        self.family_count = 0
        self.fixed = 0  # statistics and moments made so far (``fix``): while there are none, nothing to check
        comp = composite
        self.composite_sees_rectified = all(
            rule.sees_rectified_output()
            for rule in (comp.default, *comp.by_type.values(), *comp.by_position.values(), *comp.by_name.values()))
        self.image_input = bool(self.image_leaves)  # an input is an image (what the "pixels" position key needs)
        for t in self.inputs:
            if t.is_floating_point():
                self.note(t).route = (_identity, t)
        self.stack: list[tuple[str, torch.nn.Module, Any, Any]] = []
        self.layer_modules: set[int] = set()  # ids of modules besides nn.Linear/nn.ConvNd named by their path alone
        self.names = {module: name for name, module in model.named_modules()}
        self.calls: dict[str, int] = {}
        self.opaque = 0
        self.trusted = 0
        self.decomposing = 0
        self.token_leaves: list[Tensor] = []  # embedding outputs when the model input is token ids
        # for each: the position of each id it embeds among the ids of all inputs, flattened one after the other
        self.token_positions: list[Tensor] = []
        start = 0
        for t in self.inputs:
            if not t.is_floating_point():
                self.note(t).positions = torch.arange(start, start + t.numel(), device=t.device).reshape(t.shape)
                start += t.numel()

    # ------------------------------------------------------------------ facts about tensors
    def facts(self, t: Tensor) -> Optional[TensorFacts]:
        entry = self.known.get(id(t))
        return entry if entry is not None and entry.alive(t) else None

    def note(self, t: Tensor) -> TensorFacts:
        """The facts about ``t``, created empty when there are none yet."""
        entry = self.facts(t)
        if entry is None:
            entry = self.known[id(t)] = TensorFacts(weakref.ref(t))
        return entry

    def is_nonnegative(self, t: Tensor) -> bool:
        entry = self.facts(t)
        return entry is not None and entry.nonnegative

    def fix(self, out: Any, made_by: str, moment: bool, degree: Optional[float],
            source: Optional[TensorFacts] = None) -> None:
        """``out`` is held fixed: a moment (to be reduced, or to gate ``source``, the signal it is an elementwise
        function of) or a normalisation statistic, begun by op ``made_by``, that scales with the signal with
        ``degree`` (``None``: not as a power)."""
        for t in tensors(out):
            if t.is_floating_point():
                entry = self.note(t)
                entry.moment, entry.statistic = (made_by, None) if moment else (None, made_by)
                entry.degree = degree
                entry.source = source if moment else None
                self.fixed += 1

    def origin_of(self, t: Tensor) -> TensorFacts:
        """The signal ``t`` is a constant multiple of (``t`` itself, for most)."""
        entry = self.note(t)
        return entry.origin if entry.origin is not None else entry

    def is_reduced(self, t: Tensor) -> bool:
        entry = self.facts(t)
        return entry is not None and entry.reduced

    def supersede(self, old: Tensor, new: Tensor) -> Tensor:
        """An in-place op on ``old`` ran out of place and made ``new``: later uses of ``old`` get what this returns.
        The op writes into the views of ``old`` and, for a view, into its base as well: those are superseded too
        (``_write_back``, ``_move_views``). An op that only changes the shape (``t_``, ``unsqueeze_``: the result
        is a view of the same storage) writes nothing: the views keep their values."""
        if new.untyped_storage().data_ptr() != old.untyped_storage().data_ptr():
            if old._base is not None:
                new = self._write_back(old, old._base, new)
            elif self.views:
                new = self._move_views(old, new)
        self._succeed(old, new)
        return new

    def _succeed(self, old: Tensor, new: Tensor) -> None:
        """Later uses of ``old`` get ``new``, which the facts hold for as long as ``old`` lives (so that a view
        which only superseded a view nobody holds any more does not count as held: ``_held_views``)."""
        entry = self.note(old)
        entry.superseded = new

        def forget(_: Any, entry: TensorFacts = entry) -> None:
            entry.superseded = None
        entry.ref = weakref.ref(old, forget)
        self.replaced.add(id(old))

    def latest(self, t: Tensor) -> Tensor:
        """``t``, or what superseded it last (the chain is shortened on the way: a loop writing into a buffer
        step by step stays linear, and the versions between are let go)."""
        entry = self.facts(t)
        passed = []
        while entry is not None and entry.superseded is not None:
            passed.append(entry)
            t = entry.superseded
            entry = self.facts(t)
        for step in passed[:-1]:
            step.superseded = t
        return t

    # Views. An in-place op on a tensor writes into its views, and on a view into the tensor it shows (its base).
    # Running the op out of place, lrp supersedes them all: every re-indexing that makes a view of an
    # input-dependent tensor is noted (``note_views``) in the family of its base, which a base shares with the
    # tensors that supersede it.
    def note_views(self, out: Any) -> None:
        for t in tensors(out):
            base = t._base
            if base is not None and base.requires_grad:
                self.views.setdefault(self._family(base), []).append(weakref.ref(t))

    def _family(self, t: Tensor, join: Optional[int] = None) -> int:
        """The family of ``t``: ``join`` if given, else the one it has, else a new one."""
        found = self.families.get(t._cdata)
        if join is None:
            if found is not None and found[0]() is t:
                return found[1]
            join = self.family_count
            self.family_count += 1
        self.families[t._cdata] = (weakref.ref(t), join)
        return join

    def _held_views(self, family: int, but: Optional[Tensor] = None) -> list[Tensor]:
        """The views in ``family`` still held and not superseded, except ``but``."""
        found = []
        for ref in self.views.get(family, ()):
            t = ref()
            if t is not None and t is not but and self.latest(t) is t:
                found.append(t)
        return found

    def _write_back(self, view: Tensor, base: Tensor, new: Tensor) -> Tensor:
        """An in-place op on ``view`` made ``new``. It is written into a copy of (the latest version of) ``base``,
        which supersedes it, and the view of the copy that holds it is returned: it stands for ``view`` from now
        on, so a second in-place op on it reaches the base too. (The copy is a clone and an in-place copy into its
        view: autograd routes the gradient, the LRP rule of a re-indexing.) Refused where another view would
        keep the old values: a base that does not depend on the input (its views are not noted), one that a
        clone does not copy element for element, and another view of the base, still held and not superseded,
        that shares elements with ``view``."""
        how = f"an in-place op in {self.where()} writes into a view of a tensor"
        if not base.requires_grad:
            raise UnsupportedOperationError(
                f"{how} that does not depend on the input (a buffer or constant), and the values written do; lrp "
                f"runs in-place ops out of place and cannot update the tensor's other views. Build the tensor out "
                f"of place (torch.cat, torch.where, F.pad) instead of writing into a slice of it.")
        family = self._family(base)
        latest = self.latest(base)
        copy = latest.clone()
        if view.dtype != base.dtype or not _same_layout(copy, base):
            raise UnsupportedOperationError(
                f"{how} that lrp cannot copy element for element (a view with another dtype, or a tensor that is "
                f"not dense in memory); lrp runs in-place ops out of place. Write the op out of place.")
        for other in self._held_views(family, but=view):
            if _shares_elements(view, other, base):
                raise UnsupportedOperationError(
                    f"{how} while another view of that tensor (shape {tuple(other.shape)}), which shares elements "
                    f"with it, is still held; lrp runs in-place ops out of place and cannot update that view. Write "
                    f"the op out of place, or take the other view after it.")
        written = copy.as_strided(view.shape, view.stride(), view.storage_offset())
        written.copy_(new)
        self._family(copy, join=family)
        self._succeed(latest, copy)
        self.note_views(written)
        return written

    def _move_views(self, old: Tensor, new: Tensor) -> Tensor:
        """An in-place op on ``old`` made ``new``: the views of ``old`` still held become the same views of
        ``new`` (laid out as ``old`` first, if need be)."""
        found = self.families.get(old._cdata)
        if found is None or found[0]() is not old:
            return new  # no view was ever taken of it
        family = found[1]
        held = self._held_views(family)
        if not held:
            return new
        if any(v.dtype != old.dtype for v in held) or old.storage_offset() != 0:
            raise UnsupportedOperationError(
                f"an in-place op in {self.where()} writes into a tensor whose views (of another dtype, or of a "
                f"tensor not dense in memory) lrp cannot update; lrp runs in-place ops out of place. Write the op "
                f"out of place.")
        if new._base is not None or not _same_layout(new, old):
            laid = torch.empty_strided(old.shape, old.stride(), dtype=old.dtype, device=old.device)
            laid.copy_(new)
            new = laid
        self._family(new, join=family)
        for v in held:
            moved = new.as_strided(v.shape, v.stride(), v.storage_offset())
            self._succeed(v, moved)
            self.note_views(moved)
        return new

    # ------------------------------------------------------------------ capture
    def capture(self) -> "_Capture":
        return _Capture(self)

    def mode(self) -> TorchFunctionMode:
        """A function mode that sends ops to this trace (entered again by ops that run decomposed)."""
        return _Mode(self)

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
            final = self.fresh(output if result is None else result)
            self.consume((final, getattr(final, "logits", None)))
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
        inputs = [t for t in tensors(self.fresh(call_args)) if t.requires_grad]
        if not inputs:
            return None
        if len(inputs) > 1 or not isinstance(output, Tensor):
            raise RuleError(f"{rule!r} registered for module '{name}' ({type(module).__name__}) needs a module with "
                            f"one input that depends on the model input and one tensor output; this call has "
                            f"{len(inputs)} such inputs and returns {type(output).__name__}")
        self.consume(inputs)  # the ops inside ran without gradient: the rule is the input's one use here
        return ModuleRuleFunction.apply(inputs[0], output.detach(), rule, name)

    def where(self) -> str:
        if not self.stack:
            return "the model's forward"
        name, module, _, _ = self.stack[-1]
        return f"module '{name or '<model>'}' ({type(module).__name__})"

    def layer_name(self, op_name: str) -> tuple[str, Optional[torch.nn.Module]]:
        """The name of a layer call: the module's path (``"features.3"``; ``"block:linear"`` for a functional
        call inside module ``block``), with ``#k`` for the k-th repeated call."""
        if self.stack:
            path, module, _, _ = self.stack[-1]
        else:
            path, module = "", None
        named_by_path = isinstance(module, _CONV_MODULES) or id(module) in self.layer_modules
        base = path if named_by_path else f"{path}:{op_name}" if path else op_name
        count = self.calls.get(base, 0)
        self.calls[base] = count + 1
        return (base if count == 0 else f"{base}#{count}"), module

    # ------------------------------------------------------------------ dispatch
    def fresh(self, obj: Any) -> Any:
        """Replace tensors that an in-place op (run out of place here) has superseded by their new value."""
        if not self.replaced:
            return obj

        return map_tensors(obj, self.latest)

    def dispatch(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Every torch function the forward calls comes here. What the op does to the relevance is up to its
        registry entry; what it does to the bookkeeping is done here, once, for every op: it counts as a use of
        its operands (BatchNorm merging needs to know that a layer output feeds nothing else), its output may
        be known to be >= 0, and a ReLU's output may stand in for the layer output it rectifies."""
        operands = tensors((args, kwargs))
        if self.replaced and any(id(t) in self.replaced for t in operands):
            args, kwargs = self.fresh(args), self.fresh(kwargs)
            operands = tensors((args, kwargs))
        if self.opaque:  # inside a module with an opaque rule: no gradient (the rule's input is counted there)
            with torch.no_grad():
                return func(*args, **kwargs)
        name = optable.op_name(func)
        fixed = self._fixed_among(name, operands) if self.fixed and not self.trusted else None
        if fixed is not None and fixed[1] and name in optable.SUMS and needs_grad(operands):
            # the signal plus a power of it (``x + 0.044715 * x**3`` in a tanh GELU): a function of the signal
            # that is no linear map of it, so the sum joins the moment (held fixed, a gate of that signal at most)
            out = func(*map_tensors(args, Tensor.detach), **map_tensors(kwargs, Tensor.detach))
            self.fix(out, fixed[0], True, None, fixed[2])
            return out
        out = func(*args, **kwargs) if self.trusted else ops.handle(self, name, func, args, kwargs)
        if name in optable.SCALINGS and isinstance(out, Tensor) and out.requires_grad:
            signal = [t for t in operands if t.requires_grad]
            if len(signal) == 1 and all(t is signal[0] or t.ndim == 0 for t in operands):
                self.note(out).origin = self.origin_of(signal[0])
        if name in optable.ROUTE:
            self.note_views(out)
        if self.has_ids and self.ids_seen(operands):
            self._follow_ids(name, func, args, kwargs, operands, out)
        if fixed is not None and not needs_grad(out):  # ``+ eps``, a cast, a reshape; a reduction ends a moment
            made_by, moment, source = fixed
            self.fix(out, made_by, moment and name not in optable.REDUCTION and name not in optable.SPREAD,
                     self._degree(name, args, kwargs), source if name in optable.ELEMENTWISE else None)
        if name == "__setitem__" or not gradient_free(out) or (not torch.is_grad_enabled()
                                                                and isinstance(out, Tensor)):
            # with gradients off (inside a custom autograd function's forward, or a no_grad block) an op on an
            # input-dependent tensor may feed a result autograd connects to it later: a use, to be safe
            self.consume(operands)
        if self.trusted or not needs_grad(out):
            return out
        if (name in optable.REDUCTION and self._reduces(operands, out)) or (
                name in optable.KEEPS_REDUCED and self._all_reduced(operands)):
            for t in tensors(out):
                self.note(t).reduced = True
        name = optable.out_of_place(name)  # ``relu_``, ``x += y`` are run out of place, as ``relu``, ``x + y``
        if signs.output_nonnegative(name, args, kwargs, self.is_nonnegative):
            for t in tensors(out):
                if t.is_floating_point():
                    self.note(t).nonnegative = True
        if name == "relu" and isinstance(out, Tensor):
            self._rectified(args[0] if args else kwargs.get("input"), out)
        return out

    @staticmethod
    def _reduces(operands: list, out: Any) -> bool:
        """Whether a reduction took several elements into one (not a mean over a dimension of size 1)."""
        signal = next((t for t in operands if t.requires_grad), None)
        return isinstance(out, Tensor) and signal is not None and out.numel() < signal.numel()

    def degree_of(self, value: Any) -> Optional[float]:
        """How ``value`` scales with the signal: 0 for constants and numbers, a held-fixed tensor's degree."""
        if not isinstance(value, Tensor):
            return 0.0
        entry = self.facts(value)
        if entry is None or not (entry.moment or entry.statistic):
            return None if value.requires_grad else 0.0
        return entry.degree

    def _degree(self, name: str, args: tuple, kwargs: dict) -> Optional[float]:
        """The degree of the result of op ``name`` on held-fixed tensors and constants."""
        first = args[0] if args else kwargs.get("input")
        if name in optable.MOMENT:
            return ops.power_degree(name, args, kwargs, self.degree_of(first))
        values = [self.degree_of(v) for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]
        if any(v is None for v in values):
            return None
        if name in optable.MULTIPLIES:
            return sum(values)  # type: ignore[arg-type]
        if name in optable.DIVISION or name == "__rtruediv__":
            divisor = args[1] if len(args) > 1 else kwargs.get("other")
            top, bottom = (divisor, first) if name == "__rtruediv__" else (first, divisor)
            num, den = self.degree_of(top), self.degree_of(bottom)
            return None if num is None or den is None else num - den
        fixed = [v for v in values if v != 0.0]
        if name in ("add", "sub", "__add__", "__radd__", "__sub__", "__rsub__") and len(set(fixed)) > 1:
            return None  # a sum of terms that scale differently
        return fixed[0] if fixed else 0.0

    def _all_reduced(self, operands: list) -> bool:
        signal = [t for t in operands if t.requires_grad]
        return bool(signal) and all(self.is_reduced(t) for t in signal)

    def _fixed_among(self, name: str, operands: list) -> Optional[tuple[str, bool, Optional[TensorFacts]]]:
        """``(op that began it, is a moment, the moment's source)`` for a held-fixed tensor among ``operands``.
        Where the signal is an operand too, a statistic may only scale it (``x * s``, ``x / s``), and a moment may
        meet only the signal it is an elementwise function of, as a gate (``x * f(x**2)``) or in a sum that joins
        the moment (``x + x**3``): else an error."""
        entries = [entry for t in operands if (entry := self.facts(t)) is not None
                   and (entry.moment or entry.statistic)]
        if not entries:
            return None
        moments = [entry for entry in entries if entry.moment]
        moment = moments[0].moment if moments else None
        source = moments[0].source if moments and all(e.source is moments[0].source for e in moments) else None
        made_by = moment or entries[0].statistic
        assert made_by is not None
        if any(t.requires_grad for t in operands):
            if moment is not None:
                if ((name in optable.SUMS or name in optable.ELEMENTWISE_PRODUCT) and source is not None
                        and all(self.origin_of(t) is source for t in operands if t.requires_grad)):
                    return moment, True, source  # joins the moment (``dispatch``), or gates its signal
                raise ops.unsupported(self, moment, f" Its result meets the signal in '{name}' neither as a gate "
                                                    f"of the signal it was computed from (an elementwise product: "
                                                    f"x * f(x**3)) nor reduced (mean, sum) into a normalisation "
                                                    f"statistic; lrp holds such values fixed only in those roles.")
            if not self._normalises(optable.out_of_place(name), operands, entries):
                raise ops.unsupported(self, made_by, f" lrp holds it fixed as a normalisation statistic, which may "
                                                     f"only scale the signal so that the result grows no faster "
                                                     f"than the signal (x * rsqrt(mean(x**2)), x / norm(x)); here "
                                                     f"it meets the signal in '{name}'.")
        return made_by, moment is not None, source

    def positions_of(self, t: Tensor) -> Optional[Tensor]:
        """For token ids (or a re-indexing of them): the flat position in the model input of each id."""
        entry = self.facts(t)
        return entry.positions if entry is not None else None

    def ids_seen(self, operands: list) -> bool:
        """Whether an operand is the token ids or computed from them."""
        return any((entry := self.facts(t)) is not None and (entry.positions is not None or entry.from_ids)
                   for t in operands if not t.is_floating_point())

    def _follow_ids(self, name: str, func: Callable, args: tuple, kwargs: dict, operands: list, out: Any) -> None:
        """Integers computed from the token ids. A re-indexing (``ids.view(-1, n)``, ``ids[:, 1:]``) or an
        elementwise change of each id (``masked_fill``, ``where``, ``clamp``, ``ids + k``, ``table[ids]``) stays
        token ids: the same op on their positions says where each came from (-1: from no input token). Other
        integers computed from them (``from_ids``) may not be embedded (``ops._embedding`` refuses them);
        comparisons (``ids != pad``), and what is built from them (position ids), are not ids."""
        data = args[0] if args else kwargs.get("input", kwargs.get("self"))
        positions = self.positions_of(data) if isinstance(data, Tensor) else None
        if (name.endswith("_") and not name.startswith("__")) or name == "__setitem__" \
                or name in optable.INPLACE_DUNDER:  # in place on the ids: the positions follow, or go
            if isinstance(data, Tensor) and positions is not None:
                if name in ("zero_", "fill_", "copy_", "random_", "uniform_", "normal_"):
                    entry = self.note(data)  # every value replaced: no longer the ids
                    entry.positions, entry.from_ids = None, False
                # masked_fill_, ids[mask] = v, clamp_, add_: each position still holds what its own id became
            return
        results = [t for t in tensors(out) if not t.is_floating_point() and t.dtype != torch.bool]
        if not results or name in optable.SHAPE_ONLY:
            return
        if name.endswith("_as") and not (isinstance(data, Tensor) and self.ids_seen([data])):
            return  # view_as(ids), expand_as(ids), type_as(ids): the ids give only a shape or a dtype
        moved: Optional[list] = None
        if name in optable.ID_VIEWS and positions is not None:
            swapped = func(positions, *args[1:], **kwargs) if args else None
            moved = list(tensors(swapped)) if swapped is not None else None
        elif name in optable.ID_VALUES:
            moved = [self._moved_positions(name, args, kwargs, out)]
        for i, t in enumerate(results):
            p = moved[i] if moved is not None and i < len(moved) and moved[i] is not None else None
            entry = self.note(t)
            if p is not None and p.shape == t.shape:
                entry.positions = p.long()
            else:
                entry.from_ids = True

    def _moved_positions(self, name: str, args: tuple, kwargs: dict, out: Any) -> Optional[Tensor]:
        """Positions of the result of an elementwise op on token ids (``None``: it mixes several ids)."""
        if not isinstance(out, Tensor):
            return None
        if name in ("__getitem__", "index_select", "gather", "take_along_dim", "embedding"):  # a table of ids
            index = args[1] if len(args) > 1 else None  # read at the ids: each result comes from one id
            if name == "index_select":
                index = args[2] if len(args) > 2 else kwargs.get("index")
            return self.positions_of(index) if isinstance(index, Tensor) else None
        derived = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and self.ids_seen([v])]
        with_positions = [p for v in derived if (p := self.positions_of(v)) is not None]
        if len(derived) != 1 or len(with_positions) != 1:
            return None  # several ids combined (ids + ids.flip(1)): no one position
        positions = with_positions[0]  # masked_fill, where, clamp, ids + k: each position holds what its id became
        return positions.expand(out.shape) if positions.shape != out.shape else positions

    def _normalises(self, name: str, operands: list, entries: list) -> bool:
        """A statistic meets the signal as a normaliser: as a multiplier of degree <= 0 (``rsqrt(var)``, a ratio
        of statistics) or as the divisor of degree >= 0 (``norm``, ``std``)."""
        degrees = [entry.degree for entry in entries]
        if any(d is None for d in degrees) or name not in optable.SCALES:
            return False
        if name in optable.MULTIPLIES:
            return all(d <= 0 for d in degrees)  # type: ignore[operator]
        divisor = operands[1] if len(operands) > 1 else None
        return (len(entries) == 1 and divisor is not None and self.facts(divisor) is entries[0]
                and degrees[0] >= 0)  # type: ignore[operator]

    def consume(self, obj: Any) -> None:
        """Count a use of each input-dependent tensor in ``obj``; a BatchNorm is merged into the layer before it
        only if the layer's output has exactly one use, the BatchNorm. Called for every op (``dispatch``), for
        the input of a module rule and for the model's output (where relevance starts): nothing else consumes
        a tensor. A second use of a layer output stage brings it back as what the layer's rule sees."""
        for t in tensors(obj):
            if not t.requires_grad:
                continue
            entry = self.facts(t)
            if entry is None or entry.producer is None:
                continue
            layer = entry.producer
            if entry.stage == "z":
                layer.uses += 1
                if layer.uses > 1 and (layer.held_stage != "z" or layer.rectified):
                    layer.hold(t, "z")
            else:
                layer.bn_uses += 1
                if layer.bn_uses > 1 and layer.held_stage == "bn" and layer.rectified:
                    layer.hold(t, "bn")

    def _rectified(self, x: Any, out: Tensor) -> None:
        """``out = relu(x)``: if ``x`` is a layer's output stage used only here, the layer's rule may see
        ``out`` instead (see ``LayerRecord``), which autograd keeps for the ReLU anyway."""
        entry = self.facts(x) if isinstance(x, Tensor) else None
        if entry is None or entry.producer is None:
            return
        layer = entry.producer
        if not self.keep_less:
            return
        rule = layer.early_rule
        if not (rule.sees_rectified_output() if rule is not None else self.composite_sees_rectified):
            return
        uses = layer.uses if entry.stage == "z" else layer.bn_uses
        if uses == 1 and layer.held_stage == entry.stage and not layer.rectified and out.shape == x.shape:
            layer.hold(out, entry.stage, rectified=True)

    # ------------------------------------------------------------------ what ops remember
    def follow(self, source: Tensor, out: Any, gate: bool = True) -> None:
        """Gates and attention weights stay what they are through reshapes, expansions and dropout; attention
        weights alone (``gate=False``) also through scaling by, adding and dividing by values held fixed (ConViT's
        mix with a positional attention, ``(1 - s) * softmax(q k^T) + s * P``, renormalised by its row sums)."""
        entry = self.facts(source)
        if entry is None or not ((gate and entry.gate) or entry.softmax is not None):
            return
        for t in tensors(out):
            facts = self.note(t)
            facts.gate = facts.gate or (gate and entry.gate)
            facts.softmax = facts.softmax or entry.softmax

    def mark_head(self, name: str, x: Tensor, dim: Any, out: Tensor) -> None:
        """Remember ``out`` as a possible output head: any sigmoid; a softmax or log-softmax only over the class
        dimension of a (batch, classes) input (a softmax elsewhere, e.g. inside attention, is no head)."""
        if name != "sigmoid":
            if dim is None:  # F.softmax's implicit dimension: 1 for a 2-D input
                dim = 0 if x.ndim in (0, 1, 3) else 1
            if x.ndim != 2 or dim not in (1, -1):
                return
        self.note(out).head = (name, x)

    def head_of(self, out: Tensor) -> Optional[tuple[str, Tensor]]:
        """``(kind, logits)`` when the model output ``out`` is a head's output (or a pure reshape of it);
        ``logits``, the head's input reshaped like ``out``, is still part of the autograd graph."""
        entry = self.facts(out)
        if entry is None or entry.head is None:
            return None
        kind, head_input = entry.head
        if kind != "sigmoid" and (out.ndim != 2 or head_input.shape != out.shape):
            return None  # a softmax head only when the output is (batch, classes)
        return kind, head_input.reshape(out.shape)

    def route_of(self, t: Tensor) -> Optional[tuple[Callable[[Tensor], Any], Tensor]]:
        entry = self.facts(t)
        return entry.route if entry is not None else None

    def mark_routed(self, func: Callable, args: tuple, kwargs: dict, out: Any, grad_args: list) -> None:
        """Remember how to re-derive ``out`` from the model input when it is a re-indexing of it."""
        routes = [self.route_of(t) for t in grad_args]
        if any(route is None for route in routes):
            return
        roots = {id(route[1]) for route in routes if route is not None}
        if len(roots) != 1:
            return
        root = routes[0][1]  # type: ignore[index]  # checked above: every operand has a route
        replays = {id(t): route[0] for t, route in zip(grad_args, routes) if route is not None}

        def replay_all(xs: Tensor) -> Any:
            def swap(t: Tensor) -> Tensor:
                return replays[id(t)](xs) if id(t) in replays else t.detach()
            return func(*map_tensors(args, swap), **map_tensors(kwargs, swap))

        outputs = list(tensors(out))
        for i, t in enumerate(outputs):
            if isinstance(out, Tensor):
                self.note(t).route = (replay_all, root)
            else:
                def nth(xs: Tensor, i: int = i) -> Tensor:
                    return list(tensors(replay_all(xs)))[i]
                self.note(t).route = (nth, root)

    def forward_done(self) -> None:
        """The forward is over: drop the facts about its tensors (what the backward needs is in the records)."""
        self.known.clear()
        self.stack.clear()
        self.views.clear()
        self.families.clear()

    def release(self) -> None:
        """Drop every tensor and record this trace holds. Autograd nodes keep records alive, so without this
        the activations of each call would stay in memory."""
        for layer in self.layers:
            layer.replay = layer.root = layer.held = None
            layer.propagation = None
            layer.bn = layer.bn_candidate = None  # layer <-> BatchNorm record: a cycle; break it
        for bn in self.batchnorms:
            bn.producer = None
        self.layers.clear()
        self.batchnorms.clear()
        self.token_leaves.clear()
        self.token_positions.clear()
        self.forward_done()


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold their elements at the same places of their own storage."""
    return bool(a.shape == b.shape and a.stride() == b.stride() and a.storage_offset() == 0
                and b.storage_offset() == 0)


def _extent(t: Tensor) -> int:
    """How many elements of its storage ``t`` spans, from the start."""
    return int(t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) if t.numel() else 0


def _shares_elements(a: Tensor, b: Tensor, base: Tensor) -> bool:
    """Whether views ``a`` and ``b`` of ``base`` (or of copies of it laid out alike) have an element in common."""
    size = base.untyped_storage().nbytes() // base.element_size()
    if a.dtype != base.dtype or b.dtype != base.dtype or max(_extent(a), _extent(b)) > size:
        return True  # not comparable element by element: assume they do
    with values.untraced():  # layouts only
        marks = torch.zeros(size, dtype=torch.bool, device=base.device)
        marks.as_strided(a.shape, a.stride(), a.storage_offset()).fill_(True)
        return bool(marks.as_strided(b.shape, b.stride(), b.storage_offset()).any())


class _Capture:
    """Context manager: module hooks and the function mode, all removed on exit (also on error)."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.handles: list = []
        self.mode: Optional[TorchFunctionMode] = None
        self.forwards: list[tuple[torch.nn.Module, Any]] = []  # modules whose forward stands in, and their own
        self.keras: Optional[keras.KerasPatches] = None  # a Keras model's layers calling torch's layer ops

    def __enter__(self) -> Trace:
        trace = self.trace
        try:
            for module in trace.model.modules():
                self.handles.append(module.register_forward_pre_hook(trace._pre_hook, with_kwargs=True))
                self.handles.append(module.register_forward_hook(trace._post_hook, with_kwargs=True,
                                                                 always_call=True))
                if ssm.is_mamba_mixer(module) and module_rule_for(module, trace.composite) is None:
                    self.forwards.append((module, module.__dict__.get("forward")))
                    module.forward = functools.partial(ssm.mixer_forward, module)
            self.keras = keras.patches(trace, trace.model)
            self.mode = trace.mode()
            self.mode.__enter__()
        except BaseException:
            self._remove()
            raise
        return trace

    def _remove(self) -> None:
        if self.keras is not None:
            self.keras.remove()
            self.keras = None
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module, own in self.forwards:
            if own is None:
                del module.forward
            else:
                module.forward = own
        self.forwards.clear()

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.mode is not None:
                self.mode.__exit__(*exc)
            if exc[0] is None and self.keras is not None:
                self.keras.check()
        finally:
            self._remove()


