"""One path from a model spec to an explanation: load the model, prepare each input as the model reads it,
explain a batch, and hand back one :class:`Outcome` per input. The command line, the web server and the
evaluation report are thin layers over :class:`Pipeline`."""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
from PIL import Image

from ..composites import COMPOSITES, Composite, composite
from ..errors import InputError, ModelError, TargetError
from ..explain import explain
from .inputs import DIGIT_SHAPE, Preprocess, centre_digit, open_image, preprocess_for, read_array
from .models import LoadedModel, check_device, load_model, read_classes

Shape = tuple[Optional[int], ...]  # a sample's shape; None: any size along that dimension
Bound = Union[float, torch.Tensor, None]  # a z^B bound: a scalar or one value per channel
P = TypeVar("P", bound="Pipeline")


def composite_names() -> list[str]:
    """The named composites (``lrp.composite``), in registry order."""
    return list(COMPOSITES)


def needs_bounds(name: str) -> bool:
    """Whether the named composite puts z^B at the input and so takes ``low``/``high``."""
    key = name.lower().replace("_", "-")
    return key in COMPOSITES and "low" in inspect.signature(COMPOSITES[key]).parameters


def parse_target(spec: Union[int, str, None], classes: Optional[Sequence[str]]) -> Optional[int]:
    """``None``, ``""`` or ``"pred"`` (the predicted class), an index, or a class name -> an index or None."""
    if spec is None or isinstance(spec, bool):
        if spec is None:
            return None
        raise TargetError(f"target must be a class index or name, got {spec!r}")
    if isinstance(spec, int):
        return spec
    text = spec.strip()
    if text in ("", "pred"):
        return None
    if classes and text in classes:
        return list(classes).index(text)
    if text.lstrip("-").isdigit():
        return int(text)
    if not classes:
        raise TargetError(f"target {spec!r} is not a class index; to use class names give the class names "
                          f"(--classes FILE, one name per line)")
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    raise TargetError(f"target {spec!r} is neither a class index nor one of the {len(classes)} class names "
                      f"({shown})")


@dataclass
class Prepared:
    """One model input (without the batch dimension), the picture shown under its heatmap, where the input lies
    in the picture that was sent (drawn digits), and where it came from."""

    x: torch.Tensor
    picture: Optional[Image.Image] = None
    source: str = ""
    kind: str = "image"  # "image" (preprocessed picture) or "array" (values as given)
    frame: Optional[tuple[float, float, float, float]] = None
    note: Optional[str] = None  # something the user should know about how it was prepared


@dataclass
class Outcome:
    """The explanation of one input, in plain values."""

    prepared: Prepared
    relevance: torch.Tensor  # on the CPU, shaped like the input
    target: int  # the explained class
    score: float  # the explained score (the relevance shared out): the target's logit, or -logit (binary, class 0)
    predicted: Optional[int]
    probabilities: Optional[list[float]]
    head: Optional[str]  # the output head explained past (sigmoid, softmax, log_softmax), if any

    @property
    def relevance_sum(self) -> float:
        return float(self.relevance.sum())

    @property
    def probability(self) -> Optional[float]:
        """The predicted class's probability, when the model's outputs are class scores."""
        if self.probabilities is None or self.predicted is None:
            return None
        return self.probabilities[self.predicted]


@dataclass
class Pipeline:
    """A loaded model with its preprocessing, class names and device: prepares inputs and explains them."""

    loaded: LoadedModel
    pre: Preprocess = field(default_factory=Preprocess)
    classes: Optional[list[str]] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    name: str = ""
    num_classes: Optional[int] = None
    _fits: dict = field(default_factory=dict, init=False, repr=False)
    _composites: dict = field(default_factory=dict, init=False, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or self.loaded.spec or self.loaded.kind
        if self.classes is None and self.loaded.kind == "mnist":
            self.classes = [str(k) for k in range(10)]

    @classmethod
    def load(cls: type[P], spec: str = "mnist", weights: Optional[str] = None, classes: Optional[str] = None, *,
             device: Union[str, torch.device] = "cpu", name: Optional[str] = None, **preprocessing: Any) -> P:
        """Load ``spec`` (see :func:`lrp.pipeline.load_model`) onto ``device``; ``classes`` is a file of class
        names; ``preprocessing``: size, crop, mean, std, grayscale, invert. Raises ``ModelError``."""
        device = torch.device(check_device(str(device)))
        loaded = load_model(spec, weights)
        loaded.model.to(device)
        pre = preprocess_for(loaded.kind, default=loaded.pre,
                             **{k: v for k, v in preprocessing.items() if v is not None})
        names = read_classes(classes) if classes else None
        return cls(loaded, pre, names, device=device, name=name or spec)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    # ------------------------------------------------------------------ what the model reads
    @property
    def input_shape(self) -> Optional[Shape]:
        """The shape of one sample the model reads, as far as the spec tells (None: unknown)."""
        kind = self.loaded.kind
        if kind == "mnist" and self.pre.size in (None, 28) and self.pre.crop in (None, 28):
            return DIGIT_SHAPE
        if kind == "exported":
            return _exported_input_shape(self.model)
        if kind in ("keras", "onnx"):
            return self.loaded.shape
        if kind == "torchvision":
            side = self.pre.crop
            return (3, side, side) if side else (3, None, None)
        conv = next((m for m in self.model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
        if isinstance(conv, torch.nn.Conv2d) and self.pre.crop:  # images cropped to a fixed size
            return (conv.in_channels, self.pre.crop, self.pre.crop)
        return None

    @property
    def drawable(self) -> bool:
        """Reads 1x28x28 digits (a drawing can be centred for it as MNIST is)."""
        return self.input_shape == DIGIT_SHAPE

    def label(self, index: int) -> str:
        return self.classes[index] if self.classes and 0 <= index < len(self.classes) else str(index)

    def target(self, spec: Union[int, str, None]) -> Optional[int]:
        """A target given as an index, a class name, ``"pred"`` or nothing -> an index or None."""
        index = parse_target(spec, self.classes)
        classes = self.num_classes
        if index is not None and classes is not None and not 0 <= index < classes:
            raise TargetError(f"target {index} is out of range: model {self.name!r} has {classes} classes "
                              f"(0..{classes - 1})")
        return index

    def learn_classes(self, num_classes: Optional[int]) -> None:
        """Record the model's class count; class names that do not match it are an error (``ModelError``)."""
        if num_classes is None:
            return
        self.num_classes = num_classes
        if self.classes is not None and len(self.classes) != num_classes:
            raise ModelError(f"{len(self.classes)} class names were given, but model {self.name!r} has "
                             f"{num_classes} classes; give one name per class, in the order of the outputs")

    # ------------------------------------------------------------------ preparing inputs
    def image(self, source: Union[str, Path, Image.Image], invert: Optional[bool] = None) -> Prepared:
        """A picture (a file or a PIL image) through the model's preprocessing."""
        pre = self.pre if invert is None or invert == self.pre.invert else _with(self.pre, invert=invert)
        if isinstance(source, Image.Image):
            x, picture = pre.from_image(source)
            name, size = "image", source.size
        else:
            opened = open_image(Path(source))  # read once: its size tells whether the crop cut it
            x, picture = pre.from_file(opened, Path(source))
            name, size = str(source), opened.size
        prepared = Prepared(x, picture, name, "image")
        self._check_channels(prepared, "the preprocessed image")
        if pre.crop and _cut_off(size, pre):
            prepared.note = (f"{name} ({size[0]}x{size[1]}) was resized to {pre.size or 'its size'} and centre-cropped "
                             f"to {pre.crop}x{pre.crop}, as the model's preprocessing does; the heatmap covers that "
                             f"crop (--crop 0 keeps the whole image)")
        return prepared

    def digit(self, gray: np.ndarray) -> Prepared:
        """A white-on-black drawing (H, W) in [0, 1], centred and scaled as MNIST's digits are."""
        if not self.drawable:
            raise InputError(f"a drawn digit becomes a 1x28x28 input, but model {self.name!r} reads "
                             f"{_shape_text(self.input_shape) if self.input_shape else 'another input'}")
        digit, frame = centre_digit(gray)
        x = self.pre.normalize(torch.from_numpy(digit)[None])
        picture = Image.fromarray(np.round(digit * 255).astype(np.uint8))
        return Prepared(x, picture, "drawing", "image", frame)

    def array(self, source: Union[str, Path, np.ndarray], name: Optional[str] = None) -> list[Prepared]:
        """The samples in an array (a ``.npy``/``.npz`` file or values): one sample shaped like the model input,
        or a batch (first dimension: samples); a one-channel model's channel may be left out."""
        if isinstance(source, (str, Path)):
            values, name = read_array(Path(source)), name or str(source)
        else:
            values, name = np.asarray(source, dtype=np.float32), name or "array"
        samples = self._fit(torch.from_numpy(np.ascontiguousarray(values)), name)
        many = len(samples) > 1
        return [Prepared(x, _picture(x), f"{name}[{i}]" if many else name, "array") for i, x in enumerate(samples)]

    def _fit(self, a: torch.Tensor, name: str) -> torch.Tensor:
        """``a`` as a batch of samples the model reads (see :meth:`array`)."""
        candidates = [("one sample", a[None]), ("one sample without its channel", a[None, None])]
        if a.ndim >= 2:
            candidates[1:1] = [("a batch", a)]
            candidates.append(("a batch without channels", a[:, None]))
        expected = self.input_shape
        if expected is not None:
            for _, b in candidates:
                if _matches(tuple(b.shape[1:]), expected):
                    return b
            raise InputError(_misfit(name, a.shape, expected, self.name))
        key = tuple(a.shape)
        if key not in self._fits:
            self._fits[key] = self._probe(candidates)
        choice = self._fits[key]
        if choice is None:
            raise InputError(f"{name}: model {self.name!r} fails on an array of shape {tuple(a.shape)} read as one "
                             f"sample ({tuple(a[None].shape)}) and as a batch; save one sample shaped as the model "
                             f"reads it without the batch dimension, or a batch with the samples first")
        fitted: torch.Tensor = dict(candidates)[choice]
        return fitted

    def _probe(self, candidates: list) -> Optional[str]:
        """The first way of reading an array the model runs on (a forward on its first sample), trying first
        the one its first layer suggests."""
        dims = _first_layer_dims(self.model)
        candidates = sorted(candidates, key=lambda c: dims is not None and c[1].ndim - 1 != dims)
        for what, b in candidates:
            try:
                with torch.no_grad():
                    out = _output_tensor(self.model(b[:1].to(self.device)))
            except Exception:
                continue
            if out is not None and out.shape[:1] == (1,) and out.ndim <= 2:
                return what
        return None

    def _check_channels(self, prepared: Prepared, what: str) -> None:
        expected = self.input_shape
        if expected is None or _matches(tuple(prepared.x.shape), expected):
            return
        x = prepared.x
        hint = ""
        if expected[0] == 1 and x.shape[0] == 3:
            hint = " (read the image as one channel: --grayscale)"
        elif expected[0] == 3 and x.shape[0] == 1:
            hint = " (drop --grayscale)"
        elif self.drawable:
            hint = " (resize with --size/--crop, or for a drawing use preprocess='digit')"
        raise InputError(f"{prepared.source}: {what} has shape {tuple(x.shape)}, model {self.name!r} reads "
                         f"{_shape_text(expected)}{hint}")

    # ------------------------------------------------------------------ composites
    def composite(self, name: str, *, kind: str = "image", maxpool: str = "max", low: Bound = None,
                  high: Bound = None, data_range: Optional[tuple[float, float]] = None
                  ) -> tuple[Composite, Optional[str]]:
        """The named composite and a note on where its z^B bounds came from (None when it takes none). Bounds not
        given come from the preprocessing for images (pixels in [0, 1], normalised) and from ``data_range``, the
        values' minimum and maximum, for arrays; with neither, ``ModelError`` asks for them."""
        key = name.lower().replace("_", "-")
        if key not in COMPOSITES:
            raise ModelError(f"unknown composite {name!r}; choose one of {', '.join(COMPOSITES)}")
        known_range = kind == "image" or self.loaded.kind in ("mnist", "torchvision")
        cache_key = (key, known_range, maxpool, low, high, None if known_range else data_range)
        with self._guard:
            if cache_key in self._composites:
                return self._composites[cache_key]
            note = None
            params: dict = {}
            if needs_bounds(key):
                if low is not None and high is not None:
                    note = f"z^B bounds as given: low={low:g}, high={high:g}"
                elif known_range:  # images, or arrays for a model whose input range its kind tells
                    low, high = self.pre.pixel_range()
                    note = (f"z^B bounds from the preprocessing (pixels 0..{self.pre.scale:g}): low={_fmt(low)}, "
                            f"high={_fmt(high)}")
                elif data_range is not None:
                    low, high = data_range
                    note = (f"z^B bounds from the arrays' values: low={low:g}, high={high:g} (give --low and --high "
                            f"for the range the data can take)")
                elif key == "epsilon-gamma-box":
                    raise ModelError(f"composite {name!r} needs the input's value range for z^B: give --low and "
                                     f"--high")
                params = {"low": low, "high": high} if low is not None else {}
            result = (composite(key, maxpool=maxpool, **params), note)
            if data_range is None or known_range:  # bounds from one request's data are not kept
                self._composites[cache_key] = result
            return result

    # ------------------------------------------------------------------ explaining
    def explain(self, items: Sequence[Prepared], target: Union[int, str, None] = None,
                composite: Union[str, Composite] = "epsilon-plus-flat") -> list[Outcome]:
        """Explain prepared inputs of one shape as one batch; the class count is learnt (and class names checked
        against it) on the first call."""
        if not items:
            return []
        index = self.target(target)
        comp = self.composite(composite, kind=items[0].kind)[0] if isinstance(composite, str) else composite
        x = torch.stack([item.x for item in items]).to(self.device)
        res = explain(self.model, x, target=index, composite=comp)
        if self.num_classes is None:
            self.learn_classes(getattr(res, "num_classes", None))
        relevance = res.relevance.detach().cpu()
        start = res.start.detach().reshape(len(items), -1).sum(1).cpu()
        probabilities = getattr(res, "probabilities", None)
        predicted = getattr(res, "predicted", None)
        outcomes = []
        for i, item in enumerate(items):
            outcomes.append(Outcome(
                item, relevance[i], int(res.target[i]) if res.target is not None else 0, float(start[i]),
                int(predicted[i]) if predicted is not None else None,
                [round(float(p), 6) for p in probabilities[i]] if probabilities is not None else None,
                getattr(res, "head", None)))
        return outcomes


# --------------------------------------------------------------------------- helpers

def _with(pre: Preprocess, **changes: Any) -> Preprocess:
    import dataclasses
    return dataclasses.replace(pre, **changes)


def _cut_off(size: tuple[int, int], pre: Preprocess) -> bool:
    w, h = size
    if pre.size:
        scale = pre.size / min(w, h)
        w, h = round(w * scale), round(h * scale)
    return pre.crop is not None and (w > pre.crop or h > pre.crop)


def _fmt(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "(" + ", ".join(f"{v:.3g}" for v in value.tolist()) + ")"
    return f"{value:g}"


def _matches(shape: tuple, expected: Shape) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def _shape_text(shape: Shape) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in shape) + ")"


def _misfit(name: str, shape: tuple, expected: Shape, model: str) -> str:
    sample = ", ".join("H" if d is None and i == len(expected) - 2 else "W" if d is None else str(d)
                       for i, d in enumerate(expected))
    ways = f"one sample shaped ({sample})"
    if expected[0] == 1:
        ways += f" or ({sample.split(', ', 1)[1]})"
    return (f"{name}: an array of shape {tuple(shape)} does not fit model {model!r}, which reads samples shaped "
            f"{_shape_text(expected)}; give {ways}, or a batch shaped (N, {sample}) (e.g. "
            f"x.reshape(-1, {sample.replace('H', '...').replace('W', '...')}))")


def _output_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def _first_layer_dims(model: torch.nn.Module) -> Optional[int]:
    """Dimensions of one sample the first dense or convolution layer (in definition order) reads."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            return 1
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            return int(m.__class__.__name__[-2]) + 1
    return None


def _exported_input_shape(module: torch.nn.Module) -> Optional[Shape]:
    """The input shape (without the batch) an exported program was exported with, if static."""
    graph = getattr(module, "graph", None)
    for node in getattr(graph, "nodes", ()):
        if node.op == "placeholder":
            shape = getattr(node.meta.get("val"), "shape", None)
            if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape[1:]):
                return None
            return tuple(int(d) for d in shape[1:])
    return None


def _picture(x: torch.Tensor) -> Optional[Image.Image]:
    """An array sample as a picture (scaled to its range) when it is an image: (1 or 3, H, W) or (H, W)."""
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3) or min(x.shape[1:]) < 2:
        return None
    a = x.detach().double().numpy()
    lo, hi = a.min(), a.max()
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = np.round(np.moveaxis(a, 0, -1) * 255).astype(np.uint8)
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
