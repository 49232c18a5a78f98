"""What the capture writes down: one record per tensor it learns something about, one per layer call, one per
BatchNorm and softmax call. The propagation phase reads them."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..rules import LayerRule
from .layers import LinearOp

Tensor = torch.Tensor
Replay = Callable[[Tensor], Any]


@dataclass(eq=False)
class BatchNormRecord:
    """One BatchNorm call with fixed statistics: ``y = scale * x + shift``."""

    name: str
    module: Optional[torch.nn.Module]
    scale: Tensor
    shift: Tensor
    broadcast_shape: tuple
    producer: Optional["LayerRecord"]  # the layer whose output this BatchNorm normalises, if any
    sources: tuple = ()  # what scale and shift are computed from (running statistics, weight, bias, eps)
    fused: bool = False


@dataclass(eq=False)
class SoftmaxRecord:
    """One softmax call. Its input is kept only while the softmax may still turn out to be an output head (the
    identity rule needs it); attention softmaxes (``attention``: the output multiplies another activation) do
    not need it."""

    x: Optional[Tensor] = None
    attention: bool = False
    x_version: int = 0

    def __post_init__(self) -> None:
        if self.x is not None:
            self.x_version = self.x._version

    def mark_attention(self) -> None:
        self.attention, self.x = True, None

    def input(self) -> Optional[Tensor]:
        from ..errors import LRPError
        if self.x is not None and self.x._version != self.x_version:
            raise LRPError("the input of a softmax was modified in place after the softmax ran (inside a module "
                           "lrp runs as it is, or a custom autograd function); explain needs it unchanged. Write "
                           "that operation out of place.")
        return self.x


@dataclass(eq=False)
class LayerRecord:
    """One call of a dense/convolution layer.

    ``held`` is the layer's output as its rule will see it, kept without copying anything the backward keeps
    anyway: the raw output ``z``; or, when a BatchNorm merged into the layer is its only consumer, the
    BatchNorm's output; or, when a ReLU is the only consumer of that, the ReLU's output (which autograd saves
    for the ReLU's own backward). The ReLU's output equals the layer output where it is positive, and where it
    is not the gradient arriving through the ReLU is 0, so every rule (each term carries ``R = z g``) gives
    the same result. A later second use of an earlier stage brings that stage back.
    """

    index: int
    name: str
    module: Optional[torch.nn.Module]
    op: LinearOp
    weight: Tensor
    bias: Optional[Tensor]
    input_id: int
    reads_input: bool
    replay: Optional[Replay] = None
    root: Optional[Tensor] = None  # the relevance root the layer input re-indexes (for input rules)
    reads_image: bool = False  # that root is an image input (for "pixels" rules)
    first: bool = False  # a "first" layer for the composite: it reads an input (a float one, when ids come too)
    batch_first: bool = True  # False inside decomposed ops, whose tensors may put the batch elsewhere
    nonnegative_input: bool = False
    input_spec: tuple = ()  # (shape of one input sample, dtype, device)
    uses: int = 0  # uses of the raw output z
    bn_uses: int = 0  # uses of the output of the BatchNorm that follows, while it may be merged
    bn_candidate: Optional["BatchNormRecord"] = None  # that BatchNorm: merged if z has no other use
    held: Optional[Tensor] = None
    held_version: int = 0  # ``held._version`` when it was set: an in-place change since then is an error
    held_stage: str = "z"  # "z" (the layer output) or "bn" (a merged BatchNorm's output)
    rectified: bool = False  # ``held`` is the ReLU of that stage
    bn: Optional[BatchNormRecord] = None
    rule: Optional[LayerRule] = None
    early_rule: Optional[LayerRule] = None  # the rule, when the composite can tell it during the forward
    propagation: Any = None  # the lrp.engine.propagate.Propagation that runs this record's backward
    total: Optional[Tensor] = None  # per-sample relevance summed at the layer output
    relevance: Optional[Tensor] = None  # relevance at the layer output (record_layers=True)

    @property
    def kind(self) -> str:
        return self.op.kind

    def effective_params(self) -> tuple[Tensor, Optional[Tensor]]:
        """Weight and bias of the layer with a following BatchNorm merged in: ``W' = s W``, ``b' = s b + t``
        (``held`` is then the BatchNorm's output, the merged layer's output)."""
        if self.bn is None:
            return self.weight, self.bias
        s, t = self.bn.scale, self.bn.shift
        w = self.weight * s.reshape((-1,) + (1,) * (self.weight.ndim - 1))
        return w, (t if self.bias is None else self.bias * s + t)

    def effective_output(self, z: Tensor) -> Tensor:
        """The merged layer's output: the held BatchNorm output as it is, a held raw output with the BatchNorm
        applied (``s z + t``; only when the capture keeps the raw outputs: ``Trace.keep_less = False``)."""
        if self.bn is None or self.held_stage != "z":
            return z
        shape = self.op.scale_shape(z)
        return torch.addcmul(self.bn.shift.reshape(shape), z, self.bn.scale.reshape(shape))

    def hold(self, t: Tensor, stage: str, rectified: bool = False) -> None:
        """Let the rule see ``t`` (a detached alias: no copy) as this layer's output."""
        self.held, self.held_stage, self.rectified = t.detach(), stage, rectified
        self.held_version = t._version

    def held_output(self) -> Tensor:
        """``held``, checked not to have been changed in place since (by code lrp runs as it is: a module with
        a ``Gradient`` or ``Pass`` rule, a custom autograd function)."""
        from ..errors import LRPError
        held = self.held
        assert held is not None, "held until the layer's backward has run"
        if held._version != self.held_version:
            raise LRPError(f"the output of layer '{self.name}' was modified in place after the layer ran (inside a "
                           f"module lrp runs as it is, e.g. one with a Gradient() or Pass() rule, or a custom "
                           f"autograd function); explain needs it unchanged. Write that operation out of place.")
        return held


@dataclass(eq=False)
class TensorFacts:
    """What the capture knows about one tensor of the forward. The tensor itself is held weakly (so a record
    does not keep activations alive); ``alive`` says whether the facts still belong to the tensor with that id."""

    ref: "weakref.ReferenceType[Tensor]"
    producer: Optional[LayerRecord] = None  # the layer call this tensor is an output stage of
    stage: str = "z"  # which stage of ``producer``: "z" (the layer output) or "bn" (its BatchNorm's output)
    route: Optional[tuple[Replay, Tensor]] = None  # a re-indexing of a relevance root: (replay from root, root)
    nonnegative: bool = False  # >= 0 by how it was made
    gate: bool = False  # the output of a sigmoid-like activation (or a re-indexing of one)
    softmax: Optional[SoftmaxRecord] = None  # the output of a softmax (or a re-indexing of one)
    head: Optional[tuple[str, Tensor]] = None  # a possible output head: (kind, the head's input)
    superseded: Optional[Tensor] = None  # an in-place op (run out of place) replaced it by this tensor
    moment: Optional[str] = None  # a power or root of the signal (the op's name), held fixed, not yet reduced
    statistic: Optional[str] = None  # a normalisation statistic held fixed (the op that began it)
    degree: Optional[float] = None  # of a moment or statistic: how it scales with the signal (x -> a x: a^degree)
    source: Optional["TensorFacts"] = None  # of a moment: the signal it is an elementwise function of (its origin)
    origin: Optional["TensorFacts"] = None  # of a signal: the signal it is a constant multiple of (x in 0.5 * x)
    reduced: bool = False  # the signal after a reduction (mean, sum) over some of its elements
    positions: Optional[Tensor] = None  # token ids re-indexed: each element's flat position in the model input
    from_ids: bool = False  # integers computed from the token ids in a way that does not keep their positions

    def alive(self, t: Tensor) -> bool:
        return self.ref() is t


def _frozen(value: Any) -> Any:
    """A hashable form of an op parameter (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    return value


def op_key(op: LinearOp) -> tuple:
    """Everything that defines a linear op's map besides its weights: kind, dimensions, stride, padding,
    dilation, groups, output padding (whatever fields ``LinearOp`` compares)."""
    return tuple(_frozen(getattr(op, f.name)) for f in dataclasses.fields(op) if f.compare)
