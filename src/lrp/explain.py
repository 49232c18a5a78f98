"""``lrp.explain``: one call that explains any PyTorch model with LRP."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence, Union

import torch

from .composites import _MODULE_RULES, Composite, resolve
from .engine.capture import Trace
from .engine import values
from .engine.propagate import Propagation, WeightCache
from .engine.graphs import GraphPool
from .engine.replay import KeptTensors, ModelState, Program, global_state, input_signature, record
from .engine.session import frozen, model_lock
from .engine.targets import (StartSpec, TargetSpec, binary_targets, class_targets, model_output, output_gradient,
                             start_relevance, targets_checked)
from .errors import LRPError, UnsupportedOperationError

Tensor = torch.Tensor


@dataclass
class Explanation:
    """The result of :func:`explain`.

    ``relevance`` has the input's shape (for a model with several inputs, ``explain(model, (x1, x2))``: a tuple
    with one tensor per input, each shaped like it). ``output`` is the model's real output. ``head`` names the final
    ``"sigmoid"``, ``"softmax"`` or ``"log_softmax"`` the relevance started before (``None``: it started at the
    output), and ``logits`` are the scores it started from (the head's input shaped like the output; the
    output itself when there is no head). ``target`` holds the explained class per sample (``None`` for a
    one-score model without a sigmoid head); for a binary sigmoid head it is 1 (the positive class, explained
    from the logit ``z``) or 0 (the negative class, explained from ``-z``). ``start`` is the start relevance at
    ``logits``. ``conservation`` maps each layer (and ``"input"``) to the relevance summed at its output per
    sample, divided by the start relevance: 1.0 means conserved (for branching models a layer's total covers
    only the branch through it; inside attention, where the batch need not be the first dimension, the value
    is one 0-dim ratio for the whole batch).
    """

    relevance: Tensor  # a tuple of tensors for a tuple of inputs
    output: Tensor
    target: Optional[Tensor]
    start: Tensor
    conservation: dict[str, Tensor]
    rules: dict[str, str]
    layers: dict[str, Tensor] = field(default_factory=dict)
    composite: Optional[Composite] = None
    head: Optional[str] = None
    logits: Optional[Tensor] = None  # set to ``output`` when not given
    _output_head: Optional[str] = field(default=None, repr=False)  # the model's head, also when not stripped

    def __post_init__(self) -> None:
        if self.logits is None:
            self.logits = self.output
        if self._output_head is None:
            self._output_head = self.head

    @property
    def _z(self) -> Tensor:
        """The scores the relevance started from (``logits``, or the output)."""
        return self.logits if self.logits is not None else self.output

    @property
    def _binary(self) -> bool:
        z = self._z
        return self.head == "sigmoid" and (z.ndim == 1 or (z.ndim == 2 and z.shape[1] == 1))

    @property
    def num_classes(self) -> Optional[int]:
        """K for an output shaped (batch, K), 2 for one score ending in a sigmoid (binary classifier), 1 for
        other one-score outputs, ``None`` for other shapes."""
        if self._binary:
            return 2
        z = self._z
        if z.ndim == 1:
            return 1
        return int(z.shape[1]) if z.ndim == 2 else None

    @property
    def probabilities(self) -> Optional[Tensor]:
        """(batch, num_classes) class probabilities: ``[1 - p, p]`` for a binary sigmoid head, the softmax of the
        logits for K >= 2 classes (per-class sigmoids for a multi-label sigmoid head); ``None`` otherwise."""
        k = self.num_classes
        z = self._z.detach()
        if self._binary:
            p = torch.sigmoid(z.reshape(-1))
            return torch.stack([1 - p, p], 1)
        if k is None or k < 2:
            return None
        if self.head is None and self._output_head is not None:  # a head explained as it is: its own output
            out = self.output.detach()
            return out.exp() if self._output_head == "log_softmax" else out
        return torch.sigmoid(z) if self.head == "sigmoid" else torch.softmax(z, 1)

    @property
    def predicted(self) -> Optional[Tensor]:
        """(batch,) predicted classes (long): argmax of the logits, or ``z > 0`` for a binary sigmoid head;
        ``None`` for one-score and other outputs."""
        if self._binary:
            return (self._z.detach().reshape(-1) > 0).long()
        k = self.num_classes
        return self._z.detach().argmax(1) if k is not None and k >= 2 else None


Inputs = Union[Tensor, Sequence[Tensor]]


def explain(
    model: torch.nn.Module,
    x: Inputs,
    target: TargetSpec = None,
    composite: Union[str, Composite, None] = "epsilon-plus-flat",
    *,
    start: StartSpec = "score",
    from_logits: bool = True,
    record_layers: bool = False,
    eval_mode: bool = True,
) -> Explanation:
    """Explain ``model(x)`` with Layer-wise Relevance Propagation.

    Args:
        model: any ``nn.Module``; it is not modified (modes, flags and hooks are restored, also on error).
        x: input batch (first dimension = samples): floating point, or integer token ids read by an embedding
            layer, in which case the relevance of each token (summed over its embedding vector) is returned.
            A model with several inputs gets them as a tuple or list, ``model(*x)`` (e.g. an image and a
            question's token ids), all with the same batch size; ``relevance`` is then a tuple of the same
            length, and the relevance of all inputs together adds up to the explained score. Every float input
            is explained (a float mask multiplied into the signal takes a share: pass constants with
            ``functools.partial(model, mask=...)`` instead); integer inputs that no embedding reads (attention
            masks, lengths) are held fixed and get zero relevance. Input rules (flat, w^2, z^B) go to the
            layers that read an image input (or, without images, a float input), not to layers after an
            embedding.
        target: class to explain: ``None`` (the predicted class), an int, or one int per sample. A model with
            one score per sample that ends in a sigmoid has two classes: 1 (explained from its logit ``z``) and
            0 (explained from ``-z``); other one-score models have only the score (target ``None`` or 0).
        composite: a composite name (see :func:`lrp.composite`) or a :class:`lrp.Composite`.
        start: start relevance: ``"score"`` (the target's logit), ``"unit"`` (1 at the target), ``"prob"``
            (the target's probability: softmax of the logits, or the sigmoid of ``z`` / ``-z`` for a binary
            sigmoid head), or a tensor shaped like the output, which is applied at the model's real output
            (no head is stripped).
        from_logits: explain from the score before a final sigmoid, softmax or log-softmax (over the classes;
            pure reshapes after it are fine), whose identity rule would otherwise pass the probability on as
            the logit's relevance; ``False``: from the output as it is.
        record_layers: also return the relevance at every layer's output in ``.layers``.
        eval_mode: run the model in eval mode (BatchNorm statistics fixed, dropout off); restored afterwards.

    Returns:
        An :class:`Explanation`; ``.relevance`` has the shape of ``x``, and the input's dtype, except that a
        float16 or bfloat16 input (or a model held in half precision, for token ids) gives float32 relevance.

    Mixed precision: ``explain`` works under ``torch.autocast`` and on models held in float16/bfloat16 (with an
    input of that dtype). The forward runs as the model runs it; the rules never compute in half precision:
    every layer rule, stabilised denominator and ratio is computed in float32 with autocast off and cast back
    where autograd needs the activation's dtype (clamped to its finite range, so float16 gives no ``inf``).
    ``output``, ``logits`` and ``start`` keep the model's dtype.
    """
    with torch.inference_mode(False):  # explaining needs autograd; inference tensors among the inputs are cloned
        return _explain(model, x, target, resolve(composite), start, from_logits, record_layers, eval_mode, None)


def check_batch(name: str, t: Tensor, first: Tensor) -> None:
    """``t`` (called ``name`` in errors) is a batch of at least one sample, as many as ``first`` holds."""
    if t.ndim < 1 or t.shape[0] == 0:
        raise LRPError(f"{name} must be a batch with at least one sample along dimension 0, got shape "
                       f"{tuple(t.shape)}")
    if t.shape[0] != first.shape[0]:
        raise LRPError(f"{name} has {t.shape[0]} samples (shape {tuple(t.shape)}), input 0 has {first.shape[0]} "
                       f"(shape {tuple(first.shape)}): every input needs the same batch size along dimension 0")


def _check(model: object, x: object) -> list[Tensor]:
    """The model inputs as a list (one tensor, or a tuple or list of them), checked."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    several = isinstance(x, (tuple, list))
    given = list(x) if isinstance(x, (tuple, list)) else [x]
    if several and not given:
        raise LRPError(f"x is an empty {type(x).__name__}: give the model's inputs, one tensor each")
    inputs: list[Tensor] = []
    clones: dict[int, Tensor] = {}
    for k, t in enumerate(given):
        name = f"input {k} of {len(given)}" if several else "x"
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}"
                            + (" (pass other arguments with functools.partial(model, ...) or a wrapper module)"
                               if several else " (a model with several inputs takes them as a tuple)"))
        if t.is_inference():  # made under torch.inference_mode(): autograd cannot record it, a clone it can
            t = clones.setdefault(id(t), t.clone())
        inputs.append(t)
        if not t.is_floating_point() and (t.is_complex() or t.dtype == torch.bool):
            raise LRPError(f"{name} must be a floating-point tensor or integer token ids, got {t.dtype}")
        check_batch(name, t, inputs[0])
    scripted = [name or "<model>" for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise LRPError(f"module '{scripted[0]}' is TorchScript: its operations run inside the TorchScript "
                       f"interpreter, where lrp cannot see them to apply rules. Explain the Python model instead "
                       f"(load its state dict into the model class).")
    return inputs


def _explain(model: torch.nn.Module, x: Inputs, target: TargetSpec, comp: Composite, start: StartSpec,
             from_logits: bool, record_layers: bool, eval_mode: bool, cache: Optional[WeightCache]) -> Explanation:
    inputs = _check(model, x)
    # on the eager path only (a replay's model state is the recorded one, which passed here)
    inference = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_inference()),
                     None)
    if inference is not None:
        raise LRPError(f"the model's tensor '{inference}' was made under torch.inference_mode(): autograd cannot "
                       f"record an inference tensor, and lrp explains through autograd. Build or load the model "
                       f"outside torch.inference_mode() (torch.no_grad() is fine)")
    leaves = [t.detach() if not t.is_floating_point() else t.detach().requires_grad_(True) for t in inputs]
    trace = Trace(model, comp, leaves)
    propagation: Optional[Propagation] = None
    try:
        with model_lock(model), frozen(model, eval_mode), torch.enable_grad():
            out = _forward(model, trace, leaves)
            found = trace.head_of(out)
            head, logits = found if found is not None and from_logits and not isinstance(start, Tensor) \
                else (None, out)
            binary = head == "sigmoid" and (logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1))
            if isinstance(start, Tensor) and target is None and logits.ndim > 2:
                idx = None  # e.g. a mask over a segmentation map: it says what to explain
            else:
                idx = binary_targets(logits, target) if binary else class_targets(logits, target)
            relevance_out = start_relevance(logits, idx, start, head, binary)
            propagation = Propagation(trace, record_layers, cache)
            roots = [leaf for leaf in leaves if leaf.is_floating_point()] + trace.token_leaves
            grad_out = output_gradient(logits.detach(), idx, relevance_out, start, binary)
            grads = propagation.run(logits, roots, grad_out)
        relevance = propagation.input_relevance(roots, grads, leaves, out)
        res = _explanation(trace, relevance if isinstance(x, (tuple, list)) else relevance[0], out.detach(), idx,
                           relevance_out, comp)
        res.head, res.logits = head, logits.detach()
        res._output_head = found[0] if found is not None else None  # for .probabilities when not stripped
        return res
    finally:
        trace.release()
        if propagation is not None:
            propagation.release()


class Explainer:
    """Explain one model again and again (video frames, a dataset, a server) with one composite.

    ``explainer(x, target)`` gives what ``lrp.explain(model, x, target, composite)`` gives, faster from the
    third call on inputs of one shape: the second such call is recorded as a program of tensor operations
    (forward, rules and backward; :mod:`lrp.engine.replay`), and later calls run that program without the
    model's Python, the capture or autograd. A call is explained eagerly, and never replayed, when the model
    reads a value of its input or weights into Python (an ``if`` on a tensor, ``.item()``) or runs an
    operation whose output shape depends on values (``nonzero``, boolean masks); ``why_not_replayed`` says
    why. A program is used only while the model is as it was recorded: the same parameter, buffer and
    tensor-attribute objects (their values are read on every call, so weights changed in place or a loaded
    state dict need nothing), the same modules, hooks and plain attributes (numbers, strings, flags; other
    objects by identity: one changed in place is not seen), and the same autocast and default-dtype settings;
    any change records anew. Python side effects of the model's ``forward`` (printing, counters, hooks' own
    work) happen only in the calls that are not replayed. ``replay=False`` explains every call eagerly.

    On a CUDA device the replays run as CUDA graphs (``cuda_graphs=True``; :mod:`lrp.engine.graphs`): one
    launch for the whole program instead of one per kernel, which is most of the time at small batches. The
    program's first replay runs it directly; then its graph is captured, and its first replay is checked
    against the program on the same inputs before the graph is used. The graphs of one explainer share one
    memory pool, which holds what the largest program needs while it runs for as long as the explainer keeps
    its programs. ``calls["graphed"]`` counts the calls a graph gave; ``why_not_graphed`` says why the last
    kind of call does not run as one (on the CPU: graphs run on CUDA devices).

    ``compile=True`` also compiles each program with ``torch.compile`` (inductor) in its second replay, and uses
    it once its outputs agree with the program's to 1e-2 of their largest magnitude: inductor fuses and
    reorders floating-point work, so the relevance is close to ``explain``'s, not bit for bit. Compiling takes
    seconds to minutes per program and needs a C++ compiler on the CPU (Triton on a GPU). On a 2-core CPU it
    hardly pays (VGG16 at batch 8: 0.95x the program's time; ResNet18 at batch 1: 1.09x;
    ``benchmarks/compile_replay.py``); on a GPU, where it fuses the rules' elementwise passes, it is yet to be
    measured. ``why_not_compiled`` says why a program is not compiled.

    Eager calls keep what does not depend on the input between calls: the tensors rules build from the
    weights (``W+``, BatchNorm merged into the layer before it, flat counts, w^2 sums, z^B offsets), used again
    only while every tensor they were built from is the same object with the same version counter, storage
    and values (a hash, ``torch.hash_tensor``, of them: a change that only swaps values between elements in
    place is not seen) and the rule's parameters are unchanged. Modes need nothing: like ``explain``, each
    call runs in eval mode (``eval_mode=True``) and restores the model's modes.

    Up to ``programs`` recorded programs (one per input shape, target kind and option set) are kept, the
    least recently used dropped first. They keep the weight-derived tensors their rules need, built by the first
    replay: about the size of the weights of the layers whose rules build them, per tensor kept (ResNet50: 90 MB
    with epsilon-plus-flat, 182 MB with epsilon-gamma-box, for 97 MB of weights), one set shared by the programs
    whose weight-only work is the same (inputs of another batch size, say). Call :meth:`clear` to drop the
    programs and every kept tensor.
    """

    def __init__(self, model: torch.nn.Module, composite: Union[str, Composite, None] = "epsilon-plus-flat", *,
                 eval_mode: bool = True, replay: bool = True, programs: int = 8, cuda_graphs: bool = True,
                 compile: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if programs < 1:
            raise ValueError(f"programs must be at least 1, got {programs}")
        self.model = model
        self.composite = resolve(composite)
        self.eval_mode = eval_mode
        self.replay = replay
        self.cache = WeightCache()
        self.calls: Counter[str] = Counter()  # "eager", "recorded", "replayed", "graphed"
        self.why_not_replayed: Optional[str] = None
        self.graphs = GraphPool() if cuda_graphs else None
        self.kept = KeptTensors()
        self.compile = compile
        self._programs: OrderedDict[tuple, _Recording] = OrderedDict()
        self._limit = programs
        self._state: Optional[ModelState] = None
        self._lock = threading.Lock()

    def __call__(self, x: Inputs, target: TargetSpec = None, *, start: StartSpec = "score", from_logits: bool = True,
                 record_layers: bool = False) -> Explanation:
        """As :func:`explain` with this explainer's model and composite."""
        with torch.inference_mode(False):  # as in explain
            return self._call(x, target, start, from_logits, record_layers)

    def _call(self, x: Inputs, target: TargetSpec, start: StartSpec, from_logits: bool,
              record_layers: bool) -> Explanation:
        if not self.replay or not isinstance(start, str):  # a start tensor is explained eagerly
            return self._eager(x, target, start, from_logits, record_layers)
        inputs = _check(self.model, x)
        with model_lock(self.model):  # not while another thread's eager call has its capture's hooks in place
            state = ModelState(self.model, not self.eval_mode, (self.composite, _MODULE_RULES))
        several = isinstance(x, (tuple, list))
        aliases = tuple(next(j for j, u in enumerate(inputs) if u is t) for t in inputs)
        key = (input_signature(inputs), aliases, several, target is None, start, from_logits, record_layers,
               global_state())
        with self._lock:
            if not state.same(self._state):
                if self._programs:
                    self.why_not_replayed = ("the model changed between calls (its modules, their attributes, "
                                             "parameters, buffers or hooks, or the rules): each change records anew")
                self._programs.clear()
                self.kept.retain(set())
                self._state = state
            tensors = self._state.tensors if self._state is not None else state.tensors
            if any(t is u for t in inputs for u in tensors):  # an input that is also one of the model's tensors
                return self._eager(x, target, start, from_logits, record_layers)
            found = self._programs.get(key)
            if found is not None:
                self._programs.move_to_end(key)
        if found is None:  # first call of its kind: eager, and what the output looks like is noted
            res = self._eager(x, target, start, from_logits, record_layers)
            with self._lock:
                self._programs[key] = _Recording(tuple(res._z.shape), res._z.device, res._binary)
                while len(self._programs) > self._limit:
                    self._programs.popitem(last=False)
                self.kept.retain({r.program.prepare_code for r in self._programs.values() if r.program is not None})
            return res
        idx = None if target is None else found.indices(target)
        targets = [] if idx is None else [idx]
        program = found.program
        if program is not None and program.fresh():
            replayed = program([*inputs, *targets], tensors)
            if replayed is not None:
                self._count("graphed" if replayed[1] else "replayed")
                return Explanation(**replayed[0])
            if program.mismatches >= _MISMATCHES:
                found.program = None
                found.refused = self.why_not_replayed = (
                    f"a value read into Python while recording (by the model: an if on a tensor, .item(), "
                    f".tolist(); or by a rule choosing its path) differed from the recording, or the program "
                    f"failed, in {_MISMATCHES} calls; the last time {program.mismatch}")
            return self._eager(x, target, start, from_logits, record_layers)
        with self._lock:
            eager = found.refused is not None or found.recording  # not replayable, or another thread records it
            found.recording = found.recording or not eager
        if eager:
            return self._eager(x, target, start, from_logits, record_layers)

        def run(flat: Sequence[Tensor]) -> dict:
            given = list(flat[:len(inputs)])
            with targets_checked():
                res = _explain(self.model, given if several else given[0], flat[len(inputs)] if targets else None,
                               self.composite, start, from_logits, record_layers, self.eval_mode, None)
            return {f.name: getattr(res, f.name) for f in fields(res)}

        try:
            result, found.program, reason = record(run, [*inputs, *targets, *tensors], len(inputs) + len(targets),
                                                   self.graphs, self.kept, self.compile)
        finally:
            found.recording = False
        if found.program is None:
            said = self.why_not_replayed
            found.refused = self.why_not_replayed = reason
            if result is None:  # the recording stopped part way
                try:
                    return self._eager(x, target, start, from_logits, record_layers)
                except Exception:  # the model fails on this input, not only under the tracer: the tracer is
                    found.refused, self.why_not_replayed = None, said  # not to blame; the next call records
                    raise
            self._count("eager")  # explained, under the tracer, but not to be replayed
            return Explanation(**result)
        self._count("recorded")
        return Explanation(**result)

    @property
    def why_not_compiled(self) -> Optional[str]:
        """Why the replays of the kind of call made last do not run compiled (``compile=True``); ``None`` once
        they do."""
        with self._lock:
            last = next(reversed(self._programs.values()), None)
        if not self.compile:
            return "compile is off (compile=False)"
        if last is None or last.program is None:
            return "no call of this kind has been replayed" if last is None or last.refused is None else \
                f"calls of this kind are not replayed: {last.refused}"
        if last.program.compiled is None and last.program.why_not_compiled is None:
            return "not yet: the program is compiled in its second replay"
        return last.program.why_not_compiled

    @property
    def why_not_graphed(self) -> Optional[str]:
        """Why the replays of the kind of call made last do not run as a CUDA graph; ``None`` once they do."""
        with self._lock:
            last = next(reversed(self._programs.values()), None)
        if self.graphs is None:
            return "CUDA graphs are off (cuda_graphs=False)"
        if last is None or last.program is None:
            return "no call of this kind has been replayed" if last is None or last.refused is None else \
                f"calls of this kind are not replayed: {last.refused}"
        return last.program.graph_status()

    def _count(self, kind: str) -> None:
        with self._lock:
            self.calls[kind] += 1

    def _eager(self, x: Inputs, target: TargetSpec, start: StartSpec, from_logits: bool,
               record_layers: bool) -> Explanation:
        self._count("eager")
        return _explain(self.model, x, target, self.composite, start, from_logits, record_layers, self.eval_mode,
                        self.cache)

    def clear(self) -> None:
        """Drop the recorded programs and the weight-derived tensors kept between calls."""
        self.cache.clear()
        with self._lock:
            self._programs.clear()
            self.kept.retain(set())

    def __repr__(self) -> str:
        return f"Explainer({type(self.model).__name__}, composite={self.composite.name!r})"


_MISMATCHES = 3  # replays discarded (see lrp.engine.values) before a kind of call is explained eagerly for good


@dataclass
class _Recording:
    """What the first call of one kind showed (the scores' shape and device, and whether they are one logit
    before a sigmoid), the program recorded from the second, or why there is none."""

    shape: tuple
    device: torch.device
    binary: bool
    program: Optional[Program] = None
    refused: Optional[str] = None
    recording: bool = False

    def indices(self, target: TargetSpec) -> Optional[Tensor]:
        """``target`` as one class index per sample (``None`` for one score per sample without a sigmoid),
        checked against the scores as ``explain`` checks it, on a stand-in of their shape that holds one
        element (the checks read only the shape and device)."""
        scores = torch.zeros((), device=self.device).expand(self.shape)
        return binary_targets(scores, target) if self.binary else class_targets(scores, target)


def _forward(model: torch.nn.Module, trace: Trace, leaves: list[Tensor]) -> Tensor:
    try:
        with trace.capture():
            out = model(*leaves)
    except LRPError:
        raise  # lrp's own error says what is wrong
    except Exception as exc:
        if len(leaves) == 1 and not leaves[0].is_floating_point() and not trace.token_leaves:
            raise LRPError(f"x holds integers ({leaves[0].dtype}), which lrp reads as token ids, but the model failed "
                           f"before any embedding layer read them ({type(exc).__name__}: {exc}); pass a "
                           f"floating-point input instead") from exc
        raise
    out = model_output(trace.fresh(out))
    if trace.fixed and not out.requires_grad:
        raise UnsupportedOperationError(
            "the model output depends on the input only through values lrp holds fixed as normalisation "
            "statistics (powers, roots, var, std, norm of the signal), so no relevance would reach the input; "
            "these ops are supported only where a statistic scales the signal (x * rsqrt(mean(x**2)), x / norm). "
            "Register a lrp.rules.ModuleRule for the module that computes the output this way.")
    if out.shape[:1] != leaves[0].shape[:1]:
        raise LRPError(f"the model output has shape {tuple(out.shape)}; explain needs the batch dimension "
                       f"first, as in the input {tuple(leaves[0].shape)}")
    if len(leaves) == 1 and _unread_ids(trace, leaves):  # with several inputs: a mask or lengths, held fixed
        raise LRPError(f"x holds integers ({leaves[0].dtype}), which lrp reads as token ids, but no embedding layer "
                       f"(nn.Embedding / F.embedding) reads them; pass a floating-point input instead")
    return out


def _unread_ids(trace: Trace, leaves: list[Tensor]) -> list[int]:
    """The integer inputs no embedding read (their positions among all ids: see ``Trace.token_positions``)."""
    unread, start = [], 0
    for k, t in enumerate(leaves):
        if t.is_floating_point():
            continue
        end = start + t.numel()
        if not any(values.read(((p >= start) & (p < end)).any()) for p in trace.token_positions):
            unread.append(k)
        start = end
    return unread


def _explanation(trace: Trace, relevance: Union[Tensor, list[Tensor]], out: Tensor, idx: Optional[Tensor],
                 start: Tensor, comp: Composite) -> Explanation:
    total = start.reshape(start.shape[0], -1).sum(1)
    conservation: dict[str, Tensor] = {}
    rules: dict[str, str] = {}
    layers: dict[str, Tensor] = {}
    for layer in trace.layers:
        rules[layer.name] = repr(layer.rule)
        if layer.total is not None:
            conservation[layer.name] = layer.total / (total if layer.total.ndim else total.sum())
        if layer.relevance is not None:
            layers[layer.name] = layer.relevance
    parts = relevance if isinstance(relevance, list) else [relevance]
    conservation["input"] = sum(r.reshape(r.shape[0], -1).sum(1) for r in parts) / total
    kept = tuple(relevance) if isinstance(relevance, list) else relevance  # a tuple for a tuple of inputs
    return Explanation(kept, out, idx, start, conservation, rules, layers, comp)  # type: ignore[arg-type]
