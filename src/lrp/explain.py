"""``lrp.explain``: one call that explains any PyTorch model with LRP."""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from .composites import Composite, resolve
from .errors import LRPError, TargetError
from .functions import restore, to_working, working_dtype
from .graph import Trace

Tensor = torch.Tensor
TargetSpec = Union[None, int, Sequence[int], Tensor]
StartSpec = Union[str, Tensor]


@dataclass
class Explanation:
    """The result of :func:`explain`.

    ``relevance`` has the input's shape. ``output`` is the model's real output. ``head`` names the final
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

    relevance: Tensor
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


_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(model: torch.nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def _untouched(model: torch.nn.Module, eval_mode: bool) -> Iterator[None]:
    """Run in eval mode with parameter gradients off; restore modes and flags afterwards, even on error."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            try:
                model.eval()
            except NotImplementedError:  # a torch.export program: fixed to the mode it was exported in
                pass
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _select_output(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise LRPError(f"explain needs a model that returns one tensor; this one returns {type(out).__name__}. Wrap it, "
                   f"e.g. a module whose forward returns model(x)[0].")


def _class_indices(target: TargetSpec, n: int, device: torch.device) -> Tensor:
    """``target`` (an int, one int per sample, or a tensor of them) as a (n,) long tensor."""
    if isinstance(target, bool):
        raise TargetError(f"target must be a class index, got {target!r}")
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=device)
    try:
        idx = torch.as_tensor(target, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TargetError(f"target must be None, an int, or one int per sample; got {target!r}") from exc
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TargetError(f"target must hold integer class indices, got dtype {idx.dtype}")
    idx = idx.long().reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(n).clone()
    if idx.numel() != n:
        raise TargetError(f"got {idx.numel()} targets for a batch of {n}; give one per sample or a single int")
    return idx


_ONE_SCORE = ("only a model ending in a sigmoid has two classes (1 explained from its logit z, 0 from -z); to "
              "explain another quantity, pass start=<tensor shaped like the output>")


def _targets(out: Tensor, target: TargetSpec) -> Optional[Tensor]:
    """Class index per sample for an output without a binary sigmoid head (``None`` for one score per sample)."""
    n = out.shape[0]
    if out.ndim == 1:
        if target is not None:
            idx = _class_indices(target, n, out.device)
            if bool((idx != 0).any()):
                raise TargetError(f"the model output has shape {tuple(out.shape)} (one score per sample), so the "
                                  f"only target is 0 (the score); got {_shown(target)}: {_ONE_SCORE}")
        return None
    if out.ndim != 2:
        if target is None:
            raise TargetError(f"the model output has shape {tuple(out.shape)}; say what to explain with "
                              f"start=<tensor of that shape> (e.g. a mask over the output)")
        raise TargetError(f"target indexes classes of an output shaped (batch, classes); this output has shape "
                          f"{tuple(out.shape)}. Pass start=<tensor of that shape> instead")
    classes = out.shape[1]
    if target is None:
        return out.argmax(1)
    idx = _class_indices(target, n, out.device)
    bad = (idx < 0) | (idx >= classes)
    if bool(bad.any()):
        if classes == 1:
            raise TargetError(f"the model output has shape {tuple(out.shape)} (one score per sample), so the only "
                              f"target is 0 (the score); got {idx[bad][0].item()}: {_ONE_SCORE}")
        raise TargetError(f"target {idx[bad][0].item()} is out of range: the model has {classes} outputs "
                          f"(indices 0..{classes - 1})")
    return idx


def _shown(target: TargetSpec) -> str:
    return repr(target.tolist()) if isinstance(target, Tensor) else repr(target)


def _binary_targets(z: Tensor, target: TargetSpec) -> Tensor:
    """Class per sample (0 or 1) for one logit per sample before a sigmoid; default: the predicted class."""
    n = z.shape[0]
    if target is None:
        return (z.detach().reshape(n) > 0).long()
    idx = _class_indices(target, n, z.device)
    bad = (idx < 0) | (idx > 1)
    if bool(bad.any()):
        raise TargetError(f"target {idx[bad][0].item()} is out of range: the model ends in a sigmoid over one score, "
                          f"so it has two classes, 1 (positive, explained from the logit z) and 0 (negative, "
                          f"explained from -z)")
    return idx


def _sign(z: Tensor, idx: Tensor) -> Tensor:
    """+1 where the target is class 1, -1 where it is class 0, shaped like the logits ``z``."""
    return (2 * idx - 1).to(z.dtype).reshape((-1,) + (1,) * (z.ndim - 1)).expand_as(z)


def _start(out: Tensor, idx: Optional[Tensor], start: StartSpec, head: Optional[str] = None,
           binary: bool = False) -> Tensor:
    """Start relevance at ``out`` (the logits when a head was stripped, else the model output)."""
    out = out.detach()
    if isinstance(start, Tensor):
        if start.shape != out.shape:
            raise TargetError(f"start relevance has shape {tuple(start.shape)}; it must match the model output "
                              f"{tuple(out.shape)}")
        return start.to(out)
    if not isinstance(start, str) or start not in ("score", "unit", "prob"):
        raise TargetError(f"start must be 'score', 'unit', 'prob' or a tensor shaped like the output; got {start!r}")
    if binary:
        assert idx is not None  # a binary head always has one class per sample
        signed = out * _sign(out, idx)  # the explained class's log-odds: z for class 1, -z for class 0
        return signed if start == "score" else torch.ones_like(out) if start == "unit" else torch.sigmoid(signed)
    if idx is None:
        mask = torch.ones_like(out)
    else:
        mask = torch.zeros_like(out).scatter_(1, idx[:, None], 1.0)
    if start == "score":
        return mask * out
    if start == "unit":
        return mask
    if out.ndim != 2:
        raise TargetError("start='prob' needs an output shaped (batch, classes)")
    return mask * (torch.sigmoid(out) if head == "sigmoid" else torch.softmax(out, 1))


def _output_gradient(out: Tensor, idx: Optional[Tensor], relevance: Tensor, start: StartSpec,
                     binary: bool = False) -> Tensor:
    """``g`` at the output, so that ``out * g`` is the start relevance (exactly one-hot, or exactly +-1 at a
    binary logit, for ``"score"``)."""
    if isinstance(start, str) and start == "score" and idx is not None:
        if binary:
            return _sign(out, idx).clone()
        return torch.zeros_like(out).scatter_(1, idx[:, None], 1.0)
    tiny = torch.finfo(out.dtype).tiny ** 0.5
    dtype = working_dtype(out)  # divided in float32 for a half-precision output; no inf when cast back
    den = to_working(out, dtype)
    return restore(to_working(relevance, dtype) / torch.where(den == 0, torch.full_like(den, tiny), den), out.dtype)


def explain(
    model: torch.nn.Module,
    x: Tensor,
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
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    scripted = [name or "<model>" for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise LRPError(f"module '{scripted[0]}' is TorchScript: its operations run inside the TorchScript "
                       f"interpreter, where lrp cannot see them to apply rules. Explain the Python model instead "
                       f"(load its state dict into the model class).")
    tokens = not x.is_floating_point()
    if tokens and (x.is_complex() or x.dtype == torch.bool):
        raise LRPError(f"x must be a floating-point tensor or integer token ids, got {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise LRPError(f"x must be a batch with at least one sample along dimension 0, got shape {tuple(x.shape)}")
    comp = resolve(composite)
    leaf = x.detach() if tokens else x.detach().requires_grad_(True)
    trace = Trace(model, comp, leaf, record_layers)
    try:
        with _lock_for(model), _untouched(model, eval_mode), torch.enable_grad():
            out = _forward(model, trace, leaf, tokens)
            found = trace.head_of(out)
            head, logits = found if found is not None and from_logits and not isinstance(start, Tensor) \
                else (None, out)
            binary = head == "sigmoid" and (logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1))
            if isinstance(start, Tensor) and target is None and logits.ndim > 2:
                idx = None  # e.g. a mask over a segmentation map: it says what to explain
            else:
                idx = _binary_targets(logits, target) if binary else _targets(logits, target)
            relevance_out = _start(logits, idx, start, head, binary)
            trace.finalize()
            roots = trace.token_leaves if tokens else [leaf]
            grads = _backward(logits, roots, idx, relevance_out, start, binary)
        relevance = _input_relevance(trace, roots, grads, tokens, x, out)
        res = _explanation(trace, relevance, out.detach(), idx, relevance_out, comp)
        res.head, res.logits = head, logits.detach()
        res._output_head = found[0] if found is not None else None  # for .probabilities when not stripped
        return res
    finally:
        trace.release()


def _forward(model: torch.nn.Module, trace: Trace, leaf: Tensor, tokens: bool) -> Tensor:
    try:
        with trace.capture():
            out = model(leaf)
    except Exception as exc:
        if tokens and not trace.token_leaves:
            raise LRPError(f"x holds integers ({leaf.dtype}), which lrp reads as token ids, but the model failed "
                           f"before any embedding layer read them ({type(exc).__name__}: {exc}); pass a "
                           f"floating-point input instead") from exc
        raise
    out = _select_output(trace._fresh(out))
    if out.shape[:1] != leaf.shape[:1]:
        raise LRPError(f"the model output has shape {tuple(out.shape)}; explain needs the batch dimension "
                       f"first, as in the input {tuple(leaf.shape)}")
    if tokens and not trace.token_leaves:
        raise LRPError(f"x holds integers ({leaf.dtype}), which lrp reads as token ids, but no embedding layer "
                       f"(nn.Embedding / F.embedding) reads them; pass a floating-point input instead")
    return out


def _backward(out: Tensor, roots: list, idx: Optional[Tensor], relevance_out: Tensor, start: StartSpec,
              binary: bool = False) -> list:
    if not out.requires_grad:
        return [None] * len(roots)
    grad_out = _output_gradient(out.detach(), idx, relevance_out, start, binary)
    try:
        return list(torch.autograd.grad(out, roots, grad_out, allow_unused=True))
    except RuntimeError as exc:
        if "inplace operation" in str(exc):
            raise LRPError(f"the model modifies a tensor in place that explain needs later ({exc}). Write "
                           f"that operation out of place.") from exc
        raise


def _input_relevance(trace: Trace, roots: list, grads: list, tokens: bool, x: Tensor, out: Tensor) -> Tensor:
    """``root * g`` plus what input rules gave the root directly; for token ids summed over the embedding."""
    relevance = None
    for root, g in zip(roots, grads):
        dtype = working_dtype(root)  # float32 for half-precision inputs (see explain's docstring)
        r = (torch.zeros_like(root, dtype=dtype) if g is None
             else to_working(root.detach(), dtype) * to_working(g, dtype))
        if id(root) in trace.direct:
            r = r + trace.direct[id(root)]
        if tokens:
            r = r.sum(-1)
        relevance = r if relevance is None else relevance + r
    if relevance is None:
        relevance = torch.zeros(x.shape, dtype=working_dtype(x if x.is_floating_point() else out), device=x.device)
    return relevance.detach()


def _explanation(trace: Trace, relevance: Tensor, out: Tensor, idx: Optional[Tensor], start: Tensor,
                 comp: Composite) -> Explanation:
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
    conservation["input"] = relevance.reshape(relevance.shape[0], -1).sum(1) / total
    return Explanation(relevance, out, idx, start, conservation, rules, layers, comp)
