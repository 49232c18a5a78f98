"""Speed and memory of lrp.explain next to a plain gradient and zennit, on torchvision vgg16 / resnet50 (CPU).

    .venv/bin/python benchmarks/speed.py [--quick] [--out FILE]

Time: every method is warmed up twice, then called round-robin (the starting method rotates each round) so
that machine drift hits all methods alike; the table shows the median. Memory: each (model, batch, method) runs
in a fresh subprocess (``--measure-memory MODEL BATCH METHOD``) that reports the rise of its peak resident set
size over one warm-up and one measured call. Ratios are to ``grad x input`` for the same model and batch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from importlib import metadata
from typing import Callable

import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import lrp

from machine import cpu_name  # benchmarks/machine.py

THREADS = 2
MODELS = {"vgg16": VGGCanonizer, "resnet50": ResNetCanonizer}
# method key -> label in the table; "grad x input" is the reference for the ratios
METHODS = {
    "forward": "forward",
    "grad": "grad x input",
    "lrp-epf": "lrp epsilon-plus-flat",
    "lrp-egb": "lrp epsilon-gamma-box",
    "zennit-epf": "zennit EpsilonPlusFlat",
    "zennit-egb": "zennit EpsilonGammaBox",
}
REFERENCE = "grad"


def _malloc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0), or a no-op elsewhere."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


# Called (untimed) after every timed call: without it glibc keeps freed heap memory and the timing process
# grew past 15 GB RSS on vgg16 batch 8 (and was killed); with it every call starts from the same heap state.
release_memory = _malloc_trim()


def load_model(name: str) -> torch.nn.Module:
    """Random weights (fixed seed), eval mode, no parameter gradients."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_input(batch: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, 224, 224)


def one_hot_times_output(out: torch.Tensor) -> torch.Tensor:
    """Start relevance for zennit: the predicted class's logit (lrp's default ``start="score"``)."""
    return torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0) * out.detach()


def make_method(key: str, model_name: str, model: torch.nn.Module, x: torch.Tensor,
                stack: contextlib.ExitStack) -> Callable[[], object]:
    """A zero-argument callable running one method on ``x``.

    zennit methods get their own deep copy of the model, with the attributor context entered once on ``stack``
    (hook registration and canonizing are one-off costs); the canonizers change only that copy, so lrp and the
    baselines always run on the untouched model.
    """
    if key == "forward":
        def run():
            with torch.no_grad():
                return model(x)
        return run
    if key == "grad":
        def run():
            leaf = x.detach().requires_grad_(True)
            out = model(leaf)
            one_hot = torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)
            (g,) = torch.autograd.grad(out, leaf, one_hot)  # gradient of the predicted-class logit
            return leaf.detach() * g
        return run
    if key == "lrp-epf":
        return lambda: lrp.explain(model, x, composite="epsilon-plus-flat").relevance
    if key == "lrp-egb":
        comp = lrp.composite("epsilon-gamma-box", low=-3.0, high=3.0)
        return lambda: lrp.explain(model, x, composite=comp).relevance
    if key in ("zennit-epf", "zennit-egb"):
        canonizers = [MODELS[model_name]()]
        if key == "zennit-epf":
            comp = EpsilonPlusFlat(canonizers=canonizers)
        else:
            comp = EpsilonGammaBox(low=-3.0, high=3.0, canonizers=canonizers)
        attributor = stack.enter_context(Gradient(model=copy.deepcopy(model), composite=comp))
        # a fresh leaf per call: zennit would otherwise set requires_grad on the shared input in place
        return lambda: attributor(x.detach().requires_grad_(True), one_hot_times_output)[1]
    raise ValueError(f"unknown method {key!r}")


# --------------------------------------------------------------------------- memory (child process)

def peak_rss_kb() -> int:
    """This process's peak resident set size in KB: VmHWM (per address space, reset by clear_refs), else
    ru_maxrss. ru_maxrss alone is not enough here: after fork+exec it starts at the parent's peak RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux


def measure_memory(model_name: str, batch: int, key: str) -> None:
    """Print the peak RSS rise (MB) over one warm-up + one measured call, as one JSON line."""
    torch.set_num_threads(THREADS)
    model = load_model(model_name)
    x = make_input(batch)
    with contextlib.ExitStack() as stack:
        run = make_method(key, model_name, model, x, stack)
        gc.collect()
        try:  # reset the peak to the current RSS (Linux >= 4.0), so setup transients do not mask the peak
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        before = peak_rss_kb()
        result = run()
        del result
        result = run()
        del result
        after = peak_rss_kb()
    print(json.dumps({"mb": (after - before) / 1024}))


def memory_in_subprocess(model_name: str, batch: int, key: str) -> float | None:
    cmd = [sys.executable, __file__, "--measure-memory", model_name, str(batch), key]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory measurement failed: {' '.join(cmd)}\n{proc.stderr}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["mb"]


# --------------------------------------------------------------------------- timing

def time_methods(model_name: str, model: torch.nn.Module, batch: int, reps: int,
                 errors: list[str]) -> dict[str, float | None]:
    """Median seconds per method, round-robin; a method that raises is dropped (traceback kept in ``errors``)."""
    x = make_input(batch)
    times: dict[str, list[float]] = {k: [] for k in METHODS}
    with contextlib.ExitStack() as stack:
        runs: dict[str, Callable[[], object]] = {}
        for key in METHODS:
            try:
                runs[key] = make_method(key, model_name, model, x, stack)
            except Exception:
                errors.append(f"{model_name} batch {batch} {METHODS[key]} (setup):\n{traceback.format_exc()}")
        keys = list(runs)
        for rnd in range(2 + reps):  # the first two rounds are warm-up
            order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
            for key in order:
                if key not in runs:
                    continue
                try:
                    t0 = time.perf_counter()
                    result = runs[key]()
                    dt = time.perf_counter() - t0
                except Exception:
                    errors.append(f"{model_name} batch {batch} {METHODS[key]}:\n{traceback.format_exc()}")
                    del runs[key]
                    continue
                del result
                release_memory()
                if rnd >= 2:
                    times[key].append(dt)
            print(f"  {model_name} batch {batch}: round {rnd + 1}/{2 + reps} done", file=sys.stderr, flush=True)
    return {k: statistics.median(v) if v else None for k, v in times.items()}


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 repetitions, batch 1 only")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    parser.add_argument("--measure-memory", nargs=3, metavar=("MODEL", "BATCH", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure_memory:
        model_name, batch, key = args.measure_memory
        measure_memory(model_name, int(batch), key)
        return

    torch.set_num_threads(THREADS)
    reps, batches = (3, [1]) if args.quick else (7, [1, 8])
    header = [
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"zennit {metadata.version('zennit')}, lrp {lrp.__version__}, Python {platform.python_version()}",
        f"- threads: {torch.get_num_threads()}; CPU: {cpu_name()}",
        f"- float32, 224x224, random weights; {reps} timed repetitions after 2 warm-ups, round-robin, median",
    ]
    print("\n".join(header), flush=True)

    errors: list[str] = []
    rows = ["| model | batch | method | median s | ratio | peak extra MB | MB ratio |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for model_name in MODELS:
        model = load_model(model_name)
        for batch in batches:
            medians = time_methods(model_name, model, batch, reps, errors)
            mem = {}
            for key in METHODS:
                mem[key] = memory_in_subprocess(model_name, batch, key)
                print(f"  {model_name} batch {batch}: memory {key} done", file=sys.stderr, flush=True)
            t_ref, m_ref = medians[REFERENCE], mem[REFERENCE]
            for key, label in METHODS.items():
                t, m = medians[key], mem[key]
                rows.append(
                    f"| {model_name} | {batch} | {label} | {fmt(t, '.4f')} | "
                    f"{fmt(t / t_ref if t is not None and t_ref else None, '.2f')} | {fmt(m, '.0f')} | "
                    f"{fmt(m / m_ref if m is not None and m_ref else None, '.2f')} |")
                print("  " + rows[-1], file=sys.stderr, flush=True)  # partial results, in case of a crash
        del model
        gc.collect()

    table = "\n".join(rows)
    print("\n" + table)
    if errors:
        print("\nErrors:\n\n" + "\n".join(errors))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(header) + "\n\n" + table + "\n")
            if errors:
                f.write("\nErrors:\n\n```\n" + "\n".join(errors) + "```\n")


if __name__ == "__main__":
    main()
