"""ONNX models (``lrp explain --model model.onnx``), converted to PyTorch modules with ``onnx2torch``.

Why ``onnx2torch``: lrp explains what it sees of a PyTorch model's ops, so an ONNX graph has to become ordinary
torch code. ``onnx2torch`` is a maintained converter that turns each node into a ``torch.nn`` layer
(``Conv`` into ``nn.Conv2d``, ``Gemm`` into ``nn.Linear``, ``Relu`` into ``nn.ReLU``, ...) in a
``torch.fx.GraphModule``, so lrp's composites put their rules on those layers as on a model written in PyTorch.
Runtimes such as onnxruntime compute outputs but not the per-layer backward passes LRP needs; ``onnx-tf`` and
``onnx2pytorch`` are unmaintained or cover fewer ops.

What is canonicalised before converting, and why:

- ``Identity`` nodes that read an initializer are replaced by a copy of that initializer under the node's output
  name. ``torch.onnx.export`` shares equal weights (e.g. the zero biases of freshly initialised convolutions)
  through such nodes, and ``onnx2torch`` looks a convolution's weight and bias up among the initializers.
- Dense layers written as ``MatMul`` + ``Add`` (tf2onnx's ``Dense``) become ``Gemm``, and a convolution's bias
  written as a separate ``Add`` moves into the ``Conv``: ``onnx2torch`` then makes ``nn.Linear`` and ``nn.ConvNd``
  layers with their bias, which the composites' layer rules see as in a PyTorch model (:func:`_fuse_layers`).
- The default-domain opset is lowered (with ``onnx.version_converter``) to the highest one at or below the
  model's at which ``onnx2torch`` has a converter for every node: its registry lags behind new opsets (e.g. it has
  ``AveragePool`` up to version 11 only, while exporters write opset 18 to 20), and lowering an opset does not
  change what the ops compute for the operator versions it skips.

Needs the optional extra: ``pip install 'lrp[onnx]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import ModelError

EXTRA = "pip install 'lrp[onnx]'"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_WAY_OUT = ("Re-export the model with another opset (e.g. torch.onnx.export(..., opset_version=17)), or export "
            "the PyTorch model as a torch.export program, which lrp loads too: "
            "torch.export.save(torch.export.export(model, (x,)), 'model.pt2')")


def _modules() -> tuple[Any, Any]:
    """``onnx`` and ``onnx2torch.convert``, or :class:`ModelError` naming the extra to install."""
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as exc:
        raise ModelError(f"ONNX models need the optional packages onnx and onnx2torch ({exc.name or exc} is "
                         f"missing): {EXTRA}") from None
    return onnx, convert


def _read(path: Path, check: bool = True) -> Any:
    onnx, _ = _modules()
    if not path.is_file():
        raise ModelError(f"ONNX model file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=check)
        if not model.graph.node or model.ir_version <= 0:
            raise ValueError("no graph")
        if check:  # from the file: no copy of the model, and no 2 GB limit of protobuf
            onnx.checker.check_model(str(path))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"{path} is not an ONNX model (a protobuf ModelProto with a graph that onnx.checker "
                         f"accepts): {type(exc).__name__}{': ' + reason[:200] if reason else ''}. Export one with "
                         f"torch.onnx.export or tf2onnx") from None
    return model


def _fold_initializer_identities(model: Any) -> None:
    """Replace each ``Identity`` of an initializer by a copy of the initializer under the output name."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    overridable = {inp.name for inp in graph.input}  # an initializer that is also an input can be fed instead
    outputs = {out.name for out in graph.output}
    keep = []
    for node in graph.node:
        if (node.op_type == "Identity" and node.domain in _DEFAULT_DOMAINS and node.input[0] in inits
                and node.input[0] not in overridable and node.output[0] not in outputs):
            copy = graph.initializer.add()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            inits[copy.name] = copy
        else:
            keep.append(node)
    if len(keep) < len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _fuse_layers(onnx: Any, model: Any) -> None:
    """Write dense layers and convolution biases as ``torch.onnx`` writes ``nn.Linear`` and ``nn.ConvNd``, so that
    they become layers with their bias (and get the composite's layer rules, not LRP-0 on loose ops):

    - ``MatMul(x, W)`` on a 2-D ``x`` with ``W`` an initializer (as tf2onnx writes Keras' ``Dense``), followed by
      ``Add(b)`` with ``b`` an initializer of one value per output when that ``Add`` is its only use, becomes
      ``Gemm(x, W, b)`` (without the ``Add``: ``Gemm(x, W)``);
    - ``Conv`` without a bias whose only use is ``Add(b)``, ``b`` an initializer of one value per output channel
      (shaped ``(C, 1, ...)`` or ``(1, C, 1, ...)``), takes ``b`` as its bias."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    fed = {inp.name for inp in graph.input}
    uses: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    outputs = {out.name for out in graph.output}
    try:
        ranks = {v.name: len(v.type.tensor_type.shape.dim)
                 for v in (*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input)
                 if v.type.tensor_type.HasField("shape")}
    except Exception:
        ranks = {}

    taken = {init.name for init in graph.initializer} | fed | outputs | {o for n in graph.node for o in n.output}

    def fresh(base: str) -> str:
        """A tensor name no initializer, input or node output has yet."""
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    def weight(name: str) -> Optional[Any]:
        return onnx.numpy_helper.to_array(inits[name]) if name in inits and name not in fed else None

    def only_add(node: Any, width: int, shapes: tuple) -> Optional[tuple[Any, Any]]:
        """The Add that alone uses the node's output, and its bias as one value per output."""
        after = uses.get(node.output[0], [])
        if len(after) != 1 or node.output[0] in outputs or after[0].op_type != "Add" \
                or after[0].domain not in _DEFAULT_DOMAINS:
            return None
        add = after[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        b = weight(other)
        if b is None or b.size != width or tuple(b.shape) not in shapes:
            return None
        return add, b.reshape(-1)

    removed, added = set(), []
    for node in graph.node:
        if node.domain not in _DEFAULT_DOMAINS or id(node) in removed:
            continue
        if node.op_type == "MatMul" and ranks.get(node.input[0]) == 2:
            w = weight(node.input[1])
            if w is None or w.ndim != 2:
                continue
            found = only_add(node, w.shape[1], ((w.shape[1],), (1, w.shape[1])))
            inputs, output = list(node.input), node.output[0]
            if found is not None:
                add, b = found
                bias = onnx.numpy_helper.from_array(b.astype(w.dtype), fresh(f"{node.output[0]}_bias"))
                graph.initializer.append(bias)
                inputs.append(bias.name)
                output = add.output[0]
                removed.add(id(add))
            removed.add(id(node))
            added.append((node, onnx.helper.make_node("Gemm", inputs, [output], name=node.name or output)))
        elif node.op_type == "Conv" and len(node.input) == 2:
            w = weight(node.input[1])
            if w is None:
                continue
            c, rest = w.shape[0], (1,) * (w.ndim - 2)
            found = only_add(node, c, ((c, *rest), (1, c, *rest)))
            if found is None:
                continue
            add, b = found
            bias = onnx.numpy_helper.from_array(b.astype(w.dtype), fresh(f"{node.output[0]}_bias"))
            graph.initializer.append(bias)
            node.input.append(bias.name)
            node.output[0] = add.output[0]
            removed.add(id(add))
    if not removed:
        return
    replacement = {id(old): new for old, new in added}
    nodes = [replacement.get(id(n), n) for n in graph.node if id(n) not in removed or id(n) in replacement]
    del graph.node[:]
    graph.node.extend(nodes)


def _registry() -> Optional[set[tuple[str, str, int]]]:
    """(domain, op, version) of onnx2torch's converters; ``None`` if its (private) registry moved."""
    try:
        from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

        return {(d.domain, d.operation_type, d.version) for d in _CONVERTER_REGISTRY}
    except (ImportError, AttributeError):
        return None


def _since(onnx: Any, op: str, domain: str, opset: int) -> Optional[int]:
    """The version of ``op``'s schema in effect at ``opset`` (what onnx2torch looks its converter up by)."""
    try:
        return int(onnx.defs.get_schema(op, max_inclusive_version=opset, domain=domain).since_version)
    except Exception:
        return None


def _unsupported(onnx: Any, model: Any, opset: int, registry: set) -> list[tuple[Any, str, int]]:
    """The nodes without an onnx2torch converter: (node, domain, version looked up)."""
    versions = {d: v for d, v in ((o.domain or "", o.version) for o in model.opset_import)}
    missing = []
    for node in model.graph.node:
        domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
        at = opset if domain == "" else versions.get(domain, 1)
        since = _since(onnx, node.op_type, domain, at) or at
        if (domain, node.op_type, since) not in registry:
            missing.append((node, domain, since))
    return missing


def _default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 1)


def _lowered(onnx: Any, model: Any, target: int) -> Any:
    """``model`` converted to default-domain opset ``target``; ``model`` is left without its weights' bytes.
    They are set aside meanwhile: the converter copies the whole model through a serialised string (slow for a
    VGG, impossible beyond 2 GB) but only rewrites nodes."""
    weights = {}
    for init in model.graph.initializer:
        if len(init.raw_data) > 65536:
            weights[init.name] = init.raw_data
            init.ClearField("raw_data")
    lowered = onnx.version_converter.convert_version(model, target)
    for init in lowered.graph.initializer:
        if init.name in weights:
            init.raw_data = weights[init.name]
    return lowered


def _convertible(onnx: Any, model: Any, path: Path) -> Any:
    """``model`` at an opset where onnx2torch converts every node, or :class:`ModelError` naming the nodes."""
    registry = _registry()
    if registry is None:  # leave it to onnx2torch, whose errors load_onnx passes on
        return model
    opset = _default_opset(model)
    missing = _unsupported(onnx, model, opset, registry)
    if not missing:
        return model
    known = {(domain, op) for domain, op, _ in registry}
    never = [m for m in missing if (m[1], m[0].op_type) not in known]
    if not never:
        # every op has converters, not all for the versions in effect: lower to the highest opset where they do
        target = next((t for t in range(opset - 1, 6, -1) if not _unsupported(onnx, model, t, registry)), None)
        if target is not None:
            try:
                lowered = _lowered(onnx, model, target)
            except Exception:
                lowered = None
            if lowered is not None:
                missing = _unsupported(onnx, lowered, target, registry)
                if not missing:
                    return lowered
                model, opset = lowered, target
    failing = never or missing
    node, domain, version = failing[0]
    name = node.name or f"#{list(model.graph.node).index(node)}"
    what = "has no converter for" if never else "has no converter at any usable opset for"
    same = sum(1 for other, _, _ in failing if other.op_type == node.op_type)
    others = sorted({other.op_type for other, _, _ in failing} - {node.op_type})
    more = f" and {same - 1} more" if same > 1 else ""
    more += f"; also unsupported: {', '.join(others)}" if others else ""
    raise ModelError(f"cannot convert {path}: onnx2torch {what} op {node.op_type} (domain "
                     f"{domain or 'ai.onnx'}, version {version}, opset {opset}) of node {name!r}{more}. "
                     f"{_WAY_OUT}")


def load_onnx(path: Union[str, Path]) -> torch.nn.Module:
    """The ONNX model in ``path`` as a PyTorch module in eval mode (a ``torch.fx.GraphModule`` built by
    ``onnx2torch``). Raises :class:`~lrp.errors.ModelError` when the file is missing or not ONNX, when an op
    cannot be converted (naming the op and the node), or when the ``lrp[onnx]`` extra is not installed."""
    path = Path(path)
    onnx, convert = _modules()
    model = _read(path)
    _fold_initializer_identities(model)
    _fuse_layers(onnx, model)
    model = _convertible(onnx, model, path)
    try:
        module = convert(model)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"onnx2torch cannot convert {path}: {type(exc).__name__}: {reason[:300]}. "
                         f"{_WAY_OUT}") from None
    return module.eval()


def onnx_input_shape(model: Union[str, Path, Any]) -> tuple[Optional[int], ...]:
    """The shape of the graph's first input (an ONNX file or ``ModelProto``), symbolic dimensions as ``None``:
    e.g. ``(None, 3, 224, 224)`` for a channels-first image model, ``(None, 224, 224, 3)`` for one from TF; ``()``
    when the file does not say. A file is parsed but not checked again (:func:`load_onnx` does that)."""
    if isinstance(model, (str, Path)):
        model = _read(Path(model), check=False)
    inits = {init.name for init in model.graph.initializer}
    first = next((inp for inp in model.graph.input if inp.name not in inits), None)
    if first is None:
        raise ModelError("the ONNX graph has no inputs")
    dims = first.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
