"""Where the time of one explanation goes, next to a plain gradient: torch's profiler over one call of gradient x
input and one replayed ``lrp.Explainer`` call, their operations summed by kind.

    .venv/bin/python benchmarks/op_breakdown.py [--model vgg16] [--batch 8] [--composite epsilon-plus-flat]
                                                [--device {cpu,cuda}] [--reps 3]

Random weights (fixed seed), 224x224, parameters frozen. The explainer is warmed by four calls (eager, recorded,
replayed twice), the gradient by one; then ``--reps`` profiled calls of each, alternating, and the table shows the
per-call mean of each kind of operation (self time: an operation's own time, not that of the operations it
calls; on CUDA, the kernels' device time). Kinds: convolution forward (``aten::*convolution`` but the backward),
convolution backward (``aten::convolution_backward``), matrix products (``mm``/``addmm``/``bmm``), pooling
(forward and backward), elementwise and reductions (everything else with a tensor result). The bound the issue
sets, a z+ layer at 1.5x the gradient, assumes a convolution's backward costs what its forward costs: the table
shows what it costs on this machine, and so what a z+ layer's extra forward adds here.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

import lrp

from harness import argument_parser, check_device, frozen_torchvision, machine_lines  # benchmarks/harness.py

KINDS = ("convolution forward", "convolution backward", "matrix products", "pooling", "elementwise and other")


def kind_of(name: str) -> str:
    if name == "aten::convolution_backward":
        return "convolution backward"
    if "convolution" in name:
        return "convolution forward"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matrix products"
    if "pool" in name:
        return "pooling"
    return "elementwise and other"


def profiled(run, device: str) -> dict[str, float]:
    """Seconds of each kind in one call of ``run``, and the call's wall time under ``"wall"``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        if device == "cuda":
            torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if not event.key.startswith("aten::") or event.key in ("aten::empty", "aten::empty_strided"):
            continue
        own = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        totals[kind_of(event.key)] += own / 1e6
    totals["wall"] = sum(totals.values())
    return totals


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--composite", default="epsilon-plus-flat")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    check_device(args.device)
    torch.set_num_threads(2)
    model = frozen_torchvision(args.model, args.device)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    with torch.no_grad():
        target = model(x).argmax(1)

    def gradient() -> None:
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(leaf).gather(1, target[:, None]).sum(), leaf)
        grad.mul_(leaf.detach())

    explainer = lrp.Explainer(model, args.composite, cuda_graphs=False)  # the profiler sees kernels, not a graph

    def explained() -> None:
        explainer(x, target=target)

    for _ in range(4):
        explained()
    gradient()
    assert explainer.calls["replayed"] >= 2, (explainer.calls, explainer.why_not_replayed)
    sums: dict[str, dict[str, float]] = {"gradient": defaultdict(float), "lrp": defaultdict(float)}
    for _ in range(args.reps):
        for name, run in (("gradient", gradient), ("lrp", explained)):
            for kind, seconds in profiled(run, args.device).items():
                sums[name][kind] += seconds / args.reps
    print(f"# op_breakdown.py: {args.model}, batch {args.batch}, {args.composite}, {args.device}, "
          f"mean of {args.reps} profiled calls each")
    print("\n".join(machine_lines([f"lrp {lrp.__version__}", f"torchvision {torchvision.__version__}"])))
    print("\n| kind | gradient x input ms | lrp Explainer (replayed) ms | lrp / gradient total |")
    print("|---|---:|---:|---:|")
    total = sums["gradient"]["wall"]
    for kind in (*KINDS, "wall"):
        g, e = sums["gradient"][kind], sums["lrp"][kind]
        label = "all operations" if kind == "wall" else kind
        print(f"| {label} | {g * 1e3:.0f} | {e * 1e3:.0f} | {e / total:.2f} |")
    g = sums["gradient"]
    if g["convolution forward"] > 0:
        back = g["convolution backward"] / g["convolution forward"]
        print(f"\nconvolution backward / forward in the gradient: {back:.2f}; a z+ layer's bound, "
              f"(1 + 1 + {back:.2f}) / (1 + {back:.2f}) = {(2 + back) / (1 + back):.3f}")


if __name__ == "__main__":
    main()
