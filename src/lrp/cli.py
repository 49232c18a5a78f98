"""The ``lrp`` command line: ``lrp demo``, ``lrp serve``, ``lrp explain`` and ``lrp evaluate``."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

RANDOMISE = ("epsilon-plus-flat", "epsilon-gamma-box", "gradient")  # put through the randomisation check
IMAGE_REMOVALS = ("blur", "uniform", "zero", "mean")  # what removed pixels become
TEXT_REMOVALS = ("mask", "delete")  # how removed tokens go
BENCHMARKS = ("shapes-vqa",)  # lrp evaluate --benchmark: known-answer benchmarks with their own model and data


def _text_methods() -> list[str]:
    from .evaluate.tokens import DEFAULT_TEXT_METHODS
    return list(DEFAULT_TEXT_METHODS)


class CommandError(Exception):
    """A problem that ends the command with one line on stderr and exit status 2."""


def _demo(args: argparse.Namespace) -> int:
    from . import demo_report
    demo_report.run(args.out)
    return 0


class _ServeOption(argparse.Action):
    """``lrp serve``: each --model starts a model; --weights, --classes and the preprocessing options apply to
    the --model they follow (given before any --model: to the first)."""

    def __call__(self, parser, namespace, values, option_string=None):
        groups = list(getattr(namespace, "served", None) or [])
        if self.dest == "model" and (not groups or "model" in groups[-1]):
            groups.append({})
        elif not groups:
            groups.append({})
        if self.dest in groups[-1]:
            parser.error(f"{option_string} given twice for one --model")
        groups[-1][self.dest] = self.const if self.nargs == 0 else values
        namespace.served = groups


def _at_least(least: int):
    """argparse type of a count option: an int of at least ``least`` (argparse names the option and exits 2)."""
    def parse(text: str) -> int:
        value = int(text)  # not an int: argparse says "invalid int value"
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


# the colour maps of lrp.visualize.COLORMAPS (not imported here: it would slow every command's start)
CMAPS = ("bwr", "seismic", "coldnhot", "gray", "wred")


def _device(spec: str) -> str:
    """argparse type of --device: the device if torch can use it here, else a message naming the way out."""
    from .errors import ModelError
    from .pipeline import check_device
    try:
        return check_device(spec)
    except ModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    from .web import missing_dependencies
    missing = missing_dependencies()
    if missing:
        raise CommandError(f"lrp serve needs {', '.join(missing)}: pip install 'lrp[web]'")
    from .web.server import serve
    # no --model: mnist, spam and vqa (preprocessing options alone apply to mnist)
    serve(args.served or [], host=args.host, port=args.port, threads=args.threads, device=args.device)
    return 0


def _pipeline(args: argparse.Namespace):
    """The pipeline for --model, --weights, --classes, the preprocessing options and --device."""
    from .pipeline import Pipeline
    low, high = getattr(args, "low", None), getattr(args, "high", None)
    if low is not None and high is not None and not low < high:
        raise CommandError(f"--low {low} --high {high}: the lowest input value must be below the highest")
    pipeline = Pipeline.load(args.model, args.weights, getattr(args, "classes", None), device=args.device,
                             size=args.size, crop=args.crop, mean=args.mean, std=args.std, grayscale=args.grayscale,
                             invert=args.invert, pixels=getattr(args, "pixels", None))
    if pipeline.loaded.kind == "torchvision" and not args.weights:
        _note(f"--model {args.model} has random weights (lrp downloads none), so its heatmaps explain an untrained "
              f"network; give --weights FILE (a state dict, e.g. saved from torchvision's pretrained model)")
    return pipeline


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _unique_stem(source: str, used: set) -> str:
    base = Path(source.split("[")[0]).stem + (f"_{source.rsplit('[', 1)[1].rstrip(']')}" if "[" in source else "")
    stem, k = base, 1
    while stem in used:
        k += 1
        stem = f"{base}_{k}"
    used.add(stem)
    return stem


def _read_inputs(pipeline, files: list, fail) -> list:
    """``(order, prepared input)`` for each sample of each file (an array file may hold a batch), in input
    order; a file that cannot be used goes to ``fail(path, exc, order)``."""
    from .pipeline import InputError, is_array_file

    prepared = []
    for k, path in enumerate(files):
        try:
            items = pipeline.array(path) if is_array_file(path) else [pipeline.image(path)]
        except InputError as exc:
            fail(str(path), exc, (k, 0))
            continue
        prepared += [((k, j), item) for j, item in enumerate(items)]
    notes = [item.note for _, item in prepared if item.note]
    if notes:
        _note(notes[0] + (f" (and {len(notes) - 1} more inputs)" if len(notes) > 1 else ""))
    return prepared


def _composites(args: argparse.Namespace, pipeline, name: str, prepared: list) -> dict:
    """The composite for each kind of input (images, arrays), with z^B bounds as :meth:`Pipeline.composite` finds
    them; where they came from is printed."""
    arrays = [item.x for item in prepared if item.kind == "array"]
    data_range = (min(float(x.min()) for x in arrays), max(float(x.max()) for x in arrays)) if arrays else None
    chosen = {}
    for kind in sorted({item.kind for item in prepared}):
        comp, note = pipeline.composite(name, kind=kind, maxpool=args.maxpool, low=args.low, high=args.high,
                                        data_range=data_range)
        if note:
            _note(f"{name}: {note}")
        chosen[kind] = comp
    return chosen


# options of lrp explain that apply to images and arrays only: (flag, the value that means "not given")
IMAGE_OPTIONS = (("--weights", None), ("--size", None), ("--crop", None), ("--mean", None), ("--std", None),
                 ("--pixels", None), ("--grayscale", False), ("--invert", False), ("--low", None), ("--high", None),
                 ("--maxpool", "max"))
PIXEL_CHOICES = ["caffe", "tf", "torch", "raw"]  # lrp.pipeline.inputs.PIXEL_MODES


def _explain_text(args: argparse.Namespace) -> int:
    """``lrp explain --model spam|hf:DIR`` with files, folders, ``--text`` or ``--text-file``: an HTML token
    heatmap and a CSV per text, and ``summary.csv``."""
    from tqdm import tqdm

    from .errors import InputError, RuleError, UnsupportedOperationError, one_line
    from .pipeline.text import (TextPipeline, expand_text_inputs, failed_row, is_text_spec, read_text_file,
                                read_texts, summary_row, text_composite, write, write_summary)

    if not is_text_spec(args.model):
        raise CommandError(f"--text and --text-file need a text model: --model spam (the built-in spam classifier) "
                           f"or --model hf:DIR (a local Hugging Face checkpoint folder with its tokenizer), not "
                           f"{args.model!r}")
    for flag, unset in IMAGE_OPTIONS:
        if getattr(args, flag[2:].replace("-", "_")) != unset:
            raise CommandError(f"{flag} applies to images and arrays, not to text (--model {args.model})")
    if not args.text and not args.text_file and not args.inputs:
        raise CommandError(f"give the texts to explain: lrp explain FILE_OR_FOLDER --model {args.model} (.txt and "
                           f".eml files: one text each), --text \"...\" (repeat for several) or --text-file FILE "
                           f"(one text per line)")
    from .visualize import COLORMAPS
    if args.cmap not in COLORMAPS:
        raise CommandError(f"unknown colour map {args.cmap!r}; choose one of {', '.join(COLORMAPS)}")
    # (source, text, stem) to explain, or (source, "", reason) for a file that cannot be read
    texts: list = [(source, text, stem, None, None) for source, text, stem in read_texts(args.text, args.text_file)]
    files = expand_text_inputs(args.inputs)
    if args.inputs and not files:
        raise CommandError(f"no .txt or .eml files in {', '.join(args.inputs)}")
    for path in files:
        read = read_text_file(path)
        texts.append((read.source, read.text, path.stem, read.error, False if read.parsed else None))
    comp = text_composite(args.composite)
    pipeline = TextPipeline.load(args.model, device=args.device, classes=args.classes)
    target = pipeline.target(args.target if args.target is not None else pipeline.default_target)
    merge = args.merge_words if args.merge_words is not None else pipeline.merge_words
    out = Path(args.out)
    rows: list = []
    used: set = {"summary"}  # summary.csv is the summary's
    explained = 0
    many = len(texts) > 3
    with tqdm(total=len(texts), desc="explaining", unit="text", disable=None if many else True,
              file=sys.stderr) as bar:
        for source, text, stem, error, mail in texts:
            try:
                if error is not None:
                    raise InputError(f"{source}: {error}")
                encoded = pipeline.encode(text, mail=mail)
                # a text of LONG_INPUT tokens or more gets a bar of its own, layer by layer
                outcome = pipeline.explain(encoded, target, comp, source=source, position=1 if many else 0)
            except (UnsupportedOperationError, RuleError) as exc:  # the model, not this text: the same for all
                raise CommandError(one_line(exc)) from None
            except Exception as exc:  # a text the model cannot read (empty, too long): report it, go on
                message = one_line(exc)
                print(f"error: {message if isinstance(exc, InputError) else source + ': ' + message}",
                      file=sys.stderr)
                rows.append(failed_row(source, text, message))
                bar.update(1)
                continue
            out.mkdir(parents=True, exist_ok=True)
            name = stem
            k = 1
            while name in used:
                k += 1
                name = f"{stem}_{k}"
            used.add(name)
            write(outcome, out, name, merge=merge, cmap=args.cmap)
            rows.append(summary_row(outcome, name))
            explained += 1
            bar.update(1)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out / "summary.csv", rows)
    failures = len(rows) - explained
    print(f"explained {explained} of {len(rows)} texts into {out}/ (<name>.html, <name>.csv); summary.csv lists "
          f"each text" + (f"; {failures} failed (see errors above)" if failures else ""))
    return 1 if failures else 0


# options of lrp explain that apply to --store zarr only: (flag, the value that means "not given")
STORE_OPTIONS: tuple[tuple[str, object], ...] = (("--list", []), ("--png", False), ("--dtype", "float32"),
                                                 ("--resume", False), ("--workers", None), ("--chunk", None))


def _explain_store(args: argparse.Namespace) -> int:
    """``lrp explain --store zarr``: every input's relevance as a row of one Zarr array (:mod:`lrp.scale`)."""
    from .pipeline.text import is_text_spec

    if is_text_spec(args.model) or args.text or args.text_file or args.merge_words is not None:
        raise CommandError("--store zarr holds the relevance of images and arrays; text models write files per "
                           "text (drop --store zarr)")
    if not args.inputs and not args.list:
        raise CommandError("give the inputs to explain: folders, image files, .npy/.npz arrays, .tar shards "
                           "(WebDataset) or --list FILE")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--chunk", args.chunk, 1),
                               ("--workers", args.workers, 0)):
        if value is not None and value < least:
            raise CommandError(f"{flag} must be at least {least}")
    from .scale import StoreError, StoreOptions, explain_to_store, rank_device

    args.device = rank_device(args.device)  # under torchrun: cuda -> cuda:LOCAL_RANK
    args.composite = args.composite or "epsilon-plus-flat"
    options = StoreOptions(args.inputs, args.out, args.list, args.composite, args.target, args.maxpool, args.low,
                           args.high, args.weights, args.dtype, args.batch_size, args.chunk, args.workers,
                           args.resume, args.png, args.cmap)
    try:
        return explain_to_store(_pipeline(args), options)
    except StoreError as exc:
        raise CommandError(str(exc)) from None


def _explain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .errors import InputError, ModelError, TargetError, one_line
    from .pipeline import expand_inputs
    from .pipeline.outputs import failed_row, summary_row, write, write_summary
    from .pipeline.text import is_text_spec

    if args.store == "zarr":
        return _explain_store(args)
    for flag, unset in STORE_OPTIONS:
        if getattr(args, flag[2:]) != unset:
            raise CommandError(f"{flag} applies to --store zarr (a dataset run into one Zarr store)")
    if is_text_spec(args.model) or args.text or args.text_file:
        return _explain_text(args)
    if args.merge_words is not None:
        raise CommandError("--merge-words applies to text (--model spam or hf:DIR)")
    if not args.inputs:
        raise CommandError("give the inputs to explain: image files, folders or .npy/.npz arrays (or, for a text "
                           "model, --model hf:DIR --text \"...\")")
    args.composite = args.composite or "epsilon-plus-flat"
    pipeline = _pipeline(args)
    try:
        target = pipeline.target(args.target)
    except TargetError as exc:
        raise CommandError(str(exc)) from None
    files = expand_inputs(args.inputs)
    if not files:
        raise CommandError("no input files found (images such as .png and .jpg, or .npy/.npz arrays)")
    rows: list = []  # (order, row)

    def fail(source: str, exc: BaseException, order: tuple) -> None:
        print(f"error: {one_line(exc) if source in str(exc) else source + ': ' + one_line(exc)}", file=sys.stderr)
        rows.append((order, failed_row(source, one_line(exc))))

    ordered = _read_inputs(pipeline, files, fail)
    order = {id(item): key for key, item in ordered}
    prepared = [item for _, item in ordered]
    comps = _composites(args, pipeline, args.composite, prepared) if prepared else {}
    out = Path(args.out)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CommandError(f"--out {out}: {blocker} is a file; give a folder")
    groups: dict = {}
    for item in prepared:
        groups.setdefault((item.kind, tuple(item.x.shape)), []).append(item)
    used: set = set()
    written_kinds: set = set()
    explained = 0
    with tqdm(total=len(prepared), desc="explaining", unit="input", disable=None, file=sys.stderr) as bar:
        for (kind, _), items in groups.items():
            for start in range(0, len(items), args.batch_size):
                batch = items[start:start + args.batch_size]
                try:
                    outcomes = pipeline.explain(batch, target, comps[kind])
                except (ModelError, TargetError) as exc:  # the same for every input: stop, write nothing more
                    raise CommandError(str(exc)) from None
                except Exception as exc:  # a model/input mismatch: report these inputs, go on
                    for item in batch:
                        fail(item.source, exc, order[id(item)])
                    bar.update(len(batch))
                    continue
                for outcome in outcomes:
                    if not (math.isfinite(outcome.score) and bool(outcome.relevance.isfinite().all())):
                        fail(outcome.prepared.source, InputError("relevance not finite (the model overflowed)"),
                             order[id(outcome.prepared)])
                        continue
                    stem = _unique_stem(outcome.prepared.source, used)
                    with _writing(out):
                        for name in write(outcome, out, stem, args.cmap):
                            written_kinds.add(name[len(stem) + 1:])
                    rows.append((order[id(outcome.prepared)], summary_row(outcome, pipeline, stem)))
                    explained += 1
                bar.update(len(batch))
    with _writing(out):
        write_summary(out / "summary.csv", [row for _, row in sorted(rows, key=lambda r: r[0])])
    failures = sum(1 for _, row in rows if row["status"] != "ok")
    kinds = ", ".join(f"<name>_{kind}" for kind in sorted(written_kinds))
    print(f"explained {explained} of {explained + failures} inputs into {out}/ ({kinds or 'nothing'}); "
          f"summary.csv lists each input" + (f"; {failures} failed (see errors above)" if failures else ""))
    return 1 if failures else 0


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """Create ``out`` and write into it; a file that cannot be written is one error line, not a traceback."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:
        raise CommandError(f"cannot write into --out {out}: {exc.strerror or exc} ({exc.filename or out})") from None


def _evaluation_inputs(args: argparse.Namespace, pipeline):
    """(inputs, masks or None, a description, input kind): held-out digits for the built-in model (strokes as
    masks), else the files given (one shape), with their masks from --masks."""
    import torch

    from .pipeline import InputError, expand_inputs, read_mask

    if not args.inputs:
        if pipeline.loaded.kind != "mnist":
            raise CommandError("give the inputs to evaluate on (images, folders or .npy arrays); only --model mnist "
                               "has built-in data")
        if args.masks:
            raise CommandError("--masks goes with input files; the built-in digits use their strokes as masks")
        from .models import mnist_digits
        x, _ = mnist_digits("test", limit=args.limit)
        return x, x[:, 0] > 0.5, "held-out MNIST digits (never seen in training)", "image"
    tensors, masks, kinds = [], [], set()

    def skip(source: str, exc: BaseException, order: tuple = ()) -> None:
        print(f"error: {exc} (skipped)", file=sys.stderr)

    files = expand_inputs(args.inputs)[:args.limit]  # a file holds one sample or more: read no more than needed
    for _, item in _read_inputs(pipeline, files, skip)[:args.limit]:
        try:
            if args.masks:
                path = Path(item.source.split("[")[0])
                masks.append(read_mask(path, args.masks, pipeline.pre,
                                       item.x.shape[1:] if item.x.ndim >= 2 else item.x.shape))
            tensors.append(item.x)
            kinds.add(item.kind)
        except InputError as exc:
            skip(item.source, exc)
    if not tensors:
        raise CommandError("none of the inputs could be read")
    shapes = sorted({tuple(t.shape) for t in tensors})
    if len(shapes) > 1:
        raise CommandError(f"the inputs have different shapes {shapes[:3]}; evaluation needs one shape (use --size "
                           f"and --crop for images)")
    return (torch.stack(tensors), torch.stack(masks) if masks else None,
            f"{len(tensors)} inputs from {', '.join(args.inputs)}", "array" if "array" in kinds else "image")


def _evaluate(args: argparse.Namespace) -> int:
    import functools

    from . import baselines
    from .evaluate import report
    from .evaluate.features import Regions
    from .pipeline import composite_names
    from .pipeline.text import SPAM_SPEC, is_hf_spec

    if args.benchmark:
        return _evaluate_benchmark(args)
    args.model = args.model or "mnist"
    if args.model == SPAM_SPEC:
        return _evaluate_spam(args)
    if is_hf_spec(args.model):
        raise CommandError("lrp evaluate works on images, arrays and the built-in spam model (--model spam); "
                           "explain a text model (hf:DIR) with lrp explain --model hf:DIR --text \"...\"")
    text_removals = [r for r in args.replace or [] if r in TEXT_REMOVALS]
    if text_removals:
        raise CommandError(f"--replace {text_removals[0]} removes tokens (--model spam); images and arrays take "
                           f"{', '.join(IMAGE_REMOVALS)}")
    from .evaluate.methods import EVALUATE_COMPOSITES
    args.methods = args.methods or [*EVALUATE_COMPOSITES, *baselines.METHODS]
    args.randomise = list(RANDOMISE) if args.randomise is None else args.randomise
    args.limit = 300 if args.limit is None else args.limit
    args.steps = 50 if args.steps is None else args.steps
    args.replace = args.replace or ["blur"]
    args.batch_size = 256 if args.batch_size is None else args.batch_size
    pipeline = _pipeline(args)
    x, masks, source, kind = _evaluation_inputs(args, pipeline)
    data_range = (float(x.min()), float(x.max()))
    x = x.to(args.device)
    methods: dict = {}
    for name in args.methods:
        if name == "occlusion":  # the largest patch of 8, 4, 2, 1 that tiles the input
            size = next(p for p in (8, 4, 2, 1) if all(s % p == 0 for s in Regions(x, 1).spatial))
            methods[f"occlusion-{size}"] = functools.partial(baselines.occlusion, patch=size)
        elif name in baselines.METHODS:
            methods[name] = name
        elif name in composite_names():
            methods[name], note = pipeline.composite(name, kind=kind, maxpool=args.maxpool, low=args.low,
                                                     high=args.high, data_range=data_range)
            if note:
                _note(f"{name}: {note}")
        else:
            raise CommandError(f"unknown method {name!r}; give composites ({', '.join(composite_names())}) or "
                               f"baselines ({', '.join(baselines.METHODS)})")
    keys = {"occlusion": next((k for k in methods if k.startswith("occlusion-")), "occlusion")}
    randomise = [keys.get(name, name) for name in args.randomise]
    unknown = [name for name in randomise if name not in methods]
    if unknown:
        raise CommandError(f"--randomise {unknown[0]!r} is not among --methods ({', '.join(args.methods)})")
    try:
        regions = Regions(x, args.patch).count
        steps = min(args.steps, regions)  # never more steps than regions to remove
        if steps < args.steps:
            _note(f"{regions} regions of patch {args.patch}: {steps} steps instead of {args.steps}")
        report.run(pipeline.model, x, args.out, methods, replacements=args.replace, steps=steps, patch=args.patch,
                   score=args.score, masks=masks,
                   mask_note=f"the masks in {args.masks}" if args.masks else
                   "the digit's strokes (pixels brighter than 0.5) as the mask: a rough stand-in for ground truth, "
                   "since MNIST has none",
                   randomisation_methods=randomise,
                   randomisation_samples=args.randomisation_samples, batch_size=args.batch_size,
                   title=f"Evaluating explanations of {args.model}", description=f"Data: {source}.",
                   command="lrp " + shlex.join(args.argv))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return 0


def _video(args: argparse.Namespace) -> int:
    """``lrp video INPUT --model SPEC --out OUT.mp4``: every frame (or every --every-th) explained in batches and
    written back with its heatmap (src/lrp/video.py)."""
    import importlib.util

    if importlib.util.find_spec("av") is None:
        raise CommandError("lrp video needs PyAV (it bundles FFmpeg; no ffmpeg program is needed): "
                           "pip install 'lrp[video]'")
    from .pipeline.text import is_text_spec
    from .video import OUTPUT_FORMATS, VideoReader, check_output, default_threads, explain_video

    if is_text_spec(args.model):
        raise CommandError(f"lrp video explains pictures; --model {args.model} is a text model")
    if args.every < 1:
        raise CommandError(f"--every {args.every}: give 1 (explain every frame) or more")
    if args.batch_size is not None and args.batch_size < 1:
        raise CommandError(f"--batch-size {args.batch_size}: give 1 or more")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads {args.threads}: give 1 or more")
    source = Path(args.input)
    suffix = source.suffix.lower() if source.suffix.lower() in OUTPUT_FORMATS else ".mp4"
    out = Path(args.out) if args.out else Path(f"{source.stem}_lrp{suffix}")
    check_output(out, source)  # a bad output stops here, before the model loads
    composite = args.composite or "epsilon-plus-flat"
    import torch

    previous_threads = torch.get_num_threads()
    # a missing or broken video stops here, before the model loads
    with VideoReader(source) as reader:
        try:
            pipeline = _pipeline(args)
            threads = args.threads or default_threads(pipeline.model)
            if threads:
                torch.set_num_threads(threads)
            comp, note = pipeline.composite(composite, kind="image", maxpool=args.maxpool, low=args.low,
                                            high=args.high)
            if note:
                _note(f"{composite}: {note}")
            summary = explain_video(pipeline, reader, out, comp, args.target, every=args.every,
                                    batch_size=args.batch_size, layout=args.layout, cmap=args.cmap, note=_note)
        finally:  # main() called in a process that goes on (tests, notebooks) keeps its threads
            torch.set_num_threads(previous_threads)
    print(summary.line())
    return 0


def _evaluate_spam(args: argparse.Namespace) -> int:
    """``lrp evaluate --model spam``: token deletion on held-out mails (:func:`lrp.evaluate.text_report.run_spam`)."""
    from .evaluate.text_report import run_spam

    given = _image_options(args)
    if given:
        raise CommandError(f"{given[0]} does not apply to --model spam: it is evaluated on its own held-out mails "
                           f"by token deletion (options: --methods, --limit, --steps, --replace mask delete, "
                           f"--score, --batch-size)")
    image_removals = [r for r in args.replace or [] if r in IMAGE_REMOVALS]
    if image_removals:
        raise CommandError(f"--replace {image_removals[0]} is for pixels; tokens are removed by mask (replaced by "
                           f"padding, which the model ignores) or delete (dropped, the gap closed)")
    if args.device != "cpu":
        _note("the spam model is small: it is evaluated on the CPU")
    settings = {key: value for key, value in (("limit", args.limit), ("steps", args.steps), ("removal", args.replace),
                                              ("batch_size", args.batch_size)) if value is not None}  # else run_spam's
    try:
        run_spam(args.out, methods=args.methods, score=args.score, command="lrp " + shlex.join(args.argv),
                 log=lambda line: print(line, file=sys.stderr), **settings)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return 0


def _image_options(args: argparse.Namespace) -> list[str]:
    """The options of lrp evaluate for input files, images and arrays that were given."""
    return [flag for flag, value in (("inputs", args.inputs), ("--masks", args.masks), ("--weights", args.weights),
                                     ("--randomise", args.randomise), ("--patch", args.patch != 1),
                                     ("--maxpool", args.maxpool != "max"), ("--size", args.size),
                                     ("--crop", args.crop), ("--mean", args.mean), ("--std", args.std),
                                     ("--pixels", args.pixels), ("--grayscale", args.grayscale),
                                     ("--invert", args.invert), ("--low", args.low), ("--high", args.high)) if value]


def _evaluate_benchmark(args: argparse.Namespace) -> int:
    """``lrp evaluate --benchmark shapes-vqa``: the built-in VQA model on held-out Shapes VQA questions, localisation
    in their ground-truth masks (:func:`lrp.evaluate.vqa_benchmark.run`)."""
    from .evaluate.report import markdown_table
    from .evaluate.vqa_benchmark import run

    given = [flag for flag, value in (("--model", args.model), ("--steps", args.steps), ("--replace", args.replace),
                                      ("--score", args.score != "logit"), ("--device", args.device != "cpu"),
                                      ("--randomisation-samples", args.randomisation_samples != 16))
             if value] + _image_options(args)
    if given:
        raise CommandError(f"{given[0]} does not apply to --benchmark {args.benchmark}: it evaluates the built-in VQA "
                           f"model (lrp.models.vqa()) on its own held-out questions, on the CPU (options: --methods, "
                           f"--limit, --batch-size, --out)")
    settings = {key: value for key, value in (("limit", args.limit), ("batch_size", args.batch_size))
                if value is not None}  # else run's defaults
    try:
        result = run(args.out, methods=args.methods, command="lrp " + shlex.join(args.argv),
                     log=lambda line: print(line, file=sys.stderr), **settings)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    print(f"answer accuracy: {result.accuracy.overall:.3f}")
    main = [r for r in result.rows if r["subset"] == "correct" and r["question_type"] == "all"]
    print(markdown_table(main, ["method", "kind", "n", "mass_accuracy", "rank_accuracy", "pointing_game"]))
    print(f"report: {result.report}")
    return 0


def _preprocessing_help() -> str:
    from .pipeline import DEFAULT_PREPROCESSING
    lines = ["default preprocessing of images, by --model:"]
    names = {"mnist": "mnist", "torchvision": "torchvision names", "factory": "module:factory, file.py:factory",
             "exported": ".pt2 programs", "onnx": ".onnx files"}
    for kind, pre in DEFAULT_PREPROCESSING.items():
        if kind == "keras":
            lines.append("  .keras/.h5 files, keras:NAME: Keras' preprocess_input, by the model's name (caffe for VGG "
                         "and ResNet: BGR 0..255 minus the ImageNet mean; tf for MobileNet, Xception, Inception: "
                         "[-1, 1]; torch for DenseNet; 0..255 where the model rescales itself; else [0, 1]), at the "
                         "model's input size, channels last")
            continue
        if kind == "onnx":
            lines.append("  .onnx files: RGB, pixels in [0, 1], resized and cropped to the input size the file "
                         "declares (a channels-last input, as from TensorFlow, is handled)")
            continue
        lines.append(f"  {names[kind]}: {pre.describe()}")
    lines += ["--pixels caffe|tf|torch|raw picks one of Keras' conventions for any model; --size/--crop/--mean/--std "
              "override these (--size 0 / --crop 0: no resizing / cropping; a model "
              "trained at another size says so with them).",
              "arrays (.npy/.npz) are read as given: one sample shaped as the model reads it (a one-channel model's "
              "channel may be left out) or a batch with the samples first."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from . import baselines
    from .evaluate.methods import EVALUATE_COMPOSITES
    from .pipeline import MODEL_SPECS, composite_names
    from .pipeline.text import HF_SPEC, TEXT_SPECS

    parser = argparse.ArgumentParser(prog="lrp", description="Layer-wise Relevance Propagation for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="explain held-out MNIST digits with the built-in model and write a report")
    demo.add_argument("--out", default="lrp-demo", help="output folder (default: lrp-demo)")
    demo.set_defaults(func=_demo)

    sv = sub.add_parser("serve", help="a web page to draw digits, upload images, type texts or ask about scenes "
                                      "and see why; a JSON API",
                        description="Serve a web app: draw a digit, upload an image, type a text or ask about a "
                                    "generated scene, see the prediction and its explanation; POST /api/explain and "
                                    "POST /api/vqa/explain for programs (docs at /docs). --weights, --classes and "
                                    "the preprocessing options apply to the --model they follow.")
    sv.add_argument("--model", action=_ServeOption, dest="model", metavar="SPEC",
                    help=f"{MODEL_SPECS}; or a text classifier: spam (built in) or hf:DIR (a local Hugging Face "
                         f"...ForSequenceClassification checkpoint); or vqa (the built-in visual question "
                         f"answering model); default: mnist, spam and vqa; repeat to serve several")
    sv.add_argument("--weights", action=_ServeOption, help="a state dict for the --model before it")
    sv.add_argument("--classes", action=_ServeOption, help="text file with one class name per line")
    sv.add_argument("--size", type=_at_least(0), action=_ServeOption, help="resize images: shorter side in pixels")
    sv.add_argument("--crop", type=_at_least(0), action=_ServeOption, help="centre-crop images to this square size")
    sv.add_argument("--mean", type=float, nargs="+", action=_ServeOption, help="per-channel mean to subtract")
    sv.add_argument("--std", type=float, nargs="+", action=_ServeOption, help="per-channel std to divide by")
    sv.add_argument("--pixels", choices=PIXEL_CHOICES, action=_ServeOption,
                    help="a Keras preprocess_input convention (see lrp explain --help)")
    sv.add_argument("--grayscale", nargs=0, const=True, action=_ServeOption, help="read images as one channel")
    sv.add_argument("--invert", nargs=0, const=True, action=_ServeOption, help="invert uploaded images")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--threads", type=int, help="torch threads (default: 1 for small models such as mnist, "
                                                "under 5 M parameters; else torch's default, one per core)")
    sv.add_argument("--device", type=_device, default="cpu",
                    help="where the models run: cpu (default), cuda or cuda:N")
    sv.set_defaults(func=_serve, served=None)

    ex = sub.add_parser("explain", help="explain images, arrays or texts with a model; writes heatmaps and a CSV",
                        description="Explain each input; write into --out <name>_relevance.npy and its pictures: "
                                    "<name>_heatmap.png and <name>_overlay.png for images, <name>_bands.png (one "
                                    "tile per band) for cubes and many-channel inputs, <name>_features.png (a bar "
                                    "per feature) for vectors; and summary.csv with a row per input (prediction, "
                                    "explained class and score, relevance sum, status: ok or why it failed). "
                                    "Texts (--model spam or hf:DIR: .txt/.eml files, folders, --text) get "
                                    "<name>.html (a token heatmap) and <name>.csv (a row per token: position, id, "
                                    "piece, text, word, relevance).",
                        epilog=_preprocessing_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("inputs", nargs="*", help="image files, folders (searched recursively), .npy/.npz arrays; for "
                                              "a text model: text files, .eml mails, folders (their .txt and .eml)")
    ex.add_argument("--model", default="mnist", help=f"{MODEL_SPECS}; or a text model: {TEXT_SPECS}, {HF_SPEC}")
    ex.add_argument("--text", action="append", metavar="TEXT",
                    help="a text to explain with a text model (spam, hf:DIR); repeat for several")
    ex.add_argument("--text-file", action="append", metavar="FILE",
                    help="texts to explain, one per line (blank lines skipped; - reads standard input)")
    ex.add_argument("--merge-words", action=argparse.BooleanOptionalAction, default=None,
                    help="text: show words in the HTML, with the relevance of their subword pieces summed "
                         "(the CSV keeps one row per token, with its word); default: words for --model spam, "
                         "tokens for hf:DIR")
    ex.add_argument("--weights", help="a state dict for the model (a fine-tuned head of another size is fine)")
    ex.add_argument("--composite", choices=composite_names(), metavar="NAME",
                    help=f"{', '.join(composite_names())} (default: epsilon-plus-flat; for text: epsilon)")
    ex.add_argument("--low", type=float, help="lowest input value for z^B (default: images: pixel 0 after the "
                                              "preprocessing; arrays: their minimum; the value used is printed)")
    ex.add_argument("--high", type=float, help="highest input value for z^B (default: images: pixel 1 after the "
                                               "preprocessing; arrays: their maximum)")
    ex.add_argument("--maxpool", choices=["max", "average"], default="max", help="relevance at max-pooling")
    ex.add_argument("--target", help="class to explain: 'pred' (default), an index, or a name from --classes "
                                     "(a text classifier's own label names too; --model spam: ham or spam, "
                                     "default spam, so that red is spam and blue is ham); for a language model "
                                     "the next token: a token such as ' Paris' or a token id")
    ex.add_argument("--classes", help="text file with one class name per line")
    ex.add_argument("--size", type=_at_least(0), help="resize images so the shorter side has this many pixels (0: no "
                                             "resizing; default: see below)")
    ex.add_argument("--crop", type=_at_least(0), help="centre-crop images to this square size (0: no cropping)")
    ex.add_argument("--mean", type=float, nargs="+", help="per-channel mean to subtract")
    ex.add_argument("--std", type=float, nargs="+", help="per-channel standard deviation to divide by")
    ex.add_argument("--pixels", choices=PIXEL_CHOICES,
                    help="pixel convention, as Keras' preprocess_input modes: caffe (BGR, 0..255 minus the ImageNet "
                         "mean: Keras' VGG and ResNet), tf ([-1, 1]), torch ([0, 1], ImageNet mean and std), raw "
                         "(0..255); default: by the model (see below)")
    ex.add_argument("--grayscale", action="store_true", help="read images as one channel")
    ex.add_argument("--invert", action="store_true", help="invert images (white on black <-> black on white)")
    ex.add_argument("--batch-size", type=_at_least(1), default=16)
    ex.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    ex.add_argument("--cmap", default="bwr", choices=CMAPS, help="colour map: bwr, seismic, coldnhot, gray, wred")
    ex.add_argument("--out", default="lrp-out", help="output folder (default: lrp-out)")
    st = ex.add_argument_group("dataset runs (--store zarr; see docs/scale.md)")
    st.add_argument("--store", choices=["files", "zarr"], default="files",
                    help="files: a .npy and pictures per input (default); zarr: every input's relevance as a row of "
                         "one chunked, compressed Zarr array (OUT/explanations.zarr/relevance), with OUT/index.csv "
                         "(row, path, status, target, prediction, score) and OUT/errors.csv; inputs are read by "
                         "DataLoader workers; under torchrun the ranks share the rows")
    st.add_argument("--list", action="append", default=[], metavar="FILE",
                    help="--store zarr: a text file of input paths, one a line (relative to its folder); repeatable")
    st.add_argument("--png", action="store_true", help="--store zarr: also write OUT/png/<row>_heatmap.png (and "
                                                      "_overlay.png)")
    st.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                    help="--store zarr: the relevance's type in the store (default float32)")
    st.add_argument("--resume", action="store_true",
                    help="--store zarr: finish the store in --out, skipping the chunks that are done; refused when "
                         "the options differ from those it was made with")
    st.add_argument("--workers", type=int, metavar="N",
                    help="--store zarr: DataLoader worker processes per rank (default: the rank's cores less one, "
                         "1 to 8; 0 reads in the main process)")
    st.add_argument("--chunk", type=int, metavar="ROWS",
                    help="--store zarr: rows per chunk, a multiple of --batch-size (default: about 8 MB of "
                         "relevance, at most 4096 rows); the unit of writing and of --resume")
    ex.set_defaults(func=_explain)

    ev = sub.add_parser("evaluate", help="score LRP composites and baseline methods (pixel flipping, randomisation "
                                         "check, complexity); writes a report",
                        description="Explain the inputs with each method, remove features in the order of their "
                                    "relevance and track the score; randomise the model's layers and compare "
                                    "heatmaps. Writes report.md, results.csv and plots into --out. "
                                    "--benchmark shapes-vqa instead scores where each method puts the relevance "
                                    "of the built-in VQA model's answers against the questions' ground-truth "
                                    "masks (relevance mass and rank accuracy, pointing game).")
    ev.add_argument("inputs", nargs="*", help="images, folders or .npy arrays (default for --model mnist: "
                                              "held-out digits)")
    ev.add_argument("--model", help="as for lrp explain (default: mnist, the built-in model)")
    ev.add_argument("--benchmark", choices=BENCHMARKS,
                    help="a known-answer benchmark with its own model and data: shapes-vqa, the built-in VQA model "
                         "on the 1,000 held-out Shapes VQA questions, localisation of each method's relevance in "
                         "the ground-truth masks of the objects the question refers to, by question type (takes "
                         "--methods, --limit, --batch-size, --out)")
    ev.add_argument("--masks", help="folder of ground-truth masks named like the inputs (images: brighter than "
                                    "half = inside; arrays: nonzero = inside; resized and cropped as the inputs); "
                                    "adds pointing game, relevance mass and rank accuracy")
    ev.add_argument("--weights", help="a state dict for the model")
    ev.add_argument("--methods", nargs="+",
                    help=f"composites and baselines to compare (default: {' '.join(EVALUATE_COMPOSITES)} "
                         f"{' '.join(baselines.METHODS)}, also for --benchmark; --model spam: "
                         f"{' '.join(_text_methods())})")
    ev.add_argument("--randomise", nargs="*",
                    help=f"methods to put through the randomisation check (default: {' '.join(RANDOMISE)}; "
                         f"--randomise with no names skips it; images and arrays)")
    ev.add_argument("--randomisation-samples", type=_at_least(0), default=16,
                    help="inputs for the randomisation check (0 skips it)")
    ev.add_argument("--limit", type=_at_least(1),
                    help="evaluate on at most this many inputs (default 300; --model spam: 200 held-out mails, "
                         "spread over ham and spam; --benchmark shapes-vqa: the first 1,000 held-out questions)")
    ev.add_argument("--steps", type=_at_least(1), help="perturbation steps (default 50; --model spam: 10)")
    ev.add_argument("--patch", type=int, default=1, help="region size in pixels (default 1: pixel flipping)")
    ev.add_argument("--replace", nargs="+", choices=[*IMAGE_REMOVALS, *TEXT_REMOVALS],
                    help="what removed pixels become: blur (default), uniform, zero, mean; for --model spam how "
                         "tokens are removed: mask (replaced by padding, which the model ignores) and delete "
                         "(dropped, the gap closed), both by default; several give one table each")
    ev.add_argument("--score", choices=["logit", "probability"], default="logit",
                    help="score tracked while removing: the explained logit (default) or its softmax probability")
    for flag, kwargs in (("--size", dict(type=_at_least(0))), ("--crop", dict(type=_at_least(0))),
                         ("--mean", dict(type=float, nargs="+")), ("--std", dict(type=float, nargs="+")),
                         ("--pixels", dict(choices=PIXEL_CHOICES)), ("--grayscale", dict(action="store_true")),
                         ("--invert", dict(action="store_true")), ("--low", dict(type=float)),
                         ("--high", dict(type=float))):
        ev.add_argument(flag, help="as for lrp explain", **kwargs)
    ev.add_argument("--maxpool", choices=["max", "average"], default="max", help="relevance at max-pooling")
    ev.add_argument("--batch-size", type=_at_least(1),
                    help="perturbed inputs per forward pass (default 256; --model spam: mails explained together, "
                         "32; --benchmark: questions, 50)")
    ev.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    ev.add_argument("--out", default="lrp-eval", help="output folder (default: lrp-eval)")
    ev.set_defaults(func=_evaluate)

    vd = sub.add_parser("video", help="explain a video frame by frame; writes it back with the heatmaps",
                        description="Explain the frames of a video (mp4, mov, mkv, webm, avi, animated gif) in "
                                    "batches and write a video with the same frame count, timestamps and size "
                                    "(.avi: a constant frame rate, the average): the heatmap over each frame "
                                    "(--layout overlay) or next to it (side-by-side), each scaled to its own "
                                    "frame's largest relevance (see --layout). Where the preprocessing "
                                    "crops, the heatmap covers the part the model saw and the rest is darkened. "
                                    "The sound is not copied. A video that ends before the length its file states "
                                    "gives the frames that could be read, with a note. The output is written to a "
                                    "hidden file next to it and renamed at the end: a failed run leaves nothing. "
                                    "Needs PyAV: pip install 'lrp[video]'.",
                        epilog=_preprocessing_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    vd.add_argument("input", help="the video file")
    vd.add_argument("--out", help="the output video; its suffix picks the format: .mp4, .mov, .mkv (H.264), .webm "
                                  "(VP9), .avi (MPEG-4, constant frame rate), .gif (default: <input name>_lrp.<its "
                                  "suffix, or mp4>, in the current folder)")
    vd.add_argument("--model", default="mnist", help=MODEL_SPECS)
    vd.add_argument("--weights", help="a state dict for the model (a fine-tuned head of another size is fine)")
    vd.add_argument("--classes", help="text file with one class name per line")
    vd.add_argument("--target", help="class to explain in every frame: 'pred' (default: each frame's predicted "
                                     "class), an index, or a name from --classes")
    vd.add_argument("--composite", choices=composite_names(), metavar="NAME",
                    help=f"{', '.join(composite_names())} (default: epsilon-plus-flat)")
    vd.add_argument("--low", type=float, help="lowest input value for z^B (default: pixel 0 after the "
                                              "preprocessing)")
    vd.add_argument("--high", type=float, help="highest input value for z^B (default: pixel 1 after the "
                                               "preprocessing)")
    vd.add_argument("--maxpool", choices=["max", "average"], default="max", help="relevance at max-pooling")
    for flag, kwargs in (("--size", dict(type=_at_least(0))), ("--crop", dict(type=_at_least(0))),
                         ("--mean", dict(type=float, nargs="+")), ("--std", dict(type=float, nargs="+")),
                         ("--pixels", dict(choices=PIXEL_CHOICES)), ("--grayscale", dict(action="store_true")),
                         ("--invert", dict(action="store_true"))):
        vd.add_argument(flag, help="as for lrp explain (applied to each frame)", **kwargs)
    vd.add_argument("--every", type=int, default=1, metavar="N",
                    help="explain every Nth frame; the frames in between show its heatmap (default: 1, all)")
    vd.add_argument("--batch-size", type=int, help="frames explained together (default: 64 for models under 5 M "
                                                   "parameters, such as mnist; else 16)")
    vd.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    vd.add_argument("--threads", type=int, help="torch threads (default: 1 for models under 5 M parameters, such "
                                                "as mnist; else torch's default, one per core)")
    vd.add_argument("--layout", choices=["overlay", "side-by-side"], default="overlay",
                    help="overlay: the heatmap blended over the frame's gray (default); side-by-side: the frame, "
                         "and the heatmap next to it (twice as wide). Each frame's heatmap is scaled to that "
                         "frame's largest relevance, so every frame uses the full colour range: colour strength "
                         "does not compare between frames. The overlay's gray is the frame's brightness as it is "
                         "(lrp explain stretches each picture's contrast between its 1st and 99th percentiles; on "
                         "video that would make the brightness flicker)")
    vd.add_argument("--cmap", default="bwr", choices=CMAPS,
                    help="colour map (default: bwr: red for, blue against the class)")
    vd.set_defaults(func=_video)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from .errors import InputError, ModelError, TargetError
    try:
        return args.func(args)
    except (CommandError, ModelError, TargetError, InputError) as exc:
        print(f"lrp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
