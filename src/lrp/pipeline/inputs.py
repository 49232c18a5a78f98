"""Inputs as the model reads them: image files and pictures (resize, crop, normalise), drawn digits (MNIST's
centring), NumPy arrays (one sample or a batch), ground-truth masks, and folders of them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGIT_SHAPE = (1, 28, 28)
DIGIT_BOX = 20  # MNIST: the digit's bounding box fits 20x20, its centre of mass sits at the centre of 28x28


def expand_inputs(paths: Sequence[Union[str, Path]]) -> list[Path]:
    """Files as given; folders recursively (images and arrays, sorted). Missing paths are kept (reported later)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES)
        else:
            files.append(p)
    return files


def is_array_file(path: Path) -> bool:
    return path.suffix.lower() in ARRAY_SUFFIXES


# --------------------------------------------------------------------------- images

@dataclass
class Preprocess:
    """How a picture becomes a model input: resize the shorter side to ``size``, centre-crop a ``crop`` square,
    scale pixels to [0, ``scale``] (1 unless a model wants 0..255), invert, reverse the channels to BGR (``bgr``:
    Caffe's order, as Keras' VGG16 reads), subtract ``mean`` and divide by ``std`` per channel."""

    size: Optional[int] = None
    crop: Optional[int] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    grayscale: bool = False
    invert: bool = False
    scale: float = 1.0
    bgr: bool = False

    def describe(self) -> str:
        parts = ["grayscale" if self.grayscale else "BGR" if self.bgr else "RGB"]
        if self.size:
            parts.append(f"shorter side resized to {self.size}")
        if self.crop:
            parts.append(f"centre crop {self.crop}x{self.crop}")
        parts.append(f"pixels in [0, {self.scale:g}]" + (", inverted" if self.invert else ""))
        if self.mean is not None or self.std is not None:
            parts.append(f"normalised with mean {_fmt(self.mean)} and std {_fmt(self.std)}")
        return ", ".join(parts)

    def image(self, path: Path) -> tuple[torch.Tensor, Image.Image]:
        """(tensor (C, H, W) as the model sees it, the picture shown under the heatmap)."""
        return self.from_file(open_image(path), path)

    def from_file(self, img: Image.Image, path: Path) -> tuple[torch.Tensor, Image.Image]:
        """Like :meth:`from_image`, for a picture read from ``path`` (named in errors)."""
        try:
            return self.from_image(img)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None

    def from_image(self, img: Image.Image) -> tuple[torch.Tensor, Image.Image]:
        """Like :meth:`image`, for a picture already opened."""
        img = img.convert("L" if self.grayscale else "RGB")
        if self.size:
            img = img.resize(self._resized(*img.size), Image.Resampling.BILINEAR)
        if self.crop:
            w, h = img.size
            box = self._centre_crop(w, h)
            if box is None:
                raise InputError(f"cannot crop {self.crop} pixels from an image of {w}x{h} (give --crop 0 to keep "
                                 f"the whole image, or a smaller --crop)")
            img = img.crop(box)
        array = np.asarray(img, dtype=np.float32) / 255.0
        if self.invert:
            array = 1.0 - array
        if self.scale != 1.0:
            array = array * np.float32(self.scale)
        x = torch.from_numpy(array.copy())
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        if self.bgr and x.shape[0] == 3:
            x = x.flip(0)
        return self.normalize(x), img

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The part of a ``width`` x ``height`` picture that the model sees after :meth:`from_image`'s resize and
        centre crop, as (left, top, right, bottom) in the picture's own pixels (fractions where the resize scales
        it): the whole picture where nothing is cropped, or where the crop does not fit (:meth:`from_image` refuses
        such a picture)."""
        resized_width, resized_height = self._resized(width, height)
        box = self._centre_crop(resized_width, resized_height)
        if box is None:
            return 0.0, 0.0, float(width), float(height)
        sx, sy = width / resized_width, height / resized_height
        return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        """The size of a picture after the resize: its shorter side to ``size`` (unchanged without one)."""
        if not self.size:
            return width, height
        scale = self.size / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def _centre_crop(self, width: int, height: int) -> Optional[tuple[int, int, int, int]]:
        """The centre ``crop`` square of a (resized) picture, in its pixels; None without a crop or where it does
        not fit."""
        if not self.crop or self.crop > min(width, height):
            return None
        left, top = (width - self.crop) // 2, (height - self.crop) // 2
        return left, top, left + self.crop, top + self.crop

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

    def pixel_range(self) -> tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]]:
        """The lowest and highest input values: pixels 0 and ``scale`` after normalisation (per channel if it has
        several channels)."""
        mean = torch.tensor(self.mean or (0.0,))
        std = torch.tensor(self.std or (1.0,))
        lo, hi = (0 - mean) / std, (self.scale - mean) / std
        return (lo.item(), hi.item()) if lo.numel() == 1 else (lo, hi)


def open_image(path: Path) -> Image.Image:
    """The picture in ``path``, decoded; ``InputError`` when it is missing or not a readable image."""
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


def _fmt(values: Optional[Sequence[float]]) -> str:
    return "none" if values is None else "(" + ", ".join(f"{v:g}" for v in values) + ")"


# default preprocessing of each kind of model spec: what `lrp explain --help` and the README show
DEFAULT_PREPROCESSING = {
    "mnist": Preprocess(size=28, grayscale=True),
    "torchvision": Preprocess(size=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "factory": Preprocess(),
    "exported": Preprocess(),
    "keras": Preprocess(),  # by the model's name: lrp.pipeline.keras_model.preprocessing
    "onnx": Preprocess(),
}


CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications.imagenet_utils, mode "caffe"
# the pixel conventions of Keras' preprocess_input (its ``mode``), and raw 0..255 for models that rescale themselves
PIXEL_MODES = {
    "caffe": Preprocess(scale=255.0, bgr=True, mean=CAFFE_MEAN_BGR),  # BGR 0..255 minus the ImageNet mean
    "tf": Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),  # [-1, 1]
    "torch": Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD),  # [0, 1], ImageNet mean and std
    "raw": Preprocess(scale=255.0),  # 0..255
}


def preprocess_for(kind: str, *, size: Optional[int] = None, crop: Optional[int] = None,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                   grayscale: bool = False, invert: bool = False, default: Optional[Preprocess] = None,
                   pixels: Optional[str] = None) -> Preprocess:
    """The default preprocessing of a model of ``kind`` (``DEFAULT_PREPROCESSING``; ``default``: the model's own,
    as for Keras models), with the pixel convention ``pixels`` (a key of :data:`PIXEL_MODES`) if given, overridden
    by the values given; ``size=0`` / ``crop=0`` switch resizing / cropping off."""
    base = default if default is not None else DEFAULT_PREPROCESSING.get(kind, Preprocess())
    if pixels is not None:
        if pixels not in PIXEL_MODES:
            raise InputError(f"unknown pixel convention {pixels!r}; choose one of {', '.join(PIXEL_MODES)}")
        mode = PIXEL_MODES[pixels]
        base = Preprocess(base.size, base.crop, mode.mean, mode.std, base.grayscale, False, mode.scale, mode.bgr)
    pre = Preprocess(base.size, base.crop, base.mean, base.std, base.grayscale or grayscale, invert, base.scale,
                     base.bgr)
    for key, value in (("size", size), ("crop", crop), ("mean", mean), ("std", std)):
        if value is not None:
            setattr(pre, key, value or None)
    return pre


# --------------------------------------------------------------------------- drawn digits

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


# --------------------------------------------------------------------------- arrays

def read_array(path: Path) -> np.ndarray:
    """A ``.npy`` array, or the only (or ``x``) array of a ``.npz``, as float32 (not yet fitted to a model)."""
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
    real = np.issubdtype(data.dtype, np.number) and not np.issubdtype(data.dtype, np.complexfloating)
    if not (real or data.dtype == np.bool_):
        raise InputError(f"{path}: array of {data.dtype} is not real numbers")
    if data.size == 0:
        raise InputError(f"{path}: the array is empty")
    array = np.asarray(data, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{path}: the array holds values that are not finite (NaN or infinity)")
    return array


def read_mask(path: Path, folder: Union[str, Path], pre: Preprocess, spatial: tuple) -> torch.Tensor:
    """The ground-truth mask for input ``path``: ``folder/<same name>.*``, an image (pixels brighter than half,
    after the same resizing and cropping as the input) or an array (nonzero); shaped ``spatial``."""
    found = sorted(p for p in Path(folder).glob(path.stem + ".*")
                   if p.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES)
    if not found:
        raise InputError(f"{path}: no mask {path.stem}.<png|npy|...> in {folder}")
    if is_array_file(found[0]):
        mask = torch.from_numpy(read_array(found[0]) != 0)
        mask = mask[0] if mask.ndim == len(spatial) + 1 and mask.shape[0] == 1 else mask
    else:
        mask = Preprocess(size=pre.size, crop=pre.crop, grayscale=True).image(found[0])[0][0] > 0.5
    if tuple(mask.shape) != tuple(spatial):
        raise InputError(f"{found[0]}: the mask has shape {tuple(mask.shape)}, the input {tuple(spatial)}")
    return mask
