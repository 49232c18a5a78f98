"""Model specs: ``mnist``, a torchvision name, ``module.path:factory``, ``path/to/file.py:factory`` or a
``torch.export`` program (``.pt2``); state dicts, class-name files and devices."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ModelError, one_line

MODEL_SPECS = ("'mnist' (built-in), a torchvision model name (e.g. vgg16, resnet50; with --weights), "
               "'module.path:factory' or 'path/to/file.py:factory', a torch.export program file (.pt2), a Keras "
               "model (.keras, .h5; 'keras:VGG16' with --weights for a keras.applications architecture), or an "
               "ONNX file (.onnx)")
ZIP_SIGNATURE = b"PK\x03\x04"


@dataclass
class LoadedModel:
    """A model in eval mode with what its spec tells about it: for Keras and ONNX models also the preprocessing
    they expect (``pre``) and one sample's shape, channels first (``shape``; None where a size is open)."""

    model: torch.nn.Module
    kind: str  # "mnist", "torchvision", "factory", "exported", "keras", "onnx"
    spec: str = ""
    pre: Optional[Any] = None  # a Preprocess
    shape: Optional[tuple[Optional[int], ...]] = None


def _read_state_dict(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"weights file {path} does not exist") from None
    except Exception as exc:
        raise ModelError(f"cannot read weights from {path}: {one_line(exc)} Give a state dict saved with "
                         f"torch.save(model.state_dict(), path)") from None  # torch's message: several lines
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def _load_weights(model: torch.nn.Module, state: dict, path: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3])
        unexpected = ", ".join(result.unexpected_keys[:3])
        raise ModelError(f"weights in {path} do not fit the architecture: missing {missing or 'none'}; "
                         f"unexpected {unexpected or 'none'}")


def _torchvision_model(name: str, weights: Optional[str]) -> torch.nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"unknown model {name!r}: give {MODEL_SPECS}")
    if weights is None:  # nothing is downloaded: random weights, the same on every run (seed 0, global RNG untouched)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return torchvision.models.get_model(name, weights=None)
    model = torchvision.models.get_model(name, weights=None)
    state = _read_state_dict(weights)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        # a fine-tuned head: rebuild with as many classes as the state dict's last layer has
        last = [k for k in own if own[k].ndim == 2][-1]
        if set(mismatched) <= {last, last[:-len("weight")] + "bias"}:
            model = torchvision.models.get_model(name, weights=None, num_classes=state[last].shape[0])
        else:
            shapes = ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:3])
            raise ModelError(f"weights in {weights} do not fit {name}: {shapes}")
    _load_weights(model, state, weights)
    return model


def _import_factory_module(module_name: str, spec: str):
    """The module of a factory spec: a file path (``dir/file.py``) or a dotted module importable from the
    current folder or ``PYTHONPATH``."""
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = Path(module_name)
        if path.suffix != ".py":
            path = path.with_suffix(".py")
        if not path.is_file():
            raise ModelError(f"model spec {spec!r}: no Python file {path}")
        name = f"lrp_user_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:  # pragma: no cover - a .py file always has one
            raise ModelError(f"model spec {spec!r}: cannot load {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        folder = str(path.resolve().parent)
        added = folder not in sys.path
        if added:  # the file may import its neighbours
            sys.path.insert(0, folder)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ModelError(f"model spec {spec!r}: running {path} failed: {type(exc).__name__}: {exc}") from None
        finally:
            if added:
                sys.path.remove(folder)
        return module
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name!r} for model spec {spec!r} ({exc}). Python looks in the "
                         f"current folder and PYTHONPATH: run lrp from the folder that holds "
                         f"{module_name.split('.')[0]}.py, add that folder to PYTHONPATH, or give the file's path: "
                         f"--model path/to/{module_name.replace('.', '/')}.py:{spec.rsplit(':', 1)[1]}") from None


def _factory_model(spec: str, weights: Optional[str]) -> torch.nn.Module:
    module_name, attr = spec.rsplit(":", 1)
    module = _import_factory_module(module_name, spec)
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"{module_name!r} has no attribute {attr!r} (model spec {spec!r})")
    model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights:
        _load_weights(model, _read_state_dict(weights), weights)
    return model


def _is_torchscript(path: Path) -> bool:
    try:
        torch.jit.load(str(path), map_location="cpu")
        return True
    except Exception:
        return False


def _exported(path: Path, spec: str) -> torch.nn.Module:
    if not path.exists():
        raise ModelError(f"model file {spec} does not exist")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        hint = ""
        if _is_torchscript(path):
            hint = (" It is a TorchScript archive: TorchScript runs its ops where lrp cannot see them; save "
                    "the model with torch.export.save(torch.export.export(model, (x,)), 'model.pt2') "
                    "or pass 'module.path:factory' with --weights")
        raise ModelError(f"cannot load {spec} as an exported program ({type(exc).__name__}).{hint}") from None
    return program.module()


def load_model(spec: str, weights: Optional[str] = None) -> LoadedModel:
    """Load a model spec (see ``MODEL_SPECS``); ``weights`` is a state dict (for a torchvision model a
    fine-tuned head of another size loads). Raises :class:`~lrp.errors.ModelError` naming the way out."""
    if spec == "mnist":
        from .. import models
        model = models.mnist()
        if weights:
            _load_weights(model, _read_state_dict(weights), weights)
        return LoadedModel(model, "mnist", spec)
    path = Path(spec)
    if spec.startswith("keras:") and not path.exists():
        from .keras_model import keras_application
        return _keras(keras_application(spec[len("keras:"):], weights), spec)
    if ":" in spec and not path.exists():
        return LoadedModel(_factory_model(spec, weights).eval(), "factory", spec)
    file_kind = _file_kind(path)
    if file_kind is not None and weights and not spec.startswith("keras:"):
        raise ModelError(f"--weights goes with torchvision names, factories and keras:NAME; {spec} holds its "
                         f"weights already")
    if file_kind == "keras":
        from .keras_model import load_keras
        return _keras(load_keras(path), spec)
    if file_kind == "onnx":
        from .onnx_model import load_onnx, onnx_input_shape
        module = load_onnx(path)
        shape = onnx_input_shape(path)
        sample = tuple(shape[1:]) if len(shape) > 1 else None
        if _channels_last(shape):  # exported from TensorFlow/Keras: (N, H, W, C)
            from .keras_model import ChannelsLast
            module, sample = ChannelsLast(module).eval(), (shape[3], shape[1], shape[2])
        return LoadedModel(module, "onnx", spec, pre=_fixed_size(sample), shape=sample)
    if file_kind == "torch" or path.suffix in (".pt2", ".pt", ".pth", ".zip"):
        return LoadedModel(_exported(path, spec), "exported", spec)
    if path.exists():
        raise ModelError(f"{spec} is not a model file lrp reads: expected a torch.export program (.pt2), a Keras "
                         f"model (.keras, or .h5: HDF5) or an ONNX model (.onnx)")
    return LoadedModel(_torchvision_model(spec, weights).eval(), "torchvision", spec)


def _file_kind(path: Path) -> Optional[str]:
    """What a model file holds, from its name and first bytes: "keras" (a .keras zip or an HDF5 file), "onnx",
    "torch" (a zip archive: torch.export or torch.save), or None (no such file, or unknown)."""
    suffix = path.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        return "keras"
    if suffix == ".onnx":
        return "onnx"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(8)
    from .keras_model import HDF5_SIGNATURE
    if head == HDF5_SIGNATURE:
        return "keras"
    if head.startswith(ZIP_SIGNATURE):
        import zipfile
        try:
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
        except zipfile.BadZipFile:
            return None
        return "keras" if "config.json" in names else "torch"
    return None


def _fixed_size(sample: Optional[tuple]) -> Optional[Any]:
    """Pictures resized and cropped to a square image input of fixed size (C, H, H); None otherwise."""
    from .inputs import Preprocess
    if sample is None or len(sample) != 3 or sample[1] is None or sample[1] != sample[2]:
        return None
    return Preprocess(size=sample[1], crop=sample[1], grayscale=sample[0] == 1)


def _channels_last(shape: Optional[tuple]) -> bool:
    """An image input laid out (N, H, W, C): 1, 3 or 4 channels last, and not first."""
    return (shape is not None and len(shape) == 4 and shape[3] in (1, 3, 4)
            and shape[1] not in (1, 3, 4))


def _keras(model: Any, spec: str) -> LoadedModel:
    from .keras_model import ChannelsLast, image_layout, preprocessing
    pre, _ = preprocessing(model)
    layout = image_layout(model)
    wrapped = ChannelsLast(model) if layout is not None and layout[1] else model
    return LoadedModel(wrapped.eval(), "keras", spec, pre=pre, shape=None if layout is None else layout[0])


def check_device(spec: str) -> str:
    """``spec`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...) if torch can run on that device here; else
    :class:`~lrp.errors.ModelError` saying why and what to pass instead."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ModelError(f"unknown device {spec!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {spec!r}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ModelError(f"device {spec!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {spec!r}: MPS is not available on this machine; use --device cpu")
    return spec


def read_classes(path: str) -> list[str]:
    """Class names, one a line (blank lines skipped); :class:`~lrp.errors.ModelError` when unreadable."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ModelError(f"cannot read class names from {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ModelError(f"cannot read class names from {path}: not UTF-8 text") from None
    if not names:
        raise ModelError(f"{path} holds no class names (one name per line)")
    return names
