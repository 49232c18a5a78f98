"""The ``lrp`` command line: ``lrp demo`` and ``lrp explain``."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Optional, Sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CommandError(Exception):
    """A problem that ends the command with one line on stderr and exit status 2."""


def _demo(args: argparse.Namespace) -> int:
    from . import demo_report
    demo_report.run(args.out)
    return 0


def _read_classes(path: Optional[str]) -> Optional[list[str]]:
    if path is None:
        return None
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise CommandError(f"cannot read class names from {path}: {exc.strerror}") from None


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
    import torch

    from .composites import composite
    params = {}
    if args.composite in ("epsilon-gamma-box", "layered"):
        low, high = args.low, args.high
        if low is None or high is None:  # derive the input's range from the preprocessing: pixels in [0, 1]
            mean = torch.tensor(pre.mean or (0.0,))
            std = torch.tensor(pre.std or (1.0,))
            low, high = (0 - mean) / std, (1 - mean) / std
            low, high = (low.item(), high.item()) if low.numel() == 1 else (low, high)
        params = {"low": low, "high": high}
    try:
        return composite(args.composite, maxpool=args.maxpool, **params)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _preprocess(args: argparse.Namespace, loaded):
    from .loading import Preprocess
    defaults = {"mnist": dict(size=28, grayscale=True),
                "torchvision": dict(size=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)}.get(loaded.kind, {})
    pre = Preprocess(**defaults)
    for key in ("size", "crop", "mean", "std"):
        if getattr(args, key) is not None:
            setattr(pre, key, getattr(args, key))
    pre.grayscale = pre.grayscale or args.grayscale
    pre.invert = args.invert
    return pre


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
    from .loading import ARRAY_SUFFIXES, InputError, ModelError, batches, expand_inputs, load_model, read_array
    from .visualize import channel_grid, heatmap, overlay

    try:
        loaded = load_model(args.model, args.weights)
    except ModelError as exc:
        raise CommandError(str(exc)) from None
    model = loaded.model.to(args.device)
    pre = _preprocess(args, loaded)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrp", description="Layer-wise Relevance Propagation for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="explain held-out MNIST digits with the built-in model and write a report")
    demo.add_argument("--out", default="lrp-demo", help="output folder (default: lrp-demo)")
    demo.set_defaults(func=_demo)

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
    ex.add_argument("--device", default="cpu", help="cpu or cuda")
    ex.add_argument("--cmap", default="bwr", help="colour map: bwr, seismic, coldnhot, gray, wred")
    ex.add_argument("--out", default="lrp-out", help="output folder (default: lrp-out)")
    ex.set_defaults(func=_explain)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"lrp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
