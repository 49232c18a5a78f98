"""Loading models and inputs for the command line: model specs, state dicts, images and arrays."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from .composites import Composite

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
ARRAY_SUFFIXES = {".npy", ".npz"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputError(ValueError):
    """An input file cannot be used (missing, unreadable, wrong shape); reported per file."""


class ModelError(ValueError):
    """The model spec or its weights cannot be loaded."""


# --------------------------------------------------------------------------- models

@dataclass
class LoadedModel:
    model: torch.nn.Module
    kind: str  # "mnist", "torchvision", "factory", "exported"
    channels: Optional[int]  # input channels the model expects, when known


def _read_state_dict(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"weights file {path} does not exist") from None
    except Exception as exc:
        raise ModelError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}. Give a state dict saved "
                         f"with torch.save(model.state_dict(), path)") from None
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

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ModelError(f"unknown model {name!r}: give 'mnist', a torchvision classification model name (e.g. "
                         f"vgg16, resnet50), 'module.path:factory', or an exported program file (.pt2)")
    model = torchvision.models.get_model(name, weights=None)
    if weights is None:
        return model
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


def _factory_model(spec: str, weights: Optional[str]) -> torch.nn.Module:
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name!r} for model spec {spec!r}: {exc}") from None
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


def _first_input_channels(model: torch.nn.Module) -> Optional[int]:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            return m.in_channels
    return None


def check_device(spec: str) -> str:
    """``spec`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...) if torch can run on that device here; else
    ``ModelError`` saying why and what to pass instead."""
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


def load_model(spec: str, weights: Optional[str] = None) -> LoadedModel:
    """``mnist``; a torchvision name (``--weights`` a state dict; a fine-tuned head of another size loads);
    ``module.path:factory``; or a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``)."""
    if spec == "mnist":
        from . import models
        model = models.mnist()
        if weights:
            _load_weights(model, _read_state_dict(weights), weights)
        return LoadedModel(model, "mnist", 1)
    path = Path(spec)
    if path.suffix in (".pt2", ".pt", ".pth", ".zip") or path.exists():
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
        return LoadedModel(program.module(), "exported", None)
    if ":" in spec:
        model = _factory_model(spec, weights)
        return LoadedModel(model.eval(), "factory", _first_input_channels(model))
    model = _torchvision_model(spec, weights)
    return LoadedModel(model.eval(), "torchvision", 3)


def _is_torchscript(path: Path) -> bool:
    try:
        torch.jit.load(str(path), map_location="cpu")
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- inputs

def expand_inputs(paths: Sequence[str]) -> list[Path]:
    """Files as given; folders recursively (images and arrays, sorted). Missing paths are kept (reported later)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES)
        else:
            files.append(p)
    return files


@dataclass
class Preprocess:
    """How an image becomes a model input."""

    size: Optional[int] = None  # resize the shorter side to this
    crop: Optional[int] = None  # then centre-crop a square of this size
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    grayscale: bool = False
    invert: bool = False

    def image(self, path: Path) -> tuple[torch.Tensor, Image.Image]:
        """(tensor (C, H, W) as the model sees it, the picture shown under the heatmap)."""
        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert("L" if self.grayscale else "RGB")
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{path}: not a readable image ({exc})") from None
        try:
            return self.from_image(img)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None

    def from_image(self, img: Image.Image) -> tuple[torch.Tensor, Image.Image]:
        """Like :meth:`image`, for a picture already opened."""
        img = img.convert("L" if self.grayscale else "RGB")
        if self.size:
            w, h = img.size
            scale = self.size / min(w, h)
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        if self.crop:
            w, h = img.size
            if self.crop > min(w, h):
                raise InputError(f"cannot crop {self.crop} pixels from an image of {w}x{h}")
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            img = img.crop((left, top, left + self.crop, top + self.crop))
        array = np.asarray(img, dtype=np.float32) / 255.0
        if self.invert:
            array = 1.0 - array
        x = torch.from_numpy(array.copy())
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return self.normalize(x), img

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, x.shape[0]):
                raise InputError(f"has {x.shape[0]} channels, but --{name} gives {len(values)} values"
                                 + ("; the model expects 3 channels (drop --grayscale)" if x.shape[0] == 1 else ""))
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=x.dtype).reshape(-1, 1, 1)
        if self.std is not None:
            x = x / torch.tensor(self.std, dtype=x.dtype).reshape(-1, 1, 1)
        return x


def preprocess_for(kind: str, *, size: Optional[int] = None, crop: Optional[int] = None,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                   grayscale: bool = False, invert: bool = False) -> Preprocess:
    """The preprocessing for a model of ``kind`` (see :class:`LoadedModel`): its defaults (MNIST: 28 pixels,
    grayscale; torchvision: resize 256, crop 224, ImageNet mean and std), overridden by the values given."""
    defaults = {"mnist": dict(size=28, grayscale=True),
                "torchvision": dict(size=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)}.get(kind, {})
    pre = Preprocess(**defaults)
    for key, value in (("size", size), ("crop", crop), ("mean", mean), ("std", std)):
        if value is not None:
            setattr(pre, key, value)
    pre.grayscale = pre.grayscale or grayscale
    pre.invert = invert
    return pre


def composite_for(name: str, pre: Preprocess, *, maxpool: str = "max", low: Optional[float] = None,
                  high: Optional[float] = None) -> "Composite":
    """The named composite; z^B bounds (``epsilon-gamma-box``, ``layered``) not given are the range of pixels in
    [0, 1] after ``pre``'s normalisation (per channel when it has several). Unknown names raise ``ValueError``."""
    from .composites import composite

    params = {}
    if name.lower().replace("_", "-") in ("epsilon-gamma-box", "layered"):
        if low is None or high is None:
            mean = torch.tensor(pre.mean or (0.0,))
            std = torch.tensor(pre.std or (1.0,))
            lo, hi = (0 - mean) / std, (1 - mean) / std
            low, high = (lo.item(), hi.item()) if lo.numel() == 1 else (lo, hi)
        params = {"low": low, "high": high}
    return composite(name, maxpool=maxpool, **params)


def read_classes(path: str) -> list[str]:
    """Class names, one a line (blank lines skipped); ``ModelError`` when the file cannot be read."""
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ModelError(f"cannot read class names from {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ModelError(f"cannot read class names from {path}: not UTF-8 text") from None


def read_array(path: Path) -> torch.Tensor:
    """A ``.npy`` array, or the only (or ``x``) array of a ``.npz``, as one sample (no batch dimension)."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable NumPy file ({exc})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        keys = list(data.keys())
        key = "x" if "x" in keys else keys[0] if len(keys) == 1 else None
        if key is None:
            raise InputError(f"{path}: holds arrays {keys}; name the input array 'x'")
        data = data[key]
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{path}: array of {data.dtype} is not numeric")
    return torch.from_numpy(np.asarray(data, dtype=np.float32).copy())


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
