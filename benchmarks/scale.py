"""Throughput of ``lrp explain --store zarr`` (files decoded by DataLoader workers, explained, written to Zarr) next
to the explainer alone (``lrp.Explainer``, as the run uses it) on the same batches, already decoded, in the same
run.

    .venv/bin/python benchmarks/scale.py [--digits N] [--batch B] [--repeats R] [--gpu-images N] [--out FILE]

Rows: MNIST digits (PNG files written from the shipped mnist10k.npz), the built-in model, epsilon-plus-flat, on
the CPU with 1 process and with 2 processes (torchrun --standalone --nproc-per-node 2, gloo; torchrun gives each
rank one thread); and, where CUDA is available, torchvision ResNet50 (random weights) on 224x224 crops of
random 256x256 JPEGs on the GPU (1 process). The reference of each row is one ``lrp.Explainer`` (called twice on
the first batch before the clock starts, so that batches of the full size replay its recorded program, as in the
run) over the same batches in the same arrangement: in this process for 1 process (timed with 1 torch thread and with torch's default, one
per core, and the faster taken: the run itself uses the cores less its DataLoader workers, so 1 thread on 2
cores), and under the same torchrun (each rank its round-robin share of the chunks, as the run gives it, with
torchrun's 1 thread) for 2. The pipeline's items/s is what the run reports: its inputs over
the time from the plan to the last chunk on disk (start-up of Python and model loading not counted; DataLoader
start-up and the first batch counted). Each measurement is repeated (--repeats), the two alternating; the table
shows the median. ratio = pipeline / reference (the issue's target: >= 0.90).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import lrp

from harness import machine_lines  # benchmarks/harness.py

CHUNK = 256  # rows per chunk for the CPU rows: 4 batches of 64


def write_digits(folder: Path, n: int) -> torch.Tensor:
    """``n`` MNIST digits as PNGs; the tensors they hold."""
    x, _ = lrp.models.mnist_digits("all", limit=n)
    pixels = (x[:, 0].numpy() * 255).round().astype("uint8")
    for i in range(n):
        Image.fromarray(pixels[i]).save(folder / f"{i:05d}.png")
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[:, None]


def batches_of(rows: list[int], batch: int, chunk: int) -> list[list[int]]:
    """The run's batches of ``rows``: ``batch`` at a time, never across a chunk."""
    out: list[list[int]] = []
    for k in sorted({r // chunk for r in rows}):
        part = [r for r in rows if r // chunk == k]
        out += [part[i:i + batch] for i in range(0, len(part), batch)]
    return out


def reference(model: torch.nn.Module, x: torch.Tensor, batch: int, chunk: int, rank: int = 0, world: int = 1,
              device: str = "cpu") -> float:
    """Items/s of an ``lrp.Explainer`` alone over this rank's share of the run's batches (two warm-up calls
    first: the eager one and the recording)."""
    chunks = -(-len(x) // chunk)
    mine = [r for k in range(chunks)[rank::world] for r in range(k * chunk, min((k + 1) * chunk, len(x)))]
    todo = [x[b].to(device) for b in batches_of(mine, batch, chunk)]
    explainer = lrp.Explainer(model)
    explainer(todo[0]), explainer(todo[0])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if world > 1:
        torch.distributed.barrier()
    sync()
    start = time.perf_counter()
    for xb in todo:
        explainer(xb).relevance.cpu()
    sync()
    if world > 1:
        torch.distributed.barrier()
    return len(x) / (time.perf_counter() - start)


def reference_best(model: torch.nn.Module, x: torch.Tensor, batch: int, chunk: int) -> tuple[float, int]:
    """The faster of :func:`reference` with 1 torch thread and with torch's default; (items/s, threads)."""
    default = torch.get_num_threads()
    found = []
    try:
        for threads in sorted({1, default}):
            torch.set_num_threads(threads)
            found.append((reference(model, x, batch, chunk), threads))
    finally:
        torch.set_num_threads(default)
    return max(found)


def pipeline_rate(command: list[str], cwd: Path) -> float:
    """Run ``lrp explain --store zarr`` and read the items/s it reports."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return float(re.search(r"\(([\d.]+) inputs/s\)", result.stdout).group(1))


def rank_reference(args: argparse.Namespace) -> None:
    """Under torchrun: each rank times an ``lrp.Explainer`` on its share; rank 0 prints the items/s."""
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    x = torch.load(args.rank_reference, weights_only=True)
    rate = reference(lrp.models.mnist(), x, args.batch, CHUNK, rank, world)
    if rank == 0:
        print(f"REFERENCE {rate}")
    torch.distributed.destroy_process_group()


def cpu_rows(args: argparse.Namespace, work: Path) -> list[tuple]:
    x = write_digits(work / "digits", args.digits)
    torch.save(x, work / "x.pt")
    lrp_cmd = ["-m", "lrp", "explain", "digits", "--store", "zarr", "--batch-size", str(args.batch),
               "--chunk", str(CHUNK)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    model = lrp.models.mnist()
    rows = []
    for procs in (1, 2):
        refs, runs, threads = [], [], 1
        for r in range(args.repeats):
            out = ["--out", f"out-{procs}-{r}"]
            if procs == 1:
                rate, threads = reference_best(model, x, args.batch, CHUNK)
                refs.append(rate)
                runs.append(pipeline_rate([sys.executable, *lrp_cmd, *out], work))
            else:
                ref = subprocess.run([*torchrun, os.path.abspath(__file__), "--rank-reference", "x.pt", "--batch",
                                      str(args.batch)], cwd=work, capture_output=True, text=True, timeout=1800)
                refs.append(float(re.search(r"REFERENCE ([\d.]+)", ref.stdout).group(1)))
                runs.append(pipeline_rate([*torchrun, *lrp_cmd, *out], work))
            print(f"  MNIST CPU, {procs} process(es), repeat {r + 1}: lrp.Explainer {refs[-1]:.0f}/s ({threads} "
                  f"thread(s) per process), pipeline {runs[-1]:.0f}/s, load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr)
        rows.append((f"MNIST 28x28, CPU, {procs} process{'es' if procs > 1 else ''}", args.digits, args.batch,
                     statistics.median(refs), statistics.median(runs)))
    return rows


def gpu_rows(args: argparse.Namespace, work: Path) -> list[tuple]:
    import torchvision
    folder = work / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.gpu_images):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg",
                                                                                 quality=90)
    pipe = lrp.pipeline.Pipeline.load("resnet50", device="cuda")
    x = torch.stack([pipe.image(p).x for p in sorted(folder.glob("*.jpg"))])
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().cuda()
    batch, chunk = 64, 256
    refs, runs = [], []
    for r in range(args.repeats):
        refs.append(reference(model, x, batch, chunk, device="cuda"))
        runs.append(pipeline_rate([sys.executable, "-m", "lrp", "explain", "images", "--model", "resnet50",
                                   "--device", "cuda", "--store", "zarr", "--batch-size", str(batch), "--chunk",
                                   str(chunk), "--out", f"gpu-{r}"], work))
    return [("ResNet50 224x224, GPU, 1 process", args.gpu_images, batch, statistics.median(refs),
             statistics.median(runs))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=int, default=4000, help="MNIST digits (PNG files) per run")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-images", type=int, default=2048, help="JPEGs for the ResNet50 row (CUDA only)")
    parser.add_argument("--out", help="also write the report to this Markdown file")
    parser.add_argument("--rank-reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_reference:
        return rank_reference(args)
    header = machine_lines([f"lrp {metadata.version('lrp')}", f"zarr {metadata.version('zarr')}"])
    header.append(f"- load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("\n".join(header), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "digits").mkdir()
        rows = cpu_rows(args, work)
        if torch.cuda.is_available():
            rows += gpu_rows(args, work)
        else:
            rows.append(("ResNet50 224x224, GPU", None, None, None, None))
    table = ["| inputs | items | batch | lrp.Explainer items/s | pipeline items/s | ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, n, batch, ref, run in rows:
        if ref is None:
            table.append(f"| {name} | skipped: no CUDA device here | | | | |")
        else:
            table.append(f"| {name} | {n} | {batch} | {ref:.0f} | {run:.0f} | {run / ref:.2f} |")
    text = "\n".join(header) + "\n\n" + "\n".join(table) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
