"""Time of MNIST pixel flipping: lrp.evaluate.perturbation_curve against Quantus's PixelFlipping.

    python benchmarks/evaluate_speed.py [--digits 1000] [--steps 100] [--repeats 3] [--no-quantus]

Both remove the pixels of 1,000 held-out digits (28x28) in the order of the same LRP heatmaps, most relevant
first, replacing them with 0 (Quantus: "black", which is 0 for MNIST), and track the softmax probability of the
explained class. lrp removes 784 / 100 pixels per step in 100 steps; Quantus removes a fixed whole number per
step, 784 // 100 = 7, which gives 112 steps: compare the rates (perturbed inputs per second), not the times alone.
Times are medians over --repeats runs, on the CPU with torch's default threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import lrp
from lrp import evaluate

from machine import cpu_name  # benchmarks/machine.py


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-quantus", action="store_true")
    args = parser.parse_args()

    model = lrp.models.mnist()
    x, _ = lrp.models.mnist_digits("test", limit=args.digits)
    explained = lrp.explain(model, x)
    t_explain, _ = timed(lambda: lrp.explain(model, x), args.repeats)
    t_lrp, curve = timed(lambda: evaluate.perturbation_curve(
        model, x, explained.relevance, explained.target, steps=args.steps, replace="zero", score="probability",
        batch_size=args.batch_size), args.repeats)
    forwards = args.digits * args.steps
    rows = [("lrp.explain (epsilon-plus-flat), all digits", t_explain, ""),
            (f"lrp perturbation_curve, {args.steps} steps", t_lrp,
             f"{forwards / t_lrp:,.0f} perturbed inputs/s; AOPC {curve.aopc.mean():.4f}")]
    if not args.no_quantus:
        try:
            import quantus
        except ImportError:
            print("Quantus is not installed (pip install quantus); its row is left out")
        else:
            per_step = 784 // args.steps
            metric = quantus.PixelFlipping(features_in_step=per_step, perturb_baseline="black", normalise=False,
                                           abs=False, disable_warnings=True)
            xn, an, yn = x.numpy(), explained.relevance.numpy(), explained.target.numpy()
            t_q, q = timed(lambda: metric(model=model, x_batch=xn, y_batch=yn, a_batch=an, device="cpu",
                                          softmax=True, channel_first=True, batch_size=args.batch_size),
                           args.repeats)
            q = np.asarray(q)
            aopc = (curve.scores[:, :1] - np.concatenate([curve.scores[:, :1], q], 1)).mean()
            rows.append((f"Quantus 0.6 PixelFlipping, {q.shape[1]} steps of {per_step} pixels", t_q,
                         f"{args.digits * q.shape[1] / t_q:,.0f} perturbed inputs/s; AOPC {aopc:.4f}; "
                         f"{t_q / t_lrp:.1f}x lrp's time"))
    print(f"\n{args.digits} MNIST digits; {cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats}\n")
    print("| what | seconds | notes |\n|---|---|---|")
    for name, seconds, note in rows:
        print(f"| {name} | {seconds:.2f} | {note} |")


if __name__ == "__main__":
    main()
