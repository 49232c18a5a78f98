"""What to explain: the model's output tensor, the class per sample, the start relevance and the gradient
that carries it into the backward (``out * g`` is the start relevance)."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence, Union

import torch

from ..errors import LRPError, TargetError
from .precision import restore, to_working, working_dtype

Tensor = torch.Tensor
TargetSpec = Union[None, int, Sequence[int], Tensor]
StartSpec = Union[str, Tensor]


_CHECKED: ContextVar[bool] = ContextVar("lrp_targets_checked", default=False)


@contextmanager
def targets_checked() -> Iterator[None]:
    """The targets given were checked against the output's shape already (``lrp.Explainer`` does so before it
    records a call): skip the checks that read their values, which a recording cannot hold."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def model_output(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise LRPError(f"explain needs a model that returns one tensor; this one returns {type(out).__name__}. Wrap it, "
                   f"e.g. a module whose forward returns model(x)[0].")


def class_indices(target: TargetSpec, n: int, device: torch.device) -> Tensor:
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


def class_targets(out: Tensor, target: TargetSpec) -> Optional[Tensor]:
    """Class index per sample for an output without a binary sigmoid head (``None`` for one score per sample)."""
    n = out.shape[0]
    if out.ndim == 1:
        if target is not None:
            idx = class_indices(target, n, out.device)
            if not _CHECKED.get() and bool((idx != 0).any()):
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
    idx = class_indices(target, n, out.device)
    bad = (idx < 0) | (idx >= classes)
    if not _CHECKED.get() and bool(bad.any()):
        if classes == 1:
            raise TargetError(f"the model output has shape {tuple(out.shape)} (one score per sample), so the only "
                              f"target is 0 (the score); got {idx[bad][0].item()}: {_ONE_SCORE}")
        raise TargetError(f"target {idx[bad][0].item()} is out of range: the model has {classes} outputs "
                          f"(indices 0..{classes - 1})")
    return idx


def _shown(target: TargetSpec) -> str:
    return repr(target.tolist()) if isinstance(target, Tensor) else repr(target)


def binary_targets(z: Tensor, target: TargetSpec) -> Tensor:
    """Class per sample (0 or 1) for one logit per sample before a sigmoid; default: the predicted class."""
    n = z.shape[0]
    if target is None:
        return (z.detach().reshape(n) > 0).long()
    idx = class_indices(target, n, z.device)
    bad = (idx < 0) | (idx > 1)
    if not _CHECKED.get() and bool(bad.any()):
        raise TargetError(f"target {idx[bad][0].item()} is out of range: the model ends in a sigmoid over one score, "
                          f"so it has two classes, 1 (positive, explained from the logit z) and 0 (negative, "
                          f"explained from -z)")
    return idx


def _sign(z: Tensor, idx: Tensor) -> Tensor:
    """+1 where the target is class 1, -1 where it is class 0, shaped like the logits ``z``."""
    return (2 * idx - 1).to(z.dtype).reshape((-1,) + (1,) * (z.ndim - 1)).expand_as(z)


def start_relevance(out: Tensor, idx: Optional[Tensor], start: StartSpec, head: Optional[str] = None,
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


def output_gradient(out: Tensor, idx: Optional[Tensor], relevance: Tensor, start: StartSpec,
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
