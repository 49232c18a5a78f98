"""The inputs of a dataset run, one row each, and a torch ``Dataset`` that decodes and preprocesses them.

Inputs are image files and folders of them, ``.npy``/``.npz`` arrays (one row per sample), text files listing
paths (``--list``), and WebDataset ``.tar`` shards. Shards are indexed with :mod:`tarfile` (each member's offset
and size), not streamed with the ``webdataset`` library: a row then is a seek and a read, so any row can be
read in any process, which sharding by chunk and resuming need. The sample convention is WebDataset's: a
member's key is its path up to the first dot of its file name, and a sample's image is the member whose
extension (everything after that dot) is an image suffix such as ``png`` or ``jpg``.

Workers never raise: an input that cannot be read becomes an error :class:`Record`. So does an array file that
cannot be read or whose shape the model does not read: listing makes it one row, which fails with the reason.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, one_line
from ..pipeline.inputs import ARRAY_SUFFIXES, IMAGE_SUFFIXES, Preprocess

SHARD_SUFFIXES = frozenset({".tar"})
COMPRESSED_SHARDS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
IMAGE_EXTENSIONS = frozenset(s[1:] for s in IMAGE_SUFFIXES)
MAX_OPEN = 8  # shards and arrays a worker keeps open (the least recently read is closed first)


@dataclass
class Items:
    """Every row of a run: which file it comes from (``file_of``), where in it (``part``: a sample index in an
    array, a byte offset in a shard; ``size``: the member's bytes in a shard), and its ``path`` in the index."""

    files: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # per file: "image", "array" or "tar"
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)  # array file -> shape as (samples, *sample)
    broken: dict[int, str] = field(default_factory=dict)  # array file -> why it cannot be read (its one row fails)
    file_of: list[int] = field(default_factory=list)
    part: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    skipped: int = 0  # shard samples without an image

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, file: int, part: int, size: int, path: str) -> None:
        self.file_of.append(file)
        self.part.append(part)
        self.size.append(size)
        self.paths.append(path)

    def kind(self, row: int) -> str:
        return self.kinds[self.file_of[row]]

    def digest(self) -> str:
        """A hash of the rows' paths in order: the same inputs give the same digest."""
        h = hashlib.sha256()
        for path in self.paths:
            h.update(path.encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()


def expand(paths: Sequence[str], lists: Sequence[str] = ()) -> list[Path]:
    """Files as given, folders searched recursively (images, arrays and ``.tar`` shards, sorted), and the paths
    in each list file (one a line; relative ones are relative to the list's folder)."""
    found: list[Path] = []
    wanted = IMAGE_SUFFIXES | ARRAY_SUFFIXES | SHARD_SUFFIXES
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in wanted and f.is_file())
        else:
            found.append(p)
    for name in lists:
        try:
            lines = Path(name).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InputError(f"--list {name}: cannot read it ({exc.strerror})") from None
        base = Path(name).parent
        found += [base / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return found


def list_items(files: Sequence[Path], fit: Any) -> Items:
    """The rows of ``files``. ``fit(tensor, name)`` fits an array's shape to the model as
    :meth:`lrp.pipeline.Pipeline._fit` does; it sees a zero-stride view of the array's shape, so no sample is read."""
    items = Items()
    for path in files:
        name = str(path)
        if name.lower().endswith(COMPRESSED_SHARDS):
            raise InputError(f"{name}: compressed shards cannot be read row by row; give uncompressed .tar shards")
        index = len(items.files)
        suffix = path.suffix.lower()
        kind = "array" if suffix in ARRAY_SUFFIXES else "tar" if suffix in SHARD_SUFFIXES else "image"
        items.files.append(name)
        items.kinds.append(kind)
        if kind == "image":
            items.add(index, 0, -1, name)
        elif kind == "tar":
            _list_shard(items, index, path)
        else:
            try:
                fitted = tuple(fit(torch.zeros(()).expand(*_array_shape(path)), name).shape)
            except InputError as exc:  # unreadable, or a shape the model does not read: one row that fails
                items.broken[index] = one_line(exc)
                items.add(index, 0, -1, name)
                continue
            items.shapes[index] = fitted
            many = fitted[0] > 1
            for j in range(fitted[0]):
                items.add(index, j, -1, f"{name}[{j}]" if many else name)
    return items


def _npz_key(path: Path, keys: Sequence[str]) -> str:
    """The input array of a ``.npz``: its only one, or the one named ``x``."""
    if "x" in keys or len(keys) == 1:
        return "x" if "x" in keys else keys[0]
    raise InputError(f"{path}: holds arrays {list(keys)}; name the input array 'x'")


def _header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype in the header of the ``.npy`` data that file object ``f`` is at the start of."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:  # 3.0 differs from 2.0 only in allowing non-ASCII field names, so in structured arrays (refused)
        raise ValueError(f".npy format {version[0]}.{version[1]} holds a structured array")
    return tuple(shape), dtype


def _array_shape(path: Path) -> tuple[int, ...]:
    """An array file's shape, from the header of its array (the only or the ``x`` array of a ``.npz``); no
    sample is read, so none is checked here (each row is, when it is read)."""
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                shape, dtype = _header(f)
        else:
            with zipfile.ZipFile(path) as z:
                names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
                with z.open(_npz_key(path, names) + ".npy") as f:
                    shape, dtype = _header(f)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable NumPy file ({one_line(exc)})") from None
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"{path}: array of {dtype} is not real numbers")
    if not all(shape):
        raise InputError(f"{path}: the array is empty")
    return shape


def _list_shard(items: Items, index: int, path: Path) -> None:
    """A row per sample of a WebDataset shard: the sample's first member with an image extension."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar if m.isfile()]
    except (OSError, tarfile.TarError) as exc:
        raise InputError(f"{path}: not a readable .tar shard ({exc})") from None
    keys: dict[str, Optional[tarfile.TarInfo]] = {}
    for m in members:
        folder, _, base = m.name.rpartition("/")
        stem, dot, ext = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        keys.setdefault(key, None)
        if dot and ext.lower() in IMAGE_EXTENSIONS and keys[key] is None:
            keys[key] = m
    for image in keys.values():
        if image is None:
            items.skipped += 1
        else:
            items.add(index, image.offset_data, image.size, f"{path}[{image.name}]")


@dataclass
class Record:
    """One row as a worker read it: the model input, or why it could not be read."""

    row: int
    x: Optional[torch.Tensor]
    kind: str  # "image" or "array": which composite explains it
    error: Optional[str] = None
    picture: Optional[Image.Image] = None


class RowDataset(torch.utils.data.Dataset):
    """Rows of :class:`Items` through the pipeline's :class:`~lrp.pipeline.Preprocess` (images) or as stored
    (arrays). ``__getitem__`` never raises."""

    def __init__(self, items: Items, pre: Preprocess, pictures: bool = False) -> None:
        self.items, self.pre, self.pictures = items, pre, pictures
        self._open: OrderedDict[int, Any] = OrderedDict()  # per process: open shards and arrays, oldest first

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int) -> Record:
        kind = self.items.kind(row)
        try:
            if kind == "array" and self.items.file_of[row] in self.items.broken:
                raise InputError(self.items.broken[self.items.file_of[row]])
            if kind == "array":
                return Record(row, self._sample(row), "array")
            if kind == "tar":
                img = self._member(row)
                x, picture = self.pre.from_image(img)
            else:
                x, picture = self.pre.image(Path(self.items.files[self.items.file_of[row]]))
            return Record(row, x, "image", picture=picture if self.pictures else None)
        except Exception as exc:  # an input that cannot be used: recorded, the run goes on
            message = one_line(exc)
            path = self.items.paths[row]
            return Record(row, None, "array" if kind == "array" else "image",
                          message if path in message else f"{path}: {message}")

    def _opened(self, file: int) -> Any:
        """File ``file``'s open shard or array, if it is open (it becomes the most recently read)."""
        handle = self._open.get(file)
        if handle is not None:
            self._open.move_to_end(file)
        return handle

    def _keep(self, file: int, handle: Any) -> Any:
        """Keep ``handle`` open for file ``file``, closing the least recently read beyond :data:`MAX_OPEN` (a
        memory-mapped array closes its file when dropped)."""
        self._open[file] = handle
        while len(self._open) > MAX_OPEN:
            _, old = self._open.popitem(last=False)
            if hasattr(old, "close"):
                old.close()
        return handle

    def _member(self, row: int) -> Image.Image:
        file = self.items.file_of[row]
        handle = self._opened(file)
        if handle is None:
            handle = self._keep(file, open(self.items.files[file], "rb"))
        handle.seek(self.items.part[row])
        data = handle.read(self.items.size[row])
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                return opened.copy()
        except Exception as exc:
            raise InputError(f"not a readable image ({one_line(exc)})") from None

    def _sample(self, row: int) -> torch.Tensor:
        file = self.items.file_of[row]
        values = self._opened(file)
        if values is None:
            path = Path(self.items.files[file])
            if path.suffix.lower() == ".npy":
                raw = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                with np.load(path, allow_pickle=False) as npz:
                    raw = npz[_npz_key(path, list(npz.keys()))]
            if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_) or \
                    np.issubdtype(raw.dtype, np.complexfloating):
                raise InputError(f"array of {raw.dtype} is not real numbers")
            values = self._keep(file, raw.reshape(self.items.shapes[file]))
        sample = np.array(values[self.items.part[row]], dtype=np.float32)
        if not np.isfinite(sample).all():
            raise InputError("the sample holds values that are not finite (NaN or infinity)")
        return torch.from_numpy(sample)

    def __getstate__(self) -> dict:  # open files stay in their process
        return {**self.__dict__, "_open": OrderedDict()}


@dataclass
class Batch:
    """Rows read together: the inputs that can be explained, stacked per kind, and the rows that failed."""

    rows: list[int]
    groups: dict[str, tuple[list[int], torch.Tensor]]
    errors: list[tuple[int, str]]
    pictures: dict[int, Image.Image]

    def pin_memory(self) -> "Batch":
        self.groups = {k: (rows, x.pin_memory()) for k, (rows, x) in self.groups.items()}
        return self


class Collate:
    """Stacks the records of one batch; an input of another shape than the store's becomes an error."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)

    def __call__(self, records: list[Record]) -> Batch:
        errors: list[tuple[int, str]] = []
        found: dict[str, list[Record]] = {}
        for r in records:
            if r.error is not None or r.x is None:
                errors.append((r.row, r.error or "not read"))
            elif tuple(r.x.shape) != self.shape:
                errors.append((r.row, f"has shape {tuple(r.x.shape)} after the preprocessing, the store holds "
                                      f"{self.shape} (resize with --size/--crop)"))
            else:
                found.setdefault(r.kind, []).append(r)
        groups = {k: ([r.row for r in rs], torch.stack([r.x for r in rs if r.x is not None]))
                  for k, rs in found.items()}
        pictures = {r.row: r.picture for r in records if r.picture is not None}
        return Batch([r.row for r in records], groups, errors, pictures)


class ChunkBatches(torch.utils.data.Sampler):
    """Batches of row indices that never cross a chunk: the rows of ``chunks`` in order, ``batch`` at a time."""

    def __init__(self, chunks: Sequence[int], chunk: int, rows: int, batch: int) -> None:
        self.chunks, self.chunk, self.rows, self.batch = list(chunks), chunk, rows, batch

    def __iter__(self) -> Iterator[list[int]]:
        for k in self.chunks:
            stop = min((k + 1) * self.chunk, self.rows)
            for start in range(k * self.chunk, stop, self.batch):
                yield list(range(start, min(start + self.batch, stop)))

    def __len__(self) -> int:
        return sum(-(-(min((k + 1) * self.chunk, self.rows) - k * self.chunk) // self.batch) for k in self.chunks)
