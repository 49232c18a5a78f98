"""Keras 3 models, run on Keras' torch backend: ``.keras`` files, legacy Keras 2 HDF5 files (``.h5``, a whole model
such as a ``keras.applications`` VGG16 saved by TensorFlow), and ``keras:NAME`` (a ``keras.applications``
architecture, with ``--weights`` an HDF5 or ``.weights.h5`` file of its weights).

Keras models read images channels last, ``(N, H, W, C)``; the pipeline reads pictures channels first, so the model
is wrapped in :class:`ChannelsLast` (a transpose, which relevance passes through unchanged) and the heatmaps come
out as for any other model. Keras' own preprocessing conventions (``keras.applications.*.preprocess_input``)
become a :class:`~lrp.pipeline.inputs.Preprocess`, guessed from the model's name and overridable:

- ``caffe`` (VGG16/19, ResNet50/101/152): pixels 0..255, RGB -> BGR, the ImageNet mean subtracted per channel;
- ``tf`` (MobileNet, Xception, Inception, ResNetV2, NASNet): pixels scaled to [-1, 1];
- ``torch`` (DenseNet): pixels in [0, 1], ImageNet mean and standard deviation;
- ``raw`` (EfficientNet, ConvNeXt, MobileNetV3, RegNet: the preprocessing is inside the model): pixels 0..255.

The z^B bounds follow from these (``Preprocess.pixel_range``): for ``caffe``, ``-mean`` to ``255 - mean`` per
(BGR) channel.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ModelError
from .inputs import PIXEL_MODES, Preprocess

# model names (keras.applications) -> their preprocessing; the first matching prefix wins
_BY_NAME = (("resnet50v2", "tf"), ("resnet101v2", "tf"), ("resnet152v2", "tf"), ("vgg", "caffe"),
            ("resnet", "caffe"), ("mobilenetv3", "raw"), ("mobilenet", "tf"), ("xception", "tf"),
            ("inception", "tf"), ("nasnet", "tf"), ("densenet", "torch"), ("efficientnet", "raw"),
            ("convnext", "raw"), ("regnet", "raw"))
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
EXTRA = "pip install 'lrp[keras]'"


def import_keras() -> Any:
    """Keras on its torch backend: ``KERAS_BACKEND=torch`` is set when Keras is not imported yet; a Keras already
    imported with another backend is refused (the backend is fixed at import)."""
    keras: Any = sys.modules.get("keras")
    if keras is None:
        os.environ["KERAS_BACKEND"] = "torch"
        try:
            keras = importlib.import_module("keras")
        except ImportError:
            raise ModelError(f"loading a Keras model needs Keras 3: {EXTRA}") from None
    backend = keras.backend.backend()
    if backend != "torch":
        raise ModelError(f"Keras was imported with the {backend} backend, but lrp runs Keras models on the torch "
                         f"backend: set KERAS_BACKEND=torch before Keras is imported (or import lrp's loader first)")
    if not hasattr(keras, "saving"):
        raise ModelError(f"lrp needs Keras 3 (found Keras {getattr(keras, '__version__', '?')}): {EXTRA}")
    return keras


class ChannelsLast(torch.nn.Module):
    """A model that reads images ``(N, H, W, C)``, called with ``(N, C, H, W)``: the transpose only routes values, so
    relevance comes back channels first, as the pipeline shows it."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.movedim(1, -1))


def preprocessing(model: Any, mode: Optional[str] = None) -> tuple[Preprocess, str]:
    """The preprocessing for ``model`` (``mode``: caffe, tf, torch or raw; default: by its name) and the mode used
    (``"unknown"``: pixels in [0, 1], as for other models). The input size is the model's, when it is fixed."""
    if mode is None:
        name = str(getattr(model, "name", "")).lower()
        mode = next((m for prefix, m in _BY_NAME if name.startswith(prefix)), "unknown")
    base = PIXEL_MODES.get(mode, Preprocess())
    shape = input_shape(model)
    side = shape[1] if shape and shape[1] is not None and shape[1] == shape[2] else None
    grayscale = shape is not None and shape[0] == 1
    return Preprocess(size=side, crop=side, mean=base.mean, std=base.std, grayscale=grayscale, scale=base.scale,
                      bgr=base.bgr), mode


def input_shape(model: Any) -> Optional[tuple[Optional[int], ...]]:
    """One sample's shape channels first, ``(C, H, W)`` (None for sizes the model leaves open), for a Keras model
    with one image input; None otherwise."""
    layout = image_layout(model)
    return None if layout is None else layout[0]


def image_layout(model: Any) -> Optional[tuple[tuple[Optional[int], ...], bool]]:
    """``((C, H, W), channels_last)`` for a Keras model with one image input (4-D), laid out as its first layer
    with a ``data_format`` reads (Keras' default: channels last); None for other inputs."""
    shape = getattr(model, "input_shape", None)
    if not isinstance(shape, tuple) or len(shape) != 4 or isinstance(shape[0], (tuple, list)):
        return None
    first = next((layer for layer in model._flatten_layers(include_self=False, recursive=True)
                  if getattr(layer, "data_format", None) in ("channels_first", "channels_last")), None)
    if first is not None and first.data_format == "channels_first":
        return tuple(shape[1:]), False
    _, h, w, c = shape
    return (c, h, w), True


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"{path} is a folder; give a .keras or .h5 file (a TensorFlow SavedModel folder converts to "
                         f"ONNX with tf2onnx: see docs/onnx-keras.md)")


def load_keras(path: Path) -> Any:
    """A ``.keras`` file or a legacy HDF5 model file (``.h5``; either also under another name, told by its first
    bytes), in inference mode."""
    _check_file(path)
    with open(path, "rb") as f:
        hdf5 = f.read(8) == HDF5_SIGNATURE
    if path.suffix.lower() in (".h5", ".hdf5") and not hdf5:
        raise ModelError(f"{path} is not an HDF5 file; a .h5 model is a Keras model saved with "
                         f"model.save('model.h5')")
    if hdf5:
        _check_h5_model(path)
    keras = import_keras()
    suffix = ".h5" if hdf5 else ".keras"
    with tempfile.TemporaryDirectory() as folder:
        named = path
        if path.suffix.lower() != suffix and not (hdf5 and path.suffix.lower() == ".hdf5"):
            named = Path(folder) / f"model{suffix}"  # Keras tells the format by the name only
            named.symlink_to(path.resolve())
        try:
            model = keras.saving.load_model(str(named), compile=False)
        except Exception as exc:
            raise ModelError(f"cannot load {path} as a Keras model: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
    return model


def _check_h5_model(path: Path) -> None:
    """A weights-only HDF5 file (no model config) needs its architecture: say how to give it."""
    try:
        import h5py
    except ImportError:
        raise ModelError(f"loading a .h5 Keras model needs h5py: {EXTRA}") from None
    with h5py.File(path, "r") as f:
        if "model_config" not in f.attrs:
            raise ModelError(f"{path} holds weights only (no model config); give the architecture and the weights: "
                             f"--model keras:VGG16 --weights {path} (any keras.applications name), or save the whole "
                             f"model with model.save('model.keras')")


def keras_application(name: str, weights: Optional[str]) -> Any:
    """``keras.applications.<name>`` with random weights, or the weights in ``weights`` (an HDF5 file)."""
    keras = import_keras()
    factory = getattr(keras.applications, name, None)
    if factory is None or not callable(factory):
        known = sorted(n for n in dir(keras.applications) if n[:1].isupper())
        raise ModelError(f"keras.applications has no {name!r}; give one of {', '.join(known)}")
    model = factory(weights=None)
    if weights:
        _check_file(Path(weights))
        try:
            model.load_weights(weights)
        except Exception as exc:
            raise ModelError(f"weights in {weights} do not fit keras.applications.{name}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return model
