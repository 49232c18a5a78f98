"""The output folder of a dataset run: one Zarr v3 array of relevance, a manifest, done markers and the CSVs.

Layout of ``OUT``::

    explanations.zarr/relevance   (rows, *input shape), float32 or float16, NaN rows for inputs that failed;
                                  chunked by rows (``chunk`` rows a chunk), Blosc-zstd compressed
    manifest.json                 the run's options; --resume refuses a run whose options differ
    progress/chunk-<k>.json       chunk k is done: its rows' targets, predictions, scores and errors
    index.csv, errors.csv         written at the end from the done markers (row, path, target, ...)

A chunk is done when its marker exists, never before: the chunk is written (Zarr's local store writes it to a
temporary file and renames it), flushed to disk, and only then is the marker written, again to a temporary file
that is flushed and renamed. A process killed at any point leaves either no marker (the chunk is redone) or a
chunk that is complete.
"""

from __future__ import annotations

import csv
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

ARRAY = "relevance"
GROUP = "explanations.zarr"
INDEX_FIELDS = ("row", "path", "status", "target", "prediction", "score")
ERROR_FIELDS = ("row", "path", "error")
# manifest key -> how a person names it, for --resume's refusal
CHECKED = {"model": "--model", "model_sha256": "the model file's contents", "weights_sha256": "--weights",
           "classes": "--classes", "composite": "--composite", "maxpool": "--maxpool", "low": "--low",
           "high": "--high", "target": "--target", "dtype": "--dtype",
           "preprocessing": "the preprocessing (--size, --crop, --mean, --std, --grayscale, --invert, --pixels)",
           "inputs": "the inputs (their paths and order)", "rows": "the number of inputs", "chunk": "--chunk"}


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file in the same folder, flushed, then renamed."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str) -> Optional[str]:
    """The SHA-256 of a file's contents, or None where ``path`` is not a file."""
    import hashlib
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def differences(stored: dict, current: dict) -> list[str]:
    """What differs between the manifest of a store and the one of this run, in words."""
    found = []
    for key, name in CHECKED.items():
        a, b = stored.get(key), current.get(key)
        if a == b:
            continue
        if key in ("inputs", "model_sha256", "weights_sha256"):
            found.append(f"{name} differ")
        elif isinstance(a, dict) and isinstance(b, dict):
            found.append(f"{name}: " + ", ".join(f"{k} {json.dumps(a.get(k))} in the store, {json.dumps(b.get(k))} "
                                                 f"now" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)))
        else:
            found.append(f"{name}: the store has {json.dumps(a)}, this run {json.dumps(b)}")
    return found


class Store:
    """The output folder ``out`` of a run (see the module's docstring)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.group = self.out / GROUP
        self.progress = self.out / "progress"
        self.manifest_path = self.out / "manifest.json"
        self._array: Any = None

    # ------------------------------------------------------------------ creating and checking
    def manifest(self) -> Optional[dict]:
        """The stored manifest, or None when ``out`` holds no finished store set-up."""
        try:
            manifest: dict = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            return manifest
        except FileNotFoundError:
            return None

    def create(self, manifest: dict) -> None:
        """A new, empty store for ``manifest`` (its ``rows``, ``shape``, ``chunk`` and ``dtype``); the manifest is
        written last, so a store without one was never finished and is made again."""
        import zarr
        from zarr.codecs import BloscCodec

        rows, shape, chunk = manifest["rows"], tuple(manifest["shape"]), manifest["chunk"]
        group = zarr.open_group(self.group, mode="w", attributes={"lrp": manifest})
        group.create_array(ARRAY, shape=(rows, *shape), chunks=(max(1, min(chunk, rows)), *shape),
                           dtype=manifest["dtype"], fill_value=np.nan,
                           compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
                           attributes={"rows": "one per input, in the order of index.csv",
                                       "failed": "inputs that failed are NaN (see errors.csv)"},
                           config={"write_empty_chunks": True}, overwrite=True)
        self.progress.mkdir(parents=True, exist_ok=True)
        for old in self.progress.glob("*.json"):
            old.unlink()
        write_atomic(self.manifest_path, json.dumps(manifest, indent=1).encode())

    def clean(self) -> int:
        """Remove what killed runs left half-written (temporary files); how many."""
        leftovers = [*self.group.rglob("*.partial"), *self.progress.glob(".*.tmp"), *self.out.glob(".*.tmp")]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    # ------------------------------------------------------------------ chunks
    def done(self) -> set[int]:
        """The chunks whose marker exists."""
        return {int(p.stem.split("-")[1]) for p in self.progress.glob("chunk-*.json")}

    def marker(self, k: int) -> Path:
        return self.progress / f"chunk-{k:08d}.json"

    def array(self) -> Any:
        """The relevance array, opened for writing."""
        if self._array is None:
            import zarr
            # a chunk of failed rows only is all NaN, the fill value: write it anyway, so that every chunk of a
            # finished store is a file (zarr 3.1 ignores open_array's config=, hence with_config)
            self._array = zarr.open_array(self.group / ARRAY, mode="r+").with_config({"write_empty_chunks": True})
        return self._array

    def write_chunk(self, k: int, start: int, data: np.ndarray) -> Optional[Path]:
        """Write the rows of chunk ``k`` (starting at row ``start``) and flush them to disk; the chunk's file (None
        where Zarr wrote none: all the rows are the fill value, NaN, which is what reading a missing chunk gives)."""
        array = self.array()
        array[start:start + len(data)] = data
        path = self.group / ARRAY / array.metadata.encode_chunk_key((k,) + (0,) * (array.ndim - 1))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if np.isnan(data).all():
                return None
            raise
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def mark_done(self, k: int, results: Sequence[Sequence[Any]], errors: Sequence[Sequence[Any]],
                  run: str) -> None:
        """Chunk ``k`` is done: its rows' (row, target, prediction, score) and (row, error)."""
        body = {"chunk": k, "run": run, "time": time.time(), "results": list(results), "errors": list(errors)}
        write_atomic(self.marker(k), json.dumps(body).encode())

    def markers(self) -> list[dict]:
        """Every done marker's contents, by chunk."""
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(self.progress.glob("chunk-*.json"))]

    # ------------------------------------------------------------------ the index
    def write_index(self, paths: Sequence[str]) -> tuple[int, int]:
        """``index.csv`` (a row per input) and ``errors.csv`` from the done markers; (explained, failed)."""
        status = ["missing"] * len(paths)
        values: dict[int, tuple] = {}
        errors: dict[int, str] = {}
        for m in self.markers():
            for row, target, prediction, score in m["results"]:
                values[row] = (target, prediction, score)
                status[row] = "ok"
            for row, message in m["errors"]:
                errors[row] = message
                status[row] = "failed"
        index_rows = []
        for row, path in enumerate(paths):
            target, prediction, score = values.get(row, ("", "", ""))
            index_rows.append([row, path, status[row], target, "" if prediction is None else prediction,
                               "" if score == "" else f"{score:.7g}"])
        self._csv("index.csv", INDEX_FIELDS, index_rows)
        self._csv("errors.csv", ERROR_FIELDS, [[row, paths[row], errors[row]] for row in sorted(errors)])
        return len(values), len(errors)

    def _csv(self, name: str, fields: Sequence[str], rows: list) -> None:
        import io
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(fields)
        writer.writerows(rows)
        write_atomic(self.out / name, text.getvalue().encode("utf-8"))
