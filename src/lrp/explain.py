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
from .graph import Trace

Tensor = torch.Tensor
TargetSpec = Union[None, int, Sequence[int], Tensor]
StartSpec = Union[str, Tensor]


@dataclass
class Explanation:
    """The result of :func:`explain`.

    ``relevance`` has the input's shape. ``conservation`` maps each layer (and ``"input"``) to the relevance
    summed at its output per sample, divided by the start relevance: 1.0 means conserved (for branching models
    a layer's total covers only the branch through it; inside attention, where the batch need not be the
    first dimension, the value is one 0-dim ratio for the whole batch).
    """

    relevance: Tensor
    output: Tensor
    target: Optional[Tensor]
    start: Tensor
    conservation: dict[str, Tensor]
    rules: dict[str, str]
    layers: dict[str, Tensor] = field(default_factory=dict)
    composite: Optional[Composite] = None


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


def _targets(out: Tensor, target: TargetSpec) -> Optional[Tensor]:
    n = out.shape[0]
    if out.ndim == 1:
        if target not in (None, 0):
            raise TargetError(f"the model output has shape {tuple(out.shape)} (one score per sample), so the only "
                              f"target is 0; got {target!r}")
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
    if isinstance(target, bool):
        raise TargetError(f"target must be a class index, got {target!r}")
    if isinstance(target, int):
        idx = torch.full((n,), target, dtype=torch.long, device=out.device)
    else:
        try:
            idx = torch.as_tensor(target, device=out.device)
        except (TypeError, ValueError) as exc:
            raise TargetError(f"target must be None, an int, or one int per sample; got {target!r}") from exc
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TargetError(f"target must hold integer class indices, got dtype {idx.dtype}")
        idx = idx.long().reshape(-1)
        if idx.numel() == 1:
            idx = idx.expand(n).clone()
        if idx.numel() != n:
            raise TargetError(f"got {idx.numel()} targets for a batch of {n}; give one per sample or a single int")
    bad = (idx < 0) | (idx >= classes)
    if bool(bad.any()):
        raise TargetError(f"target {idx[bad][0].item()} is out of range: the model has {classes} outputs "
                          f"(indices 0..{classes - 1})")
    return idx


def _start(out: Tensor, idx: Optional[Tensor], start: StartSpec) -> Tensor:
    out = out.detach()
    if isinstance(start, Tensor):
        if start.shape != out.shape:
            raise TargetError(f"start relevance has shape {tuple(start.shape)}; it must match the model output "
                              f"{tuple(out.shape)}")
        return start.to(out)
    if idx is None:
        mask = torch.ones_like(out)
    else:
        mask = torch.zeros_like(out).scatter_(1, idx[:, None], 1.0)
    if start == "score":
        return mask * out
    if start == "unit":
        return mask
    if start == "prob":
        if out.ndim != 2:
            raise TargetError("start='prob' needs an output shaped (batch, classes)")
        return mask * torch.softmax(out, 1)
    raise TargetError(f"start must be 'score', 'unit', 'prob' or a tensor shaped like the output; got {start!r}")


def _output_gradient(out: Tensor, idx: Optional[Tensor], relevance: Tensor, start: StartSpec) -> Tensor:
    """``g`` at the output, so that ``out * g`` is the start relevance (exactly one-hot for ``"score"``)."""
    if isinstance(start, str) and start == "score" and idx is not None:
        return torch.zeros_like(out).scatter_(1, idx[:, None], 1.0)
    tiny = torch.finfo(out.dtype).tiny ** 0.5
    return relevance / torch.where(out == 0, torch.full_like(out, tiny), out)


def explain(
    model: torch.nn.Module,
    x: Tensor,
    target: TargetSpec = None,
    composite: Union[str, Composite, None] = "epsilon-plus-flat",
    *,
    start: StartSpec = "score",
    record_layers: bool = False,
    eval_mode: bool = True,
) -> Explanation:
    """Explain ``model(x)`` with Layer-wise Relevance Propagation.

    Args:
        model: any ``nn.Module``; it is not modified (modes, flags and hooks are restored, also on error).
        x: input batch (first dimension = samples): floating point, or integer token ids read by an embedding
            layer, in which case the relevance of each token (summed over its embedding vector) is returned.
        target: class to explain: ``None`` (the predicted class), an int, or one int per sample.
        composite: a composite name (see :func:`lrp.composite`) or a :class:`lrp.Composite`.
        start: start relevance at the output: ``"score"`` (the target's output value), ``"unit"`` (1 at the
            target), ``"prob"`` (the target's softmax probability), or a tensor shaped like the output.
        record_layers: also return the relevance at every layer's output in ``.layers``.
        eval_mode: run the model in eval mode (BatchNorm statistics fixed, dropout off); restored afterwards.

    Returns:
        An :class:`Explanation`; ``.relevance`` has the shape of ``x``.
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
            idx = _targets(out, target)
            relevance_out = _start(out, idx, start)
            trace.finalize()
            roots = trace.token_leaves if tokens else [leaf]
            grads = _backward(out, roots, idx, relevance_out, start)
        relevance = _input_relevance(trace, roots, grads, tokens, x, out)
        return _explanation(trace, relevance, out.detach(), idx, relevance_out, comp)
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


def _backward(out: Tensor, roots: list, idx: Optional[Tensor], relevance_out: Tensor, start: StartSpec) -> list:
    if not out.requires_grad:
        return [None] * len(roots)
    grad_out = _output_gradient(out.detach(), idx, relevance_out, start)
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
        r = torch.zeros_like(root) if g is None else root.detach() * g
        if id(root) in trace.direct:
            r = r + trace.direct[id(root)]
        if tokens:
            r = r.sum(-1)
        relevance = r if relevance is None else relevance + r
    if relevance is None:
        relevance = torch.zeros(x.shape, dtype=out.dtype, device=x.device)
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
