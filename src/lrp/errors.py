"""Exceptions raised by lrp. Every message names the problem and a way out."""


class LRPError(RuntimeError):
    """Base class of all errors raised by lrp."""


class UnsupportedOperationError(LRPError):
    """The model runs an operation that lrp has no propagation rule for."""


class RuleError(LRPError):
    """A rule cannot be applied where the composite put it."""


class TargetError(LRPError, ValueError):
    """The requested target or start relevance does not fit the model output."""
