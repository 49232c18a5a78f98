"""Linear operations (dense, convolution, transposed convolution) as the rules see them.

A rule needs three things of a linear map ``z = W a + b``: evaluate it with other weights or inputs
(``forward``), back-propagate a vector through it without re-running it (``vjp``: ``W^T u``), and know
which axis of ``a`` holds the input channels (for per-channel box bounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class LinearOp:
    """One call of ``F.linear``, ``F.convNd`` or ``F.conv_transposeNd`` with its hyper-parameters."""

    kind: str  # "linear", "conv" or "conv_transpose"
    ndim: int = 0  # spatial dimensions of a convolution (1, 2, 3)
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    output_padding: Any = 0
    extra: dict = field(default_factory=dict, compare=False)

    # ---------------------------------------------------------------- evaluation
    def forward(self, a: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.kind == "linear":
            return F.linear(a, weight, bias)
        if self.kind == "conv":
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.ndim - 1]
            return conv(a, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.ndim - 1]
        return conv_t(a, weight, bias, self.stride, self.padding, self.output_padding, self.groups,
                      self.dilation)

    def vjp(self, u: Tensor, weight: Tensor, a: Optional[Tensor]) -> Tensor:
        """``W^T u``: the input gradient of the map at output gradient ``u`` (a convolution's input ``a`` gives
        the shape; a dense layer needs none)."""
        if self.kind == "linear":
            return u.matmul(weight)
        assert a is not None, "a convolution's vjp takes the input's shape from the input"
        if isinstance(self.padding, str):  # "same"/"valid": let autograd find the padding
            with torch.enable_grad():
                a_ = a.detach().requires_grad_(True)
                z = self.forward(a_, weight, None)
                return torch.autograd.grad(z, a_, u)[0]
        n = self.ndim
        return torch.ops.aten.convolution_backward(
            u, a, weight, None, _tup(self.stride, n), _tup(self.padding, n), _tup(self.dilation, n),
            self.kind == "conv_transpose", _tup(self.output_padding, n), self.groups,
            [True, False, False])[0]

    # ---------------------------------------------------------------- shapes
    def channel_shape(self, a: Tensor) -> tuple[int, ...]:
        """Shape to which a per-input-channel vector broadcasts against ``a``."""
        if self.kind == "linear":
            return (a.shape[-1],)
        return (a.shape[1],) + (1,) * self.ndim

    def scale_shape(self, z: Tensor) -> tuple[int, ...]:
        """Shape to which a per-output-unit vector (a fused BatchNorm) broadcasts against ``z``."""
        if self.kind == "linear":
            return (z.shape[-1],)
        return (z.shape[1],) + (1,) * self.ndim


def _tup(value: Any, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    return list(value)


def make_linear_op(name: str, args: tuple, kwargs: dict) -> tuple[LinearOp, Tensor, Tensor, Optional[Tensor]]:
    """Parse the arguments of an intercepted ``linear``/``conv*`` call into (op, input, weight, bias)."""
    names = {
        "linear": ("input", "weight", "bias"),
        "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
        "conv_transpose": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                           "dilation"),
    }
    if name == "linear":
        kind, ndim = "linear", 0
    elif name.startswith("conv_transpose"):
        kind, ndim = "conv_transpose", int(name[-2])
    else:
        kind, ndim = "conv", int(name[-2])
    bound = dict(zip(names[kind], args))
    bound.update(kwargs)
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}
    for key, value in defaults.items():
        bound.setdefault(key, value)
    if kind == "linear":
        op = LinearOp("linear")
    else:
        op = LinearOp(kind, ndim, bound["stride"], bound["padding"], bound["dilation"], bound["groups"],
                      bound["output_padding"])
    return op, bound["input"], bound["weight"], bound["bias"]
