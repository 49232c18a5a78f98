"""Keras 3 models on the torch backend: their layers call torch ops, but in their own way (``matmul`` then a bias
``add`` for ``Dense``, a bias-free convolution between two transposes for ``Conv2D``, a chain of elementwise ops
for ``BatchNormalization``), which the op registry would read as loose products and sums. While a trace runs,
this patch map has the layers that carry the network's weights call the ops a PyTorch network calls instead:

- ``Dense``: ``F.linear(x, W^T, b)``;
- ``Conv1D/2D/3D``, ``DepthwiseConv1D/2D``, ``SeparableConv1D/2D``: channels moved first, Keras' padding
  (``valid``, ``same``: TensorFlow's, the odd pixel on the right; ``causal``), ``F.convNd(x, W, b)``, channels
  moved back;
- ``BatchNormalization``: ``F.batch_norm`` with the moving statistics, applied by the layer before it (right after
  its ``F.convNd``/``F.linear``) when that layer has no activation and feeds only this BatchNorm, so that the
  engine merges the two as in a PyTorch network; otherwise on its own (a linear map, LRP-0).

The results are the same numbers Keras computes; every rule then sees the layers as it sees ``nn.Linear``,
``nn.ConvNd`` and ``nn.BatchNormNd``, named by their Keras names. Other Keras layers run as they are (pooling,
``Flatten``, activations and merges are plain torch ops already). Nothing is written to the model: the patches
are instance attributes removed when the trace ends.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedOperationError

if TYPE_CHECKING:
    from .capture import Trace

Tensor = torch.Tensor

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_keras(model: Any) -> bool:
    """Whether ``model`` is a Keras 3 layer or model (Keras is imported only if the caller already has)."""
    keras = sys.modules.get("keras")
    layer = getattr(getattr(keras, "layers", None), "Layer", None)
    return layer is not None and isinstance(model, layer)


def check_backend() -> None:
    """Keras must run on its torch backend (``KERAS_BACKEND=torch`` before Keras is imported)."""
    from ..errors import ModelError

    backend = sys.modules["keras"].backend.backend()
    if backend != "torch":
        raise ModelError(f"this Keras model runs on the {backend} backend; lrp explains Keras models on the torch "
                         f"backend: set KERAS_BACKEND=torch before Keras is imported (lrp.models.load_keras does)")


def _layers(model: Any) -> Iterator[Any]:
    yield from model._flatten_layers(include_self=False, recursive=True)


def _value(variable: Any) -> Optional[Tensor]:
    """A Keras variable's torch tensor (a bias or BatchNorm scale may be left out: None)."""
    return None if variable is None else variable.value


def _weight(variable: Any) -> Tensor:
    value: Tensor = variable.value
    return value


def _consumers(layer: Any) -> list:
    return [node.operation for node in getattr(layer, "_outbound_nodes", [])]


def _merged_batchnorm(layer: Any, layers: dict, outputs: set) -> Optional[Any]:
    """The BatchNormalization that ``layer`` (a Dense or convolution without activation) alone feeds, on its channel
    axis, if any: it is applied right after the layer's op, where the engine merges it. Only a BatchNorm among
    ``layers`` (those of the models explained: a model cut after the convolution does not run it) and only when the
    layer's output is none of the models' ``outputs`` (ids of their symbolic outputs)."""
    keras = sys.modules["keras"]
    if layer.activation not in (None, keras.activations.linear):
        return None
    consumers = _consumers(layer)
    if len(consumers) != 1 or not isinstance(consumers[0], keras.layers.BatchNormalization):
        return None
    bn = consumers[0]
    if id(bn) not in layers:
        return None
    if len(getattr(bn, "_inbound_nodes", [])) != 1 or len(getattr(layer, "_inbound_nodes", [])) != 1:
        return None  # a shared layer: its calls need not come in pairs
    if id(layer.output) in outputs:
        return None
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    rank = getattr(layer, "rank", 0)
    axes = {1} if channels_first else {-1, rank + 1} if rank else {-1}
    if bn.axis not in axes:
        return None
    return bn


_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock(model: Any) -> threading.Lock:
    """One lock per Keras model: two traces (e.g. of the model and of a wrapper around it, from two threads) must
    not patch the same layers at once."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


class KerasPatches:
    """The patched ``call`` of each Keras layer of one model, for one trace."""

    def __init__(self, trace: "Trace", models: list):
        self.trace = trace
        self.models = models
        # id(output) -> (the output, the BatchNormalization already applied to it): each is consumed by that
        # BatchNorm's call; one left over at the end of the forward is an error (see check)
        self.applied: dict[int, tuple[Tensor, Any]] = {}
        self.patched: list[Any] = []
        self.locked: list[threading.Lock] = []
        self.layers: dict[int, Any] = {}
        self.outputs: set[int] = set()
        self.filtering: Optional[bool] = None
        self.thread = threading.get_ident()  # the patches act in the thread that traces only

    def install(self) -> None:
        keras = sys.modules["keras"]
        for model in sorted(self.models, key=id):  # one order for every trace: no deadlock
            lock = _lock(model)
            lock.acquire()
            self.locked.append(lock)
        # Keras rewrites errors raised in a layer's call into a long message about the call: lrp's errors stay
        # one line while the trace runs
        self.filtering = keras.config.is_traceback_filtering_enabled()
        if self.filtering:
            keras.config.disable_traceback_filtering()
        L = keras.layers
        table: list[tuple[type, Callable]] = [
            (L.SeparableConv1D, self._separable), (L.SeparableConv2D, self._separable),
            (L.DepthwiseConv1D, self._depthwise), (L.DepthwiseConv2D, self._depthwise),
            (L.Conv1D, self._conv), (L.Conv2D, self._conv), (L.Conv3D, self._conv),
            (L.Dense, self._dense), (L.BatchNormalization, self._batchnorm),
        ]
        self.layers = layers = {id(layer): layer for model in self.models for layer in _layers(model)}
        for model in (*self.models, *layers.values()):
            for out in getattr(model, "outputs", None) or () if isinstance(model, keras.Model) else ():
                self.outputs.add(id(out))
        for layer in layers.values():
            if "call" in layer.__dict__:
                continue  # patched already, or a call of the user's own
            if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
                continue  # LoRA or quantised weights: run as they are
            fn = next((f for cls, f in table if type(layer) is cls), None)
            if fn is None:
                continue
            object.__setattr__(layer, "call", functools.partial(self._named, layer, fn))
            self.patched.append(layer)

    def check(self) -> None:
        """After the forward: every BatchNorm applied early was then called on that output."""
        if self.applied:
            _, bn = next(iter(self.applied.values()))
            raise UnsupportedOperationError(
                f"Keras layer '{bn.name}' (BatchNormalization) was merged into the layer before it but not called "
                f"on its output in this forward; explain the model as a whole, or report this model's structure")

    def remove(self) -> None:
        for layer in self.patched:
            if "call" in layer.__dict__:
                object.__delattr__(layer, "call")
        self.patched.clear()
        self.applied.clear()
        if self.filtering:
            sys.modules["keras"].config.enable_traceback_filtering()
            self.filtering = None
        while self.locked:
            self.locked.pop().release()

    # ------------------------------------------------------------------ names
    def _named(self, layer: Any, fn: Callable, inputs: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` as if the layer were a module: the trace names the ops in it by the Keras layer's name."""
        if threading.get_ident() != self.thread:  # another thread runs the model meanwhile: Keras' own call
            return type(layer).call(layer, inputs, *args, **kwargs)
        trace = self.trace
        trace.stack.append((layer.name, layer, None, ((inputs,), kwargs)))
        trace.layer_modules.add(id(layer))
        try:
            return fn(layer, inputs, *args, **kwargs)
        finally:
            trace.stack.pop()

    # ------------------------------------------------------------------ layers
    def _finish(self, layer: Any, z: Tensor, channels_first: bool) -> Tensor:
        """BatchNorm merged into ``layer`` (if it feeds one), channels back to Keras' order, the activation."""
        bn = _merged_batchnorm(layer, self.layers, self.outputs)
        if bn is not None:
            z = self._batch_norm(bn, z, 1)  # channels first here
        if not channels_first and z.ndim > 2:
            z = z.movedim(1, -1)
        if bn is not None:
            self.applied[id(z)] = (z, bn)
        return z if layer.activation is None else layer.activation(z)

    def _dense(self, layer: Any, inputs: Tensor, training: Any = None) -> Tensor:
        """``F.linear(x, W^T, b)``: Keras keeps W as (in, out)."""
        z = F.linear(inputs, _weight(layer.kernel).t(), _value(layer.bias))
        bn = _merged_batchnorm(layer, self.layers, self.outputs)
        if bn is not None:
            z = self._batch_norm(bn, z, z.ndim - 1)
            self.applied[id(z)] = (z, bn)
        return z if layer.activation is None else layer.activation(z)

    def _conv(self, layer: Any, inputs: Tensor) -> Tensor:
        """``F.convNd`` with the kernel (*k, in/groups, out) as (out, in/groups, *k)."""
        rank = layer.rank
        kernel = _weight(layer.kernel).permute(rank + 1, rank, *range(rank))
        z = self._convolve(layer, inputs, kernel, _value(layer.bias), layer.groups)
        return self._finish(layer, z, layer.data_format == "channels_first")

    def _depthwise(self, layer: Any, inputs: Tensor) -> Tensor:
        """A grouped ``F.convNd``: the kernel (*k, in, multiplier) as (in * multiplier, 1, *k)."""
        rank = layer.rank
        k = _weight(layer.kernel)
        kernel = k.permute(rank, rank + 1, *range(rank)).reshape(-1, 1, *k.shape[:rank])
        z = self._convolve(layer, inputs, kernel, _value(layer.bias), k.shape[rank])
        return self._finish(layer, z, layer.data_format == "channels_first")

    def _separable(self, layer: Any, inputs: Tensor) -> Tensor:
        """The depthwise convolution (no bias), then the pointwise one (1 x 1, with the bias)."""
        rank = layer.rank
        k = _weight(layer.depthwise_kernel)
        depthwise = k.permute(rank, rank + 1, *range(rank)).reshape(-1, 1, *k.shape[:rank])
        z = self._convolve(layer, inputs, depthwise, None, k.shape[rank])
        pointwise = _weight(layer.pointwise_kernel)
        pointwise = pointwise.permute(rank + 1, rank, *range(rank))
        z = _CONV[rank](z, pointwise, _value(layer.bias))
        return self._finish(layer, z, layer.data_format == "channels_first")

    def _convolve(self, layer: Any, inputs: Tensor, kernel: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
        rank = layer.rank
        x = inputs if layer.data_format == "channels_first" else inputs.movedim(-1, 1)
        size = kernel.shape[2:]
        pads = [_padding(layer.padding, x.shape[2 + i], size[i], layer.strides[i], layer.dilation_rate[i])
                for i in range(rank)]
        if all(left == right for left, right in pads):
            padding: Any = [left for left, _ in pads]
        else:  # asymmetric (TensorFlow's "same" with an odd total, "causal"): pad first
            x = F.pad(x, [p for pair in reversed(pads) for p in pair])
            padding = 0
        return _CONV[rank](x, kernel, bias, layer.strides, padding, layer.dilation_rate, groups)

    def _batchnorm(self, layer: Any, inputs: Tensor, training: Any = None, mask: Any = None) -> Tensor:
        """Already applied by the layer before it (see :func:`_merged_batchnorm`), or ``F.batch_norm`` here."""
        if training and layer.trainable:  # Keras runs a frozen BatchNorm (trainable=False) in inference mode
            raise UnsupportedOperationError(
                f"Keras layer '{layer.name}' (BatchNormalization) is called with training=True, so it would normalise "
                f"with the batch's statistics; lrp explains inference. Call the model without training=True, or "
                f"freeze the layer (layer.trainable = False) if the model passes training=True itself")
        entry = self.applied.get(id(inputs))
        if entry is not None and entry[0] is inputs and entry[1] is layer:
            del self.applied[id(inputs)]
            return inputs
        axis = layer.axis % inputs.ndim
        return self._batch_norm(layer, inputs, axis)

    def _batch_norm(self, bn: Any, x: Tensor, axis: int) -> Tensor:
        moved = x if axis == 1 else x.movedim(axis, 1)
        out = F.batch_norm(moved, _weight(bn.moving_mean), _weight(bn.moving_variance), _value(bn.gamma),
                           _value(bn.beta), False, 0.0, bn.epsilon)
        return out if axis == 1 else out.movedim(1, axis)


def _padding(mode: str, n: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """(left, right) padding of one spatial dimension: ``valid`` none; ``same`` as TensorFlow (the output has
    ceil(n / stride) positions, the odd pixel on the right); ``causal`` all on the left."""
    span = (k - 1) * dilation + 1
    if mode == "valid":
        return 0, 0
    if mode == "causal":
        return span - 1, 0
    total = max((math.ceil(n / stride) - 1) * stride + span - n, 0)
    return total // 2, total - total // 2


def patches(trace: "Trace", model: torch.nn.Module) -> Optional[KerasPatches]:
    """The patch map installed for the Keras models in ``model`` (itself one, or a torch module holding one, such
    as the pipeline's channels-last wrapper); ``None`` when there is none. Call ``remove()`` when done."""
    if "keras" not in sys.modules:
        return None
    found = [m for m in model.modules() if is_keras(m)]
    if not found:
        return None
    check_backend()
    p = KerasPatches(trace, found)
    try:
        p.install()
    except BaseException:
        p.remove()
        raise
    return p
