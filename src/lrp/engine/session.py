"""A model call that leaves the model as it was: one call at a time per model, eval mode and frozen
parameters during the call, modes and flags restored afterwards (also on error)."""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch

_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The lock that serialises ``explain`` calls (and other mode-changing calls) on ``model`` across threads."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def frozen(model: torch.nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run in eval mode (if ``eval_mode``) with parameter gradients off; restore modes and flags afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    # an inference tensor (made under torch.inference_mode()) takes no requires_grad=True outside it: left as it is
    flags = [(p, p.requires_grad) for p in model.parameters() if not p.is_inference()]
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
