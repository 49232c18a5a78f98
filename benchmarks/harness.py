"""What speed.py and llm.py share: round-robin timing, peak memory (CPU: resident set size in a fresh
subprocess; cuda: allocated memory), the command-line checks, the header's machine lines and the report's
formatting and output.

A method is a zero-argument callable; ``runs`` maps a method key to one, ``labels`` a method key to its label in
the table (and in error messages). A script that measures CPU memory with :func:`memory_in_subprocesses` runs
itself again with ``--measure-memory ARGS...``, and that child prints its result with :func:`print_rss_rise`.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

import torch

from machine import cpu_name  # benchmarks/machine.py

Runs = dict[str, Callable[[], object]]


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


# --------------------------------------------------------------------------- timing

def clock(device: str) -> Callable[[], float]:
    """perf_counter, after torch.cuda.synchronize() on cuda (kernels run asynchronously)."""
    if device != "cuda":
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()
    return now


def time_runs(runs: Runs, device: str, reps: int, labels: dict[str, str], errors: list[str],
              tag: str) -> dict[str, float]:
    """Median seconds per method over ``reps`` rounds after two warm-up rounds, round-robin (the starting method
    rotates each round); :data:`release_memory` runs after every call, untimed. A method that raises is dropped
    from ``runs`` (traceback kept in ``errors``)."""
    now = clock(device)
    times: dict[str, list[float]] = {k: [] for k in runs}
    keys = list(runs)
    for rnd in range(2 + reps):  # the first two rounds are warm-up
        order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
        for key in order:
            if key not in runs:
                continue
            try:
                t0 = now()
                result = runs[key]()
                dt = now() - t0
            except Exception:
                errors.append(f"{tag} {labels[key]}:\n{traceback.format_exc()}")
                del runs[key]
                continue
            del result
            release_memory()
            if rnd >= 2:
                times[key].append(dt)
        print(f"  {tag}: round {rnd + 1}/{2 + reps} done", file=sys.stderr, flush=True)
    return {k: statistics.median(v) for k, v in times.items() if v}


# --------------------------------------------------------------------------- memory on the CPU

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


def print_rss_rise(run: Callable[[], object], trim: bool = False) -> None:
    """(CPU, child process) Print the rise (MB) of this process's peak RSS over one warm-up and one measured call
    of ``run``, as one JSON line. ``trim``: :data:`release_memory` first (after the garbage collection)."""
    gc.collect()
    if trim:
        release_memory()
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


def memory_in_subprocess(script: str, args: Sequence[str]) -> Optional[float]:
    """Run ``script --measure-memory *args`` in a fresh Python process; the MB its :func:`print_rss_rise`
    printed, or None (with the command and its stderr on stderr) when it failed."""
    cmd = [sys.executable, script, "--measure-memory", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory measurement failed: {' '.join(cmd)}\n{proc.stderr}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["mb"]


def memory_in_subprocesses(script: str, keys: Sequence[str], args: Callable[[str], Sequence[str]],
                           tag: str) -> dict[str, Optional[float]]:
    """(CPU) Peak RSS rise per method, each in a fresh subprocess run with ``args(key)``."""
    mem = {}
    for key in keys:
        mem[key] = memory_in_subprocess(script, args(key))
        print(f"  {tag}: memory {key} done", file=sys.stderr, flush=True)
    return mem


# --------------------------------------------------------------------------- memory on cuda

def cuda_peak_mb(run: Callable[[], object]) -> float:
    """Peak CUDA memory (MB) during one call, above what was allocated right before it."""
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - before) / 2**20


EXPLAINER_NOTES: list[str] = []  # one line per warmed explainer: CUDA graphs or why not, memory held


def warmed_explainer(explainer: Any, call: Callable[[], object], device: str, tag: str) -> Callable[[], object]:
    """``call`` after six calls of it (eager, recorded, first replay; on a GPU also the CUDA graph's capture, its
    check and a first graphed call), so that every timed call is like the ones that follow. Notes in
    ``EXPLAINER_NOTES`` whether the replays run as CUDA graphs and, on a GPU, the memory the explainer holds
    between calls (its graphs' pool and kept weight-derived tensors: reserved memory after the warm-up calls
    minus before them, with the allocator's unused cache emptied both times)."""
    held = ""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved()
    for _ in range(6):
        call()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        held = f"; held between calls {(torch.cuda.memory_reserved() - before) / 2**20:.0f} MB"
    why = explainer.why_not_graphed
    compiled = ""
    if getattr(explainer, "compile", False):
        reason = explainer.why_not_compiled
        compiled = "; compiled" if reason is None else f"; not compiled: {reason}"
    EXPLAINER_NOTES.append(f"- {tag}: calls {dict(explainer.calls)}; "
                           f"{'replays run as a CUDA graph' if why is None else 'no CUDA graph: ' + why}"
                           f"{compiled}{held}")
    return call


def cuda_memory(runs: Runs, labels: dict[str, str], errors: list[str], tag: str) -> dict[str, Optional[float]]:
    """:func:`cuda_peak_mb` per method; None for one that raises (traceback kept in ``errors``)."""
    mem: dict[str, Optional[float]] = {}
    for key, run in runs.items():
        try:
            mem[key] = cuda_peak_mb(run)
        except Exception:
            errors.append(f"{tag} {labels[key]} (memory):\n{traceback.format_exc()}")
            mem[key] = None
    return mem


# --------------------------------------------------------------------------- command line

def argument_parser(doc: Optional[str]) -> argparse.ArgumentParser:
    """A parser whose description is the script's docstring (printed as written), with ``--device {cpu,cuda}``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return parser


def refuse(message: str) -> NoReturn:
    """One line on stderr, prefixed with the script's name, exit code 2 (as argparse does for a bad argument)."""
    print(f"{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr)
    sys.exit(2)


def check_device(device: str) -> None:
    """Refuses --device cuda where there is no CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        refuse("--device cuda: no CUDA device is available on this machine (torch.cuda.is_available() is "
               "False); use --device cpu")


def frozen_torchvision(name: str, device: str) -> torch.nn.Module:
    """torchvision model ``name`` with random weights (seed 0), in eval mode on ``device``, parameters frozen (as
    lrp freezes them, so that the gradient it is compared with computes no weight gradients either)."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def int_list(text: str) -> list[int]:
    """A comma list of integers; [] when an item is not one."""
    try:
        return [int(item) for item in comma_list(text)]
    except ValueError:
        return []


# --------------------------------------------------------------------------- report

def machine_lines(packages: Sequence[str]) -> list[str]:
    """The header's first lines: torch, ``packages`` ("name version" each) and Python; torch's CPU threads and
    the CPU."""
    return [f"- torch {torch.__version__}, {', '.join(packages)}, Python {platform.python_version()}",
            f"- threads: {torch.get_num_threads()}; CPU: {cpu_name()}"]


def gpu_line(settings: str = "") -> str:
    """The header's line for --device cuda: the GPU, CUDA, ``settings`` and what the memory column measures."""
    return (f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}; {settings}peak extra MB: CUDA memory "
            f"allocated above that held before the call (weights and input not counted)")


def fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    return value / reference if value is not None and reference else None


def report(header: list[str], table: str, notes: list[str], errors: list[str], out: Optional[str]) -> None:
    """Print the table, the notes and the errors (the header is printed before the run); with ``out``, also write
    header, table, notes and errors to that file as Markdown."""
    print("\n" + table)
    if notes:
        print("\n" + "\n".join(notes))
    if errors:
        print("\nErrors:\n\n" + "\n".join(errors))
    if out:
        with open(out, "w") as f:
            f.write("\n".join(header) + "\n\n" + table + "\n")
            if notes:
                f.write("\n" + "\n".join(notes) + "\n")
            if errors:
                f.write("\nErrors:\n\n```\n" + "\n".join(errors) + "```\n")
