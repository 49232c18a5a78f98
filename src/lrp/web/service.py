"""The web demo's work without the web: check and decode inputs, preprocess them, explain, encode PNGs.

Everything here is synchronous and runs in a worker thread; problems raise :class:`ServiceError` with the
HTTP status to answer.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import time
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .. import models as builtin_models
from ..errors import InputError, LRPError, ModelError, TargetError, one_line
from ..pipeline import Outcome, Pipeline, Prepared, composite_names
from ..pipeline.outputs import pictures
from .schemas import ExplainOptions, ExplainResponse, Frame, Sample

log = logging.getLogger("lrp.web")

MAX_BYTES = 10 * 1024 * 1024  # request body
MAX_SIDE = 4096  # image width and height
DEFAULT_COMPOSITE = "epsilon-plus-flat"
COMPOSITES = composite_names()
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

class ServedModel(Pipeline):
    """A :class:`~lrp.pipeline.Pipeline` as ``lrp serve`` serves it: warmed up, with its class count and names."""

    modality = "image"  # reads images and arrays (text models: :class:`lrp.web.text_service.ServedText`)

    def warm_up(self) -> None:
        """Explain a grey input twice, so that the first request is as fast as the others; learn the class count
        and check the class names against it. Raises ``ModelError`` when the model fails on its input shape or
        the class names do not fit."""
        shape = [d for d in self.input_shape or (None,) if d is not None]
        if len(shape) != len(self.input_shape or ()):
            return  # no fixed input shape to warm up with
        item = Prepared(torch.full(shape, 0.5), kind="image")
        try:
            for _ in range(2):
                self.explain([item], composite=DEFAULT_COMPOSITE)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {self.name!r} fails on an input of shape {(1, *shape)}: {one_line(exc)}") from None
        if self.classes is None:
            self.classes = _known_class_names(self)


def _known_class_names(served: ServedModel) -> Optional[list[str]]:
    """ImageNet's class names for a torchvision model with 1000 outputs (shipped with torchvision)."""
    if served.loaded.kind != "torchvision" or served.num_classes != 1000:
        return None
    try:
        import torchvision
        return list(torchvision.models.get_model_weights(served.loaded.spec).DEFAULT.meta["categories"])
    except Exception:
        return None


# --------------------------------------------------------------------------- inputs

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
    invert = served.pre.invert if options.invert is None else options.invert
    try:
        if options.preprocess == "digit":
            gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            return served.digit(1.0 - gray if invert else gray)
        return served.image(img, invert=invert)
    except InputError as exc:
        raise ServiceError(422, str(exc)) from None


def array_input(served: ServedModel, values: list, options: ExplainOptions) -> Prepared:
    """The model input from nested lists: one sample as the model reads it (``preprocess='model'``) or a
    drawing (``'digit'``)."""
    try:
        a = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError):
        raise ServiceError(422, "array must be nested lists of numbers of one rectangular shape") from None
    if a.size == 0:
        raise ServiceError(422, "array is empty")
    if not np.isfinite(a).all():
        raise ServiceError(422, "array holds values that are not finite (NaN or infinity)")
    try:
        if options.preprocess == "digit":
            if a.ndim == 3 and a.shape[0] == 1:
                a = a[0]
            if a.ndim != 2:
                raise ServiceError(422, f"with preprocess='digit' the array must be a drawing (H, W); got shape "
                                        f"{list(a.shape)}")
            if a.shape[0] > MAX_SIDE or a.shape[1] > MAX_SIDE:
                raise ServiceError(413, f"array of {a.shape[1]}x{a.shape[0]} is too large: at most {MAX_SIDE} a side")
            a = np.clip(a, 0.0, 1.0)
            invert = served.pre.invert if options.invert is None else options.invert
            return served.digit(1.0 - a if invert else a)
        samples = served.array(a, "array")
    except InputError as exc:
        raise ServiceError(422, str(exc)) from None
    if len(samples) != 1:
        raise ServiceError(422, f"array holds {len(samples)} samples; send one input per request")
    return samples[0]


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
    return response(served, explain_outcome(served, prepared, options), options, started)


def explain_outcome(served: ServedModel, prepared: Prepared, options: ExplainOptions) -> Outcome:
    """Explain one prepared input (the model runs under its lock: one explanation at a time per model)."""
    if options.composite not in COMPOSITES:
        raise ServiceError(422, f"unknown composite {options.composite!r}; choose one of {', '.join(COMPOSITES)}")
    try:
        target = served.target(options.target)
        data_range = (float(prepared.x.min()), float(prepared.x.max()))
        comp, _ = served.composite(options.composite, kind=prepared.kind, data_range=data_range)
        (outcome,) = served.explain([prepared], target, comp)
    except TargetError as exc:
        raise ServiceError(400, str(exc)) from None
    except (ModelError, LRPError) as exc:
        raise ServiceError(422, f"model {served.name!r} cannot be explained: {exc}") from None
    except Exception as exc:  # the model fails on this input: a shape the model does not take, most often
        raise ServiceError(422, f"model {served.name!r} failed on an input of shape {list(prepared.x.shape)}: "
                                f"{one_line(exc)}") from None
    if outcome.probabilities is None:
        raise ServiceError(422, f"model {served.name!r} gives no class scores for this input; the web app explains "
                                f"classifiers (output: batch x classes, or one sigmoid score)")
    return outcome


def response(served: ServedModel, outcome: Outcome, options: ExplainOptions, started: float, *,
             overlay: bool = True) -> ExplainResponse:
    """The answer for an explained input; ``overlay=False`` leaves the overlay out (the camera draws its own)."""
    prepared = outcome.prepared
    shown = pictures(outcome, "bwr")
    if not overlay:
        shown.pop("overlay", None)
    heat = shown.get("heatmap") or shown.get("bands")
    pred = outcome.predicted if outcome.predicted is not None else outcome.target
    frame = prepared.frame
    return ExplainResponse(
        model=served.name, composite=options.composite, prediction=pred, prediction_label=served.label(pred),
        probabilities=outcome.probabilities or [], target=outcome.target,
        target_label=served.label(outcome.target), score=outcome.score, relevance_sum=outcome.relevance_sum,
        input_shape=list(prepared.x.shape),
        heatmap=png_data_url(enlarge(heat)) if heat is not None else None,
        overlay=png_data_url(enlarge(shown["overlay"])) if "overlay" in shown else None,
        input_image=png_data_url(enlarge(prepared.picture)) if prepared.picture is not None else None,
        frame=Frame(x=frame[0], y=frame[1], width=frame[2], height=frame[3]) if frame else None,
        relevance=outcome.relevance.tolist() if options.raw else None,
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
