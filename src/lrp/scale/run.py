"""A dataset run: list the inputs, set up or check the store, explain this rank's chunks, write the index.

Rank 0 lists the inputs and creates (or, with ``resume``, checks) the store, then tells every rank the plan; each
rank reads its rows with a ``DataLoader`` (worker processes decode and preprocess while the model runs),
explains them a batch at a time with an :class:`lrp.Explainer` (what :func:`lrp.explain` gives; batches of one
shape are recorded once and replayed), and writes each chunk, once all its rows are in, from a
background thread. After a barrier rank 0 writes ``index.csv`` and ``errors.csv`` from the done markers.

Test hook: with ``LRP_SCALE_CRASH_AFTER=K`` in the environment a process that has committed K chunks writes half
of the next chunk's file and ends at once (``os._exit``), as a killed process would, before its marker.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import InputError, LRPError, ModelError, RuleError, TargetError, UnsupportedOperationError, one_line
from ..explain import Explainer
from .distributed import Ranks, share, start
from .sources import Batch, ChunkBatches, Collate, Items, RowDataset, expand, list_items
from .store import GROUP, Store, differences, file_sha256

CHUNK_BYTES = 8 << 20  # default chunk: about this many bytes of relevance (float32), a multiple of the batch
CHUNK_ROWS = 4096  # and no more rows than this
FATAL = (ModelError, TargetError, UnsupportedOperationError, RuleError, torch.cuda.OutOfMemoryError)


class StoreError(LRPError, ValueError):
    """The store cannot be used as asked (it exists, or it was made with other options)."""


@dataclass
class StoreOptions:
    """What ``lrp explain --store zarr`` was asked for (the model and preprocessing are the pipeline's)."""

    inputs: list[str]
    out: str
    lists: list[str] = field(default_factory=list)
    composite: str = "epsilon-plus-flat"
    target: Optional[str] = None
    maxpool: str = "max"
    low: Optional[float] = None
    high: Optional[float] = None
    weights: Optional[str] = None
    dtype: str = "float32"
    batch_size: int = 16
    chunk: Optional[int] = None
    workers: Optional[int] = None
    resume: bool = False
    png: bool = False
    cmap: str = "bwr"


@dataclass
class Plan:
    """What rank 0 tells every rank: the rows, the store's manifest, the chunks left to do."""

    items: Items
    manifest: dict
    todo: list[int]
    done_before: int
    notes: list[str]


def _cores() -> int:
    """The cores this rank's share of the machine has (those it may run on, split among the local ranks)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def default_workers() -> int:
    """DataLoader workers per rank: the cores this rank's share of the machine has, less one, 1 to 8."""
    return max(1, min(8, _cores() - 1))


def cpu_threads() -> Optional[int]:
    """Torch threads for a rank that explains on the CPU: its cores less the default number of DataLoader
    workers (at least 1), so that the model's threads and the workers do not ask for more cores than there are;
    None (torch's own setting is kept) when ``OMP_NUM_THREADS`` says how many (torchrun sets it to 1 for each
    rank). It does not follow ``--workers``: the thread count changes the last bits of the relevance, and a
    ``--resume`` with other ``--workers`` must give the same numbers.

    More threads than free cores is costly far beyond their share: torch's OpenMP threads meet at a barrier
    after every operation, and one that waits for a core (taken by a worker decoding, or by other work on the
    machine) holds up the others, so a small model's many short operations each wait for a time slice. On a
    2-core machine with one core busy, ``lrp.explain`` of the MNIST model ran at 200 items/s with 2 threads and
    at 2,100 with 1."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, _cores() - default_workers())


def default_chunk(batch: int, shape: tuple[int, ...], rows: int, world: int) -> int:
    """Rows per chunk: a multiple of ``batch`` near :data:`CHUNK_BYTES` of float32 relevance, and small enough
    that each of ``world`` ranks gets 4 chunks or more (so that they finish together)."""
    row_bytes = 4 * math.prod(shape)
    batches = min(CHUNK_BYTES // max(1, batch * row_bytes), CHUNK_ROWS // batch, rows // (4 * world * batch))
    return batch * max(1, batches)


def explain_to_store(pipeline: Any, options: StoreOptions) -> int:
    """Run ``lrp explain --store zarr`` in this process (one rank of a torchrun job, or the only one): 0 when
    every input was explained, 1 when some failed (listed in ``errors.csv``)."""
    try:
        import zarr  # noqa: F401
    except ImportError:
        raise StoreError("--store zarr needs the zarr package: pip install 'lrp[scale]'") from None
    ranks = start(pipeline.device)
    try:
        if ranks.main:
            try:
                plan: Any = _plan(pipeline, options, ranks.world)
            except Exception as exc:
                ranks.broadcast(one_line(exc))
                raise
        plan = ranks.broadcast(plan if ranks.main else None)
        if isinstance(plan, str):
            raise StoreError(f"rank 0 stopped: {plan}")
        for note in plan.notes if ranks.main else ():
            print(f"note: {note}", file=sys.stderr)
        # start-up like loading the model, so not in the run's items/s: autograd imports sympy on the first
        # backward (about 1 s once per process), and the explainer's first recording imports torch._dynamo (its
        # fake tensors: about 2 s)
        import torch._dynamo  # noqa: F401
        import torch.fx.experimental.symbolic_shapes  # noqa: F401
        began = time.perf_counter()
        _explain_chunks(pipeline, options, plan, share(plan.todo, ranks), ranks)
        ranks.barrier()
        seconds = time.perf_counter() - began
        return _finish(options, plan, seconds) if ranks.main else 0
    finally:
        ranks.close()


def _manifest(pipeline: Any, options: StoreOptions, items: Items) -> dict:
    target = pipeline.target(options.target)
    spec = pipeline.loaded.spec or pipeline.name
    manifest = {
        "format": "lrp-scale 1", "model": spec, "model_sha256": file_sha256(spec.split(":")[0]),
        "weights": options.weights, "weights_sha256": file_sha256(options.weights) if options.weights else None,
        "classes": pipeline.classes, "composite": options.composite, "maxpool": options.maxpool,
        "low": options.low, "high": options.high, "target": "pred" if target is None else target,
        "dtype": options.dtype, "preprocessing": dataclasses.asdict(pipeline.pre), "inputs": items.digest(),
        "rows": len(items), "chunk": options.chunk,
    }
    normalised: dict = json.loads(json.dumps(manifest))  # tuples as lists, as read back
    return normalised


def _plan(pipeline: Any, options: StoreOptions, world: int) -> Plan:
    """Rank 0: list the inputs, create the store or check it for ``resume``, and find the chunks left."""
    store, notes = Store(Path(options.out)), []
    blocker = next((p for p in (store.out, *store.out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise StoreError(f"--out {options.out}: {blocker} is a file; give a folder")
    files = expand(options.inputs, options.lists)
    if not files:
        raise InputError("no input files found (images such as .png and .jpg, .npy/.npz arrays, .tar shards)")
    items = list_items(files, pipeline._fit)
    if items.skipped:
        notes.append(f"{items.skipped} shard samples hold no image (png, jpg, ...) and are left out")
    if not len(items):
        raise InputError("the inputs hold no samples")
    manifest = _manifest(pipeline, options, items)
    stored = store.manifest()
    if stored is not None and not options.resume:
        raise StoreError(f"{options.out} holds a store already ({store.manifest_path.name}); give --resume to "
                         f"finish it, or another --out")
    if stored is not None:
        manifest["chunk"] = options.chunk or stored.get("chunk")
        manifest["shape"] = stored.get("shape")
        found = differences(stored, manifest)
        if found:
            raise StoreError(f"cannot --resume {options.out}: it was made with other options: {'; '.join(found)}. "
                             f"Resume with the options it was made with, or write to another --out")
        if store.clean():
            notes.append("removed files that a killed run left half-written")
        done = store.done()
    else:
        if options.resume:
            notes.append(f"nothing to resume in {options.out}: starting")
        if options.chunk is not None and options.chunk % options.batch_size:
            raise StoreError(f"--chunk ({options.chunk}) must be a multiple of --batch-size "
                             f"({options.batch_size})")
        shape = _first_shape(pipeline, items)
        manifest["shape"] = list(shape)
        manifest["chunk"] = options.chunk or default_chunk(options.batch_size, shape, len(items), world)
        try:
            store.create(manifest)
        except OSError as exc:
            raise StoreError(f"--out {options.out}: cannot write the store ({one_line(exc)})") from None
        done = set()
    chunks = -(-len(items) // manifest["chunk"])
    todo = [k for k in range(chunks) if k not in done]
    return Plan(items, manifest, todo, chunks - len(todo), notes)


def _first_shape(pipeline: Any, items: Items, tries: int = 64) -> tuple[int, ...]:
    """The shape of the store's rows: that of the first input that can be read, as the model reads it."""
    from ..pipeline import Prepared

    dataset = RowDataset(items, pipeline.pre)
    first_error = None
    for row in range(min(tries, len(items))):
        record = dataset[row]
        if record.x is not None:
            if record.kind == "image":  # wrong channels for the model: the same for every input, so stop
                pipeline._check_channels(Prepared(record.x, source=items.paths[row]), "the preprocessed image")
            return tuple(record.x.shape)
        first_error = first_error or record.error
    raise InputError(f"none of the first {min(tries, len(items))} inputs can be read: {first_error}")


def _explain_chunks(pipeline: Any, options: StoreOptions, plan: Plan, mine: list[int], ranks: Ranks) -> None:
    """Explain the rows of chunks ``mine`` and commit each chunk to the store (on the CPU with
    :func:`cpu_threads` torch threads, restored afterwards)."""
    target = plan.manifest["target"] if plan.manifest["target"] != "pred" else None
    kinds = {"array" if k == "array" else "image" for k in plan.items.kinds}
    explainers = {}
    for kind in sorted(kinds):
        comp, note = pipeline.composite(options.composite, kind=kind, maxpool=options.maxpool, low=options.low,
                                        high=options.high)
        explainers[kind] = Explainer(pipeline.model, comp)  # batches of one shape: recorded once, then replayed
        if note and ranks.main:
            print(f"note: {options.composite}: {note}", file=sys.stderr)
    workers = default_workers() if options.workers is None else options.workers
    cuda = pipeline.device.type == "cuda"
    threads = cpu_threads() if pipeline.device.type == "cpu" else None
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        _explain_batches(pipeline, options, plan, mine, ranks, explainers, target, workers, cuda)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _explain_batches(pipeline: Any, options: StoreOptions, plan: Plan, mine: list[int], ranks: Ranks,
                     explainers: dict, target: Optional[int], workers: int, cuda: bool) -> None:
    """The loop of :func:`_explain_chunks`: read, explain and write this rank's batches."""
    from tqdm import tqdm

    manifest, items = plan.manifest, plan.items
    shape, chunk, rows = tuple(manifest["shape"]), manifest["chunk"], len(items)
    loader = torch.utils.data.DataLoader(
        RowDataset(items, pipeline.pre, pictures=options.png), batch_sampler=ChunkBatches(mine, chunk, rows,
                                                                                          options.batch_size),
        num_workers=workers, collate_fn=Collate(shape), pin_memory=cuda, prefetch_factor=4 if workers else None)
    writer = ChunkWriter(Store(Path(options.out)), chunk, rows, shape, options.dtype)
    todo = set(plan.todo)
    done_rows = sum(min(chunk, rows - k * chunk) for k in range(-(-rows // chunk)) if k not in todo)
    with tqdm(total=rows, initial=done_rows, desc="explaining", unit="input", file=sys.stderr, smoothing=0.1,
              disable=None if ranks.main else True) as bar:
        for batch in loader:
            for kind, (group, x) in batch.groups.items():
                _explain_group(pipeline, group, x, target, explainers[kind], writer, batch, options)
            writer.add(batch.rows, batch.errors)
            bar.update(min(len(batch.rows) * ranks.world, bar.total - bar.n))
    writer.close()


def _explain_group(pipeline: Any, group: list[int], x: torch.Tensor, target: Optional[int], explainer: Explainer,
                   writer: "ChunkWriter", batch: Batch, options: StoreOptions) -> None:
    """Explain one stacked group of a batch; its rows go to the writer (or, when the model fails on them, to
    the batch's errors)."""
    try:
        res = explainer(x.to(pipeline.device, non_blocking=True), target=target)
    except FATAL:
        raise
    except Exception as exc:  # a model/input mismatch: these rows fail, the run goes on
        batch.errors += [(row, f"the model failed on this input: {one_line(exc)}") for row in group]
        return
    if pipeline.num_classes is None:
        pipeline.learn_classes(res.num_classes)
    n = len(group)
    relevance = res.relevance.detach().cpu()
    targets = res.target.tolist() if res.target is not None else [0] * n
    predicted = res.predicted.tolist() if res.predicted is not None else [None] * n
    scores = res.start.detach().reshape(n, -1).sum(1).cpu().tolist()
    failed = _unstorable(relevance.numpy(), scores, writer.dtype)
    if failed:  # these rows fail (NaN in the store, listed in errors.csv), the others are written
        batch.errors += [(group[i], message) for i, message in failed.items()]
        keep = [i for i in range(n) if i not in failed]
        if not keep:
            return
        group, x, relevance = [group[i] for i in keep], x[keep], relevance[keep]
        targets, predicted, scores = ([v[i] for i in keep] for v in (targets, predicted, scores))
    writer.put(group, relevance.numpy(), list(zip(group, targets, predicted, scores)))
    if options.png:
        _pictures(pipeline, group, x, relevance, targets, predicted, scores, batch, options)


def _unstorable(relevance: np.ndarray, scores: list, dtype: np.dtype) -> dict[int, str]:
    """The rows (by position) whose relevance or score is not finite, or whose relevance ``dtype`` (float16)
    cannot hold, and why."""
    flat = relevance.reshape(len(relevance), -1)
    finite = np.isfinite(flat).all(1)
    found = {}
    for i in np.flatnonzero(~finite | ~np.isfinite(scores)):
        found[int(i)] = f"{'relevance' if not finite[i] else 'the score'} not finite (the model overflowed)"
    top = float(np.finfo(dtype).max)
    if top < float(np.finfo(flat.dtype).max) and flat.size:  # a narrower store (float16) would hold infinity
        peak = np.abs(np.where(finite[:, None], flat, 0)).max(1)
        hint = ": use --dtype float32" if dtype == np.float16 else ""
        for i in np.flatnonzero(peak > top):
            found.setdefault(int(i), f"relevance exceeds {dtype}'s range ({top:g}){hint}")
    return dict(sorted(found.items()))


def _pictures(pipeline: Any, group: list[int], x: torch.Tensor, relevance: torch.Tensor, targets: list,
              predicted: list, scores: list, batch: Batch, options: StoreOptions) -> None:
    """``--png``: the heatmap (and overlay) of each row as ``png/<row>_<kind>.png``."""
    from ..pipeline import Outcome, Prepared
    from ..pipeline.outputs import pictures

    folder = Path(options.out) / "png"
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(group):
        outcome = Outcome(Prepared(x[i], batch.pictures.get(row)), relevance[i], targets[i], scores[i],
                          predicted[i], None, None)
        for kind, image in pictures(outcome, options.cmap).items():
            image.save(folder / f"{row:08d}_{kind}.png")


class ChunkWriter:
    """Gathers rows into their chunk and commits each full chunk from a background thread (one at a time, so
    that at most two chunks are held in memory)."""

    def __init__(self, store: Store, chunk: int, rows: int, shape: tuple[int, ...], dtype: str) -> None:
        self.store, self.chunk, self.rows, self.shape, self.dtype = store, chunk, rows, shape, np.dtype(dtype)
        self.run = uuid.uuid4().hex[:12]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lrp-store")
        self.pending: Optional[Future] = None
        self.k = -1
        self.commits = 0
        crash = os.environ.get("LRP_SCALE_CRASH_AFTER")
        self.crash_after = int(crash) if crash else None

    def _start(self, k: int) -> None:
        self.k, self.start = k, k * self.chunk
        self.buffer = np.full((min(self.chunk, self.rows - self.start), *self.shape), np.nan, dtype=self.dtype)
        self.results: list = []
        self.errors: list = []
        self.seen = 0

    def put(self, group: list[int], relevance: np.ndarray, results: list) -> None:
        """Explained rows: their relevance and (row, target, prediction, score)."""
        self._chunk_of(group[0])
        self.buffer[np.asarray(group) - self.start] = relevance
        self.results += results

    def add(self, rows: list[int], errors: list[tuple[int, str]]) -> None:
        """A batch is through: its failed rows; the chunk is committed once all its rows are in."""
        self._chunk_of(rows[0])
        self.errors += errors
        self.seen += len(rows)
        if self.seen == len(self.buffer):
            self._wait()
            self.pending = self.pool.submit(self._commit, self.k, self.start, self.buffer, self.results, self.errors)
            self.k = -1

    def _chunk_of(self, row: int) -> None:
        if self.k != row // self.chunk:
            if self.k != -1:
                raise RuntimeError(f"chunk {self.k} left unfinished")  # batches never cross a chunk
            self._start(row // self.chunk)

    def _commit(self, k: int, start: int, data: np.ndarray, results: list, errors: list) -> None:
        path = self.store.write_chunk(k, start, data)
        if self.crash_after is not None and self.commits >= self.crash_after:  # test hook: die mid-commit
            if path is not None:
                os.truncate(path, os.path.getsize(path) // 2)
            os._exit(137)
        self.store.mark_done(k, results, sorted(errors), self.run)
        self.commits += 1

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        self._wait()
        self.pool.shutdown()
        if self.k != -1:
            raise RuntimeError(f"chunk {self.k} left unfinished")


def _finish(options: StoreOptions, plan: Plan, seconds: float) -> int:
    """Rank 0, after every rank is through: the index and errors CSVs and a summary line."""
    store = Store(Path(options.out))
    missing = -(-len(plan.items) // plan.manifest["chunk"]) - len(store.done())
    if missing:
        raise StoreError(f"{missing} chunks have no done marker; run again with --resume")
    explained, failed = store.write_index(plan.items.paths)
    chunk = plan.manifest["chunk"]
    ran = sum(min(chunk, len(plan.items) - k * chunk) for k in plan.todo)
    rate = ran / seconds if seconds > 0 else 0.0
    print(f"explained {explained} of {len(plan.items)} inputs into {options.out}/ ({GROUP}/relevance, index.csv)"
          + (f"; {failed} failed (see errors.csv)" if failed else "")
          + f"; this run: {ran} inputs in {seconds:.2f} s ({rate:.1f} inputs/s), {len(plan.todo)} chunks "
            f"written, {plan.done_before} were done already")
    return 1 if failed else 0
