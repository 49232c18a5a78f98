"""The web demo's work without the web: check and decode inputs, preprocess them, explain, encode PNGs.

Everything here is synchronous and runs in a worker thread; problems raise :class:`ServiceError` with the
HTTP status to answer.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .. import models as builtin_models
from ..composites import COMPOSITES, Composite
from ..errors import LRPError, TargetError
from ..explain import explain
from ..loading import (InputError, LoadedModel, ModelError, Preprocess, check_device, composite_for, load_model,
                       preprocess_for, read_classes)
from ..visualize import heatmap, overlay
from .schemas import ExplainOptions, ExplainResponse, Frame, Sample

log = logging.getLogger("lrp.web")

MAX_BYTES = 10 * 1024 * 1024  # request body
MAX_SIDE = 4096  # image width and height
DEFAULT_COMPOSITE = "epsilon-plus-flat"
DIGIT_SHAPE = (1, 28, 28)
DIGIT_BOX = 20  # MNIST: the digit's bounding box fits 20x20, its centre of mass sits at the centre of 28x28
MIN_DISPLAY = 224  # PNGs are enlarged (nearest neighbour) to at least this many pixels on the shorter side
# declared content types of uploads -> the Pillow format they should be; others are refused with 415
IMAGE_TYPES = {
    "image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/pjpeg": "JPEG", "image/gif": "GIF",
    "image/bmp": "BMP", "image/x-bmp": "BMP", "image/x-ms-bmp": "BMP", "image/webp": "WEBP",
    "image/tiff": "TIFF", "image/x-portable-pixmap": "PPM", "image/x-portable-graymap": "PPM",
    "image/x-portable-anymap": "PPM",
}
FORMATS = set(IMAGE_TYPES.values())
SNIFFED_TYPES = {"", "application/octet-stream"}  # no type given: the bytes must be a supported image


class ServiceError(Exception):
    """A request that cannot be answered: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- served models

@dataclass
class ServedModel:
    """A model with its preprocessing and class names, as ``lrp serve`` serves it."""

    name: str
    loaded: LoadedModel
    pre: Preprocess
    classes: Optional[list[str]] = None
    input_shape: Optional[tuple[int, ...]] = None
    num_classes: Optional[int] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _composites: dict = field(default_factory=dict, init=False, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.input_shape is None:
            self.input_shape = _input_shape(self.loaded, self.pre)
        if self.classes is None and self.loaded.kind == "mnist":
            self.classes = [str(k) for k in range(10)]

    @classmethod
    def load(cls, spec: str = "mnist", weights: Optional[str] = None, classes: Optional[str] = None,
             name: Optional[str] = None, device: Union[str, torch.device] = "cpu",
             **preprocessing: Any) -> "ServedModel":
        """Load ``spec`` as ``lrp explain --model`` does and move it to ``device``; ``preprocessing``: size, crop,
        mean, std, grayscale, invert (as the options of ``lrp explain``). Raises ``ModelError``."""
        loaded = load_model(spec, weights)
        device = torch.device(check_device(str(device)))
        loaded.model.to(device)
        pre = preprocess_for(loaded.kind, **{k: v for k, v in preprocessing.items() if v is not None})
        return cls(name or spec, loaded, pre, read_classes(classes) if classes else None, device=device)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def drawable(self) -> bool:
        return self.input_shape == DIGIT_SHAPE

    def composite(self, name: str) -> Composite:
        """The named composite with z^B bounds from this model's preprocessing (built once)."""
        with self._guard:
            if name not in self._composites:
                if name not in COMPOSITES:
                    raise ServiceError(422, f"unknown composite {name!r}; choose one of {', '.join(COMPOSITES)}")
                self._composites[name] = composite_for(name, self.pre)
            return self._composites[name]

    def label(self, index: int) -> str:
        return self.classes[index] if self.classes and 0 <= index < len(self.classes) else str(index)

    def target_index(self, target: Union[int, str, None]) -> Optional[int]:
        """``None`` (the predicted class), an index, or a class name -> an index; ``ServiceError`` 400 if bad."""
        if target is None or (isinstance(target, str) and target.strip() in ("", "pred")):
            return None
        if isinstance(target, str):
            spec = target.strip()
            if self.classes and spec in self.classes:
                return self.classes.index(spec)
            if spec.lstrip("-").isdigit():
                target = int(spec)
            else:
                names = " or class name" if self.classes else ""
                raise ServiceError(400, f"target {target!r} is not a class index{names} of model {self.name!r}")
        if not 0 <= target < (self.num_classes or 2**31):
            known = f": model {self.name!r} has {self.num_classes} classes (0..{self.num_classes - 1})"
            raise ServiceError(400, f"target {target} is out of range" + (known if self.num_classes else ""))
        return target

    def warm_up(self) -> None:
        """Explain a grey input twice, so that the first request is as fast as the others; learn the class
        count. Raises ``ModelError`` when the model fails on its input shape."""
        if self.input_shape is None:
            return
        x = torch.full((1, *self.input_shape), 0.5, device=self.device)
        try:
            for _ in range(2):
                res = explain(self.model, x, composite=self.composite(DEFAULT_COMPOSITE))
        except Exception as exc:
            raise ModelError(f"model {self.name!r} fails on an input of shape {tuple(x.shape)}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        if res.output.ndim == 2:
            self.num_classes = int(res.output.shape[1])
        if self.classes is None:
            self.classes = _known_class_names(self)
        if self.classes and self.num_classes and len(self.classes) != self.num_classes:
            log.warning("model %r has %d outputs but %d class names", self.name, self.num_classes, len(self.classes))


def _input_shape(loaded: LoadedModel, pre: Preprocess) -> Optional[tuple[int, ...]]:
    if loaded.kind == "mnist" and pre.crop in (None, 28) and pre.size in (None, 28):
        return DIGIT_SHAPE
    if loaded.kind == "exported":
        shape = _exported_input_shape(loaded.model)
        if shape is not None:
            return shape
    if pre.crop and loaded.channels:
        return (loaded.channels, pre.crop, pre.crop)
    return None


def _exported_input_shape(module: torch.nn.Module) -> Optional[tuple[int, ...]]:
    """The input shape (without the batch) an exported program was exported with, if static."""
    graph = getattr(module, "graph", None)
    for node in getattr(graph, "nodes", ()):
        if node.op == "placeholder":
            value = node.meta.get("val")
            shape = getattr(value, "shape", None)
            if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape[1:]):
                return None
            return tuple(int(d) for d in shape[1:])
    return None


def _known_class_names(served: ServedModel) -> Optional[list[str]]:
    """ImageNet's class names for a torchvision model with 1000 outputs (shipped with torchvision)."""
    if served.loaded.kind != "torchvision" or served.num_classes != 1000:
        return None
    try:
        import torchvision
        return list(torchvision.models.get_model_weights(served.name).DEFAULT.meta["categories"])
    except Exception:
        return None


# --------------------------------------------------------------------------- inputs

@dataclass
class Prepared:
    """A model input (C, H, W), the picture the heatmap goes over, and where that input lies in the picture
    that was sent (digit preprocessing)."""

    x: torch.Tensor
    picture: Optional[Image.Image]
    frame: Optional[Frame] = None


def open_image(data: bytes, content_type: Optional[str]) -> Image.Image:
    """Check and decode an uploaded image: 415 for what is not a supported image, 413 for more than
    ``MAX_SIDE`` pixels a side, 400 for an image that does not decode."""
    declared = (content_type or "").split(";")[0].strip().lower()
    supported = "PNG, JPEG, GIF, BMP, WebP, TIFF, PPM"
    if declared not in IMAGE_TYPES and declared not in SNIFFED_TYPES:
        raise ServiceError(415, f"unsupported content type {declared!r}: send an image ({supported})")
    if not data:
        raise ServiceError(400, "the image file is empty")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ServiceError(413, f"image too large: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        if declared in SNIFFED_TYPES:
            raise ServiceError(415, f"the file is not an image of a supported type ({supported})") from None
        raise ServiceError(400, f"cannot decode the image: the data is not a valid {declared} file") from None
    if img.format not in FORMATS:
        raise ServiceError(415, f"unsupported image format {img.format}: send {supported}")
    width, height = img.size
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ServiceError(413, f"image of {width}x{height} pixels is too large: at most {MAX_SIDE}x{MAX_SIDE}")
    if width == 0 or height == 0:
        raise ServiceError(400, "the image has no pixels")
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ServiceError(413, f"image too large: {exc}") from None
    except Exception as exc:  # truncated or corrupt data; Pillow raises several types
        raise ServiceError(400, f"cannot decode the image ({type(exc).__name__}: {exc})") from None
    return img


def image_input(served: ServedModel, img: Image.Image, options: ExplainOptions) -> Prepared:
    """The model input from a picture, with the model's or MNIST's preprocessing."""
    invert = _invert(served, options)
    if options.preprocess == "digit":
        gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        return digit_input(served, 1.0 - gray if invert else gray)
    try:
        x, picture = dataclasses.replace(served.pre, invert=invert).from_image(img)
    except InputError as exc:
        raise ServiceError(422, str(exc)) from None
    return Prepared(_check_shape(served, x, "the preprocessed image"), picture)


def _invert(served: ServedModel, options: ExplainOptions) -> bool:
    return served.pre.invert if options.invert is None else options.invert


def array_input(served: ServedModel, values: list, options: ExplainOptions) -> Prepared:
    """The model input from nested lists: as given (``preprocess='model'``) or a drawing (``'digit'``)."""
    try:
        a = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError):
        raise ServiceError(422, "array must be nested lists of numbers of one rectangular shape") from None
    if a.size == 0:
        raise ServiceError(422, "array is empty")
    if not np.isfinite(a).all():
        raise ServiceError(422, "array holds values that are not finite (NaN or infinity)")
    if options.preprocess == "digit":
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 2:
            raise ServiceError(422, f"with preprocess='digit' the array must be a drawing (H, W); got shape "
                                    f"{list(a.shape)}")
        if a.shape[0] > MAX_SIDE or a.shape[1] > MAX_SIDE:
            raise ServiceError(413, f"array of {a.shape[1]}x{a.shape[0]} is too large: at most {MAX_SIDE} a side")
        a = np.clip(a, 0.0, 1.0)
        return digit_input(served, 1.0 - a if _invert(served, options) else a)
    x = torch.from_numpy(a)
    shape = served.input_shape
    if shape is not None and x.ndim == len(shape) - 1 and shape[0] == 1:
        x = x[None]  # (H, W) for a one-channel model
    x = _check_shape(served, x, "array")
    return Prepared(x, _picture(x))


def _check_shape(served: ServedModel, x: torch.Tensor, what: str) -> torch.Tensor:
    shape = served.input_shape
    if shape is not None and tuple(x.shape) != shape:
        hint = " (try preprocess='digit')" if served.drawable and what != "array" else ""
        raise ServiceError(422, f"{what} has shape {list(x.shape)}, model {served.name!r} expects {list(shape)}"
                                + hint)
    return x


def _picture(x: torch.Tensor) -> Optional[Image.Image]:
    """An array input as a picture (scaled to its range) when it is an image: (1 or 3, H, W)."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        return None
    a = x.detach().double().numpy()
    lo, hi = a.min(), a.max()
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = np.round(np.moveaxis(a, 0, -1) * 255).astype(np.uint8)
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def centre_digit(gray: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """MNIST's normalisation of a white-on-black drawing (H, W) in [0, 1]: the ink's bounding box scaled to fit
    20x20 (keeping its aspect), placed in 28x28 with its centre of mass at the centre.

    Returns the 28x28 digit and where the 28x28 grid lies in the drawing: (x, y, width, height) in its pixels.
    """
    h, w = gray.shape
    out = np.zeros((28, 28), dtype=np.float32)
    peak = float(gray.max())
    if peak <= 0.02:  # nothing drawn: the model sees an empty digit
        return out, (0.0, 0.0, float(w), float(h))
    ys, xs = np.nonzero(gray > 0.1 * peak)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    bh, bw = y1 - y0, x1 - x0
    scale = DIGIT_BOX / max(bh, bw)  # one scale for both axes: the digit keeps its aspect
    nw, nh = (min(DIGIT_BOX, max(1, math.ceil(n * scale - 1e-6))) for n in (bw, bh))
    sw, sh = nw / scale, nh / scale  # the drawing's region that becomes nw x nh pixels, centred on the ink
    pad = math.ceil(max(sw - bw, sh - bh) / 2) + 1
    box = np.pad(gray[y0:y1, x0:x1].astype(np.float32), pad)
    region = ((bw - sw) / 2 + pad, (bh - sh) / 2 + pad, (bw + sw) / 2 + pad, (bh + sh) / 2 + pad)
    small = np.asarray(Image.fromarray(box).resize((nw, nh), Image.Resampling.LANCZOS, box=region))
    small = np.clip(small, 0.0, 1.0)
    mass = small.sum()
    cy = float((small.sum(1) * (np.arange(nh) + 0.5)).sum() / mass) if mass > 0 else nh / 2
    cx = float((small.sum(0) * (np.arange(nw) + 0.5)).sum() / mass) if mass > 0 else nw / 2
    top = int(np.clip(round(14 - cy), 0, 28 - nh))
    left = int(np.clip(round(14 - cx), 0, 28 - nw))
    out[top:top + nh, left:left + nw] = small
    return out, (x0 + (bw - sw) / 2 - left / scale, y0 + (bh - sh) / 2 - top / scale, 28 / scale, 28 / scale)


def digit_input(served: ServedModel, gray: np.ndarray) -> Prepared:
    if not served.drawable:
        raise ServiceError(422, f"preprocess='digit' makes 1x28x28 digits; model {served.name!r} expects "
                                f"{list(served.input_shape) if served.input_shape else 'another input'}")
    digit, (fx, fy, fw, fh) = centre_digit(gray)
    x = served.pre.normalize(torch.from_numpy(digit)[None])
    picture = Image.fromarray(np.round(digit * 255).astype(np.uint8))
    return Prepared(x, picture, Frame(x=fx, y=fy, width=fw, height=fh))


# --------------------------------------------------------------------------- explaining

def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def enlarge(img: Image.Image) -> Image.Image:
    """Small pictures enlarged by a whole factor (nearest neighbour) so that pixels stay sharp and visible."""
    w, h = img.size
    factor = min(math.ceil(MIN_DISPLAY / min(w, h)), max(1, MAX_SIDE // max(w, h)))
    return img.resize((w * factor, h * factor), Image.Resampling.NEAREST) if factor > 1 else img


def explain_input(served: ServedModel, prepared: Prepared, options: ExplainOptions,
                  started: Optional[float] = None) -> ExplainResponse:
    """Explain one prepared input; the answer of ``POST /api/explain``."""
    started = time.perf_counter() if started is None else started
    comp = served.composite(options.composite)
    target = served.target_index(options.target)
    x = prepared.x[None].to(served.device)
    try:
        res = explain(served.model, x, target=target, composite=comp)
    except TargetError as exc:
        raise ServiceError(400, str(exc)) from None
    except LRPError as exc:
        raise ServiceError(422, f"model {served.name!r} cannot be explained: {exc}") from None
    except Exception as exc:  # the model fails on this input: a shape the model does not take, most often
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ServiceError(422, f"model {served.name!r} failed on an input of shape {list(prepared.x.shape)}: "
                                f"{type(exc).__name__}: {first}") from None
    if res.output.ndim != 2:
        raise ServiceError(422, f"model {served.name!r} gives an output of shape {list(res.output.shape)}; the web "
                                f"app explains classifiers (output: batch x classes)")
    logits = res.output[0].detach().float().cpu()
    probs = torch.softmax(logits, 0)
    pred = int(logits.argmax())
    explained = int(res.target[0])
    relevance = res.relevance[0].detach().cpu()
    heat = over = None
    if relevance.ndim in (2, 3):
        heat = png_data_url(enlarge(heatmap(relevance, "bwr")))
        picture = prepared.picture
        if picture is not None and picture.size == (relevance.shape[-1], relevance.shape[-2]):
            over = png_data_url(enlarge(overlay(picture, relevance, "bwr")))
    return ExplainResponse(
        model=served.name, composite=options.composite, prediction=pred, prediction_label=served.label(pred),
        probabilities=[round(float(p), 6) for p in probs], target=explained, target_label=served.label(explained),
        score=float(logits[explained]), relevance_sum=float(relevance.sum()), input_shape=list(prepared.x.shape),
        heatmap=heat, overlay=over,
        input_image=png_data_url(enlarge(prepared.picture)) if prepared.picture is not None else None,
        frame=prepared.frame, relevance=relevance.tolist() if options.raw else None,
        elapsed_ms=round((time.perf_counter() - started) * 1000, 3))


def explain_image(served: ServedModel, data: bytes, content_type: Optional[str],
                  options: ExplainOptions) -> ExplainResponse:
    started = time.perf_counter()
    prepared = image_input(served, open_image(data, content_type), options)
    return explain_input(served, prepared, options, started)


def explain_array(served: ServedModel, values: list, options: ExplainOptions) -> ExplainResponse:
    started = time.perf_counter()
    return explain_input(served, array_input(served, values, options), options, started)


@lru_cache(maxsize=1)
def digit_samples() -> tuple[Sample, ...]:
    """The first held-out MNIST digit of each class, 0 to 9."""
    x, labels = builtin_models.mnist_digits("test", limit=200)
    samples = []
    for k in range(10):
        i = int(torch.nonzero(labels == k)[0])
        digit = x[i, 0].numpy()
        picture = Image.fromarray(np.round(digit * 255).astype(np.uint8))
        samples.append(Sample(label=k, array=np.round(digit, 4).tolist(), image=png_data_url(picture)))
    return tuple(samples)
