"""The ``lrp`` command line: ``lrp demo``, ``lrp serve``, ``lrp explain`` and ``lrp evaluate``."""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

EVALUATE_METHODS = ("epsilon-plus-flat", "epsilon-gamma-box", "layered", "epsilon-alpha2-beta1", "lrp0", "gradient",
                    "gradient-x-input", "integrated-gradients", "smoothgrad", "occlusion", "random")


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
    from .loading import ModelError, check_device
    try:
        return check_device(spec)
    except ModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    from .web import missing_dependencies
    missing = missing_dependencies()
    if missing:
        raise CommandError(f"lrp serve needs {', '.join(missing)}: pip install 'lrp[web]'")
    from .loading import ModelError
    from .web.server import serve
    try:
        serve(args.served or [{}], host=args.host, port=args.port, threads=args.threads, device=args.device)
    except ModelError as exc:
        raise CommandError(str(exc)) from None
    return 0


def _read_classes(path: Optional[str]) -> Optional[list[str]]:
    from .loading import ModelError, read_classes
    if path is None:
        return None
    try:
        return read_classes(path)
    except ModelError as exc:
        raise CommandError(str(exc)) from None


def _target(spec: Optional[str], classes: Optional[list[str]]):
    if spec is None or spec == "pred":
        return None
    if spec.lstrip("-").isdigit():
        return int(spec)
    if classes is None:
        raise CommandError(f"--target {spec!r} is not a class index; to use class names pass --classes FILE "
                           f"(one name per line)")
    if spec not in classes:
        raise CommandError(f"--target {spec!r} is not in {len(classes)} class names of --classes")
    return classes.index(spec)


def _composite(args: argparse.Namespace, pre) -> object:
    from .loading import composite_for
    try:  # z^B bounds not given: the input's range from the preprocessing (pixels in [0, 1])
        return composite_for(args.composite, pre, maxpool=args.maxpool, low=args.low, high=args.high)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _preprocess(args: argparse.Namespace, loaded):
    from .loading import preprocess_for
    return preprocess_for(loaded.kind, size=args.size, crop=args.crop, mean=args.mean, std=args.std,
                          grayscale=args.grayscale, invert=args.invert)


def _load(args: argparse.Namespace):
    """(the loaded model spec, the model on --device, its preprocessing) for --model and --weights."""
    from .loading import ModelError, load_model
    try:
        loaded = load_model(args.model, args.weights)
    except ModelError as exc:
        raise CommandError(str(exc)) from None
    return loaded, loaded.model.to(args.device), _preprocess(args, loaded)


def _unique_stem(path: Path, used: set) -> str:
    stem, k = path.stem, 1
    while stem in used:
        k += 1
        stem = f"{path.stem}_{k}"
    used.add(stem)
    return stem


def _explain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from .explain import explain
    from .loading import ARRAY_SUFFIXES, InputError, batches, expand_inputs, read_array
    from .visualize import channel_grid, heatmap, overlay

    loaded, model, pre = _load(args)
    comp = _composite(args, pre)
    classes = _read_classes(args.classes)
    target = _target(args.target, classes)
    files = expand_inputs(args.inputs)
    if not files:
        raise CommandError("no input files found (images: " + ", ".join(sorted({".png", ".jpg", ".npy"})) + ", ...)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    failures = 0
    loaded_inputs = []  # (path, tensor, picture or None)
    for path in files:
        try:
            if path.suffix.lower() in ARRAY_SUFFIXES:
                x, picture = read_array(path), None
            else:
                x, picture = pre.image(path)
            if loaded.channels is not None and x.ndim >= 3 and x.shape[0] != loaded.channels:
                raise InputError(f"{path}: has {x.shape[0]} channels, the model expects {loaded.channels}"
                                 + (" (try --grayscale)" if loaded.channels == 1 else ""))
            loaded_inputs.append((path, x, picture))
        except InputError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)

    groups: dict = {}
    for item in loaded_inputs:
        groups.setdefault(tuple(item[1].shape), []).append(item)
    used: set = set()
    rows = []
    with tqdm(total=len(loaded_inputs), desc="explaining", unit="input", disable=None, file=sys.stderr) as bar:
        for items in groups.values():
            for batch in batches(items, args.batch_size):
                x = torch.stack([item[1] for item in batch]).to(args.device)
                try:
                    res = explain(model, x, target=target, composite=comp)
                except Exception as exc:  # a model/input mismatch: report these inputs, go on with the rest
                    failures += len(batch)
                    names = ", ".join(str(item[0]) for item in batch)
                    print(f"error: {names}: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
                    bar.update(len(batch))
                    continue
                probs = torch.softmax(res.output.float(), 1) if res.output.ndim == 2 else None
                for i, (path, xi, picture) in enumerate(batch):
                    stem = _unique_stem(path, used)
                    relevance = res.relevance[i].cpu()
                    np.save(out / f"{stem}_relevance.npy", relevance.numpy())
                    size = picture.size if picture is not None else None
                    if relevance.ndim in (2, 3):
                        heatmap(relevance, args.cmap, size=size).save(out / f"{stem}_heatmap.png")
                    if picture is not None:
                        overlay(picture, relevance, args.cmap).save(out / f"{stem}_overlay.png")
                    elif relevance.ndim == 3 and relevance.shape[0] > 1:
                        channel_grid(relevance, args.cmap).save(out / f"{stem}_channels.png")
                    pred = int(res.output[i].argmax()) if res.output.ndim == 2 else 0
                    explained = int(res.target[i]) if res.target is not None else 0
                    rows.append({
                        "file": str(path),
                        "predicted": classes[pred] if classes and pred < len(classes) else pred,
                        "probability": f"{float(probs[i, pred]):.4f}" if probs is not None else "",
                        "explained": classes[explained] if classes and explained < len(classes) else explained,
                        "relevance_sum": f"{float(relevance.sum()):.6g}",
                        "outputs": stem,
                    })
                bar.update(len(batch))
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "predicted", "probability", "explained", "relevance_sum",
                                               "outputs"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"explained {len(rows)} of {len(files)} inputs; wrote {out / 'summary.csv'}"
          + (f"; {failures} failed (see errors above)" if failures else ""))
    return 1 if failures else 0


def _read_mask(path: Path, folder: str, pre, spatial: tuple):
    """The ground-truth mask for input ``path``: ``folder/<same name>.*``, an image (nonzero pixels, after the
    same resizing and cropping as the input) or an array; shaped like the input without its channels."""
    from .loading import ARRAY_SUFFIXES, IMAGE_SUFFIXES, InputError, Preprocess

    found = sorted(p for p in Path(folder).glob(path.stem + ".*")
                   if p.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES)
    if not found:
        raise InputError(f"{path}: no mask {path.stem}.<png|npy|...> in {folder}")
    if found[0].suffix.lower() in ARRAY_SUFFIXES:
        import numpy as np
        import torch
        try:
            data = np.load(found[0], allow_pickle=False)
            array = data[data.files[0]] if isinstance(data, np.lib.npyio.NpzFile) else data
            mask = torch.from_numpy(np.asarray(array) != 0)
        except (OSError, ValueError, IndexError) as exc:
            raise InputError(f"{found[0]}: cannot read the mask ({exc})") from None
        mask = mask[0] if mask.ndim == len(spatial) + 1 and mask.shape[0] == 1 else mask
    else:
        mask = Preprocess(size=pre.size, crop=pre.crop, grayscale=True).image(found[0])[0][0] > 0.5
    if tuple(mask.shape) != tuple(spatial):
        raise InputError(f"{found[0]}: the mask has shape {tuple(mask.shape)}, the input {tuple(spatial)}")
    return mask


def _evaluation_inputs(args: argparse.Namespace, loaded, pre):
    """(inputs, masks or None, a description): held-out digits for the built-in model (strokes as masks), else
    the files given (one shape), with their masks from --masks."""
    import torch

    from .loading import ARRAY_SUFFIXES, InputError, expand_inputs, read_array

    if not args.inputs:
        if loaded.kind != "mnist":
            raise CommandError("give the inputs to evaluate on (images, folders or .npy arrays); only --model mnist "
                               "has built-in data")
        if args.masks:
            raise CommandError("--masks goes with input files; the built-in digits use their strokes as masks")
        from .models import mnist_digits
        x, _ = mnist_digits("test", limit=args.limit)
        return x, x[:, 0] > 0.5, "held-out MNIST digits (never seen in training)"
    tensors, masks = [], []
    for path in expand_inputs(args.inputs)[:args.limit]:
        try:
            x = read_array(path) if path.suffix.lower() in ARRAY_SUFFIXES else pre.image(path)[0]
            if loaded.channels is not None and x.ndim >= 3 and x.shape[0] != loaded.channels:
                raise InputError(f"{path}: has {x.shape[0]} channels, the model expects {loaded.channels}")
            if args.masks:
                masks.append(_read_mask(path, args.masks, pre, x.shape[1:] if x.ndim >= 2 else x.shape))
            tensors.append(x)
        except InputError as exc:
            print(f"error: {exc} (skipped)", file=sys.stderr)
    if not tensors:
        raise CommandError("none of the inputs could be read")
    shapes = sorted({tuple(t.shape) for t in tensors})
    if len(shapes) > 1:
        raise CommandError(f"the inputs have different shapes {shapes[:3]}; evaluation needs one shape (use --size "
                           f"and --crop for images)")
    return (torch.stack(tensors), torch.stack(masks) if masks else None,
            f"{len(tensors)} inputs from {', '.join(args.inputs)}")


def _evaluate(args: argparse.Namespace) -> int:
    import functools

    from . import baselines
    from .evaluate import report
    from .evaluate.features import Regions

    loaded, model, pre = _load(args)
    x, masks, source = _evaluation_inputs(args, loaded, pre)
    x = x.to(args.device)
    methods: dict = {}
    for name in args.methods:
        if name == "occlusion":  # the largest patch of 8, 4, 2, 1 that tiles the input
            size = next(p for p in (8, 4, 2, 1) if all(s % p == 0 for s in Regions(x, 1).spatial))
            methods[f"occlusion-{size}"] = functools.partial(baselines.occlusion, patch=size)
        elif name in baselines.METHODS:
            methods[name] = name
        else:
            try:
                methods[name] = _composite(argparse.Namespace(**{**vars(args), "composite": name}), pre)
            except CommandError:
                from .composites import COMPOSITES
                raise CommandError(f"unknown method {name!r}; give composites ({', '.join(COMPOSITES)}) or "
                                   f"baselines ({', '.join(baselines.METHODS)})") from None
    keys = {"occlusion": next((k for k in methods if k.startswith("occlusion-")), "occlusion")}
    randomise = [keys.get(name, name) for name in args.randomise]
    unknown = [name for name in randomise if name not in methods]
    if unknown:
        raise CommandError(f"--randomise {unknown[0]!r} is not among --methods ({', '.join(args.methods)})")
    try:
        regions = Regions(x, args.patch).count
        steps = min(args.steps, regions)  # never more steps than regions to remove
        if steps < args.steps:
            print(f"note: {regions} regions of patch {args.patch}: {steps} steps instead of {args.steps}",
                  file=sys.stderr)
        report.run(model, x, args.out, methods, replacements=args.replace, steps=steps, patch=args.patch,
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


def build_parser() -> argparse.ArgumentParser:
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
                    help="'mnist' (default), a torchvision model name, 'module.path:factory' or a .pt2 file; "
                         "repeat to serve several")
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

    ex = sub.add_parser("explain", help="explain images or arrays with a model; writes heatmaps and a CSV",
                        description="Explain each input; write <name>_heatmap.png, <name>_overlay.png, "
                                    "<name>_relevance.npy and summary.csv into --out.")
    ex.add_argument("inputs", nargs="+", help="image files, folders (searched recursively), .npy/.npz arrays")
    ex.add_argument("--model", default="mnist",
                    help="'mnist' (built-in), a torchvision model name (with --weights), 'module.path:factory', "
                         "or a torch.export program file (.pt2)")
    ex.add_argument("--weights", help="a state dict for the model (a fine-tuned head of another size is fine)")
    ex.add_argument("--composite", default="epsilon-plus-flat",
                    help="lrp0, epsilon, epsilon-plus, epsilon-plus-flat (default), epsilon-gamma-box, "
                         "epsilon-alpha2-beta1, layered")
    ex.add_argument("--low", type=float, help="lowest input value for z^B (default: from the preprocessing)")
    ex.add_argument("--high", type=float, help="highest input value for z^B (default: from the preprocessing)")
    ex.add_argument("--maxpool", choices=["max", "average"], default="max", help="relevance at max-pooling")
    ex.add_argument("--target", help="class to explain: 'pred' (default), an index, or a name from --classes")
    ex.add_argument("--classes", help="text file with one class name per line")
    ex.add_argument("--size", type=int, help="resize images so the shorter side has this many pixels")
    ex.add_argument("--crop", type=int, help="centre-crop images to this square size")
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
    ev.add_argument("--methods", nargs="+", default=list(EVALUATE_METHODS),
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
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"lrp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
