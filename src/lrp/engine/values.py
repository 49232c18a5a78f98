"""Tensor values read into Python, and how a recording for replay keeps them honest.

The engine reads a few values to choose a path (whether a layer's input has a negative element: z+,
alpha-beta and gamma have a cheaper form for non-negative inputs; whether a constant operand is non-negative;
which tokens an embedding read), and so may a model (``if x.sum() > 0``, ``.item()``, ``.tolist()``). A program
recorded for replay (:mod:`lrp.engine.replay`) would bake the values seen into itself. So while a call is
recorded, every value read into Python becomes a guard: the program recomputes the tensor it came from on
every replay and compares it with the value seen when recording; a replay whose guards differ is discarded
and the call explained eagerly. Reads that go through torch's dispatcher (``bool``, ``int``, ``float``,
``.item()``, ``torch.equal``) are caught there; ``.tolist()``, ``.numpy()``, ``__array__`` and split points
given as tensors (``tensor_split``, ``narrow``) read memory directly and are caught by a torch function mode
(both in :func:`guarded`); the engine's own code reads through :func:`read` and :func:`guard`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

Tensor = torch.Tensor
Guards = list[tuple[Tensor, Tensor, str]]  # (the tensor in the recording, its value when recorded, where read)

_GUARDS: ContextVar[Optional[Guards]] = ContextVar("lrp_guards", default=None)


def recording() -> bool:
    return _GUARDS.get() is not None


def guard(t: Tensor, by_model: bool = False) -> Tensor:
    """``t``'s values, safe to read into Python; while a call is recorded, ``t`` becomes a guard. ``by_model``:
    the model reads them (through the capture), so the place named is the model's, not the engine's."""
    guards = _GUARDS.get()
    if guards is None:
        return t
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with disable_proxy_modes_tracing():
        value = t.detach().clone()
    guards.append((t, value, _reader(_MODEL_INTERNAL if by_model else _INTERNAL)))
    return value


_INTERNAL = ("/torch/", "/contextlib.py", "/lrp/engine/values.py", "/lrp/engine/replay.py")
_MODEL_INTERNAL = _INTERNAL + ("/lrp/engine/",)  # a model's read passes through the capture


def _reader(internal: tuple[str, ...]) -> str:
    """Where the value is read: the innermost frame outside torch and this machinery (``file:line in function``,
    the file relative to its package or folder)."""
    import sys

    frame = sys._getframe(2)
    while frame is not None and any(part in frame.f_code.co_filename.replace("\\", "/") for part in internal):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "an unknown place"
    parts = frame.f_code.co_filename.replace("\\", "/").split("/")
    ours = frame.f_globals.get("__name__", "").startswith("lrp.") and "lrp" in parts
    name = "/".join(parts[len(parts) - 1 - parts[::-1].index("lrp"):] if ours else parts[-1:])
    return f"{name}:{frame.f_lineno} in {frame.f_code.co_name}"


def read(flag: Tensor) -> bool:
    """``bool(flag)`` for a one-element tensor (a guard while a call is recorded)."""
    return bool(guard(flag))


def untraced() -> ContextManager[object]:
    """Work on tensors that only describes layouts, no value of the model's computation: kept out of a
    recording, where the tracer would take it for a read of values."""
    if _GUARDS.get() is None:
        return nullcontext()
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    return disable_proxy_modes_tracing()


class _Reads(TorchDispatchMode):
    """Operations whose result is a Python value computed from tensor values (``aten._local_scalar_dense``
    behind ``bool``/``int``/``float``/``.item()``, ``aten.equal``): their tensor arguments become guards and
    the value is taken from what the guards hold."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.data_dependent_output in getattr(func, "tags", ()):
            args = tuple(guard(a, by_model=True) if isinstance(a, Tensor) else a for a in args)
            from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

            with disable_proxy_modes_tracing():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


_MEMORY_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.__repr__,
                 torch.Tensor.__str__, torch.Tensor.__format__}
# split points given as a tensor: ATen reads them from memory (the output shapes depend on them)
_INDEX_READS = {torch.tensor_split, torch.Tensor.tensor_split, torch.narrow, torch.Tensor.narrow,
                torch.Tensor.narrow_copy, torch.narrow_copy}


class _MemoryReads(TorchFunctionMode):
    """Functions that read tensor memory past torch's dispatcher, where the tracer does not see them and would
    bake the values in: ``.tolist()``, ``.numpy()``, ``__array__``, and split points given as tensors. Their
    tensors become guards."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func in _MEMORY_READS and args and isinstance(args[0], Tensor):
            args = (guard(args[0], by_model=True),) + tuple(args[1:])
        elif func in _INDEX_READS:
            args = args[:1] + tuple(guard(a, by_model=True) if isinstance(a, Tensor) else a for a in args[1:])
            kwargs = {k: guard(v, by_model=True) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def watched() -> ContextManager[object]:
    """Where user code runs in the backward (rules of the user's): autograd runs it without the torch function
    modes of the recording, so the memory reads are watched again there."""
    return _MemoryReads() if _GUARDS.get() is not None else nullcontext()


@contextmanager
def guarded() -> Iterator[Guards]:
    """Collect the guards of the values read while a call is recorded (inside torch's tracer)."""
    guards: Guards = []
    token = _GUARDS.set(guards)
    try:
        with _Reads(), _MemoryReads():
            yield guards
    finally:
        _GUARDS.reset(token)
