"""The ``lrp`` command line: ``lrp demo``, ``lrp serve``, ``lrp explain`` and ``lrp evaluate``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

# what `lrp evaluate` compares by default: the composites that differ on the layers of a CNN, and every baseline
EVALUATE_COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-box", "layered", "epsilon-alpha2-beta1", "lrp0")


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


def _device(spec: str) -> str:
    """argparse type of --device: the device if torch can use it here, else a message naming the way out."""
    from .errors import ModelError
    from .pipeline import check_device
    try:
        return check_device(spec)
    except ModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    from .pipeline.text import is_hf_spec
    if any(is_hf_spec(group.get("model")) for group in args.served or []):
        raise CommandError("lrp serve serves image models; explain a text model (hf:DIR) with lrp explain "
                           "--model hf:DIR --text \"...\"")
    from .web import missing_dependencies
    missing = missing_dependencies()
    if missing:
        raise CommandError(f"lrp serve needs {', '.join(missing)}: pip install 'lrp[web]'")
    from .web.server import serve
    serve(args.served or [{}], host=args.host, port=args.port, threads=args.threads, device=args.device)
    return 0


def _pipeline(args: argparse.Namespace):
    """The pipeline for --model, --weights, --classes, the preprocessing options and --device."""
    from .pipeline import Pipeline
    return Pipeline.load(args.model, args.weights, getattr(args, "classes", None), device=args.device, size=args.size,
                         crop=args.crop, mean=args.mean, std=args.std, grayscale=args.grayscale,
                         invert=args.invert)


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
                 ("--grayscale", False), ("--invert", False), ("--low", None), ("--high", None), ("--maxpool", "max"))


def _explain_text(args: argparse.Namespace) -> int:
    """``lrp explain --model hf:DIR --text ...``: an HTML token heatmap and a CSV per text."""
    from tqdm import tqdm

    from .errors import InputError, RuleError, UnsupportedOperationError, one_line
    from .pipeline.text import (TextPipeline, failed_row, is_hf_spec, read_texts, summary_row, text_composite,
                                write, write_summary)

    if not is_hf_spec(args.model):
        raise CommandError(f"--text and --text-file need a text model: --model hf:DIR (a local Hugging Face "
                           f"checkpoint folder with its tokenizer), not {args.model!r}")
    if args.inputs:
        raise CommandError(f"a text model reads text: give it with --text \"...\" or --text-file FILE (one text "
                           f"per line), not as input files ({args.inputs[0]})")
    for flag, unset in IMAGE_OPTIONS:
        if getattr(args, flag[2:].replace("-", "_")) != unset:
            raise CommandError(f"{flag} applies to images and arrays, not to text (--model hf:DIR)")
    if not args.text and not args.text_file:
        raise CommandError(f"give the text to explain: lrp explain --model {args.model} --text \"...\" (several "
                           f"--text, or --text-file FILE with one text per line)")
    from .visualize import COLORMAPS
    if args.cmap not in COLORMAPS:
        raise CommandError(f"unknown colour map {args.cmap!r}; choose one of {', '.join(COLORMAPS)}")
    texts = read_texts(args.text, args.text_file)  # InputError: exit 2, nothing written
    comp = text_composite(args.composite)
    pipeline = TextPipeline.load(args.model, device=args.device, classes=args.classes)
    target = pipeline.target(args.target)
    out = Path(args.out)
    rows: list = []
    used: set = set()
    explained = 0
    many = len(texts) > 3
    with tqdm(total=len(texts), desc="explaining", unit="text", disable=None if many else True,
              file=sys.stderr) as bar:
        for source, text, stem in texts:
            try:
                encoded = pipeline.encode(text)
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
            write(outcome, out, name, merge=args.merge_words, cmap=args.cmap)
            rows.append(summary_row(outcome, name))
            explained += 1
            bar.update(1)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out / "summary.csv", rows)
    failures = len(rows) - explained
    print(f"explained {explained} of {len(rows)} texts into {out}/ (<name>.html, <name>.csv); summary.csv lists "
          f"each text" + (f"; {failures} failed (see errors above)" if failures else ""))
    return 1 if failures else 0


def _explain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .errors import ModelError, TargetError, one_line
    from .pipeline import expand_inputs
    from .pipeline.outputs import failed_row, summary_row, write, write_summary
    from .pipeline.text import is_hf_spec

    if is_hf_spec(args.model) or args.text or args.text_file:
        return _explain_text(args)
    if args.merge_words:
        raise CommandError("--merge-words applies to text (--model hf:DIR --text ...)")
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
                out.mkdir(parents=True, exist_ok=True)
                for outcome in outcomes:
                    stem = _unique_stem(outcome.prepared.source, used)
                    for name in write(outcome, out, stem, args.cmap):
                        written_kinds.add(name[len(stem) + 1:])
                    rows.append((order[id(outcome.prepared)], summary_row(outcome, pipeline, stem)))
                    explained += 1
                bar.update(len(batch))
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out / "summary.csv", [row for _, row in sorted(rows, key=lambda r: r[0])])
    failures = sum(1 for _, row in rows if row["status"] != "ok")
    kinds = ", ".join(f"<name>_{kind}" for kind in sorted(written_kinds))
    print(f"explained {explained} of {explained + failures} inputs into {out}/ ({kinds or 'nothing'}); "
          f"summary.csv lists each input" + (f"; {failures} failed (see errors above)" if failures else ""))
    return 1 if failures else 0


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
    from .pipeline.text import is_hf_spec

    if is_hf_spec(args.model):
        raise CommandError("lrp evaluate works on images and arrays; explain a text model (hf:DIR) with lrp explain "
                           "--model hf:DIR --text \"...\"")
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


def _preprocessing_help() -> str:
    from .pipeline import DEFAULT_PREPROCESSING
    lines = ["default preprocessing of images, by --model:"]
    names = {"mnist": "mnist", "torchvision": "torchvision names", "factory": "module:factory, file.py:factory",
             "exported": ".pt2 programs"}
    for kind, pre in DEFAULT_PREPROCESSING.items():
        lines.append(f"  {names[kind]}: {pre.describe()}")
    lines += ["--size/--crop/--mean/--std override these (--size 0 / --crop 0: no resizing / cropping; a model "
              "trained at another size says so with them).",
              "arrays (.npy/.npz) are read as given: one sample shaped as the model reads it (a one-channel model's "
              "channel may be left out) or a batch with the samples first."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from . import baselines
    from .pipeline import MODEL_SPECS, composite_names
    from .pipeline.text import HF_SPEC

    parser = argparse.ArgumentParser(prog="lrp", description="Layer-wise Relevance Propagation for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="explain held-out MNIST digits with the built-in model and write a report")
    demo.add_argument("--out", default="lrp-demo", help="output folder (default: lrp-demo)")
    demo.set_defaults(func=_demo)

    sv = sub.add_parser("serve", help="a web page to draw digits or upload images and see why; a JSON API",
                        description="Serve a web app: draw a digit or upload an image, see the prediction and "
                                    "its explanation; POST /api/explain for programs (docs at /docs). "
                                    "--weights, --classes and the preprocessing options apply to the --model "
                                    "they follow.")
    sv.add_argument("--model", action=_ServeOption, dest="model", metavar="SPEC",
                    help=f"{MODEL_SPECS}; default mnist; repeat to serve several")
    sv.add_argument("--weights", action=_ServeOption, help="a state dict for the --model before it")
    sv.add_argument("--classes", action=_ServeOption, help="text file with one class name per line")
    sv.add_argument("--size", type=int, action=_ServeOption, help="resize images: shorter side in pixels")
    sv.add_argument("--crop", type=int, action=_ServeOption, help="centre-crop images to this square size")
    sv.add_argument("--mean", type=float, nargs="+", action=_ServeOption, help="per-channel mean to subtract")
    sv.add_argument("--std", type=float, nargs="+", action=_ServeOption, help="per-channel std to divide by")
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
                                    "Texts (--model hf:DIR --text ...) get <name>.html (a token heatmap) and "
                                    "<name>.csv (a row per token: position, id, piece, text, word, relevance).",
                        epilog=_preprocessing_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("inputs", nargs="*", help="image files, folders (searched recursively), .npy/.npz arrays")
    ex.add_argument("--model", default="mnist", help=f"{MODEL_SPECS}, or {HF_SPEC}")
    ex.add_argument("--text", action="append", metavar="TEXT",
                    help="a text to explain with --model hf:DIR; repeat for several")
    ex.add_argument("--text-file", action="append", metavar="FILE",
                    help="texts to explain, one per line (blank lines skipped; - reads standard input)")
    ex.add_argument("--merge-words", action="store_true",
                    help="text: show words in the HTML, with the relevance of their subword pieces summed "
                         "(the CSV keeps one row per token, with its word)")
    ex.add_argument("--weights", help="a state dict for the model (a fine-tuned head of another size is fine)")
    ex.add_argument("--composite", choices=composite_names(), metavar="NAME",
                    help=f"{', '.join(composite_names())} (default: epsilon-plus-flat; for text: epsilon)")
    ex.add_argument("--low", type=float, help="lowest input value for z^B (default: images: pixel 0 after the "
                                              "preprocessing; arrays: their minimum; the value used is printed)")
    ex.add_argument("--high", type=float, help="highest input value for z^B (default: images: pixel 1 after the "
                                               "preprocessing; arrays: their maximum)")
    ex.add_argument("--maxpool", choices=["max", "average"], default="max", help="relevance at max-pooling")
    ex.add_argument("--target", help="class to explain: 'pred' (default), an index, or a name from --classes "
                                     "(a text classifier's own label names too); for a language model the next "
                                     "token: a token such as ' Paris' or a token id")
    ex.add_argument("--classes", help="text file with one class name per line")
    ex.add_argument("--size", type=int, help="resize images so the shorter side has this many pixels (0: no "
                                             "resizing; default: see below)")
    ex.add_argument("--crop", type=int, help="centre-crop images to this square size (0: no cropping)")
    ex.add_argument("--mean", type=float, nargs="+", help="per-channel mean to subtract")
    ex.add_argument("--std", type=float, nargs="+", help="per-channel standard deviation to divide by")
    ex.add_argument("--grayscale", action="store_true", help="read images as one channel")
    ex.add_argument("--invert", action="store_true", help="invert images (white on black <-> black on white)")
    ex.add_argument("--batch-size", type=int, default=16)
    ex.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    ex.add_argument("--cmap", default="bwr", help="colour map: bwr, seismic, coldnhot, gray, wred")
    ex.add_argument("--out", default="lrp-out", help="output folder (default: lrp-out)")
    ex.set_defaults(func=_explain)

    ev = sub.add_parser("evaluate", help="score LRP composites and baseline methods (pixel flipping, randomisation "
                                         "check, complexity); writes a report",
                        description="Explain the inputs with each method, remove features in the order of their "
                                    "relevance and track the score; randomise the model's layers and compare "
                                    "heatmaps. Writes report.md, results.csv and plots into --out.")
    ev.add_argument("inputs", nargs="*", help="images, folders or .npy arrays (default for --model mnist: "
                                              "held-out digits)")
    ev.add_argument("--model", default="mnist", help="as for lrp explain (default: mnist, the built-in model)")
    ev.add_argument("--masks", help="folder of ground-truth masks named like the inputs (images: brighter than "
                                    "half = inside; arrays: nonzero = inside; resized and cropped as the inputs); "
                                    "adds pointing game, relevance mass and rank accuracy")
    ev.add_argument("--weights", help="a state dict for the model")
    ev.add_argument("--methods", nargs="+", default=[*EVALUATE_COMPOSITES, *baselines.METHODS],
                    help="composites and baselines to compare (default: %(default)s)")
    ev.add_argument("--randomise", nargs="*", default=["epsilon-plus-flat", "epsilon-gamma-box", "gradient"],
                    help="methods to put through the randomisation check (default: %(default)s; none to skip)")
    ev.add_argument("--randomisation-samples", type=int, default=16, help="inputs for the randomisation check")
    ev.add_argument("--limit", type=int, default=300, help="evaluate on at most this many inputs (default 300)")
    ev.add_argument("--steps", type=int, default=50, help="perturbation steps (default 50)")
    ev.add_argument("--patch", type=int, default=1, help="region size in pixels (default 1: pixel flipping)")
    ev.add_argument("--replace", nargs="+", default=["blur"], choices=["blur", "uniform", "zero", "mean"],
                    help="what removed pixels become (default: blur); several give one table each")
    ev.add_argument("--score", choices=["logit", "probability"], default="logit",
                    help="score tracked while removing: the explained logit (default) or its softmax probability")
    for flag, kwargs in (("--size", dict(type=int)), ("--crop", dict(type=int)),
                         ("--mean", dict(type=float, nargs="+")), ("--std", dict(type=float, nargs="+")),
                         ("--grayscale", dict(action="store_true")), ("--invert", dict(action="store_true")),
                         ("--low", dict(type=float)), ("--high", dict(type=float))):
        ev.add_argument(flag, help="as for lrp explain", **kwargs)
    ev.add_argument("--maxpool", choices=["max", "average"], default="max", help="relevance at max-pooling")
    ev.add_argument("--batch-size", type=int, default=256, help="perturbed inputs per forward pass")
    ev.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    ev.add_argument("--out", default="lrp-eval", help="output folder (default: lrp-eval)")
    ev.set_defaults(func=_evaluate)
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
