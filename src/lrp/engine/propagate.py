"""Propagate: choose every layer's rule once the forward is over, then run the backward that applies them.

Rules are chosen after the forward, when the whole sequence of layers (and which BatchNorm follows which
layer) is known. The backward is ``torch.autograd.grad`` from the start relevance: the autograd functions the
capture put in place call :meth:`Propagation.layer_backward` for each layer call. Tensors that rules build from
the weights (``W+``, a merged BatchNorm's weights, flat counts, ...) are built once per call and shared by the
layer calls that agree on everything they depend on; they are dropped after the last of those layer calls has
run its backward, or kept across calls in a :class:`WeightCache` (``lrp.Explainer``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from ..composites import LayerInfo
from ..errors import LRPError, RuleError
from ..rules import Epsilon, LayerContext
from .capture import Trace
from .precision import to_working, working_dtype
from .records import LayerRecord, op_key

Tensor = torch.Tensor


def _identity_of(value: Any, fingerprints: Optional[dict[int, tuple]] = None) -> Any:
    """What a cached tensor built from ``value`` depends on: for a tensor, the object, its version counter
    (bumped by every in-place change), its storage and, across calls, a fingerprint of its values; other
    values (numbers, ``None``) as they are."""
    if isinstance(value, Tensor):
        return ("tensor", id(value), value._version, value.data_ptr(),
                None if fingerprints is None else fingerprints[id(value)])
    return value


def fingerprints(tensors: list[Tensor]) -> dict[int, tuple]:
    """A fingerprint of each tensor's values, read with one transfer per device: ``torch.hash_tensor`` (the XOR
    of the elements' bits) and the sum (in the tensor's dtype: no copy). A change that is not a permutation of
    the values shows in one of the two, but for a rounding coincidence (the XOR alone misses a sign flip of an
    even number of elements, or equal values written over equal values of another count's parity)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    found: dict[int, tuple] = {}
    with torch.no_grad():
        for group in by_device.values():
            hashes = torch.stack([_hash(t) for t in group]).tolist()
            sums = torch.stack([_sum(t) for t in group]).tolist()
            found.update(zip((id(t) for t in group), zip(hashes, sums)))
    return found


def _hash(t: Tensor) -> Tensor:
    if hasattr(torch, "hash_tensor"):  # torch >= 2.8
        return torch.hash_tensor(t) if t.numel() else torch.zeros((), dtype=torch.uint64, device=t.device)
    return torch.zeros((), dtype=torch.int64, device=t.device)  # pragma: no cover - older torch: the sum only


def _sum(t: Tensor) -> Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.sum().double()


def _frozen_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen_value(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _sources(layer: LayerRecord) -> tuple:
    """The tensors a weight-derived tensor of ``layer`` is built from: weight, bias, a merged BatchNorm's
    statistics and parameters, and tensors among the rule's parameters (e.g. z^B bounds)."""
    rule_tensors = tuple(v for v in vars(layer.rule).values() if isinstance(v, Tensor))
    return (layer.weight, layer.bias) + (layer.bn.sources if layer.bn is not None else ()) + rule_tensors


def _builds(layer: LayerRecord) -> bool:
    """Whether ``layer``'s backward builds tensors from its weights: a merged BatchNorm's weights, a cast of
    half-precision weights, or what its rule builds (``LayerRule.builds_from_weights``)."""
    assert layer.rule is not None
    return (layer.bn is not None or layer.weight.dtype in (torch.float16, torch.bfloat16)
            or layer.rule.builds_from_weights())


def _rule_key(rule: Any) -> tuple:
    """The rule's type and parameters (tensors among them are sources, see ``_sources``)."""
    return (type(rule),) + tuple(sorted((k, _frozen_value(v)) for k, v in vars(rule).items()
                                        if not isinstance(v, Tensor)))


class WeightCache:
    """Weight-derived tensors kept from one call to the next. An entry is keyed by the identity, version,
    storage and a fingerprint of the values of every tensor it was built from (see :func:`_identity_of`), and
    by the rule's parameters, so a weight changed in place (also through ``.data`` or by a fused optimiser,
    which bump no version), a replaced parameter, new BatchNorm statistics or changed rule parameters get a
    new entry; entries a call did not use are dropped at its end, so the cache holds at most one call's
    worth."""

    def __init__(self) -> None:
        self.entries: dict[tuple, dict] = {}
        self.owners: dict[tuple, tuple] = {}  # keep the tensors whose ids are in a key alive
        self.used: set[tuple] = set()
        self.hits = self.misses = 0

    def table(self, base: tuple, owners: tuple) -> dict:
        self.used.add(base)
        table = self.entries.get(base)
        if table is None:
            table = self.entries[base] = {}
            self.owners[base] = owners
        return table

    def sweep(self) -> None:
        for base in [b for b in self.entries if b not in self.used]:
            del self.entries[base], self.owners[base]
        self.used.clear()

    def clear(self) -> None:
        self.entries.clear()
        self.owners.clear()
        self.used.clear()


class Propagation:
    """The backward of one ``explain`` call: rule choice, BatchNorm merging, and each layer's rule."""

    def __init__(self, trace: Trace, record_layers: bool = False, cache: Optional[WeightCache] = None):
        self.trace = trace
        self.record_layers = record_layers
        self.cache = cache
        self.direct: dict[int, Tensor] = {}  # id(root) -> relevance given to it directly by input rules
        self._tables: dict[tuple, dict] = {}  # base -> weight-derived tensors of this call (without a cache)
        self._pending: dict[tuple, int] = {}  # base -> layer calls that have not run their backward yet
        self._bases: dict[int, tuple] = {}  # layer index -> base
        self._kept: set[int] = set()  # indices of the layers whose weight-derived tensors the cache keeps
        trace.forward_done()
        self._merge_batchnorms()
        self._choose_rules()

    # ------------------------------------------------------------------ between forward and backward
    def _merge_batchnorms(self) -> None:
        """A BatchNorm that was its layer output's first use (``ops.mergeable``) is merged when the output had no
        other use."""
        for layer in self.trace.layers:
            bn = layer.bn_candidate
            if bn is not None and layer.uses == 1:
                layer.bn, bn.fused = bn, True
            elif layer.held_stage != "z":
                raise RuntimeError(f"lrp internal error: layer '{layer.name}' holds a BatchNorm output, but the "
                                   f"BatchNorm is not merged")

    def _choose_rules(self) -> None:
        trace = self.trace
        count = len(trace.layers)
        positions = trace.composite.by_position
        key = "pixels" if "pixels" in positions and trace.image_input else "first" if "first" in positions else None
        reached = any(layer.reads_image if key == "pixels" else layer.first for layer in trace.layers)
        if trace.layers and key is not None and any(t.is_floating_point() for t in trace.inputs) and not reached:
            several = sum(t.is_floating_point() for t in trace.inputs) > 1
            how = ("the inputs are combined (e.g. torch.cat) or changed by other ops before the first layer, so no "
                   "layer reads one of them directly; the other rules apply. Combine them outside the model "
                   "(one input) to use input rules." if several else
                   "the input passes through other ops first (e.g. a normalisation inside forward), so no layer "
                   "gets it; the other rules apply. Move preprocessing out of the model to use input rules.")
            warnings.warn(f"the composite's first-layer rule {positions[key]!r} applies to layers that read "
                          f"the model input, but in this model {how}", stacklevel=5)
        for layer in trace.layers:
            info = LayerInfo(layer.name, layer.module, layer.kind, layer.index, count, layer.first, layer.reads_image)
            layer.rule = layer.early_rule or trace.composite.rule_for(info)  # chosen in the forward if it could be
            if layer.rule.direct and not layer.reads_input:
                raise RuleError(
                    f"the composite gives layer '{layer.name}' the rule {layer.rule!r}, which assigns relevance "
                    f"to the layer's input regardless of its values and so must read the model input directly "
                    f"(through reshapes or indexing at most); this layer reads the output of other ops. Move input "
                    f"preprocessing out of the model, or use a composite without an input rule (e.g. "
                    f"'epsilon-plus' instead of 'epsilon-plus-flat').")
            layer.propagation = self
        # across calls the weights' values may have changed without a version bump: fingerprint the sources of
        # the layers that build tensors from them (not those of epsilon layers, which build none)
        self._kept = {layer.index for layer in trace.layers if self.cache is not None and _builds(layer)}
        kept = [t for layer in trace.layers if layer.index in self._kept for t in _sources(layer)]
        prints = fingerprints([t for t in kept if isinstance(t, Tensor)]) if kept else None
        for layer in trace.layers:
            base = self._base(layer, prints if layer.index in self._kept else None)
            self._bases[layer.index] = base
            self._pending[base] = self._pending.get(base, 0) + 1

    def _base(self, layer: LayerRecord, prints: Optional[dict[int, tuple]]) -> tuple:
        """What a weight-derived tensor of ``layer`` may depend on: the weights (and a merged BatchNorm's
        statistics), the op's parameters (stride, padding, dilation, groups, ...: the flat count, the w^2 sum
        and the z^B offset depend on them), the rule and its parameters, the shape of one input sample, the
        dtype and the device; never the input's values. Layer calls that agree on all of it (a module called
        twice) share the tensors."""
        return (tuple(_identity_of(s, prints) for s in _sources(layer)), op_key(layer.op), _rule_key(layer.rule),
                layer.input_spec)

    def _table(self, layer: LayerRecord) -> dict:
        base = self._bases[layer.index]
        if layer.index in self._kept:
            assert self.cache is not None
            return self.cache.table(base, _sources(layer))
        return self._tables.setdefault(base, {})

    def _done(self, layer: LayerRecord) -> None:
        """``layer``'s backward has run: release what only it still needed."""
        layer.held = None
        base = self._bases[layer.index]
        self._pending[base] -= 1
        if self._pending[base] == 0:
            self._tables.pop(base, None)

    # ------------------------------------------------------------------ backward
    def layer_backward(self, layer: LayerRecord, a: Optional[Tensor], z: Tensor, g: Tensor) -> Optional[Tensor]:
        """The modified gradient at ``layer``'s input (``None`` for input rules, which give the model input its
        relevance directly)."""
        table = self._table(layer)

        def cached(key: Any, make: Callable[[], Any]) -> Any:
            if key not in table:
                if layer.index in self._kept:
                    self.cache.misses += 1  # type: ignore[union-attr]  # kept: there is a cache
                table[key] = make()
            elif layer.index in self._kept:
                self.cache.hits += 1  # type: ignore[union-attr]
            return table[key]

        if layer.bn is not None:
            weight, bias = cached("merged", layer.effective_params)
        else:
            weight, bias = layer.weight, layer.bias
        z = layer.effective_output(z)
        rule = layer.rule
        assert rule is not None, "the rules are chosen before the backward"
        rectified = layer.rectified and (layer.bn is None or layer.held_stage != "z")
        ctx = LayerContext(layer.op, a, z, weight, bias, cached, layer.nonnegative_input, rectified)
        needs_relevance = self.record_layers or (rule.reads_relevance()
                                                 and not (isinstance(rule, Epsilon) and rule.epsilon == 0.0))
        relevance_out = z * g if needs_relevance else None
        n = self.trace.x.shape[0]
        if layer.batch_first and z.shape[0] == n:
            layer.total = (relevance_out.reshape(n, -1).sum(1) if relevance_out is not None
                           else torch.dot(z.flatten(), g.flatten()).reshape(1) if n == 1
                           else torch.einsum("ni,ni->n", z.reshape(n, -1), g.reshape(n, -1)))
        else:  # the batch is not the first dimension here (e.g. inside attention): one total for the batch
            layer.total = relevance_out.sum() if relevance_out is not None else torch.vdot(z.flatten(), g.flatten())
        if self.record_layers:
            layer.relevance = relevance_out
        result = rule.backward(ctx, g, relevance_out)  # type: ignore[arg-type]  # None only for LRP-0 (unused)
        self._done(layer)
        if not rule.direct:
            return result
        self._add_direct(layer, result)
        return None

    def _add_direct(self, layer: LayerRecord, relevance: Tensor) -> None:
        root, replay = layer.root, layer.replay
        assert root is not None and replay is not None, "an input rule's layer reads the model input"
        if layer.input_id == id(root):
            r_root = relevance
        else:
            with torch.enable_grad():
                shadow = root.detach().requires_grad_(True)
                (r_root,) = torch.autograd.grad(replay(shadow), shadow, relevance)
        key = id(root)
        self.direct[key] = r_root if key not in self.direct else self.direct[key] + r_root

    def run(self, out: Tensor, roots: list, grad_out: Tensor) -> list:
        """The modified gradient at each root (``None`` where no relevance arrives), from ``grad_out`` at
        ``out``."""
        if not out.requires_grad:
            return [None] * len(roots)
        try:
            return list(torch.autograd.grad(out, roots, grad_out, allow_unused=True))
        except RuntimeError as exc:
            if "inplace operation" in str(exc):
                raise LRPError(f"the model modifies a tensor in place that explain needs later ({exc}). Write "
                               f"that operation out of place.") from exc
            raise
        finally:
            if self.cache is not None:
                self.cache.sweep()

    def input_relevance(self, roots: list, grads: list, inputs: Sequence[Tensor], out: Tensor) -> list[Tensor]:
        """The relevance of each model input: ``root * g`` plus what input rules gave the root directly. A float
        input is its own root; for token ids, each embedding vector's relevance is summed and added up at the
        position of the id it embeds (``trace.token_positions``: positions among the ids of all inputs)."""
        float_inputs = {id(t): k for k, t in enumerate(inputs) if t.is_floating_point()}
        found: list[Optional[Tensor]] = [None] * len(inputs)
        id_inputs = [k for k, t in enumerate(inputs) if not t.is_floating_point()]
        id_total: Optional[Tensor] = None  # relevance per id, all id inputs flattened one after the other
        count = sum(inputs[k].numel() for k in id_inputs)
        positions = iter(self.trace.token_positions)
        for root, g in zip(roots, grads):
            dtype = working_dtype(root)  # float32 for half-precision inputs (see explain's docstring)
            r = (torch.zeros_like(root, dtype=dtype) if g is None
                 else to_working(root.detach(), dtype) * to_working(g, dtype))
            if id(root) in self.direct:
                r = r + self.direct[id(root)]
            k = float_inputs.get(id(root))
            if k is not None:
                found[k] = r
                continue
            per_id, at = r.sum(-1).reshape(-1), next(positions).reshape(-1)
            keep = at >= 0  # -1: an id that came from no input token (padding put in by the model)
            if id_total is None:
                id_total = torch.zeros(count, dtype=per_id.dtype, device=per_id.device)
            elif id_total.dtype != per_id.dtype:  # embeddings of different dtypes read the ids
                dtype = torch.promote_types(id_total.dtype, per_id.dtype)
                id_total, per_id = id_total.to(dtype), per_id.to(dtype)
            # no boolean indexing (an output shape that depends on values, which a replay cannot repeat): the
            # dropped ones add zero at position 0
            id_total.index_add_(0, at.clamp(min=0), torch.where(keep, per_id, 0))
        start = 0
        for k in id_inputs:
            n = inputs[k].numel()
            if id_total is not None:
                found[k] = id_total[start:start + n].reshape(inputs[k].shape)
            start += n
        return [(r if r is not None else torch.zeros(t.shape, dtype=working_dtype(t if t.is_floating_point() else out),
                                                     device=t.device)).detach() for r, t in zip(found, inputs)]

    def release(self) -> None:
        self._tables.clear()
        self.direct.clear()
        self._bases.clear()
        self._pending.clear()

