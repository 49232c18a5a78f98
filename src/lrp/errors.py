"""Exceptions raised by lrp. Every message names the problem and a way out."""

import re


class LRPError(RuntimeError):
    """Base class of all errors raised by lrp."""


class UnsupportedOperationError(LRPError):
    """The model runs an operation that lrp has no propagation rule for."""


class RuleError(LRPError):
    """A rule cannot be applied where the composite put it."""


class TargetError(LRPError, ValueError):
    """The requested target or start relevance does not fit the model output."""


class ModelError(LRPError, ValueError):
    """A model spec, its weights or its class names cannot be loaded or do not fit together."""


class InputError(LRPError, ValueError):
    """An input (file, array, picture) cannot be used: missing, unreadable, or of a shape the model does not read."""


def one_line(exc: BaseException) -> str:
    """``exc`` as one line for a person: lrp's own messages as they are, others with their type."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # terminal colour codes some messages carry
    first = text.splitlines()[0].rstrip() if text else ""
    if isinstance(exc, LRPError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
