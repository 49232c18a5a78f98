"""Replay: record one explanation as a straight-line program of ATen operations, then run that program again.

An explanation is a forward with the capture's analysis of every operation, then ``torch.autograd.grad``
through the rules' autograd functions. For inputs of a shape seen before, all of that Python work gives the
same sequence of tensor operations again. :func:`record` runs one explanation under ``make_fx`` (torch's
real-tensor tracer), which writes down every ATen operation of the forward and of the backward with the rules
in it; :class:`Program` runs them again with the inputs, the model's current parameters and buffers and the
targets as arguments. Nothing of the model's Python, the capture or autograd runs then.

A program is only as good as the assumptions it was recorded under:

- every value read into Python while recording (``if x.sum() > 0``, ``.item()``, ``.tolist()``, and the
  engine's own reads) is a guard (:mod:`lrp.engine.values`): the program recomputes it and a replay whose
  guards differ from the recording gives ``None``, so that the caller explains eagerly;
- a recording is refused when the explanation ran an operation whose output shape depends on values
  (``nonzero``, ``unique``, boolean-mask indexing), or one the tracer cannot follow.

What a program cannot see is checked by :class:`ModelState` on every call, and a change records anew: the
identity of every parameter, buffer and tensor attribute (their values are arguments, so weights changed in
place need nothing), the module tree, modes, hooks and the modules' plain attributes (numbers, strings,
flags and the identity of other objects). Tensors the program holds as constants (created outside the model's
parameters and buffers, e.g. a global tensor) are checked by version counter.

On a GPU a program's replays run as one CUDA graph each (:mod:`lrp.engine.graphs`) once one replay of the
program itself has passed its guards and the graph's first replay has agreed with the program.
"""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import LRPError
from . import values
from .graphs import GraphPool, Graphed, draws, seeded, why_not_graphed
from .propagate import fingerprints

Tensor = torch.Tensor

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


class ModelState:
    """What a recorded program assumes about the model, compared by identity: every module, what its class and
    the classes it inherits from define (and the rules' classes), the objects its attributes hold (numbers,
    strings, flags, tuples, other objects; one changed in place is not seen), its parameters, buffers and hooks,
    and, with ``modes``, its training flag. The objects are held, so an identity cannot be reused by a new object
    while this state exists. (A tensor whose data is replaced by one of another shape or dtype through ``.data =``
    stays the same object: the program then fails on it.)"""

    def __init__(self, model: torch.nn.Module, modes: bool, rules: Any = None):
        held: list[Any] = []
        counts: list[int] = []
        self.rule_tensors: list[Tensor] = []
        classes: set[type] = set()
        for part in rules or ():
            _walk(part, held, counts, self.rule_tensors, 8, classes)
        hooks = torch.nn.modules.module
        for name in _GLOBAL_HOOKS:
            held.extend(getattr(hooks, name, {}).values())
        for module in model.modules():
            _class_state(type(module), held, counts, classes)  # class attributes and methods (a patched forward)
            attributes = module.__dict__
            held.append(module)
            counts.append(len(attributes))
            if modes:
                held.extend(attributes.values())
            else:
                held.extend([v for k, v in attributes.items() if k != "training"])
            for owned in (module._parameters, module._buffers):
                held.extend(owned.values())
                counts.append(len(owned))
            for name in _HOOK_DICTS:
                found = attributes.get(name)
                if found:
                    held.extend(found.values())
                    counts.append(len(found))
        self.model = model
        self.held = held
        self.counts = counts
        self._tensors: Optional[list[Tensor]] = None
        self._storages: Optional[list[int]] = None

    @property
    def tensors(self) -> list[Tensor]:
        """Every parameter, buffer and tensor attribute of the model, once each, in module order, then the
        tensors the rules hold: a program takes them as arguments, so their current values are always used."""
        if self._tensors is None:
            found: dict[int, Tensor] = {id(t): t for t in self.rule_tensors}
            for module in self.model.modules():
                for t in [*module._parameters.values(), *module._buffers.values(), *module.__dict__.values()]:
                    if isinstance(t, Tensor):
                        found.setdefault(id(t), t)
            self._tensors = list(found.values())
            self._storages = [t.data_ptr() for t in self._tensors]
        return self._tensors

    def same(self, other: Optional["ModelState"]) -> bool:
        """Whether ``other`` (an earlier state) holds the same objects, and its tensors the same storage (``.to``,
        ``.double()`` or ``channels_last`` keep a parameter object and give it new storage)."""
        if other is None or self.counts != other.counts or len(self.held) != len(other.held):
            return False
        if not all(map(operator.is_, self.held, other.held)):
            return False
        return [t.data_ptr() for t in other.tensors] == other._storages


def _class_state(cls: type, held: list[Any], counts: list[int], seen: set[type]) -> None:
    """``cls`` and every class it inherits from (but ``object``), each with what it defines (methods, class
    attributes), into ``held`` by identity, once per class: a method patched or a class attribute set on any of
    them (``Base.scale = 2``, ``nn.Linear.forward = ...``) is then a change. Of torch's own classes only
    ``forward`` counts: torch patches others itself (``torch.compile`` wraps ``nn.Module.__init__`` once)."""
    for klass in cls.__mro__[:-1]:
        if klass in seen:
            continue
        seen.add(klass)
        defined: Any = vars(klass)
        if str(getattr(klass, "__module__", "")).startswith("torch."):
            defined = {"forward": defined["forward"]} if "forward" in defined else {}
        held.append(klass)
        counts.append(len(defined))
        held.extend(defined.values())


def _walk(value: Any, held: list[Any], counts: list[int], tensors: list[Tensor], depth: int,
          classes: set[type]) -> None:
    """Rules and what they hold (a composite's tables, rule objects' attributes and classes, lists, nested to
    ``depth``) into ``held`` by identity; tensors among them also into ``tensors``."""
    held.append(value)
    if isinstance(value, Tensor):
        tensors.append(value)
        return
    if depth == 0 or isinstance(value, (str, bytes, int, float, type)) or value is None:
        return
    if isinstance(value, dict):
        counts.append(len(value))
        for k, v in value.items():
            held.append(k)
            _walk(v, held, counts, tensors, depth - 1, classes)
    elif isinstance(value, (list, tuple)):
        counts.append(len(value))
        for v in value:
            _walk(v, held, counts, tensors, depth - 1, classes)
    elif hasattr(value, "__dict__"):
        _class_state(type(value), held, counts, classes)  # a rule's class attribute or method changed
        attributes = vars(value)
        counts.append(len(attributes))
        for v in attributes.values():
            _walk(v, held, counts, tensors, depth - 1, classes)


def input_signature(inputs: Sequence[Tensor]) -> tuple:
    """What a program is specialised to about its inputs: types (a tensor subclass may trace otherwise), shapes,
    strides, dtypes and devices."""
    return tuple((type(t), tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs)


def global_state() -> tuple:
    """Torch settings that change which operations run: autocast (per device type) and the default dtype."""
    state: list[Any] = [torch.get_default_dtype()]
    for device in ("cpu", "cuda", "mps", "xpu"):
        try:
            if torch.is_autocast_enabled(device):
                state.append((device, torch.get_autocast_dtype(device)))
        except (RuntimeError, TypeError):  # pragma: no cover - a device type this torch does not know
            continue
    return tuple(state)


def _flatten(value: Any, leaves: list[Tensor]) -> Any:
    """``value`` (nested dicts, lists, tuples, tensors, other objects) with every tensor replaced by its
    position in ``leaves``."""
    if isinstance(value, Tensor):
        leaves.append(value)
        return _Leaf(len(leaves) - 1)
    if isinstance(value, dict):
        return {k: _flatten(v, leaves) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_flatten(v, leaves) for v in value)
    return value


def _unflatten(template: Any, leaves: Sequence[Tensor]) -> Any:
    if isinstance(template, _Leaf):
        return leaves[template.index]
    if isinstance(template, dict):
        return {k: _unflatten(v, leaves) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(_unflatten(v, leaves) for v in template)
    return template


@dataclass(frozen=True)
class _Leaf:
    index: int


def _dynamic(node: torch.fx.Node) -> bool:
    """Whether ``node``'s output shape (or a Python value it gives) depends on tensor values."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    tags = target.tags
    if torch.Tag.data_dependent_output in tags:
        return True
    if torch.Tag.dynamic_output_shape not in tags:
        return False
    if target is torch.ops.aten.index.Tensor:  # dynamic only with boolean masks among the indices
        indices = node.args[1] if len(node.args) > 1 else []
        return any(isinstance(i, torch.fx.Node) and _meta_dtype(i) in (torch.bool, torch.uint8, None)
                   for i in indices)  # type: ignore[union-attr]
    return True


def _meta_dtype(node: torch.fx.Node) -> Optional[torch.dtype]:
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    return getattr(value, "dtype", None)


class KeptTensors:
    """The weight-derived tensors (``W+``, merged BatchNorms, flat counts, ...) of one explainer's programs: one
    set per distinct weight-only program, so that programs of other input shapes (a dataset's last, smaller
    batch) share one set instead of holding a copy each. A set is built again when a tensor it was built from
    has changed (its key: see ``Program._folded``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sets: dict[str, tuple[tuple, list[Tensor]]] = {}

    def get(self, code: str, key: tuple, make: Callable[[], list[Tensor]]) -> list[Tensor]:
        """The set of the weight-only program ``code`` for the tensors ``key`` describes, built by ``make``
        where there is none or it was built from other tensors."""
        with self._lock:
            found = self._sets.get(code)
        if found is not None and found[0] == key:
            return found[1]
        made = make()
        with self._lock:
            self._sets[code] = (key, made)
        return made

    def retain(self, codes: set[str]) -> None:
        """Drop the sets of weight-only programs not in ``codes`` (those of the programs still kept)."""
        with self._lock:
            for code in [c for c in self._sets if c not in codes]:
                del self._sets[code]


class Program:
    """One recorded explanation: ``program(dynamic, state)`` runs its ATen operations on new inputs and targets
    (``dynamic``) and the model's tensors (``state``, as :class:`ModelState` lists them) and gives the result
    shaped as the recorded one.

    What depends on the model's tensors alone (``W+``, a merged BatchNorm's weights, flat counts, ...) is split
    off into a second program that runs only when one of those tensors (or a constant it reads) has changed:
    another object, version counter, storage, or fingerprint of its values (:func:`fingerprints`, as the eager
    path keys its cache)."""

    def __init__(self, graph: torch.fx.GraphModule, template: Any, dynamic: int, expected: list[Tensor],
                 graphs: Optional[GraphPool] = None, readers: Optional[list[str]] = None,
                 kept: Optional["KeptTensors"] = None, compile: bool = False):
        self.template = template
        self.dynamic = dynamic
        self.expected = expected  # the values read into Python while recording (see lrp.engine.values)
        self.readers = readers if readers is not None else ["an unknown place"] * len(expected)
        self.mismatches = 0
        self.mismatch = ""  # what differed in the last discarded replay
        self.constants = [(t, t._version, t.data_ptr()) for name, t in _constants(graph)]
        self.operations = sum(1 for n in graph.graph.nodes if n.op == "call_function")
        self.prepare, self.main, (self.sources, self.shared), self.written = _split(graph, dynamic)
        self.prepare_constants = [t for _, t in _constants(self.prepare)] if self.prepare is not None else []
        self.prepare_code = _signature(self.prepare) if self.prepare is not None else ""
        self.kept = kept if kept is not None else KeptTensors()
        self.graphs = graphs  # None: no CUDA graphs
        self.graphed: Optional[Graphed] = None
        self.why_not_graphed: Optional[str] = None if graphs is not None else "CUDA graphs are off"
        self.replays = 0  # replays that ran the program itself, and passed their guards
        self.captures = 0
        self.compiled: Optional[Callable[..., Any]] = None  # the main program compiled by torch.compile
        self.why_not_compiled: Optional[str] = None if compile else "compile is off (compile=False)"
        self._compiling = threading.Lock()

    def fresh(self) -> bool:
        """Whether no tensor held as a constant has been changed in place, or given other memory (``.data =``),
        since the recording."""
        return all(t._version == version and t.data_ptr() == pointer for t, version, pointer in self.constants)

    def __call__(self, dynamic: Sequence[Tensor], state: Sequence[Tensor]) -> Optional[tuple[Any, bool]]:
        """The result and whether a CUDA graph gave it, or ``None`` when a value the recording read into Python
        (see :mod:`lrp.engine.values`) is not what it was, or the program failed on these arguments: the caller
        then explains eagerly. Model tensors the program writes (a buffer updated in ``forward``) are then as
        they were before the call."""
        saved = [(t, t.clone()) for t in (state[k] for k in self.written)]
        # The recorded operations already hold autocast's casts, and the rules compute in float32 on purpose:
        # autocast must not cast them again, and nothing needs autograd.
        try:
            with torch.no_grad(), _no_autocast():
                leaves, graphed = self._run([*dynamic, *state, *self._folded(state)])
                if self.expected:
                    guards = leaves[len(leaves) - len(self.expected):]
                    leaves = leaves[:len(leaves) - len(self.expected)]
                    for g, e, where in zip(guards, self.expected, self.readers):
                        if not torch.equal(g, e):
                            raise _Mismatch(f"the value read at {where} was {_shown(e)} when recorded, "
                                            f"{_shown(g)} now")
        except Exception as exc:  # another path than this call needs: the caller explains it eagerly
            self.mismatches += 1
            self.mismatch = str(exc) if isinstance(exc, _Mismatch) else \
                f"the program failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            with torch.no_grad():
                for t, before in saved:
                    t.copy_(before)
            return None
        self.replays += not graphed
        return _unflatten(self.template, leaves), graphed

    def graph_status(self) -> Optional[str]:
        """Why the replays do not run as a CUDA graph, ``None`` when they do."""
        if self.why_not_graphed is not None:
            return self.why_not_graphed
        if self.graphed is not None and self.graphed.checked:
            return None
        return ("not yet: a graph is captured after one replay of the program itself and used after its first "
                "replay agrees with the program")

    def _run(self, args: list[Tensor]) -> tuple[list[Tensor], bool]:
        """The program's outputs on ``args``, from its CUDA graph where it has a checked one, and whether they
        are. A graph is captured after the program itself has run once and passed its guards, and is used
        once its first replay has given what the program gives on the same arguments. With ``compile``, the
        program is compiled first (:meth:`_compile`), and the graph captures the compiled program."""
        runner = self.compiled if self.compiled is not None else self.main
        if self.why_not_compiled is None and self.compiled is None and self.replays >= 1:
            return self._compile(args), False
        graphed = self.graphed
        if graphed is not None:
            try:
                out = graphed(args)
            except Exception as exc:  # the graph, not the program, failed: the program runs, and no graph
                first = str(exc).splitlines()[0] if str(exc) else ""
                self.graphed, self.why_not_graphed = None, f"its CUDA graph failed: {type(exc).__name__}: {first}"
                out = graphed = None
            if out is None or graphed is None:  # the weight-derived tensors were built anew (the weights
                self.graphed = None                # changed), or the settings differ: capture anew
            elif graphed.checked:
                return out, True
            else:  # the first replay of a new graph: checked against the program, whose result is returned
                plain = list(runner(*args))
                problem = Graphed.agree(out, plain)
                if problem:
                    self.graphed, self.why_not_graphed = None, f"its CUDA graph disagreed with it: {problem}"
                else:
                    graphed.checked = True
                return plain, False
        if self.graphs is not None and self.why_not_graphed is None and self.replays >= 1:
            self._capture(args, runner)
        return list(runner(*args)), False

    def _compile(self, args: list[Tensor]) -> list[Tensor]:
        """The program's outputs on ``args``; compiles it with ``torch.compile`` (inductor, static shapes) and
        keeps the compiled program if its outputs agree with the program's to a relative 1e-2 of each output's
        largest magnitude (inductor fuses and reorders floating-point work: the results are close, not bit for
        bit); otherwise says why not and keeps running the program itself."""
        plain = list(self.main(*args))
        if self.written or draws(self.main):  # a second run to check it would write or draw again
            self.why_not_compiled = ("the program writes the model's tensors" if self.written else
                                     "the program draws random numbers")
            return plain
        if not self._compiling.acquire(blocking=False):  # another thread compiles it
            return plain
        try:
            compiled = torch.compile(self.main, dynamic=False)
            problem = Graphed.agree(list(compiled(*args)), plain, tolerance=1e-2)
        except Exception as exc:  # no compiler, an operation inductor cannot compile, ...
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.why_not_compiled = f"torch.compile failed: {type(exc).__name__}: {first}"
        else:
            if problem:
                self.why_not_compiled = f"the compiled program disagreed with it: {problem}"
            else:
                self.compiled = compiled
        finally:
            self._compiling.release()
        return plain

    def _capture(self, args: list[Tensor], runner: Callable[..., Any]) -> None:
        assert self.graphs is not None
        if self.captures >= _CAPTURES:
            self.why_not_graphed = (f"a new graph was needed {_CAPTURES} times (the weight-derived tensors were "
                                    f"built anew after the weights changed, or the TF32/cuDNN settings changed)")
            return
        reason = why_not_graphed(self.main, args, self.dynamic, self.graphs.backend, bool(self.written))
        if reason:
            self.why_not_graphed = reason
            return
        self.captures += 1
        try:
            self.graphed = Graphed(runner, args, self.dynamic, self.graphs, [t for _, t in _constants(self.main)])
        except Exception as exc:  # an operation that cannot be captured: replays run the program itself
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.why_not_graphed = f"capturing it failed: {type(exc).__name__}: {first}"

    def _folded(self, state: Sequence[Tensor]) -> list[Tensor]:
        if self.prepare is None:
            return []
        used = [state[k] for k in self.sources]
        found = fingerprints(used + self.prepare_constants)
        # constants (made by each recording anew) by value, so that programs of other shapes share one set
        key = tuple((id(t), t._version, t.data_ptr(), found[id(t)]) for t in used) + \
            tuple((t.shape, t.dtype, t.device, found[id(t)]) for t in self.prepare_constants) + \
            tuple((id(t), t.data_ptr()) for t in (state[k] for k in self.shared))
        prepare = self.prepare
        return self.kept.get(self.prepare_code, key, lambda: list(prepare(*state)))


def _signature(graph: torch.fx.GraphModule) -> str:
    """What ``graph`` computes, independent of its nodes' names (which count the nodes of the whole recording):
    each node's kind, operation and arguments, with nodes by position, placeholders by position and constant
    tensors by shape, dtype and device."""
    position: dict[torch.fx.Node, int] = {}
    items = []
    for k, node in enumerate(graph.graph.nodes):
        position[node] = k
        arguments = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: position[n])  # type: ignore[arg-type]
        if node.op == "placeholder":
            target: Any = None
        elif node.op == "get_attr":  # a constant: its values are in the key of a set (Program._folded)
            value = getattr(graph, str(node.target))
            target = (tuple(value.shape), value.dtype, value.device) if isinstance(value, Tensor) else id(value)
        else:
            target = node.target
        items.append((node.op, str(target), repr(arguments)))
    return repr(items)


_CAPTURES = 3  # graphs captured for one program before its replays run without one for good


class _Mismatch(Exception):
    """A guard of a replay differs from the recording."""


def _shown(value: Tensor) -> str:
    """A guard's value for a message: the value of a small tensor, the shape of a larger one."""
    if value.numel() <= 4:
        items = value.tolist()
        return str(items)
    return f"a tensor of shape {tuple(value.shape)}"


def _aliased(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes whose storage ``node``'s result may share: the input of a view (also ``_unsafe_view`` and the
    items of ``unbind``/``split``, reached through ``getitem``), the argument an in-place or ``out=`` op
    returns."""
    target = node.target
    if node.op != "call_function":
        return []
    if target is operator.getitem:
        return [a for a in node.args[:1] if isinstance(a, torch.fx.Node)]
    if not isinstance(target, torch._ops.OpOverload):
        return []
    schema = target._schema
    if target.is_view or target is torch.ops.aten._unsafe_view.default:
        return [a for a in node.args[:1] if isinstance(a, torch.fx.Node)]
    sets = set()
    for returned in schema.returns:
        if returned.alias_info is not None:
            sets |= set(returned.alias_info.before_set)
    found = []
    for argument, value in _bound(node):
        if argument.alias_info is not None and set(argument.alias_info.before_set) & sets:
            found += [v for v in (value if isinstance(value, (list, tuple)) else [value])
                      if isinstance(v, torch.fx.Node)]
    return found


def _bound(node: torch.fx.Node) -> list[tuple[Any, Any]]:
    """(schema argument, value) for each argument of an ATen op node, positional or keyword."""
    arguments = node.target._schema.arguments  # type: ignore[union-attr]
    return [(a, node.args[k] if k < len(node.args) else node.kwargs.get(a.name)) for k, a in enumerate(arguments)]


def _written(nodes: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """Every node whose storage some operation writes into: the written arguments of in-place and ``out=`` ops
    and everything they may share storage with, back to the base."""
    written: set[torch.fx.Node] = set()
    todo: list[torch.fx.Node] = []
    for node in nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            for argument, value in _bound(node):
                if argument.alias_info is not None and argument.alias_info.is_write:
                    todo += [v for v in (value if isinstance(value, (list, tuple)) else [value])
                             if isinstance(v, torch.fx.Node)]
    while todo:
        node = todo.pop()
        if node not in written:
            written.add(node)
            todo += _aliased(node)
    return written


def _valued_sources(prepare: torch.fx.Graph, state: list[torch.fx.Node]) -> tuple[list[int], list[int]]:
    """The positions among the model's tensors whose values the prepared results hold (a result computed from
    them: ``W+``, a merged BatchNorm) and of those the results only share storage with (a transposed weight,
    which shows any change by itself)."""
    aliases: dict[torch.fx.Node, set[str]] = {}
    values: dict[torch.fx.Node, set[str]] = {}
    for node in prepare.nodes:
        if node.op == "placeholder":
            aliases[node], values[node] = {str(node.target)}, set()
        elif node.op == "output":
            outputs = [a for a in node.args[0] if isinstance(a, torch.fx.Node)]  # type: ignore[union-attr]
        else:
            inputs = node.all_input_nodes
            if _aliased(node):  # a view (or an item of one): the same storage as its input
                aliases[node] = set().union(*(aliases[a] for a in inputs))
                values[node] = set().union(*(values[a] for a in inputs))
            else:
                aliases[node] = set()
                values[node] = set().union(*(values[a] | aliases[a] for a in inputs))
    valued = set().union(*(values[n] for n in outputs))
    shared = set().union(*(aliases[n] for n in outputs)) - valued
    names = [str(p.target) for p in state]
    return [k for k, n in enumerate(names) if n in valued], [k for k, n in enumerate(names) if n in shared]


def _split(graph: torch.fx.GraphModule, dynamic: int
           ) -> tuple[Optional[torch.fx.GraphModule], torch.fx.GraphModule, tuple[list[int], list[int]], list[int]]:
    """``graph`` (placeholders: ``dynamic`` inputs, then the model's tensors) as a program of what depends on
    the model's tensors alone, a main program that takes its results as further arguments, the positions
    among the model's tensors that the first reads (:func:`_valued_sources`), and those of the model's tensors
    the program writes. A
    value some operation writes into (or one that may share its storage) is not split off, nor are random
    operations; where the recording writes into a model tensor (a buffer updated in ``forward``), nothing is."""
    nodes = list(graph.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    written = _written(nodes)
    state = placeholders[dynamic:]
    writes = [k for k, p in enumerate(state) if p in written]
    if writes:
        return None, graph, ([], []), writes
    static: set[torch.fx.Node] = set(state)
    for node in nodes:
        if node in written:
            continue
        if node.op == "get_attr":
            static.add(node)
        elif node.op == "call_function" and node.all_input_nodes and all(a in static for a in node.all_input_nodes):
            if not seeded(node):
                static.add(node)
    frontier = [n for n in nodes if n in static and n.op != "placeholder"
                and any(u not in static for u in n.users)]
    if not any(n.op == "call_function" for n in frontier):
        return None, graph, ([], []), []
    prepare = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes:
        if node in static:
            env[node] = prepare.node_copy(node, lambda n: env[n])
    prepare.output([env[n] for n in frontier])
    main = torch.fx.Graph()
    main_env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in placeholders:
        main_env[node] = main.node_copy(node, lambda n: main_env[n])
    for k, node in enumerate(frontier):
        main_env[node] = main.placeholder(f"folded_{k}")
    for node in nodes:
        if node.op != "placeholder" and node not in main_env and node not in static:
            main_env[node] = main.node_copy(node, lambda n: main_env[n])
    prepare.eliminate_dead_code()
    sources = _valued_sources(prepare, state)
    return torch.fx.GraphModule(graph, prepare), torch.fx.GraphModule(graph, main), sources, []


def _constants(graph: torch.fx.GraphModule) -> list[tuple[str, Tensor]]:
    found = []
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            value = getattr(graph, str(node.target), None)
            if isinstance(value, Tensor):
                found.append((str(node.target), value))
    return found


class _no_autocast:
    """Autocast off on every device type that has it on (nothing to do, and no cost, when none has)."""

    def __enter__(self) -> None:
        self.contexts = []
        for device, _ in global_state()[1:]:
            context = torch.autocast(device, enabled=False)
            context.__enter__()
            self.contexts.append(context)

    def __exit__(self, *exc: Any) -> None:
        for context in reversed(self.contexts):
            context.__exit__(*exc)


_TRACER = threading.Lock()  # torch's tracer keeps state in module globals: one recording at a time


def _one_fake_mode() -> Any:
    """A tracing context with one fake-tensor mode, which the tracer then uses for the metadata of every value
    it records; without one it builds a new mode per operation (each capturing a Python stack trace: most of
    the cost of a recording)."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    return tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))


def record(run: Callable[[Sequence[Tensor]], Any], args: Sequence[Tensor], inputs: int,
           graphs: Optional[GraphPool] = None, kept: Optional[KeptTensors] = None, compile: bool = False
           ) -> tuple[Any, Optional[Program], str]:
    """Run ``run(args)`` once under torch's tracer and return its result, the :class:`Program` that repeats it
    (``None`` where it cannot be replayed) and, then, the reason. The first ``inputs`` arguments change from
    call to call; the rest are the model's tensors (:class:`ModelState`). ``run`` returns any nesting of dicts,
    lists and tuples of tensors and other values; only its tensors are recomputed by the program, the rest is
    kept. ``lrp``'s own errors propagate; another failure of the tracer leaves the caller to run eagerly.
    With ``graphs``, the program's replays on a GPU run as CUDA graphs of that pool (:mod:`lrp.engine.graphs`);
    with ``kept``, its weight-derived tensors are shared with the other programs of that store; with
    ``compile``, its replays run it compiled by ``torch.compile``."""
    holder: dict[str, Any] = {}

    def traced(*flat: Tensor) -> list[Tensor]:
        with values.guarded() as guards:
            result = run(flat)
        leaves: list[Tensor] = []
        holder["template"] = _flatten(result, leaves)
        holder["result"] = result
        holder["expected"] = [value for _, value, _ in guards]  # real tensors, kept by the program
        holder["readers"] = [where for _, _, where in guards]
        return leaves + [flag for flag, _, _ in guards]

    from torch.fx.experimental.proxy_tensor import make_fx  # imported when first needed: it takes a while

    buffers = [(t, t._version, t.clone()) for t in args[inputs:] if not isinstance(t, torch.nn.Parameter)]
    try:
        with _TRACER, _one_fake_mode():
            graph = make_fx(traced, tracing_mode="real", record_module_stack=False)(*args)
    except Exception as exc:  # lrp's own error, the model's, or an operation the tracer cannot follow
        with torch.no_grad():  # buffers the forward wrote before it stopped: as they were, for the eager call
            for t, version, before in buffers:
                if t._version != version:
                    t.copy_(before)
        if isinstance(exc, LRPError):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, None, f"the tracer stopped: {type(exc).__name__}: {first}"
    dynamic = [n for n in graph.graph.nodes if n.op == "call_function" and _dynamic(n)]
    if dynamic:
        return holder["result"], None, f"{dynamic[0].target} gives a result whose shape depends on the data"
    return holder["result"], Program(graph, holder["template"], inputs, holder["expected"], graphs,
                                     holder["readers"], kept, compile), ""
