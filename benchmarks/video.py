"""End-to-end speed of ``lrp video`` (decode -> preprocess -> explain -> render -> encode) in frames per second,
next to the same pipeline with a plain gradient (gradient x input) in place of LRP and with no model at all.

    .venv/bin/python benchmarks/video.py [--device {cpu,cuda}] [--settings mnist,resnet50] [--frames N]
                                         [--reps R] [--quick] [--threads T] [--out FILE]

Settings: ``mnist``: the built-in MNIST model on a clip of held-out digits at 112x112 (each pixel a 4x4 block),
batch 64; ``resnet50``: torchvision ResNet50 (random weights, fixed seed) on a 320x256 clip of moving colour blobs,
resized to 256 and centre-cropped to 224 as `lrp video` does for torchvision models, batch 16 on the CPU, 64 on
cuda. Both: H.264 in (generated first, not timed), H.264 out (`.mp4`), the overlay layout, every frame explained.

Methods, each a whole run of :func:`lrp.video.explain_video` on the same clip: ``lrp`` (one ``lrp.Explainer``,
epsilon-plus-flat: what ``lrp video`` does), ``gradient x input`` (the model's gradient of the predicted logit times
the input, in place of LRP: the reference of the ratio), ``no model`` (a zero heatmap: decoding, preprocessing,
rendering and encoding alone). One warm-up run of each method on the first frames, then ``--reps`` timed runs,
round-robin (the starting method rotates), median. frames/s = frames / seconds from the first decoded frame to the
renamed output file; ratio = seconds of lrp / seconds of gradient x input, end to end. torch runs with --threads
CPU threads, by default as `lrp video` does: 1 for models under 5 M parameters (mnist), else 2 (as speed.py); the
report gives the machine's load average before and after.

Defaults: cpu: --settings mnist,resnet50, mnist 960 frames (--quick 480), resnet50 48 frames (--quick 16); cuda:
--settings mnist,resnet50, mnist 2048 frames, resnet50 512 frames; --reps 3 (--quick: 1; resnet50 on the CPU: 1).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import av
import numpy as np
import torch

import lrp
import lrp.video
from lrp.pipeline import Pipeline

from harness import argument_parser, check_device, comma_list, fmt, machine_lines, refuse, report  # benchmarks/

THREADS = 2
SETTINGS = ("mnist", "resnet50")
FRAMES = {("cpu", "mnist"): 960, ("cpu", "resnet50"): 48, ("cuda", "mnist"): 2048, ("cuda", "resnet50"): 512}
QUICK_FRAMES = {("cpu", "mnist"): 480, ("cpu", "resnet50"): 16, ("cuda", "mnist"): 1024, ("cuda", "resnet50"): 256}
BATCH = {("cpu", "mnist"): 64, ("cpu", "resnet50"): 16, ("cuda", "mnist"): 256, ("cuda", "resnet50"): 64}
METHODS = {"lrp": "lrp epsilon-plus-flat", "grad": "gradient x input", "none": "no model"}
WARMUP_FRAMES = 8


# --------------------------------------------------------------------------- clips

def write_clip(path: Path, frames: np.ndarray, rate: int = 25) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": "18", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def digit_frames(n: int) -> np.ndarray:
    """Held-out MNIST digits (cycled), white on black, 112x112."""
    x, _ = lrp.models.mnist_digits("test")
    digits = (x[torch.arange(n) % len(x), 0].numpy() * 255).round().astype(np.uint8)
    big = digits.repeat(4, 1).repeat(4, 2)
    return np.repeat(big[..., None], 3, -1)


def blob_frames(n: int, width: int = 320, height: int = 256) -> np.ndarray:
    """Smooth colour blobs drifting across the frame: a stand-in for camera footage (H.264 has work to do)."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((1, 3, 12, 14)).astype(np.float32))
    field = torch.nn.functional.interpolate(coarse, size=(height * 2, width * 2), mode="bicubic",
                                            align_corners=False)[0].clamp(0, 1)
    field = (field.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    frames = []
    for i in range(n):
        dy, dx = (3 * i) % height, (5 * i) % width
        frames.append(field[dy:dy + height, dx:dx + width])
    return np.stack(frames)


# --------------------------------------------------------------------------- methods

def gradient_x_input(pipeline: Pipeline) -> Callable[[torch.Tensor, Optional[int]], torch.Tensor]:
    """Gradient x input of the predicted (or given) logit: an ``explain`` for :func:`lrp.video.explain_video`."""
    def explain(x: torch.Tensor, target: Optional[int]) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        out = pipeline.model(x)
        index = out.argmax(1) if target is None else torch.full((len(x),), target, device=out.device)
        (grad,) = torch.autograd.grad(out.gather(1, index[:, None]).sum(), x)
        return (grad * x).detach()
    return explain


def no_model(pipeline: Pipeline) -> Callable[[torch.Tensor, Optional[int]], torch.Tensor]:
    """A zero heatmap without running the model: decoding, preprocessing, rendering and encoding alone."""
    def explain(x: torch.Tensor, target: Optional[int]) -> torch.Tensor:
        return torch.zeros(len(x), *x.shape[-2:], device=x.device)
    return explain


# None: lrp video's own LRP (one lrp.Explainer, epsilon-plus-flat)
EXPLAIN: dict[str, Optional[Callable[[Pipeline], Callable]]] = {"lrp": None, "grad": gradient_x_input,
                                                                 "none": no_model}


def run_once(pipeline: Pipeline, clip: Path, out: Path, method: str, batch: int, device: str) -> tuple[int, float]:
    """(frames, seconds) of one explain_video run with ``method`` in place of LRP (its ``explain`` hook)."""
    make = EXPLAIN[method]
    summary = lrp.video.explain_video(pipeline, clip, out, batch_size=batch, progress=False,
                                      explain=make(pipeline) if make is not None else None)
    if device == "cuda":
        torch.cuda.synchronize()
    return summary.frames, summary.seconds


def bench(setting: str, device: str, frames: int, reps: int, threads: Optional[int], folder: Path,
          errors: list[str]) -> Optional[str]:
    """The table row of one setting (None when it failed: the traceback goes to ``errors``)."""
    batch = BATCH[(device, setting)]
    torch.manual_seed(0)
    pipeline = Pipeline.load("mnist" if setting == "mnist" else "resnet50", device=device)
    torch.set_num_threads(threads or lrp.video.default_threads(pipeline.model) or THREADS)  # as lrp video
    make = digit_frames if setting == "mnist" else blob_frames
    clip, warm = folder / f"{setting}.mp4", folder / f"{setting}-warm.mp4"
    pictures = make(frames)
    write_clip(clip, pictures)
    write_clip(warm, pictures[:WARMUP_FRAMES])
    size = f"{pictures.shape[2]}x{pictures.shape[1]}"
    times: dict[str, list[float]] = {key: [] for key in METHODS}
    keys = list(METHODS)
    try:
        for key in keys:
            run_once(pipeline, warm, folder / "out.mp4", key, batch, device)
        for rep in range(reps):
            for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
                count, seconds = run_once(pipeline, clip, folder / "out.mp4", key, batch, device)
                assert count == frames, (count, frames)
                times[key].append(seconds)
            print(f"  {setting}: round {rep + 1}/{reps} done", file=sys.stderr, flush=True)
    except Exception:
        errors.append(f"{setting}:\n{traceback.format_exc()}")
        return None
    median = {key: statistics.median(v) for key, v in times.items()}
    fps = {key: frames / median[key] for key in keys}
    return (f"| {setting} | {device} | {torch.get_num_threads()} | {frames} | {size} | {batch} | {fps['lrp']:.1f} | "
            f"{fps['grad']:.1f} | "
            f"{fps['none']:.1f} | {fmt(median['lrp'] / median['grad'], '.2f')} |")


def main() -> None:
    parser = argument_parser(__doc__)  # with --device
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--frames", type=int, help="frames per clip (default: see above)")
    parser.add_argument("--reps", type=int, help="timed runs per method (default: see above)")
    parser.add_argument("--quick", action="store_true", help="fewer frames, one timed run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: as lrp video: 1 for mnist, "
                                                    f"{THREADS} for resnet50)")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    args = parser.parse_args()
    check_device(args.device)
    settings = comma_list(args.settings)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        refuse(f"--settings: unknown setting(s) {', '.join(unknown) or '(none given)'}; choose from "
               f"{', '.join(SETTINGS)}")
    if (args.frames is not None and args.frames < WARMUP_FRAMES) or (args.reps is not None and args.reps < 1):
        refuse(f"--frames must be at least {WARMUP_FRAMES} and --reps at least 1")
    if args.threads is not None and args.threads < 1:
        refuse("--threads must be at least 1")
    load_before = os.getloadavg()[0]
    header = machine_lines([f"torchvision {metadata.version('torchvision')}", f"PyAV {av.__version__}",
                            f"lrp {lrp.__version__}"])
    if args.device == "cuda":
        header.append(f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    header.append("- end to end: decode (H.264), preprocess, explain, render (overlay), encode (H.264, libx264 "
                  "veryfast, crf 18); one warm-up run per method, then the median of the timed runs, round-robin; "
                  "torch threads per row in the table")
    print("\n".join(header), flush=True)
    errors: list[str] = []
    rows = ["| setting | device | threads | frames | frame size | batch | lrp frames/s | gradient x input frames/s | "
            "no model frames/s | lrp / gradient (time) |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            key = (args.device, setting)
            frames = args.frames or (QUICK_FRAMES if args.quick else FRAMES)[key]
            reps = args.reps or (1 if args.quick or key == ("cpu", "resnet50") else 3)
            row = bench(setting, args.device, frames, reps, args.threads, Path(tmp), errors)
            if row is not None:
                rows.append(row)
                print(row, flush=True)
    notes = ["frames/s: frames / seconds of the whole run (first decoded frame to the renamed output file); "
             "no model: the same run with a zero heatmap in place of the model.",
             f"load average (1 min) before and after: {load_before:.2f}, {os.getloadavg()[0]:.2f} on "
             f"{os.cpu_count()} CPUs (other work on the machine slows every method, and torch's threads most)."]
    report(header, "\n".join(rows), notes, errors, args.out)


if __name__ == "__main__":
    main()
